//! Benchmark driver: in one run on the two-node netns topology, measures raw TCP pod a → pod b,
//! the same through ztunnel → HBONE → ztunnel (TPROXY capture on both nodes), and through an
//! Envoy HBONE client/server pair, then prints one table with ratios to the raw baseline and
//! ztunnel's memory (idle, after traffic, with 10 000 workloads + 1 000 services).
//!
//! Run by hand, as root, with release binaries:
//! `cargo build --release -p benches -p ztunnel && target/release/benches [--quick]`
//! (or `cargo run --release -p benches -- --quick` once ztunnel is built in release). The
//! ztunnel binary is the one next to this executable (or `$ZTUNNEL_BIN`).
//!
//! `benches --soak [--quick]` runs the soak instead (see [`soak`]).
//!
//! `benches --controller [--quick]` runs the control-plane scale benchmark instead (see
//! [`control_plane`]): 10 000 pods / 1 000 services / 500 policies against the real controller
//! with 10 xDS clients and a ztunnel, beside the same at 1/10 scale and the idle controller;
//! build it with `cargo build --release -p controller -p ztunnel -p benches`.
//!
//! `benches --l7 [--quick]` runs the L7 benchmark instead (see [`l7`]): keep-alive HTTP/1.1
//! direct vs ztunnel → waypoint → ztunnel vs ztunnel → Envoy as the waypoint → ztunnel (what
//! Istio ambient runs today) vs Envoy as a bare L7 proxy; build it with
//! `cargo build --release -p benches -p ztunnel -p waypoint`.

mod cluster_objects;
mod control_plane;
mod control_plane_report;
mod envoy_l7;
mod httpload;
mod l7;
mod load;
mod procfs;
mod report;
mod setup;
mod soak;
mod suite;
mod xds_probe;

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tests::mesh::{echo_vip, raise_nofile_limit, standard_config};

const USAGE: &str = "usage: benches [--l7 | --soak | --controller] [--quick]
  raw TCP vs ztunnel vs Envoy on a two-node netns topology (needs root, nft, Envoy)
  --l7      the L7 benchmark instead: HTTP/1.1 direct vs ztunnel → waypoint → ztunnel vs
            ztunnel → Envoy waypoint → ztunnel vs Envoy
  --soak    the soak instead: 10 000 held tunnelled connections, then a 5 000-handshake
            slowloris against a ztunnel while legitimate connections are timed
  --controller  the control plane at scale instead: the real controller on a fake API with
            10 000 pods / 1 000 services / 500 policies (and 1/10 of that, and idle): CPU, RSS,
            initial push to 10 xDS clients, pod change → all clients latency, ztunnel RSS
            (--quick: 100 and 1 000 pods)
  --quick   short smoke run (seconds instead of a minute or two)";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--slowloris-attacker") {
        // The soak's attacker process (see soak.rs): <target> <connections> <seconds>.
        let [_, target, n, secs] = args.as_slice() else {
            bail!("--slowloris-attacker <target> <connections> <seconds>");
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return rt.block_on(soak::attacker_main(
            target.parse()?,
            n.parse()?,
            secs.parse()?,
        ));
    }
    if args.first().map(String::as_str) == Some("--bench-server") {
        // The soak's echo server process (see load.rs): <listen address>.
        let [_, addr] = args.as_slice() else {
            bail!("--bench-server <address>");
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return rt.block_on(load::server_main(addr.parse()?));
    }
    let mut quick = false;
    let mut l7 = false;
    let mut soak = false;
    let mut controller = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => quick = true,
            "--l7" => l7 = true,
            "--soak" => soak = true,
            "--controller" => controller = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if controller {
        rt.block_on(control_plane::run(quick))
    } else if soak {
        rt.block_on(soak::run(quick))
    } else if l7 {
        rt.block_on(l7::run(quick))
    } else {
        rt.block_on(run(quick))
    }
}

async fn run(quick: bool) -> Result<()> {
    let started = Instant::now();
    let plan = if quick {
        suite::Plan::quick()
    } else {
        suite::Plan::full()
    };
    raise_nofile_limit(65536)?;
    let zt_bin = tests::ztunnel::ztunnel_bin().context(
        "build ztunnel in the same profile: cargo build --release -p benches -p ztunnel",
    )?;
    let envoy_bin = tests::envoy::envoy_bin()?;
    print_header(&zt_bin, &envoy_bin, quick, plan);

    let config = standard_config();
    let mut mesh = setup::world(&config)?;
    let backend: SocketAddr = "10.244.2.2:9000".parse()?;
    let _server = load::start_server(&mesh.pod("b").ns, "0.0.0.0:9000".parse()?)?;
    let sockets = load::Sockets::new(&mesh.pod("a").ns);
    let client_ns = &mesh.pod("a").ns.handle();

    println!("[1/3] raw TCP: pod a → {backend} (no capture, no proxy)");
    let raw = suite::run("raw", client_ns, &sockets, backend, &[], plan).await?;

    println!(
        "[2/3] ztunnel: pod a → {} (captured on n1 → HBONE → n2 → pod b)",
        echo_vip()
    );
    setup::start_ztunnels(&mut mesh, &config).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let zt_pids = setup::ztunnel_pids(&mesh)?;
    let zt_idle = [
        procfs::rss_bytes(zt_pids[0])?,
        procfs::rss_bytes(zt_pids[1])?,
    ];
    let ztunnel = suite::run("ztunnel", client_ns, &sockets, echo_vip(), &zt_pids, plan).await?;
    let zt_after_traffic = [
        procfs::rss_bytes(zt_pids[0])?,
        procfs::rss_bytes(zt_pids[1])?,
    ];
    println!(
        "  ztunnel  memory: loading {} workloads + {} services",
        setup::LARGE_WORKLOADS,
        setup::LARGE_SERVICES
    );
    let zt_large = setup::large_config_memory(&mesh, &config).await?;
    setup::stop_ztunnels(&mut mesh)?;

    println!(
        "[3/3] Envoy: pod a → {} (plain listener on n1) → HBONE → {} (n2) → pod b",
        setup::ENVOY_CLIENT_LISTEN,
        setup::ENVOY_SERVER_LISTEN
    );
    let envoys = setup::start_envoys(&mesh, backend).await?;
    let envoy_pids: Vec<u32> = envoys
        .iter()
        .map(|e| e.pid().context("Envoy not running"))
        .collect::<Result<_>>()?;
    let envoy = suite::run(
        "Envoy",
        client_ns,
        &sockets,
        setup::ENVOY_CLIENT_LISTEN.parse()?,
        &envoy_pids,
        plan,
    )
    .await?;
    let envoy_after_traffic = [
        procfs::rss_bytes(envoy_pids[0])?,
        procfs::rss_bytes(envoy_pids[1])?,
    ];
    drop(envoys);

    report::Report {
        raw,
        ztunnel,
        envoy,
        conn_concurrency: plan.conn_concurrency,
        zt_idle,
        zt_after_traffic,
        zt_large,
        envoy_after_traffic,
    }
    .print();
    println!("total run time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn print_header(
    zt_bin: &std::path::Path,
    envoy_bin: &std::path::Path,
    quick: bool,
    p: suite::Plan,
) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "benches: raw TCP vs ztunnel vs Envoy{} — {cpus} CPUs shared by client, server and proxies, kernel {}",
        if quick { " (--quick)" } else { "" },
        kernel.trim()
    );
    let release = zt_bin.components().any(|c| c.as_os_str() == "release");
    println!(
        "ztunnel: {}{}",
        zt_bin.display(),
        if release {
            ""
        } else {
            "  ← NOT a release build: figures are meaningless"
        }
    );
    println!("Envoy {}: {}", setup::envoy_version(), envoy_bin.display());
    println!(
        "paths: raw = pod a → pod b:9000 directly; ztunnel = pod a → VIP {} captured by TPROXY on both \
         nodes (default worker threads); Envoy = pod a → plain listener {} on n1 (no TPROXY) → HTTP/2 \
         CONNECT over mTLS → plain listener {} on n2 → pod b (default concurrency)",
        echo_vip(),
        setup::ENVOY_CLIENT_LISTEN,
        setup::ENVOY_SERVER_LISTEN
    );
    println!(
        "each path: {:?} of 1 stream, {:?} of 4 streams, {} × 1 KiB round trips on one connection, \
         {:?} of sequential and {:?} of {}-way concurrent new connections (connect, 64 B echo, close); \
         bulk and latency connections get one blocking thread per end (iperf/netperf style)",
        p.throughput, p.throughput, p.latency_rounds, p.conn_time, p.conn_time, p.conn_concurrency
    );
}
