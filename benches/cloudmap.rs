//! The release binary polling moto's Cloud Map at rest: our idle CPU and our CPU
//! per AWS call (signing, HTTP, parsing, bookkeeping), with the default intervals
//! (poll 5 s: one DiscoverInstancesRevision per service; full refresh and listing
//! every 30 s). Calls are counted from our own `cloudmap_xds_aws_calls_total`.
//! Two runs: straight at moto, which closes every connection (a TCP connection per
//! call), then through `support::fault_proxy` (no faults), which keeps ours alive as
//! AWS does; both figures are reported.
//!
//! `cargo bench --bench cloudmap` (env `MOTO_SERVER`, `CLOUDMAP_XDS_BIN`,
//! `CLOUDMAP_SHAPE` default `1000x10`, `CLOUDMAP_WINDOW_S` default 60); under
//! `cargo test` a small smoke pass (needs `$MOTO_SERVER`, like the Cloud Map tests).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed bench

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{process_cpu, rss_bytes};
use support::fault_proxy::FaultProxy;
use support::moto::{self, Moto};

async fn aws_calls(admin: std::net::SocketAddr) -> f64 {
    let (_, body) = cloudmap_xds::test_helpers::http_get(admin, "/metrics").await.unwrap();
    body.lines()
        .filter(|l| l.starts_with("cloudmap_xds_aws_calls_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// What one run of the binary measured.
struct Run {
    ready: Duration,
    rss_ready: u64,
    rss: u64,
    idle_ms_per_s: f64,
    calls_per_s: f64,
    cpu_per_call_us: f64,
}

/// Starts the binary against `endpoint`, waits for ready, lets one full-refresh period
/// pass, then measures its CPU and AWS calls over `window`.
async fn run(bin: &str, endpoint: &str, settle: Duration, window: Duration) -> Run {
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], cloudmap_xds::test_helpers::free_port()));
    let grpc = std::net::SocketAddr::from(([127, 0, 0, 1], cloudmap_xds::test_helpers::free_port()));
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(["serve", "--aws-region", moto::REGION, "--aws-endpoint-url", endpoint])
        .args(["--grpc-addr", &grpc.to_string(), "--admin-addr", &admin.to_string(), "--log", "warn"])
        .envs(moto::CLIENT_ENV)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    loop {
        if let Ok((200, _)) = cloudmap_xds::test_helpers::http_get(admin, "/ready").await {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = started.elapsed();
    let pid = child.id();
    let rss_ready = rss_bytes(pid);
    tokio::time::sleep(settle).await;
    let (cpu0, calls0) = (process_cpu(pid), aws_calls(admin).await);
    tokio::time::sleep(window).await;
    let (cpu, calls) = (process_cpu(pid) - cpu0, aws_calls(admin).await - calls0);
    let rss = rss_bytes(pid);
    let _ = child.kill();
    let _ = child.wait();
    Run {
        ready,
        rss_ready,
        rss,
        idle_ms_per_s: cpu.as_secs_f64() * 1000.0 / window.as_secs_f64(),
        calls_per_s: calls / window.as_secs_f64(),
        cpu_per_call_us: if calls > 0.0 { cpu.as_secs_f64() * 1e6 / calls } else { 0.0 },
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let bin = std::env::var("CLOUDMAP_XDS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_cloudmap-xds").into());
    let (services, instances) = if full {
        let shape = std::env::var("CLOUDMAP_SHAPE").unwrap_or_else(|_| "1000x10".into());
        let (a, b) = shape.split_once('x').unwrap();
        (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap())
    } else {
        (5, 2)
    };
    let window = Duration::from_secs(if full {
        std::env::var("CLOUDMAP_WINDOW_S").ok().and_then(|s| s.parse().ok()).unwrap_or(60)
    } else {
        6
    });
    // One full-refresh period to settle before the window.
    let settle = Duration::from_secs(if full { 30 } else { 1 });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let moto = Moto::start().await;
        let seeder = moto.seeder().await;
        let seeding = Instant::now();
        let ns = seeder.create_http_namespace("bench").await;
        for s in 0..services {
            let svc = seeder.create_service(&ns, &format!("service-{s}"), false).await;
            seeder.register_many(&svc.id, instances, |i| format!("10.{}.{}.{i}", s / 256, s % 256)).await;
        }
        eprintln!("seeded {services} x {instances} in {:.1?}", seeding.elapsed());
        // moto answers every call with `Connection: close`; AWS keeps pooled connections
        // alive. The second run goes through a proxy that keeps ours alive.
        let closing = run(&bin, &moto.endpoint(), settle, window).await;
        let proxy = FaultProxy::start(moto.addr()).await;
        let kept = run(&bin, &proxy.endpoint(), settle, window).await;
        let calls: u64 = proxy.calls().values().sum();
        let calls_per_connection = calls as f64 / proxy.connections().max(1) as f64;
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load: Vec<&str> = load.split_whitespace().take(3).collect();
        println!(
            "Cloud Map on moto, {services} × {instances}: ready after {:.1} s, RSS {:.0} MB after ready, {:.0} MB steady, \
             idle CPU {:.1} ms/s at {:.0} AWS calls/s, {:.0} µs CPU per call (a new connection per call, as moto answers); \
             kept alive: {:.1} ms/s at {:.0} calls/s, {:.0} µs per call ({calls_per_connection:.0} calls per connection); \
             load average {}",
            closing.ready.as_secs_f64(),
            closing.rss_ready as f64 / 1e6,
            closing.rss as f64 / 1e6,
            closing.idle_ms_per_s,
            closing.calls_per_s,
            closing.cpu_per_call_us,
            kept.idle_ms_per_s,
            kept.calls_per_s,
            kept.cpu_per_call_us,
            load.join(" "),
        );
        println!(
            "BENCH_JSON {{\"bench\":\"cloudmap\",\"services\":{services},\"instances\":{instances},\"ready_ms\":{:.0},\
             \"rss_ready_mb\":{:.1},\"rss_mb\":{:.1},\"idle_cpu_ms_per_s\":{:.2},\"calls_per_s\":{:.1},\"cpu_per_call_us\":{:.0},\
             \"keepalive_rss_ready_mb\":{:.1},\"keepalive_rss_mb\":{:.1},\"keepalive_idle_cpu_ms_per_s\":{:.2},\
             \"keepalive_calls_per_s\":{:.1},\"keepalive_cpu_per_call_us\":{:.0},\"keepalive_calls_per_connection\":{calls_per_connection:.1}}}",
            closing.ready.as_millis(),
            closing.rss_ready as f64 / 1e6,
            closing.rss as f64 / 1e6,
            closing.idle_ms_per_s,
            closing.calls_per_s,
            closing.cpu_per_call_us,
            kept.rss_ready as f64 / 1e6,
            kept.rss as f64 / 1e6,
            kept.idle_ms_per_s,
            kept.calls_per_s,
            kept.cpu_per_call_us,
        );
    });
}
