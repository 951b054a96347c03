//! `mesh image ls | pull | rm | prune | load`: the image store of the node the CLI talks to
//! (images are per node, as Docker's; a service's tasks pull what they need themselves).

use std::io::{BufRead, IsTerminal, Write};

use clap::Subcommand;
use mesh_api::{ImageSummary, Request};
use serde_json::json;

use crate::client::Client;
use crate::{table, Failure, Result};

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
        /// Images (NAME[:TAG|@DIGEST] or ID).
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
            if f.is_json()? {
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
                            created_ago(&r.created, now_secs()),
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
                    Ok(v) => {
                        for item in v.as_array().into_iter().flatten() {
                            for key in ["Untagged", "Deleted"] {
                                if let Some(x) = item[key].as_str() {
                                    println!("{key}: {x}");
                                }
                            }
                        }
                    }
                    Err(Failure(e)) => {
                        // The client's error already reads "Error response from daemon: ...".
                        eprintln!("{e}");
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

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2026-12-04T00:00:00Z`, fractions and
/// offsets allowed).
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = days * 86_400 + h * 3600 + mi * 60 + se;
    // A numeric offset: local time minus the offset is UTC.
    let tail = s[19..].trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    if let Some(sign) = tail.chars().next().filter(|c| *c == '+' || *c == '-') {
        let oh = tail.get(1..3)?.parse::<i64>().ok()?;
        let om = tail.get(4..6)?.parse::<i64>().ok()?;
        let off = oh * 3600 + om * 60;
        t += if sign == '+' { -off } else { off };
    }
    Some(t)
}

/// `2 weeks ago`, as `docker image ls` shows an image's age (go-units' HumanDuration);
/// empty when the image does not say when it was built.
fn created_ago(created: &str, now: i64) -> String {
    let Some(t) = parse_rfc3339(created) else {
        return String::new();
    };
    let secs = u64::try_from(now - t).unwrap_or(0);
    let d = mesh_api::human_duration(secs);
    format!("{d} ago")
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
    fn ages_as_docker_prints_them() {
        let t = parse_rfc3339("2026-12-04T00:00:00Z").unwrap();
        assert_eq!(t, 1_796_342_400);
        assert_eq!(parse_rfc3339("2026-12-04T01:00:00.123+01:00"), Some(t));
        assert_eq!(
            created_ago("2026-12-04T00:00:00Z", t + 90),
            "About a minute ago"
        );
        assert_eq!(
            created_ago("2026-12-04T00:00:00Z", t + 3 * 86_400),
            "3 days ago"
        );
        assert_eq!(
            created_ago("2026-12-04T00:00:00Z", t + 20 * 86_400),
            "2 weeks ago"
        );
        assert_eq!(created_ago("", t), "");
        assert_eq!(created_ago("yesterday", t), "");
    }

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
