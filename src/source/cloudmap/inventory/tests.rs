use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::source::cloudmap::api::{Discovered, ErrorKind, NamespaceKind};
use crate::source::cloudmap::filter::Patterns;

const POLL: Duration = Duration::from_secs(5);
/// Out of the way unless a test is about the full refresh.
const FULL: Duration = Duration::from_secs(3600);
const LIST: Duration = Duration::from_secs(60);
const CONFIRM: Duration = Duration::from_secs(300);

struct Clock {
    start: Instant,
}

impl Clock {
    fn new() -> Self {
        Clock { start: Instant::now() }
    }
    fn at(&self, secs: f64) -> Now {
        Now {
            instant: self.start + Duration::from_secs_f64(secs),
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_secs_f64(secs),
        }
    }
}

fn config() -> Config {
    Config {
        poll_interval: POLL,
        list_interval: LIST,
        full_refresh_interval: FULL,
        mass_removal_threshold: 0.5,
        mass_removal_confirm_after: CONFIRM,
        filter: NameFilter::default(),
    }
}

fn ns(id: &str, name: &str) -> NamespaceInfo {
    NamespaceInfo { id: id.into(), name: name.into(), http_name: name.into(), kind: NamespaceKind::Http }
}

fn svc(ns_id: Option<&str>, name: &str) -> ServiceInfo {
    ServiceInfo {
        id: format!("srv-{name}"),
        name: name.into(),
        namespace_id: ns_id.map(Into::into),
        created: SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000),
        health_checked: true,
    }
}

/// One namespace `ns-1`/`shop` with the given services.
fn listing(names: &[&str]) -> Listing {
    listing_of(&[("ns-1", "shop", names)])
}

fn listing_of(namespaces: &[(&str, &str, &[&str])]) -> Listing {
    Listing {
        namespaces: namespaces.iter().map(|(id, name, _)| ns(id, name)).collect(),
        services: namespaces
            .iter()
            .map(|(id, _, names)| {
                let services = names.iter().map(|n| svc(Some(id), n)).collect();
                ((*id).to_owned(), NamespaceListing { result: Ok(services), calls: 1 })
            })
            .collect(),
    }
}

fn instance(id: &str, ip: &str, health: Health) -> Instance {
    Instance { id: id.into(), health, attributes: [("AWS_INSTANCE_IPV4", ip)].into() }
}

fn discovered(ips: &[&str], revision: i64) -> Discovered {
    Discovered {
        instances: ips
            .iter()
            .enumerate()
            .map(|(i, ip)| instance(&format!("i-{i}"), ip, Health::Healthy))
            .collect(),
        revision: Some(revision),
    }
}

fn key(service: &str) -> ServiceKey {
    ns_key("shop", service)
}

/// A service's key; `service` empty: the namespace's own status.
fn ns_key(namespace: &str, service: &str) -> ServiceKey {
    (namespace.into(), service.into())
}

fn err(kind: ErrorKind) -> ApiError {
    ApiError::new(kind, "boom")
}

fn keys(targets: &[Target]) -> Vec<String> {
    targets.iter().map(|t| format!("{}/{}", t.key.0, t.key.1)).collect()
}

/// Answers every attribute read due with no attributes.
fn read_attributes(inv: &mut Inventory, now: Now) {
    loop {
        let reads = inv.plan_attribute_reads(now.instant, usize::MAX);
        if reads.is_empty() {
            return;
        }
        for t in reads {
            inv.apply_attributes(&t.key, Ok(BTreeMap::new()), now);
        }
    }
}

/// Lists `names` and reads each with one instance at revision 1 and no attributes;
/// returns the synced inventory.
fn synced(clock: &Clock, names: &[&str]) -> Inventory {
    let mut inv = Inventory::new(config(), clock.start, 7);
    inv.apply_listing(Ok(listing(names)), clock.at(0.0));
    let plan = inv.plan_next_poll(clock.at(0.0).instant);
    assert!(plan.revision.is_empty());
    for t in plan.discover {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), clock.at(0.1));
    }
    read_attributes(&mut inv, clock.at(0.1));
    assert!(inv.finish_poll(clock.at(0.2)).initial_sync);
    assert!(inv.registry_update().is_some());
    inv
}

fn served(inv: &Inventory) -> Vec<String> {
    let mut copy = inv.clone();
    copy.dirty = true;
    copy.registry_update()
        .map(|r| {
            r.services.iter().map(|s| format!("{}/{}:{}", s.namespace, s.name, s.instances.len())).collect()
        })
        .unwrap_or_default()
}

#[test]
fn nothing_is_published_before_every_service_was_read() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 1);
    assert!(inv.listing_due(clock.at(0.0).instant));
    let report = inv.apply_listing(Ok(listing(&["a", "b"])), clock.at(0.0));
    assert_eq!(report.added, vec![key("a"), key("b")]);
    let plan = inv.plan_next_poll(clock.at(0.0).instant);
    assert_eq!(keys(&plan.discover), ["shop/a", "shop/b"]);
    inv.apply_instances(&key("a"), Ok(discovered(&["10.0.0.1"], 1)), clock.at(0.1));
    inv.apply_instances(&key("b"), Err(err(ErrorKind::Other)), clock.at(0.1));
    read_attributes(&mut inv, clock.at(0.1));
    assert_eq!(inv.finish_poll(clock.at(0.2)), PollSummary::default());
    assert!(!inv.synced());
    assert_eq!(inv.registry_update(), None, "a partial first sync is never published");

    // The failed service is retried at the next poll (first backoff step is zero).
    let plan = inv.plan_next_poll(clock.at(5.0).instant);
    assert_eq!(keys(&plan.discover), ["shop/b"]);
    assert_eq!(keys(&plan.revision), ["shop/a"]);
    inv.apply_revision(&key("a"), Ok(1), clock.at(5.1));
    inv.apply_instances(&key("b"), Ok(discovered(&["10.0.0.2"], 1)), clock.at(5.1));
    let summary = inv.finish_poll(clock.at(5.2));
    assert!(summary.initial_sync && summary.full_sync);
    assert_eq!(inv.last_full_sync(), Some(clock.at(5.2).wall));
    let registry = inv.registry_update().expect("published after the first complete sync");
    assert_eq!(registry.services.len(), 2);
    assert!(registry.complete);
    assert_eq!(inv.registry_update(), None, "unchanged content is not published again");
}

#[test]
fn force_publish_serves_what_was_read() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 1);
    inv.apply_listing(Ok(listing(&["a", "b"])), clock.at(0.0));
    inv.plan_next_poll(clock.at(0.0).instant);
    inv.apply_instances(&key("a"), Ok(discovered(&["10.0.0.1"], 1)), clock.at(0.1));
    inv.finish_poll(clock.at(0.2));
    inv.force_publish();
    let registry = inv.registry_update().unwrap();
    assert_eq!(registry.services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["a"]);
    assert!(!registry.complete, "a forced registry is partial (it never replaces a borrowed set)");
}

#[test]
fn idle_polls_cost_one_revision_call_per_service() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a", "b", "c"]);
    for poll in 1..=5 {
        let now = clock.at(f64::from(poll) * 5.0);
        assert!(!inv.listing_due(now.instant), "listing is on its own, slower schedule");
        let plan = inv.plan_next_poll(now.instant);
        assert!(plan.discover.is_empty(), "poll {poll}: {plan:?}");
        assert_eq!(plan.revision.len(), 3);
        for t in &plan.revision {
            assert!(!inv.apply_revision(&t.key, Ok(1), now));
        }
        inv.finish_poll(now);
        assert_eq!(inv.registry_update(), None);
    }
}

#[test]
fn a_different_revision_in_either_direction_triggers_a_read() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a", "b"]);
    let now = clock.at(5.0);
    inv.plan_next_poll(now.instant);
    // moto's revision is a sum that can go down: "changed if different", never "newer if greater".
    assert!(inv.apply_revision(&key("a"), Ok(0), now));
    assert!(!inv.apply_revision(&key("b"), Ok(1), now));
    assert!(inv.apply_instances(&key("a"), Ok(discovered(&["10.0.0.9"], 7)), now));
    // The revision stored is the one the revision call saw, so the next poll is quiet.
    let now = clock.at(10.0);
    let plan = inv.plan_next_poll(now.instant);
    assert_eq!(plan.revision.len(), 2);
    assert!(!inv.apply_revision(&key("a"), Ok(0), now));
}

#[test]
fn a_changed_revision_whose_read_fails_is_read_again() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a"]);
    let now = clock.at(5.0);
    inv.plan_next_poll(now.instant);
    assert!(inv.apply_revision(&key("a"), Ok(2), now));
    assert!(!inv.apply_instances(&key("a"), Err(err(ErrorKind::Timeout)), now));
    let plan = inv.plan_next_poll(clock.at(10.0).instant);
    assert_eq!(keys(&plan.discover), ["shop/a"], "still marked changed");
}

#[test]
fn every_service_is_read_in_full_once_per_interval_spread_evenly() {
    const REFRESH: f64 = 30.0;
    let clock = Clock::new();
    let config = Config { full_refresh_interval: Duration::from_secs_f64(REFRESH), ..config() };
    let mut inv = Inventory::new(config, clock.start, 11);
    let names: Vec<String> = (0..60).map(|n| format!("s{n:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    inv.apply_listing(Ok(listing(&refs)), clock.at(0.0));
    for t in inv.plan_next_poll(clock.at(0.0).instant).discover {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), clock.at(0.0));
    }
    read_attributes(&mut inv, clock.at(0.0));
    assert!(inv.finish_poll(clock.at(0.0)).initial_sync);
    let first_sync = inv.last_full_sync().unwrap();
    let mut reads_per_poll = Vec::new();
    let mut reads_of: BTreeMap<String, usize> = BTreeMap::new();
    let mut syncs = Vec::new();
    for poll in 1..=12 {
        let now = clock.at(f64::from(poll) * 5.0);
        let plan = inv.plan_next_poll(now.instant);
        assert_eq!(plan.revision.len() + plan.discover.len(), 60, "every service, one call each");
        reads_per_poll.push(plan.discover.len());
        for t in &plan.revision {
            assert!(!inv.apply_revision(&t.key, Ok(1), now), "health changes do not move the revision");
        }
        for t in &plan.discover {
            *reads_of.entry(t.key.1.to_string()).or_default() += 1;
            inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), now);
        }
        if inv.finish_poll(now).full_sync {
            syncs.push(f64::from(poll) * 5.0);
        }
    }
    // Over 60 s every service was re-read about twice, never more than once per ~30 s...
    assert!(reads_of.values().all(|&n| (1..=2).contains(&n)), "{reads_of:?}");
    assert_eq!(reads_of.len(), 60);
    // ...and the reads are spread: no poll reads more than a third of the registry.
    assert!(reads_per_poll.iter().all(|&n| n <= 20), "{reads_per_poll:?}");
    // A cycle in which every service was read ends about every interval and is recorded.
    assert!(!syncs.is_empty() && syncs[0] <= REFRESH + 5.0, "{syncs:?}");
    assert!(inv.last_full_sync().unwrap() > first_sync);
}

#[test]
fn the_full_refresh_sees_health_flips_and_waits_for_failed_reads() {
    let clock = Clock::new();
    let config = Config { full_refresh_interval: Duration::from_secs(30), ..config() };
    let mut inv = Inventory::new(config, clock.start, 5);
    inv.apply_listing(Ok(listing(&["a", "b"])), clock.at(0.0));
    for t in inv.plan_next_poll(clock.at(0.0).instant).discover {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), clock.at(0.0));
    }
    read_attributes(&mut inv, clock.at(0.0));
    assert!(inv.finish_poll(clock.at(0.0)).initial_sync);
    let first_sync = inv.last_full_sync();
    // Within one interval (plus a poll and the jitter) each service is read again.
    let mut t = 5.0;
    let mut flipped = false;
    while t <= 40.0 {
        let now = clock.at(t);
        let plan = inv.plan_next_poll(now.instant);
        for x in &plan.revision {
            inv.apply_revision(&x.key, Ok(1), now);
        }
        for x in &plan.discover {
            let mut d = discovered(&["10.0.0.1"], 1);
            if x.key == key("a") {
                d.instances[0].health = Health::Unhealthy;
                flipped = true;
                inv.apply_instances(&x.key, Ok(d), now);
            } else {
                // b's full read fails: the cycle is not complete.
                inv.apply_instances(&x.key, Err(err(ErrorKind::Throttled)), now);
            }
        }
        assert!(!inv.finish_poll(now).full_sync, "b was not read");
        t += 5.0;
    }
    assert!(flipped, "a was read in full within the interval");
    assert_eq!(inv.registry_update().unwrap().services[0].instances[0].health, Health::Unhealthy);
    assert_eq!(inv.last_full_sync(), first_sync);
    // b's read is retried (backoff) and then completes the cycle.
    let mut t = 45.0;
    loop {
        let now = clock.at(t);
        let plan = inv.plan_next_poll(now.instant);
        for x in &plan.revision {
            inv.apply_revision(&x.key, Ok(1), now);
        }
        for x in &plan.discover {
            inv.apply_instances(&x.key, Ok(discovered(&["10.0.0.1"], 1)), now);
        }
        if inv.finish_poll(now).full_sync {
            assert_eq!(inv.last_full_sync(), Some(now.wall));
            break;
        }
        assert!(t < 200.0, "never completed");
        t += 5.0;
    }
}

#[test]
fn services_with_a_call_in_flight_are_not_planned_again() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a", "b"]);
    let plan = inv.plan_next_poll(clock.at(5.0).instant);
    assert_eq!(plan.revision.len(), 2);
    // a answers, b hangs: the next poll only checks a.
    inv.apply_revision(&key("a"), Ok(1), clock.at(5.1));
    assert_eq!(keys(&inv.plan_next_poll(clock.at(10.0).instant).revision), ["shop/a"]);
    inv.apply_revision(&key("a"), Ok(1), clock.at(10.1));
    // A changed revision keeps the service in flight for its read.
    assert!(inv.apply_revision(&key("b"), Ok(2), clock.at(11.0)));
    assert_eq!(keys(&inv.plan_next_poll(clock.at(15.0).instant).revision), ["shop/a"]);
    // A dead task releases it.
    inv.abandon(&key("b"));
    assert_eq!(inv.plan_reads(clock.at(15.1).instant).len(), 1, "b still needs its read");
}

#[test]
fn plan_reads_reads_new_services_without_checking_the_others() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a"]);
    inv.apply_listing(Ok(listing(&["a", "b"])), clock.at(3.0));
    let reads = inv.plan_reads(clock.at(3.0).instant);
    assert_eq!(keys(&reads), ["shop/b"]);
    assert_eq!(keys(&inv.plan_next_poll(clock.at(5.0).instant).revision), ["shop/a"]);
}

#[test]
fn one_failing_service_does_not_block_the_others_and_backs_off() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a", "b"]);
    let mut t = 5.0;
    let mut attempts_of_a = Vec::new();
    while t <= 120.0 {
        let now = clock.at(t);
        let plan = inv.plan_next_poll(now.instant);
        if plan.revision.iter().chain(&plan.discover).any(|x| x.key == key("a")) {
            attempts_of_a.push(t);
            inv.apply_revision(&key("a"), Err(err(ErrorKind::Other)), now);
        }
        assert!(plan.revision.iter().chain(&plan.discover).any(|x| x.key == key("b")), "b is polled at {t}");
        inv.apply_revision(&key("b"), Ok(2), now);
        inv.apply_instances(&key("b"), Ok(discovered(&["10.0.0.2"], 2)), now);
        inv.finish_poll(now);
        t += 5.0;
    }
    // Retried at the next poll, then after 1, 3, 7 and at most 12 poll intervals.
    assert_eq!(attempts_of_a, [5.0, 10.0, 15.0, 30.0, 65.0]);
    let registry = inv.registry_update().unwrap();
    assert_eq!(&registry.services[0].instances[0].attributes["AWS_INSTANCE_IPV4"], "10.0.0.1", "a kept");
    assert_eq!(&registry.services[1].instances[0].attributes["AWS_INSTANCE_IPV4"], "10.0.0.2", "b moved on");
    let status = &inv.statuses()[&key("a")];
    assert!(status.last_error.as_deref().unwrap().starts_with("DiscoverInstancesRevision: boom"));
    // The first read, its attributes, then the attempts.
    assert_eq!(status.api_calls, 2 + attempts_of_a.len() as u64);
    assert!(inv.last_error().unwrap().0.starts_with("shop/a: DiscoverInstancesRevision"));
}

#[test]
fn a_mass_removal_is_held_until_listings_confirm_it_for_the_confirm_period() {
    let clock = Clock::new();
    let names = ["a", "b", "c", "d", "e", "f"];
    let mut inv = synced(&clock, &names);
    // Four of six vanish at once: held and still served.
    let report = inv.apply_listing(Ok(listing(&["a", "b"])), clock.at(60.0));
    assert_eq!(report.held, vec![key("c"), key("d"), key("e"), key("f")]);
    assert!(report.removed.is_empty());
    assert_eq!(inv.held_count(), 4);
    assert_eq!(served(&inv).len(), 6);
    assert!(inv.last_error().unwrap().0.starts_with("a mass removal is held: 4 services missing"));
    // Listings keep their pace; each one that still misses them only extends the hold.
    assert!(!inv.listing_due(clock.at(100.0).instant));
    for t in [120.0, 180.0, 240.0, 300.0] {
        assert!(inv.listing_due(clock.at(t + 6.0).instant), "listed again by {t}+jitter");
        let report = inv.apply_listing(Ok(listing(&["a", "b"])), clock.at(t));
        assert!(report.removed.is_empty() && report.held.is_empty(), "at {t}: {report:?}");
        assert_eq!(served(&inv).len(), 6, "at {t}");
    }
    // The listing at the end of the confirm period (60 + 300 s) is scheduled for then, and removes them.
    assert!(inv.listing_due(clock.at(360.0).instant));
    let report = inv.apply_listing(Ok(listing(&["a", "b"])), clock.at(360.0));
    assert_eq!(report.removed, vec![key("c"), key("d"), key("e"), key("f")]);
    assert_eq!(inv.held_count(), 0);
    assert_eq!(served(&inv), ["shop/a:1", "shop/b:1"]);
}

#[test]
fn a_held_removal_is_released_when_the_services_come_back() {
    let clock = Clock::new();
    let names = ["a", "b", "c", "d"];
    let mut inv = synced(&clock, &names);
    let report = inv.apply_listing(Ok(listing(&[])), clock.at(60.0));
    assert_eq!(report.held.len(), 4);
    // A listing failure in between confirms nothing.
    assert!(inv.apply_listing(Err(err(ErrorKind::Timeout)), clock.at(65.0)).failed);
    assert_eq!(served(&inv).len(), 4);
    // Two come back: released; the other two stay held from the first miss.
    let report = inv.apply_listing(Ok(listing(&["a", "b"])), clock.at(120.0));
    assert_eq!(report.released, vec![key("a"), key("b")]);
    assert!(report.removed.is_empty());
    assert_eq!(inv.held_count(), 2);
    let report = inv.apply_listing(Ok(listing(&names)), clock.at(200.0));
    assert_eq!(report.released, vec![key("c"), key("d")]);
    assert!(report.removed.is_empty() && report.held.is_empty());
    assert_eq!(inv.held_count(), 0);
    assert_eq!(served(&inv).len(), 4);
    // Released means forgotten: a later mass removal starts a new full period.
    inv.apply_listing(Ok(listing(&[])), clock.at(400.0));
    let report = inv.apply_listing(Ok(listing(&[])), clock.at(650.0));
    assert!(report.removed.is_empty(), "{report:?}");
    let report = inv.apply_listing(Ok(listing(&[])), clock.at(700.0));
    assert_eq!(report.removed.len(), 4);
}

#[test]
fn a_held_service_whose_namespace_fails_to_list_stays_held() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 3);
    let both = [("ns-1", "shop", &["a", "b"][..]), ("ns-2", "pay", &["c", "d"][..])];
    inv.apply_listing(Ok(listing_of(&both)), clock.at(0.0));
    for t in inv.plan_next_poll(clock.at(0.0).instant).discover {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), clock.at(0.0));
    }
    read_attributes(&mut inv, clock.at(0.0));
    assert!(inv.finish_poll(clock.at(0.0)).initial_sync);
    // Three of four vanish: held.
    let report =
        inv.apply_listing(Ok(listing_of(&[("ns-1", "shop", &["a"]), ("ns-2", "pay", &[])])), clock.at(10.0));
    assert_eq!(report.held.len(), 3);
    // At the deadline ns-2 fails to list: its services are neither confirmed nor released.
    let mut partial = listing_of(&[("ns-1", "shop", &["a"]), ("ns-2", "pay", &[])]);
    partial.services.get_mut("ns-2").unwrap().result = Err(err(ErrorKind::Other));
    let report = inv.apply_listing(Ok(partial), clock.at(310.0));
    assert_eq!(report.removed, vec![key("b")]);
    assert_eq!(inv.held_count(), 2);
    let report =
        inv.apply_listing(Ok(listing_of(&[("ns-1", "shop", &["a"]), ("ns-2", "pay", &[])])), clock.at(320.0));
    assert_eq!(report.removed, vec![ns_key("pay", "c"), ns_key("pay", "d")]);
}

#[test]
fn services_missed_during_a_hold_join_it() {
    let clock = Clock::new();
    let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
    let mut inv = synced(&clock, &names);
    let report = inv.apply_listing(Ok(listing(&["a", "b", "c", "d"])), clock.at(60.0));
    assert_eq!(report.held.len(), 6);
    // One more goes missing: on its own it is a small removal, but the listings are suspect.
    let report = inv.apply_listing(Ok(listing(&["a", "b", "c"])), clock.at(120.0));
    assert_eq!(report.held, vec![key("d")]);
    assert!(report.removed.is_empty());
    // Each is removed a full period after its own first miss.
    let report = inv.apply_listing(Ok(listing(&["a", "b", "c"])), clock.at(360.0));
    assert_eq!(report.removed.len(), 6);
    assert_eq!(inv.held_count(), 1);
    assert!(inv.listing_due(clock.at(420.0).instant));
    let report = inv.apply_listing(Ok(listing(&["a", "b", "c"])), clock.at(420.0));
    assert_eq!(report.removed, vec![key("d")]);
    // With no hold active, a small removal applies at once again.
    let report = inv.apply_listing(Ok(listing(&["a", "b"])), clock.at(480.0));
    assert_eq!(report.removed, vec![key("c")]);
}

#[test]
fn a_zero_confirm_period_lets_the_next_listing_confirm() {
    let clock = Clock::new();
    let config = Config { mass_removal_confirm_after: Duration::ZERO, ..config() };
    let mut inv = Inventory::new(config, clock.start, 7);
    inv.apply_listing(Ok(listing(&["a", "b", "c"])), clock.at(0.0));
    for t in inv.plan_next_poll(clock.at(0.0).instant).discover {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), clock.at(0.0));
    }
    read_attributes(&mut inv, clock.at(0.0));
    assert!(inv.finish_poll(clock.at(0.0)).initial_sync);
    assert_eq!(inv.apply_listing(Ok(listing(&[])), clock.at(60.0)).held.len(), 3);
    assert!(inv.listing_due(clock.at(60.0).instant), "confirmed at the next poll");
    assert_eq!(inv.apply_listing(Ok(listing(&[])), clock.at(65.0)).removed.len(), 3);
}

#[test]
fn an_empty_first_listing_waits_for_confirmation_before_the_first_sync() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 9);
    inv.apply_listing(Ok(listing(&[])), clock.at(0.0));
    assert!(!inv.finish_poll(clock.at(0.1)).initial_sync, "nothing to compare with: not trusted yet");
    assert!(!inv.synced());
    assert!(!inv.listing_due(clock.at(50.0).instant));
    inv.apply_listing(Ok(listing(&[])), clock.at(60.0));
    assert!(!inv.finish_poll(clock.at(60.1)).initial_sync);
    // Still empty at the end of the confirm period: an empty registry it is.
    assert!(inv.listing_due(clock.at(300.0).instant));
    inv.apply_listing(Ok(listing(&[])), clock.at(300.0));
    assert!(inv.finish_poll(clock.at(300.1)).initial_sync);
    assert_eq!(inv.registry_update().map(|r| r.services.len()), Some(0));
}

#[test]
fn an_empty_first_listing_is_released_by_one_that_finds_services() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 9);
    // Namespaces listed, but no services in any: as an anomaly hiding everything would look.
    inv.apply_listing(Ok(listing_of(&[("ns-1", "shop", &[]), ("ns-2", "pay", &[])])), clock.at(0.0));
    assert!(!inv.finish_poll(clock.at(0.1)).initial_sync);
    inv.apply_listing(Ok(listing(&["a"])), clock.at(60.0));
    for t in inv.plan_next_poll(clock.at(60.0).instant).discover {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), clock.at(60.1));
    }
    read_attributes(&mut inv, clock.at(60.1));
    assert!(inv.finish_poll(clock.at(60.2)).initial_sync);
    assert_eq!(served(&inv), ["shop/a:1"]);
}

#[test]
fn a_non_empty_first_listing_is_trusted() {
    // No previous state: a partial but non-empty first listing cannot be told from a small registry.
    let clock = Clock::new();
    let inv = synced(&clock, &["a"]);
    assert!(inv.synced());
}

#[test]
fn small_removals_and_additions_apply_at_once() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a", "b", "c"]);
    let report = inv.apply_listing(Ok(listing(&["a", "b", "d"])), clock.at(20.0));
    assert_eq!(report.removed, vec![key("c")]);
    assert_eq!(report.added, vec![key("d")]);
    let registry = inv.registry_update().unwrap();
    assert_eq!(registry.services.len(), 2, "d appears once it is read");
    let plan = inv.plan_next_poll(clock.at(20.0).instant);
    assert_eq!(keys(&plan.discover), ["shop/d"]);
}

#[test]
fn a_failed_listing_or_namespace_keeps_what_was_listed() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 1);
    inv.apply_listing(Ok(listing_of(&[("ns-1", "shop", &["a"]), ("ns-2", "blog", &["b"])])), clock.at(0.0));
    for t in inv.plan_next_poll(clock.at(0.0).instant).discover {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), clock.at(0.0));
    }
    read_attributes(&mut inv, clock.at(0.0));
    assert!(inv.finish_poll(clock.at(0.0)).initial_sync);
    // ListNamespaces fails: nothing changes, and the listing backs off.
    let report = inv.apply_listing(Err(err(ErrorKind::Throttled)), clock.at(60.0));
    assert!(report.failed);
    assert_eq!(inv.service_count(), 2);
    assert!(inv.listing_due(clock.at(60.0).instant), "first retry at the next poll");
    // ListServices fails for one namespace only: its services stay, the other's update.
    let mut partial = listing_of(&[("ns-1", "shop", &[]), ("ns-2", "blog", &["b"])]);
    partial.services.insert("ns-1".into(), NamespaceListing { result: Err(err(ErrorKind::Other)), calls: 3 });
    partial.services.get_mut("ns-2").unwrap().result = Ok(vec![svc(Some("ns-2"), "c")]);
    let report = inv.apply_listing(Ok(partial), clock.at(65.0));
    assert_eq!(report.failed_namespaces, 1);
    assert_eq!(report.removed, vec![ns_key("blog", "b")]);
    assert!(inv.services.contains_key(&key("a")));
    let statuses = inv.statuses();
    let shop = &statuses[&ns_key("shop", "")];
    assert_eq!(shop.api_calls, 4);
    assert!(shop.last_error.is_some());
    assert!(statuses[&ns_key("blog", "")].last_error.is_none());
}

#[test]
fn a_namespace_that_fails_to_list_is_listed_again_at_the_next_poll_not_a_list_interval_later() {
    // Its services created since the last listing wait for its next ListServices.
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a"]);
    let failing = |calls| {
        let mut l = listing(&[]);
        l.services.insert("ns-1".into(), NamespaceListing { result: Err(err(ErrorKind::Other)), calls });
        l
    };
    inv.apply_listing(Ok(failing(3)), clock.at(60.0));
    assert!(inv.listing_due(clock.at(60.0).instant), "first retry at the next poll");
    inv.apply_listing(Ok(failing(3)), clock.at(65.0));
    assert!(!inv.listing_due(clock.at(65.0).instant), "then backs off: one poll");
    assert!(inv.listing_due(clock.at(70.0).instant));
    let report = inv.apply_listing(Ok(listing(&["a", "new"])), clock.at(70.0));
    assert_eq!(report.added, vec![key("new")]);
    assert!(!inv.listing_due(clock.at(75.0).instant), "listed: back to the list interval");
    assert!(inv.listing_due(clock.at(70.0 + LIST.as_secs_f64() * 1.1).instant));
}

#[test]
fn services_of_another_namespace_are_filtered_client_side() {
    // moto returns every service for every NAMESPACE_ID filter.
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 1);
    let all = || Ok(vec![svc(Some("ns-1"), "a"), svc(Some("ns-2"), "b"), svc(None, "c")]);
    let l = Listing {
        namespaces: vec![ns("ns-1", "shop"), ns("ns-2", "blog")],
        services: BTreeMap::from([
            ("ns-1".to_owned(), NamespaceListing { result: all(), calls: 1 }),
            ("ns-2".to_owned(), NamespaceListing { result: all(), calls: 1 }),
        ]),
    };
    let report = inv.apply_listing(Ok(l), clock.at(0.0));
    let added: Vec<String> = report.added.iter().map(|(n, s)| format!("{n}/{s}")).collect();
    // A summary without a namespace ID (AWS, HTTP service) trusts the server-side filter.
    assert_eq!(added, ["blog/b", "blog/c", "shop/a", "shop/c"]);
}

#[test]
fn include_and_exclude_filters_apply_to_listings() {
    let clock = Clock::new();
    let (inc_ns, exc_svc) = (vec!["sh*".to_owned()], vec!["*-canary".to_owned()]);
    let filter = NameFilter::new(Patterns {
        include_namespaces: &inc_ns,
        exclude_services: &exc_svc,
        ..Patterns::default()
    })
    .unwrap();
    let mut inv = Inventory::new(Config { filter, ..config() }, clock.start, 1);
    let report = inv.apply_listing(
        Ok(listing_of(&[("ns-1", "shop", &["a", "a-canary"]), ("ns-2", "blog", &["b"])])),
        clock.at(0.0),
    );
    assert_eq!(report.added, vec![key("a")]);
    assert_eq!(inv.statuses().len(), 2, "one namespace and one service");
}

#[test]
fn statuses_are_copied_in_place_dropping_what_is_gone() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a", "b"]);
    let mut copy = BTreeMap::new();
    copy.insert(ns_key("gone", ""), ServiceStatus::default());
    copy.insert(ns_key("shop", "gone"), ServiceStatus::default());
    copy.insert(
        key("a"),
        ServiceStatus { last_error: Some("stale".into()), api_calls: 99, ..ServiceStatus::default() },
    );
    inv.copy_statuses(&mut copy);
    assert_eq!(copy, inv.statuses());
    assert_eq!(copy.len(), 3, "the namespace and two services");

    let now = clock.at(5.0);
    inv.plan_next_poll(now.instant);
    inv.apply_revision(&key("a"), Err(err(ErrorKind::Other)), now);
    inv.apply_listing(Ok(listing(&["a"])), now);
    inv.copy_statuses(&mut copy);
    assert_eq!(copy, inv.statuses());
    assert!(copy[&key("a")].last_error.as_deref().unwrap().contains("boom"));
    assert!(!copy.contains_key(&key("b")), "b is no longer listed");
}

#[test]
fn names_are_shared_not_copied_per_service() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.at(0.0).instant, 7);
    inv.apply_listing(Ok(listing(&["a", "b"])), clock.at(0.0));
    let plan = inv.plan_next_poll(clock.at(0.0).instant);
    let [a, b] = &plan.discover[..] else { panic!("two reads: {plan:?}") };
    // One namespace name and one HTTP name for all the namespace's services...
    assert!(Arc::ptr_eq(&a.key.0, &b.key.0));
    assert!(Arc::ptr_eq(&a.namespace_http_name, &b.namespace_http_name));
    assert_eq!((&*a.key.0, &*a.key.1, &*a.namespace_http_name), ("shop", "a", "shop"));
    // ...and the statuses hold the keys' names.
    let statuses = inv.statuses();
    let (status_key, status) = statuses.get_key_value(&key("a")).unwrap();
    assert!(Arc::ptr_eq(&status_key.1, &a.key.1) && Arc::ptr_eq(&status.service, &a.key.1));
    assert!(Arc::ptr_eq(&status.namespace, &a.key.0));
    // A namespace whose HTTP name changes moves every service to the new name (read again at once).
    let mut renamed = listing(&["a", "b"]);
    renamed.namespaces[0].http_name = "shop-http".into();
    for t in &plan.discover {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), clock.at(1.0));
    }
    inv.apply_listing(Ok(renamed), clock.at(2.0));
    let again = inv.plan_next_poll(clock.at(2.0).instant);
    assert_eq!(again.discover.len(), 2, "both are read again: {again:?}");
    assert!(again.discover.iter().all(|t| &*t.namespace_http_name == "shop-http"));
    assert!(Arc::ptr_eq(&again.discover[0].namespace_http_name, &again.discover[1].namespace_http_name));
}

#[test]
fn random_order_and_duplicates_do_not_count_as_changes() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a"]);
    let now = clock.at(5.0);
    let two = |order: [(&str, &str); 3]| Discovered {
        instances: order.iter().map(|(id, ip)| instance(id, ip, Health::Healthy)).collect(),
        revision: Some(3),
    };
    inv.plan_next_poll(now.instant);
    inv.apply_revision(&key("a"), Ok(3), now);
    // moto appends a duplicate on re-registration; the last registration wins.
    assert!(inv.apply_instances(
        &key("a"),
        Ok(two([("i-1", "10.0.0.1"), ("i-2", "10.0.0.2"), ("i-1", "10.0.0.3")])),
        now
    ));
    assert!(!inv.apply_instances(
        &key("a"),
        Ok(two([("i-2", "10.0.0.2"), ("i-1", "10.0.0.1"), ("i-1", "10.0.0.3")])),
        now
    ));
    let registry = inv.registry_update().unwrap();
    let ips: Vec<&str> =
        registry.services[0].instances.iter().map(|i| &i.attributes["AWS_INSTANCE_IPV4"]).collect();
    assert_eq!(ips, ["10.0.0.3", "10.0.0.2"]);
    assert_eq!(inv.statuses()[&key("a")].instances, 2);
}

#[test]
fn services_without_health_checks_serve_every_instance() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 1);
    let mut l = listing(&[]);
    let mut unchecked = svc(Some("ns-1"), "a");
    unchecked.health_checked = false;
    l.services.get_mut("ns-1").unwrap().result = Ok(vec![unchecked]);
    inv.apply_listing(Ok(l), clock.at(0.0));
    inv.plan_next_poll(clock.at(0.0).instant);
    let d = Discovered { instances: vec![instance("i-1", "10.0.0.1", Health::Unknown)], revision: Some(1) };
    inv.apply_instances(&key("a"), Ok(d), clock.at(0.0));
    read_attributes(&mut inv, clock.at(0.0));
    inv.finish_poll(clock.at(0.0));
    assert_eq!(inv.registry_update().unwrap().services[0].instances[0].health, Health::Healthy);
}

#[test]
fn a_recreated_service_is_read_again_and_its_create_date_published() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a"]);
    let mut l = listing(&[]);
    let mut recreated = svc(Some("ns-1"), "a");
    recreated.id = "srv-new".into();
    recreated.created += Duration::from_secs(3600);
    l.services.get_mut("ns-1").unwrap().result = Ok(vec![recreated]);
    inv.apply_listing(Ok(l), clock.at(60.0));
    let registry = inv.registry_update().unwrap();
    assert_eq!(registry.services[0].created, SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_003_600));
    assert_eq!(keys(&inv.plan_next_poll(clock.at(60.0).instant).discover), ["shop/a"]);
}

#[test]
fn throttled_polls_back_off_exponentially_and_recover_after_a_quiet_spell() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 3);
    let within = |d: Duration, base: f64| (d.as_secs_f64() - base).abs() <= base * JITTER + 1e-9;
    assert!(within(inv.next_poll_delay(clock.at(0.0).instant, false), 5.0));
    assert!(within(inv.next_poll_delay(clock.at(5.0).instant, true), 10.0));
    assert!(within(inv.next_poll_delay(clock.at(15.0).instant, true), 20.0));
    // A poll without throttled answers keeps the pace: slow calls answer late.
    assert!(within(inv.next_poll_delay(clock.at(35.0).instant, false), 20.0));
    assert!(within(inv.next_poll_delay(clock.at(55.0).instant, true), 40.0));
    assert!(within(inv.next_poll_delay(clock.at(95.0).instant, true), 60.0), "capped");
    // A minute (12 polls at most) without throttling: back to the poll interval.
    assert!(within(inv.next_poll_delay(clock.at(154.0).instant, false), 60.0));
    assert!(within(inv.next_poll_delay(clock.at(156.0).instant, false), 5.0));
}

#[test]
fn schedules_are_jittered() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 3);
    let delays: std::collections::BTreeSet<Duration> =
        (0..20).map(|_| inv.next_poll_delay(clock.at(0.0).instant, false)).collect();
    assert!(delays.len() > 10, "{delays:?}");
    assert!(delays.iter().all(|d| *d >= POLL.mul_f64(0.9) && *d <= POLL.mul_f64(1.1)));
}

#[test]
fn unchanged_services_are_republished_as_the_same_shared_value() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a", "b"]);
    inv.dirty = true;
    let first = inv.registry_update().unwrap();
    inv.apply_instances(&key("b"), Ok(discovered(&["10.0.0.1", "10.0.0.2"], 2)), clock.at(1.0));
    let second = inv.registry_update().unwrap();
    assert!(std::sync::Arc::ptr_eq(&first.services[0], &second.services[0]), "a is shared, not copied");
    assert!(!std::sync::Arc::ptr_eq(&first.services[1], &second.services[1]), "b changed");
    assert_eq!(second.services[1].instances.len(), 2);
}

fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn attribute_keys(targets: &[AttributesTarget]) -> Vec<String> {
    targets.iter().map(|t| format!("{}/{}", t.key.0, t.key.1)).collect()
}

fn published_attributes(inv: &Inventory) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut copy = inv.clone();
    copy.dirty = true;
    copy.registry_update()
        .map(|r| r.services.iter().map(|s| (s.name.clone(), s.attributes.clone())).collect())
        .unwrap_or_default()
}

#[test]
fn attributes_are_read_on_listings_not_on_polls() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a", "b", "c"]);
    for poll in 1..=5 {
        let now = clock.at(f64::from(poll) * 5.0);
        inv.plan_next_poll(now.instant);
        assert!(inv.plan_attribute_reads(now.instant, usize::MAX).is_empty(), "poll {poll}");
    }
    // Each listing makes every listed service's attributes due, in windows of `limit`.
    inv.apply_listing(Ok(listing(&["a", "b", "c"])), clock.at(60.0));
    let first = inv.plan_attribute_reads(clock.at(60.0).instant, 2);
    assert_eq!(attribute_keys(&first), ["shop/a", "shop/b"]);
    assert_eq!(first[0].service_id, "srv-a");
    assert!(inv.plan_attribute_reads(clock.at(60.0).instant, 0).is_empty());
    assert_eq!(attribute_keys(&inv.plan_attribute_reads(clock.at(60.0).instant, 2)), ["shop/c"]);
    for t in first {
        assert!(!inv.apply_attributes(&t.key, Ok(BTreeMap::new()), clock.at(60.1)), "unchanged");
    }
    assert!(inv.plan_attribute_reads(clock.at(65.0).instant, usize::MAX).is_empty(), "c is in flight");
    inv.abandon_attributes(&key("c"));
    assert_eq!(attribute_keys(&inv.plan_attribute_reads(clock.at(65.0).instant, usize::MAX)), ["shop/c"]);
}

#[test]
fn the_first_sync_and_a_new_service_wait_for_their_attributes() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 1);
    inv.apply_listing(Ok(listing(&["a", "b"])), clock.at(0.0));
    for t in inv.plan_next_poll(clock.at(0.0).instant).discover {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), clock.at(0.1));
    }
    // Until one read succeeded, one at a time: a policy without the action costs one call.
    let reads = inv.plan_attribute_reads(clock.at(0.0).instant, usize::MAX);
    assert_eq!(attribute_keys(&reads), ["shop/a"]);
    assert!(inv.plan_attribute_reads(clock.at(0.0).instant, usize::MAX).is_empty());
    inv.apply_attributes(&key("a"), Ok(attrs(&[("cloudmap-xds/ports", "http=80/HTTP")])), clock.at(0.1));
    assert!(!inv.finish_poll(clock.at(0.2)).initial_sync, "b's attributes are not read yet");
    let reads = inv.plan_attribute_reads(clock.at(0.2).instant, usize::MAX);
    assert_eq!(attribute_keys(&reads), ["shop/b"]);
    assert_eq!(inv.registry_update(), None);
    assert_eq!(inv.read_count(), 1);
    // No attributes at all is an answer too.
    assert!(inv.apply_attributes(&key("b"), Ok(BTreeMap::new()), clock.at(0.3)));
    assert!(inv.finish_poll(clock.at(0.4)).initial_sync);
    let registry = inv.registry_update().unwrap();
    assert_eq!(registry.services[0].attributes, attrs(&[("cloudmap-xds/ports", "http=80/HTTP")]));
    assert!(registry.services[1].attributes.is_empty());

    // A service listed later is served once its instances and its attributes are read, not before.
    inv.apply_listing(Ok(listing(&["a", "b", "c"])), clock.at(60.0));
    for t in inv.plan_reads(clock.at(60.0).instant) {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.3"], 1)), clock.at(60.1));
    }
    inv.finish_poll(clock.at(60.1));
    assert_eq!(published_attributes(&inv).len(), 2, "c waits for its attributes");
    for t in inv.plan_attribute_reads(clock.at(60.1).instant, usize::MAX) {
        let values = if t.key == key("c") {
            attrs(&[("cloudmap-xds/location", "MESH_INTERNAL")])
        } else {
            BTreeMap::new()
        };
        inv.apply_attributes(&t.key, Ok(values), clock.at(60.2));
    }
    let registry = inv.registry_update().expect("c is published");
    assert_eq!(registry.services.len(), 3);
    assert_eq!(registry.services[2].attributes["cloudmap-xds/location"], "MESH_INTERNAL");
}

#[test]
fn a_changed_attribute_set_republishes_only_its_service() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a", "b"]);
    inv.dirty = true;
    let before = inv.registry_update().unwrap();
    inv.apply_listing(Ok(listing(&["a", "b"])), clock.at(60.0));
    let reads = inv.plan_attribute_reads(clock.at(60.0).instant, usize::MAX);
    assert_eq!(reads.len(), 2);
    assert!(!inv.apply_attributes(&key("a"), Ok(BTreeMap::new()), clock.at(60.1)));
    assert!(inv.apply_attributes(
        &key("b"),
        Ok(attrs(&[("cloudmap-xds/ports", "grpc=50051/GRPC")])),
        clock.at(60.1)
    ));
    let after = inv.registry_update().expect("b's change is published");
    assert!(std::sync::Arc::ptr_eq(&before.services[0], &after.services[0]), "a is untouched");
    assert_eq!(after.services[1].attributes["cloudmap-xds/ports"], "grpc=50051/GRPC");
    // The same answer again changes nothing.
    inv.apply_listing(Ok(listing(&["a", "b"])), clock.at(120.0));
    for t in inv.plan_attribute_reads(clock.at(120.0).instant, usize::MAX) {
        let values = if t.key == key("b") {
            attrs(&[("cloudmap-xds/ports", "grpc=50051/GRPC")])
        } else {
            BTreeMap::new()
        };
        assert!(!inv.apply_attributes(&t.key, Ok(values), clock.at(120.1)));
    }
    assert_eq!(inv.registry_update(), None);
}

#[test]
fn a_failed_attribute_read_keeps_the_last_good_attributes_and_backs_off_alone() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 1);
    inv.apply_listing(Ok(listing(&["a"])), clock.at(0.0));
    for t in inv.plan_next_poll(clock.at(0.0).instant).discover {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), clock.at(0.0));
    }
    for t in inv.plan_attribute_reads(clock.at(0.0).instant, usize::MAX) {
        inv.apply_attributes(&t.key, Ok(attrs(&[("cloudmap-xds/ports", "http=80/HTTP")])), clock.at(0.0));
    }
    assert!(inv.finish_poll(clock.at(0.0)).initial_sync);
    inv.registry_update();

    inv.apply_listing(Ok(listing(&["a"])), clock.at(60.0));
    let mut attempts = Vec::new();
    let mut t = 60.0;
    while t <= 180.0 {
        let now = clock.at(t);
        // The instances go on being polled whatever the attributes do.
        let plan = inv.plan_next_poll(now.instant);
        assert_eq!(plan.revision.len() + plan.discover.len(), 1, "a is polled at {t}");
        for x in &plan.revision {
            inv.apply_revision(&x.key, Ok(1), now);
        }
        for x in inv.plan_attribute_reads(now.instant, usize::MAX) {
            attempts.push(t);
            assert!(!inv.apply_attributes(&x.key, Err(err(ErrorKind::Other)), now));
        }
        inv.finish_poll(now);
        t += 5.0;
    }
    // Retried at the next poll, then after 1, 3, 7 and at most 12 poll intervals.
    assert_eq!(attempts, [60.0, 65.0, 70.0, 85.0, 120.0, 180.0]);
    assert_eq!(published_attributes(&inv)["a"], attrs(&[("cloudmap-xds/ports", "http=80/HTTP")]), "kept");
    assert!(
        inv.statuses()[&key("a")].last_error.as_deref().unwrap().starts_with("GetServiceAttributes: boom")
    );
    assert!(inv.last_error().unwrap().0.starts_with("shop/a: GetServiceAttributes"));
    // Recovered: the new attributes are served.
    let now = clock.at(300.0);
    for x in inv.plan_attribute_reads(now.instant, usize::MAX) {
        assert!(inv.apply_attributes(&x.key, Ok(BTreeMap::new()), now));
    }
    assert!(inv.registry_update().unwrap().services[0].attributes.is_empty());
}

#[test]
fn an_iam_denial_settles_every_service_and_leaves_one_probe_per_list_interval() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 1);
    inv.apply_listing(Ok(listing(&["a", "b", "c"])), clock.at(0.0));
    for t in inv.plan_next_poll(clock.at(0.0).instant).discover {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), clock.at(0.0));
    }
    let reads = inv.plan_attribute_reads(clock.at(0.0).instant, usize::MAX);
    assert_eq!(attribute_keys(&reads), ["shop/a"], "one at a time until one succeeds");
    let denied = || ApiError::new(ErrorKind::Denied, "AccessDeniedException: not authorized");
    assert!(!inv.attributes_denied());
    inv.apply_attributes(&key("a"), Err(denied()), clock.at(0.1));
    assert!(inv.attributes_denied());
    // The first denial settles everything: the first sync is not blocked, the defaults apply.
    assert!(inv.finish_poll(clock.at(0.1)).initial_sync);
    assert_eq!(published_attributes(&inv).len(), 3);
    assert!(
        inv.statuses()[&key("a")]
            .last_error
            .as_deref()
            .unwrap()
            .starts_with("GetServiceAttributes: AccessDenied")
    );
    for poll in 1..=10 {
        let now = clock.at(f64::from(poll) * 5.0);
        if poll % 6 == 0 {
            // Listings while denied make nothing due, not even new services (served with the defaults).
            inv.apply_listing(Ok(listing(&["a", "b", "c", "d"])), now);
        }
        if now.instant < clock.at(0.1).instant + LIST.mul_f64(1.0 - JITTER) {
            assert!(inv.plan_attribute_reads(now.instant, usize::MAX).is_empty(), "poll {poll}");
        }
    }
    // One probe per list interval, going round the services.
    let mut probes = Vec::new();
    let mut t = 70.0;
    while t <= 70.0 + 3.0 * 60.0 {
        let now = clock.at(t);
        for x in inv.plan_attribute_reads(now.instant, usize::MAX) {
            probes.push((t, x.key.1.clone()));
            inv.apply_attributes(&x.key, Err(denied()), now);
        }
        t += 5.0;
    }
    assert_eq!(probes.len(), 3, "{probes:?}");
    assert_eq!(probes.iter().map(|(_, s)| &**s).collect::<Vec<_>>(), ["a", "b", "c"]);
    // The policy is fixed: the next probe succeeds, and every service is read again.
    let mut t = 250.0 + 5.0;
    let probe = loop {
        let reads = inv.plan_attribute_reads(clock.at(t).instant, usize::MAX);
        if let Some(x) = reads.into_iter().next() {
            break x;
        }
        t += 5.0;
        assert!(t < 400.0, "no probe");
    };
    assert_eq!(probe.key, key("d"));
    inv.apply_attributes(&probe.key, Ok(attrs(&[("cloudmap-xds/location", "MESH_INTERNAL")])), clock.at(t));
    assert!(!inv.attributes_denied());
    let again = inv.plan_attribute_reads(clock.at(t).instant, usize::MAX);
    assert_eq!(attribute_keys(&again), ["shop/a", "shop/b", "shop/c"]);
    for x in again {
        inv.apply_attributes(&x.key, Ok(attrs(&[("cloudmap-xds/export-to", ".")])), clock.at(t));
    }
    assert!(published_attributes(&inv).values().all(|a| a.len() == 1));
}

#[test]
fn attributes_read_before_a_denial_are_kept() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 1);
    inv.apply_listing(Ok(listing(&["a"])), clock.at(0.0));
    for t in inv.plan_next_poll(clock.at(0.0).instant).discover {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), clock.at(0.0));
    }
    for t in inv.plan_attribute_reads(clock.at(0.0).instant, usize::MAX) {
        inv.apply_attributes(&t.key, Ok(attrs(&[("cloudmap-xds/ports", "http=80/HTTP")])), clock.at(0.0));
    }
    inv.finish_poll(clock.at(0.0));
    inv.apply_listing(Ok(listing(&["a"])), clock.at(60.0));
    for t in inv.plan_attribute_reads(clock.at(60.0).instant, usize::MAX) {
        inv.apply_attributes(&t.key, Err(ApiError::new(ErrorKind::Denied, "AccessDenied")), clock.at(60.0));
    }
    assert!(inv.attributes_denied());
    assert_eq!(published_attributes(&inv)["a"], attrs(&[("cloudmap-xds/ports", "http=80/HTTP")]));
}

#[test]
fn only_a_probe_ends_a_denial() {
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a", "b", "c"]);
    inv.apply_listing(Ok(listing(&["a", "b", "c"])), clock.at(60.0));
    let reads = inv.plan_attribute_reads(clock.at(60.0).instant, usize::MAX);
    assert_eq!(reads.len(), 3, "allowed: a whole window at once");
    inv.apply_attributes(&key("a"), Err(ApiError::new(ErrorKind::Denied, "AccessDenied")), clock.at(60.1));
    // A read sent before the policy changed still answers: its attributes count, the denial stands.
    assert!(inv.apply_attributes(
        &key("b"),
        Ok(attrs(&[("cloudmap-xds/resolution", "DNS")])),
        clock.at(60.2)
    ));
    assert!(inv.attributes_denied());
    assert!(inv.plan_attribute_reads(clock.at(60.2).instant, usize::MAX).is_empty());
    assert_eq!(published_attributes(&inv)["b"].len(), 1);
}

#[test]
fn a_forced_publication_serves_services_whose_attributes_are_not_read() {
    let clock = Clock::new();
    let mut inv = Inventory::new(config(), clock.start, 1);
    inv.apply_listing(Ok(listing(&["a"])), clock.at(0.0));
    for t in inv.plan_next_poll(clock.at(0.0).instant).discover {
        inv.apply_instances(&t.key, Ok(discovered(&["10.0.0.1"], 1)), clock.at(0.0));
    }
    inv.plan_attribute_reads(clock.at(0.0).instant, usize::MAX);
    assert!(!inv.finish_poll(clock.at(0.0)).initial_sync);
    inv.force_publish();
    assert_eq!(inv.registry_update().unwrap().services.len(), 1);
    // Read later: republished with them.
    assert!(inv.apply_attributes(&key("a"), Ok(attrs(&[("cloudmap-xds/resolution", "DNS")])), clock.at(1.0)));
    assert_eq!(inv.registry_update().unwrap().services[0].attributes.len(), 1);
}

#[test]
fn a_listing_never_restarts_the_sweep_and_new_services_go_first() {
    let clock = Clock::new();
    let names = ["a", "b", "c", "d", "e"];
    let mut inv = synced(&clock, &names);
    // The budget reads two per listing interval, fewer than there are services.
    let mut read = Vec::new();
    let mut listed = names.to_vec();
    for round in 1..=4 {
        let now = clock.at(60.0 * f64::from(round));
        if round == 3 {
            listed.push("new");
        }
        inv.apply_listing(Ok(listing(&listed)), now);
        for t in inv.plan_attribute_reads(now.instant, 2) {
            read.push(t.key.1.to_string());
            inv.apply_attributes(&t.key, Ok(BTreeMap::new()), now);
        }
    }
    // Each listing goes on where the last one stopped; a service never read jumps the queue.
    assert_eq!(read, ["a", "b", "c", "d", "new", "e", "a", "b"]);
    // A service removed while waiting leaves the queue.
    inv.apply_listing(Ok(listing(&["a", "b", "c", "d", "new"])), clock.at(300.0));
    let rest: Vec<String> = inv
        .plan_attribute_reads(clock.at(300.0).instant, usize::MAX)
        .iter()
        .map(|t| t.key.1.to_string())
        .collect();
    assert_eq!(rest, ["c", "d", "new", "a", "b"]);
}

#[test]
fn a_recreated_service_is_read_at_once_whatever_the_deleted_one_failed() {
    // Deleted: every call by its name answers ServiceNotFound until the next listing, and the
    // failures back off. Re-created under the same name before that listing: the listing sees
    // a new service ID, and the new service is read at once, not after the old one's backoff.
    let clock = Clock::new();
    let mut inv = synced(&clock, &["a", "b"]);
    let mut t = 5.0;
    while t <= 30.0 {
        let now = clock.at(t);
        for target in inv.plan_next_poll(now.instant).revision {
            let answer = if target.key == key("a") { Err(err(ErrorKind::NotFound)) } else { Ok(1) };
            inv.apply_revision(&target.key, answer, now);
        }
        t += 5.0;
    }
    // Failed at 5, 10, 15 and 30 s: the next attempt is 7 polls later.
    let plan = inv.clone().plan_next_poll(clock.at(35.0).instant);
    assert_eq!(keys(&plan.revision), ["shop/b"], "a backs off until 65 s");
    let mut l = listing(&["b"]);
    let mut recreated = svc(Some("ns-1"), "a");
    recreated.id = "srv-a-2".into();
    l.services.get_mut("ns-1").unwrap().result.as_mut().unwrap().push(recreated);
    inv.apply_listing(Ok(l), clock.at(35.0));
    assert_eq!(keys(&inv.plan_reads(clock.at(35.0).instant)), ["shop/a"], "read right after the listing");
    inv.apply_instances(&key("a"), Ok(discovered(&["10.0.0.9"], 1)), clock.at(35.1));
    let registry = inv.registry_update().unwrap();
    assert_eq!(&registry.services[0].instances[0].attributes["AWS_INSTANCE_IPV4"], "10.0.0.9");
}
