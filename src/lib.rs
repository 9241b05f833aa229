//! cloudmap-xds: AWS Cloud Map services as Istio ServiceEntries, served to istiod
//! over Istio's MCP-over-xDS protocol.
//!
//! Pipeline (dependencies point one way): `source` → `model` → `translate` →
//! `snapshot` → `xds`; `app` wires them, `debug` and `admin` read the snapshot.

pub mod admin;
pub mod app;
pub mod bootstrap;
pub mod cli;
pub mod config;
pub mod debug;
pub mod error_text;
pub mod incoming;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod render;
pub mod snapshot;
pub mod source;
pub mod supervise;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod test_helpers;
pub mod tls;
pub mod translate;
mod wire;
pub mod xds;

pub mod proto {
    //! Code generated from the vendored protos (see `proto/README.md`).
    #![allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]
    include!(concat!(env!("OUT_DIR"), "/protos.rs"));

    /// `google.protobuf.Any` whose payload is `Bytes`, so cloning a resource into a
    /// response is a reference-count increment, not a copy. Same wire format.
    #[derive(Clone, PartialEq, Eq, Hash, ::prost::Message)]
    pub struct SharedAny {
        #[prost(string, tag = "1")]
        pub type_url: ::prost::alloc::string::String,
        #[prost(bytes = "bytes", tag = "2")]
        pub value: ::bytes::Bytes,
    }

    /// Every vendored file with its imports, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/file_descriptor_set.bin"));
}
