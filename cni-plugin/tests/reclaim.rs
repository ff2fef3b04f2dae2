//! Issue 14: pod addresses never leak. Sandboxes that die without DEL (their netns removed, as a
//! crashed runtime leaves them) are reclaimed when the subnet is full, never a live pod's; a
//! reboot drops every old allocation; many ADDs at once on a nearly full subnet and kill -9
//! during a reclaim never duplicate an address or lose a live one.
//!
//! An allocation must be older than the reclaim grace (60 s) to be reclaimed: the tests age the
//! IP files of the pods they kill by setting their mtime back, instead of waiting.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use overlay_testlab::{require_root, Netns};

/// Sets the allocation file of `ip` back by ten minutes.
fn age(node: &Node, ip: &str) {
    let path = node.data_dir.join(NETWORK).join(ip);
    let f = std::fs::File::open(&path).expect("allocation file");
    f.set_modified(SystemTime::now() - Duration::from_secs(600))
        .expect("set mtime");
}

/// Starts ADD for container `id` in `pod`, with `extra` environment.
fn start_add(node: &Node, id: &str, pod: &Netns, extra: &[(&str, &str)]) -> Running {
    let netns = pod.path().display().to_string();
    let mut env = vec![
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", id),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns.as_str()),
    ];
    env.extend_from_slice(extra);
    node.start(&env, node.conf("1.0.0").to_string().as_bytes())
}

/// Pods by container id, with the IP their ADD answered.
struct Pods(BTreeMap<String, (Netns, String)>);

impl Pods {
    fn fill(node: &Node, prefix: &str, n: usize) -> Pods {
        let mut pods = BTreeMap::new();
        for i in 0..n {
            let id = format!("{prefix}{i}");
            let pod = Netns::new("pd");
            let ip = result_ip(&node.add(&id, &pod));
            pods.insert(id, (pod, ip));
        }
        Pods(pods)
    }

    /// Removes the netns of `ids` without DEL, as a crashed runtime leaves them, and waits for
    /// the kernel to take their pairs. Returns their IPs.
    fn kill(&mut self, node: &Node, ids: &[String]) -> Vec<String> {
        let ips: Vec<String> = ids
            .iter()
            .map(|id| self.0.remove(id).expect("pod").1)
            .collect();
        let want = self.0.len() + 1;
        overlay_testlab::wait_for(
            "the dead pods' host veths to go",
            Duration::from_secs(30),
            || (node.links().len() == want).then_some(()),
        );
        ips
    }

    fn ips(&self) -> BTreeSet<String> {
        self.0.values().map(|(_, ip)| ip.clone()).collect()
    }
}

fn reclaim_log(node: &Node) -> String {
    std::fs::read_to_string(node.data_dir.join(NETWORK).join("reclaim.log")).unwrap_or_default()
}

#[test]
fn a_full_subnet_reclaims_only_dead_sandboxes() {
    if !require_root("a_full_subnet_reclaims_only_dead_sandboxes") {
        return;
    }
    let node = Node::new("10.244.50.1/27"); // 29 pod addresses
    let mut pods = Pods::fill(&node, "full", 29);
    let out = node.cmd(
        "ADD",
        "late",
        Some(&Netns::new("pd")),
        "eth0",
        &node.conf("1.0.0"),
    );
    assert_eq!(out.error_code(), 100, "the subnet is full: {}", out.stdout);
    // Ten die without DEL; their allocations get old. One more dies just now: too young.
    let dead: Vec<String> = (0..10).map(|i| format!("full{}", i * 2)).collect();
    let dead_ips = pods.kill(&node, &dead);
    for ip in &dead_ips {
        age(&node, ip);
    }
    let young_ip = pods.kill(&node, &["full1".to_string()])[0].clone();
    // The live ones are old too: age alone never makes an allocation reclaimable.
    for ip in pods.ips() {
        age(&node, &ip);
    }
    let live = pods.ips();

    let new_pod = Netns::new("pd");
    let ip = result_ip(&node.add("new0", &new_pod));
    assert!(dead_ips.contains(&ip), "{ip} is not a dead pod's address");
    let log = reclaim_log(&node);
    assert_eq!(log.lines().count(), 10, "{log}");
    for id in &dead {
        assert!(
            log.contains(&format!("container {id},")),
            "{id} not in {log}"
        );
    }
    assert!(
        !log.contains("container full1,"),
        "a young one was reclaimed: {log}"
    );
    // The store: the live pods, the young dead one, the new pod.
    assert_eq!(node.store_ips().len(), live.len() + 2);
    assert!(node.store_ips().contains(&young_ip));
    // The other nine reclaimed addresses go to new pods; none is a live pod's.
    let mut new_pods = vec![(new_pod, ip)];
    for i in 1..10 {
        let pod = Netns::new("pd");
        let ip = result_ip(&node.add(&format!("new{i}"), &pod));
        assert!(!live.contains(&ip), "{ip} belongs to a live pod");
        new_pods.push((pod, ip));
    }
    let got: BTreeSet<&String> = new_pods.iter().map(|(_, ip)| ip).collect();
    assert_eq!(got.len(), 10, "duplicates among new pods");
    let out = node.cmd(
        "ADD",
        "late",
        Some(&Netns::new("pd")),
        "eth0",
        &node.conf("1.0.0"),
    );
    assert_eq!(out.error_code(), 100, "{}", out.stdout);
    // Every live pod still answers on its own address, from a new pod.
    let (from, _) = &new_pods[0];
    for ip in &live {
        assert!(from.ping(ip), "live pod {ip} does not answer");
    }
}

#[test]
fn a_simulated_reboot_drops_every_old_allocation() {
    if !require_root("a_simulated_reboot_drops_every_old_allocation") {
        return;
    }
    let node = Node::new("10.244.51.1/24");
    let boot = node.dir.path().join("boot_id");
    std::fs::write(&boot, "11111111-2222-3333-4444-555555555555\n").expect("boot id");
    let boot_env = ("OVERLAY_BOOT_ID_FILE", boot.to_str().expect("utf8"));
    let mut old = Vec::new();
    for i in 0..5 {
        let pod = Netns::new("pd");
        let out = start_add(&node, &format!("before{i}"), &pod, &[boot_env])
            .wait(Duration::from_secs(30))
            .expect_ok();
        old.push((pod, result_ip(&out.json())));
    }
    assert_eq!(old[0].1, "10.244.51.2");
    assert_eq!(node.store_ips().len(), 5);
    // The node reboots: every sandbox is gone, the kernel has a new boot id.
    drop(old);
    std::fs::write(&boot, "66666666-7777-8888-9999-aaaaaaaaaaaa\n").expect("boot id");
    let pod = Netns::new("pd");
    let out = start_add(&node, "after0", &pod, &[boot_env])
        .wait(Duration::from_secs(30))
        .expect_ok();
    assert_eq!(result_ip(&out.json()), "10.244.51.2", "not from the start");
    assert_eq!(node.store_ips(), vec!["10.244.51.2".to_string()]);
    assert_eq!(node.store_index_entries(), 1);
    assert_eq!(reclaim_log(&node).lines().count(), 5);
    // The same boot again: nothing more is dropped.
    let pod2 = Netns::new("pd");
    start_add(&node, "after1", &pod2, &[boot_env])
        .wait(Duration::from_secs(30))
        .expect_ok();
    assert_eq!(node.store_ips().len(), 2);
}

#[test]
fn a_hundred_adds_at_once_on_a_nearly_full_subnet_with_leftovers() {
    if !require_root("a_hundred_adds_at_once_on_a_nearly_full_subnet_with_leftovers") {
        return;
    }
    let node = Node::new("10.244.52.1/25"); // 125 pod addresses
    let mut pods = Pods::fill(&node, "near", 120);
    let dead: Vec<String> = (0..30).map(|i| format!("near{}", i * 4)).collect();
    let dead_ips = pods.kill(&node, &dead);
    for ip in &dead_ips {
        age(&node, ip);
    }
    let live = pods.ips();
    // Room: 5 free and 30 reclaimable.
    let racers: Vec<Netns> = (0..100).map(|_| Netns::new("pd")).collect();
    let running: Vec<Running> = racers
        .iter()
        .enumerate()
        .map(|(i, pod)| start_add(&node, &format!("race{i}"), pod, &[]))
        .collect();
    let mut won = BTreeMap::new();
    let mut full = 0;
    for (i, r) in running.into_iter().enumerate() {
        let out = r.wait(Duration::from_secs(120));
        if out.ok() {
            let ip = result_ip(&out.json());
            assert!(!live.contains(&ip), "{ip} belongs to a live pod");
            if let Some(other) = won.insert(ip.clone(), i) {
                panic!("{ip} handed to racers {other} and {i}");
            }
        } else {
            assert_eq!(out.error_code(), 100, "{}", out.stdout);
            let msg = out.json()["msg"].as_str().unwrap_or("").to_string();
            assert!(msg.contains("125 of 125"), "{msg}");
            full += 1;
        }
    }
    eprintln!("{} ADDs succeeded, {full} got code 100", won.len());
    assert_eq!(won.len(), 35, "all that fit must succeed");
    assert_eq!(full, 65);
    assert_eq!(node.store_ips().len(), 125);
}

#[test]
fn kill_9_during_a_reclaim_never_duplicates_or_loses_a_live_allocation() {
    if !require_root("kill_9_during_a_reclaim_never_duplicates_or_loses_a_live_allocation") {
        return;
    }
    let node = Node::new("10.244.53.1/28"); // 13 pod addresses
    let mut rng = Rng::from_env_or_time("OVERLAY_RECLAIM_KILL_SEED");
    let mut pods = Pods::fill(&node, "k", 13);
    let started = Instant::now();
    let (mut killed, mut finished) = (0, 0);
    for round in 0..30 {
        assert!(started.elapsed() < Duration::from_secs(180), "too slow");
        // Two pods die and age; an ADD that must reclaim them is killed at a random moment.
        let ids: Vec<String> = pods.0.keys().take(2).cloned().collect();
        for ip in pods.kill(&node, &ids) {
            age(&node, &ip);
        }
        let pod = Netns::new("pd");
        let id = format!("r{round}");
        let mut r = start_add(&node, &id, &pod, &[]);
        std::thread::sleep(Duration::from_micros(rng.below(6000)));
        let _ = r.child.kill();
        let out = r.wait(Duration::from_secs(30));
        // Every live pod keeps its address, in the store and on its interface.
        let stored = node.store_ips();
        for (pid, (p, ip)) in &pods.0 {
            assert!(
                stored.contains(ip),
                "round {round}: live {pid}'s {ip} was lost"
            );
            assert_eq!(node.store_owner(ip), Some((pid.clone(), "eth0".into())));
            assert_eq!(addrs_of(p, "eth0"), vec![ip.clone()]);
        }
        // The runtime retries the killed ADD; it then fills the room the kill left.
        let ip = if out.ok() {
            finished += 1;
            result_ip(&out.json())
        } else {
            killed += 1;
            node.del(&id, Some(&pod)).expect_ok();
            result_ip(&node.add(&id, &pod))
        };
        assert!(!pods.ips().contains(&ip), "round {round}: {ip} given twice");
        pods.0.insert(id, (pod, ip));
        let mut others = Vec::new();
        // Fill whatever is left, so the next round's ADD must reclaim.
        while node.store_ips().len() < 13 {
            let id = format!("f{round}-{}", others.len());
            let p = Netns::new("pd");
            let ip = result_ip(&node.add(&id, &p));
            assert!(!pods.ips().contains(&ip));
            others.push((id, p, ip));
        }
        for (id, p, ip) in others {
            pods.0.insert(id, (p, ip));
        }
    }
    eprintln!("{killed} ADDs killed during a reclaim, {finished} finished");
    assert!(killed >= 5, "too few kills landed: {killed}");
    assert!(Path::new(&node.data_dir).exists());
}
