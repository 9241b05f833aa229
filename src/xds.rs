//! Istio's MCP-over-xDS: the ADS server istiod's `xds://` config source dials.
//!
//! Each stream is a synchronous [`connection::Connection`] state machine (what was
//! sent, ACKed and NACKed per type URL) driven by a thin async loop in [`server`];
//! responses borrow the snapshot's encoded resources ([`response`]), wait in
//! a per-stream [`outbox`] where a newer full set replaces an unsent one, and go
//! out through a gRPC body ([`body`]) that sends the resources every stream
//! shares without copying them.

pub mod body;
pub mod clients;
pub mod connection;
pub mod outbox;
pub mod response;
pub mod server;
pub mod service;

pub use clients::{ClientInfo, Clients};
pub use connection::Connection;
pub use server::{AdsLimits, AdsServer};
pub use service::AdsService;

/// The ServiceEntry type URLs istiod asks for: `v1` from Istio 1.24,
/// `v1alpha3` before; `v1beta1` is an alias served too.
pub const SERVICE_ENTRY_TYPE_URLS: [&str; 3] = [
    "networking.istio.io/v1/ServiceEntry",
    "networking.istio.io/v1beta1/ServiceEntry",
    "networking.istio.io/v1alpha3/ServiceEntry",
];

pub fn is_service_entry(type_url: &str) -> bool {
    SERVICE_ENTRY_TYPE_URLS.contains(&type_url)
}

/// A bounded metric label for a type URL.
pub fn type_label(type_url: &str) -> &'static str {
    if is_service_entry(type_url) { "ServiceEntry" } else { "other" }
}
