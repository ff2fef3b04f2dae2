//! Node-local state that overlayd and the `overlay` CNI plugin both read or write.
//!
//! Kept free of async runtimes and etcd so the plugin, a short-lived process started for every pod,
//! links only what it needs.

pub mod boot;
pub mod ipam_store;
pub mod subnet_file;

pub use boot::current_boot_id;
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

fn attachment_hash(container_id: &str, ifname: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id
        .bytes()
        .chain(std::iter::once(0))
        .chain(ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The host end of a pod's veth pair: its name, derived from the attachment so that DEL and GC find it without the pod's
/// netns, and a retried ADD finds what a killed one left: `veth` + 11 hex digits of FNV-1a.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    format!("veth{:011x}", attachment_hash(container_id, ifname) >> 20)
}

/// The host end's MAC, from the same hash (locally administered, unicast): set by the plugin so
/// that ADD need not read it back from the kernel.
pub fn host_veth_mac(container_id: &str, ifname: &str) -> [u8; 6] {
    let h = attachment_hash(container_id, ifname).to_be_bytes();
    [0x0e, h[0], h[1], h[2], h[3], h[4]]
}
