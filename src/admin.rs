//! The admin HTTP port: liveness, readiness, Prometheus metrics and a JSON view
//! of what is served, for people without grpcurl.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::render;
use crate::snapshot::{self, Snapshot};
use crate::source::SourceView;

#[derive(Clone)]
pub struct AdminState {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub source: SourceView,
    pub registry: Arc<Mutex<Registry>>,
    pub draining: watch::Receiver<bool>,
    /// Set when a long-lived task ended unexpectedly: the process is on its way out.
    pub failure: watch::Receiver<Option<String>>,
    /// The effective configuration, as logged at start.
    pub config: Value,
    /// This process, as peers tell themselves apart.
    pub instance_id: String,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/debug/snapshot", get(snapshot))
        .route("/debug/config", get(|State(s): State<AdminState>| async move { Json(s.config) }))
        .with_state(state)
}

/// Ready once the first complete snapshot is loaded, and until draining starts.
pub fn is_ready(snapshot: &Snapshot, draining: bool) -> bool {
    snapshot.synced && !draining
}

async fn ready(State(state): State<AdminState>) -> Response {
    let snapshot = state.snapshots.borrow().clone();
    let draining = *state.draining.borrow();
    if is_ready(&snapshot, draining) {
        match &snapshot.borrowed {
            None => (StatusCode::OK, "ready\n").into_response(),
            Some(b) => (
                StatusCode::OK,
                format!("ready, serving a set borrowed from {} until the first complete sync\n", b.peer),
            )
                .into_response(),
        }
    } else {
        let why = match (state.failure.borrow().as_deref(), draining) {
            (Some(failure), _) => format!("failed: {failure}; exiting\n"),
            (None, true) => "draining\n".to_owned(),
            (None, false) => "waiting for the first complete snapshot\n".to_owned(),
        };
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = String::new();
    let encoded = {
        let registry = state.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut body, &registry)
    };
    match encoded {
        Ok(()) => {
            ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
                .into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")).into_response(),
    }
}

async fn snapshot(State(state): State<AdminState>) -> Json<Value> {
    let snapshot = state.snapshots.borrow().clone();
    let entries: Vec<Value> = snapshot::decode_all(snapshot.clone(), |r, spec| {
        let spec = match spec {
            Ok(spec) => render::spec_json(&spec),
            Err(e) => json!({"error": format!("cannot decode: {e}")}),
        };
        json!({
            "name": r.name,
            "version": r.version,
            "createTime": humantime::format_rfc3339(r.create_time).to_string(),
            "spec": spec,
        })
    })
    .await
    .unwrap_or_default();
    let skipped: Vec<Value> = snapshot
        .skipped
        .iter()
        .map(|s| json!({"namespace": s.namespace, "service": s.service, "instance": s.instance, "reason": s.reason.to_string()}))
        .collect();
    let borrowed = snapshot.borrowed.as_ref().map(|b| {
        json!({
            "from": b.peer,
            "peerInstance": b.peer_instance,
            "peerBorrowed": b.peer_borrowed,
            "at": humantime::format_rfc3339_millis(b.at).to_string(),
        })
    });
    Json(json!({
        "version": snapshot.version,
        "synced": snapshot.is_own(),
        "borrowed": borrowed,
        "instanceId": state.instance_id,
        "endpoints": snapshot.endpoints,
        "source": state.source.status(),
        "serviceEntries": entries,
        "skippedInstances": skipped,
    }))
}
