//! Gateway status as a pure function of what the reconcile found: `Accepted`, `Programmed`
//! (False with reason `AddressNotUsable` until the Service exists and a waypoint pod is
//! Ready), per-listener status, and `status.addresses` (the Service's cluster IPs and its
//! hostname, as Istio reports for waypoints; once reported they are not withdrawn while the
//! waypoint is merely not ready). Condition times are carried over from the current status
//! when a condition did not change, so an unchanged status compares equal and is not written.

use super::gateway::Gateway;
use super::render::MESH_PORT;
use serde_json::{json, Value};

/// What the reconcile of a Gateway came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Bad parameters: nothing applied.
    InvalidParameters(String),
    /// An object with our name exists and is not ours: nothing applied.
    Conflict(String),
    /// Objects applied.
    Applied {
        /// `<service>.<ns>.svc.<domain>`.
        hostname: String,
        /// The Service's cluster IPs (empty until allocated).
        cluster_ips: Vec<String>,
        /// Ready waypoint pods.
        ready_pods: usize,
    },
}

/// Reason for an object conflict (implementation-specific; Gateway API allows those).
pub const REASON_CONFLICT: &str = "ResourceConflict";

fn condition(
    gen: i64,
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
    previous: Option<&Value>,
    now: &str,
) -> Value {
    let status = if ok { "True" } else { "False" };
    let previous = previous
        .and_then(|c| c.as_array())
        .and_then(|cs| cs.iter().find(|c| c.get("type") == Some(&json!(kind))));
    let since = match previous {
        Some(p) if p.get("status") == Some(&json!(status)) => p
            .get("lastTransitionTime")
            .cloned()
            .unwrap_or_else(|| json!(now)),
        _ => json!(now),
    };
    json!({
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": gen,
        "lastTransitionTime": since,
    })
}

/// The part of `status` this controller owns (`conditions`, `addresses`, `listeners`).
pub fn owned_part(status: Option<&Value>) -> Value {
    let get = |k: &str| status.and_then(|s| s.get(k)).cloned();
    let mut out = serde_json::Map::new();
    for k in ["addresses", "conditions", "listeners"] {
        if let Some(v) = get(k) {
            out.insert(k.into(), v);
        }
    }
    Value::Object(out)
}

/// Conditions of a GatewayClass of ours: `Accepted` (its Gateways are reconciled).
pub fn class_conditions(gen: i64, previous: Option<&Value>, now: &str) -> Value {
    json!([condition(
        gen,
        "Accepted",
        true,
        "Accepted",
        "Handled by the ambient mesh controller",
        previous,
        now,
    )])
}

/// Desired status of `gw` for `outcome`; `now` is an RFC 3339 time for changed conditions.
pub fn desired(gw: &Gateway, outcome: &Outcome, now: &str) -> Value {
    let gen = gw.generation();
    let current = gw.status.as_ref();
    let prev_conditions = current.and_then(|s| s.get("conditions"));
    let prev_addresses: Vec<Value> = current
        .and_then(|s| s.get("addresses"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let cond = |kind: &str, ok: bool, reason: &str, message: &str| {
        condition(gen, kind, ok, reason, message, prev_conditions, now)
    };
    let (accepted, programmed, addresses, listener_programmed) = match outcome {
        Outcome::InvalidParameters(m) => (
            cond("Accepted", false, "InvalidParameters", m),
            cond(
                "Programmed",
                false,
                "Invalid",
                &format!("not accepted: {m}"),
            ),
            prev_addresses,
            false,
        ),
        Outcome::Conflict(m) => (
            cond("Accepted", false, REASON_CONFLICT, m),
            cond(
                "Programmed",
                false,
                "Invalid",
                &format!("not accepted: {m}"),
            ),
            prev_addresses,
            false,
        ),
        Outcome::Applied {
            hostname,
            cluster_ips,
            ready_pods,
        } => {
            let mut addresses: Vec<Value> = cluster_ips
                .iter()
                .map(|ip| json!({"type": "IPAddress", "value": ip}))
                .collect();
            addresses.push(json!({"type": "Hostname", "value": hostname}));
            let programmed = *ready_pods > 0;
            let p = if programmed {
                cond(
                    "Programmed",
                    true,
                    "Programmed",
                    &format!("Resource programmed, assigned to service(s) {hostname}:{MESH_PORT}"),
                )
            } else {
                cond(
                    "Programmed",
                    false,
                    "AddressNotUsable",
                    &format!("Failed to assign to any requested addresses: hostname \"{hostname}\" has no ready waypoint pod"),
                )
            };
            let addresses = if programmed || !prev_addresses.is_empty() {
                addresses
            } else {
                Vec::new()
            };
            (
                cond("Accepted", true, "Accepted", "Resource accepted"),
                p,
                addresses,
                programmed,
            )
        }
    };
    let prev_listeners: Vec<Value> = current
        .and_then(|s| s.get("listeners"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let listeners: Vec<Value> = gw
        .spec
        .listeners
        .iter()
        .map(|l| {
            let prev = prev_listeners
                .iter()
                .find(|p| p.get("name") == Some(&json!(l.name)))
                .and_then(|p| p.get("conditions"));
            let lc = |kind: &str, ok: bool, reason: &str, message: &str| {
                condition(gen, kind, ok, reason, message, prev, now)
            };
            let hbone = l.port == i64::from(MESH_PORT) && l.protocol == "HBONE";
            let (conditions, kinds) = if hbone {
                (
                    vec![
                        lc("Accepted", true, "Accepted", "No errors found"),
                        lc("Conflicted", false, "NoConflicts", "No errors found"),
                        if listener_programmed {
                            lc("Programmed", true, "Programmed", "No errors found")
                        } else {
                            lc("Programmed", false, "Pending", "the waypoint is not ready")
                        },
                        lc("ResolvedRefs", true, "ResolvedRefs", "No errors found"),
                    ],
                    // Routes reach our waypoints as VirtualServices; Gateway API routes are
                    // not implemented, so none is listed (the spec forbids listing kinds the
                    // listener does not support) and none is ever attached.
                    json!([]),
                )
            } else {
                let m = format!(
                    "Expected a single listener on port {MESH_PORT} with protocol \"HBONE\""
                );
                (
                    vec![
                        lc("Accepted", false, "UnsupportedProtocol", &m),
                        lc("Conflicted", false, "NoConflicts", "No errors found"),
                        lc("Programmed", false, "Invalid", &m),
                        lc("ResolvedRefs", true, "ResolvedRefs", "No errors found"),
                    ],
                    json!([]),
                )
            };
            json!({
                "name": l.name,
                "attachedRoutes": 0,
                "supportedKinds": kinds,
                "conditions": conditions,
            })
        })
        .collect();
    let mut status = json!({"conditions": [accepted, programmed]});
    if !addresses.is_empty() {
        status["addresses"] = json!(addresses);
    }
    if !listeners.is_empty() {
        status["listeners"] = json!(listeners);
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(status: Value, listeners: Value) -> Gateway {
        serde_json::from_value(json!({
            "metadata": {"name": "wp", "namespace": "app", "uid": "u", "generation": 3},
            "spec": {"gatewayClassName": "istio-waypoint", "listeners": listeners},
            "status": status,
        }))
        .expect("gateway")
    }

    fn cond<'a>(s: &'a Value, kind: &str) -> &'a Value {
        s["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
            .unwrap_or(&Value::Null)
    }

    fn applied(ready: usize) -> Outcome {
        Outcome::Applied {
            hostname: "wp.app.svc.cluster.local".into(),
            cluster_ips: vec!["10.96.0.10".into()],
            ready_pods: ready,
        }
    }

    #[test]
    fn programmed_follows_ready_pods_and_addresses_appear_then_stay() {
        let mesh = json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}]);
        let s = desired(&gw(Value::Null, mesh.clone()), &applied(0), "t1");
        assert_eq!(cond(&s, "Accepted")["status"], "True");
        assert_eq!(cond(&s, "Accepted")["reason"], "Accepted");
        assert_eq!(cond(&s, "Programmed")["status"], "False");
        assert_eq!(cond(&s, "Programmed")["reason"], "AddressNotUsable");
        assert_eq!(cond(&s, "Programmed")["observedGeneration"], 3);
        assert!(s.get("addresses").is_none());
        assert_eq!(s["listeners"][0]["name"], "mesh");
        let s2 = desired(&gw(s.clone(), mesh.clone()), &applied(1), "t2");
        assert_eq!(cond(&s2, "Programmed")["status"], "True");
        assert_eq!(cond(&s2, "Programmed")["reason"], "Programmed");
        assert_eq!(
            cond(&s2, "Programmed")["message"],
            "Resource programmed, assigned to service(s) wp.app.svc.cluster.local:15008"
        );
        assert_eq!(cond(&s2, "Programmed")["lastTransitionTime"], "t2");
        // Accepted did not change: its time is kept.
        assert_eq!(cond(&s2, "Accepted")["lastTransitionTime"], "t1");
        assert_eq!(
            s2["addresses"],
            json!([{"type": "IPAddress", "value": "10.96.0.10"},
                   {"type": "Hostname", "value": "wp.app.svc.cluster.local"}])
        );
        // Same inputs, later: identical (no write).
        assert_eq!(
            desired(&gw(s2.clone(), mesh.clone()), &applied(1), "t3"),
            s2
        );
        // The pod goes away: not programmed, but the addresses stay.
        let s3 = desired(&gw(s2.clone(), mesh), &applied(0), "t4");
        assert_eq!(cond(&s3, "Programmed")["status"], "False");
        assert_eq!(s3["addresses"], s2["addresses"]);
    }

    #[test]
    fn rejected_outcomes_and_listeners() {
        let listeners = json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"},
                               {"name": "http", "port": 80, "protocol": "HTTP"}]);
        let s = desired(
            &gw(Value::Null, listeners),
            &Outcome::InvalidParameters("annotation x: bad".into()),
            "t",
        );
        assert_eq!(cond(&s, "Accepted")["status"], "False");
        assert_eq!(cond(&s, "Accepted")["reason"], "InvalidParameters");
        assert_eq!(cond(&s, "Accepted")["message"], "annotation x: bad");
        assert_eq!(cond(&s, "Programmed")["status"], "False");
        let http = &s["listeners"][1];
        assert_eq!(http["name"], "http");
        let accepted = http["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Accepted"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(accepted["status"], "False");
        assert_eq!(accepted["reason"], "UnsupportedProtocol");
        let c = desired(
            &gw(Value::Null, json!([])),
            &Outcome::Conflict("Service app/wp exists".into()),
            "t",
        );
        assert_eq!(cond(&c, "Accepted")["reason"], REASON_CONFLICT);
        assert!(c.get("listeners").is_none());
    }

    #[test]
    fn owned_part_ignores_other_fields() {
        let s = json!({"conditions": [1], "addresses": [2], "other": 3});
        assert_eq!(
            owned_part(Some(&s)),
            json!({"conditions": [1], "addresses": [2]})
        );
        assert_eq!(owned_part(None), json!({}));
    }
}
