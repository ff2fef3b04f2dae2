//! `/healthz` and `/metrics` (Prometheus text format) for probes and dashboards.
//!
//! Healthy means: this node holds its subnet and the last data plane pass succeeded. The counters
//! make drift visible: a cluster whose `overlayd_dataplane_changes_total` keeps climbing without
//! lease changes has something else fighting over its routes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
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

pub struct Health {
    registry: Registry,
    pub leases: Gauge,
    pub peers: Gauge,
    pub changes: Family<ChangeLabels, Counter>,
    pub errors: Counter,
    leased: AtomicBool,
    dataplane_ok: AtomicBool,
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
        Health {
            registry,
            leases,
            peers,
            changes,
            errors,
            leased: AtomicBool::new(false),
            dataplane_ok: AtomicBool::new(true),
        }
    }

    pub fn set_leased(&self, v: bool) {
        self.leased.store(v, Ordering::Relaxed);
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

    fn healthy(&self) -> Result<(), &'static str> {
        if !self.leased.load(Ordering::Relaxed) {
            return Err("no subnet leased yet");
        }
        if !self.dataplane_ok.load(Ordering::Relaxed) {
            return Err("the last data plane pass failed; see the log");
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
