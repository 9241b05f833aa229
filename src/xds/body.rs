//! The HTTP/2 body of an ADS stream: gRPC messages framed here rather than by
//! tonic's encoder, so a ServiceEntry set goes out without a copy per stream.
//!
//! tonic's encoder writes every message into the stream's own buffer, which for
//! a full set is a copy of every resource (3.7 MB at 10,000 services) per stream
//! per push. Here a message is its length-prefixed envelope around the
//! snapshot's shared `resources` field ([`Snapshot::resources_field`]): the
//! envelope is a few dozen bytes per stream, the resources are handed to the
//! connection as the same `Bytes` on every stream. The bytes on the wire are
//! those tonic would send (gRPC framing, no compression, `grpc-status` trailers).
//!
//! [`Snapshot::resources_field`]: crate::snapshot::Snapshot::resources_field

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use prost::Message;
use prost::bytes::{BufMut, Bytes, BytesMut};
use tokio_stream::Stream;
use tonic::Status;
use tonic::codegen::http::HeaderMap;

use super::outbox::Outgoing;
use super::response::DiscoveryResponse;

/// gRPC's message prefix: a compressed flag and a 32-bit big-endian length.
const GRPC_HEADER_LEN: usize = 5;

/// The response body of one `StreamAggregatedResources` call.
#[derive(Debug)]
pub struct ResponseBody {
    outgoing: Outgoing,
    /// Encoded data not yet handed to the connection.
    ready: VecDeque<Bytes>,
    /// Small parts (prefixes, envelopes, resource-less responses) gathered into one chunk.
    small: BytesMut,
    /// How the stream ends, once `outgoing` has: OK or the stream's error.
    end: Option<Status>,
    ended: bool,
}

impl ResponseBody {
    pub fn new(outgoing: Outgoing) -> Self {
        ResponseBody { outgoing, ready: VecDeque::new(), small: BytesMut::new(), end: None, ended: false }
    }

    /// Appends one message. Returns whether it carried the shared resources: the caller
    /// then stops taking messages until they are on their way, as tonic's encoder does
    /// past its buffer threshold, so a newer set can still replace one not yet taken.
    fn push(&mut self, response: &DiscoveryResponse) -> Result<bool, Status> {
        let len = response.encoded_len();
        let len = u32::try_from(len).map_err(|_| {
            Status::resource_exhausted(format!(
                "Cannot return body with more than 4GB of data but got {len} bytes"
            ))
        })?;
        self.small.reserve(GRPC_HEADER_LEN + response.version_info.len() + 128);
        self.small.put_u8(0); // not compressed
        self.small.put_u32(len);
        response.encode_head(&mut self.small);
        let resources = response.resources_field();
        if let Some(resources) = &resources {
            self.ready.push_back(self.small.split().freeze());
            self.ready.push_back(resources.clone());
        }
        response.encode_tail(&mut self.small);
        Ok(resources.is_some())
    }

    fn flush_small(&mut self) {
        if !self.small.is_empty() {
            self.ready.push_back(self.small.split().freeze());
        }
    }

    /// Takes responses from the outbox while they are ready.
    fn fill(&mut self, cx: &mut Context<'_>) {
        while self.end.is_none() {
            match Pin::new(&mut self.outgoing).poll_next(cx) {
                Poll::Ready(Some(Ok(response))) => match self.push(&response) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(status) => self.end = Some(status),
                },
                Poll::Ready(Some(Err(status))) => self.end = Some(status),
                Poll::Ready(None) => self.end = Some(Status::ok("")),
                Poll::Pending => break,
            }
        }
        self.flush_small();
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
        if this.ready.is_empty() && !this.ended {
            this.fill(cx);
        }
        if let Some(data) = this.ready.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match this.end.take() {
            Some(status) => {
                this.ended = true;
                let mut trailers = HeaderMap::with_capacity(3);
                Poll::Ready(Some(status.add_header(&mut trailers).map(|()| Frame::trailers(trailers))))
            }
            None if this.ended => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.ready.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prost::Message;

    use super::*;
    use crate::proto::envoy::service::discovery::v3::{ControlPlane, DiscoveryResponse as Generated};
    use crate::snapshot::Snapshot;
    use crate::xds::outbox;
    use crate::xds::response::Resources;

    /// Every data byte and the trailers of a body.
    async fn collect(mut body: ResponseBody) -> (Vec<u8>, HeaderMap) {
        let mut data = Vec::new();
        loop {
            let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            let frame = frame.expect("trailers end the body").unwrap();
            match frame.into_data() {
                Ok(chunk) => data.extend_from_slice(&chunk),
                Err(frame) => {
                    let trailers = frame.into_trailers().unwrap();
                    assert!(body.is_end_stream());
                    let end = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
                    assert!(end.is_none(), "nothing after the trailers");
                    return (data, trailers);
                }
            }
        }
    }

    fn response(snapshot: &Arc<Snapshot>, type_url: &str, nonce: &str) -> DiscoveryResponse {
        let resources = if type_url.ends_with("ServiceEntry") {
            Resources::of(snapshot.clone())
        } else {
            Resources::none()
        };
        DiscoveryResponse {
            version_info: snapshot.version.clone(),
            resources,
            type_url: type_url.into(),
            nonce: nonce.into(),
            control_plane: Some(ControlPlane { identifier: "cloudmap-xds".into() }),
        }
    }

    /// gRPC framing as tonic writes it: a zero flag, the length, the message.
    fn framed(messages: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            out.push(0);
            out.extend_from_slice(&(m.len() as u32).to_be_bytes());
            out.extend_from_slice(m);
        }
        out
    }

    #[tokio::test]
    async fn sends_the_bytes_tonic_would_and_ends_with_grpc_status() {
        let snapshot = crate::xds::response::tests::snapshot(200);
        let (tx, rx) = outbox::channel(4);
        let sent = [
            response(&snapshot, "networking.istio.io/v1/VirtualService", "1"),
            response(&snapshot, "networking.istio.io/v1/ServiceEntry", "2"),
            response(&snapshot, "networking.istio.io/v1/Gateway", "3"),
        ];
        for r in &sent {
            tx.send(r.clone()).await.unwrap();
        }
        drop(tx);
        let (bytes, trailers) = collect(ResponseBody::new(rx)).await;
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        let generated: Vec<Vec<u8>> = sent
            .iter()
            .map(|r| {
                Generated {
                    version_info: r.version_info.clone(),
                    resources: if r.resources.is_empty() { vec![] } else { snapshot.encoded_resources() },
                    canary: false,
                    type_url: r.type_url.clone(),
                    nonce: r.nonce.clone(),
                    control_plane: r.control_plane.clone(),
                }
                .encode_to_vec()
            })
            .collect();
        assert_eq!(bytes, framed(&generated));
    }

    #[tokio::test]
    async fn streams_of_one_push_share_one_encoding_of_the_resources() {
        let snapshot = crate::xds::response::tests::snapshot(50);
        let first =
            response(&snapshot, "networking.istio.io/v1/ServiceEntry", "1").resources_field().unwrap();
        let second =
            response(&snapshot, "networking.istio.io/v1/ServiceEntry", "9").resources_field().unwrap();
        assert_eq!(first.as_ptr(), second.as_ptr(), "the same buffer, not a copy");
        assert_eq!(first.len(), snapshot.resources_field_len());
        drop((first, second));
        let again =
            response(&snapshot, "networking.istio.io/v1/ServiceEntry", "10").resources_field().unwrap();
        assert_eq!(again.len(), snapshot.resources_field_len(), "encoded again once nobody held it");
    }

    #[tokio::test]
    async fn a_stream_closed_with_an_error_ends_with_its_status_after_what_is_queued() {
        let snapshot = crate::xds::response::tests::snapshot(3);
        let (tx, rx) = outbox::channel(4);
        tx.send(response(&snapshot, "networking.istio.io/v1/ServiceEntry", "1")).await.unwrap();
        tx.close_with(Status::resource_exhausted("limit"));
        let (bytes, trailers) = collect(ResponseBody::new(rx)).await;
        assert_eq!(
            trailers.get("grpc-status").unwrap(),
            &(tonic::Code::ResourceExhausted as i32).to_string()
        );
        assert_eq!(trailers.get("grpc-message").unwrap(), "limit");
        let decoded = Generated::decode(&bytes[GRPC_HEADER_LEN..]).unwrap();
        assert_eq!(decoded.resources.len(), 3);
    }
}
