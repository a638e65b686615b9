//! Everything ztunnel and the waypoint share: the configuration model and its loader, SPIFFE
//! identities and the built-in CA, TLS configuration, and the HBONE tunnel protocol.

pub mod config;
pub mod copy;
pub mod drain;
pub mod hbone;
pub mod identity;
pub mod model;
pub mod policy;
pub mod snapshot;
pub mod tls;
