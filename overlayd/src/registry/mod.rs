//! The etcd side: connection, subnet keys and lease values, the claim transaction, keep-alive and
//! the watch that mirrors every node's lease.
//!
//! Schema (flannel-compatible, etcd v3): `<prefix>/config` holds the network config;
//! `<prefix>/subnets/<a.b.c.d>-<len>` one key per leased subnet, bound to an etcd lease. A subnet key
//! without a lease is a reservation.

pub mod acquire;
pub mod client;
mod config_watch;
pub mod keepalive;
pub mod keys;
pub mod lease_value;
pub mod observe;
pub mod screen;
pub mod tls_files;
pub mod watch;
mod watch_stream;

pub use acquire::{acquire, reassert, AcquireError, AcquireRequest, Acquired, How, ReassertError};
pub use client::{Registry, RegistryError};
pub use keys::Keys;
pub use lease_value::{Lease, LeaseValue};
pub use observe::{Observer, Unobserved};
pub use watch::LeaseSet;
