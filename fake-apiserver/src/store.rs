//! The object store: objects per group+kind, the global resourceVersion, the event log
//! (with the previous object of every change, so past list states can be rebuilt), compaction,
//! and the write rules (metadata defaulting, preconditions, generation, status subresource,
//! finalizers, namespace and ownerReference garbage collection).

use crate::apply::{self, Scope, Writer};
use crate::error::{ApiError, ApiResult};
use crate::resources::{Registry, ResourceType};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

mod gc;

/// (group, kind): all versions of a kind share one store.
pub type GroupKind = (String, String);
/// (namespace or "", name).
pub type ObjKey = (String, String);

/// A watch event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// Object created.
    Added,
    /// Object changed.
    Modified,
    /// Object removed.
    Deleted,
}

impl EventType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change in the event log.
#[derive(Clone, Debug)]
pub struct LogEntry {
    /// resourceVersion of the change.
    pub rv: u64,
    /// Which store.
    pub gk: GroupKind,
    /// What happened.
    pub etype: EventType,
    /// The object after the change (for DELETED: the last state, with the deletion's RV).
    pub object: Arc<Value>,
    /// The object before the change (None for ADDED).
    pub old: Option<Arc<Value>>,
}

/// How a write is made.
#[derive(Clone, Debug)]
pub struct WriteCtx {
    /// Part of the object the write may change.
    pub scope: Scope,
    /// Test-side write: keeps given uid/timestamps/status, skips preconditions and managedFields.
    pub raw: bool,
    /// Field manager recorded in managedFields.
    pub manager: String,
    /// apiVersion of the request.
    pub api_version: String,
}

/// DELETE options.
#[derive(Clone, Debug, Default)]
pub struct DeleteOpts {
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
    /// `propagationPolicy: Orphan`: dependents lose the ownerReference instead of being deleted.
    pub orphan: bool,
}

/// The result of a DELETE.
#[derive(Clone, Debug)]
pub enum Deleted {
    /// Finalizers pending: the object now carries a deletionTimestamp.
    Pending(Value),
    /// Removed; the last state of the object.
    Gone(Value),
}

/// The current time as Kubernetes writes timestamps.
pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// (namespace, name) of an object.
pub fn key_of(obj: &Value) -> ObjKey {
    let s = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (s("/metadata/namespace"), s("/metadata/name"))
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn meta_mut(obj: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        // metadata was just made an object above.
        _ => unreachable!("metadata is an object"),
    }
}

/// Everything but metadata and status: a change here bumps `generation`.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

/// The object without the fields a no-op write may differ in.
fn comparable(obj: &Value) -> Value {
    let mut v = obj.clone();
    let meta = meta_mut(&mut v);
    meta.remove("resourceVersion");
    if let Some(Value::Array(entries)) = meta.get_mut("managedFields") {
        for e in entries {
            if let Some(e) = e.as_object_mut() {
                e.remove("time");
            }
        }
    }
    v
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The store.
pub struct State {
    /// Known kinds.
    pub registry: Registry,
    rv: u64,
    compacted: u64,
    objects: HashMap<GroupKind, BTreeMap<ObjKey, Arc<Value>>>,
    log: Vec<LogEntry>,
    uid_seed: u32,
    uid_seq: u64,
    /// ownerReference garbage collection on (default) or off (a cluster whose GC lags).
    pub gc_enabled: bool,
    /// Last ClusterIP handed out (offset in 10.96.0.0/12).
    cluster_ip_seq: u32,
}

impl State {
    /// An empty store.
    pub fn new(registry: Registry) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
            .unwrap_or(0x5eed);
        State {
            registry,
            rv: 1,
            compacted: 0,
            objects: HashMap::new(),
            log: Vec::new(),
            uid_seed: seed,
            uid_seq: 0,
            gc_enabled: true,
            cluster_ip_seq: 9,
        }
    }

    /// The latest resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// Resource versions below this are expired (410).
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Drops the event history up to now: watches and continue tokens from older RVs expire.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.log.clear();
    }

    /// The next free ClusterIP in 10.96.0.0/12 (from 10.96.0.10, as a cluster's service CIDR
    /// would hand them out).
    /// Addresses a Service asked for by hand are skipped, as the API server's allocator does.
    fn allocate_cluster_ip(&mut self) -> Option<String> {
        let used: std::collections::HashSet<&str> = self
            .objects
            .get(&(String::new(), "Service".to_string()))
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|o| o["spec"]["clusterIP"].as_str())
            .collect();
        loop {
            self.cluster_ip_seq += 1;
            if self.cluster_ip_seq >= (1 << 20) - 1 {
                return None;
            }
            let ip = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)) + self.cluster_ip_seq,
            )
            .to_string();
            if !used.contains(ip.as_str()) {
                return Some(ip);
            }
        }
    }

    /// A new Service gets a ClusterIP unless it asks for none (`None`, `ExternalName`) or names
    /// its own.
    fn assign_cluster_ip(&mut self, obj: &mut Value) {
        let spec = &obj["spec"];
        if spec.get("type").and_then(Value::as_str) == Some("ExternalName") {
            return;
        }
        match spec.get("clusterIP").and_then(Value::as_str) {
            Some(ip) if !ip.is_empty() => {
                if spec.get("clusterIPs").is_none() {
                    obj["spec"]["clusterIPs"] = json!([ip]);
                }
            }
            _ => {
                if let Some(ip) = self.allocate_cluster_ip() {
                    obj["spec"]["clusterIP"] = json!(ip);
                    obj["spec"]["clusterIPs"] = json!([ip]);
                }
            }
        }
    }

    fn new_uid(&mut self) -> String {
        self.uid_seq += 1;
        format!("{:08x}-0000-4000-8000-{:012x}", self.uid_seed, self.uid_seq)
    }

    /// Changes after `rv`, oldest first (caller checks `rv >= compacted()`).
    pub fn events_after(&self, rv: u64) -> &[LogEntry] {
        let start = self.log.partition_point(|e| e.rv <= rv);
        &self.log[start..]
    }

    /// One object.
    pub fn get(&self, rt: &ResourceType, key: &ObjKey) -> Option<Arc<Value>> {
        self.objects.get(&gk(rt))?.get(key).cloned()
    }

    /// Objects of a kind as they were at `at` (None: now), in key order, optionally within
    /// one namespace.
    pub fn list(
        &self,
        rt: &ResourceType,
        ns: Option<&str>,
        at: Option<u64>,
    ) -> ApiResult<Vec<Arc<Value>>> {
        let g = gk(rt);
        let mut snap = self.objects.get(&g).cloned().unwrap_or_default();
        if let Some(at) = at {
            if at < self.compacted {
                return Err(ApiError::expired(at, self.compacted));
            }
            for e in self.log.iter().rev().take_while(|e| e.rv > at) {
                if e.gk != g {
                    continue;
                }
                let key = key_of(&e.object);
                match (&e.etype, &e.old) {
                    (EventType::Added, _) | (_, None) => {
                        snap.remove(&key);
                    }
                    (_, Some(old)) => {
                        snap.insert(key, old.clone());
                    }
                }
            }
        }
        Ok(snap
            .into_iter()
            .filter(|((n, _), _)| ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
            .collect())
    }

    fn commit(
        &mut self,
        rt: &ResourceType,
        etype: EventType,
        mut obj: Value,
        old: Option<Arc<Value>>,
    ) -> Arc<Value> {
        self.rv += 1;
        obj["apiVersion"] = json!(rt.api_version(rt.storage_version()));
        obj["kind"] = json!(rt.kind);
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let obj = Arc::new(obj);
        let key = key_of(&obj);
        let store = self.objects.entry(gk(rt)).or_default();
        if etype == EventType::Deleted {
            store.remove(&key);
        } else {
            store.insert(key, obj.clone());
        }
        if rt.group == "apiextensions.k8s.io" && rt.kind == "CustomResourceDefinition" {
            // As the real server: a CRD's kind is served while the CRD exists.
            if let Some(t) = crate::resources::Registry::from_crd(&obj) {
                if etype == EventType::Deleted {
                    self.registry.unregister(&t.group, &t.kind);
                } else {
                    self.registry.register(t);
                }
            }
        }
        self.log.push(LogEntry {
            rv: self.rv,
            gk: gk(rt),
            etype,
            object: obj.clone(),
            old,
        });
        obj
    }

    /// Creates an object; `obj.metadata.namespace` must already be set for namespaced kinds.
    pub fn create(&mut self, rt: &ResourceType, obj: Value, ctx: &WriteCtx) -> ApiResult<Value> {
        let now = now();
        let mut obj = self.prepare_create(rt, obj, ctx, &now)?;
        if !ctx.raw {
            meta_mut(&mut obj).remove("managedFields");
            apply::track_update(None, &mut obj, &writer(ctx, &now));
        }
        Ok(self
            .commit(rt, EventType::Added, obj, None)
            .as_ref()
            .clone())
    }

    /// Validates a new object and fills in server-set metadata (no commit).
    fn prepare_create(
        &mut self,
        rt: &ResourceType,
        mut obj: Value,
        ctx: &WriteCtx,
        now: &str,
    ) -> ApiResult<Value> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        let (ns, mut name) = key_of(&obj);
        if name.is_empty() {
            if let Some(prefix) = meta_str(&obj, "generateName").map(str::to_string) {
                name = format!("{prefix}{}", &self.new_uid()[31..36]);
                meta_mut(&mut obj).insert("name".into(), json!(name));
            }
        }
        if !valid_name(&name) {
            return Err(ApiError::invalid(
                &rt.qualified(),
                &name,
                "metadata.name: Invalid value: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
            ));
        }
        if rt.namespaced && ns.is_empty() {
            return Err(ApiError::bad_request(
                "the namespace of the object must be set",
            ));
        }
        if !rt.namespaced {
            meta_mut(&mut obj).remove("namespace");
        }
        if self.get(rt, &key_of(&obj)).is_some() {
            return Err(ApiError::already_exists(&rt.qualified(), &name));
        }
        let uid = self.new_uid();
        let meta = meta_mut(&mut obj);
        if ctx.raw {
            meta.entry("uid").or_insert(json!(uid));
            meta.entry("creationTimestamp").or_insert(json!(now));
            meta.entry("generation").or_insert(json!(1));
            return Ok(obj);
        }
        meta.insert("uid".into(), json!(uid));
        meta.insert("creationTimestamp".into(), json!(now));
        meta.insert("generation".into(), json!(1));
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        if rt.group.is_empty() && rt.kind == "Service" {
            self.assign_cluster_ip(&mut obj);
        }
        if ctx.scope == Scope::Main {
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
            match (rt.group.as_str(), rt.kind.as_str()) {
                ("", "Pod") => obj["status"] = json!({"phase": "Pending"}),
                ("", "Namespace") => obj["status"] = json!({"phase": "Active"}),
                _ => {}
            }
        }
        Ok(obj)
    }

    /// Replaces an object (PUT, or the result of a patch). A non-empty
    /// `metadata.resourceVersion` in `new` is a precondition.
    pub fn replace(
        &mut self,
        rt: &ResourceType,
        key: &ObjKey,
        mut new: Value,
        ctx: &WriteCtx,
    ) -> ApiResult<Value> {
        let Some(old) = self.get(rt, key) else {
            return Err(ApiError::not_found(&rt.qualified(), &key.1));
        };
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        if key_of(&new).1 != key.1 || (rt.namespaced && key_of(&new).0 != key.0) {
            return Err(ApiError::bad_request(
                "the name/namespace of the object does not match the request",
            ));
        }
        let now = now();
        if !ctx.raw {
            if let Some(rv) = meta_str(&new, "resourceVersion").filter(|s| !s.is_empty()) {
                if Some(rv) != meta_str(&old, "resourceVersion") {
                    return Err(ApiError::conflict(
                        &rt.qualified(),
                        &key.1,
                        "the object has been modified; please apply your changes to the latest version and try again",
                    ));
                }
            }
            new = match ctx.scope {
                Scope::All => new,
                Scope::Main => {
                    let mut n = apply::restrict(&new, Scope::Main);
                    if let Some(s) = old.get("status") {
                        n["status"] = s.clone();
                    }
                    n
                }
                Scope::Status => {
                    let mut n = old.as_ref().clone();
                    match new.get("status") {
                        Some(s) => n["status"] = s.clone(),
                        None => {
                            if let Some(m) = n.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                    n
                }
            };
            let meta = meta_mut(&mut new);
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                match meta_str(&old, f).map(str::to_string) {
                    Some(v) => meta.insert(f.into(), json!(v)),
                    None => meta.remove(f),
                };
            }
            if let Some(g) = old.pointer("/metadata/deletionGracePeriodSeconds") {
                meta.insert("deletionGracePeriodSeconds".into(), g.clone());
            }
            match old.pointer("/metadata/managedFields") {
                Some(m) => meta.insert("managedFields".into(), m.clone()),
                None => meta.remove("managedFields"),
            };
            let w = writer(ctx, &now);
            apply::track_update(Some(&old), &mut new, &w);
        }
        self.finish_update(rt, old, new)
    }

    /// Generation bump, no-op detection, commit, and deletion once the last finalizer is gone.
    fn finish_update(
        &mut self,
        rt: &ResourceType,
        old: Arc<Value>,
        mut new: Value,
    ) -> ApiResult<Value> {
        // A Service keeps its allocated ClusterIP when an update leaves it out.
        if rt.group.is_empty() && rt.kind == "Service" && new["spec"].get("clusterIP").is_none() {
            for k in ["clusterIP", "clusterIPs"] {
                if let Some(v) = old["spec"].get(k) {
                    new["spec"][k] = v.clone();
                }
            }
        }
        let gen = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let gen = if spec_part(&old) != spec_part(&new) {
            gen + 1
        } else {
            gen
        };
        meta_mut(&mut new).insert("generation".into(), json!(gen));
        new["apiVersion"] = old["apiVersion"].clone();
        new["kind"] = old["kind"].clone();
        if comparable(&old) == comparable(&new) {
            return Ok(old.as_ref().clone());
        }
        let finalizers_done = new
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(|f| f.is_empty());
        if meta_str(&new, "deletionTimestamp").is_some() && finalizers_done {
            let gone = self.commit(rt, EventType::Deleted, new, Some(old));
            self.cascade(rt, &gone, false);
            return Ok(gone.as_ref().clone());
        }
        Ok(self
            .commit(rt, EventType::Modified, new, Some(old))
            .as_ref()
            .clone())
    }

    /// Server-side apply (creates the object when missing).
    pub fn apply(
        &mut self,
        rt: &ResourceType,
        key: &ObjKey,
        applied: &Value,
        force: bool,
        ctx: &WriteCtx,
    ) -> ApiResult<Value> {
        let now = now();
        let w = writer(ctx, &now);
        let existing = self.get(rt, key);
        if let (Some(want), Some(old)) = (
            meta_str(applied, "resourceVersion").filter(|s| !s.is_empty()),
            &existing,
        ) {
            if Some(want) != meta_str(old, "resourceVersion") {
                return Err(ApiError::conflict(
                    &rt.qualified(),
                    &key.1,
                    "the object has been modified; please apply your changes to the latest version and try again",
                ));
            }
        }
        let mut merged = apply::apply(existing.as_deref(), applied, force, &w)?;
        let meta = meta_mut(&mut merged);
        meta.insert("name".into(), json!(key.1));
        if rt.namespaced {
            meta.insert("namespace".into(), json!(key.0));
        }
        match existing {
            None => {
                let obj = self.prepare_create(
                    rt,
                    merged,
                    &WriteCtx {
                        raw: false,
                        ..ctx.clone()
                    },
                    &now,
                )?;
                Ok(self
                    .commit(rt, EventType::Added, obj, None)
                    .as_ref()
                    .clone())
            }
            Some(old) => {
                if ctx.scope == Scope::Main {
                    match old.get("status") {
                        Some(s) => merged["status"] = s.clone(),
                        None => {
                            if let Some(m) = merged.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
                self.finish_update(rt, old, merged)
            }
        }
    }
}

/// The store key of a kind.
pub fn gk(rt: &ResourceType) -> GroupKind {
    (rt.group.clone(), rt.kind.clone())
}

fn writer<'a>(ctx: &'a WriteCtx, now: &'a str) -> Writer<'a> {
    Writer {
        manager: &ctx.manager,
        api_version: &ctx.api_version,
        now,
        scope: ctx.scope,
    }
}
