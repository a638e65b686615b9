//! What the DNS proxy answers itself, decided from the configuration snapshot alone (no I/O):
//! `A`/`AAAA` queries for names the mesh knows — Kubernetes services by every name a pod's
//! search path produces (`name` in the pod's namespace, `name.ns`, `name.ns.svc`, the FQDN),
//! ServiceEntry hosts (exact, then the most specific wildcard host) with their addresses or the
//! automatic VIP, and headless services with their endpoints' addresses. Everything else,
//! other record types and opcodes included, is forwarded; a query that cannot be parsed gets
//! FORMERR (or nothing if even its header is unreadable, or if it is a response).

use common::model::{Service, Workload};
use common::service_entries::visible_from;
use common::snapshot::{parse_network_address, Snapshot};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use std::net::IpAddr;

/// TTL of the answers the proxy gives (Istio's DNS proxy uses 30 s too). VIPs are stable, so a
/// cached answer keeps working after a configuration change that keeps the service.
pub const TTL: u32 = 30;
/// The UDP payload size the proxy advertises in its own EDNS answers.
pub const EDNS_PAYLOAD: u16 = 1232;
/// Plain DNS over UDP (no EDNS).
pub const UDP_LIMIT: usize = 512;

/// What to do with a parsed query.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The proxy answers (a name of the mesh).
    Answer(Message),
    /// Not ours: the node's upstream resolvers answer.
    Forward,
}

/// A datagram that is not a usable query.
#[derive(Debug, Clone, PartialEq)]
pub enum Malformed {
    /// Answer FORMERR with this message (the header was readable).
    FormErr(Box<Message>),
    /// Drop silently: shorter than a header, or a response (never answer a response: loops).
    Drop,
}

/// Parses a query; see [`Malformed`] for what happens to the rest.
pub fn parse_query(bytes: &[u8]) -> Result<Message, Malformed> {
    if bytes.len() < 12 {
        return Err(Malformed::Drop);
    }
    if bytes[2] & 0x80 != 0 {
        return Err(Malformed::Drop);
    }
    match Message::from_vec(bytes) {
        Ok(m) if m.metadata.message_type == MessageType::Query => Ok(m),
        Ok(_) => Err(Malformed::Drop),
        Err(_) => {
            let id = u16::from_be_bytes([bytes[0], bytes[1]]);
            let op_code = OpCode::from_u8((bytes[2] >> 3) & 0x0f);
            let mut m = Message::error_msg(id, op_code, ResponseCode::FormErr);
            m.metadata.recursion_desired = bytes[2] & 0x01 != 0;
            m.metadata.recursion_available = true;
            Err(Malformed::FormErr(Box::new(m)))
        }
    }
}

/// A short label for metrics: the query type of a one-question query.
pub fn kind(m: &Message) -> &'static str {
    match m.queries.first().map(Query::query_type) {
        Some(RecordType::A) => "a",
        Some(RecordType::AAAA) => "aaaa",
        Some(RecordType::SRV) => "srv",
        Some(RecordType::TXT) => "txt",
        Some(RecordType::PTR) => "ptr",
        Some(RecordType::CNAME) => "cname",
        Some(RecordType::MX) => "mx",
        Some(RecordType::ANY) => "any",
        _ => "other",
    }
}

/// Decides `request` for a pod (`client`, if the snapshot knows the querying address).
/// `cluster_domain` is e.g. `cluster.local`.
pub fn decide(
    snap: &Snapshot,
    cluster_domain: &str,
    client: Option<&Workload>,
    request: &Message,
) -> Decision {
    if request.metadata.op_code != OpCode::Query || request.queries.len() != 1 {
        return Decision::Forward;
    }
    let query = &request.queries[0];
    let qtype = query.query_type();
    if query.query_class() != DNSClass::IN || !matches!(qtype, RecordType::A | RecordType::AAAA) {
        return Decision::Forward;
    }
    let name = query.name().to_ascii().to_ascii_lowercase();
    let name = name.trim_end_matches('.');
    let Some(addrs) = lookup(
        snap,
        cluster_domain,
        client.map(|w| w.namespace.as_str()),
        name,
    ) else {
        return Decision::Forward;
    };
    let mut m = Message::response(request.metadata.id, request.metadata.op_code);
    m.metadata.authoritative = true;
    m.metadata.recursion_desired = request.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.checking_disabled = request.metadata.checking_disabled;
    m.add_query(query.clone());
    for ip in addrs {
        let rdata = match (qtype, ip) {
            (RecordType::A, IpAddr::V4(v4)) => RData::A(A(v4)),
            (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
            // A known name without an address of the asked family: NOERROR, no records
            // (forwarding would get NXDOMAIN, which fails the whole lookup in some resolvers).
            _ => continue,
        };
        m.add_answer(Record::from_rdata(query.name().clone(), TTL, rdata));
    }
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(edns);
    }
    Decision::Answer(m)
}

/// The mesh's addresses for `name` (lower case, no trailing dot) as asked by a pod of
/// namespace `ns`: `None` when the mesh does not know the name (forward it).
pub fn lookup(
    snap: &Snapshot,
    cluster_domain: &str,
    ns: Option<&str>,
    name: &str,
) -> Option<Vec<IpAddr>> {
    let visible = |s: &&std::sync::Arc<Service>| visible_from(s, ns.unwrap_or(""));
    for candidate in candidates(name, ns, cluster_domain) {
        let services: Vec<_> = snap
            .services_for_host(&candidate)
            .iter()
            .filter(visible)
            .collect();
        let addrs = addresses(snap, &services);
        if !addrs.is_empty() {
            return Some(addrs);
        }
    }
    // Wildcard ServiceEntry hosts, most specific first: `*.b.example.com` before
    // `*.example.com` for `a.b.example.com`.
    let labels: Vec<&str> = name.split('.').collect();
    for i in 1..labels.len() {
        let wildcard = format!("*.{}", labels[i..].join("."));
        let services: Vec<_> = snap
            .services_for_host(&wildcard)
            .iter()
            .filter(visible)
            .collect();
        let addrs = addresses(snap, &services);
        if !addrs.is_empty() {
            return Some(addrs);
        }
    }
    None
}

/// The names `name` may stand for, in order: itself, then its Kubernetes expansion (`name` →
/// `name.<pod ns>.svc.<domain>`, `name.ns` → `name.ns.svc.<domain>`, `name.ns.svc` →
/// `name.ns.svc.<domain>`). Resolvers usually expand with the search path themselves; this
/// covers `ndots` settings and clients that ask the short name first.
fn candidates(name: &str, ns: Option<&str>, domain: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    let labels: Vec<&str> = name.split('.').collect();
    match (labels.as_slice(), ns) {
        ([_], Some(ns)) => out.push(format!("{name}.{ns}.svc.{domain}")),
        ([_, _], _) => out.push(format!("{name}.svc.{domain}")),
        ([_, _, "svc"], _) => out.push(format!("{name}.{domain}")),
        _ => {}
    }
    out
}

/// VIPs of `services`; a headless service (no VIP) stands for its endpoints' addresses.
fn addresses(snap: &Snapshot, services: &[&std::sync::Arc<Service>]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    let mut push = |ip: IpAddr| {
        if !out.contains(&ip) {
            out.push(ip);
        }
    };
    for s in services {
        if !s.vips.is_empty() {
            for vip in &s.vips {
                if let Ok((_, ip)) = parse_network_address(vip) {
                    push(ip);
                }
            }
            continue;
        }
        for &port in s.ports.keys() {
            for ep in snap.endpoints(s, port) {
                for ip in &ep.workload.workload_ips {
                    push(*ip);
                }
            }
        }
    }
    out
}

/// The size a UDP answer may have for `request` (EDNS payload, at least 512).
pub fn udp_limit(request: &Message) -> usize {
    request
        .edns
        .as_ref()
        .map_or(UDP_LIMIT, |e| usize::from(e.max_payload()).max(UDP_LIMIT))
}

/// Encodes `m`; over `limit` bytes the answer is cut to its header and question with TC set
/// (the client retries over TCP). `None` only if even that cannot be encoded.
pub fn encode(m: &Message, limit: usize) -> Option<Vec<u8>> {
    match m.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Some(bytes),
        _ => m.truncate().to_vec().ok(),
    }
}

/// A SERVFAIL answer to `request` (upstream failed or the proxy is overloaded).
pub fn servfail(request: &Message) -> Message {
    let mut m = Message::error_msg(
        request.metadata.id,
        request.metadata.op_code,
        ResponseCode::ServFail,
    );
    m.metadata.recursion_desired = request.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_queries(request.queries.iter().cloned());
    m
}

#[cfg(test)]
#[path = "answer_tests.rs"]
mod tests;
