//! Discovery documents (`/apis` group list, `/api/v1` and `/apis/{g}/{v}` resource lists)
//! generated from the registry.

use crate::resources::Registry;
use serde_json::{json, Value};

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// `APIGroupList` for `/apis`.
pub fn groups(reg: &Registry) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for t in reg.all().iter().filter(|t| !t.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, vs)) => {
                for v in &t.versions {
                    if !vs.contains(v) {
                        vs.push(v.clone());
                    }
                }
            }
            None => groups.push((t.group.clone(), t.versions.clone())),
        }
    }
    groups.push(("authentication.k8s.io".into(), vec!["v1".into()]));
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "preferredVersion": versions.first().cloned(), "versions": versions})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `APIResourceList` for one group version, or None when nothing is served there.
pub fn resources(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for t in reg
        .all()
        .iter()
        .filter(|t| t.group == group && t.versions.iter().any(|v| v == version))
    {
        resources.push(
            json!({"name": t.plural, "singularName": t.kind.to_lowercase(),
            "namespaced": t.namespaced, "kind": t.kind, "verbs": VERBS}),
        );
        if t.status_subresource {
            resources.push(
                json!({"name": format!("{}/status", t.plural), "singularName": "",
                "namespaced": t.namespaced, "kind": t.kind, "verbs": ["get", "patch", "update"]}),
            );
        }
    }
    if group == "authentication.k8s.io" && version == "v1" {
        resources.push(
            json!({"name": "tokenreviews", "singularName": "tokenreview",
            "namespaced": false, "kind": "TokenReview", "verbs": ["create"]}),
        );
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}
