//! Contact with etcd, taken from the two streams a node holds open anyway (issue 13: no polling):
//! the watch, and the lease keep-alive. No request is made only to learn that etcd answers; a light
//! call every 15 s from each of 10 000 nodes is still 670 requests a second.
//!
//! An open watch stream is contact: every call requires a leader, so etcd cancels the stream of a
//! member that loses its quorum (within a few election timeouts), and gRPC's HTTP/2 keep-alive
//! (10 s, 5 s to answer) closes one whose member died or froze. Each keep-alive answer is contact
//! too, and says how long the lease has left; the TTL shown in between counts down from it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::report::LeaseReport;
use super::{Health, Known};
use crate::registry::{Observer, Registry};

pub(super) struct EtcdState {
    pub(super) endpoints: String,
    pub(super) prefix: String,
    /// When etcd last answered; while the watch stream is open, when it opened or last sent.
    last_contact: Option<Instant>,
    /// The watch stream is open and etcd has answered on it.
    pub(super) watching: bool,
    /// Why the watch stream ended or could not be opened, until etcd answers again.
    pub(super) last_error: Option<String>,
}

impl EtcdState {
    /// How long etcd has been silent: not at all while the watch stream is open.
    pub(super) fn silent_for(&self, now: Instant) -> Option<Duration> {
        if self.watching {
            return Some(Duration::ZERO);
        }
        self.last_contact.map(|t| now.saturating_duration_since(t))
    }
}

/// The last keep-alive answer for this node's lease.
pub(super) struct Refreshed {
    /// In hex, as [`LeaseReport::lease_id`].
    lease_id: String,
    at: Instant,
    ttl: i64,
}

impl Health {
    /// The etcd this daemon talks to; connecting counts as contact.
    pub fn set_etcd(&self, reg: &Registry) {
        self.known().etcd = Some(EtcdState {
            endpoints: reg.endpoints().to_string(),
            prefix: reg.keys.prefix().to_string(),
            last_contact: None,
            watching: false,
            last_error: None,
        });
        self.etcd_answered(None);
    }

    /// etcd answered; `watching`: on the watch stream (true) or not (None: leave as it is).
    fn etcd_answered(&self, watching: Option<bool>) {
        if let Some(e) = self.known().etcd.as_mut() {
            e.last_contact = Some(Instant::now());
            e.last_error = None;
            if let Some(w) = watching {
                e.watching = w;
            }
        }
        self.metrics.etcd_last_contact.set(unix_now());
    }

    /// Brings the gauges that count time up to now (each scrape calls it).
    pub(super) fn refresh_etcd_gauges(&self, k: &Known, now: Instant) {
        if k.etcd.as_ref().is_some_and(|e| e.watching) {
            self.metrics.etcd_last_contact.set(unix_now());
        }
        let ttl = match k.lease_report(now) {
            None => -1,
            Some(l) if !l.held => 0,
            Some(l) => l.ttl_left_seconds.unwrap_or(-1),
        };
        self.metrics.lease_ttl.set(ttl);
    }
}

impl Known {
    /// This node's lease as of `now`: the TTL left counts down from the last keep-alive answer.
    pub(super) fn lease_report(&self, now: Instant) -> Option<LeaseReport> {
        let mut l = self.lease.clone()?;
        if let (true, Some(r)) = (l.held, &self.refreshed) {
            if l.lease_id.as_deref() == Some(r.lease_id.as_str()) {
                let gone = now.saturating_duration_since(r.at).as_secs() as i64;
                l.ttl_left_seconds = Some((r.ttl - gone).max(0));
                l.granted_ttl_seconds = Some(r.ttl);
            }
        }
        Some(l)
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The registry's reports about etcd, turned into readiness and metrics.
impl Observer for Health {
    fn watching(&self) {
        self.etcd_answered(Some(true));
    }

    fn not_watching(&self, why: &str) {
        if let Some(e) = self.known().etcd.as_mut() {
            if e.watching {
                // Heard from until now.
                e.last_contact = Some(Instant::now());
            }
            e.watching = false;
            e.last_error = Some(why.to_string());
        }
    }

    fn watch_restarted(&self) {
        self.metrics.etcd_watch_restarts.inc();
    }

    fn lease_refreshed(&self, lease_id: i64, ttl: i64) {
        self.etcd_answered(None);
        self.known().refreshed = Some(Refreshed {
            lease_id: format!("{lease_id:x}"),
            at: Instant::now(),
            ttl,
        });
    }
}
