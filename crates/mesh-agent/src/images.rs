//! The real image store of the agent and the local API: `mesh-image` (pulls, a
//! content-addressed store under `--data-dir`, layers unpacked for overlayfs) behind the
//! agent's `Images` seam, with the node's registry logins (`mesh login`) used for pulls
//! that bring no credentials of their own. The seam is blocking; the store is async, so each call runs on the
//! daemon's runtime from the blocking thread it is made on.

use std::path::Path;

use crate::runtime::{ImageRun, Images};
use mesh_api::{ApiError, ErrorKind, ImageSummary, RegistryCredentials};
use mesh_image::login::{normalise_server, Logins};
use mesh_image::{Credentials, Image, ImageError, Reference, Store};
use tokio::runtime::Handle;

pub struct StoreImages {
    store: Store,
    logins: Logins,
    rt: Handle,
    metrics: crate::metrics::PullMetrics,
}

impl StoreImages {
    pub fn new(
        store: Store,
        logins: Logins,
        rt: Handle,
        metrics: crate::metrics::PullMetrics,
    ) -> StoreImages {
        StoreImages {
            store,
            logins,
            rt,
            metrics,
        }
    }

    /// The given credentials, else this node's login for the reference's registry.
    fn credentials(
        &self,
        r: &Reference,
        auth: Option<&RegistryCredentials>,
    ) -> Option<Credentials> {
        match auth {
            Some(c) => Some(Credentials {
                username: c.username.clone(),
                password: c.password.clone(),
            }),
            None => self.logins.get(r.registry()),
        }
    }
}

fn parse(reference: &str) -> Result<Reference, ApiError> {
    Reference::parse(reference).map_err(api_error)
}

/// The store's error as the API's: its kind, its words.
fn api_error(e: ImageError) -> ApiError {
    let kind = match &e {
        ImageError::Invalid(_) => ErrorKind::InvalidArgument,
        ImageError::NotFound(_) => ErrorKind::NotFound,
        ImageError::Unauthorized(_) => ErrorKind::PermissionDenied,
        ImageError::Unreachable(_) | ImageError::Verification(_) | ImageError::Registry(_) => {
            ErrorKind::Unavailable
        }
        ImageError::Io(_) => ErrorKind::Internal,
    };
    ApiError::new(kind, e)
}

fn run_of(image: Image) -> ImageRun {
    // The init layer is the topmost lower layer: the task's mount points, made once.
    let mut layers = image.layers;
    layers.extend(image.init);
    ImageRun {
        reference: image.reference.to_string(),
        layers,
        entrypoint: image.config.entrypoint,
        cmd: image.config.cmd,
        env: image.config.env,
        working_dir: image.config.working_dir,
        user: image.config.user,
        healthcheck: image.config.healthcheck.map(|h| mesh_api::HealthConfig {
            test: h.test,
            interval_ms: h.interval.div_ceil(1_000_000),
            timeout_ms: h.timeout.div_ceil(1_000_000),
            start_period_ms: h.start_period.div_ceil(1_000_000),
            retries: h.retries,
        }),
    }
}

impl Images for StoreImages {
    fn normalise(&self, reference: &str) -> Result<String, ApiError> {
        parse(reference).map(|r| r.to_string())
    }

    fn pin(&self, reference: &str, auth: Option<&RegistryCredentials>) -> Result<String, ApiError> {
        let r = parse(reference)?;
        let creds = self.credentials(&r, auth);
        let digest = self
            .rt
            .block_on(self.store.resolve(&r, creds.as_ref()))
            .map_err(api_error)?;
        Ok(r.with_digest(&digest).to_string())
    }

    fn local(&self, reference: &str) -> Option<ImageRun> {
        let r = parse(reference).ok()?;
        r.digest()?;
        self.store.get(&r).map(run_of)
    }

    /// As Docker's executor: a tag is pulled every time (mutable tags stay current), but a
    /// failed pull of a tag the store already has (loaded, or pulled before) only warns and
    /// the stored image runs, so a registry that is down or unknown does not stop it.
    fn pull(
        &self,
        reference: &str,
        auth: Option<&RegistryCredentials>,
    ) -> Result<ImageRun, ApiError> {
        let r = parse(reference)?;
        let creds = self.credentials(&r, auth);
        let started = std::time::Instant::now();
        let pulled = self.rt.block_on(self.store.pull(&r, creds.as_ref()));
        let secs = started.elapsed().as_secs_f64();
        match pulled {
            Ok(image) => {
                self.metrics.count("success", secs);
                Ok(run_of(image))
            }
            Err(e) => match self.store.get(&r) {
                Some(image) => {
                    self.metrics.count("local", secs);
                    tracing::warn!(image = %r, "pulling image failed, using the local image: {e}");
                    Ok(run_of(image))
                }
                None => {
                    self.metrics.count("failure", secs);
                    Err(api_error(e))
                }
            },
        }
    }

    fn login(&self, server: &str, credentials: &RegistryCredentials) -> Result<String, ApiError> {
        let creds = Credentials {
            username: credentials.username.clone(),
            password: credentials.password.clone(),
        };
        self.rt
            .block_on(self.store.check_login(server, &creds))
            .map_err(|e| match e {
                // A registry that does not know the login endpoint cannot check it.
                ImageError::NotFound(m) => ApiError::new(ErrorKind::Unavailable, m),
                other => api_error(other),
            })?;
        self.logins.set(server, creds).map_err(api_error)?;
        Ok(normalise_server(server))
    }

    fn logout(&self, server: &str) -> Result<bool, ApiError> {
        self.logins.remove(server).map_err(api_error)
    }

    fn node_login(&self, reference: &str) -> Option<RegistryCredentials> {
        let r = parse(reference).ok()?;
        self.logins.get(r.registry()).map(|c| RegistryCredentials {
            username: c.username,
            password: c.password,
        })
    }

    fn ls(&self) -> Result<Vec<ImageSummary>, ApiError> {
        Ok(self
            .store
            .list()
            .into_iter()
            .map(|i| ImageSummary {
                repository: i.repository,
                tag: i.tag,
                digest: i.digest.unwrap_or_else(|| "<none>".into()),
                id: i.id,
                created: i.created.unwrap_or_default(),
                size: i.size,
            })
            .collect())
    }

    fn rm(&self, reference: &str) -> Result<serde_json::Value, ApiError> {
        let r = parse(reference)?;
        let report = self.store.remove(&r).map_err(api_error)?;
        let items = report
            .untagged
            .into_iter()
            .map(|n| serde_json::json!({ "Untagged": n }))
            .chain(
                report
                    .deleted
                    .into_iter()
                    .map(|d| serde_json::json!({ "Deleted": d })),
            );
        Ok(serde_json::Value::Array(items.collect()))
    }

    fn prune(&self, keep: &[String]) -> Result<serde_json::Value, ApiError> {
        let keep = keep
            .iter()
            .filter_map(|k| Reference::parse(k).ok())
            .collect::<Vec<_>>();
        let report = self.store.prune(&keep).map_err(api_error)?;
        let mut deleted = report.untagged;
        deleted.extend(report.deleted);
        Ok(serde_json::json!({
            "deleted": deleted,
            "reclaimed": report.space_reclaimed,
        }))
    }

    fn load(&self, path: &str) -> Result<Vec<String>, ApiError> {
        self.store
            .load(Path::new(path))
            .map(|refs| refs.iter().map(|r| r.familiar()).collect())
            .map_err(api_error)
    }
}
