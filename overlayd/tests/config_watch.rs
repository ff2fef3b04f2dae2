//! The network config is followed on the lease watch's own stream (issue 13: one watch stream per
//! node), against a real etcd whose role for the node covers only what overlayd needs:
//! read-write under `<prefix>/subnets/` and read of `<prefix>/config`, nothing else under the
//! prefix. A change reaches the follower within moments; a value it cannot use is warned about
//! once and the running config stays; and etcd counts one watch stream open.

mod common;

use std::time::{Duration, Instant};

use common::*;
use overlay_testlab::{wait_for, Etcd};
use overlayd::config::NetworkConfig;
use overlayd::registry::Registry;

const USER: &str = "node";
const PASSWORD: &str = "node-pw";

#[test]
fn config_changes_arrive_on_the_lease_watch_stream_with_a_narrow_role() {
    let mut etcd = Etcd::start();
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    etcd.enable_auth(USER, PASSWORD, PREFIX);
    // Narrow the role to what a node needs (enable_auth granted the whole prefix).
    let prefix = format!("{PREFIX}/");
    let subnets = format!("{PREFIX}/subnets/");
    let config_key = format!("{PREFIX}/config");
    etcd.ctl(&[
        "role",
        "revoke-permission",
        "overlayd",
        "--prefix=true",
        &prefix,
    ]);
    etcd.ctl(&[
        "role",
        "grant-permission",
        "overlayd",
        "--prefix=true",
        "readwrite",
        &subnets,
    ]);
    etcd.ctl(&["role", "grant-permission", "overlayd", "read", &config_key]);
    etcd.put(&format!("{PREFIX}/other-tenant-key"), "x");

    let rt = rt();
    let mut args = etcd_args(&etcd.endpoint);
    args.etcd_username = Some(USER.into());
    args.etcd_password = Some(PASSWORD.into());
    let reg = rt.block_on(Registry::connect(&args)).unwrap();
    let (running, _) = NetworkConfig::parse(CONFIG.as_bytes()).unwrap();
    let (mut leases, configs, log) = follow_leases_and_config(&rt, reg, running);
    etcd.put(&key("10.244.1.0-24"), PEER);
    wait_for_set(
        &rt,
        &mut leases,
        &["10.244.1.0/24"],
        Duration::from_secs(10),
    );

    // A change to the config reaches the follower.
    let direct = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1,"DirectRouting":true}}"#;
    let put = Instant::now();
    etcd.put(&config_key, direct);
    wait_for("the changed config", Duration::from_secs(5), || {
        configs.borrow().backend.direct_routing.then_some(())
    });
    eprintln!(
        "a config change reached the follower {:?} after the put",
        put.elapsed()
    );

    // One it cannot use: warned about once (written twice), the running config stays.
    for _ in 0..2 {
        etcd.put(&config_key, r#"{"Network":"not a network"}"#);
    }
    wait_for("the warning", Duration::from_secs(5), || {
        log_text(&log).contains("cannot use").then_some(())
    });
    etcd.put(&key("10.244.2.0-24"), PEER);
    wait_for_set(
        &rt,
        &mut leases,
        &["10.244.1.0/24", "10.244.2.0/24"],
        Duration::from_secs(5),
    );
    let text = log_text(&log);
    assert_eq!(text.matches("cannot use").count(), 1, "{text}");
    assert!(configs.borrow().backend.direct_routing, "{text}");
    assert!(!text.contains("permission denied"), "{text}");

    // etcd serves this follower one watch stream (leases and config), nothing else watches.
    let open = wait_for("etcd's metrics", Duration::from_secs(5), || {
        etcd_streams_open(&etcd.endpoint, "Watch")
    });
    assert_eq!(open, 1.0, "watch streams open at etcd");
}
