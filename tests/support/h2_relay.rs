//! A loopback TCP relay in front of our gRPC port that reads the HTTP/2 frames
//! the server sends (PING acknowledgements, GOAWAY) without changing a byte,
//! and can freeze, so the client looks like a peer that vanished without a FIN.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const FRAME_HEADER: usize = 9;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

#[derive(Default)]
struct State {
    /// PING frames with the ACK flag, from the server: answers to the client's pings.
    ping_acks: AtomicU64,
    /// PING frames without ACK, from the server: its own keepalive pings.
    server_pings: AtomicU64,
    /// GOAWAY frames from the server: (error code, debug data).
    goaways: Mutex<Vec<(u32, String)>>,
    frozen: AtomicBool,
    thaw: Notify,
    /// The server closed a relayed connection.
    server_closed: AtomicU64,
}

pub struct H2Relay {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl H2Relay {
    /// Relays every connection made to [`H2Relay::addr`] to `upstream`.
    pub async fn start(upstream: SocketAddr) -> H2Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                relay(client, server, shared.clone());
            }
        });
        H2Relay { addr, state, task }
    }

    pub fn ping_acks(&self) -> u64 {
        self.state.ping_acks.load(Ordering::SeqCst)
    }

    pub fn server_pings(&self) -> u64 {
        self.state.server_pings.load(Ordering::SeqCst)
    }

    pub fn goaways(&self) -> Vec<(u32, String)> {
        self.state.goaways.lock().unwrap().clone()
    }

    pub fn server_closed(&self) -> u64 {
        self.state.server_closed.load(Ordering::SeqCst)
    }

    /// Stops forwarding in both directions and keeps both sockets open: to the
    /// server the client is alive at the TCP level and answers nothing.
    pub fn freeze(&self) {
        self.state.frozen.store(true, Ordering::SeqCst);
    }
}

impl Drop for H2Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn relay(client: TcpStream, server: TcpStream, state: Arc<State>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = state.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if up.frozen.load(Ordering::SeqCst) {
                return hold(&up).await;
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut frames = FrameReader::default();
        loop {
            if state.frozen.load(Ordering::SeqCst) {
                return hold(&state).await;
            }
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    state.server_closed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Ok(n) => n,
            };
            frames.feed(&buf[..n], &state);
            if state.frozen.load(Ordering::SeqCst) {
                return hold(&state).await;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
}

/// Frozen: neither read nor write nor close, until the relay is dropped.
async fn hold(state: &State) {
    state.thaw.notified().await;
}

/// Splits the server's byte stream into frames (a server sends no preface).
#[derive(Default)]
struct FrameReader {
    pending: Vec<u8>,
}

impl FrameReader {
    fn feed(&mut self, bytes: &[u8], state: &State) {
        self.pending.extend_from_slice(bytes);
        loop {
            if self.pending.len() < FRAME_HEADER {
                return;
            }
            let length = usize::from(self.pending[0]) << 16
                | usize::from(self.pending[1]) << 8
                | usize::from(self.pending[2]);
            if self.pending.len() < FRAME_HEADER + length {
                return;
            }
            let (kind, flags) = (self.pending[3], self.pending[4]);
            let payload = &self.pending[FRAME_HEADER..FRAME_HEADER + length];
            match kind {
                PING if flags & ACK != 0 => {
                    state.ping_acks.fetch_add(1, Ordering::SeqCst);
                }
                PING => {
                    state.server_pings.fetch_add(1, Ordering::SeqCst);
                }
                GOAWAY if payload.len() >= 8 => {
                    let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                    let debug = String::from_utf8_lossy(&payload[8..]).into_owned();
                    state.goaways.lock().unwrap().push((code, debug));
                }
                _ => {}
            }
            self.pending.drain(..FRAME_HEADER + length);
        }
    }
}
