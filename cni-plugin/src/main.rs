//! `overlay`: the CNI plugin of overlayd. Hands out pod IPs from the subnet overlayd leased for
//! this node (read from the subnet file, no network call), wires the pod to the node's bridge
//! with a veth pair, and reports the result in the CNI version the runtime asked for.
//!
//! One process per CNI call, so it stays small: one thread, blocking netlink sockets, the IPAM
//! store on local disk, nothing else.
//!
//! Network config keys (all optional but the CNI ones): `subnetFile` (default
//! `/run/overlayd/subnet.env`), `dataDir` (IPAM store root, default `/var/lib/cni/overlay`; the
//! store is `<dataDir>/<name>/`), `bridge` (default `cni0`), `mtu` (default: the subnet file's),
//! `hairpinMode` (default true), `isDefaultGateway` (default true; when false the pod only gets a
//! route to the cluster network via the gateway).
//!
//! Error codes: the spec's 1, 3 (netns gone), 4, 5, 6, 7, 11 (no subnet leased yet), 50 (STATUS),
//! and this plugin's 100 (subnet exhausted), 101 (`CNI_IFNAME` exists in the pod), 102 (CHECK
//! found a difference), 103 (a kernel call failed).

mod commands;
mod config;
mod error;
mod helper;
mod link;
mod netlink;
mod netns;
mod spec;

use std::io::Read;

use config::{Command, Env, NetConf};
use error::{code, CniError};
use spec::{LATEST, SUPPORTED_VERSIONS};

fn main() {
    // Room for any usual config at once: an empty Vec makes std probe with 32-byte reads first.
    let mut stdin = Vec::with_capacity(16 * 1024);
    let read = std::io::stdin().read_to_end(&mut stdin);
    // Errors carry the config's cniVersion when it is one we speak, else the newest.
    let version = NetConf::version_hint(&stdin)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST.to_string());
    let outcome = match read {
        Ok(_) => run(&stdin),
        Err(e) => Err(CniError::new(
            code::IO_FAILURE,
            format!("cannot read stdin: {e}"),
        )),
    };
    match outcome {
        Ok(Outcome { print, helper }) => {
            if let Some(out) = print {
                println!("{out}");
            }
            // Waited for after the answer is out (see [`helper`]).
            drop(helper);
        }
        Err(e) => {
            println!("{}", e.to_json(&version));
            eprintln!("overlay: {e}");
            std::process::exit(1);
        }
    }
}

/// A command's success: what to print, and a helper still running to wait for.
#[derive(Default)]
struct Outcome {
    print: Option<String>,
    helper: Option<helper::SpareMaker>,
}

impl Outcome {
    fn print(out: String) -> Outcome {
        Outcome {
            print: Some(out),
            helper: None,
        }
    }
}

fn run(stdin: &[u8]) -> Result<Outcome, CniError> {
    let command = match std::env::var("CNI_COMMAND") {
        Ok(c) => Command::parse(&c).ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_COMMAND {c:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
            )
        })?,
        Err(_) => {
            return Err(CniError::new(
                code::INVALID_ENV,
                "required environment variables missing: CNI_COMMAND",
            ))
        }
    };
    if command == Command::Version {
        let requested = NetConf::version_hint(stdin);
        return Ok(Outcome::print(commands::version::version(
            requested.as_deref(),
        )));
    }
    let conf = NetConf::parse(stdin)?;
    let env = match command {
        Command::Add | Command::Del | Command::Check => {
            Some(Env::from_vars(command, |k| std::env::var(k).ok())?)
        }
        _ => None,
    };
    if command == Command::Status {
        commands::status::status(&conf)?;
        return Ok(Outcome::default());
    }
    match (command, env) {
        (Command::Add, Some(env)) => {
            let (result, helper) = commands::add::add(&conf, &env)?;
            let json = serde_json::to_string(&result.for_version(conf.version)).map_err(|e| {
                CniError::new(code::IO_FAILURE, format!("cannot encode result: {e}"))
            })?;
            Ok(Outcome {
                print: Some(json),
                helper,
            })
        }
        (Command::Del, Some(env)) => commands::del::del(&conf, &env).map(|()| Outcome::default()),
        (Command::Check, Some(env)) => {
            commands::check::check(&conf, &env).map(|()| Outcome::default())
        }
        (Command::Gc, _) => commands::gc::gc(&conf).map(|()| Outcome::default()),
        _ => Err(CniError::new(code::INVALID_ENV, "unexpected command")),
    }
}
