use super::*;
use hickory_proto::rr::Name;
use std::str::FromStr;

const CONFIG: &str = r#"
workloads:
- {uid: a, name: a, namespace: default, serviceAccount: sa-a, workloadIps: [10.244.1.2], protocol: HBONE, node: n1}
- {uid: o, name: o, namespace: other, serviceAccount: sa-o, workloadIps: [10.244.1.3], protocol: HBONE, node: n1}
- {uid: b, name: b, namespace: default, serviceAccount: sa-b, workloadIps: [10.244.2.2], protocol: HBONE, node: n2, services: {"default/echo.default.svc.cluster.local": {8080: 9000}}}
services:
- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["/10.96.0.10", "/fd00::10"], ports: {8080: 9000}}
- {name: api, namespace: other, hostname: api.other.svc.cluster.local, vips: ["/10.96.0.20"], ports: {80: 8080}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external-db, namespace: default}
spec:
  hosts: [external-db]
  ports: [{number: 3306, name: tcp, protocol: TCP}]
  location: MESH_EXTERNAL
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: googleapis, namespace: default}
spec:
  hosts: [www.googleapis.com]
  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: default}
spec:
  hosts: ["*.wild.example.com"]
  addresses: [10.96.7.7]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wilder, namespace: default}
spec:
  hosts: ["*.example.com"]
  addresses: [10.96.7.8]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: other}
spec:
  hosts: [private.example.org]
  addresses: [10.96.8.8]
  exportTo: ["."]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec:
  clusterIP: None
  ports: [{port: 3306, protocol: TCP, targetPort: 3306}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: db, namespace: default}
subsets: [{addresses: [{ip: 10.244.2.3}, {ip: 10.244.2.4}], ports: [{port: 3306, protocol: TCP}]}]
"#;

fn snap() -> Snapshot {
    common::config::load_str(CONFIG, "dns.yaml").expect("config loads")
}

fn query(name: &str, t: RecordType) -> Message {
    let mut m = Message::query();
    m.metadata.id = 4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).expect("name"), t));
    m
}

fn ips(v: &[&str]) -> Vec<IpAddr> {
    v.iter().map(|s| s.parse().expect("ip")).collect()
}

/// The A/AAAA answer the proxy gives to a pod of `ns` (None: forwarded).
fn answer(snap: &Snapshot, ns: &str, name: &str, t: RecordType) -> Option<Vec<IpAddr>> {
    let client = snap
        .workloads
        .iter()
        .find(|w| w.namespace == ns)
        .map(|w| w.as_ref());
    match decide(snap, "cluster.local", client, &query(name, t)) {
        Decision::Forward => None,
        Decision::Answer(m) => {
            assert_eq!(m.metadata.id, 4242);
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert!(m.metadata.authoritative && m.metadata.recursion_available);
            assert_eq!(m.queries.len(), 1);
            Some(
                m.answers
                    .iter()
                    .map(|r| {
                        assert_eq!(r.ttl, TTL);
                        assert_eq!(r.name.to_ascii(), Name::from_str(name).unwrap().to_ascii());
                        match &r.data {
                            RData::A(a) => IpAddr::V4(a.0),
                            RData::AAAA(a) => IpAddr::V6(a.0),
                            other => panic!("unexpected record {other:?}"),
                        }
                    })
                    .collect(),
            )
        }
    }
}

#[test]
fn service_names_along_the_search_path() {
    let s = snap();
    let vip = ips(&["10.96.0.10"]);
    for name in [
        "echo.default.svc.cluster.local.",
        "ECHO.Default.svc.cluster.local.",
        "echo.default.svc.",
        "echo.default.",
        "echo.",
    ] {
        assert_eq!(
            answer(&s, "default", name, RecordType::A),
            Some(vip.clone()),
            "{name}"
        );
    }
    assert_eq!(
        answer(&s, "default", "echo.", RecordType::AAAA),
        Some(ips(&["fd00::10"]))
    );
    // A short name means the pod's own namespace.
    assert_eq!(answer(&s, "other", "echo.", RecordType::A), None);
    assert_eq!(
        answer(&s, "other", "api.", RecordType::A),
        Some(ips(&["10.96.0.20"]))
    );
    assert_eq!(
        answer(&s, "default", "api.other.", RecordType::A),
        Some(ips(&["10.96.0.20"]))
    );
    // Search-path misses are not ours.
    assert_eq!(
        answer(
            &s,
            "default",
            "www.google.com.default.svc.cluster.local.",
            RecordType::A
        ),
        None
    );
    assert_eq!(answer(&s, "default", "nothere.", RecordType::A), None);
}

#[test]
fn service_entry_hosts_get_their_auto_vip_and_wildcards_match() {
    let s = snap();
    let db = s.addresses_for_host("external-db").to_vec();
    assert_eq!(db.len(), 1);
    assert!(
        matches!(db[0], IpAddr::V4(v4) if common::vip::is_auto_vip(v4)),
        "{db:?}"
    );
    assert_eq!(
        answer(&s, "default", "external-db.", RecordType::A),
        Some(db.clone())
    );
    // Stable: the same host gets the same address from a freshly built snapshot.
    assert_eq!(
        answer(&snap(), "default", "external-db.", RecordType::A),
        Some(db)
    );
    let g = s.addresses_for_host("www.googleapis.com").to_vec();
    assert_eq!(
        answer(&s, "default", "www.googleapis.com.", RecordType::A),
        Some(g)
    );
    // Known name, no IPv6 address: NOERROR without records, not forwarded.
    assert_eq!(
        answer(&s, "default", "external-db.", RecordType::AAAA),
        Some(vec![])
    );
    // The most specific wildcard wins; the bare domain is not covered by `*.`.
    assert_eq!(
        answer(&s, "default", "a.b.wild.example.com.", RecordType::A),
        Some(ips(&["10.96.7.7"]))
    );
    assert_eq!(
        answer(&s, "default", "x.example.com.", RecordType::A),
        Some(ips(&["10.96.7.8"]))
    );
    assert_eq!(answer(&s, "default", "example.com.", RecordType::A), None);
    // exportTo: "." hides the host from other namespaces.
    assert_eq!(
        answer(&s, "other", "private.example.org.", RecordType::A),
        Some(ips(&["10.96.8.8"]))
    );
    assert_eq!(
        answer(&s, "default", "private.example.org.", RecordType::A),
        None
    );
}

#[test]
fn headless_services_answer_their_endpoints() {
    let s = snap();
    assert_eq!(
        answer(&s, "default", "db.", RecordType::A),
        Some(ips(&["10.244.2.3", "10.244.2.4"]))
    );
}

#[test]
fn other_types_opcodes_and_classes_are_forwarded() {
    let s = snap();
    for t in [
        RecordType::SRV,
        RecordType::TXT,
        RecordType::MX,
        RecordType::ANY,
    ] {
        assert_eq!(
            decide(
                &s,
                "cluster.local",
                None,
                &query("echo.default.svc.cluster.local.", t)
            ),
            Decision::Forward,
            "{t:?}"
        );
    }
    let mut update = query("echo.default.svc.cluster.local.", RecordType::A);
    update.metadata.op_code = OpCode::Update;
    assert_eq!(
        decide(&s, "cluster.local", None, &update),
        Decision::Forward
    );
    let mut chaos = query("echo.default.svc.cluster.local.", RecordType::A);
    chaos.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(decide(&s, "cluster.local", None, &chaos), Decision::Forward);
}

#[test]
fn malformed_queries_get_formerr_or_are_dropped() {
    assert_eq!(parse_query(&[1, 2, 3]), Err(Malformed::Drop));
    // A header announcing one question that is not there.
    let bytes = [
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'f', b'o',
    ];
    let Err(Malformed::FormErr(m)) = parse_query(&bytes) else {
        panic!("no FORMERR");
    };
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    assert!(m.metadata.recursion_desired);
    // A response is never answered.
    let mut resp = query("x.", RecordType::A);
    resp.metadata.message_type = MessageType::Response;
    assert_eq!(
        parse_query(&resp.to_vec().expect("encode")),
        Err(Malformed::Drop)
    );
    // Garbage of every length never panics.
    let mut seed = 0x9e37_79b9_u32;
    for len in 0..300 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        let _ = parse_query(&bytes);
    }
    let ok = query("echo.", RecordType::A).to_vec().expect("encode");
    assert!(parse_query(&ok).is_ok());
}

#[test]
fn big_answers_are_truncated_for_udp() {
    let mut m = Message::response(7, OpCode::Query);
    m.add_query(Query::query(Name::from_str("db.").unwrap(), RecordType::A));
    for i in 0..100u8 {
        m.add_answer(Record::from_rdata(
            Name::from_str("db.").unwrap(),
            TTL,
            RData::A(A(std::net::Ipv4Addr::new(10, 0, 0, i))),
        ));
    }
    let full = encode(&m, 65535).expect("encode");
    assert!(full.len() > UDP_LIMIT);
    let cut = encode(&m, UDP_LIMIT).expect("encode");
    assert!(cut.len() <= UDP_LIMIT);
    let back = Message::from_vec(&cut).expect("decode");
    assert!(back.metadata.truncation && back.answers.is_empty());
    assert_eq!(udp_limit(&query("x.", RecordType::A)), UDP_LIMIT);
}
