//! The CNI spec's versions and result shapes.
//!
//! One result type serves every version; [`CniResult::for_version`] shapes it for the version the
//! runtime asked for (0.3.x/0.4.0 carry `"version"` in each IP; 1.1.0 adds `mtu` to interfaces).
//! Unknown fields of a previous plugin's result are kept, so chaining loses nothing.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        Some(match s {
            "0.3.0" => Version::V0_3_0,
            "0.3.1" => Version::V0_3_1,
            "0.4.0" => Version::V0_4_0,
            "1.0.0" => Version::V1_0_0,
            "1.1.0" => Version::V1_1_0,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// CHECK arrived with 0.4.0.
    pub fn supports_check(self) -> bool {
        self >= Version::V0_4_0
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Only in 0.3.x/0.4.0 results: "4" or "6".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// CIDR notation: the address with its subnet's prefix length.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    #[serde(default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CniResult {
    /// This result as the runtime that asked for `version` expects it.
    pub fn for_version(mut self, version: Version) -> CniResult {
        self.cni_version = version.as_str().to_string();
        let old = version < Version::V1_0_0;
        for ip in &mut self.ips {
            ip.version = old.then(|| if ip.address.contains(':') { "6" } else { "4" }.to_string());
        }
        if version < Version::V1_1_0 {
            for i in &mut self.interfaces {
                i.mtu = None;
                i.extra.remove("socketPath");
                i.extra.remove("pciID");
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "0a:58:0a:f4:07:05".into(),
                mtu: Some(1450),
                sandbox: Some("/var/run/netns/x".into()),
                ..Default::default()
            }],
            ips: vec![IpConfig {
                address: "10.244.7.5/24".into(),
                gateway: Some("10.244.7.1".into()),
                interface: Some(0),
                ..Default::default()
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("10.244.7.1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn old_versions_carry_ip_version_and_no_mtu() {
        for v in ["0.3.0", "0.3.1", "0.4.0"] {
            let r = serde_json::to_value(sample().for_version(Version::parse(v).unwrap())).unwrap();
            assert_eq!(r["cniVersion"], v);
            assert_eq!(r["ips"][0]["version"], "4");
            assert!(r["interfaces"][0].get("mtu").is_none());
        }
    }

    #[test]
    fn new_versions_have_no_ip_version() {
        let r = serde_json::to_value(sample().for_version(Version::V1_0_0)).unwrap();
        assert!(r["ips"][0].get("version").is_none());
        assert!(r["interfaces"][0].get("mtu").is_none());
        let r = serde_json::to_value(sample().for_version(Version::V1_1_0)).unwrap();
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["interfaces"][0]["mtu"], 1450);
        assert_eq!(r["ips"][0]["interface"], 0);
        assert_eq!(r["routes"][0]["gw"], "10.244.7.1");
    }

    #[test]
    fn previous_results_round_trip_with_unknown_fields() {
        let text = r#"{"cniVersion":"0.4.0","interfaces":[{"name":"x","sandbox":"/n","pciID":"p"}],
            "ips":[{"version":"6","address":"fd00::2/64","interface":0}],
            "routes":[{"dst":"fd00::/8","mtu":1400}],"dns":{"nameservers":["1.1.1.1"]},"foo":1}"#;
        let r: CniResult = serde_json::from_str(text).unwrap();
        let v = serde_json::to_value(r.for_version(Version::V1_1_0)).unwrap();
        assert_eq!(v["foo"], 1);
        assert_eq!(v["routes"][0]["mtu"], 1400);
        assert_eq!(v["dns"]["nameservers"][0], "1.1.1.1");
        assert_eq!(v["interfaces"][0]["pciID"], "p");
        assert!(v["ips"][0].get("version").is_none());
    }
}
