//! Admission of accepted connections under load: caps on live connections per listener
//! (global and per source IP) and on TLS handshakes in progress. A connection over a cap is
//! shed (closed at once), counted in `<proxy>_connections_shed_total{listener, reason}`, and
//! logged at most once a second per listener with how many were shed since the last line.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The caps of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Live connections on the listener.
    pub connections: usize,
    /// Live connections from one source IP.
    pub per_source: usize,
    /// TLS handshakes in progress (listeners that terminate TLS).
    pub handshakes: usize,
    /// TLS handshakes in progress from one source IP: one source stalling handshakes
    /// (slowloris) cannot take every place and lock other peers out of new connections.
    pub handshakes_per_source: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            connections: 100_000,
            per_source: 10_000,
            handshakes: 1_024,
            handshakes_per_source: 64,
        }
    }
}

/// Why a connection was shed.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ShedReason {
    connections,
    per_source,
    handshakes,
    handshakes_per_source,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    pub listener: String,
    pub reason: ShedReason,
}

/// The shed counter family a proxy registers under its own name.
pub type ShedCounter = Family<ShedLabels, Counter>;

/// Admission state of one listener.
pub struct Admission {
    listener: &'static str,
    caps: Caps,
    live: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    handshakes: AtomicUsize,
    handshakes_by_source: Mutex<HashMap<IpAddr, usize>>,
    shed: ShedCounter,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last shedding log line.
    last_log_ms: AtomicU64,
    unlogged: AtomicU64,
}

/// Holds one connection's place; released on drop.
pub struct ConnPermit {
    admission: Arc<Admission>,
    source: IpAddr,
}

/// Holds one handshake's place; released on drop (when the handshake ends either way).
pub struct HandshakePermit {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Admission {
    pub fn new(listener: &'static str, caps: Caps, shed: ShedCounter) -> Arc<Self> {
        Arc::new(Admission {
            listener,
            caps,
            live: AtomicUsize::new(0),
            per_source: Mutex::new(HashMap::new()),
            handshakes: AtomicUsize::new(0),
            handshakes_by_source: Mutex::new(HashMap::new()),
            shed,
            epoch: Instant::now(),
            last_log_ms: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        })
    }

    /// The listener these caps guard.
    pub fn listener(&self) -> &'static str {
        self.listener
    }

    /// Live connections admitted and not yet released.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Admits a connection from `source`, or sheds it (counted and logged).
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<ConnPermit, ShedReason> {
        if self.live.fetch_add(1, Ordering::AcqRel) >= self.caps.connections {
            self.live.fetch_sub(1, Ordering::AcqRel);
            return Err(self.shed(ShedReason::connections, source));
        }
        if !take_source(&self.per_source, source, self.caps.per_source) {
            self.live.fetch_sub(1, Ordering::AcqRel);
            return Err(self.shed(ShedReason::per_source, source));
        }
        Ok(ConnPermit {
            admission: self.clone(),
            source,
        })
    }

    /// A place for one TLS handshake, or the connection is shed.
    pub fn handshake(self: &Arc<Self>, source: IpAddr) -> Result<HandshakePermit, ShedReason> {
        if !take_source(
            &self.handshakes_by_source,
            source,
            self.caps.handshakes_per_source,
        ) {
            return Err(self.shed(ShedReason::handshakes_per_source, source));
        }
        if self.handshakes.fetch_add(1, Ordering::AcqRel) >= self.caps.handshakes {
            self.handshakes.fetch_sub(1, Ordering::AcqRel);
            release_source(&self.handshakes_by_source, source);
            return Err(self.shed(ShedReason::handshakes, source));
        }
        Ok(HandshakePermit {
            admission: self.clone(),
            source,
        })
    }

    fn shed(&self, reason: ShedReason, source: IpAddr) -> ShedReason {
        self.shed
            .get_or_create(&ShedLabels {
                listener: self.listener.to_string(),
                reason,
            })
            .inc();
        let unlogged = self.unlogged.fetch_add(1, Ordering::AcqRel) + 1;
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_log_ms.load(Ordering::Acquire);
        let due = last == 0 || now.saturating_sub(last) >= 1000;
        if due
            && self
                .last_log_ms
                .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.unlogged.fetch_sub(unlogged, Ordering::AcqRel);
            let cap = match reason {
                ShedReason::connections => self.caps.connections,
                ShedReason::per_source => self.caps.per_source,
                ShedReason::handshakes => self.caps.handshakes,
                ShedReason::handshakes_per_source => self.caps.handshakes_per_source,
            };
            tracing::warn!(
                listener = self.listener,
                ?reason,
                cap,
                %source,
                shed = unlogged,
                "overloaded: shedding connections ({unlogged} since the last message)"
            );
        }
        reason
    }
}

impl ConnPermit {
    /// A handshake place for this connection (see [`Admission::handshake`]).
    pub fn handshake(&self) -> Result<HandshakePermit, ShedReason> {
        self.admission.handshake(self.source)
    }
}

fn lock(m: &Mutex<HashMap<IpAddr, usize>>) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes one place of `source` in a per-source count unless it already holds `cap`.
fn take_source(m: &Mutex<HashMap<IpAddr, usize>>, source: IpAddr, cap: usize) -> bool {
    let mut per = lock(m);
    let n = per.entry(source).or_insert(0);
    if *n >= cap {
        if *n == 0 {
            per.remove(&source);
        }
        return false;
    }
    *n += 1;
    true
}

/// Gives back one place of `source` in a per-source count (forgetting sources at zero).
fn release_source(m: &Mutex<HashMap<IpAddr, usize>>, source: IpAddr) {
    let mut per = lock(m);
    if let Some(n) = per.get_mut(&source) {
        *n -= 1;
        if *n == 0 {
            per.remove(&source);
        }
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let a = &self.admission;
        release_source(&a.per_source, self.source);
        a.live.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        let a = &self.admission;
        release_source(&a.handshakes_by_source, self.source);
        a.handshakes.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn shed_count(f: &ShedCounter, reason: ShedReason) -> u64 {
        f.get_or_create(&ShedLabels {
            listener: "test".into(),
            reason,
        })
        .get()
    }

    #[test]
    fn caps_shed_and_release() {
        let shed = ShedCounter::default();
        let caps = Caps {
            connections: 3,
            per_source: 2,
            handshakes: 1,
            handshakes_per_source: 10,
        };
        let a = Admission::new("test", caps, shed.clone());
        let p1 = a.admit(ip("10.0.0.1")).unwrap();
        let _p2 = a.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(ShedReason::per_source));
        let _p3 = a.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(a.admit(ip("10.0.0.3")).err(), Some(ShedReason::connections));
        assert_eq!(shed_count(&shed, ShedReason::per_source), 1);
        assert_eq!(shed_count(&shed, ShedReason::connections), 1);
        drop(p1);
        assert_eq!(a.live(), 2);
        let _p4 = a.admit(ip("10.0.0.1")).unwrap();

        let h = a.handshake(ip("10.0.0.9")).unwrap();
        assert_eq!(
            a.handshake(ip("10.0.0.9")).err(),
            Some(ShedReason::handshakes)
        );
        drop(h);
        assert!(a.handshake(ip("10.0.0.9")).is_ok());
        assert_eq!(shed_count(&shed, ShedReason::handshakes), 1);
    }

    #[test]
    fn one_source_cannot_take_every_handshake_place() {
        let shed = ShedCounter::default();
        let caps = Caps {
            connections: 100,
            per_source: 100,
            handshakes: 3,
            handshakes_per_source: 2,
        };
        let a = Admission::new("test", caps, shed.clone());
        let attacker: Vec<_> = (0..2)
            .map(|_| a.handshake(ip("10.0.0.66")).unwrap())
            .collect();
        assert_eq!(
            a.handshake(ip("10.0.0.66")).err(),
            Some(ShedReason::handshakes_per_source)
        );
        // Another peer still gets a place.
        let peer = a.handshake(ip("10.0.0.7")).unwrap();
        // The global cap still holds, and a place refused by it is not left counted.
        assert_eq!(
            a.handshake(ip("10.0.0.8")).err(),
            Some(ShedReason::handshakes)
        );
        drop(peer);
        assert!(a.handshake(ip("10.0.0.8")).is_ok());
        drop(attacker);
        assert!(lock(&a.handshakes_by_source)
            .get(&ip("10.0.0.66"))
            .is_none());
        assert_eq!(shed_count(&shed, ShedReason::handshakes_per_source), 1);
    }
}
