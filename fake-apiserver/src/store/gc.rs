//! Deletion: finalizers, preconditions, namespace contents, and ownerReference garbage
//! collection (background propagation, or orphaning on request).

use super::{gk, key_of, meta_mut, meta_str, now, DeleteOpts, Deleted, EventType, ObjKey, State};
use crate::error::{ApiError, ApiResult};
use crate::resources::ResourceType;
use serde_json::{json, Value};

impl State {
    /// Deletes an object: sets deletionTimestamp while finalizers remain, otherwise removes it
    /// and garbage-collects what it owned.
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        key: &ObjKey,
        opts: &DeleteOpts,
    ) -> ApiResult<Deleted> {
        let Some(old) = self.get(rt, key) else {
            return Err(ApiError::not_found(&rt.qualified(), &key.1));
        };
        if let Some(uid) = &opts.uid {
            if Some(uid.as_str()) != meta_str(&old, "uid") {
                return Err(ApiError::conflict(
                    &rt.qualified(),
                    &key.1,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta_str(&old, "uid").unwrap_or_default()
                    ),
                ));
            }
        }
        if let Some(rv) = &opts.resource_version {
            if Some(rv.as_str()) != meta_str(&old, "resourceVersion") {
                return Err(ApiError::conflict(
                    &rt.qualified(),
                    &key.1,
                    &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}", meta_str(&old, "resourceVersion").unwrap_or_default()),
                ));
            }
        }
        let has_finalizers = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if meta_str(&old, "deletionTimestamp").is_some() {
                return Ok(Deleted::Pending(old.as_ref().clone()));
            }
            let mut new = old.as_ref().clone();
            let meta = meta_mut(&mut new);
            meta.insert("deletionTimestamp".into(), json!(now()));
            meta.insert("deletionGracePeriodSeconds".into(), json!(0));
            let obj = self.commit(rt, EventType::Modified, new, Some(old));
            return Ok(Deleted::Pending(obj.as_ref().clone()));
        }
        let gone = self.commit(rt, EventType::Deleted, old.as_ref().clone(), Some(old));
        self.cascade(rt, &gone, opts.orphan);
        Ok(Deleted::Gone(gone.as_ref().clone()))
    }

    /// After a removal: a namespace takes its contents with it; dependents whose owners are all
    /// gone are deleted (background propagation), or orphaned on request.
    pub(super) fn cascade(&mut self, rt: &ResourceType, gone: &Value, orphan: bool) {
        let mut doomed: Vec<(ResourceType, ObjKey)> = Vec::new();
        let mut orphans: Vec<(ResourceType, ObjKey)> = Vec::new();
        let uid = meta_str(gone, "uid").unwrap_or_default().to_string();
        let ns_gone = (rt.group.is_empty() && rt.kind == "Namespace").then(|| key_of(gone).1);
        for t in self.registry.all().to_vec() {
            let Some(store) = self.objects.get(&gk(&t)) else {
                continue;
            };
            for (key, obj) in store {
                if ns_gone
                    .as_deref()
                    .is_some_and(|ns| t.namespaced && key.0 == ns)
                {
                    doomed.push((t.clone(), key.clone()));
                    continue;
                }
                let owners: Vec<&str> = obj
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .map(|refs| refs.iter().filter_map(|r| r.get("uid")?.as_str()).collect())
                    .unwrap_or_default();
                if !self.gc_enabled || uid.is_empty() || !owners.contains(&uid.as_str()) {
                    continue;
                }
                if orphan {
                    orphans.push((t.clone(), key.clone()));
                } else if !owners.iter().any(|o| *o != uid && self.uid_exists(o)) {
                    doomed.push((t.clone(), key.clone()));
                }
            }
        }
        for (t, key) in orphans {
            if let Some(old) = self.get(&t, &key) {
                let mut new = old.as_ref().clone();
                if let Some(Value::Array(refs)) = new.pointer_mut("/metadata/ownerReferences") {
                    refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid.as_str()));
                }
                let _ = self.finish_update(&t, old, new);
            }
        }
        for (t, key) in doomed {
            // Already gone (deleted by an earlier cascade step) is fine.
            let _ = self.delete(&t, &key, &DeleteOpts::default());
        }
    }

    fn uid_exists(&self, uid: &str) -> bool {
        self.objects
            .values()
            .flat_map(|s| s.values())
            .any(|o| meta_str(o, "uid") == Some(uid))
    }
}
