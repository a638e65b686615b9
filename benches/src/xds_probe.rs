//! One measuring xDS client of the control-plane benchmark: a thin delta ADS stream on common's
//! generated protos, over TLS with a ztunnel pod's bearer token and node metadata, subscribing
//! (wildcard) to Istio's Address and Authorization types and our config type, ACKing every
//! response. It does no snapshot building (that is the proxy's cost, measured by the real
//! ztunnel): it reports each response's arrival time, encoded size and resource names to the
//! driver, so the driver can time the initial push and the spread of a change.

use anyhow::{Context, Result};
use common::xds::discovery::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, Node,
};
use prost::Message;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// The types a ztunnel of ours subscribes to.
pub fn types() -> [&'static str; 3] {
    [
        common::xds::ADDRESS_TYPE,
        common::xds::AUTHORIZATION_TYPE,
        common::xds::CONFIG_TYPE,
    ]
}

/// Who the probe claims to be and where it connects.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// `https://<ip>:<port>`.
    pub address: String,
    /// Name the serving certificate carries (the address's IP).
    pub server_name: String,
    /// The mesh root, PEM.
    pub root_pem: Vec<u8>,
    /// Bearer token (reviewed by the fake API server).
    pub token: String,
    /// Kubernetes node and ztunnel pod (in [`tests::cluster::SYSTEM_NS`]).
    pub node: String,
    pub pod: String,
}

/// One response as a probe saw it.
#[derive(Debug)]
pub struct Event {
    pub client: usize,
    pub at: Instant,
    pub type_url: String,
    /// `DeltaDiscoveryResponse::encoded_len` (the gRPC message, without HTTP/2 framing).
    pub bytes: usize,
    pub names: Vec<String>,
    pub removed: Vec<String>,
}

fn node(cfg: &ProbeConfig) -> Node {
    let ns = tests::cluster::SYSTEM_NS;
    let fields = [
        ("NODE_NAME", cfg.node.as_str()),
        ("NAME", cfg.pod.as_str()),
        ("NAMESPACE", ns),
    ]
    .into_iter()
    .map(|(k, v)| {
        (
            k.to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(v.to_string())),
            },
        )
    })
    .collect();
    Node {
        id: format!("ztunnel~0.0.0.0~{}.{ns}~{ns}.svc.cluster.local", cfg.pod),
        metadata: Some(prost_types::Struct { fields }),
        ..Default::default()
    }
}

/// Connects, subscribes and forwards every response to `events` until the stream ends or the
/// driver stops listening. Errors end the probe (the driver notices the missing responses).
pub async fn run(
    client: usize,
    cfg: ProbeConfig,
    events: mpsc::UnboundedSender<Event>,
) -> Result<()> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cfg.root_pem))
        .domain_name(cfg.server_name.clone());
    let channel = Endpoint::from_shared(cfg.address.clone())?
        .connect_timeout(Duration::from_secs(10))
        .tls_config(tls)?
        .connect()
        .await
        .with_context(|| format!("probe {client}: connecting to {}", cfg.address))?;
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {}", cfg.token).parse()?;
    let mut ads = AggregatedDiscoveryServiceClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", auth.clone());
            Ok(req)
        },
    )
    .max_decoding_message_size(512 << 20);
    let (tx, mut rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
    for t in types() {
        tx.send(DeltaDiscoveryRequest {
            node: Some(node(&cfg)),
            type_url: t.to_string(),
            ..Default::default()
        })
        .await?;
    }
    let mut stream = ads
        .delta_aggregated_resources(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
        .await
        .with_context(|| format!("probe {client}: opening the ADS stream"))?
        .into_inner();
    while let Some(r) = stream.message().await? {
        let at = Instant::now();
        tx.send(ack(&r)).await?;
        let ev = Event {
            client,
            at,
            bytes: r.encoded_len(),
            names: r.resources.into_iter().map(|x| x.name).collect(),
            removed: r.removed_resources,
            type_url: r.type_url,
        };
        if events.send(ev).is_err() {
            break;
        }
    }
    Ok(())
}

fn ack(r: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    }
}
