use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use prost::Message;

use super::*;
use crate::model::Health;

fn options() -> Options {
    Options::new("istio-system", HealthFilter::HealthyOrElseAll)
}

fn instance(id: &str, attrs: &[(&str, &str)]) -> Instance {
    Instance {
        id: id.into(),
        health: Health::Healthy,
        attributes: attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

fn service(ns: &str, name: &str, instances: Vec<Instance>) -> Service {
    Service {
        namespace: ns.into(),
        name: name.into(),
        created: SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_564_800),
        attributes: Default::default(),
        instances,
    }
}

fn one(svc: Service) -> (Entry, Translation) {
    let encoded = translate_service_encoded(&svc, &options(), &mut KeyRoles::default()).entry.map(|e| {
        // Garbage first: the spec is whatever is written, not what the buffer held.
        let mut buf = vec![0xa5; 7];
        let len = e.write_spec(&mut buf);
        buf.truncate(len);
        (e.mcp_name, buf)
    });
    let t = translate(&Registry::new(vec![svc]), &options());
    assert_eq!(t.entries.len(), 1, "{t:?}");
    // The builder's path writes the bytes itself: exactly prost's for the same entry, named alike.
    let mcp_name = format!("{}/{}", options().publish_namespace, t.entries[0].name);
    assert_eq!(encoded, Some((mcp_name, t.entries[0].spec.encode_to_vec())));
    (t.entries[0].clone(), t)
}

fn ports_of(e: &WorkloadEntry) -> Vec<(&str, u32)> {
    e.ports.iter().map(|(k, v)| (k.as_str(), *v)).collect()
}

fn service_ports(spec: &ServiceEntry) -> Vec<(u32, &str, &str)> {
    spec.ports.iter().map(|p| (p.number, p.name.as_str(), p.protocol.as_str())).collect()
}

#[test]
fn golden_case_field_by_field() {
    let (entry, t) = one(service(
        "my-namespace",
        "getmesh-external-service",
        vec![instance("i-1", &[("AWS_INSTANCE_IPV4", "52.192.72.89")])],
    ));
    assert!(t.skipped.is_empty());
    assert_eq!(entry.name, "cloudmap-getmesh-external-service.my-namespace");
    assert_eq!(entry.namespace, "istio-system");
    assert_eq!(entry.create_time, SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_564_800));
    let spec = &entry.spec;
    assert_eq!(spec.hosts, ["getmesh-external-service.my-namespace"]);
    assert_eq!(spec.addresses, ["52.192.72.89"]);
    assert_eq!(spec.location(), Location::MeshExternal);
    assert_eq!(spec.resolution(), Resolution::Static);
    assert_eq!(service_ports(spec), [(80, "http", "HTTP"), (443, "https", "HTTPS")]);
    assert!(spec.ports.iter().all(|p| p.target_port == 0));
    assert_eq!(spec.endpoints.len(), 1);
    let ep = &spec.endpoints[0];
    assert_eq!(ep.address, "52.192.72.89");
    assert_eq!(ports_of(ep), [("http", 80), ("https", 443)]);
    assert!(ep.labels.is_empty() && ep.locality.is_empty() && ep.network.is_empty() && ep.weight == 0);
    assert!(
        spec.export_to.is_empty() && spec.subject_alt_names.is_empty() && spec.workload_selector.is_none()
    );
}

#[test]
fn instance_ports_get_unique_names_and_a_protocol_each() {
    let (entry, t) = one(service(
        "ns",
        "web",
        vec![
            instance("c", &[("AWS_INSTANCE_IPV4", "10.0.0.3"), ("AWS_INSTANCE_PORT", "9090")]),
            instance("d", &[("AWS_INSTANCE_IPV4", "10.0.0.4"), ("AWS_INSTANCE_PORT", "8080")]),
        ],
    ));
    assert!(t.skipped.is_empty());
    let spec = &entry.spec;
    assert_eq!(service_ports(spec), [(8080, "tcp-8080", "TCP"), (9090, "tcp-9090", "TCP")]);
    let names: BTreeSet<_> = spec.ports.iter().map(|p| &p.name).collect();
    assert_eq!(names.len(), spec.ports.len(), "port names are unique");
}

#[test]
fn instances_of_different_protocols_never_get_each_others_traffic() {
    // 443 (HTTPS), 80 (HTTP) and two TCP ports share no protocol: TCP, served by the most, wins.
    let (entry, t) = one(service(
        "ns",
        "web",
        vec![
            instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1"), ("AWS_INSTANCE_PORT", "443")]),
            instance("b", &[("AWS_INSTANCE_IPV4", "10.0.0.2"), ("AWS_INSTANCE_PORT", "80")]),
            instance("c", &[("AWS_INSTANCE_IPV4", "10.0.0.3"), ("AWS_INSTANCE_PORT", "9090")]),
            instance("d", &[("AWS_INSTANCE_IPV4", "10.0.0.4"), ("AWS_INSTANCE_PORT", "8080")]),
        ],
    ));
    assert_eq!(service_ports(&entry.spec), [(8080, "tcp-8080", "TCP"), (9090, "tcp-9090", "TCP")]);
    let addresses: Vec<_> = entry.spec.endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(addresses, ["10.0.0.3", "10.0.0.4"]);
    let skipped: Vec<_> =
        t.skipped.iter().map(|s| (s.instance.as_deref().unwrap(), s.reason.kind())).collect();
    assert_eq!(skipped, [("a", "port_conflict"), ("b", "port_conflict")]);
    assert!(t.skipped[0].reason.to_string().contains("cloudmap-xds/ports"), "{}", t.skipped[0].reason);
}

#[test]
fn a_tls_instance_next_to_a_portless_one_is_never_sent_plain_http() {
    // The issue's case: one instance registers 443, another no port. Only HTTPS on 443 is common.
    let (entry, t) = one(service(
        "ns",
        "mixed",
        vec![
            instance("tls", &[("AWS_INSTANCE_IPV4", "10.0.0.1"), ("AWS_INSTANCE_PORT", "443")]),
            instance("plain", &[("AWS_INSTANCE_IPV4", "10.0.0.2")]),
        ],
    ));
    assert!(t.skipped.is_empty());
    let spec = &entry.spec;
    assert_eq!(service_ports(spec), [(443, "https", "HTTPS")]);
    assert_eq!(ports_of(&spec.endpoints[0]), [("https", 443)]);
    assert_eq!(ports_of(&spec.endpoints[1]), [("https", 443)]);
}

#[test]
fn bridge_mode_instances_stay_reachable_at_their_own_port() {
    let (entry, _) = one(service(
        "ns",
        "api",
        vec![
            instance("task-2", &[("AWS_INSTANCE_IPV4", "10.0.0.7"), ("AWS_INSTANCE_PORT", "32769")]),
            instance("task-1", &[("AWS_INSTANCE_IPV4", "10.0.0.7"), ("AWS_INSTANCE_PORT", "32768")]),
        ],
    ));
    let spec = &entry.spec;
    assert_eq!(service_ports(spec), [(32768, "tcp-32768", "TCP"), (32769, "tcp-32769", "TCP")]);
    // Whatever service port a client uses, each task is reached on its own host port.
    assert_eq!(ports_of(&spec.endpoints[0]), [("tcp-32768", 32768), ("tcp-32769", 32768)]);
    assert_eq!(ports_of(&spec.endpoints[1]), [("tcp-32768", 32769), ("tcp-32769", 32769)]);
    assert_eq!(spec.addresses, ["10.0.0.7"]);
}

#[test]
fn a_portless_instance_next_to_a_tcp_one_is_left_out_not_misrouted() {
    let (entry, t) = one(service(
        "ns",
        "mixed",
        vec![
            instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]),
            instance("b", &[("AWS_INSTANCE_IPV4", "10.0.0.2"), ("AWS_INSTANCE_PORT", "8080")]),
        ],
    ));
    let spec = &entry.spec;
    // A tie between HTTP/HTTPS (a) and TCP (b): the instance that registered a port wins.
    assert_eq!(service_ports(spec), [(8080, "tcp-8080", "TCP")]);
    assert_eq!(spec.endpoints.len(), 1);
    assert_eq!(ports_of(&spec.endpoints[0]), [("tcp-8080", 8080)]);
    assert_eq!(t.skipped.len(), 1);
    assert_eq!((t.skipped[0].instance.as_deref(), t.skipped[0].reason.kind()), (Some("a"), "port_conflict"));
}

#[test]
fn endpoints_are_sorted_numerically_and_deduplicated() {
    let (entry, _) = one(service(
        "ns",
        "s",
        vec![
            instance("z", &[("AWS_INSTANCE_IPV4", "10.0.0.10")]),
            instance("y", &[("AWS_INSTANCE_IPV4", "10.0.0.9")]),
            instance("x", &[("AWS_INSTANCE_IPV4", "10.0.0.9")]),
        ],
    ));
    let addrs: Vec<_> = entry.spec.endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(addrs, ["10.0.0.9", "10.0.0.10"]);
    assert_eq!(entry.spec.addresses, ["10.0.0.9"]);
}

#[test]
fn cname_instances_resolve_by_dns() {
    let (entry, _) = one(service(
        "ns",
        "legacy",
        vec![instance("a", &[("AWS_INSTANCE_CNAME", "DB.Example.com."), ("AWS_INSTANCE_PORT", "5432")])],
    ));
    let spec = &entry.spec;
    assert_eq!(spec.resolution(), Resolution::Dns);
    assert!(spec.addresses.is_empty());
    assert_eq!(spec.endpoints[0].address, "db.example.com");
    assert_eq!(service_ports(spec), [(5432, "tcp-5432", "TCP")]);
}

#[test]
fn ipv6_instances_are_supported_and_ipv4_wins_when_both() {
    let (entry, _) = one(service(
        "ns",
        "v6",
        vec![
            instance("a", &[("AWS_INSTANCE_IPV6", "2001:db8::1")]),
            instance("b", &[("AWS_INSTANCE_IPV6", "2001:db8::2"), ("AWS_INSTANCE_IPV4", "10.1.1.1")]),
        ],
    ));
    let addrs: Vec<_> = entry.spec.endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(addrs, ["10.1.1.1", "2001:db8::1"]);
    assert_eq!(entry.spec.resolution(), Resolution::Static);
}

#[test]
fn unusable_instances_are_skipped_with_a_reason() {
    let (entry, t) = one(service(
        "ns",
        "s",
        vec![
            instance("ok", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]),
            instance("no-addr", &[("team", "a")]),
            instance("bad-ip", &[("AWS_INSTANCE_IPV4", "10.0.0.300")]),
            instance("bad-port", &[("AWS_INSTANCE_IPV4", "10.0.0.2"), ("AWS_INSTANCE_PORT", "http")]),
            instance("zero-port", &[("AWS_INSTANCE_IPV4", "10.0.0.3"), ("AWS_INSTANCE_PORT", "0")]),
            instance("bad-cname", &[("AWS_INSTANCE_CNAME", "not a host")]),
        ],
    ));
    assert_eq!(entry.spec.endpoints.len(), 1);
    let reasons: BTreeMap<_, _> =
        t.skipped.iter().map(|s| (s.instance.clone().unwrap_or_default(), s.reason.kind())).collect();
    assert_eq!(
        reasons,
        BTreeMap::from([
            ("bad-cname".into(), "invalid_address"),
            ("bad-ip".into(), "invalid_address"),
            ("bad-port".into(), "invalid_port"),
            ("no-addr".into(), "no_address"),
            ("zero-port".into(), "invalid_port"),
        ])
    );
    let text = t.skipped.iter().find(|s| s.instance.as_deref() == Some("bad-ip")).unwrap().reason.to_string();
    assert_eq!(text, "AWS_INSTANCE_IPV4=\"10.0.0.300\" is not a valid address");
}

#[test]
fn a_service_without_usable_instances_is_still_a_valid_entry() {
    let (entry, _) = one(service("ns", "empty", vec![]));
    assert!(entry.spec.endpoints.is_empty());
    assert!(entry.spec.addresses.is_empty());
    assert_eq!(entry.spec.resolution(), Resolution::Static);
    assert_eq!(service_ports(&entry.spec), [(80, "http", "HTTP"), (443, "https", "HTTPS")]);
}

#[test]
fn health_filter_applies() {
    let mut sick = instance("sick", &[("AWS_INSTANCE_IPV4", "10.0.0.2")]);
    sick.health = Health::Unhealthy;
    let svc = service("ns", "s", vec![instance("well", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]), sick]);
    let count = |filter| {
        let t = translate(&Registry::new(vec![svc.clone()]), &Options { health_filter: filter, ..options() });
        t.entries[0].spec.endpoints.len()
    };
    assert_eq!(count(HealthFilter::Healthy), 1);
    assert_eq!(count(HealthFilter::HealthyOrElseAll), 1);
    assert_eq!(count(HealthFilter::All), 2);
}

#[test]
fn custom_attributes_become_labels_when_valid() {
    let (entry, t) = one(service(
        "ns",
        "s",
        vec![instance(
            "a",
            &[
                ("AWS_INSTANCE_IPV4", "10.0.0.1"),
                ("ECS_CLUSTER_NAME", "prod"),
                ("version", "v2"),
                ("example.com/tier", "gold"),
                ("bad key", "x"),
                ("note", "has spaces"),
                ("AWS_INIT_HEALTH_STATUS", "HEALTHY"),
            ],
        )],
    ));
    let labels: Vec<_> =
        entry.spec.endpoints[0].labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(labels, [("ECS_CLUSTER_NAME", "prod"), ("example.com/tier", "gold"), ("version", "v2")]);
    let skipped: Vec<_> = t.skipped_labels.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(skipped, ["bad key", "note"]);
}

#[test]
fn ecs_region_and_zone_become_locality() {
    let (entry, _) = one(service(
        "ns",
        "s",
        vec![
            instance(
                "a",
                &[
                    ("AWS_INSTANCE_IPV4", "10.0.0.1"),
                    ("REGION", "us-east-1"),
                    ("AVAILABILITY_ZONE", "us-east-1a"),
                ],
            ),
            instance("b", &[("AWS_INSTANCE_IPV4", "10.0.0.2"), ("REGION", "us-east-1")]),
            instance("c", &[("AWS_INSTANCE_IPV4", "10.0.0.3"), ("REGION", "us/east")]),
        ],
    ));
    let localities: Vec<_> = entry.spec.endpoints.iter().map(|e| e.locality.as_str()).collect();
    assert_eq!(localities, ["us-east-1/us-east-1a", "us-east-1", ""]);
}

#[test]
fn awkward_names_are_sanitised_and_stay_unique() {
    let t = translate(
        &Registry::new(vec![
            service("Prod_NS", "My_Service", vec![]),
            service("prod-ns", "my-service", vec![]),
            service("ns", "-", vec![]),
        ]),
        &options(),
    );
    let names: Vec<_> = t.entries.iter().map(|e| (e.name.as_str(), e.spec.hosts[0].as_str())).collect();
    assert_eq!(names.len(), 2);
    assert_eq!(names[0], ("cloudmap-my-service.prod-ns", "my-service.prod-ns"));
    assert!(
        names[1].0.starts_with("cloudmap-my-service.prod-ns-") && names[1].1 == "my-service.prod-ns",
        "{names:?}"
    );
    assert_eq!(t.skipped.len(), 1);
    assert_eq!(t.skipped[0].reason.kind(), "invalid_host");
}

#[test]
fn translation_ignores_input_order() {
    let instances = vec![
        instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1"), ("AWS_INSTANCE_PORT", "8080"), ("v", "1")]),
        instance("b", &[("AWS_INSTANCE_IPV4", "10.0.0.2"), ("AWS_INSTANCE_PORT", "8081")]),
        instance("c", &[("AWS_INSTANCE_CNAME", "c.example.com")]),
    ];
    let forward =
        Registry::new(vec![service("ns", "one", instances.clone()), service("ns", "two", instances.clone())]);
    let mut reversed_instances = instances;
    reversed_instances.reverse();
    let backward = Registry::new(vec![
        service("ns", "two", reversed_instances.clone()),
        service("ns", "one", reversed_instances),
    ]);
    assert_eq!(translate(&forward, &options()), translate(&backward, &options()));
}

#[test]
fn labels_follow_kubernetes_rules() {
    assert!(valid_label("app", "web"));
    assert!(valid_label("app.kubernetes.io/name", "web-1.2_3"));
    assert!(valid_label("app", ""));
    assert!(!valid_label("App.Example.com/x", "y"));
    assert!(!valid_label("a/b/c", "y"));
    assert!(!valid_label("app", "-web"));
    assert!(!valid_label(&"k".repeat(64), "v"));
    assert!(!valid_label("app", &"v".repeat(64)));
}

#[test]
fn names_stay_valid_kubernetes_names_however_long_the_host() {
    let long_service = "s".repeat(63);
    let long_namespace = format!("{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(52));
    let t = translate(
        &Registry::new(vec![
            service(&long_namespace, &long_service, vec![]),
            service(&long_namespace.to_uppercase(), &long_service, vec![]),
            service(&"N".repeat(60), "svc", vec![]),
        ]),
        &options(),
    );
    assert_eq!(t.entries.len(), 3, "{:?}", t.skipped);
    let names: BTreeSet<_> = t.entries.iter().map(|e| e.name.clone()).collect();
    assert_eq!(names.len(), 3, "names stay unique");
    for name in &names {
        assert!(name.len() <= 253, "{name} has {} characters", name.len());
        assert!(is_dns_subdomain(name), "{name} is not a DNS subdomain");
    }
    assert_eq!(t.entries[0].spec.hosts[0].len(), 63 + 1 + 63 + 1 + 63 + 1 + 52);
}

#[test]
fn two_services_giving_one_name_keep_the_first_and_report_the_other() {
    let a = service("corp.local", "api.prod", vec![instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1")])]);
    let b = service("prod.corp.local", "api", vec![instance("b", &[("AWS_INSTANCE_IPV4", "10.0.0.2")])]);
    for services in [vec![a.clone(), b.clone()], vec![b.clone(), a.clone()]] {
        let t = translate(&Registry::new(services), &options());
        assert_eq!(t.entries.len(), 1);
        assert_eq!(t.entries[0].origin, ("corp.local".to_string(), "api.prod".to_string()));
        assert_eq!(t.skipped.len(), 1);
        assert_eq!(
            (t.skipped[0].namespace.as_str(), t.skipped[0].reason.kind()),
            ("prod.corp.local", "duplicate_name")
        );
    }
}

// ---- service attributes and the defaults flags (issue: mesh semantics) ----------------------------

fn with_attributes(mut svc: Service, attrs: &[(&str, &str)]) -> Service {
    svc.attributes = attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    svc
}

fn ecs_tasks() -> Vec<Instance> {
    vec![
        instance("t1", &[("AWS_INSTANCE_IPV4", "10.0.0.7"), ("AWS_INSTANCE_PORT", "32768")]),
        instance("t2", &[("AWS_INSTANCE_IPV4", "10.0.0.7"), ("AWS_INSTANCE_PORT", "32769")]),
        instance("t3", &[("AWS_INSTANCE_IPV4", "10.0.0.8"), ("AWS_INSTANCE_PORT", "32770")]),
    ]
}

#[test]
fn http_on_8080_becomes_http_through_the_port_protocols_flag() {
    let svc = service(
        "ns",
        "orders",
        vec![instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1"), ("AWS_INSTANCE_PORT", "8080")])],
    );
    let mut options = options();
    options.defaults.port_protocols = BTreeMap::from([(8080, settings::Protocol::Http)]);
    let t = translate(&Registry::new(vec![svc]), &options);
    assert_eq!(service_ports(&t.entries[0].spec), [(8080, "http-8080", "HTTP")]);
    // Without the flag the same service is opaque TCP, as before.
    let (entry, _) = one(service(
        "ns",
        "orders",
        vec![instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1"), ("AWS_INSTANCE_PORT", "8080")])],
    ));
    assert_eq!(service_ports(&entry.spec), [(8080, "tcp-8080", "TCP")]);
}

#[test]
fn bridge_mode_gets_one_stable_port_reaching_each_task_at_its_host_port() {
    let (entry, t) =
        one(with_attributes(service("ns", "api", ecs_tasks()), &[("cloudmap-xds/ports", "http=80/HTTP")]));
    assert!(t.skipped.is_empty() && t.invalid_settings.is_empty(), "{t:?}");
    let spec = &entry.spec;
    assert_eq!(service_ports(spec), [(80, "http", "HTTP")]);
    let endpoints: Vec<_> = spec.endpoints.iter().map(|e| (e.address.as_str(), ports_of(e))).collect();
    assert_eq!(
        endpoints,
        [
            ("10.0.0.7", vec![("http", 32768)]),
            ("10.0.0.7", vec![("http", 32769)]),
            ("10.0.0.8", vec![("http", 32770)]),
        ]
    );
}

#[test]
fn declared_ports_keep_extra_ports_at_their_number_and_portless_instances_at_the_service_port() {
    let (entry, _) = one(with_attributes(
        service(
            "ns",
            "api",
            vec![
                instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1"), ("AWS_INSTANCE_PORT", "8080")]),
                instance("b", &[("AWS_INSTANCE_IPV4", "10.0.0.2")]),
            ],
        ),
        &[("cloudmap-xds/ports", "80/HTTP, grpc=9090/GRPC")],
    ));
    let spec = &entry.spec;
    assert_eq!(service_ports(spec), [(80, "http", "HTTP"), (9090, "grpc", "GRPC")]);
    assert_eq!(ports_of(&spec.endpoints[0]), [("grpc", 9090), ("http", 8080)]);
    assert_eq!(ports_of(&spec.endpoints[1]), [("grpc", 9090), ("http", 80)]);
}

#[test]
fn location_export_to_and_resolution_come_from_attributes() {
    let (entry, t) = one(with_attributes(
        service("ns", "vm", vec![instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1")])]),
        &[
            ("cloudmap-xds/location", "MESH_INTERNAL"),
            ("cloudmap-xds/export-to", "team-a,team-b"),
            ("cloudmap-xds/resolution", "DNS"),
        ],
    ));
    assert!(t.invalid_settings.is_empty(), "{:?}", t.invalid_settings);
    let spec = &entry.spec;
    assert_eq!(spec.location(), Location::MeshInternal);
    assert_eq!(spec.export_to, ["team-a", "team-b"]);
    assert_eq!(spec.resolution(), Resolution::Dns);
}

#[test]
fn flags_set_what_services_do_not_and_attributes_win() {
    let mut options = options();
    options.defaults.location = Some(Location::MeshInternal);
    options.defaults.export_to = Some(vec![".".into()]);
    let t = translate(
        &Registry::new(vec![
            service("ns", "plain", vec![]),
            with_attributes(service("ns", "own", vec![]), &[("cloudmap-xds/location", "mesh_external")]),
        ]),
        &options,
    );
    let by_name: BTreeMap<_, _> = t.entries.iter().map(|e| (e.name.as_str(), &e.spec)).collect();
    assert_eq!(by_name["cloudmap-plain.ns"].location(), Location::MeshInternal);
    assert_eq!(by_name["cloudmap-plain.ns"].export_to, ["."]);
    assert_eq!(by_name["cloudmap-own.ns"].location(), Location::MeshExternal);
}

#[test]
fn invalid_attributes_are_reported_and_the_rest_is_still_served() {
    let (entry, t) = one(with_attributes(
        service(
            "ns",
            "s",
            vec![instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1"), ("AWS_INSTANCE_PORT", "8080")])],
        ),
        &[
            ("cloudmap-xds/ports", "http=80/SPDY"),
            ("cloudmap-xds/location", "INSIDE"),
            ("cloudmap-xds/export-to", "*,team-a"),
            ("cloudmap-xds/resolution", "sometimes"),
            ("cloudmap-xds/addresses", "10.0.0.0/99"),
            ("cloudmap-xds/protocol", "HTTP"),
            ("owner", "team-a"),
        ],
    ));
    // Everything falls back to the defaults: the instance is still served.
    let spec = &entry.spec;
    assert_eq!(service_ports(spec), [(8080, "tcp-8080", "TCP")]);
    assert_eq!(spec.location(), Location::MeshExternal);
    assert!(spec.export_to.is_empty());
    assert_eq!(spec.resolution(), Resolution::Static);
    assert_eq!(spec.addresses, ["10.0.0.1"]);
    let kinds: Vec<_> = t.invalid_settings.iter().map(|p| p.setting.kind()).collect();
    assert_eq!(kinds, ["addresses", "export-to", "location", "ports", "unknown", "resolution"]);
    assert!(t.invalid_settings.iter().all(|p| p.namespace == "ns" && p.service == "s"));
}

#[test]
fn dns_round_robin_with_several_instances_falls_back_with_a_reason() {
    let (entry, t) = one(with_attributes(
        service(
            "ns",
            "s",
            vec![
                instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]),
                instance("b", &[("AWS_INSTANCE_IPV4", "10.0.0.2")]),
            ],
        ),
        &[("cloudmap-xds/resolution", "DNS_ROUND_ROBIN")],
    ));
    assert_eq!(entry.spec.resolution(), Resolution::Static);
    assert_eq!(t.invalid_settings.len(), 1);
    assert!(t.invalid_settings[0].setting.reason.contains("at most one endpoint"));
    let (entry, t) = one(with_attributes(
        service("ns", "s", vec![instance("a", &[("AWS_INSTANCE_CNAME", "db.example.com")])]),
        &[("cloudmap-xds/resolution", "DNS_ROUND_ROBIN")],
    ));
    assert_eq!(entry.spec.resolution(), Resolution::DnsRoundRobin);
    assert!(t.invalid_settings.is_empty());
    // Found by the property tests: one address registered twice with different localities is
    // two endpoints, which DNS_ROUND_ROBIN does not allow either.
    let (entry, t) = one(with_attributes(
        service(
            "ns",
            "s",
            vec![
                instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]),
                instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1"), ("REGION", "us-east-1")]),
            ],
        ),
        &[("cloudmap-xds/resolution", "DNS_ROUND_ROBIN")],
    ));
    assert_eq!(entry.spec.resolution(), Resolution::Static);
    assert_eq!(entry.spec.endpoints.len(), 2);
    assert_eq!(t.invalid_settings.len(), 1);
}

#[test]
fn static_resolution_leaves_dns_named_instances_out() {
    let (entry, t) = one(with_attributes(
        service(
            "ns",
            "s",
            vec![
                instance("ip", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]),
                instance("name", &[("AWS_INSTANCE_CNAME", "x.example.com")]),
            ],
        ),
        &[("cloudmap-xds/resolution", "STATIC")],
    ));
    assert_eq!(entry.spec.resolution(), Resolution::Static);
    assert_eq!(entry.spec.endpoints.len(), 1);
    assert_eq!(t.skipped[0].reason.kind(), "not_an_ip");
}

#[test]
fn resolution_none_lists_no_endpoints_but_keeps_the_addresses() {
    let (entry, _) = one(with_attributes(
        service(
            "ns",
            "s",
            vec![
                instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.2")]),
                instance("b", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]),
            ],
        ),
        &[("cloudmap-xds/resolution", "NONE"), ("cloudmap-xds/addresses", "all")],
    ));
    assert_eq!(entry.spec.resolution(), Resolution::None);
    assert!(entry.spec.endpoints.is_empty());
    assert_eq!(entry.spec.addresses, ["10.0.0.1", "10.0.0.2"]);
}

#[test]
fn address_modes() {
    let tasks = || {
        vec![
            instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.9")]),
            instance("b", &[("AWS_INSTANCE_IPV4", "10.0.0.10")]),
            instance("c", &[("AWS_INSTANCE_IPV6", "2001:db8::1")]),
        ]
    };
    let addresses = |mode: &str| {
        let (entry, t) =
            one(with_attributes(service("ns", "s", tasks()), &[("cloudmap-xds/addresses", mode)]));
        (entry.spec.addresses, t.invalid_settings.len())
    };
    assert_eq!(addresses("lowest"), (vec!["10.0.0.9".to_string()], 0));
    assert_eq!(addresses("all"), (vec!["10.0.0.9".into(), "10.0.0.10".into(), "2001:db8::1".into()], 0));
    assert_eq!(addresses("none"), (vec![], 0));
    assert_eq!(addresses("240.240.0.1"), (vec!["240.240.0.1".into()], 0));
    assert_eq!(addresses("10.0.0.0/24"), (vec!["10.0.0.0/24".into()], 0));
    // With DNS resolution (a DNS-named instance), lowest/all give none, and a CIDR is refused.
    let dns = || {
        vec![
            instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.9")]),
            instance("n", &[("AWS_INSTANCE_CNAME", "x.example.com")]),
        ]
    };
    let (entry, t) = one(with_attributes(service("ns", "s", dns()), &[("cloudmap-xds/addresses", "all")]));
    assert!(entry.spec.addresses.is_empty() && t.invalid_settings.is_empty());
    let (entry, t) =
        one(with_attributes(service("ns", "s", dns()), &[("cloudmap-xds/addresses", "10.0.0.0/24")]));
    assert!(entry.spec.addresses.is_empty());
    assert!(t.invalid_settings[0].setting.reason.contains("CIDR"), "{:?}", t.invalid_settings);
}

#[test]
fn export_to_dot_next_to_the_publish_namespace_is_refused_as_istiod_would() {
    let (entry, t) =
        one(with_attributes(service("ns", "s", vec![]), &[("cloudmap-xds/export-to", ".,istio-system")]));
    assert!(entry.spec.export_to.is_empty());
    assert_eq!(t.invalid_settings[0].setting.kind(), "export-to");
}

#[test]
fn explain_says_where_everything_came_from() {
    let mut sick = instance("sick", &[("AWS_INSTANCE_IPV4", "10.0.0.3"), ("AWS_INSTANCE_PORT", "32771")]);
    sick.health = Health::Unhealthy;
    let mut instances = ecs_tasks();
    instances.push(sick);
    instances.push(instance("broken", &[("AWS_INSTANCE_IPV4", "10.0.0.300")]));
    let svc = with_attributes(
        service("ns", "api", instances),
        &[("cloudmap-xds/ports", "http=80/HTTP"), ("cloudmap-xds/location", "nowhere")],
    );
    let mut options = options();
    options.defaults.export_to = Some(vec!["team-a".into()]);
    let registry = Registry::new(vec![svc, service("ns", "other", vec![])]);
    for target in ["cloudmap-api.ns", "istio-system/cloudmap-api.ns", "ns/api"] {
        let (service, e) = explain(&registry, target, &options).unwrap();
        assert_eq!(service.name, "api");
        assert_eq!(e.name, "cloudmap-api.ns");
        assert_eq!(e.ports_origin, settings::Origin::Attribute(settings::PORTS_KEY));
        assert_eq!(e.location.origin, settings::Origin::Default);
        assert_eq!(e.export_to.origin, settings::Origin::Flag(settings::EXPORT_TO_FLAG));
        assert_eq!(e.resolution.origin, settings::Origin::Default);
        assert_eq!(e.invalid_settings.len(), 1);
        assert_eq!(e.health_filtered, [("sick".to_string(), Health::Unhealthy)]);
        assert_eq!(
            e.skipped,
            [(
                "broken".to_string(),
                SkipReason::InvalidAddress { attribute: "AWS_INSTANCE_IPV4", value: "10.0.0.300".into() }
            )]
        );
        assert_eq!(e.endpoint_instances, [vec!["t1".to_string()], vec!["t2".into()], vec!["t3".into()]]);
    }
    assert!(explain(&registry, "cloudmap-nothing.ns", &options).is_none());
}

#[test]
fn explain_notes_what_the_addresses_cost_or_catch() {
    let tasks = || {
        (1..=3)
            .map(|n| {
                let ip = format!("10.0.0.{n}");
                instance(&format!("t{n}"), &[("AWS_INSTANCE_IPV4", &ip), ("AWS_INSTANCE_PORT", "5432")])
            })
            .collect::<Vec<_>>()
    };
    let notes = |attrs: &[(&str, &str)]| {
        let (_, e) = explain(
            &Registry::new(vec![with_attributes(service("ns", "pg", tasks()), attrs)]),
            "ns/pg",
            &options(),
        )
        .unwrap();
        e.notes
    };
    assert_eq!(notes(&[]), Vec::<String>::new(), "lowest, the default, needs no note");
    let all = notes(&[("cloudmap-xds/addresses", "all")]);
    assert_eq!(all.len(), 1, "{all:?}");
    assert!(all[0].contains("3 listeners per TCP port") && all[0].contains("3 x 3 = 9 endpoints"), "{all:?}");
    let none = notes(&[("cloudmap-xds/addresses", "none")]);
    assert_eq!(none.len(), 1, "{none:?}");
    assert!(none[0].contains("port(s) 5432 on a wildcard listener"), "{none:?}");
    // HTTP and TLS are told apart by Host or SNI: no address needed, no note.
    assert_eq!(
        notes(&[("cloudmap-xds/addresses", "none"), ("cloudmap-xds/ports", "http=5432/HTTP")]),
        Vec::<String>::new()
    );
    assert_eq!(
        notes(&[("cloudmap-xds/addresses", "none"), ("cloudmap-xds/ports", "5432/TLS")]),
        Vec::<String>::new()
    );
    // A DNS-named TCP endpoint gets no address from lowest either.
    let db = service(
        "ns",
        "db",
        vec![instance("rds", &[("AWS_INSTANCE_CNAME", "db.example.com"), ("AWS_INSTANCE_PORT", "5432")])],
    );
    let (_, e) = explain(&Registry::new(vec![db]), "ns/db", &options()).unwrap();
    assert!(e.notes.iter().any(|n| n.contains("wildcard listener")), "{:?}", e.notes);
}

#[test]
fn an_all_numeric_top_level_label_is_never_emitted() {
    // istiod: "top level domain \"2024\" cannot be all-numeric", for hosts and DNS endpoints.
    let t = translate(
        &Registry::new(vec![
            service("2024", "api", vec![]),
            service("corp.local", "web", vec![instance("c", &[("AWS_INSTANCE_CNAME", "db.10")])]),
            service("corp.local", "ip", vec![instance("i", &[("AWS_INSTANCE_CNAME", "10.1.2.3")])]),
        ]),
        &options(),
    );
    let skipped: Vec<_> = t.skipped.iter().map(|s| (s.service.as_str(), s.reason.kind())).collect();
    assert_eq!(skipped, [("api", "invalid_host"), ("web", "invalid_address")]);
    let ip = t.entries.iter().find(|e| e.origin.1 == "ip").unwrap();
    assert_eq!(ip.spec.endpoints[0].address, "10.1.2.3");
    assert_eq!(ip.spec.resolution(), Resolution::Dns);
}

#[test]
fn one_service_reports_skips_as_the_whole_registry_does() {
    // A registry file may repeat an instance id; the snapshot builder sums per-service reports.
    let broken = instance("i-1", &[("AWS_INSTANCE_PORT", "x"), ("bad key", "v")]);
    let svc = service("ns", "s", vec![broken.clone(), broken]);
    let one = translate_service(&svc, &options());
    let all = translate(&Registry::new(vec![svc]), &options());
    assert_eq!(one.skipped, all.skipped);
    assert_eq!(one.skipped_labels, all.skipped_labels);
    assert_eq!((one.skipped.len(), one.skipped_labels.len()), (1, 1));
}

#[test]
fn trimming_is_what_str_trim_gives() {
    for value in [
        "", " ", "a", " a", "a ", "\ta\n", "80\x0b", "\x0b80", "\x0c80\r", "80\x1c", "\u{a0}a", "a\u{a0}",
        "\u{3000}", "é", " é ", "10.0.0.1", "x y",
    ] {
        assert_eq!(trim(value), value.trim(), "{value:?}");
    }
}

#[test]
fn ipv4_parsing_is_what_std_gives() {
    let listed = [
        "",
        ".",
        "1.2.3",
        "1.2.3.4",
        "1.2.3.4.",
        ".1.2.3.4",
        "1.2.3.4.5",
        "0.0.0.0",
        "255.255.255.255",
        "1.2.3.4 ",
        " 1.2.3.4",
        "1..2.3",
        "1.2.3.-4",
        "+1.2.3.4",
        "1.2.3.4/24",
        "1000.1.1.1",
        "0001.1.1.1",
        "1.2.3.٣",
        "a.b.c.d",
        "1.x.3.4",
        "10.0.0.1:80",
        "1.2.3.4\0",
    ];
    let mut values: Vec<String> = listed.iter().map(|v| (*v).to_owned()).collect();
    // Every string of up to seven of these characters with at most three dots.
    let alphabet = ['0', '1', '2', '5', '9', '.'];
    let mut frontier = vec![String::new()];
    for _ in 0..7 {
        frontier = frontier
            .iter()
            .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
            .filter(|v| v.matches('.').count() <= 3)
            .collect();
        values.extend(frontier.iter().cloned());
    }
    // Every octet value and spelling in each position.
    for octet in 0..1000 {
        for spelled in [format!("{octet}"), format!("0{octet}"), format!("{octet:03}")] {
            for at in 0..4 {
                let mut parts = ["1", "2", "3", "4"].map(String::from);
                parts[at] = spelled.clone();
                values.push(parts.join("."));
            }
        }
    }
    for value in &values {
        assert_eq!(parse_ipv4(value), value.parse::<Ipv4Addr>().ok(), "{value:?}");
    }
}

#[test]
fn rewritten_and_long_hosts_keep_their_names() {
    // Names pinned as released: a ServiceEntry renamed by an upgrade is a delete and a create in istiod.
    let options = options();
    for (namespace, name, expected) in [
        ("Prod_NS", "My_Service", "cloudmap-my-service.prod-ns-b3064fe3".to_owned()),
        (&"N".repeat(60), "svc", format!("cloudmap-svc.{}-4f82c819", "n".repeat(54))),
        ("prod-ns", "my-service", "cloudmap-my-service.prod-ns".to_owned()),
    ] {
        let svc = service(namespace, name, vec![instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1")])]);
        let t = translate_service(&svc, &options);
        assert_eq!(t.entries[0].name, expected);
        let encoded =
            translate_service_encoded(&svc, &options, &mut KeyRoles::default()).entry.map(|e| e.mcp_name);
        assert_eq!(encoded, Some(format!("istio-system/{expected}")));
    }
}

#[test]
fn dns_subdomains_are_checked_label_by_label() {
    // The rule as Kubernetes states it, label by label.
    let reference = |name: &str| {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= MAX_DNS_LABEL
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        name.len() <= MAX_DNS_NAME && name.split('.').all(label_ok)
    };
    let mut names: Vec<String> = Vec::new();
    let alphabet = ['a', '0', '-', '.', 'A', '_'];
    let mut frontier = vec![String::new()];
    for _ in 0..6 {
        frontier = frontier.iter().flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}"))).collect();
        names.extend(frontier.iter().cloned());
    }
    for label in [62, 63, 64] {
        names.push("a".repeat(label));
        names.push(format!("{}.b", "a".repeat(label)));
        names.push(format!("b.{}", "a".repeat(label)));
    }
    let long = |total: usize| {
        let mut name = vec!["a".repeat(63); 4].join(".");
        name.truncate(total);
        name
    };
    names.extend([long(252), long(253), long(254), "é.a".into(), "a.é".into(), String::new()]);
    for name in &names {
        assert_eq!(is_dns_subdomain(name), reference(name), "{name:?}");
    }
}

#[test]
fn endpoints_of_every_size_are_written_as_prost_writes_them() {
    // Each endpoint's length prefix is reserved at the size of the one before:
    // lengths of one, two and three varint bytes, in turn, must still come out exact.
    let labels = |count: usize, value_len: usize| -> Vec<(String, String)> {
        (0..count)
            .map(|i| (format!("{0}.{0}.{0}.example.com/key-{i:03}", "k".repeat(60)), "v".repeat(value_len)))
            .collect()
    };
    let sizes = [(0, 0), (4, 10), (0, 0), (70, 63), (1, 5), (70, 63), (0, 0)];
    let instances = sizes
        .iter()
        .enumerate()
        .map(|(i, (count, value_len))| {
            let mut attributes = vec![("AWS_INSTANCE_IPV4".to_owned(), format!("10.0.0.{}", i + 1))];
            attributes.extend(labels(*count, *value_len));
            Instance {
                id: format!("i-{i}"),
                health: Health::Healthy,
                attributes: attributes.into_iter().collect(),
            }
        })
        .collect();
    let (entry, _) = one(service("ns", "sizes", instances));
    // In address order, as listed: every move between one-, two- and three-byte prefixes.
    let prefix_sizes: Vec<usize> = entry
        .spec
        .endpoints
        .iter()
        .map(|e| prost::encoding::encoded_len_varint(e.encoded_len() as u64))
        .collect();
    assert_eq!(prefix_sizes, [1, 2, 1, 3, 2, 3, 1]);
}
