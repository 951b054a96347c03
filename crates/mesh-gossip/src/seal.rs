//! Sealed packets: gossip authenticated and encrypted with AES-256-GCM under rotating
//! cluster keys.
//!
//! The managers make the keys and hand them to every node over the mutual-TLS control
//! plane; this module only uses them. A [`Keyring`] holds at most [`MAX_KEYS`] keys (the
//! newest by ID: IDs only grow); the newest seals what this node sends, every key in the
//! ring opens what it receives, so a rotation never cuts two nodes apart while one of them
//! has not heard of the new key yet (Docker keeps three network keys the same way).
//!
//! A sealed UDP packet, or push-pull frame (after its length prefix), is
//!
//! ```text
//! 0..2   magic "MG"
//! 2      format version: 0x80 | 1 (sealed)
//! 3..7   key ID, big endian
//! 7..19  nonce (96 random bits)
//! 19..   AES-256-GCM(key, nonce, aad = bytes 0..7, the plain packet) || 16-byte tag
//! ```
//!
//! The plain packet inside is the unsealed format of [`crate::wire`] (its header, with the
//! cluster tag, then the body). The key ID in clear lets a receiver pick the key without
//! trial decryption: an ID it does not hold is dropped as [`OpenError::UnknownKey`], a packet
//! whose tag does not verify (a flipped bit, another key under a known ID, a truncated
//! packet) as [`OpenError::BadTag`]. Nonces are random: with 2^32 packets per key as the
//! safe bound for random GCM nonces, a key sealing for 12 hours stays far below it (a
//! hundred nodes sending a hundred packets a second use about 2^28).
//!
//! Not covered: replays. A captured packet can be sent again while its key is in the ring;
//! as in memberlist, the protocol above tolerates it (table records carry Lamport versions,
//! SWIM messages incarnations), so a replay can delay a failure verdict at most.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::wire::MAGIC;

/// The version byte of a sealed packet.
pub const SEALED_VERSION: u8 = 0x81;
/// Bytes in clear before the ciphertext: magic, version, key ID, nonce.
pub const SEALED_HEADER_LEN: usize = 2 + 1 + 4 + NONCE_LEN;
/// Bytes sealing adds to a packet (clear header and tag).
pub const OVERHEAD: usize = SEALED_HEADER_LEN + TAG_LEN;
/// Keys a ring keeps (the newest by ID).
pub const MAX_KEYS: usize = 3;
const TAG_LEN: usize = 16;
/// Authenticated, not encrypted: magic, version and key ID.
const AAD_LEN: usize = 7;

/// One cluster key as the managers hand it out.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    /// Grows with each rotation.
    pub id: u32,
    pub secret: [u8; 32],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({}, ..)", self.id)
    }
}

/// Why a sealed packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not a sealed packet (plain, or no magic).
    #[error("not a sealed packet")]
    NotSealed,
    /// Sealed under a key ID this ring does not hold (too old, not yet received, forged).
    #[error("sealed under an unknown key")]
    UnknownKey,
    /// The tag does not verify: altered, truncated, or sealed with another key.
    #[error("bad authentication tag")]
    BadTag,
}

/// The keys a node holds; see the module docs.
pub struct Keyring {
    /// Sorted by ID, oldest first, at most [`MAX_KEYS`].
    keys: Vec<(u32, LessSafeKey)>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("ids", &self.ids()).finish()
    }
}

impl Default for Keyring {
    fn default() -> Keyring {
        Keyring::new(&[])
    }
}

impl Keyring {
    /// A ring of the newest [`MAX_KEYS`] of `keys` (duplicate IDs: the last given wins).
    pub fn new(keys: &[Key]) -> Keyring {
        let mut by_id = std::collections::BTreeMap::new();
        for k in keys {
            by_id.insert(k.id, k.secret);
        }
        let skip = by_id.len().saturating_sub(MAX_KEYS);
        let keys = by_id
            .into_iter()
            .skip(skip)
            .filter_map(|(id, secret)| {
                let k = UnboundKey::new(&AES_256_GCM, &secret).ok()?;
                Some((id, LessSafeKey::new(k)))
            })
            .collect();
        Keyring {
            keys,
            rng: SystemRandom::new(),
        }
    }

    /// The IDs held, oldest first.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|(id, _)| *id).collect()
    }

    /// The ID of the key that seals (the newest), if any.
    pub fn primary(&self) -> Option<u32> {
        self.keys.last().map(|(id, _)| *id)
    }

    /// Whether the ring holds no key (then nothing can be sealed or opened).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Seals a plain packet with the newest key; `None` without keys.
    pub fn seal(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let (id, key) = self.keys.last()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD);
        out.extend_from_slice(&MAGIC);
        out.push(SEALED_VERSION);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let (head, body) = out.split_at_mut(SEALED_HEADER_LEN);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&head[..AAD_LEN]),
                body,
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    /// Opens a sealed packet; returns the plain packet inside.
    pub fn open(&self, packet: &[u8]) -> Result<Vec<u8>, OpenError> {
        if !is_sealed(packet) {
            return Err(OpenError::NotSealed);
        }
        if packet.len() < AAD_LEN {
            return Err(OpenError::BadTag);
        }
        let id = u32::from_be_bytes([packet[3], packet[4], packet[5], packet[6]]);
        let key = self
            .keys
            .iter()
            .find(|(k, _)| *k == id)
            .map(|(_, k)| k)
            .ok_or(OpenError::UnknownKey)?;
        if packet.len() < OVERHEAD {
            return Err(OpenError::BadTag);
        }
        let nonce = Nonce::try_assume_unique_for_key(&packet[AAD_LEN..SEALED_HEADER_LEN])
            .map_err(|_| OpenError::BadTag)?;
        let mut buf = packet[SEALED_HEADER_LEN..].to_vec();
        let n = key
            .open_in_place(nonce, Aad::from(&packet[..AAD_LEN]), &mut buf)
            .map_err(|_| OpenError::BadTag)?
            .len();
        buf.truncate(n);
        Ok(buf)
    }
}

/// Whether `packet` claims to be sealed (magic and sealed version).
pub fn is_sealed(packet: &[u8]) -> bool {
    packet.len() >= 3 && packet[..2] == MAGIC && packet[2] == SEALED_VERSION
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u32) -> Key {
        let mut secret = [0u8; 32];
        secret[0] = id as u8;
        secret[31] = 0x5a;
        Key { id, secret }
    }

    fn ring(ids: &[u32]) -> Keyring {
        Keyring::new(&ids.iter().map(|i| key(*i)).collect::<Vec<_>>())
    }

    #[test]
    fn round_trip_hides_the_packet() {
        let r = ring(&[1]);
        let plain = b"MG\x01\x02 the endpoint 10.0.1.5 of web.1";
        let sealed = r.seal(plain).unwrap();
        assert_eq!(sealed.len(), plain.len() + OVERHEAD);
        assert!(!sealed.windows(8).any(|w| w == b"10.0.1.5"));
        assert_eq!(r.open(&sealed).unwrap(), plain);
        assert_ne!(r.seal(plain).unwrap(), sealed, "a fresh nonce each time");
        assert_eq!(r.open(&r.seal(b"").unwrap()).unwrap(), b"");
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let r = ring(&[4]);
        let sealed = r.seal(b"some gossip").unwrap();
        for i in 0..sealed.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = sealed.clone();
                bad[i] ^= bit;
                let e = r.open(&bad).unwrap_err();
                match i {
                    0..=2 => assert_eq!(e, OpenError::NotSealed, "byte {i}"),
                    // A flipped key ID names a key this ring does not hold.
                    3..=6 => assert_eq!(e, OpenError::UnknownKey, "byte {i}"),
                    _ => assert_eq!(e, OpenError::BadTag, "byte {i}"),
                }
            }
        }
    }

    #[test]
    fn truncated_and_wrong_key_packets_are_refused() {
        let r = ring(&[7]);
        let sealed = r.seal(b"some gossip").unwrap();
        for n in [3, 7, 10, SEALED_HEADER_LEN, OVERHEAD - 1, sealed.len() - 1] {
            assert_eq!(r.open(&sealed[..n]).unwrap_err(), OpenError::BadTag, "{n}");
        }
        // Same ID, other secret (a node that made up a key).
        let mut other = key(7);
        other.secret[5] = 1;
        let forged = Keyring::new(&[other]).seal(b"some gossip").unwrap();
        assert_eq!(r.open(&forged).unwrap_err(), OpenError::BadTag);
        assert_eq!(r.open(b"MG\x01plain").unwrap_err(), OpenError::NotSealed);
        assert_eq!(
            Keyring::default().open(&sealed).unwrap_err(),
            OpenError::UnknownKey
        );
        assert!(Keyring::default().seal(b"x").is_none());
    }

    #[test]
    fn unknown_key_ids_are_refused() {
        let sealed = ring(&[9]).seal(b"hello").unwrap();
        assert_eq!(
            ring(&[1, 2, 3]).open(&sealed).unwrap_err(),
            OpenError::UnknownKey
        );
    }

    #[test]
    fn rotation_overlaps_three_keys_and_refuses_older_ones() {
        // Node a still has keys 1..3 and seals with 3; node b already has 4 and seals with
        // it: both read each other.
        let (a, b) = (ring(&[1, 2, 3]), ring(&[2, 3, 4]));
        assert_eq!((a.primary(), b.primary()), (Some(3), Some(4)));
        assert_eq!(b.open(&a.seal(b"from a").unwrap()).unwrap(), b"from a");
        // b accepts 2, its oldest.
        let old = ring(&[2]).seal(b"old").unwrap();
        assert_eq!(b.open(&old).unwrap(), b"old");
        // Given four keys, a ring keeps the newest three: key 1 is refused from then on.
        let c = ring(&[4, 1, 3, 2]);
        assert_eq!(c.ids(), vec![2, 3, 4]);
        let oldest = ring(&[1]).seal(b"oldest").unwrap();
        assert_eq!(c.open(&oldest).unwrap_err(), OpenError::UnknownKey);
        assert_eq!(c.open(&old).unwrap(), b"old");
    }
}
