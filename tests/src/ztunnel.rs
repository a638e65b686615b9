//! Driving the real `ztunnel` binary: locating it, its CA/cert CLI, and [`ZtunnelProcess`], a
//! guard that runs `ztunnel run` inside a node namespace with its output in a log file, waits for
//! readiness, offers the admin endpoints, and stops the process (SIGTERM, then SIGKILL) on drop.

use crate::admin;
use crate::netns::{run_cmd, Netns};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Admin port (localhost only).
pub const ADMIN_PORT: u16 = 15000;
/// Prometheus metrics port.
pub const METRICS_PORT: u16 = 15020;
/// Readiness port.
pub const READINESS_PORT: u16 = 15021;

/// Path of the `ztunnel` binary: `$ZTUNNEL_BIN`, else `<target>/<profile>/ztunnel` next to the
/// test executable's `deps/` directory.
pub fn ztunnel_bin() -> Result<PathBuf> {
    binary("ztunnel", "ZTUNNEL_BIN")
}

/// Locates a workspace binary: `$<env>` or `<target>/<profile>/<name>`.
pub fn binary(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{env}={} does not exist", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("current_exe")?;
    // target/<profile>/deps/<test>-<hash>
    let mut dir = exe.parent().context("test binary has no parent")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps has no parent")?;
    }
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} not found: run `cargo build --bins` first (or set {env})",
            p.display()
        );
    }
    Ok(p)
}

/// Runs a `ztunnel` CLI subcommand in the test's own namespace, returning stdout.
pub fn ztunnel_cli(args: &[&str]) -> Result<String> {
    run_cmd(Command::new(ztunnel_bin()?).args(args))
}

/// A mesh CA directory created by `ztunnel ca init`.
#[derive(Debug, Clone)]
pub struct Ca {
    pub dir: PathBuf,
}

/// Files written by `ztunnel cert issue`.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// Leaf + chain.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA root(s) to trust.
    pub ca: PathBuf,
}

impl Ca {
    /// `ztunnel ca init --dir <dir>`.
    pub fn init(dir: &Path) -> Result<Ca> {
        ztunnel_cli(&["ca", "init", "--dir", path_str(dir)?])?;
        for f in ["root-cert.pem", "root-key.pem"] {
            if !dir.join(f).is_file() {
                bail!("`ztunnel ca init` did not write {}", dir.join(f).display());
            }
        }
        Ok(Ca {
            dir: dir.to_path_buf(),
        })
    }

    /// `ztunnel cert issue --ca-dir <dir> --identity <spiffe> --out <out>`.
    pub fn issue(&self, identity: &str, out: &Path) -> Result<CertFiles> {
        ztunnel_cli(&[
            "cert",
            "issue",
            "--ca-dir",
            path_str(&self.dir)?,
            "--identity",
            identity,
            "--out",
            path_str(out)?,
        ])?;
        let files = CertFiles {
            cert: out.join("cert.pem"),
            key: out.join("key.pem"),
            ca: out.join("ca.pem"),
        };
        for f in [&files.cert, &files.key, &files.ca] {
            if !f.is_file() {
                bail!("`ztunnel cert issue` did not write {}", f.display());
            }
        }
        Ok(files)
    }

    /// The root certificate PEM.
    pub fn root_cert(&self) -> PathBuf {
        self.dir.join("root-cert.pem")
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// How to run one ztunnel.
#[derive(Debug, Clone)]
pub struct ZtunnelOpts {
    /// `--node`.
    pub node: String,
    /// `--config` (none in cluster mode: `extra_args` then carry `--xds-address` etc.).
    pub config: Option<PathBuf>,
    /// `--ca-dir` (none in cluster mode).
    pub ca_dir: Option<PathBuf>,
    /// `--capture nft` when true, `--capture none` otherwise.
    pub capture: bool,
    /// Node-side interfaces of mesh pods (`--pod-iface`), `name` or `name=ip`.
    pub pod_ifaces: Vec<String>,
    /// CIDRs of mesh pods (`--pod-cidr`).
    pub pod_cidrs: Vec<String>,
    /// Anything else, appended as is.
    pub extra_args: Vec<String>,
}

impl ZtunnelOpts {
    /// The `run` arguments.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "run".into(),
            "--node".into(),
            self.node.clone(),
            "--capture".into(),
            if self.capture { "nft" } else { "none" }.into(),
        ];
        if let Some(config) = &self.config {
            a.push("--config".into());
            a.push(config.display().to_string());
        }
        if let Some(dir) = &self.ca_dir {
            a.push("--ca-dir".into());
            a.push(dir.display().to_string());
        }
        // Harness defaults, unless `extra_args` sets them (clap refuses an option given twice).
        for (flag, default) in [("--drain-timeout", "1s"), ("--log-format", "text")] {
            let overridden = self
                .extra_args
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
            if !overridden {
                a.push(flag.into());
                a.push(default.into());
            }
        }
        for i in &self.pod_ifaces {
            a.push("--pod-iface".into());
            a.push(i.clone());
        }
        for c in &self.pod_cidrs {
            a.push("--pod-cidr".into());
            a.push(c.clone());
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// A running `ztunnel` inside a node namespace; stopped on drop.
pub struct ZtunnelProcess {
    pub node: String,
    ns: Netns,
    child: Option<Child>,
    log: PathBuf,
}

impl ZtunnelProcess {
    /// Spawns `ztunnel run …` in `ns` with output to `log`, and waits until
    /// `/healthz/ready` answers 200 inside the namespace.
    pub async fn start(ns: &Netns, opts: &ZtunnelOpts, log: &Path) -> Result<ZtunnelProcess> {
        ZtunnelProcess::start_with_stdout(ns, opts, log, None).await
    }

    /// Like [`ZtunnelProcess::start`] while another ztunnel still runs in `ns` (an upgrade in
    /// place: both listen on the same ports with `SO_REUSEPORT`). `/healthz/ready` could be
    /// answered by either process, so readiness is this process's own "ztunnel ready" log line.
    pub async fn start_beside(
        ns: &Netns,
        opts: &ZtunnelOpts,
        log: &Path,
    ) -> Result<ZtunnelProcess> {
        let mut zt = ZtunnelProcess::spawn(ns, opts, log, None)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while zt
            .wait_log_line(&["ztunnel ready"], Duration::ZERO)
            .await
            .is_err()
        {
            if let Some(status) = zt.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "ztunnel exited during startup ({status}); log tail:\n{}",
                    zt.log_tail(40)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "ztunnel beside another not ready after 30 s; log tail:\n{}",
                    zt.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(zt)
    }

    /// Like [`ZtunnelProcess::start`], waiting up to `timeout` for readiness (a large feed
    /// takes longer than the usual 30 s on a busy machine).
    pub async fn start_within(
        ns: &Netns,
        opts: &ZtunnelOpts,
        log: &Path,
        timeout: Duration,
    ) -> Result<ZtunnelProcess> {
        let mut zt = ZtunnelProcess::spawn(ns, opts, log, None)?;
        zt.wait_ready(timeout)
            .await
            .with_context(|| format!("ztunnel on {} (args {:?})", opts.node, opts.args()))?;
        Ok(zt)
    }

    /// Like [`ZtunnelProcess::start`], with stdout going to `stdout` instead of the log file
    /// (stderr still goes there), e.g. a pipe nobody reads.
    pub async fn start_with_stdout(
        ns: &Netns,
        opts: &ZtunnelOpts,
        log: &Path,
        stdout: Option<Stdio>,
    ) -> Result<ZtunnelProcess> {
        let mut zt = ZtunnelProcess::spawn(ns, opts, log, stdout)?;
        zt.wait_ready(Duration::from_secs(30))
            .await
            .with_context(|| format!("ztunnel on {} (args {:?})", opts.node, opts.args()))?;
        Ok(zt)
    }

    fn spawn(
        ns: &Netns,
        opts: &ZtunnelOpts,
        log: &Path,
        stdout: Option<Stdio>,
    ) -> Result<ZtunnelProcess> {
        let bin = ztunnel_bin()?;
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let stdout = match stdout {
            Some(s) => s,
            None => file.try_clone()?.into(),
        };
        let mut cmd = ns.command(&[path_str(&bin)?]);
        cmd.args(opts.args())
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {} in {}", bin.display(), ns.name()))?;
        Ok(ZtunnelProcess {
            node: opts.node.clone(),
            ns: ns.handle(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// SIGKILL (no drain, no cleanup: a crash or an OOM kill) and waits for the process to go.
    pub async fn kill9(&mut self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGKILL)?;
        self.wait_exit(Duration::from_secs(10)).await.map(drop)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let addr = ([127, 0, 0, 1], READINESS_PORT).into();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "ztunnel exited during startup ({status}); log tail:\n{}",
                    self.log_tail(40)
                );
            }
            let last = match admin::http_request(&self.ns, "GET", addr, "/healthz/ready").await {
                Ok((200, _)) => return Ok(()),
                Ok((s, body)) => format!("status {s}: {body}"),
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

    /// A non-owning handle to the node namespace this ztunnel runs in.
    pub fn netns(&self) -> Netns {
        self.ns.handle()
    }

    /// Sends `signal` to the process without waiting (e.g. SIGTERM to watch the drain).
    pub fn signal(&mut self, signal: nix::sys::signal::Signal) -> Result<()> {
        let child = self.child.as_mut().context("ztunnel already stopped")?;
        if child.try_wait()?.is_some() {
            bail!("ztunnel on {} already exited", self.node);
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal)
            .with_context(|| format!("sending {signal} to ztunnel on {}", self.node))
    }

    /// SIGTERM: the process starts draining; see [`ZtunnelProcess::wait_exit`].
    pub fn sigterm(&mut self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGTERM)
    }

    /// Waits until the process exits by itself and returns its status (the guard then has
    /// nothing left to stop). Errors if it still runs after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().context("ztunnel already stopped")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "ztunnel on {} still running {timeout:?} later; log tail:\n{}",
                    self.node,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        crate::support::log_tail(&self.log, n)
    }

    /// Waits until a log line (e.g. the access-log line of a connection) contains every needle;
    /// returns that line. Evidence that a connection went through this ztunnel.
    pub async fn wait_log_line(&self, needles: &[&str], timeout: Duration) -> Result<String> {
        crate::support::wait_log_line(
            &self.log,
            &format!("ztunnel {}", self.node),
            needles,
            timeout,
        )
        .await
    }

    /// `GET /config_dump` (raw JSON text).
    pub async fn config_dump(&self) -> Result<String> {
        admin::get_ok(&self.ns, ADMIN_PORT, "/config_dump").await
    }

    /// The first VIP of the service with hostname `host` (e.g. a ServiceEntry host's
    /// automatic VIP), as `/config_dump` shows it.
    pub async fn service_vip(&self, host: &str) -> Result<std::net::IpAddr> {
        let dump = self.config_dump().await?;
        let json: serde_json::Value = serde_json::from_str(&dump)?;
        let vip = json
            .pointer("/config/services")
            .and_then(|s| s.as_array())
            .into_iter()
            .flatten()
            .find(|s| s["hostname"] == host)
            .and_then(|s| s["vips"][0].as_str())
            .with_context(|| format!("no VIP for {host} in {dump}"))?;
        let ip = vip.rsplit('/').next().unwrap_or(vip);
        ip.parse().with_context(|| format!("VIP {vip:?} of {host}"))
    }

    /// `hbonePool.connectionsOpened` of `/config_dump`: TLS connections the outbound HBONE
    /// pool has opened so far.
    pub async fn hbone_connections_opened(&self) -> Result<u64> {
        let dump: serde_json::Value =
            serde_json::from_str(&self.config_dump().await?).context("parsing /config_dump")?;
        dump["hbonePool"]["connectionsOpened"]
            .as_u64()
            .with_context(|| {
                format!(
                    "no hbonePool.connectionsOpened in /config_dump of {}",
                    self.node
                )
            })
    }

    /// `GET /metrics` parsed.
    pub async fn metrics(&self) -> Result<Vec<admin::Sample>> {
        Ok(admin::parse_metrics(
            &admin::get_ok(&self.ns, METRICS_PORT, "/metrics").await?,
        ))
    }

    /// `POST /logging?level=<level>`.
    pub async fn set_log_level(&self, level: &str) -> Result<()> {
        let addr = ([127, 0, 0, 1], ADMIN_PORT).into();
        let (status, body) =
            admin::http_request(&self.ns, "POST", addr, &format!("/logging?level={level}")).await?;
        anyhow::ensure!(status == 200, "POST /logging → {status}: {body}");
        Ok(())
    }

    /// Polls `/config_dump` until `pred` holds on its text.
    pub async fn wait_config(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let dump = self.config_dump().await?;
            if pred(&dump) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "config_dump of {} did not reach the expected state within {timeout:?}:\n{}\nlog tail:\n{}",
                    self.node,
                    truncate(&dump, 4000),
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        crate::support::terminate(self.child.take(), &format!("ztunnel on {}", self.node));
    }
}

impl Drop for ZtunnelProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- ztunnel {} log ({}), last lines ----\n{}\n----",
                self.node,
                self.log.display(),
                self.log_tail(60)
            );
        }
        self.stop();
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
