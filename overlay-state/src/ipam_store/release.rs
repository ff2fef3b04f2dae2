//! Giving IPs back: DEL's release, GC's, and the reclaim of allocations nobody uses any more.

use std::fs;
use std::net::Ipv4Addr;

use super::*;

impl IpamStore {
    /// Releases every IP `key` holds (normally one). Returns them; none is not an error.
    pub fn release(&self, key: &AttachmentKey) -> Result<Vec<Ipv4Addr>, IpamError> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let _lock = self.lock()?;
        let mut released = Vec::new();
        if let Some(ip) = self.find(key)? {
            released.push(ip);
            if self.release_found(key, ip)? {
                return Ok(released);
            }
        } else {
            // No index entry: only something outside this store's rules could have made such a
            // file, so look at every one.
            for a in self.list()? {
                if a.key.as_ref() == Some(key) {
                    self.remove_ip_file(a.ip)?;
                    released.push(a.ip);
                }
            }
        }
        self.remove_file(&key.index_name())?;
        Ok(released)
    }

    /// Releases every allocation whose key `keep` rejects (and those with no readable key).
    /// Returns what it released.
    pub fn gc(&self, keep: impl Fn(&AttachmentKey) -> bool) -> Result<Vec<Allocation>, IpamError> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let _lock = self.lock()?;
        let _ = self.taken_removing_stale()?;
        let mut released = Vec::new();
        let mut kept = HashSet::new();
        for a in self.list()? {
            match &a.key {
                Some(k) if keep(k) => {
                    kept.insert(k.index_name());
                }
                _ => {
                    self.remove_ip_file(a.ip)?;
                    released.push(a);
                }
            }
        }
        // Index entries of released or never-completed allocations.
        let entries = fs::read_dir(&self.dir).map_err(self.io(&self.dir))?;
        for entry in entries.flatten() {
            if let Some(name) = entry.file_name().to_str() {
                if name.starts_with(KEY_PREFIX) && !kept.contains(name) {
                    self.remove_file(name)?;
                }
            }
        }
        Ok(released)
    }

    /// Under the lock: releases `ip`, which `find(key)` found (so the index entry is the same
    /// file). The IP name goes first; the file, then only the index entry, is kept as a spare
    /// for the next ADD. Returns false if that rename failed (the index entry is still there).
    fn release_found(&self, key: &AttachmentKey, ip: Ipv4Addr) -> Result<bool, IpamError> {
        self.remove_ip_file(ip)?;
        let index = self.dir.join(key.index_name());
        Ok(fs::rename(&index, self.dir.join(format!("{SPARE_PREFIX}{ip}"))).is_ok())
    }

    /// Under the lock: releases `ip`, held by `key` (its file says so), whether or not the
    /// index entry still names it.
    pub(super) fn release_ip_of(&self, key: &AttachmentKey, ip: Ipv4Addr) -> Result<(), IpamError> {
        if self.find(key)? == Some(ip) {
            if !self.release_found(key, ip)? {
                self.remove_file(&key.index_name())?;
            }
        } else {
            self.remove_ip_file(ip)?;
        }
        Ok(())
    }
}
