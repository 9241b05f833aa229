//! Fault soak (issue 11, item 8): register/deregister churn, health flips and service
//! re-creation in Cloud Map (moto) while the fault proxy between moto and our binary
//! throttles, answers 5xx, hangs, truncates bodies and resets connections at seeded random
//! rates per call; real istiod 1.26 (without Kubernetes) consumes our stream.
//!
//! The churn driver keeps a model of what moto holds: every write to moto and the model's
//! update happen under one lock, so the model is moto's state at every instant, and it
//! records when each entry (a ServiceEntry, or one of its endpoint addresses) appeared
//! and vanished. A sampler checks the model against moto's own `DiscoverInstances` under
//! our health filter (HEALTHY_OR_ELSE_ALL) and `ListServices` at a fixed cadence, and
//! another samples istiod's `/debug/configz` at a faster one. Afterwards:
//! - no sampled moment has an entry missing from istiod that moto had held for longer than
//!   its bound: a full refresh interval (an endpoint) or a listing interval and the listing's
//!   pace (a service), a poll and the propagation bound measured before the faults start,
//!   plus what the faults injected on that entry's own path cost (the SDK's backoff per
//!   faulted attempt, the attempt timeout per hang), from the proxy's journal of every call;
//!   see [`Bounds`] and [`FaultCosts`];
//! - nothing is removed from istiod that moto held throughout the bound before and until
//!   the removal was seen (no flapping of present services or endpoints);
//! - once the churn stops, istiod holds exactly what moto holds (and exactly what we serve).
//!
//! CI runs 30 s of churn with a fixed seed; `scripts/soak` runs 10 minutes with a random
//! one. Knobs: `CLOUDMAP_XDS_SOAK_SECS`, `CLOUDMAP_XDS_SOAK_SEED` (a number or `random`),
//! `CLOUDMAP_XDS_SOAK_FAULTS` (e.g. `throttle=0.03,5xx=0.03,hang=0.01,truncate=0.02,reset=0.02`,
//! per call of every operation), `CLOUDMAP_XDS_SOAK_TRACE` (set: trace the slowest
//! appearances). The figures are printed (`--nocapture`); an entry late beyond its bound is
//! traced: every call on its path with its fault, and our server's log lines about it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed unwrap is a failed test

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_servicediscovery::types::HealthStatusFilter;
use cloudmap_xds::test_helpers::{eventually, http_get};
use serde_json::Value;
use support::fault_proxy::{ANY_OPERATION, Fault, FaultProxy};
use support::istiod::{
    ISTIOD_SYNC_DEADLINE, Istiod, IstiodBin, ServerProcess, assert_configz_is, configz_name,
};
use support::moto::{self, Moto, Seeder};
use tokio::sync::Mutex;

const BIN: &str = env!("CARGO_BIN_EXE_cloudmap-xds");
const SECS_ENV: &str = "CLOUDMAP_XDS_SOAK_SECS";
const SEED_ENV: &str = "CLOUDMAP_XDS_SOAK_SEED";
const FAULTS_ENV: &str = "CLOUDMAP_XDS_SOAK_FAULTS";
/// Set: the report traces the four slowest appearances (calls, faults, our log lines).
const TRACE_ENV: &str = "CLOUDMAP_XDS_SOAK_TRACE";
/// The CI run: this long, with this seed.
const CI_SECS: u64 = 30;
const CI_SEED: u64 = 1108;
/// Per call of every operation, SDK retries included (each attempt draws anew).
const DEFAULT_FAULTS: [(Fault, f64); 5] = [
    (Fault::Throttle, 0.03),
    (Fault::ServerError, 0.03),
    (Fault::Hang, 0.01),
    (Fault::Truncate, 0.02),
    (Fault::Reset, 0.02),
];

// Our server's schedule: the defaults (5 s, 30 s, 30 s) divided by ten, so that full refreshes
// and listings come often within the soak and keep their proportions.
const POLL: Duration = Duration::from_millis(500);
const FULL_REFRESH: Duration = Duration::from_secs(3);
const LIST: Duration = Duration::from_secs(3);
/// One attempt; a hanging answer costs this much, then the SDK retries.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// `inventory::JITTER`: schedules are spread by ±10 %.
const JITTER: f64 = 0.1;

/// One churn action this often (the only fixed wait of the test).
const CHURN_EVERY: Duration = Duration::from_millis(200);
const ISTIOD_SAMPLE_EVERY: Duration = Duration::from_millis(250);
const MOTO_SAMPLE_EVERY: Duration = Duration::from_secs(1);

const NAMESPACES: [&str; 2] = ["soak-a", "soak-b"];
/// Service names per namespace; some are absent at any time (deleted, re-created).
const NAMES: usize = 8;
const INITIAL_SERVICES: usize = 6;
const INITIAL_INSTANCES: usize = 3;
const TARGET_INSTANCES: usize = 3;
const MAX_INSTANCES: usize = 6;
/// Deletion stops here, far from `--mass-removal-threshold`.
const MIN_SERVICES: usize = 8;
/// Registrations timed before the faults start, for the propagation bound.
const CALIBRATIONS: usize = 6;
const PUBLISH_NAMESPACE: &str = "istio-system";

/// An entry: a ServiceEntry (`namespace/name`, address "") or one endpoint address of it.
type Entry = (String, String);

fn se_name(namespace: &str, service: &str) -> String {
    format!("{PUBLISH_NAMESPACE}/cloudmap-{service}.{namespace}")
}

// ---- the model of moto ----------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Svc {
    id: String,
    custom_health: bool,
    port: Option<u16>,
    /// Instance ID → (IPv4, healthy).
    instances: BTreeMap<String, (String, bool)>,
}

impl Svc {
    /// What DiscoverInstances answers under HEALTHY_OR_ELSE_ALL: (ID, IPv4), sorted by ID.
    /// moto applies the filter to services without a health check too, but never flips them here.
    fn discoverable(&self) -> Vec<(String, String)> {
        let healthy: Vec<_> = self
            .instances
            .iter()
            .filter(|(_, (_, h))| *h)
            .map(|(id, (ip, _))| (id.clone(), ip.clone()))
            .collect();
        if healthy.is_empty() {
            self.instances.iter().map(|(id, (ip, _))| (id.clone(), ip.clone())).collect()
        } else {
            healthy
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Event {
    at: Instant,
    added: bool,
}

/// What moto holds, and when each entry came and went.
struct Model {
    seeder: Seeder,
    rng: fastrand::Rng,
    /// (name, ID)
    namespaces: Vec<(String, String)>,
    /// (namespace index, service name) → service, for the services that exist.
    services: BTreeMap<(usize, String), Svc>,
    instances_registered: u32,
    /// Entries held now, and since when.
    present: BTreeMap<Entry, Instant>,
    /// Every appearance and disappearance, in time order per entry.
    history: BTreeMap<Entry, Vec<Event>>,
    actions: BTreeMap<&'static str, u64>,
    /// Every Cloud Map service ID each ServiceEntry name had, for tracing a late entry's calls.
    ids: BTreeMap<String, Vec<String>>,
}

impl Model {
    fn entries_of(&self, key: &(usize, String)) -> BTreeSet<Entry> {
        let Some(svc) = self.services.get(key) else { return BTreeSet::new() };
        let name = se_name(&self.namespaces[key.0].0, &key.1);
        std::iter::once((name.clone(), String::new()))
            .chain(svc.discoverable().into_iter().map(|(_, ip)| (name.clone(), ip)))
            .collect()
    }

    /// Brings `present` and `history` up to date for one service after a write to moto.
    fn settle(&mut self, key: &(usize, String)) {
        let now = Instant::now();
        let name = se_name(&self.namespaces[key.0].0, &key.1);
        let want = self.entries_of(key);
        let had: BTreeSet<Entry> = self
            .present
            .range((name.clone(), String::new())..)
            .take_while(|(e, _)| e.0 == name)
            .map(|(e, _)| e.clone())
            .collect();
        for gone in had.difference(&want) {
            self.present.remove(gone);
            self.history.entry(gone.clone()).or_default().push(Event { at: now, added: false });
        }
        for new in want.difference(&had) {
            self.present.insert(new.clone(), now);
            self.history.entry(new.clone()).or_default().push(Event { at: now, added: true });
        }
    }

    async fn create_service(&mut self, key: (usize, String), custom_health: bool, port: Option<u16>) {
        let created = self.seeder.create_service(&self.namespaces[key.0].1, &key.1, custom_health).await;
        let name = se_name(&self.namespaces[key.0].0, &key.1);
        self.ids.entry(name).or_default().push(created.id.clone());
        self.services
            .insert(key.clone(), Svc { id: created.id, custom_health, port, instances: BTreeMap::new() });
        self.settle(&key);
    }

    async fn register(&mut self, key: &(usize, String)) -> Entry {
        self.instances_registered += 1;
        let n = self.instances_registered;
        let (id, ip) = (format!("i-{n}"), format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255));
        let svc = &self.services[key];
        let port = svc.port.map(|p| p.to_string());
        let mut attributes = vec![("AWS_INSTANCE_IPV4", ip.as_str())];
        if let Some(port) = &port {
            attributes.push(("AWS_INSTANCE_PORT", port));
        }
        self.seeder.register(&svc.id, &id, &attributes).await;
        self.services.get_mut(key).unwrap().instances.insert(id, (ip.clone(), true));
        self.settle(key);
        (se_name(&self.namespaces[key.0].0, &key.1), ip)
    }

    async fn deregister(&mut self, key: &(usize, String), instance: &str) {
        let svc = self.services.get_mut(key).unwrap();
        self.seeder.deregister(&svc.id, instance).await;
        svc.instances.remove(instance);
        self.settle(key);
    }

    async fn set_health(&mut self, key: &(usize, String), instance: &str, healthy: bool) {
        let svc = self.services.get_mut(key).unwrap();
        self.seeder.set_health(&svc.id, instance, healthy).await;
        svc.instances.get_mut(instance).unwrap().1 = healthy;
        self.settle(key);
    }

    async fn delete_service(&mut self, key: &(usize, String)) {
        let instances: Vec<String> = self.services[key].instances.keys().cloned().collect();
        for instance in instances {
            self.deregister(key, &instance).await;
        }
        let id = self.services[key].id.clone();
        self.seeder.client().delete_service().id(&id).send().await.unwrap();
        self.services.remove(key);
        self.settle(key);
    }

    fn pick<T: Clone>(&mut self, from: &[T]) -> Option<T> {
        (!from.is_empty()).then(|| from[self.rng.usize(..from.len())].clone())
    }

    /// One churn action, chosen by the seeded generator.
    async fn churn(&mut self) {
        let roll = self.rng.f64();
        let keys: Vec<(usize, String)> = self.services.keys().cloned().collect();
        let instances: usize = self.services.values().map(|s| s.instances.len()).sum();
        // Registrations and deregistrations keep about TARGET_INSTANCES per service.
        let register_share = if instances < TARGET_INSTANCES * self.services.len() { 0.7 } else { 0.3 };
        let action = if roll < 0.6 * register_share {
            let room: Vec<_> =
                keys.iter().filter(|k| self.services[*k].instances.len() < MAX_INSTANCES).cloned().collect();
            match self.pick(&room) {
                Some(key) => {
                    self.register(&key).await;
                    "register"
                }
                None => "skipped",
            }
        } else if roll < 0.6 {
            let all: Vec<_> = keys
                .iter()
                .flat_map(|k| self.services[k].instances.keys().map(move |i| (k.clone(), i.clone())))
                .collect();
            match self.pick(&all) {
                Some((key, instance)) => {
                    self.deregister(&key, &instance).await;
                    "deregister"
                }
                None => "skipped",
            }
        } else if roll < 0.90 {
            // Only services with a custom health check: moto would filter the others by health too, AWS not.
            let all: Vec<_> = keys
                .iter()
                .filter(|k| self.services[*k].custom_health)
                .flat_map(|k| {
                    self.services[k].instances.iter().map(move |(i, (_, h))| (k.clone(), i.clone(), *h))
                })
                .collect();
            match self.pick(&all) {
                Some((key, instance, healthy)) => {
                    self.set_health(&key, &instance, !healthy).await;
                    if healthy { "mark unhealthy" } else { "mark healthy" }
                }
                None => "skipped",
            }
        } else if roll < 0.95 {
            let absent: Vec<(usize, String)> = (0..NAMESPACES.len())
                .flat_map(|ns| (0..NAMES).map(move |n| (ns, format!("svc-{n}"))))
                .filter(|k| !self.services.contains_key(k))
                .collect();
            match self.pick(&absent) {
                Some(key) => {
                    let custom_health = self.rng.bool();
                    let port = self.rng.bool().then_some(8080);
                    self.create_service(key, custom_health, port).await;
                    "create service"
                }
                None => "skipped",
            }
        } else if keys.len() > MIN_SERVICES {
            let key = self.pick(&keys).unwrap();
            self.delete_service(&key).await;
            "delete service"
        } else {
            "skipped"
        };
        *self.actions.entry(action).or_default() += 1;
    }
}

/// Whether `history` holds the entry throughout `[from, to]`.
fn held_throughout(history: &[Event], from: Instant, to: Instant) -> bool {
    let mut since = None;
    for e in history {
        if e.at > to {
            break;
        }
        since = e.added.then_some(e.at);
    }
    since.is_some_and(|s| s <= from)
}

// ---- samples ------------------------------------------------------------------------------------------

/// istiod's entries at one moment.
struct Sample {
    at: Instant,
    entries: BTreeSet<Entry>,
}

fn entries_in(configz: &[Value]) -> BTreeSet<Entry> {
    let mut entries = BTreeSet::new();
    for config in configz {
        let name = configz_name(config);
        for endpoint in config["spec"]["endpoints"].as_array().into_iter().flatten() {
            entries.insert((name.clone(), endpoint["address"].as_str().unwrap_or_default().to_owned()));
        }
        entries.insert((name, String::new()));
    }
    entries
}

/// Checks the model against moto, one service at a time under the lock (the churn waits
/// at most one call): `ListServices` gives the same service IDs and `DiscoverInstances`
/// under HEALTHY_OR_ELSE_ALL the same instances and addresses.
async fn check_model_against_moto(model: &Mutex<Model>, seeder: &Seeder) -> usize {
    let keys: Vec<(usize, String)> = {
        let m = model.lock().await;
        let listed = seeder.client().list_services().send().await.unwrap();
        let mut ids: Vec<String> =
            listed.services().iter().filter_map(|s| s.id().map(str::to_owned)).collect();
        ids.sort();
        let mut want: Vec<String> = m.services.values().map(|s| s.id.clone()).collect();
        want.sort();
        assert_eq!(ids, want, "moto's ListServices (left) differs from the churn model (right)");
        m.services.keys().cloned().collect()
    };
    let mut checked = 0;
    for key in keys {
        let m = model.lock().await;
        let Some(svc) = m.services.get(&key) else { continue };
        let got = seeder.discover(&m.namespaces[key.0].0, &key.1, HealthStatusFilter::HealthyOrElseAll).await;
        assert_eq!(
            got,
            svc.discoverable(),
            "{key:?}: moto's DiscoverInstances (left) differs from the model"
        );
        checked += 1;
    }
    checked
}

// ---- settings, bounds, report --------------------------------------------------------------------------

struct Settings {
    duration: Duration,
    seed: u64,
    faults: Vec<(Fault, f64)>,
}

impl Settings {
    fn from_env() -> Settings {
        let duration = std::env::var(SECS_ENV)
            .ok()
            .filter(|v| !v.is_empty())
            .map_or(CI_SECS, |v| v.parse().unwrap_or_else(|e| panic!("{SECS_ENV}={v}: {e}")));
        let seed = match std::env::var(SEED_ENV).ok().filter(|v| !v.is_empty()) {
            None => CI_SEED,
            Some(v) if v == "random" => fastrand::u64(..),
            Some(v) => v.parse().unwrap_or_else(|e| panic!("{SEED_ENV}={v}: {e} (a number, or `random`)")),
        };
        let faults = match std::env::var(FAULTS_ENV).ok().filter(|v| !v.is_empty()) {
            None => DEFAULT_FAULTS.to_vec(),
            Some(v) => v
                .split(',')
                .map(|pair| {
                    let (name, rate) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("{FAULTS_ENV}: {pair:?} is not KIND=RATE"));
                    let fault = Fault::from_name(name.trim()).unwrap_or_else(|| {
                        panic!(
                            "{FAULTS_ENV}: unknown fault {name:?} (one of {:?})",
                            Fault::ALL.map(Fault::name)
                        )
                    });
                    (fault, rate.trim().parse().unwrap_or_else(|e| panic!("{FAULTS_ENV}: {pair:?}: {e}")))
                })
                .collect(),
        };
        Settings { duration: Duration::from_secs(duration), seed, faults }
    }
}

/// How late an entry may reach istiod: a base for an undisturbed path, plus what the faults
/// injected on that entry's own path cost (see [`FaultCosts`]). The issue's criterion is "no
/// entry missing from istiod that moto had held for longer than a full refresh interval":
/// here that interval is 3 s (production: 30 s), and the base adds what any change needs
/// on top of the interval it waits for (a poll tick, the listing's pace, the read and the
/// push), all scaled ÷10 with the intervals. The fault costs are not scaled: the SDK's
/// backoff (up to 1 s, then 2 s) and the attempt timeout (1 s here) are what they would be
/// in production, so against production's 30 s intervals they weigh ten times less.
///
/// Endpoint (`lag`): a change the revision check misses (moto's revision is a count of
/// instances, so a deregistration plus a registration leave it unchanged; health never
/// moves it) is read by the service's next full refresh: at most `--full-refresh-interval`
/// (+10 % jitter) after its last read, at the first poll tick after that (`--poll-interval`,
/// +10 %). From that read to istiod's store is the propagation measured before the faults
/// start (registration → istiod: one poll, the read, `--min-push-interval`, istiod's apply),
/// doubled for the scheduling noise of a loaded machine.
///
/// Service (`service_lag`, endpoint key ""): a new service is seen by the first listing whose
/// ListServices of its namespace answers after its creation. Created just after one did,
/// it waits for the rest of that listing (its other ListServices), `--list-interval` (+10 %)
/// from that listing's end, the first poll tick after that, and the new listing up to its
/// namespace; a listing makes `1 + NAMESPACES` calls through the list bucket (`--rate-list`
/// 2/s, burst 2), so each of those two listing stretches is paced at most [`LISTING_PACE`].
/// Then its instances and attributes are read (in parallel) and the propagation follows.
/// An endpoint of a new service cannot arrive before its service, so its deadline is at
/// least its service's.
struct Bounds {
    propagation: Duration,
    lag: Duration,
    service_lag: Duration,
}

/// The list bucket's pause in one listing: `1 + NAMESPACES` calls at 2/s with a burst of 2.
const LISTING_PACE: Duration = Duration::from_millis(500);

impl Bounds {
    fn new(calibrated: Duration) -> Bounds {
        let propagation = calibrated * 2;
        let tick = POLL.mul_f64(1.0 + JITTER);
        let lag = FULL_REFRESH.mul_f64(1.0 + JITTER) + tick + propagation;
        let service_lag = LIST.mul_f64(1.0 + JITTER) + tick + LISTING_PACE * 2 + propagation;
        Bounds { propagation, lag, service_lag }
    }

    fn base(&self, entry: &Entry) -> Duration {
        if entry.1.is_empty() { self.service_lag } else { self.lag }
    }
}

/// The SDK's standard retry (3 attempts) sleeps a random part of 1 s before the second
/// attempt and of 2 s before the third; each faulted attempt is charged the larger.
const SDK_MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A faulted attempt before `since - this` was followed by the next attempt before the
/// entry appeared: it cannot delay it.
const FAULT_REACH: Duration = Duration::from_secs(3); // REQUEST_TIMEOUT + SDK_MAX_BACKOFF
/// `inventory::MIN_THROTTLE_QUIET` and the poll backoff's cap (12 polls): polls stay slowed
/// down this long after a throttled answer, at most.
const SLOWED_FOR: Duration = Duration::from_secs(16);

/// What the faults on an entry's path cost, from the proxy's journal and our log.
///
/// - Each faulted attempt of a call on the path (a throttle, a 5xx, a truncated body or a
///   reset) costs the SDK's backoff before the next attempt, at most [`SDK_MAX_BACKOFF`]; a
///   hang costs the attempt timeout (`--aws-request-timeout`, [`REQUEST_TIMEOUT`]) on top. A
///   third faulted attempt fails the call; the service (or the listing) is tried again at
///   the next poll tick, which costs less than that.
/// - The path of an endpoint: the Discover calls of its service (namespace and name); of a
///   service: those, its GetServiceAttributes (by ID) and every listing call (ListNamespaces
///   and the ListServices of every namespace: they run in sequence).
/// - A failed call that was throttled on every attempt slows every poll down (logged with
///   the slowed interval): one slowed tick on the path replaces the base's poll tick.
struct FaultCosts<'a> {
    journal: &'a [support::fault_proxy::Call],
    /// When polls were slowed down for throttling, and to what interval.
    slowdowns: Vec<(Instant, Duration)>,
}

impl FaultCosts<'_> {
    fn allowance(&self, entry: &Entry, ids: &[String], since: Instant, until: Instant) -> Duration {
        let from = since.checked_sub(FAULT_REACH).unwrap_or(since);
        let (service, namespace) = service_of(entry);
        let service_level = entry.1.is_empty();
        let mut cost = Duration::ZERO;
        for call in self.journal.iter().filter(|c| c.at >= from && c.at <= until) {
            let Some(fault) = call.fault else { continue };
            let on_path = if call.operation.starts_with("List") {
                service_level
            } else if call.operation == "GetServiceAttributes" {
                service_level && call.service.as_deref().is_some_and(|s| ids.iter().any(|id| id == s))
            } else {
                call.service.as_deref() == Some(service) && call.namespace.as_deref() == Some(namespace)
            };
            if on_path {
                cost += SDK_MAX_BACKOFF;
                if fault == Fault::Hang {
                    cost += REQUEST_TIMEOUT;
                }
            }
        }
        let slow_from = since.checked_sub(SLOWED_FOR).unwrap_or(since);
        let slowed =
            self.slowdowns.iter().filter(|(at, _)| *at >= slow_from && *at <= until).map(|(_, d)| *d).max();
        cost + slowed.unwrap_or_default()
    }
}

/// `("istio-system/cloudmap-svc-2.soak-b", _)` → `("svc-2", "soak-b")`
fn service_of(entry: &Entry) -> (&str, &str) {
    entry.0.trim_start_matches(PUBLISH_NAMESPACE).trim_start_matches("/cloudmap-").split_once('.').unwrap()
}

/// Our log's "slowing down" lines: (when, the slowed poll interval).
fn slowdowns_in(log: &str, clock: Clock) -> Vec<(Instant, Duration)> {
    let mut slowdowns = Vec::new();
    for line in log.lines() {
        let Ok(json) = serde_json::from_str::<Value>(line) else { continue };
        if json["message"].as_str() != Some("Cloud Map is throttling; slowing down") {
            continue;
        }
        let at = humantime::parse_rfc3339(json["timestamp"].as_str().unwrap()).unwrap();
        let delay = parse_debug_duration(json["next_poll_in"].as_str().unwrap());
        let at = match at.duration_since(clock.wall) {
            Ok(d) => clock.instant + d,
            Err(e) => clock.instant.checked_sub(e.duration()).unwrap_or(clock.instant),
        };
        slowdowns.push((at, delay));
    }
    slowdowns
}

/// A `Duration`'s `Debug` form (`902.974574ms`, `1.5s`).
fn parse_debug_duration(text: &str) -> Duration {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap();
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap();
    let secs = match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" => number / 1e6,
        "ns" => number / 1e9,
        _ => panic!("unexpected duration {text:?}"),
    };
    Duration::from_secs_f64(secs)
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// `cloudmap_xds_aws_calls_total` by (api, outcome), from our `/metrics`.
async fn aws_calls(server: &ServerProcess) -> BTreeMap<(String, String), u64> {
    let (status, body) = http_get(server.admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "cloudmap_xds_aws_calls_total")
        .filter_map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let count = value as u64;
            Some(((s.labels.get("api")?.to_owned(), s.labels.get("outcome")?.to_owned()), count))
        })
        .collect()
}

/// The errors our server logged (`error` fields of its JSON log lines), by message.
fn errors_logged(log: &str) -> BTreeMap<String, usize> {
    let mut errors = BTreeMap::new();
    for line in log.lines() {
        let Ok(line) = serde_json::from_str::<Value>(line) else { continue };
        if let Some(error) = line["error"].as_str() {
            // Calls for a deleted service (until a listing drops it) name the service.
            let error = if error.starts_with("ServiceNotFound") {
                "ServiceNotFound: <deleted service>"
            } else {
                error
            };
            *errors.entry(error.to_owned()).or_default() += 1;
        }
    }
    errors
}

/// One moment on both clocks, to place wall-clock log lines on the test's monotonic time line.
#[derive(Clone, Copy)]
struct Clock {
    instant: Instant,
    wall: std::time::SystemTime,
}

impl Clock {
    /// Seconds since the clock's moment (negative before it).
    fn since(&self, at: Instant) -> f64 {
        if at >= self.instant {
            (at - self.instant).as_secs_f64()
        } else {
            -(self.instant - at).as_secs_f64()
        }
    }

    fn since_wall(&self, at: std::time::SystemTime) -> f64 {
        match at.duration_since(self.wall) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        }
    }
}

/// What happened to a late entry between the listing before it appeared in moto and its
/// arrival in istiod: every Cloud Map request of its service (by name or ID) and every
/// listing request through the proxy, with the fault each got, and our server's log lines
/// about the service, the listings and the publications; times in seconds since the
/// faults started.
fn trace_late_entry(
    entry: &Entry,
    since: Instant,
    seen: Option<Instant>,
    ids: &[String],
    journal: &[support::fault_proxy::Call],
    log: &str,
    clock: Clock,
) -> String {
    let (from, to) =
        (clock.since(since) - LIST.as_secs_f64() * 1.5, seen.map_or(f64::MAX, |s| clock.since(s) + 0.5));
    let (service, namespace) = service_of(entry);
    let mut rows: Vec<(f64, String)> = Vec::new();
    for call in journal {
        let at = clock.since(call.at);
        let listing = call.operation.starts_with("List");
        let ours = call.service.as_deref().is_some_and(|s| s == service || ids.iter().any(|id| id == s))
            && call.namespace.as_deref().is_none_or(|n| n == namespace);
        if (listing || ours) && (from..=to).contains(&at) {
            let fault = call.fault.map_or("ok".to_owned(), |f| f.to_string());
            rows.push((
                at,
                format!("proxy  {} {} -> {fault}", call.operation, call.service.as_deref().unwrap_or("")),
            ));
        }
    }
    for line in log.lines() {
        let Ok(json) = serde_json::from_str::<Value>(line) else { continue };
        let Some(at) = json["timestamp"].as_str().and_then(|t| humantime::parse_rfc3339(t).ok()) else {
            continue;
        };
        let at = clock.since_wall(at);
        let message = json["message"].as_str().unwrap_or_default();
        let ours = json["namespace"].as_str() == Some(namespace) && json["service"].as_str() == Some(service);
        let listing = json["namespace"].is_string() && json["service"].is_null()
            || message.contains("listing")
            || message.contains("List")
            || message.contains("throttling")
            || message.contains("snapshot published");
        if (ours || listing) && (from..=to).contains(&at) {
            rows.push((at, format!("server {line}")));
        }
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out = format!(
        "trace of {entry:?} (IDs {ids:?}): in moto from +{:.3}s, first in istiod {}\n",
        clock.since(since),
        seen.map_or("never".to_owned(), |s| format!("+{:.3}s", clock.since(s)))
    );
    for (at, row) in rows {
        writeln!(out, "  +{at:.3}s {row}").unwrap();
    }
    out
}

// ---- the soak ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_through_faults_never_loses_an_entry_and_ends_exactly_as_moto() {
    let settings = Settings::from_env();
    let rates: Vec<String> = settings.faults.iter().map(|(f, r)| format!("{f}={r}")).collect();
    eprintln!(
        "soak: seed {} ({SEED_ENV}={} reproduces it), {:?} of churn, faults per call: {}",
        settings.seed,
        settings.seed,
        settings.duration,
        rates.join(",")
    );
    let bin = IstiodBin::current();
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start().await;
    let seeder = moto.seeder().await;

    // The initial registry, written straight to moto.
    let mut model = Model {
        seeder: seeder.clone(),
        rng: fastrand::Rng::with_seed(settings.seed),
        namespaces: Vec::new(),
        services: BTreeMap::new(),
        instances_registered: 0,
        present: BTreeMap::new(),
        history: BTreeMap::new(),
        actions: BTreeMap::new(),
        ids: BTreeMap::new(),
    };
    for ns in NAMESPACES {
        let id = seeder.create_http_namespace(ns).await;
        model.namespaces.push((ns.to_owned(), id));
    }
    for ns in 0..NAMESPACES.len() {
        for n in 0..INITIAL_SERVICES {
            let key = (ns, format!("svc-{n}"));
            let custom_health = n % 2 == 0;
            let port = (n % 3 == 0).then_some(8080);
            model.create_service(key.clone(), custom_health, port).await;
            for _ in 0..INITIAL_INSTANCES {
                model.register(&key).await;
            }
        }
    }

    let proxy = FaultProxy::start(moto.addr()).await;
    let endpoint = proxy.endpoint();
    let (poll, full, list, timeout) = (
        humantime::format_duration(POLL).to_string(),
        humantime::format_duration(FULL_REFRESH).to_string(),
        humantime::format_duration(LIST).to_string(),
        humantime::format_duration(REQUEST_TIMEOUT).to_string(),
    );
    let args = [
        "--aws-region",
        moto::REGION,
        "--aws-endpoint-url",
        &endpoint,
        "--publish-namespace",
        PUBLISH_NAMESPACE,
        "--poll-interval",
        &poll,
        "--full-refresh-interval",
        &full,
        "--list-interval",
        &list,
        "--aws-request-timeout",
        &timeout,
        // Every failed call is logged (the first of a series at warn, the rest at debug).
        "--log",
        "info,cloudmap_xds::source::cloudmap=debug",
    ];
    let envs = moto::CLIENT_ENV;
    let server = ServerProcess::start(BIN, dir.path().join("cloudmap-xds.log"), &args, &envs).await;
    let mut istiod = Istiod::spawn(&bin, dir.path(), &[server.grpc]);
    istiod.wait_synced(ISTIOD_SYNC_DEADLINE).await;
    let istiod = Arc::new(istiod);
    let model = Arc::new(Mutex::new(model));

    let want = model.lock().await.present.keys().cloned().collect::<BTreeSet<_>>();
    eventually("istiod to hold the initial registry", Duration::from_secs(60), || async {
        istiod.try_configz().await.ok().filter(|c| entries_in(c) == want).map(|_| ())
    })
    .await;
    let rss_start = vm_kib(server.pid(), "VmRSS:");

    // The propagation bound, without faults: registration → istiod's store.
    let mut calibration = Vec::new();
    for n in 0..CALIBRATIONS {
        let (entry, registered) = {
            let mut m = model.lock().await;
            let key = (n % NAMESPACES.len(), format!("svc-{}", n % INITIAL_SERVICES));
            (m.register(&key).await, Instant::now())
        };
        eventually(&format!("istiod to take {entry:?}"), Duration::from_secs(30), || async {
            istiod.try_configz().await.ok().filter(|c| entries_in(c).contains(&entry)).map(|_| ())
        })
        .await;
        calibration.push(registered.elapsed());
    }
    let bounds = Bounds::new(calibration.iter().copied().max().unwrap());
    eprintln!(
        "soak: propagation without faults (registration -> istiod) {calibration:?}; propagation bound {:?}; lag bounds before fault costs: endpoint {:?}, service {:?}",
        bounds.propagation, bounds.lag, bounds.service_lag
    );

    // Faults on; churn, and sample both sides, for the soak's duration.
    for (fault, rate) in &settings.faults {
        assert!(*rate > 0.0 && *rate <= 1.0, "{fault}={rate}");
    }
    proxy.inject_randomly(settings.seed, ANY_OPERATION, &settings.faults);
    let faults_on = Instant::now();
    let faults_on_wall = std::time::SystemTime::now();
    let calls_before = proxy.calls();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let istiod_sampler = tokio::spawn({
        let (istiod, stop) = (istiod.clone(), stop.clone());
        async move {
            let mut samples = Vec::new();
            let mut errors = Vec::new();
            let mut cadence = tokio::time::interval(ISTIOD_SAMPLE_EVERY);
            cadence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                cadence.tick().await;
                let at = Instant::now();
                match istiod.try_configz().await {
                    Ok(configz) => samples.push(Sample { at, entries: entries_in(&configz) }),
                    Err(e) => errors.push(e),
                }
            }
            (samples, errors)
        }
    });
    let moto_sampler = tokio::spawn({
        let (model, seeder, stop) = (model.clone(), seeder.clone(), stop.clone());
        async move {
            let (mut samples, mut services) = (0u64, 0u64);
            let mut cadence = tokio::time::interval(MOTO_SAMPLE_EVERY);
            cadence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                cadence.tick().await;
                services += check_model_against_moto(&model, &seeder).await as u64;
                samples += 1;
            }
            (samples, services)
        }
    });
    let churn_until = Instant::now() + settings.duration;
    let mut cadence = tokio::time::interval(CHURN_EVERY);
    cadence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < churn_until {
        cadence.tick().await;
        model.lock().await.churn().await;
    }
    let churn_ended = Instant::now();

    // Churn over, faults still on: istiod must come to hold exactly what moto holds.
    let want = model.lock().await.present.keys().cloned().collect::<BTreeSet<_>>();
    // The last changes' deadline, with up to three hangs on their path.
    let settle = bounds.service_lag + (SDK_MAX_BACKOFF + REQUEST_TIMEOUT) * 3;
    let configz = eventually("istiod to hold exactly what moto holds", settle, || async {
        istiod.try_configz().await.ok().filter(|c| entries_in(c) == want)
    })
    .await;
    let converged = churn_ended.elapsed();
    check_model_against_moto(&model, &seeder).await;
    let served = server.service_entries().await;
    assert_configz_is(&configz, &served);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (samples, sample_errors) = istiod_sampler.await.unwrap();
    let (moto_samples, moto_services_checked) = moto_sampler.await.unwrap();
    let fired = proxy.fired();
    let calls = proxy.calls();
    let our_calls = aws_calls(&server).await;
    let rss_end = vm_kib(server.pid(), "VmRSS:");
    let rss_peak = vm_kib(server.pid(), "VmHWM:");
    let throttled_polls = server.log().matches("Cloud Map is throttling; slowing down").count();
    let surfaced = errors_logged(&server.log());
    assert!(sample_errors.is_empty(), "istiod's configz failed: {sample_errors:?}");

    // The invariants, over every istiod sample since the faults started.
    let m = model.lock().await;
    let mut lags = Vec::new();
    let clock = Clock { instant: faults_on, wall: faults_on_wall };
    let (log, journal) = (server.log(), proxy.journal());
    let costs = FaultCosts { journal: &journal, slowdowns: slowdowns_in(&log, clock) };
    let ids_of = |entry: &Entry| m.ids.get(&entry.0).map_or(&[][..], Vec::as_slice);
    // The longest an entry was missing beyond its base bound, with what its faults allowed.
    let mut tightest: Option<(Entry, Duration, Duration)> = None;
    let mut late = String::new();
    let mut slowest: Vec<(Duration, &Entry, Instant, Instant)> = Vec::new();
    // Each entry found missing beyond the bound, with when moto began holding it.
    let mut late_entries: BTreeMap<&Entry, Instant> = BTreeMap::new();
    let mut worst_missing = Duration::ZERO;
    let mut flaps = String::new();
    let (mut removals_seen, mut checked_points) = (0usize, 0usize);
    // Replay the model's history alongside the samples.
    let mut timeline: Vec<(Instant, &Entry, bool)> = m
        .history
        .iter()
        .flat_map(|(entry, events)| events.iter().map(move |e| (e.at, entry, e.added)))
        .collect();
    timeline.sort_by_key(|(at, _, _)| *at);
    let mut replay = timeline.iter().peekable();
    let mut held: BTreeMap<&Entry, Instant> = BTreeMap::new();
    // Entries not yet seen in istiod since they (re)appeared in moto.
    let mut unseen: BTreeMap<&Entry, Instant> = BTreeMap::new();
    let samples: Vec<&Sample> = samples.iter().filter(|s| s.at >= faults_on).collect();
    for sample in &samples {
        while let Some((at, entry, added)) = replay.next_if(|(at, _, _)| *at <= sample.at) {
            if *added {
                held.insert(entry, *at);
                if *at >= faults_on {
                    unseen.insert(entry, *at);
                }
            } else {
                held.remove(entry);
                unseen.remove(entry);
            }
        }
        for (entry, since) in &held {
            checked_points += 1;
            let since = (*since).max(faults_on);
            if sample.entries.contains(*entry) {
                if let Some(appeared) = unseen.remove(entry) {
                    lags.push(sample.at.saturating_duration_since(appeared));
                    slowest.push((
                        sample.at.saturating_duration_since(appeared),
                        *entry,
                        appeared,
                        sample.at,
                    ));
                }
            } else {
                let missing = sample.at.saturating_duration_since(since);
                worst_missing = worst_missing.max(missing);
                // Within the base, no fault is needed to explain it; beyond it, what the faults on
                // its path (and its service's) allow.
                let mut allowed = bounds.base(entry);
                if missing > allowed {
                    allowed += costs.allowance(entry, ids_of(entry), since, sample.at);
                    let service_entry = (entry.0.clone(), String::new());
                    if let Some(service_since) = held.get(&service_entry).filter(|_| !entry.1.is_empty()) {
                        let service_since = (*service_since).max(faults_on);
                        let service_deadline = service_since
                            + bounds.service_lag
                            + costs.allowance(&service_entry, ids_of(entry), service_since, sample.at);
                        allowed = allowed.max(service_deadline.saturating_duration_since(since));
                    }
                }
                let share = missing.as_secs_f64() / allowed.as_secs_f64();
                if tightest.as_ref().is_none_or(|(_, m, a)| share > m.as_secs_f64() / a.as_secs_f64()) {
                    tightest = Some(((*entry).clone(), missing, allowed));
                }
                if missing > allowed {
                    late_entries.entry(entry).or_insert(since);
                    if late.lines().count() < 20 {
                        writeln!(
                            late,
                            "+{:?}: {entry:?} held by moto for {missing:?}, not in istiod (bound with its faults {allowed:?})",
                            sample.at - faults_on
                        )
                        .unwrap();
                    }
                }
            }
        }
    }
    for pair in samples.windows(2) {
        let (before, after) = (pair[0], pair[1]);
        for entry in before.entries.difference(&after.entries) {
            removals_seen += 1;
            let history = m.history.get(entry).map_or(&[][..], Vec::as_slice);
            let from = before.at.checked_sub(bounds.lag).unwrap_or(before.at);
            if held_throughout(history, from, after.at) && flaps.lines().count() < 20 {
                writeln!(
                    flaps,
                    "+{:?}..+{:?}: {entry:?} removed from istiod while moto held it throughout",
                    before.at - faults_on,
                    after.at - faults_on
                )
                .unwrap();
            }
        }
    }
    lags.sort();
    let never_seen = unseen.len();

    // The report.
    let mut report = String::new();
    writeln!(report, "soak report (seed {}):", settings.seed).unwrap();
    writeln!(
        report,
        "  churn: {:?}, {} actions {:?}; {} services, {} entries at the end",
        settings.duration,
        m.actions.values().sum::<u64>(),
        m.actions,
        m.services.len(),
        want.len()
    )
    .unwrap();
    let total_calls: u64 = calls.iter().map(|(op, n)| n - calls_before.get(op).copied().unwrap_or(0)).sum();
    let total_fired: u64 = fired.values().sum();
    writeln!(
        report,
        "  requests through the proxy since the faults started: {total_calls}, faulted {total_fired}"
    )
    .unwrap();
    for fault in Fault::ALL {
        let by_op: Vec<String> =
            fired.iter().filter(|((_, f), _)| *f == fault).map(|((op, _), n)| format!("{op} {n}")).collect();
        if !by_op.is_empty() {
            let n: u64 = fired.iter().filter(|((_, f), _)| *f == fault).map(|(_, n)| n).sum();
            writeln!(report, "    {fault}: {n} ({})", by_op.join(", ")).unwrap();
        }
    }
    let outcomes: Vec<String> =
        our_calls.iter().map(|((api, outcome), n)| format!("{api}/{outcome} {n}")).collect();
    writeln!(report, "  our calls by outcome (after SDK retries): {}", outcomes.join(", ")).unwrap();
    writeln!(report, "  polls slowed down for throttling: {throttled_polls}").unwrap();
    for (error, n) in &surfaced {
        writeln!(report, "    logged {n}x: {error}").unwrap();
    }
    writeln!(
        report,
        "  istiod samples {} (every {ISTIOD_SAMPLE_EVERY:?}), {checked_points} entry checks; moto samples {moto_samples} ({moto_services_checked} services compared)",
        samples.len()
    )
    .unwrap();
    writeln!(
        report,
        "  lag (moto -> istiod) over {} appearances: p50 {:?}, p99 {:?}, max {:?}; longest an entry held by moto was missing from istiod {worst_missing:?}; {never_seen} appeared too briefly to be sampled",
        lags.len(),
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags.last().copied().unwrap_or_default(),
    )
    .unwrap();
    let tightest = tightest.map_or("none".to_owned(), |(entry, missing, allowed)| {
        format!("{entry:?} missing {missing:?} of {allowed:?} allowed")
    });
    writeln!(
        report,
        "  bounds before fault costs: endpoint {:?}, service {:?}; closest to its bound (with its faults' costs beyond the base): {tightest}",
        bounds.lag, bounds.service_lag
    )
    .unwrap();
    writeln!(
        report,
        "  removals seen in istiod: {removals_seen}, of entries moto still held: {}",
        flaps.lines().count()
    )
    .unwrap();
    writeln!(report, "  converged {converged:?} after the churn stopped").unwrap();
    writeln!(
        report,
        "  our VmRSS: {rss_start} KiB at the start, {rss_end} KiB at the end (peak {rss_peak} KiB)"
    )
    .unwrap();
    eprintln!("{report}");

    assert!(total_fired > 0, "no fault fired");
    slowest.sort_by_key(|s| std::cmp::Reverse(s.0));
    if std::env::var_os(TRACE_ENV).is_some() {
        for (lag, entry, appeared, seen) in slowest.iter().take(4) {
            let ids = m.ids.get(&entry.0).map_or(&[][..], Vec::as_slice);
            eprintln!("slow appearance, lag {lag:?}:");
            eprintln!("{}", trace_late_entry(entry, *appeared, Some(*seen), ids, &journal, &log, clock));
        }
    }
    if !late.is_empty() {
        for (entry, since) in late_entries.iter().take(3) {
            let seen = samples.iter().find(|s| s.at > *since && s.entries.contains(*entry)).map(|s| s.at);
            let ids = m.ids.get(&entry.0).map_or(&[][..], Vec::as_slice);
            eprintln!("{}", trace_late_entry(entry, *since, seen, ids, &journal, &log, clock));
        }
    }
    assert!(late.is_empty(), "entries missing from istiod for longer than their bound:\n{late}");
    assert!(flaps.is_empty(), "istiod lost entries moto still held:\n{flaps}");
    assert!(!lags.is_empty(), "no change was seen reaching istiod");
    assert_eq!(istiod.rejections(), Vec::<String>::new(), "istiod logged rejections");
}
