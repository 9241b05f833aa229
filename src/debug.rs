//! The read-only gRPC debug service (`cloudmap_xds.debug.v1.Debug`), for grpcurl.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::proto::cloudmap_xds::debug::v1::{
    Client, GetStatusRequest, GetStatusResponse, ListClientsRequest, ListClientsResponse,
    ListServiceEntriesRequest, ListServiceEntriesResponse, ServiceEntryResource, ServiceSourceStatus,
    TypeState, debug_server::Debug,
};
use crate::snapshot::Snapshot;
use crate::source::SourceView;
use crate::xds::Clients;

#[derive(Debug, Clone)]
pub struct DebugService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    source: SourceView,
    clients: Clients,
}

impl DebugService {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, source: SourceView, clients: Clients) -> Self {
        DebugService { snapshots, source, clients }
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
        let service_entries = snapshot
            .resources
            .iter()
            .map(|r| ServiceEntryResource {
                name: r.name.clone(),
                version: r.version.clone(),
                create_time: timestamp(Some(r.create_time)),
                spec: Some(r.spec.clone()),
            })
            .collect();
        Ok(Response::new(ListServiceEntriesResponse {
            snapshot_version: snapshot.version.clone(),
            service_entries,
        }))
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
                namespace: s.namespace.clone(),
                service: s.service.clone(),
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
            synced: snapshot.synced,
            last_successful_load: timestamp(status.last_successful_load),
            last_full_sync: timestamp(status.last_full_sync),
            last_error: status.last_error.clone().unwrap_or_default(),
            last_error_time: timestamp(status.last_error_time),
            service_entries: u32::try_from(snapshot.resources.len()).unwrap_or(u32::MAX),
            endpoints: u32::try_from(snapshot.endpoints).unwrap_or(u32::MAX),
            skipped_instances: u32::try_from(snapshot.skipped.len()).unwrap_or(u32::MAX),
            services,
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
}
