//! The incremental snapshot builder production uses.
//!
//! A service is recognised as unchanged by the address of its `Arc` (sources
//! republish an unchanged service as the same `Arc`, and the builder holds every
//! one it has seen, so an address cannot be reused for something else while it
//! is known). Only changed services are translated and encoded, and the sorted
//! resource list, the totals and the snapshot version are updated for them
//! alone: one changed service costs one translation, one encode, a binary search
//! and the copy of one chunk of the list, not a pass over every service.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet};

// A full build hashes every service key and address; SipHash was a twentieth of it.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::sync::Arc;

use super::{Resource, ResourceList, Snapshot, Totals, encode_translated};
use crate::model::{Registry, Service};
use crate::translate::{self, Options, SettingProblem, SkipReason, Skipped, SkippedLabel};

/// `(Cloud Map namespace, service)`.
type ServiceKey = (String, String);

/// Above this share of all services changed at once, the list is rebuilt and
/// sorted whole instead of being updated service by service.
const REBUILD_SHARE: usize = 8;

/// Builds snapshots incrementally; see the module documentation.
#[derive(Debug)]
pub struct Builder {
    options: Options,
    /// What each service gave the last time it changed.
    services: HashMap<ServiceKey, Cached>,
    /// The address of every service `Arc` in `services`.
    known: HashSet<usize>,
    /// The addresses of the last registry's services, in its order: a registry
    /// republished in the same order is recognised position by position.
    order: Vec<usize>,
    /// Served: per name, the resource of the first service (in namespace/service order) that gives it.
    resources: ResourceList,
    totals: Totals,
    /// Names given by more than one service: the services not served (skipped as duplicates).
    losers: BTreeMap<String, BTreeSet<ServiceKey>>,
    /// Services with skipped instances, skipped labels or unusable settings.
    with_skips: BTreeSet<ServiceKey>,
    with_labels: BTreeSet<ServiceKey>,
    with_invalid: BTreeSet<ServiceKey>,
    skipped_labels: usize,
    /// The sorted lists of the last snapshot, shared until skips change.
    skipped: Arc<[Skipped]>,
    invalid_settings: Arc<[SettingProblem]>,
    memo: Memo,
}

/// What translating one service leaves for the next.
#[derive(Debug, Default)]
struct Memo {
    /// What each attribute key means, for the last key set seen.
    key_roles: translate::KeyRoles,
    /// Where each ServiceEntry is written before it is framed; kept from service to
    /// service and build to build, up to [`SCRATCH_KEPT`] bytes.
    scratch: Vec<u8>,
}

/// The most scratch room kept after a build: one large service (about 220 bytes an
/// endpoint) should not hold its size in memory for good.
const SCRATCH_KEPT: usize = 1 << 20;

#[derive(Debug)]
struct Cached {
    service: Arc<Service>,
    resource: Option<Arc<Resource>>,
    skipped: Vec<Skipped>,
    skipped_labels: Vec<SkippedLabel>,
    invalid_settings: Vec<SettingProblem>,
}

impl Cached {
    fn translate(service: Arc<Service>, options: &Options, memo: &mut Memo) -> Self {
        let translate::EncodedTranslation { entry, skipped, skipped_labels, invalid_settings } =
            translate::translate_service_encoded(&service, options, &mut memo.key_roles);
        let resource = entry.map(|e| {
            let origin = (service.namespace.clone(), service.name.clone());
            Arc::new(encode_translated(e, origin, &mut memo.scratch))
        });
        Cached { resource, service, skipped, skipped_labels, invalid_settings }
    }
}

/// Which of the builder's lists a service's translation is in.
#[derive(Debug, Clone, Copy, Default)]
struct Marks {
    skips: bool,
    /// How many skipped labels.
    labels: usize,
    invalid: bool,
}

impl Marks {
    fn of(cached: &Cached) -> Self {
        Marks {
            skips: !cached.skipped.is_empty(),
            labels: cached.skipped_labels.len(),
            invalid: !cached.invalid_settings.is_empty(),
        }
    }

    fn any(self) -> bool {
        self.skips || self.labels > 0 || self.invalid
    }
}

/// How many bytes every one of `names` starts with.
fn shared_prefix_len<'n>(mut names: impl Iterator<Item = &'n str>) -> usize {
    let Some(first) = names.next() else { return 0 };
    let mut shared = first.as_bytes();
    for name in names {
        // Nearly always true once the prefix is found: one comparison of it, not a byte loop.
        if !name.as_bytes().starts_with(shared) {
            let same = shared.iter().zip(name.as_bytes()).take_while(|(a, b)| a == b).count();
            shared = &shared[..same];
        }
    }
    shared.len()
}

/// The first sixteen bytes of `bytes` as a big-endian number, zeros after a
/// shorter one: ordered as the bytes are (a prefix first), so that only equal
/// numbers need the bytes compared.
fn order_key(bytes: &[u8]) -> u128 {
    let mut key = [0u8; 16];
    let len = bytes.len().min(key.len());
    key[..len].copy_from_slice(&bytes[..len]);
    u128::from_be_bytes(key)
}

/// What happened to one service between two registries.
enum Change {
    Upsert(Arc<Service>),
    Remove(ServiceKey),
}

fn address(service: &Arc<Service>) -> usize {
    Arc::as_ptr(service) as usize
}

fn key_of(service: &Service) -> ServiceKey {
    (service.namespace.clone(), service.name.clone())
}

impl Builder {
    pub fn new(options: Options) -> Self {
        Builder {
            options,
            services: HashMap::new(),
            known: HashSet::new(),
            order: Vec::new(),
            resources: ResourceList::default(),
            totals: Totals::default(),
            losers: BTreeMap::new(),
            with_skips: BTreeSet::new(),
            with_labels: BTreeSet::new(),
            with_invalid: BTreeSet::new(),
            skipped_labels: 0,
            skipped: Arc::from([]),
            invalid_settings: Arc::from([]),
            memo: Memo::default(),
        }
    }

    /// The snapshot of `registry`. Deterministic: the same as [`Snapshot::build`]
    /// of a full translation, whatever was built before and in whatever order the
    /// registry lists its services.
    pub fn build(&mut self, registry: &Registry) -> Snapshot {
        let changes = self.changes(registry);
        if !changes.is_empty() {
            let rebuild = self.services.is_empty() || changes.len() > registry.services.len() / REBUILD_SHARE;
            let mut lists_changed = false;
            // A rebuilt list needs no per-service update: no key is kept for one.
            let mut touched = Vec::with_capacity(if rebuild { 0 } else { changes.len() });
            // A first build inserts every service: growing the tables step by step rehashed them a
            // dozen times. (Later builds mostly replace services, and a table never shrinks.)
            if self.services.is_empty() {
                self.services.reserve(changes.len());
                self.known.reserve(changes.len());
            }
            for change in changes {
                if let Some(t) = self.apply(change, &mut lists_changed, !rebuild) {
                    touched.push(t);
                }
            }
            if rebuild {
                self.rebuild_list();
                lists_changed = true;
            } else {
                for (key, old, new) in touched {
                    lists_changed |= self.update_list(&key, old.as_ref(), new.as_ref());
                }
            }
            if lists_changed {
                self.collect_lists();
            }
            if self.memo.scratch.capacity() > SCRATCH_KEPT {
                self.memo.scratch = Vec::new();
            }
        }
        Snapshot::assemble(
            self.resources.clone(),
            self.totals,
            self.skipped.clone(),
            self.skipped_labels,
            self.invalid_settings.clone(),
        )
    }

    /// Skipped custom attributes of the last build, for logging.
    pub fn skipped_labels(&self) -> impl Iterator<Item = &SkippedLabel> {
        self.with_labels.iter().filter_map(|k| self.services.get(k)).flat_map(|c| c.skipped_labels.iter())
    }

    /// The services that differ from the last build. Costs a comparison of
    /// addresses per service (a hash of one only when the order moved).
    fn changes(&mut self, registry: &Registry) -> Vec<Change> {
        let services = &registry.services;
        let same_order = self.order.len() == services.len()
            && self.order.iter().zip(services).all(|(a, s)| *a == address(s));
        if same_order {
            return Vec::new();
        }
        let mut changes = Vec::new();
        let mut still_known = 0;
        // Upserts of a known service replace its old allocation, which is then not "gone".
        let mut replacing = 0;
        for (i, service) in services.iter().enumerate() {
            let a = address(service);
            if self.order.get(i) == Some(&a) || self.known.contains(&a) {
                still_known += 1;
            } else {
                // (A first build knows no service: no key is copied to look it up.)
                if !self.services.is_empty()
                    && self.services.contains_key(&(service.namespace.clone(), service.name.clone()))
                {
                    replacing += 1;
                }
                changes.push(Change::Upsert(service.clone()));
            }
        }
        // Only when some known allocation is neither listed nor replaced is a
        // service gone; finding which costs a pass over every service.
        if still_known + replacing < self.known.len() {
            // Some service is gone or was replaced: find those gone.
            let present: HashSet<usize> = services.iter().map(address).collect();
            let upserted: HashSet<ServiceKey> = changes
                .iter()
                .filter_map(|c| match c {
                    Change::Upsert(s) => Some(key_of(s)),
                    Change::Remove(_) => None,
                })
                .collect();
            let mut gone: Vec<ServiceKey> = self
                .services
                .iter()
                .filter(|(key, c)| !present.contains(&address(&c.service)) && !upserted.contains(*key))
                .map(|(key, _)| key.clone())
                .collect();
            gone.sort();
            changes.extend(gone.into_iter().map(Change::Remove));
        }
        self.order = services.iter().map(address).collect();
        changes
    }

    /// Takes one change into `services`; returns the service and its resource
    /// before and after when what it serves may have changed and `track` asks for
    /// it. Translates on this thread: splitting a first build over two threads was
    /// measured slower (146–177 against 114–138 ms at 10,000 × 10), both threads'
    /// allocations contending for the one malloc arena.
    #[allow(clippy::type_complexity)]
    fn apply(
        &mut self,
        change: Change,
        lists_changed: &mut bool,
        track: bool,
    ) -> Option<(ServiceKey, Option<Arc<Resource>>, Option<Arc<Resource>>)> {
        let (key, next) = match change {
            Change::Upsert(service) => {
                let key = key_of(&service);
                if let Some(cached) = self.services.get_mut(&key)
                    && *cached.service == *service
                {
                    // Equal content in a new allocation (a re-read file): nothing to translate.
                    self.known.remove(&address(&cached.service));
                    self.known.insert(address(&service));
                    cached.service = service;
                    return None;
                }
                self.known.insert(address(&service));
                (key, Some(Cached::translate(service, &self.options, &mut self.memo)))
            }
            Change::Remove(key) => (key, None),
        };
        // The key moves into the table (one lookup, no copy). Unless the caller tracks
        // changes (not on a rebuild), it is copied back out only for a service one of
        // the lists keeps.
        let has = next.as_ref().map(Marks::of).unwrap_or_default();
        let new_resource = if track { next.as_ref().and_then(|c| c.resource.clone()) } else { None };
        let (key, old, had) = match next {
            Some(next) => match self.services.entry(key) {
                Entry::Occupied(mut entry) => {
                    let old = entry.insert(next);
                    let had = Marks::of(&old);
                    let keep = track || has.any() || had.any();
                    (keep.then(|| entry.key().clone()), Some(old), had)
                }
                Entry::Vacant(entry) => {
                    let key = (track || has.any()).then(|| entry.key().clone());
                    entry.insert(next);
                    (key, None, Marks::default())
                }
            },
            None => {
                let old = self.services.remove(&key);
                let had = old.as_ref().map(Marks::of).unwrap_or_default();
                (Some(key), old, had)
            }
        };
        if let Some(old) = &old {
            self.known.remove(&address(&old.service));
        }
        *lists_changed |= had.skips || has.skips || had.invalid || has.invalid;
        if let Some(key) = &key {
            for (set, had, has) in [
                (&mut self.with_skips, had.skips, has.skips),
                (&mut self.with_labels, had.labels > 0, has.labels > 0),
                (&mut self.with_invalid, had.invalid, has.invalid),
            ] {
                if has {
                    set.insert(key.clone());
                } else if had {
                    set.remove(key);
                }
            }
        }
        self.skipped_labels = self.skipped_labels + has.labels - had.labels;
        let old_resource = old.and_then(|c| c.resource);
        key.filter(|_| track).map(|key| (key, old_resource, new_resource))
    }

    /// Serves `new` instead of `old` for one service; returns whether the
    /// duplicates changed. A service's name depends only on its namespace and
    /// name, so `old` and `new` (when both exist) have the same name.
    fn update_list(
        &mut self,
        key: &ServiceKey,
        old: Option<&Arc<Resource>>,
        new: Option<&Arc<Resource>>,
    ) -> bool {
        match (old, new) {
            (Some(_), Some(new)) => match self.resources.find(&new.name) {
                Ok(at) if self.resources.at(at).origin == *key => {
                    let old = self.resources.replace(at, new.clone());
                    self.totals.remove(&old);
                    self.totals.add(new);
                    false
                }
                // A duplicate: its new content is not served either.
                _ => false,
            },
            (None, Some(new)) => self.claim(key, new),
            (Some(old), None) => self.withdraw(key, &old.name),
            (None, None) => false,
        }
    }

    /// `key` now gives `resource`: it is served if it comes first for its name.
    fn claim(&mut self, key: &ServiceKey, resource: &Arc<Resource>) -> bool {
        match self.resources.find(&resource.name) {
            Err(at) => {
                self.resources.insert(at, resource.clone());
                self.totals.add(resource);
                false
            }
            Ok(at) => {
                let current = self.resources.at(at).clone();
                let loser = if *key < current.origin {
                    self.resources.replace(at, resource.clone());
                    self.totals.remove(&current);
                    self.totals.add(resource);
                    current.origin.clone()
                } else {
                    key.clone()
                };
                self.losers.entry(resource.name.clone()).or_default().insert(loser);
                true
            }
        }
    }

    /// `key` no longer gives `name`: the next service that gives it is served, if any.
    fn withdraw(&mut self, key: &ServiceKey, name: &str) -> bool {
        if let Some(losers) = self.losers.get_mut(name)
            && losers.remove(key)
        {
            if losers.is_empty() {
                self.losers.remove(name);
            }
            return true;
        }
        let Ok(at) = self.resources.find(name) else { return false };
        let next = self.losers.get_mut(name).and_then(BTreeSet::pop_first);
        let promoted = next.as_ref().and_then(|k| self.services.get(k)).and_then(|c| c.resource.clone());
        if self.losers.get(name).is_some_and(BTreeSet::is_empty) {
            self.losers.remove(name);
        }
        let old = match promoted {
            Some(promoted) => {
                self.totals.add(&promoted);
                self.resources.replace(at, promoted)
            }
            None => self.resources.remove(at),
        };
        self.totals.remove(&old);
        next.is_some()
    }

    /// Sorts every service's resource into a new list (the first build, or many changes at once).
    fn rebuild_list(&mut self) {
        // Sorted with each name beside its resource: reaching the name through every
        // resource on each comparison cost a cache miss at 10,000 of them.
        let mut claims: Vec<(u128, &str, &Arc<Resource>)> = self
            .services
            .values()
            .filter_map(|c| c.resource.as_ref())
            .map(|r| (0, r.name.as_str(), r))
            .collect();
        // Every name starts alike (`<publish namespace>/cloudmap-`): comparing that
        // prefix again on every comparison was most of the sort. Each name is
        // ordered first by the sixteen bytes after it, as a number.
        let shared = shared_prefix_len(claims.iter().map(|(_, name, _)| *name));
        for (key, name, _) in &mut claims {
            *key = order_key(&name.as_bytes()[shared..]);
        }
        claims.sort_unstable_by(|(ka, a, ra), (kb, b, rb)| {
            ka.cmp(kb).then_with(|| a.cmp(b)).then_with(|| ra.origin.cmp(&rb.origin))
        });
        let mut served: Vec<Arc<Resource>> = Vec::with_capacity(claims.len());
        let mut losers: BTreeMap<String, BTreeSet<ServiceKey>> = BTreeMap::new();
        let mut totals = Totals::default();
        for (_, _, resource) in claims {
            match served.last() {
                Some(last) if last.name == resource.name => {
                    losers.entry(resource.name.clone()).or_default().insert(resource.origin.clone());
                }
                _ => {
                    totals.add(resource);
                    served.push(resource.clone());
                }
            }
        }
        self.resources = ResourceList::from_sorted(served);
        self.totals = totals;
        self.losers = losers;
    }

    /// The sorted skip and setting lists, from the services that have any and the duplicates.
    fn collect_lists(&mut self) {
        let mut skipped: Vec<Skipped> = self
            .with_skips
            .iter()
            .filter_map(|k| self.services.get(k))
            .flat_map(|c| c.skipped.iter().cloned())
            .collect();
        for (name, losers) in &self.losers {
            skipped.extend(losers.iter().map(|(namespace, service)| Skipped {
                namespace: namespace.clone(),
                service: service.clone(),
                instance: None,
                reason: SkipReason::DuplicateName(name.clone()),
            }));
        }
        skipped.sort();
        let mut invalid: Vec<SettingProblem> = self
            .with_invalid
            .iter()
            .filter_map(|k| self.services.get(k))
            .flat_map(|c| c.invalid_settings.iter().cloned())
            .collect();
        invalid.sort();
        self.skipped = skipped.into();
        self.invalid_settings = invalid.into();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::model::{Attributes, Health, HealthFilter, Instance};
    use crate::translate::translate;

    /// Services that clash by name (`api.prod` in `corp.local`, `api` in
    /// `prod.corp.local`), skip instances (no address, bad port) and carry bad settings.
    fn service(rng: &mut fastrand::Rng, n: usize) -> Service {
        let (namespace, name) = match n % 4 {
            0 => ("corp.local".to_string(), format!("api{}.prod", n % 3)),
            1 => ("prod.corp.local".to_string(), format!("api{}", n % 3)),
            _ => (format!("ns{}", n % 5), format!("svc-{n}")),
        };
        let instances = (0..rng.usize(0..4))
            .map(|i| {
                let mut attributes =
                    Attributes::from([("AWS_INSTANCE_IPV4", format!("10.0.{}.{}", rng.u8(..), i))]);
                match rng.u8(..10) {
                    0 => attributes = Attributes::from([("team", "a")]),
                    1 => attributes.insert("AWS_INSTANCE_PORT", "99999"),
                    2 => attributes.insert("bad key!", "x"),
                    _ => attributes.insert("AWS_INSTANCE_PORT", rng.u16(1..3).to_string()),
                }
                Instance { id: format!("i-{i}"), health: Health::Healthy, attributes }
            })
            .collect();
        let attributes = if rng.u8(..8) == 0 {
            [("cloudmap-xds/location".to_string(), "NOWHERE".to_string())].into()
        } else {
            Default::default()
        };
        Service {
            namespace,
            name,
            created: SystemTime::UNIX_EPOCH + Duration::from_secs(rng.u64(..3)),
            attributes,
            instances,
        }
    }

    #[test]
    fn every_sequence_of_changes_gives_what_a_full_build_gives() {
        let options = Options::new("istio-system", HealthFilter::All);
        for seed in 0..40 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut builder = Builder::new(options.clone());
            let mut services: Vec<Arc<Service>> = (0..24).map(|n| Arc::new(service(&mut rng, n))).collect();
            // A registry lists each service once.
            let mut seen = HashSet::new();
            services.retain(|s| seen.insert(key_of(s)));
            for step in 0..30 {
                match rng.u8(..6) {
                    0 if !services.is_empty() => {
                        services.remove(rng.usize(..services.len()));
                    }
                    1 => {
                        let n = rng.usize(..40);
                        let candidate = Arc::new(service(&mut rng, n));
                        if !services.iter().any(|s| key_of(s) == key_of(&candidate)) {
                            services.push(candidate);
                        }
                    }
                    2 => rng.shuffle(&mut services),
                    // The same content in a new allocation, as a re-read file gives.
                    3 if !services.is_empty() => {
                        let i = rng.usize(..services.len());
                        services[i] = Arc::new(Service::clone(&services[i]));
                    }
                    _ if !services.is_empty() => {
                        let i = rng.usize(..services.len());
                        let (namespace, name) = key_of(&services[i]);
                        let fresh = service(&mut rng, i);
                        services[i] = Arc::new(Service { namespace, name, ..fresh });
                    }
                    _ => {}
                }
                let registry = Registry::shared(services.clone());
                let ours = builder.build(&registry);
                let what = format!("seed {seed}, step {step}");
                // The one-shot path gives the same bytes and versions...
                let one_shot = Snapshot::build(translate(&registry, &options));
                assert_eq!(ours.resources, one_shot.resources, "{what}");
                assert_eq!(ours.version, one_shot.version, "{what}");
                assert_eq!(ours.invalid_settings, one_shot.invalid_settings, "{what}");
                // ...and a fresh builder (which sorts everything at once) the same lists.
                let fresh = Builder::new(options.clone()).build(&registry);
                assert_eq!(ours.skipped, fresh.skipped, "{what}");
                assert_eq!(ours.skipped_labels, fresh.skipped_labels, "{what}");
                assert_eq!(
                    (ours.endpoints, ours.encoded_len(), ours.resources_field_len()),
                    (one_shot.endpoints, one_shot.encoded_len(), one_shot.resources_field_len()),
                    "{what}"
                );
            }
        }
    }

    #[test]
    fn many_services_built_at_once_give_what_a_full_translation_gives() {
        let options = Options::new("istio-system", HealthFilter::All);
        let mut rng = fastrand::Rng::with_seed(11);
        let services: Vec<Service> = (0..800).map(|n| service(&mut rng, n)).collect();
        let mut seen = HashSet::new();
        let services: Vec<Service> = services.into_iter().filter(|s| seen.insert(key_of(s))).collect();
        let registry = Registry::new(services);
        let one_shot = Snapshot::build(translate(&registry, &options));
        let mut builder = Builder::new(options.clone());
        let ours = builder.build(&registry);
        assert_eq!(ours.resources, one_shot.resources);
        assert_eq!(ours.version, one_shot.version);
        assert_eq!(ours.invalid_settings, one_shot.invalid_settings);
        assert_eq!(ours.skipped.len(), one_shot.skipped.len());
        // Every service changed at once again (new allocations, some new content).
        let changed = Registry::new(
            registry
                .services
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let mut s = Service::clone(s);
                    if i % 2 == 0 {
                        s.created += Duration::from_secs(1);
                    }
                    s
                })
                .collect(),
        );
        let ours = builder.build(&changed);
        let one_shot = Snapshot::build(translate(&changed, &options));
        assert_eq!(ours.resources, one_shot.resources);
        assert_eq!(ours.version, one_shot.version);
    }

    #[test]
    fn names_sort_by_their_order_keys_as_they_sort_by_their_bytes() {
        let sorted = |names: &[&str]| {
            let shared = shared_prefix_len(names.iter().copied());
            let mut keyed: Vec<(u128, &str)> =
                names.iter().map(|n| (order_key(&n.as_bytes()[shared..]), *n)).collect();
            keyed.sort_unstable();
            let mut plain = names.to_vec();
            plain.sort_unstable();
            assert_eq!(keyed.into_iter().map(|(_, n)| n).collect::<Vec<_>>(), plain, "{names:?}");
            shared
        };
        let p = "istio-system/cloudmap-";
        // One name: all of it is shared, and its key is of nothing.
        assert_eq!(sorted(&[&format!("{p}a.ns")]), p.len() + 4);
        // A name that is the shared prefix itself, and one that another starts with.
        assert_eq!(sorted(&[&format!("{p}ab.ns"), p, &format!("{p}ab.ns-2"), &format!("{p}a")]), p.len());
        // Equal for the sixteen bytes after the prefix: the rest decides.
        let long = "0123456789abcdef";
        let names =
            [format!("{p}{long}z"), format!("{p}{long}"), format!("{p}{long}a"), format!("{p}{long}\u{0}")];
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(sorted(&names), p.len() + long.len());
        // Bytes above 0x7f and a zero byte order as bytes do.
        sorted(&[&format!("{p}\u{e9}t\u{e9}"), &format!("{p}e"), &format!("{p}\u{0}"), p]);
    }

    #[test]
    fn an_unchanged_registry_shares_everything() {
        let options = Options::new("istio-system", HealthFilter::All);
        let mut rng = fastrand::Rng::with_seed(7);
        let registry = Registry::new((0..200).map(|n| service(&mut rng, n + 100)).collect());
        let mut builder = Builder::new(options);
        let first = builder.build(&registry);
        let second = builder.build(&registry.clone());
        assert_eq!(first.version, second.version);
        assert!(Arc::ptr_eq(&first.skipped, &second.skipped));
        assert!(first.resources.iter().zip(second.resources.iter()).all(|(a, b)| Arc::ptr_eq(a, b)));
    }
}
