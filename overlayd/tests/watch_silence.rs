//! A lease watch that stays open but sends nothing (issue 10, item 2): the daemon asks etcd for
//! the watch's progress after `--etcd-watch-silence`, gives the watch up when that goes
//! unanswered, lists every lease again, and keeps seeing new leases once etcd answers again.
//! The silence is real: the etcd process is frozen (SIGSTOP), so its sockets stay open.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use overlay_testlab::{free_port, wait_for};

#[test]
fn a_silent_watch_is_caught_by_its_progress_deadline_and_listed_again() {
    let (etcd, dir) = seeded();
    let addr = format!("127.0.0.1:{}", free_port(Ipv4Addr::LOCALHOST));
    // 2 s of silence + 5 s of deadline: well before gRPC's own keep-alive (10 s + 5 s) would
    // notice the frozen server, so it is the progress deadline that is seen here.
    let mut d = leased(
        &etcd.endpoint,
        "127.0.0.61",
        dir.path(),
        &["--metrics-addr", &addr, "--etcd-watch-silence", "2s"],
    );
    wait_for("the lease in the metrics", Duration::from_secs(10), || {
        (leases_gauge(&addr) == Some(1)).then_some(())
    });
    etcd.freeze();
    let frozen = Instant::now();
    d.wait_log(
        "sent nothing, not even the progress asked for",
        Duration::from_secs(14),
    );
    let caught = frozen.elapsed();
    etcd.thaw();
    eprintln!("a frozen etcd's silent watch was given up {caught:?} after the freeze");
    assert!(
        !d.log_text().contains("lease watch lost"),
        "the transport noticed first, not the progress deadline:\n{}",
        d.log_text()
    );
    // Listed again and watching: a new node's lease arrives.
    etcd.put(
        &key("10.244.99.0-24"),
        r#"{"PublicIP":"127.0.0.62","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:62"}}"#,
    );
    wait_for(
        "the new lease after the thaw",
        Duration::from_secs(15),
        || (leases_gauge(&addr) == Some(2)).then_some(()),
    );
}
