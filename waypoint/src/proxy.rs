//! The life of one HTTP request in the waypoint, as named phases: route (match) → forward to
//! the endpoint over HBONE → respond → log and record metrics.

use crate::app::State;
use crate::body::{self, Body, Counted, OnDone};
use crate::hop;
use crate::metrics::{RequestHandles, RequestLabels};
use crate::pipeline;
use crate::upstream::UpstreamProtocol;
use common::identity::Identity;
use common::model::{Service, Workload};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// What is known about the downstream connection a request arrived on.
pub struct ConnContext {
    pub service: Arc<Service>,
    pub port: u16,
    /// The CONNECT authority: the service VIP and port the client dialled (the original
    /// destination, for `PASSTHROUGH`).
    pub target: SocketAddr,
    pub client: SocketAddr,
    pub peer: Identity,
    pub source: Option<Arc<Workload>>,
    pub protocol: UpstreamProtocol,
    /// Metric series already resolved on this connection, by (endpoint uid, code, flags, gRPC): the
    /// label set is the same for most requests of a connection, so it is built once.
    pub series: std::sync::Mutex<HashMap<SeriesKey, RequestHandles>>,
}

/// (endpoint uid, routed service if not the addressed one, response code, response flags,
/// gRPC request).
type SeriesKey = (String, Option<String>, u16, &'static str, bool);

impl ConnContext {
    fn series(
        &self,
        state: &State,
        dst: Option<&Workload>,
        routed: Option<&Service>,
        code: u16,
        flags: &'static str,
        grpc: bool,
    ) -> RequestHandles {
        // The routed service only when a route sent the request elsewhere (no allocation in
        // the common case).
        let routed = routed.filter(|s| s.hostname != self.service.hostname);
        let key = (
            dst.map(|w| w.uid.clone()).unwrap_or_default(),
            routed.map(|s| s.hostname.clone()),
            code,
            flags,
            grpc,
        );
        let mut cache = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = cache.get(&key) {
            return h.clone();
        }
        let h = state
            .metrics
            .handles(&labels(self, dst, routed, code, flags, grpc));
        if cache.len() < 256 {
            cache.insert(key, h.clone());
        }
        h
    }
}

/// One access-log line per request, with the fields of Envoy's Istio default format.
pub(crate) struct RequestLog {
    start_time: SystemTime,
    start: Instant,
    method: String,
    path: String,
    protocol: &'static str,
    authority: String,
    user_agent: String,
    x_forwarded_for: String,
    request_id: String,
    downstream_remote_address: String,
    response_code: u16,
    response_flags: &'static str,
    pub(crate) upstream_host: String,
    pub(crate) upstream_cluster: String,
    pub(crate) route_name: String,
    bytes_received: u64,
    bytes_sent: u64,
}

fn header(req: &Request<Incoming>, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

impl RequestLog {
    fn new(req: &Request<Incoming>, ctx: &ConnContext) -> Self {
        RequestLog {
            start_time: SystemTime::now(),
            start: Instant::now(),
            method: req.method().to_string(),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
            protocol: match req.version() {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            authority: req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_else(|| header(req, "host")),
            user_agent: header(req, "user-agent"),
            x_forwarded_for: header(req, "x-forwarded-for"),
            request_id: header(req, "x-request-id"),
            downstream_remote_address: ctx.client.to_string(),
            response_code: 0,
            response_flags: "-",
            upstream_host: "-".into(),
            upstream_cluster: "-".into(),
            route_name: "-".into(),
            bytes_received: 0,
            bytes_sent: 0,
        }
    }

    fn emit(&self) -> f64 {
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return duration_ms;
        }
        let start_time = humantime_rfc3339(self.start_time);
        let line = serde_json::json!({
            "start_time": start_time,
            "method": self.method,
            "path": self.path,
            "protocol": self.protocol,
            "response_code": self.response_code,
            "response_flags": self.response_flags,
            "duration": duration_ms.round() as u64,
            "upstream_host": self.upstream_host,
            "upstream_cluster": self.upstream_cluster,
            "route_name": self.route_name,
            "downstream_remote_address": self.downstream_remote_address,
            "authority": self.authority,
            "x_forwarded_for": self.x_forwarded_for,
            "request_id": self.request_id,
            "user_agent": self.user_agent,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
        });
        tracing::info!(target: "access", "{line}");
        duration_ms
    }
}

/// A random UUID (version 4) for `x-request-id`.
fn request_id() -> String {
    let (a, b) = (crate::rand::u64(), crate::rand::u64());
    let a = (a & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// RFC 3339 UTC with milliseconds, without pulling in a time-formatting crate.
fn humantime_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn labels(
    ctx: &ConnContext,
    dst: Option<&Workload>,
    routed: Option<&Service>,
    code: u16,
    flags: &str,
    grpc: bool,
) -> RequestLabels {
    let service = routed.unwrap_or(&ctx.service);
    let s = |v: Option<&str>| v.unwrap_or("unknown").to_string();
    let src = ctx.source.as_deref();
    RequestLabels {
        reporter: "waypoint".into(),
        source_workload: s(src.map(|w| w.workload_name())),
        source_workload_namespace: s(src.map(|w| w.namespace.as_str())),
        source_principal: ctx.peer.to_string(),
        source_app: s(src.map(|w| w.canonical_service())),
        source_version: s(src.and_then(Workload::revision)),
        source_canonical_service: s(src.map(|w| w.canonical_service())),
        source_canonical_revision: s(src.and_then(Workload::revision)),
        destination_app: s(dst.map(|w| w.canonical_service())),
        destination_version: s(dst.and_then(Workload::revision)),
        destination_canonical_service: s(dst.map(|w| w.canonical_service())),
        destination_canonical_revision: s(dst.and_then(Workload::revision)),
        destination_workload: s(dst.map(|w| w.workload_name())),
        destination_workload_namespace: s(dst.map(|w| w.namespace.as_str())),
        destination_principal: dst
            .map(|w| w.identity().to_string())
            .unwrap_or_else(|| "unknown".into()),
        destination_service: service.hostname.clone(),
        destination_service_name: service.name.clone(),
        destination_service_namespace: service.namespace.clone(),
        // Istio reports gRPC (by content type) apart from other HTTP.
        request_protocol: if grpc { "grpc" } else { "http" }.into(),
        response_code: code.to_string(),
        response_flags: flags.to_string(),
        connection_security_policy: "mutual_tls".into(),
    }
}

/// After a 101, the two upgraded connections (client side and endpoint side) are joined and
/// bytes flow unchanged until either closes (WebSocket and other `Upgrade` protocols), or
/// until a new configuration no longer allows the request that opened them (`live`).
async fn join_upgraded(
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    live: Option<(
        common::revalidate::Registration<crate::authz::Grant>,
        common::revalidate::Revoked,
    )>,
) {
    let (_registration, revoked) = match live {
        Some((r, revoked)) => (Some(r), Some(revoked)),
        None => (None, None),
    };
    let revoked = async move {
        match revoked {
            Some(r) => r.wait().await,
            None => std::future::pending().await,
        }
    };
    match tokio::try_join!(down, up) {
        Ok((down, up)) => {
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut down, &mut up) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "upgraded connection ended with error");
                    }
                }
                why = revoked => {
                    tracing::debug!(reason = %why, "upgraded connection revoked");
                }
            }
        }
        Err(e) => tracing::info!(error = %e, "upgrade failed"),
    }
}

/// Handles one request end to end. The access-log line and the metrics are written when the
/// response body has been sent (or abandoned), so they carry the final byte counts.
pub async fn handle(
    state: Arc<State>,
    ctx: Arc<ConnContext>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // Like Envoy, give every request an id the endpoint and the access log share.
    if !req.headers().contains_key("x-request-id") {
        if let Ok(v) = http::HeaderValue::from_str(&request_id()) {
            req.headers_mut().insert("x-request-id", v);
        }
    }
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut log = RequestLog::new(&req, &ctx);
    let upgrade = hop::upgrade_protocol(req.headers());
    let downstream_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    hop::strip(req.headers_mut(), upgrade);
    let received = Arc::new(AtomicU64::new(0));
    let req = req.map(|b| Counted::wrap(body::incoming(b), received.clone(), None));
    let snap = state.config.current();
    let done = pipeline::run(&state, &ctx, &snap, &mut log, req).await;
    drop(snap);
    let mut resp = done.response;
    if let (Some(up), Some(down)) = (done.upgrade, downstream_upgrade) {
        let live = done.grant.map(|g| state.live_upgrades.register(g));
        tokio::spawn(join_upgraded(down, up, live));
    }
    log.response_code = resp.status().as_u16();
    log.response_flags = done.flag;
    let series = ctx.series(
        &state,
        done.endpoint.as_deref(),
        done.service.as_deref(),
        log.response_code,
        done.flag,
        grpc,
    );
    let in_flight = done.in_flight;
    let on_done: OnDone = Box::new(move |sent| {
        drop(in_flight);
        log.bytes_sent = sent;
        log.bytes_received = received.load(Ordering::Relaxed);
        let duration_ms = log.emit();
        series.record(duration_ms, log.bytes_received, log.bytes_sent);
    });
    resp = resp.map(|b| Counted::wrap(b, Arc::new(AtomicU64::new(0)), Some(on_done)));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_uuid_v4() {
        let id = super::request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(id, super::request_id());
    }
}
