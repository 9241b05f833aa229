//! The admin port: readiness, liveness, the JSON view, and Prometheus metrics
//! parsed with a real Prometheus text parser.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::collections::BTreeMap;

use cloudmap_xds::test_helpers::{AdsClient, DEADLINE, SERVICE_ENTRY_V1, TestServer, eventually, http_get};

const ONE: &str = "namespaces:\n- name: ns\n  services:\n  - name: a\n    instances:\n    - attributes: {AWS_INSTANCE_IPV4: 10.0.0.1}\n    - attributes: {AWS_INSTANCE_IPV4: 10.0.0.2, AWS_INSTANCE_PORT: nope}\n";
const TWO: &str = "namespaces:\n- name: ns\n  services:\n  - name: a\n    instances:\n    - attributes: {AWS_INSTANCE_IPV4: 10.0.0.1}\n  - name: b\n    instances:\n    - attributes: {AWS_INSTANCE_IPV4: 10.0.0.3}\n";

/// Every sample as `name{labels}` -> value.
async fn scrape(server: &TestServer) -> BTreeMap<String, f64> {
    let (status, body) = http_get(server.admin_addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    assert!(!parsed.docs.is_empty(), "HELP texts present");
    parsed
        .samples
        .into_iter()
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
                prometheus_parse::Value::Summary(_) => f64::NAN,
            };
            let mut labels: Vec<_> = s.labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            labels.sort();
            (format!("{}{{{}}}", s.metric, labels.join(",")), value)
        })
        .collect()
}

/// Scrapes until `key` has `value` (counters move after the request that moves them returns).
async fn scrape_until(server: &TestServer, key: &str, value: f64) -> BTreeMap<String, f64> {
    eventually(&format!("{key} = {value}"), DEADLINE, || async {
        let m = scrape(server).await;
        (m.get(key) == Some(&value)).then_some(m)
    })
    .await
}

fn metric(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("{key} missing from {:#?}", m.keys().collect::<Vec<_>>()))
}

#[tokio::test]
async fn metrics_move_with_edits_and_ads_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.yaml");
    std::fs::write(&path, ONE).unwrap();
    let server = TestServer::with_registry_file(&path).await.unwrap();
    eventually("ready", DEADLINE, || async {
        (http_get(server.admin_addr, "/ready").await.ok()?.0 == 200).then_some(())
    })
    .await;
    assert_eq!(http_get(server.admin_addr, "/healthz").await.unwrap().0, 200);

    let m = scrape(&server).await;
    assert_eq!(metric(&m, "cloudmap_xds_service_entries{}"), 1.0);
    assert_eq!(metric(&m, "cloudmap_xds_endpoints{}"), 1.0);
    assert_eq!(metric(&m, "cloudmap_xds_skipped_instances{reason=\"invalid_port\"}"), 1.0);
    assert_eq!(metric(&m, "cloudmap_xds_snapshots_published_total{}"), 1.0);
    assert_eq!(metric(&m, "cloudmap_xds_ads_connected_streams{}"), 0.0);

    let mut client = AdsClient::connect(server.grpc_addr).await.unwrap();
    client.send_initial(&[SERVICE_ENTRY_V1, "networking.istio.io/v1/VirtualService"]).await;
    for _ in 0..2 {
        let r = client.recv().await;
        client.ack(&r).await;
    }
    let m = scrape_until(&server, "cloudmap_xds_ads_acks_total{type=\"other\"}", 1.0).await;
    assert_eq!(metric(&m, "cloudmap_xds_ads_acks_total{type=\"ServiceEntry\"}"), 1.0);
    assert_eq!(metric(&m, "cloudmap_xds_ads_connected_streams{}"), 1.0);
    assert_eq!(metric(&m, "cloudmap_xds_ads_streams_total{}"), 1.0);
    assert_eq!(metric(&m, "cloudmap_xds_ads_responses_total{type=\"ServiceEntry\"}"), 1.0);
    assert!(metric(&m, "cloudmap_xds_ads_sent_bytes_total{type=\"ServiceEntry\"}") > 100.0);

    std::fs::write(&path, TWO).unwrap();
    let push = client.recv().await;
    client.ack(&push).await;
    let m = scrape_until(&server, "cloudmap_xds_ads_acks_total{type=\"ServiceEntry\"}", 2.0).await;
    assert_eq!(metric(&m, "cloudmap_xds_snapshots_published_total{}"), 2.0);
    assert_eq!(metric(&m, "cloudmap_xds_service_entries{}"), 2.0);
    assert_eq!(metric(&m, "cloudmap_xds_ads_responses_total{type=\"ServiceEntry\"}"), 2.0);
    assert!(
        !m.contains_key("cloudmap_xds_skipped_instances{reason=\"invalid_port\"}"),
        "skips reflect the current snapshot"
    );
}

#[tokio::test]
async fn debug_snapshot_json_shows_entries_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.yaml");
    std::fs::write(&path, ONE).unwrap();
    let server = TestServer::with_registry_file(&path).await.unwrap();
    let json: serde_json::Value = eventually("a synced snapshot", DEADLINE, || async {
        let (_, body) = http_get(server.admin_addr, "/debug/snapshot").await.ok()?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        (json["synced"] == true).then_some(json)
    })
    .await;
    assert_eq!(json["serviceEntries"][0]["name"], "istio-system/cloudmap-a.ns");
    assert_eq!(json["serviceEntries"][0]["spec"]["hosts"][0], "a.ns");
    assert_eq!(
        json["skippedInstances"][0]["reason"],
        "AWS_INSTANCE_PORT=\"nope\" is not a port in 1..=65535"
    );
    assert!(json["source"]["source"].as_str().unwrap().starts_with("registry-file:"));
    let (_, config) = http_get(server.admin_addr, "/debug/config").await.unwrap();
    assert!(config.contains("\"shutdown_grace_period\":\"10s\""), "{config}");
}
