//! Supervision of the binary's long-lived tasks: when one of them ends (a panic,
//! an error, an early return), `/ready` and grpc.health turn false at once, the
//! reason is logged, and the process exits non-zero within the grace period.
//!
//! Each test makes one task fail through the `testing` feature's hooks
//! (`supervise::fault`): `CLOUDMAP_XDS_TEST_FAULT=<task>:<kind>` arms the fault
//! and SIGUSR1 fires it; `CLOUDMAP_XDS_TEST_HOLD_EXIT` holds the exit after the
//! failure is reported until SIGUSR2, so the test can read both signals before
//! the process goes. One test runs without the hold and times the exit from
//! the fault itself.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod support;

use std::time::{Duration, Instant};

use cloudmap_xds::supervise::fault::{FAULT_ENV, HOLD_EXIT_ENV};
use cloudmap_xds::supervise::task_names;
use cloudmap_xds::test_helpers::{AdsClient, DEADLINE, SERVICE_ENTRY_V1, eventually, http_get};
use support::istiod::ServerProcess;
use support::moto::{self, Moto};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const BIN: &str = env!("CARGO_BIN_EXE_cloudmap-xds");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/registry.yaml");
const GRACE: Duration = Duration::from_secs(4);
const GRACE_FLAG: &str = "4s";

/// Fields drop in order: the server (printing its log tail if the test failed) before its directory.
struct Fixture {
    server: ServerProcess,
    _moto: Option<Moto>,
    _dir: tempfile::TempDir,
}

async fn start(task: &str, kind: &str, hold: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let fault = format!("{task}:{kind}");
    let mut envs = vec![(FAULT_ENV, fault.as_str())];
    if hold {
        envs.push((HOLD_EXIT_ENV, "1"));
    }
    let log = dir.path().join("cloudmap-xds.log");
    let (server, moto) = if task == task_names::CLOUDMAP_POLLER {
        let moto = Moto::start().await;
        moto.seeder().await.seed_tutorial().await;
        let endpoint = moto.endpoint();
        envs.extend(moto::CLIENT_ENV);
        let args = [
            "--aws-region",
            moto::REGION,
            "--aws-endpoint-url",
            &endpoint,
            "--poll-interval",
            "200ms",
            "--shutdown-grace-period",
            GRACE_FLAG,
        ];
        (ServerProcess::start(BIN, log, &args, &envs).await, Some(moto))
    } else {
        let mut args = vec!["--registry-file", EXAMPLE, "--shutdown-grace-period", GRACE_FLAG];
        if task == task_names::PEER_BOOTSTRAP {
            // The task runs only with peers to borrow from (here none answers; the file syncs at once).
            args.extend(["--peer-bootstrap", "127.0.0.1:1"]);
        }
        (ServerProcess::start(BIN, log, &args, &envs).await, None)
    };
    Fixture { server, _moto: moto, _dir: dir }
}

async fn health_client(server: &ServerProcess) -> HealthClient<tonic::transport::Channel> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc)).unwrap().connect().await;
    HealthClient::new(channel.unwrap())
}

/// A grpc.health Watch of the overall status, opened before the fault.
async fn watch_health(server: &ServerProcess) -> tonic::Streaming<HealthCheckResponse> {
    health_client(server)
        .await
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner()
}

async fn next_status(watch: &mut tonic::Streaming<HealthCheckResponse>) -> ServingStatus {
    let message = tokio::time::timeout(DEADLINE, watch.message()).await.expect("a health update in time");
    message.unwrap().expect("the health watch is open").status()
}

/// Arms the fault, checks readiness and health turn false with the reason logged,
/// then releases the exit and checks it is non-zero and within the grace period.
async fn failing_task_is_reported_and_exits_non_zero(task: &str, kind: &str) {
    let mut f = start(task, kind, true).await;
    eventually("ready", DEADLINE, || async {
        (http_get(f.server.admin, "/ready").await.ok()?.0 == 200).then_some(())
    })
    .await;
    let mut health = watch_health(&f.server).await;
    assert_eq!(next_status(&mut health).await, ServingStatus::Serving);

    f.server.signal("USR1");
    // grpc.health: pushed on the open Watch (its connection outlives even a failed gRPC server task).
    assert_eq!(next_status(&mut health).await, ServingStatus::NotServing);
    // /ready: 503 naming the task, or, when the admin server itself died, nothing listening.
    let ready = http_get(f.server.admin, "/ready").await;
    if task == task_names::ADMIN_SERVER {
        assert!(ready.is_err(), "the dead admin server still answers: {ready:?}");
    } else {
        let (status, body) = ready.unwrap();
        assert_eq!(status, 503);
        assert!(body.starts_with(&format!("failed: task {task} ")), "{body}");
    }
    // A fresh connection (a kubelet gRPC probe) is refused: the drain has closed the listener.
    let probe = tonic::transport::Endpoint::from_shared(format!("http://{}", f.server.grpc)).unwrap();
    eventually("the gRPC listener to close", DEADLINE, || async {
        probe.connect().await.is_err().then_some(())
    })
    .await;
    let log = f.server.log();
    let line = log
        .lines()
        .find(|l| l.contains("a long-lived task ended unexpectedly"))
        .expect("the reason is logged");
    assert!(line.contains(&format!("\"task\":\"{task}\"")) && line.contains("\"level\":\"ERROR\""), "{line}");

    drop(health);
    let released = Instant::now();
    f.server.signal("USR2");
    let status = f.server.wait_exit(GRACE + Duration::from_secs(2)).await;
    let took = released.elapsed();
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(took <= GRACE, "exited {took:?} after the release, beyond the grace period");
    let log = f.server.log();
    let last = log.lines().last().unwrap();
    assert!(last.starts_with(&format!("error: task {task} ")), "{last}");
}

#[tokio::test]
async fn a_panicking_cloudmap_poller_fails_the_replica() {
    failing_task_is_reported_and_exits_non_zero(task_names::CLOUDMAP_POLLER, "panic").await;
}

#[tokio::test]
async fn a_returning_registry_file_watcher_fails_the_replica() {
    failing_task_is_reported_and_exits_non_zero(task_names::REGISTRY_FILE_WATCHER, "return").await;
}

#[tokio::test]
async fn a_panicking_snapshot_builder_fails_the_replica() {
    failing_task_is_reported_and_exits_non_zero(task_names::SNAPSHOT_BUILDER, "panic").await;
}

#[tokio::test]
async fn a_failing_grpc_server_fails_the_replica() {
    failing_task_is_reported_and_exits_non_zero(task_names::GRPC_SERVER, "error").await;
}

#[tokio::test]
async fn a_panicking_admin_server_fails_the_replica() {
    failing_task_is_reported_and_exits_non_zero(task_names::ADMIN_SERVER, "panic").await;
}

#[tokio::test]
async fn a_returning_readiness_mirror_fails_the_replica() {
    failing_task_is_reported_and_exits_non_zero(task_names::READINESS_MIRROR, "return").await;
}

#[tokio::test]
async fn a_panicking_peer_bootstrap_fails_the_replica() {
    failing_task_is_reported_and_exits_non_zero(task_names::PEER_BOOTSTRAP, "panic").await;
}

#[tokio::test]
async fn without_a_hold_the_process_exits_within_the_grace_period_of_the_fault() {
    let mut f = start(task_names::SNAPSHOT_BUILDER, "panic", false).await;
    eventually("ready", DEADLINE, || async {
        (http_get(f.server.admin, "/ready").await.ok()?.0 == 200).then_some(())
    })
    .await;
    let mut client = AdsClient::connect(f.server.grpc).await.unwrap();
    client.send_initial(&[SERVICE_ENTRY_V1]).await;
    let response = client.recv().await;
    client.ack(&response).await;

    let fault = Instant::now();
    f.server.signal("USR1");
    // The open stream ends cleanly (istiod reconnects to another replica) ...
    let end = client.recv_timeout(DEADLINE).await;
    assert!(matches!(end, Ok(None)), "stream must end cleanly, got {end:?}");
    // ... and the process is gone within the grace period, with an error.
    let status = f.server.wait_exit(GRACE + Duration::from_secs(2)).await;
    let took = fault.elapsed();
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(took <= GRACE, "exited {took:?} after the fault");
    let log = f.server.log();
    assert!(log.contains("task snapshot-builder panicked: injected fault"), "{log}");
}

/// With TLS on, the certificate reloader is supervised too. (grpc.health would need a TLS
/// client here; readiness, the log and the exit are what this test checks.)
#[tokio::test]
async fn a_panicking_tls_reloader_fails_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::certs::Ca::new();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    ca.server("only").write(&cert, &key);
    let fault = format!("{}:panic", task_names::TLS_RELOADER);
    let envs = [(FAULT_ENV, fault.as_str()), (HOLD_EXIT_ENV, "1")];
    let args = [
        "--registry-file",
        EXAMPLE,
        "--shutdown-grace-period",
        GRACE_FLAG,
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
    ];
    let mut server = ServerProcess::start(BIN, dir.path().join("cloudmap-xds.log"), &args, &envs).await;
    eventually("ready", DEADLINE, || async {
        (http_get(server.admin, "/ready").await.ok()?.0 == 200).then_some(())
    })
    .await;
    server.signal("USR1");
    let body = eventually("not ready", DEADLINE, || async {
        let (status, body) = http_get(server.admin, "/ready").await.ok()?;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.starts_with("failed: task tls-reloader panicked: injected fault"), "{body}");
    assert!(server.log().contains("\"task\":\"tls-reloader\""));
    let released = Instant::now();
    server.signal("USR2");
    let status = server.wait_exit(GRACE + Duration::from_secs(2)).await;
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(released.elapsed() <= GRACE);
}
