//! `POST /apis/authentication.k8s.io/v1/tokenreviews` against tokens registered by the test.

use crate::error::{ApiError, ApiResult};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

/// The audience a token is bound to when a test registers it with no audiences, and the
/// audience a review with no `spec.audiences` checks against (the API server's own).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// What a registered token authenticates as.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenInfo {
    /// `system:serviceaccount:<ns>:<sa>` for a service-account token.
    pub username: String,
    /// The user's uid (the service account's uid).
    pub uid: String,
    /// Groups, e.g. `system:serviceaccounts`, `system:serviceaccounts:<ns>`.
    pub groups: Vec<String>,
    /// Audiences the token was issued for; empty means [`API_AUDIENCE`].
    pub audiences: Vec<String>,
    /// Extra attributes, e.g. `authentication.kubernetes.io/pod-name`.
    pub extra: BTreeMap<String, Vec<String>>,
    /// An expired token never authenticates.
    pub expired: bool,
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Answers one TokenReview request body.
pub fn review(tokens: &HashMap<String, TokenInfo>, body: &Value) -> ApiResult<Value> {
    let spec = body.get("spec").cloned().unwrap_or_else(|| json!({}));
    let token = spec
        .get("token")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if token.is_empty() {
        return Err(ApiError::bad_request(
            "token is required for TokenReview in authentication",
        ));
    }
    let mut wanted = strings(spec.get("audiences"));
    if wanted.is_empty() {
        wanted = vec![API_AUDIENCE.to_string()];
    }
    let fail = |error: String| json!({"authenticated": false, "user": {}, "error": error});
    let status = match tokens.get(token) {
        None => fail("[invalid bearer token, token lookup failed]".into()),
        Some(t) if t.expired => {
            fail("[invalid bearer token, service account token has expired]".into())
        }
        Some(t) => {
            let issued = if t.audiences.is_empty() {
                vec![API_AUDIENCE.to_string()]
            } else {
                t.audiences.clone()
            };
            let common: Vec<String> = wanted
                .iter()
                .filter(|a| issued.contains(a))
                .cloned()
                .collect();
            if common.is_empty() {
                fail(format!(
                    "[invalid bearer token, token audiences {issued:?} is invalid for the target audiences {wanted:?}]"
                ))
            } else {
                let mut user = json!({"username": t.username, "uid": t.uid, "groups": t.groups});
                if !t.extra.is_empty() {
                    user["extra"] = json!(t.extra);
                }
                json!({"authenticated": true, "user": user, "audiences": common})
            }
        }
    };
    Ok(json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": spec,
        "status": status,
    }))
}
