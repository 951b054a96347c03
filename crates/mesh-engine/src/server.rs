//! The HTTP side: HTTP/1.1 on a unix socket, one task per connection, paths with or without
//! a `/vX.Y` prefix, bodies bounded, errors as Docker writes them.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_api::{ApiError, ErrorKind};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::query::Query;
use crate::Backend;

/// The largest request body accepted (a service spec is a few KiB; Docker's own limit for
/// JSON bodies is in this range).
pub const MAX_BODY: usize = 4 << 20;

/// An answer, before it becomes an HTTP response.
pub enum Reply {
    /// A JSON document with a status.
    Json(StatusCode, serde_json::Value),
    /// No body.
    Empty(StatusCode),
    /// A streamed body (logs, events) of the given content type.
    Stream(&'static str, mpsc::Receiver<Bytes>),
    /// `/_ping`'s `OK`, with the node's swarm state (`inactive`, `active/manager`, ...).
    Ping(&'static str),
}

impl Reply {
    pub fn ok(v: impl serde::Serialize) -> Reply {
        Reply::Json(
            StatusCode::OK,
            serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
        )
    }
    pub fn created(v: impl serde::Serialize) -> Reply {
        Reply::Json(
            StatusCode::CREATED,
            serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
        )
    }
}

/// An error answer: Docker's status code and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineError {
    pub status: StatusCode,
    pub message: String,
}

impl EngineError {
    pub fn new(status: StatusCode, message: impl std::fmt::Display) -> Self {
        EngineError {
            status,
            message: message.to_string(),
        }
    }
    pub fn bad(message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<ApiError> for EngineError {
    fn from(e: ApiError) -> Self {
        let status = match e.kind {
            ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::AlreadyExists => StatusCode::CONFLICT,
            ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::NotInSwarm
            | ErrorKind::AlreadyInSwarm
            | ErrorKind::NotManager
            | ErrorKind::NoLeader
            | ErrorKind::Locked
            | ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        // The local API's words name the mesh CLI; the Engine API's clients run docker.
        let message = match e.kind {
            ErrorKind::NotInSwarm => "This node is not a swarm manager. Use \"docker swarm init\" or \"docker swarm join\" to connect this node to swarm and try again.".to_string(),
            ErrorKind::AlreadyInSwarm => "This node is already part of a swarm. Use \"docker swarm leave\" to leave this swarm and join another one.".to_string(),
            _ => e.message.replace("\"mesh ", "\"docker "),
        };
        EngineError { status, message }
    }
}

/// A request as the handlers see it.
pub struct Call {
    pub method: Method,
    /// The path without its version prefix, split on `/` (percent-decoded segments).
    pub segments: Vec<String>,
    pub query: Query,
    pub body: Bytes,
    /// The `X-Registry-Auth` header, if any.
    pub registry_auth: Option<String>,
}

impl Call {
    /// The body as JSON (an empty body is `null`).
    pub fn json(&self) -> Result<serde_json::Value, EngineError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| EngineError::bad(format!("invalid JSON: {e}")))
    }
}

/// A running Engine API listener; dropping it stops accepting (and removes the socket file
/// on [`Server::shutdown`]).
pub struct Server {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn shutdown(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on the unix socket `path` (replacing a stale socket file) and serves `backend`.
pub fn serve(path: &Path, backend: Arc<dyn Backend>) -> std::io::Result<Server> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    }
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("docker API socket: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let backend = backend.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let backend = backend.clone();
                    async move { Ok::<_, Infallible>(handle(backend, req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!("docker API connection: {e}");
                }
            });
        }
    });
    Ok(Server {
        path: path.to_path_buf(),
        task,
    })
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> BoxBody {
    http_body_util::Full::new(b.into()).boxed()
}

/// Docker's error document.
pub fn error_response(e: &EngineError) -> Response<BoxBody> {
    let body = serde_json::to_vec(&serde_json::json!({ "message": e.message }))
        .unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(full(body));
    *r.status_mut() = e.status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Splits `/v1.41/services/x` into the version (if any) and its segments.
pub fn split_path(path: &str) -> (Option<String>, Vec<String>) {
    let mut segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
        .collect();
    let version = segs
        .first()
        .and_then(|s| s.strip_prefix('v'))
        .filter(|v| {
            let mut parts = v.split('.');
            parts.next().is_some_and(|p| p.parse::<u32>().is_ok())
                && parts.next().is_some_and(|p| p.parse::<u32>().is_ok())
                && parts.next().is_none()
        })
        .map(str::to_string);
    if version.is_some() {
        segs.remove(0);
    }
    (version, segs)
}

fn version_too_old(v: &str) -> bool {
    let num = |s: &str| -> (u32, u32) {
        let (a, b) = s.split_once('.').unwrap_or((s, "0"));
        (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
    };
    num(v) < num(crate::MIN_API_VERSION)
}

async fn handle(backend: Arc<dyn Backend>, req: Request<Incoming>) -> Response<BoxBody> {
    let (parts, body) = req.into_parts();
    let (version, segments) = split_path(parts.uri.path());
    if let Some(v) = &version {
        if version_too_old(v) {
            return error_response(&EngineError::bad(format!(
                "client version {v} is too old. Minimum supported API version is {}, please upgrade your client to a newer version",
                crate::MIN_API_VERSION
            )));
        }
    }
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > MAX_BODY {
            return error_response(&EngineError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body too large: {len} bytes (at most {MAX_BODY})"),
            ));
        }
    }
    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error_response(&EngineError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the request body: {e}"),
            ))
        }
    };
    let call = Call {
        method: parts.method.clone(),
        segments,
        query: Query::parse(parts.uri.query()),
        body,
        registry_auth: parts
            .headers
            .get("x-registry-auth")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    debug!(method = %parts.method, path = parts.uri.path(), "docker API call");
    let head = parts.method == Method::HEAD;
    let mut resp = match crate::routes::route(&backend, &call).await {
        Ok(Reply::Json(status, v)) => {
            let mut body = serde_json::to_vec(&v).unwrap_or_default();
            body.push(b'\n');
            let mut r = Response::new(full(body));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Ok(Reply::Empty(status)) => {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = status;
            r
        }
        Ok(Reply::Ping(swarm)) => {
            let mut r = Response::new(full(Bytes::from_static(b"OK")));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            h.insert("swarm", HeaderValue::from_static(swarm));
            h.insert("docker-experimental", HeaderValue::from_static("false"));
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache, no-store, must-revalidate"),
            );
            h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
            r
        }
        Ok(Reply::Stream(ctype, rx)) => {
            let mut r = Response::new(ChannelBody(rx).boxed());
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
            r
        }
        Err(e) => error_response(&e),
    };
    let h = resp.headers_mut();
    h.insert("api-version", HeaderValue::from_static(crate::API_VERSION));
    h.insert("ostype", HeaderValue::from_static("linux"));
    h.insert(
        header::SERVER,
        HeaderValue::from_static(concat!("mesh/", env!("CARGO_PKG_VERSION"), " (linux)")),
    );
    if head {
        *resp.body_mut() = full(Bytes::new());
    }
    resp
}

/// A body fed by a channel: each message is one chunk, the end of the channel the end of the
/// body.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_with_and_without_versions() {
        assert_eq!(
            split_path("/v1.41/services/web"),
            (Some("1.41".into()), vec!["services".into(), "web".into()])
        );
        assert_eq!(split_path("/_ping"), (None, vec!["_ping".into()]));
        assert_eq!(
            split_path("/v1.41/distribution/example%2Fapi:2.3/json").1,
            vec!["distribution", "example/api:2.3", "json"]
        );
        assert_eq!(split_path("/vx/a").0, None);
        assert!(version_too_old("1.12") && !version_too_old("1.41") && !version_too_old("1.50"));
    }

    #[test]
    fn errors_map_to_docker_statuses() {
        let e: EngineError = ApiError::not_found("service x not found").into();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let e: EngineError = ApiError::not_manager().into();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.message.starts_with("This node is not a swarm manager."));
        let e: EngineError = ApiError::not_in_swarm().into();
        assert!(e.message.contains("\"docker swarm init\""), "{}", e.message);
    }
}
