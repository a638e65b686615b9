//! The body type the waypoint moves between legs (a boxed stream of bytes, built from the
//! downstream request, an upstream response, or a local reply), a wrapper that counts
//! the bytes of a body and runs a completion hook when it ends (access log, metrics), and
//! [`Replayable`]: a request body streamed to the first attempt while a bounded copy is kept
//! for retries and mirrors.

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{combinators::BoxBody, BodyExt, Collected, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::watch;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub fn incoming(b: hyper::body::Incoming) -> Body {
    b.map_err(|e| Box::new(e) as BoxError).boxed()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// Runs once with the byte count when a counted body ends, fails or is dropped.
pub type OnDone = Box<dyn FnOnce(u64) + Send + Sync>;

/// Counts the data bytes flowing through `inner` into `count`.
pub struct Counted {
    inner: Body,
    count: Arc<AtomicU64>,
    on_done: Option<OnDone>,
}

impl Counted {
    pub fn wrap(inner: Body, count: Arc<AtomicU64>, on_done: Option<OnDone>) -> Body {
        Counted {
            inner,
            count,
            on_done,
        }
        .boxed()
    }

    fn finish(&mut self) {
        if let Some(done) = self.on_done.take() {
            done(self.count.load(Ordering::Relaxed));
        }
    }
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A whole request body kept in memory: its data chunks and trailers.
#[derive(Debug, Default)]
pub struct Replay {
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Replay {
    pub fn from_collected(c: Collected<Bytes>) -> Replay {
        let trailers = c.trailers().cloned();
        let data = c.to_bytes();
        Replay {
            chunks: if data.is_empty() {
                Vec::new()
            } else {
                vec![data]
            },
            trailers,
        }
    }

    /// A fresh body with the same data and trailers (exact size, so HTTP/1.1 sends a
    /// `content-length`).
    pub fn body(&self) -> Body {
        Prefixed::new(
            self.chunks.iter().cloned().collect(),
            self.trailers.clone(),
            None,
        )
        .boxed()
    }
}

/// Data chunks already in memory, then trailers, then (optionally) the rest of a body.
struct Prefixed {
    prefix: VecDeque<Bytes>,
    prefix_len: u64,
    trailers: Option<HeaderMap>,
    rest: Option<Body>,
}

impl Prefixed {
    fn new(prefix: VecDeque<Bytes>, trailers: Option<HeaderMap>, rest: Option<Body>) -> Self {
        let prefix_len = prefix.iter().map(|c| c.len() as u64).sum();
        Prefixed {
            prefix,
            prefix_len,
            trailers,
            rest,
        }
    }
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(c) = self.prefix.pop_front() {
            self.prefix_len -= c.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let rest = match &self.rest {
            Some(r) => r.size_hint(),
            None => SizeHint::with_exact(0),
        };
        let mut h = SizeHint::new();
        if let Some(upper) = rest.upper() {
            h.set_upper(upper.saturating_add(self.prefix_len));
        }
        h.set_lower(rest.lower().saturating_add(self.prefix_len));
        h
    }
}

/// How much of a streamed request body is known.
enum Capture {
    /// An attempt is streaming the body (or has not ended it yet).
    Streaming,
    /// The whole body, within the cap.
    Complete(Arc<Replay>),
    /// The attempt dropped the body before its end (e.g. the connection to the endpoint
    /// failed): what it had read (all of it kept) and the unread rest, for another attempt.
    Unfinished(VecDeque<Bytes>, Body),
    /// The body outgrew the cap or failed: it cannot be sent again.
    Lost,
}

/// A request body that may be sent more than once (retries, mirrors), Envoy-style: a body
/// known to be small is buffered whole before the first attempt ([`Replayable::buffered`]);
/// any other body is streamed to the first attempt at once while a copy of up to `cap` bytes
/// is kept ([`Replayable::streamed`]), so streaming calls (gRPC bidi and client streaming)
/// are never held back. Once the copy outgrows the cap the body can no longer be replayed.
pub struct Replayable {
    state: Arc<watch::Sender<Capture>>,
    cap: u64,
}

impl Replayable {
    /// A body already read whole; returns the body for the first attempt.
    pub fn buffered(replay: Replay) -> (Replayable, Body) {
        let replay = Arc::new(replay);
        let first = replay.body();
        let (tx, _) = watch::channel(Capture::Complete(replay));
        (
            Replayable {
                state: Arc::new(tx),
                cap: 0,
            },
            first,
        )
    }

    /// Streams `body`, keeping a copy of up to `cap` bytes; returns the body for the first
    /// attempt.
    pub fn streamed(body: Body, cap: u64) -> (Replayable, Body) {
        let (tx, _) = watch::channel(Capture::Streaming);
        let r = Replayable {
            state: Arc::new(tx),
            cap,
        };
        let first = r.tee(body);
        (r, first)
    }

    fn tee(&self, inner: Body) -> Body {
        Tee {
            inner,
            kept: VecDeque::new(),
            len: 0,
            cap: self.cap,
            trailers: None,
            done: false,
            state: self.state.clone(),
        }
        .boxed()
    }

    /// The body for another attempt: a copy of the whole body, or (when the last attempt gave
    /// the body back unfinished) what was read followed by the unread rest. `None` when the
    /// body outgrew the cap, failed, or is still held by an earlier attempt (the endpoint
    /// answered before the request ended); the request is then not retried.
    pub fn again(&self) -> Option<Body> {
        let mut taken = None;
        self.state.send_if_modified(|s| match s {
            Capture::Unfinished(..) => {
                taken = Some(std::mem::replace(s, Capture::Streaming));
                true
            }
            _ => false,
        });
        match taken {
            Some(Capture::Unfinished(kept, rest)) => {
                Some(self.tee(Prefixed::new(kept, None, Some(rest)).boxed()))
            }
            _ => match &*self.state.borrow() {
                Capture::Complete(r) => Some(r.body()),
                _ => None,
            },
        }
    }

    /// Resolves to the whole body once the request body has ended within the cap (for a
    /// mirror), or to `None` when it cannot be replayed.
    pub fn whole(&self) -> impl Future<Output = Option<Arc<Replay>>> + Send + 'static {
        let mut rx = self.state.subscribe();
        async move {
            let r = rx
                .wait_for(|s| matches!(s, Capture::Complete(_) | Capture::Lost))
                .await
                .ok()?;
            match &*r {
                Capture::Complete(r) => Some(r.clone()),
                _ => None,
            }
        }
    }
}

impl Drop for Replayable {
    fn drop(&mut self) {
        // A body given back unfinished and not retried: nobody will send it again.
        self.state.send_if_modified(|s| {
            if matches!(s, Capture::Unfinished(..)) {
                *s = Capture::Lost;
                true
            } else {
                false
            }
        });
    }
}

/// Passes a body through, keeping a copy of its frames up to `cap` bytes of data.
struct Tee {
    inner: Body,
    kept: VecDeque<Bytes>,
    len: u64,
    cap: u64,
    trailers: Option<HeaderMap>,
    /// The outcome has been published (complete or lost).
    done: bool,
    state: Arc<watch::Sender<Capture>>,
}

impl Tee {
    fn publish(&mut self, c: Capture) {
        if !self.done {
            self.done = true;
            self.kept = VecDeque::new();
            self.state.send_replace(c);
        }
    }

    fn complete(&mut self) {
        let replay = Replay {
            chunks: std::mem::take(&mut self.kept).into(),
            trailers: self.trailers.take(),
        };
        self.publish(Capture::Complete(Arc::new(replay)));
    }
}

impl HttpBody for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if self.done {
            return r;
        }
        if Arc::strong_count(&self.state) == 1 && self.state.receiver_count() == 0 {
            // The request is past its retry decisions and no mirror waits: a long-lived
            // stream (gRPC bidi) stops keeping a copy nobody will use.
            self.done = true;
            self.kept = VecDeque::new();
            return r;
        }
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let len = self.len + d.len() as u64;
                    if len > self.cap {
                        self.publish(Capture::Lost);
                    } else if !d.is_empty() {
                        let d = d.clone();
                        self.kept.push_back(d);
                        self.len = len;
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    self.trailers = Some(t.clone());
                }
                if !self.done && self.inner.is_end_stream() {
                    self.complete();
                }
            }
            Poll::Ready(None) => self.complete(),
            Poll::Ready(Some(Err(_))) => self.publish(Capture::Lost),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.trailers.is_some() {
            // Trailers end a body; a body dropped after them is complete.
            self.complete();
            return;
        }
        self.done = true;
        let kept = std::mem::take(&mut self.kept);
        let rest = std::mem::replace(&mut self.inner, full(Bytes::new()));
        self.state.send_replace(Capture::Unfinished(kept, rest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn counts_bytes_and_reports_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let count = Arc::new(AtomicU64::new(0));
        let body = Counted::wrap(
            full(vec![1u8; 1234]),
            count.clone(),
            Some(Box::new(move |n| s.lock().unwrap().push(n))),
        );
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 1234);
        assert_eq!(count.load(Ordering::Relaxed), 1234);
        assert_eq!(*seen.lock().unwrap(), vec![1234]);
    }

    /// A body of `chunks` frames; with `open` it never ends after them.
    fn chunked(chunks: &[&'static str], open: bool) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        let s = futures_util::stream::iter(frames);
        if open {
            let s = futures_util::StreamExt::chain(s, futures_util::stream::pending());
            http_body_util::StreamBody::new(s).boxed()
        } else {
            http_body_util::StreamBody::new(s).boxed()
        }
    }

    async fn text(b: Body) -> String {
        String::from_utf8(b.collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn streamed_body_within_cap_replays_and_mirrors() {
        let (r, first) = Replayable::streamed(chunked(&["ab", "cd", "ef"], false), 100);
        let whole = r.whole();
        assert!(
            r.again().is_none(),
            "the first attempt still holds the body"
        );
        assert_eq!(text(first).await, "abcdef");
        let again = r.again().expect("kept whole");
        assert_eq!(again.size_hint().exact(), Some(6));
        assert_eq!(text(again).await, "abcdef");
        assert_eq!(text(r.again().unwrap()).await, "abcdef");
        let w = whole.await.expect("mirror gets the body");
        assert_eq!(text(w.body()).await, "abcdef");
    }

    #[tokio::test]
    async fn streamed_body_over_cap_is_not_replayed() {
        let (r, first) = Replayable::streamed(chunked(&["abcd", "efgh", "ij"], false), 6);
        let whole = r.whole();
        // The first attempt still gets all of it.
        assert_eq!(text(first).await, "abcdefghij");
        assert!(r.again().is_none());
        assert!(whole.await.is_none());
    }

    #[tokio::test]
    async fn unread_or_partly_read_body_is_given_back_for_the_next_attempt() {
        // Never polled (the connection to the endpoint failed): dropped whole.
        let (r, first) = Replayable::streamed(chunked(&["ab", "cd"], false), 100);
        drop(first);
        assert_eq!(text(r.again().expect("given back")).await, "abcd");
        // Read in part, then dropped: what was read comes first, then the rest.
        let (r, mut first) = Replayable::streamed(chunked(&["ab", "cd", "ef"], false), 100);
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.data_ref().unwrap().as_ref(), b"ab");
        drop(first);
        let whole = r.whole();
        let mut second = r.again().expect("given back");
        assert_eq!(second.size_hint().lower(), 2);
        let f = second.frame().await.unwrap().unwrap();
        assert_eq!(f.data_ref().unwrap().as_ref(), b"ab");
        drop(second);
        // Given back a second time, and this time read to the end.
        assert_eq!(text(r.again().expect("given back again")).await, "abcdef");
        assert_eq!(text(whole.await.unwrap().body()).await, "abcdef");
        assert_eq!(text(r.again().unwrap()).await, "abcdef");
    }

    #[tokio::test]
    async fn open_stream_is_forwarded_without_waiting_for_its_end() {
        let (r, mut first) = Replayable::streamed(chunked(&["hello"], true), 100);
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.data_ref().unwrap().as_ref(), b"hello");
        assert!(r.again().is_none());
        // Nobody retries: once the request is done, a waiting mirror gives up.
        let whole = r.whole();
        drop(first);
        drop(r);
        assert!(whole.await.is_none());
    }

    #[tokio::test]
    async fn buffered_body_replays_with_trailers() {
        let mut t = HeaderMap::new();
        t.insert("grpc-x", http::HeaderValue::from_static("1"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"xyz"))),
            Ok(Frame::trailers(t)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let replay = Replay::from_collected(body.collect().await.unwrap());
        let (r, first) = Replayable::buffered(replay);
        assert_eq!(first.size_hint().exact(), Some(3));
        let c = first.collect().await.unwrap();
        assert_eq!(c.trailers().unwrap()["grpc-x"], "1");
        assert_eq!(c.to_bytes().as_ref(), b"xyz");
        let again = r.again().unwrap().collect().await.unwrap();
        assert!(again.trailers().is_some());
        assert!(r.whole().await.is_some());
    }

    #[test]
    fn dropped_body_still_reports() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        drop(Counted::wrap(
            full("abc"),
            Arc::new(AtomicU64::new(0)),
            Some(Box::new(move |n| s.lock().unwrap().push(n))),
        ));
        assert_eq!(*seen.lock().unwrap(), vec![0]);
    }
}
