//! The README's grpcurl commands, run with the real grpcurl binary ($GRPCURL,
//! installed by scripts/test). grpcurl exits 0 even when it cannot decode an
//! `Any`, so every test checks decoded fields.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::process::Command;

use cloudmap_xds::test_helpers::TestServer;
use serde_json::Value;

fn grpcurl() -> String {
    std::env::var("GRPCURL").expect("GRPCURL must point at a grpcurl binary; run the tests with scripts/test")
}

async fn server() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.yaml");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/registry.yaml"), &path).unwrap();
    let server = TestServer::with_registry_file(&path).await.unwrap();
    (dir, server)
}

/// Runs grpcurl off the async runtime and returns stdout; panics with stderr on failure.
async fn run(args: Vec<String>) -> String {
    let argv = args.clone();
    let output = tokio::task::spawn_blocking(move || Command::new(grpcurl()).args(&argv).output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "grpcurl {args:?} failed: {stderr}\n{stdout}");
    assert!(!stdout.contains("@error"), "grpcurl could not decode a payload: {stdout}");
    stdout
}

fn call(server: &TestServer, method: &str, data: Option<&str>) -> Vec<String> {
    let mut args = vec!["-plaintext".to_string()];
    if let Some(d) = data {
        args.extend(["-d".to_string(), d.to_string()]);
    }
    args.push(server.grpc_addr.to_string());
    args.push(method.to_string());
    args
}

/// grpcurl prints one JSON object per message, separated by newlines.
fn messages(stdout: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(stdout).into_iter::<Value>().map(Result::unwrap).collect()
}

#[tokio::test]
async fn list_shows_every_service() {
    let (_dir, server) = server().await;
    let out = run(vec!["-plaintext".into(), server.grpc_addr.to_string(), "list".into()]).await;
    let services: Vec<_> = out.lines().collect();
    for expected in [
        "cloudmap_xds.debug.v1.Debug",
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(&expected), "{expected} missing from {services:?}");
    }
    // Each reflection version lists itself; grpcurl 1.8 speaks v1alpha, newer ones v1.
    assert!(services.iter().any(|s| s.starts_with("grpc.reflection.")), "{services:?}");
    let described = run(vec![
        "-plaintext".into(),
        server.grpc_addr.to_string(),
        "describe".into(),
        "istio.mcp.v1alpha1.Resource".into(),
    ])
    .await;
    assert!(described.contains("google.protobuf.Any body = 2;"), "{described}");
}

#[tokio::test]
async fn one_shot_ads_query_prints_decoded_service_entries() {
    let (_dir, server) = server().await;
    let out = run(call(
        &server,
        "envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        Some(r#"{"type_url":"networking.istio.io/v1/ServiceEntry"}"#),
    ))
    .await;
    let responses = messages(&out);
    assert_eq!(responses.len(), 1, "{out}");
    let response = &responses[0];
    assert_eq!(response["typeUrl"], "networking.istio.io/v1/ServiceEntry");
    let golden = response["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["metadata"]["name"] == "istio-system/cloudmap-getmesh-external-service.my-namespace")
        .unwrap_or_else(|| panic!("golden entry missing: {out}"));
    assert_eq!(golden["@type"], "type.googleapis.com/istio.mcp.v1alpha1.Resource");
    assert_eq!(golden["metadata"]["createTime"], "2024-05-01T12:00:00Z");
    let body = &golden["body"];
    assert_eq!(body["@type"], "type.googleapis.com/istio.networking.v1alpha3.ServiceEntry");
    assert_eq!(body["hosts"][0], "getmesh-external-service.my-namespace");
    assert_eq!(body["addresses"][0], "52.192.72.89");
    assert_eq!(body["resolution"], "STATIC");
    assert_eq!(body["endpoints"][0]["address"], "52.192.72.89");
    assert_eq!(body["endpoints"][0]["ports"]["https"], 443);
    assert_eq!(body["ports"][1]["name"], "https");
}

#[tokio::test]
async fn debug_methods_answer() {
    let (_dir, server) = server().await;
    let entries = messages(&run(call(&server, "cloudmap_xds.debug.v1.Debug/ListServiceEntries", None)).await);
    let list = entries[0]["serviceEntries"].as_array().unwrap();
    assert_eq!(list.len(), 5);
    let golden = list
        .iter()
        .find(|e| e["name"] == "istio-system/cloudmap-getmesh-external-service.my-namespace")
        .unwrap();
    assert_eq!(golden["spec"]["hosts"][0], "getmesh-external-service.my-namespace");
    assert_eq!(golden["version"].as_str().unwrap().len(), 16);

    let status = &messages(&run(call(&server, "cloudmap_xds.debug.v1.Debug/GetStatus", None)).await)[0];
    assert_eq!(status["synced"], true);
    assert!(status["source"].as_str().unwrap().starts_with("registry-file:"));
    assert_eq!(status["snapshotVersion"], entries[0]["snapshotVersion"]);
    assert_eq!(status["serviceEntries"], 5);
    assert!(status["lastSuccessfulLoad"].is_string());

    // A connected, ACKing client shows up with what it was sent and what it ACKed.
    let mut client = cloudmap_xds::test_helpers::AdsClient::connect_as(
        server.grpc_addr,
        "sidecar~10.9.9.9~istiod-a.istio-system~istio-system.svc.cluster.local",
    )
    .await
    .unwrap();
    client.send_initial(&["networking.istio.io/v1/ServiceEntry"]).await;
    let response = client.recv().await;
    client.ack(&response).await;
    let clients = cloudmap_xds::test_helpers::eventually(
        "the ACK to be recorded",
        cloudmap_xds::test_helpers::DEADLINE,
        || {
            let args = call(&server, "cloudmap_xds.debug.v1.Debug/ListClients", None);
            let version = response.version_info.clone();
            async move {
                let out = messages(&run(args).await).remove(0);
                let acked =
                    out["clients"][0]["types"][0]["lastVersionAcked"].as_str() == Some(version.as_str());
                acked.then_some(out)
            }
        },
    )
    .await;
    let c = &clients["clients"][0];
    assert_eq!(c["nodeId"], "sidecar~10.9.9.9~istiod-a.istio-system~istio-system.svc.cluster.local");
    assert!(c["peerAddress"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(c["types"][0]["typeUrl"], "networking.istio.io/v1/ServiceEntry");
    assert_eq!(c["types"][0]["lastVersionSent"], response.version_info);
}

#[tokio::test]
async fn health_check_reports_serving() {
    let (_dir, server) = server().await;
    let out = run(call(&server, "grpc.health.v1.Health/Check", None)).await;
    assert_eq!(messages(&out)[0]["status"], "SERVING");
}
