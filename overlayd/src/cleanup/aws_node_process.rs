//! Is aws-node still running on this node? Cleaning up under a live ipamd is pointless: it puts its
//! rules back. ipamd's binary is `aws-k8s-agent`; it serves the CNI plugin on 127.0.0.1:50051.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

/// ipamd's process name (`/proc/<pid>/comm`).
pub const IPAMD_COMM: &str = "aws-k8s-agent";
/// ipamd's gRPC endpoint for the `aws-cni` plugin.
pub const IPAMD_PORT: u16 = 50051;

/// The pid of a running ipamd, looking through `proc` (only the processes this pid namespace sees:
/// in a pod, that takes `hostPID`).
pub fn find_ipamd(proc: &Path) -> Option<u32> {
    std::fs::read_dir(proc).ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim_end() == IPAMD_COMM).then_some(pid)
    })
}

/// True when something accepts connections on 127.0.0.1:50051 in this network namespace.
pub async fn ipamd_port_open() -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, IPAMD_PORT));
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr)
        )
        .await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ipamd_by_comm() {
        let proc = tempfile::tempdir().expect("tempdir");
        for (pid, comm) in [
            ("1", "systemd\n"),
            ("42", "aws-k8s-agent\n"),
            ("self", "x\n"),
        ] {
            std::fs::create_dir(proc.path().join(pid)).expect("mkdir");
            std::fs::write(proc.path().join(pid).join("comm"), comm).expect("write");
        }
        assert_eq!(find_ipamd(proc.path()), Some(42));
        std::fs::write(proc.path().join("42").join("comm"), "bash\n").expect("write");
        assert_eq!(find_ipamd(proc.path()), None);
    }
}
