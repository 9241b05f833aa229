//! gRPC reflection answers in both versions, with the message types grpcurl
//! needs to decode the `Any` payloads.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use cloudmap_xds::test_helpers::TestServer;
use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

async fn ask(addr: std::net::SocketAddr, request: MessageRequest) -> MessageResponse {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut responses =
        client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    responses.message().await.unwrap().unwrap().message_response.unwrap()
}

#[tokio::test]
async fn v1alpha_lists_services_and_resolves_payload_types() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.yaml");
    std::fs::write(&path, "namespaces: []\n").unwrap();
    let server = TestServer::with_registry_file(&path).await.unwrap();

    let MessageResponse::ListServicesResponse(list) =
        ask(server.grpc_addr, MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        "cloudmap_xds.debug.v1.Debug",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    for symbol in [
        "istio.mcp.v1alpha1.Resource",
        "istio.networking.v1alpha3.ServiceEntry",
        "istio.networking.v1alpha3.WorkloadEntry",
    ] {
        let response = ask(server.grpc_addr, MessageRequest::FileContainingSymbol(symbol.into())).await;
        assert!(
            matches!(response, MessageResponse::FileDescriptorResponse(ref f) if !f.file_descriptor_proto.is_empty()),
            "{symbol}: {response:?}"
        );
    }
}
