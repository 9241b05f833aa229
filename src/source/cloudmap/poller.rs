//! The thin async loop around [`Inventory`]: each poll tick starts the listing
//! when due, one call per service (revision check or read) and the attribute
//! reads due (each family at most [`MAX_IN_FLIGHT`] at a time, topped up as they
//! answer); answers are applied as they arrive; the registry is published when its
//! content changed, and the status is copied out. Calls run concurrently as tasks,
//! each behind its API's token bucket, a bound on calls in flight and a timeout, and
//! every one is counted in `cloudmap_xds_aws_calls{api,outcome}` and in its service's status.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::{self, JoinSet};
use tracing::{debug, error, info, warn};

use super::api::{Api, ApiError, CloudMapApi, Discovered, ErrorKind, NamespaceInfo, ServiceInfo};
use super::filter::NameFilter;
use super::inventory::{
    self, AttributesTarget, Inventory, Listing, NamespaceListing, Now, ServiceKey, Target,
};
use super::rate::RateLimiter;
use crate::metrics::{ApiLabels, OutcomeLabels, SourceMetrics};
use crate::source::SourceSink;

/// Calls in flight at once per API family, whatever the rates allow: bounds
/// sockets when Cloud Map hangs. Per family, so a read triggered by a changed
/// revision never queues behind the rest of the poll's revision checks. The
/// poller holds the bound by spawning a family's call only when it has a free
/// slot (the listing runs one call at a time).
pub const MAX_IN_FLIGHT: usize = 32;
/// A List call that pages on beyond this is treated as failed rather than trusted.
pub const MAX_PAGES: usize = 10_000;
/// Answers are published at most this long after the first change among them,
/// even while other calls of the same poll are still out.
pub const PUBLISH_DELAY: Duration = Duration::from_millis(50);
/// While waiting for the first complete sync, progress is logged at most this often.
const WAIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The token bucket of one API family.
#[derive(Debug, Clone)]
pub struct Family {
    pub rate: RateLimiter,
}

impl Family {
    fn new(rate: f64) -> Self {
        Family { rate: RateLimiter::new(rate) }
    }
}

/// The budgets of the four API families.
#[derive(Debug, Clone)]
pub struct Limits {
    /// ListNamespaces and ListServices (control plane).
    pub list: Family,
    pub discover: Family,
    pub revision: Family,
    /// GetServiceAttributes (control plane).
    pub attributes: Family,
}

impl Limits {
    pub fn new(list: f64, discover: f64, revision: f64, attributes: f64) -> Self {
        Limits {
            list: Family::new(list),
            discover: Family::new(discover),
            revision: Family::new(revision),
            attributes: Family::new(attributes),
        }
    }

    fn for_api(&self, api: Api) -> &Family {
        match api {
            Api::ListNamespaces | Api::ListServices => &self.list,
            Api::DiscoverInstances => &self.discover,
            Api::DiscoverInstancesRevision => &self.revision,
            Api::GetServiceAttributes => &self.attributes,
        }
    }
}

/// Everything a call needs; cheap to clone into tasks.
struct Caller<A> {
    api: Arc<A>,
    limits: Limits,
    metrics: SourceMetrics,
    timeout: Duration,
}

impl<A> Clone for Caller<A> {
    fn clone(&self) -> Self {
        Caller {
            api: self.api.clone(),
            limits: self.limits.clone(),
            metrics: self.metrics.clone(),
            timeout: self.timeout,
        }
    }
}

impl<A: CloudMapApi> Caller<A> {
    /// One AWS request: waits for a token, bounds the time, counts the outcome.
    async fn call<T>(
        &self,
        api: Api,
        request: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<T, ApiError> {
        self.limits.for_api(api).rate.acquire().await;
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

    /// Follows NextToken to the end; a repeated token fails the listing.
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
                        // A repeated token would end the listing early and make it look complete.
                        Some(next) if !seen.insert(next.clone()) => {
                            let error =
                                ApiError::new(ErrorKind::Other, format!("{api} repeated a NextToken"));
                            return (Err(error), calls);
                        }
                        Some(next) => token = Some(next),
                        None => return (Ok(items), calls),
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
    Listing(Result<Listing, ApiError>),
    Revision(Target, Result<i64, ApiError>),
    Instances(ServiceKey, Result<Discovered, ApiError>),
    Attributes(ServiceKey, Result<BTreeMap<String, String>, ApiError>),
}

/// What a running task is for.
enum Owner {
    Listing,
    Revision(ServiceKey),
    /// An instance read (DiscoverInstances).
    Read(ServiceKey),
    Attributes(ServiceKey),
}

/// What happened since the last poll tick, for `cloudmap_xds_source_loads`.
#[derive(Debug, Default)]
struct Window {
    errors: usize,
    throttled: bool,
    published: bool,
}

impl Window {
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
    tasks: JoinSet<Done>,
    /// What each running task is for.
    owners: HashMap<task::Id, Owner>,
    listing_in_flight: bool,
    /// Attribute reads out; they are started in windows, so an IAM denial stops them quickly.
    attributes_in_flight: usize,
    /// Revision checks and instance reads planned but not started. A task is spawned
    /// only when its family has a free slot: a spawned task holds its whole SDK call
    /// future (about 5 KB), so spawning a poll of 10,000 services at once held some
    /// 50 MB of tasks waiting for a slot; a queued target is three shared names.
    queued_revisions: VecDeque<Target>,
    queued_reads: VecDeque<Target>,
    revisions_in_flight: usize,
    reads_in_flight: usize,
    window: Window,
    /// When the last tick that spawned calls started, until they all finished.
    wave_started: Option<Instant>,
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
            caller: Caller { api, limits, metrics, timeout: call_timeout },
            inventory,
            sink,
            initial_sync_timeout,
            started: Instant::now(),
            last_wait_log: None,
            tasks: JoinSet::new(),
            owners: HashMap::new(),
            listing_in_flight: false,
            attributes_in_flight: 0,
            queued_revisions: VecDeque::new(),
            queued_reads: VecDeque::new(),
            revisions_in_flight: 0,
            reads_in_flight: 0,
            window: Window::default(),
            wave_started: None,
        }
    }

    /// Polls until `shutdown` turns true (or its sender goes away).
    ///
    /// Every poll interval (jittered, longer after throttling) a tick starts the
    /// listing when due and one call per service not already in flight. Answers
    /// are applied as they arrive, so a slow or hanging call delays only its own
    /// service. Answers are settled (full-sync bookkeeping, publication, status)
    /// when every call out has answered, [`PUBLISH_DELAY`] after the first change
    /// (or any answer before the first complete sync), and at every tick,
    /// whichever comes first.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut next_tick = tokio::time::Instant::now();
        let mut publish_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|d| *d) => return,
                () = tokio::time::sleep_until(next_tick) => {
                    // Calls may never all be answered at once (a large registry, a hanging call): settle anyway.
                    self.settle();
                    publish_at = None;
                    let throttled = self.tick();
                    let delay = self.inventory.next_poll_delay(Instant::now(), throttled);
                    if throttled {
                        warn!(next_poll_in = ?delay, "Cloud Map is throttling; slowing down");
                    }
                    next_tick = tokio::time::Instant::now() + delay;
                }
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.on_done(joined);
                    if self.tasks.is_empty() {
                        self.settle();
                        publish_at = None;
                    } else if publish_at.is_none() && (self.inventory.has_update() || self.inventory.syncing()) {
                        publish_at = Some(tokio::time::Instant::now() + PUBLISH_DELAY);
                    }
                }
                () = sleep_until_some(publish_at) => {
                    self.settle();
                    publish_at = None;
                }
            }
        }
    }

    /// Starts one poll; returns whether the window since the last one saw throttling.
    fn tick(&mut self) -> bool {
        let window = std::mem::take(&mut self.window);
        let outcome = if window.errors > 0 {
            "error"
        } else if window.published {
            "success"
        } else {
            "unchanged"
        };
        self.caller.metrics.loads.get_or_create(&OutcomeLabels { outcome }).inc();

        if !self.inventory.synced() {
            self.initial_sync_progress();
        }
        let now = Instant::now();
        if !self.listing_in_flight && self.inventory.listing_due(now) {
            self.spawn_listing();
        }
        let plan = self.inventory.plan_next_poll(now);
        self.queued_revisions.extend(plan.revision);
        self.queued_reads.extend(plan.discover);
        self.start_queued();
        self.spawn_attribute_reads();
        if !self.tasks.is_empty() && self.wave_started.is_none() {
            self.wave_started = Some(now);
        }
        window.throttled
    }

    fn on_done(&mut self, joined: Result<(task::Id, Done), task::JoinError>) {
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        let owner = self.owners.remove(&id);
        match &owner {
            Some(Owner::Listing) => self.listing_in_flight = false,
            Some(Owner::Revision(_)) => self.revisions_in_flight -= 1,
            Some(Owner::Read(_)) => self.reads_in_flight -= 1,
            Some(Owner::Attributes(_)) => self.attributes_in_flight -= 1,
            None => {}
        }
        let done = match joined {
            Ok((_, done)) => done,
            Err(e) => {
                // Only a panic gets here (tasks are aborted only on shutdown): free the service for the next poll.
                error!(error = %e, "a Cloud Map call task died");
                match owner {
                    Some(Owner::Revision(key) | Owner::Read(key)) => self.inventory.abandon(&key),
                    Some(Owner::Attributes(key)) => self.inventory.abandon_attributes(&key),
                    Some(Owner::Listing) | None => {}
                }
                self.start_queued();
                return;
            }
        };
        match done {
            Done::Listing(listing) => {
                match &listing {
                    Err(e) => self.window.note::<()>(&Err(e.clone())),
                    Ok(l) => l.services.values().for_each(|n| self.window.note(&n.result)),
                }
                let report = self.inventory.apply_listing(listing, Now::current());
                let held = i64::try_from(self.inventory.held_count()).unwrap_or(i64::MAX);
                self.caller.metrics.mass_removal_held.set(held);
                if !report.added.is_empty() || !report.removed.is_empty() {
                    info!(
                        added = report.added.len(),
                        removed = report.removed.len(),
                        services = self.inventory.service_count(),
                        "Cloud Map listing changed"
                    );
                }
                // New services are read now, not at the next poll.
                let reads = self.inventory.plan_reads(Instant::now());
                self.queued_reads.extend(reads);
                self.spawn_attribute_reads();
            }
            Done::Revision(target, result) => {
                self.window.note(&result);
                if self.inventory.apply_revision(&target.key, result, Now::current()) {
                    self.queued_reads.push_back(target);
                }
            }
            Done::Instances(key, result) => {
                self.window.note(&result);
                self.inventory.apply_instances(&key, result, Now::current());
            }
            Done::Attributes(key, result) => {
                self.window.note(&result);
                self.inventory.apply_attributes(&key, result, Now::current());
                self.spawn_attribute_reads();
            }
        }
        self.start_queued();
    }

    /// Spawns queued revision checks and reads while their family has a free slot.
    fn start_queued(&mut self) {
        while self.revisions_in_flight < MAX_IN_FLIGHT
            && let Some(target) = self.queued_revisions.pop_front()
        {
            self.spawn_revision(target);
        }
        while self.reads_in_flight < MAX_IN_FLIGHT
            && let Some(target) = self.queued_reads.pop_front()
        {
            self.spawn_read(target);
        }
    }

    fn spawn_listing(&mut self) {
        let caller = self.caller.clone();
        let filter = self.inventory.filter().clone();
        let handle = self.tasks.spawn(async move { Done::Listing(caller.list(&filter).await) });
        self.owners.insert(handle.id(), Owner::Listing);
        self.listing_in_flight = true;
    }

    fn spawn_revision(&mut self, target: Target) {
        let caller = self.caller.clone();
        let key = target.key.clone();
        let handle = self.tasks.spawn(async move {
            let request = caller.api.discover_instances_revision(&target.namespace_http_name, &target.key.1);
            let result = caller.call(Api::DiscoverInstancesRevision, request).await;
            Done::Revision(target, result)
        });
        self.owners.insert(handle.id(), Owner::Revision(key));
        self.revisions_in_flight += 1;
    }

    fn spawn_read(&mut self, target: Target) {
        let caller = self.caller.clone();
        let key = target.key.clone();
        let handle = self.tasks.spawn(async move {
            let request = caller.api.discover_instances(&target.namespace_http_name, &target.key.1);
            let result = caller.call(Api::DiscoverInstances, request).await;
            Done::Instances(target.key, result)
        });
        self.owners.insert(handle.id(), Owner::Read(key));
        self.reads_in_flight += 1;
    }

    /// Starts the attribute reads due, up to [`MAX_IN_FLIGHT`] out at once.
    fn spawn_attribute_reads(&mut self) {
        let room = MAX_IN_FLIGHT.saturating_sub(self.attributes_in_flight);
        for target in self.inventory.plan_attribute_reads(Instant::now(), room) {
            self.spawn_attributes(target);
        }
    }

    fn spawn_attributes(&mut self, target: AttributesTarget) {
        let caller = self.caller.clone();
        let key = target.key.clone();
        let handle = self.tasks.spawn(async move {
            let request = caller.api.get_service_attributes(&target.service_id);
            let result = caller.call(Api::GetServiceAttributes, request).await;
            Done::Attributes(target.key, result)
        });
        self.owners.insert(handle.id(), Owner::Attributes(key));
        self.attributes_in_flight += 1;
    }

    /// Closes a batch of answers: sweep bookkeeping, publication, status.
    fn settle(&mut self) {
        let metrics = self.caller.metrics.clone();
        let summary = self.inventory.finish_poll(Now::current());
        if summary.initial_sync {
            info!(
                services = self.inventory.service_count(),
                took = ?self.started.elapsed(),
                "first complete Cloud Map sync; serving ServiceEntries"
            );
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
        // Before the publication, so whoever sees the registry sees the gauge that goes with it.
        metrics.service_attributes_unavailable.set(i64::from(self.inventory.attributes_denied()));
        if let Some(registry) = self.inventory.registry_update() {
            let services = registry.services.len();
            if self.sink.publish(registry) {
                self.window.published = true;
                debug!(services, "Cloud Map registry published");
            }
        }
        let (inventory, last_full_sync, last_error) =
            (&self.inventory, self.inventory.last_full_sync(), self.inventory.last_error().cloned());
        self.sink.update_status(|s| {
            inventory.copy_statuses(&mut s.services);
            s.last_full_sync = last_full_sync;
            if let Some((message, at)) = last_error {
                s.last_error = Some(message);
                s.last_error_time = Some(at);
            }
        });
        if self.tasks.is_empty()
            && let Some(started) = self.wave_started.take()
        {
            metrics.load_duration.observe(started.elapsed().as_secs_f64());
        }
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
            self.settle();
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

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
