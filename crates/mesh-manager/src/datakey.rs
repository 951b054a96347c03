//! The managers' data key: 32 random bytes in `DATA_DIR/data.key` (0600), never in the Raft
//! log. It seals (AES-256-GCM, a fresh random nonce each time) the Raft store's log entries
//! and snapshots on disk (see `storage`), the data of secrets and the registry credentials
//! kept with services. Made at `swarm init`; every other manager fetches it over mutual TLS
//! from one that has it (answered to nodes the store says are managers) before it starts its
//! Raft instance; removed on leave and demotion. Until autolock wraps it (issue 15) it sits
//! beside the store: it protects copies of the store alone, as swarmkit's unwrapped DEK does.

use std::path::Path;

use mesh_api::ApiError;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};

/// The key's file in a manager's data directory.
pub const KEY_FILE: &str = "data.key";
/// What sealed data starts with (a format version).
pub const SEALED_MAGIC: &[u8; 4] = b"MSB1";

/// The managers' data key.
#[derive(Clone)]
pub struct DataKey([u8; 32]);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    pub fn generate() -> Result<DataKey, ApiError> {
        let mut k = [0u8; 32];
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| ApiError::internal("no randomness for the data key"))?;
        Ok(DataKey(k))
    }

    pub fn from_bytes(b: &[u8]) -> Option<DataKey> {
        b.try_into().ok().map(DataKey)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key in `dir`, if it is there.
    pub fn load(dir: &Path) -> Result<Option<DataKey>, ApiError> {
        match std::fs::read(dir.join(KEY_FILE)) {
            Ok(b) => DataKey::from_bytes(&b)
                .map(Some)
                .ok_or_else(|| ApiError::internal(format!("{KEY_FILE} is damaged"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ApiError::internal(format!("cannot read {KEY_FILE}: {e}"))),
        }
    }

    /// Writes the key in `dir` (mode 0600, atomically).
    pub fn save(&self, dir: &Path) -> Result<(), ApiError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = dir.join(format!("{KEY_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&self.0)?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join(KEY_FILE))
        };
        write().map_err(|e| ApiError::internal(format!("cannot write {KEY_FILE}: {e}")))
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0).expect("a 32-byte key"))
    }

    /// `MSB1 || nonce || ciphertext || tag`.
    pub fn seal(&self, data: &[u8]) -> Result<Vec<u8>, ApiError> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| ApiError::internal("no randomness to seal data"))?;
        let mut buf = data.to_vec();
        self.aead()
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .map_err(|_| ApiError::internal("cannot seal data"))?;
        let mut out = Vec::with_capacity(4 + nonce.len() + buf.len());
        out.extend_from_slice(SEALED_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    pub fn unseal(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
        let rest = sealed
            .strip_prefix(SEALED_MAGIC.as_slice())
            .ok_or("not sealed data")?;
        if rest.len() < aead::NONCE_LEN {
            return Err("sealed data too short".into());
        }
        let (nonce, ct) = rest.split_at(aead::NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce")?;
        let mut buf = ct.to_vec();
        let plain = self
            .aead()
            .open_in_place(nonce, Aad::empty(), &mut buf)
            .map_err(|_| "the data cannot be opened with this manager's data key")?;
        Ok(plain.to_vec())
    }
}

/// Whether `data` is sealed by [`DataKey::seal`] (else it is plain, as written before the
/// store was sealed).
pub fn is_sealed(data: &[u8]) -> bool {
    data.starts_with(SEALED_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_round_trips_and_hides_the_data() {
        let k = DataKey::generate().unwrap();
        let sealed = k.seal(b"hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(k.unseal(&sealed).unwrap(), b"hunter2");
        let other = DataKey::generate().unwrap();
        assert!(other.unseal(&sealed).is_err());
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(k.unseal(&bad).is_err());
        assert_ne!(
            k.seal(b"hunter2").unwrap(),
            sealed,
            "a fresh nonce each time"
        );
    }
}
