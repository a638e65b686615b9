//! Who may ask for a certificate of another identity: istiod's node-authorization rules. A
//! caller whose service account is a trusted node account (ztunnel) may obtain a workload's
//! certificate only when its own pod exists with the uid and service account its token names,
//! and a pod running as the requested identity is scheduled on that pod's node. Anyone else may
//! only obtain its own identity. Pods are looked up in a [`PodDirectory`] (a watch-fed
//! [`PodIndex`]: O(1) per request), never by a live API call per request.

use super::pod_index::PodIndex;
use crate::auth::CallerIdentity;
use common::identity::Identity;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;
use std::sync::{Arc, RwLock};
use tonic::Status;

/// The message istiod answers failed impersonation with.
pub const IMPERSONATION_FAILURE: &str = "request impersonation authentication failure";

/// What the impersonation check needs to know about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub service_account: String,
    pub node_name: String,
}

/// Pod lookups for the impersonation check.
pub trait PodDirectory: Send + Sync + 'static {
    /// The pod `namespace/name`, if known.
    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts>;
    /// Whether some pod of `namespace` running as `service_account` is on `node`.
    fn runs_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool;
}

fn facts(pod: &Pod) -> PodFacts {
    let spec = pod.spec.as_ref();
    PodFacts {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        node_name: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
    }
}

/// A [`PodDirectory`] over a [`PodIndex`] kept by a pod watch ([`pod_reflector`]): a lookup
/// is a hash lookup, not a scan of the pods.
#[derive(Clone)]
pub struct ReflectorPods {
    index: Arc<RwLock<PodIndex>>,
    /// True once the first list completed.
    listed: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for ReflectorPods {
    fn default() -> Self {
        ReflectorPods {
            index: Arc::default(),
            listed: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

impl ReflectorPods {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, PodIndex> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, PodIndex> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the first list of pods has been applied.
    pub async fn wait_until_ready(&self) {
        let mut rx = self.listed.subscribe();
        // The sender lives as long as `self`: this cannot fail while we wait.
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Applies one pod watch event.
    pub fn handle(&self, ev: &Event<Pod>) {
        let key = |p: &Pod| {
            (
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            )
        };
        let mut index = self.write();
        match ev {
            Event::Init => index.list_start(),
            Event::InitApply(p) => {
                let (ns, name) = key(p);
                index.list_apply(&ns, &name, facts(p));
            }
            Event::InitDone => {
                index.list_done();
                self.listed.send_replace(true);
            }
            Event::Apply(p) => {
                let (ns, name) = key(p);
                index.apply(&ns, &name, facts(p));
            }
            Event::Delete(p) => {
                let (ns, name) = key(p);
                index.delete(&ns, &name);
            }
        }
    }
}

impl PodDirectory for ReflectorPods {
    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        self.read().pod(namespace, name).cloned()
    }

    fn runs_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.read().runs_on_node(node, namespace, service_account)
    }
}

/// A pod watch over all namespaces: the directory to look pods up in, and the future that keeps
/// it filled (run it on a task; it retries with backoff on API errors).
pub fn pod_reflector(
    client: kube::Client,
) -> (ReflectorPods, impl std::future::Future<Output = ()> + Send) {
    use futures_util::StreamExt;
    use kube::runtime::{watcher, WatchStreamExt};
    let pods = ReflectorPods::default();
    let api: kube::Api<Pod> = kube::Api::all(client);
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let writer = pods.clone();
    let fut = async move {
        stream
            .for_each(|ev| {
                match ev {
                    Ok(ev) => writer.handle(&ev),
                    Err(e) => tracing::warn!(error = %e, "pod watch error"),
                }
                std::future::ready(())
            })
            .await;
    };
    (pods, fut)
}

/// A trusted node account, `namespace/service-account`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAccount {
    pub namespace: String,
    pub service_account: String,
}

impl std::str::FromStr for NodeAccount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                Ok(NodeAccount {
                    namespace: ns.into(),
                    service_account: sa.into(),
                })
            }
            _ => Err(format!("{s:?}: expected <namespace>/<service-account>")),
        }
    }
}

/// Istio's default trusted node account plus ours.
pub fn default_node_accounts() -> Vec<NodeAccount> {
    ["istio-system/ztunnel", "ambient-system/ztunnel"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Decides whether `caller` may obtain a certificate for `requested` (in our `trust_domain`).
pub fn authorize(
    caller: &CallerIdentity,
    requested: &Identity,
    trust_domain: &str,
    node_accounts: &[NodeAccount],
    pods: &dyn PodDirectory,
) -> Result<(), Status> {
    if requested.trust_domain != trust_domain {
        return Err(Status::invalid_argument(format!(
            "requested identity {requested} is outside trust domain {trust_domain}"
        )));
    }
    if requested.namespace == caller.namespace
        && requested.service_account == caller.service_account
    {
        return Ok(());
    }
    match impersonation_denial(caller, requested, node_accounts, pods) {
        None => Ok(()),
        Some(why) => {
            tracing::warn!(
                caller = %format!("{}/{}", caller.namespace, caller.service_account),
                pod = ?caller.pod_name,
                requested = %requested,
                why,
                "impersonation refused"
            );
            Err(Status::unauthenticated(IMPERSONATION_FAILURE))
        }
    }
}

/// Why impersonation is refused, or `None` when allowed.
fn impersonation_denial(
    caller: &CallerIdentity,
    requested: &Identity,
    node_accounts: &[NodeAccount],
    pods: &dyn PodDirectory,
) -> Option<&'static str> {
    let trusted = node_accounts
        .iter()
        .any(|a| a.namespace == caller.namespace && a.service_account == caller.service_account);
    if !trusted {
        return Some("caller is not a trusted node account");
    }
    let (Some(name), Some(uid)) = (&caller.pod_name, &caller.pod_uid) else {
        return Some("caller token is not bound to a pod");
    };
    let Some(pod) = pods.pod(&caller.namespace, name) else {
        return Some("caller pod not found");
    };
    if &pod.uid != uid {
        return Some("caller pod uid does not match the token");
    }
    if pod.service_account != caller.service_account {
        return Some("caller pod runs as another service account");
    }
    if pod.node_name.is_empty() {
        return Some("caller pod is not scheduled");
    }
    if !pods.runs_on_node(
        &pod.node_name,
        &requested.namespace,
        &requested.service_account,
    ) {
        return Some("no pod of the requested identity on the caller's node");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, uid: &str, sa: &str, node: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name, "uid": uid},
            "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []}
        }))
        .unwrap()
    }

    fn directory(pods: Vec<Pod>) -> ReflectorPods {
        let d = ReflectorPods::default();
        d.handle(&Event::Init);
        for p in pods {
            d.handle(&Event::InitApply(p));
        }
        d.handle(&Event::InitDone);
        d
    }

    fn ztunnel_caller(uid: &str) -> CallerIdentity {
        CallerIdentity {
            namespace: "istio-system".into(),
            service_account: "ztunnel".into(),
            pod_name: Some("ztunnel-1".into()),
            pod_uid: Some(uid.into()),
            cluster_id: String::new(),
        }
    }

    #[test]
    fn node_agent_may_impersonate_only_workloads_on_its_node() {
        let pods = directory(vec![
            pod("istio-system", "ztunnel-1", "zt-uid", "ztunnel", "node-a"),
            pod("app", "web-1", "w1", "web", "node-a"),
            pod("app", "db-1", "d1", "db", "node-b"),
        ]);
        let accounts = default_node_accounts();
        let td = "cluster.local";
        let web = Identity::new(td, "app", "web");
        let db = Identity::new(td, "app", "db");
        let caller = ztunnel_caller("zt-uid");
        authorize(&caller, &web, td, &accounts, &pods).unwrap();
        let e = authorize(&caller, &db, td, &accounts, &pods).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(e.message(), IMPERSONATION_FAILURE);
        // A stale token (pod recreated with a new uid) is refused.
        let e = authorize(&ztunnel_caller("old"), &web, td, &accounts, &pods).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // Without a pod-bound token: refused.
        let mut unbound = ztunnel_caller("zt-uid");
        unbound.pod_name = None;
        assert!(authorize(&unbound, &web, td, &accounts, &pods).is_err());
        // Another trust domain is refused even for the own identity.
        let other = Identity::new("evil.org", "istio-system", "ztunnel");
        assert_eq!(
            authorize(&caller, &other, td, &accounts, &pods)
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn watch_events_move_what_the_node_agent_may_ask_for() {
        let pods = directory(vec![pod(
            "istio-system",
            "ztunnel-1",
            "zt-uid",
            "ztunnel",
            "node-a",
        )]);
        let (accounts, td) = (default_node_accounts(), "cluster.local");
        let web = Identity::new(td, "app", "web");
        let caller = ztunnel_caller("zt-uid");
        // Created unscheduled, then scheduled onto the caller's node.
        pods.handle(&Event::Apply(pod("app", "web-1", "w1", "web", "")));
        assert!(authorize(&caller, &web, td, &accounts, &pods).is_err());
        pods.handle(&Event::Apply(pod("app", "web-1", "w1", "web", "node-a")));
        authorize(&caller, &web, td, &accounts, &pods).unwrap();
        // Recreated on another node: refused again; deleted: still refused.
        pods.handle(&Event::Apply(pod("app", "web-1", "w2", "web", "node-b")));
        assert!(authorize(&caller, &web, td, &accounts, &pods).is_err());
        pods.handle(&Event::Delete(pod("app", "web-1", "w2", "web", "node-b")));
        assert!(authorize(&caller, &web, td, &accounts, &pods).is_err());
        assert!(pods.pod("app", "web-1").is_none());
    }

    #[test]
    fn non_node_callers_get_only_their_own_identity() {
        let pods = directory(vec![
            pod("app", "waypoint-1", "wp", "waypoint", "node-a"),
            pod("app", "web-1", "w1", "web", "node-a"),
        ]);
        let accounts = default_node_accounts();
        let caller = CallerIdentity {
            namespace: "app".into(),
            service_account: "waypoint".into(),
            pod_name: Some("waypoint-1".into()),
            pod_uid: Some("wp".into()),
            cluster_id: String::new(),
        };
        let td = "cluster.local";
        authorize(
            &caller,
            &Identity::new(td, "app", "waypoint"),
            td,
            &accounts,
            &pods,
        )
        .unwrap();
        let e = authorize(
            &caller,
            &Identity::new(td, "app", "web"),
            td,
            &accounts,
            &pods,
        )
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn node_accounts_parse() {
        assert_eq!(default_node_accounts().len(), 2);
        assert!("a/b".parse::<NodeAccount>().is_ok());
        for bad in ["a", "/b", "a/", "a/b/c"] {
            assert!(bad.parse::<NodeAccount>().is_err(), "{bad}");
        }
    }
}
