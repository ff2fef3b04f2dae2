//! The two kernel switches the data plane depends on. Both are per network namespace.

use std::path::Path;

use super::DataplaneError;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const BRIDGE_NF: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// Writes `value` unless the switch already holds it: in a pod without a writable /proc/sys (the
/// DaemonSet's daemon container) a switch the node-setup init container set is fine as it is.
fn set(key: &str, value: &str) -> Result<(), DataplaneError> {
    let current = match std::fs::read_to_string(key) {
        Ok(v) if v.trim() == value => return Ok(()),
        Ok(v) => v.trim().to_string(),
        Err(e) => format!("unreadable ({e})"),
    };
    std::fs::write(key, value).map_err(|e| DataplaneError::Sysctl {
        key: key.to_string(),
        detail: format!(
            "is {current}, needs {value}, and cannot be set here ({e}): set it on the node \
             (`sysctl -w {}={value}`; the DaemonSet's node-setup init container does) and restart",
            sysctl_name(key)
        ),
    })
}

/// `/proc/sys/net/ipv4/ip_forward` -> `net.ipv4.ip_forward`.
fn sysctl_name(key: &str) -> String {
    key.trim_start_matches("/proc/sys/").replace('/', ".")
}

/// `net.ipv4.ip_forward=1`: pods' packets cross from the bridge to the VTEP and out.
pub fn enable_forwarding() -> Result<(), DataplaneError> {
    set(IP_FORWARD, "1")
}

/// `net.bridge.bridge-nf-call-iptables=1`, loading `br_netfilter` first if its sysctl is absent.
pub async fn enable_bridge_nf_call_iptables() -> Result<(), DataplaneError> {
    if !Path::new(BRIDGE_NF).exists() {
        let loaded = tokio::process::Command::new("modprobe")
            .arg("br_netfilter")
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false);
        if !loaded || !Path::new(BRIDGE_NF).exists() {
            return Err(DataplaneError::Sysctl {
                key: BRIDGE_NF.into(),
                detail: "absent, and `modprobe br_netfilter` did not bring it; load br_netfilter on the host".into(),
            });
        }
    }
    set(BRIDGE_NF, "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_already_set_is_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("ip_forward");
        std::fs::write(&key, "1\n").expect("write");
        let key = key.to_str().expect("utf-8 path");
        // A directory in its place would fail any write: reading "1" must be enough.
        assert!(set(key, "1").is_ok());
    }

    #[test]
    fn a_wrong_switch_that_cannot_be_written_says_what_to_do() {
        let key = "/proc/sys/net/ipv4/no_such_switch_for_overlayd_tests";
        let msg = set(key, "1").expect_err("cannot be written").to_string();
        assert!(
            msg.contains("sysctl -w net.ipv4.no_such_switch_for_overlayd_tests=1")
                && msg.contains("node-setup"),
            "{msg}"
        );
    }
}
