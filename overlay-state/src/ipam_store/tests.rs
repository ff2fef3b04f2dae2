//! The store's unit tests.

use super::*;
use std::collections::BTreeSet;
use std::fs::File;

fn subnet(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn key(i: usize) -> AttachmentKey {
    AttachmentKey::new(format!("c{i}"), "eth0")
}

#[test]
fn range_skips_network_gateway_and_broadcast() {
    let (f, l) = pod_range(subnet("10.244.7.0/24")).unwrap();
    assert_eq!(f, Ipv4Addr::new(10, 244, 7, 2));
    assert_eq!(l, Ipv4Addr::new(10, 244, 7, 254));
    assert_eq!(pod_capacity(subnet("10.244.7.0/24")), 253);
    assert_eq!(pod_capacity(subnet("10.244.7.0/28")), 13);
    assert_eq!(pod_capacity(subnet("10.244.7.0/30")), 1);
    assert_eq!(pod_capacity(subnet("10.244.7.0/31")), 0);
}

#[test]
fn allocates_in_order_after_last_reserved_and_is_idempotent_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = IpamStore::new(dir.path(), "net").unwrap();
    let s = subnet("10.1.2.0/24");
    let a = store.allocate(s, &key(1)).unwrap();
    let b = store.allocate(s, &key(2)).unwrap();
    assert_eq!(a, Ipv4Addr::new(10, 1, 2, 2));
    assert_eq!(b, Ipv4Addr::new(10, 1, 2, 3));
    assert_eq!(store.allocate(s, &key(1)).unwrap(), a);
    // A released IP is not reused at once.
    assert_eq!(store.release(&key(1)).unwrap(), vec![a]);
    assert_eq!(
        store.allocate(s, &key(3)).unwrap(),
        Ipv4Addr::new(10, 1, 2, 4)
    );
    assert_eq!(store.find(&key(2)).unwrap(), Some(b));
    assert_eq!(store.find(&key(1)).unwrap(), None);
    assert!(store.release(&key(1)).unwrap().is_empty());
}

#[test]
fn exhaustion_names_subnet_and_count_and_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = IpamStore::new(dir.path(), "net").unwrap();
    let s = subnet("10.1.2.16/28");
    let mut ips = HashSet::new();
    for i in 0..13 {
        let ip = store.allocate(s, &key(i)).unwrap();
        assert!(ip != Ipv4Addr::new(10, 1, 2, 16) && ip != Ipv4Addr::new(10, 1, 2, 17));
        assert!(ip != Ipv4Addr::new(10, 1, 2, 31));
        assert!(ips.insert(ip));
    }
    let err = store.allocate(s, &key(99)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("10.1.2.16/28") && msg.contains("13 of 13"),
        "{msg}"
    );
    assert_eq!(store.list().unwrap().len(), 13);
    // Wraps around to a freed IP.
    store.release(&key(0)).unwrap();
    assert_eq!(
        store.allocate(s, &key(99)).unwrap(),
        Ipv4Addr::new(10, 1, 2, 18)
    );
}

#[test]
fn gc_keeps_valid_and_drops_the_rest_including_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let store = IpamStore::new(dir.path(), "net").unwrap();
    let s = subnet("10.1.2.0/24");
    for i in 0..4 {
        store.allocate(s, &key(i)).unwrap();
    }
    fs::write(store.dir().join("10.1.2.200"), "").unwrap();
    fs::write(store.dir().join(".tmp.10.1.2.9.1234"), "half").unwrap();
    let released = store.gc(|k| k == &key(1) || k == &key(3)).unwrap();
    assert_eq!(released.len(), 3);
    let left: Vec<_> = store.list().unwrap().into_iter().map(|a| a.key).collect();
    assert_eq!(left, vec![Some(key(1)), Some(key(3))]);
    assert!(!store.dir().join(".tmp.10.1.2.9.1234").exists());
}

#[test]
fn a_key_holding_an_ip_of_another_subnet_gets_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = IpamStore::new(dir.path(), "net").unwrap();
    let old = store.allocate(subnet("10.1.2.0/24"), &key(1)).unwrap();
    let new = store.allocate(subnet("10.1.3.0/24"), &key(1)).unwrap();
    assert_eq!(new, Ipv4Addr::new(10, 1, 3, 2));
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(store.find(&key(1)).unwrap(), Some(new));
    assert!(!store.dir().join(old.to_string()).exists());
}

#[test]
fn stale_or_missing_index_entries_are_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let store = IpamStore::new(dir.path(), "net").unwrap();
    let s = subnet("10.1.2.0/24");
    let a = store.allocate(s, &key(1)).unwrap();
    let b = store.allocate(s, &key(2)).unwrap();
    // A crash after writing key 3's index entry, before its IP file: points at a free IP...
    fs::write(store.dir().join(key(3).index_name()), "10.1.2.50\n").unwrap();
    assert_eq!(store.find(&key(3)).unwrap(), None);
    // ...or, later, at an IP someone else got.
    fs::write(store.dir().join(key(3).index_name()), format!("{a}\n")).unwrap();
    assert_eq!(store.find(&key(3)).unwrap(), None);
    let c = store.allocate(s, &key(3)).unwrap();
    assert!(c != a && c != b);
    assert_eq!(store.find(&key(3)).unwrap(), Some(c));
    assert_eq!(store.find(&key(1)).unwrap(), Some(a));
    // An IP file without an index entry is still released by its key.
    fs::remove_file(store.dir().join(key(2).index_name())).unwrap();
    assert_eq!(store.release(&key(2)).unwrap(), vec![b]);
    // GC drops index entries nothing valid uses.
    fs::write(store.dir().join(key(9).index_name()), "10.1.2.77\n").unwrap();
    store.gc(|k| k == &key(1)).unwrap();
    let names: BTreeSet<String> = fs::read_dir(store.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let want: BTreeSet<String> = [
        a.to_string(),
        key(1).index_name(),
        LOCK_FILE.to_string(),
        LAST_RESERVED_FILE.to_string(),
    ]
    .into();
    assert_eq!(names, want);
}

#[test]
fn an_allocation_is_one_file_and_a_stale_index_is_never_written_into() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let store = IpamStore::new(dir.path(), "net").unwrap();
    let s = subnet("10.1.2.0/24");
    let a = store.allocate(s, &key(1)).unwrap();
    let ip_file = fs::metadata(store.dir().join(a.to_string())).unwrap();
    let index = fs::metadata(store.dir().join(key(1).index_name())).unwrap();
    assert_eq!(ip_file.ino(), index.ino());
    assert_eq!(ip_file.nlink(), 2);
    // Key 3's index entry is, after some crash, another name of key 1's allocation.
    fs::hard_link(
        store.dir().join(a.to_string()),
        store.dir().join(key(3).index_name()),
    )
    .unwrap();
    assert_eq!(store.find(&key(3)).unwrap(), None);
    let c = store.allocate(s, &key(3)).unwrap();
    assert_ne!(c, a);
    assert_eq!(store.find(&key(1)).unwrap(), Some(a));
    assert_eq!(store.find(&key(3)).unwrap(), Some(c));
    assert_eq!(
        fs::read_to_string(store.dir().join(a.to_string())).unwrap(),
        format!("c1\neth0\n{a}\n")
    );
}

#[test]
fn released_files_are_reused_and_spares_stay_bounded() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let store = IpamStore::new(dir.path(), "net").unwrap();
    let s = subnet("10.1.2.0/28");
    let a = store.allocate(s, &key(1)).unwrap();
    let ino = fs::metadata(store.dir().join(a.to_string())).unwrap().ino();
    assert_eq!(store.release(&key(1)).unwrap(), vec![a]);
    let spare = store.dir().join(format!("{SPARE_PREFIX}{a}"));
    assert_eq!(fs::metadata(&spare).unwrap().ino(), ino);
    assert!(!store.dir().join(key(1).index_name()).exists());
    assert_eq!(store.find(&key(1)).unwrap(), None);
    // The next allocation is that file again, rewritten whole for its new owner.
    let b = store.allocate(s, &key(22)).unwrap();
    assert!(!spare.exists());
    let file = store.dir().join(b.to_string());
    assert_eq!(fs::metadata(&file).unwrap().ino(), ino);
    assert_eq!(
        fs::read_to_string(&file).unwrap(),
        format!("c22\neth0\n{b}\n")
    );
    assert_eq!(store.list().unwrap().len(), 1);
    // Many pods come and go: at most one spare per IP of the subnet.
    for i in 100..400 {
        store.allocate(s, &key(i)).unwrap();
        if i % 3 != 0 {
            store.release(&key(i)).unwrap();
        }
        if store.list().unwrap().len() >= pod_capacity(s) {
            for a in store.list().unwrap() {
                store.release(&a.key.unwrap()).unwrap();
            }
        }
    }
    let spares = fs::read_dir(store.dir())
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_str().unwrap().starts_with(SPARE_PREFIX)
        })
        .count();
    assert!(spares <= pod_capacity(s), "{spares} spares");
}

#[test]
fn spares_made_ahead_are_at_most_four_and_become_the_next_allocations() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let store = IpamStore::new(dir.path(), "net").unwrap();
    let s = subnet("10.1.2.0/24");
    assert_eq!(store.top_up_spares().unwrap(), 4);
    assert_eq!(store.top_up_spares().unwrap(), 0);
    let ino = |name: String| fs::metadata(store.dir().join(name)).unwrap().ino();
    let made: BTreeSet<u64> = (0..4)
        .map(|k| ino(format!("{SPARE_PREFIX}new.{k}")))
        .collect();
    let ips: Vec<Ipv4Addr> = (1..=4)
        .map(|i| store.allocate(s, &key(i)).unwrap())
        .collect();
    let used: BTreeSet<u64> = ips.iter().map(|ip| ino(ip.to_string())).collect();
    assert_eq!(used, made);
    for (i, ip) in ips.iter().enumerate() {
        let text = fs::read_to_string(store.dir().join(ip.to_string())).unwrap();
        assert_eq!(text, format!("c{}\neth0\n{ip}\n", i + 1));
    }
    assert_eq!(store.top_up_spares().unwrap(), 4);
}

#[test]
fn usage_counts_each_networks_addresses_of_the_subnet() {
    let dir = tempfile::tempdir().unwrap();
    let s = subnet("10.1.2.0/24");
    let a = IpamStore::new(dir.path(), "a").unwrap();
    let b = IpamStore::new(dir.path(), "b").unwrap();
    for i in 0..3 {
        a.allocate(s, &key(i)).unwrap();
    }
    b.allocate(s, &key(9)).unwrap();
    a.top_up_spares().unwrap();
    // An address of another subnet (the node was renumbered) does not count.
    fs::write(a.dir().join("10.9.9.9"), "x\neth0\n").unwrap();
    let u = usage(dir.path(), s);
    let got: Vec<(String, usize)> = u
        .into_iter()
        .map(|u| (u.network, u.allocated.unwrap()))
        .collect();
    assert_eq!(got, vec![("a".to_string(), 3), ("b".to_string(), 1)]);
    assert!(usage(&dir.path().join("none"), s).is_empty());
}

#[test]
fn concurrent_allocators_never_share_an_ip() {
    let dir = tempfile::tempdir().unwrap();
    let store = IpamStore::new(dir.path(), "net").unwrap();
    let s = subnet("10.1.0.0/24");
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                (0..25)
                    .map(|i| store.allocate(s, &key(t * 100 + i)).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all = HashSet::new();
    for h in handles {
        for ip in h.join().unwrap() {
            assert!(all.insert(ip), "{ip} handed out twice");
        }
    }
    assert_eq!(all.len(), 200);
}

#[test]
fn network_name_cannot_escape_data_dir() {
    for bad in ["", "..", "../x", "a/b", ".hidden", "-x", "a b"] {
        assert!(IpamStore::new(Path::new("/x"), bad).is_err(), "{bad:?}");
    }
    assert!(IpamStore::new(Path::new("/x"), "k8s-pod_network.1").is_ok());
}

fn age(store: &IpamStore, ip: Ipv4Addr, by: std::time::Duration) {
    let f = File::open(store.dir().join(ip.to_string())).unwrap();
    f.set_modified(std::time::SystemTime::now() - by).unwrap();
}

#[test]
fn allocations_of_another_boot_are_dropped_at_the_next_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let s = subnet("10.1.2.0/24");
    let before = IpamStore::new(dir.path(), "net")
        .unwrap()
        .with_boot_id(Some("boot-a".into()));
    for i in 0..3 {
        before.allocate(s, &key(i)).unwrap();
    }
    // Same boot: kept.
    assert_eq!(
        before.allocate(s, &key(3)).unwrap(),
        Ipv4Addr::new(10, 1, 2, 5)
    );
    let after = IpamStore::new(dir.path(), "net")
        .unwrap()
        .with_boot_id(Some("boot-b".into()));
    let a = after.allocate_counting_spares(s, &key(9)).unwrap();
    assert_eq!(
        a.ip,
        Ipv4Addr::new(10, 1, 2, 2),
        "from the start of the range"
    );
    assert_eq!(a.reclaimed.len(), 4);
    assert!(a.reclaimed[0].why.contains("boot-a"), "{:?}", a.reclaimed);
    assert_eq!(after.list().unwrap().len(), 1);
    assert_eq!(after.find(&key(0)).unwrap(), None);
    assert_eq!(after.reclaimed_total(), 4);
    // A store whose boot is unknown (no boot file, or no boot id) keeps what it has.
    let other = IpamStore::new(dir.path(), "older").unwrap();
    other.allocate(s, &key(1)).unwrap();
    let other = other.with_boot_id(Some("boot-b".into()));
    other.allocate(s, &key(2)).unwrap();
    assert_eq!(other.list().unwrap().len(), 2);
}

#[test]
fn a_full_subnet_reclaims_only_old_allocations_without_a_veth() {
    let dir = tempfile::tempdir().unwrap();
    let store = IpamStore::new(dir.path(), "net").unwrap();
    let s = subnet("10.1.2.0/29"); // 5 pod addresses
    let ips: Vec<Ipv4Addr> = (0..5)
        .map(|i| store.allocate(s, &key(i)).unwrap())
        .collect();
    let veth = |i: usize| crate::host_veth_name(&format!("c{i}"), "eth0");
    // 0, 1: old, veth gone. 2: old, veth there. 3: young, veth gone. 4: young, veth there.
    let old = RECLAIM_GRACE + std::time::Duration::from_secs(5);
    for ip in &ips[..3] {
        age(&store, *ip, old);
    }
    let links: HashSet<String> = [veth(2), veth(4), "cni0".to_string()].into();
    let other = IpamStore::new(dir.path(), "other").unwrap();
    let theirs = other.allocate(s, &key(0)).unwrap();
    age(&other, theirs, old);
    let mut dumps = 0;
    let mut names = || {
        dumps += 1;
        Some(links.clone())
    };
    let a = store.allocate_or_reclaim(s, &key(10), &mut names).unwrap();
    assert_eq!(dumps, 1);
    let got: Vec<Ipv4Addr> = a.reclaimed.iter().map(|r| r.ip).collect();
    assert_eq!(got, vec![ips[0], ips[1]]);
    assert!(a.reclaimed[0].why.contains("is gone"), "{}", a.reclaimed[0]);
    assert!(got.contains(&a.ip));
    // The other reclaimed address is free; then only young ones without a veth remain (3, and the
    // two just allocated, whose ADDs would make their veths next).
    store.allocate(s, &key(11)).unwrap();
    let err = store
        .allocate_or_reclaim(s, &key(12), &mut || Some(links.clone()))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("5 of 5") && msg.contains("3 of them without a host veth"),
        "{msg}"
    );
    for (i, ip) in ips.iter().enumerate().skip(2) {
        assert_eq!(store.find(&key(i)).unwrap(), Some(*ip), "key {i}");
    }
    // Without the link names nothing is reclaimed; another network's store is never touched.
    age(&store, ips[3], old);
    assert!(store
        .allocate_or_reclaim(s, &key(12), &mut || None)
        .is_err());
    assert_eq!(other.find(&key(0)).unwrap(), Some(theirs));
    let survey = store.survey(s, &links).unwrap();
    assert_eq!(
        (
            survey.allocations,
            survey.live,
            survey.reclaimable,
            survey.young
        ),
        (5, 2, 1, 2)
    );
    assert_eq!(survey.reclaimed_total, 2);
    // The daemon's pass takes it, at most `limit` at a time.
    assert_eq!(
        store
            .reclaim(s, 1, &mut || Some(links.clone()))
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.find(&key(3)).unwrap(), None);
    let log = fs::read_to_string(store.dir().join("reclaim.log")).unwrap();
    assert_eq!(log.lines().count(), 3, "{log}");
    assert!(log.contains("container c3"), "{log}");
}

#[test]
fn a_repeated_add_renews_its_allocations_grace() {
    let dir = tempfile::tempdir().unwrap();
    let store = IpamStore::new(dir.path(), "net").unwrap();
    let s = subnet("10.1.2.0/30"); // 1 pod address
    let ip = store.allocate(s, &key(1)).unwrap();
    age(&store, ip, RECLAIM_GRACE * 2);
    assert_eq!(store.allocate(s, &key(1)).unwrap(), ip);
    assert!(store
        .allocate_or_reclaim(s, &key(2), &mut || Some(HashSet::new()))
        .is_err());
    assert!(store.holds(&key(1), ip).unwrap());
}
