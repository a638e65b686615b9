//! Envoy as the L7 baseline: the shape of `envoy-http.yaml` (a plain HTTP/1.1 + h2c listener,
//! an HTTP connection manager with a prefix route that sets a request header, the router
//! filter, one static backend cluster), no access log, run inside a namespace and stopped on
//! drop.

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tests::netns::Netns;

/// Admin port inside Envoy's namespace (localhost only).
const ADMIN_PORT: u16 = 19901;

/// The bootstrap: `listen` → routes → `backend`. Routes: prefix `route_prefix` sets
/// `<header>: <value>` (replacing any), everything else goes to the backend unchanged.
pub fn render(
    listen: SocketAddr,
    backend: SocketAddr,
    route_prefix: &str,
    header: (&str, &str),
) -> String {
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ADMIN_PORT} }} }}
static_resources:
  listeners:
  - name: http
    address: {{ socket_address: {{ address: {lip}, port_value: {lport} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "{route_prefix}" }}
                route: {{ cluster: backend }}
                request_headers_to_add: [{{ header: {{ key: {hk}, value: {hv} }}, append_action: OVERWRITE_IF_EXISTS_OR_ADD }}]
              - match: {{ prefix: "/" }}
                route: {{ cluster: backend }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
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
        hk = header.0,
        hv = header.1,
    )
}

/// A running Envoy; SIGTERM (then SIGKILL) on drop.
pub struct EnvoyL7 {
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl EnvoyL7 {
    /// Writes `config` to `<dir>/envoy-l7.yaml` and runs Envoy (default concurrency: one worker
    /// per CPU) inside `ns`; returns once its admin says LIVE and `listen` is bound.
    pub async fn start(
        ns: &Netns,
        dir: &Path,
        config: &str,
        listen: SocketAddr,
    ) -> Result<EnvoyL7> {
        let bin = tests::envoy::envoy_bin()?;
        let path = dir.join("envoy-l7.yaml");
        let log = dir.join("envoy-l7.log");
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let file = std::fs::File::create(&log)?;
        let base_id = (std::process::id() % 100_000) * 100 + 99;
        let args = [
            bin.display().to_string(),
            "-c".into(),
            path.display().to_string(),
            "--base-id".into(),
            base_id.to_string(),
            "-l".into(),
            "warning".into(),
        ];
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = ns
            .command(&argv)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("spawning {} in {}", bin.display(), ns.name()))?;
        let mut envoy = EnvoyL7 {
            child: Some(child),
            log,
        };
        let admin: SocketAddr = ([127, 0, 0, 1], ADMIN_PORT).into();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = envoy
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "Envoy exited during startup ({status}): {}",
                    envoy.log_tail()
                );
            }
            let live = matches!(
                tests::admin::http_request(ns, "GET", admin, "/ready").await,
                Ok((200, _))
            );
            if live {
                if let Ok((200, body)) =
                    tests::admin::http_request(ns, "GET", admin, "/listeners").await
                {
                    if body.contains(&format!("::{listen}")) {
                        return Ok(envoy);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("Envoy not live after 30 s: {}", envoy.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for EnvoyL7 {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
