//! Writing ztunnel's local config file from tests: a small builder for workloads and services in
//! Istio ztunnel's camelCase local-config form, extra Istio documents (AuthorizationPolicy,
//! PeerAuthentication, Sidecar) pasted verbatim, and atomic rewrites (tmp + rename) for reloads.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// A workload entry (`protocol: HBONE` unless [`Workload::tcp`]).
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub ip: String,
    pub node: String,
    pub hbone: bool,
    pub labels: BTreeMap<String, String>,
    /// Pod annotations (e.g. `ambient.istio.io/dns-capture`).
    pub annotations: BTreeMap<String, String>,
    /// `"<ns>/<hostname>" → {port: targetPort}`.
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// False renders `status: Unhealthy` (excluded from service endpoints).
    pub healthy: bool,
    /// `waypoint: {destination: "/<ip>", hboneMtlsPort: <port>}` when set: traffic addressed
    /// to this workload's own IP goes through that waypoint.
    pub waypoint: Option<(String, u16)>,
}

impl Workload {
    /// A mesh (HBONE) workload `name` in namespace `default` with service account `sa-<name>`;
    /// the pod of the same name in the topology is the workload.
    pub fn hbone(name: &str, ip: impl ToString, node: &str) -> Workload {
        Workload {
            name: name.to_string(),
            namespace: "default".to_string(),
            service_account: format!("sa-{name}"),
            ip: ip.to_string(),
            node: node.to_string(),
            hbone: true,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            services: BTreeMap::new(),
            healthy: true,
            waypoint: None,
        }
    }

    /// Sends traffic addressed to this workload through the waypoint at `ip` (HBONE port
    /// `hbone_port`).
    pub fn waypoint(mut self, ip: impl ToString, hbone_port: u16) -> Self {
        self.waypoint = Some((ip.to_string(), hbone_port));
        self
    }

    /// Makes this a plain-TCP (non-mesh) workload.
    pub fn tcp(mut self) -> Self {
        self.hbone = false;
        self
    }

    /// Marks the workload `status: Unhealthy`.
    pub fn unhealthy(mut self) -> Self {
        self.healthy = false;
        self
    }

    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.to_string();
        self
    }

    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.to_string();
        self
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.to_string(), v.to_string());
        self
    }

    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.annotations.insert(k.to_string(), v.to_string());
        self
    }

    /// The SPIFFE identity of this workload.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    fn render(&self, out: &mut String) {
        let _ = write!(
            out,
            "- {{uid: {n}, name: {n}, namespace: {ns}, serviceAccount: {sa}, workloadIps: [{ip}], protocol: {p}, node: {node}",
            n = self.name,
            ns = self.namespace,
            sa = self.service_account,
            ip = self.ip,
            p = if self.hbone { "HBONE" } else { "TCP" },
            node = self.node,
        );
        if !self.healthy {
            out.push_str(", status: Unhealthy");
        }
        if !self.labels.is_empty() {
            out.push_str(", labels: {");
            let labels: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{}: {}", quote(k), quote(v)))
                .collect();
            out.push_str(&labels.join(", "));
            out.push('}');
        }
        if !self.annotations.is_empty() {
            out.push_str(", annotations: {");
            let annotations: Vec<String> = self
                .annotations
                .iter()
                .map(|(k, v)| format!("{}: {}", quote(k), quote(v)))
                .collect();
            out.push_str(&annotations.join(", "));
            out.push('}');
        }
        if !self.services.is_empty() {
            out.push_str(", services: {");
            let svcs: Vec<String> = self
                .services
                .iter()
                .map(|(k, ports)| format!("{}: {}", quote(k), ports_map(ports)))
                .collect();
            out.push_str(&svcs.join(", "));
            out.push('}');
        }
        if let Some((ip, port)) = &self.waypoint {
            let _ = write!(
                out,
                ", waypoint: {{destination: \"/{ip}\", hboneMtlsPort: {port}}}"
            );
        }
        out.push_str("}\n");
    }
}

/// A service entry.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vip: String,
    /// port → targetPort.
    pub ports: BTreeMap<u16, u16>,
    /// `waypoint: {destination: "/<ip>", hboneMtlsPort: <port>}` when set.
    pub waypoint: Option<(String, u16)>,
    /// `appProtocols: {port: protocol}` (our extension; ports without one are sniffed).
    pub app_protocols: BTreeMap<u16, String>,
}

impl Service {
    /// Service `name` in `default` with one VIP.
    pub fn new(name: &str, vip: &str) -> Service {
        Service {
            name: name.to_string(),
            namespace: "default".to_string(),
            vip: vip.to_string(),
            ports: BTreeMap::new(),
            waypoint: None,
            app_protocols: BTreeMap::new(),
        }
    }

    pub fn port(mut self, port: u16, target: u16) -> Self {
        self.ports.insert(port, target);
        self
    }

    /// Declares the application protocol of service port `port` (`http`, `http2`, `grpc`,
    /// `tcp`, …), rendered as `appProtocols: {port: proto}`.
    pub fn app_protocol(mut self, port: u16, proto: &str) -> Self {
        self.app_protocols.insert(port, proto.to_string());
        self
    }

    /// Sends the service's traffic through the waypoint at `ip` (its HBONE port `hbone_port`,
    /// 15006 for our waypoint).
    pub fn waypoint(mut self, ip: impl ToString, hbone_port: u16) -> Self {
        self.waypoint = Some((ip.to_string(), hbone_port));
        self
    }

    /// `<name>.<ns>.svc.cluster.local`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    fn render(&self, out: &mut String) {
        let _ = write!(
            out,
            "- {{name: {}, namespace: {}, hostname: {}, vips: [\"/{}\"], ports: {}",
            self.name,
            self.namespace,
            self.hostname(),
            self.vip,
            ports_map(&self.ports)
        );
        if let Some((ip, port)) = &self.waypoint {
            let _ = write!(
                out,
                ", waypoint: {{destination: \"/{ip}\", hboneMtlsPort: {port}}}"
            );
        }
        if !self.app_protocols.is_empty() {
            let v: Vec<String> = self
                .app_protocols
                .iter()
                .map(|(p, proto)| format!("{p}: {}", quote(proto)))
                .collect();
            let _ = write!(out, ", appProtocols: {{{}}}", v.join(", "));
        }
        out.push_str("}\n");
    }
}

/// The whole config file: the local document plus extra Istio documents.
#[derive(Debug, Clone, Default)]
pub struct MeshConfig {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    /// `meshConfig.outboundTrafficPolicy.mode: REGISTRY_ONLY`.
    pub registry_only: bool,
    /// Extra YAML documents appended verbatim (`---` separated).
    pub documents: Vec<String>,
}

impl MeshConfig {
    pub fn new() -> MeshConfig {
        MeshConfig::default()
    }

    pub fn workload(mut self, w: Workload) -> Self {
        self.workloads.push(w);
        self
    }

    pub fn service(mut self, s: Service) -> Self {
        self.services.push(s);
        self
    }

    /// Makes workload `workload` an endpoint of service `service` (all of its ports).
    pub fn endpoint(mut self, workload: &str, service: &str) -> Self {
        let svc = self
            .services
            .iter()
            .find(|s| s.name == service)
            .unwrap_or_else(|| panic!("no service {service}"))
            .clone();
        let w = self
            .workloads
            .iter_mut()
            .find(|w| w.name == workload)
            .unwrap_or_else(|| panic!("no workload {workload}"));
        w.services
            .insert(format!("{}/{}", svc.namespace, svc.hostname()), svc.ports);
        self
    }

    /// Makes workload `workload` an endpoint of service `service` with its own
    /// `{port: targetPort}` map (overriding the service's target ports; an empty map or a 0
    /// target port falls back to the service's).
    pub fn endpoint_ports(mut self, workload: &str, service: &str, ports: &[(u16, u16)]) -> Self {
        let svc = self
            .services
            .iter()
            .find(|s| s.name == service)
            .unwrap_or_else(|| panic!("no service {service}"))
            .clone();
        let w = self
            .workloads
            .iter_mut()
            .find(|w| w.name == workload)
            .unwrap_or_else(|| panic!("no workload {workload}"));
        w.services.insert(
            format!("{}/{}", svc.namespace, svc.hostname()),
            ports.iter().copied().collect(),
        );
        self
    }

    /// Sets `meshConfig.outboundTrafficPolicy.mode: REGISTRY_ONLY`.
    pub fn registry_only(mut self) -> Self {
        self.registry_only = true;
        self
    }

    /// Appends an Istio YAML document (or several, `---` separated) verbatim.
    pub fn document(mut self, yaml: &str) -> Self {
        self.documents.push(yaml.trim().to_string());
        self
    }

    /// The workload named `name`.
    pub fn get_workload(&self, name: &str) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.name == name)
    }

    /// The file text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("workloads:\n");
        for w in &self.workloads {
            w.render(&mut out);
        }
        if self.services.is_empty() {
            out.push_str("services: []\n");
        } else {
            out.push_str("services:\n");
            for s in &self.services {
                s.render(&mut out);
            }
        }
        if self.registry_only {
            out.push_str("meshConfig: {outboundTrafficPolicy: {mode: REGISTRY_ONLY}}\n");
        }
        for d in &self.documents {
            out.push_str("---\n");
            out.push_str(d);
            out.push('\n');
        }
        out
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.render())
    }
}

/// Writes `text` to `path` via a temporary file in the same directory and a rename, so a
/// watcher never sees a half-written file.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))
}

fn ports_map(ports: &BTreeMap<u16, u16>) -> String {
    let v: Vec<String> = ports.iter().map(|(p, t)| format!("{p}: {t}")).collect();
    format!("{{{}}}", v.join(", "))
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn renders_the_documented_shape() {
        let cfg = MeshConfig::new()
            .workload(Workload::hbone("a", "10.244.1.2", "n1").label("app", "client"))
            .workload(Workload::hbone("b", "10.244.2.2", "n2"))
            .service(Service::new("echo", "10.96.0.10").port(8080, 9000))
            .endpoint("b", "echo");
        let text = cfg.render();
        assert!(text.contains("- {uid: a, name: a, namespace: default, serviceAccount: sa-a, workloadIps: [10.244.1.2], protocol: HBONE, node: n1, labels: {\"app\": \"client\"}}"), "{text}");
        assert!(
            text.contains("services: {\"default/echo.default.svc.cluster.local\": {8080: 9000}}}"),
            "{text}"
        );
        assert!(text.contains("- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: [\"/10.96.0.10\"], ports: {8080: 9000}}"), "{text}");
    }

    #[test]
    fn renders_a_service_waypoint() {
        let cfg = MeshConfig::new().service(
            Service::new("echo", "10.96.0.10")
                .port(8080, 9000)
                .waypoint("10.244.2.3", 15006),
        );
        let text = cfg.render();
        assert!(text.contains("ports: {8080: 9000}, waypoint: {destination: \"/10.244.2.3\", hboneMtlsPort: 15006}}"), "{text}");
    }

    #[test]
    fn renders_status_and_own_target_ports() {
        let cfg = MeshConfig::new()
            .workload(Workload::hbone("b", "10.244.2.2", "n2").unhealthy())
            .service(Service::new("echo", "10.96.0.10").port(8080, 9000))
            .endpoint_ports("b", "echo", &[(8080, 9100)]);
        let text = cfg.render();
        assert!(
            text.contains("node: n2, status: Unhealthy, services: {\"default/echo.default.svc.cluster.local\": {8080: 9100}}}"),
            "{text}"
        );
    }
}
