//! `cloudmap-xds render` and `export` reading Cloud Map (a real moto_server), as a user runs
//! them: the binary, credentials from its environment only. `render` prints what `serve`
//! publishes, `export` writes a registry file that renders to exactly the same, and a read that
//! cannot finish fails within `--read-timeout` with one line naming the last error.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use cloudmap_xds::test_helpers::server::serve_args;
use cloudmap_xds::test_helpers::{AdsClient, SERVICE_ENTRY_V1, TestServer, service_entries};
use serde::Deserialize as _;
use support::fault_proxy::{Fault, FaultProxy};
use support::moto::{self, Moto, Seeder};

const BIN: &str = env!("CARGO_BIN_EXE_cloudmap-xds");

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs the binary with an empty environment plus the test credentials: nothing of the
/// machine's AWS setup leaks in, and no credential source reaches beyond loopback.
async fn cli(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let home = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let out = Command::new(BIN)
            .args(&args)
            .env_clear()
            .env("HOME", home.path())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ACCESS_KEY_ID", moto::ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", moto::SECRET_ACCESS_KEY)
            .output()
            .unwrap();
        Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
        }
    })
    .await
    .unwrap()
}

/// `args` followed by the flags that point at `endpoint`.
fn aws<'a>(args: &[&'a str], endpoint: &'a str) -> Vec<&'a str> {
    let mut all = args.to_vec();
    all.extend(["--aws-region", moto::REGION, "--aws-endpoint-url", endpoint]);
    all
}

fn ok(out: &Output) -> &str {
    assert_eq!(out.code, Some(0), "stderr:\n{}", out.stderr);
    &out.stdout
}

/// Multi-document YAML → `namespace/name` → spec (as JSON).
fn rendered_specs(yaml: &str) -> BTreeMap<String, serde_json::Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| {
            let object = serde_json::Value::deserialize(doc).unwrap();
            let meta = &object["metadata"];
            let name = format!("{}/{}", meta["namespace"].as_str().unwrap(), meta["name"].as_str().unwrap());
            (name, object["spec"].clone())
        })
        .collect()
}

/// Namespace `shop`: an ECS bridge-mode `web` declaring one HTTP port, an `api` on 8080 declared
/// HTTP and mesh-internal, a `db` with no attributes, an unhealthy `web` task; namespace `blog`.
async fn seed(seeder: &Seeder) {
    let shop = seeder.create_http_namespace("shop").await;
    let web = seeder.create_service(&shop, "web", true).await;
    seeder.register_bridge_mode_tasks(&web.id).await;
    seeder.set_health(&web.id, "task-2", false).await;
    seeder.update_service_attributes(&web.id, &[("cloudmap-xds/ports", "http=80/HTTP")]).await;
    let api = seeder.create_service(&shop, "api", false).await;
    seeder
        .register(
            &api.id,
            "i-1",
            &[("AWS_INSTANCE_IPV4", "10.1.0.1"), ("AWS_INSTANCE_PORT", "8080"), ("team", "pay")],
        )
        .await;
    seeder
        .update_service_attributes(
            &api.id,
            &[("cloudmap-xds/ports", "8080/HTTP"), ("cloudmap-xds/location", "MESH_INTERNAL")],
        )
        .await;
    let db = seeder.create_service(&shop, "db", false).await;
    seeder.register(&db.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.2.0.1"), ("AWS_INSTANCE_PORT", "5432")]).await;
    let blog = seeder.create_http_namespace("blog").await;
    let post = seeder.create_service(&blog, "post", false).await;
    seeder.register(&post.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.3.0.1")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_from_cloud_map_prints_what_serve_publishes() {
    let moto = Moto::start().await;
    seed(&moto.seeder().await).await;
    let endpoint = moto.endpoint();
    let filters = ["--include-namespaces", "shop", "--publish-namespace", "istio-system"];

    let mut render = vec!["render"];
    render.extend(filters);
    let out = cli(&aws(&render, &endpoint)).await;
    let rendered = rendered_specs(ok(&out));

    let mut serve = filters.to_vec();
    serve.extend(["--aws-region", moto::REGION, "--aws-endpoint-url", &endpoint]);
    let mut args = serve_args(&serve);
    args.cloudmap = args.cloudmap.with_static_credentials(moto::ACCESS_KEY_ID, moto::SECRET_ACCESS_KEY);
    let server = TestServer::start(args).await.unwrap();
    let mut client = AdsClient::connect(server.grpc_addr).await.unwrap();
    client.send_initial(&[SERVICE_ENTRY_V1]).await;
    let served: BTreeMap<String, serde_json::Value> =
        service_entries(&client.recv_type(SERVICE_ENTRY_V1).await)
            .iter()
            .map(|(meta, spec)| (meta.name.clone(), cloudmap_xds::render::spec_json(spec)))
            .collect();

    assert_eq!(rendered, served);
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        ["istio-system/cloudmap-api.shop", "istio-system/cloudmap-db.shop", "istio-system/cloudmap-web.shop"],
        "--include-namespaces shop leaves blog out"
    );
    let web = &rendered["istio-system/cloudmap-web.shop"];
    assert_eq!(web["ports"], serde_json::json!([{"name": "http", "number": 80, "protocol": "HTTP"}]));
    assert_eq!(web["endpoints"].as_array().unwrap().len(), 2, "the unhealthy task is left out");
    assert_eq!(rendered["istio-system/cloudmap-api.shop"]["location"], "MESH_INTERNAL");
    assert!(out.stderr.lines().all(|l| !l.contains("WARN")), "{}", out.stderr);
}

#[tokio::test]
async fn render_explain_says_where_a_cloud_map_service_s_settings_come_from() {
    let moto = Moto::start().await;
    seed(&moto.seeder().await).await;
    let out = cli(&aws(&["render", "--explain", "shop/web"], &moto.endpoint())).await;
    let explained: serde_json::Value = serde_norway::from_str(ok(&out)).unwrap();
    assert_eq!(explained["cloudMapService"], "shop/web");
    assert_eq!(explained["ports"]["from"], "service attribute cloudmap-xds/ports");
    let endpoints = explained["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 2);
    assert_eq!(endpoints[0]["ports"]["http"], 32768);
    let skipped = explained["skippedInstances"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{explained}");
    assert_eq!(skipped[0]["instance"], "task-2");
    assert!(skipped[0]["reason"].as_str().unwrap().contains("health filter"), "{explained}");
    assert_eq!(explained["location"]["from"], "default");
}

#[tokio::test]
async fn an_export_renders_to_exactly_what_cloud_map_renders() {
    let moto = Moto::start().await;
    seed(&moto.seeder().await).await;
    let endpoint = moto.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registry.yaml");
    let file = file.to_str().unwrap();

    let export = cli(&aws(&["export", "-o", file], &endpoint)).await;
    ok(&export);
    assert!(export.stderr.contains(&format!("wrote 4 services to {file}")), "{}", export.stderr);
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains("cloudmap-xds/ports: http=80/HTTP"), "service attributes are exported:\n{text}");

    let from_aws = cli(&aws(&["render"], &endpoint)).await;
    moto.reset().await;
    let from_file = cli(&["render", "--registry-file", file]).await;
    assert_eq!(ok(&from_file), ok(&from_aws));
    assert_eq!(rendered_specs(ok(&from_file)).len(), 4);
}

#[tokio::test]
async fn render_warns_once_when_the_attributes_are_not_allowed() {
    let moto = Moto::start().await;
    seed(&moto.seeder().await).await;
    let proxy = FaultProxy::start(moto.addr()).await;
    proxy.fail("GetServiceAttributes", None, Fault::Denied);
    let out = cli(&aws(&["render", "--include-namespaces", "shop"], &proxy.endpoint())).await;
    let rendered = rendered_specs(ok(&out));
    // The defaults: one port per host port of the two healthy tasks.
    let ports = &rendered["istio-system/cloudmap-web.shop"]["ports"];
    assert_eq!(ports.as_array().unwrap().len(), 2, "{ports}");
    let warnings: Vec<&str> =
        out.stderr.lines().filter(|l| l.contains("servicediscovery:GetServiceAttributes")).collect();
    assert_eq!(warnings.len(), 1, "{}", out.stderr);
    assert!(warnings[0].contains("WARN") && warnings[0].contains("optional"), "{}", warnings[0]);
    assert_eq!(proxy.calls()["GetServiceAttributes"], 1, "one denied call, then none");
}

/// The last line of standard error: the error, on one line, naming the last AWS error.
fn read_error(out: &Output, timeout: Duration) -> String {
    assert_eq!(out.code, Some(1), "stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(out.took >= timeout, "gave up after {:?}, before --read-timeout {timeout:?}", out.took);
    // The credential check and the process start fit well within this.
    assert!(out.took < timeout + Duration::from_secs(10), "took {:?}", out.took);
    out.stderr.lines().last().unwrap().to_owned()
}

#[tokio::test]
async fn a_read_that_cannot_finish_fails_within_the_read_timeout_naming_the_last_error() {
    let mut moto = Moto::start().await;
    let endpoint = moto.endpoint();
    moto.kill();
    let timeout = Duration::from_secs(3);
    let flags = ["--read-timeout", "3s", "--aws-request-timeout", "500ms"];
    for command in ["render", "export"] {
        let mut args = vec![command];
        args.extend(flags);
        let out = cli(&aws(&args, &endpoint)).await;
        let line = read_error(&out, timeout);
        let want = "error: reading Cloud Map: Cloud Map was not read completely within 3s (instances of 0 of 0 services read); \
                    last error: ListNamespaces: ";
        assert!(line.starts_with(want), "{command}: {line}");
        assert!(line.contains("Connection refused"), "{command}: the connection error is named: {line}");
        assert!(!line.contains("DispatchFailure {"), "{command}: no debug dump: {line}");
    }
}

#[tokio::test]
async fn a_stuck_attribute_read_is_named_when_the_read_times_out() {
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;
    let shop = seeder.create_http_namespace("shop").await;
    let web = seeder.create_service(&shop, "web", false).await;
    seeder.register(&web.id, "i-1", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]).await;
    let proxy = FaultProxy::start(moto.addr()).await;
    proxy.fail("GetServiceAttributes", None, Fault::Error);
    let out = cli(&aws(&["render", "--read-timeout", "3s"], &proxy.endpoint())).await;
    let line = read_error(&out, Duration::from_secs(3));
    assert!(line.contains("last error: shop/web: GetServiceAttributes: InvalidInput"), "{line}");
}
