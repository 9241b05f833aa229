//! TLS on the gRPC port: `--tls-cert-file`/`--tls-key-file`, reloaded when the files
//! change (new connections get the new certificate; a broken new pair keeps the old one,
//! logged and counted), proven with a rustls client and with real istiod 1.26
//! (`configSources[].tlsSettings: {mode: SIMPLE, caCertificates: <PEM>}`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use cloudmap_xds::test_helpers::{AdsClient, DEADLINE, GOLDEN_NAME, GOLDEN_REGISTRY, eventually, http_get};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::certs::{self, Ca};
use support::istiod::{
    ISTIOD_KUBE_READY_DEADLINE, ISTIOD_SYNC_DEADLINE, Istiod, IstiodBin, ServerProcess, configz_name,
};
use support::kube::KubeApi;

const BIN: &str = env!("CARGO_BIN_EXE_cloudmap-xds");

/// The leaf certificate a fresh TLS handshake with `addr` gets, verified against `ca_pem` for
/// [`certs::SERVER_NAME`], with ALPN h2 as gRPC clients require.
async fn presented(addr: SocketAddr, ca_pem: &str) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(certs::SERVER_NAME).unwrap(), tcp)
        .await
        .unwrap();
    let (_, session) = tls.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    session.peer_certificates().unwrap()[0].to_vec()
}

async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let (_, body) = http_get(admin, "/metrics").await.unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.parse().unwrap())
}

struct Fixture {
    server: ServerProcess,
    ca: Ca,
    first: certs::Pair,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    registry: std::path::PathBuf,
    dir: tempfile::TempDir,
}

async fn serve_tls() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let first = ca.server("first");
    first.write(&cert, &key);
    let registry = dir.path().join("registry.yaml");
    std::fs::write(&registry, GOLDEN_REGISTRY).unwrap();
    let args = [
        "--registry-file",
        registry.to_str().unwrap(),
        "--publish-namespace",
        "istio-system",
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
    ];
    let server = ServerProcess::start(BIN, dir.path().join("cloudmap-xds.log"), &args, &[]).await;
    Fixture { server, ca, first, cert, key, registry, dir }
}

const RELOADS_OK: &str = "cloudmap_xds_tls_reloads_total{outcome=\"success\"}";
const RELOADS_FAILED: &str = "cloudmap_xds_tls_reloads_total{outcome=\"error\"}";

#[tokio::test]
async fn a_rotated_pair_reaches_new_connections_and_a_broken_one_is_refused() {
    let f = serve_tls().await;
    assert_eq!(presented(f.server.grpc, &f.ca.pem).await, f.first.der);

    // cert-manager renews: both files replaced.
    let second = f.ca.server("second");
    second.write(&f.cert, &f.key);
    eventually("the renewed certificate on new connections", DEADLINE, || async {
        (presented(f.server.grpc, &f.ca.pem).await == second.der).then_some(())
    })
    .await;
    assert_eq!(metric(f.server.admin, RELOADS_OK).await, 1.0);

    // A broken renewal: a certificate with someone else's key. Logged, counted, not served.
    let third = f.ca.server("third");
    certs::replace(&f.cert, third.cert_pem.as_bytes());
    eventually("the broken pair to be rejected", DEADLINE, || async {
        (metric(f.server.admin, RELOADS_FAILED).await == 1.0).then_some(())
    })
    .await;
    assert_eq!(presented(f.server.grpc, &f.ca.pem).await, second.der, "the last good pair stays");
    let log = f.server.log();
    assert!(log.contains("new TLS certificate or key rejected; still serving the previous pair"), "{log}");
    // The key follows: the pair is whole again and taken.
    certs::replace(&f.key, third.key_pem.as_bytes());
    eventually("the repaired pair", DEADLINE, || async {
        (presented(f.server.grpc, &f.ca.pem).await == third.der).then_some(())
    })
    .await;
    assert_eq!(metric(f.server.admin, RELOADS_OK).await, 2.0);
}

#[tokio::test]
async fn plaintext_clients_are_turned_away_and_counted() {
    let f = serve_tls().await;
    assert!(AdsClient::connect(f.server.grpc).await.is_err());
    eventually("the failed handshake to be counted", DEADLINE, || async {
        let n =
            metric(f.server.admin, "cloudmap_xds_grpc_rejected_connections_total{reason=\"tls_handshake\"}")
                .await;
        (n >= 1.0).then_some(())
    })
    .await;
    // And the server is fine for TLS clients.
    presented(f.server.grpc, &f.ca.pem).await;
}

#[tokio::test]
async fn a_missing_key_file_is_a_clear_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    ca.server("only").write(&cert, &key);
    std::fs::remove_file(&key).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--registry-file", concat!(env!("CARGO_MANIFEST_DIR"), "/examples/registry.yaml")])
        .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--tls-cert-file", cert.to_str().unwrap(), "--tls-key-file", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("error: cannot read --tls-key-file {}", key.display())), "{stderr}");
}

fn istiod_over_tls(
    bin: &IstiodBin,
    dir: &Path,
    name: &str,
    server: &ServerProcess,
    ca_file: &Path,
) -> Istiod {
    let work = dir.join(name);
    std::fs::create_dir_all(&work).unwrap();
    let envs = [("ISTIOD_XDS_CA_FILE", ca_file.to_str().unwrap()), ("ISTIOD_XDS_SNI", certs::SERVER_NAME)];
    Istiod::spawn_with_env(bin, &work, &[server.grpc], &envs)
}

async fn names_in(istiod: &Istiod) -> Vec<String> {
    istiod.configz().await.iter().filter(|c| c["kind"] == "ServiceEntry").map(configz_name).collect()
}

/// istiod 1.26 dials us over TLS (mode SIMPLE, our CA inline, SNI the Service name) and syncs;
/// after a rotation its open stream keeps working and a new istiod connects with the new certificate.
#[tokio::test]
async fn istiod_syncs_over_tls_and_follows_a_rotation() {
    let bin = IstiodBin::current();
    let f = serve_tls().await;
    let ca_file = f.dir.path().join("ca.pem");
    std::fs::write(&ca_file, &f.ca.pem).unwrap();
    let mut first = istiod_over_tls(&bin, f.dir.path(), "istiod-1", &f.server, &ca_file);
    first.wait_synced(ISTIOD_SYNC_DEADLINE).await;
    assert_eq!(names_in(&first).await, [GOLDEN_NAME]);
    assert_eq!(
        metric(f.server.admin, "cloudmap_xds_ads_connected_streams").await,
        1.0,
        "istiod's stream, over TLS"
    );

    let second_pair = f.ca.server("second");
    second_pair.write(&f.cert, &f.key);
    eventually("the renewed certificate", DEADLINE, || async {
        (presented(f.server.grpc, &f.ca.pem).await == second_pair.der).then_some(())
    })
    .await;
    // The open stream still carries changes...
    let edited = format!(
        "{GOLDEN_REGISTRY}  - name: orders\n    instances:\n    - attributes: {{AWS_INSTANCE_IPV4: 10.0.0.1, AWS_INSTANCE_PORT: 8080}}\n"
    );
    certs::replace(&f.registry, edited.as_bytes());
    let want = vec![GOLDEN_NAME.to_owned(), "istio-system/cloudmap-orders.my-namespace".to_owned()];
    eventually("the edit in the first istiod", DEADLINE, || {
        let want = want.clone();
        let first = &first;
        async move {
            let mut names = names_in(first).await;
            names.sort();
            (names == want).then_some(())
        }
    })
    .await;
    // ...and a new istiod, on a new connection, verifies the new certificate and syncs.
    let mut second = istiod_over_tls(&bin, f.dir.path(), "istiod-2", &f.server, &ca_file);
    second.wait_synced(ISTIOD_SYNC_DEADLINE).await;
    let mut names = names_in(&second).await;
    names.sort();
    assert_eq!(names, want);
    assert_eq!(metric(f.server.admin, "cloudmap_xds_ads_connected_streams").await, 2.0);
}

// ---- istiod in Kubernetes mode: the CA from a Secret (tlsSettings.credentialName) ---------------------

/// A Secret in istiod's namespace (`istio-system`: istiod reads `credentialName` there) with `data`
/// as string keys and values.
fn secret_yaml(name: &str, secret_type: &str, data: &[(&str, &str)]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {}}}\ntype: {secret_type}\nstringData:\n",
        support::kube::ISTIO_NAMESPACE
    );
    for (key, value) in data {
        yaml.push_str(&format!("  {key}: |\n"));
        for line in value.lines() {
            yaml.push_str(&format!("    {line}\n"));
        }
    }
    yaml
}

/// istiod (Kubernetes mode) dials us over TLS with `tlsSettings: {mode: SIMPLE, sni, credentialName}`,
/// the CA read from a Secret under `key` (`ca.crt` in a `kubernetes.io/tls` Secret, as cert-manager
/// writes it, or `cacert` in a generic one): it syncs. With a Secret holding another CA, or none, it
/// does not start (measured and asserted below).
async fn istiod_trusts_the_ca_of_a_secret(bin: IstiodBin, key: &str) {
    let f = serve_tls().await;
    let kube = KubeApi::start_for_istio(f.dir.path(), bin.crds()).await;
    let (secret_type, data) = if key == "ca.crt" {
        // The Secret of our own Certificate (deploy/tls): istiod takes its ca.crt.
        (
            "kubernetes.io/tls",
            vec![
                ("tls.crt", f.first.cert_pem.as_str()),
                ("tls.key", f.first.key_pem.as_str()),
                ("ca.crt", f.ca.pem.as_str()),
            ],
        )
    } else {
        ("Opaque", vec![(key, f.ca.pem.as_str())])
    };
    kube.apply(&secret_yaml("cloudmap-xds-ca", secret_type, &data)).await;
    let other_ca = Ca::new();
    kube.apply(&secret_yaml("other-ca", "Opaque", &[(key, other_ca.pem.as_str())])).await;
    let spawn = |name: &str, secret: &str| {
        let work = f.dir.path().join(name);
        std::fs::create_dir_all(&work).unwrap();
        let env = [("ISTIOD_XDS_CREDENTIAL_NAME", secret), ("ISTIOD_XDS_SNI", certs::SERVER_NAME)];
        Istiod::spawn_kube_with_env(&bin, &work, &kube, &[f.server.grpc], "", &env)
    };

    let started = std::time::Instant::now();
    let mut istiod = spawn("istiod", "cloudmap-xds-ca");
    istiod.wait_synced(ISTIOD_SYNC_DEADLINE).await;
    istiod.wait_ready(ISTIOD_KUBE_READY_DEADLINE).await;
    eprintln!("{bin}: credentialName (key {key}): ready {:?} after spawn", started.elapsed());
    assert_eq!(names_in(&istiod).await, [GOLDEN_NAME]);
    assert_eq!(
        metric(f.server.admin, "cloudmap_xds_ads_connected_streams").await,
        1.0,
        "istiod's stream, over TLS"
    );
    let mesh = std::fs::read_to_string(&istiod.mesh_config).unwrap();
    assert!(mesh.contains("credentialName: cloudmap-xds-ca") && !mesh.contains("caCertificates"), "{mesh}");
    drop(istiod);

    // Our certificate is not signed by the CA in the Secret: the handshake fails and istiod exits at start.
    let rejected_before =
        metric(f.server.admin, "cloudmap_xds_grpc_rejected_connections_total{reason=\"tls_handshake\"}")
            .await;
    let mut untrusting = spawn("untrusting", "other-ca");
    let status = untrusting.wait_exit(ISTIOD_SYNC_DEADLINE).await;
    assert!(!status.success(), "istiod trusting another CA exited with {status}");
    assert!(untrusting.log().contains("MCP: failed running"), "istiod's start-up error names the MCP source");
    assert!(
        metric(f.server.admin, "cloudmap_xds_grpc_rejected_connections_total{reason=\"tls_handshake\"}")
            .await
            > rejected_before,
        "our side counted the failed handshake"
    );
    // A credentialName naming no Secret: istiod exits at start, naming it.
    let mut missing = spawn("missing", "no-such-secret");
    let status = missing.wait_exit(ISTIOD_SYNC_DEADLINE).await;
    assert!(!status.success(), "istiod without its Secret exited with {status}");
    assert!(missing.log().contains("failed to get credential with name no-such-secret"), "{}", missing.log());
    eprintln!("{bin}: credentialName with another CA or no Secret: istiod exits at start ({status})");
}

#[tokio::test]
async fn master_istiod_in_kubernetes_mode_trusts_the_ca_of_a_credential_name_secret() {
    istiod_trusts_the_ca_of_a_secret(IstiodBin::master(), "ca.crt").await;
}

#[tokio::test]
async fn istiod_in_kubernetes_mode_trusts_the_ca_of_a_credential_name_secret() {
    istiod_trusts_the_ca_of_a_secret(IstiodBin::current(), "cacert").await;
}
