//! Issue 11, defect 4: the plugin leaves no process behind. A runtime's reaper (a subreaper, or
//! PID 1 of its pid namespace) adopts whatever outlives the plugin, and one that never reaps keeps
//! each such process as a zombie. This binary holds one test because it makes the whole test
//! process such a subreaper: the orphans of any other test would be counted too.

mod common;

use std::time::Duration;

use common::*;
use overlay_testlab::{require_root, Netns};

/// The pids of this process's children that are zombies, and of those still running.
fn children() -> (Vec<i32>, Vec<i32>) {
    let me = std::process::id() as i32;
    let (mut zombies, mut running) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so from the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() < 2 || fields[1].parse::<i32>().ok() != Some(me) {
            continue;
        }
        if fields[0] == "Z" {
            zombies.push(pid);
        } else {
            running.push(pid);
        }
    }
    (zombies, running)
}

#[test]
fn no_process_outlives_the_plugin_under_a_subreaper_that_never_reaps() {
    if !require_root("no_process_outlives_the_plugin_under_a_subreaper_that_never_reaps") {
        return;
    }
    // From here on this process adopts every orphan of its descendants, and it never waits for
    // one it did not start itself.
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
    let node = Node::new("10.244.19.1/24");
    let (zombies, running) = children();
    assert!(
        zombies.is_empty() && running.is_empty(),
        "{zombies:?} {running:?}"
    );
    const PODS: usize = 12;
    let pods: Vec<Netns> = (0..PODS).map(|_| Netns::new("pd")).collect();
    // A fresh store has no spare files, so ADDs make some; every DEL had a veth to delete.
    for (i, pod) in pods.iter().enumerate() {
        node.add(&format!("reap{i}"), pod);
    }
    for (i, pod) in pods.iter().enumerate() {
        node.del(&format!("reap{i}"), Some(pod)).expect_ok();
    }
    assert!(
        node.store_spares() > 0,
        "no ADD made spares: nothing was tested"
    );
    // Whatever the plugin left running has had ample time to finish (its work takes ~20 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (zombies, running) = loop {
        let (z, r) = children();
        if r.is_empty() || std::time::Instant::now() > deadline {
            break (z, r);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "after {PODS} ADDs and {PODS} DELs: {} zombies, {} still running",
        zombies.len(),
        running.len()
    );
    assert!(
        running.is_empty(),
        "plugin processes still running: {running:?}"
    );
    assert!(
        zombies.is_empty(),
        "{} zombies left: {zombies:?}",
        zombies.len()
    );
}
