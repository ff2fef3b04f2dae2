//! The `overlay` binary: one CNI call (see the library's docs).

use std::io::Read;

use overlay_cni::error::{code, CniError};
use overlay_cni::request::{self, Request};
use overlay_cni::{commands, config::Command, helper::SpareMaker};

fn main() {
    // Room for any usual config at once: an empty Vec makes std probe with 32-byte reads first.
    let mut stdin = Vec::with_capacity(16 * 1024);
    let read = std::io::stdin().read_to_end(&mut stdin);
    let version = request::reply_version(&stdin);
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
            // Waited for after the answer is out (see [`SpareMaker`]).
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
    helper: Option<SpareMaker>,
}

fn run(stdin: &[u8]) -> Result<Outcome, CniError> {
    let Request { command, conf, env } = request::parse(|k| std::env::var(k).ok(), stdin)?;
    match (command, conf, env) {
        (Command::Version, _, _) => Ok(Outcome {
            print: Some(commands::version::version(
                request::requested_version(stdin).as_deref(),
            )),
            helper: None,
        }),
        (Command::Status, Some(conf), _) => {
            commands::status::status(&conf).map(|()| Outcome::default())
        }
        (Command::Add, Some(conf), Some(env)) => {
            let (result, helper) = commands::add::add(&conf, &env)?;
            Ok(Outcome {
                print: Some(request::encode(&result, conf.version)?),
                helper,
            })
        }
        (Command::Del, Some(conf), Some(env)) => {
            commands::del::del(&conf, &env).map(|()| Outcome::default())
        }
        (Command::Check, Some(conf), Some(env)) => {
            commands::check::check(&conf, &env).map(|()| Outcome::default())
        }
        (Command::Gc, Some(conf), _) => commands::gc::gc(&conf).map(|()| Outcome::default()),
        _ => Err(CniError::new(code::INVALID_ENV, "unexpected command")),
    }
}
