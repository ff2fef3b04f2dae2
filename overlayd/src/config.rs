//! The cluster network config stored at `<prefix>/config` (flannel's schema, so a cluster seeded for
//! flannel works as is):
//!
//! `{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1,"Port":8472}}`

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde_json::{Map, Value};

/// What an operator should put into etcd; shown in every config error.
pub const EXAMPLE_CONFIG: &str =
    r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}"#;

pub const DEFAULT_SUBNET_LEN: u8 = 24;
pub const DEFAULT_VNI: u32 = 1;
/// The Linux kernel's and flannel's VXLAN port (not IANA's 4789).
pub const DEFAULT_PORT: u16 = 8472;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Network,
    pub subnet_len: u8,
    /// Network address of the first subnet nodes may lease.
    pub subnet_min: Ipv4Addr,
    /// Network address of the last subnet nodes may lease.
    pub subnet_max: Ipv4Addr,
    pub backend: Backend,
}

impl NetworkConfig {
    /// The fields in which `new` differs from `self` that a running daemon cannot apply (they
    /// renumber subnets or rebuild the VTEP): they take effect at the next restart.
    /// `Backend.DirectRouting` is applied live and is not among them.
    pub fn restart_needed_for(&self, new: &NetworkConfig) -> Vec<&'static str> {
        let (a, b) = (self, new);
        [
            ("Network", a.network != b.network),
            ("SubnetLen", a.subnet_len != b.subnet_len),
            ("SubnetMin", a.subnet_min != b.subnet_min),
            ("SubnetMax", a.subnet_max != b.subnet_max),
            ("Backend.VNI", a.backend.vni != b.backend.vni),
            ("Backend.Port", a.backend.port != b.backend.port),
            ("Backend.MTU", a.backend.mtu != b.backend.mtu),
        ]
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub vni: u32,
    pub port: u16,
    pub mtu: Option<u32>,
    pub direct_routing: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "the network config is not JSON ({reason}); found {found:?}. overlayd reads the etcd v3 API \
         only: seed it with `ETCDCTL_API=3 etcdctl put <prefix>/config '{example}'`",
        example = EXAMPLE_CONFIG
    )]
    NotJson { reason: String, found: String },
    #[error(
        "the network config must be a JSON object, found {found}; expected e.g. {example}",
        example = EXAMPLE_CONFIG
    )]
    NotObject { found: String },
    #[error("invalid network config: field {field} = {value}: {problem}")]
    Field {
        field: &'static str,
        value: String,
        problem: String,
    },
}

fn field_err(field: &'static str, value: &Value, problem: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        value: value.to_string(),
        problem: problem.into(),
    }
}

impl NetworkConfig {
    /// Parses and validates the raw etcd value. Returns the config and warnings (unknown fields).
    pub fn parse(raw: &[u8]) -> Result<(NetworkConfig, Vec<String>), ConfigError> {
        let shown = || {
            let s = String::from_utf8_lossy(raw);
            let s: String = s.chars().take(80).collect();
            s
        };
        let value: Value = serde_json::from_slice(raw).map_err(|e| ConfigError::NotJson {
            reason: e.to_string(),
            found: shown(),
        })?;
        let Value::Object(obj) = value else {
            return Err(ConfigError::NotObject { found: shown() });
        };
        let mut warnings = Vec::new();
        unknown_fields(
            &obj,
            &[
                "Network",
                "SubnetLen",
                "SubnetMin",
                "SubnetMax",
                "Backend",
                "EnableIPv4",
                "EnableIPv6",
                "IPv6Network",
            ],
            "",
            &mut warnings,
        );

        let network = match obj.get("Network") {
            None | Some(Value::Null) => {
                return Err(field_err(
                    "Network",
                    &Value::Null,
                    format!(
                    "required: the cluster's pod network as an IPv4 CIDR, e.g. {EXAMPLE_CONFIG}"
                ),
                ))
            }
            Some(v) => {
                let s = v.as_str().ok_or_else(|| {
                    field_err("Network", v, "must be a string such as \"10.244.0.0/16\"")
                })?;
                let n: Ipv4Network =
                    s.parse().ok().filter(|_| s.contains('/')).ok_or_else(|| {
                        field_err("Network", v, "not an IPv4 CIDR such as \"10.244.0.0/16\"")
                    })?;
                if n.ip() != n.network() {
                    return Err(field_err(
                        "Network",
                        v,
                        format!(
                            "host bits are set; did you mean \"{}/{}\"?",
                            n.network(),
                            n.prefix()
                        ),
                    ));
                }
                if n.prefix() > 28 {
                    return Err(field_err("Network", v, "must be a /28 or larger"));
                }
                n
            }
        };

        let subnet_len = match obj.get("SubnetLen") {
            None | Some(Value::Null) => {
                if DEFAULT_SUBNET_LEN <= network.prefix() {
                    return Err(field_err(
                        "SubnetLen",
                        &Value::Null,
                        format!(
                            "defaults to {DEFAULT_SUBNET_LEN}, which is not longer than Network's /{}; \
                             set SubnetLen between {} and 30",
                            network.prefix(),
                            network.prefix() + 1
                        ),
                    ));
                }
                DEFAULT_SUBNET_LEN
            }
            Some(v) => {
                let n = v.as_u64().ok_or_else(|| {
                    field_err("SubnetLen", v, "must be a whole number such as 24")
                })?;
                if n <= u64::from(network.prefix()) || n > 30 {
                    return Err(field_err(
                        "SubnetLen",
                        v,
                        format!(
                            "must be longer than Network's prefix /{} and at most 30",
                            network.prefix()
                        ),
                    ));
                }
                n as u8
            }
        };

        let size = 1u32 << (32 - subnet_len);
        let first = u32::from(network.network());
        let last = first + ((1u64 << (32 - network.prefix())) as u32).wrapping_sub(size);
        let bound = |field: &'static str, default: u32| -> Result<Ipv4Addr, ConfigError> {
            match obj.get(field) {
                None | Some(Value::Null) => Ok(Ipv4Addr::from(default)),
                Some(v) => {
                    let ip: Ipv4Addr = v
                        .as_str()
                        .and_then(|s| s.split('/').next())
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| {
                            field_err(field, v, "not an IPv4 address such as \"10.244.1.0\"")
                        })?;
                    if !network.contains(ip) {
                        return Err(field_err(field, v, format!("is outside Network {network}")));
                    }
                    if u32::from(ip) % size != 0 {
                        return Err(field_err(
                            field,
                            v,
                            format!("is not the first address of a /{subnet_len} subnet"),
                        ));
                    }
                    Ok(ip)
                }
            }
        };
        // flannel's defaults: skip the first subnet (its .0 would look like the network address).
        let default_min = if last > first { first + size } else { first };
        let subnet_min = bound("SubnetMin", default_min)?;
        let subnet_max = bound("SubnetMax", last)?;
        if u32::from(subnet_min) > u32::from(subnet_max) {
            return Err(field_err(
                "SubnetMin",
                &Value::String(subnet_min.to_string()),
                format!("is above SubnetMax {subnet_max}"),
            ));
        }

        let backend = parse_backend(obj.get("Backend"), &mut warnings)?;
        Ok((
            NetworkConfig {
                network,
                subnet_len,
                subnet_min,
                subnet_max,
                backend,
            },
            warnings,
        ))
    }

    /// Number of subnets nodes may lease.
    pub fn capacity(&self) -> u32 {
        let size = 1u32 << (32 - self.subnet_len);
        (u32::from(self.subnet_max) - u32::from(self.subnet_min)) / size + 1
    }

    /// Every leasable subnet, in order.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Network> + '_ {
        let size = 1u32 << (32 - self.subnet_len);
        let min = u32::from(self.subnet_min);
        (0..self.capacity()).filter_map(move |i| {
            Ipv4Network::new(Ipv4Addr::from(min + i * size), self.subnet_len).ok()
        })
    }

    /// Whether `subnet` is one this config lets a node lease.
    pub fn is_leasable(&self, subnet: &Ipv4Network) -> bool {
        subnet.prefix() == self.subnet_len
            && subnet.ip() == subnet.network()
            && u32::from(subnet.network()) >= u32::from(self.subnet_min)
            && u32::from(subnet.network()) <= u32::from(self.subnet_max)
    }
}

fn parse_backend(v: Option<&Value>, warnings: &mut Vec<String>) -> Result<Backend, ConfigError> {
    let empty = Map::new();
    let obj = match v {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(field_err(
                "Backend",
                other,
                "must be an object such as {\"Type\":\"vxlan\",\"VNI\":1}",
            ))
        }
    };
    unknown_fields(
        obj,
        &[
            "Type",
            "VNI",
            "Port",
            "MTU",
            "DirectRouting",
            "GBP",
            "Learning",
            "VNIv6",
            "MacPrefix",
        ],
        "Backend.",
        warnings,
    );
    match obj.get("Type") {
        None | Some(Value::Null) => {}
        Some(t) if t.as_str().map(|s| s.eq_ignore_ascii_case("vxlan")) == Some(true) => {}
        Some(t) => {
            return Err(field_err(
                "Backend.Type",
                t,
                "unsupported backend: overlayd implements \"vxlan\" only",
            ))
        }
    }
    let number =
        |field: &'static str, key: &str, min: u64, max: u64| -> Result<Option<u64>, ConfigError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                    _ => Err(field_err(
                        field,
                        v,
                        format!("must be a whole number from {min} to {max}"),
                    )),
                },
            }
        };
    let vni = number("Backend.VNI", "VNI", 1, 16_777_215)?.map_or(DEFAULT_VNI, |n| n as u32);
    let port = number("Backend.Port", "Port", 1, 65_535)?.map_or(DEFAULT_PORT, |n| n as u16);
    let mtu = number("Backend.MTU", "MTU", 576, 65_535)?.map(|n| n as u32);
    let direct_routing = match obj.get("DirectRouting") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(field_err(
                "Backend.DirectRouting",
                v,
                "must be true or false",
            ))
        }
    };
    Ok(Backend {
        vni,
        port,
        mtu,
        direct_routing,
    })
}

fn unknown_fields(
    obj: &Map<String, Value>,
    known: &[&str],
    path: &str,
    warnings: &mut Vec<String>,
) {
    for key in obj.keys() {
        if !known.contains(&key.as_str()) {
            warnings.push(format!(
                "network config: unknown field {path}{key} is ignored"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(s.as_bytes()).map(|(c, _)| c)
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn defaults_follow_flannel() {
        let c = parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(c.capacity(), 255);
        assert_eq!(
            c.backend,
            Backend {
                vni: 1,
                port: 8472,
                mtu: None,
                direct_routing: false
            }
        );
    }

    #[test]
    fn small_network_subnets() {
        let c =
            parse(r#"{"Network":"10.9.0.0/26","SubnetLen":28,"SubnetMin":"10.9.0.0"}"#).unwrap();
        let all: Vec<String> = c.subnets().map(|s| s.to_string()).collect();
        assert_eq!(
            all,
            [
                "10.9.0.0/28",
                "10.9.0.16/28",
                "10.9.0.32/28",
                "10.9.0.48/28"
            ]
        );
        assert!(c.is_leasable(&"10.9.0.16/28".parse().unwrap()));
        assert!(!c.is_leasable(&"10.9.0.16/27".parse().unwrap()));
    }

    #[test]
    fn unknown_fields_warn() {
        let (_, w) = NetworkConfig::parse(
            br#"{"Network":"10.0.0.0/8","Foo":1,"Backend":{"Type":"vxlan","Bar":2}}"#,
        )
        .unwrap();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("Foo"));
        assert!(w[1].contains("Backend.Bar"));
    }

    #[test]
    fn errors_name_the_field_and_value() {
        assert!(err("hello").contains("not JSON"));
        assert!(err("hello").contains("ETCDCTL_API=3"));
        assert!(err("[1]").contains("JSON object"));
        let e = err(r#"{"Network":"10.244.0.0"}"#);
        assert!(
            e.contains("Network") && e.contains("\"10.244.0.0\"") && e.contains("IPv4 CIDR"),
            "{e}"
        );
        let e = err(r#"{"Network":"fd00::/8"}"#);
        assert!(e.contains("Network"), "{e}");
        let e = err(r#"{"Network":"10.244.0.0/16","SubnetLen":16}"#);
        assert!(
            e.contains("SubnetLen = 16") && e.contains("longer than"),
            "{e}"
        );
        let e = err(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.1.0.0"}"#);
        assert!(
            e.contains("SubnetMin") && e.contains("outside Network 10.244.0.0/16"),
            "{e}"
        );
        let e = err(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#);
        assert!(e.contains("Backend.Type = \"host-gw\""), "{e}");
        let e = err(r#"{"Network":"10.244.0.0/16","Backend":{"VNI":0}}"#);
        assert!(e.contains("Backend.VNI"), "{e}");
        let e = err(r#"{"SubnetLen":24}"#);
        assert!(e.contains("Network") && e.contains("required"), "{e}");
        let e = err(r#"{"Network":"10.244.0.0/25"}"#);
        assert!(
            e.contains("SubnetLen") && e.contains("defaults to 24"),
            "{e}"
        );
    }

    #[test]
    fn only_direct_routing_changes_apply_without_a_restart() {
        let a = parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let b =
            parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#)
                .unwrap();
        assert!(a.restart_needed_for(&b).is_empty());
        let c = parse(r#"{"Network":"10.245.0.0/16","Backend":{"Type":"vxlan","VNI":2}}"#).unwrap();
        assert_eq!(
            a.restart_needed_for(&c),
            ["Network", "SubnetMin", "SubnetMax", "Backend.VNI"]
        );
    }
}
