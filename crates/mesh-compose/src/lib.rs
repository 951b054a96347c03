//! Compose files to a mesh [`Stack`]: what `mesh stack deploy -c FILE... NAME` creates.
//!
//! The deploy-relevant subset of the compose specification, version 3.x files as Docker's
//! `docker stack deploy` accepts them: one or more files (later ones override earlier ones, as
//! `-c a.yml -c b.yml` merges), variable interpolation from the process environment then the
//! `.env` file next to the first file ([`interp`]), YAML anchors and merge keys, `x-*`
//! extension fields. Keys Swarm ignores (`build`, `depends_on`, `restart`, ...) give Docker's
//! warning; unknown keys, type errors and fields mesh cannot honour are refused with one line
//! naming the file, the line and the key (`compose.yml:12: services.web.deploy.replicas:
//! invalid type: string "three", expected an integer`). A service with a `command:` and no
//! `image:` is a host process (mesh's extension).
//!
//! The conversion follows Docker's CLI (`cli/compose/convert`), so a file gives the objects
//! `docker stack deploy` would create: names `NAME_key`, the `com.docker.stack.namespace`
//! label on services, their containers, networks, secrets and configs, the service's short
//! name as an alias on each of its networks, a `NAME_default` network for services that name
//! none.
//!
//! Pure: no I/O besides reading the compose files, `.env`, and the files they name
//! (`env_file`, secret and config `file`s).
#![forbid(unsafe_code)]

mod convert;
pub mod interp;
pub mod yaml;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mesh_api::{BlobKind, BlobSpec, NetworkSpec, ServiceSpec};

use yaml::{Key, Node, Value};

/// The label Docker puts on every object of a stack.
pub const NAMESPACE_LABEL: &str = "com.docker.stack.namespace";
/// The label Docker puts on a stack's services: the image as written in the file.
pub const IMAGE_LABEL: &str = "com.docker.stack.image";

/// Why a compose file was refused: one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// At a place in a file: `FILE:LINE: PATH: MESSAGE`.
    #[error("{file}:{line}: {}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
    At {
        file: String,
        line: usize,
        path: String,
        message: String,
    },
    /// Reading a file.
    #[error("{0}")]
    Io(String),
    /// About the whole stack.
    #[error("{0}")]
    Stack(String),
}

impl Error {
    pub fn at(file: &str, line: usize, path: &str, message: impl std::fmt::Display) -> Error {
        Error::At {
            file: file.to_string(),
            line,
            path: path.to_string(),
            message: message.to_string(),
        }
    }
}

/// What a deploy creates (or checks exists, when external).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stack {
    /// The stack's name: the prefix of its objects' names.
    pub namespace: String,
    /// The networks its services use, sorted by name.
    pub networks: Vec<StackNetwork>,
    /// Sorted by name.
    pub services: Vec<ServiceSpec>,
    /// Every declared secret and config, sorted by name.
    pub secrets: Vec<StackBlob>,
    pub configs: Vec<StackBlob>,
    /// The named volumes its services mount (created on first use by each node).
    pub volumes: Vec<StackVolume>,
    /// Docker's warnings (`Ignoring unsupported options: build`).
    pub warnings: Vec<String>,
}

/// A network of the stack; an external one must exist already.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackNetwork {
    pub spec: NetworkSpec,
    pub external: bool,
}

/// A secret or config of the stack; an external one must exist already (and is never
/// removed with the stack).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackBlob {
    pub kind: BlobKind,
    pub spec: BlobSpec,
    pub external: bool,
}

/// A named volume of the stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackVolume {
    pub name: String,
    pub external: bool,
}

/// One compose file's text and the name errors show for it.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// How to read the sources.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The stack's name.
    pub namespace: String,
    /// Where relative paths (bind mounts, `env_file`, secret files) start: the first file's
    /// directory.
    pub base_dir: PathBuf,
    /// The variables for interpolation and for `environment` entries without a value.
    pub env: BTreeMap<String, String>,
}

/// Reads the files given with `-c` (in order) into a stack named `namespace`, with the
/// process environment over the `.env` file next to the first file.
pub fn load_files(paths: &[PathBuf], namespace: &str) -> Result<Stack, Error> {
    let first = paths
        .first()
        .ok_or_else(|| Error::Stack("please specify a compose file (with -c)".into()))?;
    let base_dir = first
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let base_dir = std::path::absolute(&base_dir).unwrap_or(base_dir);
    let mut env = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(base_dir.join(".env")) {
        env.extend(interp::parse_dotenv(&text));
    }
    env.extend(std::env::vars());
    let mut sources = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p)
            .map_err(|e| Error::Io(format!("cannot read {}: {e}", p.display())))?;
        sources.push(Source {
            name: p.display().to_string(),
            text,
        });
    }
    load(
        &sources,
        &Options {
            namespace: namespace.to_string(),
            base_dir,
            env,
        },
    )
}

/// Parses, interpolates and merges `sources` (later ones override earlier ones), then
/// converts them into the stack's objects.
pub fn load(sources: &[Source], opts: &Options) -> Result<Stack, Error> {
    validate_namespace(&opts.namespace)?;
    let mut merged: Option<Node> = None;
    for s in sources {
        let file: Arc<str> = Arc::from(s.name.as_str());
        let mut root = yaml::parse(&file, &s.text)?;
        match &root.value {
            Value::Map(_) => {}
            Value::Null => {
                return Err(Error::at(&file, 1, "", "empty compose file"));
            }
            _ => {
                return Err(root.err(
                    "",
                    format!(
                        "top-level object must be a mapping, not {}",
                        root.describe()
                    ),
                ))
            }
        }
        let lookup = |k: &str| opts.env.get(k).cloned();
        if let Value::Map(entries) = &mut root.value {
            for (k, v) in entries.iter_mut() {
                if matches!(
                    k.text.as_str(),
                    "services" | "networks" | "volumes" | "secrets" | "configs"
                ) {
                    interpolate_tree(v, &k.text, &lookup)?;
                }
            }
        }
        merged = Some(match merged {
            None => root,
            Some(base) => merge(base, root, &mut Vec::new()),
        });
    }
    let root =
        merged.ok_or_else(|| Error::Stack("please specify a compose file (with -c)".into()))?;
    convert::stack(&root, opts)
}

/// Docker's rule for a stack name, which prefixes every object's name.
fn validate_namespace(ns: &str) -> Result<(), Error> {
    let ok = ns.starts_with(|c: char| c.is_ascii_alphanumeric())
        && ns
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Stack(format!(
            "invalid stack name {ns:?}: only [a-zA-Z0-9][a-zA-Z0-9_.-]* is allowed"
        )))
    }
}

fn interpolate_tree(
    n: &mut Node,
    path: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), Error> {
    let line = n.line;
    let file = n.file.clone();
    match &mut n.value {
        Value::Str { text, .. } => {
            *text =
                interp::interpolate(text, lookup).map_err(|e| Error::at(&file, line, path, e))?;
        }
        Value::Seq(items) => {
            for (i, it) in items.iter_mut().enumerate() {
                interpolate_tree(it, &format!("{path}[{i}]"), lookup)?;
            }
        }
        Value::Map(entries) => {
            for (k, v) in entries.iter_mut() {
                interpolate_tree(v, &format!("{path}.{}", k.text), lookup)?;
            }
        }
        Value::Null => {}
    }
    Ok(())
}

/// `over` merged onto `base`: mappings key by key, `environment` and `labels` by variable
/// (list or mapping form), `ports`, `volumes`, `secrets` and `configs` of a service
/// appended (a later mount, secret or config with the same target replaces an earlier one
/// at conversion), anything else replaced.
fn merge(base: Node, over: Node, path: &mut Vec<String>) -> Node {
    let depth = path.len();
    let seg = |i: usize| path.get(i).map(String::as_str).unwrap_or("");
    let in_service = seg(0) == "services";
    let keyed = (in_service && depth == 3 && matches!(seg(2), "environment" | "labels"))
        || (in_service && depth == 4 && seg(2) == "deploy" && seg(3) == "labels");
    let appended =
        in_service && depth == 3 && matches!(seg(2), "ports" | "volumes" | "secrets" | "configs");
    let (base, over) = if keyed {
        (as_keyed_map(base), as_keyed_map(over))
    } else {
        (base, over)
    };
    match (base.value, over.value) {
        (Value::Map(mut b), Value::Map(o)) => {
            for (k, v) in o {
                match b.iter().position(|(bk, _)| bk.text == k.text) {
                    Some(i) => {
                        let old = b[i].1.clone();
                        path.push(k.text.clone());
                        b[i].1 = merge(old, v, path);
                        path.pop();
                    }
                    None => b.push((k, v)),
                }
            }
            Node {
                value: Value::Map(b),
                ..base_meta(&over.file, over.line)
            }
        }
        (Value::Seq(mut b), Value::Seq(o)) if appended => {
            b.extend(o);
            Node {
                value: Value::Seq(b),
                ..base_meta(&over.file, over.line)
            }
        }
        (_, value) => Node {
            value,
            file: over.file,
            line: over.line,
        },
    }
}

fn base_meta(file: &Arc<str>, line: usize) -> Node {
    Node {
        value: Value::Null,
        file: file.clone(),
        line,
    }
}

/// `["K=V", "K"]` as the mapping `{K: V, K: null}`; a mapping stays.
fn as_keyed_map(n: Node) -> Node {
    let Value::Seq(items) = &n.value else {
        return n;
    };
    let mut entries = Vec::new();
    for it in items {
        let Value::Str { text, .. } = &it.value else {
            return n;
        };
        let (k, v) = match text.split_once('=') {
            Some((k, v)) => (
                k.to_string(),
                Value::Str {
                    text: v.to_string(),
                    plain: false,
                },
            ),
            None => (text.clone(), Value::Null),
        };
        entries.retain(|(e, _): &(Key, Node)| e.text != k);
        entries.push((
            Key {
                text: k,
                line: it.line,
            },
            Node {
                value: v,
                file: it.file.clone(),
                line: it.line,
            },
        ));
    }
    Node {
        value: Value::Map(entries),
        file: n.file,
        line: n.line,
    }
}
