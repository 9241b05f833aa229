//! Sources of registry data: the built-in registry file and AWS Cloud Map.
//!
//! A source owns a [`SourceSink`]. It publishes a complete [`Registry`] only
//! when its content changed, and it never publishes a partial one: whatever
//! fails keeps the last good state. Until a source has completed its first
//! full load, the registry stays `None` and the ServiceEntry type is not served.

pub mod cloudmap;
pub mod registry_file;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::watch;

use crate::model::Registry;

/// What the debug service and the admin endpoint show about a source.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    /// e.g. `registry-file:/etc/registry.yaml` or `cloudmap:us-east-1`.
    pub source: String,
    /// True once the first complete load succeeded.
    pub synced: bool,
    #[serde(serialize_with = "time_format::option")]
    pub last_successful_load: Option<SystemTime>,
    /// When the last complete refresh of every service finished.
    #[serde(serialize_with = "time_format::option")]
    pub last_full_sync: Option<SystemTime>,
    pub last_error: Option<String>,
    #[serde(serialize_with = "time_format::option")]
    pub last_error_time: Option<SystemTime>,
    /// Per `(namespace, service)`; only sources that read services one by one fill it.
    #[serde(serialize_with = "serialize_services")]
    pub services: BTreeMap<StatusKey, ServiceStatus>,
}

/// `(namespace, service)`, or `(namespace, "")` for a namespace's own calls. The
/// names are shared with the source's own state and with [`ServiceStatus`]: the
/// Cloud Map source keeps a status per service, so at 10,000 services each copy of a
/// name costs about 0.3 MB.
pub type StatusKey = (Arc<str>, Arc<str>);

/// Per-service read status (Cloud Map).
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServiceStatus {
    #[serde(serialize_with = "serialize_str")]
    pub namespace: Arc<str>,
    #[serde(serialize_with = "serialize_str")]
    pub service: Arc<str>,
    #[serde(serialize_with = "time_format::option")]
    pub last_success: Option<SystemTime>,
    pub last_error: Option<String>,
    #[serde(serialize_with = "time_format::option")]
    pub last_error_time: Option<SystemTime>,
    /// AWS calls spent on this service since start.
    pub api_calls: u64,
    pub instances: u32,
}

impl Clone for ServiceStatus {
    fn clone(&self) -> Self {
        ServiceStatus {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            last_success: self.last_success,
            last_error: self.last_error.clone(),
            last_error_time: self.last_error_time,
            api_calls: self.api_calls,
            instances: self.instances,
        }
    }

    /// Reuses the strings already allocated: the Cloud Map source copies every
    /// service's status after each poll.
    fn clone_from(&mut self, source: &Self) {
        self.namespace.clone_from(&source.namespace);
        self.service.clone_from(&source.service);
        self.last_success = source.last_success;
        self.last_error.clone_from(&source.last_error);
        self.last_error_time = source.last_error_time;
        self.api_calls = source.api_calls;
        self.instances = source.instances;
    }
}

fn serialize_str<S: serde::Serializer>(text: &Arc<str>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(text)
}

fn serialize_services<S: serde::Serializer>(
    services: &BTreeMap<StatusKey, ServiceStatus>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(services.values())
}

/// RFC 3339 rendering of times for JSON views.
pub mod time_format {
    use std::time::SystemTime;

    pub fn option<S: serde::Serializer>(time: &Option<SystemTime>, serializer: S) -> Result<S::Ok, S::Error> {
        match time {
            Some(t) => serializer.serialize_str(&humantime::format_rfc3339_millis(*t).to_string()),
            None => serializer.serialize_none(),
        }
    }
}

/// The writing end a source publishes through.
#[derive(Debug, Clone)]
pub struct SourceSink {
    registry: watch::Sender<Option<Arc<Registry>>>,
    status: Arc<RwLock<SourceStatus>>,
}

/// The reading end: the latest complete registry and the source's status.
#[derive(Debug, Clone)]
pub struct SourceView {
    pub registry: watch::Receiver<Option<Arc<Registry>>>,
    pub status: Arc<RwLock<SourceStatus>>,
}

pub fn channel(source: impl Into<String>) -> (SourceSink, SourceView) {
    let (tx, rx) = watch::channel(None);
    let status = Arc::new(RwLock::new(SourceStatus { source: source.into(), ..Default::default() }));
    (SourceSink { registry: tx, status: status.clone() }, SourceView { registry: rx, status })
}

impl SourceSink {
    /// Publishes a complete registry; returns whether it differed from the last one.
    /// A registry equal to the current one wakes nobody.
    pub fn publish(&self, registry: Registry) -> bool {
        let now = SystemTime::now();
        self.update_status(|s| {
            s.synced = true;
            s.last_successful_load = Some(now);
        });
        self.registry.send_if_modified(|current| {
            if current.as_deref() == Some(&registry) {
                return false;
            }
            *current = Some(Arc::new(registry));
            true
        })
    }

    /// Records a failure; the last good registry stays published.
    pub fn record_error(&self, error: impl std::fmt::Display) {
        let message = error.to_string();
        self.update_status(|s| {
            s.last_error = Some(message);
            s.last_error_time = Some(SystemTime::now());
        });
    }

    pub fn update_status(&self, update: impl FnOnce(&mut SourceStatus)) {
        // A poisoned lock only means a panic elsewhere mid-update; the status is still usable.
        let mut status = self.status.write().unwrap_or_else(|e| e.into_inner());
        update(&mut status);
    }
}

impl SourceView {
    pub fn status(&self) -> SourceStatus {
        self.status.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
