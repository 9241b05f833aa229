//! The ADS stream end to end over loopback, with a client scripted like istiod's `pkg/adsc`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::time::Duration;

use cloudmap_xds::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use cloudmap_xds::test_helpers::{
    AdsClient, DEADLINE, GOLDEN_REGISTRY, ISTIO_PILOT_TYPES, MESH_CONFIG_TYPE, SERVICE_ENTRY_V1, TestServer,
    assert_golden, eventually, http_get, service_entries,
};

const GOLDEN: &str = GOLDEN_REGISTRY;

fn golden_plus_orders() -> String {
    format!(
        "{GOLDEN_REGISTRY}  - name: orders\n    instances:\n    - attributes: {{AWS_INSTANCE_IPV4: 10.0.0.1, AWS_INSTANCE_PORT: 8080}}\n"
    )
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    server: TestServer,
}

async fn start(content: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.yaml");
    std::fs::write(&path, content).unwrap();
    let server = TestServer::with_registry_file(&path).await.unwrap();
    Fixture { _dir: dir, path, server }
}

impl Fixture {
    /// Replaces the file atomically, as editors and ConfigMap updates do.
    fn edit(&self, content: &str) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

/// Receives exactly one response per requested type, ACKing each; returns the ServiceEntry one.
async fn handshake(
    client: &mut AdsClient,
) -> cloudmap_xds::proto::envoy::service::discovery::v3::DiscoveryResponse {
    client.istiod_handshake().await;
    let mut expected: Vec<&str> = std::iter::once(MESH_CONFIG_TYPE).chain(ISTIO_PILOT_TYPES).collect();
    let mut service_entry = None;
    while !expected.is_empty() {
        let response = client.recv().await;
        let index = expected.iter().position(|t| *t == response.type_url).unwrap_or_else(|| {
            panic!("unexpected or repeated response for {}", response.type_url);
        });
        expected.remove(index);
        assert!(!response.version_info.is_empty() && !response.nonce.is_empty());
        client.ack(&response).await;
        if response.type_url == SERVICE_ENTRY_V1 {
            service_entry = Some(response);
        } else {
            assert!(response.resources.is_empty(), "{} must be empty", response.type_url);
        }
    }
    service_entry.unwrap()
}

#[tokio::test]
async fn istiod_handshake_gets_every_type_and_the_golden_service_entry() {
    let f = start(GOLDEN).await;
    let mut client = AdsClient::connect(f.server.grpc_addr).await.unwrap();
    let response = handshake(&mut client).await;
    let entries = service_entries(&response);
    assert_eq!(entries.len(), 1);
    let (meta, spec) = &entries[0];
    assert_golden(&meta.name, spec);
    assert_eq!(meta.create_time.unwrap().seconds, 1_714_564_800);
    assert_eq!(meta.version.len(), 16);
    assert_eq!(response.version_info.len(), 16);
}

#[tokio::test]
async fn old_istio_type_urls_are_echoed_and_served() {
    let f = start(GOLDEN).await;
    let mut client = AdsClient::connect(f.server.grpc_addr).await.unwrap();
    for type_url in ["networking.istio.io/v1alpha3/ServiceEntry", "networking.istio.io/v1beta1/ServiceEntry"]
    {
        client.send_initial(&[type_url]).await;
        let response = client.recv().await;
        assert_eq!(response.type_url, type_url);
        let entries = service_entries(&response);
        assert_golden(&entries[0].0.name, &entries[0].1);
    }
}

#[tokio::test]
async fn edits_reach_two_clients_and_acks_trigger_no_resend() {
    let f = start(GOLDEN).await;
    let mut first = AdsClient::connect(f.server.grpc_addr).await.unwrap();
    let mut second = AdsClient::connect(f.server.grpc_addr).await.unwrap();
    let v1 = handshake(&mut first).await.version_info;
    assert_eq!(handshake(&mut second).await.version_info, v1);

    f.edit(&golden_plus_orders());
    // Both clients ACKed everything: the next message each gets must be the new version,
    // so an ACK caused no resend of the old one.
    for client in [&mut first, &mut second] {
        let push = client.recv().await;
        assert_eq!(push.type_url, SERVICE_ENTRY_V1);
        assert_ne!(push.version_info, v1);
        let names: Vec<_> = service_entries(&push).into_iter().map(|(m, _)| m.name).collect();
        assert_eq!(
            names,
            [
                "istio-system/cloudmap-getmesh-external-service.my-namespace",
                "istio-system/cloudmap-orders.my-namespace"
            ]
        );
        client.ack(&push).await;
    }

    // Removing the service: it disappears from the next response, the other keeps its version.
    let before = service_entries(&first.recv_type_after_edit(&f, GOLDEN).await);
    assert_eq!(before.len(), 1);
    assert_golden(&before[0].0.name, &before[0].1);
}

trait EditAndReceive {
    async fn recv_type_after_edit(
        &mut self,
        f: &Fixture,
        content: &str,
    ) -> cloudmap_xds::proto::envoy::service::discovery::v3::DiscoveryResponse;
}

impl EditAndReceive for AdsClient {
    async fn recv_type_after_edit(
        &mut self,
        f: &Fixture,
        content: &str,
    ) -> cloudmap_xds::proto::envoy::service::discovery::v3::DiscoveryResponse {
        f.edit(content);
        let push = self.recv().await;
        self.ack(&push).await;
        push
    }
}

#[tokio::test]
async fn a_broken_edit_changes_nothing() {
    let f = start(GOLDEN).await;
    let mut client = AdsClient::connect(f.server.grpc_addr).await.unwrap();
    let v1 = handshake(&mut client).await.version_info;

    f.edit("namespaces:\n- name: my-namespace\n  services: [\n");
    // Wait until the server has seen and rejected it.
    let status = eventually("the broken edit to be rejected", DEADLINE, || async {
        let (_, body) = http_get(f.server.admin_addr, "/debug/snapshot").await.ok()?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["source"]["last_error"].as_str().map(str::to_owned)
    })
    .await;
    assert!(status.contains("registry.yaml:4:1: "), "{status}");
    let (_, metrics) = http_get(f.server.admin_addr, "/metrics").await.unwrap();
    assert!(metrics.contains("cloudmap_xds_source_loads_total{outcome=\"error\"} 1\n"), "{metrics}");

    // Same content as before, so no push; then a real change: the next message is that change.
    f.edit(&golden_plus_orders());
    let push = client.recv().await;
    assert_ne!(push.version_info, v1);
    assert_eq!(service_entries(&push).len(), 2);
}

#[tokio::test]
async fn a_one_shot_request_is_answered_and_the_stream_ends() {
    let f = start(GOLDEN).await;
    let mut client = AdsClient::connect(f.server.grpc_addr).await.unwrap();
    client.send_initial(&[SERVICE_ENTRY_V1]).await;
    client.half_close();
    let response = client.recv().await;
    assert_eq!(service_entries(&response).len(), 1);
    let end = client.recv_timeout(DEADLINE).await.unwrap();
    assert!(end.is_none(), "stream must end cleanly after a half-close");
}

#[tokio::test]
async fn delta_ads_is_unimplemented_with_a_clear_message() {
    let f = start(GOLDEN).await;
    let mut client =
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", f.server.grpc_addr)).await.unwrap();
    let status = client.delta_aggregated_resources(tokio_stream::empty()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert!(status.message().contains("StreamAggregatedResources"), "{}", status.message());
}

#[tokio::test]
async fn a_stalled_client_does_not_delay_others() {
    // ~100 KB per response: a few unread pushes fill the stalled stream's HTTP/2 window and queue.
    let mut big = String::from(GOLDEN);
    for n in 0..400 {
        big.push_str(&format!(
            "  - name: bulk-{n}\n    instances:\n    - attributes: {{AWS_INSTANCE_IPV4: 10.9.{}.{}}}\n",
            n / 200,
            n % 200
        ));
    }
    let f = start(&big).await;
    let mut stalled = AdsClient::connect(f.server.grpc_addr).await.unwrap();
    stalled.send_initial(&[SERVICE_ENTRY_V1]).await;
    let mut live = AdsClient::connect(f.server.grpc_addr).await.unwrap();
    let mut version = handshake(&mut live).await.version_info;
    for n in 0..12 {
        f.edit(&format!("{big}  - name: extra-{n}\n"));
        let push =
            tokio::time::timeout(Duration::from_secs(10), live.recv()).await.expect("live client starved");
        assert_ne!(push.version_info, version);
        assert_eq!(service_entries(&push).len(), 402);
        version = push.version_info.clone();
        live.ack(&push).await;
    }
}

#[tokio::test]
async fn a_client_that_fell_behind_gets_the_newest_set_not_a_backlog() {
    use cloudmap_xds::proto::envoy::service::discovery::v3::DiscoveryRequest;
    let mut big = String::from(GOLDEN);
    for n in 0..400 {
        big.push_str(&format!(
            "  - name: bulk-{n}\n    instances:\n    - attributes: {{AWS_INSTANCE_IPV4: 10.9.{}.{}}}\n",
            n / 200,
            n % 200
        ));
    }
    let f = start(&big).await;
    // HTTP/2's minimum windows (64 KiB), so that a ~100 KB response fills what the
    // transport may hold for a client that does not read.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", f.server.grpc_addr))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let (requests, rx) = tokio::sync::mpsc::channel(8);
    let request = |version: &str, nonce: &str| DiscoveryRequest {
        type_url: SERVICE_ENTRY_V1.into(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    requests.send(request("", "bogus")).await.unwrap();
    let mut behind = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let served_version = || async {
        let (_, body) = http_get(f.server.admin_addr, "/debug/snapshot").await.ok()?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["version"].as_str().map(str::to_owned)
    };
    let mut version = eventually("the first snapshot", DEADLINE, served_version).await;
    // Eight full sets published while the client reads nothing.
    for n in 0..8 {
        f.edit(&format!("{big}  - name: extra-{n}\n"));
        version = eventually("the edit to be published", DEADLINE, || async {
            served_version().await.filter(|v| *v != version)
        })
        .await;
    }
    let mut received = Vec::new();
    while received.last() != Some(&version) {
        let push = tokio::time::timeout(DEADLINE, behind.message()).await.unwrap().unwrap().unwrap();
        requests.send(request(&push.version_info, &push.nonce)).await.unwrap();
        received.push(push.version_info);
        // The first response, at most one the transport had taken, then the newest.
        assert!(received.len() <= 3, "stale full sets were queued: {received:?}");
    }
    let (_, metrics) = http_get(f.server.admin_addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains("cloudmap_xds_ads_superseded_responses_total{type=\"ServiceEntry\"}"),
        "{metrics}"
    );
}
