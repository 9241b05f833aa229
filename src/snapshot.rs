//! Immutable, versioned snapshots of everything served, encoded once.
//!
//! Each ServiceEntry is encoded into its MCP `Resource` envelope exactly once;
//! every ADS stream copies those bytes and never re-serialises, and the decoded
//! ServiceEntry is not kept (the debug views decode it on demand). Snapshots
//! travel on a `tokio::sync::watch`, so a burst of changes reaches a slow stream
//! as its latest state, and an unchanged snapshot wakes nobody.
//!
//! - `builder`: the incremental [`Builder`] production uses (one changed service
//!   costs one translation, one encode and an update of the sorted list);
//! - `list`: the sorted resource list, shared between snapshots chunk by chunk;
//! - `publish`: the stage's loop.

mod builder;
mod list;
pub mod publish;

use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use prost::Message;
use prost::bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use xxhash_rust::xxh3::{Xxh3, xxh3_64, xxh3_64_with_seed};

pub use self::builder::Builder;
pub use self::list::ResourceList;
use crate::proto::SharedAny;
use crate::proto::istio::mcp::v1alpha1::Resource as McpResource;
use crate::proto::istio::networking::v1alpha3::ServiceEntry;
use crate::translate::{self, SettingProblem, Skipped, Translation};
use crate::wire::{Room, length_delimited_len};

/// `Any` type of every resource in a ServiceEntry response.
pub const MCP_RESOURCE_TYPE_URL: &str = "type.googleapis.com/istio.mcp.v1alpha1.Resource";
/// `Any` type of the body: the v1alpha3 message serves every Istio version.
pub const SERVICE_ENTRY_BODY_TYPE_URL: &str = "type.googleapis.com/istio.networking.v1alpha3.ServiceEntry";
/// Length in hex digits of resource and snapshot versions (64 bits).
const VERSION_HEX_LEN: usize = 16;

/// One ServiceEntry as served.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// `<publish-namespace>/<name>`, the MCP name.
    pub name: String,
    /// Content hash of name, create time and spec.
    pub version: String,
    pub create_time: SystemTime,
    /// How many endpoints the ServiceEntry lists.
    pub endpoints: usize,
    /// `Any{istio.mcp.v1alpha1.Resource}`, ready to go on the wire.
    pub encoded: SharedAny,
    /// The Cloud Map (namespace, service) it came from; empty when borrowed from a peer.
    pub origin: (String, String),
    /// Hash of name and version; snapshot versions add these up.
    digest: u128,
}

impl Resource {
    /// The ServiceEntry, decoded from the encoded bytes (for the debug views;
    /// the snapshot keeps only the bytes).
    pub fn spec(&self) -> Result<ServiceEntry, prost::DecodeError> {
        let resource = McpResource::decode(&self.encoded.value[..])?;
        let body = resource.body.unwrap_or_default();
        ServiceEntry::decode(&body.value[..])
    }
}

/// Every resource of `snapshot` with its decoded ServiceEntry, turned into a view by `view`
/// (the debug views). The snapshot keeps only encoded bytes and decoding them all is CPU
/// work, so it runs on the blocking pool, off the workers that serve streams.
pub async fn decode_all<T: Send + 'static>(
    snapshot: Arc<Snapshot>,
    view: impl Fn(&Resource, Result<ServiceEntry, prost::DecodeError>) -> T + Send + 'static,
) -> Result<Vec<T>, tokio::task::JoinError> {
    tokio::task::spawn_blocking(move || snapshot.resources.iter().map(|r| view(r, r.spec())).collect()).await
}

/// Where a served set came from when this replica did not build it: a peer
/// replica's full set, taken over ADS before this replica's own first complete
/// sync (`--peer-bootstrap`, see `bootstrap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Borrowed {
    /// The peer's gRPC address, as dialled.
    pub peer: String,
    /// The peer's instance id (its `GetStatus`).
    pub peer_instance: String,
    /// Whether the peer itself served a borrowed set at the time.
    pub peer_borrowed: bool,
    /// When this set was taken (the peer's latest push).
    pub at: SystemTime,
}

/// Why an encoded resource received from a peer cannot be served as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("resource type {0:?} is not {MCP_RESOURCE_TYPE_URL}")]
    ResourceType(String),
    #[error("undecodable MCP resource: {0}")]
    Resource(String),
    #[error("MCP resource without {0}")]
    Missing(&'static str),
    #[error("{name}: body type {type_url:?} is not {SERVICE_ENTRY_BODY_TYPE_URL}")]
    BodyType { name: String, type_url: String },
    #[error("{name}: undecodable ServiceEntry: {message}")]
    Body { name: String, message: String },
    #[error("{name}: create time out of range")]
    CreateTime { name: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Hash of every resource name and version; empty before the first sync.
    pub version: String,
    /// False until there is a complete set to serve (the source's first full load,
    /// or a set borrowed from a peer): ServiceEntries are withheld until then, so
    /// istiod keeps what it had instead of deleting it all.
    pub synced: bool,
    /// Set while the set served is a peer's, not built here.
    pub borrowed: Option<Arc<Borrowed>>,
    /// Sorted by name; shared with the next snapshot where unchanged.
    pub resources: ResourceList,
    pub endpoints: usize,
    /// Sorted; shared with the next snapshot when unchanged.
    pub skipped: Arc<[Skipped]>,
    pub skipped_labels: usize,
    /// Service attributes of ours that could not be used (the setting fell back). Sorted.
    pub invalid_settings: Arc<[SettingProblem]>,
    pub built_at: SystemTime,
    /// Bytes the resources take as the repeated `resources` field of a
    /// `DiscoveryResponse` (keys and lengths included), so a response knows its
    /// size without walking them.
    resources_field_len: usize,
    /// Total of the resources' `encoded.value` lengths.
    encoded_len: usize,
    /// The `resources` field encoded, while some stream is sending it.
    resources_field: ResourcesField,
}

/// What a snapshot's figures add up from, maintained as resources come and go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    /// Wrapping sum of the resources' digests: independent of order, and updated
    /// by one addition and one subtraction when a resource changes.
    digest: u128,
    endpoints: usize,
    resources_field_len: usize,
    encoded_len: usize,
}

impl Totals {
    fn add(&mut self, r: &Resource) {
        self.digest = self.digest.wrapping_add(r.digest);
        self.endpoints += r.endpoints;
        self.resources_field_len += framed_len(&r.encoded);
        self.encoded_len += r.encoded.value.len();
    }

    fn remove(&mut self, r: &Resource) {
        self.digest = self.digest.wrapping_sub(r.digest);
        self.endpoints -= r.endpoints;
        self.resources_field_len -= framed_len(&r.encoded);
        self.encoded_len -= r.encoded.value.len();
    }

    /// The snapshot version: a hash of the sum, so that it looks like every other
    /// version. It depends on the resources' names and versions alone.
    fn version(&self) -> String {
        hex_prefix(&Sha256::digest(self.digest.to_le_bytes()))
    }
}

impl Snapshot {
    /// The snapshot before any source has loaded.
    pub fn unsynced() -> Self {
        Snapshot {
            version: String::new(),
            synced: false,
            borrowed: None,
            resources: ResourceList::default(),
            endpoints: 0,
            skipped: Arc::from([]),
            skipped_labels: 0,
            invalid_settings: Arc::from([]),
            built_at: SystemTime::now(),
            resources_field_len: 0,
            encoded_len: 0,
            resources_field: ResourcesField::default(),
        }
    }

    /// Encodes a translation. Deterministic: the same translation gives the same
    /// bytes and versions, and the same as [`Builder`] gives for the registry.
    pub fn build(translation: Translation) -> Self {
        let mut skipped = translation.skipped;
        let mut scratch = Vec::new();
        let resources: Vec<Arc<Resource>> =
            translation.entries.into_iter().map(|e| Arc::new(encode_entry(e, &mut scratch))).collect();
        let resources = translate::first_per_name(resources, |r| (&r.name, &r.origin), &mut skipped);
        let mut invalid_settings = translation.invalid_settings;
        skipped.sort();
        invalid_settings.sort();
        let mut totals = Totals::default();
        resources.iter().for_each(|r| totals.add(r));
        Self::assemble(
            ResourceList::from_sorted(resources),
            totals,
            skipped.into(),
            translation.skipped_labels.len(),
            invalid_settings.into(),
        )
    }

    fn assemble(
        resources: ResourceList,
        totals: Totals,
        skipped: Arc<[Skipped]>,
        skipped_labels: usize,
        invalid_settings: Arc<[SettingProblem]>,
    ) -> Self {
        Snapshot {
            version: totals.version(),
            synced: true,
            borrowed: None,
            resources,
            endpoints: totals.endpoints,
            skipped,
            skipped_labels,
            invalid_settings,
            built_at: SystemTime::now(),
            resources_field_len: totals.resources_field_len,
            encoded_len: totals.encoded_len,
            resources_field: ResourcesField::default(),
        }
    }

    /// A peer's full set, served as received: the same encoded bytes, hence the same
    /// names, versions and create times, and the same snapshot version as the peer's
    /// (it is computed from those alone). Resources are sorted by name; a repeated
    /// name keeps its first occurrence.
    pub fn borrowed(mut resources: Vec<Resource>, borrowed: Borrowed) -> Self {
        resources.sort_by(|a, b| a.name.cmp(&b.name));
        resources.dedup_by(|later, first| later.name == first.name);
        let resources: Vec<Arc<Resource>> = resources.into_iter().map(Arc::new).collect();
        let mut totals = Totals::default();
        resources.iter().for_each(|r| totals.add(r));
        Snapshot {
            borrowed: Some(Arc::new(borrowed)),
            ..Self::assemble(ResourceList::from_sorted(resources), totals, Arc::from([]), 0, Arc::from([]))
        }
    }

    /// Serves a complete set built here (not borrowed).
    pub fn is_own(&self) -> bool {
        self.synced && self.borrowed.is_none()
    }

    /// The resources as they go into a `DiscoveryResponse`.
    pub fn encoded_resources(&self) -> Vec<SharedAny> {
        self.resources.iter().map(|r| r.encoded.clone()).collect()
    }

    /// See the field: the resources' share of a response's encoded length.
    pub fn resources_field_len(&self) -> usize {
        self.resources_field_len
    }

    /// Total encoded bytes of one ServiceEntry response's resources.
    pub fn encoded_len(&self) -> usize {
        self.encoded_len
    }

    /// The resources encoded as the repeated `resources` field of a `DiscoveryResponse`
    /// ([`resources_field_len`](Self::resources_field_len) bytes), in one buffer that every
    /// stream sending this snapshot shares: a push to N streams encodes the set once, and each
    /// stream hands the same bytes to its connection. The buffer lives while some stream still
    /// sends it and is encoded again if a stream needs it later, so it costs no memory between
    /// pushes.
    pub fn resources_field(&self) -> Bytes {
        self.resources_field.get_or_encode(|| {
            let mut field = Vec::with_capacity(self.resources_field_len);
            for r in self.resources.iter() {
                prost::encoding::message::encode(RESOURCES_FIELD, &r.encoded, &mut field);
            }
            field
        })
    }
}

/// `DiscoveryResponse.resources`.
const RESOURCES_FIELD: u32 = 2;

/// A snapshot's encoded `resources` field, held by the streams sending it and only
/// weakly here. Copies and comparisons of a snapshot ignore it (it is derived).
#[derive(Default)]
struct ResourcesField(Mutex<Weak<Vec<u8>>>);

/// One stream's handle on a shared [`ResourcesField`] buffer, as `Bytes`.
struct SharedField(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedField {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl ResourcesField {
    fn get_or_encode(&self, encode: impl FnOnce() -> Vec<u8>) -> Bytes {
        // Encoding under the lock makes the streams of one push wait for the first one's
        // encoding rather than each encode its own copy. A panic cannot leave the Weak torn.
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let field = cached.upgrade().unwrap_or_else(|| {
            let field = Arc::new(encode());
            *cached = Arc::downgrade(&field);
            field
        });
        drop(cached);
        Bytes::from_owner(SharedField(field))
    }
}

impl Clone for ResourcesField {
    fn clone(&self) -> Self {
        ResourcesField::default()
    }
}

impl PartialEq for ResourcesField {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for ResourcesField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.0.lock().map_or(0, |w| w.strong_count());
        write!(f, "ResourcesField(held by {held})")
    }
}

/// One resource inside `DiscoveryResponse.resources` (field 2: a one-byte key), length prefix included.
fn framed_len(any: &SharedAny) -> usize {
    length_delimited_len(RESOURCES_FIELD, any.encoded_len())
}

/// A resource's share of the snapshot version: a hash of its name and version
/// alone, so that a set received from a peer (names and versions as sent) has
/// the version the peer gave it.
fn version_digest(name: &str, version: &str) -> u128 {
    let mut hasher = Xxh3::new();
    hasher.update(name.as_bytes());
    hasher.update(&[0]);
    hasher.update(version.as_bytes());
    hasher.digest128()
}

/// Reads back one `Any{istio.mcp.v1alpha1.Resource}` as sent by a replica (the
/// inverse of [`encode`]), keeping its bytes: served again, it is the very same resource.
pub fn decode_resource(encoded: SharedAny) -> Result<Resource, DecodeError> {
    if encoded.type_url != MCP_RESOURCE_TYPE_URL {
        return Err(DecodeError::ResourceType(encoded.type_url));
    }
    let resource =
        McpResource::decode(encoded.value.clone()).map_err(|e| DecodeError::Resource(e.to_string()))?;
    let metadata = resource.metadata.ok_or(DecodeError::Missing("metadata"))?;
    let name = Some(metadata.name).filter(|n| !n.is_empty()).ok_or(DecodeError::Missing("a name"))?;
    let version =
        Some(metadata.version).filter(|v| !v.is_empty()).ok_or(DecodeError::Missing("a version"))?;
    let created = metadata.create_time.ok_or(DecodeError::Missing("a create time"))?;
    let create_time =
        SystemTime::try_from(created).map_err(|_| DecodeError::CreateTime { name: name.clone() })?;
    let body = resource.body.ok_or(DecodeError::Missing("a body"))?;
    if body.type_url != SERVICE_ENTRY_BODY_TYPE_URL {
        return Err(DecodeError::BodyType { name, type_url: body.type_url });
    }
    let spec = ServiceEntry::decode(body.value)
        .map_err(|e| DecodeError::Body { name: name.clone(), message: e.to_string() })?;
    Ok(Resource {
        digest: version_digest(&name, &version),
        name,
        version,
        create_time,
        endpoints: spec.endpoints.len(),
        encoded,
        origin: (String::new(), String::new()),
    })
}

fn encode_entry(entry: translate::Entry, scratch: &mut Vec<u8>) -> Resource {
    let endpoints = entry.spec.endpoints.len();
    let name = format!("{}/{}", entry.namespace, entry.name);
    let spec = &entry.spec;
    let write_spec = |buf: &mut Vec<u8>| {
        buf.clear();
        spec.encode_raw(buf);
        buf.len()
    };
    encode(name, entry.create_time, write_spec, endpoints, entry.origin, scratch)
}

/// What the builder serves: the ServiceEntry is written by `translate`, then framed.
/// `scratch` is reused from service to service (see [`encode`]).
fn encode_translated(
    mut entry: translate::EncodedEntry<'_>,
    origin: (String, String),
    scratch: &mut Vec<u8>,
) -> Resource {
    // Moved out, not borrowed: the resource keeps the name, and the closure below borrows the entry.
    let name = std::mem::take(&mut entry.mcp_name);
    encode(name, entry.create_time, |buf| entry.write_spec(buf), entry.endpoints, origin, scratch)
}

/// `McpResource.metadata`, `McpResource.body`; `Metadata.name`, `.create_time`,
/// `.version` (its maps are never set); `Any.type_url`, `Any.value`.
const METADATA_FIELD: u32 = 1;
const BODY_FIELD: u32 = 2;
const NAME_FIELD: u32 = 1;
const CREATE_TIME_FIELD: u32 = 2;
const VERSION_FIELD: u32 = 3;
const TYPE_URL_FIELD: u32 = 1;
const VALUE_FIELD: u32 = 2;

/// The MCP envelope around the ServiceEntry that `write_spec` writes at the start
/// of `scratch` (returning its length). The ServiceEntry is written first, into
/// `scratch` (a buffer the caller keeps from one service to the next, so it is
/// allocated once per build), where its length and its version (a hash of it)
/// come from; the envelope is written after it there, and both are copied, envelope
/// first, into one buffer of the exact size. Sizing the ServiceEntry before writing
/// it walked every endpoint twice, which cost more than this one copy.
fn encode(
    name: String,
    create_time: SystemTime,
    write_spec: impl FnOnce(&mut Vec<u8>) -> usize,
    endpoints: usize,
    origin: (String, String),
    scratch: &mut Vec<u8>,
) -> Resource {
    use prost::encoding::{WireType, message};
    let spec_len = write_spec(scratch);
    let timestamp = prost_types::Timestamp::from(create_time);
    let version = content_version(&name, &timestamp, &scratch[..spec_len]);
    // `Metadata` written field by field: a message would need copies of the name and version.
    let metadata_len = length_delimited_len(NAME_FIELD, name.len())
        + message::encoded_len(CREATE_TIME_FIELD, &timestamp)
        + length_delimited_len(VERSION_FIELD, version.len());
    let body_len = length_delimited_len(TYPE_URL_FIELD, SERVICE_ENTRY_BODY_TYPE_URL.len())
        + length_delimited_len(VALUE_FIELD, spec_len);
    let total =
        length_delimited_len(METADATA_FIELD, metadata_len) + length_delimited_len(BODY_FIELD, body_len);
    let envelope_len = Room::of(scratch, spec_len, total - spec_len).write(|out| {
        out.key(METADATA_FIELD, WireType::LengthDelimited);
        out.varint(metadata_len as u64);
        // The name is never empty (it holds the publish namespace and a `/`), so proto3 writes it.
        out.repeated_string(NAME_FIELD, &name);
        out.message(CREATE_TIME_FIELD, &timestamp);
        out.repeated_string(VERSION_FIELD, &version);
        out.key(BODY_FIELD, WireType::LengthDelimited);
        out.varint(body_len as u64);
        out.repeated_string(TYPE_URL_FIELD, SERVICE_ENTRY_BODY_TYPE_URL);
        // The ServiceEntry's own bytes follow this key and length.
        out.key(VALUE_FIELD, WireType::LengthDelimited);
        out.varint(spec_len as u64);
    });
    debug_assert_eq!(envelope_len + spec_len, total, "the envelope's size is the size written");
    let mut buf = Vec::with_capacity(total);
    buf.extend_from_slice(&scratch[spec_len..spec_len + envelope_len]);
    buf.extend_from_slice(&scratch[..spec_len]);
    Resource {
        digest: version_digest(&name, &version),
        name,
        version,
        create_time,
        endpoints,
        encoded: SharedAny { type_url: MCP_RESOURCE_TYPE_URL.into(), value: buf.into() },
        origin,
    }
}

/// A resource's version: a hash of its name, create time and ServiceEntry bytes.
/// XXH3, not a cryptographic hash: it only tells versions apart (nobody chooses
/// the input to collide), and SHA-256 over every body was a twelfth of a full build.
/// The name and time seed the hash of the bytes: each input hashed in one call,
/// where the streaming hasher copied them through a buffer of its own.
fn content_version(name: &str, created: &prost_types::Timestamp, spec: &[u8]) -> String {
    let mut time = [0u8; 12];
    time[..8].copy_from_slice(&created.seconds.to_le_bytes());
    time[8..].copy_from_slice(&created.nanos.to_le_bytes());
    let seed = xxh3_64_with_seed(&time, xxh3_64(name.as_bytes()));
    hex_prefix(&xxh3_64_with_seed(spec, seed).to_le_bytes())
}

fn hex_prefix(digest: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(VERSION_HEX_LEN);
    for b in digest.iter().take(VERSION_HEX_LEN / 2) {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

/// The single writer of snapshots.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: watch::Sender<Arc<Snapshot>>,
}

pub fn channel() -> (Publisher, watch::Receiver<Arc<Snapshot>>) {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::unsynced()));
    (Publisher { tx }, rx)
}

impl Publisher {
    /// Publishes `next`, built here from a complete registry, unless it serves exactly
    /// what the current one serves; returns whether streams were woken. It replaces a
    /// borrowed set whatever its content (streams then send nothing when the version
    /// is the same: the set is the same).
    pub fn publish(&self, next: Snapshot) -> bool {
        self.tx.send_if_modified(|current| {
            if current.borrowed.is_none() && current.synced == next.synced && current.version == next.version
            {
                return false;
            }
            *current = Arc::new(next);
            true
        })
    }

    /// Publishes `next`, built here from a partial registry (`--initial-sync-timeout`),
    /// as [`Publisher::publish`] does, except over a borrowed set, which is complete:
    /// that stays until a complete registry replaces it.
    pub fn publish_partial(&self, next: Snapshot) -> bool {
        self.tx.send_if_modified(|current| {
            if current.borrowed.is_some()
                || (current.synced == next.synced && current.version == next.version)
            {
                return false;
            }
            *current = Arc::new(next);
            true
        })
    }

    /// Publishes a set borrowed from a peer, only while nothing built here is served
    /// (own sets always win); returns whether streams were woken. A set of the same
    /// version as the borrowed one served wakes nobody (only where it came from is
    /// updated).
    pub fn publish_borrowed(&self, next: Snapshot) -> bool {
        debug_assert!(next.borrowed.is_some(), "publish_borrowed takes a borrowed snapshot");
        self.tx.send_if_modified(|current| {
            if current.is_own() {
                return false;
            }
            let same = current.borrowed.is_some() && current.version == next.version;
            *current = Arc::new(next);
            !same
        })
    }

    /// What is served now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{Health, HealthFilter, Instance, Registry, Service};
    use crate::translate::{Options, translate};

    fn registry(order: &[usize]) -> Registry {
        let services = (0..4)
            .map(|n| Service {
                namespace: "ns".into(),
                name: format!("svc-{n}"),
                created: SystemTime::UNIX_EPOCH + Duration::from_secs(n as u64),
                attributes: Default::default(),
                instances: (0..3)
                    .map(|i| Instance {
                        id: format!("i-{i}"),
                        health: Health::Healthy,
                        attributes: [
                            ("AWS_INSTANCE_IPV4".to_string(), format!("10.0.{n}.{i}")),
                            ("AWS_INSTANCE_PORT".to_string(), format!("{}", 8000 + i)),
                            ("zone".to_string(), "a".to_string()),
                            ("team".to_string(), "b".to_string()),
                        ]
                        .into(),
                    })
                    .collect(),
            })
            .collect::<Vec<_>>();
        Registry::new(order.iter().map(|&i| services[i].clone()).collect())
    }

    fn build(registry: &Registry) -> Snapshot {
        let options = Options::new("istio-system", HealthFilter::All);
        Snapshot::build(translate(registry, &options))
    }

    #[test]
    fn shuffled_input_gives_identical_bytes_and_versions() {
        let a = build(&registry(&[0, 1, 2, 3]));
        let mut shuffled = registry(&[3, 1, 0, 2]);
        for s in &mut shuffled.services {
            Arc::make_mut(s).instances.reverse();
        }
        let b = build(&shuffled);
        assert_eq!(a.version, b.version);
        assert_eq!(a.encoded_resources(), b.encoded_resources());
        assert_eq!(a.version.len(), 16);
    }

    #[test]
    fn a_change_moves_only_the_changed_resource_version() {
        let a = build(&registry(&[0, 1, 2, 3]));
        let mut changed = registry(&[0, 1, 2, 3]);
        Arc::make_mut(&mut changed.services[2]).instances.pop();
        let b = build(&changed);
        assert_ne!(a.version, b.version);
        let moved: Vec<_> = a
            .resources
            .iter()
            .zip(&b.resources)
            .filter(|(x, y)| x.version != y.version)
            .map(|(x, _)| &x.name)
            .collect();
        assert_eq!(moved, ["istio-system/cloudmap-svc-2.ns"]);
    }

    #[test]
    fn envelope_carries_name_version_create_time_and_v1alpha3_body() {
        let snap = build(&registry(&[1]));
        let r = &snap.resources[0];
        assert_eq!(r.encoded.type_url, MCP_RESOURCE_TYPE_URL);
        let decoded = McpResource::decode(&r.encoded.value[..]).unwrap();
        // Framed by hand, exactly as prost frames the message.
        assert_eq!(decoded.encode_to_vec(), r.encoded.value);
        let meta = decoded.metadata.unwrap();
        assert_eq!(meta.name, "istio-system/cloudmap-svc-1.ns");
        assert_eq!(meta.version, r.version);
        assert_eq!(meta.create_time.unwrap(), prost_types::Timestamp { seconds: 1, nanos: 0 });
        let body = decoded.body.unwrap();
        assert_eq!(body.type_url, SERVICE_ENTRY_BODY_TYPE_URL);
        assert_eq!(ServiceEntry::decode(&body.value[..]).unwrap(), r.spec().unwrap());
    }

    #[test]
    fn the_incremental_builder_matches_a_full_build() {
        let options = Options::new("istio-system", HealthFilter::All);
        let mut builder = Builder::new(options);
        let first = builder.build(&registry(&[0, 1, 2, 3]));
        assert_eq!(first.version, build(&registry(&[0, 1, 2, 3])).version);
        let mut changed = registry(&[3, 2, 1]);
        Arc::make_mut(&mut changed.services[1]).instances.pop();
        let second = builder.build(&changed);
        let full = build(&changed);
        assert_eq!(second.version, full.version);
        assert_eq!(second.encoded_resources(), full.encoded_resources());
        // Unchanged services share the previous snapshot's encoding.
        let reused = first.resources.iter().find(|r| r.name.ends_with("svc-1.ns")).unwrap();
        assert!(second.resources.iter().any(|r| Arc::ptr_eq(r, reused)));
    }

    #[test]
    fn the_builder_resolves_name_clashes_the_same_way_every_time() {
        let options = Options::new("istio-system", HealthFilter::All);
        let mut clash = registry(&[0, 1]);
        let first = Arc::make_mut(&mut clash.services[0]);
        (first.namespace, first.name) = ("corp.local".into(), "api.prod".into());
        let second = Arc::make_mut(&mut clash.services[1]);
        (second.namespace, second.name) = ("prod.corp.local".into(), "api".into());
        let mut reversed = clash.clone();
        reversed.services.reverse();
        let mut builder = Builder::new(options.clone());
        let first = builder.build(&clash);
        for _ in 0..5 {
            let again = Builder::new(options.clone()).build(&reversed);
            assert_eq!(again.version, first.version);
            assert_eq!(builder.build(&reversed).version, first.version);
        }
        assert_eq!(first.resources.len(), 1);
        assert_eq!(first.resources[0].origin.0, "corp.local");
        assert_eq!(first.skipped.len(), 1);
        assert_eq!(first.skipped[0].reason.kind(), "duplicate_name");
    }

    #[test]
    fn publishing_an_identical_snapshot_wakes_nobody() {
        let (publisher, mut rx) = channel();
        assert!(publisher.publish(build(&registry(&[0, 1]))));
        rx.borrow_and_update();
        assert!(!publisher.publish(build(&registry(&[1, 0]))));
        assert!(!rx.has_changed().unwrap());
        assert!(publisher.publish(build(&registry(&[0]))));
        assert!(rx.has_changed().unwrap());
    }
}
