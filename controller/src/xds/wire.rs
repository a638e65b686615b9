//! ADS responses on the wire. A response is kept as its small fields plus the resources'
//! encodings shared with the cache ([`Outgoing`]); its gRPC message is written out while it is
//! sent, in chunks of [`CHUNK`] bytes ([`ResponseBody`]), instead of being copied whole into a
//! per-stream buffer first. A stream's memory for a 5 MB first response is then the list of
//! shared encodings and one chunk, not two copies of the 5 MB (the message, and tonic's
//! encode buffer, which would stay at that size for the life of the stream: 5 MB per
//! connected Istio ztunnel, which cannot take a first response in parts).

use bytes::{BufMut, Bytes, BytesMut};
use common::xds::discovery::{DeltaDiscoveryResponse, Resource};
use hyper::body::{Body, Frame, SizeHint};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tonic::Status;

/// Bytes per body chunk: copies of small resources are gathered up to this size; a resource at
/// least this large is sent as it is, without a copy.
pub const CHUNK: usize = 64 << 10;

/// `DeltaDiscoveryResponse.resources` (field 2, length-delimited).
const RESOURCES_FIELD: u32 = 2;

/// gRPC message prefix: compressed flag and big-endian length.
const GRPC_HEADER: usize = 5;

/// A `DeltaDiscoveryResponse` whose resources are already encoded (`envoy...Resource`
/// messages, shared with the cache and every other stream sending them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outgoing {
    /// `"partial"` on every part of a split first response but the last.
    pub system_version_info: String,
    /// Encoded `Resource` messages.
    pub resources: Vec<Bytes>,
    /// Type URL.
    pub type_url: String,
    /// Nonce the client answers with.
    pub nonce: String,
    /// Names the client should drop.
    pub removed_resources: Vec<String>,
}

impl Outgoing {
    /// Everything but the resources, as a message.
    fn head(&self) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            system_version_info: self.system_version_info.clone(),
            resources: Vec::new(),
            type_url: self.type_url.clone(),
            nonce: self.nonce.clone(),
            removed_resources: self.removed_resources.clone(),
        }
    }

    /// Length of the resources' part of the encoded message.
    fn resources_len(resources: &[Bytes]) -> usize {
        resources
            .iter()
            .map(|r| key_len(RESOURCES_FIELD) + encoded_len_varint(r.len() as u64) + r.len())
            .sum()
    }

    /// Length of the encoded message.
    pub fn encoded_len(&self) -> usize {
        self.head().encoded_len() + Self::resources_len(&self.resources)
    }

    /// The response as a message (tests, debugging); a resource that does not decode is left
    /// out.
    pub fn message(&self) -> DeltaDiscoveryResponse {
        let mut m = self.head();
        m.resources = self
            .resources
            .iter()
            .filter_map(|r| Resource::decode(r.clone()).ok())
            .collect();
        m
    }
}

/// Writes one [`Outgoing`] as a gRPC message, a chunk at a time.
struct Encoder {
    resources: Vec<Bytes>,
    /// The gRPC prefix and the head fields, until taken.
    head: Option<Bytes>,
    /// Next resource to write.
    next: usize,
    /// The unwritten rest of a resource split across chunks.
    rest: Option<Bytes>,
}

impl Encoder {
    /// Fails (as tonic does, with `OUT_OF_RANGE`) when the message is over `max` bytes.
    fn new(out: Outgoing, max: usize) -> Result<Self, Status> {
        let head = DeltaDiscoveryResponse {
            system_version_info: out.system_version_info,
            resources: Vec::new(),
            type_url: out.type_url,
            nonce: out.nonce,
            removed_resources: out.removed_resources,
        };
        let len = head.encoded_len() + Outgoing::resources_len(&out.resources);
        if len > max || len > u32::MAX as usize {
            return Err(Status::out_of_range(format!(
                "Error, encoded message length too large: found {len} bytes, the limit is: {max} bytes"
            )));
        }
        let mut b = BytesMut::with_capacity(GRPC_HEADER + head.encoded_len());
        b.put_u8(0);
        b.put_u32(len as u32);
        head.encode(&mut b)
            .map_err(|e| Status::internal(format!("encoding a response: {e}")))?;
        Ok(Encoder {
            resources: out.resources,
            head: Some(b.freeze()),
            next: 0,
            rest: None,
        })
    }

    /// The next chunk of the message; `None` once all of it was returned.
    fn next_chunk(&mut self) -> Option<Bytes> {
        let mut buf = BytesMut::new();
        loop {
            // The head, the rest of a split resource, or the next resource (after its field
            // key and length).
            let (piece, prefixed) = match self.head.take().or_else(|| self.rest.take()) {
                Some(p) => (p, false),
                None => {
                    let Some(r) = self.resources.get(self.next) else {
                        break;
                    };
                    self.next += 1;
                    (r.clone(), true)
                }
            };
            if buf.is_empty() && !prefixed && piece.len() >= CHUNK {
                return Some(piece);
            }
            if buf.capacity() == 0 {
                buf.reserve(CHUNK + 16);
            }
            if prefixed {
                encode_key(RESOURCES_FIELD, WireType::LengthDelimited, &mut buf);
                encode_varint(piece.len() as u64, &mut buf);
            }
            let room = CHUNK.saturating_sub(buf.len());
            if piece.len() <= room {
                buf.extend_from_slice(&piece);
            } else {
                buf.extend_from_slice(&piece[..room]);
                self.rest = Some(piece.slice(room..));
            }
            if buf.len() >= CHUNK {
                break;
            }
        }
        (!buf.is_empty()).then(|| buf.freeze())
    }
}

/// The response body of one ADS stream: the messages received from its driver, each written
/// out as it is sent (no more than one chunk ahead of the transport), then gRPC trailers with
/// the status the driver ended with (OK when it just went away).
pub struct ResponseBody {
    rx: mpsc::Receiver<Result<Outgoing, Status>>,
    current: Option<Encoder>,
    max_message: usize,
    done: bool,
}

impl ResponseBody {
    /// Sends what arrives on `rx`; a message over `max_message` bytes ends the stream with an
    /// error.
    pub fn new(rx: mpsc::Receiver<Result<Outgoing, Status>>, max_message: usize) -> Self {
        ResponseBody {
            rx,
            current: None,
            max_message,
            done: false,
        }
    }

    fn trailers(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        self.current = None;
        self.rx.close();
        let mut map = http::HeaderMap::new();
        match status.add_header(&mut map) {
            Ok(()) => Poll::Ready(Some(Ok(Frame::trailers(map)))),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(enc) = &mut this.current {
                match enc.next_chunk() {
                    Some(chunk) => return Poll::Ready(Some(Ok(Frame::data(chunk)))),
                    None => this.current = None,
                }
            }
            match this.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return this.trailers(Status::ok("")),
                Poll::Ready(Some(Err(status))) => return this.trailers(status),
                Poll::Ready(Some(Ok(out))) => match Encoder::new(out, this.max_message) {
                    Ok(enc) => this.current = Some(enc),
                    Err(status) => {
                        tracing::warn!(error = %status.message(), "xDS response not sent");
                        return this.trailers(status);
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn resource(name: &str, size: usize) -> Resource {
        Resource {
            name: name.into(),
            version: "v1".into(),
            resource: Some(prost_types::Any {
                type_url: "t".into(),
                value: vec![7; size],
            }),
            ..Default::default()
        }
    }

    fn outgoing(sizes: &[usize]) -> (Outgoing, DeltaDiscoveryResponse) {
        let resources: Vec<Resource> = sizes
            .iter()
            .enumerate()
            .map(|(i, s)| resource(&format!("r{i}"), *s))
            .collect();
        let expected = DeltaDiscoveryResponse {
            system_version_info: "partial".into(),
            resources: resources.clone(),
            type_url: "type.googleapis.com/istio.workload.Address".into(),
            nonce: "1-2".into(),
            removed_resources: vec!["gone".into(), "also".into()],
        };
        let out = Outgoing {
            system_version_info: expected.system_version_info.clone(),
            resources: resources
                .iter()
                .map(|r| Bytes::from(r.encode_to_vec()))
                .collect(),
            type_url: expected.type_url.clone(),
            nonce: expected.nonce.clone(),
            removed_resources: expected.removed_resources.clone(),
        };
        (out, expected)
    }

    /// Collects a body: the concatenated data (with each chunk's size) and the trailers.
    async fn collect(body: ResponseBody) -> (Vec<u8>, Vec<usize>, http::HeaderMap) {
        let mut body = std::pin::pin!(body);
        let (mut data, mut sizes, mut trailers) = (Vec::new(), Vec::new(), None);
        while let Some(f) = body.frame().await {
            let f = f.expect("frame");
            match f.into_data() {
                Ok(d) => {
                    sizes.push(d.len());
                    data.extend_from_slice(&d);
                }
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        (data, sizes, trailers.expect("trailers"))
    }

    /// Splits gRPC messages (uncompressed) from `data`.
    fn messages(mut data: &[u8]) -> Vec<DeltaDiscoveryResponse> {
        let mut v = Vec::new();
        while !data.is_empty() {
            assert_eq!(data[0], 0, "not compressed");
            let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
            v.push(DeltaDiscoveryResponse::decode(&data[5..5 + len]).expect("message"));
            data = &data[5 + len..];
        }
        v
    }

    #[tokio::test]
    async fn messages_are_what_prost_would_encode_in_bounded_chunks_then_ok() {
        // Small resources gathered into chunks, one split across chunks, one large enough
        // to go out as it is, an empty response.
        let (a, ea) = outgoing(&[10, 3000, 70_000, 5, 200_000, 1]);
        let (b, eb) = outgoing(&[]);
        let many: Vec<usize> = (0..5000).map(|i| 20 + i % 300).collect();
        let (c, ec) = outgoing(&many);
        assert_eq!(a.encoded_len(), ea.encoded_len());
        assert_eq!(a.message(), ea);
        let (tx, rx) = mpsc::channel(8);
        for o in [a, b, c] {
            tx.send(Ok(o)).await.expect("send");
        }
        drop(tx);
        let (data, sizes, trailers) = collect(ResponseBody::new(rx, usize::MAX)).await;
        assert_eq!(messages(&data), vec![ea, eb, ec]);
        // Copies are bounded; only the rest of the 200 KB resource goes out uncopied.
        assert_eq!(
            sizes.iter().filter(|s| **s > CHUNK + 16).count(),
            1,
            "chunk sizes {sizes:?}"
        );
        assert!(sizes.len() > 10, "the 700 KB response went in many chunks");
        assert_eq!(trailers.get("grpc-status").expect("status"), "0");
    }

    #[tokio::test]
    async fn a_message_over_the_limit_ends_the_stream_with_out_of_range() {
        let (small, es) = outgoing(&[10]);
        let (big, _) = outgoing(&[5000]);
        let (tx, rx) = mpsc::channel(8);
        tx.send(Ok(small)).await.expect("send");
        tx.send(Ok(big)).await.expect("send");
        let (data, _, trailers) = collect(ResponseBody::new(rx, 1000)).await;
        assert_eq!(messages(&data), vec![es]);
        assert_eq!(trailers.get("grpc-status").expect("status"), "11");
        assert!(tx.is_closed(), "the driver sees the stream gone");
    }

    #[tokio::test]
    async fn a_status_from_the_driver_becomes_the_trailers() {
        let (tx, rx) = mpsc::channel(8);
        tx.send(Err(Status::invalid_argument("bad request")))
            .await
            .expect("send");
        let (data, _, trailers) = collect(ResponseBody::new(rx, usize::MAX)).await;
        assert!(data.is_empty());
        let status = Status::from_header_map(&trailers).expect("a status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "bad request");
    }
}
