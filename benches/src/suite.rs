//! One measurement suite against one path (raw, ztunnel, Envoy): single-stream and 4-stream
//! throughput with the proxies' CPU per GB, 1 KiB request/response latency on one connection,
//! and new connections per second (sequential and concurrent) with the proxies' CPU per
//! connection. Every path runs exactly the same suite.

use crate::load::{self, ConnRate, Latency, Sockets, Throughput};
use crate::procfs::CpuMeter;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tests::netns::Netns;

/// How long each measurement runs.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub throughput: Duration,
    pub latency_rounds: usize,
    pub conn_time: Duration,
    pub conn_concurrency: usize,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            throughput: Duration::from_secs(4),
            latency_rounds: 20_000,
            conn_time: Duration::from_secs(2),
            conn_concurrency: 16,
        }
    }

    pub fn quick() -> Plan {
        Plan {
            throughput: Duration::from_millis(700),
            latency_rounds: 2_000,
            conn_time: Duration::from_millis(400),
            conn_concurrency: 16,
        }
    }
}

/// Everything one suite measured. CPU figures are `None` for the raw path (no proxies).
#[derive(Debug, Clone)]
pub struct SuiteResult {
    pub one_stream: Throughput,
    pub four_streams: Throughput,
    /// Proxy CPU seconds per GB (10^9 bytes) over both throughput runs.
    pub cpu_s_per_gb: Option<f64>,
    /// CPU seconds per GB of the load generators (client and server: this process).
    pub loadgen_cpu_s_per_gb: f64,
    pub latency: Latency,
    pub conn_seq: ConnRate,
    pub conn_conc: ConnRate,
    /// Proxy CPU microseconds per new connection over both connection runs.
    pub cpu_us_per_conn: Option<f64>,
}

/// Runs the suite from pod a to `addr`, metering the CPU of `proxy_pids`.
pub async fn run(
    name: &str,
    client_ns: &Netns,
    sockets: &Arc<Sockets>,
    addr: SocketAddr,
    proxy_pids: &[u32],
    plan: Plan,
) -> Result<SuiteResult> {
    let meter = |pids: &[u32]| -> Result<Option<CpuMeter>> {
        if pids.is_empty() {
            Ok(None)
        } else {
            CpuMeter::start(pids).map(Some)
        }
    };
    // Warm up: pooled HBONE connections, certificates, allocator, caches.
    load::throughput(client_ns, addr, 1, Duration::from_millis(200))
        .await
        .with_context(|| format!("{name}: warm-up stream to {addr}"))?;
    load::conn_rate(sockets, addr, 4, Duration::from_millis(100))
        .await
        .with_context(|| format!("{name}: warm-up connections to {addr}"))?;

    let cpu = meter(proxy_pids)?;
    let own = CpuMeter::start(&[std::process::id()])?;
    let one_stream = load::throughput(client_ns, addr, 1, plan.throughput)
        .await
        .with_context(|| format!("{name}: single stream"))?;
    println!(
        "  {name:8} 1 stream    {:7.2} Gbit/s",
        one_stream.gbit_per_s()
    );
    let four_streams = load::throughput(client_ns, addr, 4, plan.throughput)
        .await
        .with_context(|| format!("{name}: 4 streams"))?;
    println!(
        "  {name:8} 4 streams   {:7.2} Gbit/s",
        four_streams.gbit_per_s()
    );
    let gb = (one_stream.bytes + four_streams.bytes) as f64 / 1e9;
    let loadgen_cpu_s_per_gb = own.elapsed()? / gb;
    let cpu_s_per_gb = match cpu {
        Some(m) => Some(m.elapsed()? / gb),
        None => None,
    };

    let latency = load::latency(client_ns, addr, 1024, 500, plan.latency_rounds)
        .await
        .with_context(|| format!("{name}: latency"))?;
    println!(
        "  {name:8} 1 KiB RTT   p50 {:.1} µs p99 {:.1} µs",
        latency.quantile_us(0.5),
        latency.quantile_us(0.99)
    );

    let cpu = meter(proxy_pids)?;
    let conn_seq = load::conn_rate(sockets, addr, 1, plan.conn_time)
        .await
        .with_context(|| format!("{name}: sequential connections"))?;
    let conn_conc = load::conn_rate(sockets, addr, plan.conn_concurrency, plan.conn_time)
        .await
        .with_context(|| format!("{name}: concurrent connections"))?;
    let cpu_us_per_conn = match cpu {
        Some(m) => Some(m.elapsed()? * 1e6 / (conn_seq.conns + conn_conc.conns) as f64),
        None => None,
    };
    println!(
        "  {name:8} conn/s      {:.0} sequential, {:.0} with {} concurrent",
        conn_seq.per_sec(),
        conn_conc.per_sec(),
        plan.conn_concurrency
    );
    Ok(SuiteResult {
        one_stream,
        four_streams,
        cpu_s_per_gb,
        loadgen_cpu_s_per_gb,
        latency,
        conn_seq,
        conn_conc,
        cpu_us_per_conn,
    })
}
