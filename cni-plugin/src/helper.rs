//! A helper process that makes the IPAM store's empty spare files (which the next ADDs rename
//! instead of creating a file: creating one costs 150-450 µs on a busy ext4) while ADD wires the
//! pod, so the two overlap.
//!
//! The plugin reaps it before exiting: nothing the plugin starts outlives it. A process left
//! behind would be adopted by the runtime's reaper (the nearest subreaper, or PID 1 of its pid
//! namespace), and one that never reaps keeps every such process as a zombie. A double fork does
//! not avoid that: the grandchild is adopted by the same reaper.

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use overlay_state::IpamStore;

/// The running helper. Dropping it ends it: what it has not made by then, the next ADD makes.
pub struct SpareMaker(Pid);

impl SpareMaker {
    /// Starts making `store`'s missing spares. Without a fork, nothing: the next ADD makes its
    /// own file.
    pub fn start(store: &IpamStore) -> Option<SpareMaker> {
        // SAFETY: the plugin is single-threaded (no runtime, no thread spawned), so the child is a
        // complete copy of the process, with no lock held by a thread that does not exist in it.
        match unsafe { fork() } {
            Ok(ForkResult::Parent { child }) => Some(SpareMaker(child)),
            Ok(ForkResult::Child) => {
                let _ = store.top_up_spares();
                // Not `exit`: the parent's exit handlers and buffers (its stdout) are not the
                // child's to run or flush.
                // SAFETY: _exit(2) ends the process at once; nothing after it runs.
                unsafe { nix::libc::_exit(0) }
            }
            Err(_) => None,
        }
    }
}

impl Drop for SpareMaker {
    fn drop(&mut self) {
        // Usually done by now (ADD's netlink work takes longer than a few file creations). If
        // not, ADD does not wait for a loaded disk: a kill leaves each spare made whole or not
        // at all (an O_EXCL create either happened or did not), and top_up_spares needs no lock.
        if let Ok(WaitStatus::StillAlive) = waitpid(self.0, Some(WaitPidFlag::WNOHANG)) {
            let _ = kill(self.0, Signal::SIGKILL);
            let _ = waitpid(self.0, None);
        }
    }
}
