//! Everything ztunnel and the waypoint share: the configuration model and its loader, SPIFFE
//! identities and the built-in CA, TLS configuration, and the HBONE tunnel protocol.

pub mod admin_http;
pub mod admission;
pub mod config;
pub mod copy;
pub mod dns_cache;
pub mod drain;
pub mod duration;
pub mod hbone;
pub mod identity;
pub mod l7;
pub mod logging;
pub mod model;
pub mod policy;
pub mod revalidate;
pub mod service_entries;
pub mod shards;
pub mod snapshot;
pub mod sockopt;
pub mod task;
pub mod tls;
pub mod vip;
pub mod xds;
