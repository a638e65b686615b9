//! ztunnel's admin endpoints: `/config_dump`, `/logging`, `/healthz` on 127.0.0.1:15000,
//! Prometheus `/metrics` on 15020, `/healthz/ready` on 15021 (served by `common::admin_http`).

use crate::state::ProxyState;
use common::admin_http::{self, Handler, HttpResponse};
use common::logging::LogHandle;
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub struct AdminState {
    pub proxy: Arc<ProxyState>,
    pub log: LogHandle,
    pub ready: Arc<AtomicBool>,
}

fn config_dump(s: &AdminState) -> HttpResponse {
    let p = &s.proxy;
    let snap = p.config.current();
    let certs: Vec<serde_json::Value> = p
        .certs
        .summary()
        .into_iter()
        .map(|(id, not_after, generation)| {
            let expires_in = not_after
                .duration_since(std::time::SystemTime::now())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            serde_json::json!({"identity": id.to_string(), "expiresInSeconds": expires_in, "generation": generation})
        })
        .collect();
    admin_http::json(&serde_json::json!({
        "node": p.node,
        "configGeneration": p.config.generation(),
        "config": &*snap,
        "certificates": certs,
        "hbonePool": {
            "connectionsOpened": p.hbone.connections_opened(),
            "pooledConnections": p.hbone.pooled_connections(),
        },
        "activeConnections": p.active_connections(),
        "draining": p.drain.is_draining(),
    }))
}

fn admin(s: &AdminState, req: &Request<Incoming>) -> HttpResponse {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/config_dump") => config_dump(s),
        (&Method::GET, "/healthz") => admin_http::text(StatusCode::OK, "ok"),
        (_, "/logging") => admin_http::logging(&s.log, req),
        (_, "/") => admin_http::text(
            StatusCode::OK,
            "ztunnel admin: GET /config_dump, GET|POST /logging?level=<filter>, GET /healthz",
        ),
        _ => admin_http::text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// The three listeners' handlers, in the order admin, metrics, readiness.
pub fn handlers(state: Arc<AdminState>) -> [Handler; 3] {
    let a = state.clone();
    let m = state.clone();
    let r = state;
    [
        Arc::new(move |req: &Request<Incoming>| admin(&a, req)),
        Arc::new(move |req: &Request<Incoming>| {
            admin_http::metrics(&m.proxy.metrics.registry, req)
        }),
        Arc::new(move |req: &Request<Incoming>| admin_http::readiness(&r.ready, req)),
    ]
}
