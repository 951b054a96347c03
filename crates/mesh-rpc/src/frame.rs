//! Length-prefixed JSON frames: 4-byte big-endian length, then the body.

use std::io;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest accepted frame body: 64 MiB.
pub const MAX_FRAME: usize = 64 << 20;

/// Why a frame could not be encoded, read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("frame i/o failed: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes exceeds the 64 MiB limit")]
    TooLarge(usize),
    #[error("cannot encode frame: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Serializes `msg` into a complete frame (header included).
pub(crate) fn encode<T: Serialize + ?Sized>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    serde_json::to_writer(&mut buf, msg)?;
    let len = buf.len() - 4;
    let header = u32::try_from(len)
        .ok()
        .filter(|_| len <= MAX_FRAME)
        .ok_or(FrameError::TooLarge(len))?;
    buf[..4].copy_from_slice(&header.to_be_bytes());
    Ok(buf)
}

pub(crate) async fn write<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> io::Result<()> {
    w.write_all(frame).await?;
    w.flush().await
}

/// Reads one frame body; `None` on a clean end of stream before a frame starts.
/// Memory grows with the bytes actually received, not with the announced length.
pub(crate) async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    match r.read(&mut header[..1]).await {
        Ok(0) => return Ok(None),
        // A TLS peer that closed without close_notify: still a frame boundary.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut header[1..]).await?;
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    r.take(len as u64).read_to_end(&mut body).await?;
    if body.len() != len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(Some(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_limits() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let frame = encode(&vec!["x"; 300]).unwrap();
        let writer = tokio::spawn(async move {
            write(&mut a, &frame).await.unwrap();
            write(&mut a, &(MAX_FRAME as u32 + 1).to_be_bytes())
                .await
                .unwrap();
        });
        let body = read(&mut b).await.unwrap().unwrap();
        assert_eq!(
            serde_json::from_slice::<Vec<String>>(&body).unwrap().len(),
            300
        );
        assert!(matches!(read(&mut b).await, Err(FrameError::TooLarge(_))));
        writer.await.unwrap();
        assert!(read(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn truncated_frame() {
        let (mut a, mut b) = tokio::io::duplex(64);
        write(&mut a, &[0, 0, 0, 10, b'{']).await.unwrap();
        drop(a);
        assert!(matches!(read(&mut b).await, Err(FrameError::Io(_))));
    }

    #[test]
    fn encode_too_large() {
        let big = "x".repeat(MAX_FRAME);
        assert!(matches!(encode(&big), Err(FrameError::TooLarge(_))));
    }
}
