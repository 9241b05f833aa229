//! The gRPC listener's connections: plain TCP, or TLS when a certificate is
//! configured. TLS handshakes run concurrently, each bounded by
//! [`tls::HANDSHAKE_TIMEOUT`](crate::tls::HANDSHAKE_TIMEOUT), so a client that
//! stalls its handshake holds up nobody else; failures are counted, not fatal.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

use crate::metrics::ReasonLabels;

/// Handshakes in progress at once; connections beyond wait in the kernel's backlog.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// One accepted connection.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Accepted connections, TLS-terminated when `tls` is set. Connections that fail
/// their handshake are dropped and counted in `rejected{reason="tls_handshake"}`.
pub fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    rejected: Family<ReasonLabels, Counter>,
) -> impl Stream<Item = io::Result<Conn>> {
    async_stream::stream! {
        let mut handshakes = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept(), if handshakes.len() < MAX_PENDING_HANDSHAKES => {
                    let (tcp, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Out of file descriptors, say: keep serving the connections there are.
                            warn!(error = %e, "accepting a gRPC connection failed");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = tcp.set_nodelay(true);
                    match &tls {
                        None => yield Ok(Conn::Plain(tcp)),
                        Some(acceptor) => {
                            let acceptor = acceptor.clone();
                            handshakes.spawn(async move {
                                let result = tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                                (peer, result)
                            });
                        }
                    }
                }
                Some(done) = handshakes.join_next(), if !handshakes.is_empty() => {
                    match done {
                        Ok((_, Ok(Ok(stream)))) => yield Ok(Conn::Tls(Box::new(stream))),
                        Ok((peer, Ok(Err(e)))) => {
                            debug!(%peer, error = %e, "TLS handshake failed");
                            rejected.get_or_create(&ReasonLabels { reason: "tls_handshake" }).inc();
                        }
                        Ok((peer, Err(_))) => {
                            debug!(%peer, "TLS handshake timed out");
                            rejected.get_or_create(&ReasonLabels { reason: "tls_handshake_timeout" }).inc();
                        }
                        Err(e) => warn!(error = %e, "a TLS handshake task died"),
                    }
                }
            }
        }
    }
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(tcp) => tcp,
            Conn::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        let tcp = self.tcp();
        TcpConnectInfo { local_addr: tcp.local_addr().ok(), remote_addr: tcp.peer_addr().ok() }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}
