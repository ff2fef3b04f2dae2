//! The plugin under torture (issue 11): 10 000 ADD/DEL calls (`OVERLAY_TORTURE_CALLS`), up to 100
//! at once, about 5% of them `kill -9`ed at a random moment. Like a runtime, the test gives every
//! sandbox a fresh netns and drops it after the sandbox's DEL, answers a failed or killed ADD with
//! a DEL, and retries a killed DEL. Every ADD result is checked against the addresses held at that
//! moment; at the end, after a DEL of everything still present and one GC, the store and the node
//! must be empty.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sched::{setns, unshare, CloneFlags};
use overlay_testlab::require_root;
use serde_json::json;

const PARALLEL: usize = 100;
/// Sandboxes that exist at a time (a /24 holds 253 pods).
const SLOTS: usize = 160;
const KILL_PERCENT: u64 = 5;

/// A pod sandbox's netns, unnamed: it lives while this file is open (the plugin reaches it
/// through `/proc/<test pid>/fd/<fd>`), and the kernel removes it, with the pair DEL left in it,
/// once the file is closed: also when the test panics.
struct Sandbox {
    ns: File,
    /// The container id, new for every sandbox, as a runtime's are.
    id: String,
}

impl Sandbox {
    fn new(home: &File, id: String) -> Sandbox {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare netns");
        let ns = File::open("/proc/thread-self/ns/net").expect("open new netns");
        setns(home, CloneFlags::CLONE_NEWNET).expect("back to the test's netns");
        Sandbox { ns, id }
    }

    fn path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.ns.as_raw_fd())
    }
}

/// Sends SIGKILL to processes at given moments, through a pidfd so that a process already
/// reaped (its pid possibly reused) is never hit. Its own thread, so a kill lands on time
/// whatever the main loop is busy with.
struct Killer {
    tx: std::sync::mpsc::Sender<(Instant, OwnedFd)>,
}

impl Killer {
    fn start() -> Killer {
        let (tx, rx) = std::sync::mpsc::channel::<(Instant, OwnedFd)>();
        std::thread::spawn(move || {
            let mut due: Vec<(Instant, OwnedFd)> = Vec::new();
            loop {
                let wait = due
                    .iter()
                    .map(|(t, _)| t.saturating_duration_since(Instant::now()))
                    .min()
                    .unwrap_or(Duration::from_millis(50));
                match rx.recv_timeout(wait) {
                    Ok(k) => due.push(k),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                let now = Instant::now();
                due.retain(|(t, fd)| {
                    if *t > now {
                        return true;
                    }
                    // SAFETY: a plain syscall on a pidfd this thread owns.
                    unsafe {
                        nix::libc::syscall(
                            nix::libc::SYS_pidfd_send_signal,
                            fd.as_raw_fd(),
                            nix::libc::SIGKILL,
                            std::ptr::null::<nix::libc::siginfo_t>(),
                            0,
                        );
                    }
                    false
                });
            }
        });
        Killer { tx }
    }

    /// Kills `child` after `delay`, unless it has exited by then.
    fn kill_after(&self, child: &Child, delay: Duration) {
        // SAFETY: pidfd_open(2) on our own child, not reaped yet (only the caller reaps).
        let fd = unsafe {
            nix::libc::syscall(nix::libc::SYS_pidfd_open, child.id() as nix::libc::pid_t, 0)
        };
        assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let _ = self.tx.send((Instant::now() + delay, fd));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Del,
}

/// What the runtime knows of a slot's sandbox.
enum Slot {
    Empty,
    /// ADD answered with this IP.
    Present(Sandbox, String),
    /// ADD failed or was killed: it may hold an IP; a DEL must follow.
    Unknown(Sandbox),
}

struct Call {
    slot: usize,
    op: Op,
    child: Child,
}

#[derive(Default, Debug)]
struct Counts {
    calls: usize,
    adds_ok: usize,
    adds_failed: usize,
    dels_ok: usize,
    dels_failed: usize,
    killed: usize,
    most_at_once: usize,
    duplicates: usize,
}

#[test]
fn ten_thousand_calls_with_kill_9_never_duplicate_or_leak() {
    if !require_root("ten_thousand_calls_with_kill_9_never_duplicate_or_leak") {
        return;
    }
    let total: usize = std::env::var("OVERLAY_TORTURE_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let node = Node::new("10.244.40.1/24");
    let node_ns = File::open(node.ns.path()).expect("node netns");
    let home = File::open("/proc/thread-self/ns/net").expect("own netns");
    let conf = node.conf("1.1.0").to_string();
    let mut rng = Rng::from_env_or_time("OVERLAY_TORTURE_SEED");
    let killer = Killer::start();

    let start = |slot: usize, op: Op, sandbox: &Sandbox, kill_after: Option<Duration>| -> Call {
        let mut cmd = Command::new(PLUGIN);
        for (k, _) in std::env::vars() {
            if k.starts_with("CNI_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("CNI_COMMAND", if op == Op::Add { "ADD" } else { "DEL" })
            .env("CNI_CONTAINERID", &sandbox.id)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_NETNS", sandbox.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let fd = node_ns.as_raw_fd();
        // SAFETY: setns(2) is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if nix::libc::setns(fd, nix::libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn plugin");
        if let Some(delay) = kill_after {
            killer.kill_after(&child, delay);
        }
        let mut input = child.stdin.take().expect("stdin");
        let _ = input.write_all(conf.as_bytes());
        drop(input);
        Call { slot, op, child }
    };

    // How long a call takes here (spawn to exit, once the bridge exists), so kills land anywhere
    // inside one.
    let probe = Sandbox::new(&home, "probe".into());
    let mut call_time = Duration::ZERO;
    for op in [Op::Add, Op::Del, Op::Add, Op::Del] {
        let t = Instant::now();
        let mut c = start(0, op, &probe, None);
        assert!(
            c.child.wait().expect("probe").success(),
            "probe {op:?} failed"
        );
        call_time = t.elapsed();
    }
    drop(probe);

    let mut slots: Vec<Slot> = (0..SLOTS).map(|_| Slot::Empty).collect();
    let mut busy = [false; SLOTS];
    // IP -> slot, from an ADD's answer until that slot's DEL starts.
    let mut held: BTreeMap<String, usize> = BTreeMap::new();
    let mut running: Vec<Call> = Vec::new();
    let call_us = call_time.as_micros() as u64;
    let mut n = Counts::default();
    let started = Instant::now();
    let limit = Duration::from_secs(60 + total as u64 / 20);
    while n.calls < total || !running.is_empty() {
        assert!(
            started.elapsed() < limit,
            "torture took longer than {limit:?}: {n:?}"
        );
        // Start calls up to PARALLEL, on slots nobody is working on.
        let mut started_now = 0;
        while n.calls < total && running.len() < PARALLEL {
            started_now += 1;
            let free: Vec<usize> = (0..SLOTS).filter(|s| !busy[*s]).collect();
            if free.is_empty() {
                break;
            }
            let slot = free[rng.below(free.len() as u64) as usize];
            // Anywhere within a call (calls run longer when many run at once).
            let kill =
                (rng.below(100) < KILL_PERCENT).then(|| Duration::from_micros(rng.below(call_us)));
            let (op, sandbox) = match std::mem::replace(&mut slots[slot], Slot::Empty) {
                Slot::Empty => (Op::Add, Sandbox::new(&home, format!("t{}", n.calls))),
                Slot::Present(sandbox, ip) => {
                    // From here the IP may be free again.
                    held.remove(&ip);
                    (Op::Del, sandbox)
                }
                Slot::Unknown(sandbox) => (Op::Del, sandbox),
            };
            busy[slot] = true;
            n.calls += 1;
            running.push(start(slot, op, &sandbox, kill));
            n.most_at_once = n.most_at_once.max(running.len());
            slots[slot] = Slot::Unknown(sandbox);
        }
        let mut i = 0;
        while i < running.len() {
            let c = &mut running[i];
            let Some(status) = c.child.try_wait().expect("try_wait") else {
                i += 1;
                continue;
            };
            let mut c = running.swap_remove(i);
            let mut out = String::new();
            if let Some(mut o) = c.child.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            let killed = status.signal() == Some(nix::libc::SIGKILL);
            if killed {
                n.killed += 1;
            }
            busy[c.slot] = false;
            let sandbox = match std::mem::replace(&mut slots[c.slot], Slot::Empty) {
                Slot::Unknown(s) => s,
                _ => unreachable!("a slot with a call running is Unknown"),
            };
            match (c.op, status.success()) {
                (Op::Add, true) => {
                    n.adds_ok += 1;
                    let v: serde_json::Value = serde_json::from_str(&out)
                        .unwrap_or_else(|e| panic!("ADD result is not JSON ({e}): {out:?}"));
                    let ip = result_ip(&v);
                    if let Some(other) = held.insert(ip.clone(), c.slot) {
                        n.duplicates += 1;
                        eprintln!(
                            "DUPLICATE: {ip} handed to slot {} while slot {other} holds it",
                            c.slot
                        );
                    }
                    slots[c.slot] = Slot::Present(sandbox, ip);
                }
                (Op::Add, false) => {
                    if !killed {
                        n.adds_failed += 1;
                        eprintln!("ADD of slot {} failed: {out}", c.slot);
                    }
                    slots[c.slot] = Slot::Unknown(sandbox);
                }
                (Op::Del, true) => {
                    n.dels_ok += 1;
                    // The runtime removes the sandbox: the kernel takes the pair along.
                    drop(sandbox);
                }
                (Op::Del, false) => {
                    if !killed {
                        n.dels_failed += 1;
                        eprintln!("DEL of slot {} failed: {out}", c.slot);
                    }
                    slots[c.slot] = Slot::Unknown(sandbox);
                }
            }
        }
        if started_now == 0 {
            std::thread::sleep(Duration::from_micros(300));
        }
    }
    let run_time = started.elapsed();

    // DEL of everything still present (or possibly so), then one GC with nothing valid.
    let mut final_dels = 0;
    for (slot, s) in slots.iter_mut().enumerate() {
        let sandbox = match s {
            Slot::Empty => continue,
            Slot::Present(sb, _) | Slot::Unknown(sb) => sb,
        };
        let mut c = start(slot, Op::Del, sandbox, None);
        assert!(c.child.wait().expect("DEL").success(), "final DEL failed");
        final_dels += 1;
    }
    let mut gc = node.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([]);
    node.run(&[("CNI_COMMAND", "GC")], &gc).expect_ok();
    let leaked_ips = node.store_ips().len();
    let leaked_index = node.store_index_entries();
    slots.clear();
    // The netns removals finish in the kernel's background; GC already removed the host veths
    // of the pairs still in a netns.
    let deadline = Instant::now() + Duration::from_secs(30);
    let leftover = loop {
        let links: Vec<String> = node.links().into_iter().filter(|l| l != "cni0").collect();
        if links.is_empty() || Instant::now() > deadline {
            break links;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "torture: {} calls ({} ADD ok, {} ADD failed, {} DEL ok, {} DEL failed, {} killed) in \
         {run_time:?}, {} at once at most (limit {PARALLEL}, one call alone ~{call_time:?}); {} duplicate IPs; after \
         {final_dels} final DELs and one GC: {leaked_ips} leaked IPs, {leaked_index} index \
         entries, {} leftover host veths",
        n.calls,
        n.adds_ok,
        n.adds_failed,
        n.dels_ok,
        n.dels_failed,
        n.killed,
        n.most_at_once,
        n.duplicates,
        leftover.len()
    );
    assert_eq!(n.duplicates, 0, "duplicate IPs handed out");
    assert_eq!(n.adds_failed + n.dels_failed, 0, "calls failed: {n:?}");
    // About 5% are sent; some land after the call has finished.
    assert!(n.killed * 50 >= n.calls, "too few kills landed: {n:?}");
    assert_eq!(leaked_ips, 0, "leaked IPs: {:?}", node.store_ips());
    assert_eq!(leaked_index, 0);
    assert!(leftover.is_empty(), "leftover links: {leftover:?}");
}
