//! The identity a proxy claims on its xDS stream: the `Node` of its first request (id, cluster,
//! metadata such as `NODE_NAME`, `NAME`, `NAMESPACE`, `INSTANCE_IPS`). Claims, not proof: the
//! authenticated caller is [`crate::auth::CallerIdentity`]; both are kept per stream for logs,
//! per-node decisions and authorization.

use common::xds::discovery::Node;
use prost_types::value::Kind;
use std::collections::BTreeMap;

/// What a proxy says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// e.g. `ztunnel~10.0.0.5~ztunnel-abc.istio-system~istio-system.svc.cluster.local`.
    pub id: String,
    /// `Node.cluster` (empty for Istio's ztunnel).
    pub cluster: String,
    /// Metadata; non-string values rendered as JSON.
    pub metadata: BTreeMap<String, String>,
}

fn render(v: &prost_types::Value) -> serde_json::Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), render(v)))
                .collect(),
        ),
        Some(Kind::ListValue(l)) => serde_json::Value::Array(l.values.iter().map(render).collect()),
    }
}

impl NodeInfo {
    /// Reads a request's `Node`.
    pub fn from_proto(n: &Node) -> Self {
        let metadata = n
            .metadata
            .iter()
            .flat_map(|s| s.fields.iter())
            .map(|(k, v)| {
                let s = match render(v) {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k.clone(), s)
            })
            .collect();
        NodeInfo {
            id: n.id.clone(),
            cluster: n.cluster.clone(),
            metadata,
        }
    }

    /// The proxy type: the node id up to the first `~` (`ztunnel`, `waypoint`, `sidecar`).
    pub fn proxy_type(&self) -> &str {
        self.id.split('~').next().unwrap_or_default()
    }

    fn meta(&self, k: &str) -> Option<&str> {
        self.metadata
            .get(k)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// `NODE_NAME`: the Kubernetes node the proxy runs on.
    pub fn node_name(&self) -> Option<&str> {
        self.meta("NODE_NAME")
    }

    /// `NAME`: the proxy's pod name.
    pub fn pod_name(&self) -> Option<&str> {
        self.meta("NAME")
    }

    /// `NAMESPACE`: the proxy's pod namespace.
    pub fn namespace(&self) -> Option<&str> {
        self.meta("NAMESPACE")
    }

    /// `INSTANCE_IPS`, comma separated.
    pub fn instance_ips(&self) -> Vec<&str> {
        self.meta("INSTANCE_IPS")
            .map(|s| {
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> prost_types::Value {
        prost_types::Value {
            kind: Some(Kind::StringValue(v.into())),
        }
    }

    #[test]
    fn reads_istio_ztunnel_node() {
        let mut fields = BTreeMap::new();
        fields.insert("NAME".to_string(), s("ztunnel-x"));
        fields.insert("NAMESPACE".to_string(), s("istio-system"));
        fields.insert("NODE_NAME".to_string(), s("node1"));
        fields.insert("INSTANCE_IPS".to_string(), s("10.0.0.5,fd00::5"));
        fields.insert("EMPTY".to_string(), s(""));
        fields.insert(
            "N".to_string(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(3.0)),
            },
        );
        let n = NodeInfo::from_proto(&Node {
            id: "ztunnel~10.0.0.5~ztunnel-x.istio-system~istio-system.svc.cluster.local".into(),
            cluster: String::new(),
            metadata: Some(prost_types::Struct {
                fields: fields.into_iter().collect(),
            }),
            build_version: String::new(),
        });
        assert_eq!(n.proxy_type(), "ztunnel");
        assert_eq!(n.node_name(), Some("node1"));
        assert_eq!(n.pod_name(), Some("ztunnel-x"));
        assert_eq!(n.namespace(), Some("istio-system"));
        assert_eq!(n.instance_ips(), vec!["10.0.0.5", "fd00::5"]);
        assert_eq!(n.metadata["N"], "3.0");
        assert_eq!(n.meta("EMPTY"), None);
    }
}
