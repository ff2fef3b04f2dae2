//! aws-node (AWS VPC CNI) leftovers. Not implemented yet (issue 5).

use std::process::ExitCode;

use crate::cli::AwsCleanupArgs;

pub async fn run(_args: &AwsCleanupArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("cleanup aws-vpc-cni is not implemented yet")
}
