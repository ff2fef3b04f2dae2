//! Connection to etcd, and the reads every other piece builds on.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, KvClient, WatchClient};
use ipnetwork::Ipv4Network;
use tracing::{debug, info, warn};

use super::keys::Keys;
use super::lease_value::{Lease, LeaseValue};
use super::watch::LeaseSet;
use crate::cli::EtcdArgs;
use crate::config::{ConfigError, NetworkConfig, EXAMPLE_CONFIG};

/// Every unary call gets this long; a stuck call must not hang the daemon.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest message accepted from etcd on the listing and the lease watch. tonic's default, 4 MiB,
/// is what a one-piece listing of ~15 000 leases with EKS-length NodeNames takes, and a watch's
/// catch-up of a few large values: the call failed and was retried for ever (issue 13). Listings
/// are paged and watch answers fragmented, so messages stay far smaller; what etcd cannot cut is
/// one key, as large as its `--max-request-bytes` (1.5 MiB by default, 10 MiB at most is etcd's
/// advice), and a watch fragment holds up to that much. Still a bound: each message is buffered
/// whole before it is decoded.
pub const MAX_MESSAGE_BYTES: usize = 32 << 20;

/// Keys per page of a listing: about 250 kB of answer with flannel-sized values, few round trips at
/// 20 000 leases (kube-apiserver's pager asks for 500).
pub const LIST_PAGE: i64 = 1000;

/// Listings started again after etcd compacted away the revision a listing's pages were read at.
const LIST_RESTARTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd unreachable at {endpoints}: {detail}")]
    Unreachable { endpoints: String, detail: String },
    #[error(
        "network config not found: key {key} does not exist in etcd at {endpoints}. Seed it with:\n  \
         ETCDCTL_API=3 etcdctl --endpoints={endpoints} put {key} '{example}'\n\
         (keys written with the etcd v2 API, `etcdctl set` or ETCDCTL_API=2, are invisible to overlayd, \
         which speaks v3 only; also check --etcd-prefix)",
        example = EXAMPLE_CONFIG
    )]
    ConfigMissing { key: String, endpoints: String },
    #[error("network config at {key}: {source}")]
    ConfigInvalid {
        key: String,
        #[source]
        source: ConfigError,
    },
    // `cause`, not `source`: the message says it already, `{:#}` would say it twice.
    #[error("cannot read TLS file {path} (for etcd at {endpoints}): {cause}")]
    TlsFile {
        path: String,
        endpoints: String,
        cause: std::io::Error,
    },
    #[error("TLS file {path} (for etcd at {endpoints}) {problem}")]
    TlsContent {
        path: String,
        endpoints: String,
        problem: String,
    },
    /// The TLS handshake failed for a reason waiting cannot fix.
    #[error("TLS with etcd at {endpoints} failed: {detail}")]
    TlsRejected { endpoints: String, detail: String },
    #[error("etcd at {endpoints} refused the request: {detail}")]
    Rejected { endpoints: String, detail: String },
    /// An answer over [`MAX_MESSAGE_BYTES`]: asking for less at a time can help, asking again cannot.
    #[error(
        "etcd at {endpoints} sent a message larger than overlayd accepts ({detail}); a value under \
         the prefix that large is not a lease"
    )]
    TooLarge { endpoints: String, detail: String },
    /// The revision a read asked for is gone: reading again from the newest one helps.
    #[error("etcd at {endpoints} compacted the revision asked for: {detail}")]
    Compacted { endpoints: String, detail: String },
    #[error(
        "etcd at {endpoints} rejected user {user:?}: wrong username or password. Check \
         --etcd-username and --etcd-password (OVERLAYD_ETCD_USERNAME, OVERLAYD_ETCD_PASSWORD), \
         e.g. with `etcdctl --endpoints={endpoints} --user {user} auth status`"
    )]
    AuthFailed { endpoints: String, user: String },
}

impl RegistryError {
    /// Whether waiting and trying again can help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Unreachable { .. }
                | RegistryError::ConfigMissing { .. }
                | RegistryError::Compacted { .. }
        )
    }
}

#[derive(Clone)]
pub struct Registry {
    client: Client,
    /// `client`'s KV and watch clients with the [`MAX_MESSAGE_BYTES`] limit, set once here: the
    /// listing and the lease watch go through these (the [`Client`] has no setter for its own).
    /// They share its channel and its login token.
    kv: KvClient,
    watch: WatchClient,
    pub keys: Keys,
    errors: ErrorContext,
    /// Immediate retries of a call that found no connection: twice per other endpoint.
    retries: usize,
    /// `--etcd-watch-silence`.
    watch_silence: Duration,
}

/// What an etcd failure is told with: one mapping for connecting and for every call.
#[derive(Clone)]
struct ErrorContext {
    endpoints: String,
    /// Said after a connection failure when the TLS flags look incomplete for the endpoints.
    tls_hint: &'static str,
    prefix: String,
    user: Option<String>,
    cafile: Option<String>,
    certfile: Option<String>,
}

impl Registry {
    /// Builds a client. Connecting is lazy in the gRPC layer, so an unreachable etcd shows up on the
    /// first call, as [`RegistryError::Unreachable`].
    pub async fn connect(args: &EtcdArgs) -> Result<Registry, RegistryError> {
        let endpoints = args.etcd_endpoints.join(",");
        // Requiring a leader (etcd's `hasleader` metadata, clientv3.WithRequireLeader in Go, as
        // kube-apiserver sets on its watches): a member cut off from the others refuses calls
        // and cancels our watch, instead of serving a view that no longer changes.
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        if let (Some(u), Some(p)) = (&args.etcd_username, &args.etcd_password) {
            // etcd forgets every token when it restarts (and after its TTL): without the refresh
            // each call would fail with "invalid auth token" from then on.
            opts = opts
                .with_user(u.clone(), p.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(tls) = super::tls_files::load(args, &endpoints)? {
            opts = opts.with_tls(tls);
        }
        let https = args
            .etcd_endpoints
            .iter()
            .any(|e| e.starts_with("https://"));
        let tls_hint = match (https, &args.etcd_cafile, &args.etcd_certfile) {
            (true, None, _) => " (an https endpoint: pass --etcd-cafile with the CA that signed etcd's certificate)",
            (true, Some(_), None) => {
                " (an etcd started with --client-cert-auth drops connections without a client certificate: \
                 pass --etcd-certfile and --etcd-keyfile)"
            }
            (false, Some(_), _) => " (TLS files were given but the endpoints are http://; use https://)",
            _ => "",
        };
        let keys = Keys::new(&args.etcd_prefix);
        let errors = ErrorContext {
            endpoints,
            tls_hint,
            prefix: keys.prefix().to_string(),
            user: args.etcd_username.clone(),
            cafile: args.etcd_cafile.as_ref().map(|p| p.display().to_string()),
            certfile: args.etcd_certfile.as_ref().map(|p| p.display().to_string()),
        };
        // With credentials, connecting authenticates at once (a call); without, it is lazy.
        let client = Client::connect(&args.etcd_endpoints, Some(opts))
            .await
            .map_err(|e| errors.map(e))?;
        Ok(Registry {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            client,
            keys,
            errors,
            retries: 2 * args.etcd_endpoints.len().saturating_sub(1),
            watch_silence: args.etcd_watch_silence,
        })
    }

    /// How long a watch may be silent before etcd is asked for its progress.
    pub fn watch_silence(&self) -> Duration {
        self.watch_silence
    }

    pub fn endpoints(&self) -> &str {
        &self.errors.endpoints
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs one etcd call, made by `f` on a client, with a deadline, and maps its failure.
    ///
    /// A call refused for an outdated login is made once more after logging in again: etcd-client
    /// does that by itself only for "invalid auth token", not for "revision of auth store is old",
    /// which etcd answers (with JWT tokens, and to calls in flight during the change) after any
    /// `user add` or `role grant` by anyone.
    ///
    /// With several endpoints, a call that fails at once for want of a connection (a member down,
    /// or without a leader) is made again: etcd-client's balancing picks endpoints at random and
    /// does not leave a dead one out, so the next try most likely reaches a live member.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, RegistryError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_on(&self.client, f).await
    }

    /// [`Registry::call`] on the watch client that accepts messages up to [`MAX_MESSAGE_BYTES`].
    pub(super) async fn call_watch<T, F, Fut>(&self, f: F) -> Result<T, RegistryError>
    where
        F: Fn(WatchClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_on(&self.watch, f).await
    }

    async fn call_on<C, T, F, Fut>(&self, client: &C, f: F) -> Result<T, RegistryError>
    where
        C: Clone,
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut relogged = false;
        let mut other_members = self.retries;
        loop {
            match self.call_once(f(client.clone())).await {
                Ok(v) => return Ok(v),
                Err(Stale(e)) if self.errors.user.is_some() && !relogged => {
                    info!(
                        "etcd's auth store changed since this node logged in ({e}); logging in again"
                    );
                    self.relogin().await?;
                    relogged = true;
                }
                Err(CallError::Failed(e @ RegistryError::Unreachable { .. }))
                    if other_members > 0 =>
                {
                    other_members -= 1;
                    debug!("{e}; trying again (another member)");
                }
                Err(c) => return Err(c.into_error(self)),
            }
        }
    }

    async fn call_once<T, Fut>(&self, fut: Fut) -> Result<T, CallError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if is_stale_login(&e) => Err(Stale(e)),
            Ok(Err(e)) => Err(CallError::Failed(self.map_err(e))),
            Err(_) => Err(CallError::TimedOut(RegistryError::Unreachable {
                endpoints: self.errors.endpoints.clone(),
                detail: format!("no answer within {}s", CALL_TIMEOUT.as_secs()),
            })),
        }
    }

    /// Logs in again with the configured user, replacing the token every clone of the client
    /// sends (watches and keep-alives opened from now on included). Without a user: nothing to do.
    pub async fn relogin(&self) -> Result<(), RegistryError> {
        if self.errors.user.is_none() {
            return Ok(());
        }
        match tokio::time::timeout(CALL_TIMEOUT, self.client.refresh_token()).await {
            Ok(r) => r.map_err(|e| self.map_err(e)),
            Err(_) => Err(RegistryError::Unreachable {
                endpoints: self.errors.endpoints.clone(),
                detail: format!("no answer to logging in within {}s", CALL_TIMEOUT.as_secs()),
            }),
        }
    }

    /// Whether this client logs in as a user (and so can log in again).
    pub fn has_user(&self) -> bool {
        self.errors.user.is_some()
    }

    pub fn map_err(&self, e: etcd_client::Error) -> RegistryError {
        self.errors.map(e)
    }

    /// Reads and validates `<prefix>/config`. Warnings (unknown fields) come back for logging.
    pub async fn network_config(&self) -> Result<(NetworkConfig, Vec<String>), RegistryError> {
        let key = self.keys.config();
        let k = key.as_str();
        let resp = self
            .call(|mut c| async move { c.get(k, None).await })
            .await?;
        let Some(kv) = resp.kvs().first() else {
            return Err(RegistryError::ConfigMissing {
                key,
                endpoints: self.errors.endpoints.clone(),
            });
        };
        NetworkConfig::parse(kv.value())
            .map_err(|source| RegistryError::ConfigInvalid { key, source })
    }

    /// Every subnet key, with the revision the listing was taken at.
    ///
    /// Read in pages of [`LIST_PAGE`] keys, all at the first page's revision, as kube-apiserver
    /// lists: one answer for every lease grows with the cluster (over 4 MiB at 20 000 leases), and
    /// etcd builds each answer whole in its memory too. A page over [`MAX_MESSAGE_BYTES`] (large
    /// foreign values under the prefix) is asked for again in halves; a compaction of that revision
    /// midway starts the listing again at the newest one.
    pub async fn list_leases(&self) -> Result<LeaseSet, RegistryError> {
        let mut restarts = 0;
        loop {
            match self.list_pages().await {
                Err(e @ RegistryError::Compacted { .. }) if restarts < LIST_RESTARTS => {
                    restarts += 1;
                    debug!("{e}; listing the leases again from the newest revision");
                }
                other => return other,
            }
        }
    }

    async fn list_pages(&self) -> Result<LeaseSet, RegistryError> {
        let prefix = self.keys.subnets();
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.into_bytes();
        let mut page = LIST_PAGE;
        // The revision every page is read at: the first page's (0 there: the newest).
        let mut revision = 0;
        let mut set = LeaseSet::default();
        loop {
            let opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(page)
                .with_revision(revision);
            let (key, opts) = (&from, &opts);
            let resp = match self
                .call_on(&self.kv, |mut kv| async move {
                    kv.get(key.clone(), Some(opts.clone())).await
                })
                .await
            {
                Ok(r) => r,
                Err(e @ RegistryError::TooLarge { .. }) if page > 1 => {
                    page = (page / 2).max(1);
                    warn!("{e}; asking for {page} keys at a time");
                    continue;
                }
                Err(e) => return Err(e),
            };
            if revision == 0 {
                revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                set.revision = revision;
            }
            for kv in resp.kvs() {
                set.apply_put(self, kv.key(), kv.value(), kv.lease(), kv.mod_revision());
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    // The smallest key after the last one read.
                    from = [last.key(), b"\0"].concat();
                }
                _ => return Ok(set),
            }
        }
    }

    /// The key of one subnet, if it exists.
    pub async fn lease(&self, subnet: &Ipv4Network) -> Result<Option<Lease>, RegistryError> {
        let key = self.keys.subnet(subnet);
        let key = key.as_str();
        let resp = self
            .call(|mut c| async move { c.get(key, None).await })
            .await?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| self.lease_from_kv(kv.key(), kv.value(), kv.lease(), kv.mod_revision())))
    }

    pub fn lease_from_kv(
        &self,
        key: &[u8],
        value: &[u8],
        lease_id: i64,
        mod_revision: i64,
    ) -> Option<Lease> {
        let subnet: Ipv4Network = self.keys.parse_subnet(key)?;
        Some(Lease {
            subnet,
            value: serde_json::from_slice::<LeaseValue>(value).ok(),
            lease_id,
            mod_revision,
        })
    }
}

/// The end of the range of keys that start with `prefix`: its last byte that can grow, grown by one
/// (what etcd-client's `with_prefix` computes, needed here to go on from a key within the prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|b| *b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        // Every byte 0xff: no key is past them, and etcd reads "\0" as "to the end".
        None => vec![0],
    }
}

/// A failed call, with a refusal for an outdated login kept apart: logging in again fixes it.
enum CallError {
    Stale(etcd_client::Error),
    Failed(RegistryError),
    /// No answer within [`CALL_TIMEOUT`]: not tried again at once (it already took long).
    TimedOut(RegistryError),
}
use CallError::Stale;

impl CallError {
    fn into_error(self, reg: &Registry) -> RegistryError {
        match self {
            Stale(e) => reg.map_err(e),
            CallError::Failed(e) | CallError::TimedOut(e) => e,
        }
    }
}

/// etcd's answer to a token issued before the last change to users, roles or permissions.
pub const OLD_AUTH_REVISION: &str = "revision of auth store is old";

fn is_stale_login(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains(OLD_AUTH_REVISION))
}

/// The innermost cause ("Connection refused (os error 111)"): gRPC's top-level messages alone
/// ("tcp connect error") do not say what to fix.
impl ErrorContext {
    fn map(&self, e: etcd_client::Error) -> RegistryError {
        use etcd_client::Error as E;
        let endpoints = self.endpoints.clone();
        match e {
            E::GRpcStatus(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unknown
                        // A connection etcd drops in the TLS handshake (no or a refused client
                        // certificate) can surface as a cancelled call.
                        | tonic::Code::Cancelled
                ) =>
            {
                let cause = std::error::Error::source(&s).map(root_cause);
                if let Some(detail) = cause.as_deref().and_then(|c| self.tls_refusal(c)) {
                    return RegistryError::TlsRejected { endpoints, detail };
                }
                RegistryError::Unreachable {
                    endpoints,
                    detail: match std::error::Error::source(&s) {
                        Some(src) => {
                            format!("{}: {}{}", s.message(), root_cause(src), self.tls_hint)
                        }
                        None => format!("{}{}", s.message(), self.tls_hint),
                    },
                }
            }
            // tonic's own refusal of an answer over the limit, not etcd's.
            E::GRpcStatus(s)
                if s.code() == tonic::Code::OutOfRange
                    && s.message().contains("message length too large") =>
            {
                RegistryError::TooLarge {
                    endpoints,
                    detail: s.message().to_string(),
                }
            }
            E::GRpcStatus(s)
                if s.code() == tonic::Code::OutOfRange
                    && s.message().contains("required revision has been compacted") =>
            {
                RegistryError::Compacted {
                    endpoints,
                    detail: s.message().to_string(),
                }
            }
            E::GRpcStatus(s)
                if matches!(auth_problem(&s), Some(AuthProblem::BadCredentials))
                    && self.user.is_some() =>
            {
                RegistryError::AuthFailed {
                    endpoints,
                    user: self.user.clone().unwrap_or_default(),
                }
            }
            E::GRpcStatus(s) => {
                let hint = match auth_problem(&s) {
                    Some(AuthProblem::NoUser) => {
                        " (etcd has authentication enabled: pass --etcd-username and \
                         --etcd-password, or OVERLAYD_ETCD_USERNAME and OVERLAYD_ETCD_PASSWORD)"
                            .to_string()
                    }
                    Some(AuthProblem::NoPermission) => format!(
                        " (the etcd user needs read and write under {prefix}/ and nothing \
                         else: `etcdctl role grant-permission <its role> --prefix=true \
                         readwrite {prefix}/`)",
                        prefix = self.prefix
                    ),
                    Some(AuthProblem::BadCredentials) => " (wrong username or password)".into(),
                    None => String::new(),
                };
                RegistryError::Rejected {
                    endpoints,
                    detail: format!("{}: {}{hint}", s.code(), s.message()),
                }
            }
            E::TransportError(t) => {
                let cause = root_cause(&t);
                match self.tls_refusal(&cause) {
                    Some(detail) => RegistryError::TlsRejected { endpoints, detail },
                    None => RegistryError::Unreachable {
                        endpoints,
                        detail: format!("{t}: {cause}{}", self.tls_hint),
                    },
                }
            }
            E::IoError(io) => RegistryError::Unreachable {
                endpoints,
                detail: io.to_string(),
            },
            other => RegistryError::Rejected {
                endpoints,
                detail: other.to_string(),
            },
        }
    }
}

impl ErrorContext {
    /// A handshake failure that names what to fix: etcd's certificate not signed by our CA, or
    /// our client certificate refused by etcd.
    fn tls_refusal(&self, cause: &str) -> Option<String> {
        let ca = self.cafile.as_deref().unwrap_or("(none given)");
        let cert = self.certfile.as_deref().unwrap_or("(none given)");
        if cause.contains("UnknownIssuer") || cause.contains("invalid peer certificate") {
            Some(format!(
                "etcd's server certificate is not signed by the CA in {ca} (--etcd-cafile): \
                 {cause}. Pass the CA etcd's --cert-file was issued by"
            ))
        } else if cause.contains("BadCertificate")
            || cause.contains("CertificateExpired")
            || cause.contains("UnknownCA")
            || cause.contains("CertificateRequired")
        {
            // No certificate was given: etcd's alert and a dropped connection (which it sends
            // as often, depending on timing) both mean "give one", and both get the same hint
            // and the same retries, not an exit one time and retries the next.
            self.certfile.as_ref()?;
            Some(format!(
                "etcd refused this node's client certificate {cert} (--etcd-certfile): {cause}. \
                 It must be signed by the CA in etcd's --trusted-ca-file and be valid now \
                 (`openssl x509 -noout -issuer -dates -in {cert}`)"
            ))
        } else {
            None
        }
    }
}

/// What etcd's authentication refused, recognised by etcd's own messages (its gRPC codes are
/// shared with other failures).
enum AuthProblem {
    BadCredentials,
    NoUser,
    NoPermission,
}

fn auth_problem(s: &tonic::Status) -> Option<AuthProblem> {
    let m = s.message();
    if m.contains("authentication failed") {
        Some(AuthProblem::BadCredentials)
    } else if m.contains("user name is empty") {
        Some(AuthProblem::NoUser)
    } else if s.code() == tonic::Code::PermissionDenied {
        Some(AuthProblem::NoPermission)
    } else {
        None
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
