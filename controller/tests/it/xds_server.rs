//! The delta ADS server driven by a real tonic client (the generated
//! `aggregated_discovery_service_client`) over loopback TCP: initial wildcard pushes,
//! debounced fan-out, ACK/NACK, removals, reconnect with `initial_resource_versions`, explicit
//! subscriptions, large requests and responses, the gRPC status of an oversized response and of
//! an unknown method, coalescing for a client that does not read, max connection age,
//! authentication and TLS.

use common::xds::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use common::xds::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};
use common::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use controller::auth::{Authenticator, CallerIdentity};
use controller::xds::{serve, Change, DebounceConfig, ServeConfig, XdsConfig, XdsServer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

const WAIT: Duration = Duration::from_secs(10);

/// A server config with debounce `quiet_ms` / `max_ms` (short, for tests).
pub(crate) fn cfg(quiet_ms: u64, max_ms: u64) -> XdsConfig {
    XdsConfig {
        debounce: DebounceConfig {
            quiet: Duration::from_millis(quiet_ms),
            max: Duration::from_millis(max_ms),
        },
        ..XdsConfig::default()
    }
}

/// Serves `xds` on a fresh loopback port; returns the address.
pub(crate) async fn start_with(xds: &XdsServer, serve_cfg: ServeConfig) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = tonic::service::Routes::new(xds.service());
    tokio::spawn(serve(listener, routes, serve_cfg, std::future::pending()));
    addr
}

async fn start(xds: &XdsServer) -> SocketAddr {
    start_with(xds, ServeConfig::default()).await
}

fn addr_change(name: &str, content: &str) -> Change {
    Change::upsert(
        ADDRESS_TYPE,
        name,
        content.as_bytes().to_vec(),
        vec![format!("/{name}")],
    )
}

pub(super) struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn node() -> Node {
    let mut fields = std::collections::BTreeMap::new();
    for (k, v) in [
        ("NODE_NAME", "node1"),
        ("NAME", "ztunnel-a"),
        ("NAMESPACE", "istio-system"),
    ] {
        fields.insert(
            k.to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(v.into())),
            },
        );
    }
    Node {
        id: "ztunnel~10.0.0.1~ztunnel-a.istio-system~istio-system.svc.cluster.local".into(),
        metadata: Some(prost_types::Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    }
}

fn initial(t: &str, versions: HashMap<String, String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node()),
        type_url: t.into(),
        initial_resource_versions: versions,
        ..Default::default()
    }
}

impl Client {
    async fn open_on(
        ch: Channel,
        first: Vec<DeltaDiscoveryRequest>,
    ) -> Result<Client, tonic::Status> {
        let (tx, mut rx) = mpsc::channel(16);
        for r in first {
            tx.send(r).await.unwrap();
        }
        let mut c = AggregatedDiscoveryServiceClient::new(ch)
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        let rx = c
            .delta_aggregated_resources(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
            .await?
            .into_inner();
        Ok(Client { tx, rx })
    }

    pub(super) async fn open(addr: SocketAddr, first: Vec<DeltaDiscoveryRequest>) -> Client {
        Self::open_on(channel(addr).await, first).await.unwrap()
    }

    /// A wildcard client for Address (and Authorization), initial responses read and ACKed.
    async fn wildcard(addr: SocketAddr) -> Client {
        let mut c = Client::open(addr, vec![initial(ADDRESS_TYPE, HashMap::new())]).await;
        let r = c.recv().await;
        c.ack(&r).await;
        c
    }

    pub(super) async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("a response in time")
            .expect("stream ok")
            .expect("stream open")
    }

    async fn expect_nothing(&mut self, d: Duration) {
        if let Ok(r) = tokio::time::timeout(d, self.rx.message()).await {
            panic!("unexpected: {r:?}");
        }
    }

    pub(super) async fn send(&self, r: DeltaDiscoveryRequest) {
        self.tx.send(r).await.unwrap();
    }

    pub(super) async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    async fn nack(&self, r: &DeltaDiscoveryResponse, message: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: Some(Status {
                code: 0,
                message: message.into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    let mut v: Vec<&str> = r.resources.iter().map(|r| r.name.as_str()).collect();
    v.sort();
    v
}

fn content<'a>(r: &'a DeltaDiscoveryResponse, name: &str) -> &'a [u8] {
    let res = r
        .resources
        .iter()
        .find(|x| x.name == name)
        .expect("resource");
    &res.resource.as_ref().expect("any").value
}

#[tokio::test]
async fn initial_wildcard_gets_everything_and_nothing_is_answered_empty() {
    let xds = XdsServer::new(cfg(20, 200), None);
    xds.publish(vec![
        addr_change("w1", "a"),
        addr_change("w2", "b"),
        addr_change("default/svc.default.svc.cluster.local", "s"),
    ]);
    let addr = start(&xds).await;
    let mut c = Client::open(
        addr,
        vec![
            initial(ADDRESS_TYPE, HashMap::new()),
            initial(AUTHORIZATION_TYPE, HashMap::new()),
        ],
    )
    .await;
    let mut got = HashMap::new();
    for _ in 0..2 {
        let r = c.recv().await;
        got.insert(r.type_url.clone(), r);
    }
    let a = &got[ADDRESS_TYPE];
    assert_eq!(
        names(a),
        vec!["default/svc.default.svc.cluster.local", "w1", "w2"]
    );
    let w1 = a.resources.iter().find(|r| r.name == "w1").unwrap();
    assert_eq!(w1.aliases, vec!["/w1"]);
    assert_eq!(w1.version.len(), 16);
    assert_eq!(w1.resource.as_ref().unwrap().type_url, ADDRESS_TYPE);
    let p = &got[AUTHORIZATION_TYPE];
    assert!(p.resources.is_empty() && p.removed_resources.is_empty());
    assert!(!p.nonce.is_empty() && p.nonce != a.nonce);
    assert_eq!(xds.resource_count(ADDRESS_TYPE), 3);

    // The node's claims are kept per stream.
    let conns = xds.connections();
    assert_eq!(conns.len(), 1);
    let n = conns[0].node.as_ref().expect("node");
    assert_eq!(n.node_name(), Some("node1"));
    assert_eq!(n.proxy_type(), "ztunnel");
    assert!(conns[0].peer.is_some());
}

#[tokio::test]
async fn an_empty_server_answers_the_initial_request() {
    let xds = XdsServer::new(cfg(20, 200), None);
    let addr = start(&xds).await;
    let mut c = Client::open(addr, vec![initial(ADDRESS_TYPE, HashMap::new())]).await;
    let r = c.recv().await;
    assert_eq!(r.type_url, ADDRESS_TYPE);
    assert!(r.resources.is_empty() && r.removed_resources.is_empty());
}

#[tokio::test]
async fn quick_publishes_reach_two_clients_once_debounced() {
    let xds = XdsServer::new(cfg(150, 2000), None);
    xds.publish(vec![addr_change("w1", "v0")]);
    let addr = start(&xds).await;
    let mut c1 = Client::wildcard(addr).await;
    let mut c2 = Client::wildcard(addr).await;
    let before = xds.metrics().pushes(ADDRESS_TYPE);
    for i in 1..=10 {
        xds.publish(vec![
            addr_change("w1", &format!("v{i}")),
            addr_change(&format!("new{}", i % 3), "n"),
        ]);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Republishing identical content is not a change.
    xds.publish(vec![addr_change("new0", "n")]);
    for c in [&mut c1, &mut c2] {
        let r = c.recv().await;
        assert_eq!(names(&r), vec!["new0", "new1", "new2", "w1"]);
        assert_eq!(content(&r, "w1"), b"v10");
        c.ack(&r).await;
    }
    c1.expect_nothing(Duration::from_millis(400)).await;
    c2.expect_nothing(Duration::from_millis(10)).await;
    assert_eq!(xds.metrics().pushes(ADDRESS_TYPE) - before, 2);
    let text = xds.metrics().encode();
    assert!(
        text.contains("xds_push_latency_seconds_count{type=\"istio.workload.Address\"} 2"),
        "{text}"
    );
    assert!(text.contains("xds_connected_clients 2"), "{text}");
    assert!(
        text.contains("xds_resources{type=\"istio.workload.Address\"} 4"),
        "{text}"
    );
}

#[tokio::test]
async fn nack_is_counted_and_the_rejected_resource_is_not_resent() {
    let xds = XdsServer::new(cfg(10, 100), None);
    let addr = start(&xds).await;
    let mut c = Client::wildcard(addr).await;
    xds.publish(vec![addr_change("bad", "garbage")]);
    let r = c.recv().await;
    assert_eq!(names(&r), vec!["bad"]);
    c.nack(&r, "bad: decode error").await;
    xds.publish(vec![addr_change("good", "ok")]);
    let r2 = c.recv().await;
    assert_eq!(
        names(&r2),
        vec!["good"],
        "the NACKed resource is not sent again"
    );
    c.ack(&r2).await;
    assert_eq!(xds.metrics().nacks(ADDRESS_TYPE), 1);
    assert_eq!(xds.metrics().nacks(AUTHORIZATION_TYPE), 0);
    // Once it changes, it is sent again.
    xds.publish(vec![addr_change("bad", "fixed")]);
    let r3 = c.recv().await;
    assert_eq!(names(&r3), vec!["bad"]);
    assert_eq!(content(&r3, "bad"), b"fixed");
}

#[tokio::test]
async fn removal_reaches_the_client() {
    let xds = XdsServer::new(cfg(10, 100), None);
    xds.publish(vec![addr_change("a", "1"), addr_change("b", "1")]);
    let addr = start(&xds).await;
    let mut c = Client::wildcard(addr).await;
    xds.publish(vec![Change::remove(ADDRESS_TYPE, "a")]);
    let r = c.recv().await;
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, vec!["a"]);
    assert_eq!(xds.resource_count(ADDRESS_TYPE), 1);
}

#[tokio::test]
async fn reconnect_gets_only_changes_and_removals_of_vanished_names() {
    let xds = XdsServer::new(cfg(10, 100), None);
    xds.publish(vec![
        addr_change("same", "1"),
        addr_change("changed", "1"),
        addr_change("gone", "1"),
    ]);
    let addr = start(&xds).await;
    let mut c = Client::open(addr, vec![initial(ADDRESS_TYPE, HashMap::new())]).await;
    let r = c.recv().await;
    let versions: HashMap<String, String> = r
        .resources
        .iter()
        .map(|x| (x.name.clone(), x.version.clone()))
        .collect();
    drop(c);
    xds.publish(vec![
        addr_change("changed", "2"),
        Change::remove(ADDRESS_TYPE, "gone"),
        addr_change("added", "1"),
    ]);
    let mut c2 = Client::open(addr, vec![initial(ADDRESS_TYPE, versions)]).await;
    let r2 = c2.recv().await;
    assert_eq!(names(&r2), vec!["added", "changed"]);
    assert_eq!(r2.removed_resources, vec!["gone"]);
}

#[tokio::test]
async fn explicit_subscription_gets_its_names_and_missing_ones_as_removed() {
    let xds = XdsServer::new(cfg(10, 100), None);
    xds.publish(vec![addr_change("a", "1"), addr_change("b", "1")]);
    let addr = start(&xds).await;
    let mut req = initial(ADDRESS_TYPE, HashMap::new());
    req.resource_names_subscribe = vec!["a".into(), "missing".into()];
    let mut c = Client::open(addr, vec![req]).await;
    let r = c.recv().await;
    assert_eq!(names(&r), vec!["a"]);
    assert_eq!(r.removed_resources, vec!["missing"]);
    c.ack(&r).await;
    // Changes to other names are not pushed; to subscribed ones they are.
    xds.publish(vec![addr_change("b", "2")]);
    c.expect_nothing(Duration::from_millis(200)).await;
    xds.publish(vec![addr_change("a", "2")]);
    let r2 = c.recv().await;
    assert_eq!(names(&r2), vec!["a"]);
}

#[tokio::test]
async fn a_40_mib_request_is_accepted() {
    let xds = XdsServer::new(cfg(10, 100), None);
    xds.publish(vec![addr_change("kept", "1")]);
    let addr = start(&xds).await;
    let big = "v".repeat(1 << 20);
    let versions: HashMap<String, String> =
        (0..40).map(|i| (format!("old{i}"), big.clone())).collect();
    let mut c = Client::open(addr, vec![initial(ADDRESS_TYPE, versions)]).await;
    let r = c.recv().await;
    assert_eq!(names(&r), vec!["kept"]);
    assert_eq!(r.removed_resources.len(), 40);
}

/// A response of several MB (large and small resources, sent in chunks as it is written) reaches
/// a real client intact, and so do the small responses after it.
#[tokio::test]
async fn a_multi_megabyte_response_arrives_whole() {
    let xds = XdsServer::new(cfg(10, 100), None);
    let mut changes: Vec<Change> = (0..3000)
        .map(|i| addr_change(&format!("w{i:04}"), &format!("{i}").repeat(1 + i % 700)))
        .collect();
    changes.push(addr_change("huge", &"h".repeat(3 << 20)));
    xds.publish(changes);
    xds.flush_now();
    let addr = start(&xds).await;
    let mut c = Client::open(addr, vec![initial(ADDRESS_TYPE, HashMap::new())]).await;
    let r = c.recv().await;
    assert_eq!(r.resources.len(), 3001);
    assert_eq!(content(&r, "huge").len(), 3 << 20);
    for i in [0, 1, 699, 1234, 2999] {
        let want = format!("{i}").repeat(1 + i % 700);
        assert_eq!(content(&r, &format!("w{i:04}")), want.as_bytes());
    }
    c.ack(&r).await;
    xds.publish(vec![addr_change("w0001", "changed")]);
    let r = c.recv().await;
    assert_eq!(names(&r), vec!["w0001"]);
    assert_eq!(content(&r, "w0001"), b"changed");
}

/// A response over the encoding limit ends the stream with OUT_OF_RANGE (as tonic's own
/// server does), and the client sees the status rather than a hang.
#[tokio::test]
async fn a_response_over_the_limit_ends_the_stream_with_a_status() {
    let xds = XdsServer::new(
        XdsConfig {
            max_encoding_message_size: 64 << 10,
            ..cfg(10, 100)
        },
        None,
    );
    xds.publish(vec![addr_change("big", &"b".repeat(100 << 10))]);
    xds.flush_now();
    let addr = start(&xds).await;
    let mut c = Client::open(addr, vec![initial(ADDRESS_TYPE, HashMap::new())]).await;
    let status = tokio::time::timeout(WAIT, c.rx.message())
        .await
        .expect("an answer in time")
        .expect_err("the stream ends with an error");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
}

/// A method of the service that is not served answers UNIMPLEMENTED, as a generated server
/// would.
#[tokio::test]
async fn an_unknown_method_is_unimplemented() {
    let xds = XdsServer::new(cfg(10, 100), None);
    let addr = start(&xds).await;
    let mut grpc = tonic::client::Grpc::new(channel(addr).await);
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<DeltaDiscoveryRequest, DeltaDiscoveryResponse>::default();
    let path = http::uri::PathAndQuery::from_static(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    );
    let requests = futures_util::stream::iter(vec![initial(ADDRESS_TYPE, HashMap::new())]);
    let r = grpc
        .streaming(tonic::Request::new(requests), path, codec)
        .await;
    let status = r.expect_err("not served");
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
}

#[tokio::test]
async fn a_client_that_does_not_read_gets_only_the_latest_state() {
    // No debounce to speak of: every publish is its own push.
    let xds = XdsServer::new(cfg(1, 1), None);
    let addr = start(&xds).await;
    let mut c = Client::wildcard(addr).await;
    let before = xds.metrics().pushes(ADDRESS_TYPE);
    let big = |v: usize| "x".repeat(100_000) + &v.to_string();
    for v in 0..50 {
        xds.publish(
            (0..5)
                .map(|n| addr_change(&format!("w{n}"), &big(v)))
                .collect(),
        );
        xds.flush_now();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // One response went out before the client stopped answering; the other 49 versions
    // coalesced into the next one.
    assert_eq!(xds.metrics().pushes(ADDRESS_TYPE) - before, 1);
    let first = c.recv().await;
    assert_eq!(names(&first).len(), 5);
    c.ack(&first).await;
    let latest = c.recv().await;
    assert_eq!(names(&latest).len(), 5);
    for n in 0..5 {
        assert_eq!(content(&latest, &format!("w{n}")), big(49).as_bytes());
    }
    c.ack(&latest).await;
    c.expect_nothing(Duration::from_millis(200)).await;
    assert_eq!(xds.metrics().pushes(ADDRESS_TYPE) - before, 2);
}

#[tokio::test]
async fn streams_end_cleanly_at_max_connection_age() {
    let xds = XdsServer::new(cfg(10, 100), None);
    let addr = start_with(
        &xds,
        ServeConfig {
            max_connection_age: Some(Duration::from_millis(300)),
            max_connection_age_jitter: 0.0,
            grace: Duration::from_secs(1),
            ..ServeConfig::default()
        },
    )
    .await;
    let mut c = Client::wildcard(addr).await;
    let end = tokio::time::timeout(WAIT, c.rx.message())
        .await
        .expect("the stream ends");
    assert!(matches!(end, Ok(None)), "a clean end, got {end:?}");
    // The client reconnects (on a new connection) and is served again.
    let mut c2 = Client::open(addr, vec![initial(ADDRESS_TYPE, HashMap::new())]).await;
    let r = c2.recv().await;
    assert_eq!(r.type_url, ADDRESS_TYPE);
}

struct TokenAuth;

#[tonic::async_trait]
impl Authenticator for TokenAuth {
    async fn authenticate(
        &self,
        md: &tonic::metadata::MetadataMap,
    ) -> Result<CallerIdentity, tonic::Status> {
        match md.get("authorization").and_then(|v| v.to_str().ok()) {
            Some("Bearer good") => Ok(CallerIdentity {
                namespace: "istio-system".into(),
                service_account: "ztunnel".into(),
                pod_name: Some("ztunnel-a".into()),
                pod_uid: None,
                cluster_id: String::new(),
            }),
            _ => Err(tonic::Status::unauthenticated("bad token")),
        }
    }
}

#[tokio::test]
async fn streams_are_authenticated_when_an_authenticator_is_set() {
    let xds = XdsServer::new(cfg(10, 100), Some(Arc::new(TokenAuth)));
    let addr = start(&xds).await;
    let denied = Client::open_on(
        channel(addr).await,
        vec![initial(ADDRESS_TYPE, HashMap::new())],
    )
    .await;
    assert_eq!(
        denied.err().map(|e| e.code()),
        Some(tonic::Code::Unauthenticated)
    );

    let (tx, mut rx) = mpsc::channel(4);
    tx.send(initial(ADDRESS_TYPE, HashMap::new()))
        .await
        .unwrap();
    let mut client = AggregatedDiscoveryServiceClient::new(channel(addr).await);
    let mut req = tonic::Request::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    req.metadata_mut()
        .insert("authorization", "Bearer good".parse().unwrap());
    let mut stream = client
        .delta_aggregated_resources(req)
        .await
        .unwrap()
        .into_inner();
    let r = tokio::time::timeout(WAIT, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.type_url, ADDRESS_TYPE);
    let conns = xds.connections();
    assert_eq!(conns.len(), 1);
    assert_eq!(
        conns[0]
            .caller
            .as_ref()
            .map(|c| c.spiffe_id("cluster.local")),
        Some("spiffe://cluster.local/ns/istio-system/sa/ztunnel".to_string())
    );
    drop(tx);
}

#[tokio::test]
async fn serves_over_tls_with_a_dns_name_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["istiod.istio-system.svc".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let xds = XdsServer::new(cfg(10, 100), None);
    xds.publish(vec![addr_change("w1", "a")]);
    let addr = start_with(
        &xds,
        ServeConfig {
            tls: Some(Arc::new(tls)),
            ..ServeConfig::default()
        },
    )
    .await;
    let connect = |name: &'static str| {
        let ca_pem = ca.pem();
        async move {
            Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
                        .domain_name(name),
                )
                .unwrap()
                .connect()
                .await
        }
    };
    let ch = connect("istiod.istio-system.svc")
        .await
        .expect("TLS connect");
    let mut c = Client::open_on(ch, vec![initial(ADDRESS_TYPE, HashMap::new())])
        .await
        .unwrap();
    let r = c.recv().await;
    assert_eq!(names(&r), vec!["w1"]);
    // A name the certificate does not carry is refused by the client.
    let wrong = match connect("other.example").await {
        Err(_) => true,
        Ok(ch) => Client::open_on(ch, vec![initial(ADDRESS_TYPE, HashMap::new())])
            .await
            .is_err(),
    };
    assert!(wrong, "the certificate must not verify for another name");
}
