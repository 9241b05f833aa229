//! Snapshot cost on the path production runs (`snapshot::Builder`, as the publish
//! loop calls it): a full translate + encode (the first build, or every service
//! changed), one changed service, and the resources field a push encodes once for every stream.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod common;

use std::sync::Arc;

use cloudmap_xds::snapshot::Builder;
use cloudmap_xds::source::registry_file;
use cloudmap_xds::translate;
use common::{change, generated, options};
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group};
use prost::Message;

fn bench(c: &mut Criterion) {
    let example =
        registry_file::load(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/registry.yaml").as_ref())
            .expect("example registry parses");
    let mut group = c.benchmark_group("snapshot_build");
    group.bench_function("example_file", |b| b.iter(|| Builder::new(options()).build(&example)));
    for (services, instances) in [(1_000, 10), (10_000, 1), (10_000, 10)] {
        let registry = generated(services, instances);
        let shape = format!("{services}x{instances}");
        group.sample_size(10);
        // A fresh builder: every service translated and encoded, as at start-up. The builder
        // and snapshot are dropped outside the timing: production keeps them.
        group.bench_with_input(BenchmarkId::new("full", &shape), &registry, |b, r| {
            b.iter_batched(
                || Builder::new(options()),
                |mut builder| {
                    let snapshot = builder.build(r);
                    (builder, snapshot)
                },
                BatchSize::LargeInput,
            )
        });
        // The message path (`translate()`, which render and the debug views use) and prost's
        // encoding of its entries: what the full build cost before translate wrote the bytes itself.
        group.bench_with_input(BenchmarkId::new("translate_only", &shape), &registry, |b, r| {
            b.iter(|| translate::translate(r, &options()).entries.len())
        });
        let entries = translate::translate(&registry, &options()).entries;
        group.bench_with_input(BenchmarkId::new("prost_encode_only", &shape), &entries, |b, entries| {
            b.iter(|| entries.iter().map(|e| e.spec.encode_to_vec().len()).sum::<usize>())
        });
        let snapshot = Arc::new(Builder::new(options()).build(&registry));
        eprintln!(
            "{services} services x {instances} instances: {} ServiceEntries, {} bytes encoded",
            snapshot.resources.len(),
            snapshot.encoded_len()
        );
        // One service changed: the incremental builder re-translates and re-encodes only it.
        let changed = change(&registry, 1);
        let mut builder = Builder::new(options());
        builder.build(&registry);
        let mut flip = false;
        group.bench_function(BenchmarkId::new("one_service_changed", &shape), |b| {
            b.iter(|| {
                flip = !flip;
                builder.build(if flip { &changed } else { &registry })
            })
        });
        // What a push pays once, whatever the number of streams: the resources field encoded
        // into the buffer every stream shares (each stream adds only its envelope). Nothing
        // holds the buffer between iterations, so each one encodes it anew.
        group.bench_function(BenchmarkId::new("resources_field_encode", &shape), |b| {
            b.iter(|| snapshot.resources_field().len())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);

fn main() {
    // As the binary runs: one malloc arena (see `memory`).
    cloudmap_xds::memory::use_one_arena();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
