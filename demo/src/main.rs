//! The demo: builds two "nodes" and three "pods" as network namespaces, starts a real ztunnel
//! per node on the embedded default config (`mesh.yaml`), sends traffic from the client pod to
//! a service, and prints what happened: the chain each connection took, the peer identities,
//! the bytes moved, what policy refused, and the metrics. Everything is torn down at the end.
//! Needs root; run `cargo build --bins` first so the ztunnel binary exists.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::time::Duration;
use tests::apps;
use tests::testdir::TestDir;
use tests::topology::Topology;
use tests::ztunnel::{Ca, ZtunnelOpts, ZtunnelProcess};

const MESH_YAML: &str = include_str!("mesh.yaml");
/// Verbatim copies of `shared/scenarios/demoapp-canary.yaml` and `demoapp-weights.yaml`
/// (the files users already have); the demo prefers the originals when `../shared` is there.
const CANARY_YAML: &str = include_str!("../scenarios/demoapp-canary.yaml");
const WEIGHTS_YAML: &str = include_str!("../scenarios/demoapp-weights.yaml");

fn main() -> Result<()> {
    if !nix_is_root() {
        anyhow::bail!("the demo builds network namespaces and TPROXY rules: run it as root");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        run().await?;
        l7().await
    })
}

/// A scenario file from `../shared/scenarios` when present, else the embedded copy.
fn scenario(name: &str, embedded: &'static str) -> String {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/scenarios")
        .join(name);
    std::fs::read_to_string(shared).unwrap_or_else(|_| embedded.to_string())
}

/// Only the DestinationRule document of the canary file (the weights file has none: users
/// apply both).
fn destination_rule_of(canary: &str) -> String {
    canary
        .split("\n---")
        .find(|d| d.contains("kind: DestinationRule"))
        .unwrap_or("")
        .to_string()
}

/// Act two: demoapp v1.0 ×3 and v1.1 ×2 behind a waypoint, routed by the users' own
/// VirtualService/DestinationRule files.
async fn l7() -> Result<()> {
    use tests::http_apps::{Http1Client, HttpMode};
    use tests::l7mesh::L7Mesh;
    step("L7: demoapp (v1.0 ×3, v1.1 ×2) behind a waypoint, routed by demoapp-canary.yaml");
    let canary = scenario("demoapp-canary.yaml", CANARY_YAML);
    let weights = scenario("demoapp-weights.yaml", WEIGHTS_YAML);
    let mesh = L7Mesh::demoapp_canary("demo-l7")
        .document(&canary)
        .start()
        .await
        .context("starting the L7 mesh")?;
    let _servers = mesh.start_http_servers(HttpMode::Auto)?;
    println!(
        "  waypoint {} at {}:15006 (inbound_CONNECT_terminate); service demoapp at {}",
        mesh.waypoint_identity(),
        mesh.waypoint_pod().ip,
        mesh.vip()
    );
    let client = &mesh.pod("a").ns;
    let mut http = Http1Client::connect(client, mesh.vip()).await?;
    for path in ["/canary", "/canary/hello", "/", "/index.html"] {
        let r = http.get(path, &[]).await?;
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        println!(
            "  GET {path:<14} → HTTP {} from {:<11} which received path {}",
            r.status,
            body["pod"].as_str().unwrap_or("?"),
            body["path"].as_str().unwrap_or("?")
        );
    }

    step("L7: demoapp-weights.yaml (90/10) applied by editing the config file; 1000 requests");
    let mut config = mesh.config.clone();
    config.documents = vec![weights.clone(), destination_rule_of(&canary)];
    mesh.write_config(&config)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut counts = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..1000 {
        let r = http.get("/", &[]).await?;
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        let pod = body["pod"].as_str().unwrap_or("?");
        let version = if pod.contains("v11") { "v1.1" } else { "v1.0" };
        *counts.entry(version.to_string()).or_default() += 1;
    }
    for (v, n) in &counts {
        println!("  {v}: {n} requests ({:.1} %)", *n as f64 / 10.0);
    }

    step("L7: the waypoint's access log (last four requests)");
    let lines = mesh.waypoint().access_log_lines();
    for l in lines.iter().rev().take(4).rev() {
        println!("  {l}");
    }
    step("Tearing down the L7 mesh");
    drop(mesh);
    println!("  done");
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

fn step(title: &str) {
    println!("\n\x1b[1m== {title}\x1b[0m");
}

async fn run() -> Result<()> {
    step("Topology: nodes n1, n2 joined by a veth link; pods as namespaces");
    let topo = Topology::builder()
        .node("n1", &["sleep"])
        .node("n2", &["echo-v1", "echo-v2"])
        .build()
        .context("building the namespace topology")?;
    for p in &topo.pods {
        println!("  pod {:<8} {:<12} on {}", p.name, p.ip, p.node);
    }
    let dir = TestDir::new("demo")?;
    let ca = Ca::init(&dir.join("ca"))?;
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, MESH_YAML)?;
    println!(
        "  mesh root CA in {}, config {}",
        ca.dir.display(),
        config.display()
    );

    step("Starting one ztunnel per node (TPROXY capture installed by ztunnel itself)");
    let mut ztunnels = Vec::new();
    for node in &topo.nodes {
        let pods: Vec<_> = topo.pods.iter().filter(|p| p.node == node.name).collect();
        let opts = ZtunnelOpts {
            node: node.name.clone(),
            config: Some(config.clone()),
            ca_dir: Some(ca.dir.clone()),
            capture: true,
            pod_ifaces: pods.iter().map(|p| p.host_if.clone()).collect(),
            pod_cidrs: pods.iter().map(|p| format!("{}/32", p.ip)).collect(),
            extra_args: vec![],
        };
        let log = dir.join(&format!("ztunnel-{}.log", node.name));
        ztunnels.push(ZtunnelProcess::start(&node.ns, &opts, &log).await?);
        println!(
            "  ztunnel on {} ready (capturing {:?})",
            node.name, opts.pod_ifaces
        );
    }

    let _servers = [
        apps::http_server(&topo.pod("echo-v1").ns, "0.0.0.0:9000".parse()?, "echo-v1")?,
        apps::http_server(&topo.pod("echo-v2").ns, "0.0.0.0:9000".parse()?, "echo-v2")?,
    ];
    let sleep = &topo.pod("sleep").ns;
    let vip: SocketAddr = "10.96.0.10:8080".parse()?;

    step("sleep → http://echo (VIP 10.96.0.10:8080): four requests");
    for i in 1..=4 {
        let stream = sleep.connect(vip).await?;
        let (status, body) = apps::http_get(stream, "echo").await?;
        let mut parts = body.split_whitespace();
        println!(
            "  request {i}: HTTP {status}, answered by {}, which saw the client as {}",
            parts.next().unwrap_or("?"),
            parts.next().unwrap_or("?")
        );
    }

    step("Policy: a plaintext client outside the mesh (node n1 itself) → echo-v1:9000");
    let outcome = apps::probe_echo(
        &topo.node("n1").ns,
        "10.244.2.2:9000".parse()?,
        Duration::from_secs(2),
    )
    .await;
    println!("  outcome: {outcome:?} (PeerAuthentication STRICT refuses plaintext)");

    tokio::time::sleep(Duration::from_millis(300)).await;
    step("What the ztunnels logged (one access-log line per connection)");
    for z in &ztunnels {
        for line in z.log().lines().filter(|l| l.contains(" access: ")) {
            println!("  [{}] {}", z.node, condense(line));
        }
    }

    step("Metrics (istio_tcp_connections_opened_total on :15020)");
    for z in &ztunnels {
        let samples = z.metrics().await?;
        for s in samples
            .iter()
            .filter(|s| s.name == "istio_tcp_connections_opened_total")
        {
            let label = |k: &str| s.labels.get(k).map(String::as_str).unwrap_or("-");
            println!(
                "  [{}] reporter={} {} → {} ({}) security={} : {}",
                z.node,
                label("reporter"),
                label("source_workload"),
                label("destination_workload"),
                label("destination_service"),
                label("connection_security_policy"),
                s.value
            );
        }
    }

    step("Tearing down (ztunnels stop; their capture rules, kept on exit to fail closed, go with the namespaces)");
    drop(ztunnels);
    drop(topo);
    println!("  done");
    Ok(())
}

/// Drops the timestamp/level/target prefix of a text log line.
fn condense(line: &str) -> String {
    let rest = line.split_once(" access: ").map(|(_, r)| r).unwrap_or(line);
    rest.replace("connection complete ", "")
}
