//! The watched Kubernetes objects as the index receives them: [`Object`] (one variant per
//! watched kind: typed k8s-openapi structs for core kinds, small serde structs with only the
//! fields we read for Gateway API kinds, and the verbatim JSON for Istio kinds, which common's
//! loader compiles), [`ObjectRef`] for deletions, and [`Object::from_json`] to turn a JSON
//! object (a fixture document, a `DynamicObject`) into the right variant.

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// Every kind the index consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Node,
    ServiceAccount,
    Pod,
    Service,
    EndpointSlice,
    Gateway,
    GatewayClass,
    VirtualService,
    DestinationRule,
    ServiceEntry,
    Sidecar,
    AuthorizationPolicy,
    PeerAuthentication,
}

impl Kind {
    /// The Istio kinds, with their API group: kept as JSON and compiled by common's loader.
    pub const ISTIO: [(Kind, &'static str); 6] = [
        (Kind::VirtualService, "networking.istio.io"),
        (Kind::DestinationRule, "networking.istio.io"),
        (Kind::ServiceEntry, "networking.istio.io"),
        (Kind::Sidecar, "networking.istio.io"),
        (Kind::AuthorizationPolicy, "security.istio.io"),
        (Kind::PeerAuthentication, "security.istio.io"),
    ];

    /// The Kubernetes `kind` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Gateway => "Gateway",
            Kind::GatewayClass => "GatewayClass",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::Sidecar => "Sidecar",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node | Kind::GatewayClass)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one object (for deletions). `namespace` is empty for cluster-scoped kinds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        ObjectRef {
            kind,
            namespace: if kind.namespaced() {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Object metadata fields the Gateway API structs need.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// `gateway.networking.k8s.io` Gateway (any version), only the fields the index reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Gateway {
    #[serde(default)]
    pub metadata: Meta,
    #[serde(default)]
    pub spec: GatewaySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<serde_json::Value>,
}

/// `gateway.networking.k8s.io` GatewayClass, only the fields the index reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GatewayClass {
    #[serde(default)]
    pub metadata: Meta,
    #[serde(default)]
    pub spec: GatewayClassSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayClassSpec {
    #[serde(default)]
    pub controller_name: String,
}

/// An Istio resource (VirtualService, DestinationRule, ServiceEntry, Sidecar,
/// AuthorizationPolicy, PeerAuthentication) as the API server returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct IstioObject {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// The whole object (`apiVersion`, `kind`, `metadata`, `spec`…).
    pub value: serde_json::Value,
}

/// One watched object.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Box<Namespace>),
    Node(Box<Node>),
    ServiceAccount(Box<ServiceAccount>),
    Pod(Box<Pod>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Gateway(Box<Gateway>),
    GatewayClass(Box<GatewayClass>),
    Istio(Box<IstioObject>),
}

/// Why a JSON object could not become an [`Object`].
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("{api_version} {kind} is not a kind the index watches")]
    Unsupported { api_version: String, kind: String },
    #[error("{kind}: {source}")]
    Invalid {
        kind: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}: metadata.name is missing")]
    NoName(String),
}

fn typed<T: serde::de::DeserializeOwned>(
    kind: &str,
    value: serde_json::Value,
) -> Result<Box<T>, ObjectError> {
    serde_json::from_value(value)
        .map(Box::new)
        .map_err(|source| ObjectError::Invalid {
            kind: kind.to_string(),
            source,
        })
}

fn meta_str<'v>(value: &'v serde_json::Value, key: &str) -> Option<&'v str> {
    value.get("metadata")?.get(key)?.as_str()
}

impl Object {
    /// The kind of a JSON object from its `apiVersion` and `kind`, if the index watches it.
    pub fn kind_of(api_version: &str, kind: &str) -> Option<Kind> {
        let group = api_version.split_once('/').map_or("", |(g, _)| g);
        Some(match (group, kind) {
            ("", "Namespace") => Kind::Namespace,
            ("", "Node") => Kind::Node,
            ("", "ServiceAccount") => Kind::ServiceAccount,
            ("", "Pod") => Kind::Pod,
            ("", "Service") => Kind::Service,
            ("discovery.k8s.io", "EndpointSlice") => Kind::EndpointSlice,
            ("gateway.networking.k8s.io", "Gateway") => Kind::Gateway,
            ("gateway.networking.k8s.io", "GatewayClass") => Kind::GatewayClass,
            _ => Kind::ISTIO
                .iter()
                .find(|(k, g)| *g == group && k.as_str() == kind)
                .map(|(k, _)| *k)?,
        })
    }

    /// Converts a JSON object with `apiVersion` and `kind` into an [`Object`].
    pub fn from_json(value: serde_json::Value) -> Result<Object, ObjectError> {
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let kind_str = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let Some(kind) = Object::kind_of(&api_version, &kind_str) else {
            return Err(ObjectError::Unsupported {
                api_version,
                kind: kind_str,
            });
        };
        Object::from_json_kind(kind, value)
    }

    /// Converts a JSON object already known to be of `kind` (list items may lack
    /// `apiVersion`/`kind`).
    pub fn from_json_kind(kind: Kind, value: serde_json::Value) -> Result<Object, ObjectError> {
        let k = kind.as_str();
        if meta_str(&value, "name").is_none_or(str::is_empty) {
            return Err(ObjectError::NoName(k.to_string()));
        }
        Ok(match kind {
            Kind::Namespace => Object::Namespace(typed(k, value)?),
            Kind::Node => Object::Node(typed(k, value)?),
            Kind::ServiceAccount => Object::ServiceAccount(typed(k, value)?),
            Kind::Pod => Object::Pod(typed(k, value)?),
            Kind::Service => Object::Service(typed(k, value)?),
            Kind::EndpointSlice => Object::EndpointSlice(typed(k, value)?),
            Kind::Gateway => Object::Gateway(typed(k, value)?),
            Kind::GatewayClass => Object::GatewayClass(typed(k, value)?),
            _ => {
                let name = meta_str(&value, "name").unwrap_or_default().to_string();
                let namespace = meta_str(&value, "namespace")
                    .filter(|n| !n.is_empty())
                    .unwrap_or("default")
                    .to_string();
                Object::Istio(Box::new(IstioObject {
                    kind,
                    namespace,
                    name,
                    value,
                }))
            }
        })
    }

    /// The reference that deletes this object again.
    pub fn object_ref(&self) -> ObjectRef {
        fn of(
            kind: Kind,
            m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        ) -> ObjectRef {
            ObjectRef::new(
                kind,
                m.namespace.as_deref().unwrap_or("default"),
                m.name.as_deref().unwrap_or_default(),
            )
        }
        match self {
            Object::Namespace(o) => of(Kind::Namespace, &o.metadata),
            Object::Node(o) => of(Kind::Node, &o.metadata),
            Object::ServiceAccount(o) => of(Kind::ServiceAccount, &o.metadata),
            Object::Pod(o) => of(Kind::Pod, &o.metadata),
            Object::Service(o) => of(Kind::Service, &o.metadata),
            Object::EndpointSlice(o) => of(Kind::EndpointSlice, &o.metadata),
            Object::Gateway(g) => ObjectRef::new(
                Kind::Gateway,
                g.metadata.namespace.as_deref().unwrap_or("default"),
                &g.metadata.name,
            ),
            Object::GatewayClass(g) => ObjectRef::new(Kind::GatewayClass, "", &g.metadata.name),
            Object::Istio(i) => ObjectRef::new(i.kind, &i.namespace, &i.name),
        }
    }
}
