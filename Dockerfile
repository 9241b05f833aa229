# syntax=docker/dockerfile:1
# cloudmap-xds container image.
#   docker build -t cloudmap-xds:0.1.0 .
# The build needs no protoc (build.rs compiles proto/ with the pure-Rust protox) and no OpenSSL (rustls).

# Matches rust-toolchain.toml (channel 1.95.0); rustup adds the rustfmt/clippy components it lists.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the crate registry and target/ between builds; the binary is copied out of the cached
# target/ inside the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/cloudmap-xds /out/cloudmap-xds

# glibc + CA certificates, no shell, runs as nonroot (65532) by default.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/cloudmap-xds /usr/local/bin/cloudmap-xds
USER 65532:65532
# 15099: gRPC (ADS / MCP-over-xDS, reflection, debug, health). 15098: admin HTTP (/healthz /ready /metrics).
EXPOSE 15099 15098
ENTRYPOINT ["/usr/local/bin/cloudmap-xds"]
CMD ["serve"]
