//! Subnet keys overlayd cannot use (issue 10, item 8), written into a real etcd while a daemon
//! runs: each is logged once, counted in `overlayd_ignored_leases_total{reason}`, and ignored.
//! (The lab test `malformed_keys_never_remove_a_peer` shows the data plane side.)

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use overlay_testlab::{free_port, wait_for};

fn counter(addr: &str, reason: &str) -> Option<u64> {
    let (_, body) = http_get(addr, "/metrics")?;
    let name = format!("overlayd_ignored_leases_total{{reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&name))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn each_kind_of_malformed_key_is_logged_once_counted_and_ignored() {
    let (etcd, dir) = seeded();
    let addr = format!("127.0.0.1:{}", free_port(Ipv4Addr::LOCALHOST));
    let mut d = leased(
        &etcd.endpoint,
        "127.0.0.51",
        dir.path(),
        &["--metrics-addr", &addr],
    );
    let own = leased_subnet(&d);
    let own_value = etcd.get(&subnet_key(&own)).unwrap();
    etcd.put(&key("10.244.1.0-24"), PEER);

    let octets = own.network().octets();
    let writes = [
        ("10.244.200.0-24", "not json at all", "not_json"),
        ("10.244.202.0-24", &PEER[..25], "not_json"), // cut off mid-value
        ("10.244.201.0-25", PEER, "prefix_length"),
        ("10.99.0.0-24", PEER, "outside_network"),
        ("bogus-key", PEER, "bad_key"),
    ];
    let overlap = format!("{}.{}.0.0-16", octets[0], octets[1]);
    for (k, v, _) in writes {
        etcd.put(&key(k), v);
    }
    etcd.put(&key(&overlap), PEER);
    for (reason, n) in [
        ("not_json", 2),
        ("prefix_length", 1),
        ("outside_network", 1),
        ("bad_key", 1),
        ("overlaps_own", 1),
    ] {
        wait_for(
            &format!("overlayd_ignored_leases_total{{reason={reason:?}}} to be {n}"),
            Duration::from_secs(5),
            || (counter(&addr, reason) == Some(n)).then_some(()),
        );
    }
    // Logged once each, even though every later event and pass sees them again.
    etcd.put(&key("10.244.3.0-24"), PEER);
    std::thread::sleep(Duration::from_millis(1500));
    let log = d.log_text();
    for (k, _, _) in writes {
        let needle = format!("ignoring {PREFIX}/subnets/{k}:");
        assert_eq!(log.matches(&needle).count(), 1, "{needle}\n{log}");
    }
    assert_eq!(counter(&addr, "not_json"), Some(2));
    // A second write of a bad key is a new event: counted again.
    etcd.put(&key("10.244.200.0-24"), "still not json");
    wait_for("the rewrite to be counted", Duration::from_secs(5), || {
        (counter(&addr, "not_json") == Some(3)).then_some(())
    });
    // Nothing of this touched the daemon or its key.
    assert!(d.is_running(), "{log}");
    assert_eq!(etcd.get(&subnet_key(&own)), Some(own_value));
    assert!(!log.contains("putting it back"), "{log}");
}
