//! Whose subnet is whose (issue 10, items 3, 5 and 6), against a real etcd: a lease that expired
//! is treated as expired, a subnet held by another node is refused (not ready, saying why) for as
//! long as pods still use it, also across restarts, and two nodes with one PublicIP never fight.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use overlay_state::{AttachmentKey, IpamStore, SubnetFile};
use overlay_testlab::{free_port, wait_for, Daemon, Etcd};
use overlayd::registry::Registry;

const OTHER: &str = r#"{"PublicIP":"127.0.0.99","BackendType":"vxlan","NodeName":"node-other"}"#;

fn readyz(addr: &str) -> Option<(u16, String)> {
    http_get(addr, "/readyz")
}

fn wait_readyz(addr: &str, status: u16, body_has: &str, timeout: Duration) -> String {
    let (_, body) = wait_for(
        &format!("/readyz to answer {status} with {body_has:?}"),
        timeout,
        || readyz(addr).filter(|(s, b)| *s == status && b.contains(body_has)),
    );
    body
}

#[test]
fn keep_alive_of_a_lease_etcd_no_longer_has_returns_as_expired() {
    let etcd = Etcd::start();
    let rt = rt();
    let reg = rt
        .block_on(Registry::connect(&etcd_args(&etcd.endpoint)))
        .unwrap();
    let id = rt
        .block_on(reg.call(|mut c| async move { c.lease_grant(60, None).await }))
        .unwrap()
        .id();
    // Gone while this node was away: opening a keep-alive stream now answers "lease not found".
    etcd.ctl(&["lease", "revoke", &format!("{id:x}")]);
    let t = Instant::now();
    let ended = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            overlayd::registry::keepalive::keep_alive(
                reg,
                id,
                Duration::from_secs(60),
                std::sync::Arc::new(overlayd::registry::Unobserved),
            ),
        )
        .await
    });
    assert!(
        ended.is_ok(),
        "keep_alive kept retrying a lease etcd does not have"
    );
    eprintln!(
        "keep-alive of a revoked lease returned after {:?}",
        t.elapsed()
    );
}

#[test]
fn own_key_taken_by_another_node_is_refused_not_ready_until_it_is_free() {
    let (etcd, dir) = seeded();
    let addr = format!("127.0.0.1:{}", free_port(Ipv4Addr::LOCALHOST));
    let mut d = leased(
        &etcd.endpoint,
        "127.0.0.33",
        dir.path(),
        &["--metrics-addr", &addr],
    );
    let subnet = leased_subnet(&d);
    wait_readyz(&addr, 200, "ok", Duration::from_secs(5));
    etcd.put(&subnet_key(&subnet), OTHER);
    d.wait_log(
        "refusing to renumber this node silently",
        Duration::from_secs(10),
    );
    let body = wait_readyz(&addr, 503, "leased by another node", Duration::from_secs(5));
    assert!(body.contains("node-other, 127.0.0.99"), "{body}");
    // Refusing means no write: the other node's value stays, and this daemon stays up.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(etcd.get(&subnet_key(&subnet)).as_deref(), Some(OTHER));
    assert!(d.is_running(), "{}", d.log_text());

    // The other node lets go: this node takes its subnet back and is ready again.
    etcd.ctl(&["del", &subnet_key(&subnet)]);
    wait_readyz(&addr, 200, "ok", Duration::from_secs(10));
    let v = etcd.get(&subnet_key(&subnet)).unwrap();
    assert!(v.contains("127.0.0.33"), "{v}");
}

#[test]
fn refusing_to_renumber_survives_a_restart_while_pods_hold_addresses() {
    let (etcd, dir) = seeded();
    let addr = format!("127.0.0.1:{}", free_port(Ipv4Addr::LOCALHOST));
    let cni = dir.path().join("cni");
    let args = [
        "--metrics-addr",
        &addr,
        "--cni-data-dir",
        cni.to_str().unwrap(),
    ];
    let mut d = leased(&etcd.endpoint, "127.0.0.34", dir.path(), &args);
    let subnet = leased_subnet(&d);
    let store = IpamStore::new(&cni, "podnet").unwrap();
    store
        .allocate(subnet, &AttachmentKey::new("pod-1", "eth0"))
        .unwrap();
    // The daemon goes away (its lease stays) and another node takes the subnet meanwhile.
    d.signal("TERM");
    d.wait_exit(Duration::from_secs(10));
    etcd.put(&subnet_key(&subnet), OTHER);

    let mut d = daemon(&etcd.endpoint, "127.0.0.34", dir.path(), &args);
    d.wait_log("refusing to take another subnet", Duration::from_secs(15));
    let body = wait_readyz(&addr, 503, "pod address", Duration::from_secs(5));
    assert!(body.contains(&subnet.to_string()), "{body}");
    // Nothing renumbered: no key with this node's address, the subnet file still the old one.
    std::thread::sleep(Duration::from_secs(2));
    let keys = etcd.keys(&format!("{PREFIX}/subnets/"));
    assert_eq!(keys, vec![subnet_key(&subnet)], "{}", d.log_text());
    let file = SubnetFile::read(&dir.path().join("127.0.0.34.env")).unwrap();
    assert_eq!(file.subnet, subnet);
    assert!(!d.log_text().contains("leased subnet"), "{}", d.log_text());

    // Once the subnet is free again, the node takes it back.
    etcd.ctl(&["del", &subnet_key(&subnet)]);
    d.wait_log("leased subnet", Duration::from_secs(15));
    assert_eq!(leased_subnet(&d), subnet);
    wait_readyz(&addr, 200, "ok", Duration::from_secs(5));
}

#[test]
fn a_second_node_with_the_same_public_ip_stops_and_writes_nothing() {
    let (etcd, dir) = seeded();
    let a = leased(&etcd.endpoint, "127.0.0.41", dir.path(), &[]);
    let key = subnet_key(&leased_subnet(&a));
    let before = etcd.get(&key).unwrap();

    let mut cmd = overlayd();
    cmd.args(["run", "--lease-only", "--iface", "lo"])
        .args(["--public-ip", "127.0.0.41", "--node-name", "node-b"])
        .arg("--etcd-endpoints")
        .arg(&etcd.endpoint)
        .arg("--subnet-file")
        .arg(dir.path().join("b.env"))
        .env("RUST_LOG", "info");
    let mut b = Daemon::spawn("overlayd node-b", cmd, dir.path().join("b.log"));
    let status = b.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| !s.success()),
        "{status:?}: {}",
        b.log_text()
    );
    assert!(
        b.log_text().contains("two nodes cannot share one PublicIP"),
        "{}",
        b.log_text()
    );
    assert!(b.log_text().contains("node-127.0.0.41"), "{}", b.log_text());
    // No tug of war: node A's key is untouched and A never had to write it back.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(etcd.get(&key).as_deref(), Some(before.as_str()));
    assert_eq!(etcd.keys(&format!("{PREFIX}/subnets/")), vec![key]);
    assert!(
        !a.log_text().contains("writing it back"),
        "{}",
        a.log_text()
    );
}
