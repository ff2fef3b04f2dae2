//! The JSON stored in each subnet key, as flannel writes it:
//! `{"PublicIP":"192.168.1.10","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}`

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use crate::node::Mac;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(rename = "BackendType", default)]
    pub backend_type: String,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<BackendData>,
    #[serde(rename = "NodeName", default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendData {
    #[serde(rename = "VNI", default)]
    pub vni: u32,
    #[serde(rename = "VtepMAC", default)]
    pub vtep_mac: String,
}

impl LeaseValue {
    pub fn vxlan(public_ip: Ipv4Addr, vni: u32, mac: Mac, node_name: &str) -> LeaseValue {
        LeaseValue {
            public_ip,
            backend_type: "vxlan".into(),
            backend_data: Some(BackendData {
                vni,
                vtep_mac: mac.to_string(),
            }),
            node_name: Some(node_name.to_string()),
        }
    }

    pub fn to_json(&self) -> String {
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn vtep_mac(&self) -> Option<Mac> {
        self.backend_data.as_ref()?.vtep_mac.parse().ok()
    }
}

/// One subnet key as read from etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub subnet: Ipv4Network,
    /// `None` when the value is not JSON we understand (written by something else).
    pub value: Option<LeaseValue>,
    /// etcd lease id; 0 for a reservation.
    pub lease_id: i64,
    pub mod_revision: i64,
}

impl Lease {
    pub fn is_reservation(&self) -> bool {
        self.lease_id == 0
    }

    pub fn public_ip(&self) -> Option<Ipv4Addr> {
        self.value.as_ref().map(|v| v.public_ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_flannel_values_and_ignores_unknown_fields() {
        let v: LeaseValue = serde_json::from_str(
            r#"{"PublicIP":"192.168.1.10","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
        )
        .unwrap();
        assert_eq!(v.public_ip, Ipv4Addr::new(192, 168, 1, 10));
        assert_eq!(v.vtep_mac().unwrap().to_string(), "aa:bb:cc:dd:ee:ff");
        // A reservation written by hand may hold only the PublicIP.
        let r: LeaseValue = serde_json::from_str(r#"{"PublicIP":"192.168.1.11"}"#).unwrap();
        assert_eq!(r.vtep_mac(), None);
    }

    #[test]
    fn writes_flannel_shape() {
        let mac: Mac = "02:00:00:00:00:01".parse().unwrap();
        let v = LeaseValue::vxlan(Ipv4Addr::new(192, 0, 2, 1), 1, mac, "node-a");
        assert_eq!(
            v.to_json(),
            r#"{"PublicIP":"192.0.2.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"},"NodeName":"node-a"}"#
        );
    }
}
