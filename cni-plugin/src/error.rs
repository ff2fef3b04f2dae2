//! CNI errors: a code from the spec (or ≥ 100 for this plugin's own), a message a person can act
//! on, and details. Printed as JSON on stdout, because runtimes parse stdout first.

use serde::Serialize;

/// Codes from the CNI spec, and this plugin's own (≥ 100, as the spec reserves 1–99).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Container unknown or does not exist (here: the netns path is gone).
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid or missing `CNI_*` environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (the IPAM store).
    pub const IO_FAILURE: u32 = 5;
    /// stdin is not JSON.
    pub const DECODE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later: overlayd has not leased a subnet yet.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot add pods right now.
    pub const NOT_AVAILABLE: u32 = 50;
    /// The node's subnet has no free pod address. Not code 11: waiting does not help unless pods
    /// are deleted, and a person should be told so.
    pub const SUBNET_EXHAUSTED: u32 = 100;
    /// ADD: `CNI_IFNAME` already exists in the pod's netns.
    pub const INTERFACE_EXISTS: u32 = 101;
    /// CHECK: what the kernel has differs from the previous result.
    pub const CHECK_MISMATCH: u32 = 102;
    /// A kernel (netlink) or namespace operation failed.
    pub const KERNEL: u32 = 103;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} (code {code})")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn kernel(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        CniError::new(code::KERNEL, format!("{what}: {e}"))
    }

    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Out {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .unwrap_or_else(|_| format!("{{\"code\":{},\"msg\":\"error\"}}", self.code))
    }
}

impl From<overlay_state::IpamError> for CniError {
    fn from(e: overlay_state::IpamError) -> Self {
        use overlay_state::IpamError as E;
        let code = match &e {
            E::Exhausted { .. } => code::SUBNET_EXHAUSTED,
            E::Io { .. } => code::IO_FAILURE,
            E::InvalidNetworkName(_) | E::SubnetTooSmall(_) => code::INVALID_CONFIG,
        };
        CniError::new(code, e.to_string())
    }
}
