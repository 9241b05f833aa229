//! The `DiscoveryResponse` as this server sends it.
//!
//! The generated message holds its resources as a `Vec<Any>`, so every push to
//! every stream would build a vector of N handles. Here the ServiceEntry
//! resources are the snapshot itself: each resource was encoded once when the
//! snapshot was built, and a response only borrows the snapshot, so a push costs
//! one reference count plus the copy into the stream's send buffer. Only the
//! envelope (version, type URL, nonce) is per stream.
//!
//! Same field numbers and wire format as `envoy.service.discovery.v3.DiscoveryResponse`;
//! clients decode it with the generated type.

use std::fmt;
use std::sync::Arc;

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType, message, skip_field, string};

use crate::proto::SharedAny;
use crate::proto::envoy::service::discovery::v3::ControlPlane;
use crate::snapshot::Snapshot;

const VERSION_INFO: u32 = 1;
const RESOURCES: u32 = 2;
const TYPE_URL: u32 = 4;
const NONCE: u32 = 5;
const CONTROL_PLANE: u32 = 6;

/// A full-state response for one type on one stream. Encode-only: clients
/// decode the same bytes as the generated `DiscoveryResponse`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiscoveryResponse {
    pub version_info: String,
    pub resources: Resources,
    pub type_url: String,
    pub nonce: String,
    pub control_plane: Option<ControlPlane>,
}

/// The resources of a response: none, or every ServiceEntry of a snapshot.
#[derive(Clone, Default)]
pub struct Resources(Option<Arc<Snapshot>>);

impl Resources {
    pub fn none() -> Self {
        Resources(None)
    }

    /// Every ServiceEntry of `snapshot`, shared, not copied.
    pub fn of(snapshot: Arc<Snapshot>) -> Self {
        Resources(Some(snapshot))
    }

    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.resources.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &SharedAny> {
        self.0.iter().flat_map(|s| s.resources.iter().map(|r| &r.encoded))
    }
}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(s) => write!(f, "Resources({} of snapshot {})", s.resources.len(), s.version),
            None => f.write_str("Resources(none)"),
        }
    }
}

impl PartialEq for Resources {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl PartialEq<Vec<SharedAny>> for Resources {
    fn eq(&self, other: &Vec<SharedAny>) -> bool {
        self.iter().eq(other.iter())
    }
}

impl DiscoveryResponse {
    /// The fields before `resources`, encoded into `buf`.
    pub fn encode_head(&self, buf: &mut impl BufMut) {
        if !self.version_info.is_empty() {
            string::encode(VERSION_INFO, &self.version_info, buf);
        }
    }

    /// The `resources` field as the snapshot's shared encoding (see
    /// [`Snapshot::resources_field`]); `None` when there are none.
    pub fn resources_field(&self) -> Option<Bytes> {
        self.resources.0.as_ref().filter(|s| !s.resources.is_empty()).map(|s| s.resources_field())
    }

    /// The fields after `resources`, encoded into `buf`.
    pub fn encode_tail(&self, buf: &mut impl BufMut) {
        if !self.type_url.is_empty() {
            string::encode(TYPE_URL, &self.type_url, buf);
        }
        if !self.nonce.is_empty() {
            string::encode(NONCE, &self.nonce, buf);
        }
        if let Some(control_plane) = &self.control_plane {
            message::encode(CONTROL_PLANE, control_plane, buf);
        }
    }
}

impl prost::Message for DiscoveryResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.encode_head(buf);
        for any in self.resources.iter() {
            message::encode(RESOURCES, any, buf);
        }
        self.encode_tail(buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        match tag {
            VERSION_INFO => string::merge(wire_type, &mut self.version_info, buf, ctx),
            TYPE_URL => string::merge(wire_type, &mut self.type_url, buf, ctx),
            NONCE => string::merge(wire_type, &mut self.nonce, buf, ctx),
            CONTROL_PLANE => {
                message::merge(wire_type, self.control_plane.get_or_insert_with(Default::default), buf, ctx)
            }
            // Resources only ever come from a snapshot; decoding is for the generated type.
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let string_len = |tag, s: &String| if s.is_empty() { 0 } else { string::encoded_len(tag, s) };
        let resources = self.resources.0.as_ref().map_or(0, |s| s.resources_field_len());
        string_len(VERSION_INFO, &self.version_info)
            + resources
            + string_len(TYPE_URL, &self.type_url)
            + string_len(NONCE, &self.nonce)
            + self.control_plane.as_ref().map_or(0, |c| message::encoded_len(CONTROL_PLANE, c))
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, SystemTime};

    use prost::Message;

    use super::*;
    use crate::model::{Health, HealthFilter, Instance, Registry, Service};
    use crate::proto::envoy::service::discovery::v3::DiscoveryResponse as Generated;
    use crate::translate::{Options, translate};

    /// A snapshot of `services` one-instance services (also for the body tests).
    pub(crate) fn snapshot(services: usize) -> Arc<Snapshot> {
        let registry = Registry::new(
            (0..services)
                .map(|n| Service {
                    namespace: "ns".into(),
                    name: format!("svc-{n}"),
                    created: SystemTime::UNIX_EPOCH + Duration::from_secs(n as u64),
                    attributes: Default::default(),
                    instances: vec![Instance {
                        id: "i".into(),
                        health: Health::Healthy,
                        attributes: [("AWS_INSTANCE_IPV4".to_string(), format!("10.0.0.{n}"))].into(),
                    }],
                })
                .collect(),
        );
        let options = Options::new("istio-system", HealthFilter::All);
        Arc::new(Snapshot::build(translate(&registry, &options)))
    }

    #[test]
    fn encodes_exactly_what_the_generated_message_encodes() {
        let snapshot = snapshot(300);
        let ours = DiscoveryResponse {
            version_info: snapshot.version.clone(),
            resources: Resources::of(snapshot.clone()),
            type_url: "networking.istio.io/v1/ServiceEntry".into(),
            nonce: "7".into(),
            control_plane: Some(ControlPlane { identifier: "cloudmap-xds".into() }),
        };
        let generated = Generated {
            version_info: ours.version_info.clone(),
            resources: snapshot.encoded_resources(),
            canary: false,
            type_url: ours.type_url.clone(),
            nonce: ours.nonce.clone(),
            control_plane: ours.control_plane.clone(),
        };
        let bytes = ours.encode_to_vec();
        assert_eq!(bytes, generated.encode_to_vec());
        assert_eq!(ours.encoded_len(), bytes.len());
        assert_eq!(Generated::decode(&bytes[..]).unwrap(), generated);
        assert_eq!(ours.resources, snapshot.encoded_resources());
        assert_eq!(ours.resources.len(), 300);
    }

    #[test]
    fn an_empty_response_keeps_its_envelope() {
        let ours = DiscoveryResponse {
            version_info: "empty".into(),
            resources: Resources::none(),
            type_url: "networking.istio.io/v1/VirtualService".into(),
            nonce: "1".into(),
            control_plane: None,
        };
        let bytes = ours.encode_to_vec();
        assert_eq!(ours.encoded_len(), bytes.len());
        let decoded = Generated::decode(&bytes[..]).unwrap();
        assert!(decoded.resources.is_empty());
        assert_eq!((decoded.version_info.as_str(), decoded.nonce.as_str()), ("empty", "1"));
        let mut round_trip = DiscoveryResponse::decode(&bytes[..]).unwrap();
        assert_eq!(round_trip, ours);
        round_trip.clear();
        assert_eq!(round_trip, DiscoveryResponse::default());
    }
}
