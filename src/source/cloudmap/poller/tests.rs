//! The async loop against an in-memory Cloud Map (paged lists, per-service
//! faults, hanging calls), in real time with short intervals.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::*;
use crate::metrics::Metrics;
use crate::model::{Health, Instance, Registry};
use crate::source::cloudmap::api::{NamespaceKind, Page};
use crate::source::cloudmap::{Settings, start_with_api};

const PAGE: usize = 2;

#[derive(Default)]
struct State {
    namespaces: Vec<NamespaceInfo>,
    /// By namespace ID.
    services: BTreeMap<String, Vec<ServiceInfo>>,
    /// By (http name, service): instances and revision.
    instances: BTreeMap<(String, String), (Vec<Instance>, i64)>,
    failing: BTreeSet<String>,
    hanging: BTreeSet<String>,
    /// Service attributes by service ID.
    attributes: BTreeMap<String, BTreeMap<String, String>>,
    /// Every GetServiceAttributes fails this way.
    attributes_fault: Option<ErrorKind>,
    /// Added to every Discover call.
    latency: Duration,
}

#[derive(Default)]
struct FakeCloudMap {
    state: Mutex<State>,
    calls: Mutex<BTreeMap<Api, u64>>,
}

impl FakeCloudMap {
    fn with(namespaces: &[(&str, &[&str])]) -> Self {
        let fake = FakeCloudMap::default();
        {
            let mut s = fake.state.lock().unwrap();
            for (n, (name, services)) in namespaces.iter().enumerate() {
                let id = format!("ns-{n}");
                s.namespaces.push(NamespaceInfo {
                    id: id.clone(),
                    name: (*name).into(),
                    http_name: (*name).into(),
                    kind: NamespaceKind::Http,
                });
                let infos = services
                    .iter()
                    .map(|svc| ServiceInfo {
                        id: format!("srv-{name}-{svc}"),
                        name: (*svc).into(),
                        // Like moto: every summary says where it lives.
                        namespace_id: Some(id.clone()),
                        created: SystemTime::UNIX_EPOCH,
                        health_checked: true,
                    })
                    .collect();
                s.services.insert(id, infos);
                for svc in *services {
                    s.instances
                        .insert(((*name).into(), (*svc).into()), (vec![instance("i-1", "10.0.0.1")], 1));
                }
            }
        }
        fake
    }

    fn count(&self, api: Api) {
        *self.calls.lock().unwrap().entry(api).or_default() += 1;
    }

    fn calls(&self) -> BTreeMap<Api, u64> {
        self.calls.lock().unwrap().clone()
    }

    fn set_instances(&self, ns: &str, svc: &str, ips: &[&str]) {
        let mut s = self.state.lock().unwrap();
        let entry = s.instances.entry((ns.into(), svc.into())).or_default();
        entry.0 = ips.iter().enumerate().map(|(i, ip)| instance(&format!("i-{i}"), ip)).collect();
        entry.1 += 1;
    }

    /// Answers after the configured latency; then `Some(true)`: hang, `Some(false)`: fail.
    async fn fault(&self, service: &str) -> Option<bool> {
        let latency = self.state.lock().unwrap().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let s = self.state.lock().unwrap();
        if s.hanging.contains(service) {
            Some(true)
        } else if s.failing.contains(service) {
            Some(false)
        } else {
            None
        }
    }
}

fn instance(id: &str, ip: &str) -> Instance {
    Instance { id: id.into(), health: Health::Healthy, attributes: [("AWS_INSTANCE_IPV4", ip)].into() }
}

fn page<T: Clone>(items: &[T], token: Option<String>) -> Page<T> {
    let start: usize = token.and_then(|t| t.parse().ok()).unwrap_or(0);
    let end = (start + PAGE).min(items.len());
    Page { items: items[start..end].to_vec(), next_token: (end < items.len()).then(|| end.to_string()) }
}

impl CloudMapApi for FakeCloudMap {
    async fn list_namespaces(&self, next_token: Option<String>) -> Result<Page<NamespaceInfo>, ApiError> {
        self.count(Api::ListNamespaces);
        let s = self.state.lock().unwrap();
        Ok(page(&s.namespaces, next_token))
    }

    async fn list_services(
        &self,
        namespace_id: &str,
        next_token: Option<String>,
    ) -> Result<Page<ServiceInfo>, ApiError> {
        self.count(Api::ListServices);
        let s = self.state.lock().unwrap();
        Ok(page(s.services.get(namespace_id).map(Vec::as_slice).unwrap_or(&[]), next_token))
    }

    async fn discover_instances(&self, ns: &str, service: &str) -> Result<Discovered, ApiError> {
        self.count(Api::DiscoverInstances);
        match self.fault(service).await {
            Some(true) => std::future::pending().await,
            Some(false) => {
                return Err(ApiError::new(ErrorKind::Throttled, "RequestLimitExceeded: slow down"));
            }
            None => {}
        }
        let s = self.state.lock().unwrap();
        let (instances, revision) = s
            .instances
            .get(&(ns.to_owned(), service.to_owned()))
            .cloned()
            .ok_or_else(|| ApiError::new(ErrorKind::NotFound, "ServiceNotFound"))?;
        Ok(Discovered { instances, revision: Some(revision) })
    }

    async fn discover_instances_revision(&self, ns: &str, service: &str) -> Result<i64, ApiError> {
        self.count(Api::DiscoverInstancesRevision);
        match self.fault(service).await {
            Some(true) => std::future::pending().await,
            Some(false) => return Err(ApiError::new(ErrorKind::Other, "InternalFailure")),
            None => {}
        }
        let s = self.state.lock().unwrap();
        s.instances
            .get(&(ns.to_owned(), service.to_owned()))
            .map(|(_, r)| *r)
            .ok_or_else(|| ApiError::new(ErrorKind::NotFound, "ServiceNotFound"))
    }

    async fn get_service_attributes(&self, service_id: &str) -> Result<BTreeMap<String, String>, ApiError> {
        self.count(Api::GetServiceAttributes);
        let s = self.state.lock().unwrap();
        if let Some(kind) = s.attributes_fault {
            return Err(ApiError::new(kind, "AccessDeniedException: not authorized"));
        }
        Ok(s.attributes.get(service_id).cloned().unwrap_or_default())
    }
}

const POLL: Duration = Duration::from_millis(20);
const WAIT: Duration = Duration::from_secs(5);

fn args() -> Settings {
    Settings {
        poll_interval: POLL,
        list_interval: Duration::from_secs(3600),
        full_refresh_interval: Duration::from_secs(3600),
        rate_list: 1e6,
        rate_discover: 1e6,
        rate_revision: 1e6,
        rate_attributes: 1e6,
        ..Settings::new("test")
    }
}

struct Running {
    fake: Arc<FakeCloudMap>,
    view: crate::source::SourceView,
    metrics: Metrics,
    _shutdown: watch::Sender<bool>,
}

fn run(fake: FakeCloudMap, args: &Settings) -> Running {
    run_with_timeout(fake, args, Duration::from_millis(200))
}

fn run_with_timeout(fake: FakeCloudMap, args: &Settings, call_timeout: Duration) -> Running {
    let fake = Arc::new(fake);
    let metrics = Metrics::unregistered();
    let (shutdown, rx) = watch::channel(false);
    let (view, poller) =
        start_with_api(fake.clone(), "fake".into(), args, NameFilter::default(), &metrics, call_timeout, rx);
    tokio::spawn(poller);
    Running { fake, view, metrics, _shutdown: shutdown }
}

/// Waits until the published registry satisfies `check`.
async fn registry_where(r: &mut Running, what: &str, check: impl Fn(&Registry) -> bool) -> Arc<Registry> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(reg) = r.view.registry.borrow_and_update().clone()
            && check(&reg)
        {
            return reg;
        }
        if tokio::time::timeout_at(deadline, r.view.registry.changed()).await.is_err() {
            panic!("timed out waiting for {what}; status {:?}", r.view.status());
        }
    }
}

async fn condition(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn ips(reg: &Registry, ns: &str, svc: &str) -> Vec<String> {
    reg.services
        .iter()
        .find(|s| s.namespace == ns && s.name == svc)
        .map(|s| s.instances.iter().map(|i| i.attributes["AWS_INSTANCE_IPV4"].to_owned()).collect())
        .unwrap_or_default()
}

fn aws_calls(metrics: &Metrics, api: Api, outcome: &'static str) -> u64 {
    metrics.source.aws_calls.get_or_create(&ApiLabels { api: api.as_str(), outcome }).get()
}

#[tokio::test]
async fn pages_everything_then_polls_revisions_only() {
    let fake = FakeCloudMap::with(&[("shop", &["a", "b", "c", "d", "e"]), ("blog", &["x"]), ("wiki", &[])]);
    let mut r = run(fake, &args());
    let reg = registry_where(&mut r, "the first sync", |_| true).await;
    let names: Vec<String> = reg.services.iter().map(|s| format!("{}/{}", s.namespace, s.name)).collect();
    assert_eq!(names, ["blog/x", "shop/a", "shop/b", "shop/c", "shop/d", "shop/e"]);
    let calls = r.fake.calls();
    assert_eq!(calls[&Api::ListNamespaces], 2, "3 namespaces in pages of 2");
    assert_eq!(calls[&Api::ListServices], 3 + 1 + 1, "shop: 3 pages, blog and wiki: 1 each");
    assert_eq!(calls[&Api::DiscoverInstances], 6);
    assert_eq!(aws_calls(&r.metrics, Api::ListServices, "success"), 5);
    let status = r.view.status();
    assert!(status.synced && status.last_full_sync.is_some());
    assert_eq!(status.services.len(), 3 + 6, "three namespaces and six services");
    assert_eq!(calls[&Api::GetServiceAttributes], 6, "once per listed service");
    assert_eq!(status.services[&("shop".into(), "a".into())].api_calls, 2, "instances and attributes");

    // Idle: revision calls only, one per service per poll.
    let before = r.fake.calls();
    let polls_before = r.metrics.source.loads.get_or_create(&OutcomeLabels { outcome: "unchanged" }).get();
    condition("five idle polls", || {
        r.metrics.source.loads.get_or_create(&OutcomeLabels { outcome: "unchanged" }).get()
            >= polls_before + 5
    })
    .await;
    let after = r.fake.calls();
    let polls =
        r.metrics.source.loads.get_or_create(&OutcomeLabels { outcome: "unchanged" }).get() - polls_before;
    let revisions =
        after[&Api::DiscoverInstancesRevision] - before.get(&Api::DiscoverInstancesRevision).unwrap_or(&0);
    assert_eq!(after[&Api::DiscoverInstances], before[&Api::DiscoverInstances]);
    assert_eq!(after[&Api::ListServices], before[&Api::ListServices]);
    assert_eq!(after[&Api::GetServiceAttributes], before[&Api::GetServiceAttributes], "only on listings");
    // Polls are counted after their calls; allow the poll in progress.
    assert!(
        revisions >= 6 * polls && revisions <= 6 * (polls + 1),
        "{revisions} revision calls in {polls} polls"
    );

    // A change is read and published.
    r.fake.set_instances("shop", "c", &["10.0.0.7", "10.0.0.8"]);
    let reg = registry_where(&mut r, "the change", |reg| ips(reg, "shop", "c").len() == 2).await;
    assert_eq!(ips(&reg, "shop", "a"), ["10.0.0.1"]);
}

#[tokio::test]
async fn a_failing_or_hanging_service_keeps_its_state_and_blocks_nobody() {
    let fake = FakeCloudMap::with(&[("shop", &["a", "b", "c"])]);
    let mut r = run(fake, &args());
    registry_where(&mut r, "the first sync", |_| true).await;
    {
        let mut s = r.fake.state.lock().unwrap();
        s.failing.insert("a".into());
        s.hanging.insert("b".into());
    }
    r.fake.set_instances("shop", "a", &["10.0.0.66"]);
    r.fake.set_instances("shop", "c", &["10.0.0.3"]);
    let reg = registry_where(&mut r, "c's change", |reg| ips(reg, "shop", "c") == ["10.0.0.3"]).await;
    assert_eq!(ips(&reg, "shop", "a"), ["10.0.0.1"], "a keeps its last good state");
    assert_eq!(ips(&reg, "shop", "b"), ["10.0.0.1"], "b keeps its last good state");
    condition("b's timeout", || aws_calls(&r.metrics, Api::DiscoverInstancesRevision, "timeout") > 0).await;
    condition("c moving on while b hangs", || {
        r.view.status().services[&("shop".into(), "c".into())].api_calls >= 5
    })
    .await;
    let status = r.view.status();
    let a = &status.services[&("shop".into(), "a".into())];
    assert!(a.last_error.as_deref().unwrap().contains("InternalFailure"), "{a:?}");
    let b = &status.services[&("shop".into(), "b".into())];
    assert!(b.last_error.as_deref().unwrap().contains("no answer within"), "{b:?}");
    assert!(status.last_error.is_some());

    // Healed: the change that waited comes through.
    r.fake.state.lock().unwrap().failing.clear();
    let reg = registry_where(&mut r, "a's change", |reg| ips(reg, "shop", "a") == ["10.0.0.66"]).await;
    assert_eq!(ips(&reg, "shop", "c"), ["10.0.0.3"]);
}

#[tokio::test]
async fn throttled_reads_are_counted_as_throttled() {
    let fake = FakeCloudMap::with(&[("shop", &["a", "b"])]);
    fake.state.lock().unwrap().failing.insert("a".into());
    let r = run(fake, &Settings { initial_sync_timeout: Some(Duration::from_millis(300)), ..args() });
    condition("a throttled read", || aws_calls(&r.metrics, Api::DiscoverInstances, "throttled") > 0).await;
    assert!(r.view.registry.borrow().is_none(), "a failed first read holds the first publication");
}

#[tokio::test]
async fn the_initial_sync_timeout_publishes_what_was_read() {
    let fake = FakeCloudMap::with(&[("shop", &["a", "b"])]);
    fake.state.lock().unwrap().failing.insert("a".into());
    let mut r = run(fake, &Settings { initial_sync_timeout: Some(Duration::from_millis(300)), ..args() });
    let reg = registry_where(&mut r, "the forced publication", |_| true).await;
    let names: Vec<&str> = reg.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["b"]);
    r.fake.state.lock().unwrap().failing.clear();
    registry_where(&mut r, "a, once readable", |reg| reg.services.len() == 2).await;
}

#[tokio::test]
async fn changes_are_published_while_a_call_hangs() {
    let fake = FakeCloudMap::with(&[("shop", &["a", "b"])]);
    let mut r = run_with_timeout(fake, &args(), Duration::from_secs(3600));
    registry_where(&mut r, "the first sync", |_| true).await;
    r.fake.state.lock().unwrap().hanging.insert("a".into());
    // Let a's call start and hang, then change b.
    let revisions = || r.fake.calls().get(&Api::DiscoverInstancesRevision).copied().unwrap_or(0);
    let before = revisions();
    condition("a few polls", || revisions() >= before + 4).await;
    r.fake.set_instances("shop", "b", &["10.0.0.2"]);
    registry_where(&mut r, "b's change with a's call still out", |reg| ips(reg, "shop", "b") == ["10.0.0.2"])
        .await;
}

#[tokio::test]
async fn the_first_sync_completes_while_calls_keep_overlapping() {
    // More services than calls in flight, answered slowly: some call is always out.
    let names: Vec<String> = (0..100).map(|n| format!("s{n:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let fake = FakeCloudMap::with(&[("shop", &refs)]);
    fake.state.lock().unwrap().latency = Duration::from_millis(15);
    let mut r = run(fake, &Settings { rate_discover: 500.0, rate_revision: 500.0, ..args() });
    let reg = registry_where(&mut r, "the first sync", |_| true).await;
    assert_eq!(reg.services.len(), 100);
}

#[tokio::test]
async fn a_poll_of_many_services_queues_its_calls_instead_of_spawning_them_all() {
    // A spawned call holds its whole SDK future (about 5 KB) while it waits for a slot:
    // a poll of 10,000 services spawned at once held about 50 MB. Each family (reads,
    // revision checks, attribute reads) has at most MAX_IN_FLIGHT tasks at a time.
    const SERVICES: usize = 400;
    let names: Vec<String> = (0..SERVICES).map(|n| format!("s{n:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let fake = FakeCloudMap::with(&[("shop", &refs)]);
    fake.state.lock().unwrap().latency = Duration::from_millis(2);
    let r = run(fake, &args());
    let alive = || tokio::runtime::Handle::current().metrics().num_alive_tasks();
    let revisions = || r.fake.calls().get(&Api::DiscoverInstancesRevision).copied().unwrap_or(0);
    let (mut most, deadline) = (0, tokio::time::Instant::now() + WAIT);
    // Through the first sync (a read and an attribute read per service) and a whole revision poll.
    while revisions() < 2 * SERVICES as u64 {
        most = most.max(alive());
        assert!(tokio::time::Instant::now() < deadline, "timed out; {:?}", r.fake.calls());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(r.view.status().synced);
    // Three families, the listing, the poller and this test.
    assert!(most <= 3 * MAX_IN_FLIGHT + 3, "{most} tasks alive at once for {SERVICES} services");
}

fn attributes_of(reg: &Registry, ns: &str, svc: &str) -> BTreeMap<String, String> {
    reg.services
        .iter()
        .find(|s| s.namespace == ns && s.name == svc)
        .map(|s| s.attributes.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_denial_from_the_start_neither_blocks_the_first_sync_nor_repeats() {
    let names: Vec<String> = (0..100).map(|n| format!("s{n:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let fake = FakeCloudMap::with(&[("shop", &refs)]);
    fake.state.lock().unwrap().attributes_fault = Some(ErrorKind::Denied);
    let mut r = run(fake, &args());
    let reg = registry_where(&mut r, "the first sync", |_| true).await;
    assert_eq!(reg.services.len(), 100);
    assert!(reg.services.iter().all(|s| s.attributes.is_empty()), "the defaults apply");
    assert_eq!(r.metrics.source.service_attributes_unavailable.get(), 1);
    // Reads go one at a time until one succeeds: a policy without the action costs one call.
    assert_eq!(aws_calls(&r.metrics, Api::GetServiceAttributes, "denied"), 1);
    assert_eq!(r.fake.calls()[&Api::GetServiceAttributes], 1);
}

#[tokio::test]
async fn attributes_are_served_kept_through_a_denial_and_read_again_once_allowed() {
    let fake = FakeCloudMap::with(&[("shop", &["a", "b"])]);
    let ports = BTreeMap::from([("cloudmap-xds/ports".to_owned(), "http=80/HTTP".to_owned())]);
    fake.state.lock().unwrap().attributes.insert("srv-shop-a".into(), ports.clone());
    let mut r = run(fake, &Settings { list_interval: Duration::from_millis(100), ..args() });
    let reg = registry_where(&mut r, "the first sync", |_| true).await;
    assert_eq!(attributes_of(&reg, "shop", "a"), ports, "served from the first publication on");

    r.fake.state.lock().unwrap().attributes_fault = Some(ErrorKind::Denied);
    condition("the denial", || r.metrics.source.service_attributes_unavailable.get() == 1).await;
    r.fake.set_instances("shop", "a", &["10.0.0.9"]);
    let reg =
        registry_where(&mut r, "a's instance change", |reg| ips(reg, "shop", "a") == ["10.0.0.9"]).await;
    assert_eq!(attributes_of(&reg, "shop", "a"), ports, "the last good attributes are kept");

    // The policy is fixed and b declares something: a probe notices, and every service is read again.
    let grpc = BTreeMap::from([("cloudmap-xds/ports".to_owned(), "grpc=50051/GRPC".to_owned())]);
    {
        let mut s = r.fake.state.lock().unwrap();
        s.attributes_fault = None;
        s.attributes.insert("srv-shop-b".into(), grpc.clone());
    }
    registry_where(&mut r, "b's attributes", |reg| attributes_of(reg, "shop", "b") == grpc).await;
    assert_eq!(r.metrics.source.service_attributes_unavailable.get(), 0);
}
