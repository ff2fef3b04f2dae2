//! Many plugins at once on one node: 200 concurrent ADDs then 200 concurrent DELs, and `kill -9`
//! at random moments during ADD. Never a duplicate IP; what a killed ADD leaves is released by GC.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use overlay_testlab::{require_root, Netns};
use serde_json::json;

const PODS: usize = 200;

#[test]
fn two_hundred_concurrent_adds_then_dels() {
    if !require_root("two_hundred_concurrent_adds_then_dels") {
        return;
    }
    let node = Node::new("10.244.30.1/24");
    let pods: Vec<Netns> = (0..PODS).map(|_| Netns::new("pd")).collect();
    let conf = node.conf("1.0.0").to_string();
    let started = Instant::now();
    let running = start_all(&node, &pods, "ADD", &conf);
    let mut ips = BTreeMap::new();
    for (i, r) in running.into_iter().enumerate() {
        let out = r.wait(Duration::from_secs(60)).expect_ok();
        let ip = result_ip(&out.json());
        if let Some(other) = ips.insert(ip.clone(), i) {
            panic!("{ip} handed to pods {other} and {i}");
        }
    }
    eprintln!("{PODS} concurrent ADDs took {:?}", started.elapsed());
    assert_eq!(ips.len(), PODS);
    assert_eq!(node.store_ips().len(), PODS);
    // Each pod has exactly the IP the store gave it.
    for (ip, i) in &ips {
        assert_eq!(&addrs_of(&pods[*i], "eth0"), &vec![ip.clone()]);
        assert_eq!(
            node.store_owner(ip),
            Some((format!("conc{i}"), "eth0".into()))
        );
    }
    assert_eq!(node.links().len(), PODS + 1);
    assert!(pods[0].ping(&result_ip_of(&ips, PODS - 1)));

    let started = Instant::now();
    let running = start_all(&node, &pods, "DEL", &conf);
    for r in running {
        r.wait(Duration::from_secs(60)).expect_ok();
    }
    eprintln!("{PODS} concurrent DELs took {:?}", started.elapsed());
    assert!(node.store_ips().is_empty(), "{:?}", node.store_ips());
    assert_eq!(node.store_index_entries(), 0);
    // DEL leaves each pair down; the runtime then removes the netns, which takes the pair along.
    assert!(node.links().len() <= PODS + 1);
    drop(pods);
    node.wait_links(&["cni0"]);
}

/// Starts `command` for every pod at once (pod i is container `conc<i>`).
fn start_all(node: &Node, pods: &[Netns], command: &str, conf: &str) -> Vec<Running> {
    pods.iter()
        .enumerate()
        .map(|(i, pod)| {
            let id = format!("conc{i}");
            let netns = pod.path().display().to_string();
            node.start(
                &[
                    ("CNI_COMMAND", command),
                    ("CNI_CONTAINERID", &id),
                    ("CNI_IFNAME", "eth0"),
                    ("CNI_NETNS", &netns),
                ],
                conf.as_bytes(),
            )
        })
        .collect()
}

fn result_ip_of(ips: &BTreeMap<String, usize>, pod: usize) -> String {
    ips.iter()
        .find(|(_, i)| **i == pod)
        .map(|(ip, _)| ip.clone())
        .expect("pod's ip")
}

#[test]
fn kill_9_during_add_never_duplicates_and_gc_cleans_up() {
    if !require_root("kill_9_during_add_never_duplicates_and_gc_cleans_up") {
        return;
    }
    const ROUNDS: usize = 200;
    // A /24 has room for 253; killed ADDs leak until GC, so GC runs midway too.
    let node = Node::new("10.244.31.1/24");
    let mut rng = Rng::from_env_or_time("OVERLAY_KILL_SEED");
    // Attachments (pod index, ifname) whose ADD finished successfully: the runtime's valid list.
    let pods: Vec<Netns> = (0..20).map(|_| Netns::new("pd")).collect();
    let mut valid: BTreeSet<(usize, String)> = BTreeSet::new();
    let conf = node.conf("1.0.0");
    // How long an ADD takes here, so kills land anywhere inside one.
    let probe = Instant::now();
    node.cmd("ADD", "probe", Some(&pods[0]), "probe0", &conf)
        .expect_ok();
    let add_time = probe.elapsed().as_micros() as u64;
    valid.insert((0, "probe0".into()));
    let started = Instant::now();
    let (mut killed, mut finished) = (0, 0);
    for round in 0..ROUNDS {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "kill loop too slow"
        );
        let p = round % pods.len();
        let ifname = format!("k{round}");
        let id = format!("pod{p}");
        let netns = pods[p].path().display().to_string();
        let mut running = node.start(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", &id),
                ("CNI_IFNAME", &ifname),
                ("CNI_NETNS", &netns),
            ],
            conf.to_string().as_bytes(),
        );
        std::thread::sleep(Duration::from_micros(rng.below(add_time + add_time / 4)));
        // `ip netns exec` execs the plugin in place, so this pid is the plugin's.
        let _ = running.child.kill();
        let out = running.wait(Duration::from_secs(30));
        if out.ok() {
            finished += 1;
            valid.insert((p, ifname));
        } else {
            killed += 1;
        }
        // An address stays on its interface until GC removes the interface, so checking every
        // few rounds and right before GC sees every address ever handed out.
        if round % 10 == 9 || round == ROUNDS / 2 {
            assert_no_duplicates(&node, &pods);
        }
        if round == ROUNDS / 2 {
            gc(&node, &valid);
        }
    }
    eprintln!("{killed} ADDs killed, {finished} finished (ADD takes ~{add_time} µs)");
    assert!(killed > ROUNDS / 10, "too few kills landed: {killed}");

    gc(&node, &valid);
    assert_no_duplicates(&node, &pods);
    // After GC the store holds exactly the finished attachments...
    let stored: BTreeSet<(String, String)> = node
        .store_ips()
        .iter()
        .filter_map(|ip| node.store_owner(ip))
        .collect();
    let want: BTreeSet<(String, String)> = valid
        .iter()
        .map(|(p, i)| {
            (
                if i == "probe0" {
                    "probe".into()
                } else {
                    format!("pod{p}")
                },
                i.clone(),
            )
        })
        .collect();
    assert_eq!(stored, want);
    assert_eq!(node.store_index_entries(), want.len());
    // ...and the node only their host veths.
    assert_eq!(node.links().len(), valid.len() + 1, "{:?}", node.links());

    // What a runtime does after a failed ADD, without GC in between: retry the same attachment,
    // and if its interface is already there, DEL then ADD. Whatever the killed ADD left (IP file,
    // host veth, half-configured pod interface) must not get in the way or be duplicated.
    for round in 0..40 {
        let p = round % pods.len();
        let id = format!("pod{p}");
        let ifname = format!("r{round}");
        let netns = pods[p].path().display().to_string();
        let mut running = node.start(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", &id),
                ("CNI_IFNAME", &ifname),
                ("CNI_NETNS", &netns),
            ],
            conf.to_string().as_bytes(),
        );
        std::thread::sleep(Duration::from_micros(rng.below(add_time)));
        let _ = running.child.kill();
        running.wait(Duration::from_secs(30));
        let retry = node.cmd("ADD", &id, Some(&pods[p]), &ifname, &conf);
        if !retry.ok() {
            assert_eq!(retry.error_code(), 101, "{}", retry.stdout);
            node.cmd("DEL", &id, Some(&pods[p]), &ifname, &conf)
                .expect_ok();
            node.cmd("ADD", &id, Some(&pods[p]), &ifname, &conf)
                .expect_ok();
        }
        valid.insert((p, ifname.clone()));
        assert_eq!(addrs_of(&pods[p], &ifname).len(), 1);
    }
    assert_no_duplicates(&node, &pods);
    // One IP per attachment, nothing left over.
    assert_eq!(node.store_ips().len(), valid.len());
    assert_eq!(node.links().len(), valid.len() + 1, "{:?}", node.links());
}

fn gc(node: &Node, valid: &BTreeSet<(usize, String)>) {
    let mut conf = node.conf("1.1.0");
    conf["cni.dev/valid-attachments"] = valid
        .iter()
        .map(|(p, i)| {
            let id = if i == "probe0" {
                "probe".to_string()
            } else {
                format!("pod{p}")
            };
            json!({"containerID": id, "ifname": i})
        })
        .collect();
    node.run(&[("CNI_COMMAND", "GC")], &conf).expect_ok();
}

/// No IPv4 address is on two pod interfaces, and every one is in the store.
fn assert_no_duplicates(node: &Node, pods: &[Netns]) {
    let stored: BTreeSet<String> = node.store_ips().into_iter().collect();
    let mut seen = BTreeMap::new();
    for (p, pod) in pods.iter().enumerate() {
        for line in pod.ip_out(&["-4", "-o", "addr", "show"]).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[1] == "lo" {
                continue;
            }
            let ip = f[3].split('/').next().unwrap_or("").to_string();
            if let Some(other) = seen.insert(ip.clone(), (p, f[1].to_string())) {
                panic!("{ip} on pod {p} {} and on {other:?}", f[1]);
            }
            assert!(
                stored.contains(&ip),
                "{ip} on pod {p} {} is not in the store",
                f[1]
            );
        }
    }
}
