//! The state machine of one delta ADS stream, free of I/O: it reads requests (initial,
//! ACK/NACK, subscription changes), keeps per type the subscription, the names changed since
//! the last response (a coalescing dirty set: a slow client gets the latest state and the
//! memory is bounded by the number of resources, never a queue of responses), and builds each
//! response from the [`Cache`].
//!
//! Flow control: at most one un-ACKed response per type is in flight; changes arriving
//! meanwhile coalesce in the dirty set and go out in one response after the ACK (or NACK).
//! istiod does not wait for ACKs; we do because it bounds both the memory per stream and the
//! work wasted on a client that applies slower than we publish. Types do not wait for each
//! other.
//!
//! A NACKed resource is not sent again until its content changes (it is only ever sent when
//! dirty, i.e. changed), when the client subscribes to it again, or on a new stream.

use super::cache::{node_group, Cache, CachedResource};
use super::node::NodeInfo;
use super::wire::Outgoing;
use bytes::Bytes;
use common::xds::discovery::DeltaDiscoveryRequest;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tokio::time::Instant;

/// Which names of a type a stream wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    /// Everything (empty subscribe list on the initial request, or `*`).
    Wildcard,
    /// Only these names (missing ones are answered in `removed_resources`).
    Explicit(HashSet<String>),
}

impl Subscription {
    fn wants(&self, name: &str) -> bool {
        match self {
            Subscription::Wildcard => true,
            Subscription::Explicit(s) => s.contains(name),
        }
    }
}

#[derive(Debug)]
struct TypeState {
    type_url: String,
    sub: Subscription,
    /// Names changed (or newly subscribed) since the last response of this type, with the
    /// cache sequence number of the change (`u64::MAX`: answer regardless).
    dirty: HashMap<String, u64>,
    /// Cache sequence number the stream's first (full) response reflected: changes up to it
    /// were already sent.
    seen_seq: u64,
    /// Publish time of the oldest change in `dirty` (for the push-latency metric).
    oldest_change: Option<Instant>,
    /// Consider every subscribed name, not only the dirty ones (the stream's first response).
    full: bool,
    /// The client's `initial_resource_versions`, until the first response is built.
    client_versions: HashMap<String, String>,
    /// Answer even with nothing to say (the initial request; a subscription).
    must_respond: bool,
    /// Nonce of the response awaiting ACK/NACK.
    in_flight: Option<String>,
    /// Whether a response of this type was sent on this stream.
    answered: bool,
    /// The rest of a first response sent in parts (resources, then the removed names).
    pending: Vec<Bytes>,
    pending_removed: Vec<String>,
    /// By-name subscriptions only: what the client holds, name → version.
    sent: HashMap<String, String>,
}

impl TypeState {
    fn has_work(&self) -> bool {
        self.in_flight.is_none()
            && (self.full
                || self.must_respond
                || !self.dirty.is_empty()
                || !self.pending.is_empty())
    }
}

/// Bytes of resources per response when a client accepts a first response in parts: its
/// receive buffer (and ours to encode) stays at this size instead of the whole state's.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Splits off the first part of `resources` (at least one resource, at most `budget` bytes
/// unless one resource alone is larger); returns it and leaves the rest.
fn first_part(resources: &mut Vec<Bytes>, budget: usize) -> Vec<Bytes> {
    let mut used = 0;
    let mut n = 0;
    for r in resources.iter() {
        let b = r.len();
        if n > 0 && used + b > budget {
            break;
        }
        used += b;
        n += 1;
    }
    let rest = resources.split_off(n);
    std::mem::replace(resources, rest)
}

/// What a request meant, for the driver's logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The first request for a type.
    Initial {
        /// Type URL.
        type_url: String,
    },
    /// The in-flight response was accepted.
    Ack {
        /// Type URL.
        type_url: String,
    },
    /// The in-flight response was (partly) rejected.
    Nack {
        /// Type URL.
        type_url: String,
        /// The client's `error_detail.message` (`<name>: <reason>; …`).
        message: String,
    },
    /// A nonce that is not the one in flight (ignored).
    StaleNonce {
        /// Type URL.
        type_url: String,
        /// The nonce.
        nonce: String,
    },
    /// Only a subscription change.
    Subscription {
        /// Type URL.
        type_url: String,
    },
}

/// A request that breaks the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A request without a type URL.
    #[error("a DeltaDiscoveryRequest without type_url")]
    NoTypeUrl,
}

/// A response ready to send.
#[derive(Debug)]
pub struct Built {
    /// The response.
    pub response: Outgoing,
    /// Publish time of the oldest change it carries (none for a first response).
    pub oldest_change: Option<Instant>,
    /// Whether this is the stream's first response for the type.
    pub initial: bool,
}

/// One stream's protocol state.
#[derive(Debug)]
pub struct StreamState {
    id: u64,
    node: Option<NodeInfo>,
    types: Vec<TypeState>,
    responses: u64,
    next: usize,
    /// Bytes per part of a first response, when the client accepts parts (`None`: it does
    /// not, or has not said so yet).
    chunk: Option<usize>,
    chunk_bytes: usize,
}

impl StreamState {
    /// A stream with server-unique `id` (used in nonces).
    pub fn new(id: u64) -> Self {
        StreamState {
            id,
            node: None,
            types: Vec::new(),
            responses: 0,
            next: 0,
            chunk: None,
            chunk_bytes: CHUNK_BYTES,
        }
    }

    /// Sets the part size of first responses split for clients that accept parts.
    pub fn with_chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = bytes.max(1);
        self
    }

    /// The node of the first request that carried one.
    pub fn node(&self) -> Option<&NodeInfo> {
        self.node.as_ref()
    }

    /// The subscription of `type_url`, once requested.
    pub fn subscription(&self, type_url: &str) -> Option<&Subscription> {
        self.types
            .iter()
            .find(|t| t.type_url == type_url)
            .map(|t| &t.sub)
    }

    /// Applies one request.
    pub fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<Event, ProtocolError> {
        if req.type_url.is_empty() {
            return Err(ProtocolError::NoTypeUrl);
        }
        if self.node.is_none() {
            if let Some(n) = &req.node {
                let node = NodeInfo::from_proto(n);
                if node
                    .metadata
                    .get(common::xds::CHUNKED_METADATA)
                    .is_some_and(|v| !v.is_empty())
                {
                    self.chunk = Some(self.chunk_bytes);
                }
                self.node = Some(node);
            }
        }
        let star = |v: &[String]| v.iter().any(|n| n == "*");
        let named = |v: Vec<String>| v.into_iter().filter(|n| n != "*");
        let Some(ts) = self.types.iter_mut().find(|t| t.type_url == req.type_url) else {
            // First request of this type on this stream (a stale nonce from a previous stream,
            // if any, means nothing here).
            let wildcard = (req.resource_names_subscribe.is_empty()
                || star(&req.resource_names_subscribe))
                && !star(&req.resource_names_unsubscribe);
            let sub = if wildcard {
                Subscription::Wildcard
            } else {
                // What the client already holds stays subscribed (on-demand reconnects).
                let mut names: HashSet<String> = named(req.resource_names_subscribe).collect();
                names.extend(req.initial_resource_versions.keys().cloned());
                Subscription::Explicit(names)
            };
            self.types.push(TypeState {
                type_url: req.type_url.clone(),
                sub,
                dirty: HashMap::new(),
                seen_seq: 0,
                oldest_change: None,
                full: true,
                client_versions: req.initial_resource_versions.into_iter().collect(),
                must_respond: true,
                in_flight: None,
                answered: false,
                pending: Vec::new(),
                pending_removed: Vec::new(),
                sent: HashMap::new(),
            });
            return Ok(Event::Initial {
                type_url: req.type_url,
            });
        };
        let mut event = Event::Subscription {
            type_url: req.type_url.clone(),
        };
        if !req.response_nonce.is_empty() {
            if ts.in_flight.as_deref() == Some(req.response_nonce.as_str()) {
                ts.in_flight = None;
                event = match req.error_detail {
                    Some(e) => Event::Nack {
                        type_url: req.type_url.clone(),
                        message: e.message,
                    },
                    None => Event::Ack {
                        type_url: req.type_url.clone(),
                    },
                };
            } else {
                event = Event::StaleNonce {
                    type_url: req.type_url.clone(),
                    nonce: req.response_nonce,
                };
            }
        }
        // Subscription changes (may come with an ACK).
        if star(&req.resource_names_unsubscribe) {
            ts.sub = Subscription::Explicit(HashSet::new());
        } else if star(&req.resource_names_subscribe) && ts.sub != Subscription::Wildcard {
            ts.sub = Subscription::Wildcard;
            ts.full = true;
            ts.must_respond = true;
        }
        for n in named(req.resource_names_unsubscribe) {
            if let Subscription::Explicit(s) = &mut ts.sub {
                s.remove(&n);
                ts.dirty.remove(&n);
                ts.sent.remove(&n);
            }
        }
        for n in named(req.resource_names_subscribe) {
            if let Subscription::Explicit(s) = &mut ts.sub {
                s.insert(n.clone());
            }
            // Answer a (re)subscription even when nothing changed.
            ts.dirty.insert(n, u64::MAX);
            ts.must_respond = true;
        }
        Ok(event)
    }

    /// Type URLs requested so far.
    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.iter().map(|t| t.type_url.as_str())
    }

    /// Marks names of `type_url` changed (with the cache sequence number of each change,
    /// published at `published`). Ignored for a type the stream has not requested.
    pub fn mark_dirty(
        &mut self,
        type_url: &str,
        names: impl IntoIterator<Item = (String, u64)>,
        published: Option<Instant>,
    ) {
        if let Some(ts) = self.types.iter_mut().find(|t| t.type_url == type_url) {
            for (n, seq) in names {
                let s = ts.dirty.entry(n).or_default();
                *s = (*s).max(seq);
            }
            ts.oldest_change = match (ts.oldest_change, published) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }

    /// Whether some type has a response to build now.
    pub fn has_work(&self) -> bool {
        self.types.iter().any(TypeState::has_work)
    }

    /// Builds the next response (types take turns), if any type has one to send. `None` also
    /// when the changes turned out not to concern this client.
    pub fn build(&mut self, cache: &Cache) -> Option<Built> {
        let n = self.types.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if !self.types[i].has_work() {
                continue;
            }
            self.next = (i + 1) % n;
            if let Some(b) = self.build_type(i, cache) {
                return Some(b);
            }
        }
        None
    }

    fn build_type(&mut self, i: usize, cache: &Cache) -> Option<Built> {
        let chunk = self.chunk;
        let ts = &mut self.types[i];
        let t = ts.type_url.as_str();
        let mut resources: Vec<&Arc<CachedResource>> = Vec::new();
        let mut removed = Vec::new();
        if !ts.pending.is_empty() {
            // The next part of a split first response; changes wait until it is complete.
            let part = first_part(&mut ts.pending, chunk.unwrap_or(CHUNK_BYTES));
            let last = ts.pending.is_empty();
            let removed = if last {
                std::mem::take(&mut ts.pending_removed)
            } else {
                Vec::new()
            };
            return Some(self.respond(i, part, removed, !last, None));
        }
        if matches!(ts.sub, Subscription::Explicit(_)) {
            return self.build_by_name(i, cache);
        }
        if ts.full {
            match &ts.sub {
                Subscription::Wildcard => {
                    for r in cache.all(t) {
                        if ts.client_versions.get(&r.name) != Some(&r.version) {
                            resources.push(r);
                        }
                    }
                    for name in ts.client_versions.keys() {
                        if cache.get(t, name).is_none() {
                            removed.push(name.clone());
                        }
                    }
                }
                Subscription::Explicit(names) => {
                    for name in names {
                        match cache.get(t, name) {
                            Some(r) if ts.client_versions.get(name) == Some(&r.version) => {}
                            Some(r) => resources.push(r),
                            None => removed.push(name.clone()),
                        }
                    }
                }
            }
            ts.full = false;
            ts.client_versions = HashMap::new();
            // Changes applied so far are in this response, even those still being debounced.
            ts.seen_seq = cache.seq();
            ts.dirty.retain(|_, seq| *seq > cache.seq());
        } else {
            for (name, seq) in ts.dirty.drain() {
                if !ts.sub.wants(&name) || seq <= ts.seen_seq {
                    continue;
                }
                match cache.get(t, &name) {
                    Some(r) => resources.push(r),
                    None => removed.push(name),
                }
            }
        }
        ts.dirty.shrink_to(64);
        let oldest_change = ts.oldest_change.take();
        let must = std::mem::take(&mut ts.must_respond);
        if resources.is_empty() && removed.is_empty() && !must {
            return None;
        }
        resources.sort_by(|a, b| a.name.cmp(&b.name));
        let mut resources: Vec<Bytes> = resources.into_iter().map(|r| r.encoded.clone()).collect();
        removed.sort();
        if let Some(budget) = chunk {
            let total: usize = resources.iter().map(Bytes::len).sum();
            if total > budget {
                let part = first_part(&mut resources, budget);
                ts.pending = resources;
                ts.pending_removed = removed;
                return Some(self.respond(i, part, Vec::new(), true, oldest_change));
            }
        }
        Some(self.respond(i, resources, removed, false, oldest_change))
    }

    /// A by-name subscription's response: what the client should hold is worked out again
    /// (its names, each found as a resource name or an alias, a service with its workloads,
    /// and for Address every workload of the client's own `NODE_NAME`, as istiod answers
    /// Istio ztunnel's on-demand mode) and compared with what it holds. A resource found by
    /// alias is sent under the name the client asked for (the client waits for that name); a
    /// name that exists nowhere is answered in `removed_resources` when first asked for.
    fn build_by_name(&mut self, i: usize, cache: &Cache) -> Option<Built> {
        let node_name = self
            .node
            .as_ref()
            .and_then(|n| n.metadata.get("NODE_NAME"))
            .filter(|n| !n.is_empty())
            .cloned();
        let ts = &mut self.types[i];
        let t = ts.type_url.as_str();
        let Subscription::Explicit(names) = &ts.sub else {
            return None;
        };
        let first = std::mem::replace(&mut ts.full, false);
        if first {
            ts.sent = std::mem::take(&mut ts.client_versions);
        }
        let mut want: BTreeMap<String, &Arc<CachedResource>> = BTreeMap::new();
        let mut missing = Vec::new();
        for key in names {
            match cache.get(t, key).or_else(|| cache.by_alias(t, key)) {
                Some(r) => {
                    want.insert(key.clone(), r);
                    for m in cache.members(t, &r.name) {
                        want.entry(m.name.clone()).or_insert(m);
                    }
                }
                None => missing.push(key),
            }
        }
        if let (Some(node), true) = (node_name, t == common::xds::ADDRESS_TYPE) {
            for m in cache.members(t, &node_group(&node)) {
                want.entry(m.name.clone()).or_insert(m);
            }
        }
        let mut resources = Vec::new();
        for (name, r) in &want {
            if ts.sent.get(name) != Some(&r.version) {
                resources.push(if *name == r.name {
                    r.encoded.clone()
                } else {
                    r.renamed(name)
                });
            }
        }
        let mut removed: Vec<String> = ts
            .sent
            .keys()
            .filter(|n| !want.contains_key(*n))
            .cloned()
            .collect();
        for key in missing {
            let asked_now = first || ts.dirty.get(key) == Some(&u64::MAX);
            if asked_now && !ts.sent.contains_key(key) {
                removed.push(key.clone());
            }
        }
        ts.sent = want
            .iter()
            .map(|(n, r)| (n.clone(), r.version.clone()))
            .collect();
        ts.dirty.clear();
        ts.seen_seq = cache.seq();
        let oldest_change = ts.oldest_change.take();
        let must = std::mem::take(&mut ts.must_respond);
        if resources.is_empty() && removed.is_empty() && !must {
            return None;
        }
        removed.sort();
        Some(self.respond(i, resources, removed, false, oldest_change))
    }

    fn respond(
        &mut self,
        i: usize,
        resources: Vec<Bytes>,
        removed: Vec<String>,
        partial: bool,
        oldest_change: Option<Instant>,
    ) -> Built {
        self.responses += 1;
        let nonce = format!("{:x}-{:x}", self.id, self.responses);
        let ts = &mut self.types[i];
        ts.in_flight = Some(nonce.clone());
        let initial = !std::mem::replace(&mut ts.answered, true);
        Built {
            response: Outgoing {
                system_version_info: if partial {
                    common::xds::PARTIAL_RESPONSE.to_string()
                } else {
                    String::new()
                },
                resources,
                type_url: ts.type_url.clone(),
                nonce,
                removed_resources: removed,
            },
            oldest_change,
            initial,
        }
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
