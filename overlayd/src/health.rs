//! `/healthz` and `/metrics` (Prometheus text format) for probes and dashboards.
//!
//! Healthy means: this node holds its subnet and the last data plane pass succeeded. The counters
//! make drift visible: a cluster whose `overlayd_dataplane_changes_total` keeps climbing without
//! lease changes has something else fighting over its routes. `overlayd_pod_addresses` against
//! `overlayd_pod_address_capacity` warns before a node's subnet runs out (read from the CNI
//! plugin's store at each scrape).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use ipnetwork::Ipv4Network;
use overlay_state::ipam_store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    /// `added` or `removed`
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NetworkLabels {
    /// The CNI network (the plugin keeps one store per network name).
    pub network: String,
}

pub struct Health {
    registry: Registry,
    pub leases: Gauge,
    pub peers: Gauge,
    pub changes: Family<ChangeLabels, Counter>,
    pub errors: Counter,
    /// Failed writes for single peers (the pass goes on for the others).
    pub peer_errors: Counter,
    pub peers_failing: Gauge,
    pod_addresses: Family<NetworkLabels, Gauge>,
    pod_capacity: Gauge,
    /// The plugin's data dir and this node's subnet, once leased.
    ipam: Mutex<Option<(PathBuf, Ipv4Network)>>,
    leased: AtomicBool,
    dataplane_ok: AtomicBool,
    /// Why this node refuses to go on (its subnet held by another node), while it does.
    refused: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Health {
        let mut registry = Registry::with_prefix("overlayd");
        let leases = Gauge::default();
        let peers = Gauge::default();
        let changes = Family::<ChangeLabels, Counter>::default();
        let errors = Counter::default();
        let peer_errors = Counter::default();
        let peers_failing = Gauge::default();
        let pod_addresses = Family::<NetworkLabels, Gauge>::default();
        let pod_capacity = Gauge::default();
        registry.register(
            "subnet_leases",
            "Subnet leases in etcd, this node's included",
            leases.clone(),
        );
        registry.register("peers", "Other nodes this node routes to", peers.clone());
        registry.register(
            "dataplane_changes",
            "Routes, ARP and FDB entries written or removed to match the leases",
            changes.clone(),
        );
        registry.register(
            "dataplane_errors",
            "Data plane passes that failed",
            errors.clone(),
        );
        registry.register(
            "peer_errors",
            "Route, ARP or FDB writes for one peer (or removals of stale entries) the kernel refused; each is retried with backoff while the other peers are programmed",
            peer_errors.clone(),
        );
        registry.register(
            "peers_failing",
            "Peers (or stale entries) not yet right after the last pass, waiting for a retry",
            peers_failing.clone(),
        );
        registry.register(
            "pod_addresses",
            "Pod addresses of this node's subnet the CNI plugin has handed out",
            pod_addresses.clone(),
        );
        registry.register(
            "pod_address_capacity",
            "Pod addresses this node's subnet has (all but network, gateway, broadcast)",
            pod_capacity.clone(),
        );
        Health {
            registry,
            leases,
            peers,
            changes,
            errors,
            peer_errors,
            peers_failing,
            pod_addresses,
            pod_capacity,
            ipam: Mutex::new(None),
            leased: AtomicBool::new(false),
            dataplane_ok: AtomicBool::new(true),
            refused: Mutex::new(None),
        }
    }

    pub fn set_leased(&self, v: bool) {
        self.leased.store(v, Ordering::Relaxed);
    }

    /// Where to count pod addresses from: the plugin's data dir, and the subnet leased.
    pub fn set_ipam(&self, data_dir: PathBuf, subnet: Ipv4Network) {
        self.pod_capacity
            .set(ipam_store::pod_capacity(subnet) as i64);
        if let Ok(mut g) = self.ipam.lock() {
            *g = Some((data_dir, subnet));
        }
    }

    /// Recounts the pod addresses (a directory listing per network; no file is read).
    fn refresh_pod_addresses(&self) {
        let Some((dir, subnet)) = self.ipam.lock().ok().and_then(|g| g.clone()) else {
            return;
        };
        self.pod_addresses.clear();
        for u in ipam_store::usage(&dir, subnet) {
            if let Ok(n) = u.allocated {
                self.pod_addresses
                    .get_or_create(&NetworkLabels { network: u.network })
                    .set(n as i64);
            }
        }
    }

    /// Not ready, with `why`, until called with `None`.
    pub fn set_refused(&self, why: Option<String>) {
        if let Ok(mut g) = self.refused.lock() {
            *g = why;
        }
    }

    pub fn set_dataplane_ok(&self, v: bool) {
        self.dataplane_ok.store(v, Ordering::Relaxed);
    }

    pub fn count_changes(&self, added: usize, removed: usize) {
        for (op, n) in [("added", added), ("removed", removed)] {
            if n > 0 {
                self.changes
                    .get_or_create(&ChangeLabels { op: op.into() })
                    .inc_by(n as u64);
            }
        }
    }

    fn healthy(&self) -> Result<(), String> {
        if let Some(why) = self.refused.lock().ok().and_then(|g| g.clone()) {
            return Err(why);
        }
        if !self.leased.load(Ordering::Relaxed) {
            return Err("no subnet leased yet".into());
        }
        if !self.dataplane_ok.load(Ordering::Relaxed) {
            return Err("the last data plane pass failed; see the log".into());
        }
        Ok(())
    }
}

async fn healthz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    match h.healthy() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
    let counted = h.clone();
    // Directory listings: off the async threads.
    let _ = tokio::task::spawn_blocking(move || counted.refresh_pod_addresses()).await;
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &h.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "cannot encode metrics\n".to_string(),
        ),
    }
}

/// Serves until the process ends. A port that cannot be bound is logged, not fatal: the overlay
/// matters more than its probes.
pub async fn serve(addr: SocketAddr, health: Arc<Health>) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(health);
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            info!(%addr, "serving /healthz and /metrics");
            if let Err(e) = axum::serve(listener, app).await {
                warn!("health server stopped: {e}");
            }
        }
        Err(e) => {
            warn!("cannot serve /healthz and /metrics on {addr}: {e}; pass another --metrics-addr")
        }
    }
}
