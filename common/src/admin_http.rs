//! The small HTTP servers beside each proxy's data plane (admin, metrics, readiness): a
//! hyper HTTP/1 accept loop over a plain handler function, run on a dedicated single-thread
//! runtime so a saturated data plane cannot starve health checks, plus response helpers.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;

/// What every admin handler returns.
pub type HttpResponse = Response<Full<Bytes>>;
/// A handler for one listener.
pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> HttpResponse + Send + Sync>;

pub fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> HttpResponse {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

/// A plain-text response (a newline is appended).
pub fn text(status: StatusCode, body: impl Into<String>) -> HttpResponse {
    let mut s = body.into();
    s.push('\n');
    respond(status, "text/plain; charset=utf-8", s)
}

/// A JSON response, or 500 if the value cannot be serialised.
pub fn json(value: &impl serde::Serialize) -> HttpResponse {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("serialisation failed: {e}"),
        ),
    }
}

/// The percent-decoded value of query parameter `name` (`+` is a space, as in forms).
pub fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k)? == name)
            .then(|| percent_decode(v))
            .flatten()
    })
}

/// Decodes `%XX` escapes and `+`; `None` for malformed escapes or non-UTF-8 results.
pub fn percent_decode(s: &str) -> Option<String> {
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

/// `GET /logging` shows the filter; `POST /logging?level=<filter>` replaces it.
pub fn logging(log: &crate::logging::LogHandle, req: &Request<Incoming>) -> HttpResponse {
    if req.method() == http::Method::GET {
        return text(StatusCode::OK, format!("level={}", log.current()));
    }
    if req.method() != http::Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST");
    }
    match query_param(req, "level") {
        Some(level) if !level.is_empty() => match log.set(&level) {
            Ok(()) => text(StatusCode::OK, format!("level={level}")),
            Err(e) => text(StatusCode::BAD_REQUEST, e),
        },
        _ => text(
            StatusCode::BAD_REQUEST,
            "usage: POST /logging?level=<filter>",
        ),
    }
}

/// `GET /healthz/ready`: 200 once `ready`, 503 before and while draining.
pub fn readiness(ready: &std::sync::atomic::AtomicBool, req: &Request<Incoming>) -> HttpResponse {
    match req.uri().path() {
        "/healthz/ready" if ready.load(std::sync::atomic::Ordering::Acquire) => {
            text(StatusCode::OK, "ready")
        }
        "/healthz/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Prometheus text exposition of `registry` on `/metrics` (and Envoy's `/stats/prometheus`).
pub fn metrics(
    registry: &prometheus_client::registry::Registry,
    req: &Request<Incoming>,
) -> HttpResponse {
    match req.uri().path() {
        "/metrics" | "/stats/prometheus" => {
            let mut out = String::new();
            if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
                return text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding: {e}"));
            }
            respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                out,
            )
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Serves `handler` on `listener` forever (HTTP/1.1).
pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handler(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Binds each address (so a port clash is a start-up error) and serves its handler on a
/// dedicated `<name>` thread with its own single-thread runtime.
pub fn spawn(name: &str, endpoints: Vec<(std::net::SocketAddr, Handler)>) -> std::io::Result<()> {
    spawn_with(name, endpoints, false)
}

/// Like [`spawn`], with `SO_REUSEPORT` on every listener so that a second process of the same
/// user can bind the same ports while this one still runs (a node agent upgraded in place);
/// the kernel then spreads new connections over both until one closes its listeners.
pub fn spawn_reuse_port(
    name: &str,
    endpoints: Vec<(std::net::SocketAddr, Handler)>,
) -> std::io::Result<()> {
    spawn_with(name, endpoints, true)
}

fn bind(addr: std::net::SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

fn spawn_with(
    name: &str,
    endpoints: Vec<(std::net::SocketAddr, Handler)>,
    reuse_port: bool,
) -> std::io::Result<()> {
    let mut bound = Vec::new();
    for (addr, handler) in endpoints {
        let l = bind(addr, reuse_port)
            .map_err(|e| std::io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
        bound.push((l, handler));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            rt.block_on(async move {
                let mut set = tokio::task::JoinSet::new();
                for (l, handler) in bound {
                    match TcpListener::from_std(l) {
                        Ok(l) => {
                            set.spawn(serve(l, handler));
                        }
                        Err(e) => tracing::error!(error = %e, "admin listener failed"),
                    }
                }
                while set.join_next().await.is_some() {}
            })
        })?;
    Ok(())
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
