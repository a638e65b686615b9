//! Unit tests of the per-stream state machine (no I/O).

use super::*;
use crate::xds::cache::{Change, Prepared};
use common::xds::discovery::{Node, Status};

const A: &str = "type.googleapis.com/istio.workload.Address";
const P: &str = "type.googleapis.com/istio.security.Authorization";

fn cache(items: &[(&str, &str, &str)]) -> Cache {
    let mut c = Cache::default();
    c.apply(
        items
            .iter()
            .map(|(t, n, v)| Prepared::new(Change::upsert(*t, *n, v.as_bytes().to_vec(), vec![])))
            .collect(),
    );
    c
}

/// Applies a change and marks it dirty on `s` as the debouncer would.
fn set(c: &mut Cache, s: &mut StreamState, t: &str, n: &str, v: &str) {
    let ch = c.apply(vec![Prepared::new(Change::upsert(
        t,
        n,
        v.as_bytes().to_vec(),
        vec![],
    ))]);
    s.mark_dirty(
        t,
        ch.into_iter().map(|(_, n, seq)| (n, seq)),
        Some(Instant::now()),
    );
}

fn initial(t: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: t.into(),
        node: Some(Node {
            id: "ztunnel~10.0.0.1~z.istio-system~istio-system.svc.cluster.local".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ack(t: &str, nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: t.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn names(b: &Built) -> Vec<String> {
    b.response
        .message()
        .resources
        .into_iter()
        .map(|r| r.name)
        .collect()
}

#[test]
fn initial_wildcard_gets_everything_and_empty_types_are_answered() {
    let c = cache(&[(A, "w1", "1"), (A, "w2", "2")]);
    let mut s = StreamState::new(7);
    assert_eq!(
        s.on_request(initial(A)).unwrap(),
        Event::Initial { type_url: A.into() }
    );
    assert_eq!(
        s.on_request(initial(P)).unwrap(),
        Event::Initial { type_url: P.into() }
    );
    assert_eq!(s.node().unwrap().proxy_type(), "ztunnel");
    assert_eq!(s.subscription(A), Some(&Subscription::Wildcard));
    let b1 = s.build(&c).expect("address response");
    assert_eq!(
        (b1.response.type_url.as_str(), names(&b1)),
        (A, vec!["w1".to_string(), "w2".to_string()])
    );
    assert!(b1.initial);
    let b2 = s.build(&c).expect("empty authorization response");
    assert_eq!(b2.response.type_url, P);
    assert!(b2.response.resources.is_empty() && b2.response.removed_resources.is_empty());
    assert_ne!(b1.response.nonce, b2.response.nonce);
    assert!(s.build(&c).is_none());
}

#[test]
fn one_response_in_flight_per_type_and_changes_coalesce() {
    let mut c = cache(&[(A, "w1", "1")]);
    let mut s = StreamState::new(1);
    s.on_request(initial(A)).unwrap();
    let b = s.build(&c).unwrap();
    for v in 2..10 {
        set(&mut c, &mut s, A, "w1", &v.to_string());
    }
    assert!(!s.has_work(), "nothing is built before the ACK");
    assert!(s.build(&c).is_none());
    assert_eq!(
        s.on_request(ack(A, "bogus")).unwrap(),
        Event::StaleNonce {
            type_url: A.into(),
            nonce: "bogus".into()
        }
    );
    assert!(!s.has_work());
    assert_eq!(
        s.on_request(ack(A, &b.response.nonce)).unwrap(),
        Event::Ack { type_url: A.into() }
    );
    let b2 = s.build(&c).expect("latest after ACK");
    assert_eq!(b2.response.resources.len(), 1);
    assert_eq!(
        b2.response.message().resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value,
        b"9"
    );
    assert!(b2.oldest_change.is_some());
    assert!(!b2.initial);
}

#[test]
fn nack_is_reported_and_the_rejected_resource_is_not_resent() {
    let mut c = cache(&[(A, "bad", "x")]);
    let mut s = StreamState::new(1);
    s.on_request(initial(A)).unwrap();
    let b = s.build(&c).unwrap();
    let mut nack = ack(A, &b.response.nonce);
    nack.error_detail = Some(Status {
        code: 0,
        message: "bad: decode error".into(),
        details: vec![],
    });
    assert_eq!(
        s.on_request(nack).unwrap(),
        Event::Nack {
            type_url: A.into(),
            message: "bad: decode error".into()
        }
    );
    set(&mut c, &mut s, A, "good", "g");
    let b2 = s.build(&c).unwrap();
    assert_eq!(names(&b2), vec!["good"]);
}

#[test]
fn reconnect_sends_only_changed_and_removes_vanished() {
    let c = cache(&[(A, "same", "1"), (A, "changed", "new"), (A, "added", "a")]);
    let same_v = c.get(A, "same").unwrap().version.clone();
    let mut req = initial(A);
    req.initial_resource_versions = [
        ("same".to_string(), same_v),
        ("changed".to_string(), "oldversion".to_string()),
        ("gone".to_string(), "v".to_string()),
    ]
    .into_iter()
    .collect();
    let mut s = StreamState::new(1);
    s.on_request(req).unwrap();
    let b = s.build(&c).unwrap();
    assert_eq!(names(&b), vec!["added", "changed"]);
    assert_eq!(b.response.removed_resources, vec!["gone"]);
}

#[test]
fn explicit_subscription_gets_only_its_names_and_missing_ones_as_removed() {
    let mut c = cache(&[(A, "a", "1"), (A, "b", "1")]);
    let mut s = StreamState::new(1);
    let mut req = initial(A);
    req.resource_names_subscribe = vec!["a".into(), "missing".into()];
    s.on_request(req).unwrap();
    let b = s.build(&c).unwrap();
    assert_eq!(names(&b), vec!["a"]);
    assert_eq!(b.response.removed_resources, vec!["missing"]);
    s.on_request(ack(A, &b.response.nonce)).unwrap();
    // A change to an unsubscribed name produces nothing.
    set(&mut c, &mut s, A, "b", "2");
    assert!(s.build(&c).is_none());
    // A new subscription is answered, the unsubscribed name no longer is.
    let mut sub = ack(A, "");
    sub.resource_names_subscribe = vec!["b".into()];
    sub.resource_names_unsubscribe = vec!["a".into()];
    assert_eq!(
        s.on_request(sub).unwrap(),
        Event::Subscription { type_url: A.into() }
    );
    let b2 = s.build(&c).unwrap();
    assert_eq!(names(&b2), vec!["b"]);
    s.on_request(ack(A, &b2.response.nonce)).unwrap();
    set(&mut c, &mut s, A, "a", "3");
    assert!(s.build(&c).is_none());
}

#[test]
fn on_demand_initial_subscribes_to_nothing_and_is_answered_empty() {
    let c = cache(&[(A, "a", "1")]);
    let mut s = StreamState::new(1);
    let mut req = initial(A);
    req.resource_names_subscribe = vec!["*".into()];
    req.resource_names_unsubscribe = vec!["*".into()];
    s.on_request(req).unwrap();
    assert_eq!(
        s.subscription(A),
        Some(&Subscription::Explicit(HashSet::new()))
    );
    let b = s.build(&c).unwrap();
    assert!(b.response.resources.is_empty() && b.response.removed_resources.is_empty());
}

#[test]
fn a_request_without_type_is_a_protocol_error() {
    let mut s = StreamState::new(1);
    assert_eq!(
        s.on_request(DeltaDiscoveryRequest::default()),
        Err(ProtocolError::NoTypeUrl)
    );
}

#[test]
fn removal_reaches_wildcard_clients() {
    let mut c = cache(&[(A, "a", "1")]);
    let mut s = StreamState::new(1);
    s.on_request(initial(A)).unwrap();
    let b = s.build(&c).unwrap();
    s.on_request(ack(A, &b.response.nonce)).unwrap();
    let ch = c.apply(vec![Prepared::new(Change::remove(A, "a"))]);
    s.mark_dirty(A, ch.into_iter().map(|(_, n, seq)| (n, seq)), None);
    let b2 = s.build(&c).unwrap();
    assert!(b2.response.resources.is_empty());
    assert_eq!(b2.response.removed_resources, vec!["a"]);
}

#[test]
fn changes_already_in_the_first_response_are_not_sent_again() {
    // Published before the stream connected, flushed by the debouncer after its first
    // response was built: already sent, so nothing more to say.
    let mut c = Cache::default();
    let ch = c.apply(vec![Prepared::new(Change::upsert(
        A,
        "a",
        b"1".to_vec(),
        vec![],
    ))]);
    let mut s = StreamState::new(1);
    s.on_request(initial(A)).unwrap();
    let b = s.build(&c).unwrap();
    assert_eq!(names(&b), vec!["a"]);
    s.on_request(ack(A, &b.response.nonce)).unwrap();
    s.mark_dirty(A, ch.into_iter().map(|(_, n, seq)| (n, seq)), None);
    assert!(s.build(&c).is_none());
    // A later change is sent.
    set(&mut c, &mut s, A, "a", "2");
    assert_eq!(names(&s.build(&c).unwrap()), vec!["a"]);
}

/// A client that accepts parts gets a large first response split: every part but the last
/// marked partial, each sent after the previous one's ACK, removals with the last part; later
/// changes only after that. A client that does not say so gets it whole.
#[test]
fn large_first_response_comes_in_parts_to_clients_that_accept_them() {
    let mut c = cache(&[
        (A, "w1", "aaaaaaaaaa"),
        (A, "w2", "bbbbbbbbbb"),
        (A, "w3", "cccccccccc"),
    ]);
    let chunked = |id| {
        let mut req = initial(A);
        if let Some(node) = req.node.as_mut() {
            node.metadata = Some(prost_types::Struct {
                fields: [(
                    common::xds::CHUNKED_METADATA.to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue("1".into())),
                    },
                )]
                .into(),
            });
        }
        req.initial_resource_versions = [("gone".to_string(), "v".to_string())].into();
        let mut s = StreamState::new(id).with_chunk_bytes(30);
        s.on_request(req).unwrap();
        s
    };
    let mut s = chunked(1);
    let p1 = s.build(&c).expect("first part");
    assert_eq!(
        p1.response.system_version_info,
        common::xds::PARTIAL_RESPONSE
    );
    assert!(p1.response.removed_resources.is_empty());
    assert!(s.build(&c).is_none(), "next part only after the ACK");
    set(&mut c, &mut s, A, "w4", "dddddddddd");
    s.on_request(ack(A, &p1.response.nonce)).unwrap();
    let mut got: Vec<String> = names(&p1);
    let mut last = None;
    while let Some(p) = s.build(&c) {
        got.extend(names(&p));
        let done = p.response.system_version_info.is_empty();
        s.on_request(ack(A, &p.response.nonce)).unwrap();
        if done {
            last = Some(p);
            break;
        }
    }
    let last = last.expect("a last part");
    assert_eq!(last.response.removed_resources, vec!["gone"]);
    assert!(got.len() >= 3 && got[..3] == ["w1", "w2", "w3"], "{got:?}");
    // The change made meanwhile follows (or rode along, as the cache had it already).
    if !got.contains(&"w4".to_string()) {
        let next = s.build(&c).expect("the change");
        assert_eq!(names(&next), vec!["w4"]);
    }

    // Without the metadata: one response with everything.
    let mut s = StreamState::new(2).with_chunk_bytes(30);
    s.on_request(initial(A)).unwrap();
    let whole = s.build(&c).expect("whole");
    assert!(whole.response.system_version_info.is_empty());
    assert_eq!(names(&whole).len(), 4);
}

/// Istio ztunnel's on-demand mode: it subscribes to nothing (`*` in and out), then to the
/// keys it needs — `<network>/<ip>` of a workload or service, a uid, `namespace/hostname` —
/// and waits for a response naming each key.
#[test]
fn on_demand_subscriptions_resolve_aliases_bring_service_workloads_and_the_nodes_own() {
    let svc = "default/echo.default.svc.cluster.local";
    let upsert = |n: &str, v: &str, aliases: &[&str], groups: &[&str]| {
        Prepared::new(
            Change::upsert(
                A,
                n,
                v.as_bytes().to_vec(),
                aliases.iter().map(|a| a.to_string()).collect(),
            )
            .with_groups(groups.iter().map(|g| g.to_string()).collect()),
        )
    };
    let mut c = Cache::default();
    c.apply(vec![
        upsert("pod/a", "a1", &["/10.0.0.5"], &[svc, "node:n1"]),
        upsert("pod/b", "b1", &["/10.0.1.5"], &[svc, "node:n2"]),
        upsert("pod/c", "c1", &["/10.0.0.6"], &["node:n1"]),
        upsert(svc, "s1", &["/10.96.0.10"], &[]),
    ]);
    let mut s = StreamState::new(3);
    let mut req = initial(A);
    req.resource_names_subscribe = vec!["*".into()];
    req.resource_names_unsubscribe = vec!["*".into()];
    if let Some(node) = req.node.as_mut() {
        node.metadata = Some(prost_types::Struct {
            fields: [(
                "NODE_NAME".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("n1".into())),
                },
            )]
            .into(),
        });
    }
    s.on_request(req).unwrap();
    assert_eq!(
        s.subscription(A),
        Some(&Subscription::Explicit(HashSet::new()))
    );
    // Answered at once, with the workloads of its own node only.
    let b = s.build(&c).expect("initial answer");
    assert_eq!(names(&b), vec!["pod/a", "pod/c"]);
    s.on_request(ack(A, &b.response.nonce)).unwrap();

    // A service VIP: sent under the key asked for, with the service's other workload.
    let sub = |keys: &[&str]| DeltaDiscoveryRequest {
        type_url: A.into(),
        resource_names_subscribe: keys.iter().map(|k| k.to_string()).collect(),
        ..Default::default()
    };
    s.on_request(sub(&["/10.96.0.10"])).unwrap();
    let b = s.build(&c).expect("on-demand answer");
    assert_eq!(names(&b), vec!["/10.96.0.10", "pod/b"]);
    assert_eq!(
        b.response.message().resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value,
        b"s1"
    );
    assert!(b.response.removed_resources.is_empty());
    s.on_request(ack(A, &b.response.nonce)).unwrap();

    // An address nobody has: answered as removed, so the client stops waiting.
    s.on_request(sub(&["/10.9.9.9"])).unwrap();
    let b = s.build(&c).expect("answer for an unknown key");
    assert!(b.response.resources.is_empty());
    assert_eq!(b.response.removed_resources, vec!["/10.9.9.9"]);
    s.on_request(ack(A, &b.response.nonce)).unwrap();

    // Changes follow: a member workload changes, an unrelated one on another node does not
    // concern this client, and the service's removal takes its workloads along.
    let ch = c.apply(vec![upsert(
        "pod/b",
        "b2",
        &["/10.0.1.5"],
        &[svc, "node:n2"],
    )]);
    s.mark_dirty(A, ch.into_iter().map(|(_, n, q)| (n, q)), None);
    let b = s.build(&c).expect("member change");
    assert_eq!(names(&b), vec!["pod/b"]);
    s.on_request(ack(A, &b.response.nonce)).unwrap();
    let ch = c.apply(vec![upsert("pod/z", "z1", &["/10.0.2.5"], &["node:n3"])]);
    s.mark_dirty(A, ch.into_iter().map(|(_, n, q)| (n, q)), None);
    assert!(s.build(&c).is_none(), "not this client's concern");
    let ch = c.apply(vec![Prepared::new(Change::remove(A, svc))]);
    s.mark_dirty(A, ch.into_iter().map(|(_, n, q)| (n, q)), None);
    let b = s.build(&c).expect("removal");
    assert!(b.response.resources.is_empty());
    assert_eq!(b.response.removed_resources, vec!["/10.96.0.10", "pod/b"]);
    // The alias index forgets the removed service.
    assert!(c.by_alias(A, "/10.96.0.10").is_none());
    assert_eq!(
        c.by_alias(A, "/10.0.0.6").map(|r| r.name.as_str()),
        Some("pod/c")
    );
}
