//! The thin async loop around [`Inventory`]: each poll lists when due, checks
//! revisions, reads what changed, publishes the registry when its content
//! changed, and copies the status out. Calls run concurrently, each behind its
//! API's token bucket and a timeout, and every one is counted in
//! `cloudmap_xds_aws_calls{api,outcome}` and in its service's status.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use super::api::{Api, ApiError, CloudMapApi, Discovered, ErrorKind, NamespaceInfo, ServiceInfo};
use super::filter::NameFilter;
use super::inventory::{self, Inventory, Listing, NamespaceListing, Now, ServiceKey, Target};
use super::rate::RateLimiter;
use crate::metrics::{ApiLabels, OutcomeLabels, SourceMetrics};
use crate::source::SourceSink;

/// Calls in flight at once, whatever the rates allow: bounds sockets when Cloud Map hangs.
pub const MAX_IN_FLIGHT: usize = 32;
/// A List call that pages on beyond this is treated as failed rather than trusted.
pub const MAX_PAGES: usize = 10_000;
/// While waiting for the first complete sync, progress is logged at most this often.
const WAIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One token bucket per API family.
#[derive(Debug, Clone)]
pub struct Limits {
    /// ListNamespaces and ListServices (control plane).
    pub list: RateLimiter,
    pub discover: RateLimiter,
    pub revision: RateLimiter,
}

impl Limits {
    pub fn new(list: f64, discover: f64, revision: f64) -> Self {
        Limits {
            list: RateLimiter::new(list),
            discover: RateLimiter::new(discover),
            revision: RateLimiter::new(revision),
        }
    }

    fn for_api(&self, api: Api) -> &RateLimiter {
        match api {
            Api::ListNamespaces | Api::ListServices => &self.list,
            Api::DiscoverInstances => &self.discover,
            Api::DiscoverInstancesRevision => &self.revision,
        }
    }
}

/// Everything a call needs; cheap to clone into tasks.
struct Caller<A> {
    api: Arc<A>,
    limits: Limits,
    metrics: SourceMetrics,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
}

impl<A> Clone for Caller<A> {
    fn clone(&self) -> Self {
        Caller {
            api: self.api.clone(),
            limits: self.limits.clone(),
            metrics: self.metrics.clone(),
            timeout: self.timeout,
            in_flight: self.in_flight.clone(),
        }
    }
}

impl<A: CloudMapApi> Caller<A> {
    /// One AWS request: waits for a slot and a token, bounds the time, counts the outcome.
    async fn call<T>(
        &self,
        api: Api,
        request: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        // The semaphore is never closed, so acquiring cannot fail.
        let _slot = self.in_flight.acquire().await.ok();
        self.limits.for_api(api).acquire().await;
        let result = match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::new(ErrorKind::Timeout, format!("no answer within {:?}", self.timeout))),
        };
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) => e.outcome(),
        };
        self.metrics.aws_calls.get_or_create(&ApiLabels { api: api.as_str(), outcome }).inc();
        result
    }

    /// Follows NextToken to the end; stops on a repeated token.
    async fn all_pages<T, F, Fut>(&self, api: Api, mut page: F) -> (Result<Vec<T>, ApiError>, u64)
    where
        F: FnMut(Option<String>) -> Fut,
        Fut: Future<Output = Result<super::api::Page<T>, ApiError>>,
    {
        let (mut items, mut token, mut seen, mut calls) = (Vec::new(), None, HashSet::new(), 0);
        for _ in 0..MAX_PAGES {
            calls += 1;
            match self.call(api, page(token.clone())).await {
                Ok(p) => {
                    items.extend(p.items);
                    match p.next_token {
                        Some(next) if seen.insert(next.clone()) => token = Some(next),
                        _ => return (Ok(items), calls),
                    }
                }
                Err(e) => return (Err(e), calls),
            }
        }
        (Err(ApiError::new(ErrorKind::Other, format!("{api} returned more than {MAX_PAGES} pages"))), calls)
    }

    async fn list(&self, filter: &NameFilter) -> Result<Listing, ApiError> {
        let api = self.api.clone();
        let (namespaces, _) = self
            .all_pages::<NamespaceInfo, _, _>(Api::ListNamespaces, |t| {
                let api = api.clone();
                async move { api.list_namespaces(t).await }
            })
            .await;
        let namespaces = namespaces?;
        let mut services = BTreeMap::new();
        for ns in namespaces.iter().filter(|ns| filter.namespace(&ns.name)) {
            let id = ns.id.clone();
            let (result, calls) = self
                .all_pages::<ServiceInfo, _, _>(Api::ListServices, |t| {
                    let (api, id) = (api.clone(), id.clone());
                    async move { api.list_services(&id, t).await }
                })
                .await;
            services.insert(ns.id.clone(), NamespaceListing { result, calls });
        }
        Ok(Listing { namespaces, services })
    }
}

enum Done {
    Revision(Target, Result<i64, ApiError>),
    Instances(ServiceKey, Result<Discovered, ApiError>),
}

/// What one poll did, for logs and metrics.
#[derive(Debug, Default)]
struct PollStats {
    errors: usize,
    throttled: bool,
    revision_calls: usize,
    discover_calls: usize,
}

impl PollStats {
    fn note<T>(&mut self, result: &Result<T, ApiError>) {
        if let Err(e) = result {
            self.errors += 1;
            self.throttled |= inventory::is_throttle(e);
        }
    }
}

/// The poller task; see [`Poller::run`].
pub struct Poller<A> {
    caller: Caller<A>,
    inventory: Inventory,
    sink: SourceSink,
    initial_sync_timeout: Option<Duration>,
    started: Instant,
    last_wait_log: Option<Instant>,
}

impl<A: CloudMapApi> Poller<A> {
    pub fn new(
        api: Arc<A>,
        inventory: Inventory,
        sink: SourceSink,
        metrics: SourceMetrics,
        limits: Limits,
        call_timeout: Duration,
        initial_sync_timeout: Option<Duration>,
    ) -> Self {
        Poller {
            caller: Caller {
                api,
                limits,
                metrics,
                timeout: call_timeout,
                in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            },
            inventory,
            sink,
            initial_sync_timeout,
            started: Instant::now(),
            last_wait_log: None,
        }
    }

    /// Polls until `shutdown` turns true (or its sender goes away).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let throttled = tokio::select! {
                throttled = self.poll() => throttled,
                _ = shutdown.wait_for(|d| *d) => return,
            };
            let delay = self.inventory.next_poll_delay(throttled);
            if throttled {
                warn!(next_poll_in = ?delay, "Cloud Map is throttling; slowing down");
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|d| *d) => return,
            }
        }
    }

    /// One poll; returns whether any call was throttled.
    async fn poll(&mut self) -> bool {
        let started = Instant::now();
        let mut stats = PollStats::default();
        if self.inventory.listing_due(Instant::now()) {
            let listing = self.caller.list(self.inventory.filter()).await;
            match &listing {
                Err(e) => stats.note::<()>(&Err(e.clone())),
                Ok(l) => l.services.values().for_each(|n| stats.note(&n.result)),
            }
            let report = self.inventory.apply_listing(listing, Now::current());
            if !report.added.is_empty() || !report.removed.is_empty() {
                info!(
                    added = report.added.len(),
                    removed = report.removed.len(),
                    services = self.inventory.service_count(),
                    "Cloud Map listing changed"
                );
            }
        }

        let plan = self.inventory.plan_next_poll(Instant::now());
        let mut tasks = JoinSet::new();
        for target in plan.revision {
            stats.revision_calls += 1;
            self.spawn_revision(&mut tasks, target);
        }
        for target in plan.discover {
            stats.discover_calls += 1;
            self.spawn_discover(&mut tasks, target);
        }
        while let Some(joined) = tasks.join_next().await {
            let done = match joined {
                Ok(done) => done,
                Err(e) => {
                    // The service whose task died is planned again next poll.
                    error!(error = %e, "a Cloud Map call task failed");
                    continue;
                }
            };
            match done {
                Done::Revision(target, result) => {
                    stats.note(&result);
                    if self.inventory.apply_revision(&target.key, result, Now::current()) {
                        stats.discover_calls += 1;
                        self.spawn_discover(&mut tasks, target);
                    }
                }
                Done::Instances(key, result) => {
                    stats.note(&result);
                    self.inventory.apply_instances(&key, result, Now::current());
                }
            }
        }
        let summary = self.inventory.finish_poll(Now::current());
        self.after_poll(started, &stats, summary);
        stats.throttled
    }

    fn spawn_revision(&self, tasks: &mut JoinSet<Done>, target: Target) {
        let caller = self.caller.clone();
        tasks.spawn(async move {
            let request =
                caller.api.discover_instances_revision(&target.namespace_http_name, &target.service);
            let result = caller.call(Api::DiscoverInstancesRevision, request).await;
            Done::Revision(target, result)
        });
    }

    fn spawn_discover(&self, tasks: &mut JoinSet<Done>, target: Target) {
        let caller = self.caller.clone();
        tasks.spawn(async move {
            let request = caller.api.discover_instances(&target.namespace_http_name, &target.service);
            let result = caller.call(Api::DiscoverInstances, request).await;
            Done::Instances(target.key, result)
        });
    }

    fn after_poll(&mut self, started: Instant, stats: &PollStats, summary: inventory::PollSummary) {
        let metrics = self.caller.metrics.clone();
        if summary.initial_sync {
            info!(
                services = self.inventory.service_count(),
                took = ?self.started.elapsed(),
                "first complete Cloud Map sync; serving ServiceEntries"
            );
        } else if !self.inventory.synced() {
            self.initial_sync_progress();
        }
        if summary.full_sync {
            debug!(services = self.inventory.service_count(), "full Cloud Map sync finished");
            if let Some(at) = self.inventory.last_full_sync() {
                let secs = at
                    .duration_since(std::time::SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                metrics.last_full_sync.set(secs);
            }
        }
        let published = match self.inventory.registry_update() {
            Some(registry) => {
                let services = registry.services.len();
                let changed = self.sink.publish(registry);
                if changed {
                    debug!(services, "Cloud Map registry published");
                }
                changed
            }
            None => false,
        };
        let (statuses, last_full_sync, last_error) = (
            self.inventory.statuses(),
            self.inventory.last_full_sync(),
            self.inventory.last_error().cloned(),
        );
        self.sink.update_status(|s| {
            s.services = statuses;
            s.last_full_sync = last_full_sync;
            if let Some((message, at)) = last_error {
                s.last_error = Some(message);
                s.last_error_time = Some(at);
            }
        });
        let outcome = if stats.errors > 0 {
            "error"
        } else if published {
            "success"
        } else {
            "unchanged"
        };
        metrics.loads.get_or_create(&OutcomeLabels { outcome }).inc();
        metrics.load_duration.observe(started.elapsed().as_secs_f64());
        debug!(
            revision_calls = stats.revision_calls,
            discover_calls = stats.discover_calls,
            errors = stats.errors,
            took = ?started.elapsed(),
            "Cloud Map poll"
        );
    }

    fn initial_sync_progress(&mut self) {
        let now = Instant::now();
        if let Some(limit) = self.initial_sync_timeout
            && self.started.elapsed() >= limit
        {
            error!(
                timeout = ?limit,
                read = self.inventory.read_count(),
                services = self.inventory.service_count(),
                "the first complete Cloud Map sync did not finish in --initial-sync-timeout; publishing what was read. \
                 istiod will delete ServiceEntries of services not read yet until they are"
            );
            self.inventory.force_publish();
            return;
        }
        if self.last_wait_log.is_none_or(|t| now.duration_since(t) >= WAIT_LOG_INTERVAL) {
            self.last_wait_log = Some(now);
            info!(
                read = self.inventory.read_count(),
                services = self.inventory.service_count(),
                "waiting for the first complete Cloud Map sync; ServiceEntries are not served yet"
            );
        }
    }
}

#[cfg(test)]
mod tests;
