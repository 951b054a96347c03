//! The local API socket: `EXEC_ROOT/meshd.sock`, one JSON request per line, one JSON response
//! line each. Malformed lines get an error response; the connection and the daemon live on.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use mesh_agent::Daemon;
use mesh_api::{ApiError, Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::debug;

/// Longest request line accepted.
const MAX_LINE: usize = 1 << 20;

pub fn serve(path: &Path, daemon: Arc<Daemon>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // We hold the exec-root lock, so any socket file left here is stale.
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, daemon.clone()));
                }
                Err(e) => {
                    debug!("api accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }))
}

async fn connection(stream: UnixStream, daemon: Arc<Daemon>) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut r)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let resp: Response = if n > MAX_LINE {
            Err(ApiError::invalid("request too large"))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => daemon.handle(req).await,
                Err(e) => Err(ApiError::invalid(format!("malformed request: {e}"))),
            }
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| {
            b"{\"Err\":{\"kind\":\"internal\",\"message\":\"unserializable response\"}}".to_vec()
        });
        out.push(b'\n');
        if w.write_all(&out).await.is_err() {
            return;
        }
        if n > MAX_LINE {
            return;
        }
    }
}

/// The daemon as the Docker Engine API's backend: the same requests the local socket takes.
pub struct Engine(pub Arc<Daemon>);

impl mesh_engine::Backend for Engine {
    fn call(&self, req: Request) -> mesh_engine::BoxFuture<'_, Response> {
        Box::pin(self.0.handle(req))
    }
}
