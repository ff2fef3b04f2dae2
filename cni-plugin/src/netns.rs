//! Network namespaces: checking the runtime's netns path, and opening netlink sockets inside one.
//!
//! A netlink socket belongs to the namespace it was opened in, whatever namespace the thread
//! moves to afterwards: see [`connect_node_and_pod`].

use std::fs::File;
use std::path::Path;

use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::{statfs, NSFS_MAGIC};

use crate::netlink::Netlink;

use crate::error::{code, CniError};

/// The runtime's netns path must exist and be a network namespace (nsfs).
pub fn check_netns_path(path: &Path) -> Result<(), CniError> {
    match statfs(path) {
        Ok(s) if s.filesystem_type() == NSFS_MAGIC => Ok(()),
        Ok(_) => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {} is not a network namespace", path.display()),
        )),
        Err(Errno::ENOENT) => Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "CNI_NETNS {} does not exist: the pod sandbox is gone",
                path.display()
            ),
        )),
        Err(e) => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {}: {e}", path.display()),
        )),
    }
}

pub fn open(path: &Path) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            code::UNKNOWN_CONTAINER
        } else {
            code::INVALID_ENV
        };
        CniError::new(code, format!("cannot open netns {}: {e}", path.display()))
    })
}

/// A netlink socket in this thread's current namespace.
pub fn connect_here() -> Result<Netlink, CniError> {
    Netlink::open().map_err(|e| CniError::kernel("cannot open netlink socket", e))
}

/// Netlink sockets in the node's namespace (the current one) and in the pod's `netns`.
///
/// The thread enters the pod's namespace to open the second socket and stays there: a socket
/// keeps the namespace it was opened in, and the plugin opens no other afterwards. (Coming back
/// would cost opening `/proc/thread-self/ns/net` and a second setns, for nothing.) Paths are not
/// affected by the network namespace, so the IPAM store is the node's either way.
pub fn connect_node_and_pod(netns: &File) -> Result<(Netlink, Netlink), CniError> {
    let node = connect_here()?;
    setns(netns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| CniError::kernel("cannot enter the pod's netns", e))?;
    let pod = connect_here()?;
    Ok((node, pod))
}
