//! Reclaim: allocations nobody uses any more, without a runtime's DEL or GC (containerd does not
//! call GC). An allocation is reclaimed when all of these hold, checked under the store's lock:
//! - its key is readable (it names the container id and interface);
//! - it is older than [`RECLAIM_GRACE`] (the IP file's mtime: written when it was allocated, and
//!   touched when a repeated ADD of the same attachment finds it), which covers an ADD between
//!   its allocation and the creation of its veth;
//! - the host veth its key derives to ([`crate::host_veth_name`]) is not among the node's links,
//!   read in one dump taken under the lock, after the other checks. The pod's netns is gone (the
//!   pair went with it) or its ADD never got as far as the veth.
//!
//! Only this store's (one network name's) allocations are looked at. A reclaim is a release: the
//! IP name goes first, so a kill at any point leaves each allocation either whole or free.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use super::*;

/// How old an allocation without a host veth must be to be reclaimed: far longer than any ADD
/// takes from allocating to creating the veth (milliseconds; seconds on a node under stress).
pub const RECLAIM_GRACE: Duration = Duration::from_secs(60);

/// The reclaim log is cut to one old copy past this size.
const RECLAIM_LOG_MAX: u64 = 256 * 1024;

/// One allocation given back without its attachment's DEL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    pub ip: Ipv4Addr,
    pub key: Option<AttachmentKey>,
    /// How old the allocation was.
    pub age: Duration,
    pub why: String,
}

impl std::fmt::Display for Reclaimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (id, ifname) = self
            .key
            .as_ref()
            .map(|k| (k.container_id.as_str(), k.ifname.as_str()))
            .unwrap_or(("?", "?"));
        write!(f, "{} (container {id}, {ifname}): {}", self.ip, self.why)
    }
}

/// What a store's allocations are, against the node's links.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Survey {
    /// Pod addresses of the subnet allocated.
    pub allocations: usize,
    /// ...whose host veth exists.
    pub live: usize,
    /// ...without a host veth, older than the grace: the next full ADD or the daemon reclaims them.
    pub reclaimable: usize,
    /// ...without a host veth, younger than the grace (an ADD in progress, or just killed).
    pub young: usize,
    /// ...whose file names no attachment (left to GC).
    pub unknown: usize,
    /// Allocations reclaimed or dropped in this store, ever.
    pub reclaimed_total: u64,
}

/// Who reclaims.
#[derive(Debug, Clone, Copy)]
pub(super) enum Pass {
    /// An ADD that found the subnet full: everything reclaimable.
    FullSubnet,
    /// The daemon's pass: at most `limit`.
    Background { limit: usize },
}

/// An allocation as reclaim sees it.
struct Aged {
    ip: Ipv4Addr,
    key: Option<AttachmentKey>,
    age: Duration,
}

impl IpamStore {
    /// Every allocation of `subnet`, with its age. Needs no lock.
    fn aged(&self, subnet: Ipv4Network, now: SystemTime) -> Result<Vec<Aged>, IpamError> {
        let Some((first, last)) = pod_range(subnet) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for a in self.list()? {
            if !(first..=last).contains(&a.ip) {
                continue;
            }
            let path = self.dir.join(a.ip.to_string());
            let Ok(modified) = fs::metadata(&path).and_then(|m| m.modified()) else {
                continue; // released meanwhile
            };
            let age = now.duration_since(modified).unwrap_or(Duration::ZERO);
            out.push(Aged {
                ip: a.ip,
                key: a.key,
                age,
            });
        }
        Ok(out)
    }

    /// Classifies this store's allocations of `subnet` against `links`, the names of the node's
    /// links. Needs no lock (a reader's view).
    pub fn survey(
        &self,
        subnet: Ipv4Network,
        links: &HashSet<String>,
    ) -> Result<Survey, IpamError> {
        let mut s = Survey {
            reclaimed_total: self.reclaimed_total(),
            ..Survey::default()
        };
        for a in self.aged(subnet, SystemTime::now())? {
            s.allocations += 1;
            match &a.key {
                None => s.unknown += 1,
                Some(k) if links.contains(&crate::host_veth_name(&k.container_id, &k.ifname)) => {
                    s.live += 1
                }
                Some(_) if a.age >= RECLAIM_GRACE => s.reclaimable += 1,
                Some(_) => s.young += 1,
            }
        }
        Ok(s)
    }

    /// Takes the lock, drops allocations of another boot, and reclaims at most `limit`
    /// allocations of `subnet` nobody uses (see the module's rules). `links` gives the names of
    /// the node's links, asked for only if some allocation is old enough; None: unknown, and
    /// nothing is reclaimed. For the daemon's background pass.
    pub fn reclaim(
        &self,
        subnet: Ipv4Network,
        limit: usize,
        links: &mut dyn FnMut() -> Option<HashSet<String>>,
    ) -> Result<Vec<Reclaimed>, IpamError> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let _lock = self.lock()?;
        let mut out = self.drop_other_boots()?;
        out.extend(
            self.reclaim_locked(subnet, Pass::Background { limit }, links)?
                .0,
        );
        Ok(out)
    }

    /// Under the lock: the reclaim itself. Also returns how many allocations without a veth were
    /// too young to reclaim.
    pub(super) fn reclaim_locked(
        &self,
        subnet: Ipv4Network,
        pass: Pass,
        links: &mut dyn FnMut() -> Option<HashSet<String>>,
    ) -> Result<(Vec<Reclaimed>, usize), IpamError> {
        let aged = self.aged(subnet, SystemTime::now())?;
        let old: Vec<&Aged> = aged
            .iter()
            .filter(|a| a.key.is_some() && a.age >= RECLAIM_GRACE)
            .collect();
        // An ADD on a full subnet also wants the count of young ones for its error; the
        // background pass with nothing old enough is done without a dump.
        let limit = match pass {
            Pass::FullSubnet => usize::MAX,
            Pass::Background { .. } if old.is_empty() => return Ok((Vec::new(), 0)),
            Pass::Background { limit } => limit,
        };
        let Some(names) = links() else {
            return Ok((Vec::new(), 0));
        };
        let veth_gone =
            |k: &AttachmentKey| !names.contains(&crate::host_veth_name(&k.container_id, &k.ifname));
        let young = aged
            .iter()
            .filter(|a| a.age < RECLAIM_GRACE)
            .filter_map(|a| a.key.as_ref())
            .filter(|k| veth_gone(k))
            .count();
        let mut reclaimed = Vec::new();
        for a in old {
            if reclaimed.len() >= limit {
                break;
            }
            let Some(key) = &a.key else { continue };
            if !veth_gone(key) {
                continue;
            }
            let veth = crate::host_veth_name(&key.container_id, &key.ifname);
            self.release_ip_of(key, a.ip)?;
            reclaimed.push(Reclaimed {
                ip: a.ip,
                key: Some(key.clone()),
                age: a.age,
                why: format!(
                    "host veth {veth} is gone and the allocation is {}s old",
                    a.age.as_secs()
                ),
            });
        }
        self.record(&reclaimed)?;
        Ok((reclaimed, young))
    }

    /// Logs `reclaimed` (one line each) and adds them to the store's count.
    pub(super) fn record(&self, reclaimed: &[Reclaimed]) -> Result<(), IpamError> {
        if reclaimed.is_empty() {
            return Ok(());
        }
        let log = self.dir.join(RECLAIM_LOG);
        if fs::metadata(&log).is_ok_and(|m| m.len() > RECLAIM_LOG_MAX) {
            let _ = fs::rename(&log, self.dir.join(format!("{RECLAIM_LOG}.old")));
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut text = String::new();
        for r in reclaimed {
            text.push_str(&format!("{now} reclaimed {r}\n"));
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(self.io(&log))?;
        let total = self.reclaimed_total() + reclaimed.len() as u64;
        let path = self.dir.join(RECLAIMED_TOTAL);
        let file = self.open_keeping(&path)?;
        // Fixed width, in place: a torn write reads as a smaller number, never as garbage.
        file.write_all_at(format!("{total:>20}\n").as_bytes(), 0)
            .map_err(self.io(&path))
    }

    /// How many allocations this store has reclaimed or dropped, ever.
    pub fn reclaimed_total(&self) -> u64 {
        fs::read_to_string(self.dir.join(RECLAIMED_TOTAL))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
}
