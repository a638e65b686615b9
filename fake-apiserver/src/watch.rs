//! Watch streams: newline-delimited JSON events from the event log after a resourceVersion
//! (or synthetic ADDED events for the current state), selector-aware ADDED/DELETED
//! translation, periodic BOOKMARKs, `timeoutSeconds`, and the ERROR 410 for expired RVs.

use crate::http::Body;
use crate::resources::ResourceType;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::store::{gk, EventType, LogEntry};
use crate::Shared;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::Response;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A parsed watch request.
pub(crate) struct WatchParams {
    pub rt: ResourceType,
    pub version: String,
    pub ns: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// Start after this RV; None: start with the current state as ADDED events.
    pub rv: Option<u64>,
    /// `sendInitialEvents=true`: end the initial events with a marked BOOKMARK.
    pub initial_events_end: bool,
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
}

impl WatchParams {
    fn selects(&self, obj: &Value) -> bool {
        let ns_ok = self.ns.as_deref().is_none_or(|ns| {
            obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns)
        });
        ns_ok && self.labels.matches(obj) && self.fields.matches(obj)
    }

    fn render(&self, obj: &Value) -> Value {
        let mut o = obj.clone();
        o["apiVersion"] = json!(self.rt.api_version(&self.version));
        o["kind"] = json!(self.rt.kind);
        o
    }

    /// The event a watcher with these filters sees for one change, if any.
    fn translate(&self, e: &LogEntry) -> Option<Bytes> {
        if e.gk != gk(&self.rt) {
            return None;
        }
        let now = self.selects(&e.object);
        let before = e.old.as_deref().is_some_and(|o| self.selects(o));
        let etype = match (e.etype, before, now) {
            (EventType::Added, _, true) => EventType::Added,
            (EventType::Modified, true, true) => EventType::Modified,
            (EventType::Modified, false, true) => EventType::Added,
            (EventType::Modified, true, false) => EventType::Deleted,
            (EventType::Deleted, b, n) if b || n => EventType::Deleted,
            _ => return None,
        };
        Some(line(etype.as_str(), self.render(&e.object)))
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(
            "BOOKMARK",
            json!({"kind": self.rt.kind, "apiVersion": self.rt.api_version(&self.version), "metadata": meta}),
        )
    }
}

fn line(etype: &str, object: Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": etype, "object": object})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Counts a watch as open for as long as its task runs.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts a watch: the response is a 200 whose chunked body carries the events.
pub(crate) async fn serve(shared: Arc<Shared>, p: WatchParams) -> Response<Body> {
    let mut paused = shared.paused_tx.subscribe();
    // The sender lives in `shared`, so this only returns once watches are resumed.
    let _ = paused.wait_for(|p| !*p).await;
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(run(shared.clone(), p, tx, OpenGuard(shared)));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap_or_else(|_| Response::new(crate::http::empty()))
}

enum Step {
    Lines(Vec<Bytes>),
    Expired(Bytes),
}

async fn run(shared: Arc<Shared>, p: WatchParams, tx: mpsc::Sender<Bytes>, _guard: OpenGuard) {
    let mut close_rx = shared.close_tx.subscribe();
    let mut rv_rx = shared.rv_tx.subscribe();
    let deadline = p.timeout.map(|t| Instant::now() + t);
    let interval = shared.bookmark_interval();
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    rv_rx.borrow_and_update();
    let (mut cursor, first) = {
        let state = shared.lock();
        match p.rv {
            Some(rv) if rv < state.compacted() => {
                (rv, Step::Expired(expired(&shared, rv, state.compacted())))
            }
            Some(rv) => (rv, Step::Lines(Vec::new())),
            None => {
                let items = state.list(&p.rt, p.ns.as_deref(), None).unwrap_or_default();
                let lines = items
                    .iter()
                    .filter(|o| p.selects(o))
                    .map(|o| line("ADDED", p.render(o)))
                    .collect();
                (state.rv(), Step::Lines(lines))
            }
        }
    };
    match first {
        Step::Expired(err) => {
            let _ = tx.send(err).await;
            return;
        }
        Step::Lines(lines) => {
            for l in lines {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
        }
    }
    if p.initial_events_end && p.bookmarks && tx.send(p.bookmark(cursor, true)).await.is_err() {
        return;
    }

    loop {
        rv_rx.borrow_and_update();
        let step = {
            let state = shared.lock();
            if cursor < state.compacted() {
                Step::Expired(expired(&shared, cursor, state.compacted()))
            } else {
                let lines = state
                    .events_after(cursor)
                    .iter()
                    .filter_map(|e| p.translate(e))
                    .collect();
                cursor = cursor.max(state.rv());
                Step::Lines(lines)
            }
        };
        match step {
            Step::Expired(err) => {
                let _ = tx.send(err).await;
                return;
            }
            Step::Lines(lines) => {
                for l in lines {
                    if tx.send(l).await.is_err() {
                        return;
                    }
                }
            }
        }
        let timeout = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = rv_rx.changed() => if r.is_err() { return },
            _ = close_rx.changed() => return,
            _ = ticker.tick(), if p.bookmarks => {
                if tx.send(p.bookmark(cursor, false)).await.is_err() {
                    return;
                }
            }
            _ = timeout => return,
            _ = tx.closed() => return,
        }
    }
}

fn expired(shared: &Shared, rv: u64, compacted: u64) -> Bytes {
    shared.expired_watches.fetch_add(1, Ordering::SeqCst);
    line(
        "ERROR",
        crate::error::ApiError::expired(rv, compacted).status(),
    )
}
