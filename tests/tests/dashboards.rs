//! The Grafana dashboard and the PrometheusRule in `manifests/` use only metrics overlayd serves:
//! every `overlayd_*` name in them must be a series in a lab node's /metrics (after a pod and a
//! repair, so the labelled families have children).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use overlay_testlab::lab::{Lab, DEFAULT_CONFIG};
use overlay_testlab::require_root;
use serde_json::Value;

const PORT: u16 = 9472;

fn manifest(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `overlayd_…` identifier in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("overlayd_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Series names in a Prometheus/OpenMetrics text exposition.
fn served(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_use_is_served() {
    if !require_root("every_metric_the_dashboard_and_the_alerts_use_is_served") {
        return;
    }
    let dashboard = manifest("grafana-dashboard.json");
    let rules = manifest("prometheus-rules.yaml");
    let dash: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    let exprs: Vec<&str> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    assert!(rules.contains("kind: PrometheusRule"));
    for alert in [
        "OverlaydNodeSubnetNearFull",
        "OverlaydPeerUnreachable",
        "OverlaydEtcdNotHeardFrom",
        "OverlaydLeaseNearExpiry",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
    }

    let mut lab = Lab::new(DEFAULT_CONFIG);
    lab.add_node(&[
        "--metrics-addr",
        &format!("127.0.0.1:{PORT}"),
        "--peer-probe-interval",
        "2s",
    ]);
    lab.add_node(&[]);
    let s1 = lab.subnet(1).to_string();
    lab.wait_route(0, &s1, true, Duration::from_secs(10));
    lab.add_pod(0);
    lab.nodes[0].ns.ip(&["route", "del", &s1]);
    let wanted: BTreeSet<String> = metric_names(&dashboard)
        .union(&metric_names(&rules))
        .cloned()
        .collect();
    assert!(wanted.len() >= 15, "{wanted:?}");
    // A repair and the first probe answers take a moment; then everything must be there.
    let mut missing: Vec<String> = wanted.iter().cloned().collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !missing.is_empty() && std::time::Instant::now() < deadline {
        if let Some((_, body)) = lab.http_get(0, PORT, "/metrics") {
            let have = served(&body);
            missing.retain(|m| !have.contains(m));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        missing.is_empty(),
        "used by manifests/ but not served by /metrics: {missing:?}"
    );
}
