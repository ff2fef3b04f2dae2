//! `overlay`: the CNI plugin of overlayd. Hands out pod IPs from the subnet overlayd leased for
//! this node (read from the subnet file, no network call), wires the pod to the node's bridge
//! with a veth pair, and reports the result in the CNI version the runtime asked for.
//!
//! One process per CNI call, so it stays small: one thread, blocking netlink sockets, the IPAM
//! store on local disk, nothing else.
//!
//! Network config keys (all optional but the CNI ones): `subnetFile` (default
//! `/run/overlayd/subnet.env`), `dataDir` (IPAM store root, default `/var/lib/cni/overlay`; the
//! store is `<dataDir>/<name>/`), `bridge` (default `cni0`), `mtu` (default: the subnet file's),
//! `hairpinMode` (default true), `isDefaultGateway` (default true; when false the pod only gets a
//! route to the cluster network via the gateway).
//!
//! Error codes: the spec's 1, 3 (netns gone), 4, 5, 6, 7, 11 (no subnet leased yet), 50 (STATUS),
//! and this plugin's 100 (subnet exhausted), 101 (`CNI_IFNAME` exists in the pod), 102 (CHECK
//! found a difference), 103 (a kernel call failed).

//!
//! A library with the binary beside it: [`request`] (everything the plugin reads from its input,
//! checked before anything on the node changes) is what the fuzz target in `fuzz/` drives.

pub mod commands;
pub mod config;
pub mod error;
pub mod helper;
pub mod link;
pub mod netlink;
pub mod netns;
pub mod request;
pub mod spec;
