//! Cloud Map *service attributes* (`GetServiceAttributes`) against a real moto_server: what they
//! do to the served ServiceEntries, when they are read, and what happens when the IAM policy
//! does not allow the call or the call fails (a fault-injecting proxy in front of moto).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudmap_xds::proto::envoy::service::discovery::v3::DiscoveryResponse;
use cloudmap_xds::proto::istio::mcp::v1alpha1::Metadata;
use cloudmap_xds::proto::istio::networking::v1alpha3::ServiceEntry;
use cloudmap_xds::proto::istio::networking::v1alpha3::service_entry::Location;
use cloudmap_xds::test_helpers::{
    AdsClient, SERVICE_ENTRY_V1, TestServer, eventually, free_port, http_get, service_entries,
};
use support::fault_proxy::{Fault, FaultProxy};
use support::moto::{self, Moto, Seeder};

const PORTS: &str = "cloudmap-xds/ports";

/// `serve` in-process against `endpoint` with test credentials; `extra` flags override the defaults here.
async fn serve(endpoint: &str, extra: &[&str]) -> TestServer {
    TestServer::start(moto::serve_args(endpoint, extra)).await.unwrap()
}

/// Connects like istiod and returns the first ServiceEntry response (sent only after the first complete sync).
async fn connect(grpc: std::net::SocketAddr) -> (AdsClient, DiscoveryResponse) {
    let mut client = eventually("the server to listen", Duration::from_secs(20), || async move {
        AdsClient::connect(grpc).await.ok()
    })
    .await;
    client.send_initial(&[SERVICE_ENTRY_V1]).await;
    let response = client.recv_type(SERVICE_ENTRY_V1).await;
    (client, response)
}

/// `svc.ns` → (metadata, spec).
fn by_host(response: &DiscoveryResponse) -> BTreeMap<String, (Metadata, ServiceEntry)> {
    service_entries(response)
        .into_iter()
        .map(|(meta, spec)| (meta.name.trim_start_matches("istio-system/cloudmap-").to_owned(), (meta, spec)))
        .collect()
}

/// `name number protocol` of every service port.
fn ports(spec: &ServiceEntry) -> Vec<String> {
    spec.ports.iter().map(|p| format!("{} {} {}", p.name, p.number, p.protocol)).collect()
}

/// `address:port-name=number,...` of every endpoint.
fn endpoint_ports(spec: &ServiceEntry) -> Vec<String> {
    spec.endpoints
        .iter()
        .map(|e| {
            let ports: Vec<String> = e.ports.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{}:{}", e.address, ports.join(","))
        })
        .collect()
}

/// Receives (ACKing) until a ServiceEntry response satisfies `check`.
async fn push_where(
    client: &mut AdsClient,
    deadline: Duration,
    what: &str,
    check: impl Fn(&BTreeMap<String, (Metadata, ServiceEntry)>) -> bool,
) -> DiscoveryResponse {
    let until = Instant::now() + deadline;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let response = match client.recv_timeout(left).await {
            Ok(Some(r)) => r,
            other => panic!("no push with {what} within {deadline:?}: {other:?}"),
        };
        client.ack(&response).await;
        if response.type_url == SERVICE_ENTRY_V1 && check(&by_host(&response)) {
            return response;
        }
    }
}

/// Every sample of /metrics, by name with labels.
async fn metrics(admin: std::net::SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn aws_calls(metrics: &BTreeMap<String, f64>, api: &str, outcome: &str) -> f64 {
    metrics
        .get(&format!("cloudmap_xds_aws_calls_total{{api=\"{api}\",outcome=\"{outcome}\"}}"))
        .copied()
        .unwrap_or(0.0)
}

fn unavailable(metrics: &BTreeMap<String, f64>) -> f64 {
    metrics["cloudmap_xds_service_attributes_unavailable"]
}

/// An ECS bridge-mode service: three tasks, each on its own random host port.
async fn seed_bridge_mode(seeder: &Seeder, ns: &str) -> String {
    let web = seeder.create_service(ns, "web", false).await;
    seeder.register_bridge_mode_tasks(&web.id).await;
    web.id
}

#[tokio::test]
async fn service_attributes_shape_the_first_service_entry_served() {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let ns = seeder.create_http_namespace("shop").await;
    let web = seed_bridge_mode(&seeder, &ns).await;
    seeder.update_service_attributes(&web, &[(PORTS, "http=80/HTTP")]).await;
    // HTTP on 8080, inside the mesh, visible to the publish namespace only.
    let api = seeder.create_service(&ns, "api", false).await;
    seeder
        .register(&api.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.1.0.1"), ("AWS_INSTANCE_PORT", "8080")])
        .await;
    seeder
        .update_service_attributes(
            &api.id,
            &[
                (PORTS, "8080/HTTP"),
                ("cloudmap-xds/location", "MESH_INTERNAL"),
                ("cloudmap-xds/export-to", "."),
            ],
        )
        .await;
    // No attributes: the defaults.
    let db = seeder.create_service(&ns, "db", false).await;
    seeder.register(&db.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.2.0.1"), ("AWS_INSTANCE_PORT", "5432")]).await;

    let server = serve(&moto.endpoint(), &[]).await;
    // The first response already has the declared ports: it never flaps from the defaults.
    let (_client, first) = connect(server.grpc_addr).await;
    let entries = by_host(&first);
    let web = &entries["web.shop"].1;
    assert_eq!(ports(web), ["http 80 HTTP"], "one stable port instead of three random ones");
    assert_eq!(
        endpoint_ports(web),
        ["10.0.0.1:http=32768", "10.0.0.2:http=32769", "10.0.0.3:http=32770"],
        "each task reached on its own host port"
    );
    let api = &entries["api.shop"].1;
    assert_eq!(ports(api), ["http-8080 8080 HTTP"]);
    assert_eq!(api.location(), Location::MeshInternal);
    assert_eq!(api.export_to, ["."]);
    assert_eq!(ports(&entries["db.shop"].1), ["tcp-5432 5432 TCP"]);
}

#[tokio::test]
async fn an_attribute_change_is_picked_up_on_the_next_listing() {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let ns = seeder.create_http_namespace("shop").await;
    let web = seed_bridge_mode(&seeder, &ns).await;
    let other = seeder.create_service(&ns, "other", false).await;
    seeder.register(&other.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.9.0.1")]).await;
    let server = serve(&moto.endpoint(), &["--list-interval", "1s", "--full-refresh-interval", "1h"]).await;
    let (mut client, first) = connect(server.grpc_addr).await;
    let before = by_host(&first);
    assert_eq!(
        ports(&before["web.shop"].1),
        ["tcp-32768 32768 TCP", "tcp-32769 32769 TCP", "tcp-32770 32770 TCP"]
    );

    // Attributes do not move the instances revision: only the listing's read sees the change.
    seeder.update_service_attributes(&web, &[(PORTS, "http=80/HTTP")]).await;
    let push = push_where(&mut client, Duration::from_secs(10), "the declared port", |e| {
        ports(&e["web.shop"].1) == ["http 80 HTTP"]
    })
    .await;
    let after = by_host(&push);
    assert_eq!(after["other.shop"].0.version, before["other.shop"].0.version, "only web changed");
    assert_ne!(after["web.shop"].0.version, before["web.shop"].0.version);
}

#[tokio::test]
async fn attribute_reads_come_with_listings_only() {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let ns = seeder.create_http_namespace("shop").await;
    for n in 0..5 {
        let svc = seeder.create_service(&ns, &format!("svc-{n}"), false).await;
        seeder.register(&svc.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]).await;
    }
    let proxy = FaultProxy::start(moto.addr()).await;
    let server = serve(
        &proxy.endpoint(),
        &["--poll-interval", "100ms", "--list-interval", "1s", "--full-refresh-interval", "1h"],
    )
    .await;
    connect(server.grpc_addr).await;
    // Several listings, each with one read per service, and many polls with none.
    let wire = |op: &str| proxy.calls().get(op).copied().unwrap_or(0);
    eventually("four more listings", Duration::from_secs(30), || async {
        (wire("ListNamespaces") >= 5).then_some(())
    })
    .await;
    let (listings, reads, revisions) =
        (wire("ListNamespaces"), wire("GetServiceAttributes"), wire("DiscoverInstancesRevision"));
    // The reads of the last listing may still be out.
    assert!(reads >= 5 * (listings - 1) && reads <= 5 * listings, "{reads} reads for {listings} listings");
    assert!(revisions >= 5 * 3 * (listings - 1), "{revisions} revision calls: polls run in between");
}

/// `cloudmap-xds serve` as a user runs it, with its log lines collected.
struct Serving {
    child: Child,
    _home: tempfile::TempDir,
    grpc: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Serving {
    fn start(endpoint: &str, extra: &[&str]) -> Serving {
        // An empty HOME: no AWS profile of the machine leaks in.
        let home = tempfile::tempdir().unwrap();
        let (grpc, admin) = (free_port(), free_port());
        let (grpc, admin) =
            (format!("127.0.0.1:{grpc}").parse().unwrap(), format!("127.0.0.1:{admin}").parse().unwrap());
        let mut child = Command::new(env!("CARGO_BIN_EXE_cloudmap-xds"))
            .args(["serve", "--aws-region", moto::REGION, "--aws-endpoint-url", endpoint])
            .args(["--grpc-addr", &format!("{grpc}"), "--admin-addr", &format!("{admin}")])
            .args(["--poll-interval", "200ms", "--log-format", "json"])
            .args(extra)
            .env_clear()
            .env("HOME", home.path())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", moto::SECRET_ACCESS_KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Serving { child, _home: home, grpc, admin, log }
    }

    /// Log records at `level` whose message mentions `needle`.
    fn logged(&self, level: &str, needle: &str) -> Vec<serde_json::Value> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["level"] == level && r["message"].as_str().is_some_and(|m| m.contains(needle)))
            .collect()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn without_the_iam_permission_defaults_apply_with_one_warning_and_a_policy_fix_is_picked_up() {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let ns = seeder.create_http_namespace("shop").await;
    let web = seed_bridge_mode(&seeder, &ns).await;
    seeder.update_service_attributes(&web, &[(PORTS, "http=80/HTTP")]).await;
    for n in 0..40 {
        let svc = seeder.create_service(&ns, &format!("svc-{n:02}"), false).await;
        seeder.register(&svc.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.1.0.1")]).await;
    }
    let proxy = FaultProxy::start(moto.addr()).await;
    proxy.fail("GetServiceAttributes", None, Fault::Denied);
    let server = Serving::start(&proxy.endpoint(), &["--list-interval", "1s"]);

    // The first sync is not blocked, and the defaults apply.
    let (mut client, first) = connect(server.grpc).await;
    let entries = by_host(&first);
    assert_eq!(entries.len(), 41);
    assert_eq!(ports(&entries["web.shop"].1).len(), 3, "the defaults: one port per host port");
    let m = metrics(server.admin).await;
    assert_eq!(unavailable(&m), 1.0);
    assert!(aws_calls(&m, "GetServiceAttributes", "denied") >= 1.0);

    // Reads stop: over several listings, one probe per listing at most.
    let wire = |op: &str| proxy.calls().get(op).copied().unwrap_or(0);
    let (listings_before, reads_before) = (wire("ListNamespaces"), wire("GetServiceAttributes"));
    // One denied read at start (reads go one at a time until one succeeds), then probes only.
    assert!(reads_before <= listings_before + 1, "{reads_before} reads in {listings_before} listings");
    eventually("three more listings", Duration::from_secs(30), || async {
        (wire("ListNamespaces") >= listings_before + 3).then_some(())
    })
    .await;
    let probes = wire("GetServiceAttributes") - reads_before;
    let listings = wire("ListNamespaces") - listings_before;
    assert!(probes <= listings + 1, "{probes} probes in {listings} listings");
    let warnings = server.logged("WARN", "servicediscovery:GetServiceAttributes");
    assert_eq!(warnings.len(), 1, "one warning: {warnings:?}");
    assert!(warnings[0]["message"].as_str().unwrap().contains("optional"), "{}", warnings[0]);
    assert!(warnings[0]["error"].as_str().unwrap().contains("AccessDeniedException"), "{}", warnings[0]);

    // The policy is fixed: the next probe notices, and the declared port is served.
    proxy.heal();
    push_where(&mut client, Duration::from_secs(10), "the declared port after the fix", |e| {
        ports(&e["web.shop"].1) == ["http 80 HTTP"]
    })
    .await;
    eventually("the gauge back to 0", Duration::from_secs(10), || async {
        (unavailable(&metrics(server.admin).await) == 0.0).then_some(())
    })
    .await;
    assert_eq!(server.logged("WARN", "servicediscovery:GetServiceAttributes").len(), 1);
}

#[tokio::test]
async fn a_failing_attribute_call_keeps_the_last_good_attributes() {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let ns = seeder.create_http_namespace("shop").await;
    let web = seed_bridge_mode(&seeder, &ns).await;
    seeder.update_service_attributes(&web, &[(PORTS, "http=80/HTTP")]).await;
    let proxy = FaultProxy::start(moto.addr()).await;
    let server = serve(&proxy.endpoint(), &["--list-interval", "1s"]).await;
    let (mut client, first) = connect(server.grpc_addr).await;
    assert_eq!(ports(&by_host(&first)["web.shop"].1), ["http 80 HTTP"]);

    proxy.fail("GetServiceAttributes", Some(&web), Fault::Error);
    seeder.update_service_attributes(&web, &[(PORTS, "grpc=9090/GRPC")]).await;
    let failed = |m: &BTreeMap<String, f64>| aws_calls(m, "GetServiceAttributes", "error");
    let before = failed(&metrics(server.admin_addr).await);
    eventually("a failed attribute read", Duration::from_secs(10), || async {
        (failed(&metrics(server.admin_addr).await) > before).then_some(())
    })
    .await;
    // The instances still flow; the ports stay the last good ones.
    seeder
        .register(&web, "task-3", &[("AWS_INSTANCE_IPV4", "10.0.0.4"), ("AWS_INSTANCE_PORT", "32771")])
        .await;
    let push = push_where(&mut client, Duration::from_secs(10), "the new task", |e| {
        e["web.shop"].1.endpoints.len() == 4
    })
    .await;
    assert_eq!(ports(&by_host(&push)["web.shop"].1), ["http 80 HTTP"], "the last good attributes");
    let (_, status) = http_get(server.admin_addr, "/debug/snapshot").await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let web_status = status["source"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == "web")
        .unwrap()
        .clone();
    assert!(
        web_status["last_error"].as_str().unwrap().starts_with("GetServiceAttributes: InvalidInput"),
        "{web_status}"
    );

    proxy.heal();
    push_where(&mut client, Duration::from_secs(20), "the new attributes after healing", |e| {
        ports(&e["web.shop"].1) == ["grpc 9090 GRPC"]
    })
    .await;
}
