//! `benches --controller`: the control plane at scale. For each [`Scale`] (the idle controller,
//! 1/10 of the target, the target: 10 000 pods / 1 000 services / 500 policies) it fills an
//! in-process fake API server inside a fresh network namespace BEFORE the controller starts (so
//! the initial list is measured), starts the real `controller` binary against it, and measures:
//! its CPU (utime + stime) and memory (VmRSS, VmHWM) after the initial sync, after serving 10
//! connected xDS clients their initial push, and after a change test; the initial push (bytes
//! per client, time from connect to the full response of every type); the time from a pod
//! change written to the API (add, then delete) until ALL 10 clients have it; and a real
//! ztunnel's memory once it runs on that feed. Printed by [`crate::control_plane_report`].

use crate::cluster_objects::{self, Scale, NODE_AGENTS};
use crate::control_plane_report::{Mem, ScaleResult};
use crate::procfs;
use crate::xds_probe::{self, Event, ProbeConfig};
use anyhow::{anyhow, bail, Context, Result};
use fake_apiserver::FakeApiServer;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tests::cluster::{token_info, token_of, wait_root, ControllerProcess, API_PORT, SYSTEM_NS};
use tests::netns::{Netns, NsTask};
use tests::testdir::TestDir;
use tests::ztunnel::{ZtunnelOpts, ZtunnelProcess};
use tokio::sync::mpsc;

/// The controller's gRPC port inside the namespace (see [`ControllerProcess::start`]).
const XDS_ADDR: &str = "127.0.0.1:15012";
/// Connected clients, as issue 7 asks.
pub const CLIENTS: usize = 10;
/// How long one initial push or one change may take before the run is declared failed.
const WAIT: Duration = Duration::from_secs(120);

pub const IDLE: Scale = Scale {
    name: "idle",
    pods: 0,
    services: 0,
    policies: 0,
};

/// The scales of a run: the idle controller, the baseline (1/10), the measured scale.
pub fn scales(quick: bool) -> [Scale; 3] {
    if quick {
        [
            IDLE,
            Scale {
                name: "100 pods",
                pods: 100,
                services: 10,
                policies: 5,
            },
            Scale {
                name: "1k pods",
                pods: 1_000,
                services: 100,
                policies: 50,
            },
        ]
    } else {
        [
            IDLE,
            Scale {
                name: "1k pods",
                pods: 1_000,
                services: 100,
                policies: 50,
            },
            Scale {
                name: "10k pods",
                pods: 10_000,
                services: 1_000,
                policies: 500,
            },
        ]
    }
}

pub async fn run(quick: bool) -> Result<()> {
    let started = Instant::now();
    let controller_bin = tests::cluster::controller_bin().context(
        "build it in the same profile: cargo build --release -p controller -p ztunnel -p benches",
    )?;
    let zt_bin = tests::ztunnel::ztunnel_bin()?;
    let changes = if quick { 6 } else { 20 };
    crate::control_plane_report::print_header(&controller_bin, &zt_bin, quick, changes);
    let mut results = Vec::new();
    for (i, s) in scales(quick).into_iter().enumerate() {
        println!(
            "[{}/3] {}: {} pods, {} services, {} policies",
            i + 1,
            s.name,
            s.pods,
            s.services,
            s.policies
        );
        let r = measure(s, changes).await?;
        r.print_progress();
        results.push(r);
    }
    crate::control_plane_report::print(&results);
    println!("total run time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn mem(pid: u32) -> Result<Mem> {
    Ok(Mem {
        rss: procfs::rss_bytes(pid)?,
        hwm: procfs::peak_rss_bytes(pid)?,
    })
}

/// `uptime`'s load averages (the machine is shared; figures mean little under load).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One scale, from an empty namespace to torn down.
async fn measure(s: Scale, changes: usize) -> Result<ScaleResult> {
    let dir = TestDir::new(&format!("scalebench-{}", s.pods))?;
    let ns = Netns::new("cp")?;
    let api = FakeApiServer::serve(ns.tcp_listener(([127, 0, 0, 1], API_PORT).into())?)?;
    let objects = cluster_objects::objects(&s);
    let n_objects = objects.len();
    let t = Instant::now();
    for o in objects {
        api.create(o)
            .map_err(|e| anyhow!("loading the cluster: {e:?}"))?;
    }
    let load_time = t.elapsed();
    for n in 0..NODE_AGENTS {
        let zt = cluster_objects::ztunnel_pod_name(n);
        api.add_token(&token_of(&zt), token_info(SYSTEM_NS, "ztunnel", &zt));
    }

    let load_avg = load_average();
    let t = Instant::now();
    let controller = ControllerProcess::start(
        &ns,
        &dir.join("controller.log"),
        &["--serving-san", "127.0.0.1"],
    )
    .await?;
    let sync_time = t.elapsed();
    let pid = controller.pid().context("controller not running")?;
    let sync_cpu = procfs::cpu_seconds(pid)?;
    let mem_sync = mem(pid)?;
    let root_pem = wait_root(&api, Duration::from_secs(30)).await?;

    // Ten clients connect at once; each is timed to the first response of every type.
    let cpu = procfs::CpuMeter::start(&[pid])?;
    let (tx, mut events) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    let mut probes: Vec<NsTask<Result<()>>> = Vec::new();
    for c in 0..CLIENTS {
        let cfg = ProbeConfig {
            address: format!("https://{XDS_ADDR}"),
            server_name: "127.0.0.1".into(),
            root_pem: root_pem.clone().into_bytes(),
            token: token_of(&cluster_objects::ztunnel_pod_name(c)),
            node: cluster_objects::node_name(c),
            pod: cluster_objects::ztunnel_pod_name(c),
        };
        let tx = tx.clone();
        probes.push(ns.spawn(move || xds_probe::run(c, cfg, tx))?);
    }
    drop(tx);
    let initial = initial_push(&mut events, t0, s.pods).await?;
    let push_cpu = cpu.elapsed()?;
    let mem_push = mem(pid)?;

    let cpu = procfs::CpuMeter::start(&[pid])?;
    let mut latencies = Vec::with_capacity(changes);
    for k in 0..changes {
        let (pod_ns, name, pod) = cluster_objects::churn_pod(&s, k / 2);
        let uid = format!("Kubernetes//Pod/{pod_ns}/{name}");
        let removal = k % 2 == 1;
        let written = if removal {
            api.delete("v1", "Pod", Some(&pod_ns), &name)
                .map_err(|e| anyhow!("deleting {uid}: {e:?}"))?;
            Instant::now()
        } else {
            api.create(pod)
                .map_err(|e| anyhow!("creating {uid}: {e:?}"))?;
            Instant::now()
        };
        let last = all_clients_have(&mut events, &uid, removal).await?;
        latencies.push(last.saturating_duration_since(written));
    }
    let change_cpu = cpu.elapsed()?;
    let mem_changes = mem(pid)?;
    drop(probes);

    // A real ztunnel on the same feed (no capture: its memory is the feed, not nftables).
    let root_file = dir.join("root-cert.pem");
    std::fs::write(&root_file, &root_pem)?;
    let zt_pod = cluster_objects::ztunnel_pod_name(CLIENTS);
    let token_file = dir.join("ztunnel.token");
    std::fs::write(&token_file, token_of(&zt_pod))?;
    let url = format!("https://{XDS_ADDR}");
    let root = root_file.display().to_string();
    let opts = ZtunnelOpts {
        node: cluster_objects::node_name(CLIENTS),
        config: None,
        ca_dir: None,
        capture: false,
        pod_ifaces: Vec::new(),
        pod_cidrs: Vec::new(),
        extra_args: [
            "--xds-address",
            &url,
            "--xds-root-ca",
            &root,
            "--ca-address",
            &url,
            "--ca-root",
            &root,
            "--token-file",
            &token_file.display().to_string(),
        ]
        .map(String::from)
        .to_vec(),
    };
    let t = Instant::now();
    let zt = ZtunnelProcess::start_within(&ns, &opts, &dir.join("ztunnel.log"), WAIT).await?;
    let zt_ready = t.elapsed();
    // Certificates for the node's pods and the first rotation check settle after readiness.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let zt_mem = mem(zt.pid().context("ztunnel not running")?)?;
    let controller_final = mem(pid)?;
    drop(zt);
    drop(controller);
    drop(api);
    drop(ns);
    Ok(ScaleResult {
        scale: s,
        objects: n_objects,
        load_time,
        load_avg,
        sync_time,
        sync_cpu,
        mem_sync,
        push_times: initial.times,
        push_bytes: initial.bytes,
        push_cpu,
        mem_push,
        latencies,
        change_cpu,
        mem_changes,
        zt_ready,
        zt_mem,
        controller_final,
    })
}

async fn next_event(events: &mut mpsc::UnboundedReceiver<Event>, what: &str) -> Result<Event> {
    match tokio::time::timeout(WAIT, events.recv()).await {
        Ok(Some(ev)) => Ok(ev),
        Ok(None) => bail!("every xDS probe ended while waiting for {what}"),
        Err(_) => bail!("no xDS response in {WAIT:?} while waiting for {what}"),
    }
}

/// Per client: time from `t0` to the first response of every subscribed type, and the bytes
/// of those first responses.
pub struct Initial {
    pub times: Vec<Duration>,
    pub bytes: Vec<usize>,
}

async fn initial_push(
    events: &mut mpsc::UnboundedReceiver<Event>,
    t0: Instant,
    pods: usize,
) -> Result<Initial> {
    let types = xds_probe::types();
    let mut seen: Vec<HashSet<String>> = vec![HashSet::new(); CLIENTS];
    let mut times = vec![Duration::ZERO; CLIENTS];
    let mut bytes = vec![0usize; CLIENTS];
    let mut workloads = [0usize; CLIENTS];
    while seen.iter().any(|s| s.len() < types.len()) {
        let ev = next_event(events, "the initial push").await?;
        if !seen[ev.client].insert(ev.type_url.clone()) {
            continue;
        }
        times[ev.client] = times[ev.client].max(ev.at.saturating_duration_since(t0));
        bytes[ev.client] += ev.bytes;
        if ev.type_url == types[0] {
            workloads[ev.client] = ev.names.iter().filter(|n| n.contains("//Pod/")).count();
        }
    }
    // The push must be the whole cluster: the scale's pods plus the ztunnel pods (host network,
    // listed as workloads too) — at least the scale's pods.
    if let Some((c, n)) = workloads.iter().enumerate().find(|(_, n)| **n < pods) {
        bail!("client {c} got {n} pod workloads in its initial push, expected ≥ {pods}");
    }
    Ok(Initial { times, bytes })
}

/// Waits until every client has had an Address response naming `uid` (added or, with
/// `removal`, removed); returns the arrival time at the last of them.
async fn all_clients_have(
    events: &mut mpsc::UnboundedReceiver<Event>,
    uid: &str,
    removal: bool,
) -> Result<Instant> {
    let mut arrived: HashMap<usize, Instant> = HashMap::new();
    while arrived.len() < CLIENTS {
        let ev = next_event(events, uid).await?;
        if ev.type_url != common::xds::ADDRESS_TYPE {
            continue;
        }
        let list = if removal { &ev.removed } else { &ev.names };
        if list.iter().any(|n| n == uid) {
            arrived.entry(ev.client).or_insert(ev.at);
        }
    }
    arrived
        .values()
        .max()
        .copied()
        .context("no client reported")
}
