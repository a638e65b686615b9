//! kube-runtime watchers for every kind the index reads, feeding [`IndexEvent`]s into a
//! channel. Core kinds are watched typed (k8s-openapi); Istio and Gateway API kinds as
//! `DynamicObject`s turned into [`Object`]s by [`Object::from_json_kind`].
//!
//! Each kind has its own watcher task with `.default_backoff()`: a kind whose CRD is missing
//! (404 on list) logs and retries with backoff without stopping the others. A (re-)list —
//! `Init`, `InitApply`…, `InitDone`, e.g. after the watch expired (410) — ends with a
//! `Delete` for every object the task had reported that the new list no longer contains, so
//! objects deleted during the gap leave the index. The first complete list of each kind is
//! followed by [`IndexEvent::Synced`]; so is the first list of a kind the server does not serve
//! (404: its CRD is absent, so it has no objects).

use crate::index::{IndexEvent, Kind, Object, ObjectRef};
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, TypeMeta};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use std::collections::HashSet;
use tokio::sync::mpsc;

/// The custom kinds watched: (kind, group, version, plural).
pub const CUSTOM_KINDS: [(Kind, &str, &str, &str); 8] = [
    (Kind::Gateway, "gateway.networking.k8s.io", "v1", "gateways"),
    (
        Kind::GatewayClass,
        "gateway.networking.k8s.io",
        "v1",
        "gatewayclasses",
    ),
    (
        Kind::VirtualService,
        "networking.istio.io",
        "v1",
        "virtualservices",
    ),
    (
        Kind::DestinationRule,
        "networking.istio.io",
        "v1",
        "destinationrules",
    ),
    (
        Kind::ServiceEntry,
        "networking.istio.io",
        "v1",
        "serviceentries",
    ),
    (Kind::Sidecar, "networking.istio.io", "v1", "sidecars"),
    (
        Kind::AuthorizationPolicy,
        "security.istio.io",
        "v1",
        "authorizationpolicies",
    ),
    (
        Kind::PeerAuthentication,
        "security.istio.io",
        "v1",
        "peerauthentications",
    ),
];

/// Runs a watcher per kind until the receiver of `tx` is dropped.
pub async fn run_watchers(client: kube::Client, tx: mpsc::Sender<IndexEvent>) {
    let mut tasks = tokio::task::JoinSet::new();
    macro_rules! typed {
        ($ty:ty, $kind:expr, $wrap:expr) => {{
            let api: Api<$ty> = Api::all(client.clone());
            let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
            let convert = |o: $ty| -> Result<Object, String> { Ok($wrap(Box::new(o))) };
            tasks.spawn(pump($kind, stream, convert, tx.clone()));
        }};
    }
    typed!(Namespace, Kind::Namespace, Object::Namespace);
    typed!(Node, Kind::Node, Object::Node);
    typed!(ServiceAccount, Kind::ServiceAccount, Object::ServiceAccount);
    typed!(Pod, Kind::Pod, Object::Pod);
    typed!(Service, Kind::Service, Object::Service);
    typed!(EndpointSlice, Kind::EndpointSlice, Object::EndpointSlice);
    for (kind, group, version, plural) in CUSTOM_KINDS {
        let gvk = GroupVersionKind::gvk(group, version, kind.as_str());
        let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
        let types = TypeMeta {
            api_version: resource.api_version.clone(),
            kind: resource.kind.clone(),
        };
        let convert = move |mut o: DynamicObject| -> Result<Object, String> {
            // List items may lack apiVersion/kind; the Istio loader needs them.
            o.types = Some(types.clone());
            let value = serde_json::to_value(&o).map_err(|e| e.to_string())?;
            Object::from_json_kind(kind, value).map_err(|e| e.to_string())
        };
        tasks.spawn(pump(kind, stream, convert, tx.clone()));
    }
    drop(tx);
    while tasks.join_next().await.is_some() {}
}

fn object_ref<K: kube::Resource>(kind: Kind, o: &K) -> ObjectRef {
    ObjectRef::new(
        kind,
        o.namespace().as_deref().unwrap_or("default"),
        &o.name_any(),
    )
}

/// Tracks the objects one watcher reported, to turn a re-list into deletions.
#[derive(Debug, Default)]
pub struct RelistTracker {
    known: HashSet<ObjectRef>,
    /// Objects seen since `Init`, while a (re-)list is in progress.
    listing: Option<HashSet<ObjectRef>>,
}

impl RelistTracker {
    /// A (re-)list starts.
    pub fn init(&mut self) {
        self.listing = Some(HashSet::new());
    }

    /// An object was applied (during a list or not).
    pub fn applied(&mut self, r: ObjectRef) {
        if let Some(seen) = self.listing.as_mut() {
            seen.insert(r.clone());
        }
        self.known.insert(r);
    }

    pub fn deleted(&mut self, r: &ObjectRef) {
        self.known.remove(r);
        if let Some(seen) = self.listing.as_mut() {
            seen.remove(r);
        }
    }

    /// The list is complete: returns the objects it no longer contains.
    pub fn done(&mut self) -> Vec<ObjectRef> {
        let Some(seen) = self.listing.take() else {
            return Vec::new();
        };
        let mut gone: Vec<ObjectRef> = self.known.difference(&seen).cloned().collect();
        gone.sort();
        self.known = seen;
        gone
    }
}

/// The kinds [`run_watchers`] watches: the typed core kinds and [`CUSTOM_KINDS`].
pub fn watched_kinds() -> Vec<Kind> {
    let core = [
        Kind::Namespace,
        Kind::Node,
        Kind::ServiceAccount,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
    ];
    core.into_iter()
        .chain(CUSTOM_KINDS.iter().map(|(k, ..)| *k))
        .collect()
}

/// Whether a watch failed because the API server does not serve the kind at all.
fn kind_not_served(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404)
}

/// Forwards one watcher's events; returns when the channel closes (or the stream ends).
async fn pump<K, S, F>(kind: Kind, stream: S, convert: F, tx: mpsc::Sender<IndexEvent>)
where
    K: kube::Resource,
    S: Stream<Item = Result<Event<K>, watcher::Error>>,
    F: Fn(K) -> Result<Object, String>,
{
    let mut stream = std::pin::pin!(stream);
    let mut tracker = RelistTracker::default();
    let mut synced = false;
    while let Some(item) = stream.next().await {
        let events = match item {
            Err(e) => {
                tracing::warn!(%kind, error = %e, "watch failed; retrying with backoff");
                // A kind the API server does not serve (its CRD is absent) has no objects:
                // that counts as its first list, so a cluster without Gateway API or Istio
                // CRDs is served. Its watch keeps retrying and picks the kind up once its CRD
                // appears. Any other failure (no permission…) keeps the feed unsynced.
                if !synced && kind_not_served(&e) {
                    synced = true;
                    if tx.send(IndexEvent::Synced(kind)).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            Ok(Event::Init) => {
                tracker.init();
                Vec::new()
            }
            Ok(Event::InitApply(o) | Event::Apply(o)) => {
                let r = object_ref(kind, &o);
                match convert(o) {
                    Ok(obj) => {
                        tracker.applied(r);
                        vec![IndexEvent::Apply(obj)]
                    }
                    Err(e) => {
                        tracing::warn!(%kind, object = %r, error = %e, "object ignored");
                        Vec::new()
                    }
                }
            }
            Ok(Event::Delete(o)) => {
                let r = object_ref(kind, &o);
                tracker.deleted(&r);
                vec![IndexEvent::Delete(r)]
            }
            Ok(Event::InitDone) => {
                let mut out: Vec<IndexEvent> =
                    tracker.done().into_iter().map(IndexEvent::Delete).collect();
                if !synced {
                    synced = true;
                    out.push(IndexEvent::Synced(kind));
                }
                out
            }
        };
        for e in events {
            if tx.send(e).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str) -> ObjectRef {
        ObjectRef::new(Kind::Pod, "default", name)
    }

    #[test]
    fn relist_deletes_what_the_new_list_lacks() {
        let mut t = RelistTracker::default();
        t.init();
        t.applied(r("a"));
        t.applied(r("b"));
        t.applied(r("c"));
        assert!(t.done().is_empty());
        t.deleted(&r("c"));
        // A 410 re-list: b was deleted during the gap, d created.
        t.init();
        t.applied(r("a"));
        t.applied(r("d"));
        assert_eq!(t.done(), vec![r("b")]);
        // Nothing pending afterwards.
        assert!(t.done().is_empty());
        t.init();
        t.applied(r("a"));
        t.applied(r("d"));
        assert!(t.done().is_empty());
    }
}
