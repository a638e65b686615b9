//! The control plane: watches the Kubernetes API, translates it in a sans-IO index into the same
//! model the local YAML produces, serves it over delta xDS (Istio's WDS types for ztunnel, our
//! L7 type for waypoints), signs workload certificates from CSRs, and (on the Lease holder)
//! creates each waypoint's Kubernetes objects.
//!
//! Data flow: [`watch`] (kube-runtime watchers) → [`index`] (sans-IO translation, change feed)
//! → [`feed`] + [`publish`] (changes as xDS resources) → [`xds`] (delta ADS server).
//! [`waypoint`]: the Lease holder's waypoint controller (Gateway → Deployment, Service, HPA…).
//! [`events`]: the Lease holder's Kubernetes Events about rejected and NACKed Istio objects.

pub mod auth;
pub mod ca;
pub mod crds;
pub mod events;
pub mod feed;
pub mod gateway_class;
pub mod index;
pub mod leader;
pub mod publish;
pub mod serving;
pub mod watch;
pub mod waypoint;
pub mod xds;
