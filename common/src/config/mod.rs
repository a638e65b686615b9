//! Loading configuration into a [`Snapshot`]: a multi-document YAML file whose documents are
//! either the ztunnel local form (`workloads` / `services` / `policies` / `meshConfig`, see
//! [`local`]) or Kubernetes-style resources with `apiVersion`/`kind` (Istio security and
//! Sidecar resources compiled by [`istio`]; VirtualService, DestinationRule and ServiceEntry
//! parsed into the typed L7 model by [`l7`]; Gateways and Kubernetes resources kept verbatim in
//! `Snapshot::other_resources`). Cross-document checks and waypoint resolution live in
//! [`validate`]; hot reloading in [`watch`]. Every error is a [`ConfigError`] naming the file,
//! the document, the resource and the field.
//!
//! Every `apiVersion`/`kind` resource is accepted or rejected alone: a bad one is left out and
//! recorded in `Snapshot::rejected` (file, document, resource, field), and the rest of the file
//! applies. A rejected security resource (AuthorizationPolicy, PeerAuthentication, Sidecar) is
//! replaced by a fail-closed stand-in for the scope that can still be read, so rejecting it
//! never opens a path around policy; the rule is spelled out in the `reject` module. A waypoint binding
//! that cannot be resolved is rejected for its service, which then fails closed
//! ([`waypoints`]). What still fails the whole load (the last good snapshot stays): YAML syntax
//! errors, a document without a readable `apiVersion`/`kind`, a security resource whose
//! namespace cannot be read, and the local form's errors (unknown keys, duplicate IPs, uids,
//! services or VIPs, unresolvable waypoint addresses), except a local policy failing its
//! checks, which is rejected alone with a stand-in.

pub mod assemble;
pub mod istio;
mod kube;
mod l7;
pub mod local;
mod reject;
mod validate;
mod walk;
pub mod watch;
pub mod waypoints;

use crate::model::{Authorization, PeerAuthentication, Service, SidecarScope, Workload};
use crate::snapshot::Snapshot;
use serde_yaml_ng::Value;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

pub use local::MeshConfig;
pub(crate) use watch::release_freed_memory;
pub use watch::{reload_now, spawn_file_watcher, ConfigStore};

/// A configuration error, rendered as
/// `<file>: document <n> (<Kind> <ns>/<name>): <field>: <message>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[error("{}", self.render())]
#[serde(rename_all = "camelCase")]
pub struct ConfigError {
    /// The file (or other source) name.
    pub file: String,
    /// 1-based document index, when the error belongs to one document.
    pub document: Option<usize>,
    /// `<Kind> <ns>/<name>` (or `workload <ns>/<name>` for the local form), when known.
    pub resource: Option<String>,
    /// Path of the offending field, e.g. `spec.rules[0].to[0].operation.ports[0]`.
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    fn render(&self) -> String {
        let mut out = self.file.clone();
        if let Some(doc) = self.document {
            out.push_str(&format!(": document {doc}"));
        }
        if let Some(res) = &self.resource {
            out.push_str(&format!(" ({res})"));
        }
        if let Some(field) = &self.field {
            out.push_str(&format!(": {field}"));
        }
        out.push_str(&format!(": {}", self.message));
        out
    }
}

/// An error inside one document, before the file/document context is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Where a loaded item came from, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub doc: usize,
    /// e.g. `workload default/web` or `AuthorizationPolicy default/deny`.
    pub resource: String,
    /// Field prefix of the item inside its document (`workloads[2]`; empty for resources).
    pub field: String,
}

impl Origin {
    fn field(&self, rest: &str) -> String {
        match (self.field.is_empty(), rest.is_empty()) {
            (true, _) => rest.to_string(),
            (false, true) => self.field.clone(),
            (false, false) => format!("{}.{rest}", self.field),
        }
    }
}

/// Everything collected from the documents, before cross-document validation.
#[derive(Default)]
pub(crate) struct Collected {
    /// (workload, origin, trustDomain written explicitly). Shared, not owned: from the control
    /// plane these are the client's own copies, and only the few the loader changes are cloned.
    pub workloads: Vec<(Arc<Workload>, Origin, bool)>,
    pub services: Vec<(Arc<Service>, Origin)>,
    /// (policy, origin, compiled from an Istio document: scope depends on the root namespace)
    pub policies: Vec<(Authorization, Origin, bool)>,
    pub peer_authentications: Vec<PeerAuthentication>,
    /// (sidecar, outboundTrafficPolicy written explicitly)
    pub sidecars: Vec<(SidecarScope, bool)>,
    pub other_resources: Vec<serde_json::Value>,
    pub mesh: Option<(MeshConfig, usize)>,
    /// VirtualService / DestinationRule / ServiceEntry (parsed) and L7 authorization policies.
    pub l7: crate::l7::Resources,
    /// Resources left out (L7 compile errors are added at the end).
    pub rejected: Vec<ConfigError>,
    /// AuthorizationPolicies attached to waypoints (`targetRefs`): (L4 form, targets, document).
    pub attached_l4: Vec<(Authorization, Vec<crate::l7::attached::PolicyTarget>, usize)>,
    /// Headless selector-less Services and `Endpoints` objects, joined when finished.
    pub headless: Vec<kube::Headless>,
    pub endpoints: Vec<kube::EndpointsObj>,
}

/// How far [`Collected`] had grown before a document, to undo a half-loaded one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mark {
    policies: usize,
    attached_l4: usize,
    peer_authentications: usize,
    sidecars: usize,
    other_resources: usize,
    l7_policies: usize,
    l7_attached: usize,
}

impl Collected {
    pub(crate) fn mark(&self) -> Mark {
        Mark {
            policies: self.policies.len(),
            attached_l4: self.attached_l4.len(),
            peer_authentications: self.peer_authentications.len(),
            sidecars: self.sidecars.len(),
            other_resources: self.other_resources.len(),
            l7_policies: self.l7.authorization_policies.len(),
            l7_attached: self.l7.attached_policies.len(),
        }
    }

    pub(crate) fn rollback(&mut self, m: Mark) {
        self.policies.truncate(m.policies);
        self.attached_l4.truncate(m.attached_l4);
        self.peer_authentications.truncate(m.peer_authentications);
        self.sidecars.truncate(m.sidecars);
        self.other_resources.truncate(m.other_resources);
        self.l7.authorization_policies.truncate(m.l7_policies);
        self.l7.attached_policies.truncate(m.l7_attached);
    }
}

/// Reads and loads a configuration file.
pub fn load_file(path: &Path) -> Result<Snapshot, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: name.clone(),
        document: None,
        resource: None,
        field: None,
        message: format!("cannot read: {e}"),
    })?;
    load_str(&text, &name)
}

/// Loads configuration text; `source` names it in errors.
pub fn load_str(text: &str, source: &str) -> Result<Snapshot, ConfigError> {
    let mut collected = Collected::default();
    for doc in split_documents(text) {
        load_document(&doc, source, &mut collected)?;
    }
    validate::finish(collected, source)
}

/// One YAML document of a stream, with its place in the file.
#[derive(Debug)]
struct Document {
    /// 1-based document index.
    index: usize,
    /// 1-based line number of the document's first line of `text`.
    first_line: usize,
    text: String,
}

fn is_content(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#') && !t.starts_with('%')
}

/// Splits a YAML stream at `---` / `...` markers (which YAML only recognises at column 0).
/// A leading part without content (comments, directives) is not a document.
fn split_documents(text: &str) -> Vec<Document> {
    struct Part {
        first_line: usize,
        text: String,
        explicit: bool,
    }
    let mut parts = vec![Part {
        first_line: 1,
        text: String::new(),
        explicit: false,
    }];
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker =
            |m: &str| bare == m || (bare.starts_with(m) && bare[3..].starts_with([' ', '\t']));
        if marker("---") {
            // Keep what follows the marker (e.g. `--- {a: 1}`), columns preserved.
            let rest = format!("   {}", &line[3..]);
            parts.push(Part {
                first_line: i + 1,
                text: rest,
                explicit: true,
            });
        } else if marker("...") {
            parts.push(Part {
                first_line: i + 2,
                text: String::new(),
                explicit: false,
            });
        } else if let Some(last) = parts.last_mut() {
            last.text.push_str(line);
        }
    }
    parts
        .into_iter()
        .filter(|p| p.explicit || p.text.lines().any(is_content))
        .enumerate()
        .map(|(i, p)| Document {
            index: i + 1,
            first_line: p.first_line,
            text: p.text,
        })
        .collect()
}

/// Turns a YAML (serde_yaml_ng) error inside `doc` into a message whose line numbers count from the start
/// of the file.
fn yaml_message(err: &serde_yaml_ng::Error, doc: &Document) -> String {
    shift_lines(&err.to_string(), doc.first_line - 1)
}

/// Adds `offset` to every `line <n>` in `msg`.
fn shift_lines(msg: &str, offset: usize) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(pos) = rest.find("line ") {
        let (head, tail) = rest.split_at(pos + "line ".len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

fn load_document(doc: &Document, source: &str, out: &mut Collected) -> Result<(), ConfigError> {
    let error = |resource: Option<String>, field: Option<String>, message: String| ConfigError {
        file: source.to_string(),
        document: Some(doc.index),
        resource,
        field,
        message,
    };
    let value: Value =
        serde_yaml_ng::from_str(&doc.text).map_err(|e| error(None, None, yaml_message(&e, doc)))?;
    let map = match &value {
        Value::Null => return Ok(()),
        Value::Mapping(m) => m,
        other => {
            return Err(error(
                None,
                None,
                format!(
                    "expected a mapping (a resource with apiVersion/kind, or workloads/services/policies), found {}",
                    kind_of(other)
                ),
            ))
        }
    };
    if map.get("apiVersion").is_none() && map.get("kind").is_none() {
        return local::load(doc, &value, source, out);
    }
    let api_version = match map.get("apiVersion") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(error(
                None,
                Some("apiVersion".into()),
                format!("expected a string, found {}", kind_of(other)),
            ))
        }
        None => {
            return Err(error(
                None,
                Some("apiVersion".into()),
                "missing (a document with `kind` needs `apiVersion`)".into(),
            ))
        }
    };
    let kind = match map.get("kind") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(error(
                None,
                Some("kind".into()),
                format!("expected a string, found {}", kind_of(other)),
            ))
        }
        None => {
            return Err(error(
                None,
                Some("kind".into()),
                "missing (a document with `apiVersion` needs `kind`)".into(),
            ))
        }
    };
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    if l7::is_l7_kind(group, &kind) {
        l7::load(doc, &api_version, &kind, &value, source, out);
        return Ok(());
    }
    if group.is_empty() && kind == "Endpoints" {
        kube::load_endpoints(doc, &value, source, out);
        return Ok(());
    }
    if group.is_empty() && kind == "Service" {
        kube::note_service(doc, &value, out);
    }
    let mark = out.mark();
    let mut loaded = istio::load(doc.index, &api_version, &kind, &value, out);
    if loaded.is_ok() && group == "security.istio.io" && kind == "AuthorizationPolicy" {
        loaded = l7::load_authorization(doc, &value, out).and_then(|()| unique_policy(out, mark));
    }
    match loaded {
        Ok(()) => {
            attach(out, mark);
            Ok(())
        }
        Err((resource, e)) => {
            out.rollback(mark);
            reject::reject(doc, group, &kind, &value, source, resource, e, out)
        }
    }
}

/// A policy with `targetRefs` just loaded: its L7 form goes with its L4 form to the waypoint
/// (no workload-scoped lookup finds it).
fn attach(out: &mut Collected, mark: Mark) {
    if out.attached_l4.len() == mark.attached_l4 {
        return;
    }
    let (Some((l4, targets, _)), Some(l7)) =
        (out.attached_l4.last(), out.l7.authorization_policies.pop())
    else {
        return;
    };
    out.l7
        .attached_policies
        .push(std::sync::Arc::new(crate::l7::attached::AttachedPolicy {
            targets: targets.clone(),
            l7,
            l4: std::sync::Arc::new(l4.clone()),
        }));
}

/// The policy just loaded must not reuse the `<ns>/<name>` of an earlier one (a second
/// definition would silently replace the first's HTTP rules).
fn unique_policy(out: &Collected, mark: Mark) -> Result<(), (Option<String>, FieldError)> {
    let just_loaded = out.policies[mark.policies..]
        .iter()
        .map(|(a, _, _)| a)
        .chain(
            out.attached_l4[mark.attached_l4..]
                .iter()
                .map(|(a, _, _)| a),
        );
    for new in just_loaded {
        let key = (new.namespace.as_str(), new.name.as_str());
        let earlier = out.policies[..mark.policies]
            .iter()
            .map(|(a, o, _)| (a, o.doc))
            .chain(
                out.attached_l4[..mark.attached_l4]
                    .iter()
                    .map(|(a, _, d)| (a, *d)),
            );
        if let Some((_, doc)) = earlier
            .into_iter()
            .find(|(a, _)| (a.namespace.as_str(), a.name.as_str()) == key)
        {
            return Err((
                Some(format!("AuthorizationPolicy {}/{}", key.0, key.1)),
                FieldError::new(
                    "metadata.name",
                    format!(
                        "authorization policy {}/{} is already defined (document {doc})",
                        key.0, key.1
                    ),
                ),
            ));
        }
    }
    Ok(())
}

/// A short description of a YAML value's type for error messages.
pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests;
