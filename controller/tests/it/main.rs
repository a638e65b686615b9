//! Controller integration suites (CA, xDS, watches against the fake API server, waypoint
//! controller), one module per area, linked as one test binary.

mod ca_remote_store;
mod ca_root;
mod ca_server;
mod ca_support;
mod crds;
mod events;
mod feed_to_proxy;
mod watch_fake_apiserver;
mod waypoint_controller;
mod waypoint_params;
mod waypoint_support;
mod xds_server;
