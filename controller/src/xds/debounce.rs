//! Debouncing of published changes: names accumulate in a [`Pending`] batch, which is flushed
//! (pushed to the streams) after `quiet` without a new change, or `max` after the first change
//! of the batch at the latest, whichever comes first. Time is passed in, so the rules are
//! tested without sleeping; [`run`] is the task that drives it with tokio timers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Debounce timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebounceConfig {
    /// Push after this long without a new change (istiod: 100 ms).
    pub quiet: Duration,
    /// ... but no later than this after the first pending change.
    pub max: Duration,
}

impl Default for DebounceConfig {
    fn default() -> Self {
        DebounceConfig {
            quiet: Duration::from_millis(100),
            max: Duration::from_secs(1),
        }
    }
}

/// A flushed batch: changed names by type, and when the oldest of them was published.
#[derive(Debug, Default)]
pub struct Batch {
    /// type URL → changed name → sequence number of its latest change.
    pub names: HashMap<String, HashMap<String, u64>>,
    /// Publish time of the oldest change in the batch.
    pub first: Option<Instant>,
}

/// The changes waiting for a push.
#[derive(Debug, Default)]
pub struct Pending {
    batch: Batch,
    last: Option<Instant>,
}

impl Pending {
    /// Records changed names published at `now`.
    pub fn add(&mut self, now: Instant, changed: impl IntoIterator<Item = (String, String, u64)>) {
        let mut any = false;
        for (t, n, seq) in changed {
            let s = self.batch.names.entry(t).or_default().entry(n).or_default();
            *s = (*s).max(seq);
            any = true;
        }
        if any {
            self.batch.first.get_or_insert(now);
            self.last = Some(now);
        }
    }

    /// When the pending batch is due, if there is one.
    pub fn deadline(&self, cfg: &DebounceConfig) -> Option<Instant> {
        let first = self.batch.first?;
        let last = self.last.unwrap_or(first);
        Some((last + cfg.quiet).min(first + cfg.max))
    }

    /// The pending batch, due or not.
    pub fn into_batch(self) -> Batch {
        self.batch
    }

    /// Takes the batch if it is due at `now`.
    pub fn take_due(&mut self, now: Instant, cfg: &DebounceConfig) -> Option<Batch> {
        if self.deadline(cfg)? > now {
            return None;
        }
        self.last = None;
        Some(std::mem::take(&mut self.batch))
    }
}

/// Flushes due batches to `flush`, forever (the owner aborts the task). `wake` is notified on
/// every [`Pending::add`].
pub async fn run(
    pending: Arc<Mutex<Pending>>,
    wake: Arc<Notify>,
    cfg: DebounceConfig,
    flush: impl Fn(Batch),
) {
    loop {
        let deadline = lock(&pending).deadline(&cfg);
        match deadline {
            None => wake.notified().await,
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(d) => {}
                    // A new change moves the quiet deadline; recompute.
                    _ = wake.notified() => continue,
                }
                let due = lock(&pending).take_due(Instant::now(), &cfg);
                if let Some(batch) = due {
                    flush(batch);
                }
            }
        }
    }
}

fn lock(p: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DebounceConfig {
        DebounceConfig {
            quiet: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        }
    }

    fn ch(n: &str) -> Vec<(String, String, u64)> {
        vec![("t".to_string(), n.to_string(), 1)]
    }

    #[test]
    fn nothing_pending_has_no_deadline() {
        let mut p = Pending::default();
        assert_eq!(p.deadline(&cfg()), None);
        p.add(Instant::now(), Vec::new());
        assert_eq!(p.deadline(&cfg()), None);
    }

    #[test]
    fn quiet_period_restarts_on_each_change_and_batches_coalesce() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        p.add(t0, ch("a"));
        assert_eq!(p.deadline(&cfg()), Some(t0 + Duration::from_millis(100)));
        p.add(t0 + Duration::from_millis(50), ch("a"));
        p.add(t0 + Duration::from_millis(60), ch("b"));
        assert!(p
            .take_due(t0 + Duration::from_millis(159), &cfg())
            .is_none());
        let b = p
            .take_due(t0 + Duration::from_millis(160), &cfg())
            .expect("due");
        assert_eq!(b.first, Some(t0));
        assert_eq!(b.names["t"].len(), 2);
        assert_eq!(p.deadline(&cfg()), None);
    }

    #[test]
    fn a_steady_stream_of_changes_is_flushed_at_max() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        for i in 0..30u64 {
            p.add(t0 + Duration::from_millis(50 * i), ch("a"));
        }
        // Last change at 1450 ms, but the first was at 0: due at 1000 ms.
        assert_eq!(p.deadline(&cfg()), Some(t0 + Duration::from_millis(1000)));
    }

    #[tokio::test]
    async fn run_flushes_once_after_quiet() {
        let pending = Arc::new(Mutex::new(Pending::default()));
        let wake = Arc::new(Notify::new());
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let f = flushed.clone();
        let cfg = DebounceConfig {
            quiet: Duration::from_millis(400),
            max: Duration::from_secs(5),
        };
        let task = tokio::spawn(run(pending.clone(), wake.clone(), cfg, move |b| {
            f.lock().unwrap().push(b.names["t"].len())
        }));
        for n in ["a", "b", "c"] {
            lock(&pending).add(Instant::now(), ch(n));
            wake.notify_one();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(flushed.lock().unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(*flushed.lock().unwrap(), vec![3]);
        task.abort();
    }
}
