//! The two kernel switches the data plane depends on. Both are per network namespace.

use std::path::Path;

use super::DataplaneError;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const BRIDGE_NF: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

fn set(key: &str, value: &str) -> Result<(), DataplaneError> {
    let err = |detail: String| DataplaneError::Sysctl {
        key: key.to_string(),
        detail,
    };
    match std::fs::read_to_string(key) {
        Ok(v) if v.trim() == value => Ok(()),
        _ => std::fs::write(key, value).map_err(|e| err(format!("cannot set to {value}: {e}"))),
    }
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
