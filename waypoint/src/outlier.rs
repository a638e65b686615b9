//! Outlier detection (DestinationRule `outlierDetection`): endpoints that return consecutive
//! 5xx or gateway errors are ejected for `baseEjectionTime × times ejected` (at most Envoy's
//! `max_ejection_time`, 300 s, or `baseEjectionTime` if longer), never more than
//! `maxEjectionPercent` of a cluster at once, and ignored altogether when fewer than
//! `minHealthPercent` of the endpoints would remain (Envoy's panic threshold). As in Envoy,
//! every `interval` an endpoint spends back in service takes one off its ejection count, so
//! a long-healthy endpoint is not punished for old failures. Evaluated lazily: no timer.

use common::l7::destination_rule::Outlier;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone)]
struct EndpointState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
    /// Since when `times_ejected` has been decaying (back in service, or last decrement).
    decay_from: Option<Instant>,
}

/// Envoy's default `max_ejection_time` (Istio does not expose it).
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

impl EndpointState {
    /// Takes one off the ejection count per full `interval` spent in service since the last
    /// ejection ended (or the last decrement).
    fn decay(&mut self, interval: Duration, now: Instant) {
        if self.times_ejected == 0 || interval.is_zero() {
            return;
        }
        let Some(back) = self.ejected_until.filter(|t| *t <= now) else {
            return; // still ejected
        };
        let from = self.decay_from.map_or(back, |d| d.max(back));
        let intervals = (now.saturating_duration_since(from).as_nanos() / interval.as_nanos())
            .min(u128::from(u32::MAX)) as u32;
        if intervals > 0 {
            self.times_ejected = self.times_ejected.saturating_sub(intervals);
            self.decay_from = Some(from + interval * intervals);
        }
    }
}

/// Ejection state of every (cluster, endpoint) this waypoint has sent to.
#[derive(Debug, Default)]
pub struct Outliers {
    state: Mutex<HashMap<(String, SocketAddr), EndpointState>>,
}

/// How an attempt ended, as outlier detection counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    Status(u16),
    ConnectFailure,
}

impl Outliers {
    /// Forgets endpoints with nothing to remember (no errors counted, not ejected, no
    /// ejection history) and, whatever their state, endpoints `known` no longer lists (they
    /// left the mesh). Returns how many were forgotten.
    pub fn prune(&self, known: impl Fn(&SocketAddr) -> bool, now: Instant) -> usize {
        let mut state = self.lock();
        let before = state.len();
        state.retain(|(_, addr), s| {
            let at_rest = s.consecutive_5xx == 0
                && s.consecutive_gateway == 0
                && s.times_ejected == 0
                && s.ejected_until.is_none_or(|t| t <= now);
            known(addr) && !at_rest
        });
        before - state.len()
    }

    /// Endpoints with state.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, SocketAddr), EndpointState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoints of `cluster` (among `all`) currently ejected, unless ejecting them would
    /// leave fewer than `minHealthPercent` healthy (then none are treated as ejected).
    pub fn ejected(
        &self,
        cluster: &str,
        all: &[SocketAddr],
        policy: &Outlier,
        now: Instant,
    ) -> Vec<SocketAddr> {
        let state = self.lock();
        let ejected: Vec<SocketAddr> = all
            .iter()
            .filter(|a| {
                state
                    .get(&(cluster.to_string(), **a))
                    .and_then(|s| s.ejected_until)
                    .is_some_and(|t| t > now)
            })
            .copied()
            .collect();
        let healthy = all.len() - ejected.len();
        if all.is_empty() || healthy * 100 < policy.min_health_percent as usize * all.len() {
            return Vec::new();
        }
        ejected
    }

    /// Records an attempt's result; returns true when it ejected the endpoint.
    pub fn record(
        &self,
        cluster: &str,
        addr: SocketAddr,
        result: Observation,
        policy: &Outlier,
        cluster_size: usize,
        now: Instant,
    ) -> bool {
        let mut state = self.lock();
        let currently_ejected = state
            .iter()
            .filter(|((c, _), s)| c == cluster && s.ejected_until.is_some_and(|t| t > now))
            .count();
        let s = state.entry((cluster.to_string(), addr)).or_default();
        let (is_5xx, is_gateway) = match result {
            Observation::ConnectFailure => (true, true),
            Observation::Status(code) => (code >= 500, matches!(code, 502..=504)),
        };
        if !is_5xx {
            s.consecutive_5xx = 0;
            s.consecutive_gateway = 0;
            return false;
        }
        s.consecutive_5xx += 1;
        if is_gateway {
            s.consecutive_gateway += 1;
        } else {
            s.consecutive_gateway = 0;
        }
        let trip = (policy.consecutive_5xx_errors > 0
            && s.consecutive_5xx >= policy.consecutive_5xx_errors)
            || (policy.consecutive_gateway_errors > 0
                && s.consecutive_gateway >= policy.consecutive_gateway_errors);
        if !trip || s.ejected_until.is_some_and(|t| t > now) {
            return false;
        }
        // Envoy always allows ejecting at least one endpoint.
        let max = (cluster_size * policy.max_ejection_percent as usize / 100).max(1);
        if currently_ejected >= max {
            return false;
        }
        s.decay(policy.interval.0, now);
        s.times_ejected += 1;
        let base: Duration = policy.base_ejection_time.0;
        let cap = MAX_EJECTION_TIME.max(base);
        s.ejected_until = Some(common::duration::std_after(
            now,
            base.saturating_mul(s.times_ejected).min(cap),
        ));
        s.decay_from = None;
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
        tracing::info!(cluster, endpoint = %addr, times = s.times_ejected, "outlier ejected");
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::l7::spec::Duration as D;

    fn policy() -> Outlier {
        Outlier {
            consecutive_5xx_errors: 2,
            consecutive_gateway_errors: 0,
            interval: D(Duration::from_secs(1)),
            base_ejection_time: D(Duration::from_secs(10)),
            max_ejection_percent: 50,
            min_health_percent: 0,
        }
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    /// A hostile `baseEjectionTime` (`99999999999s`, or the largest duration) ejects for a very
    /// long time instead of overflowing the clock.
    #[test]
    fn huge_base_ejection_time_saturates() {
        for base in [Duration::from_secs(99_999_999_999), Duration::MAX] {
            let o = Outliers::default();
            let p = Outlier {
                base_ejection_time: D(base),
                interval: D(base),
                ..policy()
            };
            let now = Instant::now();
            let all = [addr(1), addr(2)];
            o.record("c", addr(1), Observation::Status(500), &p, 2, now);
            assert!(o.record("c", addr(1), Observation::Status(500), &p, 2, now));
            let later = now + Duration::from_secs(86400 * 365);
            assert_eq!(o.ejected("c", &all, &p, later), vec![addr(1)]);
        }
    }

    #[test]
    fn consecutive_errors_eject_and_ejection_time_grows() {
        let o = Outliers::default();
        let p = policy();
        let now = Instant::now();
        let all = [addr(1), addr(2)];
        assert!(!o.record("c", addr(1), Observation::Status(500), &p, 2, now));
        assert!(o.record("c", addr(1), Observation::Status(503), &p, 2, now));
        assert_eq!(o.ejected("c", &all, &p, now), vec![addr(1)]);
        // Back after baseEjectionTime.
        let later = now + Duration::from_secs(10);
        assert!(o.ejected("c", &all, &p, later).is_empty());
        // Second ejection lasts twice as long.
        o.record("c", addr(1), Observation::Status(500), &p, 2, later);
        assert!(o.record("c", addr(1), Observation::Status(500), &p, 2, later));
        assert_eq!(
            o.ejected("c", &all, &p, later + Duration::from_secs(15)),
            vec![addr(1)]
        );
        assert!(o
            .ejected("c", &all, &p, later + Duration::from_secs(21))
            .is_empty());
    }

    #[test]
    fn healthy_intervals_shrink_the_next_ejection_and_time_is_capped() {
        let o = Outliers::default();
        let p = policy(); // interval 1 s, base 10 s
        let all = [addr(1), addr(2)];
        let secs = Duration::from_secs;
        let eject = |at: Instant| {
            o.record("c", addr(1), Observation::Status(500), &p, 2, at);
            assert!(o.record("c", addr(1), Observation::Status(500), &p, 2, at));
        };
        let t0 = Instant::now();
        // Ejected again the moment the first ejection ends: 20 s.
        eject(t0);
        eject(t0 + secs(10));
        assert_eq!(o.ejected("c", &all, &p, t0 + secs(29)), vec![addr(1)]);
        assert!(o.ejected("c", &all, &p, t0 + secs(31)).is_empty());
        // Two healthy intervals after it ended (t0+30): count 2 → 0, so 10 s again.
        let t1 = t0 + secs(32);
        eject(t1);
        assert_eq!(o.ejected("c", &all, &p, t1 + secs(9)), vec![addr(1)]);
        assert!(
            o.ejected("c", &all, &p, t1 + secs(11)).is_empty(),
            "healthy time brings the ejection back to baseEjectionTime"
        );
        // Ejected again and again without healthy time: grows, but never past 300 s.
        let mut t = t1 + secs(10);
        let mut last = Duration::ZERO;
        for _ in 0..40 {
            eject(t);
            let until = o.lock()[&("c".to_string(), addr(1))].ejected_until.unwrap();
            last = until - t;
            assert!(last <= secs(300), "capped at 300 s");
            t = until;
        }
        assert_eq!(last, secs(300), "the 40th ejection in a row is at the cap");
    }

    #[test]
    fn success_resets_and_max_percent_caps() {
        let o = Outliers::default();
        let p = policy();
        let now = Instant::now();
        o.record("c", addr(1), Observation::Status(500), &p, 2, now);
        o.record("c", addr(1), Observation::Status(200), &p, 2, now);
        assert!(!o.record("c", addr(1), Observation::Status(500), &p, 2, now));
        assert!(o.record("c", addr(1), Observation::Status(500), &p, 2, now));
        // 50 % of 2 endpoints: the second may not be ejected while the first is.
        o.record("c", addr(2), Observation::ConnectFailure, &p, 2, now);
        assert!(!o.record("c", addr(2), Observation::ConnectFailure, &p, 2, now));
    }

    #[test]
    fn min_health_percent_disables_ejection() {
        let o = Outliers::default();
        let mut p = policy();
        p.min_health_percent = 60;
        let now = Instant::now();
        o.record("c", addr(1), Observation::Status(500), &p, 2, now);
        o.record("c", addr(1), Observation::Status(500), &p, 2, now);
        assert!(o.ejected("c", &[addr(1), addr(2)], &p, now).is_empty());
    }

    /// Endpoints at rest and endpoints that left the mesh are forgotten; one with errors
    /// counted or ejected stays while it is known.
    #[test]
    fn prune_forgets_endpoints_at_rest_or_gone() {
        let o = Outliers::default();
        let p = policy();
        let now = Instant::now();
        o.record("c", addr(1), Observation::Status(503), &p, 3, now);
        o.record("c", addr(2), Observation::Status(200), &p, 3, now);
        for _ in 0..2 {
            o.record("c", addr(3), Observation::Status(503), &p, 3, now);
        }
        assert_eq!(o.len(), 3);
        assert_eq!(o.prune(|_| true, now), 1, "addr 2 is at rest");
        assert_eq!(o.len(), 2);
        assert_eq!(o.prune(|a| *a != addr(3), now), 1, "addr 3 left");
        assert_eq!(
            o.ejected("c", &[addr(1), addr(3)], &p, now),
            Vec::<SocketAddr>::new()
        );
        assert_eq!(o.len(), 1);
    }
}
