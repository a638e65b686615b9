//! Envoy in the L7 benchmark, in two roles, both with the same two routes (prefix route that
//! sets a request header, catch-all) and no access log, run with [`tests::envoy::EnvoyBuilder`]:
//!
//! - [`render_plain`]: the bare L7 proxy, the shape of `envoy-http.yaml` (a plain HTTP/1.1 + h2c
//!   listener, an HTTP connection manager, the router filter, one static backend cluster);
//! - [`render_waypoint`]: Envoy as the mesh's waypoint, built the way Istio builds its Envoy
//!   waypoint: an mTLS listener on the waypoint address terminates HBONE (HTTP/2 CONNECT) into
//!   the internal listener `main_internal`, whose HTTP connection manager applies the routes and
//!   sends each request to the internal listener `connect_originate`, a TCP proxy that tunnels
//!   the upstream connection as HBONE (HTTP/2 CONNECT over mTLS, `:authority` = the endpoint)
//!   to the endpoint node's ztunnel.

use std::net::SocketAddr;
use tests::envoy::{downstream_mtls, hbone_connect_hcm, hbone_tunnel_tcp_proxy, indent};
use tests::envoy::{hbone_upstream_cluster, EnvoyBuilder, EnvoyProcess};
use tests::netns::Netns;
use tests::ztunnel::CertFiles;

/// The routes both Envoys apply (and the waypoint's VirtualService states): prefix
/// `route_prefix` sets `<header>: <value>` (replacing any) and goes to `cluster`; everything
/// else goes to `cluster` unchanged.
#[derive(Debug, Clone, Copy)]
pub struct Routes<'a> {
    pub prefix: &'a str,
    pub header: (&'a str, &'a str),
}

/// A network filter (list item, column 0): an HTTP/1.1 + HTTP/2 connection manager with
/// `routes` to `cluster` and the router filter.
fn routing_hcm(stat_prefix: &str, routes: Routes<'_>, cluster: &str) -> String {
    let Routes {
        prefix,
        header: (hk, hv),
    } = routes;
    format!(
        r#"- name: envoy.filters.network.http_connection_manager
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
    stat_prefix: {stat_prefix}
    codec_type: AUTO
    route_config:
      virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
        - match: {{ prefix: "{prefix}" }}
          route: {{ cluster: {cluster} }}
          request_headers_to_add: [{{ header: {{ key: {hk}, value: {hv} }}, append_action: OVERWRITE_IF_EXISTS_OR_ADD }}]
        - match: {{ prefix: "/" }}
          route: {{ cluster: {cluster} }}
    http_filters:
    - name: envoy.filters.http.router
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    )
}

/// The bare L7 proxy's bootstrap (all but `admin`): `listen` → `routes` → `backend`.
pub fn render_plain(listen: SocketAddr, backend: SocketAddr, routes: Routes<'_>) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: http
    address: {{ socket_address: {{ address: {lip}, port_value: {lport} }} }}
    filter_chains:
    - filters:
{hcm}  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {bip}, port_value: {bport} }} }} }}
"#,
        lip = listen.ip(),
        lport = listen.port(),
        bip = backend.ip(),
        bport = backend.port(),
        hcm = indent(&routing_hcm("ingress", routes, "backend"), "      "),
    )
}

/// Envoy as the waypoint of one service with one endpoint.
#[derive(Debug, Clone)]
pub struct Waypoint<'a> {
    /// The waypoint address the ztunnels dial (`<waypoint pod IP>:15006`).
    pub listen: SocketAddr,
    /// The waypoint identity's certificate, from the mesh CA.
    pub certs: &'a CertFiles,
    /// Prefix of the URI SAN a client certificate must carry (the mesh's trust domain).
    pub client_san_prefix: &'a str,
    /// The endpoint (`<pod IP>:<target port>`): the `:authority` of the outgoing CONNECT.
    pub endpoint: SocketAddr,
    /// Where the endpoint's HBONE is served (its node's ztunnel: `<pod IP>:15008`).
    pub endpoint_hbone: SocketAddr,
    /// The endpoint's SPIFFE identity, required of the server certificate there.
    pub endpoint_identity: &'a str,
    pub routes: Routes<'a>,
}

/// A cluster (list item, column 0) whose one endpoint is the internal listener `listener`.
fn internal_cluster(listener: &str) -> String {
    format!(
        r#"- name: {listener}
  connect_timeout: 5s
  load_assignment:
    cluster_name: {listener}
    endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ envoy_internal_address: {{ server_listener_name: {listener} }} }} }} }}] }}]
  transport_socket:
    name: envoy.transport_sockets.internal_upstream
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport
      transport_socket:
        name: envoy.transport_sockets.raw_buffer
        typed_config: {{ "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer }}
"#
    )
}

/// Envoy as the waypoint (all but `admin`): HBONE in on `listen` → `main_internal` (routes) →
/// `connect_originate` (HBONE out) → the endpoint's ztunnel.
pub fn render_waypoint(w: &Waypoint<'_>) -> String {
    // The filter, then the filter chain's `transport_socket` beside `filters`.
    let terminate = format!(
        "{}{}",
        hbone_connect_hcm("connect_terminate", "main_internal", ""),
        downstream_mtls(w.certs, w.client_san_prefix)
    );
    let originate = hbone_tunnel_tcp_proxy(
        "connect_originate",
        "hbone_upstream",
        &w.endpoint.to_string(),
        &[],
        "",
    );
    format!(
        r#"bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
static_resources:
  listeners:
  - name: connect_terminate
    address: {{ socket_address: {{ address: {lip}, port_value: {lport} }} }}
    filter_chains:
    - filters:
{terminate}  - name: main_internal
    internal_listener: {{}}
    filter_chains:
    - filters:
{routes}  - name: connect_originate
    internal_listener: {{}}
    filter_chains:
    - filters:
{originate}  clusters:
{main_internal}{connect_originate}{upstream}"#,
        lip = w.listen.ip(),
        lport = w.listen.port(),
        terminate = indent(&terminate, "      "),
        routes = indent(
            &routing_hcm("main_internal", w.routes, "connect_originate"),
            "      "
        ),
        originate = indent(&originate, "      "),
        main_internal = indent(&internal_cluster("main_internal"), "  "),
        connect_originate = indent(&internal_cluster("connect_originate"), "  "),
        upstream = indent(
            &hbone_upstream_cluster(
                "hbone_upstream",
                w.certs,
                w.endpoint_hbone,
                w.endpoint_identity
            ),
            "  "
        ),
    )
}

/// Runs Envoy (default concurrency: one worker per CPU) with `bootstrap` inside `ns`, its files
/// under `dir` as `<name>.yaml` / `<name>.log`; returns once it is live and `listen` is bound.
pub async fn start(
    name: &str,
    ns: &Netns,
    dir: &std::path::Path,
    bootstrap: &str,
    listen: SocketAddr,
) -> anyhow::Result<EnvoyProcess> {
    EnvoyBuilder::new(name)
        .bootstrap(bootstrap, &[listen])
        .start(ns, dir)
        .await
}
