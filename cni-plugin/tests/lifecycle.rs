//! The plugin's commands against real namespaces: results per CNI version, ADD→CHECK→DEL,
//! idempotent DEL, DEL without the sandbox, repeated ADD, the datapath, STATUS, GC, chaining.

mod common;

use common::*;
use overlay_testlab::{require_root, Netns};
use serde_json::{json, Value};

#[test]
fn results_are_shaped_for_each_version() {
    if !require_root("results_are_shaped_for_each_version") {
        return;
    }
    let node = Node::new("10.244.7.1/24");
    for (i, v) in VERSIONS.iter().enumerate() {
        let pod = Netns::new("pd");
        let id = format!("ver{i}");
        let r = node
            .cmd("ADD", &id, Some(&pod), "eth0", &node.conf(v))
            .expect_ok()
            .json();
        assert_eq!(r["cniVersion"], *v, "{r}");
        let ifaces = r["interfaces"].as_array().expect("interfaces");
        let pod_if = ifaces
            .iter()
            .position(|i| i["name"] == "eth0")
            .expect("eth0");
        assert_eq!(ifaces[pod_if]["sandbox"], pod.path().display().to_string());
        assert!(
            ifaces[pod_if]["mac"]
                .as_str()
                .is_some_and(|m| m.len() == 17),
            "{r}"
        );
        assert!(ifaces.iter().any(|i| i["name"] == "cni0"), "{r}");
        let ip = &r["ips"][0];
        assert_eq!(ip["interface"], pod_if, "{r}");
        assert_eq!(ip["gateway"], "10.244.7.1", "{r}");
        assert!(
            ip["address"].as_str().is_some_and(|a| a.ends_with("/24")),
            "{r}"
        );
        if v.starts_with("0.") {
            assert_eq!(ip["version"], "4", "{r}");
        } else {
            assert!(ip.get("version").is_none(), "{r}");
        }
        if *v == "1.1.0" {
            assert_eq!(ifaces[pod_if]["mtu"], 1450, "{r}");
        } else {
            assert!(ifaces[pod_if].get("mtu").is_none(), "{r}");
        }
        assert_eq!(
            r["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "10.244.7.1"}])
        );
        // The kernel has what the result says; the pod's MAC derives from its IP.
        assert_eq!(addrs_of(&pod, "eth0"), vec![result_ip(&r)]);
        let ip: std::net::Ipv4Addr = result_ip(&r).parse().expect("ip");
        let o = ip.octets();
        let mac = format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
        assert_eq!(ifaces[pod_if]["mac"], mac, "{r}");
        assert!(pod.ip_out(&["link", "show", "eth0"]).contains(&mac));
        assert!(pod.ip_out(&["link", "show", "eth0"]).contains("mtu 1450"));
        node.cmd("DEL", &id, Some(&pod), "eth0", &node.conf(v))
            .expect_ok();
    }
    assert!(node.store_ips().is_empty());
    node.wait_links(&["cni0"]);
}

#[test]
fn add_check_del_and_del_is_idempotent() {
    if !require_root("add_check_del_and_del_is_idempotent") {
        return;
    }
    let node = Node::new("10.244.8.1/24");
    let pod = Netns::new("pd");
    let result = node.add("acd", &pod);
    let ip = result_ip(&result);
    assert_eq!(node.store_ips(), vec![ip.clone()]);
    // ADD's helper makes up to four empty spare files for the next ADDs to rename; ADD reaps it
    // when it is done, so on a loaded machine it may have made fewer (the next ADD makes the
    // rest). Never more than four, never left running.
    let spares = node.store_spares();
    assert!(spares <= 4, "{spares} spare files");
    assert_eq!(node.store_owner(&ip), Some(("acd".into(), "eth0".into())));
    let host_veth = node
        .links()
        .into_iter()
        .find(|l| l.starts_with("veth"))
        .expect("host veth");
    let details = node.ns.ip_out(&["-d", "link", "show", &host_veth]);
    assert!(details.contains("hairpin on"), "{details}");
    // One queue each way, on both ends, whatever the number of CPUs.
    assert!(details.contains("numtxqueues 1 numrxqueues 1"), "{details}");
    let pod_details = pod.ip_out(&["-d", "link", "show", "eth0"]);
    assert!(
        pod_details.contains("numtxqueues 1 numrxqueues 1"),
        "{pod_details}"
    );
    assert!(node
        .ns
        .ip_out(&["link", "show", &host_veth])
        .contains("master cni0"));

    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        let mut conf = node.conf(v);
        conf["prevResult"] = result.clone();
        node.cmd("CHECK", "acd", Some(&pod), "eth0", &conf)
            .expect_ok();
    }
    // CHECK notices what changed behind the plugin's back.
    let mut conf = node.conf("1.0.0");
    conf["prevResult"] = result.clone();
    pod.ip(&["route", "del", "default"]);
    assert_eq!(
        node.cmd("CHECK", "acd", Some(&pod), "eth0", &conf)
            .error_code(),
        102
    );
    pod.ip(&["addr", "del", &format!("{ip}/24"), "dev", "eth0"]);
    assert_eq!(
        node.cmd("CHECK", "acd", Some(&pod), "eth0", &conf)
            .error_code(),
        102
    );

    node.del("acd", Some(&pod)).expect_ok();
    assert!(node.store_ips().is_empty());
    // Out of service the moment DEL answers: the host end is down and carries nothing. The pair
    // itself goes with the pod's netns (DEL leaves no process behind to delete it).
    let left = node.ns.ip_out(&["-o", "link", "show", &host_veth]);
    assert!(!left.contains(",UP") && !left.contains("<UP"), "{left}");
    // Again, with the pair still there.
    node.del("acd", Some(&pod)).expect_ok();
    // The runtime removes the netns: the kernel takes the pair along.
    drop(pod);
    node.wait_links(&["cni0"]);
    // And again without a netns.
    node.del("acd", None).expect_ok();
    // DEL for an attachment never added, before any store exists for another network.
    let mut other = node.conf("1.0.0");
    other["name"] = json!("never-used");
    node.cmd("DEL", "nope", None, "eth0", &other).expect_ok();
}

#[test]
fn del_after_the_netns_is_gone() {
    if !require_root("del_after_the_netns_is_gone") {
        return;
    }
    let node = Node::new("10.244.9.1/24");
    let pod = Netns::new("pd");
    node.add("gone", &pod);
    let path = pod.path();
    drop(pod);
    let env = [
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "gone"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", path.to_str().expect("utf8")),
    ];
    node.run(&env, &node.conf("1.0.0")).expect_ok();
    assert!(node.store_ips().is_empty());
    node.wait_links(&["cni0"]);
}

#[test]
fn repeated_add_for_the_same_attachment_gets_the_same_ip() {
    if !require_root("repeated_add_for_the_same_attachment_gets_the_same_ip") {
        return;
    }
    let node = Node::new("10.244.10.1/24");
    let pod = Netns::new("pd");
    let other = Netns::new("pd");
    let first = result_ip(&node.add("same", &pod));
    node.add("other", &other);
    // The interface is there and is this attachment's veth (the runtime repeats an ADD): the
    // pair is made again and the pod keeps its IP, once.
    let again = result_ip(&node.add("same", &pod));
    assert_eq!(again, first);
    assert_eq!(node.store_ips().len(), 2);
    assert_eq!(addrs_of(&pod, "eth0"), vec![first.clone()]);
    assert_eq!(node.links().len(), 3, "{:?}", node.links());
    assert!(pod.ping("10.244.10.1"));
    // The runtime retries after the interface went away (say an ADD was killed midway).
    pod.ip(&["link", "del", "eth0"]);
    let second = result_ip(&node.add("same", &pod));
    assert_eq!(first, second);
    assert_eq!(node.store_ips().len(), 2);
}

/// Issue 11, defect 3: an ADD of an attachment right after its DEL finds the pod's interface
/// still there (DEL leaves the pair, host end down, for the netns removal). That interface is the
/// peer of the host veth the attachment's name derives to: ADD takes it over instead of failing
/// with 101.
#[test]
fn add_takes_over_the_veth_pair_a_del_left_behind() {
    if !require_root("add_takes_over_the_veth_pair_a_del_left_behind") {
        return;
    }
    let node = Node::new("10.244.17.1/24");
    let pod = Netns::new("pd");
    let result = node.add("redo", &pod);
    let host_veth = result["interfaces"][1]["name"]
        .as_str()
        .expect("host veth name")
        .to_string();
    node.del("redo", Some(&pod)).expect_ok();
    assert!(
        links_of(&pod).contains("eth0"),
        "DEL left no pair: nothing tested"
    );
    let left = node.ns.ip_out(&["-o", "link", "show", &host_veth]);
    assert!(!left.contains(",UP") && !left.contains("<UP"), "{left}");
    let ip = result_ip(&node.add("redo", &pod));
    assert_eq!(addrs_of(&pod, "eth0"), vec![ip.clone()]);
    assert_eq!(node.store_ips(), vec![ip]);
    assert_eq!(node.links().len(), 2, "{:?}", node.links());
    assert!(pod.ping("10.244.17.1"), "the new pair does not work");
}

/// An interface called CNI_IFNAME that is not this attachment's veth peer is someone else's: 101,
/// and neither it nor the store is touched. Also when a host veth of the derived name exists but
/// pairs with something else.
#[test]
fn add_refuses_an_interface_that_is_not_its_veths_peer() {
    if !require_root("add_refuses_an_interface_that_is_not_its_veths_peer") {
        return;
    }
    let node = Node::new("10.244.18.1/24");
    let pod = Netns::new("pd");
    // Learn the derived host veth name from a first attachment, then clear it away.
    let result = node.add("theirs", &pod);
    let host_veth = result["interfaces"][1]["name"]
        .as_str()
        .expect("host veth name")
        .to_string();
    node.del("theirs", Some(&pod)).expect_ok();
    // GC removes the pair DEL left down (no attachment is valid any more).
    let mut gc = node.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([]);
    node.run(&[("CNI_COMMAND", "GC")], &gc).expect_ok();
    node.wait_links(&["cni0"]);
    assert!(!links_of(&pod).contains("eth0"));

    // A veth pair of the pod's own (no dummy module here).
    pod.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ]);
    let out = node.cmd("ADD", "theirs", Some(&pod), "eth0", &node.conf("1.0.0"));
    assert_eq!(out.error_code(), 101);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap_or("")
            .contains("already exists"),
        "{}",
        out.stdout
    );
    // A host veth of the derived name whose peer is on the node, not the pod's eth0.
    node.ns.ip(&[
        "link", "add", &host_veth, "type", "veth", "peer", "name", "other0",
    ]);
    let out = node.cmd("ADD", "theirs", Some(&pod), "eth0", &node.conf("1.0.0"));
    assert_eq!(out.error_code(), 101);
    assert!(node.store_ips().is_empty(), "{:?}", node.store_ips());
    assert!(
        links_of(&pod).contains("eth0"),
        "the pod's dummy was touched"
    );
    assert!(
        node.links().contains(&host_veth),
        "the host veth was touched"
    );
}

#[test]
fn pods_reach_the_gateway_and_each_other() {
    if !require_root("pods_reach_the_gateway_and_each_other") {
        return;
    }
    let node = Node::new("10.244.11.1/24");
    let a = Netns::new("pd");
    let b = Netns::new("pd");
    let ip_a = result_ip(&node.add("pinga", &a));
    let ip_b = result_ip(&node.add("pingb", &b));
    assert!(a.ping("10.244.11.1"), "pod a cannot reach the gateway");
    assert!(a.ping(&ip_b), "pod a cannot reach pod b");
    assert!(b.ping(&ip_a), "pod b cannot reach pod a");
    // The default route goes via the gateway.
    assert!(a
        .ip_out(&["route", "show", "default"])
        .contains("via 10.244.11.1 dev eth0"));
}

#[test]
fn status_version_and_missing_subnet_file() {
    if !require_root("status_version_and_missing_subnet_file") {
        return;
    }
    let node = Node::without_lease();
    let status = [("CNI_COMMAND", "STATUS")];
    let out = node.run(&status, &node.conf("1.1.0"));
    assert_eq!(out.error_code(), 50);
    let pod = Netns::new("pd");
    let out = node.cmd("ADD", "early", Some(&pod), "eth0", &node.conf("1.0.0"));
    assert_eq!(out.error_code(), 11);
    let msg = out.json()["msg"].as_str().unwrap_or("").to_string();
    assert!(msg.contains("has not leased a subnet"), "{msg}");
    assert!(
        msg.contains("kubectl -n kube-system logs ds/overlayd"),
        "{msg}"
    );
    assert!(node.store_ips().is_empty() && node.links().is_empty());

    node.write_subnet_file("10.244.12.1/24");
    node.run(&status, &node.conf("1.1.0")).expect_ok();

    let out = node
        .run(
            &[("CNI_COMMAND", "VERSION")],
            &json!({"cniVersion": "0.4.0"}),
        )
        .expect_ok()
        .json();
    assert_eq!(out["cniVersion"], "0.4.0");
    assert_eq!(out["supportedVersions"], json!(VERSIONS));
}

#[test]
fn gc_releases_what_is_not_valid() {
    if !require_root("gc_releases_what_is_not_valid") {
        return;
    }
    let node = Node::new("10.244.13.1/24");
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("pd")).collect();
    let ips: Vec<String> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| result_ip(&node.add(&format!("gc{i}"), p)))
        .collect();
    assert_eq!(node.links().len(), 4);
    let mut conf = node.conf("1.1.0");
    conf["cni.dev/valid-attachments"] = json!([{"containerID": "gc1", "ifname": "eth0"}]);
    node.run(&[("CNI_COMMAND", "GC")], &conf).expect_ok();
    assert_eq!(node.store_ips(), vec![ips[1].clone()]);
    assert_eq!(node.links().len(), 2, "{:?}", node.links());
    assert!(pods[1].ping("10.244.13.1"));
    // Without the list GC refuses rather than release everything.
    let out = node.run(&[("CNI_COMMAND", "GC")], &node.conf("1.1.0"));
    assert_eq!(out.error_code(), 7);
    assert_eq!(node.store_ips().len(), 1);
}

#[test]
fn chained_add_appends_to_prev_result() {
    if !require_root("chained_add_appends_to_prev_result") {
        return;
    }
    let node = Node::new("10.244.14.1/24");
    let pod = Netns::new("pd");
    let mut conf = node.conf("1.0.0");
    conf["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "lo", "sandbox": pod.path()}],
        "ips": [{"address": "127.0.0.1/8", "interface": 0}],
        "dns": {"nameservers": ["10.96.0.10"]}
    });
    let r: Value = node
        .cmd("ADD", "chain", Some(&pod), "eth0", &conf)
        .expect_ok()
        .json();
    assert_eq!(r["interfaces"][0]["name"], "lo");
    assert_eq!(r["interfaces"].as_array().map(Vec::len), Some(4));
    assert_eq!(r["ips"][1]["interface"], 3);
    assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");
}

#[test]
fn config_options_mtu_hairpin_and_gateway() {
    if !require_root("config_options_mtu_hairpin_and_gateway") {
        return;
    }
    let node = Node::new("10.244.15.1/24");
    let pod = Netns::new("pd");
    let mut conf = node.conf("1.1.0");
    conf["mtu"] = json!(1400);
    conf["hairpinMode"] = json!(false);
    conf["isDefaultGateway"] = json!(false);
    conf["bridge"] = json!("podbr0");
    let r = node
        .cmd("ADD", "opts", Some(&pod), "net1", &conf)
        .expect_ok()
        .json();
    // Only the cluster network goes via the gateway; the default route is someone else's.
    assert_eq!(
        r["routes"],
        json!([{"dst": "10.244.0.0/16", "gw": "10.244.15.1"}])
    );
    assert!(pod.ip_out(&["route", "show", "default"]).trim().is_empty());
    assert!(pod
        .ip_out(&["route", "show", "10.244.0.0/16"])
        .contains("via 10.244.15.1 dev net1"));
    assert!(pod.ip_out(&["link", "show", "net1"]).contains("mtu 1400"));
    assert!(node.links().contains("podbr0"));
    let host = node
        .links()
        .into_iter()
        .find(|l| l.starts_with("veth"))
        .expect("host veth");
    let details = node.ns.ip_out(&["-d", "link", "show", &host]);
    assert!(
        details.contains("mtu 1400") && details.contains("master podbr0"),
        "{details}"
    );
    assert!(details.contains("hairpin off"), "{details}");
    assert!(pod.ping("10.244.15.1"));
    conf["prevResult"] = r;
    node.cmd("CHECK", "opts", Some(&pod), "net1", &conf)
        .expect_ok();
    node.cmd("DEL", "opts", Some(&pod), "net1", &conf)
        .expect_ok();
    drop(pod);
    node.wait_links(&["podbr0"]);
}

/// DEL leaves the veth pair down; an ADD of the same attachment right after (a runtime retrying a
/// sandbox) must end with a working pod.
#[test]
fn add_right_after_del_of_the_same_attachment_keeps_its_veth() {
    if !require_root("add_right_after_del_of_the_same_attachment_keeps_its_veth") {
        return;
    }
    let node = Node::new("10.244.16.1/24");
    for round in 0..10 {
        let pod = Netns::new("pd");
        node.add("again", &pod);
        node.del("again", Some(&pod)).expect_ok();
        let ip = result_ip(&node.add("again", &pod));
        assert_eq!(node.links().len(), 2, "round {round}: {:?}", node.links());
        assert_eq!(addrs_of(&pod, "eth0"), vec![ip], "round {round}");
        assert!(
            pod.ping("10.244.16.1"),
            "round {round}: pod cannot reach the gateway"
        );
        node.del("again", Some(&pod)).expect_ok();
    }
    assert!(node.store_ips().is_empty());
    node.wait_links(&["cni0"]);
}
