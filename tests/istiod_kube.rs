//! Proof against a real istiod in Kubernetes mode, configured as users run it:
//! `configSources: [k8s://, xds://cloudmap-xds]` next to a real kube-apiserver (etcd and
//! kube-apiserver on loopback with Istio's CRDs: tests/support/kube.rs) and our binary.
//! For the newest Istio master the Go module proxy serves (unpatched) and for 1.26.0.
//!
//! Everything is asserted from istiod's debug endpoints (`/ready`, `/debug/configz`,
//! `/debug/registryz`) and from what it tells a sidecar over ADS (CDS, EDS and RDS,
//! decoded with hand-written Envoy messages: tests/support/xds.rs). Each test has its
//! own API server, so tests never see each other's objects.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudmap_xds::proto::cloudmap_xds::debug::v1::{GetStatusResponse, ServiceEntryResource};
use cloudmap_xds::test_helpers::{GOLDEN_NAME, GOLDEN_REGISTRY, free_port};
use serde_json::Value;
use support::istiod::{
    CHANGE_DEADLINE, ISTIOD_KUBE_READY_DEADLINE, ISTIOD_SYNC_DEADLINE, Istiod, IstiodBin, ServerProcess,
    WAITING_LINE, assert_configz_is, configz_name, loopback, restart_our_server_without_loss, versions_in,
    wait_until_istiod_has, wait_until_istiod_has_besides,
};
use support::kube::{ISTIO_NAMESPACE, KubeApi};
use support::moto::{self, Moto};
use support::xds::{self, Cluster, Sidecar};

const BIN: &str = env!("CARGO_BIN_EXE_cloudmap-xds");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/registry.yaml");
const README: &str = include_str!("../README.md");
const GOLDEN_HOST: &str = "getmesh-external-service.my-namespace";
const GOLDEN_SE: &str = "cloudmap-getmesh-external-service.my-namespace";
const GOLDEN_IP: &str = "52.192.72.89";
const ORDERS_HOST: &str = "orders.shop.internal";

fn outbound(port: u16, host: &str) -> String {
    format!("outbound|{port}||{host}")
}

// ---- fixtures ---------------------------------------------------------------------------------------

/// What users keep in Kubernetes for a Cloud Map host: a DestinationRule with a connection
/// pool for every port and, on 443, TLS origination with a pool of its own (port-level
/// settings replace the top-level ones for that port), and a VirtualService with a
/// timeout and retries. Both in `default`, the namespace of the pretend sidecar.
const TRAFFIC_RULES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: getmesh-external-service, namespace: default}
spec:
  host: getmesh-external-service.my-namespace
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 17, connectTimeout: 3s}
      http: {http1MaxPendingRequests: 23, http2MaxRequests: 29, maxRetries: 4, maxRequestsPerConnection: 31, idleTimeout: 41s}
    portLevelSettings:
    - port: {number: 443}
      connectionPool:
        tcp: {maxConnections: 13, connectTimeout: 2s}
      tls: {mode: SIMPLE, sni: getmesh-external-service.my-namespace}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: getmesh-external-service, namespace: default}
spec:
  hosts: [getmesh-external-service.my-namespace]
  http:
  - timeout: 7s
    retries: {attempts: 5, perTryTimeout: 2s, retryOn: "5xx,connect-failure"}
    route:
    - destination: {host: getmesh-external-service.my-namespace, port: {number: 80}}
"#;

fn write_registry(dir: &Path, content: &str) -> PathBuf {
    let path = dir.join("registry.yaml");
    std::fs::write(&path, content).unwrap();
    path
}

/// Replaces the file atomically, as editors and ConfigMap updates do.
fn edit(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn serve_file(dir: &Path, registry: &Path) -> ServerProcess {
    let registry = registry.to_str().unwrap();
    let args = ["--registry-file", registry, "--publish-namespace", ISTIO_NAMESPACE];
    ServerProcess::start(BIN, dir.join("cloudmap-xds.log"), &args, &[]).await
}

async fn serve_cloudmap(dir: &Path, moto: &Moto) -> ServerProcess {
    let endpoint = moto.endpoint();
    let args = [
        "--aws-region",
        moto::REGION,
        "--aws-endpoint-url",
        &endpoint,
        "--publish-namespace",
        ISTIO_NAMESPACE,
        "--poll-interval",
        "200ms",
        "--aws-request-timeout",
        "2s",
    ];
    let envs = moto::CLIENT_ENV;
    ServerProcess::start(BIN, dir.join("cloudmap-xds.log"), &args, &envs).await
}

/// istiod in Kubernetes mode with `configSources: [k8s://, xds://server]`, synced and ready.
async fn start_istiod(
    bin: &IstiodBin,
    dir: &Path,
    kube: &KubeApi,
    server: &ServerProcess,
    mesh: &str,
) -> Istiod {
    let started = Instant::now();
    let mut istiod = Istiod::spawn_kube(bin, dir, kube, &[server.grpc], mesh);
    istiod.wait_synced(ISTIOD_SYNC_DEADLINE).await;
    let synced = started.elapsed();
    istiod.wait_ready(ISTIOD_KUBE_READY_DEADLINE).await;
    eprintln!(
        "{bin} (Kubernetes mode): gRPC port open {synced:?}, /ready 200 {:?} after spawn",
        started.elapsed()
    );
    istiod
}

/// Polls `check` until it returns `Ok`; at the deadline, panics with `what` and the last error.
async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let until = Instant::now() + deadline;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= until => {
                panic!("timed out after {deadline:?} waiting for {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

// ---- what istiod and Kubernetes hold ------------------------------------------------------------------

/// `(kind, namespace/name)` → `resourceVersion`.
type ConfigIndex = BTreeMap<(String, String), String>;

/// Every Istio object stored in Kubernetes (all kinds the CRDs define).
async fn istio_objects_in_kube(kube: &KubeApi) -> ConfigIndex {
    let crds = kube.kubectl_ok(&["get", "crd", "-o", "jsonpath={.items[*].metadata.name}"], None).await;
    let kinds = crds.split_whitespace().collect::<Vec<_>>().join(",");
    let list = kube.get_json(&["get", &kinds, "--all-namespaces"]).await;
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let m = &o["metadata"];
            let key = format!("{}/{}", m["namespace"].as_str().unwrap(), m["name"].as_str().unwrap());
            ((o["kind"].as_str().unwrap().to_owned(), key), m["resourceVersion"].as_str().unwrap().to_owned())
        })
        .collect()
}

fn configz_index(configz: &[Value]) -> ConfigIndex {
    configz
        .iter()
        .map(|c| {
            let version = c["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_owned();
            ((c["kind"].as_str().unwrap_or_default().to_owned(), configz_name(c)), version)
        })
        .collect()
}

/// Waits until istiod's store (`/debug/configz`, every kind) is exactly our ServiceEntries
/// plus every Istio object in Kubernetes, same versions; then checks our entries field by field.
async fn assert_configz_is_ours_plus_kube(istiod: &Istiod, server: &ServerProcess, kube: &KubeApi) {
    let served = server.service_entries().await;
    let mut want = istio_objects_in_kube(kube).await;
    for entry in &served {
        let clash = want.insert(("ServiceEntry".to_owned(), entry.name.clone()), entry.version.clone());
        assert!(
            clash.is_none(),
            "{} is also in Kubernetes: this check is for tests without clashes",
            entry.name
        );
    }
    let configz =
        wait_for("configz = our ServiceEntries + the Kubernetes objects", CHANGE_DEADLINE, || async {
            let configz = istiod.try_configz_all().await?;
            let have = configz_index(&configz);
            if have == want { Ok(configz) } else { Err(format!("have {have:#?}\nwant {want:#?}")) }
        })
        .await;
    let ours: Vec<Value> = configz
        .into_iter()
        .filter(|c| c["kind"] == "ServiceEntry" && served.iter().any(|e| e.name == configz_name(c)))
        .collect();
    assert_configz_is(&ours, &served);
}

/// `namespace` → `defaultAddress` of every service istiod's registry has for `host`.
async fn registry_namespaces(istiod: &Istiod, host: &str) -> BTreeMap<String, String> {
    istiod
        .registryz()
        .await
        .iter()
        .filter(|s| s["hostname"] == host)
        .map(|s| {
            let ns = s["Attributes"]["Namespace"].as_str().unwrap_or_default().to_owned();
            (ns, s["defaultAddress"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

/// The hosts of istiod's registry that come from ServiceEntries (not from Kubernetes Services).
async fn external_hosts(istiod: &Istiod) -> Vec<String> {
    let hosts: BTreeSet<String> = istiod
        .registryz()
        .await
        .iter()
        .filter(|s| s["Attributes"]["ServiceRegistry"] == "External")
        .map(|s| s["hostname"].as_str().unwrap_or_default().to_owned())
        .collect();
    hosts.into_iter().collect()
}

/// A sidecar's view of `outbound|port||host`: the cluster (None if istiod does not give
/// it to the sidecar) and the `address:port` of its endpoints.
async fn sidecar_cluster(
    istiod: &Istiod,
    port: u16,
    host: &str,
) -> Result<Option<(Cluster, Vec<String>)>, String> {
    let name = outbound(port, host);
    let sidecar = Sidecar::new(&istiod.bin.istio_version);
    let Some(cluster) = xds::cluster(istiod.grpc, &sidecar, &name).await? else { return Ok(None) };
    let endpoints = xds::load_assignment(istiod.grpc, &sidecar, &name).await?;
    Ok(Some((cluster, endpoints.map(|e| e.addresses()).unwrap_or_default())))
}

/// Waits until the sidecar's cluster `outbound|80||host` has exactly `want` endpoints.
async fn wait_sidecar_endpoints(istiod: &Istiod, host: &str, want: &[&str]) {
    wait_for(&format!("the sidecar's endpoints for {host} to be {want:?}"), CHANGE_DEADLINE, || async {
        let have = sidecar_cluster(istiod, 80, host).await?.map(|(_, e)| e);
        if have.as_deref() == Some(&want.iter().map(|a| format!("{a}:80")).collect::<Vec<_>>()[..]) {
            Ok(())
        } else {
            Err(format!("{have:?}"))
        }
    })
    .await;
}

// ---- what the traffic rules do to a sidecar's clusters and routes --------------------------------------

/// `Ok` when the sidecar's clusters for the golden host carry [`TRAFFIC_RULES`]'
/// DestinationRule: the connection pool on 80, TLS origination and its own pool on 443.
fn destination_rule_applied(c80: &Cluster, c443: &Cluster) -> Result<(), String> {
    let t80 = c80.default_thresholds().ok_or("no circuit breakers on 80")?;
    let pool80 = (t80.max_connections, t80.max_pending_requests, t80.max_requests, t80.max_retries);
    if pool80 != (Some(17), Some(23), Some(29), Some(4)) {
        return Err(format!("80: circuit breakers {t80:?}"));
    }
    if xds::millis(c80.connect_timeout.as_ref()) != Some(3000) {
        return Err(format!("80: connect timeout {:?}", c80.connect_timeout));
    }
    let http = c80.http_options().ok_or("80: no HTTP protocol options")?;
    if (xds::millis(http.idle_timeout.as_ref()), http.max_requests_per_connection) != (Some(41_000), Some(31))
    {
        return Err(format!("80: HTTP options {http:?}"));
    }
    if c80.upstream_tls().is_some() {
        return Err("80: TLS, but the rule originates TLS on 443 only".into());
    }
    let tls = c443.upstream_tls().ok_or("443: no TLS transport socket")?;
    if tls.sni != GOLDEN_HOST {
        return Err(format!("443: SNI {:?}", tls.sni));
    }
    let t443 = c443.default_thresholds().ok_or("no circuit breakers on 443")?;
    if t443.max_connections != Some(13) || xds::millis(c443.connect_timeout.as_ref()) != Some(2000) {
        return Err(format!("443: pool {t443:?}, connect timeout {:?}", c443.connect_timeout));
    }
    Ok(())
}

/// Waits until the golden host's clusters carry the DestinationRule of [`TRAFFIC_RULES`]
/// and its endpoints are `endpoints`.
async fn wait_destination_rule_applied(istiod: &Istiod, endpoints: &[&str]) {
    wait_for("the DestinationRule in the sidecar's clusters", CHANGE_DEADLINE, || async {
        let (c80, e80) = sidecar_cluster(istiod, 80, GOLDEN_HOST).await?.ok_or("no cluster for 80")?;
        let (c443, e443) = sidecar_cluster(istiod, 443, GOLDEN_HOST).await?.ok_or("no cluster for 443")?;
        destination_rule_applied(&c80, &c443)?;
        let want = |port: u16| endpoints.iter().map(|a| format!("{a}:{port}")).collect::<Vec<_>>();
        if (e80.clone(), e443.clone()) != (want(80), want(443)) {
            return Err(format!("endpoints {e80:?} {e443:?}"));
        }
        Ok(())
    })
    .await;
}

/// Waits until the sidecar's route for the golden host on 80 carries the VirtualService of
/// [`TRAFFIC_RULES`]: its timeout and retry policy.
async fn wait_virtual_service_applied(istiod: &Istiod) {
    wait_for("the VirtualService in the sidecar's routes", CHANGE_DEADLINE, || async {
        let config = xds::route(istiod.grpc, &Sidecar::new(&istiod.bin.istio_version), "80")
            .await?
            .ok_or("no route 80")?;
        let vhost = config
            .virtual_hosts
            .iter()
            .find(|v| v.name == format!("{GOLDEN_HOST}:80"))
            .ok_or_else(|| format!("no virtual host {GOLDEN_HOST}:80"))?;
        if !vhost.domains.iter().any(|d| d == GOLDEN_HOST) {
            return Err(format!("domains {:?}", vhost.domains));
        }
        let [route] = &vhost.routes[..] else { return Err(format!("routes {:?}", vhost.routes)) };
        let action = route.route.as_ref().ok_or("not a route action")?;
        let retry = action.retry_policy.as_ref().ok_or("no retry policy")?;
        let seen = (
            action.cluster.as_str(),
            xds::millis(action.timeout.as_ref()),
            retry.num_retries,
            xds::millis(retry.per_try_timeout.as_ref()),
            retry.retry_on.as_str(),
        );
        let want = (&outbound(80, GOLDEN_HOST)[..], Some(7000), Some(5), Some(2000), "5xx,connect-failure");
        if seen == want { Ok(()) } else { Err(format!("route {seen:?}")) }
    })
    .await;
}

/// The clusters a sidecar gets (names only), as a set.
async fn sidecar_cluster_names(istiod: &Istiod) -> BTreeSet<String> {
    istiod.sidecar_clusters().await.unwrap().into_iter().collect()
}

/// `outbound|PORT||HOST` for every port of every entry we serve.
fn our_clusters(served: &[ServiceEntryResource]) -> BTreeSet<String> {
    served
        .iter()
        .flat_map(|e| {
            let spec = e.spec.as_ref().unwrap();
            spec.hosts.iter().flat_map(|h| spec.ports.iter().map(move |p| outbound(p.number as u16, h)))
        })
        .collect()
}

// ---- istiod is ready only once we answered; its store is ours + Kubernetes ----------------------------

async fn ready_only_once_we_answered(bin: IstiodBin) {
    let dir = tempfile::tempdir().unwrap();
    let kube = KubeApi::start_for_istio(dir.path(), bin.crds()).await;
    kube.apply(TRAFFIC_RULES).await;
    let moto = Moto::start().await;
    moto.seeder().await.seed_tutorial().await;
    moto.pause();
    let server = serve_cloudmap(dir.path(), &moto).await;
    let mut istiod = Istiod::spawn_kube(&bin, dir.path(), &kube, &[server.grpc], "");

    // Our first Cloud Map sync cannot complete: we withhold ServiceEntries, istiod waits.
    istiod.wait_log(WAITING_LINE, ISTIOD_SYNC_DEADLINE).await;
    assert!(!istiod.grpc_port_open().await, "istiod opened its gRPC port before we answered");
    assert_eq!(istiod.ready_status().await, 503, "istiod is ready before we answered");
    let entries = istiod.configz().await;
    assert!(entries.is_empty(), "ServiceEntries in istiod before we sent any: {entries:?}");

    let resumed = Instant::now();
    moto.resume();
    istiod.wait_synced(ISTIOD_SYNC_DEADLINE).await;
    istiod.wait_ready(ISTIOD_KUBE_READY_DEADLINE).await;
    eprintln!("{bin}: ready {:?} after moto answered", resumed.elapsed());
    assert!(server.status().await.synced);
    assert_eq!(server.service_entries().await.len(), 1);
    assert_configz_is_ours_plus_kube(&istiod, &server, &kube).await;

    // An object created in Kubernetes now joins the store, next to ours.
    kube.apply(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: default}\n\
         spec:\n  egress:\n  - hosts: ['istio-system/*', './*']\n",
    )
    .await;
    assert_configz_is_ours_plus_kube(&istiod, &server, &kube).await;
    wait_destination_rule_applied(&istiod, &[GOLDEN_IP]).await;
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
}

#[tokio::test]
async fn master_istiod_is_ready_only_once_we_answered_and_holds_ours_plus_kubernetes() {
    ready_only_once_we_answered(IstiodBin::master()).await;
}

#[tokio::test]
async fn istiod_is_ready_only_once_we_answered_and_holds_ours_plus_kubernetes() {
    ready_only_once_we_answered(IstiodBin::current()).await;
}

// ---- composition: Kubernetes rules on our hosts ---------------------------------------------------------

async fn kubernetes_rules_apply_to_our_hosts(bin: IstiodBin) {
    let dir = tempfile::tempdir().unwrap();
    let kube = KubeApi::start_for_istio(dir.path(), bin.crds()).await;
    let registry = write_registry(dir.path(), &std::fs::read_to_string(EXAMPLE).unwrap());
    let server = serve_file(dir.path(), &registry).await;
    let istiod = start_istiod(&bin, dir.path(), &kube, &server, "").await;
    let served = server.service_entries().await;
    let all = sidecar_cluster_names(&istiod).await;
    let missing: Vec<_> = our_clusters(&served).difference(&all).cloned().collect();
    assert!(missing.is_empty(), "clusters missing for the sidecar: {missing:?}");

    let applied = Instant::now();
    kube.apply(TRAFFIC_RULES).await;
    wait_destination_rule_applied(&istiod, &[GOLDEN_IP]).await;
    wait_virtual_service_applied(&istiod).await;
    eprintln!(
        "{bin}: DestinationRule and VirtualService in the sidecar's config {:?} after apply",
        applied.elapsed()
    );
    assert_configz_is_ours_plus_kube(&istiod, &server, &kube).await;

    // A Sidecar's egress host is `<namespace of the ServiceEntry>/<host>`: ours live in the
    // publish namespace, so `my-namespace/*` (the Cloud Map namespace) selects none of them.
    let sidecar = |hosts: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: default}}\nspec:\n  egress:\n  - hosts: {hosts}\n"
        )
    };
    kube.apply(&sidecar("['my-namespace/*']")).await;
    let ours = our_clusters(&served);
    wait_for("a Sidecar with egress my-namespace/* to hide our clusters", CHANGE_DEADLINE, || async {
        let visible: Vec<String> =
            sidecar_cluster_names(&istiod).await.intersection(&ours).cloned().collect();
        if visible.is_empty() { Ok(()) } else { Err(format!("still visible: {visible:?}")) }
    })
    .await;

    // `istio-system/*.my-namespace`: the golden host, with its rules, and nothing else of ours.
    // `./*` keeps the VirtualService in `default` (egress hosts select VirtualServices too).
    kube.apply(&sidecar("['./*', 'istio-system/*.my-namespace']")).await;
    let golden = BTreeSet::from([outbound(80, GOLDEN_HOST), outbound(443, GOLDEN_HOST)]);
    wait_for(
        "a Sidecar with egress istio-system/*.my-namespace to show the golden host only",
        CHANGE_DEADLINE,
        || async {
            let visible: BTreeSet<String> =
                sidecar_cluster_names(&istiod).await.intersection(&ours).cloned().collect();
            if visible == golden { Ok(()) } else { Err(format!("visible: {visible:?}")) }
        },
    )
    .await;
    wait_destination_rule_applied(&istiod, &[GOLDEN_IP]).await;
    wait_virtual_service_applied(&istiod).await;
    assert_configz_is_ours_plus_kube(&istiod, &server, &kube).await;
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
}

#[tokio::test]
async fn master_istiod_applies_kubernetes_rules_to_our_hosts() {
    kubernetes_rules_apply_to_our_hosts(IstiodBin::master()).await;
}

#[tokio::test]
async fn istiod_applies_kubernetes_rules_to_our_hosts() {
    kubernetes_rules_apply_to_our_hosts(IstiodBin::current()).await;
}

// ---- migration from the old operator -------------------------------------------------------------------

/// The namespace the old operator published into besides `istio-system` in this test
/// (it published into `--namespace`, `PUBLISH_NAMESPACE` or its pod's namespace).
const OLD_OPERATOR_NAMESPACE: &str = "cloudmap-operator";
/// The README's leftover check: every ServiceEntry owned by the old operator
/// (`ownerReferences: [{apiVersion: cloudmap.istio.io, kind: ServiceController, ...}]`).
const LEFTOVER_JSONPATH: &str = r#"{range .items[?(@.metadata.ownerReferences[0].kind=="ServiceController")]}{.metadata.namespace}/{.metadata.name}{"\n"}{end}"#;

/// The golden host as the old operator wrote it (`cloudmap-<host>`, same spec shape), with
/// endpoint `ip` so the tests can tell which entry istiod uses.
fn old_operator_entry(namespace: &str, ip: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {GOLDEN_SE}
  namespace: {namespace}
  ownerReferences:
  - {{apiVersion: cloudmap.istio.io, kind: ServiceController, name: istio-cloud-map-operator, controller: true, uid: 6f1d2b8e-3c4a-4e5f-9a0b-1c2d3e4f5a6b}}
spec:
  hosts: [{GOLDEN_HOST}]
  addresses: [{ip}]
  endpoints: [{{address: {ip}, ports: {{http: 80, https: 443}}}}]
  ports: [{{name: http, number: 80, protocol: HTTP}}, {{name: https, number: 443, protocol: HTTPS}}]
  resolution: STATIC
"#
    )
}

/// What istiod does with our entry when a Kubernetes ServiceEntry of the same namespace
/// and name is deleted.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SameNameDelete {
    /// Our entry takes over at once.
    OursTakesOver,
    /// Our entry stays in the store (configz) but leaves the service registry until it
    /// changes or istiod restarts.
    OursDropped,
}

/// The README's leftover check, run with the real kubectl.
async fn leftovers(kube: &KubeApi) -> Vec<String> {
    let command =
        format!("kubectl get serviceentries.networking.istio.io -A -o jsonpath='{LEFTOVER_JSONPATH}'");
    assert!(README.contains(&command), "the README does not show the leftover check `{command}`");
    let jsonpath = format!("jsonpath={LEFTOVER_JSONPATH}");
    let out =
        kube.kubectl_ok(&["get", "serviceentries.networking.istio.io", "-A", "-o", &jsonpath], None).await;
    out.lines().map(str::to_owned).collect()
}

async fn old_operator_entries_next_to_ours(bin: IstiodBin, same_name_delete: SameNameDelete) {
    let dir = tempfile::tempdir().unwrap();
    let kube = KubeApi::start_for_istio(dir.path(), bin.crds()).await;
    kube.kubectl_ok(&["create", "namespace", OLD_OPERATOR_NAMESPACE], None).await;
    // What the old operator left: the golden host in the publish namespace (our name) and in
    // another namespace; and a ServiceEntry a user wrote, which the check must not list.
    kube.apply(&old_operator_entry(ISTIO_NAMESPACE, "52.192.72.1")).await;
    kube.apply(&old_operator_entry(OLD_OPERATOR_NAMESPACE, "52.192.72.2")).await;
    kube.apply(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api-example-com, namespace: default}\n\
         spec:\n  hosts: [api.example.com]\n  ports: [{name: https, number: 443, protocol: TLS}]\n  resolution: DNS\n",
    )
    .await;
    let old_names = vec![format!("{OLD_OPERATOR_NAMESPACE}/{GOLDEN_SE}"), GOLDEN_NAME.to_owned()];
    assert_eq!(leftovers(&kube).await, old_names, "the leftover check");

    let orders = "- name: shop.internal\n  services:\n  - name: orders\n    created: 2025-02-10T08:30:00Z\n    \
                  instances:\n    - attributes: {AWS_INSTANCE_IPV4: 10.20.1.17, AWS_INSTANCE_PORT: 8080}\n";
    let registry = write_registry(dir.path(), &format!("{GOLDEN_REGISTRY}{orders}"));
    let server = serve_file(dir.path(), &registry).await;
    let istiod = start_istiod(&bin, dir.path(), &kube, &server, "").await;

    // 1. Everything present (istiod switched to cloudmap-xds before the cleanup): the
    //    Kubernetes object of our namespace and name hides ours entirely (k8s:// comes first
    //    in configSources and istiod keeps one config per kind, namespace and name). Both
    //    namespaces' entries are in the registry; ours is not.
    let configz = istiod.configz().await;
    let golden = configz.iter().find(|c| configz_name(c) == GOLDEN_NAME).unwrap();
    assert_eq!(golden["spec"]["addresses"], serde_json::json!(["52.192.72.1"]), "{golden}");
    let in_kube = kube.get_json(&["-n", ISTIO_NAMESPACE, "get", "serviceentry", GOLDEN_SE]).await;
    assert_eq!(golden["metadata"]["resourceVersion"], in_kube["metadata"]["resourceVersion"]);
    assert!(configz.iter().any(|c| configz_name(c) == old_names[0]));
    assert!(configz.iter().any(|c| configz_name(c) == "istio-system/cloudmap-orders.shop.internal"));
    wait_for("registryz to hold both Kubernetes entries", CHANGE_DEADLINE, || async {
        let have = registry_namespaces(&istiod, GOLDEN_HOST).await;
        let want = BTreeMap::from([
            (ISTIO_NAMESPACE.to_owned(), "52.192.72.1".to_owned()),
            (OLD_OPERATOR_NAMESPACE.to_owned(), "52.192.72.2".to_owned()),
        ]);
        if have == want { Ok(()) } else { Err(format!("{have:?}")) }
    })
    .await;
    // The two Kubernetes entries were created in the same second: which one a sidecar uses
    // is istiod's tie-break (name, then namespace). Never ours.
    let (_, endpoints) = sidecar_cluster(&istiod, 80, GOLDEN_HOST).await.unwrap().unwrap();
    assert!(
        endpoints == ["52.192.72.1:80"] || endpoints == ["52.192.72.2:80"],
        "the sidecar uses {endpoints:?}, not one of the old operator's entries"
    );

    // 2. The README's cleanup, first the object that shares our namespace and name.
    kube.kubectl_ok(&["-n", ISTIO_NAMESPACE, "delete", "serviceentry", GOLDEN_SE], None).await;
    let ours = server.service_entries().await;
    let our_golden = ours.iter().find(|e| e.name == GOLDEN_NAME).unwrap().version.clone();
    wait_for("configz to show our golden entry", CHANGE_DEADLINE, || async {
        let configz = istiod.try_configz().await?;
        let versions = versions_in(&configz);
        if versions.get(GOLDEN_NAME) == Some(&our_golden) { Ok(()) } else { Err(format!("{versions:?}")) }
    })
    .await;
    match same_name_delete {
        SameNameDelete::OursTakesOver => {
            // Ours (created 2024, from Cloud Map) is older than the other namespace's
            // object: creation time decides, ours wins.
            wait_sidecar_endpoints(&istiod, GOLDEN_HOST, &[GOLDEN_IP]).await;
            assert_eq!(
                registry_namespaces(&istiod, GOLDEN_HOST).await,
                BTreeMap::from([
                    (ISTIO_NAMESPACE.to_owned(), GOLDEN_IP.to_owned()),
                    (OLD_OPERATOR_NAMESPACE.to_owned(), "52.192.72.2".to_owned())
                ])
            );
        }
        SameNameDelete::OursDropped => {
            // The delete event of the Kubernetes object removes the services of that
            // namespace/name, ours included, although configz shows ours.
            wait_sidecar_endpoints(&istiod, GOLDEN_HOST, &["52.192.72.2"]).await;
            // Still so after an unrelated push (a rule for another host reaching the sidecar).
            kube.apply(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: orders, namespace: default}\n\
                 spec:\n  host: orders.shop.internal\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 7}\n",
            )
            .await;
            wait_for("the DestinationRule on orders to reach the sidecar", CHANGE_DEADLINE, || async {
                let (cluster, _) =
                    sidecar_cluster(&istiod, 8080, ORDERS_HOST).await?.ok_or("no orders cluster")?;
                let max = cluster.default_thresholds().and_then(|t| t.max_connections);
                if max == Some(7) { Ok(()) } else { Err(format!("max_connections {max:?}")) }
            })
            .await;
            let (_, endpoints) = sidecar_cluster(&istiod, 80, GOLDEN_HOST).await.unwrap().unwrap();
            assert_eq!(endpoints, ["52.192.72.2:80"], "ours came back by itself");
            assert_eq!(
                registry_namespaces(&istiod, GOLDEN_HOST).await,
                BTreeMap::from([(OLD_OPERATOR_NAMESPACE.to_owned(), "52.192.72.2".to_owned())]),
                "registryz"
            );
            // The README's remedy: a restarted istiod (here a second one) has ours, which wins.
            let restarted = start_istiod(&bin, dir.path(), &kube, &server, "").await;
            wait_sidecar_endpoints(&restarted, GOLDEN_HOST, &[GOLDEN_IP]).await;
        }
    }

    // 3. Across namespaces creation time decides: ours made newer than the old operator's
    //    object loses the host to it (and, after a drop, a change of ours brings it back).
    let newer = GOLDEN_REGISTRY
        .replace("2024-05-01T12:00:00Z", "2030-01-01T00:00:00Z")
        .replace(GOLDEN_IP, "52.192.72.90");
    edit(&registry, &format!("{newer}{orders}"));
    let in_kube: Vec<String> = istio_objects_in_kube(&kube)
        .await
        .into_keys()
        .filter(|(kind, _)| kind == "ServiceEntry")
        .map(|(_, name)| name)
        .collect();
    let besides: Vec<&str> = in_kube.iter().map(String::as_str).collect();
    wait_until_istiod_has_besides("our golden entry made newer", &istiod, &server, &besides, |s| {
        s.iter().any(|e| e.name == GOLDEN_NAME && e.create_time.is_some_and(|t| t.seconds > 1_800_000_000))
    })
    .await;
    wait_for("registryz to hold ours and the old operator's", CHANGE_DEADLINE, || async {
        let have = registry_namespaces(&istiod, GOLDEN_HOST).await;
        let want = BTreeMap::from([
            (ISTIO_NAMESPACE.to_owned(), "52.192.72.90".to_owned()),
            (OLD_OPERATOR_NAMESPACE.to_owned(), "52.192.72.2".to_owned()),
        ]);
        if have == want { Ok(()) } else { Err(format!("{have:?}")) }
    })
    .await;
    wait_sidecar_endpoints(&istiod, GOLDEN_HOST, &["52.192.72.2"]).await;
    // Back to Cloud Map's creation date (2024): ours is the older one and wins. (The
    // instance moves too: istiod keeps a service whose only change is its creation time.)
    let older = GOLDEN_REGISTRY.replace(GOLDEN_IP, "52.192.72.91");
    edit(&registry, &format!("{older}{orders}"));
    wait_sidecar_endpoints(&istiod, GOLDEN_HOST, &["52.192.72.91"]).await;

    // 4. The last leftover goes: only ours remains, and the check finds nothing.
    kube.kubectl_ok(&["-n", OLD_OPERATOR_NAMESPACE, "delete", "serviceentry", GOLDEN_SE], None).await;
    wait_for("registryz to hold ours only", CHANGE_DEADLINE, || async {
        let have = registry_namespaces(&istiod, GOLDEN_HOST).await;
        if have == BTreeMap::from([(ISTIO_NAMESPACE.to_owned(), "52.192.72.91".to_owned())]) {
            Ok(())
        } else {
            Err(format!("{have:?}"))
        }
    })
    .await;
    wait_sidecar_endpoints(&istiod, GOLDEN_HOST, &["52.192.72.91"]).await;
    assert_eq!(leftovers(&kube).await, Vec::<String>::new(), "the leftover check after the cleanup");
    assert_configz_is_ours_plus_kube(&istiod, &server, &kube).await;
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
}

#[tokio::test]
async fn master_istiod_with_old_operator_entries_next_to_ours() {
    old_operator_entries_next_to_ours(IstiodBin::master(), SameNameDelete::OursTakesOver).await;
}

#[tokio::test]
async fn istiod_with_old_operator_entries_next_to_ours() {
    old_operator_entries_next_to_ours(IstiodBin::current(), SameNameDelete::OursDropped).await;
}

// ---- discoverySelectors ---------------------------------------------------------------------------------

const SELECTOR_LABEL: &str = "cloudmap-xds.test/discovery";
const SELECTORS: &str = "discoverySelectors:\n- matchLabels:\n    cloudmap-xds.test/discovery: enabled\n";

async fn discovery_selectors(bin: IstiodBin) {
    let dir = tempfile::tempdir().unwrap();
    let kube = KubeApi::start_for_istio(dir.path(), bin.crds()).await;
    let label = format!("{SELECTOR_LABEL}=enabled");
    kube.kubectl_ok(&["label", "namespace", "default", &label], None).await;
    kube.kubectl_ok(&["create", "namespace", "unselected"], None).await;
    kube.apply(TRAFFIC_RULES).await;
    // Rules kept in the publish namespace, and a ServiceEntry in a namespace no selector matches.
    kube.apply(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: orders, namespace: istio-system}\n\
         spec:\n  host: orders.shop.internal\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 7}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: api-example-com, namespace: unselected}\n\
         spec:\n  hosts: [api.example.com]\n  ports: [{name: https, number: 443, protocol: TLS}]\n  resolution: DNS\n",
    )
    .await;
    let registry = write_registry(dir.path(), &std::fs::read_to_string(EXAMPLE).unwrap());
    let server = serve_file(dir.path(), &registry).await;
    let istiod = start_istiod(&bin, dir.path(), &kube, &server, SELECTORS).await;
    let served = server.service_entries().await;
    let orders_max_connections = || async {
        let (cluster, _) = sidecar_cluster(&istiod, 8080, ORDERS_HOST).await?.ok_or("no orders cluster")?;
        Ok::<_, String>(cluster.default_thresholds().and_then(|t| t.max_connections))
    };

    // 1. The publish namespace is not selected: our entries apply all the same (istiod does
    //    not filter xds:// sources by namespace); Kubernetes objects in unselected namespaces,
    //    the rule in istio-system included, do not.
    let served_names: BTreeSet<String> = served.iter().map(|e| e.name.clone()).collect();
    let wanted_kube: BTreeSet<(String, String)> = [
        ("DestinationRule", "default/getmesh-external-service"),
        ("VirtualService", "default/getmesh-external-service"),
    ]
    .map(|(k, n)| (k.to_owned(), n.to_owned()))
    .into();
    let configz = istiod.try_configz_all().await.unwrap();
    let kube_in_configz: BTreeSet<(String, String)> = configz
        .iter()
        .map(|c| (c["kind"].as_str().unwrap().to_owned(), configz_name(c)))
        .filter(|(kind, name)| !(kind == "ServiceEntry" && served_names.contains(name)))
        .collect();
    assert_eq!(kube_in_configz, wanted_kube, "Kubernetes objects in istiod: only the selected namespaces'");
    let ours: Vec<Value> = configz.into_iter().filter(|c| c["kind"] == "ServiceEntry").collect();
    assert_configz_is(&ours, &served);
    let our_hosts: BTreeSet<String> =
        served.iter().flat_map(|e| e.spec.as_ref().unwrap().hosts.clone()).collect();
    wait_for("registryz to hold our hosts, not the unselected namespace's", CHANGE_DEADLINE, || async {
        let hosts: BTreeSet<String> = external_hosts(&istiod).await.into_iter().collect();
        if hosts == our_hosts { Ok(()) } else { Err(format!("{hosts:?}")) }
    })
    .await;
    let clusters = sidecar_cluster_names(&istiod).await;
    let missing: Vec<_> = our_clusters(&served).difference(&clusters).cloned().collect();
    assert!(missing.is_empty(), "clusters missing for the sidecar: {missing:?}");
    assert!(!clusters.contains(&outbound(443, "api.example.com")));
    wait_destination_rule_applied(&istiod, &[GOLDEN_IP]).await;
    wait_virtual_service_applied(&istiod).await;
    assert_eq!(
        orders_max_connections().await.unwrap(),
        Some(u32::MAX),
        "the rule in the unselected istio-system applies"
    );

    // 2. Selecting the publish namespace brings its rules; our entries do not change.
    kube.kubectl_ok(&["label", "namespace", ISTIO_NAMESPACE, &label], None).await;
    wait_for("the rule in istio-system to apply once it is selected", CHANGE_DEADLINE, || async {
        let max = orders_max_connections().await?;
        if max == Some(7) { Ok(()) } else { Err(format!("max_connections {max:?}")) }
    })
    .await;
    assert_configz_is(&istiod.configz().await, &served);
    wait_destination_rule_applied(&istiod, &[GOLDEN_IP]).await;
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
}

#[tokio::test]
async fn master_istiod_applies_our_entries_whatever_the_discovery_selectors() {
    discovery_selectors(IstiodBin::master()).await;
}

#[tokio::test]
async fn istiod_applies_our_entries_whatever_the_discovery_selectors() {
    discovery_selectors(IstiodBin::current()).await;
}

// ---- edits, removals and a restart of our server ------------------------------------------------------

async fn edits_removals_and_a_restart_reach_istiod(bin: IstiodBin) {
    let dir = tempfile::tempdir().unwrap();
    let kube = KubeApi::start_for_istio(dir.path(), bin.crds()).await;
    kube.apply(TRAFFIC_RULES).await;
    let orders = "- name: shop\n  services:\n  - name: orders\n    instances:\n    \
                  - attributes: {AWS_INSTANCE_IPV4: 10.0.0.1, AWS_INSTANCE_PORT: 8080}\n";
    let registry = write_registry(dir.path(), &format!("{GOLDEN_REGISTRY}{orders}"));
    let mut server = serve_file(dir.path(), &registry).await;
    let istiod = Arc::new(start_istiod(&bin, dir.path(), &kube, &server, "").await);
    wait_until_istiod_has("golden + orders", &istiod, &server, |s| s.len() == 2).await;
    wait_destination_rule_applied(&istiod, &[GOLDEN_IP]).await;

    // One edit: the golden instance moves, orders goes, inventory (new namespace) comes.
    let moved = GOLDEN_REGISTRY.replace(GOLDEN_IP, "52.192.72.90");
    let inventory = "- name: warehouse\n  services:\n  - name: inventory\n    instances:\n    \
                     - attributes: {AWS_INSTANCE_IPV4: 10.0.0.2, AWS_INSTANCE_PORT: 9090}\n";
    edit(&registry, &format!("{moved}{inventory}"));
    wait_until_istiod_has("the moved, removed and added services", &istiod, &server, |s| {
        s.len() == 2 && s.iter().any(|e| e.name.ends_with("inventory.warehouse"))
    })
    .await;
    wait_destination_rule_applied(&istiod, &["52.192.72.90"]).await;
    assert_eq!(external_hosts(&istiod).await, [GOLDEN_HOST, "inventory.warehouse"]);

    // Everything removed: the host leaves the sidecar; the rules stay in Kubernetes.
    edit(&registry, "namespaces: []\n");
    wait_until_istiod_has("nothing", &istiod, &server, <[_]>::is_empty).await;
    wait_for("the golden host to leave the sidecar", CHANGE_DEADLINE, || async {
        match sidecar_cluster(&istiod, 80, GOLDEN_HOST).await? {
            None => Ok(()),
            Some(_) => Err("still there".to_owned()),
        }
    })
    .await;
    assert_configz_is_ours_plus_kube(&istiod, &server, &kube).await;

    // And back, with the Kubernetes rules applied again.
    edit(&registry, &format!("{GOLDEN_REGISTRY}{orders}"));
    let before = wait_until_istiod_has("golden + orders again", &istiod, &server, |s| s.len() == 2).await;
    wait_destination_rule_applied(&istiod, &[GOLDEN_IP]).await;
    wait_virtual_service_applied(&istiod).await;

    // A crash and restart of our server: istiod keeps every entry throughout.
    restart_our_server_without_loss(&istiod, &mut server, &before).await;
    edit(&registry, GOLDEN_REGISTRY);
    wait_until_istiod_has("the edit after the restart", &istiod, &server, |s| s.len() == 1).await;
    wait_destination_rule_applied(&istiod, &[GOLDEN_IP]).await;
    assert_configz_is_ours_plus_kube(&istiod, &server, &kube).await;
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
}

#[tokio::test]
async fn master_istiod_takes_edits_removals_and_a_restart_of_our_server() {
    edits_removals_and_a_restart_reach_istiod(IstiodBin::master()).await;
}

#[tokio::test]
async fn istiod_takes_edits_removals_and_a_restart_of_our_server() {
    edits_removals_and_a_restart_reach_istiod(IstiodBin::current()).await;
}

// ---- our server down ---------------------------------------------------------------------------------

async fn our_server_down(bin: IstiodBin) {
    let dir = tempfile::tempdir().unwrap();
    let kube = KubeApi::start_for_istio(dir.path(), bin.crds()).await;
    kube.apply(TRAFFIC_RULES).await;
    let registry = write_registry(dir.path(), GOLDEN_REGISTRY);
    let mut server = serve_file(dir.path(), &registry).await;

    // 1. Down when istiod starts: istiod exits at once, in Kubernetes mode too (in a
    //    cluster: CrashLoopBackOff until we are back, with the kubelet's growing delay).
    server.kill();
    let spawned = Instant::now();
    let mut first = Istiod::spawn_kube(&bin, dir.path(), &kube, &[server.grpc], "");
    let status = first.wait_exit(ISTIOD_SYNC_DEADLINE).await;
    eprintln!("{bin}: started while our server was down: exited with {status} after {:?}", spawned.elapsed());
    assert!(!status.success(), "istiod exited successfully");
    assert!(first.log().contains("MCP: failed running"), "istiod's start-up error names the MCP source");
    drop(first);

    // Back up: a new istiod starts normally.
    server.restart().await;
    let mut istiod = start_istiod(&bin, dir.path(), &kube, &server, "").await;
    wait_destination_rule_applied(&istiod, &[GOLDEN_IP]).await;
    let before = versions_in(&istiod.configz().await);

    // 2. Down later: istiod stays ready, keeps our entries and still takes Kubernetes changes.
    let streams_before = istiod.log().matches("connection closed").count();
    server.kill();
    let killed = Instant::now();
    wait_for("istiod to notice our server died", CHANGE_DEADLINE, || async {
        let closed = istiod.log().matches("connection closed").count();
        if closed > streams_before { Ok(()) } else { Err(format!("{closed} closed streams")) }
    })
    .await;
    kube.apply(&TRAFFIC_RULES.replace("maxConnections: 13", "maxConnections: 19")).await;
    wait_for(
        "a DestinationRule edit to reach the sidecar while our server is down",
        CHANGE_DEADLINE,
        || async {
            let (cluster, endpoints) =
                sidecar_cluster(&istiod, 443, GOLDEN_HOST).await?.ok_or("no 443 cluster")?;
            let max = cluster.default_thresholds().and_then(|t| t.max_connections);
            if max == Some(19) && endpoints == [format!("{GOLDEN_IP}:443")] {
                Ok(())
            } else {
                Err(format!("max_connections {max:?}, endpoints {endpoints:?}"))
            }
        },
    )
    .await;
    assert_eq!(istiod.ready_status().await, 200, "istiod turned unready while our server is down");
    assert_eq!(
        versions_in(&istiod.configz().await),
        before,
        "istiod's ServiceEntries changed while our server is down"
    );
    assert!(istiod.exited().is_none(), "istiod exited while our server is down");
    eprintln!(
        "{bin}: our server down {:?}: istiod ready, entries kept, Kubernetes edits applied",
        killed.elapsed()
    );

    // Back: istiod reconnects by itself, and our edits flow again.
    server.restart().await;
    let restarted = Instant::now();
    wait_for("istiod to reconnect", Duration::from_secs(120), || async {
        let clients = server.clients().await;
        let acked = clients.iter().any(|c| {
            c.types.iter().any(|t| t.type_url == bin.se_type_url && !t.last_version_acked.is_empty())
        });
        if acked { Ok(()) } else { Err(format!("{} clients", clients.len())) }
    })
    .await;
    eprintln!("{bin}: reconnected {:?} after our server came back", restarted.elapsed());
    edit(&registry, &GOLDEN_REGISTRY.replace(GOLDEN_IP, "52.192.72.90"));
    wait_until_istiod_has("an edit after the outage", &istiod, &server, |s| {
        s.iter().any(|e| e.spec.as_ref().unwrap().endpoints[0].address == "52.192.72.90")
    })
    .await;
    wait_sidecar_endpoints(&istiod, GOLDEN_HOST, &["52.192.72.90"]).await;
    istiod.wait_ready(ISTIOD_KUBE_READY_DEADLINE).await;
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
}

#[tokio::test]
async fn master_istiod_when_our_server_is_down() {
    our_server_down(IstiodBin::master()).await;
}

#[tokio::test]
async fn istiod_when_our_server_is_down() {
    our_server_down(IstiodBin::current()).await;
}

// ---- istiod never held hostage: our replicas restarted during an AWS outage ---------------------------

/// One of two replicas on Cloud Map (moto), each with `--peer-bootstrap` naming both, as the one
/// headless Service name does in a cluster.
async fn peered_replica(
    dir: &Path,
    name: &str,
    moto: &Moto,
    at: (SocketAddr, SocketAddr),
    peers: &str,
) -> ServerProcess {
    let endpoint = moto.endpoint();
    let args = [
        "--aws-region",
        moto::REGION,
        "--aws-endpoint-url",
        &endpoint,
        "--publish-namespace",
        ISTIO_NAMESPACE,
        "--poll-interval",
        "200ms",
        "--aws-request-timeout",
        "2s",
        "--peer-bootstrap",
        peers,
    ];
    let envs = moto::CLIENT_ENV;
    ServerProcess::start_at(BIN, dir.join(format!("cloudmap-xds-{name}.log")), at, &args, &envs).await
}

/// Waits until `server`'s GetStatus satisfies `check`.
async fn wait_status(
    what: &str,
    server: &ServerProcess,
    check: impl Fn(&GetStatusResponse) -> bool,
) -> GetStatusResponse {
    wait_for(what, CHANGE_DEADLINE, || async {
        let status = server.status().await;
        if check(&status) { Ok(status) } else { Err(format!("{status:?}")) }
    })
    .await
}

/// The ServiceEntry responses sent on istiod's stream to `server` (peer streams left out).
async fn responses_to_istiod(server: &ServerProcess, type_url: &str) -> Vec<u64> {
    server
        .clients()
        .await
        .iter()
        .filter(|c| !c.node_id.starts_with(cloudmap_xds::bootstrap::PEER_NODE_PREFIX))
        .flat_map(|c| c.types.iter().filter(|t| t.type_url == type_url).map(|t| t.responses_sent))
        .collect()
}

#[tokio::test]
async fn master_istiod_restarted_during_an_aws_outage_after_our_replicas_were_restarted() {
    let bin = IstiodBin::master();
    let dir = tempfile::tempdir().unwrap();
    let kube = KubeApi::start_for_istio(dir.path(), bin.crds()).await;
    kube.apply(TRAFFIC_RULES).await;
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    seeder.seed_tutorial().await;
    let shop = seeder.create_http_namespace("shop.internal").await;
    let orders = seeder.create_service(&shop, "orders", false).await;
    seeder.register_many(&orders.id, 3, |i| format!("10.1.0.{}", i + 1)).await;
    let payments = seeder.create_service(&shop, "payments", false).await;
    seeder
        .register(&payments.id, "p-1", &[("AWS_INSTANCE_IPV4", "10.2.0.1"), ("AWS_INSTANCE_PORT", "8443")])
        .await;

    let replica_at = || (loopback(free_port()), loopback(free_port()));
    let (a_at, b_at) = (replica_at(), replica_at());
    let peers = format!("{},{}", a_at.0, b_at.0);
    let mut a = peered_replica(dir.path(), "a", &moto, a_at, &peers).await;
    let mut b = peered_replica(dir.path(), "b", &moto, b_at, &peers).await;
    for server in [&a, &b] {
        wait_status("the own sync of all three services", server, |s| s.synced && s.service_entries == 3)
            .await;
    }
    let istiod = start_istiod(&bin, dir.path(), &kube, &a, "").await;
    let before = wait_until_istiod_has("every entry", &istiod, &a, |s| s.len() == 3).await;
    let want = versions_in(&before);
    let served_before = a.service_entries().await;
    wait_destination_rule_applied(&istiod, &[GOLDEN_IP]).await;

    // AWS goes down; our replicas are restarted one by one, as a rollout does.
    moto.pause();
    let outage = Instant::now();
    a.restart().await;
    let a_status =
        wait_status("A to borrow from B", &a, |s| s.borrowed && s.borrowed_from == b.grpc.to_string()).await;
    eprintln!("A restarted: serving B's set {:?} into the outage", outage.elapsed());
    b.restart().await;
    let b_status =
        wait_status("B to borrow from A", &b, |s| s.borrowed && s.borrowed_from == a.grpc.to_string()).await;
    eprintln!("B restarted: serving A's (borrowed) set {:?} into the outage", outage.elapsed());
    assert!(!a_status.synced && !b_status.synced, "neither replica can have synced with AWS down");
    assert_eq!(b.service_entries().await, served_before, "B serves exactly what A served before the outage");

    // istiod restarted: it becomes ready with every entry (from B, whose set went B → A → B).
    drop(istiod);
    let restarted = Instant::now();
    let istiod = start_istiod(&bin, dir.path(), &kube, &b, "").await;
    eprintln!("{bin} restarted during the outage: ready {:?} after spawn", restarted.elapsed());
    assert_eq!(versions_in(&istiod.configz().await), want, "istiod holds every entry, same versions");
    assert_configz_is_ours_plus_kube(&istiod, &b, &kube).await;
    wait_destination_rule_applied(&istiod, &[GOLDEN_IP]).await;
    assert_eq!(external_hosts(&istiod).await.len(), 3, "every host reaches the sidecar");

    // AWS back: each replica's own sync replaces its borrowed set. The same set: istiod is sent nothing.
    moto.resume();
    for server in [&a, &b] {
        let own = wait_status("the own sync after the outage", server, |s| s.synced && !s.borrowed).await;
        assert_eq!(own.snapshot_version, b_status.snapshot_version);
    }
    seeder
        .register(&payments.id, "p-2", &[("AWS_INSTANCE_IPV4", "10.2.0.2"), ("AWS_INSTANCE_PORT", "8443")])
        .await;
    wait_until_istiod_has("the change after the outage", &istiod, &b, |s| {
        s.iter().any(|e| {
            e.name.ends_with("payments.shop.internal") && e.spec.as_ref().unwrap().endpoints.len() == 2
        })
    })
    .await;
    assert_eq!(
        responses_to_istiod(&b, &bin.se_type_url).await,
        [2],
        "istiod got the borrowed set and the change, nothing when the own sync replaced the borrowed set"
    );
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
}
