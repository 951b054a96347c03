//! Child-process helpers with bounded waits.
//!
//! `std::process` has no timeouts; everything the harness runs goes through
//! these helpers so no test can hang forever on a stuck command.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long to wait for a process to disappear after SIGKILL.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(10);

/// After a command exited, how long to keep collecting its output. Output
/// pipes stay open while a background grandchild holds them (e.g. a server
/// started with `sh -c 'srv &'`); we do not wait for those.
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// Polls `child` until it exits or `timeout` passes. Returns `Ok(None)` on
/// timeout (the child is left running).
pub(crate) fn wait_timeout(
    child: &mut Child,
    timeout: Duration,
) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(delay.min(deadline - now));
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

/// SIGKILLs `child` (if still running) and reaps it, waiting at most
/// [`KILL_WAIT`]. Returns the exit status, or an error if it did not die.
pub(crate) fn kill_and_reap(child: &mut Child) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    // Fails only if the child already exited (and is reaped below).
    let _ = child.kill();
    match wait_timeout(child, KILL_WAIT)? {
        Some(status) => Ok(status),
        None => bail!(
            "process {} did not exit within {KILL_WAIT:?} after SIGKILL",
            child.id()
        ),
    }
}

/// Converts an exit status to a shell-style code: the exit code, or
/// 128 + signal number when the process was killed by a signal.
pub(crate) fn status_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// A human-readable rendering of a command line, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Collects everything read from a pipe on a background thread.
struct Collector {
    buf: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl Collector {
    fn start(pipe: Option<impl Read + Send + 'static>) -> Collector {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let (tx, done) = mpsc::channel();
        if let Some(mut pipe) = pipe {
            let buf = Arc::clone(&buf);
            thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => buf
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                let _ = tx.send(());
            });
        }
        // Without a pipe, `tx` is dropped here and `done` reports at once.
        Collector { buf, done }
    }

    /// Waits until end-of-file or `deadline`, then returns what was read.
    fn finish(self, deadline: Instant) -> Vec<u8> {
        let _ = self
            .done
            .recv_timeout(deadline.saturating_duration_since(Instant::now()));
        std::mem::take(&mut *self.buf.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Runs `cmd` with stdin from `/dev/null`, capturing stdout and stderr.
/// If it has not exited after `timeout`, it is SIGKILLed and an error
/// (including the output so far) is returned.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    output_with_input(cmd, timeout, None)
}

/// [`output_with_timeout`] with `input` written to the command's stdin (then closed).
pub(crate) fn output_with_input(
    cmd: &mut Command,
    timeout: Duration,
    input: Option<&[u8]>,
) -> Result<Output> {
    let desc = describe(cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning `{desc}`"))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        use std::io::Write;
        // Small inputs: the pipe's buffer takes them whole, so this cannot block.
        stdin
            .write_all(input)
            .with_context(|| format!("writing to the stdin of `{desc}`"))?;
    }
    let stdout = Collector::start(child.stdout.take());
    let stderr = Collector::start(child.stderr.take());
    let status = match wait_timeout(&mut child, timeout) {
        Ok(Some(status)) => status,
        result => {
            let _ = kill_and_reap(&mut child);
            let deadline = Instant::now() + OUTPUT_GRACE;
            let out = String::from_utf8_lossy(&stdout.finish(deadline)).into_owned();
            let err = String::from_utf8_lossy(&stderr.finish(deadline)).into_owned();
            let why = match result {
                Err(e) => format!("waiting failed ({e})"),
                _ => format!("timed out after {timeout:?}"),
            };
            bail!("`{desc}` {why}; killed it\n--- stdout ---\n{out}\n--- stderr ---\n{err}");
        }
    };
    let deadline = Instant::now() + OUTPUT_GRACE;
    Ok(Output {
        status,
        stdout: stdout.finish(deadline),
        stderr: stderr.finish(deadline),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let out = output_with_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 7"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(status_code(out.status), 7);
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn kills_on_timeout() {
        let start = Instant::now();
        let err = output_with_timeout(
            Command::new("sh").args(["-c", "echo partial; exec sleep 30"]),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5));
        let msg = format!("{err:#}");
        assert!(msg.contains("timed out"), "{msg}");
        assert!(msg.contains("partial"), "{msg}");
    }

    #[test]
    fn does_not_wait_for_background_grandchildren() {
        let start = Instant::now();
        let out = output_with_timeout(
            Command::new("sh").args(["-c", "sleep 5 & echo started"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, b"started\n");
        assert!(start.elapsed() < Duration::from_secs(4));
    }

    #[test]
    fn signal_status_code() {
        let out = output_with_timeout(
            Command::new("sh").args(["-c", "kill -9 $$"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(status_code(out.status), 128 + 9);
    }
}
