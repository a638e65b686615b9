//! The control plane: watches the Kubernetes API, translates it in a sans-IO index into the same
//! model the local YAML produces, serves it over delta xDS (Istio's WDS types for ztunnel, our
//! L7 type for waypoints), signs workload certificates from CSRs, and (on the Lease holder)
//! creates each waypoint's Kubernetes objects.

pub mod auth;
pub mod xds;
