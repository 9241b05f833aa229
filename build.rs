//! Compiles the vendored protos with the pure-Rust `protox` (no system protoc)
//! and keeps the descriptor set for gRPC reflection.

use std::{env, fs, path::PathBuf};

const PROTO_ROOT: &str = "proto";
const PROTOS: &[&str] = &[
    "envoy/service/discovery/v3/discovery.proto",
    "istio/mcp/v1alpha1/resource.proto",
    "istio/networking/v1alpha3/service_entry.proto",
    "cloudmap_xds/debug/v1/debug.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let fds = protox::compile(PROTOS, [PROTO_ROOT])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    // `compile_fds` ignores `file_descriptor_set_path`, so the set is written here.
    fs::write(out_dir.join("file_descriptor_set.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Deterministic map order makes identical specs encode to identical bytes.
        .btree_map(".")
        // `Any` with a reference-counted payload: every stream shares the snapshot's bytes.
        .extern_path(".google.protobuf.Any", "crate::proto::SharedAny")
        .include_file("protos.rs")
        .compile_fds(fds)?;
    Ok(())
}
