//! Telemetry: the Istio TCP metrics of both ztunnels count tunnelled flows and their bytes, with
//! source and destination workload labels.

use std::time::Duration;
use tests::admin::sum_metric;
use tests::apps::{echo_random, echo_server};
use tests::mesh::{echo_vip, standard_config, Mesh};
use tests::support::{any, eventually, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_tunnelled_flows() {
    const FLOWS: u64 = 5;
    const LEN: u64 = 256 << 10;
    let mesh = Mesh::two_nodes("metrics", &standard_config())
        .await
        .unwrap();
    let _server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    for i in 0..FLOWS {
        let stream = mesh.pod("a").ns.connect(echo_vip()).await.unwrap();
        let t = within(60, "flow", echo_random(stream, LEN, i))
            .await
            .unwrap();
        assert!(t.echoed_intact());
    }

    let flow = [("source_workload", "a"), ("destination_workload", "b")];
    for node in ["n1", "n2"] {
        let zt = mesh.ztunnel(node);
        let counted = eventually(Duration::from_secs(10), || async move {
            let m = zt.metrics().await?;
            let ok = sum_metric(&m, "istio_tcp_connections_opened_total", &flow) >= FLOWS as f64
                && sum_metric(&m, "istio_tcp_connections_closed_total", &flow) >= FLOWS as f64
                && sum_metric(&m, "istio_tcp_sent_bytes_total", &flow) >= (FLOWS * LEN) as f64
                && sum_metric(&m, "istio_tcp_received_bytes_total", &flow) >= (FLOWS * LEN) as f64;
            Ok(ok)
        })
        .await;
        if !matches!(counted, Ok(true)) {
            let text = tests::admin::get_ok(&mesh.node(node).ns, 15020, "/metrics")
                .await
                .unwrap_or_else(|e| format!("{e:#}"));
            let tcp: Vec<&str> = text.lines().filter(|l| l.contains("istio_tcp")).collect();
            panic!(
                "{node}: expected ≥{FLOWS} opened/closed and ≥{} bytes each way for a → b ({counted:?}); istio_tcp lines:\n{}",
                FLOWS * LEN,
                tcp.join("\n")
            );
        }
    }
}
