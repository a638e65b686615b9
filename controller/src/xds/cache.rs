//! The resource cache every stream reads: per type URL, `name → Arc<CachedResource>`, each
//! resource wrapped once into its `envoy.service.discovery.v3.Resource` (Any + aliases) and
//! versioned by a hash of its content, so an unchanged resource is never pushed and a
//! reconnecting client that already holds a version is not sent it again.
//!
//! For clients that subscribe by name (Istio ztunnel's on-demand mode) it also indexes each
//! resource's aliases (`<network>/<ip>`) and groups (the services a workload serves, the
//! node it runs on): [`Cache::by_alias`], [`Cache::members`].

use bytes::Bytes;
use common::xds::discovery::Resource;
use prost::Message;
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// One resource as every stream sends it.
#[derive(Debug)]
pub struct CachedResource {
    /// The xDS name (workload uid, `namespace/hostname`, `namespace/name`).
    pub name: String,
    /// Content hash (16 hex digits of SHA-256 over the message and its aliases).
    pub version: String,
    /// The encoded wire resource (`envoy.service.discovery.v3.Resource`: name, version,
    /// `Any{type_url, value}`, aliases), shared by every response that carries it.
    pub encoded: Bytes,
    /// Its aliases (`<network>/<ip>`).
    pub aliases: Vec<String>,
    /// Lookup groups this resource belongs to besides its name and aliases (see
    /// [`Change::with_groups`]).
    pub groups: Vec<String>,
}

/// A change to publish: `resource: None` removes the name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Type URL, e.g. [`common::xds::ADDRESS_TYPE`].
    pub type_url: String,
    /// xDS resource name.
    pub name: String,
    /// The encoded message (e.g. an `istio.workload.Address`) and its aliases; `None` = removed.
    pub resource: Option<(Vec<u8>, Vec<String>)>,
    /// Lookup groups (not sent): see [`Change::with_groups`].
    pub groups: Vec<String>,
}

impl Change {
    /// A new or updated resource.
    pub fn upsert(
        type_url: impl Into<String>,
        name: impl Into<String>,
        message: Vec<u8>,
        aliases: Vec<String>,
    ) -> Self {
        Change {
            type_url: type_url.into(),
            name: name.into(),
            resource: Some((message, aliases)),
            groups: Vec::new(),
        }
    }

    /// The groups a name subscription also brings this resource with: a workload is in each
    /// of its services' groups (`<namespace>/<hostname>`, the service's resource name) and in
    /// its node's ([`node_group`]), as istiod answers a subscription to a service with its
    /// workloads and gives a by-name subscriber every workload of its own node.
    pub fn with_groups(mut self, groups: Vec<String>) -> Self {
        self.groups = groups;
        self
    }

    /// A removed resource.
    pub fn remove(type_url: impl Into<String>, name: impl Into<String>) -> Self {
        Change {
            type_url: type_url.into(),
            name: name.into(),
            resource: None,
            groups: Vec::new(),
        }
    }
}

/// The group of the workloads on node `node`.
pub fn node_group(node: &str) -> String {
    format!("node:{node}")
}

/// Content version of a message with its aliases.
pub fn content_version(message: &[u8], aliases: &[String]) -> String {
    let mut h = Sha256::new();
    h.update((message.len() as u64).to_be_bytes());
    h.update(message);
    for a in aliases {
        h.update((a.len() as u64).to_be_bytes());
        h.update(a.as_bytes());
    }
    let digest = h.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl CachedResource {
    /// Wraps an encoded message once; all streams share the result.
    pub fn new(
        type_url: &str,
        name: String,
        message: Vec<u8>,
        aliases: Vec<String>,
        groups: Vec<String>,
    ) -> Self {
        let version = content_version(&message, &aliases);
        let resource = Resource {
            version: version.clone(),
            resource: Some(prost_types::Any {
                type_url: type_url.to_string(),
                value: message,
            }),
            name: name.clone(),
            aliases,
            ttl: None,
            cache_control: None,
        };
        CachedResource {
            name,
            version,
            encoded: Bytes::from(resource.encode_to_vec()),
            aliases: resource.aliases,
            groups,
        }
    }

    /// The wire resource as a message.
    pub fn resource(&self) -> Resource {
        Resource::decode(self.encoded.clone()).unwrap_or_default()
    }

    /// The wire resource sent under another name (a by-name subscriber asked for an alias).
    pub fn renamed(&self, name: &str) -> Bytes {
        let mut r = self.resource();
        r.name = name.to_string();
        Bytes::from(r.encode_to_vec())
    }
}

/// All resources of all types.
#[derive(Debug, Default)]
pub struct Cache {
    types: HashMap<String, HashMap<String, Arc<CachedResource>>>,
    /// Sequence number of the last applied change (every change gets the next one), so a
    /// stream knows whether a change is already reflected in a response it built.
    seq: u64,
    /// Per type: alias → names carrying it (host-network pods share their node's address).
    aliases: HashMap<String, HashMap<String, BTreeSet<String>>>,
    /// Per type: group → member names.
    groups: HashMap<String, HashMap<String, BTreeSet<String>>>,
}

/// The names under `key` of `type_url` in `index`.
fn names_under<'a>(
    index: &'a HashMap<String, HashMap<String, BTreeSet<String>>>,
    type_url: &str,
    key: &str,
) -> impl Iterator<Item = &'a String> + 'a {
    index
        .get(type_url)
        .and_then(|m| m.get(key))
        .into_iter()
        .flatten()
}

/// Adds (`add`) or removes `name` under each of `keys` in `index`.
fn reindex(index: &mut HashMap<String, BTreeSet<String>>, keys: &[String], name: &str, add: bool) {
    for k in keys {
        if add {
            index.entry(k.clone()).or_default().insert(name.to_string());
        } else if let Some(names) = index.get_mut(k) {
            names.remove(name);
            if names.is_empty() {
                index.remove(k);
            }
        }
    }
}

/// A prepared change: the resource already wrapped (outside any lock).
pub(crate) struct Prepared {
    type_url: String,
    name: String,
    resource: Option<Arc<CachedResource>>,
}

impl Prepared {
    pub(crate) fn new(c: Change) -> Self {
        let groups = c.groups;
        let resource = c.resource.map(|(m, a)| {
            Arc::new(CachedResource::new(
                &c.type_url,
                c.name.clone(),
                m,
                a,
                groups,
            ))
        });
        Prepared {
            type_url: c.type_url,
            name: c.name,
            resource,
        }
    }
}

impl Cache {
    /// Applies prepared changes; returns the `(type_url, name, seq)` of those whose content
    /// changed (an identical version or removing an absent name is a no-op).
    pub(crate) fn apply(&mut self, changes: Vec<Prepared>) -> Vec<(String, String, u64)> {
        let mut changed = Vec::new();
        for p in changes {
            let m = self.types.entry(p.type_url.clone()).or_default();
            let old = match &p.resource {
                Some(r) if m.get(&p.name).is_some_and(|old| old.version == r.version) => continue,
                Some(r) => m.insert(p.name.clone(), r.clone()),
                None => m.remove(&p.name),
            };
            let changed_now = old.is_some() || p.resource.is_some();
            let aliases = self.aliases.entry(p.type_url.clone()).or_default();
            let groups = self.groups.entry(p.type_url.clone()).or_default();
            if let Some(old) = &old {
                reindex(aliases, &old.aliases, &p.name, false);
                reindex(groups, &old.groups, &p.name, false);
            }
            if let Some(r) = &p.resource {
                reindex(aliases, &r.aliases, &p.name, true);
                reindex(groups, &r.groups, &p.name, true);
            }
            if changed_now {
                self.seq += 1;
                changed.push((p.type_url, p.name, self.seq));
            }
        }
        changed
    }

    /// Sequence number of the last applied change.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The resource `name` of `type_url`.
    pub fn get(&self, type_url: &str, name: &str) -> Option<&Arc<CachedResource>> {
        self.types.get(type_url)?.get(name)
    }

    /// The resource of `type_url` carrying `alias` (the first by name if several do).
    pub fn by_alias(&self, type_url: &str, alias: &str) -> Option<&Arc<CachedResource>> {
        let name = names_under(&self.aliases, type_url, alias).next()?;
        self.get(type_url, name)
    }

    /// The resources of `type_url` in `group`.
    pub fn members<'a>(
        &'a self,
        type_url: &'a str,
        group: &str,
    ) -> impl Iterator<Item = &'a Arc<CachedResource>> + 'a {
        names_under(&self.groups, type_url, group).filter_map(move |n| self.get(type_url, n))
    }

    /// Every resource of `type_url`.
    pub fn all(&self, type_url: &str) -> impl Iterator<Item = &Arc<CachedResource>> {
        self.types
            .get(type_url)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// Number of resources of `type_url`.
    pub fn len(&self, type_url: &str) -> usize {
        self.types.get(type_url).map_or(0, |m| m.len())
    }

    /// Whether the cache holds nothing at all.
    pub fn is_empty(&self) -> bool {
        self.types.values().all(|m| m.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "type.googleapis.com/test.Msg";

    fn apply(c: &mut Cache, changes: Vec<Change>) -> Vec<(String, String)> {
        c.apply(changes.into_iter().map(Prepared::new).collect())
            .into_iter()
            .map(|(t, n, _)| (t, n))
            .collect()
    }

    #[test]
    fn version_depends_on_message_and_aliases() {
        let a = content_version(b"abc", &[]);
        assert_eq!(a.len(), 16);
        assert_eq!(a, content_version(b"abc", &[]));
        assert_ne!(a, content_version(b"abd", &[]));
        assert_ne!(a, content_version(b"abc", &["/10.0.0.1".into()]));
        // Boundaries between message and aliases matter.
        assert_ne!(
            content_version(b"ab", &["c".into()]),
            content_version(b"a", &["bc".into()])
        );
    }

    #[test]
    fn unchanged_content_and_absent_removals_are_no_ops() {
        let mut c = Cache::default();
        let ch = apply(&mut c, vec![Change::upsert(T, "a", b"1".to_vec(), vec![])]);
        assert_eq!(ch, vec![(T.to_string(), "a".to_string())]);
        assert!(apply(&mut c, vec![Change::upsert(T, "a", b"1".to_vec(), vec![])]).is_empty());
        assert!(apply(&mut c, vec![Change::remove(T, "zzz")]).is_empty());
        assert_eq!(
            apply(&mut c, vec![Change::upsert(T, "a", b"2".to_vec(), vec![])]).len(),
            1
        );
        let r = c.get(T, "a").expect("present");
        let res = r.resource();
        assert_eq!(res.name, "a");
        assert_eq!(res.version, r.version);
        let any = res.resource.as_ref().expect("any");
        assert_eq!(
            (any.type_url.as_str(), any.value.as_slice()),
            (T, &b"2"[..])
        );
        assert_eq!(apply(&mut c, vec![Change::remove(T, "a")]).len(), 1);
        assert_eq!(c.len(T), 0);
        assert!(c.is_empty());
        assert_eq!(c.seq(), 3, "three real changes");
    }
}
