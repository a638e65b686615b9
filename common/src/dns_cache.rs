//! Name resolution for DNS-resolved ServiceEntries, used by ztunnel (connections it sends
//! straight to the entry) and the waypoint (entries bound to it): one cache per process shared
//! by every shard, filled with the host's resolver (`/etc/resolv.conf`, or the file
//! `--resolv-conf` names).
//!
//! - A connection uses a cached answer while it is fresh and never waits for DNS then; only a
//!   name with no fresh answer is looked up on the connection path.
//! - A background task ([`DnsCache::run_refresher`]) re-resolves every name in use before its
//!   answer expires (at 90 % of the TTL, at least 1 s after it was fetched), so busy names
//!   stay fresh; names unused for [`IDLE`] are forgotten.
//! - A failed refresh keeps the last good answer until it expires (retrying every second).
//! - Lookups run on the runtime the cache was created on (the main thread's), whichever shard
//!   asked: the resolver's sockets belong to one reactor.

use crate::l7::service_entry::Resolution;
use crate::model::Service;
use crate::service_entries::DnsTarget;
use hickory_resolver::config::ResolverOpts;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A name not used by any connection for this long is dropped from the cache.
pub const IDLE: Duration = Duration::from_secs(300);
/// Shortest time an answer is kept (a TTL of 0 would otherwise mean a lookup per connection).
const MIN_TTL: Duration = Duration::from_secs(1);
/// Retry interval after a failed refresh.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("no resolver: {0}")]
    NoResolver(String),
    #[error("resolving {host}: {message}")]
    Lookup { host: String, message: String },
}

#[derive(Debug, Clone)]
struct Entry {
    addrs: Arc<[IpAddr]>,
    /// The answer may be used until then.
    expires: Instant,
    /// The refresher looks the name up again from then on.
    refresh_at: Instant,
    last_used: Instant,
}

/// The nameservers (address and port) `resolv_conf` names, in order, for the DNS proxy's
/// forwarding; parsed as [`DnsCache::from_resolv_conf`] parses it.
pub fn nameservers(resolv_conf: &Path) -> Result<Vec<std::net::SocketAddr>, String> {
    let text = std::fs::read(resolv_conf)
        .map_err(|e| format!("reading {}: {e}", resolv_conf.display()))?;
    let (config, _) = hickory_resolver::system_conf::parse_resolv_conf(text)
        .map_err(|e| format!("{}: {e}", resolv_conf.display()))?;
    let mut out: Vec<std::net::SocketAddr> = Vec::new();
    for ns in config.name_servers() {
        let port = ns.connections.first().map_or(53, |c| c.port);
        let addr = std::net::SocketAddr::new(ns.ip, port);
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    Ok(out)
}

/// One address a DNS-resolved ServiceEntry's name resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved<'s> {
    /// The address with the target port of the service port asked for.
    pub addr: SocketAddr,
    /// The name it came from.
    pub target: &'s DnsTarget,
}

/// The addresses a connection to port `port` of the DNS-resolved ServiceEntry service `svc`
/// may go to: the entry's names in order (DNS: the addresses of every name that resolves;
/// DNS_ROUND_ROBIN: those of the first name that resolves), each with its target port.
pub async fn entry_addresses<'s>(
    cache: &Arc<DnsCache>,
    svc: &'s Service,
    port: u16,
) -> Result<Vec<Resolved<'s>>, String> {
    let Some(info) = &svc.service_entry else {
        return Err(format!("service {} is not a ServiceEntry", svc.hostname));
    };
    let mut candidates = Vec::new();
    let mut errors = Vec::new();
    for target in &info.dns {
        match cache.resolve(&target.hostname).await {
            Ok(addrs) => {
                let p = target.target_port(port);
                candidates.extend(addrs.iter().map(|ip| Resolved {
                    addr: SocketAddr::new(*ip, p),
                    target,
                }));
                if info.resolution == Resolution::DnsRoundRobin {
                    break;
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if candidates.is_empty() {
        return Err(if errors.is_empty() {
            format!("service {} has no name to resolve", svc.hostname)
        } else {
            errors.join("; ")
        });
    }
    Ok(candidates)
}

pub struct DnsCache {
    resolver: Result<TokioResolver, String>,
    runtime: tokio::runtime::Handle,
    entries: Mutex<HashMap<String, Entry>>,
    wake: tokio::sync::Notify,
}

impl DnsCache {
    /// A cache resolving with the nameservers of `resolv_conf` (a resolv.conf file). A file
    /// that cannot be read leaves the cache without a resolver: every lookup fails, nothing
    /// else does. Must be called inside the runtime lookups should run on.
    pub fn from_resolv_conf(resolv_conf: &Path) -> DnsCache {
        let resolver = std::fs::read(resolv_conf)
            .map_err(|e| format!("reading {}: {e}", resolv_conf.display()))
            .and_then(|text| {
                hickory_resolver::system_conf::parse_resolv_conf(text)
                    .map_err(|e| format!("{}: {e}", resolv_conf.display()))
            })
            .and_then(|(config, mut opts): (_, ResolverOpts)| {
                // Our cache decides when to ask again; the resolver's would answer a refresh
                // with the answer being refreshed.
                opts.cache_size = 0;
                TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
                    .with_options(opts)
                    .build()
                    .map_err(|e| format!("{}: {e}", resolv_conf.display()))
            });
        if let Err(e) = &resolver {
            tracing::warn!(error = %e, "no DNS resolver: DNS-resolved ServiceEntries will refuse connections");
        }
        DnsCache {
            resolver,
            runtime: tokio::runtime::Handle::current(),
            entries: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fresh cached answer for `host`, if any (marks it used).
    pub fn cached(&self, host: &str) -> Option<Arc<[IpAddr]>> {
        let now = Instant::now();
        let mut entries = self.entries();
        let e = entries.get_mut(host).filter(|e| e.expires > now)?;
        e.last_used = now;
        Some(e.addrs.clone())
    }

    /// The addresses of `host`: the fresh cached answer, else a lookup (on the cache's
    /// runtime).
    pub async fn resolve(self: &Arc<Self>, host: &str) -> Result<Arc<[IpAddr]>, DnsError> {
        if let Some(addrs) = self.cached(host) {
            return Ok(addrs);
        }
        let this = self.clone();
        let name = host.to_string();
        let looked_up = self
            .runtime
            .spawn(async move { this.refresh(&name).await })
            .await
            .map_err(|e| DnsError::Lookup {
                host: host.to_string(),
                message: e.to_string(),
            })?;
        self.wake.notify_one();
        looked_up
    }

    /// Looks `host` up now and stores the answer. On failure the previous answer stays
    /// (until it expires) and is returned if still valid.
    async fn refresh(&self, host: &str) -> Result<Arc<[IpAddr]>, DnsError> {
        let resolver = self
            .resolver
            .as_ref()
            .map_err(|e| DnsError::NoResolver(e.clone()))?;
        let result = resolver.lookup_ip(host).await;
        let now = Instant::now();
        let mut entries = self.entries();
        match result {
            Ok(lookup) => {
                let addrs: Arc<[IpAddr]> = lookup.iter().collect::<Vec<_>>().into();
                if addrs.is_empty() {
                    return self.keep_or_fail(&mut entries, host, now, "no addresses".into());
                }
                let ttl = lookup
                    .valid_until()
                    .checked_duration_since(std::time::Instant::now())
                    .unwrap_or_default()
                    .max(MIN_TTL);
                let last_used = entries.get(host).map_or(now, |e| e.last_used);
                tracing::debug!(host, ?addrs, ttl_ms = ttl.as_millis() as u64, "resolved");
                entries.insert(
                    host.to_string(),
                    Entry {
                        addrs: addrs.clone(),
                        expires: now + ttl,
                        refresh_at: now + (ttl * 9 / 10).max(MIN_TTL),
                        last_used,
                    },
                );
                Ok(addrs)
            }
            Err(e) => self.keep_or_fail(&mut entries, host, now, e.to_string()),
        }
    }

    fn keep_or_fail(
        &self,
        entries: &mut HashMap<String, Entry>,
        host: &str,
        now: Instant,
        message: String,
    ) -> Result<Arc<[IpAddr]>, DnsError> {
        tracing::warn!(host, error = %message, "DNS lookup failed");
        match entries.get_mut(host).filter(|e| e.expires > now) {
            Some(e) => {
                e.refresh_at = (now + RETRY).min(e.expires);
                Ok(e.addrs.clone())
            }
            None => {
                entries.remove(host);
                Err(DnsError::Lookup {
                    host: host.to_string(),
                    message,
                })
            }
        }
    }

    /// Keeps the cached names fresh, forever: refreshes each when due, forgets idle ones.
    pub async fn run_refresher(self: Arc<Self>) {
        loop {
            let now = Instant::now();
            let due: Vec<String> = {
                let mut entries = self.entries();
                entries.retain(|_, e| now.duration_since(e.last_used) < IDLE || e.expires > now);
                entries
                    .iter()
                    .filter(|(_, e)| e.refresh_at <= now && now.duration_since(e.last_used) < IDLE)
                    .map(|(h, _)| h.clone())
                    .collect()
            };
            for host in due {
                let _ = self.refresh(&host).await;
            }
            let next = self
                .entries()
                .values()
                .map(|e| e.refresh_at)
                .min()
                .unwrap_or(now + IDLE)
                .max(Instant::now() + Duration::from_millis(50));
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_with_dead_nameserver(dir: &Path) -> Arc<DnsCache> {
        // Nothing answers on 127.0.0.1:53 in the test's network namespace: lookups fail fast.
        let conf = dir.join("resolv.conf");
        std::fs::write(
            &conf,
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .expect("write resolv.conf");
        Arc::new(DnsCache::from_resolv_conf(&conf))
    }

    fn seed(cache: &DnsCache, host: &str, ip: &str, expires_in: Duration) {
        let now = Instant::now();
        let addrs: Arc<[IpAddr]> = vec![ip.parse::<IpAddr>().expect("ip")].into();
        cache.entries().insert(
            host.to_string(),
            Entry {
                addrs,
                expires: now + expires_in,
                refresh_at: now,
                last_used: now,
            },
        );
    }

    fn tempdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ztunnel-dns-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("tempdir");
        d
    }

    #[tokio::test]
    async fn fresh_answers_are_served_from_the_cache() {
        let cache = cache_with_dead_nameserver(&tempdir("fresh"));
        seed(
            &cache,
            "db.example.com",
            "10.1.2.3",
            Duration::from_secs(30),
        );
        let got = cache.resolve("db.example.com").await.expect("cached");
        assert_eq!(&*got, &["10.1.2.3".parse::<IpAddr>().expect("ip")]);
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_last_good_answer_until_it_expires() {
        let cache = cache_with_dead_nameserver(&tempdir("keep"));
        seed(
            &cache,
            "db.example.com",
            "10.1.2.3",
            Duration::from_secs(30),
        );
        let kept = cache
            .refresh("db.example.com")
            .await
            .expect("last good answer");
        assert_eq!(&*kept, &["10.1.2.3".parse::<IpAddr>().expect("ip")]);
        let e = cache.entries()["db.example.com"].clone();
        assert!(e.refresh_at > Instant::now(), "retry is scheduled later");
        assert!(e.refresh_at <= e.expires);

        // Expired: the failure is reported and the answer forgotten.
        seed(&cache, "old.example.com", "10.1.2.4", Duration::ZERO);
        let err = cache
            .refresh("old.example.com")
            .await
            .expect_err("no answer");
        assert!(matches!(err, DnsError::Lookup { .. }), "{err:?}");
        assert!(cache.entries().get("old.example.com").is_none());
        assert!(cache.cached("old.example.com").is_none());
    }

    #[test]
    fn nameservers_come_from_resolv_conf_in_order() {
        let dir = tempdir("ns");
        let conf = dir.join("resolv.conf");
        std::fs::write(
            &conf,
            "search default.svc.cluster.local\nnameserver 10.0.0.2\nnameserver 10.0.0.3\n",
        )
        .expect("write");
        let got = nameservers(&conf).expect("parsed");
        let want: Vec<std::net::SocketAddr> = vec![
            "10.0.0.2:53".parse().expect("addr"),
            "10.0.0.3:53".parse().expect("addr"),
        ];
        assert_eq!(got, want);
        assert!(nameservers(Path::new("/nonexistent/resolv.conf")).is_err());
    }

    #[tokio::test]
    async fn without_a_resolv_conf_lookups_fail_cleanly() {
        let cache = Arc::new(DnsCache::from_resolv_conf(Path::new(
            "/nonexistent/resolv.conf",
        )));
        let err = cache
            .resolve("db.example.com")
            .await
            .expect_err("no resolver");
        assert!(matches!(err, DnsError::NoResolver(_)), "{err:?}");
    }
}
