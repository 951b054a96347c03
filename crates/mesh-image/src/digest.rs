//! Content digests: `sha256:<hex>` of bytes and of streams, and checking content against the
//! digest it was named by.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::error::ImageError;

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The hex part of a `sha256:<hex>` digest, checked (it names files in the store).
pub(crate) fn sha256_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(h)
            if h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(h)
        }
        _ => Err(ImageError::Invalid(format!(
            "unsupported or invalid digest: {digest}"
        ))),
    }
}

/// Checks that `data` hashes to `expected`.
pub(crate) fn verify(data: &[u8], expected: &str, what: &str) -> Result<(), ImageError> {
    sha256_hex(expected)?;
    let actual = sha256(data);
    if actual != expected {
        return Err(mismatch(what, expected, &actual));
    }
    Ok(())
}

pub(crate) fn mismatch(what: &str, expected: &str, actual: &str) -> ImageError {
    ImageError::Verification(format!(
        "{what} verification failed: expected digest {expected}, got {actual}"
    ))
}

/// A reader that hashes what is read through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads what is left (a tar stream's padding after its end marker counts in its digest),
    /// then returns `sha256:<hex>` of everything read and the byte count.
    pub(crate) fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            format!("sha256:{}", hex(&self.hasher.finalize())),
            self.count,
        ))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_and_refuses() {
        let d = sha256(b"hello");
        assert_eq!(
            d,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        verify(b"hello", &d, "blob").unwrap();
        let e = verify(b"hellO", &d, "blob").unwrap_err();
        assert!(matches!(e, ImageError::Verification(_)), "{e:?}");
        assert!(e.to_string().contains(&d), "{e}");
        assert!(verify(b"hello", "sha256:../../etc", "blob").is_err());
    }

    #[test]
    fn hashing_reader_counts_the_tail() {
        let mut r = HashingReader::new(&b"hello world"[..]);
        let mut first = [0u8; 5];
        r.read_exact(&mut first).unwrap();
        let (d, n) = r.finish().unwrap();
        assert_eq!(n, 11);
        assert_eq!(d, sha256(b"hello world"));
    }
}
