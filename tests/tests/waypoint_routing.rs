//! VirtualService / DestinationRule routing at the waypoint, end to end: the demoapp canary
//! shape (service `demoapp` at 10.96.0.20:80 → 8080, endpoints v1.0 ×3 and v1.1 ×2) behind a
//! waypoint, with the user scenarios from ../shared/scenarios pasted unchanged into the
//! config, and hand-written VirtualServices / DestinationRules for the other routing features.
//! Checked at the client, at the endpoints (test servers record every request) and in the
//! waypoint's access log.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tests::http_apps::{
    empty_body, http_server, http_server_with_status, request, H2Client, Http1Client, HttpMode,
    HttpReply, HttpServer,
};
use tests::l7mesh::L7Mesh;
use tests::support::within;
use tests::waypoint::field;

const SCENARIOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/scenarios");
const HOST: &str = "demoapp.default.svc.cluster.local";
const V10: [&str; 3] = ["demo-v10-0", "demo-v10-1", "demo-v10-2"];
const V11: [&str; 2] = ["demo-v11-0", "demo-v11-1"];

/// The DestinationRule with subsets v10 / v11 (by `version` label) for hand-written tests.
const DR_SUBSETS: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: demoapp
spec:
  host: demoapp
  subsets:
  - name: v10
    labels:
      version: v1.0
  - name: v11
    labels:
      version: v1.1
"#;

fn scenario(name: &str) -> String {
    let path = format!("{SCENARIOS}/{name}");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The documents of a multi-document YAML file whose text contains `kind: <kind>`.
fn documents_of_kind(yaml: &str, kind: &str) -> Vec<String> {
    yaml.split("\n---")
        .map(|d| d.trim_start_matches('-').trim().to_string())
        .filter(|d| d.lines().any(|l| l.trim() == format!("kind: {kind}")))
        .collect()
}

fn cluster(subset: &str) -> String {
    format!("outbound|80|{subset}|{HOST}")
}

/// Starts the demoapp canary mesh with `docs` and a test HTTP server on every endpoint.
async fn demo_mesh(label: &str, docs: &[&str]) -> (L7Mesh, Vec<HttpServer>) {
    let mut b = L7Mesh::demoapp_canary(label);
    for d in docs {
        b = b.document(d);
    }
    let mesh = within(120, "start the mesh", b.start()).await.unwrap();
    let servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    (mesh, servers)
}

async fn client(mesh: &L7Mesh) -> Http1Client {
    within(
        10,
        "connect to the VIP",
        Http1Client::connect(&mesh.pod("a").ns, mesh.vip()),
    )
    .await
    .unwrap()
}

async fn get(c: &mut Http1Client, path: &str, headers: &[(&str, &str)]) -> HttpReply {
    within(30, &format!("GET {path}"), c.get(path, headers))
        .await
        .unwrap()
}

/// Requests served per pod so far (only pods that served at least one).
fn served(servers: &[HttpServer]) -> BTreeMap<String, usize> {
    servers
        .iter()
        .filter(|s| s.request_count() > 0)
        .map(|s| (s.pod.clone(), s.request_count()))
        .collect()
}

fn total(servers: &[HttpServer]) -> usize {
    servers.iter().map(|s| s.request_count()).sum()
}

fn server<'a>(servers: &'a [HttpServer], pod: &str) -> &'a HttpServer {
    servers.iter().find(|s| s.pod == pod).unwrap()
}

/// `n` GETs of `path` over `conns` concurrent keep-alive connections from pod `a`; all replies.
async fn load(
    mesh: &L7Mesh,
    conns: usize,
    n: usize,
    path: &str,
    headers: &[(&str, &str)],
) -> Vec<HttpReply> {
    let mut tasks = Vec::new();
    for i in 0..conns {
        let mut c = client(mesh).await;
        let count = n / conns + usize::from(i < n % conns);
        let path = path.to_string();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tasks.push(tokio::spawn(async move {
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let mut out = Vec::with_capacity(count);
            for _ in 0..count {
                out.push(c.get(&path, &h).await.unwrap());
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(within(120, "load", t).await.unwrap());
    }
    all
}

fn per_pod(replies: &[HttpReply]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in replies {
        *m.entry(r.pod()).or_insert(0) += 1;
    }
    m
}

// ---------------------------------------------------------------------------------------------
// 1. The seed scenario.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_prefix_rewrites_to_v11() {
    let (mesh, servers) = demo_mesh("rt-canary", &[&scenario("demoapp-canary.yaml")]).await;
    let mut c = client(&mesh).await;

    for _ in 0..10 {
        let r = get(&mut c, "/canary", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            V11.contains(&r.pod().as_str()),
            "/canary answered by {}",
            r.pod()
        );
        assert_eq!(r.json().unwrap()["path"], "/", "{}", r.text());
    }
    for _ in 0..6 {
        let r = get(&mut c, "/canary/x", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            V11.contains(&r.pod().as_str()),
            "/canary/x answered by {}",
            r.pod()
        );
        assert_eq!(r.json().unwrap()["path"], "/x", "{}", r.text());
    }
    // The query string survives the rewrite.
    let r = get(&mut c, "/canary?x=1", &[]).await;
    assert!(
        V11.contains(&r.pod().as_str()),
        "/canary?x=1 answered by {}",
        r.pod()
    );
    assert_eq!(r.json().unwrap()["path"], "/?x=1", "{}", r.text());
    // Same over HTTP/2 (absolute-form :path/:authority).
    let h2 = within(
        10,
        "h2 connect",
        H2Client::connect(&mesh.pod("c").ns, mesh.vip()),
    )
    .await
    .unwrap();
    let r = within(30, "h2 GET /canary/x", h2.get("/canary/x", &[]))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        V11.contains(&r.pod().as_str()),
        "h2 /canary/x answered by {}",
        r.pod()
    );
    assert_eq!(r.json().unwrap()["path"], "/x", "{}", r.text());
    let r = within(30, "h2 GET /h2", h2.get("/h2", &[])).await.unwrap();
    assert!(
        V10.contains(&r.pod().as_str()),
        "h2 /h2 answered by {}",
        r.pod()
    );
    for path in ["/", "/other", "/can", "/x/canary"] {
        for _ in 0..6 {
            let r = get(&mut c, path, &[]).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert!(
                V10.contains(&r.pod().as_str()),
                "{path} answered by {}",
                r.pod()
            );
            assert_eq!(r.json().unwrap()["path"], path, "{}", r.text());
        }
    }
    // The endpoints agree: v1.1 pods only saw rewritten canary paths, v1.0 never saw /canary.
    for s in &servers {
        for rec in s.records() {
            if V11.contains(&s.pod.as_str()) {
                assert!(
                    rec.path == "/" || rec.path == "/x" || rec.path == "/?x=1",
                    "{}: {rec:?}",
                    s.pod
                );
            } else {
                assert!(!rec.path.starts_with("/canary"), "{}: {rec:?}", s.pod);
            }
        }
    }
    assert_eq!(
        total(&servers),
        10 + 6 + 1 + 2 + 24,
        "{:?}",
        served(&servers)
    );

    let wp = mesh.waypoint();
    let canary = wp
        .wait_access_log(18, Duration::from_secs(10), |e| {
            field(e, "path").starts_with("/canary")
        })
        .await
        .unwrap();
    for e in &canary {
        assert_eq!(field(e, "route_name"), "canary", "{e}");
        assert_eq!(field(e, "upstream_cluster"), cluster("v11"), "{e}");
        assert_eq!(field(e, "response_code"), "200", "{e}");
        let host = field(e, "upstream_host");
        assert!(
            host == "10.244.2.5:8080" || host == "10.244.2.6:8080",
            "canary upstream_host {host}: {e}"
        );
    }
    let default = wp
        .wait_access_log(25, Duration::from_secs(10), |e| {
            !field(e, "path").starts_with("/canary")
        })
        .await
        .unwrap();
    for e in &default {
        assert_eq!(field(e, "route_name"), "default", "{e}");
        assert_eq!(field(e, "upstream_cluster"), cluster("v10"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Weighted split.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weighted_90_10_split_within_3_points() {
    let canary = scenario("demoapp-canary.yaml");
    let dr = documents_of_kind(&canary, "DestinationRule");
    assert_eq!(dr.len(), 1, "one DestinationRule in demoapp-canary.yaml");
    let (mesh, servers) =
        demo_mesh("rt-weights", &[&scenario("demoapp-weights.yaml"), &dr[0]]).await;

    let replies = load(&mesh, 8, 2000, "/", &[]).await;
    assert_eq!(replies.len(), 2000);
    assert!(
        replies.iter().all(|r| r.status == 200),
        "{:?}",
        per_pod(&replies)
    );
    let pods = per_pod(&replies);
    let v10: usize = V10.iter().map(|p| pods.get(*p).copied().unwrap_or(0)).sum();
    let v11: usize = V11.iter().map(|p| pods.get(*p).copied().unwrap_or(0)).sum();
    assert_eq!(v10 + v11, 2000, "{pods:?}");
    let pct = v11 as f64 * 100.0 / 2000.0;
    assert!(
        (7.0..=13.0).contains(&pct),
        "v1.1 got {pct:.1}% (expected 10 ± 3): {pods:?}"
    );
    // Every pod of each subset takes part.
    for p in V10.iter().chain(V11.iter()) {
        assert!(
            pods.get(*p).copied().unwrap_or(0) > 0,
            "{p} got nothing: {pods:?}"
        );
    }
    assert_eq!(total(&servers), 2000);
    let entries = mesh
        .waypoint()
        .wait_access_log(2000, Duration::from_secs(20), |_| true)
        .await
        .unwrap();
    assert!(entries
        .iter()
        .all(|e| field(e, "route_name") == "weight-based-routing"));
}

// ---------------------------------------------------------------------------------------------
// 3. Match, actions, faults, timeouts, retries, mirror, CORS.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_match_is_404_nr() {
    let vs = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: only-api
    match:
    - uri:
        prefix: /api
    route:
    - destination:
        host: demoapp
"#;
    let (mesh, servers) = demo_mesh("rt-nr", &[vs]).await;
    let mut c = client(&mesh).await;
    let r = get(&mut c, "/api/v1", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&mut c, "/other", &[]).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.pod(), "", "the waypoint answers itself");
    assert_eq!(total(&servers), 1, "{:?}", served(&servers));
    let e = mesh
        .waypoint()
        .wait_access_log(1, Duration::from_secs(10), |e| field(e, "path") == "/other")
        .await
        .unwrap();
    assert_eq!(field(&e[0], "response_code"), "404", "{}", e[0]);
    assert_eq!(field(&e[0], "response_flags"), "NR", "{}", e[0]);
    let ok = mesh
        .waypoint()
        .wait_access_log(1, Duration::from_secs(10), |e| {
            field(e, "path") == "/api/v1"
        })
        .await
        .unwrap();
    assert_eq!(field(&ok[0], "route_name"), "only-api", "{}", ok[0]);
    assert_eq!(field(&ok[0], "response_flags"), "-", "{}", ok[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_match_routes_by_header() {
    let vs = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: jason
    match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: demoapp
        subset: v11
  - name: not-skipped
    match:
    - withoutHeaders:
        x-skip:
          exact: "yes"
    route:
    - destination:
        host: demoapp
        subset: v10
"#;
    let (mesh, servers) = demo_mesh("rt-hdr", &[vs, DR_SUBSETS]).await;
    let mut c = client(&mesh).await;
    for _ in 0..5 {
        let r = get(&mut c, "/", &[("end-user", "jason")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(V11.contains(&r.pod().as_str()), "jason → {}", r.pod());
        // The header route wins even when the withoutHeaders route would not match.
        let r = get(&mut c, "/", &[("end-user", "jason"), ("x-skip", "yes")]).await;
        assert!(V11.contains(&r.pod().as_str()), "jason+skip → {}", r.pod());
        let r = get(&mut c, "/", &[("end-user", "bob")]).await;
        assert!(V10.contains(&r.pod().as_str()), "bob → {}", r.pod());
        let r = get(&mut c, "/", &[]).await;
        assert!(V10.contains(&r.pod().as_str()), "anonymous → {}", r.pod());
        let r = get(&mut c, "/", &[("x-skip", "no")]).await;
        assert!(V10.contains(&r.pod().as_str()), "x-skip: no → {}", r.pod());
    }
    // withoutHeaders excludes the request: no route left → 404 NR.
    let r = get(&mut c, "/", &[("x-skip", "yes")]).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(total(&servers), 25, "{:?}", served(&servers));
    let log = mesh
        .waypoint()
        .wait_access_log(26, Duration::from_secs(10), |_| true)
        .await
        .unwrap();
    let names: BTreeMap<String, usize> = log.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(field(e, "route_name")).or_insert(0) += 1;
        m
    });
    assert_eq!(names.get("jason"), Some(&10), "{names:?}");
    assert_eq!(names.get("not-skipped"), Some(&15), "{names:?}");
    assert_eq!(
        log.iter()
            .filter(|e| field(e, "response_flags") == "NR")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_answers_location() {
    let vs = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: moved
    match:
    - uri:
        prefix: /old
    redirect:
      uri: /new
      authority: newhost.example
  - name: moved-temp
    match:
    - uri:
        exact: /temp
    redirect:
      uri: /elsewhere
      redirectCode: 302
    headers:
      response:
        set:
          cache-control: no-store
  - name: default
    route:
    - destination:
        host: demoapp
"#;
    let (mesh, servers) = demo_mesh("rt-redirect", &[vs]).await;
    let mut c = client(&mesh).await;
    let r = get(&mut c, "/old?q=1", &[]).await;
    assert_eq!(r.status, 301, "{}", r.text());
    assert_eq!(
        r.header("location"),
        Some("http://newhost.example/new?q=1"),
        "{:?}",
        r.headers
    );
    let r = get(&mut c, "/temp", &[]).await;
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(
        r.header("cache-control"),
        Some("no-store"),
        "the route's response headers apply to its redirect: {:?}",
        r.headers
    );
    // The request's authority (VIP:80) is kept; :80 is the default port of http.
    assert_eq!(
        r.header("location"),
        Some("http://10.96.0.20/elsewhere"),
        "{:?}",
        r.headers
    );
    assert_eq!(total(&servers), 0, "redirects never reach an endpoint");
    let r = get(&mut c, "/fine", &[]).await;
    assert_eq!(r.status, 200);
    let log = mesh
        .waypoint()
        .wait_access_log(3, Duration::from_secs(10), |_| true)
        .await
        .unwrap();
    assert_eq!(field(&log[0], "route_name"), "moved", "{}", log[0]);
    assert_eq!(field(&log[0], "response_code"), "301", "{}", log[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_header_ops() {
    let vs = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: hdrs
    headers:
      request:
        set:
          x-set: route-set
        add:
          x-added: route-add
        remove:
        - x-drop
      response:
        set:
          x-resp-set: resp
        add:
          x-resp-add: more
        remove:
        - x-peer
    route:
    - destination:
        host: demoapp
        subset: v10
      headers:
        request:
          set:
            x-dest: v10
"#;
    let (mesh, servers) = demo_mesh("rt-hdrops", &[vs, DR_SUBSETS]).await;
    let mut c = client(&mesh).await;
    let r = get(
        &mut c,
        "/h",
        &[
            ("x-set", "client"),
            ("x-drop", "secret"),
            ("x-keep", "kept"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-resp-set"), Some("resp"), "{:?}", r.headers);
    assert_eq!(r.header("x-resp-add"), Some("more"), "{:?}", r.headers);
    assert_eq!(r.header("x-peer"), None, "x-peer removed: {:?}", r.headers);
    assert!(V10.contains(&r.pod().as_str()));
    let rec = server(&servers, &r.pod()).records().pop().unwrap();
    assert_eq!(rec.header("x-set"), Some("route-set"), "{rec:?}");
    assert_eq!(rec.header("x-added"), Some("route-add"), "{rec:?}");
    assert_eq!(rec.header("x-drop"), None, "{rec:?}");
    assert_eq!(rec.header("x-keep"), Some("kept"), "{rec:?}");
    assert_eq!(rec.header("x-dest"), Some("v10"), "{rec:?}");
    assert_eq!(
        rec.headers.iter().filter(|(k, _)| k == "x-set").count(),
        1,
        "set replaces: {rec:?}"
    );
}

/// `exportTo` at the waypoint (namespace `default`): a VirtualService private to another
/// namespace is ignored, and of the visible ones the waypoint's own namespace wins over one
/// listed earlier in another namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_to_decides_which_virtual_service_the_waypoint_uses() {
    let vs = |name: &str, ns: &str, export: &str| {
        format!(
            r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
  namespace: {ns}
spec:
  hosts:
  - {HOST}
  exportTo: {export}
  http:
  - headers:
      request:
        set:
          x-vs: {ns}-{name}
    route:
    - destination:
        host: {HOST}
"#
        )
    };
    let (private, public, local) = (
        vs("private", "team", "[.]"),
        vs("public", "shared", "[\"*\"]"),
        vs("local", "default", "[.]"),
    );
    // Only the other namespace's VirtualServices: the public one applies.
    let (mesh, servers) = demo_mesh("rt-export", &[&private, &public]).await;
    let mut c = client(&mesh).await;
    let r = get(&mut c, "/e", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = server(&servers, &r.pod()).records().pop().unwrap();
    assert_eq!(rec.header("x-vs"), Some("shared-public"), "{rec:?}");
    let dump = mesh.waypoint().config_dump().await.unwrap();
    let used: Vec<&serde_json::Value> = dump["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| &s["virtualService"])
        .collect();
    assert_eq!(
        used,
        [&serde_json::json!("shared/public")],
        "config_dump shows the table the waypoint uses: {}",
        dump["routes"]
    );
    drop(c);
    drop(servers);
    drop(mesh);

    // Add the waypoint namespace's own (private) one: it wins.
    let (mesh, servers) = demo_mesh("rt-export2", &[&private, &public, &local]).await;
    let mut c = client(&mesh).await;
    for _ in 0..3 {
        let r = get(&mut c, "/e", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let rec = server(&servers, &r.pod()).records().pop().unwrap();
        assert_eq!(rec.header("x-vs"), Some("default-local"), "{rec:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_abort_percentage() {
    let vs = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: always
    match:
    - uri:
        prefix: /always
    fault:
      abort:
        httpStatus: 503
        percentage:
          value: 100
    route:
    - destination:
        host: demoapp
  - name: half
    fault:
      abort:
        httpStatus: 418
        percentage:
          value: 50
    route:
    - destination:
        host: demoapp
"#;
    let (mesh, servers) = demo_mesh("rt-abort", &[vs]).await;
    let mut c = client(&mesh).await;
    for _ in 0..20 {
        let r = get(&mut c, "/always", &[]).await;
        assert_eq!(r.status, 503, "{}", r.text());
    }
    assert_eq!(
        total(&servers),
        0,
        "aborted requests never reach an endpoint"
    );
    let log = mesh
        .waypoint()
        .wait_access_log(20, Duration::from_secs(10), |_| true)
        .await
        .unwrap();
    for e in &log {
        assert_eq!(field(e, "response_flags"), "FI", "{e}");
        assert_eq!(field(e, "response_code"), "503", "{e}");
    }

    let replies = load(&mesh, 4, 200, "/half", &[]).await;
    let aborted = replies.iter().filter(|r| r.status == 418).count();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(aborted + ok, 200);
    // Binomial(200, 0.5): sd ≈ 7; ±40 is ~5.6 sd.
    assert!((60..=140).contains(&aborted), "{aborted} of 200 aborted");
    assert_eq!(total(&servers), ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_delay_applies() {
    let vs = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: slow
    match:
    - uri:
        prefix: /slow
    fault:
      delay:
        fixedDelay: 700ms
        percentage:
          value: 100
    route:
    - destination:
        host: demoapp
  - name: fast
    route:
    - destination:
        host: demoapp
"#;
    let (mesh, servers) = demo_mesh("rt-delay", &[vs]).await;
    let mut c = client(&mesh).await;
    get(&mut c, "/warm", &[]).await;
    let t = Instant::now();
    let r = get(&mut c, "/fast", &[]).await;
    let fast = t.elapsed();
    assert_eq!(r.status, 200);
    assert!(fast < Duration::from_millis(500), "undelayed took {fast:?}");
    for _ in 0..3 {
        let t = Instant::now();
        let r = get(&mut c, "/slow", &[]).await;
        let took = t.elapsed();
        assert_eq!(r.status, 200, "a delay fault still forwards: {}", r.text());
        assert!(took >= Duration::from_millis(700), "delayed took {took:?}");
        assert!(took < Duration::from_millis(3000), "delayed took {took:?}");
    }
    assert_eq!(total(&servers), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_gives_504() {
    let vs = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: bounded
    timeout: 500ms
    route:
    - destination:
        host: demoapp
"#;
    let (mesh, servers) = demo_mesh("rt-timeout", &[vs]).await;
    let mut c = client(&mesh).await;
    let r = get(&mut c, "/quick", &[("x-delay-ms", "100")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let t = Instant::now();
    let r = get(&mut c, "/slow", &[("x-delay-ms", "3000")]).await;
    let took = t.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2500),
        "504 after {took:?}"
    );
    let e = mesh
        .waypoint()
        .wait_access_log(1, Duration::from_secs(10), |e| field(e, "path") == "/slow")
        .await
        .unwrap();
    assert_eq!(field(&e[0], "response_code"), "504", "{}", e[0]);
    assert_eq!(field(&e[0], "response_flags"), "UT", "{}", e[0]);
    // The timed-out request did reach an endpoint (once: 504 is not retried by default).
    let slow: usize = servers
        .iter()
        .map(|s| s.records().iter().filter(|r| r.path == "/slow").count())
        .sum();
    assert_eq!(slow, 1, "{:?}", served(&servers));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_503_seen_by_backend() {
    let vs = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: explicit
    match:
    - uri:
        prefix: /explicit
    retries:
      attempts: 3
      retryOn: 5xx
    route:
    - destination:
        host: demoapp
  - name: none
    match:
    - uri:
        prefix: /none
    retries:
      attempts: 0
    route:
    - destination:
        host: demoapp
  - name: istio-default
    route:
    - destination:
        host: demoapp
"#;
    let (mesh, servers) = demo_mesh("rt-retry", &[vs]).await;
    let mut c = client(&mesh).await;
    let count = |p: &str| -> usize {
        servers
            .iter()
            .map(|s| s.records().iter().filter(|r| r.path == p).count())
            .sum()
    };

    let r = get(&mut c, "/explicit", &[("x-status", "503")]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(count("/explicit"), 1 + 3, "{:?}", served(&servers));
    // 5xx covers 500 too.
    let r = get(&mut c, "/explicit/500", &[("x-status", "500")]).await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(count("/explicit/500"), 1 + 3, "{:?}", served(&servers));

    let r = get(&mut c, "/none", &[("x-status", "503")]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(count("/none"), 1, "{:?}", served(&servers));

    // Istio's default for a route without `retries`: 2 retries on 503, none on 500.
    let r = get(&mut c, "/default", &[("x-status", "503")]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(count("/default"), 1 + 2, "{:?}", served(&servers));
    let r = get(&mut c, "/default500", &[("x-status", "500")]).await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(count("/default500"), 1, "{:?}", served(&servers));

    // Retries prefer other hosts: the 4 attempts of /explicit went to 4 distinct pods.
    let pods: Vec<&str> = servers
        .iter()
        .filter(|s| s.records().iter().any(|r| r.path == "/explicit"))
        .map(|s| s.pod.as_str())
        .collect();
    assert_eq!(pods.len(), 4, "{pods:?}");
    // One access-log line per client request.
    let log = mesh
        .waypoint()
        .wait_access_log(5, Duration::from_secs(10), |_| true)
        .await
        .unwrap();
    assert_eq!(log.len(), 5, "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_reaches_mirror_backend() {
    let vs = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: mirrored
    route:
    - destination:
        host: demoapp
        subset: v10
    mirror:
      host: demoapp
      subset: v11
    mirrorPercentage:
      value: 100
"#;
    let (mesh, servers) = demo_mesh("rt-mirror", &[vs, DR_SUBSETS]).await;
    let mut c = client(&mesh).await;
    for i in 0..10 {
        let r = get(&mut c, &format!("/m/{i}"), &[("x-request-id", "mirror-1")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(V10.contains(&r.pod().as_str()), "answered by {}", r.pod());
    }
    let mirrored = || -> Vec<tests::http_apps::HttpRecord> {
        V11.iter()
            .flat_map(|p| server(&servers, p).records())
            .collect()
    };
    let ok = tests::support::eventually(Duration::from_secs(10), || async {
        Ok(mirrored().len() >= 10)
    })
    .await
    .unwrap();
    assert!(ok, "mirror got {} of 10", mirrored().len());
    let recs = mirrored();
    assert_eq!(recs.len(), 10, "{recs:?}");
    for rec in &recs {
        assert_eq!(rec.header("host"), Some("10.96.0.20-shadow:80"), "{rec:?}");
        assert!(rec.path.starts_with("/m/"), "{rec:?}");
    }
    let v10: usize = V10
        .iter()
        .map(|p| server(&servers, p).request_count())
        .sum();
    assert_eq!(v10, 10);
    let log = mesh
        .waypoint()
        .wait_access_log(10, Duration::from_secs(10), |_| true)
        .await
        .unwrap();
    assert_eq!(log.len(), 10, "mirrors are not logged as client requests");
    assert!(log
        .iter()
        .all(|e| field(e, "upstream_cluster") == cluster("v10")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_answered_at_waypoint() {
    let vs = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: cors
    corsPolicy:
      allowOrigins:
      - exact: https://example.com
      allowMethods:
      - GET
      - POST
      allowHeaders:
      - x-custom
      maxAge: "24h"
    route:
    - destination:
        host: demoapp
"#;
    let (mesh, servers) = demo_mesh("rt-cors", &[vs]).await;
    let mut c = client(&mesh).await;
    let pre = within(
        30,
        "preflight",
        c.send(request(
            "OPTIONS",
            "/api",
            &[
                ("origin", "https://example.com"),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "x-custom"),
            ],
            empty_body(),
        )),
    )
    .await
    .unwrap();
    assert_eq!(pre.status, 200, "{:?} {}", pre.headers, pre.text());
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("https://example.com"),
        "{:?}",
        pre.headers
    );
    let methods = pre.header("access-control-allow-methods").unwrap_or("");
    assert!(methods.contains("POST"), "{:?}", pre.headers);
    let hdrs = pre.header("access-control-allow-headers").unwrap_or("");
    assert!(hdrs.contains("x-custom"), "{:?}", pre.headers);
    assert_eq!(pre.header("access-control-max-age"), Some("86400"));
    assert_eq!(pre.pod(), "", "answered by the waypoint");
    assert_eq!(
        total(&servers),
        0,
        "the preflight never reaches an endpoint"
    );

    // The actual request is forwarded and gets the allow-origin header.
    let r = get(&mut c, "/api", &[("origin", "https://example.com")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://example.com"),
        "{:?}",
        r.headers
    );
    assert_eq!(total(&servers), 1);
    // An origin that is not allowed gets no CORS headers.
    let r = get(&mut c, "/api", &[("origin", "https://evil.example")]).await;
    assert_eq!(r.header("access-control-allow-origin"), None);
}

// ---------------------------------------------------------------------------------------------
// 4. DestinationRule traffic policy.

fn dr_with_policy(policy: &str) -> String {
    let indented: String = policy
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("    {l}\n"))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata:\n  name: demoapp\nspec:\n  host: demoapp\n  trafficPolicy:\n{indented}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_is_sticky() {
    let dr = dr_with_policy("loadBalancer:\n  consistentHash:\n    httpHeaderName: x-user");
    let (mesh, _servers) = demo_mesh("rt-hash", &[&dr]).await;
    let mut c = client(&mesh).await;
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for round in 0..5 {
        for u in 0..20 {
            let user = format!("user-{u}");
            let r = get(&mut c, "/", &[("x-user", &user)]).await;
            assert_eq!(r.status, 200);
            let prev = owner.entry(user.clone()).or_insert_with(|| r.pod());
            assert_eq!(*prev, r.pod(), "{user} moved in round {round}");
        }
    }
    let distinct: std::collections::BTreeSet<&String> = owner.values().collect();
    assert!(distinct.len() >= 3, "20 users on {distinct:?}");
}

/// `httpCookie` with a `ttl`: a client without the cookie gets one minted by the waypoint
/// (`Set-Cookie`), and requests carrying it stick to one endpoint; fresh clients spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_cookie_is_minted_and_sticks() {
    let dr = dr_with_policy(
        "loadBalancer:\n  consistentHash:\n    httpCookie:\n      name: stick\n      path: /\n      ttl: 60s",
    );
    let (mesh, _servers) = demo_mesh("rt-cookie", &[&dr]).await;
    let mut c = client(&mesh).await;
    let mut pods = std::collections::BTreeSet::new();
    for i in 0..12 {
        let r = get(&mut c, "/", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let set = r
            .header("set-cookie")
            .unwrap_or_else(|| panic!("request {i}: no Set-Cookie: {:?}", r.headers))
            .to_string();
        assert!(
            set.starts_with("stick=\"") && set.contains("Max-Age=60") && set.contains("Path=/"),
            "{set}"
        );
        let cookie = set.split(';').next().unwrap().to_string();
        let first = r.pod();
        pods.insert(first.clone());
        for _ in 0..5 {
            let again = get(&mut c, "/", &[("cookie", &cookie)]).await;
            assert_eq!(again.status, 200);
            assert_eq!(again.pod(), first, "{cookie} moved");
            assert_eq!(
                again.header("set-cookie"),
                None,
                "no new cookie when the client has one"
            );
        }
    }
    assert!(pods.len() >= 2, "12 minted cookies all on {pods:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
/// LEAST_REQUEST and RANDOM spread; so does PASSTHROUGH here: the original destination is the
/// service VIP, not an endpoint, so the waypoint picks as kube-proxy would for the VIP.
async fn least_request_random_and_passthrough_spread() {
    for (label, policy) in [
        ("rt-lr", "LEAST_REQUEST"),
        ("rt-random", "RANDOM"),
        ("rt-pass", "PASSTHROUGH"),
    ] {
        let dr = dr_with_policy(&format!("loadBalancer:\n  simple: {policy}"));
        let (mesh, servers) = demo_mesh(label, &[&dr]).await;
        let replies = load(&mesh, 4, 300, "/", &[]).await;
        assert!(replies.iter().all(|r| r.status == 200));
        let pods = per_pod(&replies);
        assert_eq!(pods.len(), 5, "{policy}: {pods:?}");
        for (p, n) in &pods {
            assert!(*n >= 25, "{policy}: {p} got {n} of 300: {pods:?}");
        }
        assert_eq!(total(&servers), 300);
        drop(servers);
        drop(mesh);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_pool_overflow_gives_503_uo() {
    let dr = dr_with_policy(
        "connectionPool:\n  tcp:\n    maxConnections: 1\n  http:\n    http1MaxPendingRequests: 1",
    );
    let (mesh, servers) = demo_mesh("rt-uo", &[&dr]).await;
    // Warm up the route (config loaded, one request fine).
    let mut c = client(&mesh).await;
    assert_eq!(get(&mut c, "/warm", &[]).await.status, 200);

    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut c = client(&mesh).await;
        tasks.push(tokio::spawn(async move {
            c.get("/slow", &[("x-delay-ms", "1500")]).await.unwrap()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(within(60, "slow request", t).await.unwrap().status);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let overflow = statuses.iter().filter(|s| **s == 503).count();
    assert_eq!(ok + overflow, 6, "{statuses:?}");
    // One in flight plus one pending are admitted; the rest overflow.
    assert_eq!(ok, 2, "{statuses:?}");
    let slow_at_backend: usize = servers
        .iter()
        .map(|s| s.records().iter().filter(|r| r.path == "/slow").count())
        .sum();
    assert_eq!(slow_at_backend, ok, "{:?}", served(&servers));
    let uo = mesh
        .waypoint()
        .wait_access_log(overflow, Duration::from_secs(10), |e| {
            field(e, "response_flags") == "UO"
        })
        .await
        .unwrap();
    for e in &uo {
        assert_eq!(field(e, "response_code"), "503", "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_ejection_and_return() {
    let dr = dr_with_policy(
        "outlierDetection:\n  consecutive5xxErrors: 2\n  interval: 1s\n  baseEjectionTime: 2s\n  maxEjectionPercent: 100",
    );
    let mesh = within(
        120,
        "start the mesh",
        L7Mesh::demoapp_canary("rt-outlier").document(&dr).start(),
    )
    .await
    .unwrap();
    // demo-v10-0 always answers 500; the others 200.
    let mut servers = Vec::new();
    for ep in &mesh.endpoints {
        let ns = &mesh.pod(ep).ns;
        let addr = tests::support::any(8080);
        let s = if ep == "demo-v10-0" {
            http_server_with_status(ns, addr, ep, HttpMode::Auto, 500).unwrap()
        } else {
            http_server(ns, addr, ep, HttpMode::Auto).unwrap()
        };
        servers.push(s);
    }
    let bad = || server(&servers, "demo-v10-0").request_count();
    let mut c = client(&mesh).await;

    // Until the bad endpoint has failed twice in a row.
    let mut n = 0;
    while bad() < 2 {
        let r = get(&mut c, "/", &[]).await;
        assert!(r.status == 200 || r.status == 500);
        n += 1;
        assert!(n < 100, "bad endpoint never picked: {:?}", served(&servers));
    }
    let ejected_at = Instant::now();
    // Ejected: it receives nothing for (almost) the base ejection time.
    let before = bad();
    let mut sent = 0;
    while ejected_at.elapsed() < Duration::from_millis(1500) {
        let r = get(&mut c, "/", &[]).await;
        assert_eq!(r.status, 200, "ejected endpoint answered: {}", r.pod());
        sent += 1;
    }
    assert!(sent >= 20, "only {sent} requests during the ejection");
    assert_eq!(bad(), before, "{:?}", served(&servers));

    // After the ejection time it is back in the rotation.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = bad();
    for _ in 0..40 {
        get(&mut c, "/", &[]).await;
        if bad() > before {
            break;
        }
    }
    assert!(
        bad() > before,
        "the endpoint did not return after the ejection: {:?}",
        served(&servers)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_retries_caps_concurrent_retries() {
    let vs = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: retrying
    retries:
      attempts: 3
      retryOn: 5xx
    route:
    - destination:
        host: demoapp
"#;
    let dr = dr_with_policy("connectionPool:\n  http:\n    maxRetries: 1");
    let (mesh, servers) = demo_mesh("rt-maxretries", &[vs, &dr]).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = client(&mesh).await;
        tasks.push(tokio::spawn(async move {
            c.get("/fail", &[("x-status", "503"), ("x-delay-ms", "500")])
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(within(60, "failing request", t).await.unwrap().status, 503);
    }
    // Without the cap: 4 × (1 + 3) = 16 attempts. With at most one retry outstanding, the
    // three requests that lose the race for the retry slot are not retried.
    let attempts = total(&servers);
    assert!(
        attempts <= 8,
        "{attempts} attempts reached the backends: {:?}",
        served(&servers)
    );
}

// ---------------------------------------------------------------------------------------------
// 5. L4: `tls` routes by server name.

/// The first flight of a real TLS client for `name` (its ClientHello).
fn client_hello(name: &str) -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), server).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// Sends a ClientHello for `name` to the VIP's `port`, checks it comes back unchanged, and
/// returns the one endpoint whose echo server took the connection.
async fn served_by(
    mesh: &L7Mesh,
    echoes: &[(String, tests::apps::Server)],
    port: u16,
    name: &str,
) -> String {
    let hello = client_hello(name);
    let finished = || -> Vec<usize> { echoes.iter().map(|(_, e)| e.records().len()).collect() };
    let before = finished();
    let a = &mesh.pod("a").ns;
    let mut s = within(10, "connect", a.connect(mesh.vip_port(port)))
        .await
        .unwrap();
    within(
        30,
        "ClientHello echoed",
        tests::apps::echo_roundtrip(&mut s, &hello),
    )
    .await
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    drop(s);
    // The echo server records a connection when it ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = finished();
    while after.iter().sum::<usize>() == before.iter().sum::<usize>() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = finished();
    }
    let pods: Vec<&str> = echoes
        .iter()
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| a > b)
        .map(|(p, _)| p.0.as_str())
        .collect();
    assert_eq!(
        pods.len(),
        1,
        "{name}: one endpoint got the stream: {pods:?}"
    );
    pods[0].to_string()
}

/// A TLS port (declared `tls`, so the waypoint does not terminate it) is routed by the
/// ClientHello's server name with the VirtualService's `tls` routes; a name no route matches
/// falls through to the `tcp` route. The bytes arrive unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_routes_pick_the_subset_by_server_name() {
    const PORT: u16 = 7443;
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: demoapp-tls
spec:
  hosts:
  - demoapp
  tls:
  - match:
    - port: 7443
      sniHosts: ["canary.example.com"]
    route:
    - destination: {host: demoapp, subset: v11}
  - match:
    - sniHosts: ["*.example.com"]
    route:
    - destination: {host: demoapp, subset: v10}
  tcp:
  - route:
    - destination: {host: demoapp, subset: v11}
"#;
    let mesh = within(
        120,
        "start the mesh",
        L7Mesh::demoapp_canary("rt-tls")
            .port(PORT, PORT)
            .app_protocol(PORT, "tls")
            .document(vs)
            .document(DR_SUBSETS)
            .start(),
    )
    .await
    .unwrap();
    let echoes: Vec<(String, tests::apps::Server)> = mesh
        .endpoints
        .iter()
        .map(|p| {
            let ns = &mesh.pod(p).ns;
            (
                p.clone(),
                tests::apps::echo_server(ns, tests::support::any(PORT)).unwrap(),
            )
        })
        .collect();
    for _ in 0..4 {
        let pod = served_by(&mesh, &echoes, PORT, "canary.example.com").await;
        assert!(V11.contains(&pod.as_str()), "canary → v11, got {pod}");
        let pod = served_by(&mesh, &echoes, PORT, "www.example.com").await;
        assert!(
            V10.contains(&pod.as_str()),
            "*.example.com → v10, got {pod}"
        );
        let pod = served_by(&mesh, &echoes, PORT, "other.test").await;
        assert!(
            V11.contains(&pod.as_str()),
            "no tls route: the tcp route (v11), got {pod}"
        );
    }
}
