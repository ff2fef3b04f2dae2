//! overlayd as a library: the binary's commands, and the pieces tests drive against real etcd and
//! real namespaces.
//!
//! Dependencies point one way: `cli` → `commands` → (`registry`, `dataplane`, `cleanup`) →
//! kernel/etcd adapters.

pub mod allocator;
pub mod backoff;
pub mod cleanup;
pub mod cli;
pub mod commands;
pub mod config;
pub mod dataplane;
pub mod doctor;
pub mod health;
pub mod ipam_reclaim;
pub mod iptables_tools;
pub mod lease_guard;
pub mod logging;
pub mod netlink;
pub mod node;
pub mod registry;
