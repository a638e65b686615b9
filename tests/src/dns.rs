//! DNS for tests: a pod's resolv.conf ([`PodResolvConf`]), and a tiny authoritative DNS server
//! (UDP, inside a namespace) that answers `A` queries for
//! one name with an address the test can change, with a fixed TTL, and counts the queries it
//! got. Other names get NXDOMAIN, other types an empty answer.

use crate::netns::{Netns, NsTask};
use anyhow::{Context, Result};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A pod's `/etc/resolv.conf`: `ip netns exec` bind-mounts `/etc/netns/<ns>/resolv.conf` over
/// it, so resolver clients run in the namespace (`getent`, `dig`) read this file. Removed on
/// drop.
pub struct PodResolvConf {
    dir: std::path::PathBuf,
}

impl PodResolvConf {
    /// A Kubernetes pod's resolver settings: `nameserver`, the search path of namespace `ns`
    /// (`<ns>.svc.cluster.local svc.cluster.local cluster.local`) and `ndots:5`.
    pub fn kubernetes(pod: &Netns, nameserver: Ipv4Addr, ns: &str) -> Result<PodResolvConf> {
        PodResolvConf::write(
            pod,
            &format!(
                "nameserver {nameserver}\nsearch {ns}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:2\n"
            ),
        )
    }

    pub fn write(pod: &Netns, text: &str) -> Result<PodResolvConf> {
        let dir = std::path::Path::new("/etc/netns").join(pod.name());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("resolv.conf"), text)?;
        Ok(PodResolvConf { dir })
    }
}

impl Drop for PodResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running test DNS server; stops when dropped.
pub struct DnsServer {
    answer: Arc<Mutex<Ipv4Addr>>,
    queries: Arc<AtomicUsize>,
    _task: NsTask<()>,
}

impl DnsServer {
    /// Answers `name` with `ip` from now on.
    pub fn set_answer(&self, ip: Ipv4Addr) {
        *self.answer.lock().unwrap_or_else(|p| p.into_inner()) = ip;
    }

    /// `A` queries for the name answered so far.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

/// Starts the server on `addr` (UDP) in `ns`, answering `name` (`www.example.com`) with `ip`
/// and TTL `ttl` seconds.
pub fn dns_server(
    ns: &Netns,
    addr: SocketAddr,
    name: &str,
    ip: Ipv4Addr,
    ttl: u32,
) -> Result<DnsServer> {
    let fqdn = Name::from_str(&format!("{}.", name.trim_end_matches('.')))
        .with_context(|| format!("{name:?} is not a DNS name"))?;
    let answer = Arc::new(Mutex::new(ip));
    let queries = Arc::new(AtomicUsize::new(0));
    let std_socket = ns.run_blocking(move || std::net::UdpSocket::bind(addr))??;
    std_socket.set_nonblocking(true)?;
    let (a, q) = (answer.clone(), queries.clone());
    let task = ns.spawn(move || async move {
        let Ok(socket) = tokio::net::UdpSocket::from_std(std_socket) else {
            return;
        };
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Ok(request) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut response = Message::response(request.metadata.id, request.metadata.op_code);
            response.metadata.message_type = MessageType::Response;
            response.metadata.authoritative = true;
            response.metadata.recursion_desired = request.metadata.recursion_desired;
            response.add_queries(request.queries.iter().cloned());
            for query in &request.queries {
                if !query
                    .name()
                    .to_ascii()
                    .eq_ignore_ascii_case(&fqdn.to_ascii())
                {
                    response.metadata.response_code = ResponseCode::NXDomain;
                    continue;
                }
                if query.query_type() == RecordType::A {
                    q.fetch_add(1, Ordering::SeqCst);
                    let ip = *a.lock().unwrap_or_else(|p| p.into_inner());
                    response.add_answer(Record::from_rdata(
                        query.name().clone(),
                        ttl,
                        RData::A(A(ip)),
                    ));
                }
            }
            if let Ok(bytes) = response.to_vec() {
                let _ = socket.send_to(&bytes, peer).await;
            }
        }
    })?;
    Ok(DnsServer {
        answer,
        queries,
        _task: task,
    })
}
