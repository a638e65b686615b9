//! The body type the waypoint moves between legs (a boxed stream of bytes, built from the
//! downstream request, an upstream response, or a local reply), and a wrapper that counts
//! the bytes of a body and runs a completion hook when it ends (access log, metrics).

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

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
