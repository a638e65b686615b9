//! The control-plane wire types shared by the proxies (clients) and the controller (server):
//! Envoy's delta xDS transport, Istio's WDS (`istio.workload.Address`) and L4 authorization
//! (`istio.security.Authorization`) types with Istio's field numbers, Istio's certificate
//! service, and our own config resource type, all generated from `common/proto/` at build time.
//! [`convert`] maps them to and from the config model.

pub mod client;
pub mod convert;

/// Generated protobuf messages and gRPC stubs, nested by protobuf package.
#[allow(clippy::all, missing_docs, unreachable_pub)]
pub mod proto {
    pub mod envoy {
        pub mod service {
            pub mod discovery {
                pub mod v3 {
                    include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
                }
            }
        }
    }
    pub mod istio {
        pub mod workload {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
        }
        pub mod security {
            include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
        }
        pub mod v1 {
            pub mod auth {
                include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
            }
        }
    }
    pub mod ambient {
        pub mod config {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/ambient.config.v1.rs"));
            }
        }
    }
}

pub use proto::ambient::config::v1 as mesh_config;
pub use proto::envoy::service::discovery::v3 as discovery;
pub use proto::istio::security;
pub use proto::istio::v1::auth as ca;
pub use proto::istio::workload;

/// Type URL of Istio's workload/service addresses.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of Istio's L4 authorization policies.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
/// Type URL of our config resources (Kubernetes objects WDS cannot carry).
pub const CONFIG_TYPE: &str = "type.googleapis.com/ambient.config.v1.ConfigResource";
/// Name of the Workload extension carrying the pod's labels (Istio's ztunnel ignores it).
pub const LABELS_EXTENSION: &str = "ambient.config.v1.WorkloadLabels";
/// Marks an Address resource the controller derived from a ServiceEntry (its hosts as
/// Services, its endpoints as Workloads) for Istio's ztunnel, which learns ServiceEntries only
/// from the Address feed. Our proxies build the same, and more (DNS resolution, subsets,
/// waypoints), from the ServiceEntry config resource, so they skip these. On a Service it is
/// an extension of this name; on a Workload an annotation (in [`LABELS_EXTENSION`]) whose
/// value is the entry's `<namespace>/<name>`.
pub const SERVICE_ENTRY_MARKER: &str = "ambient.config.v1.FromServiceEntry";
/// Node metadata key by which a client says it accepts a large first response split over
/// several responses ([`PARTIAL_RESPONSE`] on all but the last). Our proxies send it; an Istio
/// ztunnel does not, and gets the whole state in one response as istiod sends it (it would
/// call itself ready after the first part).
pub const CHUNKED_METADATA: &str = "AMBIENT_CHUNKED_PUSH";
/// `system_version_info` of a response that more of the same first response follows.
pub const PARTIAL_RESPONSE: &str = "partial";
