//! RPC clients: a persistent per-peer [`Client`] and one-shot [`call_once`].

use std::io;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::frame::{self, FrameError};
use crate::RpcError;

type Conn = TlsStream<TcpStream>;

/// A client for one remote address with one persistent connection, opened
/// lazily and dropped after any error or timeout (the next call reconnects).
/// Clones share the connection; concurrent calls are serialized.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    conn: Mutex<Option<Conn>>,
}

impl Client {
    /// `addr` is "ip:port". Does not connect yet.
    pub fn new(addr: String, tls: Arc<rustls::ClientConfig>) -> Client {
        Client {
            inner: Arc::new(Inner {
                addr,
                tls,
                conn: Mutex::new(None),
            }),
        }
    }

    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// Sends `req` and waits for the response. `timeout` covers waiting for
    /// earlier calls on this client, connecting, the TLS handshake, writing
    /// and reading.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcError> {
        let addr = self.addr();
        let out = encode(addr, req)?;
        let attempt = async {
            let mut slot = self.inner.conn.lock().await;
            // Taken out so that an error or a timeout (which drops this future)
            // leaves no half-used connection behind.
            let mut conn = match slot.take() {
                Some(conn) if !peer_closed(&conn).await => conn,
                _ => connect(addr, &self.inner.tls).await?,
            };
            let resp = exchange(addr, &mut conn, &out).await?;
            *slot = Some(conn);
            Ok(resp)
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| RpcError::Timeout(addr.to_owned()))?
    }
}

/// One request on a fresh connection (bootstrap/join): connect, handshake,
/// send, receive, close. `timeout` covers all of it.
pub async fn call_once<Req, Resp>(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    req: &Req,
    timeout: Duration,
) -> Result<Resp, RpcError>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    let out = encode(addr, req)?;
    let attempt = async {
        let mut conn = connect(addr, &tls).await?;
        let resp = exchange(addr, &mut conn, &out).await?;
        // Best effort close_notify; the response is already in hand.
        let _ = conn.shutdown().await;
        Ok(resp)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| RpcError::Timeout(addr.to_owned()))?
}

fn encode<Req: Serialize>(addr: &str, req: &Req) -> Result<Vec<u8>, RpcError> {
    frame::encode(req).map_err(|e| frame_error(addr, e))
}

async fn connect(addr: &str, tls: &Arc<rustls::ClientConfig>) -> Result<Conn, RpcError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| RpcError::Connect(addr.to_owned(), e))?;
    tcp.set_nodelay(true)
        .map_err(|e| RpcError::Connect(addr.to_owned(), e))?;
    let name = ServerName::try_from(mesh_ca::SERVER_NAME)
        .map_err(|e| RpcError::Tls(addr.to_owned(), e.to_string()))?;
    TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| RpcError::Tls(addr.to_owned(), e.to_string()))
}

async fn exchange<S, Resp>(addr: &str, conn: &mut S, out: &[u8]) -> Result<Resp, RpcError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    Resp: DeserializeOwned,
{
    frame::write(conn, out)
        .await
        .map_err(|e| io_error(addr, e))?;
    let body = frame::read(conn)
        .await
        .map_err(|e| frame_error(addr, e))?
        .ok_or_else(|| RpcError::Closed(addr.to_owned()))?;
    serde_json::from_slice(&body).map_err(|e| RpcError::Decode(addr.to_owned(), e))
}

/// Whether an idle connection was closed (or sent something unsolicited,
/// e.g. close_notify) by the server, e.g. because it restarted. Checked before
/// reuse so that such a connection is replaced without failing the call.
async fn peer_closed(conn: &Conn) -> bool {
    let mut byte = [0u8; 1];
    // Polled once: pending means nothing to read, i.e. still healthy.
    std::future::poll_fn(|cx| {
        let mut buf = ReadBuf::new(&mut byte);
        Poll::Ready(conn.get_ref().0.poll_peek(cx, &mut buf).is_ready())
    })
    .await
}

fn frame_error(addr: &str, e: FrameError) -> RpcError {
    match e {
        FrameError::Io(e) => io_error(addr, e),
        FrameError::TooLarge(len) => RpcError::FrameTooLarge(addr.to_owned(), len),
        FrameError::Encode(e) => RpcError::Encode(addr.to_owned(), e),
    }
}

/// TLS-level failures (e.g. the server rejecting our certificate, which with
/// TLS 1.3 shows up after the handshake) keep rustls' text.
fn io_error(addr: &str, e: io::Error) -> RpcError {
    let addr = addr.to_owned();
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => RpcError::Tls(addr, tls.to_string()),
        None if e.kind() == io::ErrorKind::UnexpectedEof => RpcError::Closed(addr),
        None => RpcError::Io(addr, e),
    }
}
