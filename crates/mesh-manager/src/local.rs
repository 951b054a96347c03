//! What a node keeps about itself in `--data-dir`: identity, certificates, role and the managers
//! it knows. A manager's TLS key is written sealed with its data key (see `datakey`), so a
//! locked manager's disk holds no usable identity either. Written atomically (temporary file, fsync, rename, fsync of the directory), so a
//! daemon killed mid-write finds either the old or the new file, never a torn one.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use mesh_api::NodeRole;
use serde::{Deserialize, Serialize};

/// Errors reading or writing the local state.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt node state {path}: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The node's own record of its swarm membership.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalState {
    pub node_id: String,
    pub cluster_id: String,
    pub role: NodeRole,
    pub raft_id: u64,
    pub ca_cert_pem: String,
    pub cert_pem: String,
    /// The node's TLS key (PEM). Empty on a manager's disk, where `key_sealed` holds it.
    pub key_pem: String,
    /// The TLS key sealed with the data key (base64), on a manager's disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sealed: Option<String>,
    /// Control address this node advertises (`IP:PORT`).
    pub advertise_addr: String,
    /// Address the control port listens on.
    pub listen_addr: String,
    /// Control addresses of the managers, last known.
    pub managers: Vec<String>,
}

const FILE: &str = "node.json";

impl LocalState {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE)
    }

    /// Loads the state, or `None` if this node is in no swarm.
    pub fn load(data_dir: &Path) -> Result<Option<LocalState>, LocalError> {
        let path = Self::path(data_dir);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| LocalError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LocalError::Read { path, source }),
        }
    }

    /// Writes the state with the TLS key in the clear (a worker's).
    pub fn save(&self, data_dir: &Path) -> Result<(), LocalError> {
        let mut plain = self.clone();
        plain.key_sealed = None;
        let bytes = serde_json::to_vec_pretty(&plain).expect("local state serializes");
        write_atomic(&Self::path(data_dir), &bytes)
    }

    /// Writes the state with the TLS key sealed with the data key (a manager's).
    pub fn save_sealed(
        &self,
        data_dir: &Path,
        dek: &crate::datakey::DataKey,
    ) -> Result<(), mesh_api::ApiError> {
        use base64::Engine as _;
        let mut sealed = self.clone();
        sealed.key_sealed = Some(
            base64::engine::general_purpose::STANDARD.encode(dek.seal(self.key_pem.as_bytes())?),
        );
        sealed.key_pem = String::new();
        let bytes = serde_json::to_vec_pretty(&sealed).expect("local state serializes");
        write_atomic(&Self::path(data_dir), &bytes).map_err(mesh_api::ApiError::internal)
    }

    /// Whether the TLS key was read sealed and waits for [`Self::open_key`].
    pub fn key_is_sealed(&self) -> bool {
        self.key_sealed.is_some()
    }

    /// Opens a sealed TLS key with the data key.
    pub fn open_key(&mut self, dek: &crate::datakey::DataKey) -> Result<(), mesh_api::ApiError> {
        use base64::Engine as _;
        let Some(sealed) = self.key_sealed.take() else {
            return Ok(());
        };
        let bad = || {
            mesh_api::ApiError::internal("the node's TLS key cannot be opened with the data key")
        };
        let b = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|_| bad())?;
        let plain = dek.unseal(&b).map_err(|_| bad())?;
        self.key_pem = String::from_utf8(plain).map_err(|_| bad())?;
        Ok(())
    }

    pub fn remove(data_dir: &Path) -> Result<(), LocalError> {
        let path = Self::path(data_dir);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LocalError::Write { path, source }),
        }
    }
}

/// Writes `bytes` to `path` so that readers see the old or the new content, whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LocalError> {
    let err = |source| LocalError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(err)?;
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(err)?;
        f.write_all(bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

/// Parses `IP`, `IP:PORT` or `:PORT` with a default port.
pub fn parse_addr(
    s: &str,
    default_ip: Option<IpAddr>,
    default_port: u16,
) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| format!("invalid address: {s}"))?;
        let ip =
            default_ip.ok_or_else(|| format!("invalid address: {s}: an IP address is needed"))?;
        return Ok(SocketAddr::new(ip, port));
    }
    Err(format!("invalid address: {s} (expected IP or IP:PORT)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_addr_forms() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            parse_addr("10.0.0.2", None, 2377).unwrap().to_string(),
            "10.0.0.2:2377"
        );
        assert_eq!(
            parse_addr("10.0.0.2:99", None, 2377).unwrap().to_string(),
            "10.0.0.2:99"
        );
        assert_eq!(
            parse_addr(":4000", Some(ip), 2377).unwrap().to_string(),
            "10.0.0.1:4000"
        );
        assert!(parse_addr("nonsense", Some(ip), 2377).is_err());
        assert!(parse_addr(":x", Some(ip), 2377).is_err());
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert!(!p.with_extension("tmp").exists());
    }
}
