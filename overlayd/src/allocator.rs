//! How the daemon uses glibc's allocator. The daemon's live heap is a few bytes per peer, but a
//! cold start or a full pass over 10 000 peers allocates far more for moments (etcd's listing,
//! netlink dumps and their parsed messages); glibc keeps what was freed in the middle of its heap
//! mapped, so without a trim the RSS stays at that peak for ever.

/// glibc gives each thread that allocates (tokio's workers, its blocking pool, the probe thread) an
/// arena of its own, and memory freed in one arena is not reused by another: at 10 000 peers that
/// was a third of the daemon's RSS (bench-scale: 42.6 MB, 31.7 MB with one arena). Two arenas keep
/// contention low for a daemon this size. Call before any thread is started.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread is started.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
    }
}

/// Free memory glibc holds past this is handed back to the kernel by [`trim`].
const KEEP_FREE: usize = 1 << 20;

/// Hands the free pages glibc holds back to the kernel when they are more than [`KEEP_FREE`]:
/// called after a full pass, so the cost (a walk of the free lists, well under a millisecond at
/// 10 000 peers) is paid every resync interval at most.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: both calls only read or release the allocator's own free memory; they take its
    // locks and are safe to call from any thread at any time.
    unsafe {
        if nix::libc::mallinfo2().fordblks > KEEP_FREE {
            nix::libc::malloc_trim(0);
        }
    }
}
