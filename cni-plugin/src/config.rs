//! What one invocation is given: the network configuration on stdin and the `CNI_*` environment.
//! Everything is validated here, before anything on the node changes.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use overlay_state::ipam_store::{valid_network_name, DEFAULT_DATA_DIR};
use overlay_state::{AttachmentKey, DEFAULT_SUBNET_FILE};

use crate::error::{code, CniError};
use crate::spec::{CniResult, Version, SUPPORTED_VERSIONS};

pub const DEFAULT_BRIDGE: &str = "cni0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            _ => return None,
        })
    }
}

/// The network configuration (stdin).
#[derive(Debug, Clone)]
pub struct NetConf {
    pub version: Version,
    pub name: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    pub bridge: String,
    pub mtu: Option<u32>,
    pub hairpin_mode: bool,
    pub is_default_gateway: bool,
    pub prev_result: Option<CniResult>,
    /// GC only: `cni.dev/valid-attachments`.
    pub valid_attachments: Option<Vec<AttachmentKey>>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

fn opt_str<'a>(m: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, CniError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(invalid(format!(
            "network config field {key:?} must be a string, found {other}"
        ))),
    }
}

fn opt_bool(m: &Map<String, Value>, key: &str) -> Result<Option<bool>, CniError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(invalid(format!(
            "network config field {key:?} must be true or false, found {other}"
        ))),
    }
}

fn opt_path(m: &Map<String, Value>, key: &str, default: &str) -> Result<PathBuf, CniError> {
    let p = opt_str(m, key)?.unwrap_or(default);
    if !Path::new(p).is_absolute() {
        return Err(invalid(format!(
            "network config field {key:?} must be an absolute path, found {p:?}"
        )));
    }
    Ok(PathBuf::from(p))
}

impl NetConf {
    /// The cniVersion a reply should carry when the config could not be fully read.
    pub fn version_hint(stdin: &[u8]) -> Option<String> {
        let v: Value = serde_json::from_slice(stdin).ok()?;
        v.get("cniVersion")?.as_str().map(str::to_string)
    }

    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                format!("the network configuration on stdin is not JSON: {e}"),
            )
        })?;
        let Value::Object(m) = value else {
            return Err(CniError::new(
                code::DECODE,
                "the network configuration on stdin is not a JSON object",
            ));
        };
        let version_str = opt_str(&m, "cniVersion")?
            .ok_or_else(|| invalid("network config lacks \"cniVersion\""))?;
        let version = Version::parse(version_str).ok_or_else(|| {
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {version_str:?} is not supported by the overlay plugin; it supports {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            )
        })?;
        let name = opt_str(&m, "name")?.ok_or_else(|| invalid("network config lacks \"name\""))?;
        if !valid_network_name(name) {
            return Err(invalid(format!(
                "network name {name:?} is invalid: use letters, digits, '_', '.', '-', starting with a letter or digit"
            )));
        }
        let bridge = opt_str(&m, "bridge")?.unwrap_or(DEFAULT_BRIDGE).to_string();
        if let Err(why) = check_ifname(&bridge) {
            return Err(invalid(format!("network config field \"bridge\": {why}")));
        }
        let mtu = match m.get("mtu") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) if (68..=65535).contains(&n) => Some(n as u32),
                _ => {
                    return Err(invalid(format!(
                        "network config field \"mtu\" must be a number from 68 to 65535, found {v}"
                    )))
                }
            },
        };
        let prev_result = match m.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value::<CniResult>(v.clone()).map_err(|e| {
                invalid(format!(
                    "network config field \"prevResult\" is not a CNI result: {e}"
                ))
            })?),
        };
        let valid_attachments = match m.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|item| {
                        let id = item.get("containerID").and_then(Value::as_str);
                        let ifname = item.get("ifname").and_then(Value::as_str);
                        match (id, ifname) {
                            (Some(id), Some(ifname)) => Ok(AttachmentKey::new(id, ifname)),
                            _ => Err(invalid(format!(
                                "\"cni.dev/valid-attachments\" entry {item} lacks string \"containerID\" and \"ifname\""
                            ))),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(other) => {
                return Err(invalid(format!(
                    "\"cni.dev/valid-attachments\" must be an array, found {other}"
                )))
            }
        };
        opt_str(&m, "type")?;
        Ok(NetConf {
            version,
            name: name.to_string(),
            subnet_file: opt_path(&m, "subnetFile", DEFAULT_SUBNET_FILE)?,
            data_dir: opt_path(&m, "dataDir", DEFAULT_DATA_DIR)?,
            bridge,
            mtu,
            hairpin_mode: opt_bool(&m, "hairpinMode")?.unwrap_or(true),
            is_default_gateway: opt_bool(&m, "isDefaultGateway")?.unwrap_or(true),
            prev_result,
            valid_attachments,
        })
    }
}

/// Linux's rules for interface names (dev_valid_name), so the kernel never rejects one halfway.
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!("interface name {name:?} must be 1 to 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(format!("interface name {name:?} is not allowed"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "interface name {name:?} must not contain '/', ':' or whitespace"
        ));
    }
    Ok(())
}

/// Container ids name files in the IPAM store, so no path separators: `[A-Za-z0-9][A-Za-z0-9_.-]*`.
pub fn check_container_id(id: &str) -> Result<(), String> {
    let mut chars = id.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "CNI_CONTAINERID {id:?} is invalid: use letters, digits, '_', '.', '-', starting with a letter or digit"
        ))
    }
}

/// The `CNI_*` environment one command needs, validated.
#[derive(Debug, Clone)]
pub struct Env {
    pub container_id: String,
    pub ifname: String,
    pub netns: Option<PathBuf>,
}

impl Env {
    pub fn key(&self) -> AttachmentKey {
        AttachmentKey::new(&self.container_id, &self.ifname)
    }

    /// ADD and CHECK need a netns that exists; DEL takes one if given (it may be gone already).
    pub fn from_vars(
        command: Command,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Env, CniError> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let need_netns = matches!(command, Command::Add | Command::Check);
        let mut missing = Vec::new();
        let container_id = get("CNI_CONTAINERID");
        let ifname = get("CNI_IFNAME");
        let netns = get("CNI_NETNS");
        if container_id.is_none() {
            missing.push("CNI_CONTAINERID");
        }
        if ifname.is_none() {
            missing.push("CNI_IFNAME");
        }
        if need_netns && netns.is_none() {
            missing.push("CNI_NETNS");
        }
        let (Some(container_id), Some(ifname)) = (container_id, ifname) else {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "required environment variables missing: {}",
                    missing.join(", ")
                ),
            ));
        };
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "required environment variables missing: {}",
                    missing.join(", ")
                ),
            ));
        }
        check_container_id(&container_id).map_err(|m| CniError::new(code::INVALID_ENV, m))?;
        check_ifname(&ifname)
            .map_err(|m| CniError::new(code::INVALID_ENV, format!("CNI_IFNAME: {m}")))?;
        let netns = netns.map(PathBuf::from);
        if let (true, Some(path)) = (need_netns, &netns) {
            crate::netns::check_netns_path(path)?;
        }
        Ok(Env {
            container_id,
            ifname,
            netns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"k8s","type":"overlay"}"#).unwrap();
        assert_eq!(c.subnet_file, Path::new("/run/overlayd/subnet.env"));
        assert_eq!(c.data_dir, Path::new("/var/lib/cni/overlay"));
        assert_eq!(c.bridge, "cni0");
        assert_eq!(c.mtu, None);
        assert!(c.hairpin_mode && c.is_default_gateway);
    }

    #[test]
    fn codes_for_bad_configs() {
        let code_of = |s: &str| NetConf::parse(s.as_bytes()).unwrap_err().code;
        assert_eq!(code_of("not json"), 6);
        assert_eq!(code_of("[1]"), 6);
        assert_eq!(code_of(r#"{"cniVersion":"0.2.0","name":"a"}"#), 1);
        assert_eq!(code_of(r#"{"cniVersion":"9.9.9","name":"a"}"#), 1);
        assert_eq!(code_of(r#"{"cniVersion":1,"name":"a"}"#), 7);
        assert_eq!(code_of(r#"{"cniVersion":"1.0.0"}"#), 7);
        assert_eq!(code_of(r#"{"cniVersion":"1.0.0","name":"../x"}"#), 7);
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","name":"a","mtu":"1500"}"#),
            7
        );
        assert_eq!(code_of(r#"{"cniVersion":"1.0.0","name":"a","mtu":10}"#), 7);
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","name":"a","hairpinMode":"yes"}"#),
            7
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","name":"a","dataDir":"rel"}"#),
            7
        );
        assert_eq!(
            code_of(r#"{"cniVersion":"1.0.0","name":"a","bridge":"a/b"}"#),
            7
        );
    }

    #[test]
    fn env_validation() {
        let env = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Env::from_vars(Command::Del, move |k| {
                vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
            })
        };
        assert!(env(&[("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")]).is_ok());
        assert_eq!(env(&[("CNI_IFNAME", "eth0")]).unwrap_err().code, 4);
        for bad in ["../x", "a/b", "-a", "", "a b"] {
            assert_eq!(
                env(&[("CNI_CONTAINERID", bad), ("CNI_IFNAME", "eth0")])
                    .unwrap_err()
                    .code,
                4,
                "{bad:?}"
            );
        }
        for bad in ["a/b", "0123456789abcdef", ".", "..", "a b"] {
            assert_eq!(
                env(&[("CNI_CONTAINERID", "c"), ("CNI_IFNAME", bad)])
                    .unwrap_err()
                    .code,
                4,
                "{bad:?}"
            );
        }
    }
}
