//! `mesh login`: credentials checked with the registry as `docker login` checks them, and
//! the node's saved logins (`DATA_DIR/registry-auth.json`, mode 0600, as Docker's
//! `config.json` keeps them without a credential helper), used for its pulls.
//!
//! The check: `GET /v2/` with the credentials; a `Basic` registry answers 200 or 401; a
//! `Bearer` registry (Docker Hub, most hosted ones) answers 401 with a challenge, and the
//! credentials are then good if its token service gives a token for them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ImageError;
use crate::reference::DOCKER_HUB;
use crate::{Credentials, Store};

/// The file of saved logins in the data directory.
pub const LOGINS_FILE: &str = "registry-auth.json";

/// A registry as `mesh login` names it: `HOST[:PORT]`, Docker Hub as `docker.io` (also
/// for `index.docker.io` and `https://index.docker.io/v1/`, Docker's names of it).
pub fn normalise_server(server: &str) -> String {
    let s = server.trim();
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "" | "docker.io" | "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        _ => host,
    }
}

#[derive(Default, Serialize, Deserialize)]
struct LoginsFile {
    #[serde(default)]
    auths: BTreeMap<String, SavedLogin>,
}

#[derive(Clone, Serialize, Deserialize)]
struct SavedLogin {
    username: String,
    password: String,
}

/// The node's saved logins.
pub struct Logins {
    path: PathBuf,
    map: Mutex<BTreeMap<String, Credentials>>,
}

impl Logins {
    /// The logins saved in `dir` (none if the file is not there).
    pub fn open(dir: &Path) -> Result<Logins, ImageError> {
        let path = dir.join(LOGINS_FILE);
        let file: LoginsFile = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ImageError::Invalid(format!("{} is damaged: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LoginsFile::default(),
            Err(e) => {
                return Err(ImageError::Invalid(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        let map = file
            .auths
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    Credentials {
                        username: v.username,
                        password: v.password,
                    },
                )
            })
            .collect();
        Ok(Logins {
            path,
            map: Mutex::new(map),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Credentials>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The saved login for a registry (as a reference names it).
    pub fn get(&self, registry: &str) -> Option<Credentials> {
        self.lock().get(&normalise_server(registry)).cloned()
    }

    pub fn set(&self, registry: &str, creds: Credentials) -> Result<(), ImageError> {
        let mut map = self.lock();
        map.insert(normalise_server(registry), creds);
        self.save(&map)
    }

    /// Forgets a registry's login; whether there was one.
    pub fn remove(&self, registry: &str) -> Result<bool, ImageError> {
        let mut map = self.lock();
        let had = map.remove(&normalise_server(registry)).is_some();
        if had {
            self.save(&map)?;
        }
        Ok(had)
    }

    /// Written whole, atomically (temporary file, fsync, rename), mode 0600.
    fn save(&self, map: &BTreeMap<String, Credentials>) -> Result<(), ImageError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let file = LoginsFile {
            auths: map
                .iter()
                .map(|(k, c)| {
                    (
                        k.clone(),
                        SavedLogin {
                            username: c.username.clone(),
                            password: c.password.clone(),
                        },
                    )
                })
                .collect(),
        };
        let body = serde_json::to_vec_pretty(&file)
            .map_err(|e| ImageError::Invalid(format!("saving logins: {e}")))?;
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write()
            .map_err(|e| ImageError::Invalid(format!("cannot write {}: {e}", self.path.display())))
    }
}

fn unauthorized() -> ImageError {
    ImageError::Unauthorized("unauthorized: incorrect username or password".into())
}

/// `key="value"` pairs of a `WWW-Authenticate` challenge's parameters.
fn challenge_params(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = &rest[eq + 1..];
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        out.insert(key, value.to_string());
        rest = next;
    }
    out
}

impl Store {
    /// Whether the registry takes these credentials (`docker login`'s check).
    pub async fn check_login(&self, server: &str, creds: &Credentials) -> Result<(), ImageError> {
        let host = match normalise_server(server).as_str() {
            DOCKER_HUB => "registry-1.docker.io".to_string(),
            h => h.to_string(),
        };
        let scheme = if self.is_insecure(&host) {
            "http"
        } else {
            "https"
        };
        let url = format!("{scheme}://{host}/v2/");
        let mut roots = Vec::new();
        for pem in self.registry_roots(&host)? {
            roots.push(reqwest::Certificate::from_pem(&pem).map_err(|e| {
                ImageError::Invalid(format!("a CA certificate for {host} does not parse: {e}"))
            })?);
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .tls_certs_merge(roots)
            .build()
            .map_err(|e| ImageError::Invalid(format!("registry client: {e}")))?;
        let fail = |e: reqwest::Error| ImageError::Registry(format!("Get \"{url}\": {e}"));
        let res = client
            .get(&url)
            .basic_auth(&creds.username, Some(&creds.password))
            .send()
            .await
            .map_err(fail)?;
        match res.status().as_u16() {
            200..=299 => return Ok(()),
            401 => {}
            code => {
                return Err(ImageError::Registry(format!(
                    "Get \"{url}\": unexpected status {code}"
                )))
            }
        }
        let challenge = res
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let Some(params) = challenge
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("bearer "))
            .map(|_| challenge_params(&challenge[7..]))
        else {
            // Basic (or no challenge): the credentials were refused.
            return Err(unauthorized());
        };
        let realm = params.get("realm").ok_or_else(|| {
            ImageError::Registry(format!("{url}: a Bearer challenge without a realm"))
        })?;
        let mut token = client
            .get(realm.as_str())
            .basic_auth(&creds.username, Some(&creds.password));
        let mut query = vec![("account", creds.username.clone())];
        if let Some(service) = params.get("service") {
            query.push(("service", service.clone()));
        }
        token = token.query(&query);
        let res = token.send().await.map_err(fail)?;
        match res.status().as_u16() {
            200..=299 => Ok(()),
            401 | 403 => Err(unauthorized()),
            code => Err(ImageError::Registry(format!(
                "{realm}: unexpected status {code}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_as_docker_names_them() {
        assert_eq!(normalise_server(""), "docker.io");
        assert_eq!(normalise_server("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalise_server("10.0.0.1:5000"), "10.0.0.1:5000");
        assert_eq!(
            normalise_server("http://Reg.example:5000/x"),
            "reg.example:5000"
        );
    }

    #[test]
    fn challenges_parse() {
        let p = challenge_params(
            r#"realm="https://auth.docker.io/token",service="registry.docker.io",scope="a,b""#,
        );
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "a,b");
    }

    #[test]
    fn logins_are_saved_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let l = Logins::open(dir.path()).unwrap();
        assert!(l.get("docker.io").is_none());
        let c = Credentials {
            username: "u".into(),
            password: "p".into(),
        };
        l.set("https://index.docker.io/v1/", c.clone()).unwrap();
        l.set("10.0.0.1:5000", c.clone()).unwrap();
        let mode = std::fs::metadata(dir.path().join(LOGINS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Logins::open(dir.path()).unwrap();
        assert_eq!(again.get("docker.io"), Some(c.clone()));
        assert!(again.remove("10.0.0.1:5000").unwrap());
        assert!(!again.remove("10.0.0.1:5000").unwrap());
        assert!(Logins::open(dir.path())
            .unwrap()
            .get("10.0.0.1:5000")
            .is_none());
    }
}
