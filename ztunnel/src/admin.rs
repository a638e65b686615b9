//! The HTTP endpoints beside the data plane: admin on 127.0.0.1:15000 (`/config_dump`,
//! `/logging`, `/healthz`), Prometheus `/metrics` on 15020 and readiness `/healthz/ready` on
//! 15021. They run on their own single-threaded runtime so a busy data plane never starves them.

use crate::logging::LogHandle;
use crate::state::ProxyState;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

pub struct AdminState {
    pub proxy: Arc<ProxyState>,
    pub log: LogHandle,
    pub ready: Arc<AtomicBool>,
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut s = body.into();
    s.push('\n');
    respond(status, "text/plain; charset=utf-8", s)
}

/// The percent-decoded value of query parameter `name` (`+` is a space, as in forms).
fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k)? == name)
            .then(|| percent_decode(v))
            .flatten()
    })
}

/// Decodes `%XX` escapes and `+`; `None` for malformed escapes or non-UTF-8 results.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn config_dump(s: &AdminState) -> Response<Full<Bytes>> {
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
    let dump = serde_json::json!({
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
    });
    match serde_json::to_vec_pretty(&dump) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("config dump failed: {e}"),
        ),
    }
}

fn admin(s: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/config_dump") => config_dump(s),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::GET, "/logging") => text(StatusCode::OK, format!("level={}", s.log.current())),
        (&Method::POST, "/logging") => match query_param(req, "level") {
            Some(level) if !level.is_empty() => match s.log.set(&level) {
                Ok(()) => text(StatusCode::OK, format!("level={level}")),
                Err(e) => text(StatusCode::BAD_REQUEST, e),
            },
            _ => text(
                StatusCode::BAD_REQUEST,
                "usage: POST /logging?level=<filter>",
            ),
        },
        (_, "/") => text(
            StatusCode::OK,
            "ztunnel admin: GET /config_dump, GET|POST /logging?level=<filter>, GET /healthz",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

fn metrics(s: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" | "/stats/prometheus" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            s.proxy.metrics.encode(),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

fn readiness(s: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz/ready" if s.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready"),
        "/healthz/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

#[derive(Clone, Copy)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

/// Serves one of the endpoints on `listener` forever.
pub async fn serve(listener: TcpListener, endpoint: Endpoint, state: Arc<AdminState>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let resp = match endpoint {
                        Endpoint::Admin => admin(&state, &req),
                        Endpoint::Metrics => metrics(&state, &req),
                        Endpoint::Readiness => readiness(&state, &req),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("debug%2Caccess%3Dinfo").as_deref(),
            Some("debug,access=info")
        );
        assert_eq!(percent_decode("a+b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%2"), None);
        assert_eq!(percent_decode("bad%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
