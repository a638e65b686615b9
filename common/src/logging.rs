//! Logging: tracing to stdout as text or JSON, with the filter swappable at runtime (admin
//! `/logging`).
//!
//! A data-plane thread never waits on stdout. Lines go through a bounded queue to one writer
//! thread (`log-writer`, tracing-appender's non-blocking writer); when the queue is full —
//! stdout is a pipe nobody drains, a slow terminal, a stalled log collector — the line is
//! dropped and counted instead of blocking the connection that logged it. The count is exported
//! as `<proxy>_log_lines_dropped_total` ([`DroppedLines`]).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use std::sync::{Arc, OnceLock};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Lines queued for the writer thread before new ones are dropped (~ a few MiB of log).
pub const QUEUED_LINES: usize = 16 * 1024;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

#[derive(Clone)]
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Arc<std::sync::Mutex<String>>,
    /// Flushes the queue when the last handle goes (normal exit).
    _writer: Arc<WorkerGuard>,
}

/// Installs the global subscriber; `json` selects one JSON object per line.
pub fn init(json: bool, level: &str) -> Result<LogHandle, String> {
    let filter =
        EnvFilter::try_new(level).map_err(|e| format!("invalid log level {level:?}: {e}"))?;
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer")
        .finish(std::io::stdout());
    let dropped = writer.error_counter();
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(writer),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(writer),
            )
            .try_init()
    };
    installed.map_err(|e| format!("logging already initialised: {e}"))?;
    let _ = DROPPED.set(dropped);
    Ok(LogHandle {
        handle,
        current: Arc::new(std::sync::Mutex::new(level.to_string())),
        _writer: Arc::new(guard),
    })
}

/// Log lines dropped so far because the writer could not keep up (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Prometheus collector for [`dropped_lines`], registered by each binary under its own
/// prefix (`ztunnel_log_lines_dropped_total`, `waypoint_log_lines_dropped_total`).
#[derive(Debug)]
pub struct DroppedLines {
    name: &'static str,
}

impl DroppedLines {
    /// `name` without the `_total` suffix, which the encoder adds to counters.
    pub fn new(name: &'static str) -> Self {
        DroppedLines { name }
    }
}

impl Collector for DroppedLines {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new(dropped_lines());
        let metric = encoder.encode_descriptor(
            self.name,
            "Log lines dropped because stdout could not keep up (never blocks the data plane)",
            None,
            counter.metric_type(),
        )?;
        counter.encode(metric)
    }
}

impl LogHandle {
    /// Replaces the filter (EnvFilter syntax, e.g. `debug` or `info,access=debug`).
    pub fn set(&self, level: &str) -> Result<(), String> {
        let filter =
            EnvFilter::try_new(level).map_err(|e| format!("invalid level {level:?}: {e}"))?;
        self.handle.reload(filter).map_err(|e| e.to_string())?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = level.to_string();
        Ok(())
    }

    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    #[test]
    fn dropped_lines_collector_encodes_a_counter() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(DroppedLines::new("ztunnel_log_lines_dropped")));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("# TYPE ztunnel_log_lines_dropped counter")
                && out.contains("ztunnel_log_lines_dropped_total 0"),
            "{out}"
        );
    }
}
