//! The node-local IPAM store of the `overlay` CNI plugin: which pod IPs of this node's subnet are
//! taken, and by whom. The same layout as the reference `host-local` plugin's disk store:
//!
//! ```text
//! <dataDir>/<network-name>/
//!     lock                  flock(2)ed exclusively by whoever allocates or releases
//!     last_reserved_ip      the IP handed out last; the next search starts after it (a hint)
//!     10.244.7.2            one file per allocated IP: "<container id>\n<ifname>\n<ip>\n"
//!     10.244.7.3
//!     key.<16 hex>          index: the same file under the name of its (container id, ifname)
//!     spare.10.244.7.9      a released allocation's file, kept for the next ADD to reuse
//!     spare.new.0           an empty file made ahead of need (spare.new.0 .. spare.new.3)
//! ```
//!
//! An allocation is one file with two names. It is made as `key.<hash>`, fully written, then
//! given its IP's name with `link(2)`, which, like `O_EXCL`, fails if the name exists. Creating a
//! file (an inode) is by far the dearest step on a loaded ext4 (150-450 µs here, against under
//! 20 µs for a link or a rename), so an ADD creates at most one: a release renames the index entry
//! to `spare.<ip>` (at most one per IP of the subnet) and the next ADD renames a spare back into
//! an index entry and rewrites it. A spare is never linked under an IP name: its IP name is gone
//! before it is renamed. [`IpamStore::top_up_spares`] makes empty spares ahead of need (the plugin
//! runs it in a helper process while ADD wires the pod), so a node's first pods do not pay for
//! inodes either.
//!
//! Crash safety (a plugin may be `kill -9`ed at any instruction):
//! - An IP is taken exactly when a file with its name exists. That name is only ever made by
//!   `link(2)` from a fully written file, so no IP is handed out twice, and an IP file never holds
//!   half a key.
//! - The flock is the kernel's: a killed holder releases it, nobody waits on a dead process.
//! - An index entry left by a killed allocator (written, never linked to an IP) names an IP
//!   whose file is absent or another key's: it fails the check and is replaced.
//! - The worst a crash leaves is an IP file whose container never got its interface: a leak until
//!   the runtime's DEL (same key) or GC (key not among the valid attachments) releases it. A
//!   repeated ADD with the same key gets the same IP back.
//!
//! Files are not fsync'ed: the store must survive the death of a process, not of the machine (after
//! a reboot every pod sandbox is new and the runtime's GC reconciles the store).
//!
//! The index spares ADD and DEL from reading every IP file (253 on a full /24 node). It is only a
//! hint, always checked against the IP file it names: it exists before the IP name does and is
//! removed after it, so an IP file for a key always has its index entry, and a stale entry (left
//! by a crash) fails the check and is replaced or removed.
//!
//! Readers (metrics, `list`) need no lock: they see each IP file either absent or complete.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use nix::fcntl::{Flock, FlockArg};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/overlay";
const LOCK_FILE: &str = "lock";
const LAST_RESERVED_FILE: &str = "last_reserved_ip";
const TMP_PREFIX: &str = ".tmp.";
const KEY_PREFIX: &str = "key.";
const SPARE_PREFIX: &str = "spare.";
/// How many empty spares [`IpamStore::top_up_spares`] keeps ready: enough for ADDs a few at a time.
const NEW_SPARES: usize = 4;

/// Who holds an IP: the runtime's (container id, interface name) pair, as in CNI's GC attachments.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

impl AttachmentKey {
    pub fn new(container_id: impl Into<String>, ifname: impl Into<String>) -> Self {
        AttachmentKey {
            container_id: container_id.into(),
            ifname: ifname.into(),
        }
    }

    fn render(&self) -> String {
        format!("{}\n{}\n", self.container_id, self.ifname)
    }

    /// An allocation's content: the key, then the IP (so the index entry, the same file, names it).
    fn render_with(&self, ip: Ipv4Addr) -> String {
        format!("{}{ip}\n", self.render())
    }

    /// The index file's name: FNV-1a (64 bit) of the rendered key.
    fn index_name(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.render().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{KEY_PREFIX}{h:016x}")
    }

    fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        let container_id = lines.next()?.trim();
        let ifname = lines.next()?.trim();
        if container_id.is_empty() || ifname.is_empty() {
            return None;
        }
        Some(AttachmentKey::new(container_id, ifname))
    }
}

/// What an allocation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocated {
    pub ip: Ipv4Addr,
    /// Spare files left for the next allocations (see [`IpamStore::top_up_spares`]); None when
    /// the key already held its IP and nothing was used.
    pub spares_left: Option<usize>,
}

/// One allocated IP. `key` is `None` for a file whose content cannot be read as a key (written by
/// something else, or damaged by a crash of the machine); such an IP stays taken until GC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub key: Option<AttachmentKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("IPAM store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "subnet {subnet} is exhausted: {allocated} of {capacity} pod addresses are allocated \
         (store {dir}); delete pods on this node, or run CNI GC to release leaked addresses"
    )]
    Exhausted {
        subnet: Ipv4Network,
        allocated: usize,
        capacity: usize,
        dir: PathBuf,
    },
    #[error("network name {0:?} cannot name an IPAM store directory")]
    InvalidNetworkName(String),
    #[error("subnet {0} has no addresses for pods (needs /30 or larger)")]
    SubnetTooSmall(Ipv4Network),
}

/// The pod addresses of `subnet`: everything but the network address (the VTEP's `.0`), the gateway
/// (`.1`, on the bridge) and the broadcast address.
pub fn pod_range(subnet: Ipv4Network) -> Option<(Ipv4Addr, Ipv4Addr)> {
    let net = u32::from(subnet.network());
    let bcast = u32::from(subnet.broadcast());
    let first = net.checked_add(2)?;
    let last = bcast.checked_sub(1)?;
    (subnet.prefix() <= 30 && first <= last).then(|| (Ipv4Addr::from(first), Ipv4Addr::from(last)))
}

/// How many pods `subnet` can hold.
pub fn pod_capacity(subnet: Ipv4Network) -> usize {
    pod_range(subnet)
        .map(|(f, l)| (u32::from(l) - u32::from(f) + 1) as usize)
        .unwrap_or(0)
}

/// The store of one CNI network (one directory).
#[derive(Debug, Clone)]
pub struct IpamStore {
    dir: PathBuf,
}

/// Held while allocating or releasing; the flock goes with the file descriptor.
pub struct StoreLock {
    _lock: Flock<File>,
}

impl IpamStore {
    /// The store of network `name` under `data_dir`. Touches nothing on disk.
    pub fn new(data_dir: &Path, network_name: &str) -> Result<Self, IpamError> {
        if !valid_network_name(network_name) {
            return Err(IpamError::InvalidNetworkName(network_name.to_string()));
        }
        Ok(IpamStore {
            dir: data_dir.join(network_name),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, path: &Path) -> impl FnOnce(io::Error) -> IpamError {
        let path = path.to_path_buf();
        move |source| IpamError::Io { path, source }
    }

    /// Opens `path` for writing, creating it if missing and keeping what it holds.
    fn open_keeping(&self, path: &Path) -> Result<File, IpamError> {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(self.io(path))
    }

    /// Takes the store's exclusive lock, creating the directory if needed. Blocks while another
    /// process holds it.
    pub fn lock(&self) -> Result<StoreLock, IpamError> {
        fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        let path = self.dir.join(LOCK_FILE);
        let file = self.open_keeping(&path)?;
        // flock(2): released by the kernel when the process dies, and the same lock the Go
        // plugins take, should anyone point one at this directory. (std's `File::lock` does the
        // same but needs Rust 1.89; the workspace supports 1.85.)
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| self.io(&path)(io::Error::from(errno)))?;
        Ok(StoreLock { _lock: lock })
    }

    /// Every allocation, sorted by IP. Needs no lock; an absent store is empty.
    pub fn list(&self) -> Result<Vec<Allocation>, IpamError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(self.io(&self.dir))?;
            let name = entry.file_name();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            let path = entry.path();
            let key = match fs::read_to_string(&path) {
                Ok(text) => AttachmentKey::parse(&text),
                // Released between listing and reading.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                // Not UTF-8 or unreadable: still taken, owner unknown.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => None,
                Err(e) => return Err(self.io(&path)(e)),
            };
            out.push(Allocation { ip, key });
        }
        out.sort_by_key(|a| a.ip);
        Ok(out)
    }

    /// The IP held by `key`, if any, found through the index (two small reads).
    pub fn find(&self, key: &AttachmentKey) -> Result<Option<Ipv4Addr>, IpamError> {
        let path = self.dir.join(key.index_name());
        // The IP is the last line (an entry written by an older version holds only the IP).
        let ip: Ipv4Addr = match fs::read_to_string(&path) {
            Ok(text) => match text.lines().last().map(|l| l.trim().parse()) {
                Some(Ok(ip)) => ip,
                _ => return Ok(None),
            },
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::InvalidData
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(self.io(&path)(e)),
        };
        let ip_path = self.dir.join(ip.to_string());
        match fs::read_to_string(&ip_path) {
            Ok(text) if AttachmentKey::parse(&text).as_ref() == Some(key) => Ok(Some(ip)),
            Ok(_) => Ok(None),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::InvalidData
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(self.io(&ip_path)(e)),
        }
    }

    /// The IPs taken, by file name alone (no file is read), one spare file and how many there
    /// are. Under the lock, also removes the temp files that killed allocators of earlier
    /// versions left.
    fn taken_removing_stale(&self) -> Result<(HashSet<u32>, Option<PathBuf>, usize), IpamError> {
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
        let (first, last) = pod_range(subnet).ok_or(IpamError::SubnetTooSmall(subnet))?;
        let _lock = self.lock()?;
        if let Some(ip) = self.find(key)? {
            if (first..=last).contains(&ip) {
                return Ok(Allocated {
                    ip,
                    spares_left: None,
                });
            }
            // Held from a subnet this node no longer has (renumbered): of no use to the pod.
            self.remove_ip_file(ip)?;
        }
        let (used, spare, spares) = self.taken_removing_stale()?;
        let (first, last) = (u32::from(first), u32::from(last));
        let capacity = (last - first + 1) as usize;
        let allocated = used
            .iter()
            .filter(|ip| (first..=last).contains(*ip))
            .count();
        let exhausted = || IpamError::Exhausted {
            subnet,
            allocated,
            capacity,
            dir: self.dir.clone(),
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

    /// Releases every IP `key` holds (normally one). Returns them; none is not an error.
    pub fn release(&self, key: &AttachmentKey) -> Result<Vec<Ipv4Addr>, IpamError> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let _lock = self.lock()?;
        let mut released = Vec::new();
        let index = self.dir.join(key.index_name());
        if let Some(ip) = self.find(key)? {
            self.remove_ip_file(ip)?;
            released.push(ip);
            // The IP name is gone, so the file is only the index entry now: keep it for the next
            // ADD. Failing that, it is removed like any index entry.
            if fs::rename(&index, self.dir.join(format!("{SPARE_PREFIX}{ip}"))).is_ok() {
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

    fn remove_ip_file(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        self.remove_file(&ip.to_string())
    }

    fn remove_file(&self, name: &str) -> Result<(), IpamError> {
        let path = self.dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(&path)(e)),
        }
    }

    fn last_reserved(&self) -> Result<Option<Ipv4Addr>, IpamError> {
        let path = self.dir.join(LAST_RESERVED_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text.trim().parse().ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(&path)(e)),
        }
    }

    /// Only a hint for the search, so losing it to a crash costs nothing but the search order.
    /// Written in place at a fixed width (no truncation, no new file after the first): a torn
    /// write reads as absent or as an IP that fails its range check.
    fn write_last_reserved(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let path = self.dir.join(LAST_RESERVED_FILE);
        let file = self.open_keeping(&path)?;
        file.write_all_at(format!("{ip:<15}\n").as_bytes(), 0)
            .map_err(self.io(&path))
    }
}

/// How full one CNI network's store is.
#[derive(Debug)]
pub struct StoreUsage {
    pub network: String,
    pub dir: PathBuf,
    /// Pod addresses of the subnet handed out.
    pub allocated: Result<usize, IpamError>,
}

/// The pod addresses of `subnet` in use, per network store under `data_dir` (the plugin's
/// `dataDir`), sorted by network; empty when no store exists yet. Reads names only, no file.
pub fn usage(data_dir: &Path, subnet: Ipv4Network) -> Vec<StoreUsage> {
    let Some((first, last)) = pod_range(subnet) else {
        return Vec::new();
    };
    let mut names: Vec<String> = match fs::read_dir(data_dir) {
        Ok(entries) => entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| valid_network_name(n))
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
        .into_iter()
        .map(|network| {
            let dir = data_dir.join(&network);
            let allocated = fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .filter_map(|e| e.file_name().to_str()?.parse::<Ipv4Addr>().ok())
                        .filter(|ip| (first..=last).contains(ip))
                        .count()
                })
                .map_err(|source| IpamError::Io {
                    path: dir.clone(),
                    source,
                });
            StoreUsage {
                network,
                dir,
                allocated,
            }
        })
        .collect()
}

/// CNI network names are `[A-Za-z0-9][A-Za-z0-9_.-]*`; also what keeps one from escaping `dataDir`.
pub fn valid_network_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn subnet(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn key(i: usize) -> AttachmentKey {
        AttachmentKey::new(format!("c{i}"), "eth0")
    }

    #[test]
    fn range_skips_network_gateway_and_broadcast() {
        let (f, l) = pod_range(subnet("10.244.7.0/24")).unwrap();
        assert_eq!(f, Ipv4Addr::new(10, 244, 7, 2));
        assert_eq!(l, Ipv4Addr::new(10, 244, 7, 254));
        assert_eq!(pod_capacity(subnet("10.244.7.0/24")), 253);
        assert_eq!(pod_capacity(subnet("10.244.7.0/28")), 13);
        assert_eq!(pod_capacity(subnet("10.244.7.0/30")), 1);
        assert_eq!(pod_capacity(subnet("10.244.7.0/31")), 0);
    }

    #[test]
    fn allocates_in_order_after_last_reserved_and_is_idempotent_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net").unwrap();
        let s = subnet("10.1.2.0/24");
        let a = store.allocate(s, &key(1)).unwrap();
        let b = store.allocate(s, &key(2)).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 1, 2, 2));
        assert_eq!(b, Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(store.allocate(s, &key(1)).unwrap(), a);
        // A released IP is not reused at once.
        assert_eq!(store.release(&key(1)).unwrap(), vec![a]);
        assert_eq!(
            store.allocate(s, &key(3)).unwrap(),
            Ipv4Addr::new(10, 1, 2, 4)
        );
        assert_eq!(store.find(&key(2)).unwrap(), Some(b));
        assert_eq!(store.find(&key(1)).unwrap(), None);
        assert!(store.release(&key(1)).unwrap().is_empty());
    }

    #[test]
    fn exhaustion_names_subnet_and_count_and_leaks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net").unwrap();
        let s = subnet("10.1.2.16/28");
        let mut ips = HashSet::new();
        for i in 0..13 {
            let ip = store.allocate(s, &key(i)).unwrap();
            assert!(ip != Ipv4Addr::new(10, 1, 2, 16) && ip != Ipv4Addr::new(10, 1, 2, 17));
            assert!(ip != Ipv4Addr::new(10, 1, 2, 31));
            assert!(ips.insert(ip));
        }
        let err = store.allocate(s, &key(99)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("10.1.2.16/28") && msg.contains("13 of 13"),
            "{msg}"
        );
        assert_eq!(store.list().unwrap().len(), 13);
        // Wraps around to a freed IP.
        store.release(&key(0)).unwrap();
        assert_eq!(
            store.allocate(s, &key(99)).unwrap(),
            Ipv4Addr::new(10, 1, 2, 18)
        );
    }

    #[test]
    fn gc_keeps_valid_and_drops_the_rest_including_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net").unwrap();
        let s = subnet("10.1.2.0/24");
        for i in 0..4 {
            store.allocate(s, &key(i)).unwrap();
        }
        fs::write(store.dir().join("10.1.2.200"), "").unwrap();
        fs::write(store.dir().join(".tmp.10.1.2.9.1234"), "half").unwrap();
        let released = store.gc(|k| k == &key(1) || k == &key(3)).unwrap();
        assert_eq!(released.len(), 3);
        let left: Vec<_> = store.list().unwrap().into_iter().map(|a| a.key).collect();
        assert_eq!(left, vec![Some(key(1)), Some(key(3))]);
        assert!(!store.dir().join(".tmp.10.1.2.9.1234").exists());
    }

    #[test]
    fn a_key_holding_an_ip_of_another_subnet_gets_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net").unwrap();
        let old = store.allocate(subnet("10.1.2.0/24"), &key(1)).unwrap();
        let new = store.allocate(subnet("10.1.3.0/24"), &key(1)).unwrap();
        assert_eq!(new, Ipv4Addr::new(10, 1, 3, 2));
        assert_eq!(store.list().unwrap().len(), 1);
        assert_eq!(store.find(&key(1)).unwrap(), Some(new));
        assert!(!store.dir().join(old.to_string()).exists());
    }

    #[test]
    fn stale_or_missing_index_entries_are_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net").unwrap();
        let s = subnet("10.1.2.0/24");
        let a = store.allocate(s, &key(1)).unwrap();
        let b = store.allocate(s, &key(2)).unwrap();
        // A crash after writing key 3's index entry, before its IP file: points at a free IP...
        fs::write(store.dir().join(key(3).index_name()), "10.1.2.50\n").unwrap();
        assert_eq!(store.find(&key(3)).unwrap(), None);
        // ...or, later, at an IP someone else got.
        fs::write(store.dir().join(key(3).index_name()), format!("{a}\n")).unwrap();
        assert_eq!(store.find(&key(3)).unwrap(), None);
        let c = store.allocate(s, &key(3)).unwrap();
        assert!(c != a && c != b);
        assert_eq!(store.find(&key(3)).unwrap(), Some(c));
        assert_eq!(store.find(&key(1)).unwrap(), Some(a));
        // An IP file without an index entry is still released by its key.
        fs::remove_file(store.dir().join(key(2).index_name())).unwrap();
        assert_eq!(store.release(&key(2)).unwrap(), vec![b]);
        // GC drops index entries nothing valid uses.
        fs::write(store.dir().join(key(9).index_name()), "10.1.2.77\n").unwrap();
        store.gc(|k| k == &key(1)).unwrap();
        let names: BTreeSet<String> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let want: BTreeSet<String> = [
            a.to_string(),
            key(1).index_name(),
            LOCK_FILE.to_string(),
            LAST_RESERVED_FILE.to_string(),
        ]
        .into();
        assert_eq!(names, want);
    }

    #[test]
    fn an_allocation_is_one_file_and_a_stale_index_is_never_written_into() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net").unwrap();
        let s = subnet("10.1.2.0/24");
        let a = store.allocate(s, &key(1)).unwrap();
        let ip_file = fs::metadata(store.dir().join(a.to_string())).unwrap();
        let index = fs::metadata(store.dir().join(key(1).index_name())).unwrap();
        assert_eq!(ip_file.ino(), index.ino());
        assert_eq!(ip_file.nlink(), 2);
        // Key 3's index entry is, after some crash, another name of key 1's allocation.
        fs::hard_link(
            store.dir().join(a.to_string()),
            store.dir().join(key(3).index_name()),
        )
        .unwrap();
        assert_eq!(store.find(&key(3)).unwrap(), None);
        let c = store.allocate(s, &key(3)).unwrap();
        assert_ne!(c, a);
        assert_eq!(store.find(&key(1)).unwrap(), Some(a));
        assert_eq!(store.find(&key(3)).unwrap(), Some(c));
        assert_eq!(
            fs::read_to_string(store.dir().join(a.to_string())).unwrap(),
            format!("c1\neth0\n{a}\n")
        );
    }

    #[test]
    fn released_files_are_reused_and_spares_stay_bounded() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net").unwrap();
        let s = subnet("10.1.2.0/28");
        let a = store.allocate(s, &key(1)).unwrap();
        let ino = fs::metadata(store.dir().join(a.to_string())).unwrap().ino();
        assert_eq!(store.release(&key(1)).unwrap(), vec![a]);
        let spare = store.dir().join(format!("{SPARE_PREFIX}{a}"));
        assert_eq!(fs::metadata(&spare).unwrap().ino(), ino);
        assert!(!store.dir().join(key(1).index_name()).exists());
        assert_eq!(store.find(&key(1)).unwrap(), None);
        // The next allocation is that file again, rewritten whole for its new owner.
        let b = store.allocate(s, &key(22)).unwrap();
        assert!(!spare.exists());
        let file = store.dir().join(b.to_string());
        assert_eq!(fs::metadata(&file).unwrap().ino(), ino);
        assert_eq!(
            fs::read_to_string(&file).unwrap(),
            format!("c22\neth0\n{b}\n")
        );
        assert_eq!(store.list().unwrap().len(), 1);
        // Many pods come and go: at most one spare per IP of the subnet.
        for i in 100..400 {
            store.allocate(s, &key(i)).unwrap();
            if i % 3 != 0 {
                store.release(&key(i)).unwrap();
            }
            if store.list().unwrap().len() >= pod_capacity(s) {
                for a in store.list().unwrap() {
                    store.release(&a.key.unwrap()).unwrap();
                }
            }
        }
        let spares = fs::read_dir(store.dir())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_str().unwrap().starts_with(SPARE_PREFIX)
            })
            .count();
        assert!(spares <= pod_capacity(s), "{spares} spares");
    }

    #[test]
    fn spares_made_ahead_are_at_most_four_and_become_the_next_allocations() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net").unwrap();
        let s = subnet("10.1.2.0/24");
        assert_eq!(store.top_up_spares().unwrap(), 4);
        assert_eq!(store.top_up_spares().unwrap(), 0);
        let ino = |name: String| fs::metadata(store.dir().join(name)).unwrap().ino();
        let made: BTreeSet<u64> = (0..4)
            .map(|k| ino(format!("{SPARE_PREFIX}new.{k}")))
            .collect();
        let ips: Vec<Ipv4Addr> = (1..=4)
            .map(|i| store.allocate(s, &key(i)).unwrap())
            .collect();
        let used: BTreeSet<u64> = ips.iter().map(|ip| ino(ip.to_string())).collect();
        assert_eq!(used, made);
        for (i, ip) in ips.iter().enumerate() {
            let text = fs::read_to_string(store.dir().join(ip.to_string())).unwrap();
            assert_eq!(text, format!("c{}\neth0\n{ip}\n", i + 1));
        }
        assert_eq!(store.top_up_spares().unwrap(), 4);
    }

    #[test]
    fn usage_counts_each_networks_addresses_of_the_subnet() {
        let dir = tempfile::tempdir().unwrap();
        let s = subnet("10.1.2.0/24");
        let a = IpamStore::new(dir.path(), "a").unwrap();
        let b = IpamStore::new(dir.path(), "b").unwrap();
        for i in 0..3 {
            a.allocate(s, &key(i)).unwrap();
        }
        b.allocate(s, &key(9)).unwrap();
        a.top_up_spares().unwrap();
        // An address of another subnet (the node was renumbered) does not count.
        fs::write(a.dir().join("10.9.9.9"), "x\neth0\n").unwrap();
        let u = usage(dir.path(), s);
        let got: Vec<(String, usize)> = u
            .into_iter()
            .map(|u| (u.network, u.allocated.unwrap()))
            .collect();
        assert_eq!(got, vec![("a".to_string(), 3), ("b".to_string(), 1)]);
        assert!(usage(&dir.path().join("none"), s).is_empty());
    }

    #[test]
    fn concurrent_allocators_never_share_an_ip() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::new(dir.path(), "net").unwrap();
        let s = subnet("10.1.0.0/24");
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    (0..25)
                        .map(|i| store.allocate(s, &key(t * 100 + i)).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            for ip in h.join().unwrap() {
                assert!(all.insert(ip), "{ip} handed out twice");
            }
        }
        assert_eq!(all.len(), 200);
    }

    #[test]
    fn network_name_cannot_escape_data_dir() {
        for bad in ["", "..", "../x", "a/b", ".hidden", "-x", "a b"] {
            assert!(IpamStore::new(Path::new("/x"), bad).is_err(), "{bad:?}");
        }
        assert!(IpamStore::new(Path::new("/x"), "k8s-pod_network.1").is_ok());
    }
}
