//! Test topologies built from network namespaces: "nodes" joined by a veth link and "pods" on
//! veths hanging off their node, routed like a Kubernetes node (pod /32s, gateway 10.244.N.1).
//! Everything belongs to [`Netns`] guards, so dropping the [`Topology`] (even while unwinding
//! from a panic) removes every namespace and interface.

use crate::netns::Netns;
use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;

/// A node: its own namespace, link address `10.0.0.<i>` and pod CIDR `10.244.<i>.0/24`.
#[derive(Debug)]
pub struct Node {
    /// Logical name (`n1`), also the `--node` name ztunnel runs with.
    pub name: String,
    pub ns: Netns,
    /// Address on the node-to-node link.
    pub ip: Ipv4Addr,
    /// Name of the node-to-node link interface in this node (`v12` on n1, `v21` on n2).
    pub link_if: String,
    /// Index `i` of the node (1-based); pods are 10.244.i.x.
    pub index: u8,
}

impl Node {
    /// The pod gateway address on this node (`10.244.<i>.1`).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index, 1)
    }
    /// The pod CIDR of this node.
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }
}

/// A pod: a namespace with `eth0` (a /32 address) whose peer `v<name>` is on its node.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// Name of the node this pod runs on.
    pub node: String,
    /// Node-side interface of the pod's veth (`va` for pod `a`).
    pub host_if: String,
}

/// A set of nodes and pods. Pods are dropped (deleted) before nodes.
#[derive(Debug)]
pub struct Topology {
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
}

impl Topology {
    /// The standard topology: node `n1` with pods `a` (10.244.1.2) and `c` (10.244.1.3), node `n2`
    /// with pods `b` (10.244.2.2) and `d` (10.244.2.3).
    pub fn two_nodes() -> Result<Topology> {
        Topology::builder()
            .node("n1", &["a", "c"])
            .node("n2", &["b", "d"])
            .build()
    }

    /// A builder for other shapes (one or two nodes, any number of pods per node).
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    /// The node named `name` (panics if absent: a test bug).
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in topology"))
    }

    /// The pod named `name` (panics if absent: a test bug).
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in topology"))
    }

    /// The names of every namespace this topology owns.
    pub fn namespace_names(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| n.ns.name().to_string())
            .chain(self.pods.iter().map(|p| p.ns.name().to_string()))
            .collect()
    }
}

/// Describes nodes (in order: the i-th is `10.0.0.i`, pods `10.244.i.2…`) and their pods.
#[derive(Debug, Default)]
pub struct TopologyBuilder {
    nodes: Vec<(String, Vec<String>)>,
}

impl TopologyBuilder {
    /// Adds a node and the pods on it (pods get .2, .3, … in order).
    pub fn node(mut self, name: &str, pods: &[&str]) -> Self {
        self.nodes.push((
            name.to_string(),
            pods.iter().map(|p| p.to_string()).collect(),
        ));
        self
    }

    /// Creates all namespaces, links, addresses and routes.
    pub fn build(self) -> Result<Topology> {
        if self.nodes.is_empty() || self.nodes.len() > 2 {
            bail!("topology supports one or two nodes");
        }
        let mut topo = Topology {
            pods: Vec::new(),
            nodes: Vec::new(),
        };
        for (i, (name, _)) in self.nodes.iter().enumerate() {
            let index = (i + 1) as u8;
            let ns = Netns::new(name)?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
            let other = if index == 1 { 2 } else { 1 };
            topo.nodes.push(Node {
                name: name.clone(),
                ns,
                ip: Ipv4Addr::new(10, 0, 0, index),
                link_if: format!("v{index}{other}"),
                index,
            });
        }
        if topo.nodes.len() == 2 {
            link_nodes(&topo.nodes[0], &topo.nodes[1]).context("linking nodes")?;
        }
        for (i, (_, pods)) in self.nodes.iter().enumerate() {
            for (j, pod) in pods.iter().enumerate() {
                let node = &topo.nodes[i];
                let ip = Ipv4Addr::new(10, 244, node.index, (j + 2) as u8);
                let pod = add_pod(node, pod, ip).with_context(|| format!("adding pod {pod}"))?;
                topo.pods.push(pod);
            }
        }
        Ok(topo)
    }
}

fn link_nodes(n1: &Node, n2: &Node) -> Result<()> {
    n1.ns.ip(&[
        "link",
        "add",
        &n1.link_if,
        "type",
        "veth",
        "peer",
        "name",
        &n2.link_if,
        "netns",
        n2.ns.name(),
    ])?;
    for (me, peer) in [(n1, n2), (n2, n1)] {
        me.ns
            .ip(&["addr", "add", &format!("{}/24", me.ip), "dev", &me.link_if])?;
        me.ns.ip(&["link", "set", &me.link_if, "up"])?;
        me.ns.ip(&[
            "route",
            "add",
            &peer.pod_cidr(),
            "via",
            &peer.ip.to_string(),
        ])?;
    }
    Ok(())
}

fn add_pod(node: &Node, name: &str, ip: Ipv4Addr) -> Result<Pod> {
    let ns = Netns::new(name)?;
    let host_if: String = format!("v{name}").chars().take(15).collect();
    let gw = node.gateway().to_string();
    let ip_s = ip.to_string();
    node.ns.ip(&[
        "link",
        "add",
        &host_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["addr", "add", &format!("{ip_s}/32"), "dev", "eth0"])?;
    ns.ip(&["route", "add", &gw, "dev", "eth0"])?;
    ns.ip(&["route", "add", "default", "via", &gw, "dev", "eth0"])?;
    node.ns.ip(&["link", "set", &host_if, "up"])?;
    node.ns
        .ip(&["addr", "add", &format!("{gw}/32"), "dev", &host_if])?;
    node.ns
        .ip(&["route", "add", &format!("{ip_s}/32"), "dev", &host_if])?;
    Ok(Pod {
        name: name.to_string(),
        ns,
        ip,
        node: node.name.clone(),
        host_if,
    })
}
