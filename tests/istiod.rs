//! Proof against a real istiod (`pilot-discovery`, built from istio.io/istio by
//! `scripts/install-peers.sh`), run on loopback without Kubernetes with our binary
//! as its `xds://` config source (tests/e2e/ISTIOD_NOTES.md). Everything is asserted
//! from istiod's own debug endpoints (`/debug/configz`, `/debug/registryz`) and from
//! what it tells a sidecar over ADS. On failure each child's log tail is printed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod support;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudmap_xds::proto::cloudmap_xds::debug::v1::ServiceEntryResource;
use cloudmap_xds::test_helpers::eventually;
use serde_json::{Value, json};
use support::istiod::{
    self, CHANGE_DEADLINE, ISTIOD_SYNC_DEADLINE, Istiod, IstiodBin, ServerProcess, WAITING_LINE,
    assert_configz_is, configz_name, restart_our_server_without_loss, wait_until_istiod_has,
};
use support::moto::{self, Moto, Seeder};

const BIN: &str = env!("CARGO_BIN_EXE_cloudmap-xds");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/registry.yaml");
const GOLDEN_NAME: &str = "istio-system/cloudmap-getmesh-external-service.my-namespace";
const GOLDEN_HOST: &str = "getmesh-external-service.my-namespace";

const GOLDEN: &str = cloudmap_xds::test_helpers::GOLDEN_REGISTRY;

// ---- fixtures ---------------------------------------------------------------------------------------

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
    let args = ["--registry-file", registry, "--publish-namespace", "istio-system"];
    ServerProcess::start(BIN, dir.join("cloudmap-xds.log"), &args, &[]).await
}

/// Our binary on the Cloud Map source against moto; the credentials are set on the child only.
async fn serve_cloudmap(dir: &Path, moto: &Moto, extra: &[&str]) -> ServerProcess {
    let endpoint = moto.endpoint();
    let mut args = vec!["--aws-region", moto::REGION, "--aws-endpoint-url", &endpoint];
    args.extend([
        "--publish-namespace",
        "istio-system",
        "--poll-interval",
        "200ms",
        "--aws-request-timeout",
        "2s",
    ]);
    args.extend(extra);
    let envs = moto::CLIENT_ENV;
    ServerProcess::start(BIN, dir.join("cloudmap-xds.log"), &args, &envs).await
}

async fn start_istiod(bin: &IstiodBin, dir: &Path, server: &ServerProcess) -> Istiod {
    let started = Instant::now();
    let mut istiod = Istiod::spawn(bin, dir, &[server.grpc]);
    istiod.wait_synced(ISTIOD_SYNC_DEADLINE).await;
    eprintln!("{bin}: synced, gRPC port open {:?} after spawn", started.elapsed());
    istiod
}

fn hosts_of(served: &[ServiceEntryResource]) -> Vec<String> {
    let hosts: BTreeSet<String> =
        served.iter().flat_map(|e| e.spec.as_ref().unwrap().hosts.clone()).collect();
    hosts.into_iter().collect()
}

/// `outbound|PORT||HOST` for every port of every entry.
fn outbound_clusters(served: &[ServiceEntryResource]) -> BTreeSet<String> {
    served
        .iter()
        .flat_map(|e| {
            let spec = e.spec.as_ref().unwrap();
            spec.hosts
                .iter()
                .flat_map(|h| spec.ports.iter().map(move |p| format!("outbound|{}||{h}", p.number)))
        })
        .collect()
}

/// The seed tutorial's ServiceEntry as istiod stores it, field by field.
fn assert_golden_in_configz(configz: &[Value], bin: &IstiodBin, created: &str) {
    let golden =
        configz.iter().find(|c| configz_name(c) == GOLDEN_NAME).expect("the golden ServiceEntry in configz");
    assert_eq!(golden["kind"], "ServiceEntry");
    let api_version = bin.se_type_url.trim_end_matches("/ServiceEntry");
    assert_eq!(golden["apiVersion"], api_version, "istiod files it under the version it asked for");
    assert_eq!(golden["metadata"]["namespace"], "istio-system");
    assert_eq!(golden["metadata"]["name"], "cloudmap-getmesh-external-service.my-namespace");
    // configz prints whole seconds; `created` may have a fraction (moto's CreateDate).
    let stamp = golden["metadata"]["creationTimestamp"].as_str().unwrap();
    assert_eq!(stamp, format!("{}Z", &created[..19]), "creationTimestamp");
    let spec = &golden["spec"];
    assert_eq!(spec["hosts"], json!([GOLDEN_HOST]));
    assert_eq!(spec["addresses"], json!(["52.192.72.89"]));
    assert_eq!(
        spec["ports"],
        json!([{"number": 80, "protocol": "HTTP", "name": "http"}, {"number": 443, "protocol": "HTTPS", "name": "https"}])
    );
    assert_eq!(spec["resolution"], "STATIC");
    // MESH_EXTERNAL is the enum's zero value: protojson leaves it out.
    assert!(spec.get("location").is_none_or(|l| l == "MESH_EXTERNAL"), "{spec}");
    assert_eq!(spec["endpoints"], json!([{"address": "52.192.72.89", "ports": {"http": 80, "https": 443}}]));
    let keys: BTreeSet<&str> = spec.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["addresses", "endpoints", "hosts", "ports", "resolution"]), "{spec}");
}

/// istiod's stream to us asked for `bin`'s ServiceEntry type URL and ACKed what we sent.
async fn assert_istiod_acked_our_entries(server: &ServerProcess, bin: &IstiodBin) {
    eventually("istiod to ACK our ServiceEntries", CHANGE_DEADLINE, || async {
        let clients = server.clients().await;
        let acked = clients.iter().any(|c| {
            c.node_id.starts_with("sidecar~")
                && c.types.iter().any(|t| {
                    t.type_url == bin.se_type_url && !t.last_version_acked.is_empty() && t.nacks == 0
                })
        });
        acked.then_some(())
    })
    .await;
}

/// The rejection check is only as good as its patterns: these are the lines istiod 1.26
/// logged for invalid resources from a config source (tests/e2e/ISTIOD_NOTES.md).
#[test]
fn the_rejection_check_catches_what_istiod_logs_for_invalid_resources() {
    let log = "2026-11-25T18:02:38.781Z\tinfo\tadsc\tReceived\ttype=networking.istio.io/v1/ServiceEntry count=2 nonce=n1
2026-11-25T18:02:38.781Z\twarn\tadsc\tInvalid data: invalid name badname-no-slash (
2026-11-25T18:02:38.782Z\twarn\tadsc\tError adding a new resource to the store invalid host *
2026-11-25T18:02:38.790Z\tinfo\tadsc\tconnection closed with err: rpc error: code = Unavailable desc = error reading from server: EOF
2026-11-25T18:02:38.790Z\tinfo\tAll controller caches have been synced up in 16.462374ms
";
    let found = istiod::rejections(log);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found[0].contains("Invalid data") && found[1].contains("invalid host *"));
}

// ---- the golden case and exactly-what-we-serve --------------------------------------------------

async fn istiod_takes_exactly_what_we_serve(bin: IstiodBin) {
    let dir = tempfile::tempdir().unwrap();
    let registry = write_registry(dir.path(), &std::fs::read_to_string(EXAMPLE).unwrap());
    let server = serve_file(dir.path(), &registry).await;
    let istiod = start_istiod(&bin, dir.path(), &server).await;
    assert_istiod_acked_our_entries(&server, &bin).await;

    let served = server.service_entries().await;
    assert_eq!(served.len(), 5, "examples/registry.yaml has five services");
    let configz = wait_until_istiod_has("examples/registry.yaml", &istiod, &server, |s| s.len() == 5).await;
    assert_configz_is(&configz, &served);
    let kinds: BTreeSet<String> = istiod
        .try_configz_all()
        .await
        .unwrap()
        .iter()
        .map(|c| c["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["ServiceEntry".to_owned()]),
        "istiod holds nothing but our ServiceEntries"
    );
    assert_golden_in_configz(&configz, &bin, "2024-05-01T12:00:00Z");

    assert_eq!(istiod.registryz_hostnames().await, hosts_of(&served), "registryz");
    let registryz = istiod.registryz().await;
    let service = registryz.iter().find(|s| s["hostname"] == GOLDEN_HOST).unwrap();
    assert_eq!(service["Attributes"]["ServiceRegistry"], "External", "{service}");
    assert_eq!(service["Attributes"]["Namespace"], "istio-system", "{service}");
    assert_eq!(service["MeshExternal"], true, "{service}");
    assert_eq!(service["defaultAddress"], "52.192.72.89", "{service}");
    assert_eq!(
        service["ports"],
        json!([{"name": "http", "port": 80, "protocol": "HTTP"}, {"name": "https", "port": 443, "protocol": "HTTPS"}]),
        "{service}"
    );

    let clusters: BTreeSet<String> = istiod.sidecar_clusters().await.unwrap().into_iter().collect();
    for want in [format!("outbound|80||{GOLDEN_HOST}"), format!("outbound|443||{GOLDEN_HOST}")] {
        assert!(clusters.contains(&want), "{want} not among the sidecar's clusters: {clusters:#?}");
    }
    let missing: Vec<_> = outbound_clusters(&served).difference(&clusters).cloned().collect();
    assert!(missing.is_empty(), "clusters missing for the sidecar: {missing:?}\nall: {clusters:#?}");
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
}

#[tokio::test]
async fn istiod_takes_exactly_the_service_entries_we_serve() {
    istiod_takes_exactly_what_we_serve(IstiodBin::current()).await;
}

#[tokio::test]
async fn old_istiod_takes_exactly_the_service_entries_we_serve() {
    istiod_takes_exactly_what_we_serve(IstiodBin::old()).await;
}

// ---- istiod syncs only once we answered ---------------------------------------------------------

/// Our server withholds the ServiceEntry type until its first complete Cloud Map sync;
/// istiod must stay unsynced (gRPC port closed) until then, and sync once moto answers.
async fn istiod_syncs_only_once_our_first_cloud_map_sync_completed(bin: IstiodBin) {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start().await;
    let svc = moto.seeder().await.seed_tutorial().await;
    moto.pause();
    let server = serve_cloudmap(dir.path(), &moto, &[]).await;
    let mut istiod = Istiod::spawn(&bin, dir.path(), &[server.grpc]);

    istiod.wait_log(WAITING_LINE, ISTIOD_SYNC_DEADLINE).await;
    assert!(!istiod.grpc_port_open().await, "istiod opened its gRPC port before our first sync");
    assert!(!server.status().await.synced, "our server synced against a paused moto?");
    assert_eq!(
        istiod.configz().await,
        Vec::<Value>::new(),
        "istiod stored ServiceEntries before we sent any"
    );
    let clients = server.clients().await;
    assert_eq!(clients.len(), 1, "istiod is connected to us while it waits: {clients:?}");
    let se = clients[0]
        .types
        .iter()
        .find(|t| t.type_url == bin.se_type_url)
        .expect("istiod asked for ServiceEntries");
    assert_eq!(se.responses_sent, 0, "we answered ServiceEntries before syncing");
    let answered = clients[0].types.iter().filter(|t| t.responses_sent > 0).count();
    assert_eq!(answered, clients[0].types.len() - 1, "every other type is answered: {clients:?}");

    let resumed = Instant::now();
    moto.resume();
    istiod.wait_synced(ISTIOD_SYNC_DEADLINE).await;
    eprintln!("{bin}: synced {:?} after moto answered", resumed.elapsed());
    assert!(server.status().await.synced);
    let served = server.service_entries().await;
    assert_eq!(served.len(), 1);
    let configz = istiod.configz().await;
    assert_configz_is(&configz, &served);
    let created = humantime::format_rfc3339_nanos(svc.created).to_string();
    assert_golden_in_configz(&configz, &bin, &created);
    assert_eq!(istiod.registryz_hostnames().await, [GOLDEN_HOST]);
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
}

#[tokio::test]
async fn istiod_syncs_only_once_our_first_cloud_map_sync_is_complete() {
    istiod_syncs_only_once_our_first_cloud_map_sync_completed(IstiodBin::current()).await;
}

#[tokio::test]
async fn old_istiod_syncs_only_once_our_first_cloud_map_sync_is_complete() {
    istiod_syncs_only_once_our_first_cloud_map_sync_completed(IstiodBin::old()).await;
}

// ---- changes and deletions flow through ---------------------------------------------------------

#[tokio::test]
async fn registry_file_edits_and_removals_reach_istiod() {
    let bin = IstiodBin::current();
    let dir = tempfile::tempdir().unwrap();
    let orders = "  - name: orders\n    instances:\n    - attributes: {AWS_INSTANCE_IPV4: 10.0.0.1, AWS_INSTANCE_PORT: 8080}\n";
    let registry = write_registry(dir.path(), &format!("{GOLDEN}{orders}"));
    let server = serve_file(dir.path(), &registry).await;
    let istiod = start_istiod(&bin, dir.path(), &server).await;
    let configz = wait_until_istiod_has("golden + orders", &istiod, &server, |s| s.len() == 2).await;
    assert_golden_in_configz(&configz, &bin, "2024-05-01T12:00:00Z");

    // One edit: the golden instance moves, `orders` is removed, `inventory` (new namespace) appears.
    let moved = GOLDEN.replace("52.192.72.89", "52.192.72.90");
    let inventory = "- name: warehouse\n  services:\n  - name: inventory\n    created: 2025-01-02T03:04:05Z\n    \
                     instances:\n    - attributes: {AWS_INSTANCE_IPV6: '2600:1f18::7', AWS_INSTANCE_PORT: 9090}\n";
    edit(&registry, &format!("{moved}{inventory}"));
    let configz = wait_until_istiod_has("the moved, removed and added services", &istiod, &server, |s| {
        s.iter().any(|e| e.name.ends_with("inventory.warehouse")) && s.len() == 2
    })
    .await;
    let golden = configz.iter().find(|c| configz_name(c) == GOLDEN_NAME).unwrap();
    assert_eq!(golden["spec"]["endpoints"][0]["address"], "52.192.72.90");
    assert!(!configz.iter().any(|c| configz_name(c).contains("orders")), "orders is still in istiod");
    assert_eq!(istiod.registryz_hostnames().await, [GOLDEN_HOST, "inventory.warehouse"]);

    // Everything removed: istiod deletes what an (empty) full response leaves out.
    edit(&registry, "namespaces: []\n");
    let configz = wait_until_istiod_has("nothing", &istiod, &server, <[_]>::is_empty).await;
    assert!(configz.is_empty());
    assert_eq!(istiod.registryz_hostnames().await, Vec::<String>::new());

    // And back.
    edit(&registry, GOLDEN);
    let configz = wait_until_istiod_has("the golden service again", &istiod, &server, |s| s.len() == 1).await;
    assert_golden_in_configz(&configz, &bin, "2024-05-01T12:00:00Z");
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
}

#[tokio::test]
async fn cloud_map_registrations_and_removals_reach_istiod() {
    let bin = IstiodBin::current();
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let golden = seeder.seed_tutorial().await;
    let shop = seeder.create_http_namespace("shop").await;
    let mut shop_services = Vec::new();
    for (n, name) in ["cart", "pay"].into_iter().enumerate() {
        let svc = seeder.create_service(&shop, name, false).await;
        seeder.register(&svc.id, "i-1", &[("AWS_INSTANCE_IPV4", &format!("10.0.1.{}", n + 1))]).await;
        shop_services.push(svc);
    }
    let server = serve_cloudmap(dir.path(), &moto, &["--list-interval", "1s"]).await;
    let istiod = start_istiod(&bin, dir.path(), &server).await;
    let configz = wait_until_istiod_has("the seeded services", &istiod, &server, |s| s.len() == 3).await;
    let created = humantime::format_rfc3339_nanos(golden.created).to_string();
    assert_golden_in_configz(&configz, &bin, &created);

    let endpoints_of = |configz: &[Value], name: &str| -> Vec<String> {
        let entry = configz.iter().find(|c| configz_name(c) == name).unwrap();
        entry["spec"]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["address"].as_str().unwrap().to_owned())
            .collect()
    };

    // Register a second instance.
    seeder.register(&golden.id, "i-2", &[("AWS_INSTANCE_IPV4", "52.192.72.91")]).await;
    let configz = wait_until_istiod_has("the registered instance", &istiod, &server, |s| {
        s.iter().any(|e| e.name == GOLDEN_NAME && e.spec.as_ref().unwrap().endpoints.len() == 2)
    })
    .await;
    assert_eq!(endpoints_of(&configz, GOLDEN_NAME), ["52.192.72.89", "52.192.72.91"]);

    // A new service.
    let web = seeder.create_service(&shop, "web", false).await;
    seeder
        .register(&web.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.1.9"), ("AWS_INSTANCE_PORT", "8443")])
        .await;
    let configz = wait_until_istiod_has("the new service", &istiod, &server, |s| s.len() == 4).await;
    assert_eq!(endpoints_of(&configz, "istio-system/cloudmap-web.shop"), ["10.0.1.9"]);

    // Deregister the first instance; remove a whole service.
    seeder.deregister(&golden.id, "i-1").await;
    let pay = &shop_services[1];
    seeder.deregister(&pay.id, "i-1").await;
    seeder.client().delete_service().id(&pay.id).send().await.unwrap();
    let configz =
        wait_until_istiod_has("the deregistration and the removed service", &istiod, &server, |s| {
            s.len() == 3
                && s.iter().any(|e| e.name == GOLDEN_NAME && e.spec.as_ref().unwrap().endpoints.len() == 1)
        })
        .await;
    assert_eq!(endpoints_of(&configz, GOLDEN_NAME), ["52.192.72.91"]);
    assert!(
        !configz.iter().any(|c| configz_name(c).contains("pay.shop")),
        "the removed service is still in istiod"
    );
    assert_eq!(istiod.registryz_hostnames().await, ["cart.shop", GOLDEN_HOST, "web.shop"]);
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
}

// ---- a restart of our server ---------------------------------------------------------------------

#[tokio::test]
async fn restarting_our_server_never_makes_istiod_drop_a_service_entry() {
    let bin = IstiodBin::current();
    let dir = tempfile::tempdir().unwrap();
    let registry = write_registry(dir.path(), &std::fs::read_to_string(EXAMPLE).unwrap());
    let mut server = serve_file(dir.path(), &registry).await;
    let istiod = Arc::new(start_istiod(&bin, dir.path(), &server).await);
    let before = wait_until_istiod_has("examples/registry.yaml", &istiod, &server, |s| s.len() == 5).await;
    restart_our_server_without_loss(&istiod, &mut server, &before).await;

    // The new stream is live: an edit flows through.
    edit(&registry, GOLDEN);
    wait_until_istiod_has("the edit after the restart", &istiod, &server, |s| s.len() == 1).await;
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
}

// ---- awkward registrations ----------------------------------------------------------------------

/// A registry file full of what Cloud Map allows and istiod might not.
fn awkward_registry() -> String {
    let mut y = String::from("namespaces:\n");
    let long_label = "l".repeat(60);
    let long_namespace = format!("{long_label}.{long_label}.{long_label}.{long_label}"); // 243 characters
    let instance = |y: &mut String, id: &str, attrs: &[(&str, &str)]| {
        writeln!(y, "    - id: {id:?}\n      attributes:").unwrap();
        for (k, v) in attrs {
            writeln!(y, "        {k:?}: {v:?}").unwrap();
        }
    };
    let ns = |y: &mut String, name: &str| writeln!(y, "- name: {name:?}\n  services:").unwrap();
    let svc = |y: &mut String, name: &str| writeln!(y, "  - name: {name:?}\n    instances:").unwrap();

    ns(&mut y, "My_Namespace");
    svc(&mut y, "Upper_Case_Svc");
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]);
    svc(&mut y, "UPPER");
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV4", "10.0.0.2")]);
    svc(&mut y, "upper");
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV4", "10.0.0.3")]);
    svc(&mut y, "-dashes-_and_.dots");
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV4", "10.0.0.4")]);
    svc(&mut y, "___"); // no valid host: skipped by us
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV4", "10.0.0.5")]);
    svc(&mut y, &"x".repeat(64)); // label too long: skipped by us
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV4", "10.0.0.6")]);

    ns(&mut y, "my-namespace");
    svc(&mut y, "upper-case-svc"); // the same host as Upper_Case_Svc.My_Namespace
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV4", "10.0.0.7")]);
    svc(&mut y, "odd-ports");
    for (id, port) in [("p1", "1"), ("p65535", "65535"), ("p0", "0"), ("phttp", "http"), ("p99999", "99999")]
    {
        instance(&mut y, id, &[("AWS_INSTANCE_IPV4", "10.0.1.1"), ("AWS_INSTANCE_PORT", port)]);
    }
    instance(&mut y, "pspaces", &[("AWS_INSTANCE_IPV4", " 10.0.1.2 "), ("AWS_INSTANCE_PORT", " 8080 ")]);
    instance(&mut y, "pneg", &[("AWS_INSTANCE_IPV4", "10.0.1.3"), ("AWS_INSTANCE_PORT", "-1")]);
    svc(&mut y, "only-bad-ports");
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV4", "10.0.1.4"), ("AWS_INSTANCE_PORT", "0")]);
    svc(&mut y, "ipv6");
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV6", "2600:1F18:0aaa:bbb::10"), ("AWS_INSTANCE_PORT", "443")]);
    instance(&mut y, "b", &[("AWS_INSTANCE_IPV6", "::ffff:10.0.2.1"), ("AWS_INSTANCE_PORT", "443")]);
    instance(&mut y, "c", &[("AWS_INSTANCE_IPV6", "fe80::1%eth0")]);
    instance(&mut y, "d", &[("AWS_INSTANCE_IPV6", "2001:db8::/64")]);
    instance(&mut y, "e", &[("AWS_INSTANCE_IPV6", "::1"), ("AWS_INSTANCE_PORT", "443")]);
    svc(&mut y, "dual-stack");
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV6", "2600:1f18::20")]);
    instance(&mut y, "b", &[("AWS_INSTANCE_IPV4", "10.0.2.2")]);
    instance(&mut y, "c", &[("AWS_INSTANCE_IPV4", "999.1.1.1"), ("AWS_INSTANCE_IPV6", "2600:1f18::21")]);
    svc(&mut y, "cname");
    instance(&mut y, "a", &[("AWS_INSTANCE_CNAME", "Lb.Example.COM."), ("AWS_INSTANCE_PORT", "8443")]);
    instance(
        &mut y,
        "b",
        &[("AWS_ALIAS_DNS_NAME", "d111111abcdef8.cloudfront.net"), ("AWS_INSTANCE_PORT", "443")],
    );
    instance(&mut y, "c", &[("AWS_INSTANCE_CNAME", "_srv.example.com")]);
    instance(&mut y, "d", &[("AWS_INSTANCE_CNAME", "localhost")]);
    svc(&mut y, "ip-and-cname");
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV4", "10.0.3.1")]);
    instance(&mut y, "b", &[("AWS_INSTANCE_CNAME", "db.example.com")]);
    instance(&mut y, "c", &[("AWS_INSTANCE_IPV4", ""), ("AWS_INSTANCE_CNAME", "db2.example.com")]);
    svc(&mut y, "duplicates");
    for id in ["a", "a", "b", "c"] {
        instance(&mut y, id, &[("AWS_INSTANCE_IPV4", "10.0.4.1"), ("AWS_INSTANCE_PORT", "8080")]);
    }
    instance(&mut y, "d", &[("AWS_INSTANCE_IPV4", "10.0.4.1"), ("AWS_INSTANCE_PORT", "8081")]);
    instance(&mut y, "e", &[("AWS_INSTANCE_IPV4", "10.0.4.1")]);
    svc(&mut y, "garbage");
    instance(
        &mut y,
        "a",
        &[
            ("AWS_INSTANCE_IPV4", "10.0.5.1"),
            ("bad key!", "x"),
            ("good", "bad value with spaces"),
            ("empty", ""),
            ("example.com/team", "payments"),
            ("Example.COM/team", "upper-prefix"),
            ("version", &"v".repeat(64)),
            ("naïve", "ünïcode"),
            ("-dash", "x"),
            ("REGION", "us east 1"),
            ("AVAILABILITY_ZONE", "us-east-1a"),
            ("AWS_INIT_HEALTH_STATUS", "UNHEALTHY"),
            ("ECS_TASK_DEFINITION_FAMILY", "orders"),
        ],
    );
    instance(&mut y, "b", &[("AWS_INSTANCE_IPV4", "010.000.000.001")]);
    instance(
        &mut y,
        "c",
        &[("AWS_INSTANCE_IPV4", "10.0.5.3"), ("REGION", "us-west-2"), ("AVAILABILITY_ZONE", "")],
    );
    instance(&mut y, "d", &[("REGION", "us-east-1")]);
    writeln!(y, "  - name: no-instances\n    instances: []").unwrap();
    svc(&mut y, "only-unusable");
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV4", "not-an-ip")]);
    instance(&mut y, "b", &[("AWS_INSTANCE_CNAME", "")]);

    ns(&mut y, "big.corp");
    svc(&mut y, "thousand");
    for n in 0..1000 {
        let ip = format!("10.{}.{}.{}", 100 + n / 62_500, (n / 250) % 250, n % 250 + 1);
        instance(&mut y, &format!("i-{n}"), &[("AWS_INSTANCE_IPV4", &ip), ("AWS_INSTANCE_PORT", "8080")]);
    }

    ns(&mut y, &long_namespace);
    svc(&mut y, "s"); // host of 245 characters: valid; its ServiceEntry name is longer
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV4", "10.0.6.1")]);
    ns(&mut y, "Example.ORG");
    svc(&mut y, "api.v2");
    instance(&mut y, "a", &[("AWS_INSTANCE_IPV4", "10.0.7.1")]);
    y
}

async fn awkward_registrations_are_all_accepted(bin: IstiodBin) {
    let dir = tempfile::tempdir().unwrap();
    let registry = write_registry(dir.path(), &awkward_registry());
    let server = serve_file(dir.path(), &registry).await;
    let istiod = start_istiod(&bin, dir.path(), &server).await;
    // 20 services; we skip `___` and the 64-character name (no valid host): 18 ServiceEntries.
    let configz = wait_until_istiod_has("the awkward corpus", &istiod, &server, |s| s.len() == 18).await;
    let served = server.service_entries().await;
    assert_eq!(configz.len(), served.len(), "istiod stores as many ServiceEntries as we serve");
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
    let names: Vec<&str> = served.iter().map(|e| e.name.as_str()).collect();
    eprintln!("{bin}: awkward corpus: {} ServiceEntries served and stored: {names:#?}", served.len());
    let thousand =
        served.iter().find(|e| e.name.contains("thousand.big.corp")).expect("the 1,000-instance service");
    assert_eq!(thousand.spec.as_ref().unwrap().endpoints.len(), 1000);

    assert_eq!(istiod.registryz_hostnames().await, hosts_of(&served), "registryz");
    let clusters: BTreeSet<String> = istiod.sidecar_clusters().await.unwrap().into_iter().collect();
    let missing: Vec<_> = outbound_clusters(&served).difference(&clusters).cloned().collect();
    assert!(missing.is_empty(), "clusters missing for the sidecar: {missing:?}");
}

#[tokio::test]
async fn awkward_registrations_yield_only_service_entries_istiod_accepts() {
    awkward_registrations_are_all_accepted(IstiodBin::current()).await;
}

#[tokio::test]
async fn old_istiod_accepts_every_awkward_registration_too() {
    awkward_registrations_are_all_accepted(IstiodBin::old()).await;
}

/// Seeds moto with awkward registrations through the real Cloud Map API.
async fn seed_awkward(seeder: &Seeder) {
    let ns = seeder.create_http_namespace("Corp_NS").await;
    let upper = seeder.create_service(&ns, "Upper_Svc", false).await;
    seeder.register(&upper.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]).await;
    let lower = seeder.create_service(&ns, "upper-svc", false).await;
    seeder.register(&lower.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.0.2")]).await;
    let ports = seeder.create_service(&ns, "odd_ports", false).await;
    for (id, port) in [("p1", "1"), ("p65535", "65535"), ("p0", "0"), ("phttp", "http"), ("p99999", "99999")]
    {
        seeder
            .register(&ports.id, id, &[("AWS_INSTANCE_IPV4", "10.0.1.1"), ("AWS_INSTANCE_PORT", port)])
            .await;
    }
    let v6 = seeder.create_service(&ns, "v6", false).await;
    seeder.register(&v6.id, "a", &[("AWS_INSTANCE_IPV6", "2600:1f18:aaa:bbb::10")]).await;
    seeder.register(&v6.id, "b", &[("AWS_INSTANCE_IPV6", "2600:1f18:aaa:bbb::10/64")]).await;
    let cname = seeder.create_service(&ns, "cname", false).await;
    seeder
        .register(&cname.id, "a", &[("AWS_INSTANCE_CNAME", "LB.example.com."), ("AWS_INSTANCE_PORT", "8443")])
        .await;
    let dupes = seeder.create_service(&ns, "dupes", false).await;
    // moto appends a duplicate on re-registration; the same address under two ids too.
    for id in ["a", "a", "b"] {
        seeder.register(&dupes.id, id, &[("AWS_INSTANCE_IPV4", "10.0.4.1")]).await;
    }
    let garbage = seeder.create_service(&ns, "garbage", false).await;
    seeder
        .register(
            &garbage.id,
            "a",
            &[
                ("AWS_INSTANCE_IPV4", "10.0.5.1"),
                ("bad key!", "x"),
                ("good", "bad value"),
                ("empty", ""),
                ("REGION", "us east 1"),
            ],
        )
        .await;
    seeder.register(&garbage.id, "b", &[("AWS_INSTANCE_IPV4", "999.1.1.1")]).await;
    seeder.create_service(&ns, "empty", false).await;
    let big = seeder.create_service(&ns, "thousand", false).await;
    seeder.register_many(&big.id, 1000, |n| format!("10.2.{}.{}", n / 250, n % 250 + 1)).await;
}

#[tokio::test]
async fn awkward_cloud_map_registrations_yield_only_service_entries_istiod_accepts() {
    let bin = IstiodBin::current();
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start().await;
    let seeding = Instant::now();
    seed_awkward(&moto.seeder().await).await;
    eprintln!("seeded moto in {:?}", seeding.elapsed());
    let server = serve_cloudmap(dir.path(), &moto, &[]).await;
    let istiod = start_istiod(&bin, dir.path(), &server).await;
    let configz =
        wait_until_istiod_has("the awkward Cloud Map corpus", &istiod, &server, |s| s.len() == 9).await;
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
    let served = server.service_entries().await;
    assert_eq!(configz.len(), served.len());
    let thousand =
        served.iter().find(|e| e.name.contains("thousand.corp-ns")).expect("the 1,000-instance service");
    assert_eq!(thousand.spec.as_ref().unwrap().endpoints.len(), 1000);
    assert_eq!(istiod.registryz_hostnames().await, hosts_of(&served), "registryz");
    let clusters: BTreeSet<String> = istiod.sidecar_clusters().await.unwrap().into_iter().collect();
    let missing: Vec<_> = outbound_clusters(&served).difference(&clusters).cloned().collect();
    assert!(missing.is_empty(), "clusters missing for the sidecar: {missing:?}");
}

// ---- keepalive ---------------------------------------------------------------------------------------

/// istiod's own client keepalive (`pkg/keepalive`, env `GRPC_KEEPALIVE_INTERVAL`, default 30 s, 10 s
/// timeout) against our server, through a relay that reads the HTTP/2 frames we send back. grpc-go
/// raises any interval below 10 s to 10 s, so 10 s is the shortest istiod can be made to ping: two
/// pings take about 20 s. Every ping is answered, no GOAWAY (`too_many_pings`) is sent, and the
/// stream still carries changes afterwards.
#[tokio::test]
async fn istiods_own_keepalive_pings_are_answered_without_goaway() {
    let bin = IstiodBin::current();
    let dir = tempfile::tempdir().unwrap();
    let registry = write_registry(dir.path(), GOLDEN);
    let server = serve_file(dir.path(), &registry).await;
    let relay = support::h2_relay::H2Relay::start(server.grpc).await;
    let envs = [("GRPC_KEEPALIVE_INTERVAL", "10s"), ("GRPC_KEEPALIVE_TIMEOUT", "10s")];
    let mut istiod = Istiod::spawn_with_env(&bin, dir.path(), &[relay.addr], &envs);
    istiod.wait_synced(ISTIOD_SYNC_DEADLINE).await;
    let started = Instant::now();
    eventually("two of istiod's keepalive pings answered", Duration::from_secs(60), || async {
        (relay.ping_acks() >= 2).then_some(())
    })
    .await;
    eprintln!("{bin}: {} pings answered in {:?}", relay.ping_acks(), started.elapsed());
    assert_eq!(relay.goaways(), Vec::<(u32, String)>::new(), "we sent GOAWAY to istiod");
    assert_eq!(relay.server_closed(), 0, "we closed istiod's connection");
    edit(
        &registry,
        &format!(
            "{GOLDEN}  - name: orders\n    instances:\n    - attributes: {{AWS_INSTANCE_IPV4: 10.0.0.1}}\n"
        ),
    );
    wait_until_istiod_has("the edit after the pings", &istiod, &server, |s| s.len() == 2).await;
    assert_eq!(relay.goaways(), Vec::<(u32, String)>::new());
}
