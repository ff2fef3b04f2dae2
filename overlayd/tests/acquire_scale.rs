//! 1 000 acquisitions by concurrent acquirers against one real etcd (issue 10): the claim
//! transaction (`create_revision == 0`) must never hand one subnet to two nodes, also when the
//! pool fills up and most random picks collide.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use overlay_testlab::Etcd;
use overlayd::registry::{self, Registry};

const ACQUIRERS: u32 = 1000;
/// Acquirers in flight at once, each with its own client like separate nodes.
const CONCURRENT: usize = 32;

#[test]
fn thousand_concurrent_acquisitions_never_share_a_subnet() {
    let etcd = Etcd::start();
    // 1 023 leasable /24s (SubnetMin defaults to the second): the last picks race for few.
    etcd.put(
        &format!("{PREFIX}/config"),
        r#"{"Network":"10.0.0.0/14","SubnetLen":24}"#,
    );
    let rt = rt();
    let started = Instant::now();
    let won: Vec<(Ipv4Addr, ipnetwork::Ipv4Network)> = rt.block_on(async {
        let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENT));
        let mut tasks = Vec::new();
        for i in 0..ACQUIRERS {
            let args = etcd_args(&etcd.endpoint);
            let gate = gate.clone();
            tasks.push(tokio::spawn(async move {
                let _slot = gate.acquire_owned().await.expect("semaphore");
                let reg = Registry::connect(&args).await.expect("connect");
                let (cfg, _) = reg.network_config().await.expect("config");
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i);
                let req = request(ip, Duration::from_secs(600));
                // A lost race picks again inside acquire; a run of losses is retried here.
                for _ in 0..20 {
                    match registry::acquire(&reg, &cfg, &req).await {
                        Ok(a) => return (ip, a.subnet),
                        Err(registry::AcquireError::Contended(_)) => continue,
                        Err(e) => panic!("acquirer {ip}: {e}"),
                    }
                }
                panic!("acquirer {ip} lost 20 rounds of races")
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("acquirer task"));
        }
        out
    });
    let took = started.elapsed();
    let mut holders: BTreeMap<ipnetwork::Ipv4Network, Vec<Ipv4Addr>> = BTreeMap::new();
    for (ip, s) in &won {
        holders.entry(*s).or_default().push(*ip);
    }
    let shared: Vec<_> = holders.iter().filter(|(_, h)| h.len() > 1).collect();
    eprintln!(
        "{} acquisitions ({CONCURRENT} at a time) in {took:?}: {} distinct subnets, {} shared",
        won.len(),
        holders.len(),
        shared.len()
    );
    assert!(
        shared.is_empty(),
        "subnets held by two acquirers: {shared:?}"
    );
    assert_eq!(won.len(), ACQUIRERS as usize);
    // etcd agrees: one key per acquirer, each naming its winner.
    let keys: BTreeSet<String> = etcd
        .keys(&format!("{PREFIX}/subnets/"))
        .into_iter()
        .collect();
    let expected: BTreeSet<String> = holders.keys().map(subnet_key).collect();
    assert_eq!(keys, expected);
}
