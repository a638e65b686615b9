//! Choosing where a request goes once a route matched: the weighted destination (from a random
//! draw), the subset's endpoints (label filter), and the endpoint under the DestinationRule's
//! load-balancing policy through a small [`Picker`] trait: round robin, random, least request
//! (Envoy's power of two choices over per-endpoint active request counts) and consistent hash.
//!
//! Consistent hashing uses rendezvous (highest random weight) hashing over a stable FNV-1a hash
//! of the key and of each endpoint's key: no ring to rebuild per snapshot, the same key always
//! picks the same endpoint while the endpoint set is unchanged, and removing an endpoint only
//! moves the keys that were on it.

use super::destination_rule::{HashKey, LbPolicy};
use super::matching::{header_value, parse_query, RequestInfo};
use super::rewrite::split_path;
use super::route::WeightedDestination;
use crate::snapshot::{selector_matches, Endpoint};
use http::header::COOKIE;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Picks a destination by weight: `random` (uniform `u64`) modulo the total weight. Zero-weight
/// destinations are never picked; a lone destination always is.
pub fn pick_weighted(dests: &[WeightedDestination], random: u64) -> Option<&WeightedDestination> {
    if dests.len() == 1 {
        return dests.first();
    }
    let total: u64 = dests.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = random % total;
    for d in dests {
        let w = u64::from(d.weight);
        if point < w {
            return Some(d);
        }
        point -= w;
    }
    None
}

/// The slot that draw `draw` (a round-robin counter or a random number) falls in among
/// endpoints weighted `weights` (each at least 1): over any `sum(weights)` consecutive draws
/// every endpoint gets exactly its weight. All weights 1: `draw % n`.
pub fn weighted_slot(weights: &[u32], draw: u64) -> Option<usize> {
    let total: u64 = weights.iter().map(|w| u64::from((*w).max(1))).sum();
    if total == 0 {
        return None;
    }
    let mut point = draw % total;
    for (i, w) in weights.iter().enumerate() {
        let w = u64::from((*w).max(1));
        if point < w {
            return Some(i);
        }
        point -= w;
    }
    None
}

/// The sum of endpoint weights (each at least 1).
pub fn total_weight(weights: &[u32]) -> u64 {
    weights.iter().map(|w| u64::from((*w).max(1))).sum()
}

/// The endpoints whose workload carries every label of the subset (all of them without a
/// subset).
pub fn subset_endpoints<'e>(
    endpoints: &'e [Endpoint],
    labels: Option<&BTreeMap<String, String>>,
) -> Vec<&'e Endpoint> {
    match labels {
        None => endpoints.iter().collect(),
        Some(l) => endpoints
            .iter()
            .filter(|e| selector_matches(l, &e.workload.labels))
            .collect(),
    }
}

/// One endpoint as a picker sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// A stable identity of the endpoint, e.g. `"10.0.0.5:8080"` (consistent hashing uses it).
    pub key: &'a str,
    /// Requests in flight to this endpoint (least request uses it).
    pub active_requests: u32,
    /// Relative weight (the endpoint workload's [`crate::model::Workload::weight`], ≥ 1):
    /// round robin, random and least request draw endpoints in proportion to it.
    pub weight: u32,
}

fn weights(candidates: &[Candidate]) -> Vec<u32> {
    candidates.iter().map(|c| c.weight).collect()
}

/// Per-request input to a picker.
#[derive(Debug, Clone, Copy, Default)]
pub struct PickInput {
    /// A uniformly distributed random number.
    pub random: u64,
    /// The request's hash (see [`request_hash`]); consistent hash falls back to random without.
    pub hash: Option<u64>,
}

/// Picks one of `candidates` (returns its index); `None` only when there are none.
pub trait Picker: Send + Sync {
    fn pick(&self, candidates: &[Candidate], input: &PickInput) -> Option<usize>;
}

/// Round robin (weighted): a shared counter, so concurrent requests spread evenly.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Picker for RoundRobin {
    fn pick(&self, candidates: &[Candidate], _: &PickInput) -> Option<usize> {
        let draw = self.next.fetch_add(1, Ordering::Relaxed) as u64;
        weighted_slot(&weights(candidates), draw)
    }
}

/// Random, in proportion to the weights.
#[derive(Debug, Default)]
pub struct Random;

impl Picker for Random {
    fn pick(&self, candidates: &[Candidate], input: &PickInput) -> Option<usize> {
        weighted_slot(&weights(candidates), input.random)
    }
}

/// Least request, power of two choices: two distinct endpoints drawn at random in proportion
/// to their weights, the one with fewer active requests per unit of weight wins (the first on
/// a tie).
#[derive(Debug, Default)]
pub struct LeastRequest;

impl Picker for LeastRequest {
    fn pick(&self, candidates: &[Candidate], input: &PickInput) -> Option<usize> {
        let n = candidates.len() as u64;
        match n {
            0 => None,
            1 => Some(0),
            _ => {
                let w = weights(candidates);
                let a = weighted_slot(&w, input.random)?;
                // The second draw among the others, by weight.
                let others: Vec<usize> = (0..w.len()).filter(|i| *i != a).collect();
                let other_weights: Vec<u32> = others.iter().map(|i| w[*i]).collect();
                let b = others[weighted_slot(&other_weights, input.random >> 32)?];
                let (ca, cb) = (&candidates[a], &candidates[b]);
                let load = |c: &Candidate, other: &Candidate| {
                    u64::from(c.active_requests) * u64::from(other.weight.max(1))
                };
                Some(if load(cb, ca) < load(ca, cb) { b } else { a })
            }
        }
    }
}

/// Consistent hash by rendezvous hashing; random when the request has no hash.
#[derive(Debug, Default)]
pub struct ConsistentHash;

impl Picker for ConsistentHash {
    fn pick(&self, candidates: &[Candidate], input: &PickInput) -> Option<usize> {
        let Some(hash) = input.hash else {
            return Random.pick(candidates, input);
        };
        candidates
            .iter()
            .enumerate()
            .max_by_key(|(_, c)| (mix(hash ^ fnv1a64(c.key.as_bytes())), c.key))
            .map(|(i, _)| i)
    }
}

/// The picker for a policy; `None` for `PASSTHROUGH` (connect to the address the client asked
/// for).
pub fn picker_for(policy: &LbPolicy) -> Option<Box<dyn Picker>> {
    match policy {
        LbPolicy::RoundRobin => Some(Box::<RoundRobin>::default()),
        LbPolicy::LeastRequest => Some(Box::new(LeastRequest)),
        LbPolicy::Random => Some(Box::new(Random)),
        LbPolicy::ConsistentHash(_) => Some(Box::new(ConsistentHash)),
        LbPolicy::Passthrough => None,
    }
}

/// 64-bit FNV-1a: stable across processes and releases (unlike `DefaultHasher`).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64 finaliser: spreads FNV's weak low bits.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie_value<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// A cookie the waypoint mints for a request without the consistent-hash cookie, as Envoy
/// does when the policy has a `ttl`: the request is hashed on the new value and the response
/// carries `Set-Cookie`, so the client's next requests stick to the same endpoint.
#[derive(Debug, Clone)]
pub struct MintedCookie {
    pub hash: u64,
    pub set_cookie: http::HeaderValue,
}

/// Mints the cookie of `key` from `seed` (any per-request random number): `None` unless `key`
/// is a cookie key with a `ttl`. A zero `ttl` gives a session cookie (no `Max-Age`).
pub fn mint_cookie(key: &HashKey, seed: u64) -> Option<MintedCookie> {
    let HashKey::Cookie {
        name,
        path,
        ttl: Some(ttl),
    } = key
    else {
        return None;
    };
    let value = format!("{:016x}", mix(seed));
    let mut cookie = format!("{name}=\"{value}\"");
    if !ttl.is_zero() {
        cookie.push_str(&format!("; Max-Age={}", ttl.0.as_secs().max(1)));
    }
    if let Some(p) = path {
        cookie.push_str(&format!("; Path={p}"));
    }
    cookie.push_str("; HttpOnly");
    Some(MintedCookie {
        hash: fnv1a64(value.as_bytes()),
        set_cookie: http::HeaderValue::from_str(&cookie).ok()?,
    })
}

/// The hash of a request under a consistent-hash key; `None` when the request lacks the key
/// (header, cookie, query parameter absent; source IP unknown). With a cookie key and a `ttl`,
/// the waypoint then mints the cookie ([`mint_cookie`]).
pub fn request_hash(key: &HashKey, req: &RequestInfo) -> Option<u64> {
    match key {
        HashKey::Header(name) => {
            let name = http::HeaderName::from_bytes(name.as_bytes()).ok()?;
            header_value(req.headers, &name).map(|v| fnv1a64(v.as_bytes()))
        }
        HashKey::Cookie { name, .. } => {
            cookie_value(req.headers, name).map(|v| fnv1a64(v.as_bytes()))
        }
        HashKey::SourceIp => req
            .source_ip
            .map(|ip| fnv1a64(ip.to_canonical().to_string().as_bytes())),
        HashKey::QueryParameter(name) => {
            let query = split_path(req.path).1.strip_prefix('?').unwrap_or("");
            parse_query(query)
                .into_iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| fnv1a64(v.as_bytes()))
        }
    }
}

#[cfg(test)]
#[path = "select_tests.rs"]
mod tests;
