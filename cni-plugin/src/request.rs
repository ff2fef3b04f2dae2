//! Everything one invocation reads from its input, the `CNI_*` environment and the network
//! configuration on stdin, checked before anything on the node changes; and [`preview`], the
//! answer the plugin gives for an input as far as it depends on the input alone. Neither touches
//! the kernel or a file other than the paths the input names (only `CNI_NETNS` is looked at, with
//! statfs), so the fuzz target drives them with any bytes.

use std::path::Path;

use overlay_state::{ipam_store::pod_range, SubnetFile};

use crate::commands;
use crate::config::{Command, Env, NetConf};
use crate::error::{code, CniError};
use crate::spec::{CniResult, Version, LATEST, SUPPORTED_VERSIONS};

/// One CNI call, validated.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    /// Every command but VERSION.
    pub conf: Option<NetConf>,
    /// ADD, DEL and CHECK.
    pub env: Option<Env>,
}

/// The `cniVersion` the config asks for, if it is readable at all.
pub fn requested_version(stdin: &[u8]) -> Option<String> {
    NetConf::version_hint(stdin)
}

/// The `cniVersion` an error carries: the config's when it is one we speak, else the newest.
pub fn reply_version(stdin: &[u8]) -> String {
    requested_version(stdin)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST.to_string())
}

/// Reads the command, the config and the environment (`vars` looks a variable up).
pub fn parse(vars: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Result<Request, CniError> {
    let command = match vars("CNI_COMMAND") {
        Some(c) => Command::parse(&c).ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_COMMAND {c:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
            )
        })?,
        None => {
            return Err(CniError::new(
                code::INVALID_ENV,
                "required environment variables missing: CNI_COMMAND",
            ))
        }
    };
    if command == Command::Version {
        return Ok(Request {
            command,
            conf: None,
            env: None,
        });
    }
    let conf = NetConf::parse(stdin)?;
    let env = match command {
        Command::Add | Command::Del | Command::Check => Some(Env::from_vars(command, vars)?),
        _ => None,
    };
    Ok(Request {
        command,
        conf: Some(conf),
        env,
    })
}

/// A result as JSON, shaped for `version`.
pub fn encode(result: &CniResult, version: Version) -> Result<String, CniError> {
    serde_json::to_string(&result.clone().for_version(version))
        .map_err(|e| CniError::new(code::IO_FAILURE, format!("cannot encode result: {e}")))
}

/// What the plugin prints for this input, as far as the input alone decides it: a CNI error
/// JSON, VERSION's answer, ADD's result as it would be for the first pod address of the subnet
/// file's text `subnet_file` (with placeholder MACs), or nothing (a command with no output).
pub fn preview(vars: impl Fn(&str) -> Option<String>, stdin: &[u8], subnet_file: &str) -> String {
    match preview_result(vars, stdin, subnet_file) {
        Ok(out) => out,
        Err(e) => e.to_json(&reply_version(stdin)),
    }
}

fn preview_result(
    vars: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
    subnet_text: &str,
) -> Result<String, CniError> {
    let Request { command, conf, env } = parse(vars, stdin)?;
    let (command, conf) = match (command, conf) {
        (Command::Version, _) => {
            return Ok(commands::version::version(
                requested_version(stdin).as_deref(),
            ))
        }
        (command, Some(conf)) => (command, conf),
        (_, None) => return Err(CniError::new(code::INVALID_ENV, "unexpected command")),
    };
    let subnet =
        || SubnetFile::parse(subnet_text, &conf.subnet_file).map_err(commands::subnet_file_error);
    match (command, env) {
        (Command::Status, _) => subnet().map(|_| String::new()),
        (Command::Add, Some(env)) => {
            let netns = env
                .netns
                .clone()
                .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is required for ADD"))?;
            let subnet_file = subnet()?;
            let (ip, _) = pod_range(subnet_file.subnet).ok_or_else(|| {
                CniError::from(overlay_state::IpamError::SubnetTooSmall(subnet_file.subnet))
            })?;
            let wired = commands::add::Wired {
                bridge_mac: "0a:58:00:00:00:01".into(),
                host_name: crate::link::host_veth_name(&env.container_id, &env.ifname),
                host_mac: crate::link::format_mac(&crate::link::host_veth_mac(
                    &env.container_id,
                    &env.ifname,
                )),
                pod_mac: crate::link::format_mac(&crate::link::ip_mac(ip)),
                ip,
                mtu: conf.mtu.unwrap_or(subnet_file.mtu),
            };
            let result =
                commands::add::result_for(&conf, &env, &subnet_file, Path::new(&netns), wired);
            encode(&result, conf.version)
        }
        _ => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBNET: &str =
        "OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_SUBNET=10.244.3.1/24\nOVERLAY_MTU=1450\n";

    fn vars(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn preview_answers_add_with_a_result_and_bad_input_with_a_code() {
        let conf = br#"{"cniVersion":"1.0.0","name":"n","type":"overlay"}"#;
        let add = vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/proc/self/ns/net"),
        ]);
        let out: serde_json::Value = serde_json::from_str(&preview(&add, conf, SUBNET)).unwrap();
        assert_eq!(out["ips"][0]["address"], "10.244.3.2/24");
        assert_eq!(out["cniVersion"], "1.0.0");
        let err: serde_json::Value =
            serde_json::from_str(&preview(&add, conf, "OVERLAY_SUBNET=x")).unwrap();
        assert_eq!(err["code"], 11);
        let err: serde_json::Value = serde_json::from_str(&preview(&add, b"{", SUBNET)).unwrap();
        assert_eq!(err["code"], 6);
        let none = vars(&[]);
        let err: serde_json::Value = serde_json::from_str(&preview(&none, conf, SUBNET)).unwrap();
        assert_eq!(err["code"], 4);
    }
}
