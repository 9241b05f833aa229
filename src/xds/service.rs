//! The `AggregatedDiscoveryService` gRPC service, routed by hand.
//!
//! The generated server would encode the generated `DiscoveryResponse`, whose
//! resources are a `Vec<Any>` built per push; this one encodes
//! [`DiscoveryResponse`](super::response::DiscoveryResponse), whose resources
//! are the snapshot's own encoding. Same service name, methods and wire format;
//! clients (istiod, the generated client) see no difference.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

use super::outbox::Outgoing;
use super::response::DiscoveryResponse;
use super::server::AdsServer;
use crate::proto::envoy::service::discovery::v3::DiscoveryRequest;

const STREAM_AGGREGATED_RESOURCES: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_AGGREGATED_RESOURCES: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// The ADS service for `tonic::transport::Server::add_service`.
#[derive(Debug, Clone)]
pub struct AdsService {
    server: Arc<AdsServer>,
}

impl AdsService {
    pub fn new(server: AdsServer) -> Self {
        AdsService { server: Arc::new(server) }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

/// One `StreamAggregatedResources` call.
struct Sotw(Arc<AdsServer>);

impl StreamingService<DiscoveryRequest> for Sotw {
    type Response = DiscoveryResponse;
    type ResponseStream = Outgoing;
    type Future = BoxFuture<Response<Outgoing>, Status>;

    fn call(&mut self, request: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let result = self.0.stream_aggregated_resources(request);
        Box::pin(async move { result })
    }
}

impl<B> Service<http::Request<B>> for AdsService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match request.uri().path() {
            STREAM_AGGREGATED_RESOURCES => {
                let server = self.server.clone();
                Box::pin(async move {
                    // Requests are bounded by --max-request-size; responses by --max-response-size,
                    // which the stream checks itself before queueing (so it can log and count).
                    let limits = server.limits();
                    let mut grpc = Grpc::new(ProstCodec::<DiscoveryResponse, DiscoveryRequest>::default())
                        .apply_max_message_size_config(Some(limits.request_size), Some(usize::MAX));
                    Ok(grpc.streaming(Sotw(server), request).await)
                })
            }
            DELTA_AGGREGATED_RESOURCES => Box::pin(async {
                Ok(Status::unimplemented(
                    "cloudmap-xds serves state-of-the-world ADS only (StreamAggregatedResources), \
                     which is what istiod's xds:// config source uses",
                )
                .into_http())
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}
