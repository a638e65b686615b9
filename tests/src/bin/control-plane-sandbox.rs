//! `control-plane-sandbox`: the cluster-mode control plane of the e2e tests, left running for a
//! node agent started by hand — typically an unmodified Istio ztunnel, to check interoperability.
//! It builds the two-node netns topology (nodes n1/n2, pods a/c on n1, b/d on n2), serves the
//! fake API server in n1, applies a small ambient application (pods `a` on n1 and `b` on n2, a
//! Service `echo` in front of `b`, one L4 AuthorizationPolicy), starts the real `controller`
//! (xDS + CA on 10.0.0.1:15012), writes each node's ztunnel token and the published root to
//! files, prints the environment an Istio ztunnel on a node needs, and waits for Ctrl-C
//! (everything is torn down then). Each pod of the application also gets a token of its own
//! service account, and the command for an Istio ztunnel in *dedicated* mode inside that
//! pod's namespace (it proxies for that one pod, needs no CNI, and so carries real traffic:
//! e.g. our ztunnel on n1 with `--xds-address`, pod a → `echo` → Istio's ztunnel in pod b).
//! Needs root and `cargo build --bins` first.

use anyhow::Result;
use serde_json::json;
use tests::cluster::{token_info, token_of, ClusterMesh, CONTROLLER_ADDR, SYSTEM_NS};

/// The e2e echo application plus one L4 policy, so a node agent has some of each resource.
fn objects() -> Vec<serde_json::Value> {
    let mut objects = tests::cluster::echo_app();
    objects.push(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "echo-from-a", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "server"}}, "action": "ALLOW",
                 "rules": [{"from": [{"source": {"principals":
                     ["cluster.local/ns/default/sa/sa-a"]}}],
                            "to": [{"operation": {"ports": ["9000"]}}]}]}
    }));
    objects
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mesh = ClusterMesh::start_control_plane(
        "control-plane-sandbox",
        tests::topology::Topology::two_nodes()?,
        objects(),
    )
    .await?;
    println!(
        "controller log: {}",
        mesh.dir.join("controller.log").display()
    );
    println!("root:           {}", mesh.root.display());
    for node in &mesh.topo.nodes {
        let zt = format!("ztunnel-{}", node.name);
        let token = mesh.dir.join(&format!("{zt}.token"));
        std::fs::write(&token, token_of(&zt))?;
        println!(
            "\n# node {name}: ip netns exec {ns} env \\\n  \
             XDS_ADDRESS=https://{CONTROLLER_ADDR} CA_ADDRESS=https://{CONTROLLER_ADDR} \\\n  \
             XDS_ROOT_CA={root} CA_ROOT_CA={root} AUTH_TOKEN={token} \\\n  \
             NODE_NAME={name} POD_NAME={zt} POD_NAMESPACE={SYSTEM_NS} INSTANCE_IP={ip} \\\n  \
             INPOD_UDS=/tmp/istio-ztunnel-{name}.sock <istio ztunnel> proxy",
            name = node.name,
            ns = node.ns.name(),
            root = mesh.root.display(),
            token = token.display(),
            ip = node.ip,
        );
    }
    for p in &mesh.topo.pods {
        println!("# pod {} ({}): netns {}", p.name, p.ip, p.ns.name());
    }
    for pod in objects().iter().filter(|o| o["kind"] == "Pod") {
        let (ns, name) = (
            pod["metadata"]["namespace"].as_str().unwrap_or("default"),
            pod["metadata"]["name"].as_str().unwrap_or_default(),
        );
        let sa = pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        let Some(p) = mesh.topo.pods.iter().find(|p| p.name == name) else {
            continue;
        };
        let token = mesh.dir.join(&format!("pod-{name}.token"));
        std::fs::write(&token, token_of(name))?;
        mesh.api
            .add_token(&token_of(name), token_info(ns, sa, name));
        println!(
            "\n# dedicated mode in pod {name}: ip netns exec {netns} env PROXY_MODE=dedicated \\\n  \
             PROXY_WORKLOAD_INFO={ns}/{name}/{sa} \\\n  \
             XDS_ADDRESS=https://{CONTROLLER_ADDR} CA_ADDRESS=https://{CONTROLLER_ADDR} \\\n  \
             XDS_ROOT_CA={root} CA_ROOT_CA={root} AUTH_TOKEN={token} \\\n  \
             POD_NAME={name} POD_NAMESPACE={ns} INSTANCE_IP={ip} <istio ztunnel> proxy",
            netns = p.ns.name(),
            root = mesh.root.display(),
            token = token.display(),
            ip = p.ip,
        );
    }
    println!("\nCtrl-C tears everything down.");
    tokio::signal::ctrl_c().await?;
    drop(mesh);
    Ok(())
}
