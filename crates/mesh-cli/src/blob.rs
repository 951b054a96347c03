//! `mesh secret create | ls | inspect | rm` and `mesh config create | ls | inspect | rm`,
//! as Docker's: one shape for both kinds, differing in what is shown (a secret's data
//! never).

use std::collections::BTreeMap;
use std::io::Read;

use clap::Subcommand;
use mesh_api::{human_duration, Blob, BlobKind, BlobSpec, Request};
use serde_json::Value;

use crate::client::Client;
use crate::{table, Failure, Format, Result};

/// The subcommands, the same for secrets and configs.
#[derive(Subcommand, Debug)]
pub enum BlobCmd {
    /// Create from a file, or from standard input with `-`.
    Create {
        /// Labels (`KEY=VALUE`).
        #[arg(short = 'l', long = "label")]
        labels: Vec<String>,
        /// The name.
        name: String,
        /// A file, or `-` for standard input.
        file: String,
    },
    /// List them.
    #[command(alias = "list")]
    Ls(crate::ListArgs),
    /// Show them in detail (JSON; a secret's data is never shown).
    Inspect {
        /// Names or IDs.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove them (refused while a service uses one).
    #[command(alias = "remove")]
    Rm {
        /// Names or IDs.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub fn run(c: &Client, kind: BlobKind, cmd: BlobCmd) -> Result<()> {
    match cmd {
        BlobCmd::Create { labels, name, file } => {
            let data = if file == "-" {
                let mut b = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut b)
                    .map_err(|e| Failure(format!("error reading content from STDIN: {e}")))?;
                b
            } else {
                std::fs::read(&file)
                    .map_err(|e| Failure(format!("error reading content from {file:?}: {e}")))?
            };
            let spec = BlobSpec {
                name,
                labels: parse_labels(&labels)?,
                data,
            };
            spec.validate(kind).map_err(Failure)?;
            let a: mesh_api::IdAnswer = c.call_as(Request::BlobCreate { kind, spec })?;
            println!("{}", a.id);
        }
        BlobCmd::Ls(l) => {
            let v = c.call(Request::BlobLs {
                kind,
                filters: l.filters()?,
            })?;
            let mut list: Vec<Blob> = serde_json::from_value(v)?;
            list.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
            let now = now_secs();
            let ago = |t: u64| format!("{} ago", human_duration(now.saturating_sub(t)));
            if !l.quiet && l.format == Format::Json {
                // As `inspect` shows them: mesh's JSON output of these listings.
                let out: Vec<Value> = list.iter().map(|b| b.docker_json()).collect();
                println!("{}", serde_json::to_string(&out)?);
                return Ok(());
            }
            let rows: Vec<crate::format::Row> = list
                .iter()
                .map(|b| {
                    let mut r = crate::row(serde_json::json!({
                        "ID": b.id, "Name": b.spec.name, "CreatedAt": ago(b.created_at),
                        "UpdatedAt": ago(b.updated_at), "Labels": labels_text(&b.spec.labels),
                    }));
                    if kind == BlobKind::Secret {
                        r.insert("Driver".into(), Value::String(String::new()));
                    }
                    r
                })
                .collect();
            let context = match kind {
                BlobKind::Secret => crate::format::SECRET,
                BlobKind::Config => crate::format::CONFIG,
            };
            crate::format::print(&l.format, l.quiet, context, &rows, &[], || {
                let rows = list
                    .iter()
                    .map(|b| {
                        let mut r = vec![b.id.clone(), b.spec.name.clone()];
                        if kind == BlobKind::Secret {
                            r.push(String::new());
                        }
                        r.push(ago(b.created_at));
                        r.push(ago(b.updated_at));
                        r
                    })
                    .collect();
                match kind {
                    BlobKind::Secret => {
                        table::print(&["ID", "NAME", "DRIVER", "CREATED", "UPDATED"], rows)
                    }
                    BlobKind::Config => table::print(&["ID", "NAME", "CREATED", "UPDATED"], rows),
                }
            })?;
        }
        BlobCmd::Inspect { names } => {
            let mut out = Vec::new();
            let mut failed = None;
            for name in names {
                match c.call(Request::BlobInspect { kind, name }) {
                    Ok(v) => out.push(serde_json::from_value::<Blob>(v)?.docker_json()),
                    Err(e) => failed = Some(e),
                }
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
            if let Some(e) = failed {
                return Err(e);
            }
        }
        BlobCmd::Rm { names } => {
            // As Docker: every name is tried; the errors are reported and the status fails.
            let mut errors = Vec::new();
            for name in names {
                match c.call(Request::BlobRm {
                    kind,
                    name: name.clone(),
                }) {
                    Ok(_) => println!("{name}"),
                    Err(e) => errors.push(e.0),
                }
            }
            if !errors.is_empty() {
                return Err(Failure(errors.join("\n")));
            }
        }
    }
    Ok(())
}

/// Labels as Docker's templates print `.Labels`: `k=v` joined by commas.
fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            None if !l.is_empty() => Ok((l.clone(), String::new())),
            _ => Err(Failure(format!("invalid label {l:?}"))),
        })
        .collect()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
