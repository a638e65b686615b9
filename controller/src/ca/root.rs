//! The root of trust in Kubernetes: the CA's signing material lives in a Secret (Istio's
//! plug-in CA key names, so an intermediate signed by an external root works), generated on
//! first start and created once (a replica losing the create race reads the winner's), and
//! the root bundle is published as the ConfigMap `istio-ca-root-cert` (key `root-cert.pem`) in
//! every ambient namespace, every namespace holding a waypoint Gateway (its pods mount it, and
//! a waypoint may serve an ambient namespace from one that is not) and the controller's own,
//! reconciled by the lease holder only.

use crate::gateway_class::waypoint_form;
use crate::waypoint::gateway::{class_controller, gateway_class_resource, gateway_resource};
use common::identity::ca::{
    CaError, MeshCa, CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE,
};
use common::task::AbortOnDrop;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Name of the ConfigMap carrying the root bundle (what Istio's proxies mount).
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
/// Label selecting the namespaces that get the root ConfigMap.
pub const AMBIENT_LABEL: &str = "istio.io/dataplane-mode";
pub const AMBIENT_VALUE: &str = "ambient";
/// Field manager of our writes.
pub const FIELD_MANAGER: &str = "ambient-controller";

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("CA Secret {0}: {1}")]
    Material(String, CaError),
    #[error("CA Secret {0}: missing key {1}")]
    Missing(String, &'static str),
    #[error("generating the CA: {0}")]
    Generate(CaError),
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Loads the CA from Secret `namespace/name`, or generates one and creates the Secret. When
/// another replica created it first (409), its CA is loaded instead, so all replicas sign with
/// the same key.
pub async fn load_or_create(
    client: kube::Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
) -> Result<MeshCa, RootError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    if let Some(s) = api.get_opt(name).await? {
        return from_secret(&s, name, trust_domain);
    }
    let ca = MeshCa::generate(trust_domain).map_err(RootError::Generate)?;
    let data = secret_data(&ca);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("istio.io/ca-root".into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), "generated the mesh CA");
            Ok(ca)
        }
        Err(e) if is_status(&e, 409) => {
            tracing::info!(secret = %format!("{namespace}/{name}"), "another replica created the CA first; using it");
            let s = api.get(name).await?;
            from_secret(&s, name, trust_domain)
        }
        Err(e) => Err(e.into()),
    }
}

/// The CA from a Secret's plug-in keys (`ca-cert.pem`, `ca-key.pem`, optional `root-cert.pem`
/// and `cert-chain.pem`).
/// The Secret data holding `ca` (Istio's plug-in file names).
pub fn secret_data(ca: &MeshCa) -> BTreeMap<String, ByteString> {
    let (cert, key) = ca.signing_pems();
    let mut data = BTreeMap::new();
    data.insert(CA_CERT_FILE.to_string(), ByteString(cert.into_bytes()));
    data.insert(CA_KEY_FILE.to_string(), ByteString(key.into_bytes()));
    data.insert(
        ROOT_CERT_FILE.to_string(),
        ByteString(ca.root_pem().as_bytes().to_vec()),
    );
    data
}

pub fn from_secret(s: &Secret, name: &str, trust_domain: &str) -> Result<MeshCa, RootError> {
    let get = |k: &str| -> Option<String> {
        let data = s.data.as_ref()?;
        data.get(k)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
    };
    let cert = get(CA_CERT_FILE).ok_or_else(|| RootError::Missing(name.into(), CA_CERT_FILE))?;
    let key = get(CA_KEY_FILE).ok_or_else(|| RootError::Missing(name.into(), CA_KEY_FILE))?;
    let root = get(ROOT_CERT_FILE);
    let chain = get(CERT_CHAIN_FILE);
    MeshCa::from_plugin_pems(trust_domain, &cert, &key, root.as_deref(), chain.as_deref())
        .map_err(|e| RootError::Material(name.into(), e))
}

/// Keeps `istio-ca-root-cert` equal to `root_pem` in every ambient namespace, every namespace
/// with a waypoint Gateway, and `own_namespace`, while `leader` says this replica holds the lease. Level-triggered: any
/// namespace or ConfigMap change, or gaining the lease, re-checks every target and writes
/// (server-side apply) only those that differ. Runs until the process ends.
pub async fn publish_root(
    client: kube::Client,
    own_namespace: String,
    root_pem: String,
    leader: watch::Receiver<bool>,
) {
    let (_keep, roots) = watch::channel(root_pem);
    publish_roots(client, own_namespace, roots, leader).await
}

/// [`publish_root`] of the bundle `roots` holds: a new bundle (the CA Secret changed, see
/// [`super::follow`]) is written everywhere at once.
pub async fn publish_roots(
    client: kube::Client,
    own_namespace: String,
    mut roots: watch::Receiver<String>,
    mut leader: watch::Receiver<bool>,
) {
    let mut roots_open = true;
    let wake = Arc::new(Notify::new());
    let (namespaces, ns_task) = spawn_reflector::<Namespace>(
        Api::all(client.clone()),
        watcher::Config::default().labels(&format!("{AMBIENT_LABEL}={AMBIENT_VALUE}")),
        wake.clone(),
    );
    let (configmaps, cm_task) = spawn_reflector::<ConfigMap>(
        Api::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={ROOT_CONFIGMAP}")),
        wake.clone(),
    );
    let gw_ar = gateway_resource();
    let (gateways, gw_task) = spawn_reflector_with::<DynamicObject>(
        Api::all_with(client.clone(), &gw_ar),
        gw_ar,
        watcher::Config::default(),
        wake.clone(),
    );
    let class_ar = gateway_class_resource();
    let (classes, class_task) = spawn_reflector_with::<DynamicObject>(
        Api::all_with(client.clone(), &class_ar),
        class_ar,
        watcher::Config::default(),
        wake.clone(),
    );
    let _tasks = [ns_task, cm_task, gw_task, class_task].map(AbortOnDrop);
    let mut failed = false;
    let mut gateway_api_waited = false;
    loop {
        if *leader.borrow_and_update() {
            let _ = tokio::join!(namespaces.wait_until_ready(), configmaps.wait_until_ready());
            // Gateway API may not be installed: its watches never become ready then, and the
            // root still goes to the ambient namespaces. Waited for once, not on every pass.
            if !gateway_api_waited {
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    tokio::join!(gateways.wait_until_ready(), classes.wait_until_ready())
                })
                .await;
                gateway_api_waited = true;
            }
            let mut targets = waypoint_namespaces(&gateways, &classes);
            targets.extend(
                namespaces
                    .state()
                    .iter()
                    .filter(|n| n.metadata.deletion_timestamp.is_none())
                    .filter_map(|n| n.metadata.name.clone()),
            );
            targets.push(own_namespace.clone());
            let root_pem = roots.borrow_and_update().clone();
            failed = !reconcile(&client, targets, &root_pem, &configmaps).await;
        }
        let retry = async {
            if failed {
                tokio::time::sleep(Duration::from_secs(2)).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            r = leader.changed() => if r.is_err() { return },
            r = roots.changed(), if roots_open => if r.is_err() { roots_open = false },
            _ = wake.notified() => {}
            _ = retry => {}
        }
    }
}

/// Namespaces of the Gateways of our waypoint classes.
fn waypoint_namespaces(
    gateways: &Store<DynamicObject>,
    classes: &Store<DynamicObject>,
) -> Vec<String> {
    let controller_of = |class: &str| {
        classes
            .get(&ObjectRef::new_with(class, gateway_class_resource()))
            .and_then(|c| class_controller(&c))
    };
    gateways
        .state()
        .iter()
        .filter(|g| g.metadata.deletion_timestamp.is_none())
        .filter(|g| {
            let class = g
                .data
                .pointer("/spec/gatewayClassName")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            waypoint_form(class, controller_of(class).as_deref()).is_some()
        })
        .filter_map(|g| g.metadata.namespace.clone())
        .collect()
}

/// One pass: writes the root into `targets` where it is missing or different. True when all
/// writes succeeded.
async fn reconcile(
    client: &kube::Client,
    mut targets: Vec<String>,
    root_pem: &str,
    configmaps: &Store<ConfigMap>,
) -> bool {
    targets.sort();
    targets.dedup();
    let mut ok = true;
    for ns in targets {
        let current = configmaps.get(&ObjectRef::new(ROOT_CONFIGMAP).within(&ns));
        let up_to_date = current
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get(ROOT_CERT_FILE))
            .is_some_and(|v| v == root_pem);
        if up_to_date {
            continue;
        }
        if let Err(e) = write_root(client, &ns, root_pem).await {
            tracing::warn!(namespace = %ns, error = %e, "cannot publish the root certificate");
            ok = false;
        } else {
            tracing::info!(namespace = %ns, "published the root certificate");
        }
    }
    ok
}

/// Server-side applies the root ConfigMap into `namespace`.
pub async fn write_root(
    client: &kube::Client,
    namespace: &str,
    root_pem: &str,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": ROOT_CONFIGMAP, "namespace": namespace},
        "data": {ROOT_CERT_FILE: root_pem},
    });
    api.patch(
        ROOT_CONFIGMAP,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map(|_| ())
}

/// Starts a reflector for `api` on a task; every change notifies `wake`.
fn spawn_reflector<K>(
    api: Api<K>,
    cfg: watcher::Config,
    wake: Arc<Notify>,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    spawn_reflector_with(api, (), cfg, wake)
}

/// [`spawn_reflector`] for a resource known at run time (`dyntype`).
fn spawn_reflector_with<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    cfg: watcher::Config,
    wake: Arc<Notify>,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
{
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let stream = watcher(api, cfg).default_backoff().reflect(writer);
    let task = tokio::spawn(async move {
        stream
            .for_each(|ev| {
                match ev {
                    Ok(_) => wake.notify_one(),
                    Err(e) => tracing::warn!(error = %e, "watch error"),
                }
                std::future::ready(())
            })
            .await;
    });
    (reader, task)
}
