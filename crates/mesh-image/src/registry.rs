//! The registry side of a pull, on `oci-client` (OCI distribution v2: token and basic auth,
//! HTTPS with the system roots through rustls + ring, plus a registry's own CAs from Docker's
//! `certs.d` layout, plain HTTP only for the insecure registries and `http://` mirrors), and
//! the translation of its errors into Docker's wording ([`ImageError`]).

use std::collections::HashMap;
use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use tokio::io::AsyncWriteExt;

use crate::error::{ImageError, IoContext};
use crate::reference::{Reference, DOCKER_HUB};
use crate::Credentials;

/// Which client: the credentials (oci-client keeps the first credentials it is given for a
/// registry), and the registry when it has CAs of its own.
type ClientKey = (Option<(String, String)>, Option<String>);

/// The clients and where a reference is pulled from.
pub(crate) struct Registries {
    insecure: Vec<String>,
    mirrors: Vec<String>,
    /// Docker's `certs.d`: `DIR/HOST:PORT/*.crt`.
    certs_dir: Option<PathBuf>,
    clients: Mutex<HashMap<ClientKey, oci_client::Client>>,
    /// Blobs (configs and layers) downloaded, for tests and metrics.
    pub(crate) blob_fetches: AtomicU64,
}

/// One registry (or mirror) to talk to about one repository.
#[derive(Clone)]
pub(crate) struct Remote {
    client: oci_client::Client,
    auth: RegistryAuth,
    /// The registry host as addressed (a mirror's host for a mirrored pull).
    pub(crate) host: String,
    repository: String,
}

impl Registries {
    pub(crate) fn new(
        insecure: Vec<String>,
        mirrors: Vec<String>,
        certs_dir: Option<PathBuf>,
    ) -> Result<Registries, ImageError> {
        // reqwest is built without a default crypto provider, so that only ring is linked;
        // it uses the process default, installed here once if nobody did.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut insecure = insecure;
        let mut hosts = Vec::new();
        for m in mirrors {
            let (scheme, rest) = m.split_once("://").unwrap_or(("https", m.as_str()));
            let host = rest.split('/').next().unwrap_or("").to_string();
            if host.is_empty() || !(scheme == "http" || scheme == "https") {
                return Err(ImageError::Invalid(format!("invalid registry mirror: {m}")));
            }
            if scheme == "http" {
                insecure.push(host.clone());
            }
            hosts.push(host);
        }
        Ok(Registries {
            insecure,
            mirrors: hosts,
            certs_dir,
            clients: Mutex::new(HashMap::new()),
            blob_fetches: AtomicU64::new(0),
        })
    }

    /// Whether `host` is reached over plain HTTP.
    pub(crate) fn is_insecure(&self, host: &str) -> bool {
        self.insecure.iter().any(|h| h == host)
    }

    /// The CA certificates (PEM) trusted for `host` beyond the system roots: the `*.crt`
    /// files of `certs.d/HOST:PORT/`, as Docker reads them (read at each new client, so a CA
    /// added later applies without a restart).
    pub(crate) fn roots(&self, host: &str) -> Result<Vec<Vec<u8>>, ImageError> {
        let Some(dir) = &self.certs_dir else {
            return Ok(Vec::new());
        };
        // A host name with `..` or a `/` is nobody's directory.
        if host.is_empty() || host.contains('/') || host.contains("..") {
            return Ok(Vec::new());
        }
        let dir = dir.join(host);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ImageError::io("reading", &dir, e)),
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "crt"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| std::fs::read(f).map_err(|e| ImageError::io("reading", f, e)))
            .collect()
    }

    fn client(
        &self,
        auth: Option<&Credentials>,
        host: &str,
    ) -> Result<oci_client::Client, ImageError> {
        let roots = self.roots(host)?;
        let key = (
            auth.map(|c| (c.username.clone(), c.password.clone())),
            (!roots.is_empty()).then(|| host.to_string()),
        );
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.insecure.clone()),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(120)),
            platform_resolver: None,
            extra_root_certificates: roots
                .into_iter()
                .map(|data| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data,
                })
                .collect(),
            ..ClientConfig::default()
        };
        let client = oci_client::Client::try_from(config)
            .map_err(|e| ImageError::Invalid(format!("registry client: {e}")))?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Where to pull `r` from, in order: the mirrors first for Docker Hub, then the registry.
    pub(crate) fn remotes(
        &self,
        r: &Reference,
        auth: Option<&Credentials>,
    ) -> Result<Vec<Remote>, ImageError> {
        let reg_auth = match auth {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let mut hosts: Vec<String> = Vec::new();
        if r.registry() == DOCKER_HUB {
            hosts.extend(self.mirrors.iter().cloned());
        }
        hosts.push(r.registry().to_string());
        hosts
            .into_iter()
            .map(|host| {
                Ok(Remote {
                    client: self.client(auth, &host)?,
                    // Credentials are for the registry named, not for mirrors.
                    auth: if host == r.registry() {
                        reg_auth.clone()
                    } else {
                        RegistryAuth::Anonymous
                    },
                    host,
                    repository: r.repository().to_string(),
                })
            })
            .collect()
    }
}

impl Remote {
    fn oref(&self, tag_or_digest: &str) -> oci_client::Reference {
        if tag_or_digest.contains(':') {
            oci_client::Reference::with_digest(
                self.host.clone(),
                self.repository.clone(),
                tag_or_digest.to_string(),
            )
        } else {
            oci_client::Reference::with_tag(
                self.host.clone(),
                self.repository.clone(),
                tag_or_digest.to_string(),
            )
        }
    }

    /// The digest `tag_or_digest` names now (HEAD, or GET and hash).
    pub(crate) async fn digest(
        &self,
        r: &Reference,
        tag_or_digest: &str,
    ) -> Result<String, ImageError> {
        self.client
            .fetch_manifest_digest(&self.oref(tag_or_digest), &self.auth)
            .await
            .map_err(|e| map_error(e, r))
    }

    /// A manifest or index, and its digest (checked by oci-client against the digest asked
    /// for or the registry's header; the caller checks it again).
    pub(crate) async fn manifest(
        &self,
        r: &Reference,
        tag_or_digest: &str,
    ) -> Result<(Vec<u8>, String), ImageError> {
        let (body, digest) = self
            .client
            .pull_manifest_raw(
                &self.oref(tag_or_digest),
                &self.auth,
                crate::manifest::ACCEPTED,
            )
            .await
            .map_err(|e| map_error(e, r))?;
        Ok((body.to_vec(), digest))
    }

    /// Downloads blob `digest` into `path` (created), fsynced; oci-client checks the digest
    /// while streaming, and the caller checks it again while reading.
    pub(crate) async fn blob_to_file(
        &self,
        r: &Reference,
        digest: &str,
        path: &Path,
        counter: &Arc<crate::store::Inner>,
    ) -> Result<(), ImageError> {
        counter
            .registries
            .blob_fetches
            .fetch_add(1, Ordering::Relaxed);
        let mut file = tokio::fs::File::create(path).await.ctx("creating", path)?;
        self.client
            .pull_blob(&self.oref(digest), digest, &mut file)
            .await
            .map_err(|e| map_error(e, r))?;
        // Not synced: the file is read back at once, checked and unpacked (the unpacked layer
        // is what is synced), then removed.
        file.flush().await.ctx("writing", path)?;
        Ok(())
    }

    /// Downloads a small blob (a config) into memory.
    pub(crate) async fn blob(
        &self,
        r: &Reference,
        digest: &str,
        counter: &Arc<crate::store::Inner>,
    ) -> Result<Vec<u8>, ImageError> {
        counter
            .registries
            .blob_fetches
            .fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::new();
        self.client
            .pull_blob(&self.oref(digest), digest, &mut out)
            .await
            .map_err(|e| map_error(e, r))?;
        Ok(out)
    }
}

/// Docker's wording for what the registry said about `r`.
pub(crate) fn map_error(e: OciDistributionError, r: &Reference) -> ImageError {
    let not_found = |detail: &str| {
        ImageError::NotFound(format!(
            "manifest for {} not found: manifest unknown: {detail}",
            r.familiar()
        ))
    };
    match e {
        OciDistributionError::RegistryError { envelope, url } => {
            let Some(first) = envelope.errors.first() else {
                return ImageError::Registry(format!("error from registry at {url}"));
            };
            let msg = if first.message.is_empty() {
                format!("{:?}", first.code).to_lowercase()
            } else {
                first.message.clone()
            };
            match first.code {
                OciErrorCode::ManifestUnknown
                | OciErrorCode::NameUnknown
                | OciErrorCode::BlobUnknown
                | OciErrorCode::NotFound => not_found(&msg),
                OciErrorCode::Unauthorized => ImageError::Unauthorized(format!("unauthorized: {msg}")),
                OciErrorCode::Denied => ImageError::Unauthorized(format!(
                    "pull access denied for {}, repository does not exist or may require 'docker login': denied: {msg}",
                    r.familiar_name()
                )),
                OciErrorCode::Toomanyrequests => ImageError::Registry(format!("toomanyrequests: {msg}")),
                _ => ImageError::Registry(format!("error from registry: {msg}")),
            }
        }
        OciDistributionError::ImageManifestNotFoundError(m) => not_found(&m),
        OciDistributionError::UnauthorizedError { .. } => {
            ImageError::Unauthorized("unauthorized: authentication required".to_string())
        }
        OciDistributionError::AuthenticationFailure(m) => {
            ImageError::Unauthorized(format!("unauthorized: {}", m.trim()))
        }
        OciDistributionError::ServerError { code, url, message } => match code {
            404 => not_found(if message.is_empty() {
                "not found"
            } else {
                message.trim()
            }),
            401 | 403 => ImageError::Unauthorized(format!(
                "unauthorized: {}",
                if message.is_empty() {
                    "authentication required"
                } else {
                    message.trim()
                }
            )),
            _ => ImageError::Registry(format!(
                "received unexpected HTTP status: {code} from {url}: {}",
                message.trim()
            )),
        },
        OciDistributionError::RequestError(e) => {
            // reqwest's own message repeats the URL: name it once, then the causes.
            let mut causes = Vec::new();
            let mut src = e.source();
            while let Some(s) = src {
                causes.push(s.to_string());
                src = s.source();
            }
            let chain = if causes.is_empty() {
                e.to_string()
            } else {
                causes.join(": ")
            };
            let url = e
                .url()
                .map(|u| u.to_string())
                .unwrap_or_else(|| r.registry().to_string());
            ImageError::Unreachable(format!("Get \"{url}\": {chain}"))
        }
        OciDistributionError::DigestError(d) => ImageError::Verification(format!(
            "content of {} failed verification: {d}",
            r.familiar()
        )),
        OciDistributionError::IoError(e) => {
            ImageError::Io(format!("pulling {}: {e}", r.familiar()))
        }
        OciDistributionError::UnsupportedMediaTypeError(m)
        | OciDistributionError::IncompatibleLayerMediaTypeError(m) => {
            ImageError::Invalid(format!("unsupported media type: {m}"))
        }
        other => ImageError::Registry(format!("error pulling {}: {other}", r.familiar())),
    }
}
