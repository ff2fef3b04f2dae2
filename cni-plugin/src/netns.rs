//! Network namespaces: checking the runtime's netns path, and opening netlink sockets inside one.
//!
//! A netlink socket belongs to the namespace it was opened in, and setns(2) moves only the calling
//! thread. The plugin runs a current-thread tokio runtime, so the one thread that drives every
//! socket enters the pod's namespace, opens the socket, and comes straight back: from then on the
//! socket talks to the pod's namespace while everything else stays in the host's.

use std::fs::File;
use std::path::Path;

use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::{statfs, NSFS_MAGIC};
use rtnetlink::Handle;

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

/// A netlink connection in this thread's current namespace, driven by the current runtime.
pub fn connect_here() -> Result<Handle, CniError> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| CniError::kernel("cannot open netlink socket", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink connection inside `netns`, opened by entering it and coming back at once.
pub fn connect_in(netns: &File) -> Result<Handle, CniError> {
    let home = File::open("/proc/thread-self/ns/net")
        .map_err(|e| CniError::kernel("cannot open this thread's netns", e))?;
    setns(netns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| CniError::kernel("cannot enter the pod's netns", e))?;
    let handle = connect_here();
    if let Err(e) = setns(&home, CloneFlags::CLONE_NEWNET) {
        // Going on would change the pod's namespace while meaning the host's.
        let err = CniError::kernel("cannot return to the host's netns", e);
        println!("{}", err.to_json(crate::spec::LATEST));
        std::process::exit(1);
    }
    handle
}
