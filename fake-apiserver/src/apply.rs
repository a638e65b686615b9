//! Patches and field ownership: merge / JSON / strategic patches, server-side apply, and
//! `metadata.managedFields` bookkeeping.
//!
//! Ownership is tracked per leaf field path (maps are recursed into; lists and scalars are
//! owned whole, i.e. every list is treated as atomic). An apply conflicts with another manager
//! that owns an overlapping path holding a different value; fields a manager applied before and
//! leaves out now are removed unless another manager also owns them.

use crate::error::{ApiError, ApiResult};
use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// One field path (map keys from the root).
pub type FieldPath = Vec<String>;
/// A set of owned field paths.
pub type FieldSet = BTreeSet<FieldPath>;

/// Which part of the object a write may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything (kinds without a status subresource, or test-side writes).
    All,
    /// Everything but `.status` (main resource of a kind with a status subresource).
    Main,
    /// Only `.status` (the `/status` subresource).
    Status,
}

/// Metadata fields that are never owned by managers.
const UNOWNED_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

fn in_scope(path: &[String], scope: Scope) -> bool {
    match path.first().map(String::as_str) {
        Some("apiVersion" | "kind") | None => false,
        Some("metadata") => {
            scope != Scope::Status
                && !path
                    .get(1)
                    .is_some_and(|k| UNOWNED_META.contains(&k.as_str()))
        }
        Some("status") => scope != Scope::Main,
        Some(_) => scope != Scope::Status,
    }
}

/// The leaf paths of `v` within `scope`.
pub fn leaf_paths(v: &Value, scope: Scope) -> FieldSet {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut FieldSet, scope: Scope) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    path.push(k.clone());
                    if path.len() > 2 || in_scope(path, scope) {
                        walk(child, path, out, scope);
                    }
                    path.pop();
                }
            }
            _ => {
                if !path.is_empty() && in_scope(path, scope) {
                    out.insert(path.clone());
                }
            }
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut Vec::new(), &mut out, scope);
    out
}

/// The value at `path`, if any.
pub fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, k| cur.get(k))
}

fn remove_path(v: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for k in parents {
        match cur.get_mut(k) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Keeps only the parts of `v` a write in `scope` may set.
pub fn restrict(v: &Value, scope: Scope) -> Value {
    let mut out = v.clone();
    if let Some(m) = out.as_object_mut() {
        match scope {
            Scope::All => {}
            Scope::Main => {
                m.remove("status");
            }
            Scope::Status => m.retain(|k, _| k == "status"),
        }
    }
    out
}

/// Recursive merge where maps merge, everything else replaces, and null deletes (RFC 7386).
pub fn merge_into(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// Strategic merge patch approximated as a JSON merge patch (lists are replaced whole).
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    merge_into(target, patch);
}

/// Applies an RFC 6902 JSON patch.
pub fn json_patch(target: &mut Value, patch: &Value) -> ApiResult<()> {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
    json_patch::patch(target, &ops.0)
        .map_err(|e| ApiError::invalid("object", "", format!("JSON patch failed: {e}")))
}

/// One `managedFields` entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Manager {
    /// Manager name (`fieldManager`).
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// `status` for writes through the status subresource.
    pub subresource: Option<String>,
    /// apiVersion the write used.
    pub api_version: String,
    /// When the entry's field set last changed.
    pub time: String,
    /// Owned leaf paths.
    pub fields: FieldSet,
}

fn encode_fields(set: &FieldSet) -> Value {
    let mut root = Value::Object(Map::new());
    for path in set {
        let mut cur = &mut root;
        for k in path {
            let Value::Object(m) = cur else { break };
            cur = m
                .entry(format!("f:{k}"))
                .or_insert_with(|| Value::Object(Map::new()));
        }
    }
    root
}

fn decode_fields(v: &Value) -> FieldSet {
    fn walk(v: &Value, path: &mut FieldPath, out: &mut FieldSet) {
        let Some(m) = v.as_object() else { return };
        if (m.is_empty() || m.contains_key(".")) && !path.is_empty() {
            out.insert(path.clone());
        }
        for (k, child) in m {
            if k == "." {
                continue;
            }
            let seg = k.strip_prefix("f:").unwrap_or(k);
            path.push(seg.to_string());
            walk(child, path, out);
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// Reads `metadata.managedFields`.
pub fn read_managers(obj: &Value) -> Vec<Manager> {
    let Some(entries) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| {
            Some(Manager {
                manager: e.get("manager")?.as_str()?.to_string(),
                operation: e.get("operation")?.as_str()?.to_string(),
                subresource: e
                    .get("subresource")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                api_version: e
                    .get("apiVersion")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                time: e
                    .get("time")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                fields: e.get("fieldsV1").map(decode_fields).unwrap_or_default(),
            })
        })
        .collect()
}

/// Writes `metadata.managedFields` (entries with no fields are dropped).
pub fn write_managers(obj: &mut Value, managers: &[Manager]) {
    let entries: Vec<Value> = managers
        .iter()
        .filter(|m| !m.fields.is_empty())
        .map(|m| {
            let mut e = serde_json::json!({
                "manager": m.manager,
                "operation": m.operation,
                "apiVersion": m.api_version,
                "time": m.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": encode_fields(&m.fields),
            });
            if let Some(s) = &m.subresource {
                e["subresource"] = Value::String(s.clone());
            }
            e
        })
        .collect();
    if !obj.get("metadata").is_some_and(Value::is_object) {
        if entries.is_empty() {
            return;
        }
        obj["metadata"] = Value::Object(Map::new());
    }
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

fn subresource(scope: Scope) -> Option<String> {
    (scope == Scope::Status).then(|| "status".to_string())
}

fn upsert(managers: &mut Vec<Manager>, new: Manager) {
    match managers.iter_mut().find(|m| {
        m.manager == new.manager && m.operation == new.operation && m.subresource == new.subresource
    }) {
        Some(m) => {
            if m.fields != new.fields {
                m.time = new.time;
            }
            m.fields = new.fields;
            m.api_version = new.api_version;
        }
        None => managers.push(new),
    }
}

/// Who is writing, for managedFields.
pub struct Writer<'a> {
    /// `fieldManager` (or the default derived from the user agent).
    pub manager: &'a str,
    /// apiVersion of the request.
    pub api_version: &'a str,
    /// Current time (RFC 3339).
    pub now: &'a str,
    /// Part of the object the write may touch.
    pub scope: Scope,
}

/// Records an `Update` operation: changed fields move to `w.manager`, removed fields are
/// dropped from every manager. `new` gets the resulting managedFields.
pub fn track_update(old: Option<&Value>, new: &mut Value, w: &Writer) {
    let mut managers = old.map(read_managers).unwrap_or_default();
    let new_leaves = leaf_paths(new, w.scope);
    let changed: FieldSet = new_leaves
        .iter()
        .filter(|p| old.and_then(|o| get_path(o, p)) != get_path(new, p))
        .cloned()
        .collect();
    let removed: FieldSet = old
        .map(|o| leaf_paths(o, w.scope))
        .unwrap_or_default()
        .into_iter()
        .filter(|p| get_path(new, p).is_none())
        .collect();
    for m in managers.iter_mut() {
        m.fields.retain(|q| {
            !changed.iter().any(|p| overlaps(p, q)) && !removed.iter().any(|p| overlaps(p, q))
        });
    }
    if !changed.is_empty() {
        let mut fields = managers
            .iter()
            .find(|m| {
                m.manager == w.manager
                    && m.operation == "Update"
                    && m.subresource == subresource(w.scope)
            })
            .map(|m| m.fields.clone())
            .unwrap_or_default();
        fields.extend(changed);
        upsert(
            &mut managers,
            Manager {
                manager: w.manager.to_string(),
                operation: "Update".into(),
                subresource: subresource(w.scope),
                api_version: w.api_version.to_string(),
                time: w.now.to_string(),
                fields,
            },
        );
    }
    write_managers(new, &managers);
}

/// Server-side apply of `applied` onto `existing` (None: create). Returns the merged object
/// with managedFields updated, or a 409 listing the conflicts when `force` is false.
pub fn apply(
    existing: Option<&Value>,
    applied: &Value,
    force: bool,
    w: &Writer,
) -> ApiResult<Value> {
    let applied = restrict(applied, w.scope);
    let new_paths = leaf_paths(&applied, w.scope);
    let mut managers = existing.map(read_managers).unwrap_or_default();
    let mut merged = existing
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()));

    // Conflicts: another manager owns an overlapping path whose value would change.
    let mut conflicts: Vec<(String, String)> = Vec::new();
    let mut taken: Vec<(usize, FieldPath)> = Vec::new();
    for (i, m) in managers.iter().enumerate() {
        if m.manager == w.manager {
            continue;
        }
        for q in &m.fields {
            if new_paths.iter().any(|p| overlaps(p, q))
                && get_path(&merged, q) != get_path(&applied, q)
            {
                conflicts.push((m.manager.clone(), format!(".{}", q.join("."))));
                taken.push((i, q.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(ApiError::apply_conflict(&conflicts));
    }
    for (i, q) in taken {
        if let Some(m) = managers.get_mut(i) {
            m.fields.remove(&q);
        }
    }

    // Fields this manager applied before and leaves out now are removed, unless co-owned.
    let sub = subresource(w.scope);
    let previous = managers
        .iter()
        .find(|m| m.manager == w.manager && m.operation == "Apply" && m.subresource == sub)
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    for p in previous.difference(&new_paths) {
        let co_owned = managers.iter().any(|m| {
            !(m.manager == w.manager && m.operation == "Apply" && m.subresource == sub)
                && m.fields.iter().any(|q| overlaps(p, q))
        });
        if !co_owned && !new_paths.iter().any(|n| overlaps(n, p)) {
            remove_path(&mut merged, p);
        }
    }

    merge_applied(&mut merged, &applied);
    upsert(
        &mut managers,
        Manager {
            manager: w.manager.to_string(),
            operation: "Apply".into(),
            subresource: sub,
            api_version: w.api_version.to_string(),
            time: w.now.to_string(),
            fields: new_paths,
        },
    );
    write_managers(&mut merged, &managers);
    Ok(merged)
}

/// Merges an applied configuration: maps merge recursively, other values replace.
fn merge_applied(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(t), Value::Object(a)) => {
            for (k, v) in a {
                if k == "managedFields" {
                    continue;
                }
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_applied(existing, v)
                    }
                    _ if v.is_null() => {
                        t.remove(k);
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, a) => *t = a.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn w(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            api_version: "apps/v1",
            now: "2025-01-01T00:00:00Z",
            scope: Scope::Main,
        }
    }

    #[test]
    fn fields_round_trip() {
        let obj = json!({"apiVersion": "v1", "kind": "X",
            "metadata": {"name": "n", "labels": {"a": "1"}}, "spec": {"r": 1, "l": [1, 2], "e": {}}});
        let set = leaf_paths(&obj, Scope::All);
        let want: FieldSet = [
            vec!["metadata", "labels", "a"],
            vec!["spec", "r"],
            vec!["spec", "l"],
            vec!["spec", "e"],
        ]
        .into_iter()
        .map(|p| p.into_iter().map(String::from).collect())
        .collect();
        assert_eq!(set, want);
        assert_eq!(decode_fields(&encode_fields(&set)), set);
    }

    #[test]
    fn apply_removes_dropped_fields_and_detects_conflicts() {
        let a1 = json!({"metadata": {"name": "d", "labels": {"x": "1", "y": "2"}}, "spec": {"replicas": 1}});
        let o1 = apply(None, &a1, false, &w("alpha")).unwrap();
        let a2 = json!({"metadata": {"name": "d", "labels": {"x": "1"}}, "spec": {"replicas": 1}});
        let o2 = apply(Some(&o1), &a2, false, &w("alpha")).unwrap();
        assert_eq!(o2["metadata"]["labels"], json!({"x": "1"}));
        let b = json!({"spec": {"replicas": 3}});
        let err = apply(Some(&o2), &b, false, &w("beta")).unwrap_err();
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        assert!(err.message.contains("alpha"), "{}", err.message);
        // The same value is shared ownership, not a conflict.
        let same = json!({"spec": {"replicas": 1}});
        let o3 = apply(Some(&o2), &same, false, &w("beta")).unwrap();
        assert_eq!(read_managers(&o3).len(), 2);
        let o4 = apply(Some(&o2), &b, true, &w("beta")).unwrap();
        assert_eq!(o4["spec"]["replicas"], 3);
        let ms = read_managers(&o4);
        let alpha = ms.iter().find(|m| m.manager == "alpha").unwrap();
        assert!(!alpha
            .fields
            .contains(&vec!["spec".to_string(), "replicas".to_string()]));
    }

    #[test]
    fn update_moves_ownership() {
        let o1 = apply(None, &json!({"spec": {"a": 1}}), false, &w("alpha")).unwrap();
        let mut o2 = o1.clone();
        o2["spec"]["a"] = json!(2);
        track_update(Some(&o1), &mut o2, &w("editor"));
        let err = apply(Some(&o2), &json!({"spec": {"a": 1}}), false, &w("alpha")).unwrap_err();
        assert!(err.message.contains("editor"), "{}", err.message);
    }
}
