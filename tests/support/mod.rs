//! Harnesses for real peer processes (istiod, moto_server, istio's ServiceEntry validator, the
//! Kubernetes API server) and the fault-injecting Cloud Map proxy. They need no crate internals,
//! so they live with the tests, not in the library.
//!
//! `tests/support/mod.rs` rather than `tests/support.rs`: Cargo builds every top-level file of
//! `tests/` as a test crate of its own. Each test crate uses a different subset of these
//! helpers, hence the `dead_code` allowance.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod certs;
pub mod fault_proxy;
pub mod h2_relay;
pub mod istiod;
pub mod kube;
pub mod moto;
pub mod se_validate;
pub mod xds;
