//! The last step of DEL, done after the plugin has answered: deleting the host veth, which the
//! kernel finishes only after an RCU grace period (about 20 ms here, against about 2 ms for the
//! rest of a DEL). The runtime waits for the plugin to exit and for its stdout to close; a child
//! that holds neither lets it go on while the deletion completes.
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

use crate::link;
use crate::netlink::Netlink;

/// Deletes link `index` of the current netns without making the caller wait for the kernel.
/// Falls back to deleting it in place if no child process can be made.
pub fn delete_link_later(index: u32) {
    // Whatever the parent still has buffered must not be written twice.
    let _ = std::io::stdout().flush();
    // SAFETY: the plugin is single-threaded (no runtime, no thread spawned), so the child is a
    // complete copy of the process, with no lock held by a thread that does not exist in it.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => {}
        Ok(ForkResult::Child) => {
            detach();
            if let Ok(mut nl) = Netlink::open() {
                let _ = link::delete_by_index(&mut nl, index);
            }
            // Not `exit`: the parent's exit handlers and buffers are not the child's to run.
            // SAFETY: _exit(2) ends the process at once; nothing after it runs.
            unsafe { nix::libc::_exit(0) }
        }
        Err(_) => {
            if let Ok(mut nl) = Netlink::open() {
                let _ = link::delete_by_index(&mut nl, index);
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
