//! The sans-IO translation index: Kubernetes objects in ([`Index::apply`] /
//! [`Index::delete`]), the data plane's model out — workloads keyed by uid
//! (`Kubernetes//Pod/<ns>/<name>`), services by `<ns>/<hostname>`, authorizations by
//! `<ns>/<name>` (`common::model` types, what Istio's WDS carries) and "config" resources
//! keyed `<Kind>/<ns>/<name>` (the original Istio objects as JSON, for what WDS cannot carry:
//! VirtualService, DestinationRule, ServiceEntry, Sidecar, PeerAuthentication and
//! AuthorizationPolicies with L7 rules; proxies compile them with the local-file loader).
//!
//! Every event recomputes only what depends on the changed object (a pod update touches one
//! workload; a Service update its own output and the pods of its EndpointSlices; a Namespace
//! relabel the pods and services of that namespace; a Gateway the objects bound to it). The
//! changed keys accumulate until [`Index::take_changes`], which reports each key once with its
//! current value (or as removed). Outputs equal to the previous value are not reported.
//!
//! Files: [`objects`] (the input kinds), [`membership`] (ambient enrolment), [`workloads`]
//! (pods and selector-less endpoints → workloads), [`services`] (Services + EndpointSlices),
//! [`waypoints`] (Gateways and `istio.io/use-waypoint` binding), [`policies`] (Istio security
//! and L7 kinds through common's compilers).

pub mod entries;
pub mod membership;
pub mod objects;
pub mod policies;
pub mod services;
pub mod waypoints;
pub mod workloads;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_changes;
#[cfg(test)]
mod tests_entries;

use common::config::waypoints::GATEWAY_NAME_LABEL;
use common::model::{Authorization, Locality, Service, Workload};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

pub use objects::{Kind, Object, ObjectRef};
pub use waypoints::WaypointStatus;

/// `(namespace, name)` of a namespaced object.
pub type Key = (String, String);

/// Cluster-wide settings the translation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexConfig {
    /// SPIFFE trust domain of every workload.
    pub trust_domain: String,
    /// Service DNS domain: hostnames are `<name>.<ns>.svc.<domain>`.
    pub domain_suffix: String,
    /// Istio's root namespace: its AuthorizationPolicies without selector are mesh-wide.
    pub root_namespace: String,
    /// First part of pod uids (`<cluster>//Pod/<ns>/<name>`), Istio's default `Kubernetes`.
    pub cluster_id: String,
    /// The HBONE port of our waypoint pods, carried in every waypoint address.
    pub waypoint_port: u16,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            trust_domain: common::identity::DEFAULT_TRUST_DOMAIN.to_string(),
            domain_suffix: "cluster.local".to_string(),
            root_namespace: common::snapshot::DEFAULT_ROOT_NAMESPACE.to_string(),
            cluster_id: "Kubernetes".to_string(),
            waypoint_port: 15006,
        }
    }
}

/// What a watcher tells the index.
#[derive(Debug, Clone)]
pub enum IndexEvent {
    /// An object was added or changed.
    Apply(Object),
    /// An object is gone.
    Delete(ObjectRef),
    /// The first complete list of this kind has been applied (after it, an empty index of
    /// this kind means "none exist", not "not loaded yet").
    Synced(Kind),
}

/// The changes of one resource family since the last [`Index::take_changes`].
#[derive(Debug, Clone, PartialEq)]
pub struct Delta<T> {
    /// Keys added or changed, with their current value.
    pub upserted: BTreeMap<String, Arc<T>>,
    /// Keys that no longer exist.
    pub removed: BTreeSet<String>,
}

impl<T> Default for Delta<T> {
    fn default() -> Self {
        Delta {
            upserted: BTreeMap::new(),
            removed: BTreeSet::new(),
        }
    }
}

impl<T> Delta<T> {
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.removed.is_empty()
    }
}

/// Everything that changed since the last call. `workloads` and `services` together are
/// Istio's `Address` type (a workload uid and a `<ns>/<hostname>` never collide: a uid has
/// more than one `/`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Changes {
    pub workloads: Delta<Workload>,
    pub services: Delta<Service>,
    pub authorizations: Delta<Authorization>,
    pub configs: Delta<serde_json::Value>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty()
            && self.services.is_empty()
            && self.authorizations.is_empty()
            && self.configs.is_empty()
    }
}

/// An object whose output depends on a waypoint binding.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Dep {
    Pod(Key),
    Service(Key),
    ServiceEntry(Key),
}

/// The current outputs.
#[derive(Debug, Default)]
struct Outputs {
    workloads: BTreeMap<String, Arc<Workload>>,
    services: BTreeMap<String, Arc<Service>>,
    authorizations: BTreeMap<String, Arc<Authorization>>,
    configs: BTreeMap<String, Arc<serde_json::Value>>,
}

/// Keys whose output changed since the last `take_changes`.
#[derive(Debug, Default)]
struct Changed {
    workloads: BTreeSet<String>,
    services: BTreeSet<String>,
    authorizations: BTreeSet<String>,
    configs: BTreeSet<String>,
}

/// Inputs whose outputs must be recomputed.
#[derive(Debug, Default)]
struct Dirty {
    pods: BTreeSet<Key>,
    services: BTreeSet<Key>,
    /// EndpointSlices whose selector-less endpoints (non-pod workloads) must be recomputed.
    slices: BTreeSet<Key>,
    /// ServiceEntries whose waypoint binding must be recomputed.
    service_entries: BTreeSet<Key>,
}

/// The index. See the module documentation.
#[derive(Debug)]
pub struct Index {
    cfg: IndexConfig,
    // Inputs, reduced to what the translation reads.
    namespaces: HashMap<String, BTreeMap<String, String>>,
    nodes: HashMap<String, Option<Locality>>,
    service_accounts: HashSet<Key>,
    pods: HashMap<Key, workloads::PodInfo>,
    k8s_services: HashMap<Key, services::SvcInfo>,
    slices: HashMap<Key, services::SliceInfo>,
    gateways: HashMap<Key, waypoints::GatewayInfo>,
    gateway_classes: HashMap<String, waypoints::ClassInfo>,
    policies: policies::Policies,
    // Reverse indexes for incremental recomputation.
    pods_by_ns: HashMap<String, BTreeSet<String>>,
    services_by_ns: HashMap<String, BTreeSet<String>>,
    pods_by_node: HashMap<String, BTreeSet<Key>>,
    /// `(namespace, service account)` → pod names.
    pods_by_sa: HashMap<Key, BTreeSet<String>>,
    /// Pod → names of the EndpointSlices (in its namespace) that list it.
    pod_slices: HashMap<Key, BTreeSet<String>>,
    /// Service → names of its EndpointSlices.
    service_slices: HashMap<Key, BTreeSet<String>>,
    /// Waypoint Gateway → objects naming it (whether or not it exists).
    waypoint_users: HashMap<Key, BTreeSet<Dep>>,
    /// Waypoint Gateway → Services labelled with its name (its own Service).
    waypoint_services: HashMap<Key, BTreeSet<String>>,
    /// Object → the waypoint binding it resolved to.
    bindings: HashMap<Dep, waypoints::Binding>,
    /// EndpointSlice → uids of the non-pod workloads made from it.
    slice_workloads: HashMap<Key, BTreeSet<String>>,
    /// ServiceEntry → the Address resources made from it: (service keys, workload uids).
    entry_addresses: HashMap<Key, (BTreeSet<String>, BTreeSet<String>)>,
    /// Namespace → its `workloadSelector` ServiceEntries (their hosts join the selected
    /// pods' services).
    entry_selectors: HashMap<String, Vec<entries::Selector>>,
    /// The automatic VIPs of every entry's hosts, as the proxies allocate them.
    auto_vips: BTreeMap<(String, String), std::net::Ipv4Addr>,
    out: Outputs,
    dirty: Dirty,
    changed: Changed,
}

impl Default for Index {
    fn default() -> Self {
        Index::new(IndexConfig::default())
    }
}

pub(crate) fn meta_key(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        m.namespace.clone().unwrap_or_else(|| "default".to_string()),
        m.name.clone().unwrap_or_default(),
    )
}

fn set_insert<K: std::hash::Hash + Eq, V: Ord>(map: &mut HashMap<K, BTreeSet<V>>, k: K, v: V) {
    map.entry(k).or_default().insert(v);
}

fn set_remove<K: std::hash::Hash + Eq, V: Ord>(map: &mut HashMap<K, BTreeSet<V>>, k: &K, v: &V) {
    if let Some(set) = map.get_mut(k) {
        set.remove(v);
        if set.is_empty() {
            map.remove(k);
        }
    }
}

/// Replaces `map[key]` by `value` (or removes it), recording the key when the value changed.
fn put<T: PartialEq>(
    map: &mut BTreeMap<String, Arc<T>>,
    changed: &mut BTreeSet<String>,
    key: String,
    value: Option<T>,
) {
    match value {
        Some(v) => {
            if map.get(&key).is_some_and(|old| **old == v) {
                return;
            }
            map.insert(key.clone(), Arc::new(v));
            changed.insert(key);
        }
        None => {
            if map.remove(&key).is_some() {
                changed.insert(key);
            }
        }
    }
}

fn drain<T>(map: &BTreeMap<String, Arc<T>>, keys: &mut BTreeSet<String>) -> Delta<T> {
    let mut delta = Delta::default();
    for key in std::mem::take(keys) {
        match map.get(&key) {
            Some(v) => {
                delta.upserted.insert(key, v.clone());
            }
            None => {
                delta.removed.insert(key);
            }
        }
    }
    delta
}

impl Index {
    pub fn new(cfg: IndexConfig) -> Self {
        Index {
            policies: policies::Policies::new(&cfg),
            cfg,
            namespaces: HashMap::new(),
            nodes: HashMap::new(),
            service_accounts: HashSet::new(),
            pods: HashMap::new(),
            k8s_services: HashMap::new(),
            slices: HashMap::new(),
            gateways: HashMap::new(),
            gateway_classes: HashMap::new(),
            pods_by_ns: HashMap::new(),
            services_by_ns: HashMap::new(),
            pods_by_node: HashMap::new(),
            pods_by_sa: HashMap::new(),
            pod_slices: HashMap::new(),
            service_slices: HashMap::new(),
            waypoint_users: HashMap::new(),
            waypoint_services: HashMap::new(),
            bindings: HashMap::new(),
            slice_workloads: HashMap::new(),
            entry_addresses: HashMap::new(),
            auto_vips: BTreeMap::new(),
            entry_selectors: HashMap::new(),
            out: Outputs::default(),
            dirty: Dirty::default(),
            changed: Changed::default(),
        }
    }

    pub fn config(&self) -> &IndexConfig {
        &self.cfg
    }

    /// Applies one watcher event.
    pub fn handle(&mut self, event: IndexEvent) {
        match event {
            IndexEvent::Apply(o) => self.apply(o),
            IndexEvent::Delete(r) => self.delete(&r),
            IndexEvent::Synced(_) => {}
        }
    }

    /// An object was added or changed.
    pub fn apply(&mut self, object: Object) {
        match object {
            Object::Namespace(ns) => {
                let name = ns.metadata.name.clone().unwrap_or_default();
                let labels = ns.metadata.labels.clone().unwrap_or_default();
                if self.namespaces.get(&name) != Some(&labels) {
                    self.namespaces.insert(name.clone(), labels);
                    self.namespace_changed(&name);
                }
            }
            Object::Node(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                let locality = workloads::node_locality(&node);
                if self.nodes.get(&name) != Some(&locality) {
                    self.nodes.insert(name.clone(), locality);
                    self.node_changed(&name);
                }
            }
            Object::ServiceAccount(sa) => {
                self.service_accounts.insert(meta_key(&sa.metadata));
            }
            Object::Pod(pod) => {
                let info = workloads::PodInfo::from_pod(&pod);
                self.set_pod(info.key(), Some(info));
            }
            Object::Service(svc) => {
                let info = services::SvcInfo::from_service(&svc);
                self.set_service(meta_key(&svc.metadata), Some(info));
            }
            Object::EndpointSlice(slice) => {
                let key = meta_key(&slice.metadata);
                let info = services::SliceInfo::from_slice(&slice);
                self.set_slice(key, info);
            }
            Object::Gateway(gw) => {
                let class = self.gateway_classes.get(&gw.spec.gateway_class_name);
                let info =
                    waypoints::GatewayInfo::from_gateway(&gw, class.map(|c| c.controller.as_str()));
                let key = (
                    gw.metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                    gw.metadata.name.clone(),
                );
                self.set_gateway(key, Some(info));
            }
            Object::GatewayClass(gc) => {
                let name = gc.metadata.name.clone();
                let info = waypoints::ClassInfo {
                    labels: gc.metadata.labels.clone(),
                    controller: gc.spec.controller_name.clone(),
                };
                if self.gateway_classes.get(&name) != Some(&info) {
                    self.gateway_classes.insert(name.clone(), info);
                    self.gateway_class_changed(&name);
                }
            }
            Object::Istio(obj) => self.set_istio(*obj),
        }
        self.flush();
    }

    /// An object was deleted.
    pub fn delete(&mut self, r: &ObjectRef) {
        let key: Key = (r.namespace.clone(), r.name.clone());
        match r.kind {
            Kind::Namespace => {
                if self.namespaces.remove(&r.name).is_some() {
                    self.namespace_changed(&r.name);
                }
            }
            Kind::Node => {
                if self.nodes.remove(&r.name).is_some() {
                    self.node_changed(&r.name);
                }
            }
            Kind::ServiceAccount => {
                self.service_accounts.remove(&key);
            }
            Kind::Pod => self.set_pod(key, None),
            Kind::Service => self.set_service(key, None),
            Kind::EndpointSlice => self.remove_slice(&key),
            Kind::Gateway => self.set_gateway(key, None),
            Kind::GatewayClass => {
                if self.gateway_classes.remove(&r.name).is_some() {
                    self.gateway_class_changed(&r.name);
                }
            }
            kind => self.remove_istio(kind, &key),
        }
        self.flush();
    }

    /// The changes since the last call (each key once, with its current value).
    pub fn take_changes(&mut self) -> Changes {
        Changes {
            workloads: drain(&self.out.workloads, &mut self.changed.workloads),
            services: drain(&self.out.services, &mut self.changed.services),
            authorizations: drain(&self.out.authorizations, &mut self.changed.authorizations),
            configs: drain(&self.out.configs, &mut self.changed.configs),
        }
    }

    pub fn workloads(&self) -> &BTreeMap<String, Arc<Workload>> {
        &self.out.workloads
    }

    pub fn services(&self) -> &BTreeMap<String, Arc<Service>> {
        &self.out.services
    }

    pub fn authorizations(&self) -> &BTreeMap<String, Arc<Authorization>> {
        &self.out.authorizations
    }

    /// Istio objects for the proxies' loader, keyed `<Kind>/<ns>/<name>`.
    pub fn configs(&self) -> &BTreeMap<String, Arc<serde_json::Value>> {
        &self.out.configs
    }

    /// Istio resources refused, keyed `<Kind>/<ns>/<name>`, with the reason (for Events and
    /// status). A refused AuthorizationPolicy is replaced by a DENY-all for its scope, a
    /// refused PeerAuthentication by STRICT, a refused Sidecar by REGISTRY_ONLY.
    pub fn rejections(&self) -> &BTreeMap<String, String> {
        self.policies.rejections()
    }

    /// The Istio object keyed `<Kind>/<ns>/<name>` (as in [`Index::rejections`]), verbatim.
    pub fn istio_object(&self, key: &str) -> Option<&serde_json::Value> {
        self.policies.object(key)
    }

    /// The uid of a pod's workload.
    pub fn pod_uid(&self, namespace: &str, name: &str) -> String {
        format!("{}//Pod/{namespace}/{name}", self.cfg.cluster_id)
    }

    /// `<name>.<ns>.svc.<domain>`.
    pub fn hostname(&self, namespace: &str, name: &str) -> String {
        format!("{name}.{namespace}.svc.{}", self.cfg.domain_suffix)
    }

    // ----- input bookkeeping -----

    fn namespace_changed(&mut self, ns: &str) {
        if let Some(pods) = self.pods_by_ns.get(ns) {
            self.dirty
                .pods
                .extend(pods.iter().map(|p| (ns.to_string(), p.clone())));
        }
        if let Some(svcs) = self.services_by_ns.get(ns) {
            self.dirty
                .services
                .extend(svcs.iter().map(|s| (ns.to_string(), s.clone())));
        }
        self.dirty
            .service_entries
            .extend(self.policies.keys_in(Kind::ServiceEntry, ns));
    }

    fn node_changed(&mut self, node: &str) {
        if let Some(pods) = self.pods_by_node.get(node) {
            self.dirty.pods.extend(pods.iter().cloned());
        }
    }

    fn gateway_class_changed(&mut self, class: &str) {
        let controller = self
            .gateway_classes
            .get(class)
            .map(|c| c.controller.clone());
        let gws: Vec<(Key, waypoints::GatewayInfo)> = self
            .gateways
            .iter()
            .filter(|(_, g)| g.class == class)
            .map(|(k, g)| (k.clone(), g.clone()))
            .collect();
        for (key, mut info) in gws {
            let form = crate::gateway_class::waypoint_form(class, controller.as_deref());
            if info.form != form {
                // Also re-derives the early form's service-account bindings, and marks the
                // waypoint's users.
                info.form = form;
                self.set_gateway(key, Some(info));
            } else {
                // The class's labels (`istio.io/waypoint-for`) may have changed.
                self.waypoint_changed(&key);
            }
        }
    }

    /// Everything bound to (or asking for) waypoint `gw` must be recomputed.
    fn waypoint_changed(&mut self, gw: &Key) {
        if let Some(users) = self.waypoint_users.get(gw) {
            for dep in users {
                match dep {
                    Dep::Pod(k) => self.dirty.pods.insert(k.clone()),
                    Dep::Service(k) => self.dirty.services.insert(k.clone()),
                    Dep::ServiceEntry(k) => self.dirty.service_entries.insert(k.clone()),
                };
            }
        }
    }

    fn set_pod(&mut self, key: Key, info: Option<workloads::PodInfo>) {
        if self.pods.get(&key) == info.as_ref() {
            return;
        }
        if let Some(old) = self.pods.remove(&key) {
            set_remove(&mut self.pods_by_node, &old.node, &key);
            set_remove(
                &mut self.pods_by_sa,
                &(key.0.clone(), old.service_account.clone()),
                &key.1,
            );
        }
        match info {
            Some(info) => {
                set_insert(&mut self.pods_by_ns, key.0.clone(), key.1.clone());
                set_insert(&mut self.pods_by_node, info.node.clone(), key.clone());
                set_insert(
                    &mut self.pods_by_sa,
                    (key.0.clone(), info.service_account.clone()),
                    key.1.clone(),
                );
                self.pods.insert(key.clone(), info);
            }
            None => set_remove(&mut self.pods_by_ns, &key.0.clone(), &key.1),
        }
        self.dirty.pods.insert(key);
    }

    fn set_service(&mut self, key: Key, info: Option<services::SvcInfo>) {
        if self.k8s_services.get(&key) == info.as_ref() {
            return;
        }
        // A waypoint's Service (by its gateway-name label): its VIP is the waypoint address.
        let gateway_of = |i: &services::SvcInfo| {
            i.labels
                .get(GATEWAY_NAME_LABEL)
                .map(|gw| (key.0.clone(), gw.clone()))
        };
        let old_gw = self.k8s_services.get(&key).and_then(gateway_of);
        let new_gw = info.as_ref().and_then(gateway_of);
        if let Some(gw) = &old_gw {
            set_remove(&mut self.waypoint_services, gw, &key.1);
            self.waypoint_changed(gw);
        }
        if let Some(gw) = new_gw {
            set_insert(&mut self.waypoint_services, gw.clone(), key.1.clone());
            self.waypoint_changed(&gw);
        }
        match info {
            Some(info) => {
                set_insert(&mut self.services_by_ns, key.0.clone(), key.1.clone());
                self.k8s_services.insert(key.clone(), info);
            }
            None => {
                self.k8s_services.remove(&key);
                set_remove(&mut self.services_by_ns, &key.0.clone(), &key.1);
            }
        }
        self.dirty.services.insert(key.clone());
        // Its endpoints' port maps and selector-less workloads depend on its ports.
        if let Some(slices) = self.service_slices.get(&key) {
            for s in slices {
                let skey = (key.0.clone(), s.clone());
                self.dirty.slices.insert(skey.clone());
                if let Some(slice) = self.slices.get(&skey) {
                    self.dirty
                        .pods
                        .extend(slice.pods().map(|p| (key.0.clone(), p)));
                }
            }
        }
        // It may be an `istio-waypoint` Gateway's Service by name.
        self.waypoint_changed(&key);
    }

    fn set_slice(&mut self, key: Key, info: services::SliceInfo) {
        if self.slices.get(&key) == Some(&info) {
            return;
        }
        self.remove_slice(&key);
        for pod in info.pods() {
            set_insert(
                &mut self.pod_slices,
                (key.0.clone(), pod.clone()),
                key.1.clone(),
            );
            self.dirty.pods.insert((key.0.clone(), pod));
        }
        if let Some(svc) = &info.service {
            set_insert(
                &mut self.service_slices,
                (key.0.clone(), svc.clone()),
                key.1.clone(),
            );
        }
        self.slices.insert(key.clone(), info);
        self.dirty.slices.insert(key);
    }

    fn remove_slice(&mut self, key: &Key) {
        let Some(old) = self.slices.remove(key) else {
            return;
        };
        for pod in old.pods() {
            let pk = (key.0.clone(), pod);
            set_remove(&mut self.pod_slices, &pk, &key.1);
            self.dirty.pods.insert(pk);
        }
        if let Some(svc) = &old.service {
            set_remove(
                &mut self.service_slices,
                &(key.0.clone(), svc.clone()),
                &key.1,
            );
        }
        self.dirty.slices.insert(key.clone());
    }

    fn set_gateway(&mut self, key: Key, info: Option<waypoints::GatewayInfo>) {
        if self.gateways.get(&key) == info.as_ref() {
            return;
        }
        let old = self.gateways.remove(&key);
        // Workloads bound through the early form's service-account annotation.
        for sa in [old.as_ref(), info.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|g| g.bound_service_account())
        {
            if let Some(pods) = self.pods_by_sa.get(&(key.0.clone(), sa.to_string())) {
                self.dirty
                    .pods
                    .extend(pods.iter().map(|p| (key.0.clone(), p.clone())));
            }
        }
        if let Some(info) = info {
            self.gateways.insert(key.clone(), info);
        }
        self.waypoint_changed(&key);
    }

    fn set_istio(&mut self, obj: objects::IstioObject) {
        let key = (obj.namespace.clone(), obj.name.clone());
        let kind = obj.kind;
        let effect = self.policies.apply(obj);
        self.policy_effect(kind, &key, effect);
    }

    fn remove_istio(&mut self, kind: Kind, key: &Key) {
        let effect = self.policies.delete(kind, key);
        self.policy_effect(kind, key, effect);
    }

    fn policy_effect(&mut self, kind: Kind, key: &Key, effect: policies::Effect) {
        if kind == Kind::ServiceEntry {
            // Sent with its waypoint binding (see `entries`).
            if !effect.configs.is_empty() {
                self.dirty.service_entries.insert(key.clone());
            }
            let selectors = entries::selectors_in(&self.policies, &key.0);
            let old = self.entry_selectors.get(&key.0).map(Vec::as_slice);
            if old.unwrap_or_default() != selectors.as_slice() {
                if selectors.is_empty() {
                    self.entry_selectors.remove(&key.0);
                } else {
                    self.entry_selectors.insert(key.0.clone(), selectors);
                }
                if let Some(pods) = self.pods_by_ns.get(&key.0) {
                    self.dirty
                        .pods
                        .extend(pods.iter().map(|p| (key.0.clone(), p.clone())));
                }
            }
        } else {
            for (k, v) in effect.configs {
                put(&mut self.out.configs, &mut self.changed.configs, k, v);
            }
        }
        if kind == Kind::AuthorizationPolicy {
            let akey = format!("{}/{}", key.0, key.1);
            put(
                &mut self.out.authorizations,
                &mut self.changed.authorizations,
                akey,
                effect.authorization,
            );
        }
        if effect.selector_changed {
            // Workload policy lists: the pods of its namespace (every pod for the root).
            if key.0 == self.cfg.root_namespace {
                self.dirty.pods.extend(self.pods.keys().cloned());
            } else if let Some(pods) = self.pods_by_ns.get(&key.0) {
                self.dirty
                    .pods
                    .extend(pods.iter().map(|p| (key.0.clone(), p.clone())));
            }
        }
    }

    // ----- recomputation -----

    fn flush(&mut self) {
        for key in std::mem::take(&mut self.dirty.services) {
            self.refresh_service(&key);
        }
        for key in std::mem::take(&mut self.dirty.pods) {
            self.refresh_pod(&key);
        }
        for key in std::mem::take(&mut self.dirty.slices) {
            self.refresh_slice(&key);
        }
        if !self.dirty.service_entries.is_empty() {
            // A host's automatic VIP can move when another colliding host comes or goes.
            let auto = entries::auto_vips(&self.policies);
            if auto != self.auto_vips {
                self.auto_vips = auto;
                let all: Vec<Key> = self
                    .policies
                    .all_of(Kind::ServiceEntry)
                    .map(|(k, _)| k.clone())
                    .collect();
                self.dirty.service_entries.extend(all);
            }
        }
        for key in std::mem::take(&mut self.dirty.service_entries) {
            self.refresh_service_entry(&key);
        }
    }

    fn record_binding(&mut self, dep: Dep, binding: Option<waypoints::Binding>) {
        let old = match &binding {
            Some(b) => self.bindings.insert(dep.clone(), b.clone()),
            None => self.bindings.remove(&dep),
        };
        if let Some(old) = old {
            set_remove(&mut self.waypoint_users, &old.gateway, &dep);
        }
        if let Some(b) = binding {
            set_insert(&mut self.waypoint_users, b.gateway, dep);
        }
    }

    fn refresh_pod(&mut self, key: &Key) {
        let (workload, binding) = match self.pods.get(key) {
            Some(pod) => workloads::pod_workload(self, pod),
            None => (None, None),
        };
        self.record_binding(Dep::Pod(key.clone()), binding);
        let uid = self.pod_uid(&key.0, &key.1);
        put(
            &mut self.out.workloads,
            &mut self.changed.workloads,
            uid,
            workload,
        );
    }

    fn refresh_service(&mut self, key: &Key) {
        let (service, binding) = match self.k8s_services.get(key) {
            Some(svc) => services::service(self, key, svc),
            None => (None, None),
        };
        self.record_binding(Dep::Service(key.clone()), binding);
        let skey = format!("{}/{}", key.0, self.hostname(&key.0, &key.1));
        put(
            &mut self.out.services,
            &mut self.changed.services,
            skey,
            service,
        );
    }

    fn refresh_service_entry(&mut self, key: &Key) {
        let (value, binding, (services, workloads)) =
            match self.policies.stored(Kind::ServiceEntry, key) {
                Some(v) => {
                    let (with, b) = entries::with_binding(self, key, v);
                    let addresses = entries::addresses(self, key, v, b.as_ref());
                    (Some(with), b, addresses)
                }
                None => (None, None, Default::default()),
            };
        self.record_binding(Dep::ServiceEntry(key.clone()), binding);
        let (old_services, old_workloads) = self.entry_addresses.remove(key).unwrap_or_default();
        let mut new_services = BTreeSet::new();
        for s in services {
            let skey = s.key();
            // A Kubernetes Service (or another entry) already holds this name: it stays.
            if self.out.services.contains_key(&skey) && !old_services.contains(&skey) {
                continue;
            }
            new_services.insert(skey.clone());
            put(
                &mut self.out.services,
                &mut self.changed.services,
                skey,
                Some(s),
            );
        }
        let mut new_workloads = BTreeSet::new();
        for w in workloads {
            new_workloads.insert(w.uid.clone());
            put(
                &mut self.out.workloads,
                &mut self.changed.workloads,
                w.uid.clone(),
                Some(w),
            );
        }
        for k in old_services.difference(&new_services) {
            put(
                &mut self.out.services,
                &mut self.changed.services,
                k.clone(),
                None::<Service>,
            );
        }
        for k in old_workloads.difference(&new_workloads) {
            put(
                &mut self.out.workloads,
                &mut self.changed.workloads,
                k.clone(),
                None::<Workload>,
            );
        }
        if !new_services.is_empty() || !new_workloads.is_empty() {
            self.entry_addresses
                .insert(key.clone(), (new_services, new_workloads));
        }
        put(
            &mut self.out.configs,
            &mut self.changed.configs,
            policies::config_key(Kind::ServiceEntry, key),
            value,
        );
    }

    fn refresh_slice(&mut self, key: &Key) {
        let new: BTreeMap<String, Workload> = self
            .slices
            .get(key)
            .map(|s| workloads::slice_workloads(self, key, s))
            .unwrap_or_default();
        let old = self.slice_workloads.remove(key).unwrap_or_default();
        for uid in old.iter().filter(|u| !new.contains_key(*u)) {
            put(
                &mut self.out.workloads,
                &mut self.changed.workloads,
                uid.clone(),
                None,
            );
        }
        if !new.is_empty() {
            self.slice_workloads
                .insert(key.clone(), new.keys().cloned().collect());
        }
        for (uid, w) in new {
            put(
                &mut self.out.workloads,
                &mut self.changed.workloads,
                uid,
                Some(w),
            );
        }
    }
}
