//! `mesh login [-u USER] [-p PASSWORD | --password-stdin] [SERVER]` and `mesh logout
//! [SERVER]`, as Docker's (what the flags leave out is asked for on the terminal), except
//! that the login is the addressed node's (its daemon checks it with the registry and keeps
//! it for its pulls), not the client's.

use std::io::Read;

use clap::Args;
use mesh_api::{RegistryCredentials, Request};

use crate::client::Client;
use crate::prompt;
use crate::{Failure, Result};

#[derive(Args, Debug)]
pub struct LoginArgs {
    /// Username.
    #[arg(short, long)]
    username: Option<String>,
    /// Password.
    #[arg(short, long)]
    password: Option<String>,
    /// Take the password from stdin.
    #[arg(long)]
    password_stdin: bool,
    /// The registry (`HOST[:PORT]`); Docker Hub when left out.
    server: Option<String>,
}

pub fn login(c: &Client, a: LoginArgs) -> Result<()> {
    if a.password.is_some() && a.password_stdin {
        return Err(Failure(
            "--password and --password-stdin are mutually exclusive".into(),
        ));
    }
    let mut password = if a.password_stdin {
        if a.username.is_none() {
            return Err(Failure(
                "Must provide --username with --password-stdin".into(),
            ));
        }
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure(format!("reading the password from stdin: {e}")))?;
        Some(s.trim_end_matches(['\n', '\r']).to_string())
    } else {
        if a.password.is_some() {
            eprintln!("WARNING! Using --password via the CLI is insecure. Use --password-stdin.");
        }
        a.password
    };
    // What the flags leave out is asked for on the terminal, as Docker's login does.
    let mut username = a.username;
    if (username.is_none() || password.is_none()) && !prompt::interactive() {
        return Err(Failure(
            "Cannot perform an interactive login from a non TTY device".into(),
        ));
    }
    if username.is_none() {
        let u = ask("Username: ", false)?;
        if u.trim().is_empty() {
            return Err(Failure("Non-null Username Required".into()));
        }
        username = Some(u.trim().to_string());
    }
    if password.is_none() {
        let p = ask("Password: ", true)?;
        if p.is_empty() {
            return Err(Failure("Password Required".into()));
        }
        password = Some(p);
    }
    let (username, password) = (username.unwrap_or_default(), password.unwrap_or_default());
    if username.is_empty() || password.is_empty() {
        return Err(Failure("Username and password must not be empty".into()));
    }
    let v = c.call(Request::Login {
        server: a.server.unwrap_or_default(),
        credentials: RegistryCredentials { username, password },
    })?;
    println!("{}", v["status"].as_str().unwrap_or("Login Succeeded"));
    Ok(())
}

/// One answer from the terminal; the end of input is an empty answer.
fn ask(question: &str, secret: bool) -> Result<String> {
    prompt::read_line(question, secret)
        .map(Option::unwrap_or_default)
        .map_err(|e| Failure(format!("reading from the terminal: {e}")))
}

pub fn logout(c: &Client, server: Option<String>) -> Result<()> {
    let server = server.unwrap_or_else(|| "docker.io".into());
    let v = c.call(Request::Logout {
        server: server.clone(),
    })?;
    if v["removed"].as_bool() == Some(true) {
        println!("Removing login credentials for {server}");
    } else {
        println!("Not logged in to {server}");
    }
    Ok(())
}
