//! The Gateway as the waypoint controller reads it (any served version of
//! `gateway.networking.k8s.io` Gateway), which classes are ours, and the names, labels and
//! owner reference of the objects made for it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{ApiResource, GroupVersionKind};
use serde::Deserialize;
use std::collections::BTreeMap;

pub use crate::gateway_class::{Form, CONTROLLER_NAME, EARLY_CLASS, WAYPOINT_CLASS};
/// Label marking objects this controller manages, with Istio's value for its mesh controller
/// (so objects istiod created for a waypoint are recognised as managed, and vice versa).
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
pub const MANAGED_VALUE: &str = "istio.io-mesh-controller";
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
pub const GATEWAY_CLASS_LABEL: &str = "gateway.networking.k8s.io/gateway-class-name";
/// Istio's older gateway-name label, still read by tooling.
pub const ISTIO_GATEWAY_NAME_LABEL: &str = "istio.io/gateway-name";
/// Early form: the service account whose workloads the waypoint serves (and runs as).
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "istio.io/service-account";
/// Istio's overrides of the waypoint's service account and of the other objects' name.
pub const GATEWAY_SERVICE_ACCOUNT_ANNOTATION: &str = "gateway.istio.io/service-account";
pub const NAME_OVERRIDE_ANNOTATION: &str = "gateway.istio.io/name-override";

/// The API resource of Gateways as this controller reads and writes them.
pub fn gateway_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"),
        "gateways",
    )
}

/// The API resource of GatewayClasses.
pub fn gateway_class_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "GatewayClass"),
        "gatewayclasses",
    )
}

/// `spec.controllerName` of a GatewayClass object.
pub fn class_controller(c: &kube::api::DynamicObject) -> Option<String> {
    c.data
        .get("spec")
        .and_then(|s| s.get("controllerName"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

/// A Gateway, only the fields we read.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Gateway {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
    #[serde(default)]
    pub status: Option<serde_json::Value>,
    /// `controllerName` of the Gateway's GatewayClass, when that object is known (not part
    /// of the Gateway: filled in by whoever holds the classes).
    #[serde(skip)]
    pub class_controller: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub infrastructure: Option<Infrastructure>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Listener {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub port: i64,
    #[serde(default)]
    pub protocol: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Infrastructure {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub parameters_ref: Option<ParametersRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ParametersRef {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
}

/// Errors of a Gateway we cannot make objects for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidGateway(pub String);

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

impl Gateway {
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    pub fn metadata_annotations(&self) -> BTreeMap<String, String> {
        self.metadata.annotations.clone().unwrap_or_default()
    }

    fn annotation(&self, k: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()?
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Ours (and which form), or None for any other class (see [`crate::gateway_class`]).
    pub fn form(&self) -> Option<Form> {
        crate::gateway_class::waypoint_form(
            &self.spec.gateway_class_name,
            self.class_controller.as_deref(),
        )
    }

    /// Name of the Deployment, Service, HPA and PDB.
    pub fn deployment_name(&self) -> Result<String, InvalidGateway> {
        let name = match (self.annotation(NAME_OVERRIDE_ANNOTATION), self.form()) {
            (Some(n), _) => n.to_string(),
            (None, Some(Form::Early)) => format!("{}-waypoint", self.name()),
            (None, _) => self.name().to_string(),
        };
        if is_dns_label(&name) {
            Ok(name)
        } else {
            Err(InvalidGateway(format!(
                "object name {name:?} is not a DNS label (lower-case letters, digits and '-', at most 63 characters, starting with a letter){}",
                if self.annotation(NAME_OVERRIDE_ANNOTATION).is_some() {
                    format!(" (annotation {NAME_OVERRIDE_ANNOTATION})")
                } else {
                    String::new()
                }
            )))
        }
    }

    /// The service account the waypoint pods run as (its identity), and whether it belongs to
    /// the user (the early form's served account: used as is when it exists unlabelled).
    pub fn service_account(&self) -> Result<(String, bool), InvalidGateway> {
        let (name, users) = match (
            self.form(),
            self.annotation(SERVICE_ACCOUNT_ANNOTATION),
            self.annotation(GATEWAY_SERVICE_ACCOUNT_ANNOTATION),
        ) {
            (Some(Form::Early), Some(sa), _) => (sa.to_string(), true),
            (_, _, Some(sa)) => (sa.to_string(), false),
            _ => (self.name().to_string(), false),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && part.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && part.ends_with(|c: char| c.is_ascii_alphanumeric())
            });
        if valid {
            Ok((name, users))
        } else {
            Err(InvalidGateway(format!(
                "service account name {name:?} is not a valid object name"
            )))
        }
    }

    /// Labels on every object (and the pods): the Gateway's own labels (without
    /// `gateway.networking.k8s.io/` keys), `spec.infrastructure.labels`, then ours.
    pub fn object_labels(&self) -> Result<BTreeMap<String, String>, InvalidGateway> {
        let name = self.name();
        if name.len() > 63 {
            return Err(InvalidGateway(format!(
                "Gateway name {name:?} is longer than 63 characters and cannot be a label value"
            )));
        }
        let mut labels: BTreeMap<String, String> = self
            .metadata
            .labels
            .iter()
            .flatten()
            .filter(|(k, _)| !k.starts_with("gateway.networking.k8s.io/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(infra) = &self.spec.infrastructure {
            labels.extend(infra.labels.clone());
        }
        labels.insert(GATEWAY_NAME_LABEL.into(), name.into());
        labels.insert(ISTIO_GATEWAY_NAME_LABEL.into(), name.into());
        labels.insert(
            GATEWAY_CLASS_LABEL.into(),
            self.spec.gateway_class_name.clone(),
        );
        labels.insert(MANAGED_LABEL.into(), MANAGED_VALUE.into());
        Ok(labels)
    }

    /// Annotations on every object: `spec.infrastructure.annotations`.
    pub fn object_annotations(&self) -> BTreeMap<String, String> {
        self.spec
            .infrastructure
            .as_ref()
            .map(|i| i.annotations.clone())
            .unwrap_or_default()
    }

    /// The controller owner reference every object carries.
    pub fn owner_reference(&self) -> Result<OwnerReference, InvalidGateway> {
        let uid = self
            .metadata
            .uid
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| InvalidGateway("the Gateway has no uid".into()))?;
        Ok(OwnerReference {
            api_version: "gateway.networking.k8s.io/v1".into(),
            kind: "Gateway".into(),
            name: self.name().into(),
            uid,
            controller: Some(true),
            block_owner_deletion: Some(true),
        })
    }

    /// `observedGeneration` for status conditions.
    pub fn generation(&self) -> i64 {
        self.metadata.generation.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gw(v: serde_json::Value) -> Gateway {
        serde_json::from_value(v).expect("gateway")
    }

    #[test]
    fn names_per_form() {
        let seed: Gateway = serde_yaml_ng::from_str(
            "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: Gateway\nmetadata:\n  name: productpage\n  annotations:\n    istio.io/service-account: bookinfo-productpage\nspec:\n  gatewayClassName: istio-mesh\n",
        )
        .expect("seed form");
        assert_eq!(seed.form(), Some(Form::Early));
        assert_eq!(
            seed.deployment_name().as_deref(),
            Ok("productpage-waypoint")
        );
        assert_eq!(
            seed.service_account(),
            Ok(("bookinfo-productpage".to_string(), true))
        );
        let canonical = gw(json!({"metadata": {"name": "wp", "namespace": "a"},
            "spec": {"gatewayClassName": "istio-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}));
        assert_eq!(canonical.form(), Some(Form::Canonical));
        assert_eq!(canonical.deployment_name().as_deref(), Ok("wp"));
        assert_eq!(canonical.service_account(), Ok(("wp".to_string(), false)));
        let overridden = gw(json!({"metadata": {"name": "wp", "annotations": {
            NAME_OVERRIDE_ANNOTATION: "other", GATEWAY_SERVICE_ACCOUNT_ANNOTATION: "sa1"}},
            "spec": {"gatewayClassName": "istio-waypoint"}}));
        assert_eq!(overridden.deployment_name().as_deref(), Ok("other"));
        assert_eq!(overridden.service_account(), Ok(("sa1".to_string(), false)));
        let bad = gw(
            json!({"metadata": {"name": "wp", "annotations": {NAME_OVERRIDE_ANNOTATION: "Bad_Name"}},
            "spec": {"gatewayClassName": "istio-waypoint"}}),
        );
        assert!(bad.deployment_name().is_err());
        let other = gw(json!({"metadata": {"name": "x"}, "spec": {"gatewayClassName": "istio"}}));
        assert_eq!(other.form(), None);
    }

    #[test]
    fn labels_drop_reserved_keys_and_add_ours() {
        let g = gw(json!({"metadata": {"name": "wp", "labels": {"team": "a",
            "gateway.networking.k8s.io/gateway-name": "spoof", "istio.io/waypoint-for": "all"}},
            "spec": {"gatewayClassName": "istio-waypoint", "infrastructure": {"labels": {"team": "b"}}}}));
        let l = g.object_labels().expect("labels");
        assert_eq!(l.get("team").map(String::as_str), Some("b"));
        assert_eq!(l.get(GATEWAY_NAME_LABEL).map(String::as_str), Some("wp"));
        assert_eq!(
            l.get(ISTIO_GATEWAY_NAME_LABEL).map(String::as_str),
            Some("wp")
        );
        assert_eq!(
            l.get(GATEWAY_CLASS_LABEL).map(String::as_str),
            Some("istio-waypoint")
        );
        assert_eq!(
            l.get(MANAGED_LABEL).map(String::as_str),
            Some(MANAGED_VALUE)
        );
        assert_eq!(
            l.get("istio.io/waypoint-for").map(String::as_str),
            Some("all")
        );
    }
}
