//! aws-node's files: its CNI config `10-aws.conflist` (it sorts before most other CNIs' files, so the
//! runtime keeps calling `aws-cni`, which dials the gone ipamd at 127.0.0.1:50051), the `aws.conf`
//! of very old releases (when it is an aws-cni config), and its state under `/var/run/aws-node/`
//! (the ipamd checkpoint `ipam.json`, sockets, markers).
//!
//! Nothing is deleted: every file is renamed to `<name>.overlayd-bak` (`.overlayd-bak.<n>` if that is
//! taken), a name container runtimes do not load (they read only `.conf`, `.conflist`, `.json`). The
//! state directory itself stays (it may be a mount point); only its entries are renamed. Other CNIs'
//! files and `/opt/cni/bin` are never touched; another config that still chains `aws-cni` is reported,
//! not moved.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub const AWS_CONFLIST: &str = "10-aws.conflist";
/// What very old releases installed instead (later ones delete it at start).
pub const OLD_AWS_CONF: &str = "aws.conf";
pub const BACKUP_SUFFIX: &str = ".overlayd-bak";

#[derive(Debug, Error)]
pub enum FileError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot move {} to {}: {source}", from.display(), to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub from: PathBuf,
    pub to: PathBuf,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FileLeftovers {
    pub moves: Vec<Move>,
    /// Other CNI configs that still name `aws-cni`: reported, left alone.
    pub warnings: Vec<String>,
}

fn is_backup(name: &str) -> bool {
    name.ends_with(BACKUP_SUFFIX) || name.contains(&format!("{BACKUP_SUFFIX}."))
}

/// `<path>.overlayd-bak`, or `.overlayd-bak.<n>` for the first free `n`.
fn backup_name(path: &Path, taken: &dyn Fn(&Path) -> bool) -> PathBuf {
    let base = format!("{}{BACKUP_SUFFIX}", path.display());
    let first = PathBuf::from(&base);
    if !taken(&first) {
        return first;
    }
    (1u32..)
        .map(|n| PathBuf::from(format!("{base}.{n}")))
        .find(|p| !taken(p))
        .unwrap_or(first)
}

fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}

fn names_aws_cni(text: &str) -> bool {
    fn walk(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(m) => {
                m.get("type").and_then(|t| t.as_str()) == Some("aws-cni") || m.values().any(walk)
            }
            serde_json::Value::Array(a) => a.iter().any(walk),
            _ => false,
        }
    }
    serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| walk(&v))
}

/// What would move, given the CNI config dir and aws-node's state dir. Missing dirs hold nothing.
pub fn find(conf_dir: &Path, state_dir: &Path) -> Result<FileLeftovers, FileError> {
    let mut out = FileLeftovers::default();

    let conflist = conf_dir.join(AWS_CONFLIST);
    if exists(&conflist) {
        let to = backup_name(&conflist, &exists);
        out.moves.push(Move { from: conflist, to });
    }
    let old = conf_dir.join(OLD_AWS_CONF);
    let old_is_aws = std::fs::read_to_string(&old).is_ok_and(|t| names_aws_cni(&t));
    if old_is_aws {
        let to = backup_name(&old, &exists);
        out.moves.push(Move { from: old, to });
    }
    for entry in sorted_entries(conf_dir)? {
        let Some(name) = entry.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let loaded = [".conf", ".conflist", ".json"]
            .iter()
            .any(|e| name.ends_with(e));
        if name == AWS_CONFLIST || (name == OLD_AWS_CONF && old_is_aws) || !loaded {
            continue;
        }
        if std::fs::read_to_string(&entry).is_ok_and(|t| names_aws_cni(&t)) {
            out.warnings.push(format!(
                "{} still chains the aws-cni plugin; left alone (update or remove it yourself)",
                entry.display()
            ));
        }
    }

    for entry in sorted_entries(state_dir)? {
        let Some(name) = entry.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if is_backup(name) {
            continue;
        }
        let to = backup_name(&entry, &exists);
        out.moves.push(Move { from: entry, to });
    }
    Ok(out)
}

/// The `vethPrefix` aws-node was configured with, from `10-aws.conflist` or, once that has been
/// moved aside, from its newest backup; with the file it came from.
pub fn aws_veth_prefix(conf_dir: &Path) -> Option<(String, PathBuf)> {
    let mut candidates: Vec<(std::time::SystemTime, PathBuf)> = sorted_entries(conf_dir)
        .ok()?
        .into_iter()
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n == AWS_CONFLIST || n.starts_with(&format!("{AWS_CONFLIST}{BACKUP_SUFFIX}"))
            })
        })
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    // The live file first, then the newest backup.
    candidates.sort_by_key(|(t, p)| (!p.ends_with(AWS_CONFLIST), std::cmp::Reverse(*t)));
    candidates.into_iter().find_map(|(_, p)| {
        let text = std::fs::read_to_string(&p).ok()?;
        super::pod_veth::prefix_in_conflist(&text).map(|prefix| (prefix, p))
    })
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, FileError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(FileError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(|source| FileError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        v.push(e.path());
    }
    v.sort();
    Ok(v)
}

/// Renames one file; never overwrites (the target was free when planned, and is checked again).
pub fn apply(m: &Move) -> Result<(), FileError> {
    let rename_err = |source| FileError::Rename {
        from: m.from.clone(),
        to: m.to.clone(),
        source,
    };
    if exists(&m.to) {
        return Err(rename_err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the backup name appeared meanwhile",
        )));
    }
    std::fs::rename(&m.from, &m.to).map_err(rename_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_backups_and_never_reuses_a_name() {
        let conf = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("tempdir");
        let c = conf.path();
        std::fs::write(c.join(AWS_CONFLIST), r#"{"plugins":[{"type":"aws-cni"}]}"#).expect("w");
        std::fs::write(c.join("10-aws.conflist.overlayd-bak"), "old").expect("w");
        std::fs::write(
            c.join("05-cilium.conflist"),
            r#"{"plugins":[{"type":"aws-cni"},{"type":"cilium-cni"}]}"#,
        )
        .expect("w");
        std::fs::write(
            c.join(OLD_AWS_CONF),
            r#"{"name":"aws-cni","type":"aws-cni"}"#,
        )
        .expect("w");
        std::fs::write(
            c.join("20-other.conflist"),
            r#"{"plugins":[{"type":"bridge"}]}"#,
        )
        .expect("w");
        std::fs::write(state.path().join("ipam.json"), "{}").expect("w");
        std::fs::write(state.path().join("ipam.json.overlayd-bak"), "{}").expect("w");

        let found = find(c, state.path()).expect("find");
        assert_eq!(
            found.moves,
            [
                Move {
                    from: c.join(AWS_CONFLIST),
                    to: c.join("10-aws.conflist.overlayd-bak.1"),
                },
                Move {
                    from: c.join(OLD_AWS_CONF),
                    to: c.join("aws.conf.overlayd-bak"),
                },
                Move {
                    from: state.path().join("ipam.json"),
                    to: state.path().join("ipam.json.overlayd-bak.1"),
                },
            ]
        );
        assert_eq!(found.warnings.len(), 1);
        assert!(found.warnings[0].contains("05-cilium.conflist"));

        for m in &found.moves {
            apply(m).expect("apply");
        }
        let again = find(c, state.path()).expect("find");
        assert!(again.moves.is_empty(), "{again:?}");
    }

    #[test]
    fn veth_prefix_from_the_conflist_or_its_backup() {
        let conf = tempfile::tempdir().expect("tempdir");
        let c = conf.path();
        assert_eq!(aws_veth_prefix(c), None);
        std::fs::write(
            c.join("10-aws.conflist.overlayd-bak"),
            r#"{"plugins":[{"type":"aws-cni","vethPrefix":"old"}]}"#,
        )
        .expect("w");
        assert_eq!(
            aws_veth_prefix(c),
            Some(("old".to_string(), c.join("10-aws.conflist.overlayd-bak")))
        );
        std::fs::write(
            c.join(AWS_CONFLIST),
            r#"{"plugins":[{"type":"aws-cni","vethPrefix":"new"}]}"#,
        )
        .expect("w");
        assert_eq!(
            aws_veth_prefix(c).map(|(p, _)| p).as_deref(),
            Some("new"),
            "the live file wins"
        );
    }

    #[test]
    fn missing_dirs_hold_nothing() {
        let found =
            find(Path::new("/nonexistent/cni"), Path::new("/nonexistent/run")).expect("find");
        assert_eq!(found, FileLeftovers::default());
    }
}
