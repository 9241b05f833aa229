//! What the per-service settings do to a sidecar, proven with a real istiod 1.26
//! (`pilot-discovery`, kube-less, our binary as its config source): the listeners,
//! routes, endpoints and DNS name table istiod sends a sidecar over ADS
//! (`support::xds`), and istiod's own `/debug/configz` and `/debug/registryz`.
//! The registry file carries the Cloud Map service attributes (`cloudmap-xds/...`),
//! exactly as `GetServiceAttributes` would return them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod support;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cloudmap_xds::proto::cloudmap_xds::debug::v1::ServiceEntryResource;
use cloudmap_xds::proto::envoy::service::discovery::v3::DiscoveryResponse;
use cloudmap_xds::test_helpers::eventually;
use serde_json::{Value, json};
use support::istiod::{ISTIOD_SYNC_DEADLINE, Istiod, IstiodBin, ServerProcess, assert_configz_is};
use support::xds::{
    self, Action, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, Listener, Sidecar, SidecarStream,
};
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_cloudmap-xds");
/// How long a change may take from our source to what istiod tells a sidecar.
const CHANGE_DEADLINE: Duration = Duration::from_secs(15);

// ---- fixtures ---------------------------------------------------------------------------------------

/// One Cloud Map service of a registry file.
struct Svc<'a> {
    namespace: &'a str,
    name: &'a str,
    created: &'a str,
    attributes: Vec<(&'a str, String)>,
    /// (instance id, IPv4, AWS_INSTANCE_PORT)
    instances: Vec<(String, String, Option<u16>)>,
}

impl<'a> Svc<'a> {
    fn new(namespace: &'a str, name: &'a str) -> Self {
        Svc {
            namespace,
            name,
            created: "2025-01-01T00:00:00Z",
            attributes: Vec::new(),
            instances: Vec::new(),
        }
    }

    fn created(mut self, created: &'a str) -> Self {
        self.created = created;
        self
    }

    fn attribute(mut self, key: &'a str, value: &str) -> Self {
        self.attributes.push((key, value.to_owned()));
        self
    }

    fn instance(mut self, ip: &str, port: Option<u16>) -> Self {
        let id = format!("task-{}", self.instances.len() + 1);
        self.instances.push((id, ip.to_owned(), port));
        self
    }
}

/// A registry file holding `services` (grouped by namespace, in the order given).
fn registry_text(services: &[Svc<'_>]) -> String {
    let mut y = String::from("namespaces:\n");
    let mut namespaces: Vec<&str> = Vec::new();
    for s in services {
        if !namespaces.contains(&s.namespace) {
            namespaces.push(s.namespace);
        }
    }
    for namespace in namespaces {
        writeln!(y, "- name: {namespace}\n  services:").unwrap();
        for s in services.iter().filter(|s| s.namespace == namespace) {
            writeln!(y, "  - name: {}\n    created: {}", s.name, s.created).unwrap();
            if !s.attributes.is_empty() {
                writeln!(y, "    attributes:").unwrap();
                for (k, v) in &s.attributes {
                    writeln!(y, "      {k}: {v:?}").unwrap();
                }
            }
            writeln!(y, "    instances:{}", if s.instances.is_empty() { " []" } else { "" }).unwrap();
            for (id, ip, port) in &s.instances {
                write!(y, "    - id: {id}\n      attributes: {{AWS_INSTANCE_IPV4: {ip}").unwrap();
                if let Some(port) = port {
                    write!(y, ", AWS_INSTANCE_PORT: \"{port}\"").unwrap();
                }
                writeln!(y, "}}").unwrap();
            }
        }
    }
    y
}

/// Our binary serving a registry file, and a real istiod reading it.
struct Mesh {
    registry: PathBuf,
    server: ServerProcess,
    istiod: Istiod,
    _dir: TempDir,
}

impl Mesh {
    async fn start(bin: &IstiodBin, services: &[Svc<'_>], flags: &[&str]) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("registry.yaml");
        std::fs::write(&registry, registry_text(services)).unwrap();
        let mut args =
            vec!["--registry-file", registry.to_str().unwrap(), "--publish-namespace", "istio-system"];
        args.extend(flags);
        let server = ServerProcess::start(BIN, dir.path().join("cloudmap-xds.log"), &args, &[]).await;
        let started = Instant::now();
        let mut istiod = Istiod::spawn(bin, dir.path(), &[server.grpc]);
        istiod.wait_synced(ISTIOD_SYNC_DEADLINE).await;
        eprintln!("{bin}: synced {:?} after spawn", started.elapsed());
        let mesh = Mesh { registry, server, istiod, _dir: dir };
        mesh.wait_for_istiod(services.len()).await;
        mesh
    }

    /// Replaces the registry file atomically and waits until istiod holds what we then serve.
    async fn edit(&self, services: &[Svc<'_>], served: impl Fn(&[ServiceEntryResource]) -> bool) {
        let tmp = self.registry.with_extension("tmp");
        std::fs::write(&tmp, registry_text(services)).unwrap();
        std::fs::rename(&tmp, &self.registry).unwrap();
        let entries = eventually("our server to serve the edit", CHANGE_DEADLINE, || async {
            let entries = self.server.service_entries().await;
            served(&entries).then_some(entries)
        })
        .await;
        self.wait_for_entries(&entries).await;
    }

    async fn wait_for_istiod(&self, count: usize) {
        let entries = eventually("our server to serve every service", CHANGE_DEADLINE, || async {
            let entries = self.server.service_entries().await;
            (entries.len() == count).then_some(entries)
        })
        .await;
        self.wait_for_entries(&entries).await;
    }

    /// Waits until istiod's store holds exactly `entries` (by content hash), then checks every field.
    async fn wait_for_entries(&self, entries: &[ServiceEntryResource]) {
        let want: BTreeSet<(String, String)> =
            entries.iter().map(|e| (e.name.clone(), e.version.clone())).collect();
        let configz = eventually("istiod to store what we serve", CHANGE_DEADLINE, || async {
            let configz = self.istiod.configz().await;
            let have: BTreeSet<(String, String)> = configz
                .iter()
                .map(|c| {
                    (
                        support::istiod::configz_name(c),
                        c["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            (have == want).then_some(configz)
        })
        .await;
        assert_configz_is(&configz, entries);
        assert_eq!(self.istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
    }

    /// Asks istiod's gRPC port (`check`) until the answer is `Some`: istiod rebuilds its push
    /// context a debounce (100 ms) after a change, so the first answer may predate it.
    async fn sidecar_until<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut(std::net::SocketAddr) -> Fut,
        Fut: Future<Output = Result<Option<T>, String>>,
    {
        let grpc = self.istiod.grpc;
        eventually(what, CHANGE_DEADLINE, || {
            let answer = check(grpc);
            async move { answer.await.unwrap() }
        })
        .await
    }
}

fn sidecar() -> Sidecar {
    Sidecar::new(&IstiodBin::current().istio_version)
}

/// The listeners named `*_PORT`, sorted by name.
fn listeners_on_port(listeners: &[Listener], port: u16) -> Vec<&Listener> {
    let suffix = format!("_{port}");
    let mut on_port: Vec<&Listener> = listeners.iter().filter(|l| l.name.ends_with(&suffix)).collect();
    on_port.sort_by(|a, b| a.name.cmp(&b.name));
    on_port
}

fn names(listeners: &[&Listener]) -> Vec<String> {
    let mut names: Vec<String> = listeners.iter().map(|l| l.name.clone()).collect();
    names.sort();
    names
}

fn summaries(listeners: &[Listener]) -> String {
    listeners.iter().map(Listener::summary).collect::<Vec<_>>().join("\n")
}

fn tcp_proxy(cluster: &str) -> Action {
    Action::TcpProxy(cluster.to_owned())
}

// ---- protocols: HTTP routes versus TCP proxies --------------------------------------------------

fn orders(http_attribute: bool) -> Svc<'static> {
    let mut svc = Svc::new("shop", "orders")
        .instance("10.20.1.17", Some(8080))
        .instance("10.20.2.41", Some(8080))
        .instance("10.20.3.9", Some(8080));
    if http_attribute {
        svc = svc.attribute("cloudmap-xds/ports", "http=8080/HTTP");
    }
    svc
}

/// A gRPC service on 50051 that sets nothing: `--port-protocols 50051=GRPC` makes it gRPC.
fn ledger() -> Svc<'static> {
    Svc::new("shop", "ledger").instance("10.20.5.1", Some(50051)).instance("10.20.5.2", Some(50051))
}

/// The sidecar's RDS route `port` has a virtual host for `host` that routes to its cluster.
async fn http_route_for(mesh: &Mesh, port: u16, host: &str) -> xds::VirtualHost {
    let sidecar = sidecar();
    let cluster = format!("outbound|{port}||{host}");
    mesh.sidecar_until(&format!("RDS {port:?} to route {host}"), |grpc| {
        let sidecar = sidecar.clone();
        let cluster = cluster.clone();
        async move {
            let route = xds::route(grpc, &sidecar, &port.to_string()).await?;
            Ok(route
                .and_then(|r| r.virtual_host_for(host).cloned())
                .filter(|v| v.routes.iter().any(|r| r.route.as_ref().is_some_and(|a| a.cluster == cluster))))
        }
    })
    .await
}

#[tokio::test]
async fn an_http_port_from_attributes_gets_an_http_route_where_tcp_gets_only_a_tcp_proxy() {
    let bin = IstiodBin::current();
    // First as Cloud Map registers it (8080, no attribute): TCP.
    let mesh = Mesh::start(&bin, &[orders(false), ledger()], &["--port-protocols", "50051=GRPC"]).await;
    let host = "orders.shop";
    let sidecar = sidecar();
    let listeners = xds::listeners(mesh.istiod.grpc, &sidecar).await.unwrap();
    eprintln!("TCP 8080, listeners:\n{}", summaries(&listeners));
    let on_8080 = listeners_on_port(&listeners, 8080);
    assert_eq!(names(&on_8080), ["10.20.1.17_8080"], "one TCP listener, on the lowest address");
    assert_eq!(on_8080[0].actions(), [tcp_proxy("outbound|8080||orders.shop")]);
    let route = xds::route(mesh.istiod.grpc, &sidecar, "8080").await.unwrap();
    assert!(
        route.as_ref().and_then(|r| r.virtual_host_for(host)).is_none(),
        "a TCP port got an HTTP route: {route:?}"
    );

    // gRPC through the flag: an HTTP/2 route, on the wildcard listener.
    let vhost = http_route_for(&mesh, 50051, "ledger.shop").await;
    eprintln!("GRPC 50051 (flag): vhost {} domains {:?}", vhost.name, vhost.domains);
    let listeners = xds::listeners(mesh.istiod.grpc, &sidecar).await.unwrap();
    let on_50051 = listeners_on_port(&listeners, 50051);
    assert_eq!(names(&on_50051), ["0.0.0.0_50051"]);
    assert!(on_50051[0].actions().contains(&Action::HttpRoute("50051".into())), "{}", on_50051[0].summary());

    // The owner declares the port HTTP (`cloudmap-xds/ports: http=8080/HTTP`).
    mesh.edit(&[orders(true), ledger()], |s| {
        s.iter()
            .any(|e| e.spec.as_ref().unwrap().ports.iter().any(|p| p.protocol == "HTTP" && p.number == 8080))
    })
    .await;
    let vhost = http_route_for(&mesh, 8080, host).await;
    eprintln!("HTTP 8080 (attribute): vhost {} domains {:?}", vhost.name, vhost.domains);
    assert_eq!(vhost.name, "orders.shop:8080");
    let listeners = mesh
        .sidecar_until("the TCP listener on 8080 to give way to the HTTP one", |grpc| {
            let sidecar = sidecar.clone();
            async move {
                let listeners = xds::listeners(grpc, &sidecar).await?;
                let gone = !listeners.iter().any(|l| l.name == "10.20.1.17_8080");
                Ok(gone.then_some(listeners))
            }
        })
        .await;
    eprintln!("HTTP 8080, listeners:\n{}", summaries(&listeners));
    let on_8080 = listeners_on_port(&listeners, 8080);
    assert_eq!(names(&on_8080), ["0.0.0.0_8080"], "HTTP is served on the wildcard listener");
    let actions = on_8080[0].actions();
    assert!(actions.contains(&Action::HttpRoute("8080".into())), "{}", on_8080[0].summary());
    assert!(!actions.contains(&tcp_proxy("outbound|8080||orders.shop")), "{}", on_8080[0].summary());
}

// ---- ECS bridge mode: one stable port, every task on its own host port ----------------------------

#[tokio::test]
async fn a_bridge_mode_service_gets_one_port_whose_endpoints_keep_their_host_ports() {
    let bin = IstiodBin::current();
    let payments = Svc::new("shop", "payments")
        .attribute("cloudmap-xds/ports", "http=80/HTTP")
        .instance("10.20.1.50", Some(32768))
        .instance("10.20.1.50", Some(32769))
        .instance("10.20.1.51", Some(32768));
    let mesh = Mesh::start(&bin, &[payments], &[]).await;
    let host = "payments.shop";

    let registryz = mesh.istiod.registryz().await;
    let services: Vec<&Value> = registryz.iter().filter(|s| s["hostname"] == host).collect();
    assert_eq!(services.len(), 1, "{registryz:#?}");
    assert_eq!(services[0]["ports"], json!([{"name": "http", "port": 80, "protocol": "HTTP"}]));

    let sidecar = sidecar();
    let clusters = xds::clusters(mesh.istiod.grpc, &sidecar).await.unwrap();
    let ours: Vec<&String> = clusters.iter().filter(|c| c.ends_with(host)).collect();
    assert_eq!(ours, ["outbound|80||payments.shop"], "one service port, no cluster per host port");

    let cluster = "outbound|80||payments.shop";
    let assignment = xds::load_assignment(mesh.istiod.grpc, &sidecar, cluster).await.unwrap().expect("EDS");
    eprintln!("EDS {cluster}: {:?}", assignment.addresses());
    assert_eq!(assignment.addresses(), ["10.20.1.50:32768", "10.20.1.50:32769", "10.20.1.51:32768"]);
    http_route_for(&mesh, 80, host).await;
}

// ---- location and exportTo --------------------------------------------------------------------------

#[tokio::test]
async fn location_and_export_to_reach_istiod_and_decide_who_sees_the_service() {
    let bin = IstiodBin::current();
    let inventory = Svc::new("shop", "inventory")
        .attribute("cloudmap-xds/location", "MESH_INTERNAL")
        .attribute("cloudmap-xds/export-to", "team-a")
        .instance("10.20.7.1", Some(8080));
    // A service that sets nothing takes the flags.
    let catalog = Svc::new("shop", "catalog").instance("10.20.8.1", Some(9090));
    let flags = ["--default-location", "MESH_INTERNAL", "--default-export-to", ".,team-b"];
    let mesh = Mesh::start(&bin, &[inventory, catalog], &flags).await;

    let configz = mesh.istiod.configz().await;
    let spec_of = |name: &str| {
        configz.iter().find(|c| c["metadata"]["name"] == name).map(|c| c["spec"].clone()).unwrap()
    };
    let inventory = spec_of("cloudmap-inventory.shop");
    assert_eq!(inventory["location"], "MESH_INTERNAL");
    assert_eq!(inventory["exportTo"], json!(["team-a"]));
    let catalog = spec_of("cloudmap-catalog.shop");
    assert_eq!(catalog["location"], "MESH_INTERNAL");
    assert_eq!(catalog["exportTo"], json!([".", "team-b"]));

    let registryz = mesh.istiod.registryz().await;
    for (host, export_to) in [("inventory.shop", json!(["team-a"])), ("catalog.shop", json!([".", "team-b"]))]
    {
        let service = registryz.iter().find(|s| s["hostname"] == host).expect(host);
        eprintln!(
            "registryz {host}: MeshExternal {} Attributes {}",
            service["MeshExternal"], service["Attributes"]
        );
        assert_eq!(service["MeshExternal"], false, "{service}");
        let mut exported: Vec<Value> = service["Attributes"]["ExportTo"]
            .as_object()
            .map_or(Vec::new(), |o| o.keys().map(|k| json!(k)).collect());
        exported.sort_by_key(ToString::to_string);
        let mut want = export_to.as_array().unwrap().clone();
        want.sort_by_key(ToString::to_string);
        assert_eq!(exported, want, "{service}");
    }

    // Who sees what: a sidecar's clusters, by its namespace.
    let sees = |namespace: &'static str| {
        let grpc = mesh.istiod.grpc;
        async move {
            let clusters = xds::clusters(grpc, &sidecar().in_namespace(namespace)).await.unwrap();
            let mut ours: Vec<String> = clusters.into_iter().filter(|c| c.ends_with(".shop")).collect();
            ours.sort();
            ours
        }
    };
    assert_eq!(sees("default").await, Vec::<String>::new(), "exported to neither");
    assert_eq!(sees("team-a").await, ["outbound|8080||inventory.shop"]);
    assert_eq!(sees("team-b").await, ["outbound|9090||catalog.shop"]);
    // `.` is the publish namespace.
    assert_eq!(sees("istio-system").await, ["outbound|9090||catalog.shop"]);
}

// ---- addresses: which listeners a sidecar gets --------------------------------------------------

fn three_tasks<'a>(namespace: &'a str, name: &'a str, subnet: &str, port: u16) -> Svc<'a> {
    (11..=13).fold(Svc::new(namespace, name), |svc, n| svc.instance(&format!("{subnet}.{n}"), Some(port)))
}

/// The name table's entry for `host` (`None`: the DNS proxy forwards the query upstream).
fn ips_for(table: &xds::NameTable, host: &str) -> Option<Vec<String>> {
    table.table.get(host).map(|info| info.ips.clone())
}

#[tokio::test]
async fn each_address_mode_gives_tcp_ports_the_listeners_it_promises() {
    let bin = IstiodBin::current();
    let none = |svc: Svc<'static>| svc.attribute("cloudmap-xds/addresses", "none");
    let services = [
        // The built-in default, `lowest`; two services on one port.
        three_tasks("db", "pg", "10.30.0", 5432),
        Svc::new("other", "pg2").instance("10.40.0.11", Some(5432)),
        three_tasks("db", "pg-all", "10.31.0", 5433).attribute("cloudmap-xds/addresses", "all"),
        none(three_tasks("db", "pg-none", "10.32.0", 5434)),
        none(
            Svc::new("other", "pg2-none").created("2025-02-01T00:00:00Z").instance("10.42.0.11", Some(5434)),
        ),
        none(three_tasks("shop", "web", "10.20.9", 8080).attribute("cloudmap-xds/ports", "http=8080/HTTP")),
        none(
            three_tasks("shop", "secure", "10.20.10", 8443)
                .attribute("cloudmap-xds/ports", "https=8443/HTTPS"),
        ),
        three_tasks("db", "pg-subnet", "10.33.0", 5435).attribute("cloudmap-xds/addresses", "10.33.0.0/24"),
    ];
    let mesh = Mesh::start(&bin, &services, &[]).await;

    for sidecar in [sidecar(), sidecar().with_dns_proxying()] {
        let listeners = xds::listeners(mesh.istiod.grpc, &sidecar).await.unwrap();
        let proxying = sidecar.metadata.contains_key("DNS_CAPTURE");
        eprintln!("listeners (DNS proxying: {proxying}):\n{}", summaries(&listeners));

        // lowest: one listener per service on its lowest task IP. A caller that dialled another task
        // (e.g. from Cloud Map's own DNS answer) matches none of them and takes virtualOutbound's
        // catch-all chain: PassthroughCluster (BlackHoleCluster under REGISTRY_ONLY).
        let on_5432 = listeners_on_port(&listeners, 5432);
        assert_eq!(names(&on_5432), ["10.30.0.11_5432", "10.40.0.11_5432"]);
        assert_eq!(on_5432[0].actions(), [tcp_proxy("outbound|5432||pg.db")]);
        assert_eq!(on_5432[1].actions(), [tcp_proxy("outbound|5432||pg2.other")]);
        let outbound = listeners.iter().find(|l| l.name == "virtualOutbound").expect("virtualOutbound");
        let catch_all = outbound.filter_chains.iter().find(|c| {
            c.destinations().is_empty()
                && c.filter_chain_match.as_ref().is_none_or(|m| m.destination_port.is_none())
        });
        assert_eq!(
            catch_all.map(xds::FilterChain::action),
            Some(tcp_proxy("PassthroughCluster")),
            "{}",
            outbound.summary()
        );

        // all: one listener per task IP, each to the service's cluster.
        let on_5433 = listeners_on_port(&listeners, 5433);
        assert_eq!(names(&on_5433), ["10.31.0.11_5433", "10.31.0.12_5433", "10.31.0.13_5433"]);
        for listener in on_5433 {
            assert_eq!(listener.actions(), [tcp_proxy("outbound|5433||pg-all.db")], "{}", listener.summary());
        }

        // none: a wildcard listener that takes every destination on the port, and only one of the
        // two services on it (the older; istiod counts the other in pilot_conflict_outbound_listener_tcp_over_current_tcp).
        // Istio 1.26 allocates no address to a config-source ServiceEntry, DNS proxying or not.
        let on_5434 = listeners_on_port(&listeners, 5434);
        assert_eq!(names(&on_5434), ["0.0.0.0_5434"]);
        let chains = &on_5434[0].filter_chains;
        assert_eq!(chains.len(), 1, "{}", on_5434[0].summary());
        assert_eq!(chains[0].destinations(), Vec::<String>::new(), "matches any destination");
        assert_eq!(chains[0].action(), tcp_proxy("outbound|5434||pg-none.db"));

        // A CIDR: one wildcard listener whose chain matches the subnet, so every task in it.
        let on_5435 = listeners_on_port(&listeners, 5435);
        assert_eq!(names(&on_5435), ["0.0.0.0_5435"]);
        let subnet: Vec<&xds::FilterChain> =
            on_5435[0].filter_chains.iter().filter(|c| c.destinations() == ["10.33.0.0/24"]).collect();
        assert_eq!(subnet.len(), 1, "{}", on_5435[0].summary());
        assert_eq!(subnet[0].action(), tcp_proxy("outbound|5435||pg-subnet.db"));

        // HTTP needs no address: the wildcard listener routes by Host.
        let on_8080 = listeners_on_port(&listeners, 8080);
        assert_eq!(names(&on_8080), ["0.0.0.0_8080"]);
        assert!(on_8080[0].actions().contains(&Action::HttpRoute("8080".into())), "{}", on_8080[0].summary());

        // TLS needs none either: the wildcard listener matches the host's SNI only.
        let on_8443 = listeners_on_port(&listeners, 8443);
        assert_eq!(names(&on_8443), ["0.0.0.0_8443"]);
        let sni: Vec<&xds::FilterChain> = on_8443[0]
            .filter_chains
            .iter()
            .filter(|c| c.filter_chain_match.as_ref().is_some_and(|m| m.server_names == ["secure.shop"]))
            .collect();
        assert_eq!(sni.len(), 1, "{}", on_8443[0].summary());
        assert_eq!(sni[0].action(), tcp_proxy("outbound|8443||secure.shop"));
    }
    let clusters = xds::clusters(mesh.istiod.grpc, &sidecar()).await.unwrap();
    assert!(
        clusters.contains(&"outbound|5434||pg2-none.other".to_owned()),
        "its cluster exists, unreachable"
    );
    http_route_for(&mesh, 8080, "web.shop").await;

    // What Istio's DNS proxy answers for each host.
    let table = xds::name_table(mesh.istiod.grpc, &sidecar().with_dns_proxying()).await.unwrap();
    eprintln!("NDS: {:#?}", table.table);
    assert_eq!(ips_for(&table, "pg.db"), Some(vec!["10.30.0.11".to_owned()]));
    assert_eq!(
        ips_for(&table, "pg-all.db"),
        Some(["10.31.0.11", "10.31.0.12", "10.31.0.13"].map(String::from).to_vec())
    );
    assert_eq!(ips_for(&table, "pg-none.db"), None, "no auto-allocated address");
    assert_eq!(ips_for(&table, "web.shop"), None);
}

/// `all` makes istiod build one service per address, each with every endpoint: for N tasks,
/// N services, N listeners per TCP port and N×N endpoints in the cluster's load assignment.
#[tokio::test]
async fn with_all_istiod_makes_a_service_per_address_and_lists_every_endpoint_once_per_address() {
    let bin = IstiodBin::current();
    const TASKS: usize = 50;
    let many = |name: &'static str, subnet: u8, port: u16, mode: &str| {
        (1..=TASKS)
            .fold(Svc::new("db", name), |svc, n| svc.instance(&format!("10.{subnet}.0.{n}"), Some(port)))
            .attribute("cloudmap-xds/addresses", mode)
    };
    let services = [many("big-all", 50, 6000, "all"), many("big-lowest", 51, 6001, "lowest")];
    let mesh = Mesh::start(&bin, &services, &[]).await;
    let sidecar = sidecar();
    let registryz = mesh.istiod.registryz().await;
    let listeners = xds::fetch(mesh.istiod.grpc, &sidecar, LISTENER_TYPE, &[]).await.unwrap();
    let decoded: Vec<Listener> = xds::decode_all(&listeners.resources).unwrap();
    let mut report = String::new();
    for (host, port, services, endpoints) in
        [("big-all.db", 6000, TASKS, TASKS * TASKS), ("big-lowest.db", 6001, 1, TASKS)]
    {
        let in_registry = registryz.iter().filter(|s| s["hostname"] == host).count();
        let on_port = listeners_on_port(&decoded, port);
        let listener_bytes: usize = listeners
            .resources
            .iter()
            .zip(&decoded)
            .filter(|(_, l)| l.name.ends_with(&format!("_{port}")))
            .map(|(any, _)| any.value.len())
            .sum();
        let cluster = format!("outbound|{port}||{host}");
        let eds = xds::fetch(mesh.istiod.grpc, &sidecar, ENDPOINT_TYPE, &[&cluster]).await.unwrap();
        let eds_bytes: usize = eds.resources.iter().map(|a| a.value.len()).sum();
        let assignment: Vec<xds::ClusterLoadAssignment> = xds::decode_all(&eds.resources).unwrap();
        let listed = assignment[0].addresses();
        let distinct: BTreeSet<&String> = listed.iter().collect();
        writeln!(
            report,
            "{host} ({TASKS} tasks): {in_registry} registryz services, {} listeners ({listener_bytes} bytes), \
             {} endpoints ({} distinct, {eds_bytes} bytes of EDS)",
            on_port.len(),
            listed.len(),
            distinct.len()
        )
        .unwrap();
        assert_eq!(in_registry, services, "{host}: registryz");
        assert_eq!(on_port.len(), services, "{host}: listeners");
        assert_eq!(listed.len(), endpoints, "{host}: endpoints");
        assert_eq!(distinct.len(), TASKS, "{host}: distinct endpoints");
    }
    eprint!("{report}");
}

// ---- churn: which changes make istiod push everything --------------------------------------------

/// Opens a sidecar stream watching every cluster and `cluster`'s endpoints, and reads the
/// initial answers until the endpoints are `now`.
async fn watch(mesh: &Mesh, cluster: &str, now: &[String]) -> SidecarStream {
    let mut stream = SidecarStream::open(mesh.istiod.grpc, &sidecar(), CLUSTER_TYPE, &[]).await.unwrap();
    stream.subscribe(ENDPOINT_TYPE, &[cluster]).await.unwrap();
    let (mut clusters, mut endpoints) = (false, false);
    while !(clusters && endpoints) {
        let response = stream.next_within(CHANGE_DEADLINE).await.unwrap();
        match response.type_url.as_str() {
            CLUSTER_TYPE => clusters = true,
            ENDPOINT_TYPE => endpoints = endpoint_addresses(&response) == now,
            _ => {}
        }
    }
    stream
}

/// The distinct endpoints of an EDS response, sorted (with `all`, istiod lists each once per address).
fn endpoint_addresses(response: &DiscoveryResponse) -> Vec<String> {
    let assignments: Vec<xds::ClusterLoadAssignment> = xds::decode_all(&response.resources).unwrap();
    let distinct: BTreeSet<String> =
        assignments.iter().flat_map(xds::ClusterLoadAssignment::addresses).collect();
    distinct.into_iter().collect()
}

/// The types istiod pushed to `stream` up to (and with) the endpoint update that shows `after`.
async fn pushed_until(stream: &mut SidecarStream, after: &[String]) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let until = Instant::now() + CHANGE_DEADLINE;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let response =
            stream.next_within(left).await.unwrap_or_else(|e| panic!("waiting for endpoints {after:?}: {e}"));
        seen.insert(response.type_url.rsplit('.').next().unwrap_or_default().to_owned());
        if response.type_url == ENDPOINT_TYPE && endpoint_addresses(&response) == after {
            return seen;
        }
    }
}

fn endpoints(ips: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = ips.iter().map(|ip| format!("{ip}:5432")).collect();
    out.sort();
    out
}

fn pg(mode: &str, ips: &[&str]) -> Svc<'static> {
    ips.iter()
        .fold(Svc::new("db", "pg"), |svc, ip| svc.instance(ip, Some(5432)))
        .attribute("cloudmap-xds/addresses", mode)
}

/// Replaces the tasks of `pg` (in `mode`) with `after`; the xDS types istiod pushed to `stream`.
async fn replace_tasks(
    mesh: &Mesh,
    stream: &mut SidecarStream,
    mode: &str,
    before: &[&str],
    after: &[&str],
) -> BTreeSet<String> {
    let started = Instant::now();
    mesh.edit(&[pg(mode, after)], |s| {
        let spec = s[0].spec.as_ref().unwrap();
        s.len() == 1 && after.iter().all(|ip| spec.endpoints.iter().any(|e| e.address == *ip))
    })
    .await;
    let seen = pushed_until(stream, &endpoints(after)).await;
    eprintln!("{mode}: {before:?} -> {after:?}: pushed {seen:?} within {:?}", started.elapsed());
    seen
}

/// Switches `pg` to `mode` (a change of its services: one full push), and reads that push.
async fn switch_mode(mesh: &Mesh, stream: &mut SidecarStream, mode: &str, tasks: &[&str], addresses: usize) {
    mesh.edit(&[pg(mode, tasks)], |s| {
        s.len() == 1 && s[0].spec.as_ref().unwrap().addresses.len() == addresses
    })
    .await;
    let first = stream.next_of(CLUSTER_TYPE).await.unwrap();
    assert_eq!(first.type_url, CLUSTER_TYPE);
    let seen = pushed_until(stream, &endpoints(tasks)).await;
    assert_eq!(
        seen,
        BTreeSet::from(["ClusterLoadAssignment".to_owned()]),
        "the full push ends with the endpoints"
    );
}

/// istiod pushes every xDS type to every sidecar (a full push) when a ServiceEntry's services
/// change (hosts, ports, addresses…), and only the endpoints when nothing but endpoints changed.
#[tokio::test]
async fn a_task_replacement_makes_istiod_push_everything_only_when_it_moves_the_addresses() {
    let bin = IstiodBin::current();
    let tasks = ["10.30.0.11", "10.30.0.12", "10.30.0.13"];
    let mesh = Mesh::start(&bin, &[pg("lowest", &tasks)], &[]).await;
    let mut stream = watch(&mesh, "outbound|5432||pg.db", &endpoints(&tasks)).await;
    let endpoints_only = BTreeSet::from(["ClusterLoadAssignment".to_owned()]);

    // A first replacement, not judged: istiod may still be finishing the sidecar's connection
    // push (its debounced full push after the proxy connected) when it lands.
    let warm = ["10.30.0.11", "10.30.0.12", "10.30.0.17"];
    replace_tasks(&mesh, &mut stream, "lowest", &tasks, &warm).await;
    // lowest: replacing any task but the lowest changes only the endpoints.
    let now = ["10.30.0.11", "10.30.0.12", "10.30.0.14"];
    let seen = replace_tasks(&mesh, &mut stream, "lowest", &warm, &now).await;
    assert_eq!(seen, endpoints_only);
    // Replacing the lowest moves the address: everything is pushed.
    let (before, now) = (now, ["10.30.0.12", "10.30.0.14", "10.30.0.15"]);
    let seen = replace_tasks(&mesh, &mut stream, "lowest", &before, &now).await;
    assert!(seen.contains("Cluster"), "{seen:?}");

    // all: every replacement moves the addresses.
    switch_mode(&mesh, &mut stream, "all", &now, 3).await;
    let (before, now) = (now, ["10.30.0.12", "10.30.0.14", "10.30.0.16"]);
    let seen = replace_tasks(&mesh, &mut stream, "all", &before, &now).await;
    assert!(seen.contains("Cluster"), "{seen:?}");

    // none: never.
    switch_mode(&mesh, &mut stream, "none", &now, 0).await;
    let (before, now) = (now, ["10.30.0.10", "10.30.0.14", "10.30.0.16"]);
    let seen = replace_tasks(&mesh, &mut stream, "none", &before, &now).await;
    assert_eq!(seen, endpoints_only);
}
