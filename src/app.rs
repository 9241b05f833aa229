//! Wiring: source → translate → snapshot → ADS/debug/admin servers, with a
//! graceful drain. `build` binds every port first, so tests can use port 0.
//! Every long-lived task runs under a [`Supervisor`]: if one ends before the
//! drain, readiness and grpc.health turn false, the reason is logged, and the
//! process drains and exits non-zero.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::config::ServeArgs;
use crate::debug::DebugService;
use crate::limits::{PerCall, Slots, limit_names};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::proto::cloudmap_xds::debug::v1::debug_server::DebugServer;
use crate::snapshot::{self, Snapshot};
use crate::source::{self, SourceView, registry_file};
use crate::supervise::{self, Ended, Supervisor, task_names};
use crate::xds::{AdsLimits, AdsServer, AdsService, Clients};
use crate::{bootstrap, incoming, tls};

/// The gRPC health service names whose status follows readiness.
const HEALTH_SERVICES: [&str; 2] = ["", "envoy.service.discovery.v3.AggregatedDiscoveryService"];

/// A running server whose ports are bound.
pub struct Bound {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    draining: watch::Sender<bool>,
    /// Why the server failed, once a supervised task ended unexpectedly.
    failure: watch::Sender<Option<String>>,
    stopped: watch::Sender<bool>,
    supervisor: Supervisor,
    health: HealthReporter,
    grace_period: Duration,
    #[cfg(feature = "testing")]
    exit_hold: Option<tokio::signal::unix::Signal>,
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
    let tls = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => {
            let files = tls::Files { cert: cert.clone(), key: key.clone() };
            let loaded = tls::load(&files)?;
            info!(cert = %cert.display(), "TLS on the gRPC port");
            Some((files, loaded))
        }
        _ => None,
    };
    let mut prometheus = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut prometheus);
    let (draining_tx, draining) = watch::channel(false);
    let (failure_tx, failure) = watch::channel(None);
    // Dropped on an early return: the tasks started so far are aborted.
    let mut supervisor = Supervisor::new();

    let instance_id = bootstrap::instance_id();
    let peers = args.peer.peers(tls.is_some())?;
    let source_view = start_source(&args, &metrics, draining.clone(), &mut supervisor).await?;
    let (publisher, snapshots) = snapshot::channel();
    // Spawned once the gRPC server runs: its first round asks every peer address, this
    // replica's own included, and a replica must answer its own GetStatus to be told apart.
    let peer_bootstrap = peers.map(|peers| {
        let settings = bootstrap::Settings {
            peers,
            instance_id: instance_id.clone(),
            publish_namespace: options.publish_namespace.clone(),
            max_response_size: args.max_response_size,
            retry_interval: bootstrap::RETRY_INTERVAL,
        };
        bootstrap::run(settings, publisher.clone(), snapshots.clone(), metrics.clone(), draining.clone())
    });
    supervisor.spawn(
        task_names::SNAPSHOT_BUILDER,
        snapshot::publish::run(
            source_view.registry.clone(),
            options.clone(),
            publisher,
            metrics.clone(),
            args.min_push_interval,
            draining.clone(),
        ),
    );

    supervisor.spawn(
        task_names::MEMORY_TRIMMER,
        crate::memory::trim_periodically(crate::memory::TRIM_INTERVAL, draining.clone()),
    );

    let clients = Clients::default();
    let grpc_listener = TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("binding --grpc-addr {}", args.grpc_addr))?;
    let admin_listener = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding --admin-addr {}", args.admin_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let ads_limits = AdsLimits {
        streams: args.max_ads_streams,
        request_size: args.max_request_size,
        response_size: args.max_response_size,
    };
    let ads =
        AdsServer::new(snapshots.clone(), clients.clone(), metrics.xds.clone(), draining.clone(), ads_limits);
    let debug_slots = Slots::new(
        args.max_debug_calls,
        limit_names::MAX_DEBUG_CALLS,
        "debug calls",
        metrics.xds.refusals.clone(),
    );
    let debug = DebugService::new(
        snapshots.clone(),
        source_view.clone(),
        clients,
        options.clone(),
        instance_id.clone(),
    );
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let acceptor = tls.map(|(files, loaded)| {
        let reloads = metrics.xds.tls_reloads.clone();
        supervisor.spawn(task_names::TLS_RELOADER, loaded.watch_files(files, reloads, draining.clone()));
        loaded.acceptor
    });
    let connections = incoming::incoming(
        grpc_listener,
        acceptor,
        metrics.xds.rejected_connections.clone(),
        incoming::PREFACE_TIMEOUT,
    );
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    supervisor.spawn(
        task_names::READINESS_MIRROR,
        mirror_readiness(health_reporter.clone(), snapshots.clone(), draining.clone()),
    );

    let mut grpc_draining = draining.clone();
    supervisor.spawn(
        task_names::GRPC_SERVER,
        tonic::transport::Server::builder()
            // No ping policing either way: istiod's 30 s pings (and any other rate) are answered.
            .http2_keepalive_interval(Some(args.grpc_keepalive_interval))
            .http2_keepalive_timeout(Some(args.grpc_keepalive_timeout))
            .add_service(AdsService::new(ads))
            .add_service(PerCall::new(
                DebugServer::new(debug)
                    .max_decoding_message_size(args.max_request_size)
                    .max_encoding_message_size(args.max_response_size),
                debug_slots,
            ))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(connections, async move {
                let _ = grpc_draining.wait_for(|d| *d).await;
            }),
    );

    if let Some(peer_bootstrap) = peer_bootstrap {
        supervisor.spawn(task_names::PEER_BOOTSTRAP, peer_bootstrap);
    }

    let (stopped, mut admin_stop) = watch::channel(false);
    let admin_state = AdminState {
        snapshots,
        source: source_view,
        registry: Arc::new(Mutex::new(prometheus)),
        draining,
        failure,
        config: serde_json::to_value(&args)?,
        instance_id,
    };
    supervisor.spawn(task_names::ADMIN_SERVER, async move {
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
        failure: failure_tx,
        stopped,
        supervisor,
        health: health_reporter,
        grace_period: args.shutdown_grace_period,
        #[cfg(feature = "testing")]
        exit_hold: crate::supervise::fault::exit_hold(),
    })
}

async fn start_source(
    args: &ServeArgs,
    metrics: &Metrics,
    shutdown: watch::Receiver<bool>,
    supervisor: &mut Supervisor,
) -> anyhow::Result<SourceView> {
    match &args.registry_file {
        Some(path) => {
            let (sink, view) = source::channel(format!("registry-file:{}", path.display()));
            let started = Instant::now();
            let (path, source_metrics) = (path.clone(), metrics.source.clone());
            // Parsing is CPU work: off the async workers.
            let watcher =
                tokio::task::spawn_blocking(move || registry_file::start(&path, sink, source_metrics))
                    .await
                    .context("loading the registry file")??;
            metrics.source.load_duration.observe(started.elapsed().as_secs_f64());
            metrics.source.loads.get_or_create(&OutcomeLabels { outcome: "success" }).inc();
            supervisor.spawn(task_names::REGISTRY_FILE_WATCHER, registry_file::watch(watcher, shutdown));
            Ok(view)
        }
        None => {
            let (view, poller) = source::cloudmap::start(&args.cloudmap.settings(), metrics, shutdown)
                .await
                .context("starting the Cloud Map source")?;
            supervisor.spawn(task_names::CLOUDMAP_POLLER, poller);
            Ok(view)
        }
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
        for service in HEALTH_SERVICES {
            reporter.set_service_status(service, status).await;
        }
        let closed = tokio::select! {
            r = snapshots.changed() => r.is_err(),
            r = draining.changed() => r.is_err(),
        };
        if closed {
            return supervise::upstream_ended().await;
        }
    }
}

impl Bound {
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.draining.clone())
    }

    /// Serves until SIGTERM or SIGINT (or a [`ShutdownHandle`]), then drains.
    /// If a supervised task ends first, fails: see [`Bound::fail`].
    pub async fn run_until_signal(mut self) -> anyhow::Result<()> {
        let mut draining = self.draining.subscribe();
        let failed = tokio::select! {
            signal = shutdown_signal() => {
                info!(signal, "draining");
                None
            }
            _ = draining.wait_for(|d| *d) => {
                info!("draining");
                None
            }
            ended = self.supervisor.next_end() => Some(ended),
        };
        match failed {
            None => self.drain().await,
            Some(ended) => self.fail(ended).await,
        }
    }

    /// A task ended before the drain: readiness and grpc.health turn false at
    /// once, the reason is logged, and the server drains and reports an error
    /// (the binary exits non-zero, so Kubernetes restarts it).
    // `mut` only for the test hook (`exit_hold`), compiled in with the `testing` feature.
    #[cfg_attr(not(feature = "testing"), allow(unused_mut))]
    async fn fail(mut self, ended: Ended) -> anyhow::Result<()> {
        let reason = ended.to_string();
        error!(
            task = ended.task,
            reason = %reason,
            "a long-lived task ended unexpectedly; not ready, draining and exiting with an error so the process is restarted"
        );
        self.failure.send_replace(Some(reason.clone()));
        self.draining.send_replace(true);
        for service in HEALTH_SERVICES {
            self.health.set_service_status(service, ServingStatus::NotServing).await;
        }
        #[cfg(feature = "testing")]
        if let Some(mut hold) = self.exit_hold.take() {
            hold.recv().await;
        }
        let drained = self.drain().await;
        Err(match drained {
            // When the failed task is one of the servers, the drain finds that same end
            // again: report it once.
            Err(e) if e.to_string() == reason => e,
            Ok(()) => anyhow::anyhow!("{reason}"),
            Err(e) => e.context(reason),
        })
    }

    /// Readiness goes false, new streams are refused, open streams end cleanly,
    /// and the servers stop, all within the grace period.
    pub async fn drain(mut self) -> anyhow::Result<()> {
        self.draining.send_replace(true);
        let grace = self.grace_period;
        let grpc = match tokio::time::timeout(grace, self.supervisor.wait_for(task_names::GRPC_SERVER)).await
        {
            Ok(ended) if ended.is_error() => Err(anyhow::anyhow!("{ended}")),
            Ok(_) => Ok(()),
            Err(_) => {
                error!(?grace, "drain exceeded the grace period; exiting anyway");
                Ok(())
            }
        };
        self.stopped.send_replace(true);
        match tokio::time::timeout(Duration::from_secs(1), self.supervisor.wait_for(task_names::ADMIN_SERVER))
            .await
        {
            Ok(ended) if ended.is_error() => bail!("{ended}"),
            Ok(_) => {}
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
