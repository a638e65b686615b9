//! Scale measurement of the delta ADS server: 10 000 workloads + 1 000 services (opaque
//! payloads of Istio-like sizes: 500 B and 300 B), 10 wildcard clients over loopback.
//! Prints the initial push (bytes, time to all clients), the time from one pod change to all
//! 10 clients having it (default 100 ms debounce included, and with the debounce flushed at
//! once), and the process RSS. Run: `cargo run --release -p controller --example xds_scale`.

use common::xds::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use common::xds::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use common::xds::ADDRESS_TYPE;
use controller::xds::{serve, Change, ServeConfig, XdsConfig, XdsServer};
use prost::Message;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn workload(i: usize, gen: u8) -> Change {
    let mut body = vec![gen; 500];
    body[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Change::upsert(
        ADDRESS_TYPE,
        format!("Kubernetes//Pod/ns{}/pod-{i}", i % 50),
        body,
        vec![format!("/10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)],
    )
}

fn service(i: usize) -> Change {
    let mut body = vec![7u8; 300];
    body[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Change::upsert(
        ADDRESS_TYPE,
        format!("ns{}/svc-{i}.ns{}.svc.cluster.local", i % 50, i % 50),
        body,
        vec![format!("/172.20.{}.{}", i >> 8, i & 255)],
    )
}

struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Client {
    async fn recv(&mut self) -> anyhow::Result<DeltaDiscoveryResponse> {
        let r = self
            .rx
            .message()
            .await?
            .ok_or_else(|| anyhow::anyhow!("stream closed"))?;
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await?;
        Ok(r)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rss0 = rss_kib();
    let xds = XdsServer::new(XdsConfig::default(), None);
    let t = Instant::now();
    let mut changes: Vec<Change> = (0..10_000).map(|i| workload(i, 1)).collect();
    changes.extend((0..1_000).map(service));
    xds.publish(changes);
    println!(
        "publish 11000 resources: {:?}, RSS {} → {} KiB",
        t.elapsed(),
        rss0,
        rss_kib()
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(
        listener,
        tonic::service::Routes::new(xds.service()),
        ServeConfig::default(),
        std::future::pending(),
    ));

    let t = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..10 {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(DeltaDiscoveryRequest {
            type_url: ADDRESS_TYPE.into(),
            ..Default::default()
        })
        .await?;
        let rx = AggregatedDiscoveryServiceClient::new(ch)
            .max_decoding_message_size(256 << 20)
            .delta_aggregated_resources(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
            .await?
            .into_inner();
        clients.push(Client { tx, rx });
    }
    let mut bytes = 0;
    let mut futs = Vec::new();
    for mut c in clients {
        futs.push(tokio::spawn(async move {
            let r = c.recv().await?;
            anyhow::Ok((c, r.encoded_len(), r.resources.len()))
        }));
    }
    let mut clients = Vec::new();
    for f in futs {
        let (c, len, n) = f.await??;
        assert_eq!(n, 11_000);
        bytes = len;
        clients.push(c);
    }
    println!(
        "initial push: {bytes} bytes per client; all 10 clients served in {:?}; RSS {} KiB",
        t.elapsed(),
        rss_kib()
    );

    for (label, flush) in [
        ("debounced (100 ms quiet)", false),
        ("flushed at once", true),
    ] {
        let mut samples = Vec::new();
        for round in 0..5u8 {
            let t = Instant::now();
            xds.publish(vec![workload(
                4242,
                10 + round + if flush { 100 } else { 0 },
            )]);
            if flush {
                xds.flush_now();
            }
            let mut futs = Vec::new();
            for mut c in clients.drain(..) {
                futs.push(tokio::spawn(async move {
                    let r = c.recv().await?;
                    assert_eq!(r.resources.len(), 1);
                    anyhow::Ok(c)
                }));
            }
            for f in futs {
                clients.push(f.await??);
            }
            samples.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        samples.sort();
        println!(
            "one pod change → all 10 clients, {label}: median {:?}, max {:?}",
            samples[samples.len() / 2],
            samples[samples.len() - 1]
        );
    }
    println!("final RSS {} KiB", rss_kib());
    Ok(())
}
