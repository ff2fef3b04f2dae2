//! Operating a node: `/healthz`, `/readyz` and `/status` of the real daemon in lab node namespaces,
//! and `overlayd status` run there the way an operator runs it (`kubectl exec` into the DaemonSet's
//! pod, whose environment has OVERLAYD_METRICS_ADDR), with the daemon up and down.

use std::process::Output;
use std::time::Duration;

use overlay_testlab::lab::{Lab, DEFAULT_CONFIG};
use overlay_testlab::{bin, require_root, wait_for};
use serde_json::Value;

const PORT: u16 = 9472;

/// Two nodes serving their health endpoints on their own loopback, readiness asking etcd to have
/// answered within 4 s.
fn lab() -> Lab {
    let mut lab = Lab::new(DEFAULT_CONFIG);
    for _ in 0..2 {
        let args = [
            "--metrics-addr",
            &format!("127.0.0.1:{PORT}"),
            "--etcd-heard-within",
            "4s",
        ];
        lab.add_node(&args);
    }
    lab
}

/// `overlayd status <args>` in node `i`'s namespace with only the DaemonSet's environment.
fn status(lab: &Lab, i: usize, args: &[&str]) -> Output {
    lab.nodes[i]
        .ns
        .cmd(bin("overlayd").to_str().expect("utf8"))
        .arg("status")
        .args(args)
        .env("OVERLAYD_METRICS_ADDR", format!("0.0.0.0:{PORT}"))
        .output()
        .expect("run overlayd status")
}

fn status_json(lab: &Lab, i: usize) -> Value {
    let out = status(lab, i, &["--output", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --output json is not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn wait_ready(lab: &Lab, i: usize, ready: bool, timeout: Duration) -> String {
    let want = if ready { 200 } else { 503 };
    wait_for(
        &format!("node{i} /readyz to answer {want}"),
        timeout,
        || {
            lab.http_get(i, PORT, "/readyz")
                .filter(|(code, _)| *code == want)
                .map(|(_, body)| body)
        },
    )
}

#[test]
fn readyz_and_status_report_lease_peers_ipam_repairs_and_etcd_contact() {
    if !require_root("readyz_and_status_report_lease_peers_ipam_repairs_and_etcd_contact") {
        return;
    }
    let mut lab = lab();
    let s0 = lab.subnet(0).to_string();
    let s1 = lab.subnet(1).to_string();
    let body = wait_ready(&lab, 0, true, Duration::from_secs(20));
    for check in ["lease", "devices", "iptables", "peers", "etcd"] {
        assert!(body.contains(&format!("ok   {check}:")), "{body}");
    }
    assert_eq!(
        lab.http_get(0, PORT, "/healthz"),
        Some((200, "ok\n".into()))
    );
    lab.add_pod(0);

    // No flags: the address comes from the environment the DaemonSet gives.
    let out = status(&lab, 0, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let first = text.lines().next().unwrap_or_default();
    assert!(first.contains("node0") && first.contains("READY"), "{text}");
    assert!(
        text.contains(&s1) && text.contains("node1") && text.contains("programmed"),
        "{text}"
    );
    assert!(text.contains("1 of 253 allocated"), "{text}");

    let j = status_json(&lab, 0);
    assert_eq!(j["ready"], true, "{j:#}");
    assert_eq!(j["lease"]["subnet"], s0.as_str(), "{j:#}");
    assert_eq!(j["lease"]["held"], true, "{j:#}");
    let ttl = j["lease"]["ttl_left_seconds"].as_i64().unwrap_or(0);
    assert!(ttl > 0 && ttl <= 24 * 3600, "{j:#}");
    assert_eq!(j["node"]["public_ip"], "192.0.2.10", "{j:#}");
    assert_eq!(j["config"]["network"], "10.244.0.0/16", "{j:#}");
    assert_eq!(j["devices"]["vtep"], "overlay.1", "{j:#}");
    assert_eq!(j["devices"]["bridge"], "cni0", "{j:#}");
    let peers = j["peers"].as_array().expect("peers");
    assert_eq!(peers.len(), 1, "{j:#}");
    assert_eq!(peers[0]["subnet"], s1.as_str(), "{j:#}");
    assert_eq!(peers[0]["node_name"], "node1", "{j:#}");
    assert_eq!(peers[0]["public_ip"], "192.0.2.11", "{j:#}");
    assert_eq!(peers[0]["state"], "programmed", "{j:#}");
    assert_eq!(j["ipam"][0]["allocated"], 1, "{j:#}");
    assert_eq!(j["ipam"][0]["capacity"], 253, "{j:#}");
    assert!(
        j["etcd"]["last_contact_seconds_ago"]
            .as_f64()
            .is_some_and(|s| s < 4.0),
        "{j:#}"
    );
    assert_eq!(j["repairs"]["dataplane"], 0, "{j:#}");

    // A route someone deleted comes back, and counts as a repair (the leases did not change).
    lab.nodes[0].ns.ip(&["route", "del", &s1]);
    let j = wait_for("the repair in /status", Duration::from_secs(10), || {
        let j = status_json(&lab, 0);
        (j["repairs"]["dataplane"].as_u64() >= Some(1)).then_some(j)
    });
    let recent = j["repairs"]["recent"].to_string();
    assert!(recent.contains("put back"), "{j:#}");

    // etcd away: not ready, naming etcd; every other check still passes (the data plane stays).
    lab.etcd.stop();
    let body = wait_ready(&lab, 0, false, Duration::from_secs(30));
    assert!(body.contains("FAIL etcd:"), "{body}");
    for check in ["lease", "devices", "iptables", "peers"] {
        assert!(body.contains(&format!("ok   {check}:")), "{body}");
    }
    let out = status(&lab, 0, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .next()
            .unwrap_or_default()
            .contains("NOT READY: etcd"),
        "{text}"
    );
    lab.etcd.restart();
    wait_ready(&lab, 0, true, Duration::from_secs(30));
}

#[test]
fn status_with_the_daemon_down_says_so_first_and_reads_the_node_itself() {
    if !require_root("status_with_the_daemon_down_says_so_first_and_reads_the_node_itself") {
        return;
    }
    let mut lab = lab();
    let s1 = lab.subnet(1).to_string();
    lab.wait_route(0, &s1, true, Duration::from_secs(10));
    lab.add_pod(0);
    lab.stop_daemon(0, "TERM");
    let ipam = lab.nodes[0].ipam_dir.clone();
    let file = lab.nodes[0].subnet_file.clone();
    let offline = |lab: &Lab, extra: &[&str]| {
        let mut args = vec![
            "--etcd-endpoints",
            &lab.etcd.endpoint,
            "--subnet-file",
            file.to_str().expect("utf8"),
            "--cni-data-dir",
            ipam.to_str().expect("utf8"),
        ];
        args.extend_from_slice(extra);
        status(lab, 0, &args)
    };
    let out = offline(&lab, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    let first = text.lines().next().unwrap_or_default();
    assert!(first.contains("NOT answering"), "{text}");
    assert!(
        text.contains(&format!("subnet {}", lab.subnet(0).network())),
        "{text}"
    );
    assert!(text.contains("1 of 253 allocated"), "{text}");
    assert!(
        text.contains(&format!("{} held by 192.0.2.10", lab.subnet(0))),
        "{text}"
    );
    assert!(text.contains("s left"), "{text}");
    assert!(
        text.contains(&s1) && text.contains("node1") && text.contains("routed"),
        "{text}"
    );

    // With the daemon down a deleted route stays deleted, and status says so.
    lab.nodes[0].ns.ip(&["route", "del", &s1]);
    let out = offline(&lab, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("NO ROUTE"), "{text}");
    let out = offline(&lab, &["--output", "json"]);
    let j: Value = serde_json::from_slice(&out.stdout).expect("offline JSON");
    assert_eq!(j["daemon"]["answering"], false, "{j:#}");
    assert_eq!(j["etcd"]["peers"][0]["state"], "NO ROUTE", "{j:#}");
    assert_eq!(j["pod_addresses"][0]["allocated"], 1, "{j:#}");

    // etcd away too: the node's own findings are still shown, and etcd's failure is named.
    lab.etcd.stop();
    let out = offline(&lab, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("1 of 253 allocated"), "{text}");
    assert!(text.contains("etcd:"), "{text}");
}

/// Messages of a JSON log (every line must be one JSON object), in order.
fn json_messages(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect()
}

fn count(lines: &[Value], needle: &str) -> usize {
    lines
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(needle))
        })
        .count()
}

#[test]
fn json_logs_carry_each_state_change_once() {
    if !require_root("json_logs_carry_each_state_change_once") {
        return;
    }
    let mut lab = Lab::new(DEFAULT_CONFIG);
    lab.add_node(&["--log-format", "json", "--resync-interval", "1s"]);
    lab.add_node(&[]);
    let s1 = lab.subnet(1).to_string();
    lab.wait_route(0, &s1, true, Duration::from_secs(10));
    let log_path = lab.nodes[0].daemon.as_ref().expect("daemon").log.clone();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // A repair: the route comes back, and is logged as one repair.
    lab.nodes[0].ns.ip(&["route", "del", &s1]);
    wait_for("the repair in the log", Duration::from_secs(10), || {
        (count(&json_messages(&log()), "repaired data plane") == 1).then_some(())
    });
    // The peer goes: its removal is logged once, with the subnet as a field or in the text.
    lab.stop_daemon(1, "KILL");
    lab.etcd.ctl(&["del", &lab.subnet_key(1)]);
    lab.wait_route(0, &s1, false, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    let settled = json_messages(&log()).len();
    // Several more passes (every second) and iptables checks: nothing is logged again.
    std::thread::sleep(Duration::from_secs(6));
    let lines = json_messages(&log());
    assert_eq!(lines.len(), settled, "{lines:#?}");
    let leased: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("leased subnet"))
        })
        .collect();
    assert_eq!(leased.len(), 1, "{lines:#?}");
    assert_eq!(leased[0]["level"], "INFO");
    assert_eq!(
        leased[0]["fields"]["subnet"],
        lab.subnet(0).to_string().as_str()
    );
    assert!(leased[0]["timestamp"].is_string());
    assert!(
        lines.iter().any(|l| {
            l["fields"]["subnet"] == s1.as_str() && l["fields"]["message"] == "programmed peer"
        }),
        "{lines:#?}"
    );
    assert_eq!(count(&lines, "repaired data plane"), 1, "{lines:#?}");
    assert_eq!(
        count(&lines, &format!("removed route to {s1}")),
        1,
        "{lines:#?}"
    );
}
