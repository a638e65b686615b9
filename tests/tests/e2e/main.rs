//! End-to-end suites, one module per area, linked as one test binary (one link and one
//! monomorphisation of the harness instead of one per file; tests of all areas share the
//! runner's threads). Every test builds its own uniquely named namespaces, so they run in
//! parallel safely.

mod admin_endpoints;
mod capture_rules;
mod cluster_mesh;
mod cluster_waypoint;
mod config_reload;
mod dns_proxy;
mod egress;
mod egress_waypoint;
mod envoy_interop;
mod hardening_authz;
mod hardening_config;
mod hardening_l4;
mod hardening_limits;
mod harness_selftest;
mod hbone_server;
mod ipv6;
mod l4_routing;
mod l4_security;
mod l4_traffic;
mod lifecycle;
mod metrics;
mod restart;
mod time_wait;
mod waypoint;
mod waypoint_protocols;
mod waypoint_routing;
