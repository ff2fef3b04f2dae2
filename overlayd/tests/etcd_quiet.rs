//! An idle node costs etcd nothing but its two streams (issue 13): one watch stream (leases and
//! config), one keep-alive stream, and no request made on a timer. Contact for `/readyz` and the
//! lease's TTL come from those streams: ready while the watch stream is open, not ready within
//! `--etcd-heard-within` of etcd going away, and ready again when it is back.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use overlay_testlab::{free_port, wait_for};

#[test]
fn an_idle_node_makes_no_request_and_holds_one_watch_and_one_keepalive_stream() {
    let (mut etcd, dir) = seeded();
    let addr = format!("127.0.0.1:{}", free_port(Ipv4Addr::LOCALHOST));
    // A short readiness window: the poll this replaces asked etcd every quarter of it (1 s).
    let d = leased(
        &etcd.endpoint,
        "127.0.0.121",
        dir.path(),
        &["--metrics-addr", &addr, "--etcd-heard-within", "4s"],
    );
    let (_, body) = wait_for("ready", Duration::from_secs(10), || {
        http_get(&addr, "/readyz").filter(|(code, _)| *code == 200)
    });
    assert!(body.contains("watch stream open"), "{body}");

    let before = etcd_unary_calls(&etcd.endpoint).expect("etcd's metrics");
    std::thread::sleep(Duration::from_secs(6));
    let after = etcd_unary_calls(&etcd.endpoint).expect("etcd's metrics");
    let made: Vec<String> = after
        .iter()
        .filter(|(m, n)| before.get(*m).copied().unwrap_or(0.0) < **n)
        .map(|(m, n)| format!("{m} {}", n - before.get(m).copied().unwrap_or(0.0)))
        .collect();
    assert!(
        made.is_empty(),
        "unary calls while idle: {made:?}\n{}",
        d.log_text()
    );
    assert_eq!(etcd_streams_open(&etcd.endpoint, "Watch"), Some(1.0));
    assert_eq!(
        etcd_streams_open(&etcd.endpoint, "LeaseKeepAlive"),
        Some(1.0)
    );
    // The TTL left, from the keep-alive's answer.
    let (_, status) = http_get(&addr, "/status").expect("/status");
    let j: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    let ttl = j["lease"]["ttl_left_seconds"].as_i64().unwrap_or(0);
    assert!(ttl > 3000 && ttl <= 3600, "{j:#}");
    assert_eq!(j["etcd"]["watch_stream_open"], true, "{j:#}");

    // etcd away: not ready once the window has passed, naming etcd; back: ready again.
    etcd.stop();
    let (_, body) = wait_for("not ready", Duration::from_secs(15), || {
        http_get(&addr, "/readyz").filter(|(code, _)| *code == 503)
    });
    assert!(body.contains("FAIL etcd:"), "{body}");
    etcd.restart();
    let (_, body) = wait_for("ready again", Duration::from_secs(15), || {
        http_get(&addr, "/readyz").filter(|(code, _)| *code == 200)
    });
    assert!(body.contains("watch stream open"), "{body}");
}
