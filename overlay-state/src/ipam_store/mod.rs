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
//!     boot_id               the kernel boot id the allocations were made under
//!     reclaim.log           one line per reclaimed or dropped allocation (capped, one old copy)
//!     reclaimed_total       how many allocations were reclaimed or dropped, ever
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
//! Files are not fsync'ed: the store must survive the death of a process, not of the machine. After
//! a reboot every pod sandbox is new, so the first allocation under a new boot id drops every
//! allocation (see `boot.rs`), whatever state the disk kept.
//!
//! Nobody needs to clear the store by hand: on a full subnet, an allocation whose host veth is
//! gone and which is older than [`RECLAIM_GRACE`] is reclaimed (see `reclaim.rs`).
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

mod allocate;
mod boot;
mod reclaim;
mod release;

pub use reclaim::{Reclaimed, Survey, RECLAIM_GRACE};
#[cfg(test)]
mod tests;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/overlay";
const LOCK_FILE: &str = "lock";
const LAST_RESERVED_FILE: &str = "last_reserved_ip";
const BOOT_FILE: &str = "boot_id";
const RECLAIM_LOG: &str = "reclaim.log";
const RECLAIMED_TOTAL: &str = "reclaimed_total";
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    pub ip: Ipv4Addr,
    /// Spare files left for the next allocations (see [`IpamStore::top_up_spares`]); None when
    /// the key already held its IP and nothing was used.
    pub spares_left: Option<usize>,
    /// What the allocation reclaimed to find room (the subnet was full), or dropped because an
    /// earlier boot made it.
    pub reclaimed: Vec<Reclaimed>,
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
         (store {dir}){waiting}; delete pods on this node, or run CNI GC to release leaked \
         addresses"
    )]
    Exhausted {
        subnet: Ipv4Network,
        allocated: usize,
        capacity: usize,
        dir: PathBuf,
        /// Why some of them could not be reclaimed yet, if so (", N of them …").
        waiting: String,
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
    /// The boot allocations are made under; None: unknown, nothing is dropped.
    boot_id: Option<String>,
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
            boot_id: None,
        })
    }

    /// Allocations from any other boot are dropped at the next allocation (see `boot.rs`).
    pub fn with_boot_id(mut self, boot_id: Option<String>) -> Self {
        self.boot_id = boot_id;
        self
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
        let path = self.dir.join(LOCK_FILE);
        // The directory exists but for a node's first ADD: made only when the open says so.
        let file = match self.open_keeping(&path) {
            Err(IpamError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
                self.open_keeping(&path)?
            }
            other => other?,
        };
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

    /// Whether `key` still holds `ip`, under the lock: an ADD that took longer than the reclaim
    /// grace to wire its pod learns here if its allocation was reclaimed meanwhile (a reclaim
    /// holds the lock from its link dump to its last removal, so the ADD's veth either was in
    /// that dump or this check runs after the removal).
    pub fn holds(&self, key: &AttachmentKey, ip: Ipv4Addr) -> Result<bool, IpamError> {
        let _lock = self.lock()?;
        // The IP file alone says who holds the IP: one read, no index lookup.
        let path = self.dir.join(ip.to_string());
        match fs::read_to_string(&path) {
            Ok(text) => Ok(AttachmentKey::parse(&text).as_ref() == Some(key)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::InvalidData
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.io(&path)(e)),
        }
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
    network_names(data_dir)
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

/// The CNI networks with a store under `data_dir` (the plugin's `dataDir`), sorted; none when
/// it does not exist.
pub fn network_names(data_dir: &Path) -> Vec<String> {
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
}

/// CNI network names are `[A-Za-z0-9][A-Za-z0-9_.-]*`; also what keeps one from escaping `dataDir`.
pub fn valid_network_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}
