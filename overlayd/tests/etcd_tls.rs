//! overlayd against an etcd that serves only TLS and requires client certificates
//! (`--client-cert-auth`, a throwaway PKI made by the test), issue 10: every way the TLS files
//! can be wrong ends in one clear error naming the file and the endpoint.

mod common;

use std::time::Duration;

use common::*;
use overlay_testlab::{Daemon, Etcd};

fn tls_daemon(
    etcd: &Etcd,
    dir: &std::path::Path,
    name: &str,
    ca: &str,
    cert: &str,
    key: &str,
) -> Daemon {
    let mut cmd = overlayd();
    cmd.args([
        "run",
        "--lease-only",
        "--iface",
        "lo",
        "--public-ip",
        "127.0.0.75",
    ])
    .args(["--node-name", name, "--etcd-endpoints", &etcd.endpoint])
    .args([
        "--etcd-cafile",
        ca,
        "--etcd-certfile",
        cert,
        "--etcd-keyfile",
        key,
    ])
    .arg("--subnet-file")
    .arg(dir.join(format!("{name}.env")))
    .env("RUST_LOG", "info");
    Daemon::spawn(
        &format!("overlayd {name}"),
        cmd,
        dir.join(format!("{name}.log")),
    )
}

/// Runs a daemon that must stop at once with one error naming `file` and the endpoint.
fn fails_naming(
    etcd: &Etcd,
    dir: &std::path::Path,
    name: &str,
    files: [&str; 3],
    file: &str,
    says: &str,
) {
    let mut d = tls_daemon(etcd, dir, name, files[0], files[1], files[2]);
    let status = d.wait_exit(Duration::from_secs(20));
    let log = d.log_text();
    eprintln!("--- {name}:\n{log}");
    assert!(
        status.is_some_and(|s| !s.success()),
        "{name}: {status:?}\n{log}"
    );
    assert!(
        log.contains(file),
        "{name}: the error does not name {file}:\n{log}"
    );
    assert!(
        log.contains(&etcd.endpoint),
        "{name}: the error does not name the endpoint:\n{log}"
    );
    assert!(log.contains(says), "{name}: no {says:?}:\n{log}");
    assert!(!log.contains("leased subnet"), "{log}");
}

#[test]
fn mtls_etcd_wrong_ca_missing_or_unreadable_key_and_expired_cert_each_say_which_file() {
    let etcd = Etcd::start_tls();
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    let tls = etcd.tls.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = (
        tls.ca.display().to_string(),
        tls.cert.display().to_string(),
        tls.key.display().to_string(),
    );
    // The right files: leases.
    let mut ok = tls_daemon(&etcd, dir.path(), "good", &ca, &cert, &key);
    ok.wait_log("leased subnet", Duration::from_secs(20));

    let other_ca = tls.other_ca().display().to_string();
    fails_naming(
        &etcd,
        dir.path(),
        "wrong-ca",
        [&other_ca, &cert, &key],
        &other_ca,
        "not signed by",
    );
    let missing = dir.path().join("missing.key").display().to_string();
    fails_naming(
        &etcd,
        dir.path(),
        "missing-key",
        [&ca, &cert, &missing],
        &missing,
        "cannot read",
    );
    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, "this is no key\n").unwrap();
    let garbage = garbage.display().to_string();
    fails_naming(
        &etcd,
        dir.path(),
        "unreadable-key",
        [&ca, &cert, &garbage],
        &garbage,
        "no PEM private key",
    );
    let (expired, expired_key) = tls.expired_client();
    let (expired, expired_key) = (
        expired.display().to_string(),
        expired_key.display().to_string(),
    );
    fails_naming(
        &etcd,
        dir.path(),
        "expired-cert",
        [&ca, &expired, &expired_key],
        &expired,
        "expired",
    );
}
