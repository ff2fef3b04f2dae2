//! Subnet leases against a real etcd server (Debian's `etcd`), no mocks. The daemons here run with
//! `--lease-only` on loopback, so they never touch the host's network.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use ipnetwork::Ipv4Network;
use overlay_state::SubnetFile;
use overlay_testlab::{free_port, wait_for, Etcd};
use overlayd::node::Mac;
use overlayd::registry::{self, AcquireError, Registry};

#[test]
fn two_daemons_get_distinct_subnets_with_flannel_values() {
    let (etcd, dir) = seeded();
    let mut a = daemon(&etcd.endpoint, "127.0.0.11", dir.path(), &[]);
    let mut b = daemon(&etcd.endpoint, "127.0.0.12", dir.path(), &[]);
    a.wait_log("leased subnet", Duration::from_secs(20));
    b.wait_log("leased subnet", Duration::from_secs(20));
    let (sa, sb) = (leased_subnet(&a), leased_subnet(&b));
    assert_ne!(sa, sb);

    let keys = etcd.keys(&format!("{PREFIX}/subnets/"));
    assert_eq!(keys, {
        let mut k = vec![subnet_key(&sa), subnet_key(&sb)];
        k.sort();
        k
    });
    for (subnet, ip) in [(sa, "127.0.0.11"), (sb, "127.0.0.12")] {
        let v: serde_json::Value =
            serde_json::from_str(&etcd.get(&subnet_key(&subnet)).unwrap()).unwrap();
        assert_eq!(v["PublicIP"], ip);
        assert_eq!(v["BackendType"], "vxlan");
        assert_eq!(v["BackendData"]["VNI"], 1);
        let mac: Mac = v["BackendData"]["VtepMAC"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(mac, Mac::for_vtep(ip.parse().unwrap(), 1));
        assert_eq!(v["NodeName"], format!("node-{ip}"));
        assert!(Ipv4Network::new(Ipv4Addr::new(10, 244, 1, 0), 16)
            .unwrap()
            .contains(subnet.network()));
        assert!(
            subnet.network() >= Ipv4Addr::new(10, 244, 1, 0),
            "SubnetMin defaults to the second subnet"
        );

        let file = SubnetFile::read(&dir.path().join(format!("{ip}.env"))).unwrap();
        assert_eq!(file.subnet, subnet);
        assert_eq!(file.network.to_string(), "10.244.0.0/16");
        // lo's MTU minus the VXLAN overhead.
        assert_eq!(file.mtu, 65536 - 50);
    }
    // The lease behind each key is alive and carries the default TTL: one hour, so a terminated
    // node's subnet comes back to the pool within the hour (issue 10, item 7).
    let leases = etcd.ctl(&["lease", "list"]);
    let ids: Vec<&str> = leases
        .lines()
        .map(str::trim)
        .filter(|l| l.len() == 16)
        .collect();
    assert_eq!(ids.len(), 2, "{leases}");
    for id in ids {
        let ttl = etcd.ctl(&["lease", "timetolive", id]);
        assert!(ttl.contains("granted with TTL(3600s)"), "{ttl}");
    }
}

#[test]
fn killed_node_frees_its_subnet_once_its_ttl_passes_and_a_new_node_gets_it() {
    let etcd = Etcd::start();
    // Room for exactly one node.
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.9.0.0/28","SubnetLen":30,"SubnetMin":"10.9.0.4","SubnetMax":"10.9.0.4"}"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let ttl = ["--lease-ttl", "3s"];
    let mut a = leased(&etcd.endpoint, "127.0.0.66", dir.path(), &ttl);
    assert_eq!(leased_subnet(&a).to_string(), "10.9.0.4/30");
    let mut b = daemon(&etcd.endpoint, "127.0.0.67", dir.path(), &ttl);
    b.wait_log("no free subnet", Duration::from_secs(10));
    // Terminated without `overlayd release`, as an autoscaler does.
    a.signal("KILL");
    let killed = Instant::now();
    b.wait_log("leased subnet 10.9.0.4/30", Duration::from_secs(40));
    eprintln!(
        "subnet of a killed node (TTL 3 s) leased by a new node {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        killed.elapsed() >= Duration::from_secs(1),
        "the lease had not expired yet"
    );
}

#[test]
fn twenty_racing_acquirers_on_four_subnets() {
    let etcd = Etcd::start();
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.9.0.0/26","SubnetLen":28,"SubnetMin":"10.9.0.0"}"#,
    );
    let rt = rt();
    let results: Vec<Result<Ipv4Network, String>> = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..20u8 {
            let args = etcd_args(&etcd.endpoint);
            tasks.push(tokio::spawn(async move {
                // Each acquirer has its own client, like separate nodes.
                let reg = Registry::connect(&args).await.map_err(|e| e.to_string())?;
                let (cfg, _) = reg.network_config().await.map_err(|e| e.to_string())?;
                let req = request(Ipv4Addr::new(192, 0, 2, 10 + i), Duration::from_secs(600));
                match registry::acquire(&reg, &cfg, &req).await {
                    Ok(a) => Ok(a.subnet),
                    Err(e @ AcquireError::NetworkFull { .. }) => Err(e.to_string()),
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    let won: Vec<Ipv4Network> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    let lost: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(won.len(), 4, "{results:?}");
    assert_eq!(
        won.iter().collect::<BTreeSet<_>>().len(),
        4,
        "a subnet was held twice: {won:?}"
    );
    assert_eq!(lost.len(), 16);
    for e in lost {
        assert_eq!(e, "no free subnet: 4 of 4 subnets in 10.9.0.0/26 are leased. Free one with `overlayd release` on a decommissioned node, or enlarge Network / SubnetMin-SubnetMax");
    }
    assert_eq!(etcd.keys(&format!("{PREFIX}/subnets/")).len(), 4);
    // Losers revoked the leases they granted while racing: only the four winners' remain.
    let leases = etcd.ctl(&["lease", "list"]);
    assert_eq!(
        leases.lines().filter(|l| l.trim().len() == 16).count(),
        4,
        "{leases}"
    );
}

#[test]
fn restart_keeps_the_subnet_even_without_the_subnet_file() {
    let (etcd, dir) = seeded();
    let ip = "127.0.0.21";
    let mut d = leased(&etcd.endpoint, ip, dir.path(), &[]);
    let first = leased_subnet(&d);
    let rev_before = etcd.ctl(&["get", &subnet_key(&first), "-w", "json"]);
    assert!(
        d.signal("TERM").is_some_and(|s| s.success()),
        "SIGTERM must exit cleanly"
    );
    assert!(
        etcd.get(&subnet_key(&first)).is_some(),
        "SIGTERM must not revoke the lease"
    );

    let mut d = leased(&etcd.endpoint, ip, dir.path(), &[]);
    assert_eq!(leased_subnet(&d), first);
    assert!(
        d.log_text().contains("this node's existing lease"),
        "{}",
        d.log_text()
    );
    // Taking back our own key writes nothing: no event wakes the other nodes.
    let rev_after = etcd.ctl(&["get", &subnet_key(&first), "-w", "json"]);
    let modrev = |j: &str| {
        serde_json::from_str::<serde_json::Value>(j).unwrap()["kvs"][0]["mod_revision"].clone()
    };
    assert_eq!(modrev(&rev_before), modrev(&rev_after));
    d.signal("TERM");

    std::fs::remove_file(dir.path().join(format!("{ip}.env"))).unwrap();
    let d = leased(&etcd.endpoint, ip, dir.path(), &[]);
    assert_eq!(leased_subnet(&d), first, "found again by PublicIP");
    assert_eq!(etcd.keys(&format!("{PREFIX}/subnets/")).len(), 1);
}

#[test]
fn expired_subnet_from_the_file_is_leased_again() {
    let (etcd, dir) = seeded();
    let ip = "127.0.0.22";
    let mut d = leased(&etcd.endpoint, ip, dir.path(), &[]);
    let first = leased_subnet(&d);
    d.signal("TERM");
    // The key is gone (expired, or deleted), but the subnet file remembers it.
    etcd.ctl(&["del", &subnet_key(&first)]);
    let d = leased(&etcd.endpoint, ip, dir.path(), &[]);
    assert_eq!(leased_subnet(&d), first);
    assert!(
        d.log_text().contains("previous subnet, leased again"),
        "{}",
        d.log_text()
    );
}

#[test]
fn short_ttl_expires_without_keepalive_and_holds_with_it() {
    let (etcd, dir) = seeded();
    let mut d = daemon(
        &etcd.endpoint,
        "127.0.0.31",
        dir.path(),
        &["--lease-ttl", "2s"],
    );
    d.wait_log("leased subnet", Duration::from_secs(20));
    let subnet = leased_subnet(&d);
    // Three TTLs later the key is still there: keep-alives hold it.
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        etcd.get(&subnet_key(&subnet)).is_some(),
        "keep-alive did not hold the lease"
    );
    let events_before = etcd.ctl(&["get", &subnet_key(&subnet), "-w", "json"]);
    let version = |j: &str| {
        serde_json::from_str::<serde_json::Value>(j).unwrap()["kvs"][0]["version"].clone()
    };
    assert_eq!(
        version(&events_before),
        1,
        "keep-alive must not re-put the key"
    );

    // kill -9: keep-alives stop, the lease runs out, etcd deletes the key.
    d.signal("KILL");
    let start = Instant::now();
    wait_for("the key to expire", Duration::from_secs(10), || {
        etcd.get(&subnet_key(&subnet)).is_none().then_some(())
    });
    assert!(start.elapsed() >= Duration::from_millis(500));
}

#[test]
fn own_key_deleted_by_someone_is_put_back() {
    let (etcd, dir) = seeded();
    let mut d = leased(&etcd.endpoint, "127.0.0.32", dir.path(), &[]);
    let subnet = leased_subnet(&d);
    etcd.ctl(&["del", &subnet_key(&subnet)]);
    d.wait_log("is this node's again", Duration::from_secs(10));
    let v = etcd.get(&subnet_key(&subnet)).expect("key re-created");
    assert!(v.contains("127.0.0.32"));
    assert!(d.is_running());
}

#[test]
fn reservation_is_used_and_never_expires() {
    let etcd = Etcd::start();
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    let key = format!("{PREFIX}/subnets/10.244.200.0-24");
    etcd.put(&key, r#"{"PublicIP":"127.0.0.41"}"#);
    let dir = tempfile::tempdir().unwrap();
    let d = leased(&etcd.endpoint, "127.0.0.41", dir.path(), &[]);
    assert_eq!(leased_subnet(&d).to_string(), "10.244.200.0/24");
    assert!(d.log_text().contains("reservation for this node"));
    let j: serde_json::Value =
        serde_json::from_str(&etcd.ctl(&["get", &key, "-w", "json"])).unwrap();
    assert!(
        j["kvs"][0].get("lease").is_none(),
        "a reservation stays without a lease: {j}"
    );
    let v: serde_json::Value = serde_json::from_str(&etcd.get(&key).unwrap()).unwrap();
    assert_eq!(
        v["BackendData"]["VtepMAC"],
        Mac::for_vtep("127.0.0.41".parse().unwrap(), 1).to_string()
    );
    // Nobody else takes it: a second node gets another subnet.
    let other = leased(&etcd.endpoint, "127.0.0.42", dir.path(), &[]);
    assert_ne!(leased_subnet(&other).to_string(), "10.244.200.0/24");
}

#[test]
fn release_revokes_the_lease_and_removes_the_subnet_file() {
    let (etcd, dir) = seeded();
    let ip = "127.0.0.51";
    let mut d = leased(&etcd.endpoint, ip, dir.path(), &[]);
    let subnet = leased_subnet(&d);
    d.signal("TERM");
    let file = dir.path().join(format!("{ip}.env"));
    let release = || {
        overlayd()
            .args([
                "release",
                "--iface",
                "lo",
                "--public-ip",
                ip,
                "--etcd-endpoints",
                &etcd.endpoint,
            ])
            .arg("--subnet-file")
            .arg(&file)
            .output()
            .unwrap()
    };
    let out = release();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("released subnet {subnet}")),
        "{stdout}"
    );
    assert!(etcd.get(&subnet_key(&subnet)).is_none());
    assert!(!file.exists());
    let out = release();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to release"));
}

// ---- errors a user can cause, each with the message they see ----

#[test]
fn unreachable_etcd_names_the_endpoint_and_backs_off() {
    let port = free_port(Ipv4Addr::LOCALHOST);
    let endpoint = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let mut d = daemon(&endpoint, "127.0.0.61", dir.path(), &[]);
    d.wait_log("retrying in 2s", Duration::from_secs(10));
    let log = d.log_text();
    assert!(
        log.contains(&format!("etcd unreachable at {endpoint}")),
        "{log}"
    );
    assert!(log.contains("Connection refused"), "{log}");
    assert!(log.contains("retrying in 1s"), "{log}");
    assert!(d.is_running(), "must keep retrying, not exit");
}

#[test]
fn missing_config_prints_the_seed_command_and_waits_for_it() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let mut d = daemon(&etcd.endpoint, "127.0.0.62", dir.path(), &[]);
    d.wait_log("network config not found", Duration::from_secs(10));
    let log = d.log_text();
    let seed = format!(
        "ETCDCTL_API=3 etcdctl --endpoints={} put /coreos.com/network/config '{CONFIG}'",
        etcd.endpoint
    );
    assert!(log.contains(&seed), "{log}");
    assert!(
        log.contains("key /coreos.com/network/config does not exist"),
        "{log}"
    );
    // Seeding later just works.
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    d.wait_log("leased subnet", Duration::from_secs(20));
}

#[test]
fn non_json_config_says_so_and_shows_the_expected_form() {
    let etcd = Etcd::start();
    // What a v2-era seed often looks like after a copy-paste: not JSON.
    etcd.put(&format!("{PREFIX}/config"), "Network=10.244.0.0/16");
    let dir = tempfile::tempdir().unwrap();
    let mut d = daemon(&etcd.endpoint, "127.0.0.63", dir.path(), &[]);
    d.wait_log("is not JSON", Duration::from_secs(10));
    let log = d.log_text();
    assert!(log.contains("\"Network=10.244.0.0/16\""), "{log}");
    assert!(log.contains("etcd v3 API only"), "{log}");
    assert!(
        log.contains(r#"{"Network":"10.244.0.0/16","SubnetLen":24"#),
        "{log}"
    );
}

#[test]
fn invalid_fields_are_named_with_their_value() {
    let etcd = Etcd::start();
    let cases = [
        (
            r#"{"Network":"10.244.0.0"}"#,
            r#"field Network = "10.244.0.0": not an IPv4 CIDR"#,
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetLen":16}"#,
            "field SubnetLen = 16: must be longer than Network's prefix /16",
        ),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.9.0.0"}"#,
            r#"field SubnetMin = "10.9.0.0": is outside Network 10.244.0.0/16"#,
        ),
        (
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#,
            r#"field Backend.Type = "udp": unsupported backend"#,
        ),
    ];
    let rt = rt();
    for (config, expected) in cases {
        etcd.put(&format!("{PREFIX}/config"), config);
        let err = rt.block_on(async {
            let reg = Registry::connect(&etcd_args(&etcd.endpoint)).await.unwrap();
            reg.network_config().await.unwrap_err().to_string()
        });
        assert!(err.contains(expected), "{config}: {err}");
        assert!(err.contains("/coreos.com/network/config"), "{err}");
    }
    // And the daemon says the same in its log, without leasing anything.
    etcd.put(&format!("{PREFIX}/config"), cases[1].0);
    let dir = tempfile::tempdir().unwrap();
    let mut d = daemon(&etcd.endpoint, "127.0.0.64", dir.path(), &[]);
    d.wait_log(cases[1].1, Duration::from_secs(10));
    assert!(etcd.keys(&format!("{PREFIX}/subnets/")).is_empty());
}

#[test]
fn full_network_reports_the_numbers() {
    let etcd = Etcd::start();
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.9.0.0/28","SubnetLen":30,"SubnetMin":"10.9.0.0"}"#,
    );
    for s in ["10.9.0.0-30", "10.9.0.4-30", "10.9.0.8-30", "10.9.0.12-30"] {
        etcd.put(
            &format!("{PREFIX}/subnets/{s}"),
            r#"{"PublicIP":"192.0.2.200","BackendType":"vxlan"}"#,
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut d = daemon(&etcd.endpoint, "127.0.0.65", dir.path(), &[]);
    d.wait_log(
        "no free subnet: 4 of 4 subnets in 10.9.0.0/28 are leased",
        Duration::from_secs(10),
    );
    assert!(d.is_running(), "keeps trying: a subnet may be released");
    // One is released: the waiting node gets it.
    etcd.ctl(&["del", &format!("{PREFIX}/subnets/10.9.0.8-30")]);
    d.wait_log("leased subnet 10.9.0.8/30", Duration::from_secs(40));
}

#[test]
fn own_value_edited_by_someone_is_written_back() {
    let (etcd, dir) = seeded();
    let ip = "127.0.0.34";
    let mut d = leased(&etcd.endpoint, ip, dir.path(), &[]);
    let key = subnet_key(&leased_subnet(&d));
    let original = etcd.get(&key).unwrap();
    // Same PublicIP, wrong MAC: peers would send this node's traffic nowhere.
    let lease_hex = {
        let j: serde_json::Value =
            serde_json::from_str(&etcd.ctl(&["get", &key, "-w", "json"])).unwrap();
        format!("{:x}", j["kvs"][0]["lease"].as_i64().unwrap())
    };
    etcd.ctl(&[
        "put",
        "--lease",
        &lease_hex,
        &key,
        &format!(r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:00:99"}}}}"#),
    ]);
    d.wait_log(
        "was changed in etcd; writing it back",
        Duration::from_secs(10),
    );
    wait_for("the value to be restored", Duration::from_secs(10), || {
        (etcd.get(&key).as_deref() == Some(original.as_str())).then_some(())
    });
}

#[test]
fn lease_watch_resumes_after_an_etcd_outage() {
    let mut etcd = Etcd::start();
    etcd.put(&key("10.244.1.0-24"), PEER);
    let rt = rt();
    let (mut rx, log) = follow_with_log(&rt, &etcd, None);
    wait_for_set(&rt, &mut rx, &["10.244.1.0/24"], Duration::from_secs(10));
    etcd.put(&key("10.244.2.0-24"), PEER);
    wait_for_set(
        &rt,
        &mut rx,
        &["10.244.1.0/24", "10.244.2.0/24"],
        Duration::from_secs(5),
    );
    etcd.stop();
    std::thread::sleep(Duration::from_secs(1));
    etcd.restart();
    etcd.ctl(&["del", &key("10.244.1.0-24")]);
    etcd.put(&key("10.244.3.0-24"), PEER);
    wait_for_set(
        &rt,
        &mut rx,
        &["10.244.2.0/24", "10.244.3.0/24"],
        Duration::from_secs(40),
    );
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(text.contains("lease watch lost"), "{text}");
    assert!(text.contains("resuming from revision"), "{text}");
}

#[test]
fn lease_watch_lists_again_when_its_revision_was_compacted() {
    let etcd = Etcd::start();
    etcd.put(&key("10.244.1.0-24"), PEER);
    etcd.put(&key("10.244.2.0-24"), PEER);
    let rt = rt();
    let stale = rt.block_on(async {
        let reg = Registry::connect(&etcd_args(&etcd.endpoint)).await.unwrap();
        reg.list_leases().await.unwrap()
    });
    // History moves on and is compacted past the listing's revision, as after a long outage.
    etcd.ctl(&["del", &key("10.244.1.0-24")]);
    etcd.put(&key("10.244.4.0-24"), PEER);
    for i in 0..5 {
        etcd.put("/unrelated/noise", &i.to_string());
    }
    let status: serde_json::Value =
        serde_json::from_str(&etcd.ctl(&["endpoint", "status", "-w", "json"])).unwrap();
    let rev = status[0]["Status"]["header"]["revision"].as_i64().unwrap();
    etcd.ctl(&["compact", &rev.to_string()]);

    let (mut rx, log) = follow_with_log(&rt, &etcd, Some(stale));
    wait_for_set(
        &rt,
        &mut rx,
        &["10.244.2.0/24", "10.244.4.0/24"],
        Duration::from_secs(10),
    );
    let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(text.contains("compacted past revision"), "{text}");
}

#[test]
fn leases_over_tls_with_client_certificates() {
    let etcd = Etcd::start_tls();
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    let tls = etcd.tls.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut d = daemon(
        &etcd.endpoint,
        "127.0.0.71",
        dir.path(),
        &[
            "--etcd-cafile",
            tls.ca.to_str().unwrap(),
            "--etcd-certfile",
            tls.cert.to_str().unwrap(),
            "--etcd-keyfile",
            tls.key.to_str().unwrap(),
        ],
    );
    d.wait_log("leased subnet", Duration::from_secs(20));
    assert!(etcd.get(&subnet_key(&leased_subnet(&d))).is_some());

    // Without a client certificate the server refuses, and the daemon says where and keeps trying.
    let mut anon = daemon(
        &etcd.endpoint,
        "127.0.0.72",
        dir.path(),
        &["--etcd-cafile", tls.ca.to_str().unwrap()],
    );
    anon.wait_log("retrying in", Duration::from_secs(15));
    assert!(
        anon.log_text().contains(&etcd.endpoint),
        "{}",
        anon.log_text()
    );
    assert!(
        anon.log_text()
            .contains("pass --etcd-certfile and --etcd-keyfile"),
        "{}",
        anon.log_text()
    );
    // A missing CA file is a clear, immediate error.
    let out = overlayd()
        .args([
            "run",
            "--lease-only",
            "--iface",
            "lo",
            "--etcd-endpoints",
            &etcd.endpoint,
        ])
        .args(["--etcd-cafile", "/nonexistent/ca.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read TLS file /nonexistent/ca.pem"),
        "{err}"
    );
}

#[test]
fn readyz_turns_ready_once_leased_and_metrics_count_leases() {
    let etcd = Etcd::start();
    let port = free_port(Ipv4Addr::LOCALHOST);
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let cni_dir = dir.path().join("cni");
    let mut d = daemon(
        &etcd.endpoint,
        "127.0.0.81",
        dir.path(),
        &[
            "--metrics-addr",
            &addr,
            "--cni-data-dir",
            cni_dir.to_str().unwrap(),
        ],
    );
    d.wait_log("network config not found", Duration::from_secs(10));
    let (status, body) = wait_for("the health server", Duration::from_secs(5), || {
        http_get(&addr, "/readyz")
    });
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("FAIL lease: no subnet leased yet"), "{body}");
    // Alive while it waits: waiting for a config is no reason to restart it.
    assert_eq!(http_get(&addr, "/healthz").map(|r| r.0), Some(200));
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    d.wait_log("leased subnet", Duration::from_secs(20));
    wait_for("readyz to say ready", Duration::from_secs(5), || {
        http_get(&addr, "/readyz")
            .filter(|(s, _)| *s == 200)
            .map(|_| ())
    });
    let (status, metrics) = wait_for("the lease gauge", Duration::from_secs(5), || {
        http_get(&addr, "/metrics").filter(|(_, b)| b.contains("overlayd_subnet_leases 1"))
    });
    assert_eq!(status, 200);
    assert!(metrics.contains("# HELP overlayd_peers"), "{metrics}");
    // Pod addresses, counted from the CNI plugin's store at each scrape.
    assert!(
        metrics.contains("overlayd_pod_address_capacity 253"),
        "{metrics}"
    );
    let subnet = leased_subnet(&d);
    let store = overlay_state::IpamStore::new(&cni_dir, "podnet").unwrap();
    for i in 0..2 {
        store
            .allocate(
                subnet,
                &overlay_state::AttachmentKey::new(format!("c{i}"), "eth0"),
            )
            .unwrap();
    }
    let (_, metrics) = http_get(&addr, "/metrics").expect("metrics");
    assert!(
        metrics.contains(r#"overlayd_pod_addresses{network="podnet"} 2"#),
        "{metrics}"
    );
}

#[test]
fn lease_watch_lists_again_when_etcd_comes_back_from_an_older_snapshot() {
    let mut etcd = Etcd::start();
    etcd.put(&key("10.244.1.0-24"), PEER);
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup.db");
    etcd.snapshot(&backup);
    let rt = rt();
    let (mut rx, log) = follow_with_log(&rt, &etcd, None);
    // History moves on past the backup...
    for i in 2..6 {
        etcd.put(&key(&format!("10.244.{i}.0-24")), PEER);
    }
    wait_for_set(
        &rt,
        &mut rx,
        &[
            "10.244.1.0/24",
            "10.244.2.0/24",
            "10.244.3.0/24",
            "10.244.4.0/24",
            "10.244.5.0/24",
        ],
        Duration::from_secs(5),
    );
    // ...then etcd is restored from it: its revision is below the one the watch has seen, so a
    // watch resumed from there would wait for revisions that were already handed out.
    etcd.restore(&backup);
    etcd.put(&key("10.244.9.0-24"), PEER);
    let back = Instant::now();
    wait_for_set(
        &rt,
        &mut rx,
        &["10.244.1.0/24", "10.244.9.0/24"],
        Duration::from_secs(10),
    );
    eprintln!(
        "after the restore: leases right again {:?} after the first write",
        back.elapsed()
    );
    let text = log_text(&log);
    assert!(text.contains("is below the last one seen"), "{text}");
}
