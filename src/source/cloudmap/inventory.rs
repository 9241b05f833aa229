//! The poller's state, pure and synchronous: the last good state of every
//! namespace and service, and what to call next.
//!
//! The async loop (`poller.rs`) asks [`Inventory::listing_due`] and
//! [`Inventory::plan_next_poll`] what to call, makes the calls, feeds every
//! answer back through `apply_*`, and publishes [`Inventory::registry_update`].
//! Time comes in as arguments and randomness from a seeded generator, so every
//! rule here is unit-tested without a network or a clock:
//!
//! - a failed call keeps that service's last good state and delays only that
//!   service (exponential backoff); the others go on;
//! - a service disappears only when a successful listing no longer contains it,
//!   and a listing that would remove more than `mass_removal_threshold` of all
//!   services at once is held: the services stay served until listings have
//!   confirmed their absence for at least `mass_removal_confirm_after` (see
//!   [`RemovalGuard`]); a fresh start whose first listing finds no service at
//!   all waits for the same confirmation before its first sync completes;
//! - `DiscoverInstancesRevision` skips unchanged services ("changed if different",
//!   never "newer if greater"), and every service is also read in full once per
//!   `full_refresh_interval` (phases spread evenly, so there is no burst), which
//!   catches health changes, which do not move the revision;
//! - service attributes are read when a listing lists a service, not per poll,
//!   and an IAM denial is tolerated (see [`attributes`]);
//! - nothing is published before the first complete sync (every namespace listed,
//!   every service and its attributes read) unless [`Inventory::force_publish`]
//!   is called.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn};

use super::api::{Api, ApiError, Discovered, ErrorKind, NamespaceInfo, ServiceInfo};
use super::filter::NameFilter;
use crate::model::{Health, Instance, Registry, Service};
use crate::source::{ServiceStatus, StatusKey};

mod attributes;
pub use self::attributes::{ACTION as ATTRIBUTES_ACTION, AttributesTarget};

/// Schedules are spread by ±10 % so replicas and services do not move in lockstep.
pub const JITTER: f64 = 0.1;
/// The longest a failing service or listing waits before its next attempt...
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// ...and at most this many poll intervals.
pub const MAX_BACKOFF_POLLS: u32 = 12;
/// Polls stay slowed down at least this long after the last throttled answer
/// (a throttled call, retried by the SDK, can take seconds to answer).
pub const MIN_THROTTLE_QUIET: Duration = Duration::from_secs(10);

/// `(Cloud Map namespace name, service name)`: the identity of a ServiceEntry. Shared,
/// not copied: the namespace name by all its services, both names by the statuses,
/// the queues and the calls in flight.
pub type ServiceKey = (Arc<str>, Arc<str>);

#[derive(Debug, Clone)]
pub struct Config {
    pub poll_interval: Duration,
    pub list_interval: Duration,
    pub full_refresh_interval: Duration,
    /// Share (0..=1) of all services one listing may remove without confirmation.
    pub mass_removal_threshold: f64,
    /// How long listings must keep confirming a held mass removal before it applies.
    pub mass_removal_confirm_after: Duration,
    pub filter: NameFilter,
}

/// The current time, monotonic for schedules and wall-clock for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub instant: Instant,
    pub wall: SystemTime,
}

impl Now {
    pub fn current() -> Self {
        Now { instant: Instant::now(), wall: SystemTime::now() }
    }
}

/// One service to call DiscoverInstances(Revision) for (the service name is `key.1`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub key: ServiceKey,
    pub namespace_http_name: Arc<str>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollPlan {
    /// Services whose revision is checked; a changed one is then read.
    pub revision: Vec<Target>,
    /// Services read right away: new, changed, failed or due for their full refresh.
    pub discover: Vec<Target>,
}

/// ListServices of one namespace, all pages.
#[derive(Debug, Clone)]
pub struct NamespaceListing {
    pub result: Result<Vec<ServiceInfo>, ApiError>,
    /// Pages requested, failed ones included.
    pub calls: u64,
}

/// A complete ListNamespaces with the ListServices of every included namespace.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub namespaces: Vec<NamespaceInfo>,
    /// By namespace ID; an included namespace missing here counts as failed.
    pub services: BTreeMap<String, NamespaceListing>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListingReport {
    pub added: Vec<ServiceKey>,
    pub removed: Vec<ServiceKey>,
    /// Removals this listing started to hold (see [`RemovalGuard`]).
    pub held: Vec<ServiceKey>,
    /// Held removals that listings no longer confirm: the services are listed again.
    pub released: Vec<ServiceKey>,
    pub failed_namespaces: usize,
    pub failed: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollSummary {
    /// A cycle in which every service was read successfully just finished.
    pub full_sync: bool,
    /// ...and it was the first one.
    pub initial_sync: bool,
}

#[derive(Debug, Clone)]
struct NamespaceState {
    name: Arc<str>,
    /// Shared by the namespace's services.
    shared: Namespace,
    /// ListServices succeeded at least once.
    listed: bool,
    failures: u32,
    status: ServiceStatus,
}

/// What a listing says of a service's namespace, shared by its services.
#[derive(Debug, Clone)]
struct Namespace {
    id: Arc<str>,
    http_name: Arc<str>,
}

/// A service's read status; the names that make a [`ServiceStatus`] of it are its key.
#[derive(Debug, Clone, Default)]
struct ReadStatus {
    last_success: Option<SystemTime>,
    last_error: Option<String>,
    last_error_time: Option<SystemTime>,
    api_calls: u64,
    instances: u32,
}

impl ReadStatus {
    /// Overwrites `status` with this one, reusing its strings.
    fn copy_to(&self, key: &ServiceKey, status: &mut ServiceStatus) {
        status.namespace.clone_from(&key.0);
        status.service.clone_from(&key.1);
        status.last_success = self.last_success;
        status.last_error.clone_from(&self.last_error);
        status.last_error_time = self.last_error_time;
        status.api_calls = self.api_calls;
        status.instances = self.instances;
    }
}

#[derive(Debug, Clone)]
struct ServiceState {
    namespace_id: Arc<str>,
    http_name: Arc<str>,
    service_id: String,
    created: SystemTime,
    health_checked: bool,
    /// The service attributes and their read schedule.
    attributes: attributes::ServiceAttributes,
    /// The last good read, sorted by instance ID, while it is not in `published`
    /// (which then holds the only copy; see [`ServiceState::read`]).
    instances: Option<Vec<Instance>>,
    /// The service as published, shared until it changes again.
    published: Option<Arc<Service>>,
    /// The revision that goes with `instances`; compared for equality only.
    revision: Option<i64>,
    /// A revision call saw this value and the read it triggered is pending.
    pending_revision: Option<i64>,
    /// The revision moved (or the service was re-created); read it.
    changed: bool,
    /// The full-sync cycle of the last successful DiscoverInstances.
    read_in_cycle: Option<u64>,
    /// When the next full read is due whatever the revision says (health changes).
    next_full: Option<Instant>,
    failures: u32,
    retry_at: Option<Instant>,
    /// A call for this service is in flight; later plans skip it.
    busy: bool,
    status: ReadStatus,
}

impl ServiceState {
    fn target(&self, key: &ServiceKey) -> Target {
        Target { key: key.clone(), namespace_http_name: self.http_name.clone() }
    }

    fn needs_read(&self, now: Instant) -> bool {
        self.read().is_none() || self.changed || self.next_full.is_some_and(|t| t <= now)
    }

    /// The last good read of the instances; `None` until the first.
    fn read(&self) -> Option<&[Instance]> {
        self.published.as_ref().map(|p| &p.instances[..]).or(self.instances.as_deref())
    }

    /// Something other than the instances changed: the service is published again,
    /// with the instances the published one holds.
    fn unpublish(&mut self) {
        if let Some(published) = self.published.take()
            && self.instances.is_none()
        {
            self.instances = Some(published.instances.clone());
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Inventory {
    config: Config,
    rng: fastrand::Rng,
    namespaces: BTreeMap<String, NamespaceState>,
    services: BTreeMap<ServiceKey, ServiceState>,
    guard: RemovalGuard,
    listed_once: bool,
    listing_failures: u32,
    next_listing: Instant,
    /// The current full-sync cycle; it ends when every service was read in it.
    cycle: u64,
    throttled_polls: u32,
    last_throttled: Option<Instant>,
    initial_synced: bool,
    forced: bool,
    /// Content changed since the last [`Inventory::registry_update`].
    dirty: bool,
    last_full_sync: Option<SystemTime>,
    last_error: Option<(String, SystemTime)>,
    /// The attribute read queue, and whether GetServiceAttributes is allowed.
    attribute_reads: attributes::Reads,
}

impl Inventory {
    /// A fresh inventory: the first poll lists and reads everything.
    pub fn new(config: Config, now: Instant, seed: u64) -> Self {
        let guard = RemovalGuard::new(config.mass_removal_threshold, config.mass_removal_confirm_after);
        Inventory {
            config,
            rng: fastrand::Rng::with_seed(seed),
            namespaces: BTreeMap::new(),
            services: BTreeMap::new(),
            guard,
            listed_once: false,
            listing_failures: 0,
            next_listing: now,
            cycle: 0,
            throttled_polls: 0,
            last_throttled: None,
            initial_synced: false,
            forced: false,
            dirty: false,
            last_full_sync: None,
            last_error: None,
            attribute_reads: attributes::Reads::default(),
        }
    }

    pub fn filter(&self) -> &NameFilter {
        &self.config.filter
    }

    /// Whether this poll should list namespaces and services.
    pub fn listing_due(&self, now: Instant) -> bool {
        now >= self.next_listing
    }

    /// True once the first complete sync finished (or publishing was forced).
    pub fn synced(&self) -> bool {
        self.initial_synced || self.forced
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Services missing from listings but still served: a mass removal awaiting confirmation.
    pub fn held_count(&self) -> usize {
        self.guard.held_count()
    }

    /// Services read at least once: instances, and attributes settled.
    pub fn read_count(&self) -> usize {
        self.services.values().filter(|s| s.read().is_some() && s.attributes.settled).count()
    }

    pub fn last_full_sync(&self) -> Option<SystemTime> {
        self.last_full_sync
    }

    pub fn last_error(&self) -> Option<&(String, SystemTime)> {
        self.last_error.as_ref()
    }

    /// Applies a listing attempt: ListNamespaces failed (`Err`), or it succeeded
    /// and each namespace's ListServices succeeded or failed on its own.
    pub fn apply_listing(&mut self, listing: Result<Listing, ApiError>, now: Now) -> ListingReport {
        let mut listing = match listing {
            Ok(listing) => listing,
            Err(err) => {
                self.listing_failures += 1;
                self.next_listing = now.instant + self.backoff(self.listing_failures);
                if self.listing_failures == 1 {
                    warn!(error = %err, "ListNamespaces failed; keeping every namespace and service as last listed");
                }
                self.last_error = Some((format!("{}: {err}", Api::ListNamespaces), now.wall));
                return ListingReport { failed: true, ..ListingReport::default() };
            }
        };
        self.listing_failures = 0;
        let namespaces: BTreeMap<String, NamespaceInfo> = listing
            .namespaces
            .into_iter()
            .filter(|ns| self.config.filter.namespace(&ns.name))
            .map(|ns| (ns.id.clone(), ns))
            .collect();
        let mut report = ListingReport::default();
        let mut failed_namespaces = BTreeSet::new();
        let mut present: BTreeMap<ServiceKey, (Namespace, ServiceInfo)> = BTreeMap::new();
        for (id, ns) in &namespaces {
            let state = self.namespaces.entry(id.clone()).or_insert_with(|| {
                let name: Arc<str> = ns.name.as_str().into();
                NamespaceState {
                    name: name.clone(),
                    shared: Namespace { id: id.as_str().into(), http_name: ns.http_name.as_str().into() },
                    listed: false,
                    failures: 0,
                    status: ServiceStatus { namespace: name, ..ServiceStatus::default() },
                }
            });
            if *state.name != *ns.name {
                state.name = ns.name.as_str().into();
                state.status.namespace = state.name.clone();
            }
            if *state.shared.http_name != *ns.http_name {
                state.shared.http_name = ns.http_name.as_str().into();
            }
            let shared = state.shared.clone();
            let Some(services) = listing.services.remove(id) else {
                failed_namespaces.insert(id.clone());
                continue;
            };
            state.status.api_calls += services.calls;
            match services.result {
                Ok(services) => {
                    if state.failures > 0 {
                        info!(namespace = %ns.name, "ListServices recovered");
                    }
                    state.listed = true;
                    state.failures = 0;
                    state.status.last_success = Some(now.wall);
                    for svc in services {
                        // moto ignores the NAMESPACE_ID filter; trust the response's own namespace ID when it has one.
                        if svc.namespace_id.as_deref().is_some_and(|n| n != id)
                            || !self.config.filter.service(&ns.name, &svc.name)
                        {
                            continue;
                        }
                        let key: ServiceKey = (state.name.clone(), svc.name.as_str().into());
                        // Cloud Map keeps names unique; if a registry does not, the oldest service wins.
                        let keep = match present.get(&key) {
                            Some((_, other)) => (svc.created, &svc.id) < (other.created, &other.id),
                            None => true,
                        };
                        if keep {
                            present.insert(key, (shared.clone(), svc));
                        }
                    }
                }
                Err(err) => {
                    state.failures += 1;
                    if state.failures == 1 {
                        warn!(namespace = %ns.name, error = %err, "ListServices failed; keeping this namespace's services as last listed");
                    }
                    state.status.last_error = Some(err.to_string());
                    state.status.last_error_time = Some(now.wall);
                    self.last_error = Some((format!("{}: {}: {err}", ns.name, Api::ListServices), now.wall));
                    failed_namespaces.insert(id.clone());
                }
            }
        }
        report.failed_namespaces = failed_namespaces.len();
        self.namespaces.retain(|id, _| namespaces.contains_key(id));

        let known_before = self.services.len();
        let missing: BTreeSet<ServiceKey> = self
            .services
            .iter()
            .filter(|(key, s)| !present.contains_key(*key) && !failed_namespaces.contains(&*s.namespace_id))
            .map(|(key, _)| key.clone())
            .collect();
        let listed: BTreeSet<ServiceKey> = present.keys().cloned().collect();
        // A same-named service of another namespace must not take over one whose own
        // namespace failed to list: the failure keeps the last good state.
        present.retain(|key, (ns, _)| {
            self.services
                .get(key)
                .is_none_or(|s| s.namespace_id == ns.id || !failed_namespaces.contains(&*s.namespace_id))
        });
        for (key, (ns, svc)) in present {
            self.upsert(key, ns, svc, &mut report);
        }
        let review = self.guard.review(missing, &listed, known_before, now.instant);
        if !review.released.is_empty() {
            info!(
                services = review.released.len(),
                "held removals not confirmed: the services are listed again"
            );
        }
        if !review.newly_held.is_empty() {
            warn!(
                removing = review.newly_held.len(),
                of = known_before,
                threshold = self.config.mass_removal_threshold,
                confirm_after = ?self.config.mass_removal_confirm_after,
                first = ?review.newly_held.first(),
                "listing would remove too many services at once; they stay served until listings confirm it for --mass-removal-confirm-after"
            );
        }
        if let Some(oldest) = self.guard.oldest_hold() {
            let held_for = now.instant.saturating_duration_since(oldest);
            let remove_in = self.config.mass_removal_confirm_after.saturating_sub(held_for);
            warn!(
                held = self.guard.held_count(),
                held_for = ?held_for,
                remove_in = ?remove_in,
                "mass removal held: services missing from Cloud Map listings are still served until confirmed"
            );
            self.last_error = Some((
                format!(
                    "a mass removal is held: {} services missing from listings (more than --mass-removal-threshold {} at once) \
                     stay served until listings confirm it for --mass-removal-confirm-after {}",
                    self.guard.held_count(),
                    self.config.mass_removal_threshold,
                    humantime::format_duration(self.config.mass_removal_confirm_after),
                ),
                now.wall,
            ));
        }
        report.held = review.newly_held;
        report.released = review.released;
        report.removed = review.remove;
        for key in &report.removed {
            self.services.remove(key);
            info!(namespace = %key.0, service = %key.1, "service no longer listed; removed");
        }
        if !report.removed.is_empty() {
            self.dirty = true;
        }
        if !self.listed_once {
            self.guard.first_listing(self.services.len(), now.instant);
        } else if self.guard.awaiting_first_confirmation() {
            self.guard.confirm_first_listing(self.services.len(), now.instant);
        }
        if self.guard.awaiting_first_confirmation() {
            warn!(
                confirm_after = ?self.config.mass_removal_confirm_after,
                "the first Cloud Map listing found no service at all; the first sync waits until listings confirm it for --mass-removal-confirm-after"
            );
        }
        self.listed_once = true;
        let mut next = now.instant + self.jitter(self.config.list_interval);
        // A namespace that failed to list is listed again with the same backoff as a failed
        // ListNamespaces, not a whole interval later: its new services wait for it.
        let failures =
            failed_namespaces.iter().filter_map(|id| self.namespaces.get(id)).map(|n| n.failures).max();
        if let Some(failures) = failures {
            next = next.min(now.instant + self.backoff(failures.max(1)));
        }
        // A hold is confirmed (or released) by the first listing at or after its deadline.
        self.next_listing = self.guard.next_deadline().map_or(next, |deadline| next.min(deadline));
        report
    }

    fn upsert(&mut self, key: ServiceKey, ns: Namespace, svc: ServiceInfo, report: &mut ListingReport) {
        let listed = key.clone();
        match self.services.get_mut(&key) {
            Some(s) => {
                if s.service_id != svc.id || s.http_name != ns.http_name {
                    // Re-created (or its namespace was): read it again whatever the revision says,
                    // and at once: the backoff earned by the deleted one (ServiceNotFound for every
                    // call until this listing) is not the new one's.
                    s.changed = true;
                    s.revision = None;
                    s.failures = 0;
                    s.retry_at = None;
                }
                if s.created != svc.created || s.health_checked != svc.health_checked {
                    self.dirty = true;
                }
                s.namespace_id = ns.id;
                s.http_name = ns.http_name;
                s.service_id = svc.id;
                if s.created != svc.created {
                    s.unpublish();
                }
                s.created = svc.created;
                s.health_checked = svc.health_checked;
            }
            None => {
                debug!(namespace = %key.0, service = %key.1, "new service listed");
                self.services.insert(
                    key.clone(),
                    ServiceState {
                        namespace_id: ns.id,
                        http_name: ns.http_name,
                        service_id: svc.id,
                        created: svc.created,
                        health_checked: svc.health_checked,
                        attributes: attributes::ServiceAttributes::default(),
                        instances: None,
                        published: None,
                        revision: None,
                        pending_revision: None,
                        changed: false,
                        read_in_cycle: None,
                        next_full: None,
                        failures: 0,
                        retry_at: None,
                        busy: false,
                        status: ReadStatus::default(),
                    },
                );
                report.added.push(key);
            }
        }
        self.attributes_listed(&listed);
    }

    /// What to call in this poll: a read for services that are new, changed or
    /// due for their full refresh, a revision check for the others. Services with
    /// a call in flight or in backoff are left out; the planned ones are marked in
    /// flight until their answer is applied (or [`Inventory::abandon`]ed).
    pub fn plan_next_poll(&mut self, now: Instant) -> PollPlan {
        self.plan(now, true)
    }

    /// Only the reads due now (new, changed or swept services), e.g. right after a
    /// listing added services, without waiting for the next poll.
    pub fn plan_reads(&mut self, now: Instant) -> Vec<Target> {
        self.plan(now, false).discover
    }

    fn plan(&mut self, now: Instant, revisions: bool) -> PollPlan {
        let mut plan = PollPlan::default();
        for (key, s) in &mut self.services {
            if s.busy || s.retry_at.is_some_and(|t| t > now) {
                continue;
            }
            if s.needs_read(now) {
                plan.discover.push(s.target(key));
            } else if revisions {
                plan.revision.push(s.target(key));
            } else {
                continue;
            }
            s.busy = true;
        }
        plan
    }

    /// The call for `key` ended without an answer to apply (its task died).
    pub fn abandon(&mut self, key: &ServiceKey) {
        if let Some(s) = self.services.get_mut(key) {
            s.busy = false;
        }
    }

    /// The first complete sync is still under way.
    pub fn syncing(&self) -> bool {
        !self.initial_synced
    }

    /// Whether there is content not yet returned by [`Inventory::registry_update`].
    pub fn has_update(&self) -> bool {
        self.dirty && self.synced()
    }

    /// Applies a DiscoverInstancesRevision answer; returns whether the service
    /// must now be read. A revision that differs in any direction is a change.
    pub fn apply_revision(&mut self, key: &ServiceKey, result: Result<i64, ApiError>, now: Now) -> bool {
        let Some(s) = self.services.get_mut(key) else { return false };
        s.status.api_calls += 1;
        match result {
            Ok(revision) if s.revision == Some(revision) && !s.changed => {
                s.busy = false;
                Self::succeeded(s, key, now);
                false
            }
            Ok(revision) => {
                // Stays in flight: the caller reads it now.
                s.changed = true;
                s.pending_revision = Some(revision);
                true
            }
            Err(err) => {
                self.failed(key, Api::DiscoverInstancesRevision, &err, now);
                false
            }
        }
    }

    /// Applies a DiscoverInstances answer; returns whether the served content changed.
    pub fn apply_instances(
        &mut self,
        key: &ServiceKey,
        result: Result<Discovered, ApiError>,
        now: Now,
    ) -> bool {
        let full = self.config.full_refresh_interval;
        // The first full refresh comes at a random point of the interval, so the
        // services' refreshes spread evenly instead of bursting together.
        let next_full = match self.services.get(key) {
            Some(s) if s.next_full.is_none() => full.mul_f64(self.rng.f64()),
            Some(_) => self.jitter(full),
            None => return false,
        };
        let Some(s) = self.services.get_mut(key) else { return false };
        s.status.api_calls += 1;
        s.busy = false;
        let discovered = match result {
            Ok(d) => d,
            Err(err) => {
                self.failed(key, Api::DiscoverInstances, &err, now);
                return false;
            }
        };
        // moto appends a duplicate on re-registration (AWS upserts): the last one is the newest.
        let mut by_id = BTreeMap::new();
        for mut instance in discovered.instances {
            if !s.health_checked {
                // Cloud Map ignores the health filter for services without a health check and
                // returns every instance; marking them healthy makes every local filter do the same.
                instance.health = Health::Healthy;
            }
            by_id.insert(instance.id.clone(), instance);
        }
        let instances: Vec<Instance> = by_id.into_values().collect();
        let changed = s.read() != Some(&instances[..]);
        s.status.instances = u32::try_from(instances.len()).unwrap_or(u32::MAX);
        if changed {
            // One copy of each instance: the new read replaces the published one.
            s.published = None;
            s.instances = Some(instances);
        }
        s.revision = s.pending_revision.take().or(discovered.revision);
        s.changed = false;
        s.read_in_cycle = Some(self.cycle);
        s.next_full = Some(now.instant + next_full);
        Self::succeeded(s, key, now);
        if changed {
            self.dirty = true;
        }
        changed
    }

    fn succeeded(s: &mut ServiceState, key: &ServiceKey, now: Now) {
        if s.failures > 0 {
            info!(namespace = %key.0, service = %key.1, after_failures = s.failures, "Cloud Map read recovered");
        }
        s.failures = 0;
        s.retry_at = None;
        s.status.last_success = Some(now.wall);
    }

    fn failed(&mut self, key: &ServiceKey, api: Api, err: &ApiError, now: Now) {
        let delay = {
            let Some(s) = self.services.get(key) else { return };
            self.backoff(s.failures + 1)
        };
        let Some(s) = self.services.get_mut(key) else { return };
        s.busy = false;
        s.failures += 1;
        s.retry_at = Some(now.instant + delay);
        s.status.last_error = Some(format!("{api}: {err}"));
        s.status.last_error_time = Some(now.wall);
        if s.failures == 1 {
            warn!(namespace = %key.0, service = %key.1, %api, error = %err, "Cloud Map read failed; keeping the last good state");
        } else {
            debug!(namespace = %key.0, service = %key.1, %api, error = %err, failures = s.failures, retry_in = ?delay, "Cloud Map read failed again");
        }
        self.last_error = Some((format!("{}/{}: {api}: {err}", key.0, key.1), now.wall));
    }

    /// Ends the full-sync cycle when every service was read since it began (and
    /// every namespace was listed once); the next cycle begins. Call it after
    /// applying a batch of answers.
    pub fn finish_poll(&mut self, now: Now) -> PollSummary {
        let mut summary = PollSummary::default();
        let cycle = self.cycle;
        let complete = self.listed_once
            && !self.guard.awaiting_first_confirmation()
            && self.namespaces.values().all(|n| n.listed)
            && self.services.values().all(|s| s.read_in_cycle == Some(cycle))
            && self.attributes_settled();
        if complete {
            self.cycle += 1;
            self.last_full_sync = Some(now.wall);
            summary.full_sync = true;
            if !self.initial_synced {
                self.initial_synced = true;
                self.dirty = true;
                summary.initial_sync = true;
            }
        }
        summary
    }

    /// Publishes whatever was read so far even before the first complete sync.
    pub fn force_publish(&mut self) {
        if !self.forced {
            self.forced = true;
            self.dirty = true;
        }
    }

    /// The registry to publish, when it changed since the last call and the
    /// initial sync is done. Holds every service's last good state.
    pub fn registry_update(&mut self) -> Option<Registry> {
        if !self.synced() || !self.dirty {
            return None;
        }
        self.dirty = false;
        let forced = self.forced;
        let services = self
            .services
            .iter_mut()
            .filter_map(|(key, s)| {
                // Held back until its attributes are settled, so it never flaps from the defaults.
                if !(s.attributes.settled || forced) {
                    return None;
                }
                if s.published.is_none() {
                    // Moved, not copied: the published service holds the only copy.
                    let instances = s.instances.take()?;
                    s.published = Some(Arc::new(Service {
                        namespace: key.0.to_string(),
                        name: key.1.to_string(),
                        created: s.created,
                        attributes: s.attributes.values.clone(),
                        instances,
                    }));
                }
                s.published.clone()
            })
            .collect();
        // Forced out by --initial-sync-timeout before the first complete sync: partial.
        Some(Registry { services, complete: self.initial_synced })
    }

    /// Per namespace (with an empty service name: its ListServices calls) and per service.
    pub fn statuses(&self) -> BTreeMap<StatusKey, ServiceStatus> {
        let mut statuses = BTreeMap::new();
        self.copy_statuses(&mut statuses);
        statuses
    }

    /// Makes `statuses` equal to [`Inventory::statuses`], in place: entries of
    /// namespaces and services no longer known go, the others are overwritten
    /// reusing their strings. The poller copies every status after each poll; a fresh
    /// map each time held a third copy beside the inventory's and the one it
    /// replaced (about 4 MB at 10,000 services) and made 40,000 string allocations.
    pub fn copy_statuses(&self, statuses: &mut BTreeMap<StatusKey, ServiceStatus>) {
        let namespaces: BTreeSet<&str> = self.namespaces.values().map(|n| &*n.name).collect();
        statuses.retain(|key, _| {
            if key.1.is_empty() { namespaces.contains(&*key.0) } else { self.services.contains_key(key) }
        });
        for n in self.namespaces.values() {
            statuses
                .entry((n.name.clone(), Arc::default()))
                .and_modify(|status| status.clone_from(&n.status))
                .or_insert_with(|| n.status.clone());
        }
        for (key, s) in &self.services {
            s.status.copy_to(key, statuses.entry(key.clone()).or_default());
        }
    }

    /// How long to wait before the next poll: the poll interval with jitter or,
    /// while Cloud Map throttles (the quotas are per account, so every service
    /// slows down), an exponential backoff that doubles with each poll that saw
    /// throttling, capped at [`MAX_BACKOFF`] or 12 polls, and ends after that long
    /// (at least [`MIN_THROTTLE_QUIET`]) without a throttled answer.
    /// `throttled`: a call answered since the last poll was throttled.
    pub fn next_poll_delay(&mut self, now: Instant, throttled: bool) -> Duration {
        if throttled {
            self.throttled_polls = self.throttled_polls.saturating_add(1);
            self.last_throttled = Some(now);
        } else if self
            .last_throttled
            .is_some_and(|t| now.saturating_duration_since(t) >= self.max_backoff().max(MIN_THROTTLE_QUIET))
        {
            self.throttled_polls = 0;
            self.last_throttled = None;
        }
        let base = if self.throttled_polls == 0 {
            self.config.poll_interval
        } else {
            let factor = 1u32 << self.throttled_polls.min(10);
            self.config
                .poll_interval
                .saturating_mul(factor)
                .min(self.max_backoff().max(self.config.poll_interval))
        };
        self.jitter(base)
    }

    /// Delay before attempt `failures + 1`: the next poll after the first failure,
    /// then 1, 3, 7… poll intervals, capped.
    fn backoff(&self, failures: u32) -> Duration {
        let polls = (1u32 << failures.saturating_sub(1).min(16)) - 1;
        self.config.poll_interval.saturating_mul(polls).min(self.max_backoff())
    }

    fn max_backoff(&self) -> Duration {
        MAX_BACKOFF.min(self.config.poll_interval.saturating_mul(MAX_BACKOFF_POLLS))
    }

    fn jitter(&mut self, d: Duration) -> Duration {
        d.mul_f64(1.0 + JITTER * (2.0 * self.rng.f64() - 1.0))
    }
}

/// Holds mass removals until listings have confirmed them for long enough.
///
/// A successful listing that misses more than `threshold` of all known services
/// at once starts a hold: those services stay served, and each is removed only
/// by a listing at least `confirm_after` after the one that first missed it
/// (`0s`: the next listing). A service listed again is released from the hold.
/// While a hold is active every listing is suspect, so services it newly misses
/// join the hold instead of being removed at once.
///
/// A fresh start has no previous state to compare with. Its first listing is
/// guarded only when it finds no service at all (what an anomaly hiding
/// everything looks like): the first sync then waits until listings have
/// confirmed the empty registry for `confirm_after`, so the replica stays
/// unready and serves nothing in the meantime.
#[derive(Debug, Clone)]
struct RemovalGuard {
    threshold: f64,
    confirm_after: Duration,
    /// Held services, with when a listing first missed each.
    held: BTreeMap<ServiceKey, Instant>,
    /// Since when the (empty) first listing awaits confirmation.
    empty_first_listing: Option<Instant>,
}

/// What one listing does to the known services.
#[derive(Debug, Default)]
struct Review {
    remove: Vec<ServiceKey>,
    newly_held: Vec<ServiceKey>,
    released: Vec<ServiceKey>,
}

impl RemovalGuard {
    fn new(threshold: f64, confirm_after: Duration) -> Self {
        RemovalGuard { threshold, confirm_after, held: BTreeMap::new(), empty_first_listing: None }
    }

    fn confirmed(&self, since: Instant, now: Instant) -> bool {
        now.saturating_duration_since(since) >= self.confirm_after
    }

    /// `missing`: known services a successful listing did not contain (those of
    /// namespaces that failed to list excluded); `listed`: every service it
    /// contained; `known`: services known before it.
    fn review(
        &mut self,
        missing: BTreeSet<ServiceKey>,
        listed: &BTreeSet<ServiceKey>,
        known: usize,
        now: Instant,
    ) -> Review {
        let mut review = Review::default();
        self.held.retain(|key, _| {
            let back = listed.contains(key);
            if back {
                review.released.push(key.clone());
            }
            !back
        });
        let mut fresh = Vec::new();
        for key in missing {
            match self.held.get(&key) {
                Some(&since) if self.confirmed(since, now) => {
                    self.held.remove(&key);
                    review.remove.push(key);
                }
                Some(_) => {}
                None => fresh.push(key),
            }
        }
        #[allow(clippy::cast_precision_loss)] // service counts are far below 2^52
        let mass = fresh.len() as f64 > self.threshold * known as f64;
        if !fresh.is_empty() && (mass || !self.held.is_empty()) {
            self.held.extend(fresh.iter().map(|key| (key.clone(), now)));
            review.newly_held = fresh;
        } else {
            review.remove.extend(fresh);
        }
        review
    }

    /// The first successful listing of a fresh start found `services` services.
    fn first_listing(&mut self, services: usize, now: Instant) {
        if services == 0 {
            self.empty_first_listing = Some(now);
        }
    }

    /// A later listing found `services` services: any confirms the registry is not
    /// empty; none, `confirm_after` after the first listing, confirms that it is.
    fn confirm_first_listing(&mut self, services: usize, now: Instant) {
        if let Some(since) = self.empty_first_listing
            && (services > 0 || self.confirmed(since, now))
        {
            self.empty_first_listing = None;
        }
    }

    fn awaiting_first_confirmation(&self) -> bool {
        self.empty_first_listing.is_some()
    }

    fn held_count(&self) -> usize {
        self.held.len()
    }

    fn oldest_hold(&self) -> Option<Instant> {
        self.held.values().min().copied()
    }

    /// When the next listing can confirm a hold.
    fn next_deadline(&self) -> Option<Instant> {
        self.oldest_hold()
            .into_iter()
            .chain(self.empty_first_listing)
            .min()
            .map(|since| since + self.confirm_after)
    }
}

/// Whether an error should slow the whole poller down.
pub fn is_throttle(err: &ApiError) -> bool {
    err.kind == ErrorKind::Throttled
}

#[cfg(test)]
mod tests;
