//! Join tokens: `SWMTKN-1-<CA digest>-<secret>`.
//!
//! The digest is the SHA-256 of the CA certificate DER in base36, left-padded
//! to 50 characters; the secret is 128 random bits in base36, left-padded to
//! 25 characters. Both use lowercase `0-9a-z` only.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;

/// Prefix of every join token (format version 1).
pub const TOKEN_PREFIX: &str = "SWMTKN-1-";

const DIGEST_LEN: usize = 50;
const SECRET_LEN: usize = 25;
const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Why a join token could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("invalid join token: empty")]
    Empty,
    #[error("invalid join token: must start with SWMTKN-1-")]
    Prefix,
    #[error("invalid join token: expected SWMTKN-1-<digest>-<secret>")]
    Format,
    #[error("invalid join token: bad CA digest")]
    Digest,
    #[error("invalid join token: bad secret")]
    Secret,
}

/// A parsed join token. [`fmt::Display`] gives the full token string.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Base36 SHA-256 of the CA certificate DER (50 chars).
    pub ca_digest: String,
    /// Base36 random secret (25 chars).
    pub secret: String,
}

impl JoinToken {
    /// Builds a token from its parts (not validated; see [`JoinToken::parse`]).
    pub fn new(ca_digest: &str, secret: &str) -> Self {
        JoinToken {
            ca_digest: ca_digest.to_owned(),
            secret: secret.to_owned(),
        }
    }

    /// Parses `SWMTKN-1-<digest>-<secret>`; surrounding whitespace is ignored.
    pub fn parse(s: &str) -> Result<JoinToken, TokenError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(TokenError::Empty);
        }
        let rest = s.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
        let (digest, secret) = rest.split_once('-').ok_or(TokenError::Format)?;
        if secret.contains('-') {
            return Err(TokenError::Format);
        }
        if !is_base36(digest, DIGEST_LEN) {
            return Err(TokenError::Digest);
        }
        if !is_base36(secret, SECRET_LEN) {
            return Err(TokenError::Secret);
        }
        Ok(JoinToken::new(digest, secret))
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_PREFIX}{}-{}", self.ca_digest, self.secret)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_digest", &self.ca_digest)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JoinToken::parse(s)
    }
}

/// A fresh 25-char base36 secret from 128 bits of OS-seeded CSPRNG output.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    base36(&bytes, SECRET_LEN)
}

/// The 50-char base36 SHA-256 digest of a CA certificate (DER).
pub fn ca_digest(ca_cert_der: &[u8]) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, ca_cert_der);
    base36(hash.as_ref(), DIGEST_LEN)
}

/// Compares two secrets in time independent of their contents.
pub fn secrets_match(a: &str, b: &str) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .bytes()
        .zip(b.bytes())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn is_base36(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| ALPHABET.contains(&b))
}

/// Base36 of a big-endian unsigned integer, left-padded with '0' to `width`.
fn base36(bytes: &[u8], width: usize) -> String {
    let mut num = bytes.to_vec();
    let mut digits = Vec::new();
    while num.iter().any(|&b| b != 0) {
        let mut rem = 0u32;
        for b in &mut num {
            let cur = (rem << 8) | u32::from(*b);
            *b = (cur / 36) as u8;
            rem = cur % 36;
        }
        digits.push(ALPHABET[rem as usize]);
    }
    digits.resize(digits.len().max(width), b'0');
    digits.iter().rev().map(|&d| char::from(d)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        JoinToken::new(&ca_digest(b"some ca"), &new_secret())
    }

    #[test]
    fn base36_known_values() {
        assert_eq!(base36(&[0x01, 0x00], 0), "74");
        assert_eq!(base36(&[0x01, 0x00], 4), "0074");
        assert_eq!(base36(&[35], 0), "z");
        assert_eq!(base36(&[0; 32], DIGEST_LEN), "0".repeat(50));
        assert_eq!(base36(&[0xff; 16], SECRET_LEN), "f5lxx1zz5pnorynqglhzmsp33");
        assert_eq!(
            base36(&[0xff; 32], DIGEST_LEN),
            "6dp5qcb22im238nr3wvp0ic7q99w035jmy2iw7i6n43d37jtof"
        );
        // sha256("") = e3b0c442..., converted independently with Python.
        assert_eq!(
            ca_digest(b""),
            "5oaq0bjhj6un82wg98mgigso5q7qlhc63je4gw7ivixqqhkd3p"
        );
    }

    #[test]
    fn secret_shape() {
        let a = new_secret();
        assert!(is_base36(&a, SECRET_LEN), "{a}");
        assert_ne!(a, new_secret());
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let s = t.to_string();
        assert!(s.starts_with(TOKEN_PREFIX));
        assert_eq!(s.len(), TOKEN_PREFIX.len() + DIGEST_LEN + 1 + SECRET_LEN);
        assert_eq!(JoinToken::parse(&s), Ok(t.clone()));
        assert_eq!(format!(" {s}\n").parse::<JoinToken>(), Ok(t.clone()));
        assert!(!format!("{t:?}").contains(&t.secret));
    }

    #[test]
    fn malformed() {
        let t = sample();
        let (d, s) = (t.ca_digest.as_str(), t.secret.as_str());
        let cases: Vec<(String, TokenError)> = vec![
            (String::new(), TokenError::Empty),
            ("   ".into(), TokenError::Empty),
            (format!("SWMTKN-2-{d}-{s}"), TokenError::Prefix),
            (format!("swmtkn-1-{d}-{s}"), TokenError::Prefix),
            (format!("{d}-{s}"), TokenError::Prefix),
            ("SWMTKN-1-".into(), TokenError::Format),
            (format!("SWMTKN-1-{d}"), TokenError::Format),
            (format!("SWMTKN-1-{d}-{s}-extra"), TokenError::Format),
            (format!("SWMTKN-1-{d}--{s}"), TokenError::Format),
            (format!("SWMTKN-1--{s}"), TokenError::Digest),
            (format!("SWMTKN-1-{}-{s}", &d[1..]), TokenError::Digest),
            (format!("SWMTKN-1-{d}0-{s}"), TokenError::Digest),
            (
                format!("SWMTKN-1-{}-{s}", d.to_uppercase()),
                TokenError::Digest,
            ),
            (format!("SWMTKN-1-{}_-{s}", &d[1..]), TokenError::Digest),
            (format!("SWMTKN-1-{d}-"), TokenError::Secret),
            (format!("SWMTKN-1-{d}-{}", &s[1..]), TokenError::Secret),
            (format!("SWMTKN-1-{d}-{s}0"), TokenError::Secret),
            (
                format!("SWMTKN-1-{d}-{}", "Z".repeat(25)),
                TokenError::Secret,
            ),
            (
                format!("SWMTKN-1-{d}-{}", "é".repeat(12)),
                TokenError::Secret,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(JoinToken::parse(&input), Err(want.clone()), "{input:?}");
        }
        assert_eq!(
            TokenError::Prefix.to_string(),
            "invalid join token: must start with SWMTKN-1-"
        );
    }

    #[test]
    fn secret_comparison() {
        assert!(secrets_match("abc", "abc"));
        assert!(!secrets_match("abc", "abd"));
        assert!(!secrets_match("abc", "abcd"));
        assert!(secrets_match("", ""));
    }
}
