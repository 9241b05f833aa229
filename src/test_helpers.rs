//! Helpers for integration tests: an ADS client that behaves like istiod's
//! `pkg/adsc`, an in-process server on port 0, and condition waits with deadlines.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod ads_client;
pub mod server;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use ads_client::{AdsClient, ISTIO_PILOT_TYPES, MESH_CONFIG_TYPE, SERVICE_ENTRY_V1, service_entries};
pub use server::TestServer;

/// The seed tutorial's registry: service `getmesh-external-service` in namespace
/// `my-namespace`, one instance with `AWS_INSTANCE_IPV4=52.192.72.89` and no port.
pub const GOLDEN_REGISTRY: &str = "namespaces:
- name: my-namespace
  services:
  - name: getmesh-external-service
    created: 2024-05-01T12:00:00Z
    instances:
    - id: i-1
      attributes:
        AWS_INSTANCE_IPV4: 52.192.72.89
";

/// The MCP name of the golden ServiceEntry under the `istio-system` publish namespace.
pub const GOLDEN_NAME: &str = "istio-system/cloudmap-getmesh-external-service.my-namespace";

/// Asserts the golden ServiceEntry field by field (design.md's translation case).
pub fn assert_golden(name: &str, spec: &crate::proto::istio::networking::v1alpha3::ServiceEntry) {
    use crate::proto::istio::networking::v1alpha3::service_entry::{Location, Resolution};
    assert_eq!(name, GOLDEN_NAME);
    assert_eq!(spec.hosts, ["getmesh-external-service.my-namespace"]);
    assert_eq!(spec.addresses, ["52.192.72.89"]);
    assert_eq!(spec.resolution(), Resolution::Static);
    assert_eq!(spec.location(), Location::MeshExternal);
    let ports: Vec<_> = spec.ports.iter().map(|p| (p.name.as_str(), p.number, p.protocol.as_str())).collect();
    assert_eq!(ports, [("http", 80, "HTTP"), ("https", 443, "HTTPS")]);
    assert_eq!(spec.endpoints.len(), 1);
    assert_eq!(spec.endpoints[0].address, "52.192.72.89");
    let endpoint_ports: Vec<_> = spec.endpoints[0].ports.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(endpoint_ports, [("http", 80), ("https", 443)]);
}

/// Default deadline for a condition in tests.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`, or panics with `what` at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < until, "timed out after {deadline:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A minimal HTTP/1.1 GET, enough for the admin port and istiod's debug port.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A free loopback port (bound, then released).
///
/// Ports come from below the kernel's ephemeral range (32768-60999 on Linux): a port the
/// kernel handed out for `bind(0)` is free only until the next outgoing connection takes it
/// as its local port, which, with a dozen tests starting moto, istiod and our server at
/// once, happened between picking a port and the child binding it. Below that range only
/// explicit binds compete, and a process-wide counter keeps this process's picks apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Test binaries run one after another, but a start per process keeps reruns apart too.
    let start = (std::process::id() % u32::from(SPAN)) as u16;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (start.wrapping_add(offset) % SPAN);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
