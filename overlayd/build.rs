//! Stamps the git commit into the binary for `overlayd --version`. Never fails the build: a
//! source tarball or a container build without `.git` falls back to `OVERLAYD_GIT_COMMIT` (the
//! Dockerfile's build-arg), then to "unknown".

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=OVERLAYD_GIT_COMMIT");
    let from_git = git(&["rev-parse", "--short=12", "HEAD"]);
    if from_git.is_some() {
        // Rebuild when HEAD moves: HEAD itself (branch switch) and the branch's ref (commit).
        // In a worktree these live in different git dirs; --git-path resolves both.
        for name in ["HEAD", "packed-refs"] {
            if let Some(p) = git(&["rev-parse", "--git-path", name]) {
                rerun_if_exists(&p);
            }
        }
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            if let Some(p) = git(&["rev-parse", "--git-path", &r]) {
                rerun_if_exists(&p);
            }
        }
    }
    let commit = from_git
        .or_else(|| {
            std::env::var("OVERLAYD_GIT_COMMIT")
                .ok()
                .filter(|s| !s.trim().is_empty())
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=OVERLAYD_GIT_COMMIT={commit}");
}

fn rerun_if_exists(p: &str) {
    if Path::new(p).exists() {
        println!("cargo:rerun-if-changed={p}");
    }
}
