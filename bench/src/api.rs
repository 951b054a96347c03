//! A minimal synchronous client of meshd's local API: one JSON request per line on the unix
//! socket `<exec_root>/meshd.sock`, one JSON response line each (`{"Ok":...}` or
//! `{"Err":{"kind":...,"message":...}}`).
//!
//! Benchmarks talk to the socket directly instead of spawning the `mesh` CLI, so that what
//! they time is the daemon, not process start-up. A connection is kept open and reused for
//! many requests.

use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// An `Err` answer of the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// The error kind (`no_leader`, `not_found`, ...).
    pub kind: String,
    /// The one-line message.
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// One open connection to a daemon's API socket.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl Client {
    /// Connects to the socket at `path`. Every call fails if the daemon does not answer
    /// within `timeout` (change it with [`Client::set_timeout`]).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client> {
        let writer = UnixStream::connect(path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        let reader = BufReader::new(writer.try_clone()?);
        let mut c = Client {
            path: path.to_path_buf(),
            reader,
            writer,
            line: String::new(),
        };
        c.set_timeout(timeout)?;
        Ok(c)
    }

    /// Sets how long a call may wait for the answer (and for the request to be written).
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        let t = Some(timeout.max(Duration::from_millis(1)));
        self.writer.set_read_timeout(t)?;
        self.writer.set_write_timeout(t)?;
        Ok(())
    }

    /// Sends one request and reads its answer. The outer `Err` is a transport or protocol
    /// failure (the connection should be dropped then); the inner one is the daemon's error.
    pub fn call(&mut self, req: &Value) -> Result<Result<Value, ApiError>> {
        let mut out = serde_json::to_vec(req)?;
        out.push(b'\n');
        self.writer
            .write_all(&out)
            .with_context(|| format!("writing to {}", self.path.display()))?;
        self.line.clear();
        let n = self
            .reader
            .read_line(&mut self.line)
            .with_context(|| format!("reading from {}", self.path.display()))?;
        if n == 0 {
            bail!("{}: the daemon closed the connection", self.path.display());
        }
        let v: Value = serde_json::from_str(&self.line).with_context(|| {
            format!(
                "{}: invalid response line {:?}",
                self.path.display(),
                self.line
            )
        })?;
        parse_response(v).with_context(|| format!("{}: unexpected response", self.path.display()))
    }

    /// Like [`Client::call`], with the daemon's error turned into an `Err` too.
    pub fn call_ok(&mut self, req: &Value) -> Result<Value> {
        match self.call(req)? {
            Ok(v) => Ok(v),
            Err(e) => bail!("{}: {req} failed: {e}", self.path.display()),
        }
    }
}

/// Splits a response into its `Ok` payload or `Err` details.
fn parse_response(v: Value) -> Result<Result<Value, ApiError>> {
    let Value::Object(mut m) = v else {
        bail!("not an object: {v}");
    };
    if let Some(ok) = m.remove("Ok") {
        return Ok(Ok(ok));
    }
    if let Some(err) = m.remove("Err") {
        let s = |k: &str| err[k].as_str().unwrap_or_default().to_string();
        return Ok(Err(ApiError {
            kind: s("kind"),
            message: s("message"),
        }));
    }
    bail!("neither Ok nor Err: {}", Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn responses_are_split() {
        assert_eq!(
            parse_response(json!({"Ok": {"id": "x"}})).unwrap(),
            Ok(json!({"id": "x"}))
        );
        let e = parse_response(json!({"Err": {"kind": "no_leader", "message": "m"}}))
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind, "no_leader");
        assert!(parse_response(json!([1])).is_err());
        assert!(parse_response(json!({"Other": 1})).is_err());
    }
}
