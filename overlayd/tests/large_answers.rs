//! etcd answers larger than tonic's default 4 MiB message limit (issue 13), against a real etcd:
//! the listing of 25 000 leases with EKS-length NodeNames, the catch-up of a watch that resumes
//! after a reconnect with more than 4 MiB of values to deliver, and a listing page larger than the
//! limit overlayd sets. The daemons run with `--lease-only` on loopback.

mod common;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use common::*;
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use overlay_testlab::{free_port, Etcd};
use overlayd::registry::Registry;

/// Room for 65 536 subnets: more than the 25 000 simulated peers.
const WIDE_CONFIG: &str =
    r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#;

/// tonic's default decoding limit, which the answers here must pass.
const TONIC_DEFAULT_LIMIT: usize = 4 << 20;

/// Peer `i`'s key and value, as an EKS node would write them: subnet 10.<1 + i/256>.<i%256>.0/24,
/// a PublicIP in RFC 2544's benchmarking range (never programmed: the daemons are lease-only), and
/// a NodeName as long as EKS gives (`ip-10-0-123-45.eu-west-1.compute.internal`). `pad` bytes
/// more in a field overlayd does not read.
fn peer(i: u32, pad: usize) -> (String, String) {
    let key = key(&format!("10.{}.{}.0-24", 1 + i / 256, i % 256));
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i);
    let [_, b, c, d] = ip.octets();
    let value = serde_json::json!({
        "PublicIP": ip.to_string(),
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": format!("02:5c:00:{b:02x}:{c:02x}:{d:02x}")},
        "NodeName": format!("ip-10-{b}-{c}-{d}.eu-west-1.compute.internal"),
        "Pad": "x".repeat(pad),
    });
    (key, value.to_string())
}

/// Writes peers `ids` in transactions of at most 128 puts (etcd's default --max-txn-ops) and
/// 1 MiB (its --max-request-bytes is 1.5 MiB), bound to one etcd lease as a node's key is;
/// returns the bytes of keys and values written (less than the answer that lists them, which adds
/// revisions and the lease per key).
fn write_peers(etcd: &Etcd, ids: std::ops::Range<u32>, pad: usize) -> usize {
    let rt = rt();
    rt.block_on(async {
        let mut c = Client::connect([etcd.endpoint.as_str()], None)
            .await
            .expect("connect to etcd");
        let lease = c.lease_grant(3600, None).await.expect("lease grant").id();
        let (mut total, mut txn_bytes) = (0, 0);
        let mut ops = Vec::new();
        for i in ids {
            let (k, v) = peer(i, pad);
            let size = k.len() + v.len();
            if ops.len() == 128 || (!ops.is_empty() && txn_bytes + size > 1 << 20) {
                c.txn(Txn::new().and_then(std::mem::take(&mut ops)))
                    .await
                    .expect("txn");
                txn_bytes = 0;
            }
            total += size;
            txn_bytes += size;
            ops.push(TxnOp::put(k, v, Some(PutOptions::new().with_lease(lease))));
        }
        if !ops.is_empty() {
            c.txn(Txn::new().and_then(ops)).await.expect("txn");
        }
        total
    })
}

fn wide_seeded() -> (Etcd, tempfile::TempDir) {
    let etcd = Etcd::start();
    etcd.put(&format!("{PREFIX}/config"), WIDE_CONFIG);
    (etcd, tempfile::tempdir().expect("tempdir"))
}

fn gauge_reaches(addr: &str, want: i64, timeout: Duration) {
    let mut last = None;
    let reached = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < reached {
        last = leases_gauge(addr);
        if last == Some(want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the daemon sees {last:?} leases after {timeout:?}, not {want}");
}

fn kill(sig: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

#[test]
fn a_daemon_lists_25_000_leases_whose_listing_is_over_4_mib() {
    let (etcd, dir) = wide_seeded();
    const PEERS: u32 = 25_000;
    let bytes = write_peers(&etcd, 0..PEERS, 0);
    assert!(
        bytes > TONIC_DEFAULT_LIMIT,
        "the leases must not fit one default-sized answer: {bytes} bytes"
    );
    let addr = format!("127.0.0.1:{}", free_port(Ipv4Addr::LOCALHOST));
    // Leasing lists every lease first (to find a free subnet), then the watch lists them again.
    let d = leased(
        &etcd.endpoint,
        "127.0.0.71",
        dir.path(),
        &["--metrics-addr", &addr],
    );
    gauge_reaches(&addr, i64::from(PEERS) + 1, Duration::from_secs(30));
    assert!(!d.log_text().contains("too large"), "{}", d.log_text());
}

#[test]
fn a_watch_resumed_with_over_32_mib_to_catch_up_gets_it_in_parts_and_goes_on() {
    let (mut etcd, dir) = seeded();
    let addr = format!("127.0.0.1:{}", free_port(Ipv4Addr::LOCALHOST));
    let d = leased(
        &etcd.endpoint,
        "127.0.0.72",
        dir.path(),
        &["--metrics-addr", &addr],
    );
    gauge_reaches(&addr, 1, Duration::from_secs(10));

    // The daemon stopped while etcd goes away and comes back: its watch stream is gone before it
    // could deliver anything, so on waking the daemon resumes from its last revision and etcd
    // sends everything written meanwhile as one catch-up.
    kill("STOP", d.pid());
    etcd.stop();
    etcd.restart();
    // 28 values of 1.2 MiB (etcd's default --max-request-bytes is 1.5 MiB per request), in the
    // network's 10.244.0.0/16 like any peer: 34 MiB, over tonic's default 4 MiB and over
    // overlayd's own 32 MiB too, so only a catch-up in fragments is taken without a relisting.
    const VALUES: u32 = 28;
    let rt = rt();
    let written: usize = rt.block_on(async {
        let mut c = Client::connect([etcd.endpoint.as_str()], None)
            .await
            .expect("connect to etcd");
        let mut bytes = 0;
        for i in 0..VALUES {
            let (_, v) = peer(i, 1200 << 10);
            let k = key(&format!("10.244.{}.0-24", 200 + i));
            bytes += k.len() + v.len();
            c.put(k, v, None).await.expect("put");
        }
        bytes
    });
    assert!(
        written > overlayd::registry::client::MAX_MESSAGE_BYTES,
        "{written} bytes"
    );
    kill("CONT", d.pid());
    gauge_reaches(&addr, 1 + i64::from(VALUES), Duration::from_secs(30));
    let log = d.log_text();
    assert!(
        !log.contains("too large") && !log.contains("listing every lease again"),
        "the catch-up came in one piece, or the watch gave up:\n{log}"
    );

    // Still following: a lease written afterwards arrives too.
    etcd.put(&key("10.244.99.0-24"), PEER);
    gauge_reaches(&addr, 2 + i64::from(VALUES), Duration::from_secs(15));
}

#[test]
fn a_listing_page_over_the_message_limit_is_asked_for_in_halves() {
    let (etcd, _dir) = wide_seeded();
    // 1 100 keys of 40 KiB: a first page of 1 000 is 40 MiB, over overlayd's 32 MiB limit.
    const PEERS: u32 = 1_100;
    let bytes = write_peers(&etcd, 0..PEERS, 40 << 10);
    assert!(
        bytes / PEERS as usize * overlayd::registry::client::LIST_PAGE as usize
            > overlayd::registry::client::MAX_MESSAGE_BYTES,
        "a full page must pass the limit: {bytes} bytes in all"
    );
    let rt = rt();
    let reg = rt
        .block_on(Registry::connect(&etcd_args(&etcd.endpoint)))
        .expect("connect");
    let set = rt.block_on(reg.list_leases()).expect("list");
    assert_eq!(set.leases.len(), PEERS as usize);
    assert!(set.ignored.is_empty(), "{:?}", set.ignored.keys());
}
