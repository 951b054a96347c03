//! `mesh image ls | pull | rm | prune | load`: the image store of the node the CLI talks to
//! (images are per node, as Docker's; a service's tasks pull what they need themselves).

use std::io::{BufRead, IsTerminal, Write};

use clap::Subcommand;
use mesh_api::{ImageSummary, Request};
use serde_json::json;

use crate::client::Client;
use crate::{table, Failure, Format, Result};

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// List the images of this node.
    #[command(alias = "list")]
    Ls(crate::FormatArg),
    /// Download an image from a registry into this node's store.
    Pull {
        /// NAME[:TAG|@DIGEST]
        reference: String,
    },
    /// Remove one or more images from this node's store.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Remove the images no task of this node uses.
    Prune {
        /// Remove all unused images, not just dangling ones (mesh keeps no dangling images
        /// apart: both remove every unused image).
        #[arg(short, long)]
        all: bool,
        /// Do not prompt for confirmation.
        #[arg(short, long)]
        force: bool,
    },
    /// Load an image from a tar archive (`docker save` or OCI layout) on this node.
    Load {
        /// Read from this tar archive file (a path on the daemon's host).
        #[arg(short, long)]
        input: String,
    },
}

/// `1.5MB`, as `docker image ls` prints sizes (decimal units, 3 significant digits).
pub fn human_size(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        return format!("{bytes}B");
    }
    // Go's `%.3g`: three significant digits, trailing zeros dropped.
    let decimals = if v < 10.0 {
        2
    } else if v < 100.0 {
        1
    } else {
        0
    };
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{}", units[u])
}

pub fn run(c: &Client, cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Ls(f) => {
            let v = c.call(Request::ImageLs)?;
            let rows: Vec<ImageSummary> = serde_json::from_value(v)?;
            if f.format == Format::Json {
                let out: Vec<_> = rows
                    .iter()
                    .map(|r| {
                        json!({"Repository": r.repository, "Tag": r.tag, "Digest": r.digest,
                               "ID": short_id(&r.id), "CreatedAt": r.created, "Size": human_size(r.size)})
                    })
                    .collect();
                println!("{}", serde_json::to_string(&out)?);
            } else {
                let rows = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.repository.clone(),
                            r.tag.clone(),
                            short_id(&r.id),
                            r.created.clone(),
                            human_size(r.size),
                        ]
                    })
                    .collect();
                table::print(&["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], rows);
            }
        }
        ImageCmd::Pull { reference } => {
            let v = c.call(Request::ImagePull { reference })?;
            let r = v["reference"].as_str().unwrap_or("");
            if let Some((name, digest)) = r.split_once('@') {
                println!("Digest: {digest}");
                println!("Status: Image is up to date for {name}");
                println!("{name}");
            } else {
                println!("{r}");
            }
        }
        ImageCmd::Rm { references } => {
            let mut failed = None;
            for r in references {
                match c.call(Request::ImageRm {
                    reference: r.clone(),
                }) {
                    Ok(_) => println!("Untagged: {r}"),
                    Err(Failure(e)) => {
                        eprintln!("Error response from daemon: {e}");
                        failed = Some(e);
                    }
                }
            }
            if failed.is_some() {
                std::process::exit(1);
            }
        }
        ImageCmd::Prune { all: _, force } => {
            if !force && !confirm()? {
                return Ok(());
            }
            let v = c.call(Request::ImagePrune)?;
            let deleted: Vec<String> = v["deleted"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if !deleted.is_empty() {
                println!("Deleted Images:");
                for d in deleted {
                    println!("deleted: {d}");
                }
                println!();
            }
            println!(
                "Total reclaimed space: {}",
                human_size(v["reclaimed"].as_u64().unwrap_or(0))
            );
        }
        ImageCmd::Load { input } => {
            let path =
                std::fs::canonicalize(&input).map_err(|e| Failure(format!("open {input}: {e}")))?;
            let v = c.call(Request::ImageLoad {
                path: path.to_string_lossy().into_owned(),
            })?;
            for r in v["loaded"].as_array().into_iter().flatten() {
                println!("Loaded image: {}", r.as_str().unwrap_or(""));
            }
        }
    }
    Ok(())
}

fn short_id(id: &str) -> String {
    id.trim_start_matches("sha256:").chars().take(12).collect()
}

/// Docker's prompt; no answer (no terminal, end of input) is no.
fn confirm() -> Result<bool> {
    print!(
        "WARNING! This will remove all images without at least one container associated to them.\nAre you sure you want to continue? [y/N] "
    );
    std::io::stdout().flush().ok();
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        println!();
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line).ok();
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_docker_prints_them() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(4_261_000), "4.26MB");
        assert_eq!(human_size(1_500_000), "1.5MB");
        assert_eq!(human_size(123_456_789), "123MB");
        assert_eq!(human_size(2_000_000_000), "2GB");
    }
}
