//! One module per CNI command.

pub mod add;
pub mod check;
pub mod del;
pub mod gc;
pub mod status;
pub mod version;

use overlay_state::{SubnetFile, SubnetFileError};

use crate::config::NetConf;
use crate::error::{code, CniError};

/// The node's subnet as overlayd wrote it. Missing → "try again later" with how to find out why.
pub fn read_subnet_file(conf: &NetConf) -> Result<SubnetFile, CniError> {
    SubnetFile::read(&conf.subnet_file).map_err(subnet_file_error)
}

/// The CNI error for a subnet file that cannot be used.
pub fn subnet_file_error(e: SubnetFileError) -> CniError {
    match e {
        SubnetFileError::Missing { path } => {
            let details = format!("subnetFile {}", path.display());
            CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "overlayd has not leased a subnet on this node yet ({} does not exist); \
                 check that overlayd runs on this node and reaches etcd: \
                 `kubectl -n kube-system logs ds/overlayd` (the pod on this node), \
                 `cat {}` once it has a lease",
                    path.display(),
                    path.display()
                ),
            )
            .with_details(details)
        }
        other => CniError::new(
            code::TRY_AGAIN_LATER,
            format!("cannot use the subnet file overlayd writes: {other}"),
        ),
    }
}
