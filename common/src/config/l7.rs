//! Loading the L7 kinds: networking.istio.io `VirtualService`, `DestinationRule` and
//! `ServiceEntry` documents are parsed into the typed model of [`crate::l7`] and compiled when
//! the file is finished. Unlike every other kind they are rejected one by one: a resource that
//! fails to parse or compile is left out and recorded in `Snapshot::rejected` (and logged), and
//! the rest of the file still applies (the rule is spelled out in [`crate::l7`]).
//! AuthorizationPolicy documents, already compiled for L4 by [`super::istio`], are also compiled
//! to their L7 form here; their errors reject the policy like an L4 error (see
//! [`super::reject`]).

use super::{Collected, ConfigError, Document, FieldError};
use crate::l7::policy::{compile_policy, AuthorizationPolicySpec};
use crate::l7::spec::Resource;
use crate::l7::{self, L7Config, Named};
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Whether `(group, kind)` is loaded here rather than by [`super::istio`].
pub(super) fn is_l7_kind(group: &str, kind: &str) -> bool {
    group == "networking.istio.io"
        && matches!(kind, "VirtualService" | "DestinationRule" | "ServiceEntry")
}

/// Splits a YAML (serde_yaml_ng) message `path: message at line L column C` into field and message.
fn split_yaml_error(msg: &str) -> (Option<String>, String) {
    match msg.split_once(": ") {
        Some((path, rest)) if !path.is_empty() && !path.contains([' ', '`', '"']) => {
            (Some(path.to_string()), rest.to_string())
        }
        _ => (None, msg.to_string()),
    }
}

/// `metadata.name` / `metadata.namespace` of an already parsed document.
fn identity(value: &Value) -> (Option<String>, String) {
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
        .to_string();
    (name, namespace)
}

/// `metadata.labels` of a document (string values only).
pub(super) fn metadata_labels(value: &Value) -> BTreeMap<String, String> {
    metadata_map(value, "labels")
}

/// `metadata.<field>` of a document as a string map (string values only).
fn metadata_map(value: &Value, field: &str) -> BTreeMap<String, String> {
    value
        .get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_mapping)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn parse<S: DeserializeOwned + Default>(
    doc: &Document,
    value: &Value,
    name: String,
    namespace: String,
) -> Result<Named<S>, (Option<String>, String)> {
    match serde_yaml_ng::from_str::<Resource<S>>(&doc.text) {
        Ok(r) => Ok(Named {
            name,
            namespace,
            document: doc.index,
            labels: metadata_labels(value),
            annotations: metadata_map(value, "annotations"),
            spec: r.spec.unwrap_or_default(),
        }),
        Err(e) => Err(split_yaml_error(&super::yaml_message(&e, doc))),
    }
}

/// Loads one L7 document; problems are recorded as rejections, never returned.
pub(super) fn load(
    doc: &Document,
    api_version: &str,
    kind: &str,
    value: &Value,
    source: &str,
    out: &mut Collected,
) {
    let (name, namespace) = identity(value);
    let resource = match &name {
        Some(n) => format!("{kind} {namespace}/{n}"),
        None => kind.to_string(),
    };
    let rejection = |field: Option<String>, message: String| ConfigError {
        file: source.to_string(),
        document: Some(doc.index),
        resource: Some(resource.clone()),
        field,
        message,
    };
    let version = api_version.split_once('/').map_or("", |(_, v)| v);
    if !matches!(version, "v1alpha3" | "v1beta1" | "v1") {
        let message = format!(
            "unsupported version {api_version:?} (use networking.istio.io/v1, v1beta1 or v1alpha3)"
        );
        out.rejected
            .push(rejection(Some("apiVersion".into()), message));
        return;
    }
    let Some(name) = name else {
        out.rejected
            .push(rejection(Some("metadata.name".into()), "missing".into()));
        return;
    };
    let (n, ns) = (name.clone(), namespace.clone());
    let parsed = match kind {
        "VirtualService" => parse(doc, value, n, ns).map(|r| out.l7.virtual_services.push(r)),
        "DestinationRule" => parse(doc, value, n, ns).map(|r| out.l7.destination_rules.push(r)),
        _ => parse(doc, value, n, ns).map(|r| out.l7.service_entries.push(r)),
    };
    let Err((field, message)) = parsed else {
        return;
    };
    out.rejected.push(rejection(field, message));
    let host = value
        .get("spec")
        .and_then(|s| s.get("host"))
        .and_then(Value::as_str);
    if let (Some(host), "DestinationRule") = (host, kind) {
        out.l7.rejected_destination_rules.push(Named {
            name,
            namespace,
            document: doc.index,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            spec: host.to_string(),
        });
    }
}

/// Compiles the L7 form of an AuthorizationPolicy document the L4 compile accepted; an error
/// carries the resource label and the field.
pub(super) fn load_authorization(
    doc: &Document,
    value: &Value,
    out: &mut Collected,
) -> Result<(), (Option<String>, FieldError)> {
    let (name, namespace) = identity(value);
    let name = name.unwrap_or_default();
    let resource = Some(format!("AuthorizationPolicy {namespace}/{name}"));
    let error = |field: Option<String>, message: String| {
        (
            resource.clone(),
            FieldError::new(field.unwrap_or_default(), message),
        )
    };
    let parsed: Resource<AuthorizationPolicySpec> =
        serde_yaml_ng::from_str(&doc.text).map_err(|e| {
            let (field, message) = split_yaml_error(&super::yaml_message(&e, doc));
            error(field, message)
        })?;
    let spec = parsed.spec.unwrap_or_default();
    let policy = compile_policy(&spec, &name, &namespace).map_err(|(f, m)| error(Some(f), m))?;
    out.l7.authorization_policies.push(Arc::new(policy));
    Ok(())
}

/// Compiles the collected L7 resources; compile-time rejections are appended to `rejected`,
/// and every rejection is logged.
pub(super) fn finish(
    resources: l7::Resources,
    rejected: &mut Vec<ConfigError>,
    source: &str,
) -> L7Config {
    let (config, compile_rejected) = l7::compile(resources, l7::DEFAULT_DOMAIN_SUFFIX);
    rejected.extend(compile_rejected.into_iter().map(|r| ConfigError {
        file: source.to_string(),
        document: Some(r.document).filter(|d| *d != 0),
        resource: Some(r.resource()),
        field: Some(r.field).filter(|f| !f.is_empty()),
        message: r.message,
    }));
    for e in rejected.iter() {
        tracing::warn!("rejected, the rest of the configuration applies: {e}");
    }
    config
}

#[cfg(test)]
mod tests {
    use super::split_yaml_error;

    #[test]
    fn yaml_errors_split_into_field_and_message() {
        assert_eq!(
            split_yaml_error("spec.http[0]: unknown field `x`, expected `y` at line 3 column 5"),
            (
                Some("spec.http[0]".to_string()),
                "unknown field `x`, expected `y` at line 3 column 5".to_string()
            )
        );
        assert_eq!(
            split_yaml_error("invalid type: string \"x\", expected a map"),
            (
                None,
                "invalid type: string \"x\", expected a map".to_string()
            )
        );
        assert_eq!(split_yaml_error("unknown field `specs`: x").0, None);
    }
}
