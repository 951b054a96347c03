//! `/secrets` and `/configs`: list (the `id`, `label`, `name`, `names` filters applied by
//! the leader), create, inspect, delete, as dockerd answers them. A secret's data is never
//! returned. Updates change nothing a mesh secret or config holds, so they are refused with
//! swarmkit's words unless they change nothing.

use base64::Engine as _;
use http::StatusCode;
use mesh_api::{Blob, BlobKind, BlobSpec, Request};
use serde_json::{json, Value};

use crate::server::{Call, EngineError, Reply};
use crate::Backend;

type Result<T> = std::result::Result<T, EngineError>;

/// Routes `/secrets...` and `/configs...` (`rest`: the segments after the kind).
pub async fn route(b: &dyn Backend, c: &Call, kind: BlobKind, rest: &[&str]) -> Result<Reply> {
    let get = c.method == http::Method::GET || c.method == http::Method::HEAD;
    let post = c.method == http::Method::POST;
    let delete = c.method == http::Method::DELETE;
    match rest {
        [] if get => ls(b, c, kind).await,
        ["create"] if post => create(b, c, kind).await,
        [id] if get => {
            let blob = inspect(b, kind, id).await?;
            Ok(Reply::ok(blob.docker_json()))
        }
        [id] if delete => {
            call(
                b,
                Request::BlobRm {
                    kind,
                    name: id.to_string(),
                },
            )
            .await?;
            Ok(Reply::Empty(StatusCode::NO_CONTENT))
        }
        [id, "update"] if post => update(b, c, kind, id).await,
        _ => Err(EngineError::not_found("page not found")),
    }
}

async fn call(b: &dyn Backend, req: Request) -> Result<Value> {
    b.call(req).await.map_err(EngineError::from)
}

async fn inspect(b: &dyn Backend, kind: BlobKind, id: &str) -> Result<Blob> {
    let v = call(
        b,
        Request::BlobInspect {
            kind,
            name: id.to_string(),
        },
    )
    .await?;
    serde_json::from_value(v).map_err(|e| EngineError::new(StatusCode::INTERNAL_SERVER_ERROR, e))
}

async fn ls(b: &dyn Backend, c: &Call, kind: BlobKind) -> Result<Reply> {
    let f = c.query.filters().map_err(EngineError::bad)?;
    f.check_blobs().map_err(EngineError::bad)?;
    let v = call(b, Request::BlobLs { kind, filters: f }).await?;
    let list: Vec<Blob> = serde_json::from_value(v)
        .map_err(|e| EngineError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let out: Vec<Value> = list.iter().map(Blob::docker_json).collect();
    Ok(Reply::ok(out))
}

/// The body's `Name`, `Labels` and `Data` (base64); `Driver` and `Templating` are refused.
/// With `check`, Docker's rules for a new one (name, size, a secret not empty).
fn spec_of(v: &Value, kind: BlobKind, check: bool) -> Result<BlobSpec> {
    for k in ["Driver", "Templating"] {
        if v.get(k).is_some_and(|d| !d.is_null()) {
            return Err(EngineError::bad(format!(
                "invalid {kind} spec: {k} is not supported by mesh"
            )));
        }
    }
    let name = v
        .get("Name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let labels = match v.get("Labels") {
        None | Some(Value::Null) => Default::default(),
        Some(l) => serde_json::from_value(l.clone())
            .map_err(|e| EngineError::bad(format!("invalid {kind} spec: Labels: {e}")))?,
    };
    let data = match v.get("Data") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| EngineError::bad(format!("invalid {kind} spec: Data: {e}")))?,
        Some(_) => {
            return Err(EngineError::bad(format!(
                "invalid {kind} spec: Data must be base64 text"
            )))
        }
    };
    let spec = BlobSpec { name, labels, data };
    if check {
        spec.validate(kind).map_err(EngineError::bad)?;
    }
    Ok(spec)
}

async fn create(b: &dyn Backend, c: &Call, kind: BlobKind) -> Result<Reply> {
    let spec = spec_of(&c.json()?, kind, true)?;
    let a: mesh_api::IdAnswer =
        mesh_api::answers::from_value(call(b, Request::BlobCreate { kind, spec }).await?)?;
    Ok(Reply::created(json!({ "ID": a.id })))
}

/// Labels may change; the name and data must stay (`docker stack deploy` sends its secrets
/// and configs again on every deploy), as swarmkit allows.
async fn update(b: &dyn Backend, c: &Call, kind: BlobKind, id: &str) -> Result<Reply> {
    let v = c.json()?;
    let name = v.get("Name").and_then(Value::as_str).unwrap_or_default();
    let mut body = v.clone();
    if name.is_empty() {
        body["Name"] = json!(inspect(b, kind, id).await?.spec.name);
    }
    // An update may leave the data out: then only the labels are meant.
    let spec = spec_of(&body, kind, false)?;
    call(
        b,
        Request::BlobUpdate {
            kind,
            name: id.to_string(),
            spec,
        },
    )
    .await?;
    Ok(Reply::Empty(StatusCode::OK))
}
