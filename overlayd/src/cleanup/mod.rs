//! Removing what other CNIs leave behind on a live node.

pub mod aws_vpc_cni;
