//! The peer bootstrap (`--peer-bootstrap`) between real processes of ours on loopback, with
//! Cloud Map on moto: a replica that cannot read AWS serves a Ready peer's ServiceEntry set,
//! byte for byte and marked as borrowed (GetStatus, /debug/snapshot, /ready, metrics), follows
//! the peer's pushes, and its own first complete sync replaces the set (istiod-like streams
//! see nothing when it is the same set, the new set when it differs). It never borrows from
//! itself, from a peer that is not synced, serves nothing or is down; over TLS it checks the
//! peer's certificate. The proof with real istiod is in tests/istiod_kube.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::path::Path;

use cloudmap_xds::proto::cloudmap_xds::debug::v1::GetStatusResponse;
use cloudmap_xds::test_helpers::{
    AdsClient, DEADLINE, GOLDEN_NAME, GOLDEN_REGISTRY, SERVICE_ENTRY_V1, eventually, free_port, http_get,
    service_entries,
};
use serde_json::Value;
use support::certs::{self, Ca};
use support::istiod::{ServerProcess, loopback};
use support::moto::{self, Moto};

const BIN: &str = env!("CARGO_BIN_EXE_cloudmap-xds");
const BORROWED_GAUGE: &str = "cloudmap_xds_serving_borrowed";

fn attempts(outcome: &str) -> String {
    format!("cloudmap_xds_peer_bootstrap_attempts_total{{outcome=\"{outcome}\"}}")
}

/// A replica's (gRPC, admin) addresses, chosen before any starts so that each can name the others.
fn addrs() -> (SocketAddr, SocketAddr) {
    (loopback(free_port()), loopback(free_port()))
}

fn peer_list(peers: &[SocketAddr]) -> String {
    peers.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// A replica reading Cloud Map at `endpoint` (moto, or a closed port: AWS down), polling fast.
async fn cloudmap_replica(
    dir: &Path,
    name: &str,
    endpoint: &str,
    at: (SocketAddr, SocketAddr),
    peers: &[SocketAddr],
    extra: &[&str],
) -> ServerProcess {
    let peers = peer_list(peers);
    let mut args = vec![
        "--aws-region",
        moto::REGION,
        "--aws-endpoint-url",
        endpoint,
        "--publish-namespace",
        "istio-system",
        "--poll-interval",
        "200ms",
        "--aws-request-timeout",
        "1s",
    ];
    if !peers.is_empty() {
        args.extend(["--peer-bootstrap", &peers]);
    }
    args.extend_from_slice(extra);
    let envs = moto::CLIENT_ENV;
    ServerProcess::start_at(BIN, dir.join(format!("{name}.log")), at, &args, &envs).await
}

/// A replica serving a registry file (always synced at once).
async fn file_replica(
    dir: &Path,
    name: &str,
    content: &str,
    extra: &[&str],
) -> (ServerProcess, std::path::PathBuf) {
    let registry = dir.join(format!("{name}.yaml"));
    std::fs::write(&registry, content).unwrap();
    let mut args = vec!["--registry-file", registry.to_str().unwrap(), "--publish-namespace", "istio-system"];
    args.extend_from_slice(extra);
    (ServerProcess::start_at(BIN, dir.join(format!("{name}.log")), addrs(), &args, &[]).await, registry)
}

/// An AWS endpoint nothing listens on: every Cloud Map call is refused.
fn aws_down() -> String {
    format!("http://{}", loopback(free_port()))
}

async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let (_, body) = http_get(admin, "/metrics").await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.parse().unwrap())
}

async fn debug_snapshot(admin: SocketAddr) -> Value {
    let (status, body) = http_get(admin, "/debug/snapshot").await.unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn wait_borrowed(server: &ServerProcess, from: SocketAddr) -> GetStatusResponse {
    eventually(&format!("{} to borrow from {from}", server.grpc), DEADLINE, || async {
        let status = server.status().await;
        (status.borrowed && status.borrowed_from == from.to_string()).then_some(status)
    })
    .await
}

async fn wait_own_sync(server: &ServerProcess) -> GetStatusResponse {
    eventually(&format!("{} to serve its own sync", server.grpc), DEADLINE, || async {
        let status = server.status().await;
        (status.synced && !status.borrowed).then_some(status)
    })
    .await
}

/// An istiod-like ADS stream's first ServiceEntry response (ACKed).
async fn first_service_entries(
    server: &ServerProcess,
) -> (AdsClient, cloudmap_xds::proto::envoy::service::discovery::v3::DiscoveryResponse) {
    let mut client = AdsClient::connect(server.grpc).await.unwrap();
    client.istiod_handshake().await;
    let response = client.recv_type(SERVICE_ENTRY_V1).await;
    (client, response)
}

#[tokio::test]
async fn a_replica_without_aws_serves_a_peers_set_until_its_own_identical_sync_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let tutorial = seeder.seed_tutorial().await;
    let ns = seeder.create_http_namespace("shop").await;
    let orders = seeder.create_service(&ns, "orders", false).await;
    seeder
        .register(&orders.id, "o-1", &[("AWS_INSTANCE_IPV4", "10.0.0.1"), ("AWS_INSTANCE_PORT", "8080")])
        .await;
    let (a_at, b_at, c_at) = (addrs(), addrs(), addrs());
    // Every replica gets the same list, as the one Service name in Kubernetes; each skips itself.
    let peers = [a_at.0, b_at.0, c_at.0];

    let mut a = cloudmap_replica(dir.path(), "a", &moto.endpoint(), a_at, &peers, &[]).await;
    let a_status = wait_own_sync(&a).await;
    eventually("a to serve both services", DEADLINE, || async {
        (a.service_entries().await.len() == 2).then_some(())
    })
    .await;
    let a_entries = a.service_entries().await;
    let a_version = a.status().await.snapshot_version;
    let (_, from_a) = first_service_entries(&a).await;

    // AWS down: B starts, cannot sync, and serves A's set.
    moto.pause();
    let b = cloudmap_replica(dir.path(), "b", &moto.endpoint(), b_at, &peers, &[]).await;
    let b_status = wait_borrowed(&b, a.grpc).await;
    assert!(!b_status.synced, "B's own sync cannot have happened");
    assert_ne!(b_status.instance_id, a_status.instance_id);
    assert!(!b_status.instance_id.is_empty());
    assert_eq!(b_status.snapshot_version, a_version, "the peer's set, so the peer's version");
    assert!(b_status.borrowed_at.is_some());
    assert_eq!(b.service_entries().await, a_entries, "names, versions, create times and specs are A's");
    let (ready, body) = http_get(b.admin, "/ready").await.unwrap();
    assert_eq!(
        (ready, body.as_str()),
        (
            200,
            format!("ready, serving a set borrowed from {} until the first complete sync\n", a.grpc).as_str()
        )
    );
    let snapshot = debug_snapshot(b.admin).await;
    assert_eq!(snapshot["synced"], false);
    assert_eq!(snapshot["borrowed"]["from"], a.grpc.to_string());
    assert_eq!(snapshot["borrowed"]["peerInstance"], a_status.instance_id);
    assert_eq!(snapshot["borrowed"]["peerBorrowed"], false);
    assert_eq!(snapshot["instanceId"], b_status.instance_id);
    assert_eq!(metric(b.admin, BORROWED_GAUGE).await, 1.0);
    assert_eq!(metric(b.admin, &attempts("borrowed")).await, 1.0);
    assert!(metric(b.admin, &attempts("self")).await >= 1.0, "B's own address is in the list");
    assert_eq!(metric(b.admin, "cloudmap_xds_service_entries").await, 2.0);
    // An istiod-like stream on B gets exactly the bytes A sends.
    let (mut on_b, from_b) = first_service_entries(&b).await;
    assert_eq!(from_b.version_info, from_a.version_info);
    assert_eq!(from_b.resources, from_a.resources);
    // A lists B's follower stream among its clients.
    let clients = a.clients().await;
    assert!(
        clients.iter().any(|c| c.node_id == format!("cloudmap-xds-peer~{}", b_status.instance_id)),
        "{clients:?}"
    );

    // A goes; C starts, still without AWS, and borrows from B, which serves a borrowed set itself.
    a.kill();
    let c = cloudmap_replica(dir.path(), "c", &moto.endpoint(), c_at, &peers, &[]).await;
    let c_status = wait_borrowed(&c, b.grpc).await;
    assert_eq!(c_status.snapshot_version, a_version);
    assert_eq!(c.service_entries().await, a_entries);
    assert_eq!(debug_snapshot(c.admin).await["borrowed"]["peerBorrowed"], true);

    // AWS back: B's own sync is the same set, so it replaces the borrowed one without a push.
    moto.resume();
    let b_own = wait_own_sync(&b).await;
    assert_eq!(b_own.snapshot_version, a_version);
    assert_eq!(metric(b.admin, BORROWED_GAUGE).await, 0.0);
    assert!(debug_snapshot(b.admin).await["borrowed"].is_null());
    // A change after that reaches the stream as its very next response: the same set was never sent again.
    seeder
        .register(&orders.id, "o-2", &[("AWS_INSTANCE_IPV4", "10.0.0.2"), ("AWS_INSTANCE_PORT", "8080")])
        .await;
    let next = on_b.recv_type(SERVICE_ENTRY_V1).await;
    assert_ne!(next.version_info, a_version);
    let orders_entry =
        service_entries(&next).into_iter().find(|(m, _)| m.name.ends_with("orders.shop")).unwrap();
    assert_eq!(orders_entry.1.endpoints.len(), 2, "the new instance is in the push");
    let sent = b.clients().await;
    let istiod_like = sent.iter().find(|c| !c.node_id.starts_with("cloudmap-xds-peer~")).unwrap();
    let se = istiod_like.types.iter().find(|t| t.type_url == SERVICE_ENTRY_V1).unwrap();
    assert_eq!(se.responses_sent, 2, "the borrowed set, then the change; nothing for the identical own sync");
    // C ends on its own sync too, with the change.
    eventually("C to serve its own sync with the change", DEADLINE, || async {
        let status = c.status().await;
        (status.synced && !status.borrowed && status.snapshot_version == next.version_info).then_some(())
    })
    .await;
    drop(tutorial);
}

#[tokio::test]
async fn the_peers_pushes_are_followed_and_an_own_sync_with_other_content_wins() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start().await;
    moto.seeder().await.seed_tutorial().await;
    let orders = "- name: shop\n  services:\n  - name: orders\n    instances:\n    \
                  - attributes: {AWS_INSTANCE_IPV4: 10.0.0.1, AWS_INSTANCE_PORT: 8080}\n";
    let (a, registry) = file_replica(dir.path(), "a", &format!("{GOLDEN_REGISTRY}{orders}"), &[]).await;
    moto.pause();
    let b_at = addrs();
    let b = cloudmap_replica(dir.path(), "b", &moto.endpoint(), b_at, &[a.grpc], &[]).await;
    wait_borrowed(&b, a.grpc).await;
    let (mut on_b, first) = first_service_entries(&b).await;
    assert_eq!(first.version_info, a.status().await.snapshot_version);
    assert_eq!(first.resources.len(), 2);

    // A's content changes: B, still without AWS, follows.
    certs::replace(&registry, GOLDEN_REGISTRY.as_bytes());
    let followed = on_b.recv_type(SERVICE_ENTRY_V1).await;
    assert_eq!(followed.version_info, a.status().await.snapshot_version);
    assert_eq!(
        service_entries(&followed).iter().map(|(m, _)| m.name.as_str()).collect::<Vec<_>>(),
        [GOLDEN_NAME]
    );
    assert!(b.status().await.borrowed);

    // B's own sync: the golden service as moto holds it (another create time: another version) wins.
    moto.resume();
    let own = wait_own_sync(&b).await;
    assert_ne!(own.snapshot_version, followed.version_info);
    let pushed = on_b.recv_type(SERVICE_ENTRY_V1).await;
    assert_eq!(pushed.version_info, own.snapshot_version);
    let entries = b.service_entries().await;
    assert_eq!(entries.len(), 1);
    assert_ne!(
        entries[0].create_time,
        a.service_entries().await[0].create_time,
        "moto's CreateDate, not the file's"
    );
    assert_eq!(metric(b.admin, BORROWED_GAUGE).await, 0.0);
}

#[tokio::test]
async fn never_from_itself_a_peer_not_synced_one_serving_nothing_or_one_down() {
    let dir = tempfile::tempdir().unwrap();
    let not_synced = cloudmap_replica(dir.path(), "not-synced", &aws_down(), addrs(), &[], &[]).await;
    let (serving_nothing, _) = file_replica(dir.path(), "empty", "namespaces: []\n", &[]).await;
    let down = loopback(free_port());
    let b_at = addrs();
    let peers = [b_at.0, down, not_synced.grpc, serving_nothing.grpc];
    let b = cloudmap_replica(dir.path(), "b", &aws_down(), b_at, &peers, &[]).await;
    // Two full rounds, each outcome counted in each.
    eventually("two rounds over every peer", DEADLINE, || async {
        let mut done = true;
        for outcome in ["self", "unreachable", "not_ready", "empty"] {
            done &= metric(b.admin, &attempts(outcome)).await >= 2.0;
        }
        done.then_some(())
    })
    .await;
    let status = b.status().await;
    assert!(!status.synced && !status.borrowed, "{status:?}");
    assert!(b.service_entries().await.is_empty());
    assert_eq!(http_get(b.admin, "/ready").await.unwrap().0, 503);
    assert_eq!(metric(b.admin, &attempts("borrowed")).await, 0.0);
    assert_eq!(metric(b.admin, BORROWED_GAUGE).await, 0.0);
    assert!(b.log().contains("peer bootstrap round"), "each round is accounted for in the log");
}

#[tokio::test]
async fn over_tls_the_peers_certificate_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let pair = |name: &str| {
        let (cert, key) = (dir.path().join(format!("{name}.crt")), dir.path().join(format!("{name}.key")));
        ca.server(name).write(&cert, &key);
        (cert.to_str().unwrap().to_owned(), key.to_str().unwrap().to_owned())
    };
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let other_ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, Ca::new().pem).unwrap();

    let (a_cert, a_key) = pair("a");
    let (a, _) = file_replica(
        dir.path(),
        "a",
        GOLDEN_REGISTRY,
        &["--tls-cert-file", &a_cert, "--tls-key-file", &a_key],
    )
    .await;
    let (b_cert, b_key) = pair("b");
    let tls = |ca: &Path| {
        vec![
            "--tls-cert-file".to_owned(),
            b_cert.clone(),
            "--tls-key-file".to_owned(),
            b_key.clone(),
            "--peer-ca-file".to_owned(),
            ca.to_str().unwrap().to_owned(),
            "--peer-server-name".to_owned(),
            certs::SERVER_NAME.to_owned(),
        ]
    };
    let args = tls(&ca_file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let b = cloudmap_replica(dir.path(), "b", &aws_down(), addrs(), &[a.grpc], &args).await;
    let snapshot = eventually("B to borrow from A over TLS", DEADLINE, || async {
        let snapshot = debug_snapshot(b.admin).await;
        (snapshot["borrowed"]["from"] == a.grpc.to_string()).then_some(snapshot)
    })
    .await;
    let names: Vec<&str> =
        snapshot["serviceEntries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, [GOLDEN_NAME]);

    // A peer whose certificate another CA signed is not trusted: nothing borrowed.
    let args = tls(&other_ca_file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let untrusting = cloudmap_replica(dir.path(), "untrusting", &aws_down(), addrs(), &[a.grpc], &args).await;
    eventually("the failed handshakes to be counted", DEADLINE, || async {
        (metric(untrusting.admin, &attempts("unreachable")).await >= 2.0).then_some(())
    })
    .await;
    assert_eq!(metric(untrusting.admin, BORROWED_GAUGE).await, 0.0);
    assert!(untrusting.log().contains("certificate"), "the log names the certificate problem");

    // TLS on our port without a CA for the peers: a clear start error.
    let out = std::process::Command::new(BIN)
        .args(["serve", "--registry-file", dir.path().join("a.yaml").to_str().unwrap()])
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--tls-cert-file", &b_cert, "--tls-key-file", &b_key, "--peer-bootstrap", &a.grpc.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--peer-bootstrap with TLS on the gRPC port (--tls-cert-file) needs --peer-ca-file"),
        "{stderr}"
    );
}
