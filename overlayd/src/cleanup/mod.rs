//! Removing what other CNIs leave behind on a live node.
//!
//! `aws_vpc_cni` runs the command and writes the report; the other modules each hold one kind of
//! aws-node leftover (how to recognise it, read it and remove it).

pub mod aws_node_process;
pub mod aws_vpc_cni;
pub mod cni_files;
pub mod ip_rules;
pub mod iptables_leftovers;
pub mod iptables_save;
pub mod nft_table;
pub mod pod_veth;
pub mod policy_routing;
