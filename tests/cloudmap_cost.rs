//! Measurement, not a pass/fail test: AWS calls per idle poll, per full refresh
//! and per listing, the first sync's time and calls at the default rates, and
//! the time from a registration to the push on the ADS stream, for 100 and 1,000
//! services on moto. Calls are counted on the wire by a proxy in front of moto;
//! the few rules the numbers must keep (an idle poll makes revision calls only,
//! GetServiceAttributes comes exactly with listings) are asserted. Run it explicitly:
//!
//! ```text
//! MOTO_SERVER=/path/to/moto_server cargo test --release --test cloudmap_cost -- --ignored --nocapture
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_precision_loss)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cloudmap_xds::test_helpers::server::serve_args;
use cloudmap_xds::test_helpers::{
    AdsClient, SERVICE_ENTRY_V1, TestServer, eventually, http_get, service_entries,
};
use support::fault_proxy::FaultProxy;
use support::moto::{self, Moto};

async fn polls(server: &TestServer) -> f64 {
    let (_, body) = http_get(server.admin_addr, "/metrics").await.unwrap();
    body.lines()
        .filter(|l| l.starts_with("cloudmap_xds_source_loads_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>, op: &str) -> u64 {
    after.get(op).copied().unwrap_or(0) - before.get(op).copied().unwrap_or(0)
}

async fn start(proxy: &FaultProxy, poll: &str, full_refresh: &str) -> (TestServer, AdsClient, Duration) {
    let mut args = serve_args(&[
        "--aws-region",
        moto::REGION,
        "--aws-endpoint-url",
        &proxy.endpoint(),
        "--poll-interval",
        poll,
        "--full-refresh-interval",
        full_refresh,
        "--list-interval",
        full_refresh,
        "--publish-namespace",
        "istio-system",
    ]);
    args.cloudmap = args.cloudmap.with_static_credentials(moto::ACCESS_KEY_ID, moto::SECRET_ACCESS_KEY);
    let started = Instant::now();
    let server = TestServer::start(args).await.unwrap();
    let mut client = AdsClient::connect(server.grpc_addr).await.unwrap();
    client.send_initial(&[SERVICE_ENTRY_V1]).await;
    // The first sync of 1,000 services takes about 100 s at the default attribute budget.
    loop {
        let response = client.recv_timeout(Duration::from_secs(600)).await.unwrap().unwrap();
        client.ack(&response).await;
        if response.type_url == SERVICE_ENTRY_V1 {
            break;
        }
    }
    (server, client, started.elapsed())
}

async fn next_poll(server: &TestServer, after: f64) -> f64 {
    eventually("the next poll", Duration::from_secs(30), || async move {
        let now = polls(server).await;
        (now > after).then_some(now)
    })
    .await
}

async fn measure(services: usize, poll: &str) {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let ns = seeder.create_http_namespace("shop").await;
    let seeding = Instant::now();
    let mut ids = Vec::new();
    for n in 0..services {
        let svc = seeder.create_service(&ns, &format!("svc-{n:04}"), false).await;
        seeder.register(&svc.id, "i-0", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]).await;
        ids.push(svc.id);
    }
    let seeding = seeding.elapsed();

    // 1. Steady state: no full refresh, no listing. Calls counted on the wire from poll to poll.
    let proxy = FaultProxy::start(moto.addr()).await;
    let (server, mut client, initial_sync) = start(&proxy, poll, "1h").await;
    let initial_calls = proxy.calls();
    let mut p = next_poll(&server, polls(&server).await).await;
    p = next_poll(&server, p).await;
    let (p0, c0) = (p, proxy.calls());
    for _ in 0..3 {
        p = next_poll(&server, p).await;
    }
    let (p1, c1) = (p, proxy.calls());
    let idle_polls = p1 - p0;
    let idle_revisions = delta(&c1, &c0, "DiscoverInstancesRevision") as f64;
    let idle_other = delta(&c1, &c0, "DiscoverInstances")
        + delta(&c1, &c0, "ListServices")
        + delta(&c1, &c0, "ListNamespaces")
        + delta(&c1, &c0, "GetServiceAttributes");
    // No control-plane call between listings (a DiscoverInstances may follow a revision that moved).
    let idle_control_plane = delta(&c1, &c0, "ListServices")
        + delta(&c1, &c0, "ListNamespaces")
        + delta(&c1, &c0, "GetServiceAttributes");
    assert_eq!(idle_control_plane, 0, "idle polls make no control-plane call: {c1:?}");
    assert_eq!(
        initial_calls.get("GetServiceAttributes").copied().unwrap_or(0),
        services as u64,
        "one attribute read per service for the first sync"
    );

    // 2. Registration -> push, at random moments of the poll cycle.
    let poll_interval = humantime::parse_duration(poll).unwrap();
    let mut latencies = Vec::new();
    for k in 0..8 {
        let id = &ids[(k * 37) % ids.len()];
        let ip = format!("10.9.0.{}", k + 1);
        tokio::time::sleep(poll_interval.mul_f64(fastrand::f64())).await;
        let t0 = Instant::now();
        seeder.register(id, &format!("i-new-{k}"), &[("AWS_INSTANCE_IPV4", &ip)]).await;
        loop {
            let response = client.recv().await;
            client.ack(&response).await;
            if response.type_url == SERVICE_ENTRY_V1
                && service_entries(&response)
                    .iter()
                    .any(|(_, se)| se.endpoints.iter().any(|e| e.address == ip))
            {
                latencies.push(t0.elapsed());
                break;
            }
        }
    }
    latencies.sort();
    let mean = latencies.iter().sum::<Duration>() / u32::try_from(latencies.len()).unwrap();
    drop((client, server));

    // 3. Full refresh and listing every 10 s: calls in a 30 s window.
    let proxy = FaultProxy::start(moto.addr()).await;
    let (server, _client, _) = start(&proxy, poll, "10s").await;
    let (q0, f0) = (polls(&server).await, proxy.calls());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (q1, f1) = (polls(&server).await, proxy.calls());
    let per_refresh = |op: &str| delta(&f1, &f0, op) as f64 / 3.0;
    drop(server);
    // Attribute reads come with listings only (at most one per service per listing, counting the
    // listing whose reads were still out when the window opened) and within their budget.
    let listings = delta(&f1, &f0, "ListNamespaces") as f64;
    let attribute_reads = delta(&f1, &f0, "GetServiceAttributes") as f64;
    let rate = cloudmap_xds::source::cloudmap::defaults::RATE_ATTRIBUTES;
    assert!(
        attribute_reads <= (listings + 1.0) * services as f64 && attribute_reads <= 30.0 * rate + rate,
        "{attribute_reads} GetServiceAttributes for {listings} listings of {services} services"
    );

    println!("services={services} poll={poll} (seeding took {seeding:.1?})");
    println!(
        "  first complete sync served after {initial_sync:.2?}: {} ListNamespaces, {} ListServices, {} DiscoverInstances, \
         {} GetServiceAttributes",
        initial_calls.get("ListNamespaces").unwrap_or(&0),
        initial_calls.get("ListServices").unwrap_or(&0),
        initial_calls.get("DiscoverInstances").unwrap_or(&0),
        initial_calls.get("GetServiceAttributes").unwrap_or(&0),
    );
    println!(
        "  idle poll: {:.1} DiscoverInstancesRevision per poll ({idle_revisions} in {idle_polls} polls), {idle_other} other calls",
        idle_revisions / idle_polls
    );
    println!(
        "  per 10 s full refresh + listing ({:.0} polls): DiscoverInstances {:.0}, DiscoverInstancesRevision {:.0}, \
         ListNamespaces {:.1}, ListServices {:.1}, GetServiceAttributes {:.0}",
        (q1 - q0) / 3.0,
        per_refresh("DiscoverInstances"),
        per_refresh("DiscoverInstancesRevision"),
        per_refresh("ListNamespaces"),
        per_refresh("ListServices"),
        per_refresh("GetServiceAttributes"),
    );
    println!(
        "  registration -> push ({} samples): min {:.2?}, mean {mean:.2?}, median {:.2?}, max {:.2?}",
        latencies.len(),
        latencies[0],
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for the docs; run with --ignored --nocapture"]
async fn cost_and_latency_100_services() {
    measure(100, "5s").await;
    measure(100, "1s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for the docs; run with --ignored --nocapture"]
async fn cost_and_latency_1000_services() {
    measure(1000, "5s").await;
}
