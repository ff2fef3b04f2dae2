//! A watch that etcd creates and that is lost right after, every time, backs off (issue 10,
//! item 2): the answer that creates a watch does not count as the watch working, only what comes
//! after it does. Real etcd behind a proxy that closes connections idle for 200 ms (as a load
//! balancer's idle timeout would, set far too low): each watch is created, then lost when its
//! connection is cut, and resumed.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use overlay_testlab::idle_proxy::IdleProxy;
use overlay_testlab::{wait_for, Etcd};
use overlayd::registry::{Observer, Registry};

#[derive(Default)]
struct Restarts(AtomicU64);

impl Observer for Restarts {
    fn watch_restarted(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn a_watch_created_and_lost_each_time_still_backs_off() {
    let etcd = Etcd::start();
    etcd.put(&key("10.244.1.0-24"), PEER);
    let upstream: SocketAddr = etcd.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = IdleProxy::start(upstream, Duration::from_millis(200));
    let rt = rt();
    let reg = rt
        .block_on(Registry::connect(&etcd_args(&proxy.endpoint)))
        .unwrap();
    let restarts = Arc::new(Restarts::default());
    let (mut rx, log) = follow_observed(&rt, reg, None, restarts.clone());
    wait_for_set(&rt, &mut rx, &["10.244.1.0/24"], Duration::from_secs(10));
    wait_for("the first lost watch", Duration::from_secs(10), || {
        (restarts.0.load(Ordering::Relaxed) > 0).then_some(())
    });
    let (start, from) = (Instant::now(), restarts.0.load(Ordering::Relaxed));
    let window = Duration::from_secs(12);
    std::thread::sleep(window);
    let n = restarts.0.load(Ordering::Relaxed) - from;
    let text = log_text(&log);
    eprintln!(
        "a watch created and lost each time: {n} restarts in {:?} ({} connections cut)",
        start.elapsed(),
        proxy.closed()
    );
    assert!(
        text.contains("lease watch lost") && !text.contains("cannot watch"),
        "not the case this test is about (each watch created, then lost):\n{text}"
    );
    // Waits of half to all of 0.5, 1, 2, then 4 s: at least 0.25 + 0.5 + 1 + 2 s and then 2 s
    // each, so at most 4 + 5 = 9 restarts in 12 s. Reset by each creation instead, the wait
    // stays at 0.25-0.5 s (and 0.2 s idle): 15 or more.
    assert!((2..=9).contains(&n), "{n} restarts in {window:?}:\n{text}");
    // And the watch still works between the cuts: a new lease arrives.
    etcd.put(&key("10.244.2.0-24"), PEER);
    wait_for_set(
        &rt,
        &mut rx,
        &["10.244.1.0/24", "10.244.2.0/24"],
        Duration::from_secs(10),
    );
}
