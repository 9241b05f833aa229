//! Fan-out load: 1, 10 and 100 ADS streams that behave like istiod (request
//! MeshConfig and every Pilot type, ACK every response), against our ADS server
//! and against a Go server built on go-control-plane's state-of-the-world
//! snapshot cache (`tools/go-xds-server`), both serving the same MCP resources.
//! Each server runs as its own process and publishes prebuilt snapshots on
//! command, so what is measured is the fan-out: latency from publication (the
//! server's clock just before it hands the snapshot to its streams) to each
//! stream's response received and decoded (see `LOAD_CLIENT`), the server's CPU
//! per published change, and the clients' own CPU per change. The clients run in
//! this process, the servers each in their own; all share the machine's cores.
//!
//! A third row per stream count is the floor of the machine: a server that is
//! not HTTP/2 nor gRPC at all, one task per TCP connection writing the same
//! shared buffer (the gRPC-framed response) to every connection, and readers
//! that only count the bytes (publication → last byte read).
//!
//! `cargo bench --bench load` (scripts/bench sets `GO_XDS_SERVER` and the shapes);
//! under `cargo test` it runs a small smoke pass against our server only.
//!
//! Env: `LOAD_SHAPES` (e.g. `10000x1,10000x10`), `LOAD_STREAMS` (`1,10,100`),
//! `LOAD_CHANGES` (changes per run), `GO_XDS_SERVER` (the Go binary; without it
//! only our server is measured), `LOAD_SERVERS` (which of `ours,go,floor`; all by
//! default), `LOAD_CLIENT`: `envelope` (default) decodes each response's
//! version, type, nonce and the count of its resources, checked against the
//! snapshot, without materialising each resource (istiod runs on other machines;
//! here the clients share the 2 cores with the server measured, and a full
//! decode of 100 × 3.7 MB would be measured as the server's latency); `full`
//! decodes every resource into the generated `DiscoveryResponse` as istiod's
//! gRPC client does. `LOAD_FLOOR_WRITE`: see [`serve_floor`].
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed bench

mod common;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cloudmap_xds::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse, Node};
use cloudmap_xds::test_helpers::{ISTIO_PILOT_TYPES, MESH_CONFIG_TYPE, SERVICE_ENTRY_V1};
use common::{ServerChild, ms, process_cpu, quantile};
use prost::Message;
use prost::bytes::{Buf, Bytes};
use prost::encoding::{DecodeContext, WireType, skip_field, string};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tonic_prost::ProstCodec;

/// istiod's `xds://` config source dials through `pkg/adsc`, which sets fixed 1 MiB
/// stream and connection windows (`grpc.WithInitialWindowSize`/`WithInitialConnWindowSize`;
/// setting them turns grpc-go's BDP-based dynamic windows off).
const ISTIOD_WINDOW: u32 = 1 << 20;
const STREAM_AGGREGATED_RESOURCES: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

/// What the clients decode of each response (`LOAD_CLIENT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    /// The envelope and a count of the resources, each skipped over.
    Envelope,
    /// Every resource, into the generated `DiscoveryResponse`.
    Full,
}

/// A `DiscoveryResponse` read for its envelope: resources are counted, not kept.
#[derive(Clone, Default, PartialEq)]
struct Envelope {
    version_info: String,
    resources: usize,
    type_url: String,
    nonce: String,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Envelope({} {} resources {})", self.type_url, self.version_info, self.resources)
    }
}

impl Message for Envelope {
    fn encode_raw(&self, _: &mut impl prost::bytes::BufMut) {
        unreachable!("decode only")
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            1 => string::merge(wire_type, &mut self.version_info, buf, ctx),
            2 => {
                self.resources += 1;
                skip_field(wire_type, tag, buf, ctx)
            }
            4 => string::merge(wire_type, &mut self.type_url, buf, ctx),
            5 => string::merge(wire_type, &mut self.nonce, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

impl From<DiscoveryResponse> for Envelope {
    fn from(r: DiscoveryResponse) -> Self {
        Envelope {
            version_info: r.version_info,
            resources: r.resources.len(),
            type_url: r.type_url,
            nonce: r.nonce,
        }
    }
}

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
/// `resources`: how many ServiceEntries each snapshot holds, checked on every push.
async fn client(addr: SocketAddr, id: usize, kind: ClientKind, resources: usize, received: Arc<Received>) {
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
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(usize::MAX);
    grpc.ready().await.unwrap();
    let requests = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(STREAM_AGGREGATED_RESOURCES);
    let mut responses = match kind {
        ClientKind::Envelope => {
            let codec = ProstCodec::<DiscoveryRequest, Envelope>::default();
            Responses::Envelope(grpc.streaming(requests, path, codec).await.unwrap().into_inner())
        }
        ClientKind::Full => {
            let codec = ProstCodec::<DiscoveryRequest, DiscoveryResponse>::default();
            Responses::Full(grpc.streaming(requests, path, codec).await.unwrap().into_inner())
        }
    };
    while let Some(response) = responses.next().await {
        if response.type_url == SERVICE_ENTRY_V1 {
            assert_eq!(response.resources, resources, "a ServiceEntry push holds the whole set");
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

/// A client's response stream, of either decoding.
enum Responses {
    Envelope(tonic::Streaming<Envelope>),
    Full(tonic::Streaming<DiscoveryResponse>),
}

impl Responses {
    async fn next(&mut self) -> Option<Envelope> {
        match self {
            Responses::Envelope(s) => s.message().await.ok().flatten(),
            Responses::Full(s) => s.message().await.ok().flatten().map(Envelope::from),
        }
    }
}

/// The floor's reader: counts each gRPC-framed message's bytes as they arrive,
/// into one reused buffer. The server sends snapshot 0 on connect, then one per
/// publication, so the n-th message is `versions[n]`.
async fn floor_client(addr: SocketAddr, versions: Arc<Vec<String>>, received: Arc<Received>) {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.set_nodelay(true).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    for version in versions.iter() {
        let mut header = [0u8; 5];
        if socket.read_exact(&mut header).await.is_err() {
            return;
        }
        let mut left = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        while left > 0 {
            let want = left.min(buf.len());
            match socket.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left -= n,
            }
        }
        received.record(version);
    }
}

/// The floor's server (`--serve-floor DIR COUNT`, a child process like the others): every
/// snapshot as its gRPC-framed response, read before serving; one task per connection
/// writes the current one, the same `Bytes` for every connection. Takes `publish K`.
/// `LOAD_FLOOR_WRITE` (bytes): write in pieces of that size, one system call each, as
/// an HTTP/2 server writes one frame at a time (16,393: a 16 KiB frame and its header);
/// by default the whole response is offered to the socket at once.
fn serve_floor(dir: &Path, count: usize) {
    let piece: usize =
        std::env::var("LOAD_FLOOR_WRITE").ok().and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
    let messages: Vec<Bytes> = (0..count)
        .map(|k| {
            let message = std::fs::read(dir.join(format!("snap-{k}.pb"))).unwrap();
            let mut framed = Vec::with_capacity(message.len() + 5);
            framed.push(0);
            framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
            framed.extend_from_slice(&message);
            Bytes::from(framed)
        })
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (publish, current) = tokio::sync::watch::channel(messages[0].clone());
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    println!("ready {}", listener.local_addr().unwrap());
    runtime.spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            socket.set_nodelay(true).unwrap();
            let mut current = current.clone();
            tokio::spawn(async move {
                loop {
                    let message = current.borrow_and_update().clone();
                    for piece in message.chunks(piece) {
                        if socket.write_all(piece).await.is_err() {
                            return;
                        }
                    }
                    if current.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut out = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let k: usize = line.strip_prefix("publish ").and_then(|k| k.parse().ok()).expect("publish K");
        let at = SystemTime::now();
        publish.send_replace(messages[k].clone());
        let nanos = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
        writeln!(out, "published {nanos}").unwrap();
        out.flush().unwrap();
    }
}

/// Which clients a run uses.
#[derive(Debug, Clone, Copy)]
enum Clients {
    Ads(ClientKind),
    Floor,
}

struct Run {
    server: &'static str,
    client: &'static str,
    shape: (usize, usize),
    streams: usize,
    p50: Duration,
    p99: Duration,
    cpu_per_push: Duration,
    client_cpu_per_push: Duration,
    load: String,
}

/// What one run measured: sorted latencies, then the server's and the clients' CPU per push.
struct Measured {
    latencies: Vec<Duration>,
    cpu_per_push: Duration,
    client_cpu_per_push: Duration,
}

/// Publishes `changes` snapshots to `streams` clients of `server`; measures latency and CPU.
fn measure(
    runtime: &tokio::runtime::Runtime,
    mut server: ServerChild,
    versions: &[String],
    resources: usize,
    streams: usize,
    clients: Clients,
) -> Measured {
    let received = Arc::new(Received::default());
    let addr = server.addrs[0];
    let shared_versions = Arc::new(versions.to_vec());
    let handles: Vec<_> = (0..streams)
        .map(|id| match clients {
            Clients::Ads(kind) => runtime.spawn(client(addr, id, kind, resources, received.clone())),
            Clients::Floor => runtime.spawn(floor_client(addr, shared_versions.clone(), received.clone())),
        })
        .collect();
    runtime.block_on(received.wait(&versions[0], streams));
    let me = std::process::id();
    // Idle cost of the server and the clients with the streams open, to subtract.
    let (idle0, client_idle0, idle_start) = (process_cpu(server.pid()), process_cpu(me), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let idle_secs = idle_start.elapsed().as_secs_f64();
    let idle_rate = (process_cpu(server.pid()) - idle0).as_secs_f64() / idle_secs;
    let client_idle_rate = (process_cpu(me) - client_idle0).as_secs_f64() / idle_secs;

    let mut latencies = Vec::new();
    let (cpu0, client_cpu0, started) = (process_cpu(server.pid()), process_cpu(me), Instant::now());
    for (k, version) in versions.iter().enumerate().skip(1) {
        let published = server.publish(k);
        for t in runtime.block_on(received.wait(version, streams)) {
            latencies.push(t.duration_since(published).unwrap_or_default());
        }
    }
    // Let the last ACKs be handled.
    std::thread::sleep(Duration::from_millis(200));
    let (busy, client_busy) = (process_cpu(server.pid()) - cpu0, process_cpu(me) - client_cpu0);
    let elapsed = started.elapsed().as_secs_f64();
    let pushes = (versions.len() - 1) as u32;
    let cpu_per_push = busy.saturating_sub(Duration::from_secs_f64(idle_rate * elapsed)) / pushes;
    let client_cpu_per_push =
        client_busy.saturating_sub(Duration::from_secs_f64(client_idle_rate * elapsed)) / pushes;
    drop(server);
    for handle in handles {
        let _ = runtime.block_on(handle);
    }
    latencies.sort();
    Measured { latencies, cpu_per_push, client_cpu_per_push }
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
/// Returns their versions and how many resources each holds.
fn write_go_snapshots(dir: &Path, services: usize, instances: usize, changes: usize) -> (Vec<String>, usize) {
    let snapshots = common::successive_snapshots(services, instances, changes);
    let resources = snapshots[0].resources.len();
    let versions = snapshots
        .iter()
        .enumerate()
        .map(|(k, s)| {
            assert_eq!(s.resources.len(), resources, "one-service changes keep the count");
            let response = DiscoveryResponse {
                version_info: s.version.clone(),
                resources: s.encoded_resources(),
                type_url: SERVICE_ENTRY_V1.into(),
                ..Default::default()
            };
            std::fs::write(dir.join(format!("snap-{k}.pb")), response.encode_to_vec()).unwrap();
            s.version.clone()
        })
        .collect();
    (versions, resources)
}

fn load_average() -> String {
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve-floor") {
        serve_floor(Path::new(&args[2]), args[3].parse().unwrap());
        return;
    }
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
    let servers: Vec<String> =
        if full { parse_list("LOAD_SERVERS", "ours,go,floor") } else { vec!["ours".into()] };
    let kind = match std::env::var("LOAD_CLIENT").as_deref() {
        Ok("full") => ClientKind::Full,
        Ok("envelope") | Err(_) => ClientKind::Envelope,
        Ok(other) => panic!("LOAD_CLIENT: {other:?} is neither envelope nor full"),
    };
    let client_name = match kind {
        ClientKind::Envelope => "envelope",
        ClientKind::Full => "full decode",
    };
    let go = std::env::var("GO_XDS_SERVER").ok().filter(|s| !s.is_empty() && full).map(PathBuf::from);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let mut runs = Vec::new();
    for &(services, instances) in &shapes {
        let (versions, resources) = write_go_snapshots(dir.path(), services, instances, changes);
        for &n in &streams {
            for server in &servers {
                let (name, command, clients, client) = match server.as_str() {
                    "ours" => {
                        let mut ours = Command::new(&me);
                        ours.args([
                            "--serve-snapshots",
                            &services.to_string(),
                            &instances.to_string(),
                            &changes.to_string(),
                        ]);
                        ("cloudmap-xds", ours, Clients::Ads(kind), client_name)
                    }
                    "go" => {
                        let Some(go) = &go else { continue };
                        let mut command = Command::new(go);
                        command.args([
                            "-addr",
                            "127.0.0.1:0",
                            "-count",
                            &(changes + 1).to_string(),
                            "-snapshots",
                        ]);
                        command.arg(dir.path());
                        ("go-control-plane", command, Clients::Ads(kind), client_name)
                    }
                    "floor" => {
                        let mut command = Command::new(&me);
                        command.arg("--serve-floor").arg(dir.path()).arg((changes + 1).to_string());
                        ("loopback floor", command, Clients::Floor, "byte count")
                    }
                    other => panic!("LOAD_SERVERS: unknown server {other:?} (ours, go, floor)"),
                };
                let load = load_average();
                let measured =
                    measure(&runtime, ServerChild::spawn(command), &versions, resources, n, clients);
                runs.push(Run {
                    server: name,
                    client,
                    shape: (services, instances),
                    streams: n,
                    p50: quantile(&measured.latencies, 0.5),
                    p99: quantile(&measured.latencies, 0.99),
                    cpu_per_push: measured.cpu_per_push,
                    client_cpu_per_push: measured.client_cpu_per_push,
                    load,
                });
            }
        }
    }
    println!(
        "| server | clients | registry | streams | publication → received p50 | p99 | server CPU per push | clients' CPU per push | load average |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {} | {} × {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
            r.server,
            r.client,
            r.shape.0,
            r.shape.1,
            r.streams,
            ms(r.p50),
            ms(r.p99),
            ms(r.cpu_per_push),
            ms(r.client_cpu_per_push),
            r.load
        );
    }
    for r in &runs {
        let bench = if r.server == "loopback floor" { "fanout_floor" } else { "fanout" };
        println!(
            "BENCH_JSON {{\"bench\":\"{bench}\",\"server\":\"{}\",\"client\":\"{}\",\"services\":{},\"instances\":{},\"streams\":{},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"cpu_per_push_ms\":{:.3},\"client_cpu_per_push_ms\":{:.3}}}",
            r.server,
            r.client,
            r.shape.0,
            r.shape.1,
            r.streams,
            ms(r.p50),
            ms(r.p99),
            ms(r.cpu_per_push),
            ms(r.client_cpu_per_push)
        );
    }
}
