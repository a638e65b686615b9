//! The L7 benchmark (`benches --l7`): on one L7Mesh topology (pod a on n1; pod b and the
//! waypoint pod on n2), keep-alive HTTP/1.1 GETs with ~100-byte responses from 64 connections
//! for a fixed time, along four paths measured in one run, in this order:
//!
//! - ours: pod a → service VIP, captured by n1's ztunnel → HBONE (mTLS) → waypoint (routes with
//!   a VirtualService: prefix match + request header set) → HBONE → n2's ztunnel → pod b;
//! - Envoy wp: the same path with Envoy as the waypoint, which is what Istio ambient users run
//!   today: our waypoint is stopped, the ztunnels keep running, and Envoy listens on the
//!   waypoint address (the waypoint pod's IP, port 15006, where n1's ztunnel dials) with the
//!   waypoint identity's certificate, built like Istio's waypoint (HBONE terminated into an
//!   internal listener with the same two routes, each routed connection tunnelled out as HBONE
//!   through a second internal listener to n2's ztunnel; see [`crate::envoy_l7`]);
//! - direct: pod a → pod b, no proxy (the ztunnels are stopped first);
//! - Envoy: pod a → Envoy in the (now empty) waypoint pod on n2 → pod b, plain HTTP/1.1, with
//!   the same two routes (envoy-http.yaml shape).
//!
//! Proxy CPU is the utime+stime of the proxy processes over the timed section (ztunnel n1 +
//! waypoint + ztunnel n2; ztunnel n1 + Envoy + ztunnel n2; Envoy). The backend counts requests
//! carrying the header the route sets, so each proxied run proves every request was routed.

use crate::envoy_l7::{self, Routes};
use crate::httpload::{self, HttpLoad, Served, ROUTED_HEADER};
use crate::load::Sockets;
use crate::procfs::CpuMeter;
use anyhow::{ensure, Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::envoy::EnvoyProcess;
use tests::l7mesh::{L7Mesh, L7_TARGET_PORT};
use tests::waypoint::WAYPOINT_PORT;

/// Connections of the load generator.
const CONNS: usize = 64;
/// The request path; the first route matches its prefix.
const PATH: &str = "/api/bench";
const ROUTE_PREFIX: &str = "/api";
const ROUTED_VALUE: &str = "api";
/// Where the plain Envoy listens: the waypoint pod's address (the waypoint is stopped by then).
const ENVOY_PORT: u16 = 10000;
/// The routes of both Envoys (the waypoint's VirtualService says the same).
const ROUTES: Routes<'static> = Routes {
    prefix: ROUTE_PREFIX,
    header: (ROUTED_HEADER, ROUTED_VALUE),
};
/// Where a node's ztunnel serves HBONE for its pods (`<pod IP>:15008`).
const HBONE_PORT: u16 = 15008;
/// Client certificates Envoy as the waypoint accepts: any identity of the mesh's trust domain.
const MESH_SAN_PREFIX: &str = "spiffe://cluster.local/";

/// The waypoint's routes: the same two Envoy gets.
fn virtual_service(service: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: {service}-bench
spec:
  hosts:
  - {service}
  http:
  - name: api
    match:
    - uri:
        prefix: {ROUTE_PREFIX}
    headers:
      request:
        set:
          {ROUTED_HEADER}: {ROUTED_VALUE}
    route:
    - destination:
        host: {service}
  - name: default
    route:
    - destination:
        host: {service}
"#
    )
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    duration: Duration,
    warmup_per_conn: usize,
}

/// One path's figures.
struct PathResult {
    load: HttpLoad,
    /// Proxy CPU seconds over the timed section (`None`: no proxy).
    proxy_cpu: Option<f64>,
    /// The same per proxy process, in the order of the pids given.
    per_proxy_cpu: Vec<f64>,
    /// This process (load generator + backend) CPU seconds over the timed section.
    own_cpu: f64,
    /// Busy CPU of everything else on the machine over the timed section (other processes,
    /// kernel work not charged to a process): interference, when large.
    other_cpu: f64,
    /// Requests the backend saw during the timed section, and how many were routed.
    served: u64,
    routed: u64,
}

impl PathResult {
    fn req_per_proxy_cpu_s(&self) -> Option<f64> {
        self.proxy_cpu.map(|c| self.load.requests as f64 / c)
    }
}

async fn measure(
    name: &str,
    sockets: &Arc<Sockets>,
    addr: SocketAddr,
    req: &[u8],
    proxy_pids: &[u32],
    served: &Served,
    plan: Plan,
) -> Result<PathResult> {
    httpload::probe(sockets, addr, req)
        .await
        .with_context(|| format!("{name}: first request to {addr}"))?;
    let warmed = httpload::connect_and_warm(sockets, addr, req, CONNS, plan.warmup_per_conn)
        .await
        .with_context(|| format!("{name}: connections and warm-up to {addr}"))?;
    let (total0, routed0) = served.snapshot();
    let meters: Vec<CpuMeter> = proxy_pids
        .iter()
        .map(|p| CpuMeter::start(&[*p]))
        .collect::<Result<_>>()?;
    let own = CpuMeter::start(&[std::process::id()])?;
    let machine0 = crate::procfs::machine_busy_seconds()?;
    let load = httpload::timed(warmed, plan.duration)
        .await
        .with_context(|| format!("{name}: load to {addr}"))?;
    let per_proxy_cpu: Vec<f64> = meters
        .iter()
        .map(CpuMeter::elapsed)
        .collect::<Result<_>>()?;
    let proxy_cpu = (!per_proxy_cpu.is_empty()).then(|| per_proxy_cpu.iter().sum());
    let own_cpu = own.elapsed()?;
    let machine_cpu = crate::procfs::machine_busy_seconds()? - machine0;
    let (total1, routed1) = served.snapshot();
    let r = PathResult {
        load,
        proxy_cpu,
        per_proxy_cpu,
        own_cpu,
        other_cpu: (machine_cpu - own_cpu - proxy_cpu.unwrap_or(0.0)).max(0.0),
        served: total1 - total0,
        routed: routed1 - routed0,
    };
    ensure!(
        r.served == r.load.requests,
        "{name}: the backend served {} requests, the client completed {}",
        r.served,
        r.load.requests
    );
    if proxy_pids.is_empty() {
        ensure!(r.routed == 0, "{name}: routed requests without a proxy?");
    } else {
        ensure!(
            r.routed == r.served,
            "{name}: only {} of {} requests carried {ROUTED_HEADER} (route not applied)",
            r.routed,
            r.served
        );
    }
    println!(
        "  {name:9} {:9.0} req/s  p50 {:7.1} µs  p99 {:7.1} µs  proxy CPU {}  ({} requests in {:.2} s)",
        r.load.per_sec(),
        r.load.quantile_us(0.5),
        r.load.quantile_us(0.99),
        r.proxy_cpu
            .map_or("-".to_string(), |c| format!("{c:.2} s")),
        r.load.requests,
        r.load.secs
    );
    Ok(r)
}

pub async fn run(quick: bool) -> Result<()> {
    let started = Instant::now();
    let plan = if quick {
        Plan {
            duration: Duration::from_secs(1),
            warmup_per_conn: 5,
        }
    } else {
        Plan {
            duration: Duration::from_secs(5),
            warmup_per_conn: 20,
        }
    };
    tests::mesh::raise_nofile_limit(65536)?;
    let zt_bin = tests::ztunnel::ztunnel_bin()
        .context("build in release: cargo build --release -p benches -p ztunnel -p waypoint")?;
    let wp_bin = tests::waypoint::waypoint_bin()
        .context("build in release: cargo build --release -p benches -p ztunnel -p waypoint")?;
    let envoy_bin = tests::envoy::envoy_bin()?;

    let service = "echo";
    let mut mesh = L7Mesh::builder("bench-l7")
        .clients(&["a"])
        .document(&virtual_service(service))
        // No access log on either proxy (envoy-http.yaml has none).
        .waypoint_arg("--log-level")
        .waypoint_arg("info,access=off")
        .start()
        .await
        .context("starting the L7 mesh (ztunnels + waypoint)")?;
    let backend_addr: SocketAddr = (mesh.pod("b").ip, L7_TARGET_PORT).into();
    let envoy_listen: SocketAddr = (mesh.waypoint_pod().ip, ENVOY_PORT).into();
    // Where n1's ztunnel dials the waypoint (the service's `waypoint` entry in the mesh config).
    let waypoint_addr: SocketAddr = (mesh.waypoint_pod().ip, WAYPOINT_PORT).into();
    let vip = mesh.vip();
    print_header(
        &zt_bin,
        &wp_bin,
        &envoy_bin,
        quick,
        plan,
        vip,
        backend_addr,
        (waypoint_addr, envoy_listen),
    );

    // Envoy as the waypoint presents the waypoint's identity, minted by the mesh's CA, and
    // requires pod b's identity of the ztunnel serving pod b's HBONE.
    let waypoint_certs = mesh
        .mesh
        .ca
        .issue(
            &mesh.waypoint_identity(),
            &mesh.mesh.dir.join("envoy-waypoint-certs"),
        )
        .context("minting the waypoint identity's certificate for Envoy")?;
    let b_identity = mesh
        .config
        .get_workload("b")
        .context("pod b is not in the mesh config")?
        .spiffe_id();
    let waypoint_config = envoy_l7::render_waypoint(&envoy_l7::Waypoint {
        listen: waypoint_addr,
        certs: &waypoint_certs,
        client_san_prefix: MESH_SAN_PREFIX,
        endpoint: backend_addr,
        endpoint_hbone: (mesh.pod("b").ip, HBONE_PORT).into(),
        endpoint_identity: &b_identity,
        routes: ROUTES,
    });

    let backend = httpload::start_backend(
        &mesh.pod("b").ns,
        SocketAddr::from(([0, 0, 0, 0], L7_TARGET_PORT)),
    )?;
    let sockets = Sockets::new(&mesh.pod("a").ns);
    // Same bytes on every path (the host is the service's, as a mesh client would send).
    let req = httpload::request_bytes(PATH, &vip.to_string());

    println!("[1/4] ours: pod a → VIP {vip} → ztunnel n1 → HBONE → waypoint → HBONE → ztunnel n2 → pod b");
    let zt_pids = crate::setup::ztunnel_pids(&mesh.mesh)?;
    let [zt1, zt2] = zt_pids[..] else {
        anyhow::bail!("expected two ztunnels, found {}", zt_pids.len());
    };
    // In path order; the CPU split below relies on it.
    let pids = [
        zt1,
        mesh.waypoint().pid().context("waypoint not running")?,
        zt2,
    ];
    let ours = measure("ours", &sockets, vip, &req, &pids, &backend.served, plan).await?;
    mesh.stop_waypoint();

    println!(
        "[2/4] Envoy wp: pod a → VIP {vip} → ztunnel n1 → HBONE → Envoy as the waypoint \
         {waypoint_addr} → HBONE → ztunnel n2 → pod b (our waypoint stopped)"
    );
    let envoy_wp_proc = envoy_l7::start(
        "envoy-waypoint",
        &mesh.waypoint_pod().ns,
        mesh.mesh.dir.path(),
        &waypoint_config,
        waypoint_addr,
    )
    .await
    .context("starting Envoy as the waypoint")?;
    let pids = [
        zt1,
        envoy_wp_proc.pid().context("Envoy waypoint not running")?,
        zt2,
    ];
    let envoy_wp = measure(
        "Envoy wp",
        &sockets,
        vip,
        &req,
        &pids,
        &backend.served,
        plan,
    )
    .await
    .with_context(|| {
        format!(
            "Envoy as the waypoint; its log tail:\n{}",
            envoy_wp_proc.log_tail(30)
        )
    })?;
    let hbone = HboneCounts::read(&envoy_wp_proc).await?;
    drop(envoy_wp_proc);
    crate::setup::stop_ztunnels(&mut mesh.mesh)?;

    println!("[3/4] direct: pod a → pod b {backend_addr} (ztunnels and waypoint stopped)");
    let direct = measure(
        "direct",
        &sockets,
        backend_addr,
        &req,
        &[],
        &backend.served,
        plan,
    )
    .await?;

    println!(
        "[4/4] Envoy: pod a → Envoy {envoy_listen} (in the waypoint pod's netns on n2) → pod b"
    );
    let envoy_proc = envoy_l7::start(
        "envoy-l7",
        &mesh.waypoint_pod().ns,
        mesh.mesh.dir.path(),
        &envoy_l7::render_plain(envoy_listen, backend_addr, ROUTES),
        envoy_listen,
    )
    .await
    .context("starting the plain Envoy")?;
    let envoy_pid = envoy_proc.pid().context("Envoy not running")?;
    let envoy = measure(
        "Envoy",
        &sockets,
        envoy_listen,
        &req,
        &[envoy_pid],
        &backend.served,
        plan,
    )
    .await?;
    drop(envoy_proc);

    print_report(&direct, &ours, &envoy_wp, &envoy, &hbone);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "total run time {:.0} s; loadavg at the end {} (\"everything else busy\" is the machine's busy \
         CPU minus the proxies and this process: other work, softirq not charged to a process)",
        started.elapsed().as_secs_f64(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

/// What Envoy as the waypoint counted over the whole run (warm-up included): proof that both
/// legs were mTLS HBONE.
struct HboneCounts {
    /// mTLS handshakes on the waypoint listener (from n1's ztunnel).
    in_handshakes: u64,
    /// CONNECT streams accepted there.
    in_connects: u64,
    /// mTLS connections to n2's ztunnel and CONNECT streams sent on them.
    out_connections: u64,
    out_connects: u64,
}

impl HboneCounts {
    async fn read(envoy: &EnvoyProcess) -> Result<HboneCounts> {
        let stats = envoy.stats().await?;
        let get = |k: &str| stats.get(k).copied().unwrap_or(0);
        let counts = HboneCounts {
            // `listener.<address>.ssl.handshake`: only the waypoint listener speaks TLS.
            in_handshakes: stats
                .iter()
                .filter(|(k, _)| k.starts_with("listener.") && k.ends_with(".ssl.handshake"))
                .map(|(_, v)| v)
                .sum(),
            in_connects: get("http.connect_terminate.downstream_rq_total"),
            out_connections: get("cluster.hbone_upstream.ssl.handshake"),
            out_connects: get("cluster.hbone_upstream.upstream_rq_total"),
        };
        ensure!(
            counts.in_handshakes > 0
                && counts.in_connects > 0
                && counts.out_connections > 0
                && counts.out_connects > 0,
            "Envoy as the waypoint did not carry the traffic as HBONE both ways: {} mTLS \
             handshakes and {} CONNECTs in, {} mTLS connections and {} CONNECTs out",
            counts.in_handshakes,
            counts.in_connects,
            counts.out_connections,
            counts.out_connects
        );
        Ok(counts)
    }
}

#[allow(clippy::too_many_arguments)]
fn print_header(
    zt_bin: &std::path::Path,
    wp_bin: &std::path::Path,
    envoy_bin: &std::path::Path,
    quick: bool,
    plan: Plan,
    vip: SocketAddr,
    backend: SocketAddr,
    (waypoint_addr, envoy_listen): (SocketAddr, SocketAddr),
) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "benches --l7: HTTP/1.1 direct vs ztunnel→waypoint→ztunnel vs ztunnel→Envoy waypoint→ztunnel \
         vs Envoy{} — {cpus} CPUs shared by load generator, backend and proxies, kernel {}, loadavg {}",
        if quick { " (--quick)" } else { "" },
        kernel.trim(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    for (what, bin) in [("ztunnel", zt_bin), ("waypoint", wp_bin)] {
        let release = bin.components().any(|c| c.as_os_str() == "release");
        println!(
            "{what}: {}{}",
            bin.display(),
            if release {
                ""
            } else {
                "  ← NOT a release build: figures are meaningless"
            }
        );
    }
    println!(
        "Envoy {}: {}",
        crate::setup::envoy_version(),
        envoy_bin.display()
    );
    println!(
        "paths: ours = pod a → VIP {vip} (TPROXY on n1) → ztunnel n1 → HBONE mTLS → waypoint \
         {waypoint_addr} (waypoint pod, n2) → HBONE mTLS → ztunnel n2 → pod b; Envoy wp = the same \
         with Envoy as the waypoint on {waypoint_addr} (our ztunnels, Istio-style Envoy waypoint: \
         HBONE terminated into an internal listener with the routes, each routed connection \
         tunnelled out as HBONE through a second internal listener; waypoint identity's \
         certificate from the mesh CA); direct = pod a → {backend}; Envoy = pod a → plain \
         HTTP/1.1 listener {envoy_listen} in the waypoint pod's netns on n2 (same place as the \
         waypoint; no mTLS, one proxy) → {backend}"
    );
    println!(
        "routes on every proxy: prefix {ROUTE_PREFIX} → set {ROUTED_HEADER}: {ROUTED_VALUE} → backend; \
         / → backend (waypoint: VirtualService; Envoys: envoy-http.yaml shape); no access logs; \
         default worker threads everywhere (Envoy: one per CPU)"
    );
    println!(
        "load: GET {PATH} (~{} B response body), {CONNS} keep-alive connections, one request in flight \
         each (no pipelining), {} warm-up requests per connection then {:?} per path; minimal \
         HTTP/1.1 client on tokio in pod a, hyper HTTP/1.1 backend in pod b, both in this process; \
         measured in the order ours, Envoy wp, direct, Envoy",
        httpload::BODY.len(),
        plan.warmup_per_conn,
        plan.duration
    );
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.filter(|v| v.is_finite())
        .map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn ratio(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) if b > 0.0 && v.is_finite() => format!("{:.2}×", v / b),
        _ => String::new(),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

/// One goal line: `ours` against `other` on requests per proxy CPU-second and p99.
fn print_goal(label: &str, ours: &PathResult, other: &PathResult) {
    let (o_eff, e_eff) = (
        ours.req_per_proxy_cpu_s().unwrap_or(0.0),
        other.req_per_proxy_cpu_s().unwrap_or(f64::INFINITY),
    );
    let (o_p99, e_p99) = (ours.load.quantile_us(0.99), other.load.quantile_us(0.99));
    println!(
        "goal ({label}): more requests per proxy CPU-second: {} ({:.0} vs {:.0}, {:.2}×); \
         lower p99: {} ({:.1} vs {:.1} µs)",
        verdict(o_eff > e_eff),
        o_eff,
        e_eff,
        o_eff / e_eff,
        verdict(o_p99 < e_p99),
        o_p99,
        e_p99
    );
}

/// `<what>, proxy CPU split: …` for a three-proxy path (`names` in path order).
fn print_split(what: &str, names: [&str; 3], r: &PathResult) {
    if let [a, b, c] = r.per_proxy_cpu[..] {
        let per_req = |s: f64| s * 1e6 / r.load.requests as f64;
        println!(
            "{what}, proxy CPU split: {} {a:.2} s, {} {b:.2} s, {} {c:.2} s \
             ({:.1} / {:.1} / {:.1} µs per request)",
            names[0],
            names[1],
            names[2],
            per_req(a),
            per_req(b),
            per_req(c),
        );
    }
}

fn print_report(
    direct: &PathResult,
    ours: &PathResult,
    envoy_wp: &PathResult,
    envoy: &PathResult,
    hbone: &HboneCounts,
) {
    type Get = fn(&PathResult) -> Option<f64>;
    let rows: [(&str, Get, usize); 8] = [
        ("requests/s", |r| Some(r.load.per_sec()), 0),
        ("latency p50 [µs]", |r| Some(r.load.quantile_us(0.5)), 1),
        ("latency p99 [µs]", |r| Some(r.load.quantile_us(0.99)), 1),
        ("proxy CPU [s]", |r| r.proxy_cpu, 2),
        (
            "proxy CPU [cores busy]",
            |r| r.proxy_cpu.map(|c| c / r.load.secs),
            2,
        ),
        (
            "requests per proxy CPU-second",
            PathResult::req_per_proxy_cpu_s,
            0,
        ),
        ("load gen + backend CPU [s]", |r| Some(r.own_cpu), 2),
        ("everything else busy [s]", |r| Some(r.other_cpu), 2),
    ];
    let width = 32 + 11 + 13 + 9 + 11 + 9 + 11 + 9 + 15 + 12;
    println!();
    println!(
        "{:<32} {:>10} {:>12} {:>8} {:>10} {:>8} {:>10} {:>8} {:>14} {:>11}",
        "metric",
        "direct",
        "ours",
        "×direct",
        "Envoy wp",
        "×direct",
        "Envoy",
        "×direct",
        "ours/Envoy wp",
        "ours/Envoy"
    );
    println!("{}", "-".repeat(width));
    for (metric, get, digits) in rows {
        let (d, o, w, e) = (get(direct), get(ours), get(envoy_wp), get(envoy));
        println!(
            "{:<32} {:>10} {:>12} {:>8} {:>10} {:>8} {:>10} {:>8} {:>14} {:>11}",
            metric,
            cell(d, digits),
            cell(o, digits),
            ratio(o, d),
            cell(w, digits),
            ratio(w, d),
            cell(e, digits),
            ratio(e, d),
            ratio(o, w),
            ratio(o, e),
        );
    }
    println!("{}", "-".repeat(width));
    print_goal("ours vs Envoy", ours, envoy);
    println!(
        "ours is three proxies (ztunnel n1 + waypoint + ztunnel n2, two mTLS HBONE hops); Envoy is one \
         plain-text proxy: the comparison is the mesh's L7 path against a bare L7 proxy"
    );
    print_goal("ours vs ztunnel + Envoy waypoint", ours, envoy_wp);
    println!(
        "Envoy wp is the same three proxies and two mTLS HBONE hops with Envoy as the waypoint \
         (ztunnel n1 + Envoy + ztunnel n2), what Istio ambient runs today: the comparison is \
         waypoint against waypoint on the mesh's L7 path"
    );
    print_split("ours", ["ztunnel n1", "waypoint", "ztunnel n2"], ours);
    print_split(
        "Envoy wp",
        ["ztunnel n1", "Envoy waypoint", "ztunnel n2"],
        envoy_wp,
    );
    println!(
        "verified: the backend saw {ROUTED_HEADER} on {}/{} (ours), {}/{} (Envoy wp) and {}/{} \
         (Envoy) requests, {}/{} direct; Envoy wp, whole run: {} mTLS handshakes and {} HBONE \
         CONNECTs in from ztunnel n1, {} mTLS connections and {} HBONE CONNECTs out to ztunnel n2",
        ours.routed,
        ours.served,
        envoy_wp.routed,
        envoy_wp.served,
        envoy.routed,
        envoy.served,
        direct.routed,
        direct.served,
        hbone.in_handshakes,
        hbone.in_connects,
        hbone.out_connections,
        hbone.out_connects
    );
}
