//! Allocations from an earlier boot of the node: every pod sandbox is new after a boot, so none
//! of them is in use. The store keeps the boot id its allocations were made under (`boot_id`);
//! the first allocation under another one drops them all, under the store's lock, before it
//! allocates: addresses come from the start of the range again.
//!
//! Crash safety: the new boot id is written (whole, by rename) only after every old allocation
//! is gone, and allocations are made only after it is written. A process killed midway leaves
//! the old id, so the next allocation finishes the drop; no allocation of this boot is ever made
//! while old ones remain, so none is ever dropped. A store without the file (new, or written by a
//! version before boot ids) keeps what it holds: its boot is unknown.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;

use super::*;

impl IpamStore {
    /// Under the lock: drops every allocation if they belong to another boot than this store's
    /// `boot_id`. Returns what was dropped.
    pub(super) fn drop_other_boots(&self) -> Result<Vec<Reclaimed>, IpamError> {
        let Some(current) = &self.boot_id else {
            return Ok(Vec::new());
        };
        let path = self.dir.join(BOOT_FILE);
        let stored = match fs::read_to_string(&path) {
            Ok(text) if text.trim() == current => return Ok(Vec::new()),
            Ok(text) => text.trim().to_string(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.write_boot_id(current)?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(self.io(&path)(e)),
        };
        let mut dropped = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(self.io(&self.dir))?;
        for entry in entries {
            let entry = entry.map_err(self.io(&self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Ok(ip) = name.parse::<Ipv4Addr>() {
                let key = fs::read_to_string(entry.path())
                    .ok()
                    .and_then(|t| AttachmentKey::parse(&t));
                self.remove_file(name)?;
                dropped.push(Reclaimed {
                    ip,
                    key,
                    age: Duration::ZERO,
                    why: format!("made under boot {stored}, this is boot {current}"),
                });
            } else if name.starts_with(KEY_PREFIX) {
                self.remove_file(name)?;
            }
        }
        self.remove_file(LAST_RESERVED_FILE)?;
        self.write_boot_id(current)?;
        self.record(&dropped)?;
        Ok(dropped)
    }

    fn write_boot_id(&self, id: &str) -> Result<(), IpamError> {
        fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        // `.tmp.` files are removed by allocations under the lock if a crash leaves one.
        let tmp = self.dir.join(format!("{TMP_PREFIX}{BOOT_FILE}"));
        fs::write(&tmp, format!("{id}\n")).map_err(self.io(&tmp))?;
        let path = self.dir.join(BOOT_FILE);
        fs::rename(&tmp, &path).map_err(self.io(&path))
    }
}
