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
use tests::scenarios::scenario;
use tests::support::within;
use tests::waypoint::field;

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

/// [`DR_SUBSETS`] with ROUND_ROBIN, for tests that assert every pod of a subset takes part
/// (Istio's default, LEAST_REQUEST, picks at random between idle endpoints).
const DR_SUBSETS_ROUND_ROBIN: &str = r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: demoapp
spec:
  host: demoapp
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
  subsets:
  - name: v10
    labels:
      version: v1.0
  - name: v11
    labels:
      version: v1.1
"#;

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

/// Mirrors are bounded (issue 9 item 10): the mirror subset's pods accept connections and
/// never answer. Every client request is still answered at once by v1.0; mirror copies beyond
/// the waypoint's capacity are not sent and are counted, instead of piling up tasks, buffers
/// and connections without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_to_a_stalled_backend_are_bounded() {
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
"#;
    let b = L7Mesh::demoapp_canary("rt-mirror-cap")
        .document(vs)
        .document(DR_SUBSETS);
    let mesh = within(120, "start the mesh", b.start()).await.unwrap();
    let target = mesh.ports[0].1;
    let _v10: Vec<HttpServer> = V10
        .iter()
        .map(|p| {
            tests::http_apps::http_server(
                &mesh.pod(p).ns,
                tests::support::any(target),
                p,
                HttpMode::Auto,
            )
            .unwrap()
        })
        .collect();
    // v1.1: accepts, reads nothing, answers nothing; connections held until the test ends.
    let mut stalls = Vec::new();
    for p in V11 {
        let listener = mesh
            .pod(p)
            .ns
            .tcp_listener(tests::support::any(target))
            .unwrap();
        stalls.push(tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        }));
    }
    let requests: usize = 320;
    let mut c = client(&mesh).await;
    for i in 0..requests {
        let r = get(&mut c, &format!("/m/{i}"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(V10.contains(&r.pod().as_str()), "answered by {}", r.pod());
    }
    let m = mesh.waypoint().metrics().await.unwrap();
    let dropped = tests::admin::sum_metric(&m, "waypoint_mirrors_dropped_total", &[]);
    assert!(
        dropped >= (requests - 256) as f64,
        "{dropped} mirror copies dropped of {requests} with a stalled mirror"
    );
    for t in stalls {
        t.abort();
    }
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
    echoed_by(mesh, echoes, port, &client_hello(name)).await
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
    let echoes = echo_servers(&mesh, PORT);
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

// ---------------------------------------------------------------------------------------------
// 6. L4 `tcp` routes, delegation, authority rewrite, hash keys and least request.

/// Starts a TCP echo server on `port` of every demoapp endpoint (as the `tls` test does).
fn echo_servers(mesh: &L7Mesh, port: u16) -> Vec<(String, tests::apps::Server)> {
    mesh.endpoints
        .iter()
        .map(|p| {
            let ns = &mesh.pod(p).ns;
            (
                p.clone(),
                tests::apps::echo_server(ns, tests::support::any(port)).unwrap(),
            )
        })
        .collect()
}

/// Opens a connection from pod `a` to the VIP's `port`, sends `data`, checks it comes back
/// unchanged, and returns the one endpoint whose echo server took the connection.
async fn echoed_by(
    mesh: &L7Mesh,
    echoes: &[(String, tests::apps::Server)],
    port: u16,
    data: &[u8],
) -> String {
    let finished = || -> Vec<usize> { echoes.iter().map(|(_, e)| e.records().len()).collect() };
    let before = finished();
    let a = &mesh.pod("a").ns;
    let mut s = within(10, "connect", a.connect(mesh.vip_port(port)))
        .await
        .unwrap();
    within(
        30,
        "bytes echoed",
        tests::apps::echo_roundtrip(&mut s, data),
    )
    .await
    .unwrap_or_else(|e| panic!("port {port}: {e}"));
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
        "port {port}: one endpoint got the stream: {pods:?}"
    );
    pods[0].to_string()
}

/// The waypoint's L4 access lines naming `cluster` (`tcp connection complete`).
fn tcp_log_for(mesh: &L7Mesh, cluster: &str) -> Vec<serde_json::Value> {
    mesh.waypoint()
        .tcp_access_log_lines()
        .into_iter()
        .filter(|e| field(e, "upstream_cluster") == cluster)
        .collect()
}

/// A port declared `tcp` is proxied at L4 by the VirtualService's `tcp` route: with weights
/// 0 / 100 over subsets v10 / v11 every connection lands on a v1.1 pod (and both v1.1 pods
/// take part), the bytes arrive unchanged, and the waypoint logs the subset's cluster. Without
/// the route the five endpoints would share the connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_route_weights_send_every_connection_to_the_subset() {
    const PORT: u16 = 7000;
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: demoapp-tcp
spec:
  hosts:
  - demoapp
  tcp:
  - route:
    - destination: {host: demoapp, subset: v10, port: {number: 7000}}
      weight: 0
    - destination: {host: demoapp, subset: v11, port: {number: 7000}}
      weight: 100
"#;
    let mesh = within(
        120,
        "start the mesh",
        L7Mesh::demoapp_canary("rt-tcp")
            .port(PORT, PORT)
            .app_protocol(PORT, "tcp")
            .document(vs)
            .document(DR_SUBSETS_ROUND_ROBIN)
            .start(),
    )
    .await
    .unwrap();
    let echoes = echo_servers(&mesh, PORT);
    let mut pods: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..10u64 {
        let data = tests::apps::random_bytes(3000 + i as usize * 100, i);
        let pod = echoed_by(&mesh, &echoes, PORT, &data).await;
        assert!(
            V11.contains(&pod.as_str()),
            "connection {i}: the tcp route sends 100% to v11, got {pod}"
        );
        *pods.entry(pod).or_insert(0) += 1;
    }
    assert_eq!(pods.len(), 2, "both v1.1 pods take connections: {pods:?}");
    // Every byte went through the echo servers of v1.1 only.
    for (p, e) in &echoes {
        if V10.contains(&p.as_str()) {
            assert!(e.records().is_empty(), "{p}: {:?}", e.records());
        }
    }
    let v11_cluster = format!("outbound|{PORT}|v11|{HOST}");
    let ok = tests::support::eventually(Duration::from_secs(10), || async {
        Ok(tcp_log_for(&mesh, &v11_cluster).len() >= 10)
    })
    .await;
    assert!(
        matches!(ok, Ok(true)),
        "10 L4 access lines for {v11_cluster}: {:?}",
        mesh.waypoint().tcp_access_log_lines()
    );
    assert!(
        mesh.waypoint().access_log_lines().is_empty(),
        "a tcp port is never served as HTTP: {:?}",
        mesh.waypoint().access_log_lines()
    );
}

/// `tcp` routes match on the destination `port`: connections to the matched port go to subset
/// v10, connections to another tcp port of the service fall through to the next (match-less)
/// route, subset v11.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_route_port_match_picks_the_subset() {
    const MATCHED: u16 = 7000;
    const OTHER: u16 = 7001;
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: demoapp-tcp
spec:
  hosts:
  - demoapp
  tcp:
  - match:
    - port: 7000
    route:
    - destination: {host: demoapp, subset: v10}
  - route:
    - destination: {host: demoapp, subset: v11}
"#;
    let mesh = within(
        120,
        "start the mesh",
        L7Mesh::demoapp_canary("rt-tcp-port")
            .port(MATCHED, MATCHED)
            .app_protocol(MATCHED, "tcp")
            .port(OTHER, OTHER)
            .app_protocol(OTHER, "tcp")
            .document(vs)
            .document(DR_SUBSETS_ROUND_ROBIN)
            .start(),
    )
    .await
    .unwrap();
    let matched = echo_servers(&mesh, MATCHED);
    let other = echo_servers(&mesh, OTHER);
    let (mut on_matched, mut on_other) = (BTreeMap::new(), BTreeMap::new());
    for i in 0..6u64 {
        let pod = echoed_by(
            &mesh,
            &matched,
            MATCHED,
            &tests::apps::random_bytes(2048, i),
        )
        .await;
        assert!(
            V10.contains(&pod.as_str()),
            "port {MATCHED} matches the first route (v10), got {pod}"
        );
        *on_matched.entry(pod).or_insert(0) += 1;
        let pod = echoed_by(
            &mesh,
            &other,
            OTHER,
            &tests::apps::random_bytes(2048, 100 + i),
        )
        .await;
        assert!(
            V11.contains(&pod.as_str()),
            "port {OTHER} falls through to the second route (v11), got {pod}"
        );
        *on_other.entry(pod).or_insert(0) += 1;
    }
    assert!(
        on_matched.len() >= 2,
        "v1.0 pods share port {MATCHED}: {on_matched:?}"
    );
    assert_eq!(
        on_other.len(),
        2,
        "v1.1 pods share port {OTHER}: {on_other:?}"
    );
    for (cluster, n) in [
        (format!("outbound|{MATCHED}|v10|{HOST}"), 6),
        (format!("outbound|{OTHER}|v11|{HOST}"), 6),
    ] {
        let ok = tests::support::eventually(Duration::from_secs(10), || async {
            Ok(tcp_log_for(&mesh, &cluster).len() >= n)
        })
        .await;
        assert!(
            matches!(ok, Ok(true)),
            "{n} L4 access lines for {cluster}: {:?}",
            mesh.waypoint().tcp_access_log_lines()
        );
    }
}

/// `delegate`: the root VirtualService hands `/team…` to a host-less VirtualService. Its
/// routes apply under the root's match (a delegate route without a match inherits it; one
/// whose match lies outside the root's never applies), they keep their own header operations
/// and are named `<root>-<delegate route>` as Istio merges them; routes of the root outside
/// the delegate still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegate_routes_apply_under_the_root_match() {
    let root = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: team
    match:
    - uri:
        prefix: /team
    delegate:
      name: team-routes
      namespace: default
  - name: default
    route:
    - destination:
        host: demoapp
        subset: v10
"#;
    let delegate = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: team-routes
  namespace: default
spec:
  http:
  - name: v11
    match:
    - uri:
        prefix: /team/v11
    headers:
      request:
        set:
          x-team: v11
    route:
    - destination:
        host: demoapp
        subset: v11
  - name: outside
    match:
    - uri:
        prefix: /elsewhere
    headers:
      request:
        set:
          x-team: outside
    route:
    - destination:
        host: demoapp
        subset: v11
  - name: rest
    headers:
      request:
        set:
          x-team: rest
    route:
    - destination:
        host: demoapp
        subset: v10
"#;
    let (mesh, servers) = demo_mesh("rt-delegate", &[root, delegate, DR_SUBSETS]).await;
    let mut c = client(&mesh).await;
    // (path, subset pods, x-team the endpoint sees, route name in the access log)
    let cases: [(&str, &[&str], Option<&str>, &str); 5] = [
        ("/team/v11", &V11, Some("v11"), "team-v11"),
        ("/team/v11/items?x=1", &V11, Some("v11"), "team-v11"),
        ("/team/other", &V10, Some("rest"), "team-rest"),
        ("/elsewhere", &V10, None, "default"),
        ("/other", &V10, None, "default"),
    ];
    for round in 0..3 {
        for (path, pods, team, _) in &cases {
            let r = get(&mut c, path, &[]).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            assert!(
                pods.contains(&r.pod().as_str()),
                "round {round}: {path} answered by {}",
                r.pod()
            );
            let rec = server(&servers, &r.pod()).records().pop().unwrap();
            assert_eq!(rec.path, *path, "the path is not rewritten: {rec:?}");
            assert_eq!(rec.header("x-team"), *team, "{path}: {rec:?}");
        }
    }
    assert_eq!(total(&servers), 15, "{:?}", served(&servers));
    let log = mesh
        .waypoint()
        .wait_access_log(15, Duration::from_secs(10), |_| true)
        .await
        .unwrap();
    for (path, _, _, route) in &cases {
        let entries: Vec<_> = log.iter().filter(|e| field(e, "path") == *path).collect();
        assert_eq!(entries.len(), 3, "{path}: {entries:?}");
        for e in entries {
            assert_eq!(field(e, "route_name"), *route, "{path}: {e}");
            assert_eq!(field(e, "response_flags"), "-", "{path}: {e}");
        }
    }
}

/// `rewrite.authority` replaces the Host the endpoint sees (once, not added next to the
/// client's); with `rewrite.uri` in the same route both apply; a route without a rewrite keeps
/// the client's Host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_authority_reaches_the_endpoint() {
    let vs = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: authority-only
    match:
    - uri:
        prefix: /host
    rewrite:
      authority: reviews.internal
    route:
    - destination:
        host: demoapp
  - name: both
    match:
    - uri:
        prefix: /api
    rewrite:
      uri: /v2
      authority: api.internal:8443
    route:
    - destination:
        host: demoapp
        subset: v11
  - name: untouched
    route:
    - destination:
        host: demoapp
"#;
    let (mesh, servers) = demo_mesh("rt-authority", &[vs, DR_SUBSETS]).await;
    let mut c = client(&mesh).await;
    let seen = |r: &HttpReply| server(&servers, &r.pod()).records().pop().unwrap();
    let hosts = |rec: &tests::http_apps::HttpRecord| -> Vec<String> {
        rec.headers
            .iter()
            .filter(|(k, _)| k == "host")
            .map(|(_, v)| v.clone())
            .collect()
    };
    for _ in 0..3 {
        let r = get(&mut c, "/host/x?q=1", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let rec = seen(&r);
        assert_eq!(hosts(&rec), ["reviews.internal"], "{rec:?}");
        assert_eq!(
            rec.path, "/host/x?q=1",
            "only the authority is rewritten: {rec:?}"
        );

        let r = get(&mut c, "/api/items?q=2", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(V11.contains(&r.pod().as_str()), "/api → {}", r.pod());
        let rec = seen(&r);
        assert_eq!(hosts(&rec), ["api.internal:8443"], "{rec:?}");
        assert_eq!(rec.path, "/v2/items?q=2", "{rec:?}");
        // The JSON echo agrees with the record.
        let doc = r.json().unwrap();
        assert_eq!(doc["headers"]["host"], "api.internal:8443", "{doc}");
        assert_eq!(doc["path"], "/v2/items?q=2", "{doc}");

        let r = get(&mut c, "/plain", &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let rec = seen(&r);
        assert_eq!(hosts(&rec), ["10.96.0.20:80"], "{rec:?}");
        assert_eq!(rec.path, "/plain", "{rec:?}");
    }
    // The access log keeps the request as the client sent it.
    let log = mesh
        .waypoint()
        .wait_access_log(9, Duration::from_secs(10), |_| true)
        .await
        .unwrap();
    let both: Vec<_> = log
        .iter()
        .filter(|e| field(e, "route_name") == "both")
        .collect();
    assert_eq!(both.len(), 3, "{log:?}");
    for e in both {
        assert_eq!(field(e, "path"), "/api/items?q=2", "{e}");
        assert_eq!(field(e, "upstream_cluster"), cluster("v11"), "{e}");
    }
}

async fn client_in(mesh: &L7Mesh, pod: &str) -> Http1Client {
    within(
        10,
        &format!("connect to the VIP from {pod}"),
        Http1Client::connect(&mesh.pod(pod).ns, mesh.vip()),
    )
    .await
    .unwrap()
}

/// consistentHash `useSourceIp: true`: every request from one client pod lands on the same
/// endpoint, over many new connections (new source ports); the key is the client's IP, so six
/// client pods do not all share one endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_source_ip_sticks_across_connections() {
    const CLIENTS: [&str; 6] = ["a", "c", "p3", "p4", "p5", "p6"];
    let dr = dr_with_policy("loadBalancer:\n  consistentHash:\n    useSourceIp: true");
    let mesh = within(
        120,
        "start the mesh",
        L7Mesh::demoapp_canary("rt-srcip")
            .clients(&CLIENTS)
            .document(&dr)
            .start(),
    )
    .await
    .unwrap();
    let servers = mesh.start_http_servers(HttpMode::Auto).unwrap();
    let mut owner: BTreeMap<&str, String> = BTreeMap::new();
    let mut ports = std::collections::BTreeSet::new();
    for round in 0..6 {
        for pod in CLIENTS {
            // A new connection every time: only the source IP stays the same.
            let mut c = client_in(&mesh, pod).await;
            ports.insert(c.local_addr);
            for _ in 0..2 {
                let r = get(&mut c, &format!("/ip/{round}"), &[]).await;
                assert_eq!(r.status, 200, "{}", r.text());
                let first = owner.entry(pod).or_insert_with(|| r.pod());
                assert_eq!(
                    *first,
                    r.pod(),
                    "client {pod} moved in round {round}: {:?}",
                    served(&servers)
                );
            }
        }
    }
    assert_eq!(
        ports.len(),
        36,
        "every connection had its own source address"
    );
    let distinct: std::collections::BTreeSet<&String> = owner.values().collect();
    assert!(
        distinct.len() >= 2,
        "six client IPs all hashed to {distinct:?}: {owner:?}"
    );
    assert_eq!(total(&servers), 72);
}

/// consistentHash `httpQueryParameterName`: requests with the same value of the parameter
/// land on the same endpoint whatever the path, the other parameters or the connection;
/// different values spread over several endpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_query_parameter_sticks() {
    let dr = dr_with_policy("loadBalancer:\n  consistentHash:\n    httpQueryParameterName: user");
    let (mesh, servers) = demo_mesh("rt-query", &[&dr]).await;
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for round in 0..3 {
        // New connections each round, so no connection-level affinity can help.
        let mut c = client(&mesh).await;
        for u in 0..12 {
            let user = format!("u{u}");
            for path in [
                format!("/q?user={user}"),
                format!("/other/path?page={round}&user={user}"),
                format!("/q?user={user}&x=y{u}"),
            ] {
                let r = get(&mut c, &path, &[]).await;
                assert_eq!(r.status, 200, "{}", r.text());
                let first = owner.entry(user.clone()).or_insert_with(|| r.pod());
                assert_eq!(*first, r.pod(), "{path} (round {round}) moved");
            }
        }
    }
    let distinct: std::collections::BTreeSet<&String> = owner.values().collect();
    assert!(distinct.len() >= 2, "12 users all on {distinct:?}");
    assert_eq!(total(&servers), 3 * 12 * 3);
}

/// Starts `GET path` with `x-delay-ms: ms` on its own connection from pod `a` and waits until
/// an endpoint has received it (the test server records a request before its delay); returns
/// the request's task and the endpoint holding it.
async fn hold_slow_request(
    mesh: &L7Mesh,
    servers: &[HttpServer],
    path: &str,
    ms: u64,
) -> (tokio::task::JoinHandle<HttpReply>, String) {
    let mut c = client(mesh).await;
    let delay = ms.to_string();
    let p = path.to_string();
    let task = tokio::spawn(async move { c.get(&p, &[("x-delay-ms", &delay)]).await.unwrap() });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let holders: Vec<&str> = servers
            .iter()
            .filter(|s| s.records().iter().any(|r| r.path == path))
            .map(|s| s.pod.as_str())
            .collect();
        if let [one] = holders.as_slice() {
            return (task, one.to_string());
        }
        assert!(holders.is_empty(), "{path} reached {holders:?}");
        assert!(
            Instant::now() < deadline,
            "{path} never reached an endpoint"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// LEAST_REQUEST really counts requests in flight. The waypoint's power of two choices draws
/// two *distinct* endpoints, so over two endpoints (subset v11) it compares both and is exact:
/// with a slow request held on one pod, every new request goes to the other; with two slow
/// requests on one pod and one on the other, every new request goes to the less loaded one,
/// while a ROUND_ROBIN subset over the same two pods keeps alternating. Over three endpoints
/// (v10) a pod holding a slow request is never picked while the others are idle (round robin
/// or random would give it a third). Requests run one at a time, so the only requests in
/// flight are the held slow ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_avoids_endpoints_with_requests_in_flight() {
    let dr = r#"
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: demoapp
spec:
  host: demoapp
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
  subsets:
  - name: v10
    labels:
      version: v1.0
  - name: v11
    labels:
      version: v1.1
  - name: rr
    labels:
      version: v1.1
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
"#;
    let vs = r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: demoapp
spec:
  hosts:
  - demoapp
  http:
  - name: round-robin
    match:
    - headers:
        x-lb:
          exact: rr
    route:
    - destination:
        host: demoapp
        subset: rr
  - name: three
    match:
    - uri:
        prefix: /v10
    route:
    - destination:
        host: demoapp
        subset: v10
  - name: two
    route:
    - destination:
        host: demoapp
        subset: v11
"#;
    let (mesh, servers) = demo_mesh("rt-leastreq", &[vs, dr]).await;
    let mut c = client(&mesh).await;
    // Warm the upstream connections so no pick waits on a handshake.
    for _ in 0..4 {
        assert_eq!(get(&mut c, "/warm", &[]).await.status, 200);
        assert_eq!(get(&mut c, "/v10/warm", &[]).await.status, 200);
    }

    // Three endpoints, one busy: never picked while the others are idle.
    let (slow0, busy) = hold_slow_request(&mesh, &servers, "/v10/slow-0", 6000).await;
    assert!(V10.contains(&busy.as_str()), "{busy}");
    let mut fast = BTreeMap::new();
    for i in 0..15 {
        let r = get(&mut c, &format!("/v10/fast-{i}"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *fast.entry(r.pod()).or_insert(0) += 1;
    }
    assert!(!slow0.is_finished(), "the slow request ended too early");
    assert!(
        !fast.contains_key(&busy),
        "{busy} holds a request and the other v1.0 pods none, yet it got {fast:?}"
    );
    assert!(fast.keys().all(|p| V10.contains(&p.as_str())), "{fast:?}");

    // Two endpoints, exact: one slow request on X → everything else to Y.
    let (slow1, x) = hold_slow_request(&mesh, &servers, "/slow-1", 10000).await;
    assert!(V11.contains(&x.as_str()), "{x}");
    let y = V11.iter().find(|p| **p != x).unwrap().to_string();
    for i in 0..10 {
        let r = get(&mut c, &format!("/fast-a-{i}"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.pod(), y, "request {i}: {x} holds a request, {y} none");
    }
    // A second slow request must go to Y (1 vs 0 in flight); a third may go to either.
    let (slow2, second) = hold_slow_request(&mesh, &servers, "/slow-2", 10000).await;
    assert_eq!(second, y, "the second slow request avoids {x}");
    let (slow3, third) = hold_slow_request(&mesh, &servers, "/slow-3", 10000).await;
    assert!(V11.contains(&third.as_str()), "{third}");
    let light = V11.iter().find(|p| **p != third).unwrap().to_string();
    for i in 0..10 {
        let r = get(&mut c, &format!("/fast-b-{i}"), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.pod(),
            light,
            "request {i}: {third} holds two requests, {light} one"
        );
    }
    // The control: round robin over the same two pods ignores what is in flight.
    let mut rr = BTreeMap::new();
    for i in 0..10 {
        let r = get(&mut c, &format!("/rr-{i}"), &[("x-lb", "rr")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        *rr.entry(r.pod()).or_insert(0) += 1;
    }
    assert_eq!(rr.len(), 2, "round robin uses both pods: {rr:?}");
    assert!(
        rr.values().all(|n| *n == 5),
        "round robin alternates: {rr:?}"
    );
    for t in [&slow1, &slow2, &slow3] {
        assert!(!t.is_finished(), "a slow request ended too early");
    }
    for t in [slow0, slow1, slow2, slow3] {
        assert_eq!(within(30, "slow request", t).await.unwrap().status, 200);
    }
}

/// consistentHash `useSourceIp: true` holds for non-HTTP traffic too: Istio gives the TCP
/// proxy of a `tcp` port the DestinationRule's source-IP hash policy, so every connection from
/// pod `a` to a port declared `tcp` lands on the same endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_source_ip_applies_to_tcp_connections() {
    const PORT: u16 = 7000;
    let dr = dr_with_policy("loadBalancer:\n  consistentHash:\n    useSourceIp: true");
    let mesh = within(
        120,
        "start the mesh",
        L7Mesh::demoapp_canary("rt-tcp-srcip")
            .port(PORT, PORT)
            .app_protocol(PORT, "tcp")
            .document(&dr)
            .start(),
    )
    .await
    .unwrap();
    let echoes = echo_servers(&mesh, PORT);
    let mut pods: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..10u64 {
        let pod = echoed_by(&mesh, &echoes, PORT, &tests::apps::random_bytes(1500, i)).await;
        *pods.entry(pod).or_insert(0) += 1;
    }
    assert_eq!(
        pods.len(),
        1,
        "10 connections from one source IP spread over {pods:?}"
    );
}
