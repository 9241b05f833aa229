//! Service attributes (`GetServiceAttributes`) in the inventory: when each
//! service's attributes are read, and what an answer does.
//!
//! - Every successful listing makes the attributes of each service it lists
//!   due: they are read when a service is first listed and again once per
//!   `list_interval`, never on a poll of their own (an idle poll stays one
//!   DiscoverInstancesRevision per service). Due reads wait in a queue, services
//!   never read first, then oldest first: when the budget reads fewer services
//!   per `list_interval` than there are, a listing does not restart the sweep
//!   (which would starve the services at its end), it only queues those read
//!   since.
//! - A failed read keeps the service's last good attributes and is retried with
//!   the same backoff as a failed instance read; the service's instances are
//!   polled on their own schedule meanwhile.
//! - A service is published only once its attributes are settled (read, or
//!   known to be unreadable), so its first ServiceEntry already carries the
//!   ports and settings it declares instead of flapping from the defaults; the
//!   first complete sync waits for every service's attributes too.
//! - An IAM denial means the policy lacks [`ACTION`], which is optional: one
//!   warning, every service is settled with what it has (the defaults for a
//!   service never read, the last good attributes otherwise), and reads stop
//!   except one probe per `list_interval`; a probe that succeeds reads every
//!   service again, so a policy fix is picked up without a restart.
//! - Until one read has succeeded, reads go one at a time: a policy without the
//!   action costs one denied call at start (one AccessDenied event in
//!   CloudTrail), not a window of them.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::time::Instant;

use tracing::{debug, info, warn};

use super::{Inventory, Now, ServiceKey};
use crate::source::cloudmap::api::{Api, ApiError, ErrorKind};

/// The IAM action the attributes need.
pub const ACTION: &str = "servicediscovery:GetServiceAttributes";

/// One service's attributes and their read schedule.
#[derive(Debug, Clone, Default)]
pub(super) struct ServiceAttributes {
    /// The last good read; empty until read (the defaults apply).
    pub(super) values: BTreeMap<String, String>,
    /// Read once, or unreadable (denied): the service may be published.
    pub(super) settled: bool,
    /// Its place in the read queue while a read is due (a listing asked, no success since).
    queued: Option<Place>,
    /// A read is in flight.
    busy: bool,
    failures: u32,
    retry_at: Option<Instant>,
}

/// A place in the read queue: services never read first, then in the order they became due.
type Place = (bool, u64);

/// The read queue, and whether the IAM policy allows GetServiceAttributes as far as we know.
#[derive(Debug, Clone, Default)]
pub(super) struct Reads {
    queue: BTreeSet<(Place, ServiceKey)>,
    next_place: u64,
    /// A read has succeeded (since the last denial).
    allowed: bool,
    denied: bool,
    next_probe: Option<Instant>,
    /// The probe in flight: only its success ends a denial (a read sent before the denial
    /// may still answer with success while IAM changes propagate).
    probing: Option<ServiceKey>,
    /// Probes go round the services, so one service the policy leaves out cannot decide alone.
    last_probe: Option<ServiceKey>,
}

/// One service to call GetServiceAttributes for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AttributesTarget {
    pub key: ServiceKey,
    pub service_id: String,
}

impl Inventory {
    /// A successful listing contains `key` (already upserted): its attributes are due.
    pub(super) fn attributes_listed(&mut self, key: &ServiceKey) {
        if self.attribute_reads.denied {
            // Only the probe reads while denied; a new service is served with the defaults.
            if let Some(s) = self.services.get_mut(key) {
                s.attributes.settled = true;
            }
        } else {
            self.enqueue_attributes(key);
        }
    }

    /// Makes a read of `key` due, keeping its place if it is already waiting.
    fn enqueue_attributes(&mut self, key: &ServiceKey) {
        let Some(s) = self.services.get_mut(key) else { return };
        if s.attributes.queued.is_none() {
            let place = (s.attributes.settled, self.attribute_reads.next_place);
            self.attribute_reads.next_place += 1;
            s.attributes.queued = Some(place);
            self.attribute_reads.queue.insert((place, key.clone()));
        }
    }

    /// `key`'s read is no longer due.
    fn dequeue_attributes(&mut self, key: &ServiceKey) {
        let Some(s) = self.services.get_mut(key) else { return };
        if let Some(place) = s.attributes.queued.take() {
            self.attribute_reads.queue.remove(&(place, key.clone()));
        }
    }

    /// GetServiceAttributes calls to start now, at most `limit`; each stays in
    /// flight until its answer is applied (or [`Inventory::abandon_attributes`]).
    pub fn plan_attribute_reads(&mut self, now: Instant, limit: usize) -> Vec<AttributesTarget> {
        if limit == 0 {
            return Vec::new();
        }
        if self.attribute_reads.denied {
            return self.plan_probe(now).into_iter().collect();
        }
        let limit = if self.attribute_reads.allowed {
            limit
        } else if self.services.values().any(|s| s.attributes.busy) {
            return Vec::new();
        } else {
            1
        };
        let mut targets = Vec::new();
        let mut stale = Vec::new();
        for (place, key) in &self.attribute_reads.queue {
            if targets.len() == limit {
                break;
            }
            let Some(s) = self.services.get_mut(key) else {
                // Removed by a listing since it was queued.
                stale.push((*place, key.clone()));
                continue;
            };
            let a = &mut s.attributes;
            if a.queued != Some(*place) {
                // Removed and listed again: queued anew under another place.
                stale.push((*place, key.clone()));
                continue;
            }
            if a.busy || a.retry_at.is_some_and(|t| t > now) {
                continue;
            }
            a.busy = true;
            targets.push(AttributesTarget { key: key.clone(), service_id: s.service_id.clone() });
        }
        for entry in stale {
            self.attribute_reads.queue.remove(&entry);
        }
        targets
    }

    fn plan_probe(&mut self, now: Instant) -> Option<AttributesTarget> {
        if self.attribute_reads.next_probe.is_some_and(|t| t > now) {
            return None;
        }
        let after = match &self.attribute_reads.last_probe {
            Some(last) => self.services.range((Bound::Excluded(last.clone()), Bound::Unbounded)),
            None => self.services.range::<ServiceKey, _>(..),
        };
        let key = after
            .chain(self.services.iter())
            .find(|(_, s)| !s.attributes.busy)
            .map(|(key, _)| key.clone())?;
        let next = now + self.jitter(self.config.list_interval);
        let s = self.services.get_mut(&key)?;
        s.attributes.busy = true;
        debug!(namespace = %key.0, service = %key.1, "probing whether {ACTION} is allowed now");
        self.attribute_reads.next_probe = Some(next);
        self.attribute_reads.last_probe = Some(key.clone());
        self.attribute_reads.probing = Some(key.clone());
        Some(AttributesTarget { key, service_id: s.service_id.clone() })
    }

    /// The attribute read for `key` ended without an answer to apply (its task died).
    pub fn abandon_attributes(&mut self, key: &ServiceKey) {
        if self.attribute_reads.probing.as_ref() == Some(key) {
            self.attribute_reads.probing = None;
        }
        if let Some(s) = self.services.get_mut(key) {
            s.attributes.busy = false;
        }
    }

    /// Applies a GetServiceAttributes answer; returns whether the served content changed.
    pub fn apply_attributes(
        &mut self,
        key: &ServiceKey,
        result: Result<BTreeMap<String, String>, ApiError>,
        now: Now,
    ) -> bool {
        let probe = self.attribute_reads.probing.as_ref() == Some(key);
        if probe {
            self.attribute_reads.probing = None;
        }
        let Some(s) = self.services.get_mut(key) else { return false };
        s.status.api_calls += 1;
        s.attributes.busy = false;
        let values = match result {
            Ok(values) => values,
            Err(err) if err.kind == ErrorKind::Denied => {
                self.attributes_denied_by(key, &err, now);
                return false;
            }
            Err(err) => {
                self.attributes_failed(key, &err, now);
                return false;
            }
        };
        if self.attribute_reads.denied && probe {
            self.attribute_reads = Reads::default();
            info!("{ACTION} is allowed again; reading every service's attributes");
            let keys: Vec<ServiceKey> = self.services.keys().cloned().collect();
            for key in &keys {
                self.enqueue_attributes(key);
            }
        }
        if !self.attribute_reads.denied {
            self.attribute_reads.allowed = true;
        }
        self.dequeue_attributes(key);
        let Some(s) = self.services.get_mut(key) else { return false };
        let a = &mut s.attributes;
        if a.failures > 0 {
            info!(namespace = %key.0, service = %key.1, after_failures = a.failures, "{} recovered", Api::GetServiceAttributes);
        }
        a.failures = 0;
        a.retry_at = None;
        let first = !a.settled;
        a.settled = true;
        let changed = a.values != values;
        if changed {
            if first {
                debug!(namespace = %key.0, service = %key.1, attributes = values.len(), "service attributes read");
            } else {
                info!(namespace = %key.0, service = %key.1, attributes = ?values, "service attributes changed");
            }
            a.values = values;
            s.unpublish();
        }
        if changed || first {
            // A service whose attributes just settled may be published now, even with none.
            self.dirty = true;
        }
        changed || first
    }

    fn attributes_failed(&mut self, key: &ServiceKey, err: &ApiError, now: Now) {
        let api = Api::GetServiceAttributes;
        let failures = self.services.get(key).map_or(0, |s| s.attributes.failures) + 1;
        let delay = self.backoff(failures);
        if self.attribute_reads.denied {
            // A failed probe: the next one comes at its time.
            self.dequeue_attributes(key);
        }
        let denied = self.attribute_reads.denied;
        let Some(s) = self.services.get_mut(key) else { return };
        let a = &mut s.attributes;
        a.failures = failures;
        if !denied {
            a.retry_at = Some(now.instant + delay);
        }
        s.status.last_error = Some(format!("{api}: {err}"));
        s.status.last_error_time = Some(now.wall);
        if failures == 1 {
            warn!(namespace = %key.0, service = %key.1, %api, error = %err, "Cloud Map read failed; keeping the last good attributes");
        } else {
            debug!(namespace = %key.0, service = %key.1, %api, error = %err, failures, retry_in = ?delay, "Cloud Map read failed again");
        }
        self.last_error = Some((format!("{}/{}: {api}: {err}", key.0, key.1), now.wall));
    }

    fn attributes_denied_by(&mut self, key: &ServiceKey, err: &ApiError, now: Now) {
        if let Some(s) = self.services.get_mut(key) {
            s.status.last_error = Some(format!("{}: {err}", Api::GetServiceAttributes));
            s.status.last_error_time = Some(now.wall);
        }
        if self.attribute_reads.denied {
            debug!(namespace = %key.0, service = %key.1, error = %err, "{ACTION} still denied");
            return;
        }
        warn!(
            action = ACTION,
            error = %err,
            retry_in = ?self.config.list_interval,
            "the IAM policy does not allow {ACTION}. It is optional: services are served without their \
             cloudmap-xds/ service attributes (the flags' and built-in defaults apply; attributes read before \
             are kept), and the call is tried again once per --list-interval; add the action to the policy to \
             use service attributes"
        );
        self.attribute_reads.denied = true;
        self.attribute_reads.allowed = false;
        self.attribute_reads.next_probe = Some(now.instant + self.jitter(self.config.list_interval));
        self.attribute_reads.queue.clear();
        for s in self.services.values_mut() {
            let a = &mut s.attributes;
            a.queued = None;
            a.failures = 0;
            a.retry_at = None;
            a.settled = true;
        }
        // Services held back for their attributes may be published now.
        self.dirty = true;
    }

    /// Whether every service's attributes are settled (read, or unreadable).
    pub(super) fn attributes_settled(&self) -> bool {
        self.services.values().all(|s| s.attributes.settled)
    }

    /// True while the IAM policy denies GetServiceAttributes (the metric and the status show it).
    pub fn attributes_denied(&self) -> bool {
        self.attribute_reads.denied
    }
}
