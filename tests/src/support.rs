//! Small helpers that keep test bodies short: deadlines around async steps, socket addresses
//! from strings, and polling a condition until it holds.

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
