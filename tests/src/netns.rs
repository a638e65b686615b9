//! Network namespaces owned by a test: an RAII guard that creates a uniquely named namespace and
//! deletes it (killing whatever still runs in it) on drop, plus ways to run code inside it —
//! commands through `ip netns exec`, and closures/futures on a thread that `setns()` into it, so
//! sockets made there belong to the namespace without spawning a process.

use anyhow::{bail, Context, Result};
use std::future::Future;
use std::os::fd::AsFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

static COUNTER: AtomicU32 = AtomicU32::new(0);
/// `ip netns add/del` touch the shared `/var/run/netns` mount; serialise them within the process.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// A network namespace named `zt<pid>x<n>-<role>`, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// False for handles from [`Netns::handle`], which never delete the namespace.
    owned: bool,
}

impl Netns {
    /// Creates a fresh namespace with loopback up. `role` (e.g. `n1`, `a`) only helps reading
    /// `ip netns list`; uniqueness comes from the pid and a process-wide counter.
    pub fn new(role: &str) -> Result<Netns> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let role: String = role
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(12)
            .collect();
        let name = format!("zt{}x{}-{}", std::process::id(), n, role);
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            run_cmd(Command::new("ip").args(["netns", "add", &name]))?;
        }
        let ns = Netns { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A non-owning handle to the same namespace (dropping it deletes nothing).
    pub fn handle(&self) -> Netns {
        Netns {
            name: self.name.clone(),
            owned: false,
        }
    }

    /// The name under `/var/run/netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args…>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_cmd(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Runs a command inside the namespace (`ip netns exec`) and returns its stdout; a non-zero
    /// exit is an error quoting the command, the status and stderr.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        run_cmd(&mut self.command(argv))
    }

    /// Like [`Netns::exec`] but returns the raw output whatever the exit status.
    pub fn exec_output(&self, argv: &[&str]) -> Result<Output> {
        let mut cmd = self.command(argv);
        cmd.output()
            .with_context(|| format!("spawning {}", describe(&cmd)))
    }

    /// A `Command` that runs `argv` inside the namespace (for long-running processes).
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs a blocking closure on a fresh thread that has entered this namespace. Sockets it
    /// creates stay in the namespace wherever they are used afterwards.
    pub fn run_blocking<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = self.path();
        let handle = std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || -> Result<T> {
                enter(&path)?;
                Ok(f())
            })
            .context("spawning netns thread")?;
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("closure inside netns {} panicked", self.name))?
    }

    /// Runs a future on a current-thread tokio runtime on a thread inside this namespace and
    /// waits for it (blocking the caller).
    pub fn run<T, F, Fut>(&self, make: F) -> Result<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = self.path();
        let handle = std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || -> Result<T> {
                enter(&path)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(rt.block_on(make()))
            })
            .context("spawning netns thread")?;
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("future inside netns {} panicked", self.name))?
    }

    /// Starts a future on its own thread + current-thread runtime inside this namespace. Await
    /// the returned task for its output; dropping the task cancels the future.
    pub fn spawn<T, F, Fut>(&self, make: F) -> Result<NsTask<T>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = self.path();
        let (result_tx, result_rx) = tokio::sync::oneshot::channel();
        let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                let outcome = (|| -> Result<Option<T>> {
                    enter(&path)?;
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    Ok(rt.block_on(async move {
                        tokio::select! {
                            v = make() => Some(v),
                            _ = cancel_rx => None,
                        }
                    }))
                })();
                match outcome {
                    Ok(Some(v)) => drop(result_tx.send(Ok(v))),
                    Ok(None) => {}
                    Err(e) => drop(result_tx.send(Err(e))),
                }
            })
            .context("spawning netns thread")?;
        Ok(NsTask {
            name: self.name.clone(),
            result: result_rx,
            _cancel: cancel_tx,
        })
    }

    /// A TCP listener bound inside the namespace (backlog 4096), registered with the caller's
    /// tokio runtime.
    pub fn tcp_listener(&self, addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener> {
        let std_listener = self.run_blocking(move || -> Result<std::net::TcpListener> {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(4096)?;
            socket.set_nonblocking(true)?;
            Ok(socket.into())
        })??;
        tokio::net::TcpListener::from_std(std_listener)
            .with_context(|| format!("registering listener {addr} in {}", self.name))
    }

    /// `n` unconnected IPv4 TCP sockets created inside the namespace, ready for
    /// `TcpSocket::connect` on the caller's runtime.
    pub fn tcp_sockets(&self, n: usize) -> Result<Vec<tokio::net::TcpSocket>> {
        let streams = self.run_blocking(move || -> Result<Vec<std::net::TcpStream>> {
            (0..n)
                .map(|_| {
                    let s = socket2::Socket::new(
                        socket2::Domain::IPV4,
                        socket2::Type::STREAM,
                        Some(socket2::Protocol::TCP),
                    )?;
                    s.set_nonblocking(true)?;
                    Ok(s.into())
                })
                .collect()
        })??;
        Ok(streams
            .into_iter()
            .map(tokio::net::TcpSocket::from_std_stream)
            .collect())
    }

    /// One unconnected IPv4 TCP socket inside the namespace.
    pub fn tcp_socket(&self) -> Result<tokio::net::TcpSocket> {
        Ok(self.tcp_sockets(1)?.remove(0))
    }

    /// Connects from inside the namespace to `addr` (on the caller's runtime).
    pub async fn connect(&self, addr: std::net::SocketAddr) -> Result<tokio::net::TcpStream> {
        let socket = self.tcp_socket()?;
        socket
            .connect(addr)
            .await
            .with_context(|| format!("connecting from {} to {addr}", self.name))
    }

    /// Pids of processes whose network namespace is this one.
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let me = std::process::id() as i32;
        for pid in self.pids().into_iter().filter(|p| *p != me) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = run_cmd(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("warning: deleting netns {}: {e:#}", self.name);
        }
    }
}

/// A future running inside a namespace (see [`Netns::spawn`]). Dropping it cancels the future.
pub struct NsTask<T> {
    name: String,
    result: tokio::sync::oneshot::Receiver<Result<T>>,
    _cancel: tokio::sync::oneshot::Sender<()>,
}

impl<T> NsTask<T> {
    /// Waits for the future's output.
    pub async fn join(self) -> Result<T> {
        let name = self.name;
        match self.result.await {
            Ok(r) => r,
            Err(_) => bail!("task inside netns {name} panicked or was cancelled"),
        }
    }
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &str) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns({path})"))?;
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion; non-zero exit → error with the command line and stderr.
pub fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("spawning `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of all namespaces in `ip netns list`.
pub fn list_namespaces() -> Result<Vec<String>> {
    Ok(run_cmd(Command::new("ip").args(["netns", "list"]))?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}
