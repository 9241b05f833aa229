//! Fan-out load: 1, 10 and 100 ADS streams that behave like istiod (request
//! MeshConfig and every Pilot type, ACK every response), against our ADS server
//! and against a Go server built on go-control-plane's state-of-the-world
//! snapshot cache (`tools/go-xds-server`), both serving the same MCP resources.
//! Each server runs as its own process and publishes prebuilt snapshots on
//! command, so what is measured is the fan-out: latency from publication to each
//! stream's decoded response, and the server's CPU per published change.
//!
//! `cargo bench --bench load` (scripts/bench sets `GO_XDS_SERVER` and the shapes);
//! under `cargo test` it runs a small smoke pass against our server only.
//!
//! Env: `LOAD_SHAPES` (e.g. `10000x1,10000x10`), `LOAD_STREAMS` (`1,10,100`),
//! `LOAD_CHANGES` (changes per run), `GO_XDS_SERVER` (the Go binary; without it
//! only our server is measured).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed bench

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cloudmap_xds::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use cloudmap_xds::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse, Node};
use cloudmap_xds::test_helpers::{ISTIO_PILOT_TYPES, MESH_CONFIG_TYPE, SERVICE_ENTRY_V1};
use common::{ServerChild, ms, process_cpu, quantile};
use prost::Message;
use tokio::sync::Notify;

/// istiod's ADS client uses fixed 1 MiB windows.
const ISTIOD_WINDOW: u32 = 1 << 20;

/// Receive times per ServiceEntry version, across every client.
#[derive(Default)]
struct Received {
    times: Mutex<HashMap<String, Vec<SystemTime>>>,
    changed: Notify,
}

impl Received {
    fn record(&self, version: &str) {
        let now = SystemTime::now();
        self.times.lock().unwrap().entry(version.to_owned()).or_default().push(now);
        self.changed.notify_waiters();
    }

    async fn wait(&self, version: &str, count: usize) -> Vec<SystemTime> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let notified = self.changed.notified();
            if let Some(times) = self.times.lock().unwrap().get(version)
                && times.len() >= count
            {
                return times.clone();
            }
            assert!(Instant::now() < deadline, "version {version} did not reach {count} streams");
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }
}

/// One istiod-like stream: the handshake, then an ACK for every response.
async fn client(addr: SocketAddr, id: usize, received: Arc<Received>) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .initial_stream_window_size(ISTIOD_WINDOW)
        .initial_connection_window_size(ISTIOD_WINDOW)
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut types = vec![MESH_CONFIG_TYPE];
    types.extend(ISTIO_PILOT_TYPES);
    for (i, type_url) in types.iter().enumerate() {
        tx.send(DiscoveryRequest {
            type_url: (*type_url).to_owned(),
            response_nonce: "bogus".into(),
            node: (i == 0).then(|| Node {
                id: format!("sidecar~10.0.0.{id}~istiod-{id}.istio-system~istio-system.svc.cluster.local"),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    while let Ok(Some(response)) = responses.message().await {
        if response.type_url == SERVICE_ENTRY_V1 {
            received.record(&response.version_info);
        }
        let ack = DiscoveryRequest {
            type_url: response.type_url,
            version_info: response.version_info,
            response_nonce: response.nonce,
            ..Default::default()
        };
        if tx.send(ack).await.is_err() {
            return;
        }
    }
}

struct Run {
    server: &'static str,
    shape: (usize, usize),
    streams: usize,
    p50: Duration,
    p99: Duration,
    cpu_per_push: Duration,
}

/// Publishes `changes` snapshots to `streams` clients of `server`; measures latency and CPU.
fn measure(
    runtime: &tokio::runtime::Runtime,
    mut server: ServerChild,
    versions: &[String],
    streams: usize,
) -> (Vec<Duration>, Duration) {
    let received = Arc::new(Received::default());
    let addr = server.addrs[0];
    for id in 0..streams {
        runtime.spawn(client(addr, id, received.clone()));
    }
    runtime.block_on(received.wait(&versions[0], streams));
    // Idle cost of the server with its streams open, to subtract.
    let (idle0, idle_start) = (process_cpu(server.pid()), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let idle_rate = (process_cpu(server.pid()) - idle0).as_secs_f64() / idle_start.elapsed().as_secs_f64();

    let mut latencies = Vec::new();
    let (cpu0, started) = (process_cpu(server.pid()), Instant::now());
    for (k, version) in versions.iter().enumerate().skip(1) {
        let published = server.publish(k);
        for t in runtime.block_on(received.wait(version, streams)) {
            latencies.push(t.duration_since(published).unwrap_or_default());
        }
    }
    // Let the last ACKs be handled.
    std::thread::sleep(Duration::from_millis(200));
    let busy = process_cpu(server.pid()) - cpu0;
    let idle = Duration::from_secs_f64(idle_rate * started.elapsed().as_secs_f64());
    let cpu_per_push = busy.saturating_sub(idle) / (versions.len() - 1) as u32;
    latencies.sort();
    (latencies, cpu_per_push)
}

fn parse_list<T: std::str::FromStr>(var: &str, default: &str) -> Vec<T> {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.trim().parse().ok().unwrap_or_else(|| panic!("{var}: bad value {s:?}")))
        .collect()
}

fn shape(s: &str) -> (usize, usize) {
    let (a, b) = s.split_once('x').unwrap_or_else(|| panic!("shape {s:?} is not SERVICESxINSTANCES"));
    (a.parse().unwrap(), b.parse().unwrap())
}

/// The snapshots as `tools/go-xds-server` loads them: generated DiscoveryResponses.
fn write_go_snapshots(dir: &Path, services: usize, instances: usize, changes: usize) -> Vec<String> {
    common::successive_snapshots(services, instances, changes)
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let response = DiscoveryResponse {
                version_info: s.version.clone(),
                resources: s.encoded_resources(),
                ..Default::default()
            };
            std::fs::write(dir.join(format!("snap-{k}.pb")), response.encode_to_vec()).unwrap();
            s.version.clone()
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if common::serve_child(&args) {
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let (shapes, streams, changes): (Vec<(usize, usize)>, Vec<usize>, usize) = if full {
        (
            std::env::var("LOAD_SHAPES").unwrap_or_else(|_| "10000x1".into()).split(',').map(shape).collect(),
            parse_list("LOAD_STREAMS", "1,10,100"),
            parse_list("LOAD_CHANGES", "20")[0],
        )
    } else {
        (vec![(50, 1)], vec![1, 2], 3)
    };
    let go = std::env::var("GO_XDS_SERVER").ok().filter(|s| !s.is_empty() && full).map(PathBuf::from);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let mut runs = Vec::new();
    for &(services, instances) in &shapes {
        let versions = write_go_snapshots(dir.path(), services, instances, changes);
        for &n in &streams {
            let mut ours = Command::new(&me);
            ours.args([
                "--serve-snapshots",
                &services.to_string(),
                &instances.to_string(),
                &changes.to_string(),
            ]);
            let (latencies, cpu) = measure(&runtime, ServerChild::spawn(ours), &versions, n);
            runs.push(Run {
                server: "cloudmap-xds",
                shape: (services, instances),
                streams: n,
                p50: quantile(&latencies, 0.5),
                p99: quantile(&latencies, 0.99),
                cpu_per_push: cpu,
            });
            if let Some(go) = &go {
                let mut command = Command::new(go);
                command.args(["-addr", "127.0.0.1:0", "-count", &(changes + 1).to_string(), "-snapshots"]);
                command.arg(dir.path());
                let (latencies, cpu) = measure(&runtime, ServerChild::spawn(command), &versions, n);
                runs.push(Run {
                    server: "go-control-plane",
                    shape: (services, instances),
                    streams: n,
                    p50: quantile(&latencies, 0.5),
                    p99: quantile(&latencies, 0.99),
                    cpu_per_push: cpu,
                });
            }
        }
    }
    println!("| server | registry | streams | publication → received p50 | p99 | server CPU per push |");
    println!("|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {} × {} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
            r.server,
            r.shape.0,
            r.shape.1,
            r.streams,
            ms(r.p50),
            ms(r.p99),
            ms(r.cpu_per_push)
        );
    }
    for r in &runs {
        println!(
            "BENCH_JSON {{\"bench\":\"fanout\",\"server\":\"{}\",\"services\":{},\"instances\":{},\"streams\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"cpu_per_push_ms\":{:.3}}}",
            r.server,
            r.shape.0,
            r.shape.1,
            r.streams,
            ms(r.p50),
            ms(r.p99),
            ms(r.cpu_per_push)
        );
    }
}
