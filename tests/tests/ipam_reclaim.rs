//! Issue 14, the daemon's part: overlayd reclaims in the background the pod addresses of
//! sandboxes gone without DEL, and `/status`, `overlayd status` and `/metrics` show allocations,
//! live pods and reclaimable leftovers apart. The real daemon, the real plugin, lab namespaces.

use std::time::{Duration, SystemTime};

use overlay_testlab::lab::{Lab, DEFAULT_CONFIG};
use overlay_testlab::{bin, require_root, wait_for, Netns};
use serde_json::Value;

const PORT: u16 = 9473;

fn status_json(lab: &Lab) -> Value {
    let out = lab.nodes[0]
        .ns
        .cmd(bin("overlayd").to_str().expect("utf8"))
        .args(["status", "--output", "json"])
        .env("OVERLAYD_METRICS_ADDR", format!("0.0.0.0:{PORT}"))
        .output()
        .expect("run overlayd status");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn add(lab: &Lab, pod: &Netns, id: &str) -> String {
    let out = lab.cni(0, "ADD", pod, id);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("result");
    let addr = v["ips"][0]["address"]
        .as_str()
        .expect("address")
        .to_string();
    addr.split('/').next().expect("ip").to_string()
}

#[test]
fn the_daemon_reclaims_dead_sandboxes_and_reports_them_apart() {
    if !require_root("the_daemon_reclaims_dead_sandboxes_and_reports_them_apart") {
        return;
    }
    let mut lab = Lab::new(DEFAULT_CONFIG);
    lab.add_node(&[
        "--metrics-addr",
        &format!("127.0.0.1:{PORT}"),
        "--ipam-reclaim-interval",
        "1s",
    ]);
    let ipam = lab.nodes[0].ipam_dir.clone();
    let live = Netns::new("pd");
    let live_ip = add(&lab, &live, "alive");
    let dead_ip = {
        let dead = Netns::new("pd");
        add(&lab, &dead, "crashed")
        // The runtime crashed: the netns goes without DEL.
    };
    // Gone, but younger than the grace: counted apart, not reclaimed.
    let j = wait_for("the dead pod's veth to go", Duration::from_secs(30), || {
        let j = status_json(&lab);
        (j["ipam"][0]["starting"] == 1).then_some(j)
    });
    assert_eq!(j["ipam"][0]["allocated"], 2, "{j:#}");
    assert_eq!(j["ipam"][0]["live"], 1, "{j:#}");
    assert_eq!(j["ipam"][0]["reclaimable"], 0, "{j:#}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        ipam.join("lab").join(&dead_ip).exists(),
        "reclaimed within the grace"
    );

    // Ten minutes later (its mtime set back): the daemon's next pass reclaims it, only it.
    let f = std::fs::File::open(ipam.join("lab").join(&dead_ip)).expect("allocation");
    f.set_modified(SystemTime::now() - Duration::from_secs(600))
        .expect("mtime");
    let f = std::fs::File::open(ipam.join("lab").join(&live_ip)).expect("allocation");
    f.set_modified(SystemTime::now() - Duration::from_secs(600))
        .expect("mtime");
    // (`live` is null in a report whose link dump failed: the status says "unknown" then.)
    let j = wait_for("the daemon to reclaim", Duration::from_secs(30), || {
        let j = status_json(&lab);
        (j["ipam"][0]["reclaimed_total"] == 1 && j["ipam"][0]["live"].is_number()).then_some(j)
    });
    assert_eq!(j["ipam"][0]["allocated"], 1, "{j:#}");
    assert_eq!(j["ipam"][0]["live"], 1, "{j:#}");
    assert_eq!(j["ipam"][0]["reclaimable"], 0, "{j:#}");
    assert!(!ipam.join("lab").join(&dead_ip).exists());
    assert!(
        ipam.join("lab").join(&live_ip).exists(),
        "a live pod's address went"
    );
    let (_, metrics) = lab.http_get(0, PORT, "/metrics").expect("metrics");
    assert!(
        metrics.contains("overlayd_pod_addresses_reclaimed{network=\"lab\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("overlayd_pod_addresses_live{network=\"lab\"} 1"),
        "{metrics}"
    );
    let log = lab.nodes[0]
        .daemon
        .as_ref()
        .map(|d| d.log_text())
        .unwrap_or_default();
    assert!(
        log.contains(&format!("reclaimed pod address {dead_ip}")) && log.contains("crashed"),
        "{log}"
    );
    // The operator's view: live pods and leftovers apart.
    let text = lab.nodes[0]
        .ns
        .cmd(bin("overlayd").to_str().expect("utf8"))
        .arg("status")
        .env("OVERLAYD_METRICS_ADDR", format!("0.0.0.0:{PORT}"))
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("1 of 253 allocated: 1 live pods, 0 reclaimable leftovers"),
        "{text}\n{:#}",
        status_json(&lab)["ipam"]
    );
    assert!(live.ping(&lab.subnet(0).nth(1).expect("gateway").to_string()));

    // With the daemon down, `overlayd status` reads the store and the node's links itself.
    lab.stop_daemon(0, "TERM");
    let out = lab.nodes[0]
        .ns
        .cmd(bin("overlayd").to_str().expect("utf8"))
        .arg("status")
        .arg("--subnet-file")
        .arg(&lab.nodes[0].subnet_file)
        .arg("--cni-data-dir")
        .arg(&ipam)
        .env("OVERLAYD_METRICS_ADDR", format!("0.0.0.0:{PORT}"))
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("1 of 253 allocated: 1 live pods, 0 reclaimable leftovers"),
        "{text}"
    );
}
