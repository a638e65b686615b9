//! Istio resources through common's own loader (`common::config::load_str`, the same code the
//! proxies run on a local file), so a resource means the same from the cluster as from YAML:
//!
//! * `AuthorizationPolicy` → a model `Authorization` (`<ns>/<name>`; scope GLOBAL in the root
//!   namespace, NAMESPACE, or WORKLOAD_SELECTOR — selected workloads list it in their
//!   `authorizationPolicies`). One with L7 rules is also kept as a config resource for the
//!   waypoint. A policy that does not compile is replaced by a **DENY-all for its scope**
//!   (its selector if readable, else its namespace, or the mesh in the root namespace): a
//!   broken policy never opens access.
//! * `PeerAuthentication`, `Sidecar` → config resources (`<Kind>/<ns>/<name>`, the original
//!   JSON). A broken one is replaced by a stand-in that fails closed: STRICT mTLS, or a
//!   REGISTRY_ONLY Sidecar, for its scope (the proxies' loader rejects a whole file for one bad
//!   security resource, so the original is never shipped).
//! * `VirtualService`, `DestinationRule`, `ServiceEntry` → config resources as they are (the
//!   proxies reject bad ones one by one); all of them are compiled together after each change
//!   to list rejections (a VirtualService's subsets depend on DestinationRules).
//!
//! Not done: istiod's conversion of a STRICT PeerAuthentication into an Authorization (DENY
//! non-mTLS) for Istio's ztunnel; our ztunnel reads the PeerAuthentication itself.

use super::objects::{IstioObject, Kind};
use super::{IndexConfig, Key};
use common::model::{Authorization, PolicyAction, PolicyScope, Rule};
use common::snapshot::{selector_matches, Snapshot};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// What one Istio object change does to the outputs.
#[derive(Debug, Default)]
pub(crate) struct Effect {
    /// The Authorization for `<ns>/<name>` (AuthorizationPolicy only; `None` removes it).
    pub authorization: Option<Authorization>,
    /// Config resources to upsert (`Some`) or remove (`None`).
    pub configs: Vec<(String, Option<Value>)>,
    /// A WORKLOAD_SELECTOR policy's selector changed: workloads' lists must be recomputed.
    pub selector_changed: bool,
}

/// The Istio objects, their compiled selector policies and rejections.
#[derive(Debug)]
pub struct Policies {
    root_namespace: String,
    trust_domain: String,
    objects: BTreeMap<(Kind, Key), Value>,
    /// WORKLOAD_SELECTOR authorizations (compiled or stand-in) by `(ns, name)`.
    selectors: BTreeMap<Key, BTreeMap<String, String>>,
    rejections: BTreeMap<String, String>,
}

pub(crate) fn config_key(kind: Kind, key: &Key) -> String {
    format!("{kind}/{}/{}", key.0, key.1)
}

fn is_l7_kind(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::VirtualService | Kind::DestinationRule | Kind::ServiceEntry
    )
}

/// `spec.<field>.<labels_key>` as string labels; `Err` when present but unreadable.
fn read_selector(
    value: &Value,
    field: &str,
    labels_key: &str,
) -> Result<BTreeMap<String, String>, ()> {
    let Some(sel) = value.get("spec").and_then(|s| s.get(field)) else {
        return Ok(BTreeMap::new());
    };
    let Some(labels) = sel.get(labels_key) else {
        return Ok(BTreeMap::new());
    };
    let map = labels.as_object().ok_or(())?;
    map.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_str().ok_or(())?.to_string())))
        .collect()
}

impl Policies {
    pub(crate) fn new(cfg: &IndexConfig) -> Self {
        Policies {
            root_namespace: cfg.root_namespace.clone(),
            trust_domain: cfg.trust_domain.clone(),
            objects: BTreeMap::new(),
            selectors: BTreeMap::new(),
            rejections: BTreeMap::new(),
        }
    }

    pub(crate) fn rejections(&self) -> &BTreeMap<String, String> {
        &self.rejections
    }

    /// The stored object `kind` `key`, as the API server sent it.
    pub(crate) fn stored(&self, kind: Kind, key: &Key) -> Option<&Value> {
        self.objects.get(&(kind, key.clone()))
    }

    /// The stored objects of `kind`.
    pub(crate) fn all_of(&self, kind: Kind) -> impl Iterator<Item = (&Key, &Value)> {
        self.objects
            .iter()
            .filter(move |((k, _), _)| *k == kind)
            .map(|((_, key), v)| (key, v))
    }

    /// Keys of the stored objects of `kind` in namespace `ns`.
    pub(crate) fn keys_in(&self, kind: Kind, ns: &str) -> Vec<Key> {
        self.objects
            .keys()
            .filter(|(k, (n, _))| *k == kind && n == ns)
            .map(|(_, key)| key.clone())
            .collect()
    }

    /// The object behind a rejection key `<Kind>/<ns>/<name>`, as last applied.
    pub(crate) fn object(&self, key: &str) -> Option<&Value> {
        let mut parts = key.splitn(3, '/');
        let (kind, ns, name) = (parts.next()?, parts.next()?, parts.next()?);
        let (kind, _) = Kind::ISTIO.iter().find(|(k, _)| k.as_str() == kind)?;
        self.stored(*kind, &(ns.to_string(), name.to_string()))
    }

    /// The mesh settings document put in front of every compile.
    fn mesh_document(&self) -> String {
        format!(
            "meshConfig: {{rootNamespace: {}, trustDomain: {}}}\n",
            Value::from(self.root_namespace.as_str()),
            Value::from(self.trust_domain.as_str())
        )
    }

    /// Compiles documents with common's loader.
    fn compile(&self, objects: &[&Value], source: &str) -> Result<Snapshot, String> {
        let mut text = self.mesh_document();
        for o in objects {
            text.push_str("---\n");
            text.push_str(&o.to_string());
            text.push('\n');
        }
        common::config::load_str(&text, source).map_err(|e| match e.field {
            Some(f) => format!("{f}: {}", e.message),
            None => e.message,
        })
    }

    /// Compiles one security object; the L7 kinds' own rejections count as errors too.
    fn compile_one(&self, value: &Value, source: &str) -> Result<Snapshot, String> {
        let snap = self.compile(&[value], source)?;
        match snap.rejected.first() {
            Some(r) => Err(match &r.field {
                Some(f) => format!("{f}: {}", r.message),
                None => r.message.clone(),
            }),
            None => Ok(snap),
        }
    }

    pub(crate) fn apply(&mut self, obj: IstioObject) -> Effect {
        let key = (obj.namespace.clone(), obj.name.clone());
        let ckey = config_key(obj.kind, &key);
        if self.objects.get(&(obj.kind, key.clone())) == Some(&obj.value) {
            return Effect::default();
        }
        self.objects
            .insert((obj.kind, key.clone()), obj.value.clone());
        let source = format!("{} {}/{}", obj.kind, key.0, key.1);
        let mut effect = Effect::default();
        match obj.kind {
            Kind::AuthorizationPolicy => {
                let (auth, l7) = match self.compile_one(&obj.value, &source) {
                    Ok(snap) => match snap.authorizations.first() {
                        Some(a) => {
                            self.rejections.remove(&ckey);
                            ((**a).clone(), a.has_l7_rules)
                        }
                        None => (
                            self.reject_policy(&ckey, &obj, "compiled to nothing".into()),
                            false,
                        ),
                    },
                    Err(reason) => (self.reject_policy(&ckey, &obj, reason), false),
                };
                effect.selector_changed = self.set_selector(&key, &auth);
                effect.configs.push((ckey, l7.then(|| obj.value.clone())));
                effect.authorization = Some(auth);
            }
            Kind::PeerAuthentication | Kind::Sidecar => {
                let value = match self.compile_one(&obj.value, &source) {
                    Ok(_) => {
                        self.rejections.remove(&ckey);
                        obj.value.clone()
                    }
                    Err(reason) => {
                        tracing::warn!(resource = %source, %reason, "rejected; a fail-closed stand-in applies");
                        self.rejections.insert(ckey.clone(), reason);
                        stand_in(&obj)
                    }
                };
                effect.configs.push((ckey, Some(value)));
            }
            _ => {
                effect.configs.push((ckey, Some(obj.value.clone())));
                self.relist_l7_rejections();
            }
        }
        effect
    }

    pub(crate) fn delete(&mut self, kind: Kind, key: &Key) -> Effect {
        let mut effect = Effect::default();
        if self.objects.remove(&(kind, key.clone())).is_none() {
            return effect;
        }
        let ckey = config_key(kind, key);
        self.rejections.remove(&ckey);
        effect.configs.push((ckey, None));
        if kind == Kind::AuthorizationPolicy {
            effect.selector_changed = self.selectors.remove(key).is_some();
        }
        if is_l7_kind(kind) {
            self.relist_l7_rejections();
        }
        effect
    }

    fn set_selector(&mut self, key: &Key, auth: &Authorization) -> bool {
        let new = (auth.scope == PolicyScope::WorkloadSelector).then(|| auth.selector.clone());
        let old = match &new {
            Some(sel) => self.selectors.insert(key.clone(), sel.clone()),
            None => self.selectors.remove(key),
        };
        old != new
    }

    /// Records the rejection and returns the DENY-all stand-in for the policy's scope.
    fn reject_policy(&mut self, ckey: &str, obj: &IstioObject, reason: String) -> Authorization {
        tracing::warn!(resource = %ckey, %reason, "AuthorizationPolicy rejected; a DENY-all for its scope applies");
        self.rejections.insert(ckey.to_string(), reason);
        let selector = read_selector(&obj.value, "selector", "matchLabels").unwrap_or_default();
        let scope = if !selector.is_empty() {
            PolicyScope::WorkloadSelector
        } else if obj.namespace == self.root_namespace {
            PolicyScope::Global
        } else {
            PolicyScope::Namespace
        };
        Authorization {
            name: obj.name.clone(),
            namespace: obj.namespace.clone(),
            scope,
            action: PolicyAction::Deny,
            rules: vec![Rule::default()],
            selector,
            has_l7_rules: false,
        }
    }

    /// Compiles every VirtualService, DestinationRule and ServiceEntry together and lists the
    /// rejected ones.
    fn relist_l7_rejections(&mut self) {
        let prefixes: Vec<String> = [
            Kind::VirtualService,
            Kind::DestinationRule,
            Kind::ServiceEntry,
        ]
        .iter()
        .map(|k| format!("{k}/"))
        .collect();
        self.rejections
            .retain(|k, _| !prefixes.iter().any(|p| k.starts_with(p.as_str())));
        let docs: Vec<&Value> = self
            .objects
            .iter()
            .filter(|((k, _), _)| is_l7_kind(*k))
            .map(|(_, v)| v)
            .collect();
        if docs.is_empty() {
            return;
        }
        match self.compile(&docs, "cluster") {
            Ok(snap) => {
                for r in snap.rejected {
                    let resource = r.resource.clone().unwrap_or_default();
                    let key = resource.replacen(' ', "/", 1);
                    let reason = match r.field {
                        Some(f) => format!("{f}: {}", r.message),
                        None => r.message,
                    };
                    self.rejections.insert(key, reason);
                }
            }
            Err(e) => tracing::error!(error = %e, "compiling the L7 resources failed as a whole"),
        }
    }

    /// Keys (`<ns>/<name>`) of the WORKLOAD_SELECTOR policies selecting a workload with
    /// `labels` in namespace `ns` (its own namespace's and the root namespace's).
    pub(crate) fn selected(&self, ns: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
        let mut out = Vec::new();
        let mut namespaces = vec![ns];
        if ns != self.root_namespace {
            namespaces.push(&self.root_namespace);
        }
        for n in namespaces {
            let start = (n.to_string(), String::new());
            for ((pns, name), sel) in self.selectors.range(start..) {
                if pns != n {
                    break;
                }
                if !sel.is_empty() && selector_matches(sel, labels) {
                    out.push(format!("{pns}/{name}"));
                }
            }
        }
        out.sort();
        out
    }
}

/// The fail-closed replacement of a rejected PeerAuthentication (STRICT) or Sidecar
/// (REGISTRY_ONLY), for the same scope.
fn stand_in(obj: &IstioObject) -> Value {
    let metadata = json!({"name": obj.name, "namespace": obj.namespace});
    if obj.kind == Kind::PeerAuthentication {
        let mut spec = json!({"mtls": {"mode": "STRICT"}});
        if let Ok(sel) = read_selector(&obj.value, "selector", "matchLabels") {
            if !sel.is_empty() {
                spec["selector"] = json!({"matchLabels": sel});
            }
        }
        json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": metadata, "spec": spec})
    } else {
        let mut spec = json!({"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}});
        if let Ok(sel) = read_selector(&obj.value, "workloadSelector", "labels") {
            if !sel.is_empty() {
                spec["workloadSelector"] = json!({"labels": sel});
            }
        }
        json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar", "metadata": metadata, "spec": spec})
    }
}
