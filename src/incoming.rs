//! The gRPC listener's connections: plain TCP, or TLS when a certificate is
//! configured. TLS handshakes run concurrently, each bounded by
//! [`tls::HANDSHAKE_TIMEOUT`](crate::tls::HANDSHAKE_TIMEOUT), so a client that
//! stalls its handshake holds up nobody else; failures are counted, not fatal.
//! A connection that has not sent the 24-byte HTTP/2 preface within
//! [`PREFACE_TIMEOUT`] is closed: HTTP/2 keepalive only starts after the
//! handshake, so nothing else would reap a peer that connects and says nothing.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

use crate::metrics::ReasonLabels;

/// Handshakes in progress at once; connections beyond wait in the kernel's backlog.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// How long a connection may take to send the HTTP/2 preface (after TLS, if any).
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);
/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: usize = 24;

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One accepted connection.
pub struct Conn {
    io: Io,
    /// Armed until the preface's bytes have been read.
    preface_deadline: Option<Pin<Box<Sleep>>>,
    read: usize,
    rejected: Family<ReasonLabels, Counter>,
}

impl Conn {
    fn new(io: Io, preface_timeout: Duration, rejected: &Family<ReasonLabels, Counter>) -> Self {
        Conn {
            io,
            preface_deadline: Some(Box::pin(tokio::time::sleep(preface_timeout))),
            read: 0,
            rejected: rejected.clone(),
        }
    }
}

/// Accepted connections, TLS-terminated when `tls` is set. Connections that fail
/// their handshake are dropped and counted in `rejected{reason="tls_handshake"}`.
/// (`preface_timeout` is [`PREFACE_TIMEOUT`] outside tests.)
pub fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    rejected: Family<ReasonLabels, Counter>,
    preface_timeout: Duration,
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
                        None => yield Ok(Conn::new(Io::Plain(tcp), preface_timeout, &rejected)),
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
                        Ok((_, Ok(Ok(stream)))) => {
                            yield Ok(Conn::new(Io::Tls(Box::new(stream)), preface_timeout, &rejected));
                        }
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
        match &self.io {
            Io::Plain(tcp) => tcp,
            Io::Tls(tls) => tls.get_ref().0,
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
        let this = self.get_mut();
        if let Some(deadline) = this.preface_deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.preface_deadline = None;
            this.rejected.get_or_create(&ReasonLabels { reason: "preface_timeout" }).inc();
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no HTTP/2 preface in time")));
        }
        let before = buf.filled().len();
        let polled = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if this.preface_deadline.is_some() {
            this.read += buf.filled().len() - before;
            if this.read >= PREFACE_LEN {
                this.preface_deadline = None;
            }
        }
        polled
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    use super::*;

    async fn accepted(preface_timeout: Duration) -> (TcpStream, Conn, Family<ReasonLabels, Counter>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rejected = Family::<ReasonLabels, Counter>::default();
        let mut connections = Box::pin(incoming(listener, None, rejected.clone(), preface_timeout));
        let client = TcpStream::connect(addr).await.unwrap();
        let conn = connections.next().await.unwrap().unwrap();
        (client, conn, rejected)
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_at_the_preface_deadline_and_counted() {
        let (_client, mut conn, rejected) = accepted(Duration::from_millis(50)).await;
        let mut buf = [0u8; 64];
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(rejected.get_or_create(&ReasonLabels { reason: "preface_timeout" }).get(), 1);
    }

    #[tokio::test]
    async fn the_preface_disarms_the_deadline() {
        let (mut client, mut conn, rejected) = accepted(Duration::from_secs(3600)).await;
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut buf = [0u8; PREFACE_LEN];
        conn.read_exact(&mut buf).await.unwrap();
        assert!(conn.preface_deadline.is_none());
        assert_eq!(rejected.get_or_create(&ReasonLabels { reason: "preface_timeout" }).get(), 0);
    }
}
