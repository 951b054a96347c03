//! `mesh swarm unlock`, `mesh swarm unlock-key [-q] [--rotate]`, `mesh swarm update` and
//! `mesh swarm ca [--rotate]`, with Docker's words; the unlock key is read from a prompt (echo
//! off) or from stdin.

use mesh_api::Request;
use serde_json::Value;

use crate::client::Client;
use crate::{Failure, Result};

/// Docker's instructions around an unlock key.
pub fn print_unlock_command(key: &str) {
    if key.is_empty() {
        return;
    }
    print!(
        "To unlock a swarm manager after it restarts, run the `mesh swarm unlock`\n\
         command and provide the following key:\n\n    {key}\n\n\
         Remember to store this key in a password manager, since without it you\n\
         will not be able to restart the manager.\n"
    );
}

/// `swarm unlock`: refused before asking for the key unless this node is a locked manager.
pub fn unlock(c: &Client) -> Result<()> {
    let info = c.call(Request::Info)?;
    match info["swarm"].as_str().unwrap_or("") {
        "inactive" => return Err(Failure("This node is not part of a swarm".into())),
        "locked" => {}
        _ => return Err(Failure("swarm is not locked".into())),
    }
    let key = read_key("Enter unlock key: ")?;
    c.call(Request::SwarmUnlock { key })?;
    Ok(())
}

fn read_key(prompt: &str) -> Result<String> {
    let line = crate::prompt::read_line(prompt, true)
        .map_err(|e| Failure(format!("reading the unlock key: {e}")))?;
    Ok(line.unwrap_or_default().trim().to_string())
}

/// `swarm unlock-key [-q] [--rotate]`.
pub fn unlock_key(c: &Client, quiet: bool, rotate: bool) -> Result<()> {
    let a: mesh_api::UnlockKeyAnswer = c.call_as(Request::UnlockKey { rotate })?;
    if rotate && !quiet {
        println!("Successfully rotated manager unlock key.\n");
    }
    let key = a.key.as_deref().unwrap_or("");
    if key.is_empty() {
        return Err(Failure("no unlock key is set".into()));
    }
    if quiet {
        println!("{key}");
    } else {
        print_unlock_command(key);
    }
    Ok(())
}

/// `swarm ca [--rotate] [-d] [-q] [--cert-expiry D]`: without `--rotate`, the root CA
/// certificate nodes trust; with it, a new root, then (unless detached) the progress of the
/// nodes towards it until every node has a certificate from it and trusts it, and the new
/// root. As Docker, it waits for as long as that takes (a node that is down holds it: bring
/// it back or remove it).
pub fn ca(
    c: &Client,
    rotate: bool,
    detach: bool,
    quiet: bool,
    cert_expiry: Option<String>,
) -> Result<()> {
    // As Docker: the root the swarm wants, which is the new one while a rotation goes on.
    if !rotate {
        if cert_expiry.is_some() {
            return Err(Failure(
                "`--cert-expiry` flag requires the `--rotate` flag to update the CA".into(),
            ));
        }
        let a: mesh_api::CaAnswer = c.call_as(Request::SwarmCa { rotate: false })?;
        print!("{}", with_newline(&a.root_pem));
        return Ok(());
    }
    if let Some(d) = cert_expiry {
        let secs = crate::service::parse_duration_ms(&d)? / 1000;
        c.call(Request::SwarmUpdate {
            autolock: None,
            task_history_limit: None,
            cert_expiry_secs: Some(secs),
            dispatcher_heartbeat_ms: None,
        })?;
    }
    let mut a: mesh_api::CaAnswer = c.call_as(Request::SwarmCa { rotate: true })?;
    if detach {
        return Ok(());
    }
    if !quiet {
        println!("desired root digest: {}", a.root_digest);
    }
    let mut last = String::new();
    loop {
        let lines = format!(
            "  rotated TLS certificates:  {} {}/{} nodes
  rotated CA certificates:   {} {}/{} nodes",
            bar(a.tls_rotated, a.nodes),
            a.tls_rotated,
            a.nodes,
            bar(a.trust_rotated, a.nodes),
            a.trust_rotated,
            a.nodes
        );
        if !quiet && lines != last {
            println!("{lines}");
            last = lines;
        }
        if a.converged() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        a = c.call_as(Request::SwarmCa { rotate: false })?;
    }
    if !quiet {
        print!("{}", with_newline(&a.root_pem));
    }
    Ok(())
}

fn with_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// Docker's progress bar: 50 columns.
fn bar(done: u32, total: u32) -> String {
    const WIDTH: usize = 50;
    let filled = if total == 0 {
        WIDTH
    } else {
        (done.min(total) as usize * WIDTH) / total as usize
    };
    format!("[{}>{}]", "=".repeat(filled), " ".repeat(WIDTH - filled))
}

/// `swarm update`.
pub fn update(
    c: &Client,
    autolock: Option<bool>,
    task_history_limit: Option<i64>,
    cert_expiry: Option<String>,
    dispatcher_heartbeat: Option<String>,
) -> Result<()> {
    let task_history_limit = task_history_limit
        .map(|n| {
            u32::try_from(n).map_err(|_| {
                Failure(format!(
                    "invalid task history limit: {n} (must be 0 or more)"
                ))
            })
        })
        .transpose()?;
    let ms = |s: Option<String>| s.map(|s| crate::service::parse_duration_ms(&s)).transpose();
    let cert_expiry_secs = ms(cert_expiry)?.map(|m| m / 1000);
    let dispatcher_heartbeat_ms = ms(dispatcher_heartbeat)?;
    let v: Value = c.call(Request::SwarmUpdate {
        autolock,
        task_history_limit,
        cert_expiry_secs,
        dispatcher_heartbeat_ms,
    })?;
    println!("Swarm updated.");
    if let Some(key) = v["unlock_key"].as_str() {
        print_unlock_command(key);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn progress_bar_as_docker_draws_it() {
        assert_eq!(
            super::bar(1, 2),
            format!("[{}>{}]", "=".repeat(25), " ".repeat(25))
        );
        assert_eq!(super::bar(0, 2), format!("[>{}]", " ".repeat(50)));
        assert_eq!(super::bar(3, 2), format!("[{}>]", "=".repeat(50)));
    }
}
