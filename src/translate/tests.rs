use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::*;
use crate::model::Health;

fn options() -> Options {
    Options { publish_namespace: "istio-system".into(), health_filter: HealthFilter::HealthyOrElseAll }
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
        instances,
    }
}

fn one(svc: Service) -> (Entry, Translation) {
    let t = translate(&Registry::new(vec![svc]), &options());
    assert_eq!(t.entries.len(), 1, "{t:?}");
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
fn instance_ports_name_80_http_443_https_others_unique_tcp() {
    let (entry, _) = one(service(
        "ns",
        "web",
        vec![
            instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1"), ("AWS_INSTANCE_PORT", "443")]),
            instance("b", &[("AWS_INSTANCE_IPV4", "10.0.0.2"), ("AWS_INSTANCE_PORT", "80")]),
            instance("c", &[("AWS_INSTANCE_IPV4", "10.0.0.3"), ("AWS_INSTANCE_PORT", "9090")]),
            instance("d", &[("AWS_INSTANCE_IPV4", "10.0.0.4"), ("AWS_INSTANCE_PORT", "8080")]),
        ],
    ));
    let spec = &entry.spec;
    assert_eq!(
        service_ports(spec),
        [(80, "http", "HTTP"), (443, "https", "HTTPS"), (8080, "tcp-8080", "TCP"), (9090, "tcp-9090", "TCP")]
    );
    let names: BTreeSet<_> = spec.ports.iter().map(|p| &p.name).collect();
    assert_eq!(names.len(), spec.ports.len(), "port names are unique");
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
fn instances_without_port_keep_the_service_port_numbers() {
    let (entry, _) = one(service(
        "ns",
        "mixed",
        vec![
            instance("a", &[("AWS_INSTANCE_IPV4", "10.0.0.1")]),
            instance("b", &[("AWS_INSTANCE_IPV4", "10.0.0.2"), ("AWS_INSTANCE_PORT", "8080")]),
        ],
    ));
    let spec = &entry.spec;
    assert_eq!(
        service_ports(spec),
        [(80, "http", "HTTP"), (443, "https", "HTTPS"), (8080, "tcp-8080", "TCP")]
    );
    assert_eq!(ports_of(&spec.endpoints[0]), [("http", 80), ("https", 443), ("tcp-8080", 8080)]);
    assert_eq!(ports_of(&spec.endpoints[1]), [("http", 8080), ("https", 8080), ("tcp-8080", 8080)]);
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
