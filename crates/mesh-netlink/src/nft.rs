//! Running `nft` scripts: the one place that shells out, because nftables has no stable
//! netlink library in Rust. A script given to [`apply`] is one atomic transaction (`nft -f`
//! commits all of it or none of it); [`apply_in`] runs it inside another network namespace.

use std::io::{self, Write};
use std::process::{Command, Stdio};

use crate::Netns;

/// Runs `nft -f -` with `script` on stdin in the calling thread's network namespace.
pub fn apply(script: &str) -> Result<(), String> {
    run(&["-f", "-"], Some(script)).map(|_| ())
}

/// As [`apply`], inside `ns`.
pub fn apply_in(ns: &Netns, script: &str) -> Result<(), String> {
    ns.run(|| apply(script)).map_err(|e| e.to_string())?
}

/// As [`apply_in`] with `nft -e -a`: returns what nft echoes (the new objects, with the
/// handles of new rules), so a caller can delete them later without listing.
pub fn apply_echo_in(ns: &Netns, script: &str) -> Result<String, String> {
    ns.run(|| run(&["-e", "-a", "-f", "-"], Some(script)))
        .map_err(|e| e.to_string())?
}

/// Runs `nft ARGS` (e.g. `["list", "table", "ip", "t"]`) and returns its stdout.
pub fn output(args: &[&str]) -> Result<String, String> {
    run(args, None)
}

/// As [`output`], inside `ns`.
pub fn output_in(ns: &Netns, args: &[&str]) -> Result<String, String> {
    ns.run(|| output(args)).map_err(|e| e.to_string())?
}

fn run(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => "nft not found: install nftables".to_string(),
            _ => format!("cannot run nft: {e}"),
        })?;
    let wrote = match (stdin, child.stdin.take()) {
        (Some(s), Some(mut pipe)) => pipe.write_all(s.as_bytes()),
        _ => Ok(()),
    };
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nft {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    wrote.map_err(|e| format!("cannot write to nft: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
