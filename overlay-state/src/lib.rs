//! Node-local state that overlayd and the `overlay` CNI plugin both read or write.
//!
//! Kept free of async runtimes and etcd so the plugin, a short-lived process started for every pod,
//! links only what it needs.

pub mod ipam_store;
pub mod subnet_file;

pub use ipam_store::{AttachmentKey, IpamError, IpamStore};
pub use subnet_file::{SubnetFile, SubnetFileError, DEFAULT_SUBNET_FILE};

/// `0a:58:<ip>`, the locally administered prefix Kubernetes' network plugins use for MACs derived
/// from an IPv4 address. Used for pods (a reused IP never leaves a stale ARP entry behind in its
/// neighbours) and for the bridge, whichever of daemon and plugin creates it: its MAC must not
/// change as ports come and go, or pods keep a stale ARP entry for their gateway.
pub fn ip_mac(ip: std::net::Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}
