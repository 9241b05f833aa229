//! The Cloud Map source against a real moto_server on loopback (`$MOTO_SERVER`),
//! end to end over the ADS stream. Faults moto cannot produce (throttling, one
//! failing service) come from a small proxy of ours in front of it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cloudmap_xds::proto::envoy::service::discovery::v3::DiscoveryResponse;
use cloudmap_xds::proto::istio::mcp::v1alpha1::Metadata;
use cloudmap_xds::proto::istio::networking::v1alpha3::ServiceEntry;
use cloudmap_xds::proto::istio::networking::v1alpha3::service_entry::Resolution;
use cloudmap_xds::test_helpers::{
    AdsClient, DEADLINE, SERVICE_ENTRY_V1, TestServer, eventually, http_get, service_entries,
};
use support::fault_proxy::{Fault, FaultProxy};
use support::moto::{self, Moto};

/// `serve` in-process against `endpoint` with test credentials; `extra` flags override the defaults.
async fn serve(endpoint: &str, extra: &[&str]) -> TestServer {
    TestServer::start(moto::serve_args(endpoint, extra)).await.unwrap()
}

/// Connects like istiod and returns the first ServiceEntry response (sent only after the first complete sync).
async fn connect(server: &TestServer) -> (AdsClient, DiscoveryResponse) {
    let mut client = AdsClient::connect(server.grpc_addr).await.unwrap();
    client.send_initial(&[SERVICE_ENTRY_V1]).await;
    let response = client.recv_type(SERVICE_ENTRY_V1).await;
    (client, response)
}

/// `name` (without the publish namespace and prefix, i.e. `svc.ns`) → (metadata, spec).
fn by_host(response: &DiscoveryResponse) -> BTreeMap<String, (Metadata, ServiceEntry)> {
    service_entries(response)
        .into_iter()
        .map(|(meta, spec)| (meta.name.trim_start_matches("istio-system/cloudmap-").to_owned(), (meta, spec)))
        .collect()
}

fn addresses(spec: &ServiceEntry) -> Vec<&str> {
    spec.endpoints.iter().map(|e| e.address.as_str()).collect()
}

fn assert_golden(meta: &Metadata, spec: &ServiceEntry) {
    cloudmap_xds::test_helpers::assert_golden(&meta.name, spec);
}

/// Receives (ACKing) until a ServiceEntry response satisfies `check`; returns it and when it arrived.
async fn push_where(
    client: &mut AdsClient,
    deadline: Duration,
    what: &str,
    check: impl Fn(&BTreeMap<String, (Metadata, ServiceEntry)>) -> bool,
) -> (DiscoveryResponse, Instant) {
    let until = Instant::now() + deadline;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let response = match client.recv_timeout(left).await {
            Ok(Some(r)) => r,
            other => panic!("no push with {what} within {deadline:?}: {other:?}"),
        };
        let at = Instant::now();
        client.ack(&response).await;
        if response.type_url == SERVICE_ENTRY_V1 && check(&by_host(&response)) {
            return (response, at);
        }
    }
}

/// The admin JSON view of the snapshot and the source status.
async fn snapshot_json(server: &TestServer) -> serde_json::Value {
    let (status, body) = http_get(server.admin_addr, "/debug/snapshot").await.unwrap();
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

/// `cloudmap_xds_aws_calls` and `cloudmap_xds_source_loads` from /metrics.
async fn counters(server: &TestServer) -> BTreeMap<String, f64> {
    let (status, body) = http_get(server.admin_addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    body.lines()
        .filter(|l| {
            l.starts_with("cloudmap_xds_aws_calls_total") || l.starts_with("cloudmap_xds_source_loads_total")
        })
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn counter(counters: &BTreeMap<String, f64>, api: &str, outcome: &str) -> f64 {
    counters
        .get(&format!("cloudmap_xds_aws_calls_total{{api=\"{api}\",outcome=\"{outcome}\"}}"))
        .copied()
        .unwrap_or(0.0)
}

fn polls(counters: &BTreeMap<String, f64>) -> f64 {
    counters.iter().filter(|(k, _)| k.starts_with("cloudmap_xds_source_loads_total")).map(|(_, v)| v).sum()
}

#[tokio::test]
async fn the_seed_tutorial_comes_out_as_the_golden_service_entry() {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let svc = seeder.seed_tutorial().await;
    let server = serve(&moto.endpoint(), &[]).await;
    let (_client, response) = connect(&server).await;
    let entries = service_entries(&response);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let (meta, spec) = &entries[0];
    assert_golden(meta, spec);
    // create_time is the service's CreateDate, not the time of the push.
    let created = meta.create_time.unwrap();
    let want = prost_types::Timestamp::from(svc.created);
    assert_eq!((created.seconds, created.nanos / 1_000_000), (want.seconds, want.nanos / 1_000_000));
    assert!(!meta.version.is_empty());

    let status = snapshot_json(&server).await;
    assert_eq!(status["synced"], true);
    assert!(status["source"]["source"].as_str().unwrap().starts_with("cloudmap:us-east-1"));
    assert!(status["source"]["last_full_sync"].is_string(), "{status}");
}

mod binary {
    //! `cloudmap-xds serve` as a user runs it: credentials from the environment of the child only.
    use std::process::{Child, Command, Stdio};

    use super::*;
    use cloudmap_xds::test_helpers::free_port;

    const BIN: &str = env!("CARGO_BIN_EXE_cloudmap-xds");

    struct Kill(Child);

    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A command with an empty environment: no AWS settings of the machine leak in, and no
    /// credential source reaches beyond loopback (instance metadata is disabled, HOME is empty).
    fn bare(home: &std::path::Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args).env_clear().env("HOME", home).env("AWS_EC2_METADATA_DISABLED", "true");
        cmd
    }

    #[tokio::test]
    async fn serve_against_moto_serves_the_golden_service_entry() {
        let moto = Moto::start().await;
        moto.seeder().await.seed_tutorial().await;
        let home = tempfile::tempdir().unwrap();
        let (grpc, admin) = (free_port(), free_port());
        let (grpc_addr, admin_addr) = (format!("127.0.0.1:{grpc}"), format!("127.0.0.1:{admin}"));
        let endpoint = moto.endpoint();
        let _child = Kill(
            bare(
                home.path(),
                &[
                    "serve",
                    "--aws-region",
                    "us-east-1",
                    "--aws-endpoint-url",
                    &endpoint,
                    "--grpc-addr",
                    &grpc_addr,
                    "--admin-addr",
                    &admin_addr,
                ],
            )
            .env("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", moto::SECRET_ACCESS_KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        );
        let addr = grpc_addr.parse().unwrap();
        let mut client = eventually("the server to listen", Duration::from_secs(20), || async move {
            AdsClient::connect(addr).await.ok()
        })
        .await;
        client.send_initial(&[SERVICE_ENTRY_V1]).await;
        let response = client.recv_type(SERVICE_ENTRY_V1).await;
        let entries = service_entries(&response);
        assert_eq!(entries.len(), 1);
        assert_golden(&entries[0].0, &entries[0].1);
    }

    fn fails_with(home: &std::path::Path, args: &[&str]) -> String {
        let out = bare(home, args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let errors: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(errors.len(), 1, "one line, not a stack of SDK errors:\n{stderr}");
        errors[0].to_owned()
    }

    #[test]
    fn missing_credentials_or_region_are_one_clear_line() {
        let home = tempfile::tempdir().unwrap();
        let common = ["serve", "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--log", "warn"];
        let mut args = common.to_vec();
        args.extend(["--aws-region", "us-east-1", "--aws-endpoint-url", "http://127.0.0.1:9"]);
        let line = fails_with(home.path(), &args);
        assert!(
            line.starts_with(
                "error: starting the Cloud Map source: no usable AWS credentials in region us-east-1"
            ),
            "{line}"
        );
        for tried in ["AWS_ACCESS_KEY_ID", "AWS_PROFILE", "IRSA", "EKS Pod Identity", "instance metadata"] {
            assert!(line.contains(tried), "{tried} missing: {line}");
        }
        let line = fails_with(home.path(), &common);
        assert!(
            line.starts_with(
                "error: starting the Cloud Map source: no AWS region: set --aws-region or AWS_REGION"
            ),
            "{line}"
        );
    }
}

#[tokio::test]
async fn every_page_every_namespace_type_and_a_thousand_instances_are_served() {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let http = seeder.create_http_namespace("shop").await;
    let private = seeder.create_private_dns_namespace("corp.internal").await;
    let public = seeder.create_public_dns_namespace("example.org").await;
    for n in 0..120 {
        let svc = seeder.create_service(&http, &format!("svc-{n:03}"), false).await;
        seeder
            .register(&svc.id, "i-1", &[("AWS_INSTANCE_IPV4", &format!("10.1.{}.{}", n / 250, n % 250 + 1))])
            .await;
    }
    let big = seeder.create_service(&private, "big", false).await;
    seeder.register_many(&big.id, 1000, |n| format!("10.2.{}.{}", n / 250, n % 250 + 1)).await;
    let web = seeder.create_service(&public, "www", false).await;
    seeder.register(&web.id, "i-1", &[("AWS_INSTANCE_CNAME", "lb.example.org")]).await;

    let server = serve(&moto.endpoint(), &[]).await;
    let started = Instant::now();
    let (_client, response) = connect(&server).await;
    let entries = by_host(&response);
    // moto returns every service for every namespace's ListServices; each appears once, in its own namespace.
    let mut want: Vec<String> = (0..120).map(|n| format!("svc-{n:03}.shop")).collect();
    want.push("big.corp.internal".into());
    want.push("www.example.org".into());
    want.sort();
    assert_eq!(entries.keys().cloned().collect::<Vec<_>>(), want);
    assert_eq!(entries["big.corp.internal"].1.endpoints.len(), 1000);
    assert_eq!(entries["www.example.org"].1.resolution(), Resolution::Dns);
    eprintln!("first complete sync of 122 services and 1,121 instances served after {:?}", started.elapsed());
}

#[tokio::test]
async fn registrations_reach_a_connected_client_within_two_poll_intervals() {
    // Long enough that a loaded 2-core CI box keeps well inside two intervals.
    const POLL: Duration = Duration::from_secs(1);
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let ns = seeder.create_http_namespace("shop").await;
    let mut services = Vec::new();
    for name in ["cart", "pay", "web"] {
        let svc = seeder.create_service(&ns, name, false).await;
        seeder.register(&svc.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]).await;
        services.push(svc);
    }
    // Revisions only: no full refresh and no listing during the test.
    let server = serve(
        &moto.endpoint(),
        &["--poll-interval", "1s", "--full-refresh-interval", "1h", "--list-interval", "1h"],
    )
    .await;
    let (mut client, first) = connect(&server).await;
    let mut before = versions(&by_host(&first));
    let web = &services[2];

    // Register: moto's revision goes up.
    let t0 = Instant::now();
    seeder.register(&web.id, "i-2", &[("AWS_INSTANCE_IPV4", "10.0.0.2")]).await;
    before =
        only_web_changed(&mut client, t0, POLL, "registration", &["10.0.0.1", "10.0.0.2"], &before).await;

    // Deregister: moto's revision goes *down* (it is a sum, not a counter); still a change.
    let t0 = Instant::now();
    seeder.deregister(&web.id, "i-1").await;
    only_web_changed(&mut client, t0, POLL, "deregistration", &["10.0.0.2"], &before).await;
}

/// Waits for `web.shop` to show `want`, within two poll intervals of `t0`, with no other
/// entry's version moving; returns the new versions.
async fn only_web_changed(
    client: &mut AdsClient,
    t0: Instant,
    poll: Duration,
    what: &str,
    want: &[&str],
    before: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let (push, at) = push_where(client, 4 * poll, what, |e| addresses(&e["web.shop"].1) == want).await;
    let took = at - t0;
    assert!(took <= 2 * poll, "{what} reached the client after {took:?}");
    let after = versions(&by_host(&push));
    assert_ne!(after["web.shop"], before["web.shop"]);
    assert_eq!(
        (after["cart.shop"].as_str(), after["pay.shop"].as_str()),
        (before["cart.shop"].as_str(), before["pay.shop"].as_str())
    );
    eprintln!("{what} to push: {took:?}");
    after
}

fn versions(entries: &BTreeMap<String, (Metadata, ServiceEntry)>) -> BTreeMap<String, String> {
    entries.iter().map(|(k, (m, _))| (k.clone(), m.version.clone())).collect()
}

#[tokio::test]
async fn health_flips_reach_a_connected_client_within_two_poll_intervals() {
    // Long enough that a loaded 2-core CI box keeps well inside two intervals.
    const POLL: Duration = Duration::from_secs(1);
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let ns = seeder.create_http_namespace("shop").await;
    let cart = seeder.create_service(&ns, "cart", false).await;
    seeder.register(&cart.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]).await;
    // Custom health, as AWS requires for UpdateInstanceCustomHealthStatus (moto would accept it anywhere).
    let web = seeder.create_service(&ns, "web", true).await;
    seeder.register(&web.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]).await;
    seeder.register(&web.id, "i-2", &[("AWS_INSTANCE_IPV4", "10.0.0.2")]).await;
    // Health does not move the revision: a full read every poll sees it.
    let server = serve(&moto.endpoint(), &["--poll-interval", "1s", "--full-refresh-interval", "1ms"]).await;
    let (mut client, first) = connect(&server).await;
    let cart_version = by_host(&first)["cart.shop"].0.version.clone();
    assert_eq!(addresses(&by_host(&first)["web.shop"].1), ["10.0.0.1", "10.0.0.2"]);

    let t0 = Instant::now();
    seeder.set_health(&web.id, "i-1", false).await;
    // Default filter HEALTHY_OR_ELSE_ALL, applied locally to HealthStatus=ALL data.
    let (push, at) = push_where(&mut client, 4 * POLL, "the unhealthy instance gone", |e| {
        addresses(&e["web.shop"].1) == ["10.0.0.2"]
    })
    .await;
    assert!(at - t0 <= 2 * POLL, "health flip reached the client after {:?}", at - t0);
    assert_eq!(by_host(&push)["cart.shop"].0.version, cart_version);

    let t0 = Instant::now();
    seeder.set_health(&web.id, "i-1", true).await;
    let (_, at) = push_where(&mut client, 4 * POLL, "the instance back", |e| {
        addresses(&e["web.shop"].1) == ["10.0.0.1", "10.0.0.2"]
    })
    .await;
    assert!(at - t0 <= 2 * POLL, "health flip back reached the client after {:?}", at - t0);

    // None healthy: HEALTHY_OR_ELSE_ALL fails open and serves both.
    seeder.set_health(&web.id, "i-2", false).await;
    push_where(&mut client, 4 * POLL, "only i-1 healthy", |e| addresses(&e["web.shop"].1) == ["10.0.0.1"])
        .await;
    seeder.set_health(&web.id, "i-1", false).await;
    push_where(&mut client, 4 * POLL, "both, failing open", |e| addresses(&e["web.shop"].1).len() == 2).await;
}

#[tokio::test]
async fn a_stopped_moto_keeps_the_last_state_served_and_changes_flow_again_after() {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let svc = seeder.seed_tutorial().await;
    let server = serve(&moto.endpoint(), &["--aws-request-timeout", "300ms", "--list-interval", "1s"]).await;
    let (mut client, first) = connect(&server).await;
    let version = first.version_info.clone();

    moto.pause();
    let status = eventually("the errors to show", Duration::from_secs(20), || {
        let server = &server;
        async move {
            let s = snapshot_json(server).await;
            let svc = s["source"]["services"]
                .as_array()?
                .iter()
                .find(|x| x["service"] == "getmesh-external-service")?
                .clone();
            svc["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("timed out") || e.contains("no answer"))
                .then_some(s)
        }
    })
    .await;
    assert!(status["source"]["last_error"].is_string(), "{status}");
    assert_eq!(status["version"], version.as_str(), "the last good snapshot is still served");
    // Nothing is pushed while Cloud Map is unreachable.
    assert!(
        matches!(client.recv_timeout(Duration::from_secs(2)).await, Err(s) if s.code() == tonic::Code::DeadlineExceeded)
    );

    moto.resume();
    seeder.register(&svc.id, "i-2", &[("AWS_INSTANCE_IPV4", "52.192.72.90")]).await;
    push_where(&mut client, Duration::from_secs(20), "the change after recovery", |e| {
        addresses(&e["getmesh-external-service.my-namespace"].1) == ["52.192.72.89", "52.192.72.90"]
    })
    .await;
}

#[tokio::test]
async fn a_killed_moto_is_reported_and_a_restarted_one_is_followed() {
    let mut moto = Moto::start().await;
    moto.seeder().await.seed_tutorial().await;
    let server = serve(&moto.endpoint(), &["--list-interval", "1s"]).await;
    let (mut client, _) = connect(&server).await;

    moto.kill();
    eventually("connection errors to show", Duration::from_secs(20), || {
        let server = &server;
        async move {
            let s = snapshot_json(server).await;
            let svc = s["source"]["services"]
                .as_array()?
                .iter()
                .find(|x| x["service"] == "getmesh-external-service")?
                .clone();
            svc["last_error"].as_str().map(ToOwned::to_owned)
        }
    })
    .await;
    let served = snapshot_json(&server).await;
    assert_eq!(served["serviceEntries"].as_array().unwrap().len(), 1, "the last good state is still served");

    // A new moto on the same port, seeded again (new IDs) with a second instance.
    moto.restart().await;
    let seeder = moto.seeder().await;
    let svc = seeder.seed_tutorial().await;
    seeder.register(&svc.id, "i-2", &[("AWS_INSTANCE_IPV4", "52.192.72.91")]).await;
    push_where(&mut client, Duration::from_secs(20), "the restarted moto's state", |e| {
        e.get("getmesh-external-service.my-namespace")
            .is_some_and(|(_, spec)| addresses(spec) == ["52.192.72.89", "52.192.72.91"])
    })
    .await;
}

#[tokio::test]
async fn throttling_and_a_failing_service_leave_the_others_updating() {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let ns = seeder.create_http_namespace("shop").await;
    let mut ids = BTreeMap::new();
    for name in ["a", "b", "c"] {
        let svc = seeder.create_service(&ns, name, false).await;
        seeder.register(&svc.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]).await;
        ids.insert(name, svc.id);
    }
    let proxy = FaultProxy::start(moto.addr()).await;
    let server = serve(&proxy.endpoint(), &["--full-refresh-interval", "1h"]).await;
    let (mut client, _) = connect(&server).await;

    // a is throttled, b fails outright; c goes on.
    proxy.fail("DiscoverInstancesRevision", Some("a"), Fault::Throttle);
    proxy.fail("DiscoverInstances", Some("a"), Fault::Throttle);
    proxy.fail("DiscoverInstancesRevision", Some("b"), Fault::Error);
    proxy.fail("DiscoverInstances", Some("b"), Fault::Error);
    seeder.register(&ids["a"], "i-2", &[("AWS_INSTANCE_IPV4", "10.0.0.2")]).await;
    seeder.register(&ids["b"], "i-2", &[("AWS_INSTANCE_IPV4", "10.0.0.2")]).await;
    seeder.register(&ids["c"], "i-2", &[("AWS_INSTANCE_IPV4", "10.0.0.2")]).await;
    let (push, _) = push_where(&mut client, Duration::from_secs(20), "c's change", |e| {
        addresses(&e["c.shop"].1) == ["10.0.0.1", "10.0.0.2"]
    })
    .await;
    let entries = by_host(&push);
    assert_eq!(addresses(&entries["a.shop"].1), ["10.0.0.1"], "a keeps its last good state");
    assert_eq!(addresses(&entries["b.shop"].1), ["10.0.0.1"], "b keeps its last good state");

    // The counter moves when the call returns, the service's last_error when its poll is recorded:
    // both are waited for, not read once.
    let (metrics, errors) =
        eventually("throttled calls counted and recorded per service", Duration::from_secs(20), || {
            let server = &server;
            async move {
                let c = counters(server).await;
                let status = snapshot_json(server).await;
                let errors: BTreeMap<String, String> = status["source"]["services"]
                    .as_array()?
                    .iter()
                    .filter_map(|s| {
                        Some((s["service"].as_str()?.to_owned(), s["last_error"].as_str()?.to_owned()))
                    })
                    .collect();
                (counter(&c, "DiscoverInstancesRevision", "throttled") > 0.0
                    && counter(&c, "DiscoverInstancesRevision", "error") > 0.0
                    && errors.contains_key("a")
                    && errors.contains_key("b"))
                .then_some((c, errors))
            }
        })
        .await;
    assert!(proxy.faulted() > 0);
    assert!(errors["a"].contains("ThrottlingException"), "{errors:?}");
    assert!(errors["b"].contains("InvalidInput"), "{errors:?}");
    assert!(!errors.contains_key("c"), "{errors:?}");

    // How much throttling slows the poller down is a pure schedule, unit-tested in
    // inventory::tests (`next_poll_delay`); timing it here would make this test flaky.
    assert!(polls(&metrics) > 0.0);

    proxy.heal();
    push_where(&mut client, Duration::from_secs(20), "a's and b's changes after healing", |e| {
        addresses(&e["a.shop"].1).len() == 2 && addresses(&e["b.shop"].1).len() == 2
    })
    .await;
}

#[tokio::test]
async fn an_idle_poll_costs_one_revision_call_per_service() {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let ns = seeder.create_http_namespace("shop").await;
    for n in 0..10 {
        let svc = seeder.create_service(&ns, &format!("svc-{n}"), false).await;
        seeder.register(&svc.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]).await;
    }
    let proxy = FaultProxy::start(moto.addr()).await;
    let server = serve(
        &proxy.endpoint(),
        &["--poll-interval", "100ms", "--full-refresh-interval", "1h", "--list-interval", "1h"],
    )
    .await;
    let (_client, _) = connect(&server).await;
    let start_calls = proxy.calls();
    assert_eq!(start_calls["ListNamespaces"], 1);
    assert_eq!(start_calls["ListServices"], 1);
    assert_eq!(start_calls["DiscoverInstances"], 10);
    assert_eq!(start_calls["GetServiceAttributes"], 10);

    let before = (counters(&server).await, proxy.calls(), proxy.calls_by_service());
    let polls_before = polls(&before.0);
    eventually("ten idle polls", Duration::from_secs(30), || {
        let server = &server;
        async move { (polls(&counters(server).await) - polls_before >= 10.0).then_some(()) }
    })
    .await;
    let after = (counters(&server).await, proxy.calls(), proxy.calls_by_service());
    let polls = polls(&after.0) - polls(&before.0);
    let wire = |op: &str| after.1.get(op).copied().unwrap_or(0) - before.1.get(op).copied().unwrap_or(0);
    assert!(polls >= 10.0, "{polls} polls");
    assert_eq!(
        wire("ListNamespaces")
            + wire("ListServices")
            + wire("DiscoverInstances")
            + wire("GetServiceAttributes"),
        0,
        "{:?}",
        after.1
    );
    // At most one revision call per service per poll (polls are counted when the next one
    // starts: allow the one in progress), and every service is checked. A poll can cost less,
    // never more: it skips a service whose previous call is still out, as on a loaded machine.
    for n in 0..10 {
        let key = ("DiscoverInstancesRevision".to_owned(), format!("svc-{n}"));
        let count = after.2.get(&key).copied().unwrap_or(0) - before.2.get(&key).copied().unwrap_or(0);
        #[allow(clippy::cast_precision_loss)]
        let per_service = count as f64;
        assert!(
            per_service >= 1.0 && per_service <= polls + 1.0,
            "svc-{n}: {count} revision calls in {polls} polls"
        );
    }
    #[allow(clippy::cast_precision_loss)]
    let revisions = wire("DiscoverInstancesRevision") as f64;
    assert!(revisions <= 10.0 * (polls + 1.0), "{revisions} revision calls in {polls} polls");
    let counted = counter(&after.0, "DiscoverInstancesRevision", "success")
        - counter(&before.0, "DiscoverInstancesRevision", "success");
    assert!((counted - revisions).abs() <= 10.0, "metrics {counted} vs wire {revisions}");
    eprintln!("idle: {revisions} revision calls in {polls} polls of 10 services");
}

#[tokio::test]
async fn moto_deviations_do_not_leak_into_the_mesh() {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    // Same service name in two namespaces; moto's ListServices ignores the NAMESPACE_ID filter.
    let a = seeder.create_http_namespace("ns-a").await;
    let b = seeder.create_http_namespace("ns-b").await;
    let api_a = seeder.create_service(&a, "api", false).await;
    let api_b = seeder.create_service(&b, "api", false).await;
    let db_b = seeder.create_service(&b, "db", false).await;
    seeder.register(&api_a.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.1.1")]).await;
    seeder.register(&api_b.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.2.1")]).await;
    seeder.register(&db_b.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.2.2")]).await;
    let server = serve(&moto.endpoint(), &["--full-refresh-interval", "1s"]).await;
    let (mut client, first) = connect(&server).await;
    let entries = by_host(&first);
    assert_eq!(entries.keys().cloned().collect::<Vec<_>>(), ["api.ns-a", "api.ns-b", "db.ns-b"]);
    assert_eq!(addresses(&entries["api.ns-a"].1), ["10.0.1.1"]);
    assert_eq!(addresses(&entries["api.ns-b"].1), ["10.0.2.1"]);

    // Re-registering an instance ID is an upsert on AWS; moto appends a duplicate. One endpoint, the newest.
    seeder.register(&db_b.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.2.3")]).await;
    let (push, _) = push_where(&mut client, Duration::from_secs(10), "the re-registration", |e| {
        addresses(&e["db.ns-b"].1) == ["10.0.2.3"]
    })
    .await;
    assert_eq!(by_host(&push).len(), 3);
}

#[tokio::test]
async fn readiness_waits_for_the_first_complete_sync() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let moto = Moto::start().await;
    moto.seeder().await.seed_tutorial().await;
    moto.pause();
    let server = serve(&moto.endpoint(), &[]).await;
    let health = || async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let request = HealthCheckRequest { service: String::new() };
        HealthClient::new(channel).check(request).await.unwrap().into_inner().status()
    };
    // Cloud Map has answered nothing yet: not ready, on both signals, even once a call has failed.
    eventually("a failed Cloud Map call to be recorded", Duration::from_secs(30), || async {
        let (_, body) = http_get(server.admin_addr, "/debug/snapshot").await.ok()?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["source"]["last_error"].as_str().map(str::to_owned)
    })
    .await;
    assert_eq!(http_get(server.admin_addr, "/ready").await.unwrap().0, 503);
    assert_eq!(health().await, ServingStatus::NotServing);
    // A one-shot query (grpcurl half-closes after its request) made before the sync is
    // answered once the sync completes, not ended empty.
    let mut one_shot = AdsClient::connect(server.grpc_addr).await.unwrap();
    one_shot.send_initial(&[SERVICE_ENTRY_V1]).await;
    one_shot.half_close();

    moto.resume();
    let response = one_shot.recv().await;
    assert_eq!(service_entries(&response).len(), 1, "the withheld answer arrives after the sync");
    assert!(one_shot.recv_timeout(DEADLINE).await.unwrap().is_none(), "then the stream ends");
    eventually("ready after the first sync", Duration::from_secs(30), || async {
        (http_get(server.admin_addr, "/ready").await.ok()?.0 == 200).then_some(())
    })
    .await;
    // grpc.health follows /ready through its own task: allow it its moment.
    eventually("grpc.health SERVING after the first sync", DEADLINE, || async {
        (health().await == ServingStatus::Serving).then_some(())
    })
    .await;
}

/// `cloudmap_xds_mass_removal_held_services` from /metrics.
async fn held_services(server: &TestServer) -> f64 {
    let (_, body) = http_get(server.admin_addr, "/metrics").await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix("cloudmap_xds_mass_removal_held_services "))
        .and_then(|v| v.parse().ok())
        .expect("held services gauge")
}

#[tokio::test]
async fn a_mass_removal_stays_served_until_listings_confirm_it() {
    const CONFIRM: Duration = Duration::from_secs(3);
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let ns = seeder.create_http_namespace("shop").await;
    let mut services = Vec::new();
    for name in ["cart", "pay", "web", "db"] {
        let svc = seeder.create_service(&ns, name, false).await;
        seeder.register(&svc.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]).await;
        services.push(svc);
    }
    let server =
        serve(&moto.endpoint(), &["--list-interval", "300ms", "--mass-removal-confirm-after", "3s"]).await;
    let (mut client, first) = connect(&server).await;
    assert_eq!(by_host(&first).len(), 4);
    assert_eq!(held_services(&server).await, 0.0);

    // Three of four services deleted at once: more than the default threshold of one half.
    let deleted = Instant::now();
    for svc in &services[1..] {
        seeder.deregister(&svc.id, "i-1").await;
        seeder.client().delete_service().id(&svc.id).send().await.unwrap();
    }
    eventually("the removal to be held", Duration::from_secs(10), || async {
        (held_services(&server).await == 3.0).then_some(())
    })
    .await;
    // Each listing while held says so in the status (reads of the deleted services fail in between).
    let status = eventually("the hold in the source status", Duration::from_secs(10), || async {
        let status = snapshot_json(&server).await;
        let held = status["source"]["last_error"].as_str()?.starts_with("a mass removal is held: 3 services");
        held.then_some(status)
    })
    .await;
    assert_eq!(status["serviceEntries"].as_array().unwrap().len(), 4, "still served while held");

    // Every push until the confirm period ends still carries all four; then they go.
    let removed_at = loop {
        let push = client.recv_timeout(Duration::from_secs(20)).await.unwrap().expect("stream open");
        client.ack(&push).await;
        let entries = by_host(&push);
        if entries.len() == 1 {
            assert!(entries.contains_key("cart.shop"));
            break Instant::now();
        }
        assert_eq!(entries.len(), 4, "a push removed only part of the held services");
    };
    let took = removed_at - deleted;
    assert!(took >= CONFIRM, "removed {took:?} after the deletion, before --mass-removal-confirm-after");
    assert_eq!(held_services(&server).await, 0.0);
}
