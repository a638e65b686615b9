//! HTTP routing: resource paths (core and groups, namespaced and cluster-wide, `/status`),
//! verbs (get, list, watch, create, update, patch, delete, deletecollection), discovery, and
//! `Status` error bodies.

use crate::apply::{self, Scope};
use crate::error::{ApiError, ApiResult};
use crate::resources::ResourceType;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{key_of, DeleteOpts, Deleted, ObjKey, WriteCtx};
use crate::watch::{self, WatchParams};
use crate::{RequestRecord, Shared};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// Response body: a full JSON document or a watch stream.
pub(crate) type Body = BoxBody<Bytes, Infallible>;

pub(crate) fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(empty()))
}

/// A resolved resource URL.
struct Target {
    rt: ResourceType,
    version: String,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

enum Route {
    Version,
    CoreVersions,
    Groups,
    Resources(String, String),
    TokenReview,
    Resource(Target),
}

fn route(shared: &Shared, path: &str) -> ApiResult<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Ok(Route::Version),
        ["api"] => return Ok(Route::CoreVersions),
        ["apis"] => return Ok(Route::Groups),
        ["api", v] => return Ok(Route::Resources(String::new(), v.to_string())),
        ["apis", g, v] => return Ok(Route::Resources(g.to_string(), v.to_string())),
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => return Ok(Route::TokenReview),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::no_route(path)),
    };
    let (ns, plural, tail) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if !(tail.is_empty() && matches!(*plural, "status" | "finalize")) =>
        {
            (Some(ns.to_string()), *plural, tail)
        }
        [plural, tail @ ..] => (None, *plural, tail),
        [] => return Err(ApiError::no_route(path)),
    };
    let (name, status) = match tail {
        [] => (None, false),
        [name] => (Some(name.to_string()), false),
        [name, "status"] => (Some(name.to_string()), true),
        _ => return Err(ApiError::no_route(path)),
    };
    let rt = shared
        .lock()
        .registry
        .by_plural(group, version, plural)
        .cloned()
        .ok_or_else(|| ApiError::no_route(path))?;
    if (ns.is_some() && !rt.namespaced) || (status && !rt.status_subresource) {
        return Err(ApiError::no_route(path));
    }
    if ns.as_deref().is_some_and(str::is_empty) || name.as_deref().is_some_and(str::is_empty) {
        return Err(ApiError::no_route(path));
    }
    Ok(Route::Resource(Target {
        rt,
        version: version.to_string(),
        ns,
        name,
        status,
    }))
}

/// Serves one request; every failure becomes a `Status` response.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header("content-type");
    let user_agent = header("user-agent").unwrap_or_default();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let err = ApiError::bad_request(format!("reading the request body: {e}"));
            return Ok(json_response(err.code, &err.status()));
        }
    };
    let q: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let ctx = Req {
        method: &method,
        q: &q,
        content_type: content_type.as_deref().unwrap_or_default(),
        user_agent: &user_agent,
        body: &body,
    };
    let resp = match dispatch(&shared, &path, &ctx).await {
        Ok(r) => r,
        Err(e) => json_response(e.code, &e.status()),
    };
    shared.record(RequestRecord {
        method: method.to_string(),
        path,
        query,
        content_type,
        status: resp.status().as_u16(),
    });
    Ok(resp)
}

struct Req<'a> {
    method: &'a Method,
    q: &'a HashMap<String, String>,
    content_type: &'a str,
    user_agent: &'a str,
    body: &'a Bytes,
}

impl Req<'_> {
    fn q(&self, k: &str) -> &str {
        self.q.get(k).map(String::as_str).unwrap_or_default()
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.q(k), "true" | "1")
    }

    fn json_body(&self) -> ApiResult<Value> {
        if self.body.is_empty() {
            return Err(ApiError::bad_request("the request body is empty"));
        }
        serde_json::from_slice(self.body).or_else(|e| {
            if self.content_type.contains("yaml") {
                serde_yaml_ng::from_slice(self.body)
                    .map_err(|e| ApiError::bad_request(format!("invalid YAML body: {e}")))
            } else {
                Err(ApiError::bad_request(format!("invalid JSON body: {e}")))
            }
        })
    }

    fn write_ctx(&self, t: &Target) -> WriteCtx {
        let manager = match self.q("fieldManager") {
            "" => self
                .user_agent
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string(),
            m => m.to_string(),
        };
        WriteCtx {
            scope: match (t.status, t.rt.status_subresource) {
                (true, _) => Scope::Status,
                (false, true) => Scope::Main,
                (false, false) => Scope::All,
            },
            raw: false,
            manager: if manager.is_empty() {
                "unknown".into()
            } else {
                manager
            },
            api_version: t.rt.api_version(&t.version),
        }
    }
}

async fn dispatch(shared: &Arc<Shared>, path: &str, r: &Req<'_>) -> ApiResult<Response<Body>> {
    let t = match route(shared, path)? {
        Route::Version => {
            return Ok(json_response(
                200,
                &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0",
                "platform": "linux/amd64", "goVersion": "go1.24.0", "compiler": "gc"}),
            ))
        }
        Route::CoreVersions => {
            return Ok(json_response(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}]}),
            ))
        }
        Route::Groups => {
            return Ok(json_response(
                200,
                &crate::discovery::groups(&shared.lock().registry),
            ))
        }
        Route::Resources(g, v) => {
            return crate::discovery::resources(&shared.lock().registry, &g, &v)
                .map(|list| json_response(200, &list))
                .ok_or_else(|| ApiError::no_route(path))
        }
        Route::TokenReview => {
            if *r.method != Method::POST {
                return Err(ApiError::method_not_allowed(r.method.as_str()));
            }
            let body = r.json_body()?;
            let tokens = shared
                .tokens
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            return crate::tokenreview::review(&tokens, &body).map(|v| json_response(201, &v));
        }
        Route::Resource(t) => t,
    };
    let name = t.name.clone();
    match (r.method.clone(), name.as_deref()) {
        (Method::GET, None) if r.flag("watch") => watch_request(shared, t, r).await,
        (Method::GET, None) => list(shared, &t, r),
        (Method::GET, Some(name)) => {
            let key = key(&t, name);
            let obj = shared.lock().get(&t.rt, &key);
            obj.map(|o| json_response(200, &render(&o, &t)))
                .ok_or_else(|| ApiError::not_found(&t.rt.qualified(), name))
        }
        (Method::POST, None) => create(shared, &t, r),
        (Method::PUT, Some(name)) => replace(shared, &t, name, r),
        (Method::PATCH, Some(name)) => patch(shared, &t, name, r),
        (Method::DELETE, Some(name)) => delete(shared, &t, name, r),
        (Method::DELETE, None) => delete_collection(shared, &t, r),
        (m, _) => Err(ApiError::method_not_allowed(m.as_str())),
    }
}

fn key(t: &Target, name: &str) -> ObjKey {
    (t.ns.clone().unwrap_or_default(), name.to_string())
}

/// The stored object as the requested version shows it.
fn render(obj: &Value, t_or: &Target) -> Value {
    let mut o = obj.clone();
    o["apiVersion"] = json!(t_or.rt.api_version(&t_or.version));
    o["kind"] = json!(t_or.rt.kind);
    o
}

fn check_kind(t: &Target, obj: &Value) -> ApiResult<()> {
    let kind = obj.get("kind").and_then(Value::as_str);
    let api_version = obj.get("apiVersion").and_then(Value::as_str);
    if kind.is_some_and(|k| k != t.rt.kind)
        || api_version.is_some_and(|v| v != t.rt.api_version(&t.version))
    {
        return Err(ApiError::bad_request(format!(
            "the object kind/apiVersion ({}/{}) does not match the request ({}/{})",
            api_version.unwrap_or_default(),
            kind.unwrap_or_default(),
            t.rt.api_version(&t.version),
            t.rt.kind
        )));
    }
    Ok(())
}

/// Sets the namespace from the path (400 when the body names another one).
fn default_namespace(t: &Target, obj: &mut Value) -> ApiResult<()> {
    if let Some(ns) = &t.ns {
        let given = key_of(obj).0;
        if !given.is_empty() && given != *ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        if !obj.get("metadata").is_some_and(Value::is_object) {
            obj["metadata"] = json!({});
        }
        obj["metadata"]["namespace"] = json!(ns);
    }
    Ok(())
}

fn list(shared: &Shared, t: &Target, r: &Req) -> ApiResult<Response<Body>> {
    let labels = LabelSelector::parse(r.q("labelSelector"))?;
    let fields = FieldSelector::parse(r.q("fieldSelector"), &t.rt)?;
    let limit: usize = match r.q("limit") {
        "" => 0,
        l => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
    };
    let cont = match r.q("continue") {
        "" => None,
        c => Some(decode_continue(c)?),
    };
    let exact = match (r.q("resourceVersionMatch"), r.q("resourceVersion")) {
        ("Exact", rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
        _ => None,
    };
    let state = shared.lock();
    let at = cont.as_ref().map(|(rv, _)| *rv).or(exact);
    let list_rv = at.unwrap_or(state.rv());
    let all = state.list(&t.rt, t.ns.as_deref(), at).map_err(|e| {
        if cont.is_some() {
            ApiError { message: "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(), ..e }
        } else {
            e
        }
    })?;
    drop(state);
    let selected: Vec<&Arc<Value>> = all
        .iter()
        .filter(|o| labels.matches(o) && fields.matches(o))
        .filter(|o| cont.as_ref().is_none_or(|(_, after)| key_of(o) > *after))
        .collect();
    let page_len = if limit > 0 {
        limit.min(selected.len())
    } else {
        selected.len()
    };
    let items: Vec<Value> = selected[..page_len].iter().map(|o| render(o, t)).collect();
    let remaining = selected.len() - page_len;
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if remaining > 0 && page_len > 0 {
        meta["continue"] = json!(encode_continue(list_rv, &key_of(selected[page_len - 1])));
        if r.q("labelSelector").is_empty() && r.q("fieldSelector").is_empty() {
            meta["remainingItemCount"] = json!(remaining);
        }
    }
    Ok(json_response(
        200,
        &json!({
            "kind": format!("{}List", t.rt.kind),
            "apiVersion": t.rt.api_version(&t.version),
            "metadata": meta,
            "items": items,
        }),
    ))
}

fn encode_continue(rv: u64, after: &ObjKey) -> String {
    let raw = json!({"rv": rv, "ns": after.0, "name": after.1}).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(tok: &str) -> ApiResult<(u64, ObjKey)> {
    let bad = || ApiError::bad_request("continue key is not valid");
    let bytes: Vec<u8> = (0..tok.len())
        .step_by(2)
        .map(|i| {
            tok.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    Ok((
        v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?,
        (s("ns").ok_or_else(bad)?, s("name").ok_or_else(bad)?),
    ))
}

async fn watch_request(shared: &Arc<Shared>, t: Target, r: &Req<'_>) -> ApiResult<Response<Body>> {
    let labels = LabelSelector::parse(r.q("labelSelector"))?;
    let fields = FieldSelector::parse(r.q("fieldSelector"), &t.rt)?;
    let rv = match r.q("resourceVersion") {
        "" | "0" => None,
        rv => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let send_initial = r.flag("sendInitialEvents");
    let timeout = match r.q("timeoutSeconds") {
        "" => None,
        s => Some(Duration::from_secs(s.parse().map_err(|_| {
            ApiError::bad_request(format!("invalid timeoutSeconds {s:?}"))
        })?)),
    };
    let p = WatchParams {
        rt: t.rt,
        version: t.version,
        ns: t.ns,
        labels,
        fields,
        // sendInitialEvents starts from the current state whatever the RV says.
        rv: if send_initial { None } else { rv },
        initial_events_end: send_initial,
        bookmarks: r.flag("allowWatchBookmarks"),
        timeout,
    };
    Ok(watch::serve(shared.clone(), p).await)
}

fn create(shared: &Shared, t: &Target, r: &Req) -> ApiResult<Response<Body>> {
    if t.status {
        return Err(ApiError::method_not_allowed("POST"));
    }
    let mut obj = r.json_body()?;
    check_kind(t, &obj)?;
    default_namespace(t, &mut obj)?;
    if t.rt.namespaced && t.ns.is_none() {
        return Err(ApiError::method_not_allowed("POST"));
    }
    let ctx = r.write_ctx(t);
    let created = shared.write(|s| s.create(&t.rt, obj, &ctx))?;
    Ok(json_response(201, &render(&created, t)))
}

fn replace(shared: &Shared, t: &Target, name: &str, r: &Req) -> ApiResult<Response<Body>> {
    let mut obj = r.json_body()?;
    check_kind(t, &obj)?;
    default_namespace(t, &mut obj)?;
    match key_of(&obj).1.as_str() {
        "" => obj["metadata"]["name"] = json!(name),
        n if n != name => {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ))
        }
        _ => {}
    }
    let ctx = r.write_ctx(t);
    let key = key(t, name);
    let updated = shared.write(|s| s.replace(&t.rt, &key, obj, &ctx))?;
    Ok(json_response(200, &render(&updated, t)))
}

fn patch(shared: &Shared, t: &Target, name: &str, r: &Req) -> ApiResult<Response<Body>> {
    let ct = r.content_type.split(';').next().unwrap_or_default().trim();
    let body = r.json_body()?;
    let ctx = r.write_ctx(t);
    let key = key(t, name);
    let force = r.flag("force");
    if ct == "application/apply-patch+yaml" {
        if r.q("fieldManager").is_empty() {
            return Err(ApiError::bad_request(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            ));
        }
        if body.get("kind").is_none() || body.get("apiVersion").is_none() {
            return Err(ApiError::bad_request(
                "apply patch must set apiVersion and kind",
            ));
        }
        check_kind(t, &body)?;
        let body_name = key_of(&body).1;
        if body_name != name {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        if t.ns
            .as_ref()
            .is_some_and(|ns| !key_of(&body).0.is_empty() && key_of(&body).0 != *ns)
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let (created, obj) = shared.write(|s| {
            let existed = s.get(&t.rt, &key).is_some();
            s.apply(&t.rt, &key, &body, force, &ctx)
                .map(|o| (!existed, o))
        })?;
        return Ok(json_response(
            if created { 201 } else { 200 },
            &render(&obj, t),
        ));
    }
    if force {
        return Err(ApiError::bad_request(
            "force may only be specified with apply patch",
        ));
    }
    let updated = shared.write(|s| {
        let current = s
            .get(&t.rt, &key)
            .ok_or_else(|| ApiError::not_found(&t.rt.qualified(), name))?;
        let mut doc = render(&current, t);
        match ct {
            "application/merge-patch+json" => apply::merge_into(&mut doc, &body),
            "application/strategic-merge-patch+json" => apply::strategic_merge(&mut doc, &body),
            "application/json-patch+json" => apply::json_patch(&mut doc, &body)?,
            other => return Err(ApiError::unsupported_media(other)),
        }
        s.replace(&t.rt, &key, doc, &ctx)
    })?;
    Ok(json_response(200, &render(&updated, t)))
}

fn delete_opts(r: &Req) -> ApiResult<DeleteOpts> {
    let body: Value = if r.body.is_empty() {
        json!({})
    } else {
        r.json_body()?
    };
    let s = |p: &str| body.pointer(p).and_then(Value::as_str).map(str::to_string);
    let policy = s("/propagationPolicy").unwrap_or_else(|| r.q("propagationPolicy").to_string());
    if !matches!(policy.as_str(), "" | "Orphan" | "Background" | "Foreground") {
        return Err(ApiError::bad_request(format!(
            "invalid propagationPolicy {policy:?}"
        )));
    }
    Ok(DeleteOpts {
        uid: s("/preconditions/uid"),
        resource_version: s("/preconditions/resourceVersion"),
        orphan: policy == "Orphan",
    })
}

fn delete(shared: &Shared, t: &Target, name: &str, r: &Req) -> ApiResult<Response<Body>> {
    if t.status {
        return Err(ApiError::method_not_allowed("DELETE"));
    }
    let opts = delete_opts(r)?;
    let key = key(t, name);
    match shared.write(|s| s.delete(&t.rt, &key, &opts))? {
        Deleted::Pending(obj) => Ok(json_response(200, &render(&obj, t))),
        Deleted::Gone(obj) => {
            let mut details = json!({"name": name, "kind": t.rt.plural,
                "uid": obj.pointer("/metadata/uid").cloned().unwrap_or(Value::Null)});
            if !t.rt.group.is_empty() {
                details["group"] = json!(t.rt.group);
            }
            Ok(json_response(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Success", "details": details}),
            ))
        }
    }
}

fn delete_collection(shared: &Shared, t: &Target, r: &Req) -> ApiResult<Response<Body>> {
    let labels = LabelSelector::parse(r.q("labelSelector"))?;
    let fields = FieldSelector::parse(r.q("fieldSelector"), &t.rt)?;
    let opts = delete_opts(r)?;
    let items = shared.write(|s| {
        let victims = s.list(&t.rt, t.ns.as_deref(), None)?;
        let mut out = Vec::new();
        for v in victims
            .iter()
            .filter(|o| labels.matches(o) && fields.matches(o))
        {
            match s.delete(&t.rt, &key_of(v), &opts) {
                Ok(Deleted::Pending(o) | Deleted::Gone(o)) => out.push(render(&o, t)),
                // A cascade from an earlier item may already have removed this one.
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    })?;
    let rv = shared.lock().rv();
    Ok(json_response(
        200,
        &json!({"kind": format!("{}List", t.rt.kind),
        "apiVersion": t.rt.api_version(&t.version),
        "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
    ))
}
