//! The pods the impersonation check reads, indexed for it: pod `(namespace, name)` → its facts
//! (uid, service account, node), and `(node, namespace, service account)` → how many pods run
//! so, maintained on every pod event (a move, a delete, a pod scheduled after creation). A CSR
//! is then two hash lookups, not a scan of every pod. A (re-)list (`Init` … `InitDone`) is
//! collected aside and replaces the state when complete, as kube-runtime's reflector store does.

use super::impersonation::PodFacts;
use std::collections::HashMap;

type PodKey = (String, String);
/// `(node, namespace, service account)`.
type NodeKey = (String, String, String);

/// Pods by name and by (node, namespace, service account). Sans-IO.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: HashMap<PodKey, PodFacts>,
    on_node: HashMap<NodeKey, usize>,
    /// Pods of a list in progress.
    listing: Option<HashMap<PodKey, PodFacts>>,
}

fn node_key(namespace: &str, f: &PodFacts) -> Option<NodeKey> {
    (!f.node_name.is_empty()).then(|| {
        (
            f.node_name.clone(),
            namespace.to_string(),
            f.service_account.clone(),
        )
    })
}

impl PodIndex {
    /// A pod was created or changed (outside a list).
    pub fn apply(&mut self, namespace: &str, name: &str, facts: PodFacts) {
        let key = (namespace.to_string(), name.to_string());
        if self.pods.get(&key) == Some(&facts) {
            return;
        }
        self.count(namespace, &facts, true);
        if let Some(old) = self.pods.insert(key, facts) {
            self.count(namespace, &old, false);
        }
    }

    /// A pod was deleted.
    pub fn delete(&mut self, namespace: &str, name: &str) {
        if let Some(old) = self.pods.remove(&(namespace.to_string(), name.to_string())) {
            self.count(namespace, &old, false);
        }
    }

    /// A (re-)list starts; the current state stays readable until [`PodIndex::list_done`].
    pub fn list_start(&mut self) {
        self.listing = Some(HashMap::new());
    }

    /// A pod of the list in progress.
    pub fn list_apply(&mut self, namespace: &str, name: &str, facts: PodFacts) {
        match self.listing.as_mut() {
            Some(l) => {
                l.insert((namespace.to_string(), name.to_string()), facts);
            }
            None => self.apply(namespace, name, facts),
        }
    }

    /// The list is complete: it replaces the state (pods it lacks are gone).
    pub fn list_done(&mut self) {
        let Some(pods) = self.listing.take() else {
            return;
        };
        self.on_node.clear();
        for ((ns, _), f) in &pods {
            if let Some(k) = node_key(ns, f) {
                *self.on_node.entry(k).or_default() += 1;
            }
        }
        self.pods = pods;
    }

    fn count(&mut self, namespace: &str, f: &PodFacts, add: bool) {
        let Some(k) = node_key(namespace, f) else {
            return;
        };
        if add {
            *self.on_node.entry(k).or_default() += 1;
        } else if let Some(n) = self.on_node.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.on_node.remove(&k);
            }
        }
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodFacts> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    /// Whether some pod of `namespace` running as `service_account` is scheduled on `node`.
    pub fn runs_on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        !node.is_empty()
            && self.on_node.contains_key(&(
                node.to_string(),
                namespace.to_string(),
                service_account.to_string(),
            ))
    }

    /// Pods known.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(uid: &str, sa: &str, node: &str) -> PodFacts {
        PodFacts {
            uid: uid.into(),
            service_account: sa.into(),
            node_name: node.into(),
        }
    }

    #[test]
    fn index_follows_scheduling_moves_and_deletes() {
        let mut i = PodIndex::default();
        // Created unscheduled: known by name, on no node.
        i.apply("app", "web-1", f("w1", "web", ""));
        assert_eq!(i.pod("app", "web-1").map(|p| p.uid.as_str()), Some("w1"));
        assert!(!i.runs_on_node("", "app", "web"));
        assert!(!i.runs_on_node("node-a", "app", "web"));
        // Scheduled later.
        i.apply("app", "web-1", f("w1", "web", "node-a"));
        assert!(i.runs_on_node("node-a", "app", "web"));
        // A second pod of the identity on the same node; the first one is deleted.
        i.apply("app", "web-2", f("w2", "web", "node-a"));
        i.delete("app", "web-1");
        assert!(i.runs_on_node("node-a", "app", "web"));
        // The second one is recreated on another node (same name, new uid).
        i.apply("app", "web-2", f("w3", "web", "node-b"));
        assert!(!i.runs_on_node("node-a", "app", "web"));
        assert!(i.runs_on_node("node-b", "app", "web"));
        // Service account changed: the old identity leaves the node.
        i.apply("app", "web-2", f("w3", "web-v2", "node-b"));
        assert!(!i.runs_on_node("node-b", "app", "web"));
        assert!(i.runs_on_node("node-b", "app", "web-v2"));
        // Other namespace, same account name: distinct.
        assert!(!i.runs_on_node("node-b", "other", "web-v2"));
        i.delete("app", "web-2");
        assert!(i.is_empty());
        assert!(i.on_node.is_empty(), "no stale counts: {:?}", i.on_node);
        // Deleting an unknown pod is harmless.
        i.delete("app", "nope");
    }

    #[test]
    fn a_relist_replaces_the_state_when_done() {
        let mut i = PodIndex::default();
        i.apply("app", "web-1", f("w1", "web", "node-a"));
        i.apply("app", "db-1", f("d1", "db", "node-a"));
        i.list_start();
        i.list_apply("app", "db-1", f("d1", "db", "node-b"));
        i.list_apply("app", "new-1", f("n1", "new", "node-a"));
        // Until the list completes, the old state answers.
        assert!(i.runs_on_node("node-a", "app", "web"));
        assert!(!i.runs_on_node("node-a", "app", "new"));
        i.list_done();
        assert!(
            !i.runs_on_node("node-a", "app", "web"),
            "deleted in the gap"
        );
        assert!(i.pod("app", "web-1").is_none());
        assert!(i.runs_on_node("node-b", "app", "db"));
        assert!(!i.runs_on_node("node-a", "app", "db"));
        assert!(i.runs_on_node("node-a", "app", "new"));
        assert_eq!(i.len(), 2);
        // Events after the list keep counting.
        i.delete("app", "new-1");
        assert!(!i.runs_on_node("node-a", "app", "new"));
    }
}
