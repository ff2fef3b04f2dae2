//! The CNI config directory and plugin binaries, as the container runtime sees them: it takes the
//! first file by name (`.conf`, `.conflist`, `.json`, as libcni lists them), so anything sorting
//! before ours wins, and the old `10-aws.conflist` left beside ours is the field failure
//! `dial tcp 127.0.0.1:50051: connect: connection refused`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Context, Finding};

const CONFIG: &str = "cni-config";
const PLUGINS: &str = "cni-plugins";

/// Config files in the order the runtime considers them.
fn config_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The plugin types a config file names (a conflist's `plugins`, or a single `.conf`'s `type`).
fn plugin_types(path: &Path) -> Option<Vec<String>> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let types = match v.get("plugins").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .filter_map(|p| p.get("type").and_then(Value::as_str).map(str::to_string))
            .collect(),
        None => v
            .get("type")
            .and_then(Value::as_str)
            .map(|t| vec![t.to_string()])
            .unwrap_or_default(),
    };
    Some(types)
}

fn name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

pub fn checks(cx: &Context) -> Vec<Finding> {
    let dir = &cx.args.cni_conf_dir;
    let files = match config_files(dir) {
        Ok(f) => f,
        Err(e) => {
            return vec![
                Finding::fail(
                    CONFIG,
                    format!("cannot read the CNI config directory {}: {e}", dir.display()),
                    "pass --cni-conf-dir where the node's /etc/cni/net.d is mounted, or check that the DaemonSet's install init container ran",
                ),
                Finding::skip(PLUGINS, "no CNI config to read"),
            ]
        }
    };
    let ours = files
        .iter()
        .find(|f| plugin_types(f).is_some_and(|t| t.iter().any(|t| t == "overlay")));
    let aws: Vec<String> = files
        .iter()
        .filter(|f| plugin_types(f).is_some_and(|t| t.iter().any(|t| t == "aws-cni")))
        .map(|f| name(f))
        .collect();
    let config = match (ours, files.first()) {
        (None, _) => Finding::fail(
            CONFIG,
            format!("no config in {} uses the overlay plugin", dir.display()),
            "the DaemonSet's install init container writes 00-overlay.conflist: check its logs",
        ),
        (Some(o), Some(first)) if o != first => Finding::fail(
            CONFIG,
            format!(
                "{} sorts before {} in {}: the runtime uses it, not overlayd",
                name(first),
                name(o),
                dir.display()
            ),
            format!(
                "move {} out of {} (for 10-aws.conflist: `overlayd cleanup aws-vpc-cni`)",
                name(first),
                dir.display()
            ),
        ),
        _ if !aws.is_empty() => Finding::fail(
            CONFIG,
            format!(
                "{} still chains aws-cni (aws-node's plugin) in {}",
                aws.join(", "),
                dir.display()
            ),
            "run `overlayd cleanup aws-vpc-cni` (it moves aws-node's config aside)",
        ),
        (Some(o), _) => Finding::pass(
            CONFIG,
            format!(
                "{} sorts first in {} ({} config files)",
                name(o),
                dir.display(),
                files.len()
            ),
        ),
    };
    let plugins = match ours.and_then(|o| plugin_types(o).map(|t| (o, t))) {
        None => Finding::skip(PLUGINS, "no overlay config to read the plugins from"),
        Some((o, types)) => {
            let bin = &cx.args.cni_bin_dir;
            let missing: Vec<String> = types
                .iter()
                .filter(|t| {
                    !std::fs::metadata(bin.join(t))
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                })
                .cloned()
                .collect();
            if missing.is_empty() {
                Finding::pass(
                    PLUGINS,
                    format!("{} found in {}", types.join(", "), bin.display()),
                )
            } else {
                Finding::fail(
                    PLUGINS,
                    format!(
                        "{} names {} but {} has no executable {}: every pod on this node fails",
                        name(o),
                        types.join(", "),
                        bin.display(),
                        missing.join(", ")
                    ),
                    "install the missing plugins into the CNI bin dir (the DaemonSet's install init container copies overlay, portmap and loopback); pass --cni-bin-dir if it is elsewhere",
                )
            }
        }
    };
    vec![config, plugins]
}
