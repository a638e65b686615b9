//! Capture that follows the mesh: with no `--pod-iface`/`--pod-cidr` (a cluster node, where
//! ztunnel learns its pods from the control plane), the capture spec is derived from the
//! current snapshot — this node's mesh (HBONE) workloads, each paired with the node-side
//! interface its address routes through (so the anti-spoofing rules of the static form apply
//! unchanged) — and the nft table is replaced whenever that derivation changes: on every
//! snapshot swap and every few seconds (a pod's route can appear after its IP is published).
//!
//! Pods named on the command line (the static form) are not re-derived, but the addresses
//! whose DNS is not captured (`ambient.istio.io/dns-capture: "false"`) follow the snapshot in
//! both forms.
//!
//! A workload whose address does not route through a directly attached interface (no route
//! yet, or a route via a gateway, or loopback) is left out until it does: capturing on the
//! node's uplink would capture other nodes' traffic. IPv6 workload addresses are not captured:
//! the ruleset drops a captured pod interface's IPv6 ([`crate::capture`]).

use crate::capture::{self, CaptureSpec};
use common::config::ConfigStore;
use common::model::Protocol;
use common::snapshot::Snapshot;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

/// How often routes are re-resolved without a snapshot change.
pub const RESOLVE_PERIOD: Duration = Duration::from_secs(3);

/// This node's mesh workload IPv4 addresses, sorted and unique. Waypoint pods are left out:
/// they terminate and originate HBONE themselves, and capturing them would tunnel their
/// tunnels again.
pub fn local_mesh_ips(snap: &Snapshot, node: &str) -> Vec<Ipv4Addr> {
    let waypoints = snap.waypoint_addresses();
    let mut ips: Vec<Ipv4Addr> = snap
        .local_workloads(node)
        .filter(|w| w.protocol == Protocol::Hbone && !snap.is_waypoint(w, &waypoints))
        .flat_map(|w| w.workload_ips.iter())
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// This node's workload IPv4 addresses that opted out of DNS capture, sorted and unique.
pub fn dns_opted_out(snap: &Snapshot, node: &str) -> Vec<Ipv4Addr> {
    let mut ips: Vec<Ipv4Addr> = snap
        .local_workloads(node)
        .filter(|w| !w.dns_capture())
        .flat_map(|w| w.workload_ips.iter())
        .filter_map(|ip| match ip.to_canonical() {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The spec for `ips`: each address whose interface `route_dev` finds is captured (outbound
/// from that interface, inbound to the address) and pinned to that interface.
pub fn derive(
    base: &CaptureSpec,
    ips: &[Ipv4Addr],
    route_dev: impl Fn(Ipv4Addr) -> Option<String>,
) -> CaptureSpec {
    let mut spec = CaptureSpec {
        pod_ifaces: Vec::new(),
        pod_sources: Vec::new(),
        pod_cidrs: Vec::new(),
        ..base.clone()
    };
    for ip in ips {
        let Some(dev) = route_dev(*ip) else {
            continue;
        };
        if !capture::valid_iface_name(&dev) {
            continue;
        }
        if !spec.pod_ifaces.contains(&dev) {
            spec.pod_ifaces.push(dev.clone());
        }
        spec.pod_sources.push((dev, *ip));
        spec.pod_cidrs
            .push(ipnet::IpNet::V4(ipnet::Ipv4Net::from(*ip)));
    }
    spec.pod_ifaces.sort();
    spec.pod_sources.sort();
    spec
}

/// The interface `ip` routes through when that route is direct (no gateway, not loopback):
/// `ip -j route get <ip>`.
pub fn route_dev(ip: Ipv4Addr) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-j", "route", "get", &ip.to_string()])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_route_get(&String::from_utf8_lossy(&out.stdout))
}

/// The device of a direct route in `ip -j route get` output.
pub fn parse_route_get(json: &str) -> Option<String> {
    let routes: Vec<serde_json::Value> = serde_json::from_str(json).ok()?;
    let r = routes.first()?;
    if r.get("gateway").is_some() || r.get("type").and_then(|t| t.as_str()) == Some("local") {
        return None;
    }
    let dev = r.get("dev")?.as_str()?;
    (dev != "lo").then(|| dev.to_string())
}

/// Installs the spec for the current snapshot and keeps it current until the task is dropped.
/// Returns once the first spec is installed. With `follow_pods` false, `base` names the pods
/// and only the DNS opt-outs follow the snapshot.
pub async fn start(
    store: Arc<ConfigStore>,
    node: String,
    base: CaptureSpec,
    follow_pods: bool,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let first = derive_now(&store, &node, &base, follow_pods).await;
    capture::install(&first)?;
    let mut installed = first;
    let mut changes = store.subscribe();
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(RESOLVE_PERIOD) => {}
            }
            let next = derive_now(&store, &node, &base, follow_pods).await;
            if next == installed {
                continue;
            }
            match capture::install(&next) {
                Ok(()) => {
                    forget_departed(&installed, &next);
                    installed = next;
                }
                Err(e) => tracing::error!(error = %e, "updating the capture rules failed"),
            }
        }
    }))
}

/// The pods `before` captured and `after` does not: their TIME_WAIT sockets would drop their
/// now uncaptured, forwarded SYNs (see [`crate::time_wait`]).
fn departed(before: &CaptureSpec, after: &CaptureSpec) -> Vec<Ipv4Addr> {
    before
        .pod_sources
        .iter()
        .map(|(_, ip)| *ip)
        .filter(|ip| !after.pod_sources.iter().any(|(_, a)| a == ip))
        .collect()
}

fn forget_departed(before: &CaptureSpec, after: &CaptureSpec) {
    let gone = departed(before, after);
    if gone.is_empty() {
        return;
    }
    match crate::time_wait::forget_involving(&gone) {
        Ok(n) => {
            tracing::info!(pods = ?gone, sockets = n, "no longer captured: destroyed their TIME_WAIT sockets")
        }
        Err(e) => {
            tracing::warn!(pods = ?gone, error = %e, "cannot destroy TIME_WAIT sockets of pods no longer captured")
        }
    }
}

async fn derive_now(
    store: &ConfigStore,
    node: &str,
    base: &CaptureSpec,
    follow_pods: bool,
) -> CaptureSpec {
    let snap = store.current();
    let dns_off = dns_opted_out(&snap, node);
    let mut spec = if follow_pods {
        let ips = local_mesh_ips(&snap, node);
        let base = base.clone();
        // Route lookups run `ip`: keep them off the runtime's workers.
        tokio::task::spawn_blocking(move || derive(&base, &ips, route_dev))
            .await
            .unwrap_or_else(|_| CaptureSpec::empty())
    } else {
        base.clone()
    };
    spec.dns_off = dns_off;
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_routes_give_their_device_and_others_none() {
        assert_eq!(
            parse_route_get(
                r#"[{"dst":"10.244.1.2","dev":"va","prefsrc":"10.0.0.1","flags":[],"uid":0,"cache":[]}]"#
            ),
            Some("va".into())
        );
        // Through a gateway: the uplink, never a pod interface.
        assert_eq!(
            parse_route_get(
                r#"[{"dst":"10.244.9.9","gateway":"10.0.0.254","dev":"eth0","flags":[]}]"#
            ),
            None
        );
        assert_eq!(
            parse_route_get(r#"[{"type":"local","dst":"10.0.0.1","dev":"lo","flags":[]}]"#),
            None
        );
        assert_eq!(parse_route_get("not json"), None);
        assert_eq!(parse_route_get("[]"), None);
    }

    /// Waypoint pods on this node are not captured, in both binding forms: named by their own
    /// IP, or endpoints of the waypoint Service whose VIP is named (scaled waypoints).
    #[test]
    fn waypoint_pods_are_not_captured() {
        let snap = common::config::load_str(
            r#"
workloads:
- {uid: a, name: a, namespace: default, serviceAccount: sa-a, workloadIps: [10.244.1.2], protocol: HBONE, node: n1}
- {uid: w1, name: wp-1, namespace: default, serviceAccount: waypoint, workloadIps: [10.244.1.3], protocol: HBONE, node: n1, services: {"default/waypoint.default.svc.cluster.local": {15008: 15008}}}
- {uid: w2, name: wp-direct, namespace: default, serviceAccount: wp2, workloadIps: [10.244.1.4], protocol: HBONE, node: n1}
- {uid: c, name: c, namespace: default, serviceAccount: sa-c, workloadIps: [10.244.1.5], protocol: HBONE, node: n1, waypoint: {destination: "/10.244.1.4"}}
- {uid: t, name: t, namespace: default, serviceAccount: sa-t, workloadIps: [10.244.1.6], protocol: TCP, node: n1}
services:
- {name: waypoint, namespace: default, hostname: waypoint.default.svc.cluster.local, vips: ["/10.96.0.10"], ports: {15008: 15008}}
- {name: app, namespace: default, hostname: app.default.svc.cluster.local, vips: ["/10.96.0.20"], ports: {80: 8080}, waypoint: {destination: "/10.96.0.10"}}
"#,
            "test.yaml",
        )
        .unwrap();
        let ips: Vec<String> = local_mesh_ips(&snap, "n1")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ips, ["10.244.1.2", "10.244.1.5"]);
    }

    #[test]
    fn pods_annotated_out_of_dns_capture_are_listed() {
        let snap = common::config::load_str(
            r#"
workloads:
- {uid: a, name: a, namespace: default, workloadIps: [10.244.1.2], protocol: HBONE, node: n1}
- {uid: c, name: c, namespace: default, workloadIps: [10.244.1.3], protocol: HBONE, node: n1, annotations: {"ambient.istio.io/dns-capture": "false"}}
- {uid: e, name: e, namespace: default, workloadIps: [10.244.1.4], protocol: HBONE, node: n1, annotations: {"ambient.istio.io/dns-capture": "true"}}
- {uid: f, name: f, namespace: default, workloadIps: [10.244.2.3], protocol: HBONE, node: n2, annotations: {"ambient.istio.io/dns-capture": "False"}}
"#,
            "test.yaml",
        )
        .unwrap();
        let off: Vec<String> = dns_opted_out(&snap, "n1")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(off, ["10.244.1.3"]);
    }

    #[test]
    fn derived_spec_pins_each_address_to_its_interface() {
        let base = CaptureSpec::empty();
        let ips: Vec<Ipv4Addr> = vec![
            "10.244.1.2".parse().unwrap(),
            "10.244.1.3".parse().unwrap(),
            "10.244.1.9".parse().unwrap(),
        ];
        let spec = derive(&base, &ips, |ip| match ip.octets()[3] {
            2 => Some("va".into()),
            3 => Some("vc".into()),
            _ => None, // no route yet: not captured
        });
        assert_eq!(spec.pod_ifaces, vec!["va", "vc"]);
        assert_eq!(
            spec.pod_sources,
            vec![("va".to_string(), ips[0]), ("vc".to_string(), ips[1])]
        );
        assert_eq!(spec.pod_cidrs.len(), 2);
        let rules = spec.ruleset();
        assert!(rules.contains("\"va\" . 10.244.1.2"), "{rules}");
        assert!(!rules.contains("10.244.1.9"), "{rules}");
        // A pod that leaves is "departed" (its TIME_WAIT sockets go), the others are not.
        let fewer = derive(&base, &ips[1..], |ip| {
            (ip == ips[1]).then(|| "vc".to_string())
        });
        assert_eq!(departed(&spec, &fewer), vec![ips[0]]);
        assert!(departed(&fewer, &spec).is_empty());
        // A hostile interface name from the routing table is never pasted into nft.
        let bad = derive(&base, &ips[..1], |_| Some("x\"; flush ruleset".into()));
        assert!(bad.pod_ifaces.is_empty());
    }
}
