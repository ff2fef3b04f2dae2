//! What the etcd side reports as it goes, to whoever watches over the daemon (the health server
//! implements it): the registry code does not depend on how it is shown. Contact with etcd comes
//! from here, from the streams that are open anyway, so no call is made only to check on etcd.

/// Told of each change; every method has a default that ignores it.
pub trait Observer: Send + Sync {
    /// etcd answered on the watch stream (its creation, events, progress): the stream is open on a
    /// member that has a leader (every call requires one). Called for each message.
    fn watching(&self) {}
    /// The watch stream ended or could not be opened; `why` says what etcd or the transport said.
    fn not_watching(&self, _why: &str) {}
    /// The watch is being started again after it ended or could not be started (each attempt,
    /// the first start excepted): a rate that stays high means the retries do not back off.
    fn watch_restarted(&self) {}
    /// etcd answered a keep-alive of `lease_id`: `ttl` seconds are left on it from now.
    fn lease_refreshed(&self, _lease_id: i64, _ttl: i64) {}
}

/// Reports to no one (tools and tests that only want the lease set).
pub struct Unobserved;

impl Observer for Unobserved {}
