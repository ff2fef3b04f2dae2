//! Node-local state that overlayd and the `overlay` CNI plugin both read or write.
//!
//! Kept free of async runtimes and etcd so the plugin, a short-lived process started for every pod,
//! links only what it needs.

pub mod ipam_store;
pub mod subnet_file;

pub use ipam_store::{AttachmentKey, IpamError, IpamStore};
pub use subnet_file::{SubnetFile, SubnetFileError, DEFAULT_SUBNET_FILE};
