//! `overlayd cleanup aws-vpc-cni`.

use std::process::ExitCode;

use crate::cli::{CleanupArgs, CleanupTarget};

pub async fn run(args: CleanupArgs) -> anyhow::Result<ExitCode> {
    match args.target {
        CleanupTarget::AwsVpcCni(a) => crate::cleanup::aws_vpc_cni::run(&a).await,
    }
}
