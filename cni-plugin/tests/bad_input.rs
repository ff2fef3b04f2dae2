//! Every kind of bad input: a non-zero exit, a CNI error with the right code on stdout, and
//! nothing changed on the node (no IP file, no link, nothing in the pod).

mod common;

use common::*;
use overlay_testlab::{require_root, Netns};
use serde_json::json;

fn assert_untouched(node: &Node, pod: &Netns) {
    assert!(
        node.store_ips().is_empty(),
        "IP files: {:?}",
        node.store_ips()
    );
    assert!(node.links().is_empty(), "node links: {:?}", node.links());
    assert!(links_of(pod).is_empty(), "pod links: {:?}", links_of(pod));
}

#[test]
fn bad_inputs_get_the_right_code_and_change_nothing() {
    if !require_root("bad_inputs_get_the_right_code_and_change_nothing") {
        return;
    }
    let node = Node::new("10.244.20.1/24");
    let pod = Netns::new("pd");
    let netns = pod.path().display().to_string();
    let good = node.conf("1.0.0");
    let env = |id: &'static str, ifname: &'static str| {
        vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", id),
            ("CNI_IFNAME", ifname),
            ("CNI_NETNS", netns.as_str()),
        ]
    };
    let with = |key: &str, value: serde_json::Value| {
        let mut c = good.clone();
        c[key] = value;
        c.to_string()
    };
    // (what, environment, stdin, expected code)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, String, u64);
    let cases: Vec<Case> = vec![
        ("stdin not JSON", env("c1", "eth0"), "{not json".into(), 6),
        ("stdin empty", env("c1", "eth0"), String::new(), 6),
        (
            "unsupported cniVersion",
            env("c1", "eth0"),
            with("cniVersion", json!("0.2.0")),
            1,
        ),
        (
            "future cniVersion",
            env("c1", "eth0"),
            with("cniVersion", json!("2.0.0")),
            1,
        ),
        (
            "cniVersion not a string",
            env("c1", "eth0"),
            with("cniVersion", json!(1)),
            7,
        ),
        (
            "name missing",
            env("c1", "eth0"),
            with("name", json!(null)),
            7,
        ),
        (
            "name with a slash",
            env("c1", "eth0"),
            with("name", json!("../etc")),
            7,
        ),
        (
            "mtu a string",
            env("c1", "eth0"),
            with("mtu", json!("1450")),
            7,
        ),
        (
            "mtu too small",
            env("c1", "eth0"),
            with("mtu", json!(10)),
            7,
        ),
        (
            "hairpinMode a string",
            env("c1", "eth0"),
            with("hairpinMode", json!("on")),
            7,
        ),
        (
            "isDefaultGateway a number",
            env("c1", "eth0"),
            with("isDefaultGateway", json!(1)),
            7,
        ),
        (
            "dataDir relative",
            env("c1", "eth0"),
            with("dataDir", json!("ipam")),
            7,
        ),
        (
            "subnetFile a number",
            env("c1", "eth0"),
            with("subnetFile", json!(3)),
            7,
        ),
        (
            "bridge name too long",
            env("c1", "eth0"),
            with("bridge", json!("a-very-long-bridge")),
            7,
        ),
        (
            "prevResult not a result",
            env("c1", "eth0"),
            with("prevResult", json!(5)),
            7,
        ),
        (
            "container id with a slash",
            env("../c1", "eth0"),
            good.to_string(),
            4,
        ),
        (
            "container id with a space",
            env("c 1", "eth0"),
            good.to_string(),
            4,
        ),
        (
            "container id starting with a dot",
            env(".c1", "eth0"),
            good.to_string(),
            4,
        ),
        (
            "ifname too long",
            env("c1", "eth0123456789abc"),
            good.to_string(),
            4,
        ),
        ("ifname with a slash", env("c1", "e/0"), good.to_string(), 4),
        ("ifname dot", env("c1", "."), good.to_string(), 4),
        ("ifname dotdot", env("c1", ".."), good.to_string(), 4),
        ("ifname empty", env("c1", ""), good.to_string(), 4),
        (
            "no CNI_COMMAND",
            vec![
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", netns.as_str()),
            ],
            good.to_string(),
            4,
        ),
        (
            "unknown CNI_COMMAND",
            vec![
                ("CNI_COMMAND", "FROB"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", netns.as_str()),
            ],
            good.to_string(),
            4,
        ),
        (
            "no CNI_CONTAINERID",
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", netns.as_str()),
            ],
            good.to_string(),
            4,
        ),
        (
            "no CNI_IFNAME",
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", netns.as_str()),
            ],
            good.to_string(),
            4,
        ),
        (
            "no CNI_NETNS",
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
            ],
            good.to_string(),
            4,
        ),
        (
            "netns does not exist",
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/var/run/netns/ov-no-such-ns"),
            ],
            good.to_string(),
            3,
        ),
        (
            "netns not a netns",
            vec![
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/etc/hostname"),
            ],
            good.to_string(),
            4,
        ),
    ];
    let mut failures = Vec::new();
    for (what, env, stdin, want) in &cases {
        let out = node
            .start(env, stdin.as_bytes())
            .wait(std::time::Duration::from_secs(30));
        let got = if out.ok() {
            None
        } else {
            serde_json::from_str::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| {
                    let msg_ok = v["msg"].as_str().is_some_and(|m| !m.is_empty());
                    msg_ok.then(|| v["code"].as_u64()).flatten()
                })
        };
        if got != Some(*want) {
            failures.push(format!(
                "{what}: want code {want}, got exit {} stdout {:?}",
                out.status, out.stdout
            ));
        }
        assert_untouched(&node, &pod);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The same inputs are fine once corrected.
    node.add("c1", &pod);
}

#[test]
fn errors_carry_the_requested_version() {
    if !require_root("errors_carry_the_requested_version") {
        return;
    }
    let node = Node::new("10.244.21.1/24");
    let out = node.cmd("ADD", "../x", None, "eth0", &node.conf("0.3.1"));
    assert_eq!(out.error_code(), 4);
    assert_eq!(out.json()["cniVersion"], "0.3.1");
}

#[test]
fn check_needs_prev_result_and_a_version_that_has_check() {
    if !require_root("check_needs_prev_result_and_a_version_that_has_check") {
        return;
    }
    let node = Node::new("10.244.22.1/24");
    let pod = Netns::new("pd");
    let r = node.add("chk", &pod);
    let out = node.cmd("CHECK", "chk", Some(&pod), "eth0", &node.conf("1.0.0"));
    assert_eq!(out.error_code(), 7);
    let mut conf = node.conf("0.3.1");
    conf["prevResult"] = r;
    let out = node.cmd("CHECK", "chk", Some(&pod), "eth0", &conf);
    assert_eq!(out.error_code(), 1);
}

#[test]
fn exhausted_subnet_says_so_and_leaks_nothing() {
    if !require_root("exhausted_subnet_says_so_and_leaks_nothing") {
        return;
    }
    // A /28: 16 addresses minus .0 (VTEP), .1 (gateway) and .15 (broadcast).
    let node = Node::new("10.244.23.1/28");
    let pods: Vec<Netns> = (0..14).map(|_| Netns::new("pd")).collect();
    let mut ips = std::collections::BTreeSet::new();
    for (i, pod) in pods.iter().take(13).enumerate() {
        let ip = result_ip(&node.add(&format!("full{i}"), pod));
        assert!(!["10.244.23.0", "10.244.23.1", "10.244.23.15"].contains(&ip.as_str()));
        assert!(ips.insert(ip));
    }
    let links_before = node.links();
    let out = node.cmd(
        "ADD",
        "full13",
        Some(&pods[13]),
        "eth0",
        &node.conf("1.0.0"),
    );
    assert_eq!(out.error_code(), 100);
    let msg = out.json()["msg"].as_str().unwrap_or("").to_string();
    assert!(
        msg.contains("10.244.23.0/28") && msg.contains("13 of 13"),
        "{msg}"
    );
    assert_eq!(node.store_ips().len(), 13);
    assert_eq!(node.links(), links_before);
    assert!(links_of(&pods[13]).is_empty());
    // One pod goes, the waiting one gets its address.
    node.del("full0", Some(&pods[0])).expect_ok();
    node.add("full13", &pods[13]);
}
