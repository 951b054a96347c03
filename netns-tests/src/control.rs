//! A node's identity on disk and its control port, seen from a test: `node.json`, the
//! certificate, key and root a worker keeps in it, and one request sent on a manager's
//! control port (2377) with such an identity through `openssl s_client`, the way another
//! program holding a copy of those files would.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::Host;

/// `h`'s `node.json`.
pub fn node_json(h: &Host) -> Result<serde_json::Value> {
    let path = h.data_dir().join("node.json");
    let s = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    Ok(serde_json::from_str(&s)?)
}

/// One request on `h`'s control port, sent from `from`'s namespace with the certificate
/// and key in `dir` (`cert.pem`, `key.pem`, `ca.pem`): the answer's bytes as text.
pub fn control_call(from: &Host, to: &Host, dir: &Path, req: &serde_json::Value) -> Result<String> {
    let body = serde_json::to_vec(req)?;
    let mut frame = u32::try_from(body.len())?.to_be_bytes().to_vec();
    frame.extend(body);
    let req_path = dir.join("request");
    std::fs::write(&req_path, frame)?;
    let d = dir.display();
    let script = format!(
        "timeout 4 openssl s_client -quiet -ign_eof -connect {}:2377 -servername mesh-node \
         -cert {d}/cert.pem -key {d}/key.pem -CAfile {d}/ca.pem < {} 2>/dev/null; true",
        to.addr(),
        req_path.display()
    );
    let out = from.exec_timeout(&["sh", "-c", &script], Duration::from_secs(10))?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Writes `h`'s certificate, key and CA from its `node.json` into `dir`.
pub fn save_identity(h: &Host, dir: &Path) -> Result<String> {
    let v = node_json(h)?;
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    ensure!(
        !s("key_pem").is_empty(),
        "{}: no plain key (a worker's)",
        h.name()
    );
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("cert.pem"), s("cert_pem"))?;
    std::fs::write(dir.join("key.pem"), s("key_pem"))?;
    std::fs::write(dir.join("ca.pem"), s("ca_cert_pem"))?;
    Ok(s("node_id"))
}
