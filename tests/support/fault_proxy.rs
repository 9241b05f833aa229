//! A tiny HTTP/1.1 proxy in front of moto that counts every Cloud Map call by
//! operation and can fail chosen ones: what moto itself cannot do (it never
//! throttles, and cannot fail one service while serving the others).
//!
//! Faults are chosen two ways: [`FaultProxy::fail`] fails every call of an
//! operation (or of one service), and [`FaultProxy::inject_randomly`] gives each
//! call of an operation a seeded random chance of each fault kind. The draw for a
//! call depends only on the seed, the operation, the service and how many calls
//! of that operation for that service came before, so the faults each service
//! sees repeat with the seed however the poller's concurrent calls interleave.
//!
//! Client connections are kept alive (one upstream connection per request), which
//! moto itself never does: `benches/cloudmap.rs` measures the CPU per call of a client
//! that reuses its connections, as it does with AWS, through a proxy without faults.
//!
//! Requests are the AWS JSON 1.1 protocol: the operation is the suffix of
//! `X-Amz-Target` and the service is the `ServiceName` (Discover calls) or
//! `ServiceId` (GetServiceAttributes) of the JSON body.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The longest a [`Fault::Hang`] holds a connection the client has not closed.
pub const HANG_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// HTTP 400 `ThrottlingException` (`RequestLimitExceeded` for DiscoverInstances), as AWS throttles.
    Throttle,
    /// HTTP 400 `InvalidInput`: a plain, non-retried failure.
    Error,
    /// HTTP 400 `AccessDeniedException`, as AWS answers a call the IAM policy does not allow.
    Denied,
    /// HTTP 500 `InternalFailure` or 503 `ServiceUnavailable` (alternately), as AWS answers when it is in trouble.
    ServerError,
    /// The request is read and never answered: the connection stays open until the client
    /// gives up (its attempt timeout), at most [`HANG_LIMIT`].
    Hang,
    /// moto's answer with its full `Content-Length` but only the first half of the body,
    /// then the connection is closed.
    Truncate,
    /// The connection is reset (RST) instead of answered.
    Reset,
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::Throttle,
        Fault::Error,
        Fault::Denied,
        Fault::ServerError,
        Fault::Hang,
        Fault::Truncate,
        Fault::Reset,
    ];

    /// A short name, for reports and settings (`throttle`, `5xx`, `hang`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Fault::Throttle => "throttle",
            Fault::Error => "error",
            Fault::Denied => "denied",
            Fault::ServerError => "5xx",
            Fault::Hang => "hang",
            Fault::Truncate => "truncate",
            Fault::Reset => "reset",
        }
    }

    pub fn from_name(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Matches every operation in [`FaultProxy::inject_randomly`].
pub const ANY_OPERATION: &str = "*";

#[derive(Debug, Clone)]
struct Rule {
    operation: String,
    service: Option<String>,
    fault: Fault,
}

/// Random faults of one operation (or [`ANY_OPERATION`]): each kind with its probability per call.
#[derive(Debug, Clone)]
struct RandomRule {
    operation: String,
    rates: Vec<(Fault, f64)>,
}

#[derive(Debug, Default)]
struct Shared {
    rules: Vec<Rule>,
    seed: u64,
    random: Vec<RandomRule>,
    /// Every request by operation, faulted or not.
    calls: BTreeMap<String, u64>,
    /// By (operation, service name or ID) for the calls that name one.
    calls_by_service: BTreeMap<(String, String), u64>,
    faulted: u64,
    /// Faults injected, by (operation, kind).
    fired: BTreeMap<(String, Fault), u64>,
    /// Every request in arrival order, faulted or not.
    journal: Vec<Call>,
    /// Client connections accepted (each serves requests until the client closes it).
    connections: u64,
}

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub at: Instant,
    pub operation: String,
    /// The service name (Discover calls) or ID (GetServiceAttributes), when the call names one.
    pub service: Option<String>,
    /// The namespace's HTTP name (Discover calls).
    pub namespace: Option<String>,
    pub fault: Option<Fault>,
}

impl Shared {
    /// The fault for the `nth` call (0-based) of `operation` for `service`, if any: a fixed
    /// rule first, else a seeded draw against the operation's random rates.
    fn choose(&self, operation: &str, service: Option<&str>, nth: u64) -> Option<Fault> {
        let fixed = self
            .rules
            .iter()
            .find(|r| r.operation == operation && (r.service.is_none() || r.service.as_deref() == service))
            .map(|r| r.fault);
        if fixed.is_some() {
            return fixed;
        }
        let rule = self
            .random
            .iter()
            .find(|r| r.operation == operation)
            .or_else(|| self.random.iter().find(|r| r.operation == ANY_OPERATION))?;
        let mut roll = draw(self.seed, operation, service.unwrap_or(""), nth);
        for &(fault, rate) in &rule.rates {
            if roll < rate {
                return Some(fault);
            }
            roll -= rate;
        }
        None
    }
}

/// A uniform number in [0, 1) from the seed and the call's identity (FNV-1a, then SplitMix64's finalizer).
fn draw(seed: u64, operation: &str, service: &str, nth: u64) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for byte in operation.bytes().chain([0]).chain(service.bytes()).chain([0]).chain(nth.to_le_bytes()) {
        h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    #[allow(clippy::cast_precision_loss)] // 53 bits, exactly representable
    let unit = (h >> 11) as f64 / (1u64 << 53) as f64;
    unit
}

/// Listens on 127.0.0.1; aborted on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let state = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                state.lock().unwrap().connections += 1;
                let state = state.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, upstream, state).await;
                });
            }
        });
        FaultProxy { addr, shared, task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Fails `operation` (e.g. `DiscoverInstancesRevision`), for one service (its name, or
    /// its ID for calls that take one) or all.
    pub fn fail(&self, operation: &str, service: Option<&str>, fault: Fault) {
        self.shared.lock().unwrap().rules.push(Rule {
            operation: operation.to_owned(),
            service: service.map(ToOwned::to_owned),
            fault,
        });
    }

    /// Gives every call of `operation` (or of every operation: [`ANY_OPERATION`]) a chance
    /// of each fault in `rates` (probabilities per call, summing to at most 1), drawn from
    /// `seed`. A later call for the same operation replaces its rates; [`FaultProxy::fail`]
    /// rules take precedence.
    pub fn inject_randomly(&self, seed: u64, operation: &str, rates: &[(Fault, f64)]) {
        let total: f64 = rates.iter().map(|(_, r)| r).sum();
        assert!(
            rates.iter().all(|(_, r)| (0.0..=1.0).contains(r)) && total <= 1.0,
            "fault rates must be probabilities summing to at most 1: {rates:?}"
        );
        let mut s = self.shared.lock().unwrap();
        s.seed = seed;
        s.random.retain(|r| r.operation != operation);
        s.random.push(RandomRule { operation: operation.to_owned(), rates: rates.to_vec() });
    }

    /// Ends every fault, fixed and random.
    pub fn heal(&self) {
        let mut s = self.shared.lock().unwrap();
        s.rules.clear();
        s.random.clear();
    }

    /// Faults injected so far, by (operation, kind).
    pub fn fired(&self) -> BTreeMap<(String, Fault), u64> {
        self.shared.lock().unwrap().fired.clone()
    }

    /// Requests seen, by operation (SDK retries included).
    pub fn calls(&self) -> BTreeMap<String, u64> {
        self.shared.lock().unwrap().calls.clone()
    }

    /// Calls per (operation, service name or ID).
    pub fn calls_by_service(&self) -> BTreeMap<(String, String), u64> {
        self.shared.lock().unwrap().calls_by_service.clone()
    }

    /// Client connections accepted so far: fewer than the calls when the client reuses them.
    pub fn connections(&self) -> u64 {
        self.shared.lock().unwrap().connections
    }

    pub fn faulted(&self) -> u64 {
        self.shared.lock().unwrap().faulted
    }

    /// Every request so far, in arrival order, with the fault it got.
    pub fn journal(&self) -> Vec<Call> {
        self.shared.lock().unwrap().journal.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Request {
    head: String,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn operation(&self) -> String {
        self.header("x-amz-target").and_then(|t| t.rsplit('.').next()).unwrap_or("").to_owned()
    }

    fn namespace(&self) -> Option<String> {
        let body: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        body.get("NamespaceName")?.as_str().map(ToOwned::to_owned)
    }

    fn service(&self) -> Option<String> {
        let body: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        body.get("ServiceName").or_else(|| body.get("ServiceId"))?.as_str().map(ToOwned::to_owned)
    }
}

/// Reads one request; `None` at a clean end of the connection.
async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<Option<Request>> {
    let head_end = loop {
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut request = Request { head, body: Vec::new() };
    let length: usize = request.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while buffer.len() < head_end + length {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    request.body = buffer[head_end..head_end + length].to_vec();
    buffer.drain(..head_end + length);
    Ok(Some(request))
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    shared: Arc<Mutex<Shared>>,
) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    while let Some(request) = read_request(&mut client, &mut buffer).await? {
        let operation = request.operation();
        let service = request.service();
        let (fault, nth) = {
            let mut s = shared.lock().unwrap();
            let calls = s.calls.entry(operation.clone()).or_default();
            let mut nth = *calls;
            *calls += 1;
            if let Some(service) = &service {
                let calls = s.calls_by_service.entry((operation.clone(), service.clone())).or_default();
                nth = *calls;
                *calls += 1;
            }
            let fault = s.choose(&operation, service.as_deref(), nth);
            if let Some(fault) = fault {
                s.faulted += 1;
                *s.fired.entry((operation.clone(), fault)).or_default() += 1;
            }
            s.journal.push(Call {
                at: Instant::now(),
                operation: operation.clone(),
                service: service.clone(),
                namespace: request.namespace(),
                fault,
            });
            (fault, nth)
        };
        match fault {
            None => {
                let response = forward(&request, upstream).await?;
                client.write_all(&response).await?;
            }
            Some(fault @ (Fault::Throttle | Fault::Error | Fault::Denied | Fault::ServerError)) => {
                client.write_all(&error_response(&operation, fault, nth)).await?;
            }
            Some(Fault::Hang) => {
                // Whatever the client sends next is never answered; it ends when the client gives up.
                let mut sink = [0u8; 8192];
                let _ = tokio::time::timeout(HANG_LIMIT, async {
                    while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
                return Ok(());
            }
            Some(Fault::Truncate) => {
                let response = forward(&request, upstream).await?;
                client.write_all(&truncated(&response)).await?;
                client.shutdown().await?;
                return Ok(());
            }
            Some(Fault::Reset) => {
                // SO_LINGER 0: closing sends RST, not FIN (and cannot block: nothing is left to send).
                client.set_zero_linger()?;
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The head (with the whole body's `Content-Length`) and the first half of the body.
fn truncated(response: &[u8]) -> Vec<u8> {
    let head_end = response.windows(4).position(|w| w == b"\r\n\r\n").map_or(response.len(), |i| i + 4);
    let body = response.len() - head_end;
    response[..head_end + body / 2].to_vec()
}

fn error_response(operation: &str, fault: Fault, nth: u64) -> Vec<u8> {
    let status = match fault {
        Fault::ServerError if nth.is_multiple_of(2) => "500 Internal Server Error",
        Fault::ServerError => "503 Service Unavailable",
        _ => "400 Bad Request",
    };
    let (code, message) = match fault {
        Fault::Throttle if operation == "DiscoverInstances" => {
            ("RequestLimitExceeded", "Rate exceeded".to_owned())
        }
        Fault::Throttle => ("ThrottlingException", "Rate exceeded".to_owned()),
        Fault::Error => ("InvalidInput", "injected failure".to_owned()),
        Fault::Denied => (
            "AccessDeniedException",
            format!(
                "User: arn:aws:sts::123456789012:assumed-role/cloudmap-xds/test is not authorized to perform: \
                 servicediscovery:{operation} because no identity-based policy allows the servicediscovery:{operation} action"
            ),
        ),
        Fault::ServerError if nth.is_multiple_of(2) => {
            ("InternalFailure", "injected internal failure".to_owned())
        }
        Fault::ServerError => ("ServiceUnavailable", "injected unavailability".to_owned()),
        Fault::Hang | Fault::Truncate | Fault::Reset => unreachable!("{fault} is not an error answer"),
    };
    let body = format!(r#"{{"__type":"{code}","message":"{message}"}}"#);
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-ErrorType: {code}\r\n\
         x-amzn-RequestId: fault-proxy\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One upstream connection per request; the response is re-framed with a Content-Length.
async fn forward(request: &Request, upstream: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut head: Vec<&str> = request
        .head
        .trim_end()
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    head.push("Connection: close");
    let mut raw = head.join("\r\n").into_bytes();
    raw.extend_from_slice(b"\r\n\r\n");
    raw.extend_from_slice(&request.body);
    let mut stream = TcpStream::connect(upstream).await?;
    stream.write_all(&raw).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "upstream sent no HTTP head"));
    };
    let head = String::from_utf8_lossy(&response[..head_end]);
    let body = &response[head_end..];
    let mut out: Vec<String> = head
        .trim_end()
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            !(l.starts_with("content-length:")
                || l.starts_with("connection:")
                || l.starts_with("transfer-encoding:"))
        })
        .map(ToOwned::to_owned)
        .collect();
    out.push(format!("Content-Length: {}", body.len()));
    let mut bytes = out.join("\r\n").into_bytes();
    bytes.extend_from_slice(b"\r\n\r\n");
    bytes.extend_from_slice(body);
    Ok(bytes)
}
