//! `overlayd config validate|show|put` against a real etcd server (Debian's `etcd`), through the
//! real binary, as an operator would run it.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use overlay_testlab::{free_port, Etcd};

const KEY: &str = "/coreos.com/network/config";
const CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#;

fn overlayd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_overlayd"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run overlayd")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn config(etcd: &Etcd, args: &[&str]) -> Output {
    let mut all = vec!["config"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--etcd-endpoints", &etcd.endpoint]);
    overlayd(&all)
}

/// Puts a subnet key bound to a fresh 10-minute etcd lease, as a node would; returns the lease id.
fn put_leased(etcd: &Etcd, key: &str, value: &str) -> String {
    let lease = etcd.ctl(&["lease", "grant", "600"]);
    let id = lease
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    etcd.ctl(&["put", "--lease", &id, key, value]);
    id
}

/// The mod revision of `key`, or None when it does not exist.
fn mod_revision(etcd: &Etcd, key: &str) -> Option<i64> {
    let out = etcd.ctl(&["get", key, "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    v["kvs"][0]["mod_revision"].as_i64()
}

#[test]
fn validate_accepts_a_good_config_and_fills_in_defaults() {
    let o = overlayd(&["config", "validate", r#"{"Network":"10.244.0.0/16"}"#]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let line = t.lines().find(|l| l.starts_with("valid: ")).expect(&t);
    let v: serde_json::Value = serde_json::from_str(&line[7..]).expect("effective JSON");
    assert_eq!(v["SubnetLen"], 24);
    assert_eq!(v["SubnetMin"], "10.244.1.0");
    assert_eq!(v["SubnetMax"], "10.244.255.0");
    assert_eq!(v["Backend"]["Port"], 8472);
    assert_eq!(v["Backend"]["VNI"], 1);
    assert!(t.contains("holds 255 node subnets of /24"), "{t}");
    assert!(t.contains("253 pod addresses each"), "{t}");
}

#[test]
fn validate_reads_standard_input_and_warns_on_unknown_fields() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_overlayd"))
        .args(["config", "validate", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(br#"{"Network":"10.8.0.0/14","SubnetLen":26,"Colour":"blue"}"#)
        .expect("write");
    let o = child.wait_with_output().expect("wait");
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("unknown field Colour"), "{t}");
    assert!(t.contains("/26"), "{t}");
}

#[test]
fn validate_names_the_wrong_field_and_value() {
    for (cfg, needles) in [
        (
            r#"{"Network":"10.244.0.300/16"}"#,
            &["Network", "\"10.244.0.300/16\"", "IPv4 CIDR"][..],
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":16}"#,
            &["SubnetLen = 16", "longer than Network's prefix /16"][..],
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":12}"#,
            &["SubnetLen = 12", "longer than"][..],
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#,
            &["SubnetLen = 31", "at most 30"][..],
        ),
        (
            r#"Network: 10.244.0.0/16"#,
            &["not JSON", "ETCDCTL_API=3"][..],
        ),
    ] {
        let o = overlayd(&["config", "validate", cfg]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{cfg}: {t}");
        for n in needles {
            assert!(t.contains(n), "{cfg}: expected {n:?} in: {t}");
        }
        assert!(!t.contains("valid: "), "{t}");
    }
}

#[test]
fn put_writes_once_and_show_counts_the_leases() {
    let etcd = Etcd::start();
    // Nothing there yet: show says so, with the seed command.
    let o = config(&etcd, &["show"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("does not exist") && t.contains("etcdctl"), "{t}");

    let o = config(&etcd, &["put", CONFIG]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains(&format!("wrote {KEY}")), "{t}");
    assert!(
        t.contains(&format!(
            "ETCDCTL_API=3 etcdctl --endpoints={} put {KEY} '{CONFIG}'",
            etcd.endpoint
        )),
        "{t}"
    );
    assert_eq!(etcd.get(KEY).as_deref(), Some(CONFIG));
    let rev = mod_revision(&etcd, KEY);

    // Idempotent: the same config again writes nothing.
    let o = config(&etcd, &["put", CONFIG]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("already holds this config"), "{t}");
    assert_eq!(mod_revision(&etcd, KEY), rev);

    // One node with an etcd lease, one reservation.
    put_leased(
        &etcd,
        "/coreos.com/network/subnets/10.244.7.0-24",
        r#"{"PublicIP":"192.0.2.11","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}"#,
    );
    etcd.put(
        "/coreos.com/network/subnets/10.244.9.0-24",
        r#"{"PublicIP":"192.0.2.12"}"#,
    );
    let o = config(&etcd, &["show"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains(&format!("raw:       {CONFIG}")), "{t}");
    assert!(
        t.contains("subnets:   2 of 255 leased (1 by etcd lease, 1 reserved), 253 free"),
        "{t}"
    );

    let o = config(&etcd, &["show", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("show json");
    assert_eq!(v["valid"], true);
    assert_eq!(v["effective"]["SubnetMax"], "10.244.255.0");
    assert_eq!(v["subnets"]["total"], 255);
    assert_eq!(v["subnets"]["leased"], 1);
    assert_eq!(v["subnets"]["reservations"], 1);
    assert_eq!(v["subnets"]["free"], 253);
}

#[test]
fn put_of_an_invalid_config_writes_nothing() {
    let etcd = Etcd::start();
    let o = config(
        &etcd,
        &["put", r#"{"Network":"10.244.0.0/16","SubnetLen":33}"#],
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("SubnetLen = 33") && t.contains("nothing written"),
        "{t}"
    );
    assert_eq!(etcd.get(KEY), None);
}

#[test]
fn put_over_a_different_config_needs_force_and_never_strands_leases() {
    let etcd = Etcd::start();
    etcd.put(KEY, CONFIG);
    let id = put_leased(
        &etcd,
        "/coreos.com/network/subnets/10.244.7.0-24",
        r#"{"PublicIP":"192.0.2.11","BackendType":"vxlan","NodeName":"node-a"}"#,
    );
    let rev = mod_revision(&etcd, KEY);
    let other = r#"{"Network":"10.50.0.0/16","SubnetLen":24}"#;

    let o = config(&etcd, &["put", other]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("already holds another config") && t.contains("--force"),
        "{t}"
    );
    assert_eq!(mod_revision(&etcd, KEY), rev);

    // --force while a node holds a subnet outside the new Network: refused, and named.
    let o = config(&etcd, &["put", "--force", other]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains("refusing")
            && t.contains("10.244.7.0/24 (node-a)")
            && t.contains("overlayd release"),
        "{t}"
    );
    assert_eq!(mod_revision(&etcd, KEY), rev);

    // A change that keeps every lease inside (a wider Network) goes through with --force.
    let wider = r#"{"Network":"10.244.0.0/15","SubnetLen":24}"#;
    let o = config(&etcd, &["put", "--force", wider]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert_eq!(etcd.get(KEY).as_deref(), Some(wider));

    // Once the node is gone, the move to the other Network is allowed.
    etcd.ctl(&["lease", "revoke", &id]);
    let o = config(&etcd, &["put", "--force", other]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(etcd.get(KEY).as_deref(), Some(other));
}

#[test]
fn unreachable_etcd_is_named_and_fails_fast() {
    let port = free_port(std::net::Ipv4Addr::LOCALHOST);
    let endpoint = format!("http://127.0.0.1:{port}");
    for args in [&["show"][..], &["put", CONFIG][..]] {
        let start = Instant::now();
        let mut all = vec!["config"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--etcd-endpoints", &endpoint]);
        let o = overlayd(&all);
        let t = text(&o);
        assert!(!o.status.success(), "{t}");
        assert!(
            t.contains(&format!("etcd unreachable at {endpoint}")) && t.contains("refused"),
            "{t}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "took {:?}",
            start.elapsed()
        );
    }
}
