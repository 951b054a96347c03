//! Running nftables: the one place that shells out, because nftables has no stable netlink
//! library in Rust. Every crate that programs nftables (the overlay's filters and gateway,
//! the routing mesh, the nftables balancer) goes through this module.
//!
//! - A script given to [`apply`] is one atomic transaction (`nft -f` commits all of it or
//!   none of it); [`apply_in`] runs it inside another network namespace, [`apply_echo_in`]
//!   returns what nft echoes (new rules with their handles), [`output`]/[`output_in`] run a
//!   listing. Each spawns one `nft` process (~16 ms).
//! - [`read_table_in`] reads a table back as a typed [`json::Listing`] (or `None` if the
//!   table does not exist): how the balancer and the routing mesh adopt what a killed
//!   daemon programmed.
//! - A [`Session`] is one long-lived `nft -i` in a namespace, for many small transactions
//!   (~0.12 ms each): one line is one transaction. After each line a sentinel line is
//!   written that is a syntax error naming a sequence number, so the errors of our line are
//!   exactly what `nft` prints on stderr before the sentinel's error (nothing is printed on
//!   success). What is left of the cost is nft's own: its line editor reads stdin one byte
//!   per `read` (~0.25 µs a byte), and every command refreshes its cache before the commit.
//!   It runs with `HOME=/dev/null`, so it never reads or writes a history file; its history
//!   in memory only grows, so a user replaces it now and then ([`Session::sent`]).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::process::{Child, ChildStderr, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{NetlinkError, Netns};

pub mod json;

/// Bound on one command through a [`Session`].
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Error texts are cut to this many characters per line by [`condense`].
const ERROR_LINE_MAX: usize = 240;

/// Errors of running `nft`.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// There is no `nft` binary.
    #[error("nft not found: install nftables")]
    NotInstalled,
    /// `nft` could not be started or waited for.
    #[error("cannot run nft: {0}")]
    Spawn(#[source] io::Error),
    /// `nft` ran and failed: its stderr says why (for a script: nothing was committed).
    #[error("nft {args} failed ({status}): {stderr}")]
    Failed {
        /// The arguments, joined by spaces.
        args: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// The script could not be written to `nft` (which nonetheless exited with success).
    #[error("cannot write to nft: {0}")]
    Write(#[source] io::Error),
    /// The namespace could not be entered.
    #[error(transparent)]
    Namespace(#[from] NetlinkError),
    /// A JSON listing (`nft -j ...`) could not be read.
    #[error("nft {args}: {source}")]
    Json {
        /// The arguments, joined by spaces.
        args: String,
        /// What is wrong with it.
        #[source]
        source: json::JsonError,
    },
}

/// Runs `nft -f -` with `script` on stdin in the calling thread's network namespace.
pub fn apply(script: &str) -> Result<(), NftError> {
    run(&["-f", "-"], Some(script)).map(|_| ())
}

/// As [`apply`], inside `ns`.
pub fn apply_in(ns: &Netns, script: &str) -> Result<(), NftError> {
    ns.run(|| apply(script))?
}

/// As [`apply_in`] with `nft -e -a`: returns what nft echoes (the new objects, with the
/// handles of new rules), so a caller can delete them later without listing.
pub fn apply_echo_in(ns: &Netns, script: &str) -> Result<String, NftError> {
    ns.run(|| run(&["-e", "-a", "-f", "-"], Some(script)))?
}

/// Runs `nft ARGS` (e.g. `["list", "table", "ip", "t"]`) and returns its stdout.
pub fn output(args: &[&str]) -> Result<String, NftError> {
    run(args, None)
}

/// As [`output`], inside `ns`.
pub fn output_in(ns: &Netns, args: &[&str]) -> Result<String, NftError> {
    ns.run(|| output(args))?
}

/// Reads table `family name` in `ns` (`nft -j list table`), or `None` if there is no such
/// table.
pub fn read_table_in(
    ns: &Netns,
    family: &str,
    name: &str,
) -> Result<Option<json::Listing>, NftError> {
    ns.run(|| read_table(family, name))?
}

fn read_table(family: &str, name: &str) -> Result<Option<json::Listing>, NftError> {
    let list = ["-j", "list", "table", family, name];
    let listing = |text: &str| {
        json::parse(text).map_err(|source| NftError::Json {
            args: list.join(" "),
            source,
        })
    };
    match output(&list) {
        Ok(text) => listing(&text).map(Some),
        // Tell "no such table" from a real failure without reading (localized) errno texts:
        // is the table listed? The common case (it exists) costs one nft run.
        Err(e @ NftError::Failed { .. }) => {
            let tables = ["-j", "list", "tables", family];
            let text = output(&tables)?;
            let all = json::parse(&text).map_err(|source| NftError::Json {
                args: tables.join(" "),
                source,
            })?;
            if all.tables.iter().any(|t| t.name == name) {
                Err(e)
            } else {
                Ok(None)
            }
        }
        Err(e) => Err(e),
    }
}

fn run(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
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
        .map_err(spawn_error)?;
    let wrote = match (stdin, child.stdin.take()) {
        (Some(s), Some(mut pipe)) => pipe.write_all(s.as_bytes()),
        _ => Ok(()),
    };
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Failed {
            args: args.join(" "),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    wrote.map_err(NftError::Write)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nft` could not be started: not installed, or another reason.
fn spawn_error(e: io::Error) -> NftError {
    match e.kind() {
        io::ErrorKind::NotFound => NftError::NotInstalled,
        _ => NftError::Spawn(e),
    }
}

/// Errors of a [`Session`] command.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// nft refused the command (the transaction did not happen); its error, condensed.
    #[error("{0}")]
    Refused(String),
    /// The process failed us: the command's outcome is unknown, and the session is
    /// useless (drop it).
    #[error("nft -i session: {0}")]
    Broken(String),
}

/// A long-lived `nft -i` in a network namespace (see the module docs). Protocol: write
/// `<line>\n` (one transaction) then `mesh_nft_sync_<seq>\n`, a syntax error that nft
/// reports on stderr as `Error: ...` / the line / carets; whatever stderr shows before that
/// block belongs to `<line>`. Dropping it ends the process (always reaped).
pub struct Session {
    child: Child,
    /// `None` once closed (in drop).
    stdin: Option<ChildStdin>,
    stderr: ChildStderr,
    buf: Vec<u8>,
    seq: u64,
    sent: u32,
    /// Commands answered (successfully or with an nft error).
    answered: u32,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("pid", &self.child.id())
            .field("sent", &self.sent)
            .field("answered", &self.answered)
            .finish()
    }
}

impl Session {
    /// Starts `nft -i` in `ns`.
    pub fn spawn(ns: &Netns) -> Result<Session, NftError> {
        let mut child = ns
            .run(|| {
                Command::new("nft")
                    .arg("-i")
                    // No history file read or written.
                    .env("HOME", "/dev/null")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
            })?
            .map_err(spawn_error)?;
        let (Some(stdin), Some(stderr)) = (child.stdin.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(NftError::Spawn(io::Error::other("nft -i: no pipes")));
        };
        // From here on, dropping the session reaps the process.
        let session = Session {
            child,
            stdin: Some(stdin),
            stderr,
            buf: Vec::new(),
            seq: 0,
            sent: 0,
            answered: 0,
        };
        for fd in [session.stderr.as_raw_fd()]
            .into_iter()
            .chain(session.stdin.as_ref().map(AsRawFd::as_raw_fd))
        {
            set_nonblocking(fd).map_err(NftError::Spawn)?;
        }
        tracing::debug!(pid = session.child.id(), ns = ns.name(), "nft -i started");
        Ok(session)
    }

    /// The process id of `nft -i`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Commands sent so far.
    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// Commands answered so far (successfully or refused): 0 after a failure means this
    /// `nft` cannot serve a session at all (e.g. built without `-i`).
    pub fn answered(&self) -> u32 {
        self.answered
    }

    /// Runs `line` (one transaction, no newline, not ending in `\`), bounded by
    /// [`SESSION_TIMEOUT`].
    pub fn exec(&mut self, line: &str) -> Result<(), SessionError> {
        debug_assert!(!line.contains('\n') && !line.ends_with('\\'));
        self.seq += 1;
        self.sent += 1;
        let token = format!("mesh_nft_sync_{}", self.seq);
        let input = format!("{line}\n{token}\n").into_bytes();
        let mut written = 0;
        let deadline = Instant::now() + SESSION_TIMEOUT;
        let mut chunk = [0u8; 16 * 1024];
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(SessionError::Broken("closed".to_string()));
        };
        loop {
            if let Some(reply) = take_reply(&mut self.buf, &token) {
                if !matches!(reply, Err(SessionError::Broken(_))) {
                    self.answered += 1;
                }
                return reply;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SessionError::Broken(format!(
                    "no answer within {SESSION_TIMEOUT:?}"
                )));
            }
            let want_write = written < input.len();
            let mut fds = [
                libc::pollfd {
                    fd: self.stderr.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stdin.as_raw_fd(),
                    events: if want_write { libc::POLLOUT } else { 0 },
                    revents: 0,
                },
            ];
            let ms = left.as_millis().clamp(1, 1000) as libc::c_int;
            // SAFETY: two valid pollfds on fds we own for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(SessionError::Broken(format!("poll: {e}")));
            }
            if want_write && fds[1].revents != 0 {
                match stdin.write(&input[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(SessionError::Broken(format!("write: {e}"))),
                }
            }
            if fds[0].revents != 0 {
                match self.stderr.read(&mut chunk) {
                    Ok(0) => {
                        return Err(SessionError::Broken(format!(
                            "nft -i exited: {}",
                            condense(&String::from_utf8_lossy(&self.buf))
                        )))
                    }
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(SessionError::Broken(format!("read: {e}"))),
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Closing stdin ends `nft -i`; it gets half a second, then SIGKILL. Always reaped.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own; F_GETFL/F_SETFL take no pointers.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Takes one complete reply for `token` off the front of `buf`: `None` if it is not all
/// there yet. The reply is the sentinel's block (its `Error:` line, the token line, the
/// carets line) and whatever precedes it, which is the output of our command.
fn take_reply(buf: &mut Vec<u8>, token: &str) -> Option<Result<(), SessionError>> {
    let token = token.as_bytes();
    // The token alone on a line.
    let mut from = 0;
    let token_at = loop {
        let i = find(&buf[from..], token)? + from;
        let line_start = i == 0 || buf[i - 1] == b'\n';
        let line_end = buf.get(i + token.len()) == Some(&b'\n');
        if line_start && line_end {
            break i;
        }
        from = i + token.len();
    };
    // The carets line after it must be complete.
    let after = token_at + token.len() + 1;
    let end = buf[after..].iter().position(|b| *b == b'\n')? + after + 1;
    let before = String::from_utf8_lossy(&buf[..token_at]);
    let before = before.strip_suffix('\n').unwrap_or(&before);
    let (output, header) = match before.rfind('\n') {
        Some(i) => (&before[..i], &before[i + 1..]),
        None => ("", before),
    };
    let result = if !header.contains("Error") {
        Err(SessionError::Broken(format!(
            "unexpected output around the sync marker: {}",
            condense(&String::from_utf8_lossy(&buf[..end]))
        )))
    } else if output.contains("Error") {
        Err(SessionError::Refused(condense(output)))
    } else {
        if !output.trim().is_empty() {
            tracing::debug!(output = %condense(output), "nft -i said");
        }
        Ok(())
    };
    buf.drain(..end);
    Some(result)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An nft error text made fit for a message: lines cut to 240 characters (nft echoes the
/// whole command, which can be long), at most 20 lines.
pub fn condense(text: &str) -> String {
    let mut out = Vec::new();
    for line in text.trim().lines().take(20) {
        if line.chars().count() > ERROR_LINE_MAX {
            let cut: String = line.chars().take(ERROR_LINE_MAX).collect();
            out.push(format!("{cut}... ({} bytes)", line.len()));
        } else {
            out.push(line.to_string());
        }
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(buf: &str, token: &str) -> (Option<Result<(), String>>, String) {
        let mut b = buf.as_bytes().to_vec();
        let r = take_reply(&mut b, token).map(|r| {
            r.map_err(|e| match e {
                SessionError::Refused(m) => format!("nft: {m}"),
                SessionError::Broken(m) => format!("broken: {m}"),
            })
        });
        (r, String::from_utf8(b).unwrap())
    }

    const SENTINEL: &str =
        "Error: syntax error, unexpected newline, expecting string\nmesh_nft_sync_7\n              ^\n";

    #[test]
    fn session_replies() {
        // Success: only the sentinel's block.
        assert_eq!(
            reply(SENTINEL, "mesh_nft_sync_7"),
            (Some(Ok(())), String::new())
        );
        // Incomplete: wait for more.
        assert_eq!(reply(&SENTINEL[..70], "mesh_nft_sync_7").0, None);
        assert_eq!(reply("Error: syntax error", "mesh_nft_sync_7").0, None);
        // Another sequence number is not ours.
        assert_eq!(reply(SENTINEL, "mesh_nft_sync_71").0, None);
        // A failure, then the sentinel; what follows stays in the buffer.
        let failed = format!(
            "Error: Could not process rule: File exists\nadd element ip mesh_lb vips {{ 10.255.0.1 : accept }}\n                                ^^^^^^^^^^\n{SENTINEL}Error: next"
        );
        let (r, rest) = reply(&failed, "mesh_nft_sync_7");
        let e = r.unwrap().unwrap_err();
        assert!(
            e.starts_with("nft: Error: Could not process rule: File exists\nadd element"),
            "{e}"
        );
        assert!(!e.contains("mesh_nft_sync"), "{e}");
        assert_eq!(rest, "Error: next");
        // Garbage where the sentinel's error should be.
        let (r, _) = reply("what\nmesh_nft_sync_7\n^\n", "mesh_nft_sync_7");
        assert!(r.unwrap().unwrap_err().starts_with("broken: "));
    }

    #[test]
    fn errors_are_condensed() {
        let long = format!("Error: x\n{}\n", "a".repeat(1000));
        let c = condense(&long);
        assert!(c.len() < 300, "{c}");
        assert!(c.ends_with("... (1000 bytes)"), "{c}");
    }

    #[test]
    fn a_session_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Session>();
    }

    #[test]
    fn errors_read_as_before() {
        assert_eq!(
            NftError::NotInstalled.to_string(),
            "nft not found: install nftables"
        );
        assert_eq!(
            NftError::Write(io::Error::from(io::ErrorKind::BrokenPipe)).to_string(),
            "cannot write to nft: broken pipe"
        );
    }
}
