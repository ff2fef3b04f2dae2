//! Which boot of the node this is: the kernel's boot id, a random UUID made at every boot.
//! Allocations the IPAM store holds from another boot belong to sandboxes that no longer exist
//! (every sandbox is new after a boot), so the store drops them (see `ipam_store/boot.rs`).

use std::path::PathBuf;

pub const KERNEL_BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Reads the boot id from this file instead of the kernel's: for tests that simulate a reboot.
/// It can only make the store see a reboot when the file's content changes: a missing,
/// unreadable or malformed file gives no boot id, and then nothing is ever dropped; a file that
/// stays the same is one long boot. Only whoever sets the runtime's environment (root) can set it.
pub const BOOT_ID_FILE_ENV: &str = "OVERLAY_BOOT_ID_FILE";

/// The current boot's id, or None if it cannot be read (then no allocation is ever dropped for
/// belonging to another boot).
pub fn current_boot_id() -> Option<String> {
    let path = std::env::var_os(BOOT_ID_FILE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(KERNEL_BOOT_ID));
    let text = std::fs::read_to_string(path).ok()?;
    let id = text.trim();
    let ok = (8..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    ok.then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_gives_a_boot_id() {
        if std::env::var_os(super::BOOT_ID_FILE_ENV).is_none() {
            let id = super::current_boot_id().expect("boot id");
            assert_eq!(id.len(), 36, "{id}");
        }
    }
}
