//! The phases of one request, in order: path normalization (400 for an escaped slash, see
//! [`common::l7::path`]) → L7 authorization against the addressed service → match the
//! VirtualService route (404 `NR` when none) → CORS preflight → fault injection → redirect /
//! direct response → pick the destination (weights, subset) → rewrite and header operations →
//! circuit breaking → mirror → forward with timeout, retries and outlier detection (each
//! attempt, and each mirror, authorized against the endpoint it goes to, see [`crate::authz`])
//! → response header operations.

use crate::app::State;
use crate::authz;
use crate::body::{self, Body};
use crate::hop;
use crate::outlier::Observation;
use crate::proxy::{ConnContext, RequestLog};
use crate::route::{self, Cluster, LocalReply};
use crate::upstream::{self, UpstreamError};
use bytes::Bytes;
use common::l7::actions::{Abort, AttemptOutcome, RetryPolicy};
use common::l7::cors::Preflight;
use common::l7::route::{HttpRoute, RouteAction, WeightedDestination};
use common::l7::select::{mint_cookie, request_hash};
use common::l7::{HttpMatch, LbPolicy, RequestInfo};
use common::model::{Service, Workload};
use common::snapshot::Snapshot;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Requests with bodies up to this size are buffered so they can be retried and mirrored.
const MAX_REPLAY_BODY: u64 = 1024 * 1024;

/// What the pipeline produced.
pub struct Done {
    pub response: Response<Body>,
    pub flag: &'static str,
    pub endpoint: Option<Arc<Workload>>,
    /// The service the request was routed to (a route may name another service than the one
    /// addressed): `destination_service` in the metrics.
    pub service: Option<Arc<Service>>,
    /// Counts the request against its endpoint (least request) until the response has been
    /// sent in full, not just until its headers arrived.
    pub in_flight: Option<route::InFlight>,
    /// The endpoint side of an upgraded connection (after a 101).
    pub upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// What the upgraded request was authorized on, to re-check while it lives.
    pub grant: Option<authz::Grant>,
}

fn reply(r: LocalReply) -> Done {
    let mut resp = Response::new(body::full(format!("{}\n", r.body)));
    *resp.status_mut() = r.status;
    Done {
        response: resp,
        flag: r.flag,
        endpoint: None,
        service: None,
        in_flight: None,
        upgrade: None,
        grant: None,
    }
}

fn plain(status: StatusCode, headers: HeaderMap, text: String) -> Done {
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    resp.headers_mut().extend(headers);
    Done {
        response: resp,
        flag: "-",
        endpoint: None,
        service: None,
        in_flight: None,
        upgrade: None,
        grant: None,
    }
}

/// The request's path and query, and its authority (`:authority` or `Host`).
fn target_of(req: &Request<Body>, ctx: &ConnContext) -> (String, String) {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| ctx.service.hostname.clone());
    (path, authority)
}

/// Normalizes the request's path in place (the query is kept), as Envoy does before any filter:
/// authorization, routing and the endpoint all see the normalized path.
fn normalize_path(req: &mut Request<Body>) -> Result<(), String> {
    let Some(pq) = req.uri().path_and_query() else {
        return Ok(());
    };
    let normalized = match common::l7::path::normalize(pq.as_str()) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(()),
        Ok(std::borrow::Cow::Owned(p)) => p,
        Err(e) => return Err(e.to_string()),
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(
        normalized
            .parse()
            .map_err(|e| format!("normalized path {normalized:?}: {e}"))?,
    );
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| e.to_string())?;
    Ok(())
}

fn denied(reason: &common::policy::Denied) -> Done {
    tracing::debug!(%reason, "request denied by L7 policy");
    reply(LocalReply::new(
        StatusCode::FORBIDDEN,
        "-",
        authz::DENIED_BODY,
    ))
}

pub async fn run(
    state: &State,
    ctx: &ConnContext,
    snap: &Snapshot,
    log: &mut RequestLog,
    mut req: Request<Body>,
) -> Done {
    // Phase: path normalization, before anything reads the path.
    if let Err(why) = normalize_path(&mut req) {
        return reply(LocalReply::new(StatusCode::BAD_REQUEST, "DPE", why));
    }
    let (path, authority) = target_of(&req, ctx);
    let no_labels = common::model::Labels::new();
    let info = RequestInfo {
        method: req.method().as_str(),
        scheme: "http",
        authority: &authority,
        path: &path,
        headers: req.headers(),
        port: ctx.port,
        source_labels: ctx.source.as_ref().map(|w| &w.labels).unwrap_or(&no_labels),
        source_namespace: ctx
            .source
            .as_ref()
            .map(|w| w.namespace.as_str())
            .unwrap_or(""),
        source_ip: Some(ctx.client.ip()),
    };
    // Phase: L7 authorization, first as Envoy's RBAC filter runs before CORS, faults and the
    // router: no redirect, fault, 404 or preflight answer for a request that is not allowed.
    let own_cluster = match authz::addressed_service(
        state,
        ctx,
        snap,
        req.method().as_str(),
        req.headers(),
        &authority,
        &path,
    ) {
        Ok(c) => c,
        Err(reason) => return denied(&reason),
    };

    // Phase: match.
    let matched: Option<HttpMatch> = match snap
        .l7
        .routes
        .mesh(&ctx.service.hostname, &state.identity.namespace)
    {
        None => None,
        Some(table) => match table.match_http(&info) {
            Some(m) => Some(m),
            None => {
                log.route_name = "-".into();
                return reply(LocalReply::new(
                    StatusCode::NOT_FOUND,
                    "NR",
                    format!(
                        "no route matched in VirtualService {}",
                        table.virtual_service
                    ),
                ));
            }
        },
    };
    let route: Option<&HttpRoute> = matched.map(|m| m.route);
    log.route_name = matched
        .and_then(|m| m.name())
        .unwrap_or_else(|| "default".into());

    // Phase: CORS preflight.
    if let Some(cors) = route.and_then(|r| r.cors.as_ref()) {
        if let Some(Preflight::Respond(h)) = cors.preflight(req.method(), req.headers()) {
            return plain(StatusCode::OK, h, String::new());
        }
    }

    // Phase: fault injection.
    if let Some(fault) = route.and_then(|r| r.fault.as_ref()) {
        let d = fault.decide(crate::rand::u64(), crate::rand::u64());
        if let Some(delay) = d.delay {
            tokio::time::sleep(delay).await;
        }
        match d.abort {
            Some(Abort::HttpStatus(code)) => {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return reply(LocalReply::new(status, "FI", "fault filter abort"));
            }
            Some(Abort::GrpcStatus(code)) => {
                let mut h = HeaderMap::new();
                h.insert("content-type", HeaderValue::from_static("application/grpc"));
                h.insert("grpc-status", HeaderValue::from(code));
                h.insert(
                    "grpc-message",
                    HeaderValue::from_static("fault filter abort"),
                );
                let mut d = plain(StatusCode::OK, h, String::new());
                d.flag = "FI";
                return d;
            }
            None => {}
        }
    }

    // Phase: action.
    let dest: Option<&WeightedDestination> = match route.map(|r| &r.action) {
        Some(RouteAction::Redirect(r)) => {
            let (code, location) = r.location("http", &authority, &path, ctx.port);
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&location) {
                h.insert(header::LOCATION, v);
            }
            let mut done = plain(code, h, String::new());
            route_response_headers(route, None, req.headers(), done.response.headers_mut());
            return done;
        }
        Some(RouteAction::DirectResponse { status, body }) => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            let mut done = plain(status, HeaderMap::new(), body.clone().unwrap_or_default());
            route_response_headers(route, None, req.headers(), done.response.headers_mut());
            return done;
        }
        Some(RouteAction::Forward(dests)) => match route::pick_destination(dests) {
            Some(d) => Some(d),
            None => {
                return reply(LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "NC",
                    "route has no destination with weight",
                ))
            }
        },
        None => None,
    };
    // A route to the service itself uses the cluster authorization already resolved.
    let resolved = match (dest, own_cluster) {
        (None, Some(own)) => Ok(own),
        _ => route::cluster_for(
            snap,
            &state.identity.namespace,
            dest.map(|d| &d.destination),
            &ctx.service,
            ctx.port,
        ),
    };
    let cluster = match resolved {
        Ok(c) => match route::with_dns_endpoints(state, c).await {
            Ok(c) => c,
            Err(r) => return reply(r),
        },
        Err(r) => return reply(r),
    };
    log.upstream_cluster = cluster.name.clone();

    // Phase: rewrite and request header operations.
    let (mut parts, req_body) = req.into_parts();
    let mut minted = None;
    let hash = match &cluster.policy.load_balancer {
        LbPolicy::ConsistentHash(key) => request_hash(
            key,
            &RequestInfo {
                headers: &parts.headers,
                ..info_for(&parts, &authority, &path, ctx, &no_labels)
            },
        )
        .or_else(|| {
            // A cookie policy with a ttl and no cookie yet: mint one and stick to its hash.
            minted = mint_cookie(key, crate::rand::u64());
            minted.as_ref().map(|m| m.hash)
        }),
        _ => None,
    };
    if let Some(m) = matched {
        if let Some(new_path) = m.rewritten_path(&path) {
            parts.uri = with_path(&parts.uri, &new_path);
        }
        if let Some(a) = dest.and_then(|d| m.rewritten_authority(d)) {
            if let Ok(v) = HeaderValue::from_str(a) {
                parts.headers.insert(header::HOST, v);
            }
            parts.uri = with_authority(&parts.uri, a);
        }
    }
    let mut request_layers = Vec::new();
    if let Some(d) = dest {
        request_layers.push(&d.headers.request);
    }
    if let Some(r) = route {
        request_layers.push(&r.headers.request);
    }
    for ops in &request_layers {
        ops.apply(&mut parts.headers);
    }

    // Phase: body buffering (for retries and mirrors).
    let retry: Option<RetryPolicy> = match route {
        Some(r) => r.retries.clone(),
        None => Some(RetryPolicy::istio_default()),
    };
    let mirrors = route.map(|r| r.mirrors.as_slice()).unwrap_or(&[]);
    let wants_replay = retry.as_ref().is_some_and(|r| r.attempts > 0) || !mirrors.is_empty();
    // A body known to be small is read whole first; any other body (chunked, or h2 without
    // content-length: every gRPC call) is streamed to the endpoint at once with a copy of up
    // to MAX_REPLAY_BODY kept, so streaming calls are never held back. Such a body is replayed
    // (retry, mirror) only if it ended within the cap, and retried only if the failed attempt
    // did not still hold it; otherwise the request is forwarded once and not mirrored.
    let (replay, first_body) = if wants_replay && replayable(&req_body) {
        match req_body.collect().await {
            Ok(c) => {
                let (r, b) = body::Replayable::buffered(body::Replay::from_collected(c));
                (Some(r), b)
            }
            Err(e) => {
                return reply(LocalReply::new(
                    StatusCode::BAD_REQUEST,
                    "DPE",
                    format!("reading the request body: {e}"),
                ))
            }
        }
    } else if wants_replay {
        let (r, b) = body::Replayable::streamed(req_body, MAX_REPLAY_BODY);
        (Some(r), b)
    } else {
        (None, req_body)
    };

    // Phase: circuit breaking, by the protocol spoken upstream (an upgraded HTTP/1.1 request
    // counts against http2MaxRequests). Waiting for a slot counts against the route timeout.
    let timeout = route.and_then(|r| r.timeout.as_ref()).map(|d| d.0);
    let deadline = timeout.map(common::duration::deadline);
    let upstream_proto = upstream::protocol_for(ctx.protocol, &cluster.policy.connection_pool);
    let admit = state.limits.admit(
        &cluster.name,
        &cluster.policy.connection_pool,
        upstream_proto,
    );
    let admitted = match deadline {
        Some(d) => match tokio::time::timeout_at(d, admit).await {
            Ok(a) => a,
            Err(_) => {
                return reply(LocalReply::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout (waiting for a connection-pool slot)",
                ))
            }
        },
        None => admit.await,
    };
    let Some(admitted) = admitted else {
        return reply(LocalReply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UO",
            format!(
                "upstream overflow: {} connection pool is full",
                cluster.name
            ),
        ));
    };

    // Phase: mirror (fire and forget; the response is discarded). A streamed body is mirrored
    // once it has ended within the replay cap; a larger one is not mirrored.
    if let Some(replay) = &replay {
        for m in mirrors {
            if !m.hit(crate::rand::u64()) {
                continue;
            }
            match route::cluster_for(
                snap,
                &state.identity.namespace,
                Some(&m.destination),
                &ctx.service,
                ctx.port,
            ) {
                Ok(mc) => match route::with_dns_endpoints(state, mc).await {
                    Ok(mc) => spawn_mirror(state, ctx, snap, mc, &parts, replay, &authority),
                    Err(r) => tracing::debug!(reason = %r.body, "mirror destination unavailable"),
                },
                Err(r) => tracing::debug!(reason = %r.body, "mirror destination unavailable"),
            }
        }
    }

    // Phase: forward, with timeout and retries.
    let attempts = async {
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retries_left = retry.as_ref().map(|r| r.attempts).unwrap_or(0);
        let mut _retry_slot = None;
        let mut next_body = Some(first_body);
        loop {
            let pick = match route::pick_endpoint(state, &cluster, hash, &tried, ctx.target) {
                Ok(p) => p,
                Err(r) => return (reply(r), None),
            };
            tried.push(pick.target.addr);
            // The workload that receives the request authorizes it (its ztunnel leaves L7
            // rules to the waypoint), whichever service the route chose, on every attempt.
            if let Err(reason) =
                authz::chosen_endpoint(state, ctx, snap, &parts, &authority, &cluster, &pick)
            {
                return (denied(&reason), None);
            }
            let body = next_body.take().unwrap_or_else(|| body::full(Bytes::new()));
            let mut up_req = Request::from_parts(clone_parts(&parts), body);
            *up_req.extensions_mut() = http::Extensions::new();
            let in_flight = state.balancers.in_flight(pick.target.addr);
            let per_try = retry
                .as_ref()
                .and_then(|r| r.per_try_timeout.as_ref())
                .map(|d| d.0);
            let pool = &cluster.policy.connection_pool;
            let proto = upstream::protocol_for(ctx.protocol, pool);
            shape_for(proto, &mut up_req, &authority);
            let sent = state
                .upstreams
                .send(&pick.target, proto, ctx.client, pool, up_req);
            let result = match per_try {
                Some(t) => tokio::time::timeout(t, sent)
                    .await
                    .unwrap_or(Err(UpstreamError::PerTryTimeout)),
                None => sent.await,
            };
            let outcome = match &result {
                Ok(resp) => AttemptOutcome::Response {
                    status: resp.status().as_u16(),
                    grpc_status: resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok()),
                },
                Err(e) => e.outcome(),
            };
            observe(state, &cluster, pick.target.addr, outcome);
            // Envoy's order: retriable? → attempts left (else `URX`) → a `maxRetries` slot
            // (else `UO`). A body that cannot be replayed disables retries (no flag).
            let mut stop = None;
            if retry.as_ref().is_some_and(|r| r.retriable(outcome)) {
                if retries_left == 0 {
                    stop = Some(upstream::RetryStop::LimitExceeded);
                } else if let Some(replay) = &replay {
                    match admitted.retry() {
                        None => stop = Some(upstream::RetryStop::Overflow),
                        Some(token) => {
                            if let Some(again) = replay.again() {
                                // Held until the next retry replaces it or the request ends,
                                // so `maxRetries` caps retries in flight, not just their
                                // backoff.
                                _retry_slot = Some(token);
                                retries_left -= 1;
                                next_body = Some(again);
                                if let Some(backoff) =
                                    retry.as_ref().and_then(|r| r.backoff.as_ref())
                                {
                                    tokio::time::sleep(backoff.0).await;
                                }
                                continue;
                            }
                        }
                    }
                }
            }
            return match result {
                Ok(resp) => {
                    let mut d = forwarded(resp, pick.endpoint.clone());
                    if d.upgrade.is_some() {
                        d.grant = Some(authz::Grant::new(
                            state, ctx, &parts, &authority, &cluster, &pick,
                        ));
                    }
                    d.flag = upstream::response_flags(None, stop);
                    d.in_flight = Some(in_flight);
                    (d, Some(pick))
                }
                Err(e) => {
                    let mut d = reply(LocalReply::new(
                        e.status(),
                        upstream::response_flags(Some(&e), stop),
                        e.to_string(),
                    ));
                    d.endpoint = Some(pick.endpoint.clone());
                    (d, Some(pick))
                }
            };
        }
    };
    let (mut done, pick) = match deadline {
        Some(d) => match tokio::time::timeout_at(d, attempts).await {
            Ok(v) => v,
            Err(_) => (
                reply(LocalReply::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout",
                )),
                None,
            ),
        },
        None => attempts.await,
    };
    drop(admitted);
    if let Some(p) = &pick {
        log.upstream_host = p.target.addr.to_string();
    }

    done.service = Some(cluster.service.clone());

    // Phase: response header operations, minted hash cookie and CORS headers.
    let h = done.response.headers_mut();
    if let Some(m) = minted {
        h.append(header::SET_COOKIE, m.set_cookie);
    }
    route_response_headers(route, dest, &parts.headers, h);
    done
}

/// The route's (and its destination's) response header operations and CORS headers.
fn route_response_headers(
    route: Option<&HttpRoute>,
    dest: Option<&WeightedDestination>,
    request_headers: &HeaderMap,
    h: &mut HeaderMap,
) {
    if let Some(d) = dest {
        d.headers.response.apply(h);
    }
    if let Some(r) = route {
        r.headers.response.apply(h);
        if let Some(cors) = &r.cors {
            h.extend(cors.response_headers(request_headers));
        }
    }
}

/// Shapes a request for the upstream protocol: HTTP/2 needs the version and an absolute URI,
/// whose authority comes from `Host` (else `authority`).
fn shape_for(proto: upstream::UpstreamProtocol, req: &mut Request<Body>, authority: &str) {
    if proto != upstream::UpstreamProtocol::H2c {
        return;
    }
    *req.version_mut() = http::Version::HTTP_2;
    if req.uri().authority().is_some() {
        return;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or(authority)
        .to_string();
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    if let Ok(u) = format!("http://{host}{pq}").parse() {
        *req.uri_mut() = u;
    }
}

fn info_for<'a>(
    parts: &'a http::request::Parts,
    authority: &'a str,
    path: &'a str,
    ctx: &'a ConnContext,
    no_labels: &'a common::model::Labels,
) -> RequestInfo<'a> {
    RequestInfo {
        method: parts.method.as_str(),
        scheme: "http",
        authority,
        path,
        headers: &parts.headers,
        port: ctx.port,
        source_labels: ctx.source.as_ref().map(|w| &w.labels).unwrap_or(no_labels),
        source_namespace: ctx
            .source
            .as_ref()
            .map(|w| w.namespace.as_str())
            .unwrap_or(""),
        source_ip: Some(ctx.client.ip()),
    }
}

/// Whether a request body is known to be small enough to read whole before forwarding (so it
/// can be retried and mirrored): already ended (no body, or h2 HEADERS with END_STREAM), or
/// a `content-length` (the codec's exact size) within [`MAX_REPLAY_BODY`]. A body of unknown
/// length (chunked, h2 without content-length) may be a long-lived stream and is not.
fn replayable(body: &Body) -> bool {
    use hyper::body::Body as _;
    body.is_end_stream()
        || body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= MAX_REPLAY_BODY)
}

fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut b = Request::builder()
        .method(p.method.clone())
        .uri(p.uri.clone())
        .version(p.version);
    if let Some(h) = b.headers_mut() {
        *h = p.headers.clone();
    }
    match b.body(()) {
        Ok(r) => r.into_parts().0,
        Err(_) => Request::new(()).into_parts().0,
    }
}

fn with_path(uri: &Uri, path_and_query: &str) -> Uri {
    let mut parts = uri.clone().into_parts();
    match path_and_query.parse() {
        Ok(pq) => parts.path_and_query = Some(pq),
        Err(_) => return uri.clone(),
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

fn with_authority(uri: &Uri, authority: &str) -> Uri {
    if uri.authority().is_none() {
        return uri.clone();
    }
    let mut parts = uri.clone().into_parts();
    match authority.parse() {
        Ok(a) => parts.authority = Some(a),
        Err(_) => return uri.clone(),
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

fn observe(state: &State, cluster: &Cluster, addr: SocketAddr, outcome: AttemptOutcome) {
    let Some(policy) = &cluster.policy.outlier_detection else {
        return;
    };
    let obs = match outcome {
        AttemptOutcome::Response { status, .. } => Observation::Status(status),
        AttemptOutcome::ConnectFailure => Observation::ConnectFailure,
        AttemptOutcome::Reset { .. } | AttemptOutcome::RefusedStream => Observation::Status(503),
    };
    state.outliers.record(
        &cluster.name,
        addr,
        obs,
        policy,
        cluster.endpoints.len(),
        Instant::now(),
    );
}

fn forwarded(mut resp: Response<hyper::body::Incoming>, endpoint: Arc<Workload>) -> Done {
    let upgrade = (resp.status() == StatusCode::SWITCHING_PROTOCOLS)
        .then(|| hop::upgrade_protocol(resp.headers()))
        .flatten();
    let on_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut resp));
    hop::strip(resp.headers_mut(), upgrade);
    Done {
        response: upstream::into_downstream(resp),
        flag: "-",
        endpoint: Some(endpoint),
        service: None,
        in_flight: None,
        upgrade: on_upgrade,
        grant: None,
    }
}

/// Mirror copies in flight at once; a copy beyond it is not sent (counted in
/// `waypoint_mirrors_dropped_total`): shadow traffic must never cost the real traffic memory or
/// connections.
pub const MAX_MIRRORS: usize = 256;
/// How long a mirror copy may take, response included, before it is abandoned.
pub const MIRROR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Reads a response body to its end and drops every frame as it comes: nothing is kept.
async fn discard<B: hyper::body::Body + Unpin>(mut body: B) {
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return;
        }
    }
}

/// Sends a copy of the request to a mirror cluster (Istio appends `-shadow` to the host) and
/// discards the response without buffering it; at most [`MAX_MIRRORS`] at a time, each within
/// [`MIRROR_TIMEOUT`].
fn spawn_mirror(
    state: &State,
    ctx: &ConnContext,
    snap: &Snapshot,
    cluster: Cluster,
    parts: &http::request::Parts,
    replay: &body::Replayable,
    authority: &str,
) {
    let Some(me) = state.me.upgrade() else { return };
    let Ok(slot) = state.mirror_slots.clone().try_acquire_owned() else {
        state.metrics.mirrors_dropped.inc();
        tracing::debug!("mirror capacity in use: copy not sent");
        return;
    };
    let whole = replay.whole();
    let Ok(pick) = route::pick_endpoint(&me, &cluster, None, &[], ctx.target) else {
        return;
    };
    // A mirror reaches a workload too: its policies decide whether the copy may be sent.
    if let Err(reason) = authz::chosen_endpoint(state, ctx, snap, parts, authority, &cluster, &pick)
    {
        tracing::debug!(%reason, "mirror request denied by L7 policy: not sent");
        return;
    }
    let mut p = clone_parts(parts);
    // The host after any rewrite, as Envoy shadows the request it would send.
    let current = p
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| p.uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| authority.to_string());
    let (host, port) = common::l7::rewrite::split_authority(&current);
    let shadow = match port {
        Some(port) => format!("{host}-shadow:{port}"),
        None => format!("{host}-shadow"),
    };
    if let Ok(v) = HeaderValue::from_str(&shadow) {
        p.headers.insert(header::HOST, v);
    }
    if p.uri.authority().is_some() {
        p.uri = with_authority(&p.uri, &shadow);
    }
    let proto = ctx.protocol;
    let client = ctx.client;
    tokio::spawn(async move {
        let _slot = slot;
        let copy = async {
            // A streamed request body is mirrored when it has ended within the replay cap.
            let Some(whole) = whole.await else {
                tracing::debug!("request body not kept whole: not mirrored");
                return;
            };
            let mut req = Request::from_parts(p, whole.body());
            let pool = cluster.policy.connection_pool.clone();
            let proto = upstream::protocol_for(proto, &pool);
            shape_for(proto, &mut req, &shadow);
            match me
                .upstreams
                .send(&pick.target, proto, client, &pool, req)
                .await
            {
                Ok(resp) => discard(resp.into_body()).await,
                Err(e) => tracing::debug!(error = %e, "mirror request failed"),
            }
        };
        if tokio::time::timeout(MIRROR_TIMEOUT, copy).await.is_err() {
            tracing::debug!(timeout = ?MIRROR_TIMEOUT, "mirror request abandoned");
        }
    });
}
