//! Work a command leaves for after its answer, done by a detached child so that the runtime, which
//! waits for the plugin to exit and for its stdout to close, does not wait for it:
//!
//! - after DEL, deleting the host veth: the kernel finishes only after an RCU grace period (about
//!   20 ms here, against about 2 ms for the rest of a DEL);
//! - after ADD, making the IPAM store's empty spare files that the next ADDs rename instead of
//!   creating a file (creating one costs 150-450 µs on a busy ext4).
//!
//! The link is named by index, not by name: a new ADD for the same attachment may meanwhile
//! create a host veth of the same name (after removing this one), and that one must survive.
//! Whoever else meets the link first (the runtime removing the pod's netns takes the pair with
//! it, a new ADD of the same attachment, or GC) deletes it instead; all of them tolerate its
//! absence.
//!
//! The child is orphaned when the plugin exits and adopted, then reaped, by init (or by the
//! nearest ancestor that made itself a subreaper).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsFd;

use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout, fork, setsid, ForkResult};
use overlay_state::IpamStore;

use crate::link;
use crate::netlink::Netlink;

pub enum Later {
    /// Delete link `index` of the node's netns.
    DeleteLink(u32),
    /// Make the store's missing empty spares.
    TopUpSpares(IpamStore),
}

impl Later {
    fn run(self) {
        match self {
            Later::DeleteLink(index) => {
                if let Ok(mut nl) = Netlink::open() {
                    let _ = link::delete_by_index(&mut nl, index);
                }
            }
            Later::TopUpSpares(store) => {
                let _ = store.top_up_spares();
            }
        }
    }
}

/// Runs `later` in a detached child. Without a child, a link is deleted in place, and spares are
/// left for another time (the next ADD makes its own file).
pub fn after_answer(later: Later) {
    // Whatever the parent still has buffered must not be written twice.
    let _ = std::io::stdout().flush();
    // SAFETY: the plugin is single-threaded (no runtime, no thread spawned), so the child is a
    // complete copy of the process, with no lock held by a thread that does not exist in it.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => {}
        Ok(ForkResult::Child) => {
            detach();
            later.run();
            // Not `exit`: the parent's exit handlers and buffers are not the child's to run.
            // SAFETY: _exit(2) ends the process at once; nothing after it runs.
            unsafe { nix::libc::_exit(0) }
        }
        Err(_) => {
            if let Later::DeleteLink(_) = later {
                later.run();
            }
        }
    }
}

/// Lets go of the runtime: stdin, stdout and stderr to /dev/null (the runtime reads stdout until
/// every copy of it is closed), and a session of its own.
fn detach() {
    if let Ok(null) = OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = dup2_stdin(null.as_fd());
        let _ = dup2_stdout(null.as_fd());
        let _ = dup2_stderr(null.as_fd());
    }
    let _ = setsid();
}
