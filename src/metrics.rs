//! Prometheus metrics, one family group per pipeline stage, all under `cloudmap_xds_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

pub const PREFIX: &str = "cloudmap_xds";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub api: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// The limit a refusal hit: the name of the flag that sets it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SettingLabels {
    pub setting: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub r#type: &'static str,
}

/// Source-side metrics (registry file and Cloud Map).
#[derive(Debug, Clone)]
pub struct SourceMetrics {
    /// Loads or polls by outcome (`success`, `error`, `unchanged`).
    pub loads: Family<OutcomeLabels, Counter>,
    pub load_duration: Histogram,
    /// AWS API calls by API and outcome (`success`, `error`, `throttled`, `timeout`, `denied`).
    pub aws_calls: Family<ApiLabels, Counter>,
    /// 1 while the IAM policy denies GetServiceAttributes (optional: the defaults apply).
    pub service_attributes_unavailable: Gauge,
    /// Unix time of the last complete sync of every service.
    pub last_full_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub services: Gauge,
    /// Services missing from Cloud Map listings but still served: a held mass removal.
    pub mass_removal_held: Gauge,
}

/// What the current snapshot serves.
#[derive(Debug, Clone)]
pub struct SnapshotMetrics {
    pub service_entries: Gauge,
    pub endpoints: Gauge,
    pub skipped_instances: Family<ReasonLabels, Gauge>,
    pub skipped_labels: Gauge,
    /// Service attributes of ours that could not be used, by setting (`ports`, `location`, ..., `unknown`).
    pub invalid_settings: Family<SettingLabels, Gauge>,
    pub published: Counter,
    pub build_duration: Histogram,
    pub encoded_bytes: Gauge,
}

/// ADS streams.
#[derive(Debug, Clone)]
pub struct XdsMetrics {
    pub connected_streams: Gauge,
    pub streams: Counter,
    pub responses: Family<TypeLabels, Counter>,
    pub sent_bytes: Family<TypeLabels, Counter>,
    pub acks: Family<TypeLabels, Counter>,
    pub nacks: Family<TypeLabels, Counter>,
    /// Responses replaced, before they were sent, by a newer one of their type (slow clients).
    pub superseded: Family<TypeLabels, Counter>,
    /// From a snapshot's publication to its response being queued on a stream.
    pub push_latency: Histogram,
    /// Streams, calls, requests and responses refused by a limit (ADS and debug services).
    pub refusals: Family<LimitLabels, Counter>,
    /// gRPC connections dropped before HTTP/2, by reason (`tls_handshake`, `tls_handshake_timeout`, `preface_timeout`).
    pub rejected_connections: Family<ReasonLabels, Counter>,
    /// TLS certificate reloads by outcome (`success`, `error`: the previous pair stays).
    pub tls_reloads: Family<OutcomeLabels, Counter>,
}

/// The peer bootstrap (`--peer-bootstrap`).
#[derive(Debug, Clone)]
pub struct PeerMetrics {
    /// 1 while the ServiceEntries served are a peer's, before this replica's own first complete sync.
    pub serving_borrowed: Gauge,
    /// Attempts at one peer address, by outcome (`borrowed`, `self`, `not_ready`, `empty`,
    /// `unreachable`, `failed`, `unresolved`).
    pub attempts: Family<OutcomeLabels, Counter>,
}

#[derive(Debug, Clone)]
pub struct Metrics {
    pub source: SourceMetrics,
    pub snapshot: SnapshotMetrics,
    pub xds: XdsMetrics,
    pub peer: PeerMetrics,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 4.0, 10))
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let registry = registry.sub_registry_with_prefix(PREFIX);
        let source = SourceMetrics {
            loads: Family::default(),
            load_duration: seconds_histogram(),
            aws_calls: Family::default(),
            service_attributes_unavailable: Gauge::default(),
            last_full_sync: Gauge::default(),
            services: Gauge::default(),
            mass_removal_held: Gauge::default(),
        };
        registry.register("source_loads", "Source loads or polls, by outcome", source.loads.clone());
        registry.register_with_unit(
            "source_load_duration",
            "Duration of one source load or poll",
            Unit::Seconds,
            source.load_duration.clone(),
        );
        registry.register(
            "aws_calls",
            "AWS Cloud Map API calls, by API and outcome",
            source.aws_calls.clone(),
        );
        registry.register(
            "service_attributes_unavailable",
            "1 while the IAM policy does not allow servicediscovery:GetServiceAttributes (optional: services are served \
             without their cloudmap-xds/ attributes)",
            source.service_attributes_unavailable.clone(),
        );
        registry.register_with_unit(
            "last_full_sync_timestamp",
            "Unix time of the last complete sync of every service; alert on time() minus this",
            Unit::Seconds,
            source.last_full_sync.clone(),
        );
        registry.register("source_services", "Services the source currently knows", source.services.clone());
        registry.register(
            "mass_removal_held_services",
            "Services missing from Cloud Map listings but still served until --mass-removal-confirm-after confirms their removal",
            source.mass_removal_held.clone(),
        );

        let snapshot = SnapshotMetrics {
            service_entries: Gauge::default(),
            endpoints: Gauge::default(),
            skipped_instances: Family::default(),
            skipped_labels: Gauge::default(),
            invalid_settings: Family::default(),
            published: Counter::default(),
            build_duration: seconds_histogram(),
            encoded_bytes: Gauge::default(),
        };
        registry.register(
            "service_entries",
            "ServiceEntries in the current snapshot",
            snapshot.service_entries.clone(),
        );
        registry.register("endpoints", "Endpoints in the current snapshot", snapshot.endpoints.clone());
        registry.register(
            "skipped_instances",
            "Instances left out of the current snapshot, by reason",
            snapshot.skipped_instances.clone(),
        );
        registry.register(
            "skipped_labels",
            "Custom attributes of the current snapshot that are not valid labels",
            snapshot.skipped_labels.clone(),
        );
        registry.register(
            "invalid_service_settings",
            "Service attributes (cloudmap-xds/...) of the current snapshot that could not be used, by setting",
            snapshot.invalid_settings.clone(),
        );
        registry.register(
            "snapshots_published",
            "Snapshots published (content changed)",
            snapshot.published.clone(),
        );
        registry.register_with_unit(
            "snapshot_build_duration",
            "Time to translate and encode one snapshot",
            Unit::Seconds,
            snapshot.build_duration.clone(),
        );
        registry.register_with_unit(
            "snapshot_encoded",
            "Encoded size of the ServiceEntry resources of the current snapshot",
            Unit::Bytes,
            snapshot.encoded_bytes.clone(),
        );

        let xds = XdsMetrics {
            connected_streams: Gauge::default(),
            streams: Counter::default(),
            responses: Family::default(),
            sent_bytes: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            superseded: Family::default(),
            push_latency: seconds_histogram(),
            refusals: Family::default(),
            rejected_connections: Family::default(),
            tls_reloads: Family::default(),
        };
        registry.register("ads_connected_streams", "Open ADS streams", xds.connected_streams.clone());
        registry.register("ads_streams", "ADS streams opened", xds.streams.clone());
        registry.register("ads_responses", "DiscoveryResponses sent, by type", xds.responses.clone());
        registry.register_with_unit(
            "ads_sent",
            "Encoded bytes of DiscoveryResponses sent, by type",
            Unit::Bytes,
            xds.sent_bytes.clone(),
        );
        registry.register("ads_acks", "ACKs received, by type", xds.acks.clone());
        registry.register("ads_nacks", "NACKs received, by type", xds.nacks.clone());
        registry.register(
            "ads_superseded_responses",
            "Responses a slow client never got because a newer full set of their type replaced them, by type",
            xds.superseded.clone(),
        );
        registry.register_with_unit(
            "push_latency",
            "Time from a snapshot's publication to its push being queued on a stream",
            Unit::Seconds,
            xds.push_latency.clone(),
        );
        registry.register(
            "grpc_refusals",
            "Streams, calls, requests or responses refused by a limit; the label names the flag",
            xds.refusals.clone(),
        );
        registry.register(
            "grpc_rejected_connections",
            "gRPC connections dropped before HTTP/2 (failed or slow TLS handshakes, no HTTP/2 preface in time), by reason",
            xds.rejected_connections.clone(),
        );
        registry.register(
            "tls_reloads",
            "TLS certificate reloads by outcome; on error the previous pair stays in use",
            xds.tls_reloads.clone(),
        );
        let peer = PeerMetrics { serving_borrowed: Gauge::default(), attempts: Family::default() };
        registry.register(
            "serving_borrowed",
            "1 while the ServiceEntries served were borrowed from a peer replica (--peer-bootstrap) because this \
             replica's own first complete sync has not finished; alert when it lasts",
            peer.serving_borrowed.clone(),
        );
        registry.register(
            "peer_bootstrap_attempts",
            "Attempts to borrow the ServiceEntry set from one peer address, by outcome",
            peer.attempts.clone(),
        );
        Metrics { source, snapshot, xds, peer }
    }

    /// Metrics registered nowhere, for tests and tools.
    pub fn unregistered() -> Self {
        Self::new(&mut Registry::default())
    }
}
