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

fn main() -> Result<()> {
    if !nix_is_root() {
        anyhow::bail!("the demo builds network namespaces and TPROXY rules: run it as root");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
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
            config: config.clone(),
            ca_dir: ca.dir.clone(),
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

    step("Tearing down (ztunnels remove their rules; namespaces deleted)");
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
