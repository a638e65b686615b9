//! The endpoints beside the data plane: admin (`/logging`, `/config_dump`) on 15000, readiness
//! on 15021 and Prometheus metrics on 15020.

use std::time::Duration;
use tests::admin::{http_exchange, parse_metrics, sum_metric};
use tests::apps::{echo_roundtrip, echo_server, probe_echo, Outcome};
use tests::config::Service;
use tests::mesh::{echo_vip, standard_config, Mesh};
use tests::support::{any, eventually, within};
use tests::tproxy::CaptureState;
use tests::ztunnel::{ZtunnelProcess, METRICS_PORT, READINESS_PORT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Opens a → echo VIP, echoes, closes, waits for the server to record it; returns the client
/// address as ztunnel's access log prints it (`10.244.1.2:<port>`).
async fn one_connection(mesh: &Mesh, server: &tests::apps::Server) -> String {
    let before = server.records().len();
    let mut s = mesh.pod("a").ns.connect(echo_vip()).await.unwrap();
    let src = s.local_addr().unwrap().to_string();
    within(10, "echo", echo_roundtrip(&mut s, b"logging probe"))
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(10, "EOF", s.read_to_end(&mut rest)).await.unwrap();
    server
        .wait_records(before + 1, Duration::from_secs(10))
        .await
        .unwrap();
    src
}

async fn get_logging(zt: &ZtunnelProcess) -> String {
    let (status, body) = zt.admin_request("GET", "/logging").await.unwrap();
    assert_eq!(status, 200, "GET /logging: {body}");
    body.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_logging_changes_level_and_config_dump_reflects_snapshot() {
    let config = standard_config();
    let mesh = Mesh::two_nodes("admin", &config).await.unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let zt = mesh.ztunnel("n1");

    // /logging: the current level, changed at runtime, and the change takes effect.
    assert_eq!(get_logging(zt).await, "level=info");
    let (status, body) = zt
        .admin_request("POST", "/logging?level=warn")
        .await
        .unwrap();
    assert_eq!(status, 200, "POST level=warn: {body}");
    assert_eq!(get_logging(zt).await, "level=warn");
    let quiet = one_connection(&mesh, &server).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !zt.log().lines().any(|l| l.contains(&quiet)),
        "an info access-log line for {quiet} was written at level warn"
    );

    let (status, body) = zt
        .admin_request("POST", "/logging?level=debug")
        .await
        .unwrap();
    assert_eq!(status, 200, "POST level=debug: {body}");
    assert_eq!(get_logging(zt).await, "level=debug");
    let loud = one_connection(&mesh, &server).await;
    zt.wait_log_line(&[&loud, "connection complete"], Duration::from_secs(5))
        .await
        .expect("no access-log line at level debug");

    // Bad filters are refused and change nothing.
    for bad in ["crate=notalevel", "info,x=loud", ""] {
        let (status, body) = zt
            .admin_request("POST", &format!("/logging?level={bad}"))
            .await
            .unwrap();
        assert_eq!(status, 400, "POST level={bad:?}: {body}");
    }
    let (status, _) = zt.admin_request("POST", "/logging").await.unwrap();
    assert_eq!(status, 400, "POST /logging without a level");
    assert_eq!(get_logging(zt).await, "level=debug");

    // /config_dump: the node, the workloads and services of the file, this node's identities.
    let dump: serde_json::Value = serde_json::from_str(&zt.config_dump().await.unwrap()).unwrap();
    assert_eq!(dump["node"], "n1", "{dump:#}");
    let workloads = dump["config"]["workloads"]
        .as_array()
        .unwrap_or_else(|| panic!("no config.workloads:\n{dump:#}"));
    assert_eq!(workloads.len(), config.workloads.len(), "{workloads:#?}");
    for w in &config.workloads {
        let got = workloads
            .iter()
            .find(|x| x["name"] == w.name.as_str())
            .unwrap_or_else(|| panic!("workload {} missing: {workloads:#?}", w.name));
        assert_eq!(got["namespace"], w.namespace.as_str());
        assert_eq!(got["serviceAccount"], w.service_account.as_str());
        assert_eq!(got["node"], w.node.as_str());
        assert_eq!(got["protocol"], "HBONE");
        assert_eq!(got["workloadIps"], serde_json::json!([w.ip]), "{got:#}");
    }
    let services = dump["config"]["services"]
        .as_array()
        .unwrap_or_else(|| panic!("no config.services:\n{dump:#}"));
    assert_eq!(services.len(), 1, "{services:#?}");
    let echo = &services[0];
    assert_eq!(echo["name"], "echo");
    assert_eq!(echo["hostname"], "echo.default.svc.cluster.local");
    assert_eq!(echo["vips"], serde_json::json!(["/10.96.0.10"]), "{echo:#}");
    assert_eq!(echo["ports"], serde_json::json!({"8080": 9000}), "{echo:#}");
    let b = workloads.iter().find(|x| x["name"] == "b").unwrap();
    assert!(
        b["services"]
            .as_object()
            .is_some_and(|m| m.contains_key("default/echo.default.svc.cluster.local")),
        "b is not an endpoint of echo: {b:#}"
    );
    let mut identities: Vec<&str> = dump["certificates"]
        .as_array()
        .unwrap_or_else(|| panic!("no certificates:\n{dump:#}"))
        .iter()
        .filter_map(|c| c["identity"].as_str())
        .collect();
    identities.sort();
    assert_eq!(
        identities,
        [
            "spiffe://cluster.local/ns/default/sa/sa-a",
            "spiffe://cluster.local/ns/default/sa/sa-c"
        ],
        "n1 holds certificates for its local workloads only"
    );
    assert_eq!(
        mesh.ztunnel("n2")
            .config_dump()
            .await
            .unwrap()
            .parse::<serde_json::Value>()
            .unwrap()["node"],
        "n2"
    );

    // A reload shows up in the dump as a new snapshot.
    let generation = dump["configGeneration"].as_u64().expect("configGeneration");
    mesh.write_config(&config.service(Service::new("echo2", "10.96.0.11").port(80, 9000)))
        .unwrap();
    zt.wait_config(Duration::from_secs(15), |d| d.contains("10.96.0.11"))
        .await
        .unwrap();
    let dump: serde_json::Value = serde_json::from_str(&zt.config_dump().await.unwrap()).unwrap();
    assert!(
        dump["configGeneration"].as_u64().unwrap() > generation,
        "configGeneration did not advance on reload: {} → {}",
        generation,
        dump["configGeneration"]
    );
    assert_eq!(dump["config"]["services"].as_array().unwrap().len(), 2);
}

/// A query string is percent-encoded on the wire (`,` → `%2C`, `=` → `%3D` by most HTTP client
/// libraries): the filter must be decoded before it is parsed, and whatever is accepted must be
/// what then filters the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_logging_accepts_percent_encoded_filter() {
    let mesh = Mesh::two_nodes("admin-encoded", &standard_config())
        .await
        .unwrap();
    let server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let zt = mesh.ztunnel("n1");
    // Control: the filter unencoded is valid and keeps the access log.
    let (status, body) = zt
        .admin_request("POST", "/logging?level=info,access=info")
        .await
        .unwrap();
    assert_eq!(status, 200, "unencoded filter: {body}");
    assert_eq!(get_logging(zt).await, "level=info,access=info");
    let src = one_connection(&mesh, &server).await;
    zt.wait_log_line(&[&src, "connection complete"], Duration::from_secs(5))
        .await
        .expect("access-log line with the unencoded filter");

    // `debug,access=info`, percent-encoded.
    let (status, body) = zt
        .admin_request("POST", "/logging?level=debug%2Caccess%3Dinfo")
        .await
        .unwrap();
    let shown = get_logging(zt).await;
    let src = one_connection(&mesh, &server).await;
    let logged = zt
        .wait_log_line(&[&src, "connection complete"], Duration::from_secs(3))
        .await
        .is_ok();
    assert!(
        status == 200 && shown == "level=debug,access=info" && logged,
        "POST /logging?level=debug%2Caccess%3Dinfo (`debug,access=info` encoded) answered {status} \
         {body:?}; GET /logging then shows {shown:?}; access-log line for {src} written: {logged}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_ready_once_serving() {
    let mesh = Mesh::two_nodes("readiness", &standard_config())
        .await
        .unwrap();
    let _server = echo_server(&mesh.pod("b").ns, any(9000)).unwrap();
    let node_addr = |node: &str, port: u16| std::net::SocketAddr::from((mesh.node(node).ip, port));

    for zt in &mesh.ztunnels {
        let ns = zt.netns();
        // Ready (the harness waited for it), and serving: capture rules are in place.
        let ready = http_exchange(
            &ns,
            "GET",
            ([127, 0, 0, 1], READINESS_PORT).into(),
            "/healthz/ready",
        )
        .await
        .unwrap();
        assert_eq!(ready.status, 200, "{}: {}", zt.node, ready.body);
        let capture = CaptureState::read(&ns).unwrap();
        assert!(
            capture.is_installed_once(),
            "{} is ready without its capture rules: {capture:?}",
            zt.node
        );
    }
    // Readiness listens on the node address too, for the kubelet's probe.
    let other = &mesh.node("n2").ns;
    let probe = http_exchange(
        other,
        "GET",
        node_addr("n1", READINESS_PORT),
        "/healthz/ready",
    )
    .await
    .unwrap();
    assert_eq!(probe.status, 200, "readiness of n1 from n2: {}", probe.body);

    // Ready means serving: the first connection goes through, no retry.
    let outcome = probe_echo(&mesh.pod("a").ns, echo_vip(), Duration::from_secs(10)).await;
    assert_eq!(outcome, Outcome::Echoed, "first connection after ready");

    // Prometheus text on 15020, with the flow just made counted.
    let zt = mesh.ztunnel("n1");
    let ns = zt.netns();
    let resp = http_exchange(
        &ns,
        "GET",
        ([127, 0, 0, 1], METRICS_PORT).into(),
        "/metrics",
    )
    .await
    .unwrap();
    assert_eq!(resp.status, 200, "{}", resp.body);
    let content_type = resp.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain")
            || content_type.starts_with("application/openmetrics-text"),
        "metrics content-type {content_type:?}"
    );
    assert!(
        resp.body.lines().any(|l| l.starts_with("# TYPE ")),
        "no # TYPE lines:\n{}",
        resp.body
    );
    if content_type.starts_with("application/openmetrics-text") {
        assert_eq!(
            resp.body.lines().last(),
            Some("# EOF"),
            "OpenMetrics must end with # EOF"
        );
    }
    assert!(
        !parse_metrics(&resp.body).is_empty(),
        "no samples:\n{}",
        resp.body
    );
    let counted = eventually(Duration::from_secs(10), || async {
        let m = zt.metrics().await?;
        Ok(sum_metric(
            &m,
            "istio_tcp_connections_opened_total",
            &[("source_workload", "a")],
        ) >= 1.0)
    })
    .await
    .unwrap();
    assert!(counted, "the first flow is not in n1's metrics");
    // Scrapers reach it through the node address as well.
    let remote = http_exchange(other, "GET", node_addr("n1", METRICS_PORT), "/metrics")
        .await
        .unwrap();
    assert_eq!(remote.status, 200);
    assert!(!parse_metrics(&remote.body).is_empty());
}
