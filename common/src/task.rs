//! Background-task ownership: a task that must not outlive its owner.

/// Aborts the task when dropped (a connection's helper, a proxy's background loop).
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
