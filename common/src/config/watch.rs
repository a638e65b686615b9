//! Hot reloading: [`ConfigStore`] holds the current [`Snapshot`] behind an `ArcSwap` (readers
//! never block, a reload swaps it atomically) with a generation counter, and
//! [`spawn_file_watcher`] polls a file and reloads it when its content changes. A bad update is
//! logged with its full [`ConfigError`] and the last good snapshot stays.

use super::{load_str, ConfigError};
use crate::snapshot::Snapshot;
use arc_swap::ArcSwap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The current configuration snapshot, swapped atomically on reload.
#[derive(Debug)]
pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    generation: AtomicU64,
    /// Hash of the file content the current snapshot was loaded from (if it came from a file).
    content_hash: Mutex<Option<u64>>,
    last_error: Mutex<Option<ConfigError>>,
    /// Carries the generation to [`ConfigStore::subscribe`]rs after every swap.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for ConfigStore {
    fn default() -> Self {
        ConfigStore::new(Snapshot::default())
    }
}

fn hash_of(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ConfigStore {
    pub fn new(snapshot: Snapshot) -> Self {
        ConfigStore {
            current: ArcSwap::from_pointee(snapshot),
            generation: AtomicU64::new(0),
            content_hash: Mutex::new(None),
            last_error: Mutex::new(None),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Notified (with the new generation) after every snapshot swap; the current value at
    /// subscription counts as seen.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Loads `path` into a new store (generation 0).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let store = ConfigStore::default();
        reload_now(path, &store)?;
        store.generation.store(0, Ordering::SeqCst);
        Ok(store)
    }

    /// The current snapshot (cheap; hold it for the whole connection for a consistent view).
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Swaps in a new snapshot and bumps the generation.
    pub fn replace(&self, s: Snapshot) {
        self.current.store(Arc::new(s));
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        *lock(&self.content_hash) = None;
        *lock(&self.last_error) = None;
        self.changes.send_replace(generation);
    }

    /// How many times the snapshot has been replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The error of the last rejected reload, cleared by a successful one.
    pub fn last_error(&self) -> Option<ConfigError> {
        lock(&self.last_error).clone()
    }

    fn loaded_hash(&self) -> Option<u64> {
        *lock(&self.content_hash)
    }

    /// Parses `text` and swaps it in, or records and returns the error (keeping the snapshot).
    /// The text is dropped before freed memory is handed back: a multi-megabyte file sits
    /// below the mmap threshold, on the heap.
    fn apply_text(&self, text: String, source: &str, hash: u64) -> Result<(), ConfigError> {
        let parsed = load_str(&text, source);
        drop(text);
        match parsed {
            Ok(s) => {
                self.replace(s);
                *lock(&self.content_hash) = Some(hash);
                release_freed_memory();
                Ok(())
            }
            Err(e) => {
                *lock(&self.last_error) = Some(e.clone());
                Err(e)
            }
        }
    }
}

/// Parsing a large file peaks at several times the size of the resulting snapshot; glibc keeps
/// that freed heap mapped. Hand it back so resident memory reflects the live configuration.
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Reads `path` and swaps the result into `store`; on error the store keeps its snapshot.
pub fn reload_now(path: &Path, store: &ConfigStore) -> Result<(), ConfigError> {
    let source = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| read_error(&source, &e))?;
    let text = String::from_utf8(bytes).map_err(|e| ConfigError {
        file: source.clone(),
        document: None,
        resource: None,
        field: None,
        message: format!("not UTF-8: {e}"),
    })?;
    let hash = hash_of(text.as_bytes());
    store.apply_text(text, &source, hash)
}

fn read_error(source: &str, e: &std::io::Error) -> ConfigError {
    ConfigError {
        file: source.to_string(),
        document: None,
        resource: None,
        field: None,
        message: format!("cannot read: {e}"),
    }
}

/// What identifies one version of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    mtime: Option<SystemTime>,
    len: u64,
    hash: u64,
}

/// Polls `path` every `interval` and reloads it into `store` when its content changes
/// (modification time, length and a content hash are compared, so in-place writes within one
/// mtime tick and editors that write a new file and rename it over the old one both work).
/// A file that fails to load is logged once per distinct content; the previous snapshot stays.
pub fn spawn_file_watcher(
    path: PathBuf,
    store: Arc<ConfigStore>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let source = path.display().to_string();
        let mut last: Option<Fingerprint> = None;
        let mut read_failing = false;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let read = async {
                let meta = tokio::fs::metadata(&path).await?;
                let bytes = tokio::fs::read(&path).await?;
                Ok::<_, std::io::Error>((meta, bytes))
            };
            let (meta, bytes) = match read.await {
                Ok(v) => v,
                Err(e) => {
                    // Briefly missing during a rename is normal; report a lasting failure once.
                    if !read_failing {
                        tracing::warn!(file = %source, "config file unreadable, keeping current snapshot: {e}");
                        read_failing = true;
                    }
                    continue;
                }
            };
            read_failing = false;
            let fp = Fingerprint {
                mtime: meta.modified().ok(),
                len: meta.len(),
                hash: hash_of(&bytes),
            };
            if last == Some(fp) {
                continue;
            }
            let changed = last.map_or(store.loaded_hash() != Some(fp.hash), |l| l.hash != fp.hash);
            last = Some(fp);
            if !changed {
                continue;
            }
            // Parsing a large file takes a while: off the runtime thread, so the accept loops
            // that share it keep accepting.
            let (parse_store, parse_source) = (store.clone(), source.clone());
            let parsed = tokio::task::spawn_blocking(move || match String::from_utf8(bytes) {
                Ok(text) => parse_store.apply_text(text, &parse_source, fp.hash),
                Err(e) => Err(ConfigError {
                    file: parse_source.clone(),
                    document: None,
                    resource: None,
                    field: None,
                    message: format!("not UTF-8: {e}"),
                }),
            })
            .await;
            let result = parsed.unwrap_or_else(|e| {
                Err(ConfigError {
                    file: source.clone(),
                    document: None,
                    resource: None,
                    field: None,
                    message: format!("loading failed: {e}"),
                })
            });
            match result {
                Ok(()) => {
                    tracing::info!(file = %source, generation = store.generation(), "configuration reloaded")
                }
                Err(e) => {
                    *lock(&store.last_error) = Some(e.clone());
                    tracing::error!(file = %source, "configuration rejected, keeping the previous snapshot: {e}");
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempFile(PathBuf);
    impl TempFile {
        fn new(tag: &str) -> Self {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            TempFile(std::env::temp_dir().join(format!(
                "common-config-{tag}-{}-{nanos}.yaml",
                std::process::id()
            )))
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn config(ip: &str) -> String {
        format!("workloads:\n- {{name: w, workloadIps: [\"{ip}\"]}}\n")
    }

    async fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn first_ip(store: &ConfigStore) -> String {
        store.current().workloads[0].workload_ips[0].to_string()
    }

    #[test]
    fn replace_bumps_generation() {
        let store = ConfigStore::default();
        assert_eq!(store.generation(), 0);
        assert!(store.current().workloads.is_empty());
        let s = load_str(&config("10.0.0.1"), "x").expect("valid");
        store.replace(s);
        assert_eq!(store.generation(), 1);
        assert_eq!(store.current().workloads.len(), 1);
    }

    #[test]
    fn reload_now_keeps_snapshot_on_error() {
        let f = TempFile::new("reload");
        std::fs::write(&f.0, config("10.0.0.1")).expect("write");
        let store = ConfigStore::from_file(&f.0).expect("loads");
        assert_eq!(store.generation(), 0);
        std::fs::write(&f.0, "workloads: [{name: w, bogus: 1}]\n").expect("write");
        let e = reload_now(&f.0, &store).expect_err("bad config");
        assert!(e.to_string().contains("unknown field `bogus`"), "{e}");
        assert_eq!(store.last_error(), Some(e));
        assert_eq!(first_ip(&store), "10.0.0.1");
        std::fs::write(&f.0, config("10.0.0.2")).expect("write");
        reload_now(&f.0, &store).expect("valid");
        assert_eq!(first_ip(&store), "10.0.0.2");
        assert_eq!(store.generation(), 1);
        assert!(store.last_error().is_none());
        let missing =
            reload_now(Path::new("/nonexistent/dir/config.yaml"), &store).expect_err("missing");
        assert!(
            missing
                .to_string()
                .starts_with("/nonexistent/dir/config.yaml: cannot read"),
            "{missing}"
        );
    }

    #[tokio::test]
    async fn watcher_reloads_rejects_and_follows_renames() {
        let f = TempFile::new("watch");
        std::fs::write(&f.0, config("10.0.0.1")).expect("write");
        let store = Arc::new(ConfigStore::from_file(&f.0).expect("loads"));
        let task = spawn_file_watcher(f.0.clone(), store.clone(), Duration::from_millis(20));

        // Unchanged content: no reload.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.generation(), 0);

        // Same length, rewritten in place.
        std::fs::write(&f.0, config("10.0.0.2")).expect("write");
        wait_for("first reload", || store.generation() == 1).await;
        assert_eq!(first_ip(&store), "10.0.0.2");

        // A bad update is rejected and the snapshot stays.
        std::fs::write(
            &f.0,
            "workloads: [{name: w, workloadIps: [\"not-an-ip\"]}]\n",
        )
        .expect("write");
        wait_for("error", || store.last_error().is_some()).await;
        assert_eq!(store.generation(), 1);
        assert_eq!(first_ip(&store), "10.0.0.2");

        // Write-new-then-rename, as editors do.
        let tmp = TempFile::new("watch-tmp");
        std::fs::write(&tmp.0, config("10.0.0.3")).expect("write");
        std::fs::rename(&tmp.0, &f.0).expect("rename");
        wait_for("reload after rename", || store.generation() == 2).await;
        assert_eq!(first_ip(&store), "10.0.0.3");
        assert!(store.last_error().is_none());

        // Temporarily missing file: nothing changes.
        std::fs::remove_file(&f.0).expect("remove");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.generation(), 2);
        std::fs::write(&f.0, config("10.0.0.4")).expect("write");
        wait_for("reload after re-create", || store.generation() == 3).await;
        task.abort();
    }
}
