//! A real etcd server (Debian package `etcd-server`) for tests.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use crate::{free_port, wait_for, Daemon, Netns};

pub struct Etcd {
    pub endpoint: String,
    // Field order matters: the server stops before its data dir is removed.
    daemon: Daemon,
    dir: tempfile::TempDir,
    netns: Option<String>,
    args: Vec<String>,
    /// Set when the server speaks TLS and demands client certificates.
    pub tls: Option<Tls>,
    /// `user:password` etcdctl runs as, once authentication is on.
    ctl_user: Option<String>,
}

/// How a single-member etcd is started.
#[derive(Debug, Clone, Copy, Default)]
struct Options {
    /// Serve only TLS and require client certificates.
    tls: bool,
    /// Sign auth tokens as JWTs instead of etcd's default "simple" tokens.
    jwt: bool,
}

/// Files of a throwaway PKI: the CA that signed etcd's server certificate, and a client identity.
#[derive(Debug, Clone)]
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Tls {
    /// A client certificate signed by the right CA that expired yesterday, and its key.
    pub fn expired_client(&self) -> (PathBuf, PathBuf) {
        let dir = self.ca.parent().expect("pki dir");
        let openssl = |args: &[&str]| {
            crate::run(Command::new("openssl").args(args).current_dir(dir));
        };
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "expired.key",
            "-out",
            "expired.csr",
            "-subj",
            "/CN=expired",
        ]);
        // A negative validity: notAfter a day before notBefore (now).
        openssl(&[
            "x509",
            "-req",
            "-in",
            "expired.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "expired.crt",
            "-days",
            "-1",
            "-extfile",
            "client.ext",
        ]);
        (dir.join("expired.crt"), dir.join("expired.key"))
    }

    /// A CA that signed nothing etcd uses.
    pub fn other_ca(&self) -> PathBuf {
        let dir = self.ca.parent().expect("pki dir");
        crate::run(Command::new("openssl").current_dir(dir).args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "other-ca.key",
            "-out",
            "other-ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=some-other-ca",
        ]));
        dir.join("other-ca.crt")
    }
}

/// Makes a CA, a server certificate for `ip` and a client certificate with openssl, in `dir`.
fn make_pki(dir: &std::path::Path, ip: Ipv4Addr) -> (Tls, PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n);
    let openssl = |args: &[&str]| {
        crate::run(Command::new("openssl").args(args).current_dir(dir));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=overlay-lab-ca",
            ],
        ]
        .concat(),
    );
    for (name, ext) in [
        (
            "server",
            format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth"),
        ),
        ("client", "extendedKeyUsage=clientAuth".to_string()),
    ] {
        std::fs::write(p(&format!("{name}.ext")), ext).expect("write ext");
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={name}"),
                ],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
    (
        Tls {
            ca: p("ca.crt"),
            cert: p("client.crt"),
            key: p("client.key"),
        },
        p("server.crt"),
        p("server.key"),
    )
}

fn spawn(netns: &Option<String>, args: &[String], dir: &tempfile::TempDir) -> Daemon {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(etcd_binary());
            c
        }
        None => Command::new(etcd_binary()),
    };
    cmd.args(args);
    Daemon::spawn("etcd", cmd, dir.path().join("etcd.log"))
}

fn etcd_binary() -> PathBuf {
    for p in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("etcd not found: install Debian's etcd-server (scripts/test.sh does)");
}

impl Etcd {
    /// etcd on loopback in the host namespace.
    pub fn start() -> Etcd {
        Self::start_on(None, Ipv4Addr::LOCALHOST)
    }

    /// etcd listening on `ip`, inside `netns` when given (the lab's etcd on the underlay).
    pub fn start_on(netns: Option<&Netns>, ip: Ipv4Addr) -> Etcd {
        Self::start_with(netns, ip, Options::default())
    }

    /// etcd on loopback serving only TLS and requiring client certificates (what an external etcd
    /// for EKS looks like).
    pub fn start_tls() -> Etcd {
        let tls = Options {
            tls: true,
            ..Options::default()
        };
        Self::start_with(None, Ipv4Addr::LOCALHOST, tls)
    }

    /// etcd on loopback that hands out signed JWT tokens once authentication is on (Bitnami's etcd
    /// chart does so by default). A JWT carries the auth store's revision it was issued at, so any
    /// later `user add` or `role grant` makes etcd refuse it: "revision of auth store is old".
    pub fn start_jwt() -> Etcd {
        let jwt = Options {
            jwt: true,
            ..Options::default()
        };
        Self::start_with(None, Ipv4Addr::LOCALHOST, jwt)
    }

    fn start_with(netns: Option<&Netns>, ip: Ipv4Addr, opts: Options) -> Etcd {
        let Options { tls, jwt } = opts;
        let dir = tempfile::tempdir().expect("tempdir");
        // Ports are picked in the host namespace; inside a fresh namespace nothing else listens.
        let client = free_port(Ipv4Addr::LOCALHOST);
        let peer = free_port(Ipv4Addr::LOCALHOST);
        let scheme = if tls { "https" } else { "http" };
        let endpoint = format!("{scheme}://{ip}:{client}");
        let mut args: Vec<String> = [
            "--name".to_string(),
            "lab".into(),
            "--data-dir".into(),
            dir.path().join("data").display().to_string(),
            "--listen-client-urls".into(),
            endpoint.clone(),
            "--advertise-client-urls".into(),
            endpoint.clone(),
            "--listen-peer-urls".into(),
            format!("http://{ip}:{peer}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://{ip}:{peer}"),
            "--initial-cluster".into(),
            format!("lab=http://{ip}:{peer}"),
            "--log-level".into(),
            "warn".into(),
        ]
        .into();
        let tls = tls.then(|| {
            let (client_tls, cert, key) = make_pki(dir.path(), ip);
            args.extend([
                "--cert-file".to_string(),
                cert.display().to_string(),
                "--key-file".into(),
                key.display().to_string(),
                "--client-cert-auth".into(),
                "--trusted-ca-file".into(),
                client_tls.ca.display().to_string(),
            ]);
            client_tls
        });
        if jwt {
            let (private, public) = (dir.path().join("jwt.key"), dir.path().join("jwt.pub"));
            crate::run(
                Command::new("openssl")
                    .args(["genrsa", "-out"])
                    .arg(&private)
                    .arg("2048"),
            );
            crate::run(
                Command::new("openssl")
                    .args(["rsa", "-pubout", "-in"])
                    .arg(&private)
                    .arg("-out")
                    .arg(&public),
            );
            args.push(format!(
                "--auth-token=jwt,pub-key={},priv-key={},sign-method=RS256,ttl=10m",
                public.display(),
                private.display()
            ));
        }
        let netns = netns.map(|n| n.name.clone());
        let daemon = spawn(&netns, &args, &dir);
        let etcd = Etcd {
            endpoint,
            daemon,
            dir,
            netns,
            args,
            tls,
            ctl_user: None,
        };
        etcd.wait_healthy();
        etcd
    }

    fn wait_healthy(&self) {
        wait_for("etcd to answer", Duration::from_secs(20), || {
            self.try_ctl(&["endpoint", "health"]).ok().map(|_| ())
        });
    }

    /// Stops the server (kill -9), keeping its data: an etcd outage.
    pub fn stop(&mut self) {
        self.daemon.signal("KILL");
    }

    /// Freezes the server (SIGSTOP): its connections stay open and nothing is answered, as with a
    /// member that hangs. [`Etcd::thaw`] lets it go on.
    pub fn freeze(&self) {
        crate::run(Command::new("kill").args(["-STOP", &self.daemon.pid().to_string()]));
    }

    pub fn thaw(&self) {
        crate::run(Command::new("kill").args(["-CONT", &self.daemon.pid().to_string()]));
    }

    /// Starts the server again on the same endpoint and data.
    pub fn restart(&mut self) {
        self.daemon = spawn(&self.netns, &self.args, &self.dir);
        self.wait_healthy();
    }

    /// `etcdctl snapshot save` into `path`: a backup, as an operator takes one.
    pub fn snapshot(&self, path: &std::path::Path) {
        self.ctl(&["snapshot", "save", &path.display().to_string()]);
    }

    /// Stops the server and starts it again from `snapshot` (`etcdctl snapshot restore`), as after
    /// a disaster recovery: every key and the revision go back to what the snapshot holds.
    pub fn restore(&mut self, snapshot: &std::path::Path) {
        self.stop();
        let arg = |name: &str| {
            let i = self.args.iter().position(|a| a == name).expect(name);
            self.args[i + 1].clone()
        };
        let data = arg("--data-dir");
        std::fs::remove_dir_all(&data).expect("remove the old data dir");
        crate::run(
            Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["snapshot", "restore"])
                .arg(snapshot)
                .args(["--data-dir", &data, "--name", &arg("--name")])
                .args(["--initial-cluster", &arg("--initial-cluster")])
                .args([
                    "--initial-advertise-peer-urls",
                    &arg("--initial-advertise-peer-urls"),
                ]),
        );
        self.restart();
    }

    fn ctl_cmd(&self) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcdctl"]);
                c
            }
            None => Command::new("etcdctl"),
        };
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint))
            .arg("--command-timeout=5s");
        if let Some(u) = &self.ctl_user {
            c.arg("--user").arg(u);
        }
        if let Some(t) = &self.tls {
            c.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.cert)
                .arg("--key")
                .arg(&t.key);
        }
        c
    }

    /// Turns on etcd's authentication, as an operator securing a shared etcd would: `root` (etcd
    /// requires it; etcdctl here runs as root from now on), and `user` whose role may read and
    /// write under `prefix`/ and nothing else.
    pub fn enable_auth(&mut self, user: &str, password: &str, prefix: &str) {
        let root = "root:root-pw";
        self.ctl(&["user", "add", root]);
        self.ctl(&["user", "grant-role", "root", "root"]);
        self.ctl(&["role", "add", "overlayd"]);
        self.ctl(&[
            "role",
            "grant-permission",
            "overlayd",
            "--prefix=true",
            "readwrite",
            &format!("{prefix}/"),
        ]);
        self.ctl(&["user", "add", &format!("{user}:{password}")]);
        self.ctl(&["user", "grant-role", user, "overlayd"]);
        self.ctl(&["auth", "enable"]);
        self.ctl_user = Some(root.to_string());
    }

    pub fn try_ctl(&self, args: &[&str]) -> Result<Output, String> {
        crate::netns::try_run(self.ctl_cmd().args(args))
    }

    /// `etcdctl <args>`, stdout as text; panics on failure.
    pub fn ctl(&self, args: &[&str]) -> String {
        match self.try_ctl(args) {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => panic!("etcdctl failed: {e}"),
        }
    }

    pub fn put(&self, key: &str, value: &str) {
        self.ctl(&["put", key, value]);
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.ctl(&["get", key, "--print-value-only"]);
        let v = out.trim_end_matches('\n');
        if v.is_empty() {
            None
        } else {
            Some(v.to_string())
        }
    }

    /// Keys under `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.ctl(&["get", prefix, "--prefix", "--keys-only"]);
        let mut keys: Vec<String> = out
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }

    pub fn is_running(&mut self) -> bool {
        self.daemon.is_running()
    }
}
