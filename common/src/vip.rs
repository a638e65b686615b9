//! Automatic virtual IPs for `ServiceEntry` hosts that declare no `addresses`: a pure, stable
//! function of the set of `(namespace, host)` pairs, so every party that needs the address of
//! such a host (ztunnel matching a connection, a DNS proxy answering a query, the controller
//! publishing the service) computes the same one without talking to the others.
//!
//! The rule, in full:
//! - addresses come from Istio's reserved range `240.240.0.0/16`; the first and last address
//!   of the range (`.0.0`, `.255.255`) and every `x.x.x.0` / `x.x.x.255` address are never
//!   handed out (some resolvers and stacks treat them specially), leaving 65 024 slots;
//! - a pair's preferred slot is the 64-bit FNV-1a hash of `"<namespace>/<host>"` (host in
//!   ASCII lower case) modulo the number of slots;
//! - pairs are placed in sorted order (namespace, then host); a pair whose preferred slot is
//!   taken by an earlier pair takes the next free slot (wrapping).
//!
//! So a host's address depends only on the hosts sorted before it that collide with it; in the
//! common case (no collision) it depends on nothing but its own namespace and name, and adding
//! or removing other entries does not move it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;

/// The reserved range auto-allocated addresses come from (Istio's).
pub const AUTO_VIP_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(240, 240, 0, 0), 16);

/// Usable slots: third octet 0..=255, fourth octet 1..=254.
const SLOTS: u64 = 256 * 254;

fn fnv1a(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn slot_addr(slot: u64) -> Ipv4Addr {
    // slot < SLOTS, so both octets fit.
    let third = (slot / 254) as u8;
    let fourth = (slot % 254) as u8 + 1;
    Ipv4Addr::new(240, 240, third, fourth)
}

fn preferred_slot(namespace: &str, host: &str) -> u64 {
    let key = namespace
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(host.bytes().map(|b| b.to_ascii_lowercase()));
    fnv1a(key) % SLOTS
}

/// Whether `ip` lies in the auto-allocation range.
pub fn is_auto_vip(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 240 && o[1] == 240
}

/// Allocates an address to every `(namespace, host)` pair (duplicates count once). Hosts are
/// compared in ASCII lower case. More pairs than slots: the surplus (the last in sorted order)
/// get none.
pub fn allocate<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> BTreeMap<(String, String), Ipv4Addr> {
    let sorted: BTreeSet<(String, String)> = pairs
        .into_iter()
        .map(|(ns, h)| (ns.to_string(), h.to_ascii_lowercase()))
        .collect();
    let mut taken: HashSet<u64> = HashSet::with_capacity(sorted.len());
    let mut out = BTreeMap::new();
    for (ns, host) in sorted {
        if taken.len() as u64 >= SLOTS {
            break;
        }
        let mut slot = preferred_slot(&ns, &host);
        while !taken.insert(slot) {
            slot = (slot + 1) % SLOTS;
        }
        out.insert((ns, host), slot_addr(slot));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_in_range_and_avoid_reserved_octets() {
        let hosts: Vec<String> = (0..2000).map(|i| format!("h{i}.example.com")).collect();
        let got = allocate(hosts.iter().map(|h| ("default", h.as_str())));
        assert_eq!(got.len(), 2000);
        let distinct: HashSet<Ipv4Addr> = got.values().copied().collect();
        assert_eq!(distinct.len(), 2000, "every pair gets its own address");
        for ip in got.values() {
            assert!(is_auto_vip(*ip), "{ip}");
            let o = ip.octets();
            assert!(o[3] != 0 && o[3] != 255, "{ip}");
        }
    }

    #[test]
    fn stable_across_calls_and_independent_of_unrelated_entries() {
        let one = allocate([("default", "www.googleapis.com")]);
        let many = allocate([
            ("other", "db.example.com"),
            ("default", "www.googleapis.com"),
            ("default", "external-db"),
        ]);
        let key = ("default".to_string(), "www.googleapis.com".to_string());
        assert_eq!(one[&key], many[&key]);
        // A fixed value: the function must never change silently (DNS proxies and the
        // controller compute it too).
        assert_eq!(
            allocate([("default", "WWW.googleapis.com")])[&key],
            one[&key]
        );
        assert_eq!(
            one[&key],
            slot_addr(preferred_slot("default", "www.googleapis.com"))
        );
    }

    #[test]
    fn namespace_is_part_of_the_key() {
        let got = allocate([("a", "db.example.com"), ("b", "db.example.com")]);
        assert_eq!(got.len(), 2);
        let v: Vec<_> = got.values().collect();
        assert_ne!(v[0], v[1]);
    }

    #[test]
    fn collisions_resolve_in_sorted_order() {
        // Find two hosts with the same preferred slot.
        let mut seen: std::collections::HashMap<u64, String> = Default::default();
        let (first, second) = (0..200_000)
            .find_map(|i| {
                let h = format!("c{i}.test");
                let s = preferred_slot("ns", &h);
                seen.insert(s, h.clone()).map(|prev| (prev, h))
            })
            .expect("a collision exists among 200k hosts for 65k slots");
        let (lo, hi) = if first < second {
            (first, second)
        } else {
            (second, first)
        };
        let a = allocate([("ns", hi.as_str()), ("ns", lo.as_str())]);
        let b = allocate([("ns", lo.as_str()), ("ns", hi.as_str())]);
        assert_eq!(a, b, "input order does not matter");
        let slot = preferred_slot("ns", &lo);
        assert_eq!(a[&("ns".to_string(), lo.clone())], slot_addr(slot));
        assert_eq!(
            a[&("ns".to_string(), hi.clone())],
            slot_addr((slot + 1) % SLOTS),
            "the later host in sorted order probes to the next slot"
        );
    }
}
