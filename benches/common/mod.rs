//! Shared by the bench targets: the ECS-like registry they all serve, a server
//! child process driven over standard input, CPU and RSS readings from `/proc`, and
//! an in-process fake Cloud Map serving such a registry (`fake_cloudmap`).
//!
//! `benches/common/mod.rs` rather than `benches/common.rs`: every bench target is a
//! crate of its own and each uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod fake_cloudmap;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cloudmap_xds::metrics::Metrics;
use cloudmap_xds::model::{Attributes, Health, HealthFilter, Instance, Registry, Service};
use cloudmap_xds::snapshot::{self, Builder, Snapshot};
use cloudmap_xds::source;
use cloudmap_xds::translate::Options;
use cloudmap_xds::xds::{AdsLimits, AdsServer, AdsService, Clients};

pub fn options() -> Options {
    Options::new("istio-system", HealthFilter::HealthyOrElseAll)
}

/// `services` services of `instances` ECS-like instances each (IPv4, port, AZ,
/// REGION, three ECS attributes), in 10 namespaces.
pub fn generated(services: usize, instances: usize) -> Registry {
    let services = (0..services)
        .map(|s| Service {
            namespace: format!("ns-{}", s % 10),
            name: format!("service-{s}"),
            created: SystemTime::UNIX_EPOCH + Duration::from_secs(s as u64),
            attributes: Default::default(),
            instances: (0..instances)
                .map(|i| Instance {
                    id: format!("task-{s}-{i}"),
                    health: Health::Healthy,
                    attributes: Attributes::from([
                        ("AWS_INSTANCE_IPV4", format!("10.{}.{}.{}", s / 256 % 256, s % 256, i)),
                        ("AWS_INSTANCE_PORT", "8080".into()),
                        ("AVAILABILITY_ZONE", format!("us-east-1{}", ['a', 'b', 'c'][i % 3])),
                        ("REGION", "us-east-1".into()),
                        ("ECS_CLUSTER_NAME", "prod".into()),
                        ("ECS_SERVICE_NAME", format!("service-{s}")),
                        ("version", "v2".into()),
                    ]),
                })
                .collect(),
        })
        .collect();
    Registry::new(services)
}

/// `registry` with the `k`-th one-service change applied (the first instance of
/// one service moves to a new address; `k` picks the service and the address).
pub fn change(registry: &Registry, k: usize) -> Registry {
    let mut next = registry.clone();
    let index = (k * 7919) % next.services.len();
    let service = Arc::make_mut(&mut next.services[index]);
    if let Some(instance) = service.instances.first_mut() {
        instance.attributes.insert("AWS_INSTANCE_IPV4", format!("10.255.{}.{}", k / 250 % 250, k % 250 + 1));
    }
    next
}

/// The registry after each of `changes` successive one-service changes; index 0 is the start.
pub fn successive(services: usize, instances: usize, changes: usize) -> Vec<Registry> {
    let mut registries = vec![generated(services, instances)];
    for k in 1..=changes {
        let next = change(&registries[k - 1], k);
        registries.push(next);
    }
    registries
}

/// Snapshots of [`successive`] registries, built the way production builds them.
pub fn successive_snapshots(services: usize, instances: usize, changes: usize) -> Vec<Snapshot> {
    let mut builder = Builder::new(options());
    successive(services, instances, changes).iter().map(|r| builder.build(r)).collect()
}

/// CPU time (user + system) of a whole process so far.
pub fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// The `q` quantile (0..=1) of sorted samples.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A server child process speaking the line protocol of [`serve_child`] (or
/// `tools/go-xds-server`): `publish K` / `change K` in, `published NANOS` out.
pub struct ServerChild {
    pub child: Child,
    pub addrs: Vec<SocketAddr>,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ServerChild {
    pub fn spawn(mut command: Command) -> ServerChild {
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("server child");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addrs = line
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("server child said {line:?} instead of ready"))
            .trim()
            .split(',')
            .map(|a| a.parse().unwrap())
            .collect();
        ServerChild { child, addrs, stdin, stdout }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command; returns the answer line.
    pub fn command(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_owned()
    }

    /// `publish K`: the wall-clock time at which the server published it.
    pub fn publish(&mut self, k: usize) -> SystemTime {
        let line = self.command(&format!("publish {k}"));
        let nanos: u64 = line.strip_prefix("published ").and_then(|n| n.parse().ok()).unwrap_or_else(|| {
            panic!("server child said {line:?} instead of published");
        });
        SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos)
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_nanos(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos()
}

/// Binds one ADS server on loopback for `snapshots`; returns its address.
async fn serve_ads(snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>, clients: Clients) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_draining_tx, draining) = tokio::sync::watch::channel(false);
    // Room for every load-tool stream; the full set is never too large to send here.
    let limits = AdsLimits { streams: 10_000, request_size: 1 << 20, response_size: usize::MAX };
    let ads = AdsServer::new(snapshots, clients, Metrics::unregistered().xds, draining, limits);
    tokio::spawn(async move {
        let _keep = _draining_tx;
        tonic::transport::Server::builder()
            .add_service(AdsService::new(ads))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
    });
    addr
}

/// The child side: `--serve-snapshots N M K` serves prebuilt snapshots and takes
/// `publish K` (so a publication costs only the fan-out); `--serve-registries N M
/// K SHARDS INTERVAL_MS` runs production's publish loop per shard and takes
/// `change K` (answered once every client of a changed shard ACKed it) and
/// `churn PER_SECOND SECONDS`. Returns false when `args` asks for neither.
pub fn serve_child(args: &[String]) -> bool {
    let mode = args.get(1).map(String::as_str);
    if !matches!(mode, Some("--serve-snapshots" | "--serve-registries")) {
        return false;
    }
    let number = |i: usize| -> usize { args[i].parse().expect("numeric argument") };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    if mode == Some("--serve-snapshots") {
        let mut snapshots: Vec<Option<Snapshot>> =
            successive_snapshots(number(2), number(3), number(4)).into_iter().map(Some).collect();
        let (publisher, rx) = snapshot::channel();
        publisher.publish(snapshots[0].take().unwrap());
        let addr = runtime.block_on(serve_ads(rx, Clients::default()));
        writeln!(out, "ready {addr}").unwrap();
        for line in stdin.lock().lines() {
            let line = line.unwrap();
            let k: usize = line.strip_prefix("publish ").and_then(|k| k.parse().ok()).expect("publish K");
            let snapshot = snapshots[k].take().expect("each snapshot is published once");
            let at = SystemTime::now();
            publisher.publish(snapshot);
            writeln!(out, "published {}", unix_nanos(at)).unwrap();
        }
        return true;
    }
    let (services, instances, changes, shards) = (number(2), number(3), number(4), number(5).max(1));
    let interval = Duration::from_millis(number(6) as u64);
    let registries = successive(services, instances, changes);
    let shard_of = |s: &Service| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&s.namespace, &s.name).hash(&mut h);
        (h.finish() % shards as u64) as usize
    };
    let split = |r: &Registry| -> Vec<Registry> {
        let mut parts = vec![Vec::new(); shards];
        for s in &r.services {
            parts[shard_of(s)].push(s.clone());
        }
        parts.into_iter().map(Registry::shared).collect()
    };
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let mut sinks = Vec::new();
    let mut watched = Vec::new();
    let mut addrs = Vec::new();
    for part in split(&registries[0]) {
        let (sink, view) = source::channel("bench");
        sink.publish(part);
        let (publisher, rx) = snapshot::channel();
        let clients = Clients::default();
        runtime.spawn(snapshot::publish::run(
            view.registry.clone(),
            options(),
            publisher,
            Metrics::unregistered(),
            interval,
            stop.clone(),
        ));
        addrs.push(runtime.block_on(serve_ads(rx.clone(), clients.clone())).to_string());
        sinks.push(sink);
        watched.push((rx, clients));
    }
    writeln!(out, "ready {}", addrs.join(",")).unwrap();
    let acked_everywhere = |watched: &[(tokio::sync::watch::Receiver<Arc<Snapshot>>, Clients)]| {
        watched.iter().all(|(rx, clients)| {
            let version = rx.borrow().version.clone();
            clients.list().iter().all(|c| {
                c.types
                    .iter()
                    .all(|(t, s)| !cloudmap_xds::xds::is_service_entry(t) || s.last_version_acked == version)
            })
        })
    };
    let mut current = 0;
    for line in stdin.lock().lines() {
        let line = line.unwrap();
        let words: Vec<usize> = line.split_whitespace().skip(1).map(|w| w.parse().unwrap()).collect();
        let at = SystemTime::now();
        if line.starts_with("change ") {
            let versions = || watched.iter().map(|(rx, _)| rx.borrow().version.clone()).collect::<Vec<_>>();
            let before = versions();
            current += words[0];
            for (sink, part) in sinks.iter().zip(split(&registries[current])) {
                sink.publish(part);
            }
            // Wait for the build and publication, then for every ACK.
            let until = std::time::Instant::now() + Duration::from_secs(300);
            while (versions() == before || !acked_everywhere(&watched)) && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(2));
            }
        } else if line.starts_with("churn ") {
            let (per_second, seconds) = (words[0], words[1]);
            let pace = Duration::from_secs(1) / per_second as u32;
            for _ in 0..per_second * seconds {
                current += 1;
                for (sink, part) in sinks.iter().zip(split(&registries[current])) {
                    sink.publish(part);
                }
                std::thread::sleep(pace);
            }
        } else {
            panic!("unknown command {line:?}");
        }
        writeln!(out, "published {}", unix_nanos(at)).unwrap();
    }
    true
}

/// [`generated`] as a registry file (the YAML `--registry-file` reads).
pub fn registry_yaml(registry: &Registry) -> String {
    use std::fmt::Write as _;
    let mut by_namespace: BTreeMap<&str, Vec<&Service>> = BTreeMap::new();
    for s in &registry.services {
        by_namespace.entry(&s.namespace).or_default().push(s);
    }
    let mut out = String::from("namespaces:\n");
    for (namespace, services) in by_namespace {
        writeln!(out, "- name: {namespace}\n  services:").unwrap();
        for s in services {
            let created = humantime::format_rfc3339(s.created);
            writeln!(out, "  - name: {}\n    created: {created}\n    instances:", s.name).unwrap();
            for i in &s.instances {
                writeln!(out, "    - id: {}\n      attributes:", i.id).unwrap();
                for (k, v) in &i.attributes {
                    writeln!(out, "        {k}: \"{v}\"").unwrap();
                }
            }
        }
    }
    out
}
