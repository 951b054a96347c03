//! Framed request/response RPC between nodes over TLS.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON
//! (at most [`MAX_FRAME`]). A connection carries one request at a time;
//! responses come back in order. [`serve`] runs the server side, [`Client`]
//! keeps one persistent connection to a peer, [`call_once`] does a single
//! request on a fresh connection (bootstrap/join).
#![forbid(unsafe_code)]

mod client;
mod frame;
mod server;

use std::future::Future;
use std::io;

pub use client::{call_once, Client};
pub use frame::MAX_FRAME;
pub use server::{decode_error_count, serve};

/// Who is calling: `None` for an unauthenticated (joining) peer, else the
/// identity from its verified client certificate.
pub type Peer = Option<mesh_ca::PeerIdentity>;

/// Serves requests of type `Req` with responses of type `Resp`.
pub trait Handler<Req, Resp>: Send + Sync + 'static {
    fn handle(&self, peer: Peer, req: Req) -> impl Future<Output = Resp> + Send;
}

/// Errors seen by RPC clients. Each names the remote address.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("cannot connect to {0}: {msg}", msg = io_text(.1))]
    Connect(String, io::Error),
    /// TLS failure; the text keeps rustls' message (e.g. "CA digest mismatch").
    #[error("tls with {0} failed: {1}")]
    Tls(String, String),
    #[error("i/o error with {0}: {msg}", msg = io_text(.1))]
    Io(String, io::Error),
    #[error("request to {0} timed out")]
    Timeout(String),
    #[error("frame of {1} bytes to or from {0} exceeds the 64 MiB limit")]
    FrameTooLarge(String, usize),
    #[error("cannot encode request to {0}: {1}")]
    Encode(String, serde_json::Error),
    #[error("invalid response from {0}: {1}")]
    Decode(String, serde_json::Error),
    #[error("connection to {0} closed")]
    Closed(String),
}

impl RpcError {
    /// True when a pinned bootstrap handshake failed because the server's CA
    /// does not match the join token's CA digest.
    pub fn is_ca_digest_mismatch(&self) -> bool {
        matches!(self, RpcError::Tls(_, msg) if msg.contains("CA digest mismatch"))
    }
}

/// `io::Error` text without the " (os error N)" suffix, starting lowercase,
/// e.g. "connection refused".
fn io_text(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error ") {
        Some(i) if e.raw_os_error().is_some() => &text[..i],
        _ => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages() {
        let refused = io::Error::from_raw_os_error(111);
        assert_eq!(
            RpcError::Connect("10.99.0.11:2377".into(), refused).to_string(),
            "cannot connect to 10.99.0.11:2377: connection refused"
        );
        let custom = io::Error::other("Boom (os error 3)");
        assert_eq!(
            RpcError::Io("a:1".into(), custom).to_string(),
            "i/o error with a:1: boom (os error 3)"
        );
        assert!(
            RpcError::Tls("a:1".into(), "other error: CA digest mismatch: x".into())
                .is_ca_digest_mismatch()
        );
    }
}
