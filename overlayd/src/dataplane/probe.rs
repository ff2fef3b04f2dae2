//! Peer probes through the overlay itself: an ICMP echo from this node's VTEP address
//! (`<subnet>.0`) to each peer's (`<peer subnet>.0`). The request leaves by the peer's route over
//! the VTEP, so it is VXLAN-encapsulated to the peer's PublicIP on UDP `Backend.Port`, and the
//! peer's kernel answers it the same way back: a probe fails exactly when pod traffic between the
//! two nodes would (a security group without UDP 8472, a peer that lost its VTEP, a broken FDB).
//! The peer's daemon need not run; its kernel answers.
//!
//! Cost: each peer is probed once per interval (30 s by default), at a time drawn at random
//! within the interval, so probes are spread evenly instead of bursting. After a miss, the peer is
//! probed again every `retry` until it answers or counts as unreachable (3 misses), then every
//! interval / 3 until it answers again. Every node probing every other is N² probes in the
//! cluster, so the send rate is capped (`max_rate`, 10/s by default): past `max_rate × interval`
//! peers (300 at the defaults) the interval stretches to peers / `max_rate` (10 000 peers: each
//! probed every 1 000 s by each node, while the cluster still probes every node 10 times a
//! second). bench-scale idle measured ~130 µs of CPU per probe in the lab, nearly all of it the
//! kernel's path (conntrack, VXLAN encapsulation, and the lab's underlay bridge, which a real NIC
//! does not bill to the sender), so 10/s is ~0.13% of a core.
//! Each probe is ~134 bytes on the wire with the VXLAN header. The thread wakes at most every
//! [`MIN_WAIT`] unless a reply arrives, and its socket takes only echo replies.
//!
//! One thread owns a raw ICMP socket bound to the VTEP address (needs CAP_NET_RAW, which the
//! DaemonSet grants); results are read by [`Prober::snapshot`], and every change of a peer's state
//! is sent once on the channel given to [`spawn`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use rand::Rng;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::sync::mpsc::UnboundedSender;

/// Misses in a row before a peer counts as unreachable.
pub const MISSES_TO_DOWN: u32 = 3;

#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    /// Each reachable peer is probed once per interval.
    pub interval: Duration,
    /// A reply later than this is a miss.
    pub timeout: Duration,
    /// The wait before probing again after a miss.
    pub retry: Duration,
    /// Probes sent per second at most, retries included.
    pub max_rate: f64,
}

/// The default of [`ProbeConfig::max_rate`].
pub const DEFAULT_MAX_RATE: f64 = 10.0;

impl ProbeConfig {
    pub fn new(interval: Duration) -> ProbeConfig {
        ProbeConfig {
            interval,
            timeout: Duration::from_secs(1),
            retry: Duration::from_secs(2),
            max_rate: DEFAULT_MAX_RATE,
        }
    }

    pub fn with_max_rate(mut self, max_rate: f64) -> ProbeConfig {
        self.max_rate = max_rate.max(MIN_RATE);
        self
    }

    /// How often each reachable peer is probed with `peers` peers: the interval, or longer when
    /// that would exceed `max_rate`.
    pub fn every(&self, peers: usize) -> Duration {
        let stretched = Duration::from_secs_f64(peers as f64 / self.max_rate);
        self.interval.max(stretched)
    }

    /// Probes per second with `peers` reachable peers.
    pub fn rate(&self, peers: usize) -> f64 {
        peers as f64 / self.every(peers).as_secs_f64()
    }
}

/// A floor for `max_rate`, so a zero or negative flag cannot stop the sender forever.
const MIN_RATE: f64 = 0.1;

/// A peer to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
}

impl Target {
    fn vtep_ip(&self) -> Ipv4Addr {
        self.subnet.network()
    }
}

/// What the probes say about one peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerProbe {
    /// `None` until the first answer or the first verdict of unreachable.
    pub reachable: Option<bool>,
    pub last_rtt: Option<Duration>,
    /// Misses in a row.
    pub misses: u32,
    pub sent: u64,
    pub answered: u64,
    /// When `reachable` last changed.
    pub since: Instant,
}

/// A peer's state changed (sent once per change).
#[derive(Debug, Clone)]
pub struct Transition {
    pub target: Target,
    pub reachable: bool,
    pub rtt: Option<Duration>,
    /// It was known before (false: the first verdict after the peer appeared).
    pub was_known: bool,
}

/// Counters the thread drives for /metrics.
#[derive(Clone)]
pub struct ProbeMetrics {
    pub sent: Counter,
    pub answered: Counter,
    pub rtt: Histogram,
}

struct Shared {
    targets: Vec<Target>,
    /// Bumped on every change of `targets`, so the thread re-reads them only then.
    generation: u64,
    /// The probing thread's own state, read by [`Prober::snapshot`]: one copy per peer, not one
    /// for the thread and one for the readers (10 000 peers: a megabyte).
    peers: HashMap<Ipv4Network, PeerState>,
}

pub struct Prober {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    pub config: ProbeConfig,
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Prober {
    /// The peers to probe from now on (the data plane's current peers).
    pub fn set_targets(&self, mut targets: Vec<Target>) {
        targets.sort_by_key(|t| t.subnet);
        let mut s = lock(&self.shared);
        if s.targets != targets {
            // Sorted above: a lookup per result, not a scan (5 000 peers, a lease change each).
            s.peers
                .retain(|subnet, _| targets.binary_search_by_key(subnet, |t| t.subnet).is_ok());
            s.targets = targets;
            s.generation += 1;
        }
    }

    pub fn snapshot(&self) -> BTreeMap<Ipv4Network, PeerProbe> {
        lock(&self.shared)
            .peers
            .iter()
            .map(|(k, st)| (*k, st.probe.clone()))
            .collect()
    }
}

/// Opens the socket and starts the probing thread. Fails when a raw ICMP socket cannot be opened
/// or bound to `local` (no CAP_NET_RAW, or the VTEP address is not configured).
pub fn spawn(
    local: Ipv4Addr,
    config: ProbeConfig,
    metrics: ProbeMetrics,
    events: UnboundedSender<Transition>,
) -> std::io::Result<Prober> {
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    only_echo_replies(&socket);
    socket.bind(&SockAddr::from(SocketAddrV4::new(local, 0)))?;
    let shared = Arc::new(Mutex::new(Shared {
        targets: Vec::new(),
        generation: 0,
        peers: HashMap::new(),
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let mut worker = Worker {
        socket,
        config,
        metrics,
        events,
        shared: shared.clone(),
        stop: stop.clone(),
        id: (std::process::id() & 0xffff) as u16,
        next_seq: 0,
        generation: u64::MAX,
        due: BinaryHeap::new(),
        outstanding: HashMap::new(),
        deadlines: VecDeque::new(),
        tokens: 1.0,
        refilled: Instant::now(),
    };
    std::thread::Builder::new()
        .name("peer-probe".into())
        .spawn(move || worker.run())?;
    Ok(Prober {
        shared,
        stop,
        config,
    })
}

struct PeerState {
    target: Target,
    next_due: Instant,
    probe: PeerProbe,
}

struct Worker {
    socket: Socket,
    config: ProbeConfig,
    metrics: ProbeMetrics,
    events: UnboundedSender<Transition>,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    id: u16,
    next_seq: u16,
    generation: u64,
    /// (when, subnet); an entry whose time is not the peer's `next_due` is stale and skipped.
    due: BinaryHeap<Reverse<(Instant, Ipv4Network)>>,
    /// seq → (subnet, sent at)
    outstanding: HashMap<u16, (Ipv4Network, Instant)>,
    /// (deadline, seq) in the order sent; the timeout is fixed, so deadlines are in order too.
    deadlines: VecDeque<(Instant, u16)>,
    /// Probes that may be sent now (a token bucket filled at `max_rate`).
    tokens: f64,
    refilled: Instant,
}

/// The longest the thread sleeps in one wait, so targets and the stop flag are seen promptly.
const MAX_WAIT: Duration = Duration::from_millis(200);
/// The shortest: probes and deadlines due within it are handled together, so the thread wakes a
/// few times a second rather than once per probe (10 000 peers).
pub const MIN_WAIT: Duration = Duration::from_millis(50);

/// Lets only ICMP echo replies reach the socket (Linux's ICMP_FILTER): a raw ICMP socket is
/// otherwise handed a copy of every ICMP packet the node receives, the other nodes' probes to this
/// one included. Best effort: without the filter, other packets are parsed and dropped.
fn only_echo_replies(socket: &Socket) {
    use std::os::fd::AsRawFd;
    const SOL_RAW: nix::libc::c_int = 255;
    const ICMP_FILTER: nix::libc::c_int = 1;
    // A set bit drops that ICMP type; type 0 is the echo reply.
    let mask: u32 = !1;
    // SAFETY: a plain setsockopt with a u32 of the size given, on a socket this thread owns.
    unsafe {
        nix::libc::setsockopt(
            socket.as_raw_fd(),
            SOL_RAW,
            ICMP_FILTER,
            (&mask as *const u32).cast(),
            std::mem::size_of::<u32>() as nix::libc::socklen_t,
        );
    }
}

impl Worker {
    fn run(&mut self) {
        let mut buf = [0u8; 2048];
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            self.sync_targets(now);
            self.expire(now);
            self.send_due(now);
            let wait = self
                .due
                .peek()
                .map(|Reverse((t, _))| t.saturating_duration_since(now))
                .unwrap_or(MAX_WAIT)
                .min(MAX_WAIT);
            let wait = self
                .deadlines
                .front()
                .map_or(wait, |(d, _)| wait.min(d.saturating_duration_since(now)))
                .max(MIN_WAIT);
            if self.socket.set_read_timeout(Some(wait)).is_err() {
                std::thread::sleep(wait);
                continue;
            }
            match (&self.socket).read(&mut buf) {
                Ok(n) => self.receive(&buf[..n], Instant::now()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => std::thread::sleep(wait),
            }
        }
    }

    fn sync_targets(&mut self, now: Instant) {
        let (generation, targets) = {
            let s = lock(&self.shared);
            if s.generation == self.generation {
                return;
            }
            (s.generation, s.targets.clone())
        };
        self.generation = generation;
        let mut rng = rand::rng();
        let interval = self.config.every(targets.len());
        let mut s = lock(&self.shared);
        let mut keep: HashMap<Ipv4Network, PeerState> = HashMap::with_capacity(targets.len());
        for t in targets {
            let state = match s.peers.remove(&t.subnet) {
                Some(mut st) if st.target == t => {
                    st.target = t;
                    st
                }
                _ => {
                    // A random point in the interval: many new peers at once (a restart) are
                    // spread out instead of probed in one burst.
                    let first = now + interval.mul_f64(rng.random_range(0.0..1.0));
                    self.due.push(Reverse((first, t.subnet)));
                    PeerState {
                        target: t,
                        next_due: first,
                        probe: PeerProbe {
                            reachable: None,
                            last_rtt: None,
                            misses: 0,
                            sent: 0,
                            answered: 0,
                            since: now,
                        },
                    }
                }
            };
            keep.insert(state.target.subnet, state);
        }
        s.peers = keep;
        self.outstanding
            .retain(|_, (subnet, _)| s.peers.contains_key(subnet));
    }

    /// Outstanding probes past their deadline are misses.
    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, seq)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some((subnet, _)) = self.outstanding.remove(&seq) {
                self.missed(subnet, now);
            }
        }
    }

    fn send_due(&mut self, now: Instant) {
        let rate = self.config.max_rate;
        // At most the longest wait's worth of probes at once: enough that waking every MIN_WAIT
        // never clips the rate, and a burst after a pause stays a short one.
        let burst = (rate * MAX_WAIT.as_secs_f64()).max(2.0);
        self.tokens = (self.tokens + rate * (now - self.refilled).as_secs_f64()).min(burst);
        self.refilled = now;
        let mut s = lock(&self.shared);
        let every_peer = self.config.every(s.peers.len());
        while let Some(Reverse((when, subnet))) = self.due.peek().copied() {
            if when > now || self.tokens < 1.0 {
                break; // not due yet, or over the rate: stays due for the next wake
            }
            self.due.pop();
            let Some(st) = s.peers.get_mut(&subnet) else {
                continue; // the peer went
            };
            if st.next_due != when {
                continue; // rescheduled since
            }
            self.next_seq = self.next_seq.wrapping_add(1);
            let seq = self.next_seq;
            let packet = echo_request(self.id, seq);
            let dst = SockAddr::from(SocketAddrV4::new(st.target.vtep_ip(), 0));
            self.tokens -= 1.0;
            st.probe.sent += 1;
            self.metrics.sent.inc();
            // A send the kernel refuses (no route yet) is a miss like any other.
            let _ = self.socket.send_to(&packet, &dst);
            self.outstanding.insert(seq, (subnet, now));
            self.deadlines.push_back((now + self.config.timeout, seq));
            // The next regular probe; a miss reschedules sooner.
            let jitter = rand::rng().random_range(0.9..1.1);
            let every = if st.probe.reachable == Some(false) {
                every_peer / 3
            } else {
                every_peer
            };
            st.next_due = now + every.mul_f64(jitter);
            self.due.push(Reverse((st.next_due, subnet)));
        }
    }

    fn receive(&mut self, packet: &[u8], now: Instant) {
        let Some((src, id, seq)) = parse_echo_reply(packet) else {
            return;
        };
        if id != self.id {
            return; // someone else's ping
        }
        let Some((subnet, sent_at)) = self.outstanding.remove(&seq) else {
            return; // late, or a duplicate
        };
        let mut s = lock(&self.shared);
        let Some(st) = s.peers.get_mut(&subnet) else {
            return;
        };
        if src != st.target.vtep_ip() {
            return;
        }
        let rtt = now - sent_at;
        self.metrics.answered.inc();
        self.metrics.rtt.observe(rtt.as_secs_f64());
        st.probe.answered += 1;
        st.probe.last_rtt = Some(rtt);
        st.probe.misses = 0;
        if st.probe.reachable != Some(true) {
            let was_known = st.probe.reachable.is_some();
            st.probe.reachable = Some(true);
            st.probe.since = now;
            let _ = self.events.send(Transition {
                target: st.target.clone(),
                reachable: true,
                rtt: Some(rtt),
                was_known,
            });
        }
    }

    fn missed(&mut self, subnet: Ipv4Network, now: Instant) {
        let mut s = lock(&self.shared);
        let every_peer = self.config.every(s.peers.len());
        let Some(st) = s.peers.get_mut(&subnet) else {
            return;
        };
        st.probe.misses += 1;
        if st.probe.misses >= MISSES_TO_DOWN && st.probe.reachable != Some(false) {
            let was_known = st.probe.reachable.is_some();
            st.probe.reachable = Some(false);
            st.probe.since = now;
            let _ = self.events.send(Transition {
                target: st.target.clone(),
                reachable: false,
                rtt: None,
                was_known,
            });
        }
        // Unconfirmed: again soon. Unreachable: a few times per interval, to see it come back.
        st.next_due = now
            + if st.probe.reachable == Some(false) {
                every_peer / 3
            } else {
                self.config.retry
            };
        self.due.push(Reverse((st.next_due, subnet)));
    }
}

/// An ICMP echo request (type 8) with a small marker payload.
fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"overlayd-probe\0\0");
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = match chunk {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from_be_bytes([*a, 0]),
            _ => 0,
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// (source, id, seq) of an ICMP echo reply as a raw socket delivers it (with its IPv4 header).
fn parse_echo_reply(packet: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let src = Ipv4Addr::new(
        *packet.get(12)?,
        *packet.get(13)?,
        *packet.get(14)?,
        *packet.get(15)?,
    );
    let icmp = packet.get(ihl..)?;
    if icmp.len() < 8 || icmp[0] != 0 || icmp[1] != 0 {
        return None;
    }
    Some((
        src,
        u16::from_be_bytes([icmp[4], icmp[5]]),
        u16::from_be_bytes([icmp[6], icmp[7]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_stretches_once_the_peers_would_exceed_the_rate() {
        let c = ProbeConfig::new(Duration::from_secs(30));
        assert_eq!(c.every(150), Duration::from_secs(30));
        assert_eq!(c.every(300), Duration::from_secs(30));
        assert_eq!(c.every(10_000), Duration::from_secs(1_000));
        assert!((c.rate(10_000) - DEFAULT_MAX_RATE).abs() < 1e-9);
        assert!((c.rate(150) - 5.0).abs() < 1e-9);
        let slow = c.with_max_rate(0.0);
        assert!(
            slow.max_rate >= MIN_RATE,
            "a zero rate must not stop probing for ever"
        );
    }

    #[test]
    fn echo_request_checksums_to_zero() {
        let p = echo_request(0x1234, 7);
        assert_eq!(checksum(&p), 0);
        assert_eq!(&p[4..8], &[0x12, 0x34, 0, 7]);
    }

    #[test]
    fn parses_a_reply_with_its_ip_header() {
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 244, 3, 0, 10, 244, 1, 0,
        ];
        let mut icmp = echo_request(9, 300);
        icmp[0] = 0;
        ip.extend_from_slice(&icmp);
        assert_eq!(
            parse_echo_reply(&ip),
            Some((Ipv4Addr::new(10, 244, 3, 0), 9, 300))
        );
        ip[20] = 8; // a request, not a reply
        assert_eq!(parse_echo_reply(&ip), None);
    }
}
