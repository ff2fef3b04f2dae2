//! The HTTP endpoints. `/healthz` is liveness: it answers as long as the process and its async
//! runtime do (waiting for etcd or a config is no reason for the kubelet to restart us).
//! `/readyz` is readiness: 200 when every check passes, else 503 with one line per check, the
//! failing ones first. `/status` is the whole [`StatusReport`](super::report::StatusReport).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tracing::{info, warn};

use super::Health;

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(h): State<Arc<Health>>) -> impl IntoResponse {
    let peers = h.peers_with_probes();
    let mut checks = super::readiness::checks(&h, &peers).await;
    let ready = checks.iter().all(|c| c.ok);
    h.metrics().ready.set(i64::from(ready));
    checks.sort_by_key(|c| c.ok);
    let mut body = String::from(if ready { "ready\n" } else { "not ready\n" });
    for c in &checks {
        let mark = if c.ok { "ok  " } else { "FAIL" };
        body.push_str(&format!("{mark} {}: {}\n", c.name, c.detail));
    }
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

async fn status(State(h): State<Arc<Health>>) -> impl IntoResponse {
    let mut report = h.report().await;
    let counted = h.clone();
    let links = h.link_names().await;
    // Directory listings: off the async threads.
    report.ipam = tokio::task::spawn_blocking(move || counted.ipam_usage(links.as_ref()))
        .await
        .unwrap_or_default();
    match serde_json::to_string_pretty(&report) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body + "\n",
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("cannot encode the status: {e}\n"),
        ),
    }
}

async fn metrics(State(h): State<Arc<Health>>) -> impl IntoResponse {
    // The readiness gauges and the pod address counts are refreshed at each scrape.
    let _ = h.report().await;
    let counted = h.clone();
    let links = h.link_names().await;
    let _ = tokio::task::spawn_blocking(move || counted.ipam_usage(links.as_ref())).await;
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &h.metrics().registry) {
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
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(health);
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            info!(%addr, "serving /healthz, /readyz, /status and /metrics");
            if let Err(e) = axum::serve(listener, app).await {
                warn!("health server stopped: {e}");
            }
        }
        Err(e) => {
            warn!("cannot serve /healthz, /readyz, /status and /metrics on {addr}: {e}; pass another --metrics-addr")
        }
    }
}
