//! overlayd against an etcd with authentication on, shared with other users (issue 10, item 1).
//!
//! etcd stamps every token with the auth store's revision at login; any `user add`, `role grant`...
//! raises that revision, and from then on etcd refuses calls made with an older token ("revision of
//! auth store is old") and cancels watches opened with one. etcd-client only logs in again on
//! "invalid auth token", so without help the daemon's view of the leases freezes.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use overlay_testlab::{free_port, wait_for, Daemon, Etcd};
use overlayd::registry::Registry;

const USER: &str = "overlayd";
const PASSWORD: &str = "s3cret";

/// What an admin does on a shared etcd: a new tenant with its own role.
fn admin_adds_a_user_and_grants_a_role(etcd: &Etcd, name: &str) {
    etcd.ctl(&["user", "add", &format!("{name}:pw")]);
    etcd.ctl(&["role", "add", name]);
    etcd.ctl(&[
        "role",
        "grant-permission",
        name,
        "--prefix=true",
        "readwrite",
        &format!("/{name}/"),
    ]);
    etcd.ctl(&["user", "grant-role", name, name]);
}

/// etcd with JWT tokens (see [`Etcd::start_jwt`]): with etcd's default simple tokens, etcd 3.4
/// checks a token against the current auth revision and only a call in flight during the change
/// sees the error; a JWT keeps the revision it was issued at, so every call after the change does.
fn seeded_jwt() -> (Etcd, tempfile::TempDir) {
    let etcd = Etcd::start_jwt();
    etcd.put(&format!("{PREFIX}/config"), CONFIG);
    (etcd, tempfile::tempdir().unwrap())
}

fn user_args(endpoint: &str) -> overlayd::cli::EtcdArgs {
    let mut args = etcd_args(endpoint);
    args.etcd_username = Some(USER.into());
    args.etcd_password = Some(PASSWORD.into());
    args
}

#[test]
fn daemon_keeps_following_leases_after_an_admin_adds_a_user_and_grants_a_role() {
    let (mut etcd, dir) = seeded_jwt();
    etcd.enable_auth(USER, PASSWORD, PREFIX);
    let addr = format!("127.0.0.1:{}", free_port(Ipv4Addr::LOCALHOST));
    let mut cmd = daemon_cmd(
        &etcd.endpoint,
        "127.0.0.91",
        dir.path(),
        &["--etcd-username", USER, "--metrics-addr", &addr],
    );
    cmd.env("OVERLAYD_ETCD_PASSWORD", PASSWORD);
    let mut d = Daemon::spawn("overlayd 127.0.0.91", cmd, dir.path().join("91.log"));
    d.wait_log("leased subnet", Duration::from_secs(20));
    let own = subnet_key(&leased_subnet(&d));
    wait_for("the lease gauge at 1", Duration::from_secs(5), || {
        (leases_gauge(&addr) == Some(1)).then_some(())
    });

    for (round, tenant) in ["tenant-a", "tenant-b"].into_iter().enumerate() {
        admin_adds_a_user_and_grants_a_role(&etcd, tenant);

        // A new node's lease shows up.
        etcd.put(&key(&format!("10.244.{}.0-24", 200 + round)), PEER);
        let t = Instant::now();
        wait_for("the new lease in the gauge", Duration::from_secs(5), || {
            (leases_gauge(&addr) == Some(2 + round as i64)).then_some(())
        });
        eprintln!(
            "after `{tenant}` was added: new lease seen in {:?}",
            t.elapsed()
        );

        // The daemon's own key vanishes: putting it back takes calls with a current token.
        etcd.ctl(&["del", &own]);
        let t = Instant::now();
        wait_for(
            "the daemon to put its key back",
            Duration::from_secs(5),
            || etcd.get(&own).map(|_| ()),
        );
        eprintln!(
            "after `{tenant}` was added: own key back in {:?}",
            t.elapsed()
        );
    }
    assert!(d.is_running(), "{}", d.log_text());
    assert!(
        d.log_text().contains("logging in again"),
        "{}",
        d.log_text()
    );
}

#[test]
fn lease_watch_logs_in_again_when_etcd_cancels_it_for_an_old_auth_revision() {
    let (mut etcd, _dir) = seeded_jwt();
    etcd.enable_auth(USER, PASSWORD, PREFIX);
    let rt = rt();
    // Logged in and listed before the admin's change: the watch opens with the older token.
    let reg = rt
        .block_on(Registry::connect(&user_args(&etcd.endpoint)))
        .unwrap();
    let listed = rt.block_on(reg.list_leases()).unwrap();
    admin_adds_a_user_and_grants_a_role(&etcd, "tenant-a");
    etcd.put(&key("10.244.1.0-24"), PEER);

    let (mut rx, log) = follow_registry_with_log(&rt, reg, Some(listed));
    wait_for_set(&rt, &mut rx, &["10.244.1.0/24"], Duration::from_secs(5));
    etcd.put(&key("10.244.2.0-24"), PEER);
    wait_for_set(
        &rt,
        &mut rx,
        &["10.244.1.0/24", "10.244.2.0/24"],
        Duration::from_secs(5),
    );
    let text = log_text(&log);
    assert!(text.contains("logging in again"), "{text}");
}

#[test]
fn leases_as_an_etcd_user_and_logs_in_again_after_an_etcd_restart() {
    let (mut etcd, dir) = seeded();
    etcd.enable_auth("overlayd", "s3cret", PREFIX);
    // The password through the environment, as the DaemonSet passes it from a Secret.
    let mut cmd = daemon_cmd(
        &etcd.endpoint,
        "127.0.0.81",
        dir.path(),
        &["--etcd-username", "overlayd"],
    );
    cmd.env("OVERLAYD_ETCD_PASSWORD", "s3cret");
    let mut d = Daemon::spawn("overlayd 127.0.0.81", cmd, dir.path().join("81.log"));
    d.wait_log("leased subnet", Duration::from_secs(20));
    let key = subnet_key(&leased_subnet(&d));

    // A restart makes etcd forget every token. Deleting the daemon's key afterwards makes it
    // re-assert the key: a watch and a write, both refused unless it logs in again.
    etcd.stop();
    std::thread::sleep(Duration::from_secs(1));
    etcd.restart();
    etcd.ctl(&["del", &key]);
    wait_for(
        "the daemon to re-create its key after the restart",
        Duration::from_secs(30),
        || etcd.get(&key).map(|_| ()),
    );
    assert!(d.is_running(), "{}", d.log_text());

    // A wrong password ends the daemon at once with what to check: waiting cannot fix it.
    let mut bad = daemon(
        &etcd.endpoint,
        "127.0.0.82",
        dir.path(),
        &["--etcd-username", "overlayd", "--etcd-password", "wrong"],
    );
    let status = bad.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| !s.success()),
        "{status:?}: {}",
        bad.log_text()
    );
    assert!(
        bad.log_text()
            .contains("rejected user \"overlayd\": wrong username or password"),
        "{}",
        bad.log_text()
    );
    // No credentials: says authentication is on and what to pass, and keeps checking.
    let mut anon = daemon(&etcd.endpoint, "127.0.0.83", dir.path(), &[]);
    anon.wait_log(
        "etcd has authentication enabled: pass --etcd-username and --etcd-password",
        Duration::from_secs(15),
    );
    // A user whose role does not cover the prefix: says which grant is missing.
    etcd.ctl(&["user", "add", "stranger:pw"]);
    let mut stranger = daemon(
        &etcd.endpoint,
        "127.0.0.84",
        dir.path(),
        &["--etcd-username", "stranger", "--etcd-password", "pw"],
    );
    stranger.wait_log(
        &format!("--prefix=true readwrite {PREFIX}/"),
        Duration::from_secs(15),
    );
    assert!(anon.is_running() && stranger.is_running());

    // With credentials, connecting is already a call: etcd down at start is waited for.
    etcd.stop();
    let mut late = daemon(
        &etcd.endpoint,
        "127.0.0.85",
        dir.path(),
        &["--etcd-username", "overlayd", "--etcd-password", "s3cret"],
    );
    late.wait_log("retrying in", Duration::from_secs(15));
    etcd.restart();
    late.wait_log("leased subnet", Duration::from_secs(30));
}
