//! The RPC server: accepts TLS connections and runs each one in its own task.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::{frame, Handler, Peer};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

static DECODE_ERRORS: AtomicU64 = AtomicU64::new(0);

/// Connections closed (process-wide) because a peer sent a bad frame: a body
/// that is not valid JSON for the request type, or an oversized length.
pub fn decode_error_count() -> u64 {
    DECODE_ERRORS.load(Ordering::Relaxed)
}

/// Serves `handler` on `listener` until `shutdown` becomes true (or its sender
/// is dropped). Each connection gets its own task: TLS handshake (5 s limit),
/// then read request, handle, write response, until the peer closes or sends
/// something bad. Open connections are closed when this returns.
pub async fn serve<Req, Resp, H>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Handler<Req, Resp>,
{
    let acceptor = TlsAcceptor::from(tls);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|&stop| stop).await; } => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    let task = connection::<Req, Resp, H>(tcp, remote, acceptor.clone(), handler.clone());
                    conns.spawn(task);
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "rpc accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    conns.shutdown().await;
}

async fn connection<Req, Resp, H>(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    handler: Arc<H>,
) where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Handler<Req, Resp>,
{
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(%remote, error = %e, "cannot set TCP_NODELAY");
    }
    let mut stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "rpc tls handshake failed");
            return;
        }
        Err(_) => {
            debug!(%remote, "rpc tls handshake timed out");
            return;
        }
    };
    let peer: Peer = match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
        None => None,
        Some(cert) => match mesh_ca::peer_identity(cert) {
            Ok(id) => Some(id),
            Err(e) => {
                debug!(%remote, error = %e, "rpc peer certificate rejected");
                return;
            }
        },
    };
    loop {
        let body = match frame::read(&mut stream).await {
            Ok(Some(body)) => body,
            Ok(None) => return,
            Err(e @ frame::FrameError::TooLarge(_)) => {
                DECODE_ERRORS.fetch_add(1, Ordering::Relaxed);
                debug!(%remote, error = %e, "rpc bad frame, closing connection");
                return;
            }
            Err(e) => {
                debug!(%remote, error = %e, "rpc read failed");
                return;
            }
        };
        let req: Req = match serde_json::from_slice(&body) {
            Ok(req) => req,
            Err(e) => {
                DECODE_ERRORS.fetch_add(1, Ordering::Relaxed);
                debug!(%remote, error = %e, "rpc bad request, closing connection");
                return;
            }
        };
        let resp = handler.handle(peer.clone(), req).await;
        let out = match frame::encode(&resp) {
            Ok(out) => out,
            Err(e) => {
                warn!(%remote, error = %e, "rpc cannot encode response");
                return;
            }
        };
        if let Err(e) = frame::write(&mut stream, &out).await {
            debug!(%remote, error = %e, "rpc write failed");
            return;
        }
    }
}
