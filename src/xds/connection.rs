//! The per-stream ADS state machine: pure, synchronous, tested without a network.
//!
//! The contract with istiod (`pkg/adsc`): a type is *initial* when nothing was
//! sent for it on this stream (istiod's first nonce is bogus, so nonces cannot
//! tell); every response carries the full set and a non-empty version and nonce;
//! a request echoing the last nonce is an ACK, or a NACK when it has
//! `error_detail`; any other request for a known type is stale and ignored.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::response::{DiscoveryResponse, Resources};
use crate::proto::envoy::service::discovery::v3::{ControlPlane, DiscoveryRequest};
use crate::snapshot::Snapshot;

/// `version_info` of types this server does not serve (always an empty list).
pub const EMPTY_TYPE_VERSION: &str = "empty";
/// Identifies this server in every response.
pub const CONTROL_PLANE_ID: &str = "cloudmap-xds";
/// Distinct type URLs one stream may ask for. istiod asks for 16 (MeshConfig and
/// 15 Pilot kinds); a client asking for more is refused rather than let grow the
/// per-stream state without bound.
pub const MAX_TYPE_URLS_PER_STREAM: usize = 64;

/// What was sent and acknowledged for one type URL on one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeState {
    pub last_version_sent: String,
    pub last_nonce_sent: String,
    pub last_version_acked: String,
    pub responses_sent: u64,
    pub acks: u64,
    pub nacks: u64,
    pub last_nack_error: Option<String>,
    /// The nonce of the last NACKed response: a response is worth one log line.
    pub last_nacked_nonce: String,
    /// Requested, but held back until the source's first complete sync.
    pub awaiting_sync: bool,
}

/// How a request was understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// First request for the type on this stream.
    Initial,
    /// Initial, but the ServiceEntry type waits for the first complete sync.
    Deferred,
    Ack,
    Nack {
        error: String,
        /// The response was NACKed before (logged once, counted always).
        repeated: bool,
    },
    /// A nonce other than the last one sent (superseded response, or a repeat).
    Stale,
    /// No type URL.
    Invalid,
    /// A new type URL beyond [`MAX_TYPE_URLS_PER_STREAM`]: the stream is refused.
    TooManyTypes,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub kind: RequestKind,
    pub response: Option<DiscoveryResponse>,
}

#[derive(Debug, Default)]
pub struct Connection {
    node_id: Option<String>,
    types: BTreeMap<String, TypeState>,
    nonces_sent: u64,
}

impl Connection {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    /// Whether a requested type still waits for the source's first complete sync.
    pub fn awaiting_sync(&self) -> bool {
        self.types.values().any(|t| t.awaiting_sync)
    }

    pub fn types(&self) -> &BTreeMap<String, TypeState> {
        &self.types
    }

    /// Handles one request against the current snapshot.
    pub fn handle_request(&mut self, request: &DiscoveryRequest, snapshot: &Arc<Snapshot>) -> Outcome {
        if let Some(node) = &request.node
            && self.node_id.is_none()
            && !node.id.is_empty()
        {
            self.node_id = Some(node.id.clone());
        }
        let type_url = request.type_url.as_str();
        if type_url.is_empty() {
            return Outcome { kind: RequestKind::Invalid, response: None };
        }
        let Some(state) = self.types.get_mut(type_url) else {
            if self.types.len() >= MAX_TYPE_URLS_PER_STREAM {
                return Outcome { kind: RequestKind::TooManyTypes, response: None };
            }
            self.types.insert(type_url.to_owned(), TypeState::default());
            return match self.respond(type_url, snapshot) {
                Some(response) => Outcome { kind: RequestKind::Initial, response: Some(response) },
                None => {
                    self.state_mut(type_url).awaiting_sync = true;
                    Outcome { kind: RequestKind::Deferred, response: None }
                }
            };
        };
        if state.awaiting_sync || request.response_nonce != state.last_nonce_sent {
            return Outcome { kind: RequestKind::Stale, response: None };
        }
        match &request.error_detail {
            Some(status) => {
                state.nacks += 1;
                let repeated = state.last_nacked_nonce == request.response_nonce;
                state.last_nacked_nonce.clone_from(&request.response_nonce);
                state.last_nack_error = Some(status.message.clone());
                Outcome {
                    kind: RequestKind::Nack { error: status.message.clone(), repeated },
                    response: None,
                }
            }
            None => {
                state.acks += 1;
                state.last_version_acked = request.version_info.clone();
                Outcome { kind: RequestKind::Ack, response: None }
            }
        }
    }

    /// Responses for every subscribed type whose content the new snapshot changes.
    pub fn handle_snapshot(&mut self, snapshot: &Arc<Snapshot>) -> Vec<DiscoveryResponse> {
        let stale: Vec<String> = self
            .types
            .iter()
            .filter(|(type_url, state)| {
                super::is_service_entry(type_url)
                    && snapshot.synced
                    && state.last_version_sent != snapshot.version
            })
            .map(|(type_url, _)| type_url.clone())
            .collect();
        stale.iter().filter_map(|type_url| self.respond(type_url, snapshot)).collect()
    }

    /// Builds the full-state response for a type; `None` while ServiceEntries are withheld.
    fn respond(&mut self, type_url: &str, snapshot: &Arc<Snapshot>) -> Option<DiscoveryResponse> {
        let (version, resources) = if super::is_service_entry(type_url) {
            if !snapshot.synced {
                return None;
            }
            (snapshot.version.clone(), Resources::of(snapshot.clone()))
        } else {
            (EMPTY_TYPE_VERSION.to_owned(), Resources::none())
        };
        self.nonces_sent += 1;
        let nonce = self.nonces_sent.to_string();
        let state = self.state_mut(type_url);
        state.last_version_sent = version.clone();
        state.last_nonce_sent = nonce.clone();
        state.responses_sent += 1;
        state.awaiting_sync = false;
        Some(DiscoveryResponse {
            version_info: version,
            resources,
            type_url: type_url.to_owned(),
            nonce,
            control_plane: Some(ControlPlane { identifier: CONTROL_PLANE_ID.into() }),
        })
    }

    fn state_mut(&mut self, type_url: &str) -> &mut TypeState {
        self.types.entry(type_url.to_owned()).or_default()
    }
}

#[cfg(test)]
mod tests;
