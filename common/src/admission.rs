//! Admission of accepted connections under load: caps on live connections per listener
//! (global and per source IP) and on TLS handshakes in progress. A connection over a cap is
//! shed (closed at once), counted in `<proxy>_connections_shed_total{listener, reason}`, and
//! logged at most once a second per listener with how many were shed since the last line.
//!
//! One exception: a connection over its *source's* handshake cap waits, holding no TLS state,
//! for one of that source's places until its handshake deadline, and only then is shed (at
//! most [`Caps::handshakes_waiting`] wait at once, beyond that they are shed at once). A
//! source stalling handshakes (slowloris) so queues behind its own stalled handshakes: closing
//! its excess at once would only make it reconnect at once, turning the slowloris into a
//! connection flood that costs every other peer CPU. The global cap still sheds at once, so a
//! new peer never queues behind others.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    /// Connections waiting (socket only, no TLS state) for a place under their source's
    /// handshake cap; beyond it they are shed at once (`reason="handshakes_per_source"`).
    pub handshakes_waiting: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            connections: 100_000,
            per_source: 10_000,
            handshakes: 1_024,
            handshakes_per_source: 64,
            handshakes_waiting: 8_192,
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
    /// Each source's handshake places; a source is forgotten once it holds and awaits none.
    handshakes_by_source: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
    /// Connections waiting for one of their source's handshake places.
    handshakes_waiting: AtomicUsize,
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
    /// The source's place (always `Some` until dropped).
    place: Option<OwnedSemaphorePermit>,
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
            handshakes_waiting: AtomicUsize::new(0),
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

    /// Connections now waiting for one of their source's handshake places.
    pub fn handshakes_waiting(&self) -> usize {
        self.handshakes_waiting.load(Ordering::Acquire)
    }

    /// A place for one TLS handshake: waits for one of `source`'s places until `deadline`,
    /// then takes a global one; shed (counted and logged) when either is not to be had.
    pub async fn handshake(
        self: &Arc<Self>,
        source: IpAddr,
        deadline: tokio::time::Instant,
    ) -> Result<HandshakePermit, ShedReason> {
        let places = lock(&self.handshakes_by_source)
            .entry(source)
            .or_insert_with(|| {
                let cap = self.caps.handshakes_per_source.min(Semaphore::MAX_PERMITS);
                Arc::new(Semaphore::new(cap))
            })
            .clone();
        let place = match places.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                // Counted while waiting, even if this future is dropped meanwhile.
                let waiting = Waiting::enter(&self.handshakes_waiting);
                if waiting.before < self.caps.handshakes_waiting {
                    tokio::time::timeout_at(deadline, places.clone().acquire_owned())
                        .await
                        .ok()
                        .and_then(Result::ok)
                } else {
                    None
                }
            }
        };
        drop(places);
        let Some(place) = place else {
            self.forget_idle_source(source);
            return Err(self.shed(ShedReason::handshakes_per_source, source));
        };
        if self.handshakes.fetch_add(1, Ordering::AcqRel) >= self.caps.handshakes {
            self.handshakes.fetch_sub(1, Ordering::AcqRel);
            drop(place);
            self.forget_idle_source(source);
            return Err(self.shed(ShedReason::handshakes, source));
        }
        Ok(HandshakePermit {
            admission: self.clone(),
            source,
            place: Some(place),
        })
    }

    /// Forgets `source`'s handshake places once none is held or awaited (only the map still
    /// refers to them), so the map does not grow with every address ever seen.
    fn forget_idle_source(&self, source: IpAddr) {
        let mut by_source = lock(&self.handshakes_by_source);
        if by_source
            .get(&source)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            by_source.remove(&source);
        }
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

/// One connection counted in [`Admission::handshakes_waiting`] until dropped.
struct Waiting<'a> {
    count: &'a AtomicUsize,
    /// How many waited before this one.
    before: usize,
}

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        let before = count.fetch_add(1, Ordering::AcqRel);
        Waiting { count, before }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnPermit {
    /// A handshake place for this connection (see [`Admission::handshake`]).
    pub async fn handshake(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<HandshakePermit, ShedReason> {
        self.admission.handshake(self.source, deadline).await
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
        a.handshakes.fetch_sub(1, Ordering::AcqRel);
        // The place goes back first (waking the source's next waiter), then the source is
        // forgotten if nothing else refers to it.
        drop(self.place.take());
        a.forget_idle_source(self.source);
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
            handshakes_waiting: 10,
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
    }

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + std::time::Duration::from_secs(10)
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_handshake_cap_sheds_at_once() {
        let shed = ShedCounter::default();
        let caps = Caps {
            handshakes: 1,
            ..Caps::default()
        };
        let a = Admission::new("test", caps, shed.clone());
        let h = a.handshake(ip("10.0.0.9"), soon()).await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(
            a.handshake(ip("10.0.0.8"), soon()).await.err(),
            Some(ShedReason::handshakes)
        );
        assert_eq!(started.elapsed(), std::time::Duration::ZERO, "no wait");
        drop(h);
        assert!(a.handshake(ip("10.0.0.8"), soon()).await.is_ok());
        assert_eq!(shed_count(&shed, ShedReason::handshakes), 1);
        assert!(
            lock(&a.handshakes_by_source).is_empty(),
            "sources forgotten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_source_cannot_take_every_handshake_place() {
        let shed = ShedCounter::default();
        let caps = Caps {
            connections: 100,
            per_source: 100,
            handshakes: 3,
            handshakes_per_source: 2,
            handshakes_waiting: 1,
        };
        let a = Admission::new("test", caps, shed.clone());
        let attacker_ip = ip("10.0.0.66");
        let mut attacker = Vec::new();
        for _ in 0..2 {
            attacker.push(a.handshake(attacker_ip, soon()).await.unwrap());
        }
        // The source's third waits (no TLS state) until its deadline, then is shed.
        let deadline = soon();
        assert_eq!(
            a.handshake(attacker_ip, deadline).await.err(),
            Some(ShedReason::handshakes_per_source)
        );
        assert_eq!(tokio::time::Instant::now(), deadline);
        assert_eq!(a.handshakes_waiting(), 0);
        // Another peer still gets a place, at once.
        let peer = a.handshake(ip("10.0.0.7"), soon()).await.unwrap();
        // The global cap still holds, and a place refused by it is not left counted.
        assert_eq!(
            a.handshake(ip("10.0.0.8"), soon()).await.err(),
            Some(ShedReason::handshakes)
        );
        assert!(lock(&a.handshakes_by_source).get(&ip("10.0.0.8")).is_none());
        drop(peer);
        assert!(a.handshake(ip("10.0.0.8"), soon()).await.is_ok());

        // A waiter gets the source's place as soon as one of its handshakes ends.
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.handshake(attacker_ip, soon()).await.is_ok() })
        };
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert_eq!(a.handshakes_waiting(), 1);
        // Every waiting place is taken: the next one over its source's cap is shed at once.
        let started = tokio::time::Instant::now();
        assert_eq!(
            a.handshake(attacker_ip, soon()).await.err(),
            Some(ShedReason::handshakes_per_source)
        );
        assert_eq!(started.elapsed(), std::time::Duration::ZERO);
        drop(attacker.pop());
        assert!(waiter.await.unwrap(), "the waiter got the freed place");
        drop(attacker);
        assert!(lock(&a.handshakes_by_source).get(&attacker_ip).is_none());
        assert_eq!(shed_count(&shed, ShedReason::handshakes_per_source), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_dropped_while_waiting_leaves_nothing_counted() {
        let caps = Caps {
            handshakes_per_source: 1,
            ..Caps::default()
        };
        let a = Admission::new("test", caps, ShedCounter::default());
        let source = ip("10.0.0.5");
        let held = a.handshake(source, soon()).await.unwrap();
        let waited = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            a.handshake(source, soon()),
        )
        .await;
        assert!(waited.is_err(), "still waiting when dropped");
        assert_eq!(a.handshakes_waiting(), 0);
        drop(held);
        assert!(lock(&a.handshakes_by_source).is_empty());
        // A cap beyond what a semaphore can count is clamped, not a panic.
        let huge = Admission::new(
            "test",
            Caps {
                handshakes_per_source: usize::MAX,
                ..Caps::default()
            },
            ShedCounter::default(),
        );
        assert!(huge.handshake(source, soon()).await.is_ok());
    }
}
