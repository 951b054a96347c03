//! The store's one error type, [`ImageError`]: each variant is a kind the caller can match
//! (a task is Rejected with the message), and the messages follow Docker's wording.

use std::io;
use std::path::Path;

/// What went wrong, with Docker's message.
///
/// Cloneable (messages only) so that one coalesced pull can hand its error to every waiter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// A reference, manifest, config or archive that cannot be used
    /// (`invalid reference format`, an unsupported media type, no linux/amd64 image).
    #[error("{0}")]
    Invalid(String),
    /// The image is not in the local store (`No such image: REF`) or the registry does not
    /// know it (`manifest for REF not found: manifest unknown: ...`).
    #[error("{0}")]
    NotFound(String),
    /// The registry refused the credentials, or asked for some (`unauthorized: ...`).
    #[error("{0}")]
    Unauthorized(String),
    /// The registry could not be reached (connection refused, DNS, TLS, timeout); the message
    /// names it.
    #[error("{0}")]
    Unreachable(String),
    /// Content that does not match its digest (a blob, or a layer against its `diff_id`).
    #[error("{0}")]
    Verification(String),
    /// Any other error the registry answered with (5xx, rate limits, spec violations).
    #[error("{0}")]
    Registry(String),
    /// A local file system error, naming what was being done.
    #[error("{0}")]
    Io(String),
}

impl ImageError {
    /// `invalid reference format` with an optional detail, as Docker says it.
    pub(crate) fn invalid_reference(detail: Option<&str>) -> ImageError {
        match detail {
            None => ImageError::Invalid("invalid reference format".to_string()),
            Some(d) => ImageError::Invalid(format!("invalid reference format: {d}")),
        }
    }

    /// `No such image: REF`.
    pub(crate) fn no_such_image(reference: impl std::fmt::Display) -> ImageError {
        ImageError::NotFound(format!("No such image: {reference}"))
    }

    /// An I/O error while doing `what` on `path`.
    pub(crate) fn io(what: &str, path: &Path, err: io::Error) -> ImageError {
        ImageError::Io(format!("{what} {}: {err}", path.display()))
    }
}

/// Adds the path and operation to an [`io::Result`].
pub(crate) trait IoContext<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: &str, path: &Path) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io(what, path, e))
    }
}
