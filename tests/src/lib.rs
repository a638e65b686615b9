//! End-to-end test harness for the ambient mesh data plane. It builds real topologies of network
//! namespaces ("nodes" and "pods" joined by veths), runs real `ztunnel` processes in the node
//! namespaces with TPROXY capture, real `waypoint` processes in their own (uncaptured) pods for
//! L7, and runs real servers and clients in the pods. Nothing is mocked. Needs root
//! (CAP_NET_ADMIN), `ip`, `nft` and `tcpdump`, and `cargo build --bins` first.

pub mod admin;
pub mod apps;
pub mod capture;
pub mod cluster;
pub mod config;
pub mod dns;
pub mod envoy;
pub mod hbone;
pub mod http_apps;
pub mod l7mesh;
pub mod mesh;
pub mod netns;
pub mod scenarios;
pub mod support;
pub mod testdir;
pub mod topology;
pub mod tproxy;
pub mod traffic;
pub mod waypoint;
pub mod ztunnel;
