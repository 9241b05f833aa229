//! The `AggregatedDiscoveryService` gRPC service, routed by hand.
//!
//! The generated server would encode the generated `DiscoveryResponse`, whose
//! resources are a `Vec<Any>` built per push, into each stream's buffer; this one
//! decodes requests with tonic but sends its own body ([`ResponseBody`]), where a
//! response's resources are the snapshot's encoding shared by every stream. Same
//! service name, methods and wire format; clients (istiod, the generated client)
//! see no difference.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codec::Codec;
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::metadata::MetadataValue;
use tonic::server::NamedService;
use tonic::{Request, Status, Streaming};
use tonic_prost::ProstCodec;

use super::body::ResponseBody;
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

/// The gRPC content type tonic answers with.
const GRPC_CONTENT_TYPE: &str = "application/grpc";

/// Refuses compressed requests as tonic does when no compression is enabled.
fn uncompressed(headers: &http::HeaderMap) -> Result<(), Status> {
    match headers.get("grpc-encoding").map(|v| v.as_bytes()) {
        None | Some(b"identity") => Ok(()),
        Some(other) => {
            let mut status = Status::unimplemented(format!(
                "Content is compressed with `{}` which isn't supported",
                String::from_utf8_lossy(other)
            ));
            status.metadata_mut().insert("grpc-accept-encoding", MetadataValue::from_static("identity"));
            Err(status)
        }
    }
}

/// One `StreamAggregatedResources` call: tonic decodes the requests, [`ResponseBody`]
/// sends the responses.
fn stream_aggregated_resources<B>(server: &AdsServer, request: http::Request<B>) -> http::Response<Body>
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    if let Err(status) = uncompressed(request.headers()) {
        return status.into_http();
    }
    // Requests are bounded by --max-request-size; responses by --max-response-size,
    // which the stream checks itself before queueing (so it can log and count).
    let decoder = ProstCodec::<DiscoveryResponse, DiscoveryRequest>::default().decoder();
    let request =
        request.map(|body| Streaming::new_request(decoder, body, None, Some(server.limits().request_size)));
    match server.stream_aggregated_resources(Request::from_http(request)) {
        Ok(response) => {
            let mut http = http::Response::new(Body::new(ResponseBody::new(response.into_inner())));
            http.headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(GRPC_CONTENT_TYPE));
            http
        }
        Err(status) => status.into_http(),
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
                Box::pin(async move { Ok(stream_aggregated_resources(&server, request)) })
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
