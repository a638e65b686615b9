//! Specifications of destination and endpoint choice: weights, subset filtering, each picker,
//! consistent-hash keys and stickiness, and DestinationRule policy precedence.

use super::*;
use crate::l7::destination_rule::{self, DestinationRuleSpec, SubsetSpec};
use crate::l7::route::Destination;
use crate::l7::tests::Req;
use crate::l7::{DestinationPolicy, LbPolicy};
use crate::model::Workload;
use std::sync::Arc;

fn dest(subset: &str, weight: u32) -> WeightedDestination {
    WeightedDestination {
        destination: Destination {
            host: "demoapp.default.svc.cluster.local".into(),
            subset: Some(subset.into()),
            port: None,
        },
        weight,
        headers: Default::default(),
    }
}

fn picked(dests: &[WeightedDestination], r: u64) -> Option<&str> {
    pick_weighted(dests, r).and_then(|d| d.destination.subset.as_deref())
}

#[test]
fn weighted_choice_follows_weights_exactly_over_a_cycle() {
    let dests = [dest("v10", 90), dest("v11", 10)];
    let v11 = (0..100u64)
        .filter(|r| picked(&dests, *r) == Some("v11"))
        .count();
    assert_eq!(v11, 10);
    assert_eq!(picked(&dests, 89), Some("v10"));
    assert_eq!(picked(&dests, 90), Some("v11"));
    assert_eq!(
        picked(&dests, 190),
        Some("v11"),
        "the draw is taken modulo the total"
    );
}

#[test]
fn zero_weight_destinations_are_never_picked() {
    let dests = [dest("off", 0), dest("on", 100)];
    assert!((0..1000u64).all(|r| picked(&dests, r) == Some("on")));
    assert_eq!(
        picked(&[dest("only", 0)], 7),
        Some("only"),
        "a lone destination always"
    );
    assert_eq!(pick_weighted(&[], 7).map(|d| d.weight), None);
}

fn endpoint(name: &str, labels: &str) -> Endpoint {
    let w: Workload =
        serde_yaml_ng::from_str(&format!("{{name: {name}, labels: {labels}}}")).expect("workload");
    Endpoint {
        workload: Arc::new(w),
        target_port: 8080,
    }
}

#[test]
fn subset_endpoints_filter_by_labels() {
    let eps = [
        endpoint("a", "{app: demoapp, version: v1.0}"),
        endpoint("b", "{app: demoapp, version: v1.1}"),
        endpoint("c", "{app: demoapp, version: v1.0, zone: x}"),
    ];
    let labels: BTreeMap<String, String> = [("version".to_string(), "v1.0".to_string())].into();
    let names = |v: Vec<&Endpoint>| {
        v.iter()
            .map(|e| e.workload.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(subset_endpoints(&eps, Some(&labels))), ["a", "c"]);
    assert_eq!(names(subset_endpoints(&eps, None)), ["a", "b", "c"]);
    let none: BTreeMap<String, String> = [("version".to_string(), "v9".to_string())].into();
    assert!(subset_endpoints(&eps, Some(&none)).is_empty());
}

fn candidates<'a>(keys: &'a [&'a str], active: &[u32]) -> Vec<Candidate<'a>> {
    keys.iter()
        .zip(active)
        .map(|(k, a)| Candidate {
            key: k,
            active_requests: *a,
            weight: 1,
        })
        .collect()
}

const KEYS: [&str; 4] = [
    "10.0.0.1:8080",
    "10.0.0.2:8080",
    "10.0.0.3:8080",
    "10.0.0.4:8080",
];

#[test]
fn round_robin_cycles_through_endpoints() {
    let rr = RoundRobin::default();
    let c = candidates(&KEYS[..3], &[0, 0, 0]);
    let picks: Vec<usize> = (0..6)
        .filter_map(|_| rr.pick(&c, &PickInput::default()))
        .collect();
    assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    assert_eq!(rr.pick(&[], &PickInput::default()), None);
}

#[test]
fn random_uses_the_draw() {
    let c = candidates(&KEYS, &[0; 4]);
    let pick = |r| {
        Random.pick(
            &c,
            &PickInput {
                random: r,
                hash: None,
            },
        )
    };
    assert_eq!((pick(0), pick(1), pick(6)), (Some(0), Some(1), Some(2)));
}

/// Endpoint weights (a ServiceEntry endpoint's `weight`, Istio's Workload `capacity`): round
/// robin and random give each endpoint draws in proportion; least request compares load per
/// unit of weight.
#[test]
fn weights_shape_round_robin_random_and_least_request() {
    let mut c = candidates(&KEYS[..3], &[0, 0, 0]);
    c[0].weight = 3;
    c[2].weight = 0; // counts as 1
    let rr = RoundRobin::default();
    let picks: Vec<usize> = (0..10)
        .filter_map(|_| rr.pick(&c, &PickInput::default()))
        .collect();
    assert_eq!(picks, [0, 0, 0, 1, 2, 0, 0, 0, 1, 2]);
    let random = |r| {
        Random.pick(
            &c,
            &PickInput {
                random: r,
                hash: None,
            },
        )
    };
    let counts = (0..500u64).fold([0usize; 3], |mut n, r| {
        n[random(r).unwrap()] += 1;
        n
    });
    assert_eq!(counts, [300, 100, 100]);
    assert_eq!(weighted_slot(&[], 3), None);

    // 4 in flight on weight 4 is lighter than 2 on weight 1.
    let mut c = candidates(&KEYS[..2], &[4, 2]);
    c[0].weight = 4;
    for r in 0..50u64 {
        let input = PickInput {
            random: r.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            hash: None,
        };
        assert_eq!(LeastRequest.pick(&c, &input), Some(0));
    }
}

#[test]
fn least_request_prefers_fewer_active_requests() {
    let c = candidates(&KEYS[..2], &[5, 1]);
    assert!((0..50u64).all(|r| LeastRequest.pick(
        &c,
        &PickInput {
            random: r.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            hash: None
        }
    ) == Some(1)));
    let c = candidates(&KEYS, &[1, 9, 2, 3]);
    let picks: Vec<usize> = (0..200u64)
        .filter_map(|r| {
            LeastRequest.pick(
                &c,
                &PickInput {
                    random: r.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    hash: None,
                },
            )
        })
        .collect();
    assert!(
        !picks.contains(&1),
        "the busiest endpoint never wins a two-choice draw"
    );
    assert!(picks.contains(&0) && picks.contains(&2), "{picks:?}");
    assert_eq!(
        LeastRequest.pick(&candidates(&KEYS[..1], &[9]), &PickInput::default()),
        Some(0)
    );
}

#[test]
fn consistent_hash_is_sticky_and_spreads_keys() {
    let c = candidates(&KEYS, &[0; 4]);
    let pick = |key: &str| {
        ConsistentHash.pick(
            &c,
            &PickInput {
                random: 0,
                hash: Some(fnv1a64(key.as_bytes())),
            },
        )
    };
    let first = pick("user-42");
    assert!(
        (0..20).all(|_| pick("user-42") == first),
        "same key, same endpoint"
    );
    let used: std::collections::BTreeSet<_> = (0..200)
        .filter_map(|i| pick(&format!("user-{i}")))
        .collect();
    assert_eq!(used.len(), 4, "keys spread over every endpoint");
}

#[test]
fn consistent_hash_moves_only_keys_of_a_removed_endpoint() {
    let all = candidates(&KEYS, &[0; 4]);
    let without_last = candidates(&KEYS[..3], &[0; 3]);
    for i in 0..200 {
        let input = PickInput {
            random: 0,
            hash: Some(fnv1a64(format!("k{i}").as_bytes())),
        };
        let before = ConsistentHash.pick(&all, &input).expect("pick");
        let after = ConsistentHash.pick(&without_last, &input).expect("pick");
        if before != 3 {
            assert_eq!(before, after, "key k{i} moved although its endpoint stayed");
        }
    }
    assert_eq!(
        ConsistentHash.pick(
            &all,
            &PickInput {
                random: 5,
                hash: None
            }
        ),
        Some(1),
        "no hash: random"
    );
}

#[test]
fn request_hash_reads_each_key_kind() {
    let req = Req::get("/p?user=ann&x=1")
        .header("x-user", "ann")
        .header("cookie", "a=1; session=\"s-123\"")
        .ip("10.1.2.3");
    let info = req.info();
    let h = |k: HashKey| request_hash(&k, &info);
    assert_eq!(h(HashKey::Header("x-user".into())), Some(fnv1a64(b"ann")));
    assert_eq!(
        h(HashKey::Cookie {
            name: "session".into(),
            path: None,
            ttl: None
        }),
        Some(fnv1a64(b"s-123"))
    );
    assert_eq!(h(HashKey::SourceIp), Some(fnv1a64(b"10.1.2.3")));
    assert_eq!(
        h(HashKey::QueryParameter("user".into())),
        Some(fnv1a64(b"ann"))
    );
    assert_eq!(h(HashKey::Header("x-none".into())), None);
    assert_eq!(
        h(HashKey::Cookie {
            name: "nope".into(),
            path: None,
            ttl: None
        }),
        None
    );
    assert_eq!(h(HashKey::QueryParameter("nope".into())), None);
    assert_eq!(
        request_hash(&HashKey::SourceIp, &Req::get("/").info()),
        None
    );
    assert_eq!(
        fnv1a64(b""),
        0xcbf2_9ce4_8422_2325,
        "FNV-1a offset basis: stable across releases"
    );
}

#[test]
fn minted_cookie_hashes_like_the_cookie_it_sets() {
    use crate::l7::spec::Duration as SpecDuration;
    let key = |ttl: Option<u64>| HashKey::Cookie {
        name: "sticky".into(),
        path: Some("/app".into()),
        ttl: ttl.map(|s| SpecDuration(std::time::Duration::from_secs(s))),
    };
    assert!(mint_cookie(&key(None), 7).is_none(), "no ttl: no cookie");
    assert!(mint_cookie(&HashKey::SourceIp, 7).is_none());
    let m = mint_cookie(&key(Some(3600)), 7).expect("minted");
    let text = m.set_cookie.to_str().unwrap().to_string();
    assert!(text.starts_with("sticky=\""), "{text}");
    assert!(
        text.ends_with("; Max-Age=3600; Path=/app; HttpOnly"),
        "{text}"
    );
    // The client sends back `name=value` (quotes included): same hash, same endpoint.
    let pair = text.split(';').next().unwrap().to_string();
    let req = Req::get("/app").header("cookie", &pair);
    assert_eq!(request_hash(&key(Some(3600)), &req.info()), Some(m.hash));
    let other = mint_cookie(&key(Some(3600)), 8).expect("minted");
    assert_ne!(other.hash, m.hash, "different seeds, different cookies");
    let session = mint_cookie(&key(Some(0)), 7).expect("minted");
    assert!(
        !session.set_cookie.to_str().unwrap().contains("Max-Age"),
        "a zero ttl makes a session cookie"
    );
}

#[test]
fn pickers_exist_for_every_policy_but_passthrough() {
    let c = candidates(&KEYS, &[0; 4]);
    for p in [
        LbPolicy::RoundRobin,
        LbPolicy::LeastRequest,
        LbPolicy::Random,
        LbPolicy::ConsistentHash(HashKey::SourceIp),
    ] {
        let picker = picker_for(&p).expect("a picker");
        assert!(picker.pick(&c, &PickInput::default()).is_some(), "{p:?}");
    }
    assert!(picker_for(&LbPolicy::Passthrough).is_none());
}

fn rule(yaml: &str) -> DestinationPolicy {
    let spec: DestinationRuleSpec = serde_yaml_ng::from_str(yaml).expect("rule spec");
    destination_rule::validate(&spec).unwrap_or_else(|e| panic!("{e:?}"));
    DestinationPolicy {
        name: "r".into(),
        namespace: "default".into(),
        host: spec.host.clone(),
        traffic_policy: spec.traffic_policy,
        subsets: spec.subsets,
        export_to: spec.export_to,
    }
}

#[test]
fn subset_and_port_level_settings_override_with_istio_precedence() {
    let dr = rule(
        r#"
host: demoapp
trafficPolicy:
  loadBalancer: {simple: LEAST_REQUEST}
  connectionPool:
    tcp: {maxConnections: 100, connectTimeout: 2s}
    http: {http1MaxPendingRequests: 10, http2MaxRequests: 50, maxRequestsPerConnection: 5, maxRetries: 3, idleTimeout: 30s}
  outlierDetection: {consecutive5xxErrors: 3, interval: 5s, baseEjectionTime: 1m, maxEjectionPercent: 50}
  portLevelSettings:
  - port: {number: 9090}
    loadBalancer: {consistentHash: {httpCookie: {name: sticky, ttl: 60s}}}
subsets:
- name: v1
  labels: {version: v1}
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
- name: v2
  labels: {version: v2}
  trafficPolicy:
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {simple: ROUND_ROBIN}
"#,
    );
    let top = dr.effective(None, 8080);
    assert_eq!(top.load_balancer, LbPolicy::LeastRequest);
    assert_eq!(top.connection_pool.max_connections, 100);
    assert_eq!(top.connection_pool.connect_timeout.0.as_secs(), 2);
    assert_eq!(top.connection_pool.http1_max_pending_requests, 10);
    assert_eq!(top.connection_pool.http2_max_requests, 50);
    assert_eq!(top.connection_pool.max_requests_per_connection, 5);
    assert_eq!(top.connection_pool.max_retries, 3);
    assert_eq!(top.connection_pool.idle_timeout.0.as_secs(), 30);
    let od = top.outlier_detection.expect("outlier detection");
    assert_eq!(
        (
            od.consecutive_5xx_errors,
            od.consecutive_gateway_errors,
            od.max_ejection_percent,
            od.min_health_percent
        ),
        (3, 0, 50, 0)
    );
    assert_eq!(
        (od.interval.0.as_secs(), od.base_ejection_time.0.as_secs()),
        (5, 60)
    );

    let port = dr.effective(None, 9090);
    assert!(
        matches!(port.load_balancer, LbPolicy::ConsistentHash(HashKey::Cookie { ref name, .. }) if name == "sticky")
    );
    assert_eq!(
        port.connection_pool.max_connections,
        u32::MAX,
        "port-level settings replace the level: defaults"
    );
    assert!(port.outlier_detection.is_none());

    let v1 = dr.effective(Some("v1"), 8080);
    assert_eq!(v1.load_balancer, LbPolicy::Random, "subset field overrides");
    assert_eq!(
        v1.connection_pool.max_connections, 100,
        "other fields inherited"
    );

    let v2 = dr.effective(Some("v2"), 8080);
    assert_eq!(v2.load_balancer, LbPolicy::RoundRobin);
    assert_eq!(
        v2.connection_pool.max_connections,
        u32::MAX,
        "subset port-level replaces everything"
    );
    assert_eq!(
        dr.effective(Some("v2"), 7070).load_balancer,
        LbPolicy::LeastRequest
    );
    assert_eq!(
        dr.effective(Some("nope"), 7070).load_balancer,
        LbPolicy::LeastRequest
    );
}

#[test]
fn defaults_without_a_rule() {
    let p = rule("host: x").effective(None, 80);
    assert_eq!(
        p.load_balancer,
        LbPolicy::LeastRequest,
        "Istio's default load balancer"
    );
    assert_eq!(
        rule("host: x\ntrafficPolicy: {loadBalancer: {simple: UNSPECIFIED}}")
            .effective(None, 80)
            .load_balancer,
        LbPolicy::LeastRequest
    );
    assert_eq!(p.connection_pool.connect_timeout.0.as_secs(), 10);
    assert_eq!(
        p.connection_pool.max_requests_per_connection, 0,
        "unlimited"
    );
    let od = rule("host: x\ntrafficPolicy: {outlierDetection: {}}")
        .effective(None, 80)
        .outlier_detection
        .expect("od");
    assert_eq!(
        (
            od.consecutive_5xx_errors,
            od.interval.0.as_secs(),
            od.base_ejection_time.0.as_secs(),
            od.max_ejection_percent
        ),
        (5, 10, 30, 10)
    );
    assert_eq!(
        rule("host: x\ntrafficPolicy: {loadBalancer: {simple: LEAST_CONN}}")
            .effective(None, 80)
            .load_balancer,
        LbPolicy::LeastRequest
    );
    assert_eq!(
        rule("host: x\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}")
            .effective(None, 80)
            .load_balancer,
        LbPolicy::ConsistentHash(HashKey::SourceIp)
    );
    let _: Option<&SubsetSpec> = rule("host: x").subset("none");
}

#[test]
fn invalid_rules_name_the_field() {
    let check = |yaml: &str| {
        let spec: DestinationRuleSpec = serde_yaml_ng::from_str(yaml).expect("spec");
        destination_rule::validate(&spec).expect_err("invalid")
    };
    assert_eq!(check("subsets: []").0, "spec.host");
    assert_eq!(
        check("host: x\ntrafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}").0,
        "spec.trafficPolicy.loadBalancer"
    );
    assert_eq!(
        check("host: x\ntrafficPolicy: {loadBalancer: {consistentHash: {}}}").0,
        "spec.trafficPolicy.loadBalancer.consistentHash"
    );
    assert_eq!(
        check("host: x\nsubsets: [{name: a}, {name: a}]"),
        (
            "spec.subsets[1].name".to_string(),
            "subset \"a\" is defined twice".to_string()
        )
    );
    assert_eq!(
        check("host: x\nsubsets: [{name: a, trafficPolicy: {outlierDetection: {maxEjectionPercent: 120}}}]").0,
        "spec.subsets[0].trafficPolicy.outlierDetection.maxEjectionPercent"
    );
    assert_eq!(
        check("host: x\ntrafficPolicy: {portLevelSettings: [{port: {number: 80}}, {port: {number: 80}}]}").0,
        "spec.trafficPolicy.portLevelSettings[1].port.number"
    );
    assert_eq!(
        check("host: x\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: \"a b\", ttl: 1s}}}}").0,
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name"
    );
    assert_eq!(
        check("host: x\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: s, path: \"/a;b\"}}}}").0,
        "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.path"
    );
}
