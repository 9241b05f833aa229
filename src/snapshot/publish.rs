//! The snapshot stage's loop: every new registry from the source becomes a
//! snapshot, published when its content changed, with its skips logged once and
//! its figures recorded as metrics.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{Builder, Publisher, Snapshot};
use crate::metrics::{Metrics, ReasonLabels, SettingLabels};
use crate::model::Registry;
use crate::supervise;
use crate::translate::{Options, SettingProblem, Skipped, SkippedLabel};

/// Translates every new registry and publishes the snapshot when its content changed,
/// until `shutdown` fires or the source goes away. Each build runs on the blocking
/// pool, never on the async workers that serve streams and probes.
///
/// Publications are at least `min_push_interval` apart: every publication costs
/// each istiod a decode of the full set, so changes that arrive within the
/// interval after one are coalesced into the next, at its end. A change after a
/// quiet interval is published at once.
pub async fn run(
    mut registries: watch::Receiver<Option<Arc<Registry>>>,
    options: Options,
    publisher: Publisher,
    metrics: Metrics,
    min_push_interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut stage = Stage {
        builder: Builder::new(options),
        logged_skips: BTreeSet::new(),
        logged_labels: BTreeSet::new(),
        logged_settings: BTreeSet::new(),
        last_lists: None,
        publisher,
        metrics,
    };
    let mut last_published: Option<Instant> = None;
    loop {
        let registry = registries.borrow_and_update().clone();
        if let Some(registry) = registry {
            let published;
            (stage, published) = match tokio::task::spawn_blocking(move || {
                let published = stage.publish(&registry);
                (stage, published)
            })
            .await
            {
                Ok(done) => done,
                Err(err) => {
                    error!(error = %err, "snapshot build failed; no further snapshots are published");
                    return;
                }
            };
            if published {
                last_published = Some(Instant::now());
            }
        }
        let source_ended = tokio::select! {
            changed = registries.changed() => changed.is_err(),
            _ = shutdown.wait_for(|d| *d) => return,
        };
        if source_ended {
            // The source's own task reports its end; this one waits to be stopped.
            return supervise::upstream_ended().await;
        }
        if let Some(last) = last_published {
            tokio::select! {
                _ = tokio::time::sleep_until((last + min_push_interval).into()) => {}
                _ = shutdown.wait_for(|d| *d) => return,
            }
        }
    }
}

/// A snapshot's skipped instances, unusable settings and count of skipped labels.
type Lists = (Arc<[Skipped]>, Arc<[SettingProblem]>, usize);

/// The builder and what was logged, carried from one registry to the next.
struct Stage {
    builder: Builder,
    logged_skips: BTreeSet<Skipped>,
    logged_labels: BTreeSet<SkippedLabel>,
    logged_settings: BTreeSet<SettingProblem>,
    /// The skip and setting lists last logged and counted: the builder shares them
    /// until they change, so an unchanged list costs nothing to recognise.
    last_lists: Option<Lists>,
    publisher: Publisher,
    metrics: Metrics,
}

impl Stage {
    /// Builds `registry` and publishes it when it changed what is served; returns whether it did. CPU-bound.
    fn publish(&mut self, registry: &Registry) -> bool {
        let started = Instant::now();
        let snapshot = self.builder.build(registry);
        self.metrics.snapshot.build_duration.observe(started.elapsed().as_secs_f64());
        let lists_changed = self.last_lists.as_ref().is_none_or(|(skipped, invalid, labels)| {
            !Arc::ptr_eq(skipped, &snapshot.skipped)
                || !Arc::ptr_eq(invalid, &snapshot.invalid_settings)
                || *labels != snapshot.skipped_labels
        });
        if lists_changed {
            log_new_skips(
                &snapshot.skipped,
                &mut self.logged_skips,
                self.builder.skipped_labels(),
                &mut self.logged_labels,
            );
            log_new_invalid_settings(&snapshot.invalid_settings, &mut self.logged_settings);
            record_list_metrics(&self.metrics, &snapshot);
            self.last_lists =
                Some((snapshot.skipped.clone(), snapshot.invalid_settings.clone(), snapshot.skipped_labels));
        }
        record_build_metrics(&self.metrics, &snapshot, registry.services.len());
        let (version, entries, endpoints) =
            (snapshot.version.clone(), snapshot.resources.len(), snapshot.endpoints);
        let published = if registry.complete {
            self.publisher.publish(snapshot)
        } else {
            self.publisher.publish_partial(snapshot)
        };
        record_served_metrics(&self.metrics, &self.publisher.current());
        // A build frees about as much as it keeps (the old snapshot, the encoding buffers).
        crate::memory::trim();
        if published {
            self.metrics.snapshot.published.inc();
            info!(%version, service_entries = entries, endpoints, "snapshot published");
        }
        published
    }
}

/// Logs each skipped instance and label once, not on every rebuild.
fn log_new_skips<'a>(
    skipped: &[Skipped],
    logged: &mut BTreeSet<Skipped>,
    labels: impl Iterator<Item = &'a SkippedLabel>,
    logged_labels: &mut BTreeSet<SkippedLabel>,
) {
    for s in skipped.iter().filter(|s| !logged.contains(*s)) {
        warn!(namespace = %s.namespace, service = %s.service, instance = s.instance.as_deref().unwrap_or("-"), reason = %s.reason, "instance skipped");
    }
    *logged = skipped.iter().cloned().collect();
    let labels: BTreeSet<SkippedLabel> = labels.cloned().collect();
    for l in labels.difference(logged_labels) {
        warn!(namespace = %l.namespace, service = %l.service, key = %l.key, "custom attribute is not a valid label key/value; not used as a label");
    }
    *logged_labels = labels;
}

/// Logs each unusable service attribute once, not on every rebuild.
fn log_new_invalid_settings(problems: &[SettingProblem], logged: &mut BTreeSet<SettingProblem>) {
    for p in problems.iter().filter(|p| !logged.contains(*p)) {
        warn!(namespace = %p.namespace, service = %p.service, key = %p.setting.key, value = %p.setting.value, reason = %p.setting.reason, "service attribute ignored; the setting falls back to the flag or default");
    }
    *logged = problems.iter().cloned().collect();
}

fn record_build_metrics(metrics: &Metrics, snapshot: &Snapshot, services: usize) {
    metrics.snapshot.skipped_labels.set(i64::try_from(snapshot.skipped_labels).unwrap_or(i64::MAX));
    metrics.source.services.set(i64::try_from(services).unwrap_or(i64::MAX));
}

/// The gauges of the set being served: after an own build (published or turned away in
/// favour of a borrowed set) and after a peer's push (`bootstrap`).
pub(crate) fn record_served_metrics(metrics: &Metrics, served: &Snapshot) {
    let m = &metrics.snapshot;
    m.service_entries.set(i64::try_from(served.resources.len()).unwrap_or(i64::MAX));
    m.endpoints.set(i64::try_from(served.endpoints).unwrap_or(i64::MAX));
    m.encoded_bytes.set(i64::try_from(served.encoded_len()).unwrap_or(i64::MAX));
}

/// The skip and setting counters; only when those lists changed.
fn record_list_metrics(metrics: &Metrics, snapshot: &Snapshot) {
    let m = &metrics.snapshot;
    m.skipped_instances.clear();
    for s in snapshot.skipped.iter() {
        m.skipped_instances.get_or_create(&ReasonLabels { reason: s.reason.kind() }).inc();
    }
    m.invalid_settings.clear();
    for p in snapshot.invalid_settings.iter() {
        m.invalid_settings.get_or_create(&SettingLabels { setting: p.setting.kind() }).inc();
    }
}
