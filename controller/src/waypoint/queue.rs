//! The work queue of Gateway keys: one pending entry per key (bursts of events collapse after
//! a short debounce), exponential backoff per key after a failed reconcile (events do not cut a
//! backoff short), so one failing Gateway never starves or stops the others.

use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// `(namespace, name)` of a Gateway.
pub type Key = (String, String);

/// Delay between an event and its reconcile (collapses bursts, e.g. our own five applies).
pub const DEBOUNCE: Duration = Duration::from_millis(100);
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
pub struct Queue {
    due: HashMap<Key, Instant>,
    failures: HashMap<Key, u32>,
}

impl Queue {
    fn schedule_at(&mut self, key: Key, at: Instant) {
        let e = self.due.entry(key).or_insert(at);
        if at < *e {
            *e = at;
        }
    }

    /// Something about `key` changed.
    pub fn event(&mut self, key: Key, now: Instant) {
        if self.failures.contains_key(&key) && self.due.contains_key(&key) {
            return; // in backoff: the retry is already scheduled
        }
        self.schedule_at(key, now + DEBOUNCE);
    }

    /// The earliest pending key and when it is due.
    pub fn next(&self) -> Option<(Key, Instant)> {
        self.due
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(k, at)| (k.clone(), *at))
    }

    /// Removes `key` from the pending set (it is about to run).
    pub fn take(&mut self, key: &Key) {
        self.due.remove(key);
    }

    /// The reconcile of `key` failed: retry after a growing delay, returned.
    pub fn failed(&mut self, key: Key, now: Instant) -> Duration {
        let n = self.failures.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        let delay = FIRST_RETRY
            .saturating_mul(2u32.saturating_pow(n.saturating_sub(1).min(20)))
            .min(MAX_RETRY);
        self.due.insert(key, now + delay);
        delay
    }

    pub fn succeeded(&mut self, key: &Key) {
        self.failures.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: &str) -> Key {
        ("ns".into(), n.into())
    }

    #[test]
    fn collapses_backs_off_and_keeps_others_flowing() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        q.event(k("a"), t0);
        q.event(k("a"), t0 + Duration::from_millis(50));
        assert_eq!(q.next(), Some((k("a"), t0 + DEBOUNCE)));
        q.take(&k("a"));
        assert_eq!(q.next(), None);
        // a fails twice: 0.5 s then 1 s; events meanwhile do not cut the backoff short.
        assert_eq!(q.failed(k("a"), t0), Duration::from_millis(500));
        q.event(k("a"), t0);
        assert_eq!(q.next(), Some((k("a"), t0 + Duration::from_millis(500))));
        q.take(&k("a"));
        assert_eq!(q.failed(k("a"), t0), Duration::from_secs(1));
        // b is unaffected and comes first.
        q.event(k("b"), t0);
        assert_eq!(q.next().map(|(key, _)| key), Some(k("b")));
        q.take(&k("b"));
        q.take(&k("a"));
        for _ in 0..30 {
            q.failed(k("a"), t0);
        }
        assert_eq!(q.failed(k("a"), t0), MAX_RETRY);
        q.succeeded(&k("a"));
        q.take(&k("a"));
        q.event(k("a"), t0);
        assert_eq!(q.next(), Some((k("a"), t0 + DEBOUNCE)));
    }
}
