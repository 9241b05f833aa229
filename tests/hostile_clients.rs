//! Hostile clients against the binary (a child process, default limits), on
//! loopback, in bounded loops: garbage bytes and HTTP/1.1 on the gRPC port,
//! oversized and malformed DiscoveryRequests, unknown type URLs by the thousand,
//! a NACK storm, 1,000 connect/disconnect cycles and 200 streams that never read.
//!
//! Asserted: the process never dies; an istiod-like stream connected throughout
//! gets every change, each within `USUAL` of the edit; and the resident memory
//! after the storm (every hostile client gone) is within `RSS_BOUND` of before.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cloudmap_xds::proto::envoy::service::discovery::v3::DiscoveryRequest;
use cloudmap_xds::proto::google::rpc::Status as RpcStatus;
use cloudmap_xds::test_helpers::{
    AdsClient, DEADLINE, SERVICE_ENTRY_V1, eventually, http_get, service_entries,
};
use support::istiod::ServerProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_cloudmap-xds");
/// How long the well-behaved stream may wait for a change: the registry file is re-read
/// every 300 ms and a change taken once two reads agree, so it usually arrives within 1 s
/// (about 2 s on a loaded 2-core box); a stream starved by the storm would wait for its end.
const USUAL: Duration = Duration::from_secs(5);
/// Resident memory after the storm may exceed the memory before by at most this much.
const RSS_BOUND_KIB: u64 = 48 * 1024;
const ADS_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const BULK: usize = 400;

fn registry(changes: usize) -> String {
    let mut text = String::from("namespaces:\n- name: bulk\n  services:\n");
    for i in 0..BULK {
        text.push_str(&format!(
            "  - name: svc-{i}\n    instances:\n    - attributes: {{AWS_INSTANCE_IPV4: 10.9.{}.{}, AWS_INSTANCE_PORT: 8080}}\n",
            i / 200,
            i % 200
        ));
    }
    for n in 0..changes {
        text.push_str(&format!(
            "  - name: change-{n}\n    instances:\n    - attributes: {{AWS_INSTANCE_IPV4: 10.8.0.1}}\n"
        ));
    }
    text
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

struct Storm {
    server: ServerProcess,
    path: std::path::PathBuf,
    changes: usize,
    /// ServiceEntry counts the well-behaved stream received, with when.
    pushes: mpsc::UnboundedReceiver<(usize, Instant)>,
    latencies: Vec<Duration>,
    _dir: tempfile::TempDir,
}

impl Storm {
    /// One more service in the file; waits until the well-behaved stream has it.
    async fn change(&mut self) {
        self.changes += 1;
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, registry(self.changes)).unwrap();
        let edited = Instant::now();
        std::fs::rename(&tmp, &self.path).unwrap();
        let want = BULK + self.changes;
        loop {
            let left = (edited + USUAL).saturating_duration_since(Instant::now());
            let (count, at) = tokio::time::timeout(left, self.pushes.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("change {} did not reach the istiod-like stream within {USUAL:?}", self.changes)
                })
                .expect("the istiod-like stream ended");
            if count == want {
                self.latencies.push(at - edited);
                return;
            }
        }
    }

    /// Runs `phase` while changing the registry every round, and once more after it.
    async fn during<F: std::future::Future<Output = String> + Send + 'static>(
        &mut self,
        name: &str,
        phase: F,
    ) {
        let started = Instant::now();
        let task = tokio::spawn(phase);
        while !task.is_finished() {
            self.change().await;
        }
        let summary = task.await.unwrap();
        self.change().await;
        self.assert_alive();
        eprintln!("{name}: {summary} ({:?})", started.elapsed());
    }

    fn assert_alive(&mut self) {
        assert!(self.server.is_running(), "cloudmap-xds died; log:\n{}", self.server.log());
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, body) = http_get(self.server.admin, "/metrics").await.unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |v| v.parse().unwrap())
    }
}

async fn start() -> Storm {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.yaml");
    std::fs::write(&path, registry(0)).unwrap();
    let log = dir.path().join("cloudmap-xds.log");
    let server = ServerProcess::start(BIN, log, &["--registry-file", path.to_str().unwrap()], &[]).await;
    eventually("ready", DEADLINE, || async {
        (http_get(server.admin, "/ready").await.ok()?.0 == 200).then_some(())
    })
    .await;

    // The well-behaved stream: istiod's handshake, then it reads and ACKs everything.
    let mut good = AdsClient::connect(server.grpc).await.unwrap();
    good.istiod_handshake().await;
    let (tx, pushes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let response = match good.recv_timeout(Duration::from_secs(3600)).await {
                Ok(Some(response)) => response,
                _ => return,
            };
            good.ack(&response).await;
            if response.type_url == SERVICE_ENTRY_V1
                && tx.send((service_entries(&response).len(), Instant::now())).is_err()
            {
                return;
            }
        }
    });
    Storm { server, path, changes: 0, pushes, latencies: Vec::new(), _dir: dir }
}

/// Writes `bytes`, then reads until the server closes the connection.
async fn closed_after(addr: std::net::SocketAddr, bytes: Vec<u8>) -> bool {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(&bytes).await;
    let mut sink = [0u8; 4096];
    let read_all = async {
        loop {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(DEADLINE, read_all).await.is_ok()
}

async fn garbage(addr: std::net::SocketAddr) -> String {
    let mut rng = fastrand::Rng::with_seed(11);
    let mut closed = 0;
    for _ in 0..100 {
        let len = rng.usize(1..8192);
        let bytes: Vec<u8> = std::iter::repeat_with(|| rng.u8(..)).take(len).collect();
        closed += usize::from(closed_after(addr, bytes).await);
    }
    let requests = [
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(),
        format!("POST {ADS_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc\r\nContent-Length: 5\r\n\r\n\0\0\0\0\0"),
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n".to_owned(),
        // A valid preface, then garbage frames.
        format!("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n{}", "\u{7f}".repeat(64)),
    ];
    for n in 0..100 {
        closed += usize::from(closed_after(addr, requests[n % requests.len()].clone().into_bytes()).await);
    }
    assert_eq!(closed, 200, "every garbage connection is closed by the server");
    format!("{closed} garbage and HTTP/1.1 connections, each closed by the server")
}

/// Connections that send nothing, or half the HTTP/2 preface, and then wait: each is closed
/// by the server at the preface deadline (10 s), all at once here.
async fn silent(addr: std::net::SocketAddr) -> String {
    let started = Instant::now();
    let tasks: Vec<_> = (0..100)
        .map(|n| {
            let bytes = if n % 2 == 0 { Vec::new() } else { b"PRI * HTTP/2.0\r\n".to_vec() };
            tokio::spawn(closed_after(addr, bytes))
        })
        .collect();
    let mut closed = 0;
    for task in tasks {
        closed += usize::from(task.await.unwrap());
    }
    assert_eq!(closed, 100, "every silent connection is closed by the server");
    format!("{closed} silent or half-preface connections, closed by the server after {:?}", started.elapsed())
}

async fn oversized(addr: std::net::SocketAddr) -> String {
    let mut refused = 0;
    for _ in 0..20 {
        let mut client = AdsClient::connect(addr).await.unwrap();
        client
            .send(DiscoveryRequest {
                type_url: SERVICE_ENTRY_V1.into(),
                resource_names: vec!["x".repeat(2 << 20)],
                ..Default::default()
            })
            .await;
        let status = client.recv_timeout(DEADLINE).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        refused += 1;
    }
    format!("{refused} requests of 2 MiB refused (RESOURCE_EXHAUSTED)")
}

/// Raw HTTP/2 gRPC calls whose message framing or content is broken.
async fn malformed(addr: std::net::SocketAddr) -> String {
    let bodies: [&[u8]; 5] = [
        &[0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3],    // claims a 4 GiB message
        &[0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff], // invalid protobuf
        &[1, 0, 0, 0, 2, 0x1f, 0x8b],             // compressed, without an encoding
        &[0, 0, 0],                               // truncated prefix
        &[0, 0, 0, 0, 3, 0x22, 0x10, b'a'],       // a string field longer than the message
    ];
    let mut errors = 0;
    for round in 0..10 {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        for body in bodies {
            let request = http::Request::post(format!("http://{addr}{ADS_PATH}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (response, mut send) = h2.send_request(request, false).unwrap();
            send.send_data(Bytes::from_static(body), true).unwrap();
            let response = tokio::time::timeout(DEADLINE, response).await.unwrap().unwrap();
            let (head, mut body) = response.into_parts();
            let mut status = head.headers.get("grpc-status").cloned();
            while let Some(chunk) = tokio::time::timeout(DEADLINE, body.data()).await.unwrap() {
                let _ = chunk;
            }
            if let Some(trailers) = tokio::time::timeout(DEADLINE, body.trailers()).await.unwrap().unwrap() {
                status = status.or_else(|| trailers.get("grpc-status").cloned());
            }
            let status = status.expect("a grpc-status");
            assert_ne!(status, "0", "round {round}: a malformed request was accepted: {body:?}");
            errors += 1;
        }
    }
    format!("{errors} malformed requests answered with a gRPC error")
}

async fn unknown_types(addr: std::net::SocketAddr) -> String {
    let (mut answered, mut refused) = (0, 0);
    for stream in 0..80 {
        let mut client = AdsClient::connect(addr).await.unwrap();
        let types: Vec<String> = (0..65).map(|n| format!("hostile.example/v{stream}/Kind{n}")).collect();
        let refs: Vec<&str> = types.iter().map(String::as_str).collect();
        client.send_initial(&refs).await;
        loop {
            match client.recv_timeout(DEADLINE).await {
                Ok(Some(response)) => {
                    assert!(response.resources.is_empty());
                    answered += 1;
                }
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    refused += 1;
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    format!(
        "{} unknown type URLs sent, {answered} answered empty, {refused} streams refused at the 65th",
        80 * 65
    )
}

async fn nack_storm(addr: std::net::SocketAddr) -> String {
    let mut client = AdsClient::connect(addr).await.unwrap();
    client.send_initial(&[SERVICE_ENTRY_V1]).await;
    let response = client.recv().await;
    const NACKS: usize = 10_000;
    for n in 0..NACKS {
        client
            .send(DiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                error_detail: Some(RpcStatus {
                    code: 3,
                    message: format!("hostile NACK {}", n % 3),
                    details: vec![],
                }),
                ..Default::default()
            })
            .await;
    }
    // Requests are handled in order: once this one is answered, every NACK was read.
    client.send_initial(&["hostile.example/v1/Sync"]).await;
    // (Pushes of the changes made meanwhile may come first.)
    while client.recv().await.type_url != "hostile.example/v1/Sync" {}
    format!("{NACKS} NACKs on one stream, all read; the stream still answers")
}

async fn connect_cycles(addr: std::net::SocketAddr) -> String {
    const CYCLES: usize = 1000;
    let mut tasks = Vec::new();
    for worker in 0..4 {
        tasks.push(tokio::spawn(async move {
            for _ in (worker..CYCLES).step_by(4) {
                let mut client = AdsClient::connect(addr).await.unwrap();
                client.send_initial(&[SERVICE_ENTRY_V1]).await;
                let _ = client.recv().await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    format!("{CYCLES} connect, subscribe, disconnect cycles")
}

/// Opens 200 streams that subscribe and never read; returns them, to be held open.
async fn never_reading(addr: std::net::SocketAddr) -> (Vec<AdsClient>, usize) {
    let (mut open, mut refused) = (Vec::new(), 0);
    for _ in 0..200 {
        match AdsClient::connect(addr).await {
            Ok(mut client) => {
                client.send_initial(&[SERVICE_ENTRY_V1]).await;
                open.push(client);
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("--max-ads-streams"));
                refused += 1;
            }
        }
    }
    (open, refused)
}

#[tokio::test]
async fn hostile_clients_neither_crash_the_server_nor_starve_istiod_nor_leak_memory() {
    let mut storm = start().await;
    let addr = storm.server.grpc;
    // Warm up: the first pushes, allocator arenas and caches, then the baseline.
    for _ in 0..5 {
        storm.change().await;
    }
    let pid = storm.server.pid();
    let rss_before = vm_rss_kib(pid);
    let calm = *storm.latencies.iter().max().unwrap();

    storm.during("garbage", garbage(addr)).await;
    storm.during("silent", silent(addr)).await;
    storm.during("oversized", oversized(addr)).await;
    storm.during("malformed", malformed(addr)).await;
    storm.during("unknown types", unknown_types(addr)).await;
    storm.during("NACK storm", nack_storm(addr)).await;
    storm.during("connect cycles", connect_cycles(addr)).await;

    let (stalled, refused) = never_reading(addr).await;
    for _ in 0..10 {
        storm.change().await;
    }
    storm.assert_alive();
    let rss_peak = vm_rss_kib(pid);
    eprintln!(
        "never reading: {} streams open and unread, {refused} refused (--max-ads-streams), 10 changes pushed",
        stalled.len()
    );
    assert_eq!(stalled.len() + refused, 200);
    assert_eq!(stalled.len(), 99, "the default --max-ads-streams is 100, one is the well-behaved stream");
    drop(stalled);
    eventually("the hostile streams to be gone", DEADLINE, || async {
        (storm.metric("cloudmap_xds_ads_connected_streams").await == 1.0).then_some(())
    })
    .await;
    for _ in 0..5 {
        storm.change().await;
    }
    let rss_after = vm_rss_kib(pid);
    storm.assert_alive();

    let preface =
        storm.metric("cloudmap_xds_grpc_rejected_connections_total{reason=\"preface_timeout\"}").await;
    assert_eq!(preface, 100.0, "the silent connections, each counted");
    for limit in ["max-ads-streams", "max-request-size", "max-type-urls-per-stream"] {
        let n = storm.metric(&format!("cloudmap_xds_grpc_refusals_total{{limit=\"{limit}\"}}")).await;
        eprintln!("refusals {limit}: {n}");
    }
    // NACKs of a response that a push has superseded are stale and ignored, as any stale request.
    let nacks = storm.metric("cloudmap_xds_ads_nacks_total{type=\"ServiceEntry\"}").await;
    assert!(nacks > 0.0 && nacks <= 10_000.0, "{nacks} NACKs counted");
    let nack_lines = storm.server.log().lines().filter(|l| l.contains("NACK: client rejected")).count();
    eprintln!(
        "NACKs counted: {nacks} (the rest were stale: a push superseded their response); NACK log lines: {nack_lines}"
    );
    assert!(
        nack_lines <= storm.changes + 1,
        "one NACK log line per rejected response, not per NACK: {nack_lines}"
    );
    let worst = storm.latencies.iter().max().unwrap();
    eprintln!(
        "changes: {} reached the istiod-like stream, slowest {worst:?} (before the storm {calm:?}; bound {USUAL:?})",
        storm.latencies.len()
    );
    eprintln!(
        "VmRSS: before {rss_before} KiB, peak (200 unread streams) {rss_peak} KiB, after {rss_after} KiB (bound: before + {RSS_BOUND_KIB} KiB)"
    );
    assert!(
        rss_after <= rss_before + RSS_BOUND_KIB,
        "RSS grew from {rss_before} KiB to {rss_after} KiB after the storm"
    );
}
