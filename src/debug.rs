//! The read-only gRPC debug service (`cloudmap_xds.debug.v1.Debug`), for grpcurl.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::proto::cloudmap_xds::debug::v1::{
    Client, EndpointExplanation, ExplainServiceEntryRequest, ExplainServiceEntryResponse, GetStatusRequest,
    GetStatusResponse, IgnoredSetting, ListClientsRequest, ListClientsResponse, ListServiceEntriesRequest,
    ListServiceEntriesResponse, PortExplanation, ServiceEntryResource, ServiceSourceStatus,
    SettingExplanation, SkippedInstance, TypeState, debug_server::Debug,
};
use crate::render;
use crate::snapshot::{self, Snapshot};
use crate::source::SourceView;
use crate::translate::{self, Explanation, Options};
use crate::xds::Clients;

#[derive(Debug, Clone)]
pub struct DebugService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    source: SourceView,
    clients: Clients,
    /// What the snapshot builder translates with, so explanations match what is served.
    options: Arc<Options>,
    /// This process, as peers tell themselves apart.
    instance_id: String,
}

impl DebugService {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        source: SourceView,
        clients: Clients,
        options: Options,
        instance_id: String,
    ) -> Self {
        DebugService { snapshots, source, clients, options: Arc::new(options), instance_id }
    }
}

/// The explanation as the debug service returns it.
fn explanation_response(
    service: &crate::model::Service,
    e: Explanation,
    publish_namespace: &str,
) -> ExplainServiceEntryResponse {
    let setting = |setting: &str, value: String, origin: String| SettingExplanation {
        setting: setting.into(),
        value,
        origin,
    };
    let mut skipped_instances: Vec<SkippedInstance> = e
        .skipped
        .iter()
        .map(|(id, reason)| SkippedInstance {
            instance: id.clone(),
            kind: reason.kind().into(),
            reason: reason.to_string(),
        })
        .collect();
    skipped_instances.extend(e.health_filtered.iter().map(|(id, health)| SkippedInstance {
        instance: id.clone(),
        kind: "health_filter".into(),
        reason: format!("{} and left out by the health filter", health.as_str()),
    }));
    ExplainServiceEntryResponse {
        name: format!("{publish_namespace}/{}", e.name),
        cloud_map_namespace: service.namespace.clone(),
        cloud_map_service: service.name.clone(),
        host: e.host.clone(),
        ports_origin: render::ports_origin(&e),
        ports: e
            .ports
            .iter()
            .map(|p| PortExplanation {
                name: p.spec.name.clone(),
                number: u32::from(p.spec.number),
                protocol: p.spec.protocol.as_str().into(),
                origin: p.origin.to_string(),
            })
            .collect(),
        settings: vec![
            setting("location", e.location.value.as_str_name().into(), e.location.origin.to_string()),
            setting("exportTo", e.export_to.value.join(","), e.export_to.origin.to_string()),
            setting("resolution", e.resolution.value.as_str_name().into(), render::resolution_origin(&e)),
            setting(
                "addresses",
                format!("{} ({})", e.spec.addresses.join(","), e.addresses.value),
                e.addresses.origin.to_string(),
            ),
        ],
        endpoints: e
            .spec
            .endpoints
            .iter()
            .zip(&e.endpoint_instances)
            .map(|(endpoint, instances)| EndpointExplanation {
                address: endpoint.address.clone(),
                ports: endpoint.ports.clone().into_iter().collect(),
                instances: instances.clone(),
            })
            .collect(),
        skipped_instances,
        ignored_settings: e
            .invalid_settings
            .iter()
            .map(|i| IgnoredSetting { key: i.key.clone(), value: i.value.clone(), reason: i.reason.clone() })
            .collect(),
        notes: e.notes.clone(),
        spec: Some(e.spec),
    }
}

fn timestamp(t: Option<SystemTime>) -> Option<prost_types::Timestamp> {
    t.map(prost_types::Timestamp::from)
}

#[tonic::async_trait]
impl Debug for DebugService {
    async fn list_service_entries(
        &self,
        _request: Request<ListServiceEntriesRequest>,
    ) -> Result<Response<ListServiceEntriesResponse>, Status> {
        let snapshot = self.snapshots.borrow().clone();
        let snapshot_version = snapshot.version.clone();
        let decoded = snapshot::decode_all(snapshot, |r, spec| {
            Ok(ServiceEntryResource {
                name: r.name.clone(),
                version: r.version.clone(),
                create_time: timestamp(Some(r.create_time)),
                spec: Some(spec.map_err(|e| format!("{}: {e}", r.name))?),
            })
        })
        .await
        .map_err(|e| Status::internal(format!("decoding the snapshot failed: {e}")))?;
        let service_entries = decoded
            .into_iter()
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| Status::internal(format!("cannot decode a served ServiceEntry: {e}")))?;
        Ok(Response::new(ListServiceEntriesResponse { snapshot_version, service_entries }))
    }

    async fn get_status(
        &self,
        _request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let snapshot = self.snapshots.borrow().clone();
        let status = self.source.status();
        let services = status
            .services
            .values()
            .map(|s| ServiceSourceStatus {
                namespace: s.namespace.to_string(),
                service: s.service.to_string(),
                last_success: timestamp(s.last_success),
                last_error: s.last_error.clone().unwrap_or_default(),
                last_error_time: timestamp(s.last_error_time),
                api_calls: s.api_calls,
                instances: s.instances,
            })
            .collect();
        Ok(Response::new(GetStatusResponse {
            snapshot_version: snapshot.version.clone(),
            source: status.source.clone(),
            synced: snapshot.is_own(),
            last_successful_load: timestamp(status.last_successful_load),
            last_full_sync: timestamp(status.last_full_sync),
            last_error: status.last_error.clone().unwrap_or_default(),
            last_error_time: timestamp(status.last_error_time),
            service_entries: u32::try_from(snapshot.resources.len()).unwrap_or(u32::MAX),
            endpoints: u32::try_from(snapshot.endpoints).unwrap_or(u32::MAX),
            skipped_instances: u32::try_from(snapshot.skipped.len()).unwrap_or(u32::MAX),
            services,
            borrowed: snapshot.borrowed.is_some(),
            borrowed_from: snapshot.borrowed.as_ref().map(|b| b.peer.clone()).unwrap_or_default(),
            borrowed_at: timestamp(snapshot.borrowed.as_ref().map(|b| b.at)),
            instance_id: self.instance_id.clone(),
        }))
    }

    async fn list_clients(
        &self,
        _request: Request<ListClientsRequest>,
    ) -> Result<Response<ListClientsResponse>, Status> {
        let clients = self
            .clients
            .list()
            .into_iter()
            .map(|c| Client {
                node_id: c.node_id,
                peer_address: c.peer.map(|p| p.to_string()).unwrap_or_default(),
                connected_at: timestamp(Some(c.connected_at)),
                types: c
                    .types
                    .into_iter()
                    .map(|(type_url, s)| TypeState {
                        type_url,
                        last_version_sent: s.last_version_sent,
                        last_nonce_sent: s.last_nonce_sent,
                        last_version_acked: s.last_version_acked,
                        responses_sent: s.responses_sent,
                        acks: s.acks,
                        nacks: s.nacks,
                        last_nack_error: s.last_nack_error.unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(ListClientsResponse { clients }))
    }

    async fn explain_service_entry(
        &self,
        request: Request<ExplainServiceEntryRequest>,
    ) -> Result<Response<ExplainServiceEntryResponse>, Status> {
        let target = request.into_inner().name;
        let Some(registry) = self.source.registry.borrow().clone() else {
            return Err(Status::unavailable("the source has not completed its first sync yet"));
        };
        let options = self.options.clone();
        // Translation is CPU work: keep it off the workers that serve streams.
        let found = tokio::task::spawn_blocking(move || {
            translate::explain(&registry, &target, &options)
                .map(|(service, e)| explanation_response(&service, e, &options.publish_namespace))
                .ok_or(target)
        })
        .await
        .map_err(|e| Status::internal(format!("explaining failed: {e}")))?;
        match found {
            Ok(response) => Ok(Response::new(response)),
            Err(target) => Err(Status::not_found(format!(
                "no ServiceEntry {target:?}: give cloudmap-<service>.<namespace> (optionally with the publish \
                 namespace and a slash before it) or the Cloud Map NAMESPACE/SERVICE"
            ))),
        }
    }
}
