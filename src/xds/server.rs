//! The async shell around [`Connection`]: one task per ADS stream that moves
//! messages between the network, the snapshot channel and the state machine.

use std::sync::Arc;

use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, error, info, warn};

use super::connection::{Connection, MAX_TYPE_URLS_PER_STREAM, RequestKind};
use super::outbox::{self, Outbox, Outgoing, Queued};
use super::response::DiscoveryResponse;
use super::{Clients, type_label};
use crate::limits::{Slots, limit_names};
use crate::metrics::{LimitLabels, TypeLabels, XdsMetrics};
use crate::proto::envoy::service::discovery::v3::DiscoveryRequest;
use crate::snapshot::Snapshot;

/// Responses of distinct types queued per stream; a slow client fills only its
/// own queue, and a newer full set replaces an unsent one of its type.
const STREAM_QUEUE: usize = 4;

/// What one replica's ADS service accepts.
#[derive(Debug, Clone, Copy)]
pub struct AdsLimits {
    /// `--max-ads-streams`.
    pub streams: u32,
    /// `--max-request-size`, enforced by tonic's decoder; named in our refusal.
    pub request_size: usize,
    /// `--max-response-size`: a larger response is not sent.
    pub response_size: usize,
}

#[derive(Debug, Clone)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    clients: Clients,
    metrics: XdsMetrics,
    /// Turns true when the server drains: streams end cleanly, new ones are refused.
    draining: watch::Receiver<bool>,
    stream_slots: Slots,
    limits: AdsLimits,
}

impl AdsServer {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        clients: Clients,
        metrics: XdsMetrics,
        draining: watch::Receiver<bool>,
        limits: AdsLimits,
    ) -> Self {
        let stream_slots =
            Slots::new(limits.streams, limit_names::MAX_ADS_STREAMS, "ADS streams", metrics.refusals.clone());
        AdsServer { snapshots, clients, metrics, draining, stream_slots, limits }
    }

    pub fn limits(&self) -> AdsLimits {
        self.limits
    }

    /// Opens a state-of-the-world ADS stream: its task runs until the client
    /// leaves or the server drains.
    pub fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Outgoing>, Status> {
        if *self.draining.borrow() {
            return Err(Status::unavailable("cloudmap-xds is shutting down; reconnect to another replica"));
        }
        let peer = request.remote_addr();
        let slot = self.stream_slots.try_take().inspect_err(|_| {
            warn!(peer = ?peer, limit = self.limits.streams, "ADS stream refused: --max-ads-streams reached");
        })?;
        let (outbox, outgoing) = outbox::channel(STREAM_QUEUE);
        let id = self.clients.connect(peer);
        let span =
            tracing::info_span!("ads_stream", stream = id, peer = ?peer, node_id = tracing::field::Empty);
        let stream = Stream {
            id,
            requests: request.into_inner(),
            responses: outbox,
            snapshots: self.snapshots.clone(),
            draining: self.draining.clone(),
            clients: self.clients.clone(),
            metrics: self.metrics.clone(),
            connection: Connection::new(),
            limits: self.limits,
            _slot: slot,
        };
        tokio::spawn(stream.run().instrument(span));
        Ok(Response::new(outgoing))
    }
}

/// What handling one request came to.
enum Handled {
    /// Whether the response (if any) was queued; `false`: the client is gone.
    Delivered(bool),
    Refused(Status),
}

/// tonic's decoder refusing a message over `max_decoding_message_size`.
fn is_too_large(status: &Status) -> bool {
    status.code() == tonic::Code::OutOfRange && status.message().contains("message length too large")
}

struct Stream {
    id: u64,
    requests: Streaming<DiscoveryRequest>,
    responses: Outbox,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    draining: watch::Receiver<bool>,
    clients: Clients,
    metrics: XdsMetrics,
    connection: Connection,
    limits: AdsLimits,
    /// Held for the stream's life: one of `--max-ads-streams`.
    _slot: OwnedSemaphorePermit,
}

enum Event {
    Drain,
    Snapshot,
    Request(Box<Result<Option<DiscoveryRequest>, Status>>),
}

/// Why a stream loop stopped.
enum End {
    ClientClosed,
    ClientError(Status),
    ClientGone,
    Draining,
    /// The client broke a limit; the stream ends with this status.
    Refused(Status),
}

impl Stream {
    async fn run(mut self) {
        self.metrics.streams.inc();
        self.metrics.connected_streams.inc();
        self.snapshots.mark_unchanged();
        let end = self.serve().await;
        match &end {
            End::ClientClosed => debug!("client half-closed; stream ends after its answers"),
            End::ClientError(status) => {
                info!(code = ?status.code(), message = status.message(), "stream ended by client error");
            }
            End::ClientGone => debug!("client went away"),
            End::Draining => info!("stream closed: draining"),
            End::Refused(status) => warn!(message = status.message(), "stream refused"),
        }
        self.metrics.connected_streams.dec();
        self.clients.disconnect(self.id);
        if let End::ClientError(status) | End::Refused(status) = end {
            // The stream ends with that error, not OK: a request that could not be read
            // (malformed, too large) or broke a limit. Behind any queued responses.
            self.responses.close_with(status);
        }
    }

    async fn serve(&mut self) -> End {
        // A client that half-closed (a one-shot grpcurl query) still gets the answers it
        // asked for, including those withheld until the first complete sync.
        let mut client_closed = false;
        loop {
            if client_closed && !self.connection.awaiting_sync() {
                return End::ClientClosed;
            }
            let event = tokio::select! {
                biased;
                _ = self.draining.wait_for(|d| *d) => Event::Drain,
                changed = self.snapshots.changed() => match changed {
                    Ok(()) => Event::Snapshot,
                    Err(_) => Event::Drain,
                },
                message = self.requests.message(), if !client_closed => Event::Request(Box::new(message)),
            };
            let delivered = match event {
                Event::Drain => return End::Draining,
                Event::Snapshot => self.push_snapshot().await,
                Event::Request(message) => match *message {
                    Ok(Some(request)) => match self.handle(request).await {
                        Handled::Delivered(delivered) => delivered,
                        Handled::Refused(status) => return End::Refused(status),
                    },
                    Ok(None) => {
                        client_closed = true;
                        true
                    }
                    Err(status) if is_too_large(&status) => {
                        self.refused(limit_names::MAX_REQUEST_SIZE);
                        return End::Refused(Status::resource_exhausted(format!(
                            "request larger than --max-request-size ({} bytes): {}",
                            self.limits.request_size,
                            status.message()
                        )));
                    }
                    Err(status) => return End::ClientError(status),
                },
            };
            if !delivered {
                return End::ClientGone;
            }
            self.clients.update(self.id, &self.connection);
        }
    }

    async fn push_snapshot(&mut self) -> bool {
        let snapshot = self.snapshots.borrow_and_update().clone();
        for response in self.connection.handle_snapshot(&snapshot) {
            self.metrics.push_latency.observe(snapshot.built_at.elapsed().unwrap_or_default().as_secs_f64());
            if !self.send(response).await {
                return false;
            }
        }
        true
    }

    fn refused(&self, limit: &'static str) {
        self.metrics.refusals.get_or_create(&LimitLabels { limit }).inc();
    }

    async fn handle(&mut self, request: DiscoveryRequest) -> Handled {
        let snapshot = self.snapshots.borrow().clone();
        let had_node = self.connection.node_id().is_some();
        let outcome = self.connection.handle_request(&request, &snapshot);
        if !had_node && let Some(node_id) = self.connection.node_id() {
            tracing::Span::current().record("node_id", node_id);
            info!("ADS stream opened");
        }
        let labels = TypeLabels { r#type: type_label(&request.type_url) };
        match &outcome.kind {
            RequestKind::Ack => {
                self.metrics.acks.get_or_create(&labels).inc();
                debug!(type_url = %request.type_url, version = %request.version_info, "ACK");
            }
            RequestKind::Nack { error, repeated: false } => {
                self.metrics.nacks.get_or_create(&labels).inc();
                warn!(type_url = %request.type_url, nonce = %request.response_nonce, error = %error, "NACK: client rejected our response");
            }
            RequestKind::Nack { error, repeated: true } => {
                self.metrics.nacks.get_or_create(&labels).inc();
                debug!(type_url = %request.type_url, nonce = %request.response_nonce, error = %error, "NACK repeated");
            }
            RequestKind::TooManyTypes => {
                self.refused(limit_names::MAX_TYPE_URLS_PER_STREAM);
                return Handled::Refused(Status::resource_exhausted(format!(
                    "more than {MAX_TYPE_URLS_PER_STREAM} type URLs on one stream (istiod asks for 16)"
                )));
            }
            RequestKind::Deferred => {
                info!(type_url = %request.type_url, "ServiceEntries withheld until the first complete sync")
            }
            RequestKind::Invalid => warn!("request without type_url ignored"),
            RequestKind::Initial | RequestKind::Stale => {}
        }
        Handled::Delivered(match outcome.response {
            Some(response) => self.send(response).await,
            None => true,
        })
    }

    async fn send(&mut self, response: DiscoveryResponse) -> bool {
        let size = response.encoded_len();
        let labels = TypeLabels { r#type: type_label(&response.type_url) };
        if size > self.limits.response_size {
            // Not sent: the client keeps what it has, and the next snapshot that fits flows again.
            self.refused(limit_names::MAX_RESPONSE_SIZE);
            error!(
                type_url = %response.type_url,
                version = %response.version_info,
                bytes = size,
                limit = self.limits.response_size,
                "response larger than --max-response-size not sent; the client keeps its previous state"
            );
            return true;
        }
        self.metrics.responses.get_or_create(&labels).inc();
        self.metrics.sent_bytes.get_or_create(&labels).inc_by(size as u64);
        debug!(type_url = %response.type_url, version = %response.version_info, nonce = %response.nonce, resources = response.resources.len(), "push");
        // A client that stopped reading must not hold up a drain.
        let queued = tokio::select! {
            queued = self.responses.send(response) => queued,
            _ = self.draining.wait_for(|d| *d) => return false,
        };
        match queued {
            Ok(Queued::Added) => true,
            Ok(Queued::Replaced) => {
                self.metrics.superseded.get_or_create(&labels).inc();
                true
            }
            Err(outbox::Closed) => false,
        }
    }
}
