//! Wiring: source → translate → snapshot → ADS/debug/admin servers, with a
//! graceful drain. `build` binds every port first, so tests can use port 0.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::ServeArgs;
use crate::debug::DebugService;
use crate::metrics::{Metrics, OutcomeLabels, ReasonLabels, SettingLabels};
use crate::model::Registry;
use crate::proto::cloudmap_xds::debug::v1::debug_server::DebugServer;
use crate::proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use crate::snapshot::{self, Publisher, Snapshot};
use crate::source::{self, SourceView, registry_file};
use crate::translate::{Options, SettingProblem, Skipped, SkippedLabel};
use crate::xds::{AdsServer, Clients};

/// istiod's ADS client pings every 30 s and waits 10 s; we detect dead peers the same way.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running server whose ports are bound.
pub struct Bound {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    draining: watch::Sender<bool>,
    stopped: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    admin: JoinHandle<std::io::Result<()>>,
    grace_period: Duration,
}

/// Triggers the same drain as SIGTERM (for tests and embedders).
#[derive(Debug, Clone)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl ShutdownHandle {
    pub fn drain(&self) {
        self.0.send_replace(true);
    }
}

pub async fn build(args: ServeArgs) -> anyhow::Result<Bound> {
    let options = args.publish.translate_options()?;
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut prometheus);
    let (draining_tx, draining) = watch::channel(false);

    let source_view = start_source(&args, &metrics, draining.clone()).await?;
    let (publisher, snapshots) = snapshot::channel();
    tokio::spawn(build_snapshots(
        source_view.registry.clone(),
        options.clone(),
        publisher,
        metrics.clone(),
        draining.clone(),
    ));

    let clients = Clients::default();
    let grpc_listener = TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("binding --grpc-addr {}", args.grpc_addr))?;
    let admin_listener = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding --admin-addr {}", args.admin_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let ads = AdsServer::new(snapshots.clone(), clients.clone(), metrics.xds.clone(), draining.clone());
    let debug = DebugService::new(snapshots.clone(), source_view.clone(), clients, options.clone());
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(mirror_readiness(health_reporter, snapshots.clone(), draining.clone()));

    let mut grpc_draining = draining.clone();
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .tcp_nodelay(true)
            .add_service(
                // Responses carry the whole set; requests keep tonic's 4 MiB limit (istiod's are a few KB).
                AggregatedDiscoveryServiceServer::new(ads).max_encoding_message_size(usize::MAX),
            )
            .add_service(DebugServer::new(debug).max_encoding_message_size(usize::MAX))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc_listener), async move {
                let _ = grpc_draining.wait_for(|d| *d).await;
            }),
    );

    let (stopped, mut admin_stop) = watch::channel(false);
    let admin_state = AdminState {
        snapshots,
        source: source_view,
        registry: Arc::new(Mutex::new(prometheus)),
        draining,
        config: serde_json::to_value(&args)?,
    };
    let admin = tokio::spawn(async move {
        axum::serve(admin_listener, admin::router(admin_state))
            .with_graceful_shutdown(async move {
                let _ = admin_stop.wait_for(|s| *s).await;
            })
            .await
    });
    info!(%grpc_addr, %admin_addr, "serving");
    Ok(Bound {
        grpc_addr,
        admin_addr,
        draining: draining_tx,
        stopped,
        grpc,
        admin,
        grace_period: args.shutdown_grace_period,
    })
}

async fn start_source(
    args: &ServeArgs,
    metrics: &Metrics,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<SourceView> {
    match &args.registry_file {
        Some(path) => {
            let (sink, view) = source::channel(format!("registry-file:{}", path.display()));
            let started = Instant::now();
            let text = registry_file::start(path, &sink)?;
            metrics.source.load_duration.observe(started.elapsed().as_secs_f64());
            metrics.source.loads.get_or_create(&OutcomeLabels { outcome: "success" }).inc();
            tokio::spawn(registry_file::watch(path.clone(), sink, text, metrics.source.clone(), shutdown));
            Ok(view)
        }
        None => source::cloudmap::start(&args.cloudmap.settings(), metrics, shutdown)
            .await
            .context("starting the Cloud Map source"),
    }
}

/// Translates every new registry and publishes the snapshot when its content changed.
async fn build_snapshots(
    mut registries: watch::Receiver<Option<Arc<Registry>>>,
    options: Options,
    publisher: Publisher,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = snapshot::Builder::new(options);
    let mut logged_skips = BTreeSet::new();
    let mut logged_labels = BTreeSet::new();
    let mut logged_settings = BTreeSet::new();
    loop {
        let registry = registries.borrow_and_update().clone();
        if let Some(registry) = registry {
            let started = Instant::now();
            let snapshot = builder.build(&registry);
            metrics.snapshot.build_duration.observe(started.elapsed().as_secs_f64());
            log_new_skips(&snapshot.skipped, &mut logged_skips, builder.skipped_labels(), &mut logged_labels);
            log_new_invalid_settings(&snapshot.invalid_settings, &mut logged_settings);
            record_snapshot_metrics(&metrics, &snapshot, registry.services.len());
            let (version, entries, endpoints) =
                (snapshot.version.clone(), snapshot.resources.len(), snapshot.endpoints);
            if publisher.publish(snapshot) {
                metrics.snapshot.published.inc();
                info!(%version, service_entries = entries, endpoints, "snapshot published");
            }
        }
        tokio::select! {
            changed = registries.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|d| *d) => return,
        }
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

fn record_snapshot_metrics(metrics: &Metrics, snapshot: &Snapshot, services: usize) {
    let m = &metrics.snapshot;
    m.service_entries.set(i64::try_from(snapshot.resources.len()).unwrap_or(i64::MAX));
    m.endpoints.set(i64::try_from(snapshot.endpoints).unwrap_or(i64::MAX));
    m.skipped_labels.set(i64::try_from(snapshot.skipped_labels).unwrap_or(i64::MAX));
    m.encoded_bytes.set(i64::try_from(snapshot.encoded_len()).unwrap_or(i64::MAX));
    m.skipped_instances.clear();
    for s in &snapshot.skipped {
        m.skipped_instances.get_or_create(&ReasonLabels { reason: s.reason.kind() }).inc();
    }
    m.invalid_settings.clear();
    for p in &snapshot.invalid_settings {
        m.invalid_settings.get_or_create(&SettingLabels { setting: p.setting.kind() }).inc();
    }
    metrics.source.services.set(i64::try_from(services).unwrap_or(i64::MAX));
}

/// grpc.health.v1 says SERVING exactly when `/ready` does.
async fn mirror_readiness(
    reporter: tonic_health::server::HealthReporter,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut draining: watch::Receiver<bool>,
) {
    loop {
        let ready = admin::is_ready(&snapshots.borrow_and_update(), *draining.borrow_and_update());
        let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        reporter.set_service_status("", status).await;
        reporter.set_service_status("envoy.service.discovery.v3.AggregatedDiscoveryService", status).await;
        tokio::select! {
            r = snapshots.changed() => if r.is_err() { return },
            r = draining.changed() => if r.is_err() { return },
        }
    }
}

impl Bound {
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.draining.clone())
    }

    /// Serves until SIGTERM or SIGINT (or a [`ShutdownHandle`]), then drains.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        let mut draining = self.draining.subscribe();
        tokio::select! {
            signal = shutdown_signal() => info!(signal, "draining"),
            _ = draining.wait_for(|d| *d) => info!("draining"),
        }
        self.drain().await
    }

    /// Readiness goes false, new streams are refused, open streams end cleanly,
    /// and the servers stop, all within the grace period.
    pub async fn drain(self) -> anyhow::Result<()> {
        self.draining.send_replace(true);
        let grace = self.grace_period;
        let grpc = match tokio::time::timeout(grace, self.grpc).await {
            Ok(joined) => joined.context("gRPC server task")?.context("gRPC server"),
            Err(_) => {
                error!(?grace, "drain exceeded the grace period; exiting anyway");
                Ok(())
            }
        };
        self.stopped.send_replace(true);
        match tokio::time::timeout(Duration::from_secs(1), self.admin).await {
            Ok(joined) => joined.context("admin server task")?.context("admin server")?,
            Err(_) => warn!("admin server did not stop in time"),
        }
        grpc?;
        info!("stopped");
        Ok(())
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        error!("cannot install signal handlers; only a ShutdownHandle can stop the server");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Fails fast, before binding anything, when the configuration cannot work.
pub fn check(args: &ServeArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.registry_file
        && !path.is_file()
    {
        bail!("--registry-file {}: no such file", path.display());
    }
    Ok(())
}
