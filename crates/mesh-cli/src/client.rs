//! The synchronous client of the daemon's unix socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use mesh_api::{Request, Response};
use serde_json::Value;

use crate::Failure;

pub struct Client {
    path: PathBuf,
    url: String,
}

impl Client {
    pub fn new(host: &str) -> Result<Client, Failure> {
        let path = host.strip_prefix("unix://").ok_or_else(|| {
            Failure(format!(
                "unsupported daemon address: {host} (expected unix:///PATH)"
            ))
        })?;
        Ok(Client {
            path: PathBuf::from(path),
            url: host.to_string(),
        })
    }

    /// Sends one request and returns its payload, or the daemon's error as a [`Failure`].
    pub fn call(&self, req: Request) -> Result<Value, Failure> {
        self.answer(req)?
            .map_err(|e| Failure(format!("Error response from daemon: {}", e.message)))
    }

    /// As [`Client::call`], the answer read as the type it is (`mesh_api::answers`).
    pub fn call_as<T: serde::de::DeserializeOwned>(&self, req: Request) -> Result<T, Failure> {
        Ok(mesh_api::answers::from_value(self.call(req)?)?)
    }

    /// Sends one request and returns the daemon's answer, its error kept as it came; a
    /// [`Failure`] only when there was no answer.
    pub fn answer(&self, req: Request) -> Result<Response, Failure> {
        let unreachable = |e: std::io::Error| {
            Failure(format!(
                "cannot connect to the mesh daemon at {}: {e}. Is meshd running?",
                self.url
            ))
        };
        let mut s = UnixStream::connect(&self.path).map_err(unreachable)?;
        s.set_read_timeout(Some(Duration::from_secs(300))).ok();
        let mut line = serde_json::to_vec(&req)?;
        line.push(b'\n');
        s.write_all(&line).map_err(unreachable)?;
        let mut r = BufReader::new(s);
        let mut buf = String::new();
        r.read_line(&mut buf)
            .map_err(|e| Failure(format!("reading the daemon's answer: {e}")))?;
        if buf.is_empty() {
            return Err(Failure(
                "the daemon closed the connection without an answer".into(),
            ));
        }
        serde_json::from_str(&buf)
            .map_err(|e| Failure(format!("malformed answer from the daemon: {e}")))
    }
}
