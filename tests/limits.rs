//! Limits on the gRPC port and HTTP/2 keepalive, in-process on loopback: streams,
//! debug calls, request and response sizes over their flags are refused with
//! `RESOURCE_EXHAUSTED` naming the flag and counted; istiod's keepalive pings
//! are answered (no GOAWAY), and a peer that stops answering ours is reaped.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cloudmap_xds::proto::cloudmap_xds::debug::v1::ListServiceEntriesRequest;
use cloudmap_xds::proto::cloudmap_xds::debug::v1::debug_client::DebugClient;
use cloudmap_xds::proto::envoy::service::discovery::v3::DiscoveryRequest;
use cloudmap_xds::test_helpers::server::serve_args;
use cloudmap_xds::test_helpers::{
    AdsClient, DEADLINE, GOLDEN_REGISTRY, ISTIO_PILOT_TYPES, MESH_CONFIG_TYPE, SERVICE_ENTRY_V1, TestServer,
    eventually, http_get, service_entries,
};
use support::h2_relay::H2Relay;

const NODE: &str = "sidecar~10.1.2.3~istiod-test.istio-system~istio-system.svc.cluster.local";

struct Fixture {
    server: TestServer,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn start(registry: &str, flags: &[&str]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.yaml");
        std::fs::write(&path, registry).unwrap();
        let mut argv = vec!["--registry-file", path.to_str().unwrap(), "--publish-namespace", "istio-system"];
        argv.extend_from_slice(flags);
        let server = TestServer::start(serve_args(&argv)).await.unwrap();
        Fixture { server, path, _dir: dir }
    }

    fn edit(&self, content: &str) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    /// A sample from /metrics, by its full name with labels; 0 when absent.
    async fn metric(&self, name: &str) -> f64 {
        let (_, body) = http_get(self.server.admin_addr, "/metrics").await.unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |v| v.parse().unwrap())
    }

    async fn refusals(&self, limit: &str) -> f64 {
        self.metric(&format!("cloudmap_xds_grpc_refusals_total{{limit=\"{limit}\"}}")).await
    }
}

/// The golden service plus `n` more, one instance each.
fn registry_with(n: usize) -> String {
    let mut text = String::from(GOLDEN_REGISTRY);
    for i in 0..n {
        text.push_str(&format!(
            "  - name: bulk-{i}\n    instances:\n    - attributes: {{AWS_INSTANCE_IPV4: 10.9.{}.{}}}\n",
            i / 200,
            i % 200
        ));
    }
    text
}

async fn subscribed(addr: std::net::SocketAddr) -> AdsClient {
    let mut client = AdsClient::connect(addr).await.unwrap();
    client.send_initial(&[SERVICE_ENTRY_V1]).await;
    let response = client.recv().await;
    client.ack(&response).await;
    client
}

#[tokio::test]
async fn ads_streams_over_the_limit_are_refused_naming_the_flag() {
    let f = Fixture::start(GOLDEN_REGISTRY, &["--max-ads-streams", "2"]).await;
    let first = subscribed(f.server.grpc_addr).await;
    let _second = subscribed(f.server.grpc_addr).await;
    let refused = AdsClient::connect(f.server.grpc_addr).await.err().expect("a third stream is refused");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused.message().contains("maximum of 2 ADS streams (--max-ads-streams)"),
        "{}",
        refused.message()
    );
    assert_eq!(f.refusals("max-ads-streams").await, 1.0);
    // A stream that ends gives its slot back.
    drop(first);
    eventually("a slot to be free again", DEADLINE, || async {
        AdsClient::connect(f.server.grpc_addr).await.ok()
    })
    .await;
}

#[tokio::test]
async fn debug_calls_over_the_limit_are_refused_while_a_response_is_unread() {
    let f = Fixture::start(&registry_with(20), &["--max-debug-calls", "1"]).await;
    // A raw HTTP/2 client with a zero window that never reads: its call keeps the only slot.
    let tcp = tokio::net::TcpStream::connect(f.server.grpc_addr).await.unwrap();
    let (mut h2, connection) =
        h2::client::Builder::new().initial_window_size(0).handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::post(format!(
        "http://{}/cloudmap_xds.debug.v1.Debug/ListServiceEntries",
        f.server.grpc_addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (response, mut body) = h2.send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);

    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", f.server.grpc_addr)).unwrap();
    let mut debug = DebugClient::new(endpoint.connect().await.unwrap());
    let refused = debug.list_service_entries(ListServiceEntriesRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.message().contains("(--max-debug-calls)"), "{}", refused.message());
    assert_eq!(f.refusals("max-debug-calls").await, 1.0);

    // The stalled client goes away: its slot is free again.
    drop((response, body, h2));
    connection.abort();
    let entries = eventually("the debug slot to be free", DEADLINE, || {
        let mut debug = debug.clone();
        async move { debug.list_service_entries(ListServiceEntriesRequest {}).await.ok() }
    })
    .await;
    assert_eq!(entries.into_inner().service_entries.len(), 21);
}

#[tokio::test]
async fn an_oversized_request_ends_its_stream_naming_the_flag() {
    let f = Fixture::start(GOLDEN_REGISTRY, &["--max-request-size", "4KiB"]).await;
    let mut client = subscribed(f.server.grpc_addr).await;
    client
        .send(DiscoveryRequest {
            type_url: "networking.istio.io/v1/Sidecar".into(),
            resource_names: vec!["x".repeat(8 * 1024)],
            ..Default::default()
        })
        .await;
    let status = client.recv_timeout(DEADLINE).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status.message().starts_with("request larger than --max-request-size (4096 bytes)"),
        "{}",
        status.message()
    );
    assert_eq!(f.refusals("max-request-size").await, 1.0);
    // Others are served as before.
    subscribed(f.server.grpc_addr).await;
}

#[tokio::test]
async fn a_stream_asking_for_too_many_type_urls_is_refused() {
    let f = Fixture::start(GOLDEN_REGISTRY, &[]).await;
    let mut client = AdsClient::connect(f.server.grpc_addr).await.unwrap();
    let types: Vec<String> = (0..65).map(|n| format!("example.com/v1/Kind{n}")).collect();
    let refs: Vec<&str> = types.iter().map(String::as_str).collect();
    client.send_initial(&refs).await;
    for _ in 0..64 {
        let response = client.recv().await;
        assert!(response.resources.is_empty());
    }
    let status = client.recv_timeout(DEADLINE).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("more than 64 type URLs on one stream"), "{}", status.message());
    assert_eq!(f.refusals("max-type-urls-per-stream").await, 1.0);
}

#[tokio::test]
async fn a_response_over_the_limit_is_not_sent_and_the_next_that_fits_is() {
    // 40 services encode to well over 2 KiB; the golden one alone to about 400 bytes.
    let f = Fixture::start(&registry_with(40), &["--max-response-size", "2KiB"]).await;
    let mut client = AdsClient::connect(f.server.grpc_addr).await.unwrap();
    client.istiod_handshake().await;
    // Every other type is answered; the ServiceEntry set is not.
    for _ in 0..ISTIO_PILOT_TYPES.len() {
        let response = client.recv().await;
        assert_ne!(response.type_url, SERVICE_ENTRY_V1);
        assert!([MESH_CONFIG_TYPE].iter().chain(&ISTIO_PILOT_TYPES).any(|t| *t == response.type_url));
        client.ack(&response).await;
    }
    eventually("the refusal to be counted", DEADLINE, || async {
        (f.refusals("max-response-size").await == 1.0).then_some(())
    })
    .await;
    // The registry shrinks: the first ServiceEntry response the client ever sees is the small set.
    f.edit(GOLDEN_REGISTRY);
    let response = client.recv().await;
    assert_eq!(response.type_url, SERVICE_ENTRY_V1);
    assert_eq!(service_entries(&response).len(), 1);
}

/// istiod's client keepalive (`pkg/keepalive`): ping after 30 s without activity, 10 s
/// timeout, no pings without a stream. Here the interval is 50 ms so that a second of
/// test sees twenty pings; the server side is at its defaults.
#[tokio::test]
async fn istiods_keepalive_pings_are_answered_without_goaway() {
    let f = Fixture::start(GOLDEN_REGISTRY, &[]).await;
    let relay = H2Relay::start(f.server.grpc_addr).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", relay.addr))
        .unwrap()
        .http2_keep_alive_interval(Duration::from_millis(50))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(false)
        .connect()
        .await
        .unwrap();
    let mut client = AdsClient::over(channel, NODE).await.unwrap();
    client.send_initial(&[SERVICE_ENTRY_V1]).await;
    let first = client.recv().await;
    client.ack(&first).await;

    eventually("twenty pings answered", DEADLINE, || async { (relay.ping_acks() >= 20).then_some(()) }).await;
    assert_eq!(relay.goaways(), Vec::<(u32, String)>::new(), "the server sent GOAWAY (too_many_pings?)");
    // The stream is alive: a change still arrives on it.
    f.edit(&registry_with(1));
    let push = client.recv().await;
    assert_eq!(service_entries(&push).len(), 2);
    assert_eq!(relay.goaways(), Vec::<(u32, String)>::new());
    assert_eq!(relay.server_closed(), 0);
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_reaped() {
    let f = Fixture::start(
        GOLDEN_REGISTRY,
        &["--grpc-keepalive-interval", "200ms", "--grpc-keepalive-timeout", "300ms"],
    )
    .await;
    let relay = H2Relay::start(f.server.grpc_addr).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", relay.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AdsClient::over(channel, NODE).await.unwrap();
    client.send_initial(&[SERVICE_ENTRY_V1]).await;
    let first = client.recv().await;
    client.ack(&first).await;
    eventually("the stream to be counted", DEADLINE, || async {
        (f.metric("cloudmap_xds_ads_connected_streams").await == 1.0).then_some(())
    })
    .await;

    // The peer vanishes without a FIN or RST: only the server's unanswered pings can tell.
    relay.freeze();
    let frozen = Instant::now();
    eventually("the silent peer's stream to be reaped", DEADLINE, || async {
        (f.metric("cloudmap_xds_ads_connected_streams").await == 0.0).then_some(())
    })
    .await;
    let took = frozen.elapsed();
    assert!(relay.server_pings() >= 1, "the server never pinged");
    eprintln!("silent peer reaped {took:?} after it stopped answering (interval 200 ms, timeout 300 ms)");
    assert!(took >= Duration::from_millis(300), "reaped after {took:?}, before any ping could time out");
}
