//! The managers' data key (DEK): 32 random bytes that never enter the Raft log. It seals
//! (AES-256-GCM, a fresh random nonce each time) the Raft store's log entries and snapshots on
//! disk (see `storage`), the data of secrets and the registry credentials kept with services.
//! Made at `swarm init`; every other manager fetches it over mutual TLS from one that has it
//! (answered to nodes the store says are managers) before it starts its Raft instance;
//! removed on leave and demotion.
//!
//! On disk (`DATA_DIR/data.key`, 0600) the DEK is **wrapped** by a key-encryption key (KEK),
//! as swarmkit does. Without autolock the KEK is written beside it, which protects copies of
//! the Raft store alone. With autolock the KEK is the cluster's unlock key (`SWMKEY-1-...`),
//! which is never written to a disk: a restarted manager cannot open its store, its secrets or
//! its TLS key until `swarm unlock` gives it the key. Each manager re-wraps its DEK when the
//! cluster's unlock key changes (autolock turned on or off, `unlock-key --rotate`); one that was
//! down meanwhile still opens with the key it was wrapped with, and re-wraps once it has caught
//! up, so the old key keeps working until every manager has the new one.

use std::path::Path;

use base64::Engine as _;
use mesh_api::{ApiError, ErrorKind};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

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

    /// The key in `dir`, if it is there and wrapped with a key kept beside it. A key wrapped
    /// with the unlock key gives [`ErrorKind::Locked`]. A file of an earlier version (the key
    /// unwrapped) is wrapped as it is read.
    pub fn load(dir: &Path) -> Result<Option<DataKey>, ApiError> {
        match read_file(dir)? {
            None => Ok(None),
            Some(Stored::Legacy(k)) => {
                k.save(dir, None)?;
                Ok(Some(k))
            }
            Some(Stored::Wrapped(f)) => match &f.kek {
                None => Err(ApiError::locked()),
                Some(kek) => {
                    let kek = DataKey::from_bytes(&b64(kek)?).ok_or_else(damaged)?;
                    f.open(&kek).map(Some).ok_or_else(damaged)
                }
            },
        }
    }

    /// Whether `dir` holds a key wrapped with the unlock key (the manager starts locked).
    pub fn is_locked(dir: &Path) -> bool {
        matches!(
            read_file(dir),
            Ok(Some(Stored::Wrapped(KeyFile { kek: None, .. })))
        )
    }

    /// The key in `dir`, unwrapped with the unlock key `key` (`SWMKEY-1-...`), and the unlock
    /// key's bytes. A wrong key, or a key not wrapped with any, is refused with Docker's words.
    pub fn unlock(dir: &Path, key: &str) -> Result<(DataKey, Vec<u8>), ApiError> {
        let invalid = || {
            ApiError::new(
                ErrorKind::InvalidArgument,
                "swarm could not be unlocked: invalid key provided",
            )
        };
        let kek = mesh_api::parse_unlock_key(key)
            .and_then(|b| DataKey::from_bytes(&b))
            .ok_or_else(invalid)?;
        match read_file(dir)? {
            Some(Stored::Wrapped(f)) if f.kek.is_none() => f
                .open(&kek)
                .map(|dek| (dek, kek.bytes().to_vec()))
                .ok_or_else(invalid),
            _ => Err(ApiError::invalid("swarm is not locked")),
        }
    }

    /// Writes the key in `dir` (mode 0600, atomically), wrapped with the unlock key when one
    /// is given (raw 32 bytes), else with a fresh key-encryption key written beside it.
    pub fn save(&self, dir: &Path, unlock_key: Option<&[u8]>) -> Result<(), ApiError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let (kek, beside) = match unlock_key {
            Some(k) => (
                DataKey::from_bytes(k).ok_or_else(|| ApiError::internal("a bad unlock key"))?,
                None,
            ),
            None => {
                let k = DataKey::generate()?;
                let b = B64.encode(k.bytes());
                (k, Some(b))
            }
        };
        let file = KeyFile {
            version: 2,
            kek: beside,
            dek: B64.encode(kek.seal(&self.0)?),
        };
        let bytes = serde_json::to_vec(&file).map_err(ApiError::internal)?;
        let tmp = dir.join(format!("{KEY_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, dir.join(KEY_FILE))?;
            std::fs::File::open(dir)?.sync_all()
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

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `data.key` as written since autolock: the DEK sealed with the KEK, and the KEK itself
/// when autolock is off.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kek: Option<String>,
    dek: String,
}

impl KeyFile {
    fn open(&self, kek: &DataKey) -> Option<DataKey> {
        let sealed = B64.decode(&self.dek).ok()?;
        DataKey::from_bytes(&kek.unseal(&sealed).ok()?)
    }
}

enum Stored {
    /// 32 raw bytes, as written before the key was wrapped.
    Legacy(DataKey),
    Wrapped(KeyFile),
}

fn damaged() -> ApiError {
    ApiError::internal(format!("{KEY_FILE} is damaged"))
}

fn b64(s: &str) -> Result<Vec<u8>, ApiError> {
    B64.decode(s).map_err(|_| damaged())
}

fn read_file(dir: &Path) -> Result<Option<Stored>, ApiError> {
    let b = match std::fs::read(dir.join(KEY_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ApiError::internal(format!("cannot read {KEY_FILE}: {e}"))),
    };
    if b.len() == 32 {
        return Ok(Some(Stored::Legacy(
            DataKey::from_bytes(&b).ok_or_else(damaged)?,
        )));
    }
    serde_json::from_slice(&b)
        .map(|f| Some(Stored::Wrapped(f)))
        .map_err(|_| damaged())
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
    fn the_key_file_is_wrapped_beside_or_with_the_unlock_key() {
        let dir = tempfile::tempdir().unwrap();
        let dek = DataKey::generate().unwrap();
        dek.save(dir.path(), None).unwrap();
        let raw = std::fs::read(dir.path().join(KEY_FILE)).unwrap();
        assert!(!raw.windows(32).any(|w| w == dek.bytes()), "never plain");
        assert!(!DataKey::is_locked(dir.path()));
        assert_eq!(
            DataKey::load(dir.path()).unwrap().unwrap().bytes(),
            dek.bytes()
        );

        let unlock = DataKey::generate().unwrap();
        let human = mesh_api::human_unlock_key(&B64.encode(unlock.bytes()));
        dek.save(dir.path(), Some(unlock.bytes())).unwrap();
        let raw = std::fs::read_to_string(dir.path().join(KEY_FILE)).unwrap();
        assert!(
            !raw.contains(&B64.encode(unlock.bytes())),
            "the unlock key is not written"
        );
        assert!(DataKey::is_locked(dir.path()));
        assert_eq!(
            DataKey::load(dir.path()).unwrap_err().kind,
            ErrorKind::Locked
        );
        let (opened, kek) = DataKey::unlock(dir.path(), &human).unwrap();
        assert_eq!(opened.bytes(), dek.bytes());
        assert_eq!(kek, unlock.bytes());
        let other = mesh_api::human_unlock_key(&B64.encode(DataKey::generate().unwrap().bytes()));
        for wrong in [other.as_str(), "wrong-secret-key", "SWMKEY-1-abc", ""] {
            let e = DataKey::unlock(dir.path(), wrong).unwrap_err();
            assert_eq!(
                e.message,
                "swarm could not be unlocked: invalid key provided"
            );
        }
    }

    #[test]
    fn a_legacy_key_file_still_loads_and_is_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let dek = DataKey::generate().unwrap();
        std::fs::write(dir.path().join(KEY_FILE), dek.bytes()).unwrap();
        assert_eq!(
            DataKey::load(dir.path()).unwrap().unwrap().bytes(),
            dek.bytes()
        );
    }

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
