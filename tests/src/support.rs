//! Small helpers that keep test bodies short: deadlines around async steps, socket addresses
//! from strings, polling a condition until it holds, and stopping child processes.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

/// Awaits `fut`, panicking with `what` if it takes longer than `secs` seconds.
pub async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {secs} s"),
    }
}

/// Parses `"ip:port"` (panics on a typo: a test bug).
pub fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("bad socket address {s:?}"))
}

/// `0.0.0.0:<port>`, for servers.
pub fn any(port: u16) -> SocketAddr {
    ([0, 0, 0, 0], port).into()
}

/// Polls `check` every 200 ms until it returns `Ok(true)` or `timeout` passes; returns the last
/// result (`Ok(false)` or the last error) on timeout.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<bool>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let r = check().await;
        if matches!(r, Ok(true)) || tokio::time::Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops a child process: SIGTERM, then SIGKILL after 5 s. A child that already exited is only
/// reaped (its pid may belong to someone else by now). `what` names it in the kill message.
pub fn terminate(child: Option<std::process::Child>, what: &str) {
    let Some(mut child) = child else {
        return;
    };
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{what} ignored SIGTERM; killing");
    let _ = child.kill();
    let _ = child.wait();
}

/// The last `n` lines of a process's log file (empty if it cannot be read).
pub fn log_tail(path: &std::path::Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until a line of the log file at `path` contains every needle; returns that line.
/// `what` names the process in the error, which carries the log's tail.
pub async fn wait_log_line(
    path: &std::path::Path,
    what: &str,
    needles: &[&str],
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return Ok(line.to_string());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "no log line of {what} contains all of {needles:?}; log tail:\n{}",
                log_tail(path, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the peer closes `stream` (EOF or error); returns how long that took, or `None`
/// if it was still open after `timeout`.
pub async fn closed_after<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let start = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .ok()
        .map(|_| start.elapsed())
}

/// Whether the peer closes `stream` (EOF or reset) within `timeout`.
pub async fn closed_within(stream: &mut tokio::net::TcpStream, timeout: Duration) -> bool {
    closed_after(stream, timeout).await.is_some()
}
