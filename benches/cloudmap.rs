//! The release binary polling Cloud Map at rest: time to ready, RSS, our idle CPU and
//! our CPU per AWS call (signing, HTTP, parsing, bookkeeping), with the default
//! intervals (poll 5 s: one DiscoverInstancesRevision per service; full refresh and
//! listing every 30 s). Calls are counted from our own `cloudmap_xds_aws_calls_total`.
//!
//! Two backends:
//! - `moto`: a real moto_server seeded with one HTTP namespace, N services of M
//!   instances (one attribute each, the IPv4), default rates. Two runs: straight at
//!   moto, which closes every connection (a TCP connection per call), then through
//!   `support::fault_proxy` (no faults), which keeps ours alive as AWS does.
//! - `fake`: `common::fake_cloudmap`, an in-process fake Cloud Map serving the
//!   registry every bench generates (10 namespaces, ECS-like instances with seven
//!   attributes), keeping connections alive; for shapes moto cannot be seeded with in a
//!   bench's time. The binary runs with [`FAKE_FLAGS`] (rates raised to AWS's data-plane
//!   quotas, so the default intervals hold at 10,000 services: at the default rates a
//!   poll of 10,000 revision checks takes 33 s and the first sync over 1,000 s).
//!
//! `cargo bench --bench cloudmap` (env `MOTO_SERVER`, `CLOUDMAP_XDS_BIN`,
//! `CLOUDMAP_RUNS` default `moto:1000x10,fake:1000x10,fake:10000x10`,
//! `CLOUDMAP_FAKE_FLAGS` default [`FAKE_FLAGS`], `CLOUDMAP_WINDOW_S` default 60);
//! under `cargo test` a small smoke pass of each backend (moto needs `$MOTO_SERVER`,
//! like the Cloud Map tests).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed bench

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cloudmap_xds::test_helpers::{eventually, free_port, http_get};
use common::fake_cloudmap::{FakeCloudMap, OPERATIONS};
use common::{process_cpu, rss_bytes};
use support::fault_proxy::FaultProxy;
use support::moto::{self, Moto};

/// The fake runs' flags: DiscoverInstancesRevision and DiscoverInstances at AWS's
/// account quotas (3,000/s and 1,000/s; 10,000 services need 2,000/s and 333/s at the
/// default intervals), GetServiceAttributes and the list calls (no published quota)
/// high enough for 10,000 services per 30 s listing.
const FAKE_FLAGS: &str = "--rate-revision 3000 --rate-discover 1000 --rate-attributes 1000 --rate-list 20";

/// One value summed over a Prometheus text exposition's series of `name`.
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// `cloudmap_xds_aws_calls_total` by its `api` label, all outcomes.
fn calls_by_api(body: &str) -> BTreeMap<String, f64> {
    let mut calls = BTreeMap::new();
    for line in body.lines().filter(|l| l.starts_with("cloudmap_xds_aws_calls_total{")) {
        let api = line.split_once("api=\"").and_then(|(_, rest)| rest.split_once('"')).map(|(api, _)| api);
        let value = line.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok());
        if let (Some(api), Some(value)) = (api, value) {
            *calls.entry(api.to_owned()).or_default() += value;
        }
    }
    calls
}

async fn metrics(admin: SocketAddr) -> String {
    http_get(admin, "/metrics").await.unwrap().1
}

/// A `/proc/<pid>/status` field in bytes (`RssAnon`, `RssFile`, `VmHWM`).
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// What one run of the binary measured.
struct Run {
    ready: Duration,
    rss_ready: u64,
    rss: u64,
    /// Anonymous memory (heap, stacks) at the end; the rest of `rss` is the binary and libraries.
    rss_anon: u64,
    peak: u64,
    idle_ms_per_s: f64,
    calls_per_s: f64,
    /// Per second, by API.
    calls_by_api: BTreeMap<String, f64>,
    cpu_per_call_us: f64,
}

/// Starts the binary against `endpoint` with `flags`, waits for ready, lets `settle`
/// pass, then measures its CPU and AWS calls over `window`. `check` runs on the
/// metrics once ready, before the binary is stopped.
async fn run(
    bin: &str,
    endpoint: &str,
    flags: &[String],
    settle: Duration,
    window: Duration,
    check: impl AsyncFnOnce(SocketAddr),
) -> Run {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(["serve", "--aws-region", moto::REGION, "--aws-endpoint-url", endpoint])
        .args(["--grpc-addr", &grpc.to_string(), "--admin-addr", &admin.to_string(), "--log", "warn"])
        .args(flags)
        .envs(moto::CLIENT_ENV)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    eventually("the binary to be ready", Duration::from_secs(900), || async {
        matches!(http_get(admin, "/ready").await, Ok((200, _))).then_some(())
    })
    .await;
    let ready = started.elapsed();
    let pid = child.id();
    let rss_ready = rss_bytes(pid);
    tokio::time::sleep(settle).await;
    let (cpu0, before) = (process_cpu(pid), calls_by_api(&metrics(admin).await));
    tokio::time::sleep(window).await;
    let (cpu, after) = (process_cpu(pid) - cpu0, calls_by_api(&metrics(admin).await));
    let calls_by_api: BTreeMap<String, f64> = after
        .iter()
        .map(|(api, n)| (api.clone(), (n - before.get(api).unwrap_or(&0.0)) / window.as_secs_f64()))
        .collect();
    let calls = calls_by_api.values().sum::<f64>() * window.as_secs_f64();
    let (rss, rss_anon, peak) = (rss_bytes(pid), status_bytes(pid, "RssAnon"), status_bytes(pid, "VmHWM"));
    check(admin).await;
    let _ = child.kill();
    let _ = child.wait();
    Run {
        ready,
        rss_ready,
        rss,
        rss_anon,
        peak,
        idle_ms_per_s: cpu.as_secs_f64() * 1000.0 / window.as_secs_f64(),
        calls_per_s: calls / window.as_secs_f64(),
        calls_by_api,
        cpu_per_call_us: if calls > 0.0 { cpu.as_secs_f64() * 1e6 / calls } else { 0.0 },
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn load_average() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

async fn moto_runs(bin: &str, services: usize, instances: usize, settle: Duration, window: Duration) {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let seeding = Instant::now();
    let ns = seeder.create_http_namespace("bench").await;
    for s in 0..services {
        let svc = seeder.create_service(&ns, &format!("service-{s}"), false).await;
        seeder.register_many(&svc.id, instances, |i| format!("10.{}.{}.{i}", s / 256, s % 256)).await;
    }
    eprintln!("seeded moto with {services} x {instances} in {:.1?}", seeding.elapsed());
    // moto answers every call with `Connection: close`; AWS keeps pooled connections
    // alive. The second run goes through a proxy that keeps ours alive.
    let closing = run(bin, &moto.endpoint(), &[], settle, window, async |_| {}).await;
    let proxy = FaultProxy::start(moto.addr()).await;
    let kept = run(bin, &proxy.endpoint(), &[], settle, window, async |_| {}).await;
    let calls: u64 = proxy.calls().values().sum();
    let calls_per_connection = calls as f64 / proxy.connections().max(1) as f64;
    println!(
        "Cloud Map on moto, {services} × {instances} (default rates): ready after {:.1} s, RSS {:.0} MB after ready, \
         {:.0} MB steady, idle CPU {:.1} ms/s at {:.0} AWS calls/s, {:.0} µs CPU per call (a new connection per call, \
         as moto answers); kept alive: {:.1} ms/s at {:.0} calls/s, {:.0} µs per call ({calls_per_connection:.0} calls \
         per connection), RSS {:.0} MB after ready, {:.0} MB steady; load average {}",
        closing.ready.as_secs_f64(),
        mb(closing.rss_ready),
        mb(closing.rss),
        closing.idle_ms_per_s,
        closing.calls_per_s,
        closing.cpu_per_call_us,
        kept.idle_ms_per_s,
        kept.calls_per_s,
        kept.cpu_per_call_us,
        mb(kept.rss_ready),
        mb(kept.rss),
        load_average(),
    );
    println!(
        "BENCH_JSON {{\"bench\":\"cloudmap\",\"backend\":\"moto\",\"services\":{services},\"instances\":{instances},\
         \"ready_ms\":{:.0},\"rss_ready_mb\":{:.1},\"rss_mb\":{:.1},\"idle_cpu_ms_per_s\":{:.2},\"calls_per_s\":{:.1},\
         \"cpu_per_call_us\":{:.0},\"keepalive_rss_ready_mb\":{:.1},\"keepalive_rss_mb\":{:.1},\
         \"keepalive_idle_cpu_ms_per_s\":{:.2},\"keepalive_calls_per_s\":{:.1},\"keepalive_cpu_per_call_us\":{:.0},\
         \"keepalive_calls_per_connection\":{calls_per_connection:.1}}}",
        closing.ready.as_millis(),
        mb(closing.rss_ready),
        mb(closing.rss),
        closing.idle_ms_per_s,
        closing.calls_per_s,
        closing.cpu_per_call_us,
        mb(kept.rss_ready),
        mb(kept.rss),
        kept.idle_ms_per_s,
        kept.calls_per_s,
        kept.cpu_per_call_us,
    );
}

async fn fake_run(
    bin: &str,
    services: usize,
    instances: usize,
    flags: &[String],
    settle: Duration,
    window: Duration,
    smoke: bool,
) {
    let fake = FakeCloudMap::start(&common::generated(services, instances)).await;
    let measured = run(bin, &fake.endpoint(), flags, settle, window, async |admin| {
        if smoke {
            // Every read the source makes went through the fake, and what it served is what was generated.
            eventually("a revision check", Duration::from_secs(60), || async {
                (fake.calls()["DiscoverInstancesRevision"] > 0).then_some(())
            })
            .await;
            let served = metric(&metrics(admin).await, "cloudmap_xds_service_entries");
            assert_eq!(served as usize, services, "ServiceEntries served");
        }
    })
    .await;
    let calls = fake.calls();
    let total: u64 = calls.values().sum();
    assert_eq!(fake.errors(), 0, "the fake answered errors; calls: {calls:?}");
    assert!(OPERATIONS.iter().all(|op| calls[op] > 0) || !smoke, "an operation was never called: {calls:?}");
    assert!(
        fake.connections() < total,
        "connections were not kept alive: {} for {total} calls",
        fake.connections()
    );
    let calls_per_connection = total as f64 / fake.connections().max(1) as f64;
    println!(
        "Cloud Map on the in-process fake, {services} × {instances} ({}): ready after {:.1} s, RSS {:.0} MB after \
         ready, {:.0} MB steady ({:.0} MB anonymous, peak {:.0} MB), idle CPU {:.1} ms/s at {:.0} AWS calls/s, {:.0} µs \
         CPU per call ({calls_per_connection:.0} calls per connection; per second: {}); load average {}",
        flags.join(" "),
        measured.ready.as_secs_f64(),
        mb(measured.rss_ready),
        mb(measured.rss),
        mb(measured.rss_anon),
        mb(measured.peak),
        measured.idle_ms_per_s,
        measured.calls_per_s,
        measured.cpu_per_call_us,
        measured.calls_by_api.iter().map(|(api, n)| format!("{api} {n:.1}")).collect::<Vec<_>>().join(", "),
        load_average(),
    );
    println!(
        "BENCH_JSON {{\"bench\":\"cloudmap\",\"backend\":\"fake\",\"services\":{services},\"instances\":{instances},\
         \"flags\":\"{}\",\"ready_ms\":{:.0},\"rss_ready_mb\":{:.1},\"rss_mb\":{:.1},\"rss_anon_mb\":{:.1},\
         \"peak_mb\":{:.1},\"idle_cpu_ms_per_s\":{:.2},\"calls_per_s\":{:.1},\"cpu_per_call_us\":{:.0},\
         \"calls_per_connection\":{calls_per_connection:.1},\"calls_per_s_by_api\":{{{}}}}}",
        flags.join(" "),
        measured.ready.as_millis(),
        mb(measured.rss_ready),
        mb(measured.rss),
        mb(measured.rss_anon),
        mb(measured.peak),
        measured.idle_ms_per_s,
        measured.calls_per_s,
        measured.cpu_per_call_us,
        measured
            .calls_by_api
            .iter()
            .map(|(api, n)| format!("\"{api}\":{n:.1}"))
            .collect::<Vec<_>>()
            .join(","),
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let bin = std::env::var("CLOUDMAP_XDS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cloudmap-xds").into());
    let runs = if full {
        std::env::var("CLOUDMAP_RUNS").unwrap_or_else(|_| "moto:1000x10,fake:1000x10,fake:10000x10".into())
    } else {
        "moto:5x2,fake:5x2".into()
    };
    let window = Duration::from_secs(if full {
        std::env::var("CLOUDMAP_WINDOW_S").ok().and_then(|s| s.parse().ok()).unwrap_or(60)
    } else {
        2
    });
    // One full-refresh period to settle before the window.
    let settle = Duration::from_secs(if full { 30 } else { 1 });
    let mut fake_flags: Vec<String> = std::env::var("CLOUDMAP_FAKE_FLAGS")
        .unwrap_or_else(|_| FAKE_FLAGS.into())
        .split_whitespace()
        .map(String::from)
        .collect();
    if !full {
        // The smoke pass waits for a revision check: the first poll after the first sync.
        fake_flags.extend(["--poll-interval".into(), "500ms".into()]);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    for spec in runs.split(',') {
        let (backend, shape) = spec.split_once(':').expect("CLOUDMAP_RUNS entries are BACKEND:NxM");
        let (services, instances) = shape.split_once('x').expect("a shape is NxM");
        let (services, instances) = (services.parse::<usize>().unwrap(), instances.parse::<usize>().unwrap());
        runtime.block_on(async {
            match backend {
                "moto" => moto_runs(&bin, services, instances, settle, window).await,
                "fake" => fake_run(&bin, services, instances, &fake_flags, settle, window, !full).await,
                other => panic!("unknown backend {other:?} (moto or fake)"),
            }
        });
    }
}
