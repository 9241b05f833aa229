//! Property tests over generated registries (strategies in `properties/strategies.rs`):
//!
//! - translation through `snapshot::Builder` (the path production uses) never panics and gives the
//!   same bytes and versions whatever the order of services and instances;
//! - every ServiceEntry it emits is accepted by istio's own validation code (`$SE_VALIDATE_BIN`,
//!   tools/se-validate: istiod 1.26's MCP conversion and config-store validation);
//! - the registry-file parser turns arbitrary and mutated input into a located or clearly worded
//!   error, never a panic, and reads back what a valid file says.
//!
//! Size: `CLOUDMAP_XDS_PROPTEST_SERVICES` generated services for the validator property (default
//! 3,000, what CI runs); the other properties scale their case counts with it. The seed is fixed
//! unless `CLOUDMAP_XDS_PROPTEST_SEED` gives one (a number, or `random`). The long run is
//! `scripts/proptest-long` (see tests/README.md).

#[path = "properties/strategies.rs"]
mod strategies;
mod support;

use std::cell::RefCell;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use cloudmap_xds::model::{HealthFilter, Registry, Service};
use cloudmap_xds::snapshot::{Builder, Snapshot};
use cloudmap_xds::source::registry_file::{self, Error};
use cloudmap_xds::translate::{Options, translate};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use strategies::Case;
use support::se_validate::SeValidate;

/// Generated services the validator property checks when nothing else is asked for.
const DEFAULT_SERVICES: u64 = 3_000;
/// The seed of every run that does not ask for another, so CI runs the same cases each time.
const DEFAULT_SEED: u64 = 0x00c1_0dd5_ea7e_11ed;
/// Cases per validator runner; the loop runs runners until enough services were generated.
const VALIDATOR_CHUNK: u32 = 500;
/// What istiod 1.26 asks for (`ISTIOD_SE_TYPE_URL`); the store kind follows from it.
const SE_TYPE_URL: &str = "networking.istio.io/v1/ServiceEntry";

fn target_services() -> u64 {
    match std::env::var("CLOUDMAP_XDS_PROPTEST_SERVICES") {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("CLOUDMAP_XDS_PROPTEST_SERVICES={v:?} is not a number")),
        Err(_) => DEFAULT_SERVICES,
    }
}

/// Case counts for the properties other than the validator one, scaled with the run's size.
fn scaled_cases(at_default: u32) -> u32 {
    let scale = (target_services() / DEFAULT_SERVICES).max(1);
    u32::try_from(u64::from(at_default) * scale).unwrap_or(u32::MAX)
}

fn base_seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| match std::env::var("CLOUDMAP_XDS_PROPTEST_SEED").as_deref() {
        Err(_) => DEFAULT_SEED,
        Ok("random") => {
            let seed = fastrand::u64(..);
            eprintln!("CLOUDMAP_XDS_PROPTEST_SEED={seed} (reproduce a failure with this)");
            seed
        }
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("CLOUDMAP_XDS_PROPTEST_SEED={v:?} is not a number")),
    })
}

fn runner(cases: u32, seed: u64) -> TestRunner {
    TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        // The seed reproduces a failure; no regression files in the tree.
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    })
}

/// Runs a property; on failure panics with the reason and the minimal input proptest found.
fn check<S: Strategy>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let seed = base_seed();
    match runner(cases, seed).run(&strategy, test) {
        Ok(()) => {}
        Err(TestError::Fail(reason, input)) => {
            panic!("{name} failed (seed {seed}): {reason}\nminimal input: {input:#?}")
        }
        Err(TestError::Abort(reason)) => panic!("{name} aborted (seed {seed}): {reason}"),
    }
}

// ---- translation ---------------------------------------------------------------------------------

/// The same registry with services and every service's instances in another order.
fn shuffled(registry: &Registry, seed: u64) -> Registry {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut services: Vec<Arc<Service>> = registry
        .services
        .iter()
        .map(|s| {
            let mut s = Service::clone(s);
            rng.shuffle(&mut s.instances);
            Arc::new(s)
        })
        .collect();
    rng.shuffle(&mut services);
    Registry::shared(services)
}

fn same_output(a: &Snapshot, b: &Snapshot, what: &str) -> Result<(), TestCaseError> {
    let names =
        |s: &Snapshot| s.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect::<Vec<_>>();
    prop_assert_eq!(names(a), names(b), "{}: resource names or versions differ", what);
    prop_assert!(a.encoded_resources() == b.encoded_resources(), "{}: encoded bytes differ", what);
    prop_assert_eq!(&a.version, &b.version, "{}: snapshot versions differ", what);
    prop_assert_eq!(&a.skipped, &b.skipped, "{}: skipped lists differ", what);
    prop_assert_eq!(a.skipped_labels, b.skipped_labels, "{}: skipped label counts differ", what);
    Ok(())
}

#[test]
fn translation_is_deterministic_under_shuffling() {
    check("determinism", scaled_cases(200), (strategies::case(), any::<u64>()), |(case, seed)| {
        let Case { registry, options } = case;
        let reordered = shuffled(&registry, seed);
        let first = Builder::new(options.clone()).build(&registry);
        let again = Builder::new(options.clone()).build(&reordered);
        same_output(&first, &again, "a fresh builder on the shuffled registry")?;
        // The one-shot path (`render`, `translate()` + `Snapshot::build`) agrees with the builder.
        same_output(
            &first,
            &Snapshot::build(translate(&reordered, &options)),
            "translate + Snapshot::build",
        )?;
        // An incremental builder that saw the other order first agrees too.
        let mut incremental = Builder::new(options);
        incremental.build(&reordered);
        same_output(&first, &incremental.build(&registry), "an incremental builder")?;
        Ok(())
    });
}

#[derive(Debug, Default)]
struct Totals {
    cases: u64,
    services: u64,
    entries: u64,
    endpoints: u64,
    warnings: u64,
}

#[test]
fn every_service_entry_passes_istio_validation() {
    let target = target_services();
    let validator = RefCell::new(SeValidate::start(SE_TYPE_URL));
    let totals = RefCell::new(Totals::default());
    let started = Instant::now();
    let mut chunk = 0u64;
    while totals.borrow().services < target {
        let seed = base_seed().wrapping_add(chunk);
        let result = runner(VALIDATOR_CHUNK, seed).run(&strategies::case(), |case| {
            let snapshot = Builder::new(case.options.clone()).build(&case.registry);
            let report = validator.borrow_mut().validate(&snapshot.encoded_resources());
            {
                let mut t = totals.borrow_mut();
                t.cases += 1;
                t.services += case.registry.services.len() as u64;
                t.entries += report.resources as u64;
                t.endpoints += snapshot.endpoints as u64;
                t.warnings += report.warnings as u64;
            }
            if report.rejections.is_empty() {
                return Ok(());
            }
            let mut reasons =
                format!("istio rejected {} of {} ServiceEntries:\n", report.rejected, report.resources);
            for r in &report.rejections {
                let resource = &snapshot.resources[r.index];
                let service = case
                    .registry
                    .services
                    .iter()
                    .find(|s| (&s.namespace, &s.name) == (&resource.origin.0, &resource.origin.1));
                let _ = writeln!(
                    reasons,
                    "- {} ({} check): {}\n  generated service: {service:#?}\n  emitted spec: {:#?}",
                    r.name,
                    r.check,
                    r.error,
                    resource.spec()
                );
            }
            Err(TestCaseError::fail(reasons))
        });
        match result {
            Ok(()) => {}
            Err(TestError::Fail(reason, input)) => {
                panic!("seed {seed}: {reason}\nminimal generated input: {input:#?}")
            }
            Err(TestError::Abort(reason)) => panic!("seed {seed}: aborted: {reason}"),
        }
        chunk += 1;
    }
    let t = totals.into_inner();
    eprintln!(
        "istio validation: {} cases, {} generated services, {} ServiceEntries ({} endpoints) validated, \
         0 rejected, {} with warnings, in {:.1?} (seed {})",
        t.cases,
        t.services,
        t.entries,
        t.endpoints,
        t.warnings,
        started.elapsed(),
        base_seed()
    );
    // Guards the generator: most generated services must give an entry, or the property
    // would pass by skipping everything.
    assert!(t.entries * 2 > t.services, "only {} of {} services gave an entry", t.entries, t.services);
}

/// The check can fail: ServiceEntries istiod drops are reported, each with its reason, and
/// warnings (which istiod accepts) are not rejections.
#[test]
fn the_validator_rejects_what_istiod_rejects() {
    use cloudmap_xds::proto::SharedAny;
    use cloudmap_xds::proto::istio::mcp::v1alpha1::{Metadata, Resource};
    use cloudmap_xds::proto::istio::networking::v1alpha3::service_entry::Resolution;
    use cloudmap_xds::proto::istio::networking::v1alpha3::{ServiceEntry, ServicePort, WorkloadEntry};
    use cloudmap_xds::snapshot::{MCP_RESOURCE_TYPE_URL, SERVICE_ENTRY_BODY_TYPE_URL};
    use prost::Message;

    let golden = Registry::new(vec![Service {
        namespace: "my-namespace".into(),
        name: "getmesh-external-service".into(),
        created: UNIX_EPOCH,
        attributes: Default::default(),
        instances: vec![cloudmap_xds::model::Instance {
            id: "i-1".into(),
            health: cloudmap_xds::model::Health::Healthy,
            attributes: [("AWS_INSTANCE_IPV4".to_string(), "52.192.72.89".to_string())].into(),
        }],
    }]);
    let options = Options::new("istio-system", HealthFilter::All);
    let mut resources = Builder::new(options).build(&golden).encoded_resources();
    let encode = |name: &str, spec: ServiceEntry| SharedAny {
        type_url: MCP_RESOURCE_TYPE_URL.into(),
        value: Resource {
            metadata: Some(Metadata { name: name.into(), ..Default::default() }),
            body: Some(SharedAny {
                type_url: SERVICE_ENTRY_BODY_TYPE_URL.into(),
                value: spec.encode_to_vec().into(),
            }),
        }
        .encode_to_vec()
        .into(),
    };
    let http = ServicePort { number: 80, protocol: "HTTP".into(), name: "http".into(), target_port: 0 };
    let spec = |host: &str| ServiceEntry {
        hosts: vec![host.into()],
        ports: vec![http.clone()],
        ..Default::default()
    };
    resources.push(encode("istio-system/numeric-tld", spec("api.2024")));
    let mut undeclared_port = spec("api.example.com");
    undeclared_port.resolution = Resolution::Static.into();
    undeclared_port.endpoints = vec![WorkloadEntry {
        address: "10.0.0.1".into(),
        ports: [("tcp-1".into(), 1)].into(),
        ..Default::default()
    }];
    resources.push(encode("istio-system/undeclared-port", undeclared_port));
    resources.push(encode("istio-system/Not_A_Name", spec("api.example.com")));
    resources.push(encode("no-namespace", spec("api.example.com")));
    resources.push(encode("istio-system/partial-wildcard", spec("*api.example.com")));

    let report = SeValidate::start(SE_TYPE_URL).validate(&resources);
    let rejected: Vec<_> = report.rejections.iter().map(|r| (r.index, r.check.as_str())).collect();
    assert_eq!(rejected, [(1, "istiod"), (2, "istiod"), (3, "kube-name"), (4, "adsc")], "{report:#?}");
    assert!(report.rejections[0].error.contains("cannot be all-numeric"), "{report:#?}");
    assert!(report.rejections[1].error.contains("not defined by the service entry"), "{report:#?}");
    assert_eq!(
        (report.accepted, report.warnings),
        (2, 1),
        "golden and partial wildcard accepted: {report:#?}"
    );
}

// ---- registry file -------------------------------------------------------------------------------

const FILE: &str = "r.yaml";

/// An error is located (line and column from 1) or says what is wrong.
fn well_formed(err: &Error) -> Result<(), TestCaseError> {
    let text = err.to_string();
    prop_assert!(text.starts_with(&format!("registry file {FILE}")), "unlabelled error: {}", text);
    match err {
        Error::Parse { line, column, message, .. } => {
            prop_assert!(*line >= 1 && *column >= 1, "error without a position: {}", text);
            prop_assert!(!message.trim().is_empty(), "error without a message: {}", text);
        }
        Error::Invalid { message, .. } => prop_assert!(!message.trim().is_empty(), "empty message: {}", text),
        Error::Read { .. } => prop_assert!(false, "parse does not read: {}", text),
    }
    Ok(())
}

fn parse_checked(text: &str) -> Result<Option<Registry>, TestCaseError> {
    match registry_file::parse(Path::new(FILE), text) {
        Ok(registry) => Ok(Some(registry)),
        Err(err) => well_formed(&err).map(|()| None),
    }
}

#[test]
fn arbitrary_text_gives_a_located_error_never_a_panic() {
    let text = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        any::<String>(),
        yaml_like(),
    ];
    check("arbitrary text", scaled_cases(1000), text, |text| parse_checked(&text).map(drop));
}

/// Text assembled from the file's own vocabulary and YAML syntax, so parsing gets past the first
/// character and into the file's structure.
fn yaml_like() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        4 => prop::sample::select(vec![
            "namespaces:", "services:", "instances:", "attributes:", "name: ", "id: ", "health: ",
            "created: ", "- ", "  ", "    ", "\n", ": ", "HEALTHY", "UNKNOWN", "AWS_INSTANCE_IPV4: ",
            "AWS_INSTANCE_PORT: ", "2024-05-01T12:00:00Z", "10.0.0.1", "8080", "[", "]", "{", "}", ",",
            "&a ", "*a", "!!str ", "!!binary ", "'", "\"", "\t", "#", "---\n", "...\n", "? ", "|\n", ">\n",
            "~", "null", "true", "1e309", "-0x1", "<<: *a", "%YAML 1.2\n",
        ])
        .prop_map(str::to_owned),
        1 => strategies::leaf(&[(1, |r| strategies::from(r, "azAZ09_.-", 1, 8))]),
        1 => strategies::leaf(&[(1, |r| strategies::unicode(r, 1, 4))]),
    ];
    proptest::collection::vec(token, 0..80).prop_map(|tokens| tokens.concat())
}

/// A YAML double-quoted scalar for any string: printable ASCII as is, everything else escaped.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if u32::from(c) <= 0xffff => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => {
                let _ = write!(out, "\\U{:08x}", u32::from(c));
            }
        }
    }
    out.push('"');
    out
}

/// A registry as a registry file, namespaces in order of first appearance.
fn render(registry: &Registry) -> String {
    let mut namespaces: Vec<(&str, Vec<&Service>)> = Vec::new();
    for s in &registry.services {
        match namespaces.iter_mut().find(|(ns, _)| *ns == s.namespace) {
            Some((_, services)) => services.push(s),
            None => namespaces.push((&s.namespace, vec![s])),
        }
    }
    let mut out = String::from("namespaces:\n");
    for (ns, services) in namespaces {
        let _ = writeln!(out, "- name: {}\n  services:", quoted(ns));
        for s in services {
            let _ = writeln!(out, "  - name: {}", quoted(&s.name));
            let _ = writeln!(out, "    created: {}", humantime::format_rfc3339_nanos(s.created));
            out.push_str("    attributes:\n");
            for (k, v) in &s.attributes {
                let _ = writeln!(out, "      {}: {}", quoted(k), quoted(v));
            }
            out.push_str("    instances:\n");
            for i in &s.instances {
                let _ = writeln!(out, "    - id: {}", quoted(&i.id));
                let _ = writeln!(out, "      health: {}", i.health.as_str());
                out.push_str("      attributes:\n");
                for (k, v) in &i.attributes {
                    let _ = writeln!(out, "        {}: {}", quoted(k), quoted(v));
                }
            }
        }
    }
    out
}

/// Registries a registry file can state: non-blank names, times from the epoch on. Small:
/// parsing cost grows with size, the error paths do not.
fn file_registry() -> impl Strategy<Value = Registry> {
    strategies::registry_sized(strategies::SMALL_SIZES).prop_map(|registry| Registry {
        complete: true,
        services: registry
            .services
            .into_iter()
            .filter(|s| !s.namespace.trim().is_empty() && !s.name.trim().is_empty())
            .map(|s| {
                let mut s = Service::clone(&s);
                s.created = s.created.max(UNIX_EPOCH);
                Arc::new(s)
            })
            .collect(),
    })
}

fn sorted(registry: &Registry) -> Vec<Service> {
    let mut services: Vec<Service> = registry.services.iter().map(|s| Service::clone(s)).collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    services
}

#[test]
fn a_rendered_registry_reads_back_unchanged() {
    check("round trip", scaled_cases(200), file_registry(), |registry| {
        let text = render(&registry);
        let parsed = registry_file::parse(Path::new(FILE), &text)
            .map_err(|e| TestCaseError::fail(format!("a valid file was rejected: {e}\n{text}")))?;
        prop_assert_eq!(sorted(&parsed), sorted(&registry));
        Ok(())
    });
}

/// One edit of a file's text.
#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
    DuplicateLine(usize),
    SwapLines(usize, usize),
    Indent { line: usize, by: i8 },
    Truncate(usize),
    ReplaceChar { at: usize, with: char },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let pos = any::<usize>();
    prop_oneof![
        (pos, 1usize..12).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (
            pos,
            prop_oneof![
                yaml_like(),
                strategies::leaf(&[
                    (1, |r| strategies::unicode(r, 1, 6)),
                    (1, |r| strategies::from(r, " \t\n:-[]{}&*!|>'\"#%@`", 1, 3)),
                ])
            ]
        )
            .prop_map(|(at, text)| Mutation::Insert { at, text }),
        pos.prop_map(Mutation::DuplicateLine),
        (pos, pos).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        (pos, -3i8..=3).prop_map(|(line, by)| Mutation::Indent { line, by }),
        pos.prop_map(Mutation::Truncate),
        (pos, any::<char>()).prop_map(|(at, with)| Mutation::ReplaceChar { at, with }),
    ]
}

fn mutate(text: &str, mutation: &Mutation) -> String {
    let chars: Vec<char> = text.chars().collect();
    let at = |i: usize| if chars.is_empty() { 0 } else { i % (chars.len() + 1) };
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let line = |i: usize| if lines.is_empty() { None } else { Some(i % lines.len()) };
    match mutation {
        Mutation::Delete { at: i, len } => {
            let start = at(*i);
            let end = (start + len).min(chars.len());
            chars[..start].iter().chain(&chars[end..]).collect()
        }
        Mutation::Insert { at: i, text } => {
            let start = at(*i);
            chars[..start].iter().copied().chain(text.chars()).chain(chars[start..].iter().copied()).collect()
        }
        Mutation::ReplaceChar { at: i, with } => {
            let mut chars = chars.clone();
            if !chars.is_empty() {
                let i = *i % chars.len();
                chars[i] = *with;
            }
            chars.into_iter().collect()
        }
        Mutation::Truncate(i) => chars[..at(*i)].iter().collect(),
        Mutation::DuplicateLine(i) => {
            if let Some(i) = line(*i) {
                lines.insert(i, lines[i].clone());
            }
            lines.join("\n")
        }
        Mutation::SwapLines(a, b) => {
            if let (Some(a), Some(b)) = (line(*a), line(*b)) {
                lines.swap(a, b);
            }
            lines.join("\n")
        }
        Mutation::Indent { line: i, by } => {
            if let Some(i) = line(*i) {
                let l = &mut lines[i];
                if *by >= 0 {
                    l.insert_str(0, &" ".repeat(usize::from(by.unsigned_abs())));
                } else {
                    let strip = l.len() - l.trim_start_matches(' ').len();
                    l.drain(..strip.min(usize::from(by.unsigned_abs())));
                }
            }
            lines.join("\n")
        }
    }
}

#[test]
fn a_mutated_file_gives_a_located_error_never_a_panic() {
    let strategy = (file_registry(), proptest::collection::vec(mutation(), 1..5));
    check("mutated file", scaled_cases(600), strategy, |(registry, mutations)| {
        let mut text = render(&registry);
        for m in &mutations {
            text = mutate(&text, m);
        }
        // Whatever still parses goes through translation like any registry.
        if let Some(parsed) = parse_checked(&text)? {
            let options = Options::new("istio-system", HealthFilter::All);
            Builder::new(options).build(&parsed);
        }
        Ok(())
    });
}
