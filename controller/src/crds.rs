//! The Istio CRDs the controller reads (VirtualService, DestinationRule, ServiceEntry, Sidecar,
//! AuthorizationPolicy, PeerAuthentication), created by the Lease holder on a cluster that
//! lacks them, so users' Istio YAML applies without installing Istio.
//!
//! Only where absent: creation only, never update or patch, so an existing definition (Istio's,
//! with its full schema, or a newer one) is left exactly as it is, and the RBAC grants no more
//! than `create`. Ours serve the versions Istio's serve with Istio's storage version (a later
//! Istio install can take them over without migrating stored objects), accept any `spec` (the
//! controller validates what it reads, per resource) and carry Istio's short names and
//! categories so `kubectl get vs` works as users expect. They are labelled
//! [`MANAGED_BY_LABEL`]`=`[`MANAGED_BY_VALUE`].

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use serde_json::{json, Value};

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "ambient-controller";

/// One Istio kind: group, kind, plural, short names, served versions (storage first).
struct IstioKind {
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    short: &'static [&'static str],
    versions: &'static [&'static str],
}

const NETWORKING: &[&str] = &["v1alpha3", "v1beta1", "v1"];
const SECURITY: &[&str] = &["v1beta1", "v1"];

const KINDS: &[IstioKind] = &[
    IstioKind {
        group: "networking.istio.io",
        kind: "VirtualService",
        plural: "virtualservices",
        short: &["vs"],
        versions: NETWORKING,
    },
    IstioKind {
        group: "networking.istio.io",
        kind: "DestinationRule",
        plural: "destinationrules",
        short: &["dr"],
        versions: NETWORKING,
    },
    IstioKind {
        group: "networking.istio.io",
        kind: "ServiceEntry",
        plural: "serviceentries",
        short: &["se"],
        versions: NETWORKING,
    },
    IstioKind {
        group: "networking.istio.io",
        kind: "Sidecar",
        plural: "sidecars",
        short: &[],
        versions: NETWORKING,
    },
    IstioKind {
        group: "security.istio.io",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        short: &["ap"],
        versions: SECURITY,
    },
    IstioKind {
        group: "security.istio.io",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        short: &["pa"],
        versions: SECURITY,
    },
];

/// The definitions, as objects ready to create.
pub fn istio_crds() -> Vec<Value> {
    KINDS
        .iter()
        .map(|k| {
            let versions: Vec<Value> = k
                .versions
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    json!({
                        "name": v,
                        "served": true,
                        "storage": i == 0,
                        "subresources": {"status": {}},
                        "schema": {"openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                            },
                        }},
                    })
                })
                .collect();
            json!({
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {
                    "name": format!("{}.{}", k.plural, k.group),
                    "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE},
                },
                "spec": {
                    "group": k.group,
                    "scope": "Namespaced",
                    "names": {
                        "kind": k.kind,
                        "listKind": format!("{}List", k.kind),
                        "plural": k.plural,
                        "singular": k.kind.to_ascii_lowercase(),
                        "shortNames": k.short,
                        "categories": [
                            "istio-io",
                            k.group.split('.').next().unwrap_or_default().to_string() + "-istio-io",
                        ],
                    },
                    "versions": versions,
                },
            })
        })
        .collect()
}

/// What [`ensure`] did with each definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created(String),
    /// Present already: left alone.
    Present(String),
}

/// Creates each definition the cluster lacks. A failure (no permission, API server down)
/// names the definition; the caller logs and retries later.
pub async fn ensure(client: &kube::Client) -> Result<Vec<Outcome>, (String, kube::Error)> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut out = Vec::new();
    for def in istio_crds() {
        let name = def["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let crd: CustomResourceDefinition =
            serde_json::from_value(def).map_err(|e| (name.clone(), kube::Error::SerdeError(e)))?;
        match api.create(&PostParams::default(), &crd).await {
            Ok(_) => out.push(Outcome::Created(name)),
            Err(kube::Error::Api(e)) if e.code == 409 => out.push(Outcome::Present(name)),
            Err(e) => return Err((name, e)),
        }
    }
    Ok(out)
}

/// Runs [`ensure`] each time this replica gains the lease, retrying failures every 30 s.
pub async fn run(client: kube::Client, mut leader: tokio::sync::watch::Receiver<bool>) {
    loop {
        if *leader.borrow_and_update() {
            match ensure(&client).await {
                Ok(outcomes) => {
                    for o in outcomes {
                        if let Outcome::Created(name) = o {
                            tracing::info!(crd = %name, "created the missing Istio CRD");
                        }
                    }
                }
                Err((name, e)) => {
                    tracing::warn!(crd = %name, error = %e, "cannot create a missing Istio CRD; retrying in 30 s");
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => continue,
                        r = leader.changed() => if r.is_err() { return } else { continue },
                    }
                }
            }
        }
        if leader.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_structural_and_match_istio_names() {
        let defs = istio_crds();
        assert_eq!(defs.len(), 6);
        for d in &defs {
            let crd: CustomResourceDefinition =
                serde_json::from_value(d.clone()).expect("a CustomResourceDefinition");
            let storage: Vec<&str> = crd
                .spec
                .versions
                .iter()
                .filter(|v| v.storage)
                .map(|v| v.name.as_str())
                .collect();
            assert_eq!(storage.len(), 1, "{:?}", crd.metadata.name);
            assert_eq!(
                crd.metadata.name.as_deref(),
                Some(format!("{}.{}", crd.spec.names.plural, crd.spec.group).as_str())
            );
        }
        let vs = &defs[0];
        assert_eq!(
            vs["metadata"]["name"],
            "virtualservices.networking.istio.io"
        );
        assert_eq!(vs["spec"]["names"]["shortNames"], json!(["vs"]));
        assert_eq!(
            vs["spec"]["names"]["categories"],
            json!(["istio-io", "networking-istio-io"])
        );
        let names: Vec<&str> = vs["spec"]["versions"]
            .as_array()
            .expect("versions")
            .iter()
            .filter_map(|v| v["name"].as_str())
            .collect();
        // The users' files use v1alpha3 and v1beta1; Istio stores v1alpha3.
        assert_eq!(names, ["v1alpha3", "v1beta1", "v1"]);
        assert_eq!(vs["spec"]["versions"][0]["storage"], true);
    }
}
