//! Kubernetes-style documents (`apiVersion`/`kind`): compiles Istio `AuthorizationPolicy` to the
//! L4 `Authorization` model (with Istio's rules for L7-only fields: an ALLOW rule using them is
//! dropped, a DENY rule loses those parts), `PeerAuthentication` to `PeerAuthentication`, and
//! `Sidecar` to `SidecarScope`; keeps Gateways and Kubernetes resources verbatim as JSON
//! (VirtualService / DestinationRule / ServiceEntry are typed by [`super::l7`]). Fields
//! are walked by hand so every error carries its exact path (`spec.rules[0].to[0]...`) and
//! unknown fields are rejected rather than silently ignored.

use super::walk::{addresses, join, labels, mapping, plain, port, ports, sequence, string, Obj, R};
use super::{Collected, FieldError, Origin};
use crate::l7::attached::PolicyTarget;
use crate::model::{
    Authorization, Clause, EgressListener, MtlsMode, OutboundTrafficMode, PeerAuthentication,
    PolicyAction, PolicyScope, Rule, RuleMatch, SidecarScope, StringMatch,
};
use serde_yaml_ng::{Mapping, Value};
use std::collections::BTreeMap;

/// Loads one `apiVersion`/`kind` document. Errors carry the resource label when known.
pub(super) fn load(
    doc: usize,
    api_version: &str,
    kind: &str,
    value: &Value,
    out: &mut Collected,
) -> Result<(), (Option<String>, FieldError)> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let compiled = matches!(
        (group, kind),
        (
            "security.istio.io",
            "AuthorizationPolicy" | "PeerAuthentication"
        ) | ("networking.istio.io", "Sidecar")
    );
    let kept = matches!(
        (group, kind),
        ("networking.istio.io", "Gateway")
            | ("gateway.networking.k8s.io", "Gateway")
            | ("apps", "Deployment")
            | ("", "Service" | "Pod" | "ServiceAccount" | "Namespace")
    );
    let unsupported = |message: String| (None, FieldError::new("kind", message));
    if kept {
        let json = serde_json::to_value(value).map_err(|e| {
            (
                Some(kind.to_string()),
                FieldError::new("", format!("cannot be represented as JSON: {e}")),
            )
        })?;
        out.other_resources.push(json);
        return Ok(());
    }
    if !compiled {
        return Err(unsupported(format!(
            "unsupported kind {kind:?} (apiVersion {api_version}); supported: security.istio.io AuthorizationPolicy \
             and PeerAuthentication, networking.istio.io Sidecar, VirtualService, DestinationRule, ServiceEntry, \
             Gateway, gateway.networking.k8s.io Gateway, and Kubernetes Deployment, Service, Pod, ServiceAccount, \
             Namespace"
        )));
    }
    if group == "security.istio.io" && !matches!(version, "v1" | "v1beta1") {
        return Err((
            None,
            FieldError::new(
                "apiVersion",
                format!(
                    "unsupported version {api_version:?} (use security.istio.io/v1 or v1beta1)"
                ),
            ),
        ));
    }
    let kind_only = || Some(kind.to_string());
    let top = Obj::new(
        value,
        "",
        &["apiVersion", "kind", "metadata", "spec", "status"],
    )
    .map_err(|e| (kind_only(), e))?;
    let (name, namespace) = metadata(&top).map_err(|e| (kind_only(), e))?;
    let resource = format!("{kind} {namespace}/{name}");
    let origin = Origin {
        doc,
        resource: resource.clone(),
        field: String::new(),
    };
    let empty = Value::Mapping(Mapping::new());
    let spec = top.get("spec").map_or(&empty, |(v, _)| v);
    let result = match kind {
        "AuthorizationPolicy" => authorization_policy(spec, name, namespace).map(|(a, targets)| {
            if targets.is_empty() {
                out.policies.push((a, origin, true));
            } else {
                out.attached_l4.push((a, targets, doc));
            }
        }),
        "PeerAuthentication" => {
            peer_authentication(spec, name, namespace).map(|pa| out.peer_authentications.push(pa))
        }
        _ => sidecar(spec, name, namespace).map(|s| out.sidecars.push(s)),
    };
    result.map_err(|e| (Some(resource), e))
}

fn metadata(top: &Obj) -> R<(String, String)> {
    let Some((meta, path)) = top.get("metadata") else {
        return Err(FieldError::new(
            "metadata",
            "missing (metadata.name is required)",
        ));
    };
    let map = mapping(meta, &path)?;
    let name = match map.get("name") {
        Some(v) => string(v, "metadata.name")?,
        None => return Err(FieldError::new("metadata.name", "missing")),
    };
    if name.is_empty() {
        return Err(FieldError::new("metadata.name", "must not be empty"));
    }
    let namespace = match map.get("namespace").filter(|v| !v.is_null()) {
        Some(v) => string(v, "metadata.namespace")?,
        None => "default".to_string(),
    };
    Ok((name, namespace))
}

fn selector_labels(spec: &Obj, key: &str, labels_key: &str) -> R<BTreeMap<String, String>> {
    let Some((sel, path)) = spec.get(key) else {
        return Ok(BTreeMap::new());
    };
    let sel = Obj::new(sel, &path, &[labels_key])?;
    sel.get(labels_key)
        .map_or(Ok(BTreeMap::new()), |(v, p)| labels(v, &p))
}

/// Compiles an Istio AuthorizationPolicy, with the waypoint targets it is attached to (none for
/// a workload-scoped policy). The scope is provisional (`Namespace` or `WorkloadSelector`):
/// `Global` is decided once the root namespace is known.
pub fn authorization_policy(
    spec: &Value,
    name: String,
    namespace: String,
) -> R<(Authorization, Vec<PolicyTarget>)> {
    let spec = Obj::new(
        spec,
        "spec",
        &[
            "selector",
            "action",
            "rules",
            "provider",
            "targetRef",
            "targetRefs",
        ],
    )?;
    let targets = read_targets(&spec, &namespace)?;
    let selector = selector_labels(&spec, "selector", "matchLabels")?;
    if !targets.is_empty() && spec.get("selector").is_some() {
        return Err(FieldError::new(
            "spec.selector",
            "cannot be combined with targetRef/targetRefs",
        ));
    }
    let action = match spec.get("action") {
        None => PolicyAction::Allow,
        Some((v, p)) => match string(v, &p)?.as_str() {
            "ALLOW" => PolicyAction::Allow,
            "DENY" => PolicyAction::Deny,
            other @ ("AUDIT" | "CUSTOM") => {
                return Err(FieldError::new(
                    p,
                    format!(
                        "action {other} is not supported by the L4 data plane (use ALLOW or DENY)"
                    ),
                ))
            }
            other => {
                return Err(FieldError::new(
                    p,
                    format!("unknown action {other:?} (expected ALLOW or DENY)"),
                ))
            }
        },
    };
    if let Some((_, p)) = spec.get("provider") {
        return Err(FieldError::new(
            p,
            "provider is only valid with action CUSTOM, which is not supported",
        ));
    }
    let mut has_l7_rules = false;
    let mut rules = Vec::new();
    if let Some((v, p)) = spec.get("rules") {
        for (i, rule) in sequence(v, &p)?.iter().enumerate() {
            if let Some(rule) = compile_rule(rule, &format!("{p}[{i}]"), action, &mut has_l7_rules)?
            {
                rules.push(rule);
            }
        }
    }
    if has_l7_rules {
        tracing::warn!(
            policy = %format!("{namespace}/{name}"),
            "AuthorizationPolicy uses L7 fields the L4 data plane cannot evaluate: ALLOW rules using them match nothing, \
             DENY rules ignore those fields (fail closed); use a waypoint for L7 policy"
        );
    }
    let scope = if selector.is_empty() {
        PolicyScope::Namespace
    } else {
        PolicyScope::WorkloadSelector
    };
    let policy = Authorization {
        name,
        namespace,
        scope,
        action,
        rules,
        selector,
        has_l7_rules,
    };
    Ok((policy, targets))
}

/// `targetRef` / `targetRefs`: a Gateway (`gateway.networking.k8s.io`, a waypoint) or a
/// Service (core group) in the policy's namespace. Other kinds are errors.
pub(super) fn read_targets(spec: &Obj, namespace: &str) -> R<Vec<PolicyTarget>> {
    let mut refs: Vec<(&Value, String)> = Vec::new();
    if let Some((v, p)) = spec.get("targetRef") {
        refs.push((v, p));
    }
    if let Some((v, p)) = spec.get("targetRefs") {
        for (i, item) in sequence(v, &p)?.iter().enumerate() {
            refs.push((item, format!("{p}[{i}]")));
        }
    }
    let mut out = Vec::with_capacity(refs.len());
    for (v, p) in refs {
        let o = Obj::new(v, &p, &["group", "kind", "name", "namespace"])?;
        let field =
            |key: &str| -> R<Option<String>> { o.get(key).map(|(v, p)| string(v, &p)).transpose() };
        let group = field("group")?.unwrap_or_default();
        let kind = field("kind")?.ok_or_else(|| FieldError::new(join(&p, "kind"), "missing"))?;
        let name = field("name")?
            .filter(|n| !n.is_empty())
            .ok_or_else(|| FieldError::new(join(&p, "name"), "missing"))?;
        if let Some(ns) = field("namespace")? {
            if ns != namespace {
                return Err(FieldError::new(
                    join(&p, "namespace"),
                    format!("must be the policy's own namespace {namespace:?}"),
                ));
            }
        }
        let namespace = namespace.to_string();
        out.push(match (group.as_str(), kind.as_str()) {
            ("gateway.networking.k8s.io", "Gateway") => PolicyTarget::Gateway { namespace, name },
            ("" | "core", "Service") => PolicyTarget::Service { namespace, name },
            _ => {
                return Err(FieldError::new(
                    p,
                    format!(
                        "unsupported target {group:?} {kind:?} (supported: gateway.networking.k8s.io Gateway, \
                         core Service)"
                    ),
                ))
            }
        });
    }
    Ok(out)
}

/// One Istio rule → one `Rule` (or `None`: an ALLOW rule using L7-only fields matches nothing).
fn compile_rule(v: &Value, path: &str, action: PolicyAction, has_l7: &mut bool) -> R<Option<Rule>> {
    let o = Obj::new(v, path, &["from", "to", "when"])?;
    let mut rule = Rule::default();
    let mut l7 = false;
    if let Some((from, p)) = o.get("from") {
        let mut matches = Vec::new();
        for (i, item) in sequence(from, &p)?.iter().enumerate() {
            let item_path = format!("{p}[{i}]");
            let item = Obj::new(item, &item_path, &["source"])?;
            let (src, sp) = item
                .get("source")
                .ok_or_else(|| FieldError::new(join(&item_path, "source"), "missing"))?;
            matches.push(compile_source(src, &sp, &mut l7)?);
        }
        if !matches.is_empty() {
            rule.clauses.push(Clause { matches });
        }
    }
    if let Some((to, p)) = o.get("to") {
        let mut matches = Vec::new();
        for (i, item) in sequence(to, &p)?.iter().enumerate() {
            let item_path = format!("{p}[{i}]");
            let item = Obj::new(item, &item_path, &["operation"])?;
            let (op, opp) = item
                .get("operation")
                .ok_or_else(|| FieldError::new(join(&item_path, "operation"), "missing"))?;
            matches.push(compile_operation(op, &opp, &mut l7)?);
        }
        if !matches.is_empty() {
            rule.clauses.push(Clause { matches });
        }
    }
    if let Some((when, p)) = o.get("when") {
        for (i, cond) in sequence(when, &p)?.iter().enumerate() {
            if let Some(m) = compile_condition(cond, &format!("{p}[{i}]"), &mut l7)? {
                rule.clauses.push(Clause { matches: vec![m] });
            }
        }
    }
    if l7 {
        *has_l7 = true;
        if action == PolicyAction::Allow {
            return Ok(None);
        }
    }
    Ok(Some(rule))
}

fn compile_source(v: &Value, path: &str, l7: &mut bool) -> R<RuleMatch> {
    let o = Obj::new(
        v,
        path,
        &[
            "principals",
            "notPrincipals",
            "requestPrincipals",
            "notRequestPrincipals",
            "namespaces",
            "notNamespaces",
            "ipBlocks",
            "notIpBlocks",
            "remoteIpBlocks",
            "notRemoteIpBlocks",
            "serviceAccounts",
            "notServiceAccounts",
        ],
    )?;
    let mut m = RuleMatch {
        principals: plain(o.strings("principals")?),
        not_principals: plain(o.strings("notPrincipals")?),
        namespaces: plain(o.strings("namespaces")?),
        not_namespaces: plain(o.strings("notNamespaces")?),
        ..RuleMatch::default()
    };
    for (key, not) in [
        ("ipBlocks", false),
        ("remoteIpBlocks", false),
        ("notIpBlocks", true),
        ("notRemoteIpBlocks", true),
    ] {
        let list = addresses(&o.strings(key)?, &join(path, key))?;
        if not {
            m.not_source_ips.extend(list)
        } else {
            m.source_ips.extend(list)
        }
    }
    for (key, not) in [("serviceAccounts", false), ("notServiceAccounts", true)] {
        let accounts = o.strings(key)?;
        let has_principals = !m.principals.is_empty() || !m.not_principals.is_empty();
        if !accounts.is_empty() && has_principals {
            return Err(FieldError::new(
                join(path, key),
                "cannot be combined with principals/notPrincipals in one source",
            ));
        }
        for (i, sa) in accounts.iter().enumerate() {
            let Some((ns, name)) = sa
                .split_once('/')
                .filter(|(ns, n)| !ns.is_empty() && !n.is_empty() && !n.contains('/'))
            else {
                return Err(FieldError::new(
                    format!("{}[{i}]", join(path, key)),
                    format!("{sa:?} is not \"<namespace>/<service account>\""),
                ));
            };
            let principal = StringMatch::Plain(format!("*/ns/{ns}/sa/{name}"));
            if not {
                m.not_principals.push(principal)
            } else {
                m.principals.push(principal)
            }
        }
    }
    if !o.strings("requestPrincipals")?.is_empty() || !o.strings("notRequestPrincipals")?.is_empty()
    {
        *l7 = true;
    }
    Ok(m)
}

fn compile_operation(v: &Value, path: &str, l7: &mut bool) -> R<RuleMatch> {
    let l7_keys = [
        "hosts",
        "notHosts",
        "methods",
        "notMethods",
        "paths",
        "notPaths",
    ];
    let o = Obj::new(
        v,
        path,
        &[
            "hosts",
            "notHosts",
            "methods",
            "notMethods",
            "paths",
            "notPaths",
            "ports",
            "notPorts",
        ],
    )?;
    for key in l7_keys {
        if !o.strings(key)?.is_empty() {
            *l7 = true;
        }
    }
    Ok(RuleMatch {
        destination_ports: ports(&o, "ports")?,
        not_destination_ports: ports(&o, "notPorts")?,
        ..RuleMatch::default()
    })
}

/// A `when` condition → one match, or `None` for L7-only keys (`request.*`, `connection.sni`…).
fn compile_condition(v: &Value, path: &str, l7: &mut bool) -> R<Option<RuleMatch>> {
    let o = Obj::new(v, path, &["key", "values", "notValues"])?;
    let (key_v, key_path) = o
        .get("key")
        .ok_or_else(|| FieldError::new(join(path, "key"), "missing"))?;
    let key = string(key_v, &key_path)?;
    let values = o.strings("values")?;
    let not_values = o.strings("notValues")?;
    if values.is_empty() && not_values.is_empty() {
        return Err(FieldError::new(
            path,
            "a condition needs values or notValues",
        ));
    }
    let (vp, np) = (join(path, "values"), join(path, "notValues"));
    let mut m = RuleMatch::default();
    match key.as_str() {
        "source.ip" | "remote.ip" => {
            m.source_ips = addresses(&values, &vp)?;
            m.not_source_ips = addresses(&not_values, &np)?;
        }
        "destination.ip" => {
            m.destination_ips = addresses(&values, &vp)?;
            m.not_destination_ips = addresses(&not_values, &np)?;
        }
        "destination.port" => {
            m.destination_ports = ports(&o, "values")?;
            m.not_destination_ports = ports(&o, "notValues")?;
        }
        "source.namespace" => {
            m.namespaces = plain(values);
            m.not_namespaces = plain(not_values);
        }
        "source.principal" => {
            m.principals = plain(values);
            m.not_principals = plain(not_values);
        }
        k if k.starts_with("request.") || k.starts_with("experimental.") || k == "connection.sni" => {
            *l7 = true;
            return Ok(None);
        }
        other => {
            return Err(FieldError::new(
                key_path,
                format!(
                    "unknown condition key {other:?} (L4 keys: source.ip, remote.ip, source.namespace, source.principal, \
                     destination.ip, destination.port; L7: request.*, connection.sni)"
                ),
            ))
        }
    }
    Ok(Some(m))
}

fn mtls_mode(o: &Obj) -> R<Option<MtlsMode>> {
    let Some((v, p)) = o.get("mode") else {
        return Ok(None);
    };
    match string(v, &p)?.as_str() {
        "UNSET" => Ok(None),
        "STRICT" => Ok(Some(MtlsMode::Strict)),
        "PERMISSIVE" => Ok(Some(MtlsMode::Permissive)),
        "DISABLE" => Ok(Some(MtlsMode::Disable)),
        other => Err(FieldError::new(
            p,
            format!("unknown mode {other:?} (expected STRICT, PERMISSIVE, DISABLE or UNSET)"),
        )),
    }
}

pub fn peer_authentication(spec: &Value, name: String, namespace: String) -> R<PeerAuthentication> {
    let spec = Obj::new(spec, "spec", &["selector", "mtls", "portLevelMtls"])?;
    let selector = selector_labels(&spec, "selector", "matchLabels")?;
    let mode = match spec.get("mtls") {
        Some((v, p)) => mtls_mode(&Obj::new(v, &p, &["mode"])?)?,
        None => None,
    };
    let mut port_level = BTreeMap::new();
    if let Some((v, p)) = spec.get("portLevelMtls") {
        if selector.is_empty() {
            return Err(FieldError::new(p, "portLevelMtls requires a selector (mesh and namespace policies cannot have port-level mTLS)"));
        }
        for (k, entry) in mapping(v, &p)? {
            let key_text = k.as_str().map(str::to_string).unwrap_or_else(|| {
                serde_yaml_ng::to_string(k)
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            });
            let entry_path = join(&p, &key_text);
            let port = port(k, &entry_path)?;
            if let Some(mode) = mtls_mode(&Obj::new(entry, &entry_path, &["mode"])?)? {
                port_level.insert(port, mode);
            }
        }
    }
    Ok(PeerAuthentication {
        name,
        namespace,
        selector,
        mode,
        port_level,
    })
}

/// Compiles a Sidecar; the bool tells whether `outboundTrafficPolicy.mode` was written (if not,
/// the mesh default is filled in once known).
pub fn sidecar(spec: &Value, name: String, namespace: String) -> R<(SidecarScope, bool)> {
    let spec = Obj::new(
        spec,
        "spec",
        &[
            "workloadSelector",
            "ingress",
            "egress",
            "outboundTrafficPolicy",
            "inboundConnectionPool",
        ],
    )?;
    let selector = selector_labels(&spec, "workloadSelector", "labels")?;
    let mut mode = None;
    if let Some((v, p)) = spec.get("outboundTrafficPolicy") {
        let o = Obj::new(v, &p, &["mode", "egressProxy"])?;
        if let Some((mv, mp)) = o.get("mode") {
            mode = Some(match string(mv, &mp)?.as_str() {
                "ALLOW_ANY" => OutboundTrafficMode::AllowAny,
                "REGISTRY_ONLY" => OutboundTrafficMode::RegistryOnly,
                other => {
                    return Err(FieldError::new(
                        mp,
                        format!("unknown mode {other:?} (expected ALLOW_ANY or REGISTRY_ONLY)"),
                    ))
                }
            });
        }
        if o.get("egressProxy").is_some() {
            tracing::warn!(sidecar = %format!("{namespace}/{name}"), "Sidecar egressProxy is ignored by the L4 data plane");
        }
    }
    let mut egress = Vec::new();
    if let Some((v, p)) = spec.get("egress") {
        for (i, item) in sequence(v, &p)?.iter().enumerate() {
            let ip = format!("{p}[{i}]");
            let o = Obj::new(item, &ip, &["port", "bind", "captureMode", "hosts"])?;
            let port = match o.get("port") {
                Some((pv, pp)) => {
                    let po = Obj::new(pv, &pp, &["number", "protocol", "name", "targetPort"])?;
                    po.get("number").map(|(n, np)| port(n, &np)).transpose()?
                }
                None => None,
            };
            let hosts = o.strings("hosts")?;
            if hosts.is_empty() {
                return Err(FieldError::new(
                    join(&ip, "hosts"),
                    "an egress listener needs at least one host",
                ));
            }
            for (h, host) in hosts.iter().enumerate() {
                let ok = host.split_once('/').is_some_and(|(ns, name)| {
                    !ns.is_empty() && !name.is_empty() && !name.contains('/')
                });
                if !ok {
                    return Err(FieldError::new(format!("{ip}.hosts[{h}]"), format!("{host:?} is not \"<namespace>/<host>\" (e.g. \"./*\", \"*/foo.example.com\")")));
                }
            }
            egress.push(EgressListener { port, hosts });
        }
    }
    let explicit = mode.is_some();
    let scope = SidecarScope {
        name,
        namespace,
        selector,
        outbound_traffic_policy: mode.unwrap_or_default(),
        egress,
    };
    Ok((scope, explicit))
}
