//! Driving the real `waypoint` binary: [`WaypointProcess`], a guard that runs `waypoint run`
//! inside the waypoint's pod namespace with its output in a log file, waits for readiness on
//! 15021 inside that namespace, offers the admin and metrics endpoints, parses the JSON access
//! log, and stops the process (SIGTERM, then SIGKILL) on drop.

use crate::admin;
use crate::netns::Netns;
use crate::ztunnel::{binary, ADMIN_PORT, METRICS_PORT, READINESS_PORT};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The waypoint's HBONE port (`inbound_CONNECT_terminate`).
pub const WAYPOINT_PORT: u16 = 15006;

/// Path of the `waypoint` binary: `$WAYPOINT_BIN`, else `<target>/<profile>/waypoint` next to
/// the test executable's `deps/` directory.
pub fn waypoint_bin() -> Result<PathBuf> {
    binary("waypoint", "WAYPOINT_BIN")
}

/// How to run one waypoint.
#[derive(Debug, Clone)]
pub struct WaypointOpts {
    /// `--config` (none in cluster mode: `extra_args` carry `--xds-address` etc.).
    pub config: Option<PathBuf>,
    /// `--ca-dir` (none in cluster mode).
    pub ca_dir: Option<PathBuf>,
    /// `--workload` (`<ns>/<name>` or `<name>`).
    pub workload: String,
    /// `--log-json` (the access-log parser reads both forms).
    pub log_json: bool,
    /// `--sniff-timeout`, when not the binary's default.
    pub sniff_timeout: Option<String>,
    /// Anything else, appended as is.
    pub extra_args: Vec<String>,
}

impl WaypointOpts {
    /// JSON logs, default sniff timeout, harness defaults for drain and config polling.
    pub fn new(config: &Path, ca_dir: &Path, workload: &str) -> WaypointOpts {
        WaypointOpts {
            config: Some(config.to_path_buf()),
            ca_dir: Some(ca_dir.to_path_buf()),
            workload: workload.to_string(),
            log_json: true,
            sniff_timeout: None,
            extra_args: Vec::new(),
        }
    }

    /// Cluster mode: everything from the control plane, named by `extra_args`
    /// (`--xds-address`, `--ca-address`, roots, token file).
    pub fn cluster(workload: &str, extra_args: Vec<String>) -> WaypointOpts {
        WaypointOpts {
            config: None,
            ca_dir: None,
            workload: workload.to_string(),
            log_json: true,
            sniff_timeout: None,
            extra_args,
        }
    }

    /// The `run` arguments.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["run".into()];
        if let Some(config) = &self.config {
            a.push("--config".into());
            a.push(config.display().to_string());
        }
        if let Some(dir) = &self.ca_dir {
            a.push("--ca-dir".into());
            a.push(dir.display().to_string());
        }
        a.push("--workload".into());
        a.push(self.workload.clone());
        if self.log_json {
            a.push("--log-json".into());
        }
        if let Some(t) = &self.sniff_timeout {
            a.push("--sniff-timeout".into());
            a.push(t.clone());
        }
        // Harness defaults, unless `extra_args` sets them (clap refuses an option given twice).
        for (flag, default) in [
            ("--drain-timeout", "1s"),
            ("--config-poll", "200ms"),
            ("--log-level", "info"),
        ] {
            let overridden = self
                .extra_args
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
            if !overridden {
                a.push(flag.into());
                a.push(default.into());
            }
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// A running `waypoint` inside its pod namespace; stopped on drop.
pub struct WaypointProcess {
    /// The workload name it runs as.
    pub name: String,
    ns: Netns,
    child: Option<Child>,
    log: PathBuf,
}

impl WaypointProcess {
    /// Spawns `waypoint run …` in `ns` with output to `log`, and waits until `/healthz/ready`
    /// answers 200 inside the namespace.
    pub async fn start(ns: &Netns, opts: &WaypointOpts, log: &Path) -> Result<WaypointProcess> {
        let bin = waypoint_bin()?;
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = ns.command(&[bin.to_str().context("non-UTF-8 path")?]);
        cmd.args(opts.args())
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {} in {}", bin.display(), ns.name()))?;
        let mut wp = WaypointProcess {
            name: opts.workload.clone(),
            ns: ns.handle(),
            child: Some(child),
            log: log.to_path_buf(),
        };
        wp.wait_ready(Duration::from_secs(30))
            .await
            .with_context(|| format!("waypoint {} (args {:?})", opts.workload, opts.args()))?;
        Ok(wp)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "waypoint exited during startup ({status}); log tail:\n{}",
                    self.log_tail(40)
                );
            }
            let last = match self.readiness().await {
                Ok(200) => return Ok(()),
                Ok(s) => format!("status {s}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!(
                    "not ready after {timeout:?} (last: {last}); log tail:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A non-owning handle to the pod namespace this waypoint runs in.
    pub fn netns(&self) -> Netns {
        self.ns.handle()
    }

    /// The status `/healthz/ready` answers with right now.
    pub async fn readiness(&self) -> Result<u16> {
        let addr = ([127, 0, 0, 1], READINESS_PORT).into();
        Ok(admin::http_request(&self.ns, "GET", addr, "/healthz/ready")
            .await?
            .0)
    }

    /// Any request to the admin port: (status, body).
    pub async fn admin_request(&self, method: &str, path: &str) -> Result<(u16, String)> {
        let addr = ([127, 0, 0, 1], ADMIN_PORT).into();
        admin::http_request(&self.ns, method, addr, path).await
    }

    /// `GET /config_dump` parsed.
    pub async fn config_dump(&self) -> Result<serde_json::Value> {
        let text = admin::get_ok(&self.ns, ADMIN_PORT, "/config_dump").await?;
        serde_json::from_str(&text).context("parsing the waypoint's /config_dump")
    }

    /// `POST /logging?level=<level>`.
    pub async fn set_log_level(&self, level: &str) -> Result<()> {
        let (status, body) = self
            .admin_request("POST", &format!("/logging?level={level}"))
            .await?;
        anyhow::ensure!(status == 200, "POST /logging → {status}: {body}");
        Ok(())
    }

    /// `GET /metrics` (port 15020) parsed.
    pub async fn metrics(&self) -> Result<Vec<admin::Sample>> {
        Ok(admin::parse_metrics(&self.metrics_text().await?))
    }

    /// `GET /metrics` as text.
    pub async fn metrics_text(&self) -> Result<String> {
        admin::get_ok(&self.ns, METRICS_PORT, "/metrics").await
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends `signal` to the process without waiting.
    pub fn signal(&mut self, signal: nix::sys::signal::Signal) -> Result<()> {
        let child = self.child.as_mut().context("waypoint already stopped")?;
        if child.try_wait()?.is_some() {
            bail!("waypoint {} already exited", self.name);
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal)
            .with_context(|| format!("sending {signal} to waypoint {}", self.name))
    }

    /// Waits until the process exits by itself and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().context("waypoint already stopped")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "waypoint {} still running {timeout:?} later; log tail:\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        crate::support::log_tail(&self.log, n)
    }

    /// Waits until a log line contains every needle; returns that line.
    pub async fn wait_log_line(&self, needles: &[&str], timeout: Duration) -> Result<String> {
        crate::support::wait_log_line(
            &self.log,
            &format!("waypoint {}", self.name),
            needles,
            timeout,
        )
        .await
    }

    /// The HTTP access-log entries so far (one JSON object per request, fields `method`,
    /// `path`, `response_code`, `upstream_cluster`, …), in log order.
    pub fn access_log_lines(&self) -> Vec<serde_json::Value> {
        parse_access_log(&self.log())
            .into_iter()
            .filter_map(|e| match e {
                AccessEntry::Http(v) => Some(v),
                AccessEntry::Other(_) => None,
            })
            .collect()
    }

    /// The other `access` events (e.g. L4 `tcp connection complete` lines), as the flattened
    /// JSON event (`--log-json`) or `{"message": <text line>}` for text logs.
    pub fn tcp_access_log_lines(&self) -> Vec<serde_json::Value> {
        parse_access_log(&self.log())
            .into_iter()
            .filter_map(|e| match e {
                AccessEntry::Other(v) => Some(v),
                AccessEntry::Http(_) => None,
            })
            .collect()
    }

    /// Waits until at least `n` HTTP access-log entries match `pred`; returns those entries.
    pub async fn wait_access_log(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<Vec<serde_json::Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<serde_json::Value> = self
                .access_log_lines()
                .into_iter()
                .filter(|v| pred(v))
                .collect();
            if found.len() >= n {
                return Ok(found);
            }
            if Instant::now() > deadline {
                bail!(
                    "waypoint {}: {} matching access-log entries, expected {n}; log tail:\n{}",
                    self.name,
                    found.len(),
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        crate::support::terminate(self.child.take(), &format!("waypoint {}", self.name));
    }
}

impl Drop for WaypointProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- waypoint {} log ({}), last lines ----\n{}\n----",
                self.name,
                self.log.display(),
                self.log_tail(60)
            );
        }
        self.stop();
    }
}

/// One `access` event of the waypoint log.
#[derive(Debug, Clone, PartialEq)]
pub enum AccessEntry {
    /// A per-request line: the JSON object the waypoint writes as the message.
    Http(serde_json::Value),
    /// Any other access event (L4 proxying, refusals).
    Other(serde_json::Value),
}

/// Extracts the `access` events of a waypoint log, JSON (`--log-json`: one object per line
/// with `target: "access"` and the request object as its `message`) or text
/// (`… INFO access: {…}`).
pub fn parse_access_log(log: &str) -> Vec<AccessEntry> {
    let mut out = Vec::new();
    for line in log.lines() {
        let line = line.trim();
        if line.starts_with('{') {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["target"] != "access" {
                continue;
            }
            let inner = v["message"]
                .as_str()
                .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
                .filter(serde_json::Value::is_object);
            out.push(match inner {
                Some(req) => AccessEntry::Http(req),
                None => AccessEntry::Other(v),
            });
        } else if let Some(i) = line.find(" access: ") {
            let rest = &line[i + " access: ".len()..];
            match serde_json::from_str::<serde_json::Value>(rest) {
                Ok(v) if v.is_object() => out.push(AccessEntry::Http(v)),
                _ => out.push(AccessEntry::Other(serde_json::json!({ "message": line }))),
            }
        }
    }
    out
}

/// `entry[field]` as a string (numbers rendered), `""` when absent.
pub fn field(entry: &serde_json::Value, name: &str) -> String {
    match &entry[name] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        v => v.to_string(),
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn parses_json_and_text_access_lines() {
        let log = concat!(
            r#"{"timestamp":"t","level":"INFO","message":"waypoint ready","target":"waypoint::app"}"#,
            "\n",
            r#"{"timestamp":"t","level":"INFO","message":"{\"method\":\"GET\",\"response_code\":200}","target":"access"}"#,
            "\n",
            r#"{"timestamp":"t","level":"INFO","message":"tcp connection complete","target":"access","chain":"waypoint_tcp"}"#,
            "\n",
            r#"2025-01-01T00:00:00Z  INFO access: {"method":"POST","path":"/x"}"#,
            "\n",
            "2025-01-01T00:00:00Z  INFO access: tcp connection complete chain=waypoint_tcp\n",
        );
        let e = parse_access_log(log);
        assert_eq!(e.len(), 4, "{e:?}");
        let AccessEntry::Http(first) = &e[0] else {
            panic!("{e:?}")
        };
        assert_eq!(field(first, "method"), "GET");
        assert_eq!(field(first, "response_code"), "200");
        assert!(matches!(&e[1], AccessEntry::Other(v) if v["chain"] == "waypoint_tcp"));
        assert!(matches!(&e[2], AccessEntry::Http(v) if v["path"] == "/x"));
        assert!(matches!(&e[3], AccessEntry::Other(_)));
    }
}
