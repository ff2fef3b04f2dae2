//! Allocation: the search for a free IP, the spare files that spare ADD an inode, and (see
//! [`super::boot`]) dropping what an earlier boot left.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::SystemTime;

use ipnetwork::Ipv4Network;

use super::*;

impl IpamStore {
    /// The IPs taken, by file name alone (no file is read), one spare file and how many there
    /// are. Under the lock, also removes the temp files that killed allocators of earlier
    /// versions left.
    pub(super) fn taken_removing_stale(
        &self,
    ) -> Result<(HashSet<u32>, Option<PathBuf>, usize), IpamError> {
        let entries = fs::read_dir(&self.dir).map_err(self.io(&self.dir))?;
        let mut out = HashSet::new();
        let (mut spare, mut spares) = (None, 0);
        for entry in entries {
            let entry = entry.map_err(self.io(&self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Ok(ip) = name.parse::<Ipv4Addr>() {
                out.insert(u32::from(ip));
            } else if name.starts_with(SPARE_PREFIX) {
                spares += 1;
                spare.get_or_insert_with(|| entry.path());
            } else if name.starts_with(TMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok((out, spare, spares))
    }

    /// Allocates an IP of `subnet` for `key`, or returns the one `key` already holds. The search
    /// starts after the IP reserved last, so a just-released IP is not handed out again at once
    /// (a stale ARP entry or a lingering connection would reach the wrong pod).
    pub fn allocate(
        &self,
        subnet: Ipv4Network,
        key: &AttachmentKey,
    ) -> Result<Ipv4Addr, IpamError> {
        self.allocate_counting_spares(subnet, key).map(|a| a.ip)
    }

    /// [`IpamStore::allocate`], also saying how many spare files are left.
    pub fn allocate_counting_spares(
        &self,
        subnet: Ipv4Network,
        key: &AttachmentKey,
    ) -> Result<Allocated, IpamError> {
        self.allocate_or_reclaim(subnet, key, &mut || None)
    }

    /// [`IpamStore::allocate_counting_spares`], and on a full subnet first the reclaim of
    /// allocations nobody uses (see `reclaim.rs`): `links` gives the names of the node's links,
    /// asked for (under the lock) only then. Allocations of an earlier boot are dropped first.
    pub fn allocate_or_reclaim(
        &self,
        subnet: Ipv4Network,
        key: &AttachmentKey,
        links: &mut dyn FnMut() -> Option<HashSet<String>>,
    ) -> Result<Allocated, IpamError> {
        let (first, last) = pod_range(subnet).ok_or(IpamError::SubnetTooSmall(subnet))?;
        let _lock = self.lock()?;
        let mut reclaimed = self.drop_other_boots()?;
        if let Some(ip) = self.find(key)? {
            if (first..=last).contains(&ip) {
                // A repeated ADD is an ADD in progress again: its grace starts anew.
                let path = self.dir.join(ip.to_string());
                let _ = File::open(&path).and_then(|f| f.set_modified(SystemTime::now()));
                return Ok(Allocated {
                    ip,
                    spares_left: None,
                    reclaimed,
                });
            }
            // Held from a subnet this node no longer has (renumbered): of no use to the pod.
            self.remove_ip_file(ip)?;
        }
        let (mut used, spare, spares) = self.taken_removing_stale()?;
        let (first, last) = (u32::from(first), u32::from(last));
        let capacity = (last - first + 1) as usize;
        let mut allocated = used
            .iter()
            .filter(|ip| (first..=last).contains(*ip))
            .count();
        let mut waiting = String::new();
        if allocated >= capacity {
            let (got, young) = self.reclaim_locked(subnet, reclaim::Pass::FullSubnet, links)?;
            for r in &got {
                used.remove(&u32::from(r.ip));
            }
            allocated -= got.len().min(allocated);
            reclaimed.extend(got);
            if young > 0 {
                waiting = format!(
                    ", {young} of them without a host veth but younger than the {}s grace \
                     (an ADD in progress, or one just killed: reclaimed after that)",
                    RECLAIM_GRACE.as_secs()
                );
            }
        }
        let exhausted = || IpamError::Exhausted {
            subnet,
            allocated,
            capacity,
            dir: self.dir.clone(),
            waiting: waiting.clone(),
        };
        if allocated >= capacity {
            return Err(exhausted());
        }
        let start = match self.last_reserved()? {
            Some(ip) if (first..last).contains(&u32::from(ip)) => u32::from(ip) + 1,
            _ => first,
        };
        // The index entry is made first, from a spare or as a new file. A stale one (find()
        // rejected it) may still be linked under an IP someone else holds now, so it is never
        // written into: the rename replaces the name, the removal drops it.
        let index = self.dir.join(key.index_name());
        let reused = match spare {
            Some(spare) => fs::rename(&spare, &index).is_ok(),
            None => false,
        };
        let file = if reused {
            OpenOptions::new().write(true).open(&index)
        } else {
            self.remove_file(&key.index_name())?;
            OpenOptions::new().write(true).create_new(true).open(&index)
        }
        .map_err(self.io(&index))?;
        // A spare holds its last owner's content, which must not outlive the rewrite. Cut to the
        // new length after writing, never to zero first: ext4 flushes a file truncated to zero
        // when it is closed (auto_da_alloc), a disk write on ADD's path. Until then the file is
        // only an index entry, which find() checks against the IP file anyway.
        let mut may_be_longer = reused;
        for offset in 0..capacity as u32 {
            let candidate = first + (start - first + offset) % capacity as u32;
            if used.contains(&candidate) {
                continue;
            }
            let ip = Ipv4Addr::from(candidate);
            let content = key.render_with(ip);
            file.write_all_at(content.as_bytes(), 0)
                .map_err(self.io(&index))?;
            if may_be_longer {
                file.set_len(content.len() as u64)
                    .map_err(self.io(&index))?;
            }
            // Another try (an IP file appeared that the listing did not show) may write less.
            may_be_longer = true;
            let target = self.dir.join(ip.to_string());
            match fs::hard_link(&index, &target) {
                Ok(()) => {
                    self.write_last_reserved(ip)?;
                    return Ok(Allocated {
                        ip,
                        spares_left: Some(spares - usize::from(reused)),
                        reclaimed,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    let _ = fs::remove_file(&index);
                    return Err(self.io(&target)(e));
                }
            }
        }
        let _ = fs::remove_file(&index);
        Err(exhausted())
    }

    /// Makes the empty spares `spare.new.0` .. `spare.new.3` that are missing, so that the next
    /// ADDs rename instead of creating a file. Needs no lock: each is created with O_EXCL (so there
    /// are never more than four), holds nothing, and an allocator rewrites whatever it renames.
    /// Returns how many it made.
    pub fn top_up_spares(&self) -> Result<usize, IpamError> {
        fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        let mut made = 0;
        for k in 0..NEW_SPARES {
            let path = self.dir.join(format!("{SPARE_PREFIX}new.{k}"));
            // A lookup shares the directory; an O_CREAT open locks it even to find the name
            // taken, and ADDs in a burst are renaming in that directory.
            if path.exists() {
                continue;
            }
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => made += 1,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(self.io(&path)(e)),
            }
        }
        Ok(made)
    }
}
