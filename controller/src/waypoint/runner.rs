//! The controller loop while this replica holds the Lease: watchers (Gateways, waypoint pods,
//! our objects of every kind, ConfigMaps named by a parametersRef) turn events into Gateway
//! keys; the queue runs one reconcile at a time (bounded by a timeout); a periodic resync
//! re-checks every Gateway and finds our objects whose Gateway is gone.

use super::gateway::{
    class_controller, gateway_class_resource, gateway_resource, Gateway, CONTROLLER_NAME,
    EARLY_CLASS, GATEWAY_NAME_LABEL, MANAGED_LABEL, MANAGED_VALUE, WAYPOINT_CLASS,
};
use super::params::WaypointConfig;
use super::queue::{Key, Queue};
use super::reconcile::{child_resources, Reconciler};
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Longest a single reconcile may take before it counts as failed.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates the built-in GatewayClasses if missing (an existing one is left alone).
pub async fn ensure_classes(client: &kube::Client) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &gateway_class_resource());
    for (class, what) in [
        (WAYPOINT_CLASS, "Ambient mesh waypoints"),
        (
            EARLY_CLASS,
            "Ambient mesh waypoints (early istio-mesh form)",
        ),
    ] {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GatewayClass",
            "metadata": {"name": class},
            "spec": {"controllerName": CONTROLLER_NAME, "description": what},
        }))
        .map_err(kube::Error::SerdeError)?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => tracing::info!(class, "GatewayClass created"),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Queue keys of GatewayClasses (cluster-scoped): an empty namespace cannot be a Gateway's.
fn class_key(name: &str) -> Key {
    (String::new(), name.to_string())
}

fn class_name(key: &Key) -> Option<&str> {
    key.0.is_empty().then_some(key.1.as_str())
}

/// Marks a GatewayClass of ours `Accepted` (as Gateway API asks of the controller that owns a
/// class); classes of other controllers are left alone.
async fn class_status(
    client: &kube::Client,
    class: Option<&DynamicObject>,
    field_manager: &str,
) -> Result<(), kube::Error> {
    let Some(class) = class else { return Ok(()) };
    if class_controller(class).as_deref() != Some(CONTROLLER_NAME) {
        return Ok(());
    }
    let current = class.data.get("status").and_then(|s| s.get("conditions"));
    let desired = super::status::class_conditions(
        class.metadata.generation.unwrap_or(0),
        current,
        &super::reconcile::now_rfc3339(),
    );
    if current == Some(&desired) {
        return Ok(());
    }
    let ar = gateway_class_resource();
    let body = json!({
        "apiVersion": ar.api_version,
        "kind": ar.kind,
        "metadata": {"name": class.name_any()},
        "status": {"conditions": desired},
    });
    Api::<DynamicObject>::all_with(client.clone(), &ar)
        .patch_status(
            &class.name_any(),
            &kube::api::PatchParams::apply(field_manager).force(),
            &kube::api::Patch::Apply(&body),
        )
        .await
        .map(|_| ())
}

fn gateway_of(o: &DynamicObject) -> Option<Gateway> {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
}

/// What a Gateway change must differ in to be worth a reconcile (status-only changes,
/// including our own writes, are not).
fn fingerprint(o: &DynamicObject) -> String {
    json!([
        o.metadata.uid,
        o.metadata.generation,
        o.metadata.labels,
        o.metadata.annotations,
        o.metadata.deletion_timestamp,
        o.data.get("spec"),
    ])
    .to_string()
}

fn pod_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Forwards a watcher's events as Gateway keys through `map`.
async fn forward<K, S>(
    what: &'static str,
    stream: S,
    tx: mpsc::Sender<Key>,
    map: impl Fn(&K) -> Vec<Key>,
) where
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        let objects = match ev {
            Ok(Event::Apply(o) | Event::InitApply(o) | Event::Delete(o)) => vec![o],
            Ok(Event::Init | Event::InitDone) => Vec::new(),
            Err(e) => {
                tracing::warn!(watch = what, error = %e, "waypoint controller watch failed; retrying");
                Vec::new()
            }
        };
        for key in objects.iter().flat_map(&map) {
            if tx.send(key).await.is_err() {
                return;
            }
        }
    }
}

/// Runs the controller until the task is dropped (the caller aborts it on losing the lease).
pub async fn lead(client: kube::Client, config: WaypointConfig) {
    if let Err(e) = ensure_classes(&client).await {
        tracing::warn!(error = %e, "cannot create the waypoint GatewayClasses");
    }
    let rec = Reconciler {
        client: client.clone(),
        config: config.clone(),
    };
    let (tx, mut rx) = mpsc::channel::<Key>(1024);
    let mut tasks = tokio::task::JoinSet::new();
    let gw_ar = gateway_resource();

    // Gateways (a reflector: the reconcile reads the current object from it).
    let gw_writer = reflector::store::Writer::<DynamicObject>::new(gw_ar.clone());
    let gateways: Store<DynamicObject> = gw_writer.as_reader();
    let gw_stream = watcher::watcher(
        Api::<DynamicObject>::all_with(client.clone(), &gw_ar),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(gw_writer);
    let gtx = tx.clone();
    tasks.spawn(async move {
        let mut seen: HashMap<Key, String> = HashMap::new();
        let mut stream = std::pin::pin!(gw_stream);
        while let Some(ev) = stream.next().await {
            let key_of = |o: &DynamicObject| (o.namespace().unwrap_or_default(), o.name_any());
            let key = match ev {
                Ok(Event::Apply(o) | Event::InitApply(o)) => {
                    let fp = fingerprint(&o);
                    let key = key_of(&o);
                    if seen.get(&key) == Some(&fp) {
                        continue;
                    }
                    seen.insert(key.clone(), fp);
                    key
                }
                Ok(Event::Delete(o)) => {
                    let key = key_of(&o);
                    seen.remove(&key);
                    key
                }
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "Gateway watch failed; retrying");
                    continue;
                }
            };
            if gtx.send(key).await.is_err() {
                return;
            }
        }
    });

    // GatewayClasses: which classes are ours (their controllerName); a change re-checks the
    // Gateways of that class, and ours get their `Accepted` status.
    let class_writer = reflector::store::Writer::<DynamicObject>::new(gateway_class_resource());
    let classes: Store<DynamicObject> = class_writer.as_reader();
    let class_stream = watcher::watcher(
        Api::<DynamicObject>::all_with(client.clone(), &gateway_class_resource()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(class_writer);
    let gw_for_class = gateways.clone();
    tasks.spawn(forward(
        "gatewayclasses",
        class_stream,
        tx.clone(),
        move |c: &DynamicObject| {
            let mut keys: Vec<Key> = gw_for_class
                .state()
                .iter()
                .filter_map(|g| gateway_of(g))
                .filter(|g| g.spec.gateway_class_name == c.name_any())
                .map(|g| (g.namespace().to_string(), g.name().to_string()))
                .collect();
            keys.push(class_key(&c.name_any()));
            keys
        },
    ));

    // Waypoint pods (Ready decides Programmed).
    let pod_writer = reflector::store::Writer::<Pod>::default();
    let pods: Store<Pod> = pod_writer.as_reader();
    let pod_stream = watcher::watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(GATEWAY_NAME_LABEL),
    )
    .default_backoff()
    .reflect(pod_writer);
    tasks.spawn(forward("pods", pod_stream, tx.clone(), |p: &Pod| {
        let ns = p.namespace().unwrap_or_default();
        p.labels()
            .get(GATEWAY_NAME_LABEL)
            .map(|g| vec![(ns, g.clone())])
            .unwrap_or_default()
    }));

    // Our objects: a change or deletion by someone else is undone.
    for ar in child_resources() {
        let stream = watcher::watcher(
            Api::<DynamicObject>::all_with(client.clone(), &ar),
            watcher::Config::default().labels(&format!("{MANAGED_LABEL}={MANAGED_VALUE}")),
        )
        .default_backoff();
        tasks.spawn(forward(
            "waypoint objects",
            stream,
            tx.clone(),
            |o: &DynamicObject| {
                let ns = o.namespace().unwrap_or_default();
                o.labels()
                    .get(GATEWAY_NAME_LABEL)
                    .map(|g| vec![(ns, g.clone())])
                    .unwrap_or_default()
            },
        ));
    }

    // ConfigMaps named by a Gateway's parametersRef.
    let cm_stream = watcher::watcher(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff();
    let gw_for_cm = gateways.clone();
    tasks.spawn(forward(
        "configmaps",
        cm_stream,
        tx.clone(),
        move |cm: &ConfigMap| {
            let (ns, name) = (cm.namespace().unwrap_or_default(), cm.name_any());
            gw_for_cm
                .state()
                .iter()
                .filter(|g| g.namespace().as_deref() == Some(ns.as_str()))
                .filter_map(|g| gateway_of(g))
                .filter(|g| {
                    g.spec
                        .infrastructure
                        .as_ref()
                        .and_then(|i| i.parameters_ref.as_ref())
                        .is_some_and(|r| r.kind == "ConfigMap" && r.name == name)
                })
                .map(|g| (ns.clone(), g.name().to_string()))
                .collect()
        },
    ));
    drop(tx);

    if gateways.wait_until_ready().await.is_err()
        || pods.wait_until_ready().await.is_err()
        || classes.wait_until_ready().await.is_err()
    {
        return;
    }
    tracing::info!("waypoint controller running");
    let mut queue = Queue::default();
    let mut resync = tokio::time::interval(config.resync);
    loop {
        let next = queue.next();
        let sleep = async {
            match &next {
                Some((_, at)) => tokio::time::sleep_until(*at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            key = rx.recv() => match key {
                Some(key) => queue.event(key, Instant::now()),
                None => return,
            },
            _ = resync.tick() => {
                let now = Instant::now();
                for g in gateways.state() {
                    queue.event((g.namespace().unwrap_or_default(), g.name_any()), now);
                }
                // Our objects whose Gateway is gone (deleted while no replica led).
                for key in orphan_keys(&client, &gateways).await {
                    queue.event(key, now);
                }
            }
            _ = sleep => {
                let Some((key, _)) = next else { continue };
                queue.take(&key);
                if let Some(class) = class_name(&key) {
                    let obj = classes.get(&ObjectRef::new_with(class, gateway_class_resource()));
                    match class_status(&client, obj.as_deref(), &config.field_manager).await {
                        Ok(()) => queue.succeeded(&key),
                        Err(e) => {
                            let retry = queue.failed(key.clone(), Instant::now());
                            tracing::warn!(class, error = %e, ?retry, "GatewayClass status write failed");
                        }
                    }
                    continue;
                }
                let obj = gateways.get(&ObjectRef::new_with(&key.1, gw_ar.clone()).within(&key.0));
                let gw = obj.as_deref().and_then(gateway_of).map(|mut g| {
                    g.class_controller = classes
                        .get(&ObjectRef::new_with(&g.spec.gateway_class_name, gateway_class_resource()))
                        .and_then(|c| class_controller(&c));
                    g
                });
                let ready = pods
                    .state()
                    .iter()
                    .filter(|p| p.namespace().as_deref() == Some(key.0.as_str()))
                    .filter(|p| p.labels().get(GATEWAY_NAME_LABEL) == Some(&key.1))
                    .filter(|p| pod_ready(p))
                    .count();
                let result = tokio::time::timeout(
                    RECONCILE_TIMEOUT,
                    rec.reconcile(&key.0, &key.1, gw.as_ref(), ready),
                )
                .await;
                match result {
                    Ok(Ok(())) => queue.succeeded(&key),
                    Ok(Err(e)) => {
                        let retry = queue.failed(key.clone(), Instant::now());
                        tracing::warn!(gateway = %format!("{}/{}", key.0, key.1), error = %e, ?retry, "waypoint reconcile failed");
                    }
                    Err(_) => {
                        let retry = queue.failed(key.clone(), Instant::now());
                        tracing::warn!(gateway = %format!("{}/{}", key.0, key.1), ?retry, "waypoint reconcile timed out");
                    }
                }
            }
        }
    }
}

/// Gateways named by our objects' labels that the store does not have.
async fn orphan_keys(client: &kube::Client, gateways: &Store<DynamicObject>) -> Vec<Key> {
    let gw_ar = gateway_resource();
    let lp = ListParams::default().labels(&format!("{MANAGED_LABEL}={MANAGED_VALUE}"));
    let mut out = Vec::new();
    for ar in child_resources() {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let items = match api.list(&lp).await {
            Ok(l) => l.items,
            Err(e) => {
                tracing::warn!(kind = %ar.kind, error = %e, "listing waypoint objects failed");
                continue;
            }
        };
        for o in items {
            let ns = o.namespace().unwrap_or_default();
            let Some(gw) = o.labels().get(GATEWAY_NAME_LABEL) else {
                continue;
            };
            let key = (ns, gw.clone());
            if gateways
                .get(&ObjectRef::new_with(&key.1, gw_ar.clone()).within(&key.0))
                .is_none()
                && !out.contains(&key)
            {
                out.push(key);
            }
        }
    }
    out
}
