//! The users' Istio YAML (`../shared/scenarios/`, beside the checkout), read unchanged, and the
//! Kubernetes objects its README pairs with it.

/// The directory of the users' scenario files.
pub const SCENARIOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/scenarios");

/// The text of scenario file `name` (panics naming the path when it is missing).
pub fn scenario(name: &str) -> String {
    let path = format!("{SCENARIOS}/{name}");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading scenario {path}: {e}"))
}

/// The scenario README's pattern for `external-db`: a headless, selector-less Service and an
/// Endpoints object naming the database's address (in the tests, pod `d`, not in the mesh).
pub const EXTERNAL_DB_ENDPOINTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: external-db, namespace: default}
spec:
  clusterIP: None
  clusterIPs: [None]
  ports: [{port: 3306, protocol: TCP, targetPort: 3306}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: external-db, namespace: default}
subsets: [{addresses: [{ip: 10.244.2.3}], ports: [{port: 3306, protocol: TCP}]}]
"#;
