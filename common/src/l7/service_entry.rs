//! The Istio `ServiceEntry` spec as serde types (hosts, addresses, ports, location, resolution,
//! endpoints, workload selector) and its validation. Validated entries are kept in the snapshot
//! for the waypoint and `/config_dump`; [`crate::service_entries`] turns them into registry
//! services.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub location: Location,
    #[serde(default)]
    pub resolution: Resolution,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntry>,
    #[serde(default)]
    pub workload_selector: Option<EntrySelector>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

/// `workloadSelector` of a ServiceEntry (Istio's networking `WorkloadSelector`: `labels`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntrySelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub number: u16,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub target_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    #[default]
    MeshExternal,
    MeshInternal,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    #[default]
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntry {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub service_account: Option<String>,
}

/// A validated ServiceEntry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    pub spec: ServiceEntrySpec,
    /// `metadata.labels` (`istio.io/use-waypoint` binds the entry's hosts to a waypoint).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations` (from the controller: the waypoint it bound the entry to).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// 1-based document index in its file (0 when not from a file), for rejections.
    #[serde(skip)]
    pub document: usize,
}

impl ServiceEntry {
    /// Whether this entry declares `host` (exact, or under one of its `*.` wildcards).
    pub fn covers(&self, host: &str) -> bool {
        self.spec
            .hosts
            .iter()
            .any(|h| super::compile::host_matches(h, host))
    }
}

fn is_dns_name(s: &str) -> bool {
    let s = s.strip_prefix("*.").unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Validates a ServiceEntry spec with Istio's rules; errors are `(field path, message)`.
pub fn validate(spec: &ServiceEntrySpec) -> Result<(), (String, String)> {
    if spec.hosts.is_empty() {
        return Err(("spec.hosts".into(), "at least one host is required".into()));
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        let path = format!("spec.hosts[{i}]");
        if h == "*" {
            return Err((
                path,
                "\"*\" is not allowed; use a domain such as \"*.example.com\"".into(),
            ));
        }
        if !is_dns_name(h) {
            return Err((path, format!("{h:?} is not a valid host name")));
        }
    }
    for (i, a) in spec.addresses.iter().enumerate() {
        if a.parse::<IpAddr>().is_err() && a.parse::<ipnet::IpNet>().is_err() {
            return Err((
                format!("spec.addresses[{i}]"),
                format!("{a:?} is not an IP address or CIDR block"),
            ));
        }
    }
    let mut numbers = BTreeSet::new();
    let mut names = BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        if p.number == 0 {
            return Err((format!("{path}.number"), "0 is not a port number".into()));
        }
        if !numbers.insert(p.number) {
            return Err((
                format!("{path}.number"),
                format!("port {} is listed twice", p.number),
            ));
        }
        if let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) {
            if !names.insert(name) {
                return Err((
                    format!("{path}.name"),
                    format!("port name {name:?} is used twice"),
                ));
            }
        }
        if p.target_port == Some(0) {
            return Err((
                format!("{path}.targetPort"),
                "0 is not a port number".into(),
            ));
        }
    }
    if spec.workload_selector.is_some() && !spec.endpoints.is_empty() {
        return Err((
            "spec.workloadSelector".into(),
            "cannot be combined with endpoints".into(),
        ));
    }
    if spec.resolution == Resolution::None && !spec.endpoints.is_empty() {
        return Err((
            "spec.endpoints".into(),
            "must be empty with resolution NONE".into(),
        ));
    }
    if matches!(spec.resolution, Resolution::Dns | Resolution::DnsRoundRobin)
        && spec.endpoints.is_empty()
        && spec.hosts.iter().any(|h| h.starts_with('*'))
    {
        return Err((
            "spec.hosts".into(),
            "wildcard hosts need endpoints with resolution DNS".into(),
        ));
    }
    for (i, ep) in spec.endpoints.iter().enumerate() {
        let path = format!("spec.endpoints[{i}]");
        let address = ep.address.as_deref().unwrap_or("");
        match spec.resolution {
            Resolution::Static => {
                if address.parse::<IpAddr>().is_err() && !address.starts_with("unix://") {
                    return Err((
                        format!("{path}.address"),
                        format!("{address:?} is not an IP address (resolution STATIC)"),
                    ));
                }
            }
            _ => {
                if address.parse::<IpAddr>().is_err() && !is_dns_name(address) {
                    return Err((
                        format!("{path}.address"),
                        format!("{address:?} is not a host name or IP address"),
                    ));
                }
            }
        }
        for name in ep.ports.keys() {
            if !spec
                .ports
                .iter()
                .any(|p| p.name.as_deref() == Some(name.as_str()))
            {
                return Err((
                    format!("{path}.ports.{name}"),
                    "names no port of the entry (spec.ports[].name)".to_string(),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(yaml: &str) -> Result<(), String> {
        let spec: ServiceEntrySpec = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        validate(&spec).map_err(|(f, m)| format!("{f}: {m}"))
    }

    #[test]
    fn valid_entries() {
        check("{hosts: [www.googleapis.com], ports: [{number: 443, name: https, protocol: HTTPS}], resolution: DNS}").expect("dns");
        check("{hosts: [external-db], ports: [{number: 3306, name: tcp, protocol: TCP}], location: MESH_EXTERNAL, resolution: STATIC}").expect("static without endpoints");
        check("{hosts: [db.example.com], addresses: [10.1.0.0/16], resolution: STATIC, ports: [{number: 5432, name: pg}], endpoints: [{address: 10.1.2.3, ports: {pg: 15432}, labels: {v: a}}]}").expect("static");
    }

    #[test]
    fn invalid_entries_name_the_field() {
        assert_eq!(
            check("{ports: []}").unwrap_err(),
            "spec.hosts: at least one host is required"
        );
        assert!(check("{hosts: [\"*\"]}")
            .unwrap_err()
            .starts_with("spec.hosts[0]:"));
        assert!(check("{hosts: [a.com], addresses: [nope]}")
            .unwrap_err()
            .starts_with("spec.addresses[0]:"));
        assert!(
            check("{hosts: [a.com], ports: [{number: 80}, {number: 80}]}")
                .unwrap_err()
                .starts_with("spec.ports[1].number: port 80 is listed twice")
        );
        assert!(
            check("{hosts: [a.com], resolution: STATIC, endpoints: [{address: a.com}]}")
                .unwrap_err()
                .starts_with("spec.endpoints[0].address:")
        );
        assert!(check("{hosts: [a.com], endpoints: [{address: 1.2.3.4}]}")
            .unwrap_err()
            .starts_with("spec.endpoints: must be empty with resolution NONE"));
        assert!(check("{hosts: [a.com], resolution: DNS, ports: [{number: 80, name: http}], endpoints: [{address: b.com, ports: {web: 8080}}]}").unwrap_err().starts_with("spec.endpoints[0].ports.web:"));
        let e = check("{hosts: [a.com], resolution: MAGIC}").unwrap_err();
        assert!(e.starts_with("resolution: unknown variant `MAGIC`"), "{e}");
    }

    #[test]
    fn covers_exact_and_wildcard_hosts() {
        let se = ServiceEntry {
            name: "x".into(),
            namespace: "default".into(),
            spec: serde_yaml_ng::from_str("{hosts: [a.example.com, \"*.svc.example.com\"]}")
                .expect("spec"),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            document: 0,
        };
        assert!(se.covers("a.example.com"));
        assert!(se.covers("x.svc.example.com"));
        assert!(!se.covers("svc.example.com"));
        assert!(!se.covers("b.example.com"));
    }
}
