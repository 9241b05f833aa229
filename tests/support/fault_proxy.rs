//! A tiny HTTP/1.1 proxy in front of moto that counts every Cloud Map call by
//! operation and can fail chosen ones: what moto itself cannot do (it never
//! throttles, and cannot fail one service while serving the others).
//!
//! Requests are the AWS JSON 1.1 protocol: the operation is the suffix of
//! `X-Amz-Target` and the service is the `ServiceName` (Discover calls) or
//! `ServiceId` (GetServiceAttributes) of the JSON body.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 400 `ThrottlingException` (`RequestLimitExceeded` for DiscoverInstances), as AWS throttles.
    Throttle,
    /// HTTP 400 `InvalidInput`: a plain, non-retried failure.
    Error,
    /// HTTP 400 `AccessDeniedException`, as AWS answers a call the IAM policy does not allow.
    Denied,
}

#[derive(Debug, Clone)]
struct Rule {
    operation: String,
    service: Option<String>,
    fault: Fault,
}

#[derive(Debug, Default)]
struct Shared {
    rules: Vec<Rule>,
    /// Every request by operation, faulted or not.
    calls: BTreeMap<String, u64>,
    /// By (operation, service name or ID) for the calls that name one.
    calls_by_service: BTreeMap<(String, String), u64>,
    faulted: u64,
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

    pub fn heal(&self) {
        self.shared.lock().unwrap().rules.clear();
    }

    /// Requests seen, by operation (SDK retries included).
    pub fn calls(&self) -> BTreeMap<String, u64> {
        self.shared.lock().unwrap().calls.clone()
    }

    /// Calls per (operation, service name or ID).
    pub fn calls_by_service(&self) -> BTreeMap<(String, String), u64> {
        self.shared.lock().unwrap().calls_by_service.clone()
    }

    pub fn faulted(&self) -> u64 {
        self.shared.lock().unwrap().faulted
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
        let fault = {
            let mut s = shared.lock().unwrap();
            *s.calls.entry(operation.clone()).or_default() += 1;
            if let Some(service) = &service {
                *s.calls_by_service.entry((operation.clone(), service.clone())).or_default() += 1;
            }
            let fault = s
                .rules
                .iter()
                .find(|r| r.operation == operation && (r.service.is_none() || r.service == service))
                .map(|r| r.fault);
            if fault.is_some() {
                s.faulted += 1;
            }
            fault
        };
        let response = match fault {
            Some(fault) => error_response(&operation, fault),
            None => forward(&request, upstream).await?,
        };
        client.write_all(&response).await?;
    }
    Ok(())
}

fn error_response(operation: &str, fault: Fault) -> Vec<u8> {
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
    };
    let body = format!(r#"{{"__type":"{code}","message":"{message}"}}"#);
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-ErrorType: {code}\r\n\
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
