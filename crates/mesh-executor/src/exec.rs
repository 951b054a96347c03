//! Running a command to completion with a timeout, capturing its stdout and
//! stderr (bounded) on the calling thread with `poll(2)`; used by
//! [`crate::Executor::exec`].

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use crate::child::{self, ChildError};
use crate::spec::ExecOutput;

/// At most this much of each stream is kept.
pub const MAX_OUTPUT: usize = 16 * 1024 * 1024;
/// After the command exited, output is collected at most this long (a
/// background process may hold the pipes open).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Errors of running a command.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The command could not be started.
    #[error(transparent)]
    Spawn(#[from] ChildError),
    /// The command ran longer than allowed and was killed.
    #[error("timed out after {0:?} (killed)")]
    Timeout(Duration),
    /// Waiting for the command or reading its output failed.
    #[error("cannot collect the command's result: {0}")]
    Io(#[from] io::Error),
}

/// Shell-style status: the exit code, or 128 + signal number.
pub fn status_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// One captured stream.
struct Stream<R> {
    pipe: Option<R>,
    buf: Vec<u8>,
}

impl<R: Read + AsRawFd> Stream<R> {
    fn new(pipe: Option<R>) -> Self {
        Stream {
            pipe,
            buf: Vec::new(),
        }
    }

    /// Reads once (the pipe is readable); closes it on EOF or error.
    fn read_once(&mut self, chunk: &mut [u8]) {
        let Some(pipe) = self.pipe.as_mut() else {
            return;
        };
        match pipe.read(chunk) {
            Ok(0) => self.pipe = None,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(self.buf.len());
                self.buf.extend_from_slice(&chunk[..n.min(room)]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => self.pipe = None,
        }
    }
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Spawns `cmd` (stdout and stderr must be piped) and waits for it at most
/// `timeout`, collecting its output.
pub fn run_captured(
    mut cmd: Command,
    program: &str,
    timeout: Duration,
) -> Result<ExecOutput, RunError> {
    let spawned = cmd.spawn();
    drop(cmd);
    let mut child = spawned.map_err(|e| child::decode_spawn_error(e, program))?;
    let deadline = Instant::now() + timeout;
    let mut out: Stream<ChildStdout> = Stream::new(child.stdout.take());
    let mut err: Stream<ChildStderr> = Stream::new(child.stderr.take());
    let mut chunk = vec![0u8; 64 * 1024];
    let mut exited: Option<(ExitStatus, Instant)> = None;
    loop {
        if exited.is_none() {
            match child.try_wait() {
                Ok(Some(s)) => exited = Some((s, Instant::now())),
                Ok(None) => {}
                Err(e) => {
                    kill_and_reap(&mut child);
                    return Err(e.into());
                }
            }
        }
        let open = out.pipe.is_some() || err.pipe.is_some();
        if let Some((status, at)) = exited {
            if !open || at.elapsed() >= OUTPUT_GRACE {
                return Ok(ExecOutput {
                    status: status_code(status),
                    stdout: out.buf,
                    stderr: err.buf,
                });
            }
        } else if Instant::now() >= deadline {
            kill_and_reap(&mut child);
            return Err(RunError::Timeout(timeout));
        }
        if !open {
            thread::sleep(Duration::from_millis(5));
            continue;
        }
        let mut fds = [
            libc::pollfd {
                fd: out.pipe.as_ref().map_or(-1, |p| p.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: err.pipe.as_ref().map_or(-1, |p| p.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds (negative fds are ignored by poll) for
        // the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 20) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            kill_and_reap(&mut child);
            return Err(e.into());
        }
        if fds[0].revents != 0 {
            out.read_once(&mut chunk);
        }
        if fds[1].revents != 0 {
            err.read_once(&mut chunk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    #[test]
    fn captures_output_and_status() {
        let o = run_captured(
            sh("echo out; echo err >&2; exit 7"),
            "sh",
            Duration::from_secs(10),
        )
        .expect("run");
        assert_eq!(o.status, 7);
        assert_eq!(o.stdout, b"out\n");
        assert_eq!(o.stderr, b"err\n");
    }

    #[test]
    fn signals_and_timeouts() {
        let o = run_captured(sh("kill -9 $$"), "sh", Duration::from_secs(10)).expect("run");
        assert_eq!(o.status, 137);
        let t = Instant::now();
        let e = run_captured(sh("sleep 10"), "sh", Duration::from_millis(200));
        assert!(matches!(e, Err(RunError::Timeout(_))));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn background_process_holding_pipes_does_not_block() {
        let t = Instant::now();
        let o = run_captured(sh("sleep 5 & echo hi"), "sh", Duration::from_secs(10)).expect("run");
        assert_eq!(o.status, 0);
        assert_eq!(o.stdout, b"hi\n");
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn output_is_bounded() {
        let o = run_captured(
            sh("head -c 17000000 /dev/zero"),
            "sh",
            Duration::from_secs(30),
        )
        .expect("run");
        assert_eq!(o.stdout.len(), MAX_OUTPUT);
    }
}
