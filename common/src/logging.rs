//! Logging: tracing to stdout as text or JSON, with the filter swappable at runtime (admin
//! `/logging`).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

#[derive(Clone)]
pub struct LogHandle {
    handle: reload::Handle<EnvFilter, Registry>,
    current: std::sync::Arc<std::sync::Mutex<String>>,
}

/// Installs the global subscriber; `json` selects one JSON object per line.
pub fn init(json: bool, level: &str) -> Result<LogHandle, String> {
    let filter =
        EnvFilter::try_new(level).map_err(|e| format!("invalid log level {level:?}: {e}"))?;
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_ansi(false))
            .try_init()
    };
    installed.map_err(|e| format!("logging already initialised: {e}"))?;
    Ok(LogHandle {
        handle,
        current: std::sync::Arc::new(std::sync::Mutex::new(level.to_string())),
    })
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
