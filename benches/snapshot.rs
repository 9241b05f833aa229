//! Snapshot build cost: translate + encode (once per change) and response assembly
//! (once per stream per change), for the example file and 10,000 generated services.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use cloudmap_xds::model::{Health, HealthFilter, Instance, Registry, Service};
use cloudmap_xds::snapshot::{Builder, Snapshot};
use cloudmap_xds::source::registry_file;
use cloudmap_xds::translate::{Options, translate};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn options() -> Options {
    Options::new("istio-system", HealthFilter::HealthyOrElseAll)
}

/// `services` services of `instances` ECS-like instances each (port, zone, 3 custom attributes).
fn generated(services: usize, instances: usize) -> Registry {
    let services = (0..services)
        .map(|s| Service {
            namespace: format!("ns-{}", s % 10),
            name: format!("service-{s}"),
            created: SystemTime::UNIX_EPOCH + Duration::from_secs(s as u64),
            attributes: Default::default(),
            instances: (0..instances)
                .map(|i| Instance {
                    id: format!("task-{s}-{i}"),
                    health: Health::Healthy,
                    attributes: BTreeMap::from([
                        ("AWS_INSTANCE_IPV4".into(), format!("10.{}.{}.{}", s / 256 % 256, s % 256, i)),
                        ("AWS_INSTANCE_PORT".into(), "8080".into()),
                        ("AVAILABILITY_ZONE".into(), format!("us-east-1{}", ['a', 'b', 'c'][i % 3])),
                        ("REGION".into(), "us-east-1".into()),
                        ("ECS_CLUSTER_NAME".into(), "prod".into()),
                        ("ECS_SERVICE_NAME".into(), format!("service-{s}")),
                        ("version".into(), "v2".into()),
                    ]),
                })
                .collect(),
        })
        .collect();
    Registry::new(services)
}

fn bench(c: &mut Criterion) {
    let example =
        registry_file::load(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/registry.yaml").as_ref())
            .expect("example registry parses");
    let mut group = c.benchmark_group("snapshot_build");
    group.bench_function("example_file", |b| b.iter(|| Snapshot::build(translate(&example, &options()))));
    for (services, instances) in [(10_000, 1), (10_000, 10)] {
        let registry = generated(services, instances);
        group.sample_size(10);
        group.bench_with_input(
            BenchmarkId::new("generated", format!("{services}x{instances}")),
            &registry,
            |b, r| b.iter(|| Snapshot::build(translate(r, &options()))),
        );
        let snapshot = Snapshot::build(translate(&registry, &options()));
        eprintln!(
            "{services} services x {instances} instances: {} ServiceEntries, {} bytes encoded",
            snapshot.resources.len(),
            snapshot.encoded_len()
        );
        // One service changed: the incremental builder re-translates and re-encodes only it.
        let mut changed = registry.clone();
        std::sync::Arc::make_mut(&mut changed.services[services / 2]).instances.pop();
        let mut builder = Builder::new(options());
        builder.build(&registry);
        let mut flip = false;
        group.bench_function(
            BenchmarkId::new("one_service_changed", format!("{services}x{instances}")),
            |b| {
                b.iter(|| {
                    flip = !flip;
                    builder.build(if flip { &changed } else { &registry })
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("response_assembly", format!("{services}x{instances}")),
            &snapshot,
            |b, s| b.iter(|| s.encoded_resources()),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
