//! Bounds on what clients of the gRPC port can make a replica hold: concurrent
//! ADS streams and debug calls. A client over a bound is refused with
//! `RESOURCE_EXHAUSTED` naming the flag that sets it, and the refusal is counted
//! in `cloudmap_xds_grpc_refusals_total{limit}` (the label is the flag's name).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;

use crate::metrics::LimitLabels;

/// `limit` label values, one per flag (and one per fixed limit).
pub mod limit_names {
    pub const MAX_ADS_STREAMS: &str = "max-ads-streams";
    pub const MAX_DEBUG_CALLS: &str = "max-debug-calls";
    pub const MAX_REQUEST_SIZE: &str = "max-request-size";
    pub const MAX_RESPONSE_SIZE: &str = "max-response-size";
    pub const MAX_TYPE_URLS_PER_STREAM: &str = "max-type-urls-per-stream";
}

/// A fixed number of slots; a caller that finds none is refused, never queued.
#[derive(Debug, Clone)]
pub struct Slots {
    semaphore: Arc<Semaphore>,
    limit: u32,
    /// The flag's name without dashes, e.g. `max-ads-streams`.
    flag: &'static str,
    /// What a slot holds, for the message, e.g. `ADS streams`.
    what: &'static str,
    refusals: Family<LimitLabels, Counter>,
}

impl Slots {
    pub fn new(
        limit: u32,
        flag: &'static str,
        what: &'static str,
        refusals: Family<LimitLabels, Counter>,
    ) -> Self {
        Slots { semaphore: Arc::new(Semaphore::new(limit as usize)), limit, flag, what, refusals }
    }

    /// A slot, held until the permit is dropped; or the refusal to return to the client.
    pub fn try_take(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.semaphore.clone().try_acquire_owned().map_err(|_| {
            self.refusals.get_or_create(&LimitLabels { limit: self.flag }).inc();
            Status::resource_exhausted(format!(
                "cloudmap-xds already serves its maximum of {} {} (--{}); retry later or raise the limit",
                self.limit, self.what, self.flag
            ))
        })
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }
}

/// A gRPC service whose calls each hold one of `slots` from arrival until the
/// response has been handed to HTTP/2: a call over the limit is answered
/// `RESOURCE_EXHAUSTED` at once, and a client that grants no flow-control window
/// for its response keeps its slot.
#[derive(Debug, Clone)]
pub struct PerCall<S> {
    inner: S,
    slots: Slots,
}

impl<S> PerCall<S> {
    pub fn new(inner: S, slots: Slots) -> Self {
        PerCall { inner, slots }
    }
}

impl<S: NamedService> NamedService for PerCall<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for PerCall<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let slot = match self.slots.try_take() {
            Ok(slot) => slot,
            Err(status) => return Box::pin(async move { Ok(status.into_http()) }),
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Body::new(Holding { body, _slot: slot })))
        })
    }
}

/// A response body that keeps its call's slot until it is dropped.
struct Holding {
    body: Body,
    _slot: OwnedSemaphorePermit,
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_set_refuses_names_the_flag_and_counts() {
        let refusals = Family::<LimitLabels, Counter>::default();
        let slots = Slots::new(2, limit_names::MAX_ADS_STREAMS, "ADS streams", refusals.clone());
        let a = slots.try_take().unwrap();
        let _b = slots.try_take().unwrap();
        let refused = slots.try_take().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            refused.message(),
            "cloudmap-xds already serves its maximum of 2 ADS streams (--max-ads-streams); retry later or raise the limit"
        );
        assert_eq!(refusals.get_or_create(&LimitLabels { limit: "max-ads-streams" }).get(), 1);
        drop(a);
        assert_eq!(slots.available(), 1);
        assert!(slots.try_take().is_ok());
    }
}
