//! One structured access-log line per proxied connection (target `access`), with the filter
//! chain, both ends, the peer identity, bytes each way, duration and any error.

use common::identity::Identity;
use std::net::SocketAddr;
use std::time::Instant;

pub struct AccessLog {
    pub chain: &'static str,
    pub start: Instant,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub upstream: Option<SocketAddr>,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_service: Option<String>,
    pub peer_identity: Option<Identity>,
    pub received: u64,
    pub sent: u64,
    pub error: Option<String>,
}

impl AccessLog {
    pub fn new(chain: &'static str, src: SocketAddr, dst: SocketAddr) -> Self {
        AccessLog {
            chain,
            start: Instant::now(),
            src,
            dst,
            upstream: None,
            src_workload: None,
            dst_workload: None,
            dst_service: None,
            peer_identity: None,
            received: 0,
            sent: 0,
            error: None,
        }
    }

    pub fn emit(&self) {
        let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let upstream = self
            .upstream
            .map(|u| u.to_string())
            .unwrap_or_else(|| "-".into());
        let peer = self
            .peer_identity
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| "-".into());
        if let Some(err) = &self.error {
            tracing::warn!(
                target: "access",
                chain = self.chain,
                src = %self.src,
                dst = %self.dst,
                upstream = %upstream,
                src_workload = %dash(&self.src_workload),
                dst_workload = %dash(&self.dst_workload),
                dst_service = %dash(&self.dst_service),
                peer_identity = %peer,
                bytes_received = self.received,
                bytes_sent = self.sent,
                duration_ms = format_args!("{duration_ms:.2}"),
                error = %err,
                "connection complete"
            );
        } else {
            tracing::info!(
                target: "access",
                chain = self.chain,
                src = %self.src,
                dst = %self.dst,
                upstream = %upstream,
                src_workload = %dash(&self.src_workload),
                dst_workload = %dash(&self.dst_workload),
                dst_service = %dash(&self.dst_service),
                peer_identity = %peer,
                bytes_received = self.received,
                bytes_sent = self.sent,
                duration_ms = format_args!("{duration_ms:.2}"),
                "connection complete"
            );
        }
    }
}
