//! Wiring: source → translate → snapshot → ADS/debug/admin servers, with a
//! graceful drain. `build` binds every port first, so tests can use port 0.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::ServeArgs;
use crate::debug::DebugService;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::proto::cloudmap_xds::debug::v1::debug_server::DebugServer;
use crate::snapshot::{self, Snapshot};
use crate::source::{self, SourceView, registry_file};
use crate::xds::{AdsServer, AdsService, Clients};

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
    tokio::spawn(snapshot::publish::run(
        source_view.registry.clone(),
        options,
        publisher,
        metrics.clone(),
        args.min_push_interval,
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
    let debug = DebugService::new(snapshots.clone(), source_view.clone(), clients);
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
            .add_service(AdsService::new(ads))
            .add_service(DebugServer::new(debug).max_encoding_message_size(usize::MAX))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            // The builder's tcp_nodelay applies only to sockets tonic binds itself; without it the tail of
            // every response can wait for the peer's delayed ACK (40 ms).
            .serve_with_incoming_shutdown(
                TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                async move {
                    let _ = grpc_draining.wait_for(|d| *d).await;
                },
            ),
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
            let (path, source_metrics) = (path.clone(), metrics.source.clone());
            let watcher =
                tokio::task::spawn_blocking(move || registry_file::start(&path, sink, source_metrics))
                    .await
                    .context("loading the registry file")??;
            metrics.source.load_duration.observe(started.elapsed().as_secs_f64());
            metrics.source.loads.get_or_create(&OutcomeLabels { outcome: "success" }).inc();
            tokio::spawn(registry_file::watch(watcher, shutdown));
            Ok(view)
        }
        None => source::cloudmap::start(&args.cloudmap, metrics, shutdown)
            .await
            .context("starting the Cloud Map source"),
    }
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
