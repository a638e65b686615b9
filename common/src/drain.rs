//! Graceful drain: one `Drain` trigger per process, cloned `DrainWatch`ers in every listener and
//! connection that must stop accepting new work when it fires.

use tokio::sync::watch;

/// The trigger side, held by whoever handles SIGTERM.
#[derive(Debug)]
pub struct Drain(watch::Sender<bool>);

/// The observing side.
#[derive(Debug, Clone)]
pub struct DrainWatch(watch::Receiver<bool>);

impl Drain {
    pub fn new() -> (Drain, DrainWatch) {
        let (tx, rx) = watch::channel(false);
        (Drain(tx), DrainWatch(rx))
    }

    pub fn start(&self) {
        self.0.send_replace(true);
    }
}

impl DrainWatch {
    /// Resolves once draining has started (immediately if it already has).
    pub async fn signaled(&mut self) {
        let _ = self.0.wait_for(|d| *d).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }
}

/// Resolves on SIGTERM or SIGINT: the moment a proxy starts draining.
pub async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
