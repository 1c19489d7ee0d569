//! The protocol's TLS request and the handshake, as a tokio-postgres connector.

use std::io;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{continues_without_tls, SslMode};

/// The protocol's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

type RustlsStream = <MakeRustlsConnect as MakeTlsConnect<TcpStream>>::Stream;

/// The TLS request and handshake on a fresh socket, for tokio-postgres (which is told the
/// socket speaks TLS directly): pgshift sends the request itself, so that a server without
/// TLS is a typed answer ([`NegotiationError::ServerWithoutTls`]), and `prefer` goes on
/// without TLS on the same socket, as libpq does. The cancel requests of a TLS session take
/// the same way.
#[derive(Clone)]
pub(crate) struct Negotiate {
    tls: Option<MakeRustlsConnect>,
    host: String,
    continue_without_tls: bool,
}

impl Negotiate {
    pub(crate) fn new(
        config: Option<Arc<rustls::ClientConfig>>,
        host: &str,
        mode: SslMode,
    ) -> Self {
        Negotiate {
            tls: config.map(|c| MakeRustlsConnect::new(Arc::unwrap_or_clone(c))),
            host: host.to_string(),
            continue_without_tls: continues_without_tls(mode),
        }
    }
}

/// Why the TLS request or handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NegotiationError {
    #[error("the server does not support TLS")]
    ServerWithoutTls,
    #[error("no TLS configuration")]
    NotConfigured,
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl TlsConnect<TcpStream> for Negotiate {
    type Stream = Negotiated;
    type Error = NegotiationError;
    type Future = BoxFuture<'static, Result<Negotiated, NegotiationError>>;

    fn connect(self, mut stream: TcpStream) -> Self::Future {
        Box::pin(async move {
            let Some(mut tls) = self.tls else {
                return Err(NegotiationError::NotConfigured);
            };
            stream.write_all(&SSL_REQUEST).await?;
            let mut answer = [0u8];
            stream.read_exact(&mut answer).await?;
            match answer[0] {
                b'S' => {}
                b'N' if self.continue_without_tls => return Ok(Negotiated::Plain(stream)),
                b'N' => return Err(NegotiationError::ServerWithoutTls),
                other => {
                    return Err(NegotiationError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected answer {other:#04x} to the TLS request"),
                    )))
                }
            }
            let connector =
                match MakeTlsConnect::<TcpStream>::make_tls_connect(&mut tls, &self.host) {
                    Ok(connector) => connector,
                    Err(never) => match never {},
                };
            let stream = connector.connect(stream).await?;
            Ok(Negotiated::Tls(Box::new(stream)))
        })
    }
}

/// A socket after the TLS request: TLS, or plain where `prefer` met a server without TLS.
pub(crate) enum Negotiated {
    Tls(Box<RustlsStream>),
    Plain(TcpStream),
}

impl TlsStream for Negotiated {
    fn channel_binding(&self) -> ChannelBinding {
        match self {
            // SCRAM binds to the server's certificate (tls-server-end-point).
            Negotiated::Tls(stream) => stream.channel_binding(),
            Negotiated::Plain(_) => ChannelBinding::none(),
        }
    }
}

impl AsyncRead for Negotiated {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Negotiated::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_read(cx, buf),
            Negotiated::Plain(stream) => std::pin::Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Negotiated {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Negotiated::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_write(cx, buf),
            Negotiated::Plain(stream) => std::pin::Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Negotiated::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_flush(cx),
            Negotiated::Plain(stream) => std::pin::Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Negotiated::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_shutdown(cx),
            Negotiated::Plain(stream) => std::pin::Pin::new(stream).poll_shutdown(cx),
        }
    }
}
