//! The binary as a user runs it: start-up errors, `render`, and a graceful SIGTERM drain.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudmap_xds::test_helpers::{AdsClient, DEADLINE, SERVICE_ENTRY_V1, eventually, free_port, http_get};

const BIN: &str = env!("CARGO_BIN_EXE_cloudmap-xds");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/registry.yaml");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).env_remove("POD_NAMESPACE").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn a_missing_registry_file_is_a_clear_error() {
    let (code, _, stderr) = run(&[
        "serve",
        "--registry-file",
        "/nonexistent/registry.yaml",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1);
    assert_eq!(stderr.trim(), "error: --registry-file /nonexistent/registry.yaml: no such file");
}

#[test]
fn a_broken_registry_file_at_start_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.yaml");
    std::fs::write(
        &path,
        "namespaces:\n- name: ns\n  services:\n  - name: s\n    instances:\n    - health: SICK\n",
    )
    .unwrap();
    let (code, _, stderr) = run(&[
        "serve",
        "--registry-file",
        path.to_str().unwrap(),
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1);
    let last = stderr.lines().last().unwrap();
    let expected = format!(
        "error: registry file {}:6:15: namespaces[0].services[0].instances[0].health: unknown variant `SICK`, expected one of `HEALTHY`, `UNHEALTHY`, `UNKNOWN`",
        path.display()
    );
    assert_eq!(last, expected);
}

#[test]
fn bad_flags_are_clear_errors() {
    let (code, _, stderr) = run(&["serve", "--admin-addr", "not-an-address"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("invalid value 'not-an-address' for '--admin-addr <ADMIN_ADDR>'"), "{stderr}");
    let (code, _, stderr) = run(&[
        "serve",
        "--registry-file",
        EXAMPLE,
        "--publish-namespace",
        "Bad_NS",
        "--grpc-addr",
        "127.0.0.1:0",
    ]);
    assert_eq!(code, 1);
    assert!(stderr.contains("invalid publish namespace \"Bad_NS\""), "{stderr}");
    // Holding the listener from the moment the port is chosen: a port picked first and bound later
    // can be taken by a parallel test in between.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let (code, _, stderr) = run(&[
        "serve",
        "--registry-file",
        EXAMPLE,
        "--grpc-addr",
        &format!("127.0.0.1:{port}"),
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    drop(busy);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("error: binding --grpc-addr 127.0.0.1:{port}: Address already in use")),
        "{stderr}"
    );
}

#[test]
fn render_prints_kubernetes_yaml() {
    let (code, stdout, _) = run(&["render", "--registry-file", EXAMPLE]);
    assert_eq!(code, 0);
    let docs: Vec<serde_json::Value> = stdout
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_norway::from_str(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 5);
    let golden = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "cloudmap-getmesh-external-service.my-namespace")
        .unwrap();
    assert_eq!(golden["apiVersion"], "networking.istio.io/v1");
    assert_eq!(golden["kind"], "ServiceEntry");
    assert_eq!(golden["metadata"]["namespace"], "istio-system");
    assert_eq!(golden["spec"]["hosts"][0], "getmesh-external-service.my-namespace");
    assert_eq!(golden["spec"]["resolution"], "STATIC");
    let (_, stdout, _) = run(&["render", "--registry-file", EXAMPLE, "--publish-namespace", "mesh-external"]);
    assert!(stdout.contains("namespace: mesh-external"));
}

struct Server {
    child: Child,
    grpc: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(registry: &str, extra: &[&str]) -> Server {
    let (grpc, admin) = (free_port(), free_port());
    let child = Command::new(BIN)
        .args(["serve", "--registry-file", registry, "--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}"), "--log-format", "json"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Server { child, grpc: ([127, 0, 0, 1], grpc).into(), admin: ([127, 0, 0, 1], admin).into() }
}

#[tokio::test]
async fn sigterm_drains_streams_cleanly_and_exits_within_the_grace_period() {
    let mut server = spawn(EXAMPLE, &["--shutdown-grace-period", "5s"]);
    eventually("ready", DEADLINE, || async {
        (http_get(server.admin, "/ready").await.ok()?.0 == 200).then_some(())
    })
    .await;
    let mut client = AdsClient::connect(server.grpc).await.unwrap();
    client.send_initial(&[SERVICE_ENTRY_V1]).await;
    let response = client.recv().await;
    client.ack(&response).await;

    let started = Instant::now();
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // The open stream ends with an OK status, not a reset.
    let end = client.recv_timeout(DEADLINE).await;
    assert!(matches!(end, Ok(None)), "stream must end cleanly, got {end:?}");
    let status = tokio::task::spawn_blocking(move || {
        let status = server.child.wait().unwrap();
        let log: Vec<String> =
            BufReader::new(server.child.stderr.take().unwrap()).lines().map_while(Result::ok).collect();
        (status, log)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit status {:?}", status.0);
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    let log = status.1.join("\n");
    assert!(log.contains("\"signal\":\"SIGTERM\""), "{log}");
    // Stream log lines carry the istiod node id.
    assert!(
        log.contains(
            "\"node_id\":\"sidecar~10.1.2.3~istiod-test.istio-system~istio-system.svc.cluster.local\""
        ),
        "{log}"
    );
    // New streams are refused once draining: the port is closed.
    assert!(AdsClient::connect(([127, 0, 0, 1], server_grpc_port(&log)).into()).await.is_err());
}

fn server_grpc_port(log: &str) -> u16 {
    let marker = "\"grpc_addr\":\"127.0.0.1:";
    let start = log.find(marker).unwrap() + marker.len();
    log[start..].split('"').next().unwrap().parse().unwrap()
}
