//! Integration tests of the executor on the real kernel; they need root.
//!
//! This is a `harness = false` target: `main` first calls
//! `shim_main_if_requested()` (this binary is the shim of the tasks it
//! starts), then runs the tests one after another, prints `N passed, N
//! failed` and exits non-zero on failure. `cargo test -p mesh-executor --
//! NAME` runs the tests whose name contains NAME.
//!
//! Not root: prints "skipped: needs root" and passes, unless `CI` is set
//! (to anything but "", "0" or "false"): then it fails.
//!
//! Every test uses its own exec root (a temp dir) and cgroup parent
//! (`mesh-exec-test-<pid>-<n>`); the fixture kills the shims and removes
//! the whole cgroup subtree when dropped, also when the test failed; that
//! kills the network-namespace holders too (they live in `<parent>/netns`).
//! `ip netns` names are unique per process as well and deleted afterwards.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mesh_executor::{
    shim_main_if_requested, CgroupMode, ExecError, Executor, ExecutorConfig, LogStream,
    TaskRuntime, TaskSpec, DEFAULT_PATH,
};

use mesh_netns::serial::{Ctx, TestResult};
use mesh_netns::serial_ensure as ensure;

#[path = "executor/images.rs"]
mod images;

type TestFn = fn() -> TestResult;

/// `argv[1]` of the child mode used by the `ip netns exec` test.
const CHILD_ARG: &str = "__executor_test_child";
const RESOLV: &str = "nameserver 127.0.0.11\noptions ndots:0\n";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A temp exec root, a unique cgroup parent and an executor on them.
struct Fixture {
    dir: tempfile::TempDir,
    /// The exec root: `dir`, or a tmpfs mounted on `<dir>/run`.
    exec_root: PathBuf,
    /// The writable layers' root given to the executor (`None`: its default).
    rw_root: Option<PathBuf>,
    /// The tmpfs to unmount when dropped.
    tmpfs: Option<PathBuf>,
    parent: String,
    ex: Executor,
}

impl Fixture {
    fn new() -> Result<Fixture, String> {
        let dir = tempfile::Builder::new()
            .prefix("mesh-exec-test-")
            .tempdir()
            .ctx("tempdir")?;
        let parent = unique("mesh-exec-test");
        let ex = Executor::new(ExecutorConfig::new(dir.path(), &parent)).ctx("Executor::new")?;
        Ok(Fixture {
            exec_root: dir.path().to_path_buf(),
            dir,
            rw_root: None,
            tmpfs: None,
            parent,
            ex,
        })
    }

    /// The exec root on a tmpfs of its own, as `/run` is on a host, and the
    /// writable layers on disk in `<dir>/data/rw`, as meshd puts them.
    fn on_tmpfs() -> Result<Fixture, String> {
        let dir = tempfile::Builder::new()
            .prefix("mesh-exec-test-")
            .tempdir()
            .ctx("tempdir")?;
        let run = dir.path().join("run");
        fs::create_dir(&run).ctx("mkdir run")?;
        let target = std::ffi::CString::new(run.to_string_lossy().as_bytes()).ctx("path")?;
        // SAFETY: NUL-terminated strings valid for the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                c"size=256m,mode=0755".as_ptr().cast(),
            )
        };
        ensure!(rc == 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        let rw = dir.path().join("data/rw");
        let parent = unique("mesh-exec-test");
        let cfg = ExecutorConfig {
            rw_root: Some(rw.clone()),
            ..ExecutorConfig::new(&run, &parent)
        };
        let ex = match Executor::new(cfg) {
            Ok(ex) => ex,
            Err(e) => {
                // SAFETY: as above.
                unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
                return Err(format!("Executor::new: {e}"));
            }
        };
        Ok(Fixture {
            dir,
            exec_root: run.clone(),
            rw_root: Some(rw),
            tmpfs: Some(run),
            parent,
            ex,
        })
    }

    fn root(&self) -> &Path {
        &self.exec_root
    }

    /// Where the executor keeps the writable layers.
    fn rw_root(&self) -> PathBuf {
        self.rw_root
            .clone()
            .unwrap_or_else(|| self.exec_root.join("rw"))
    }

    /// A second executor on the same exec root and parent (a restarted
    /// meshd).
    fn another(&self) -> Result<Executor, String> {
        Executor::new(ExecutorConfig {
            rw_root: self.rw_root.clone(),
            ..ExecutorConfig::new(self.root(), &self.parent)
        })
        .ctx("second Executor::new")
    }

    fn state(&self, id: &str) -> Result<serde_json::Value, String> {
        let p = self.root().join("tasks").join(id).join("state.json");
        let text = fs::read_to_string(&p).ctx("reading state.json")?;
        serde_json::from_str(&text).ctx("parsing state.json")
    }

    /// Existing cgroup directories of the task.
    fn task_cgroups(&self, id: &str) -> Vec<PathBuf> {
        self.ex
            .layout()
            .task_paths(&self.parent, id)
            .into_iter()
            .filter(|p| p.exists())
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Kill every shim (their tasks die with them), then the cgroups.
        if let Ok(rd) = fs::read_dir(self.root().join("tasks")) {
            for e in rd.flatten() {
                let Ok(text) = fs::read_to_string(e.path().join("state.json")) else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                    continue;
                };
                let pid = v["shim_pid"].as_u64().unwrap_or(0);
                let start = v["shim_start_time"].as_u64().unwrap_or(0);
                if let Ok(pid) = u32::try_from(pid) {
                    if stat(pid).is_some_and(|(_, st)| st == start) {
                        kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        if let Err(e) = self
            .ex
            .layout()
            .remove_parent(&self.parent, Duration::from_secs(10))
        {
            eprintln!("cleanup: {e}");
        }
        for p in self.ex.layout().parent_paths(&self.parent) {
            if p.exists() {
                eprintln!("cleanup: {} is left behind", p.display());
            }
        }
        if let Some(t) = &self.tmpfs {
            if let Ok(c) = std::ffi::CString::new(t.to_string_lossy().as_bytes()) {
                // SAFETY: a NUL-terminated path valid for the call.
                if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                    eprintln!(
                        "cleanup: umount {}: {}",
                        t.display(),
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
    }
}

fn spec(id: &str, argv: &[&str]) -> TaskSpec {
    TaskSpec {
        id: id.to_string(),
        name: format!("t.1.{id}"),
        hostname: format!("host-{id}"),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("MESH_TEST_VAR".into(), "hello world".into())],
        nano_cpus: 0,
        memory_bytes: 0,
        resolv_conf: RESOLV.to_string(),
        rootfs: None,
        log: Default::default(),
    }
}

fn sv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// State letter and start time of a process.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    let state = f.next()?.chars().next()?;
    Some((state, f.nth(18)?.parse().ok()?))
}

/// Field `n` (1-based) of /proc/<pid>/stat.
fn stat_field(pid: u32, n: usize) -> Option<i64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(n - 3)?.parse().ok()
}

fn dead(pid: u32) -> bool {
    !matches!(stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

fn kill(pid: u32, sig: i32) {
    // SAFETY: plain syscall on a pid this test started.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> TestResult {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn wait_exited(ex: &Executor, id: &str) -> Result<TaskRuntime, String> {
    let mut last = None;
    wait_until(
        &format!("task {id} to exit"),
        Duration::from_secs(10),
        || {
            last = ex.status(id);
            last.as_ref().is_some_and(|rt| !rt.is_running())
        },
    )?;
    last.ctx("status")
}

fn running_pid(rt: &TaskRuntime) -> Result<u32, String> {
    match rt {
        TaskRuntime::Running { pid, .. } => Ok(*pid),
        other => Err(format!("expected Running, got {other:?}")),
    }
}

/// The task's lines on `stream`, each with its newline.
fn stream_of(ex: &Executor, id: &str, stream: LogStream) -> String {
    ex.logs(id, None, None)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.stream == stream)
        .map(|r| r.text + "\n")
        .collect()
}

fn stdout_of(ex: &Executor, id: &str) -> String {
    stream_of(ex, id, LogStream::Stdout)
}

fn stderr_of(ex: &Executor, id: &str) -> String {
    stream_of(ex, id, LogStream::Stderr)
}

fn readlink(p: &str) -> Result<String, String> {
    fs::read_link(p)
        .map(|l| l.to_string_lossy().into_owned())
        .ctx(p)
}

fn host_hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Tests

fn namespaces_env_resolv_and_output() -> TestResult {
    let f = Fixture::new()?;
    let id = unique("ns");
    let host_resolv = fs::read("/etc/resolv.conf").ctx("host resolv.conf")?;
    let host_name = host_hostname();
    let script = "echo started; echo to-stderr >&2; cat /etc/resolv.conf; hostname; \
                  echo \"VAR=$MESH_TEST_VAR\"; echo \"PATH=$PATH\"; echo done; exec sleep 60";
    let t0 = Instant::now();
    let rt = f.ex.start(&spec(&id, &["sh", "-c", script])).ctx("start")?;
    let start_took = t0.elapsed();
    println!("    start took {start_took:?}");
    ensure!(
        start_took < Duration::from_secs(1),
        "start took {start_took:?}"
    );
    let pid = running_pid(&rt)?;
    wait_until("the task's output", Duration::from_secs(5), || {
        stdout_of(&f.ex, &id).contains("done\n")
    })?;
    let (out, err) = (stdout_of(&f.ex, &id), stderr_of(&f.ex, &id));
    ensure!(out.starts_with("started\n"), "stdout: {out}");
    ensure!(out.contains(RESOLV), "resolv.conf inside: {out}");
    ensure!(out.contains(&format!("\nhost-{id}\n")), "hostname: {out}");
    ensure!(out.contains("VAR=hello world\n"), "env: {out}");
    ensure!(
        out.contains(&format!("PATH={DEFAULT_PATH}\n")),
        "PATH: {out}"
    );
    ensure!(err == "to-stderr\n", "stderr: {err:?}");
    // Stamped in order; the last one, and those after a time.
    let all = f.ex.logs(&id, None, None).ctx("logs")?;
    ensure!(
        all.windows(2).all(|p| p[0].time_ns < p[1].time_ns),
        "times: {all:?}"
    );
    let tail = f.ex.logs(&id, None, Some(1)).ctx("logs tail")?;
    ensure!(tail.len() == 1 && tail[0].text == "done", "tail: {tail:?}");
    let after =
        f.ex.logs(&id, Some(all[0].time_ns), None)
            .ctx("logs after")?;
    ensure!(after[..] == all[1..], "after the first: {after:?}");
    // The host is untouched.
    ensure!(
        fs::read("/etc/resolv.conf").ctx("host resolv.conf")? == host_resolv,
        "host resolv.conf changed"
    );
    ensure!(host_hostname() == host_name, "host hostname changed");
    // Own namespaces.
    for ns in ["net", "uts", "mnt"] {
        let mine = readlink(&format!("/proc/self/ns/{ns}"))?;
        let task = readlink(&format!("/proc/{pid}/ns/{ns}"))?;
        ensure!(mine != task, "task shares the {ns} namespace ({mine})");
    }
    ensure!(
        f.ex.netns_path(&id) == Some(PathBuf::from(format!("/proc/{pid}/ns/net"))),
        "netns_path: {:?}",
        f.ex.netns_path(&id)
    );
    // exec: hostname, env, resolv.conf, exit status.
    let o =
        f.ex.exec(&id, &sv(&["hostname"]), Duration::from_secs(10))
            .ctx("exec hostname")?;
    ensure!(o.status == 0, "exec status {}", o.status);
    ensure!(
        o.stdout == format!("host-{id}\n").as_bytes(),
        "exec stdout {:?}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o =
        f.ex.exec(
            &id,
            &sv(&[
                "sh",
                "-c",
                "echo $MESH_TEST_VAR; cat /etc/resolv.conf; echo oops >&2; exit 5",
            ]),
            Duration::from_secs(10),
        )
        .ctx("exec sh")?;
    let text = String::from_utf8_lossy(&o.stdout);
    ensure!(o.status == 5, "exec status {}", o.status);
    ensure!(
        text.starts_with("hello world\n") && text.contains(RESOLV),
        "exec stdout {text:?}"
    );
    ensure!(o.stderr == b"oops\n", "exec stderr {:?}", o.stderr);
    // The exec'd process is in the task's namespaces and cgroups.
    let o =
        f.ex.exec(
            &id,
            &sv(&[
                "sh",
                "-c",
                "readlink /proc/self/ns/net; cat /proc/self/cgroup",
            ]),
            Duration::from_secs(10),
        )
        .ctx("exec readlink")?;
    let text = String::from_utf8_lossy(&o.stdout);
    let task_net = readlink(&format!("/proc/{pid}/ns/net"))?;
    ensure!(text.starts_with(&task_net), "exec netns: {text}");
    ensure!(
        text.contains(&format!("/{}/{id}\n", f.parent)),
        "exec cgroups: {text}"
    );
    // lo is up in the task's namespace and is its only interface.
    let o =
        f.ex.exec(
            &id,
            &sv(&["ping", "-c1", "-W2", "127.0.0.1"]),
            Duration::from_secs(10),
        )
        .ctx("exec ping")?;
    ensure!(
        o.status == 0,
        "ping 127.0.0.1 in the task failed ({}): {} {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let o =
        f.ex.exec(&id, &sv(&["cat", "/proc/net/dev"]), Duration::from_secs(10))
            .ctx("exec cat")?;
    let devs: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|s| s.trim().to_string()))
        .collect();
    ensure!(devs == ["lo"], "interfaces in the task: {devs:?}");
    // exec errors.
    let e =
        f.ex.exec(&id, &sv(&["mesh-no-such-command"]), Duration::from_secs(10));
    let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        msg == format!("cannot exec in task t.1.{id}: command not found: mesh-no-such-command"),
        "exec of a missing command: {msg}"
    );
    let t = Instant::now();
    let e =
        f.ex.exec(&id, &sv(&["sleep", "10"]), Duration::from_millis(300));
    let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(msg.contains("timed out after"), "exec timeout: {msg}");
    ensure!(
        t.elapsed() < Duration::from_secs(3),
        "exec timeout took {:?}",
        t.elapsed()
    );
    // Starting again is idempotent.
    let again =
        f.ex.start(&spec(&id, &["sh", "-c", script]))
            .ctx("start again")?;
    ensure!(running_pid(&again)? == pid, "second start: {again:?}");
    ensure!(
        f.ex.list()
            .iter()
            .map(|(i, _)| i.clone())
            .collect::<Vec<_>>()
            == [id.clone()],
        "list: {:?}",
        f.ex.list()
    );
    // Files on disk.
    let dir = f.root().join("tasks").join(&id);
    for file in [
        "spec.json",
        "state.json",
        "resolv.conf",
        "hostname",
        "log.json",
    ] {
        ensure!(dir.join(file).exists(), "{file} missing");
    }
    let st = f.state(&id)?;
    ensure!(
        st["pid"].as_u64() == Some(u64::from(pid)),
        "state.json: {st}"
    );
    ensure!(
        st["pid_start_time"].as_u64() == stat(pid).map(|s| s.1),
        "state.json start time: {st}"
    );
    f.ex.remove(&id).ctx("remove")?;
    ensure!(dead(pid), "task still alive after remove");
    ensure!(!dir.exists(), "state dir left");
    ensure!(
        f.task_cgroups(&id).is_empty(),
        "cgroups left: {:?}",
        f.task_cgroups(&id)
    );
    ensure!(f.ex.status(&id).is_none(), "status after remove");
    Ok(())
}

fn exit_code_is_reported() -> TestResult {
    let f = Fixture::new()?;
    let id = unique("exit3");
    let rt =
        f.ex.start(&spec(
            &id,
            &[
                "sh",
                "-c",
                "sleep 1000 & echo $!; sleep 0.2; echo bye >&2; exit 3",
            ],
        ))
        .ctx("start")?;
    running_pid(&rt)?;
    let rt = wait_exited(&f.ex, &id)?;
    // Its last line is in its log once it is recorded exited (the background process held
    // the pipe until the shim killed it).
    let err = stderr_of(&f.ex, &id);
    ensure!(err == "bye\n", "stderr once exited: {err:?}");
    let TaskRuntime::Exited {
        code,
        signal,
        started_at_ms,
        finished_at_ms,
    } = rt
    else {
        return Err(format!("not exited: {rt:?}"));
    };
    ensure!(
        code == Some(3) && signal.is_none(),
        "code {code:?} signal {signal:?}"
    );
    ensure!(
        finished_at_ms >= started_at_ms + 150,
        "times {started_at_ms} {finished_at_ms}"
    );
    // The background process did not survive the task.
    let bg: u32 = stdout_of(&f.ex, &id).trim().parse().ctx("background pid")?;
    wait_until(
        "the background process to die",
        Duration::from_secs(5),
        || dead(bg),
    )?;
    ensure!(
        f.root().join("tasks").join(&id).join("exit.json").exists(),
        "exit.json missing"
    );
    // Adopted state agrees.
    let other = f.another()?;
    ensure!(
        other.status(&id) == Some(rt.clone()),
        "second executor: {:?}",
        other.status(&id)
    );
    let e = f.ex.exec(&id, &sv(&["true"]), Duration::from_secs(5));
    ensure!(
        matches!(e, Err(ExecError::NotRunning { .. })),
        "exec in an exited task: {e:?}"
    );
    ensure!(
        f.ex.netns_path(&id).is_none(),
        "netns_path of an exited task"
    );
    // start of an exited id returns its runtime and starts nothing.
    let again =
        f.ex.start(&spec(&id, &["sleep", "100"]))
            .ctx("start again")?;
    ensure!(again == rt, "start of an exited task: {again:?}");
    f.ex.remove(&id).ctx("remove")?;
    ensure!(f.task_cgroups(&id).is_empty(), "cgroups left");
    Ok(())
}

fn kill_9_is_reported_as_signal() -> TestResult {
    let f = Fixture::new()?;
    let id = unique("kill9");
    let pid = running_pid(&f.ex.start(&spec(&id, &["sleep", "60"])).ctx("start")?)?;
    kill(pid, libc::SIGKILL);
    let rt = wait_exited(&f.ex, &id)?;
    ensure!(
        matches!(
            rt,
            TaskRuntime::Exited {
                code: None,
                signal: Some(9),
                ..
            }
        ),
        "{rt:?}"
    );
    f.ex.remove(&id).ctx("remove")?;
    Ok(())
}

fn start_errors_are_clear() -> TestResult {
    let f = Fixture::new()?;
    let id = unique("nocmd");
    let e = f.ex.start(&spec(&id, &["mesh-no-such-command-xyz", "arg"]));
    match &e {
        Err(ExecError::Start { task, reason }) => {
            ensure!(task == &format!("t.1.{id}"), "task {task}");
            ensure!(
                reason == "command not found: mesh-no-such-command-xyz",
                "reason {reason}"
            );
        }
        other => return Err(format!("expected a start error, got {other:?}")),
    }
    let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        msg == format!("cannot start task t.1.{id}: command not found: mesh-no-such-command-xyz"),
        "{msg}"
    );
    ensure!(f.ex.status(&id).is_none(), "status after a failed start");
    ensure!(!f.root().join("tasks").join(&id).exists(), "state dir left");
    ensure!(f.task_cgroups(&id).is_empty(), "cgroups left");
    // Not executable.
    let script = f.root().join("not-executable.sh");
    fs::write(&script, "#!/bin/sh\necho hi\n").ctx("write script")?;
    let path = script.to_string_lossy().into_owned();
    let id2 = unique("noexec");
    let msg =
        f.ex.start(&spec(&id2, &[&path]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
    ensure!(
        msg == format!("cannot start task t.1.{id2}: permission denied: {path}"),
        "{msg}"
    );
    // Invalid specs.
    let id3 = unique("empty");
    let msg =
        f.ex.start(&spec(&id3, &[]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
    ensure!(
        msg == format!("cannot start task t.1.{id3}: empty command line"),
        "{msg}"
    );
    let msg =
        f.ex.start(&spec("../x", &["true"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
    ensure!(
        msg.starts_with("cannot start task t.1.../x: invalid task id"),
        "{msg}"
    );
    // Unknown ids.
    ensure!(f.ex.status("nope").is_none(), "status of an unknown id");
    ensure!(
        matches!(
            f.ex.stop("nope", Duration::ZERO),
            Err(ExecError::NotFound { .. })
        ),
        "stop of an unknown id"
    );
    ensure!(
        matches!(
            f.ex.logs("nope", None, None),
            Err(ExecError::NotFound { .. })
        ),
        "logs of an unknown id"
    );
    ensure!(
        matches!(
            f.ex.exec("nope", &sv(&["true"]), Duration::from_secs(1)),
            Err(ExecError::NotFound { .. })
        ),
        "exec in an unknown id"
    );
    f.ex.remove("nope").ctx("remove of an unknown id")?;
    ensure!(f.ex.list().is_empty(), "list: {:?}", f.ex.list());
    Ok(())
}

fn read_trim(p: &Path) -> Result<String, String> {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .ctx(&p.display().to_string())
}

fn limits_are_written() -> TestResult {
    let f = Fixture::new()?;
    let id = unique("limits");
    let mut s = spec(&id, &["sleep", "60"]);
    s.nano_cpus = 500_000_000;
    s.memory_bytes = 64 * 1024 * 1024;
    let pid = running_pid(&f.ex.start(&s).ctx("start")?)?;
    check_limits(f.ex.layout(), &f.parent, &id, pid, "50000", "67108864")?;
    // No limits: defaults stay.
    let id2 = unique("nolimits");
    let pid2 = running_pid(&f.ex.start(&spec(&id2, &["sleep", "60"])).ctx("start")?)?;
    let layout = f.ex.layout();
    match layout.mode() {
        CgroupMode::Unified => {
            let d = layout.v2_task_path(&f.parent, &id2);
            ensure!(read_trim(&d.join("cpu.max"))? == "max 100000", "cpu.max");
            ensure!(read_trim(&d.join("memory.max"))? == "max", "memory.max");
        }
        CgroupMode::Hybrid => {
            let cpu = v1_dir(layout, "cpu", &f.parent, &id2)?;
            ensure!(read_trim(&cpu.join("cpu.cfs_quota_us"))? == "-1", "quota");
        }
    }
    ensure!(
        in_cgroups(layout, &f.parent, &id2, pid2)?,
        "not in its cgroups"
    );
    f.ex.remove(&id).ctx("remove")?;
    f.ex.remove(&id2).ctx("remove")?;
    ensure!(
        f.task_cgroups(&id).is_empty() && f.task_cgroups(&id2).is_empty(),
        "cgroups left"
    );
    Ok(())
}

fn v1_dir(
    layout: &mesh_executor::CgroupLayout,
    controller: &str,
    parent: &str,
    id: &str,
) -> Result<PathBuf, String> {
    layout
        .v1_hierarchies()
        .iter()
        .find(|h| h.controllers.iter().any(|c| c == controller))
        .map(|h| h.path.join(parent).join(id))
        .ctx(&format!("v1 hierarchy of {controller}"))
}

/// True if `pid` is listed in the task's cgroup in every hierarchy.
fn in_cgroups(
    layout: &mesh_executor::CgroupLayout,
    parent: &str,
    id: &str,
    pid: u32,
) -> Result<bool, String> {
    for d in layout.task_paths(parent, id) {
        let procs = fs::read_to_string(d.join("cgroup.procs")).ctx("cgroup.procs")?;
        if !procs.lines().any(|l| l.trim() == pid.to_string()) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn check_limits(
    layout: &mesh_executor::CgroupLayout,
    parent: &str,
    id: &str,
    pid: u32,
    quota: &str,
    memory: &str,
) -> TestResult {
    match layout.mode() {
        CgroupMode::Unified => {
            let d = layout.v2_task_path(parent, id);
            let cpu = read_trim(&d.join("cpu.max"))?;
            ensure!(cpu == format!("{quota} 100000"), "cpu.max {cpu}");
            let mem = read_trim(&d.join("memory.max"))?;
            ensure!(mem == memory, "memory.max {mem}");
        }
        CgroupMode::Hybrid => {
            ensure!(layout.v2_task_path(parent, id).is_dir(), "no v2 cgroup");
            let cpu = v1_dir(layout, "cpu", parent, id)?;
            let p = read_trim(&cpu.join("cpu.cfs_period_us"))?;
            let q = read_trim(&cpu.join("cpu.cfs_quota_us"))?;
            ensure!(p == "100000" && q == quota, "cpu period {p} quota {q}");
            let mem = v1_dir(layout, "memory", parent, id)?;
            let m = read_trim(&mem.join("memory.limit_in_bytes"))?;
            ensure!(m == memory, "memory.limit_in_bytes {m}");
            v1_dir(layout, "pids", parent, id)?;
        }
    }
    ensure!(
        in_cgroups(layout, parent, id, pid)?,
        "task not in all its cgroups"
    );
    Ok(())
}

fn adoption_by_a_new_executor() -> TestResult {
    let f = Fixture::new()?;
    let id = unique("adopt");
    let pid = running_pid(&f.ex.start(&spec(&id, &["sleep", "60"])).ctx("start")?)?;
    let b = f.another()?;
    let list = b.list();
    ensure!(list.len() == 1 && list[0].0 == id, "list {list:?}");
    ensure!(running_pid(&list[0].1)? == pid, "list {list:?}");
    let o = b
        .exec(&id, &sv(&["hostname"]), Duration::from_secs(10))
        .ctx("exec")?;
    ensure!(o.stdout == format!("host-{id}\n").as_bytes(), "exec {o:?}");
    let t = Instant::now();
    b.stop(&id, Duration::from_secs(5)).ctx("stop")?;
    ensure!(
        t.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        t.elapsed()
    );
    let rt = b.status(&id).ctx("status")?;
    ensure!(
        matches!(
            rt,
            TaskRuntime::Exited {
                code: None,
                signal: Some(15),
                ..
            }
        ),
        "{rt:?}"
    );
    ensure!(dead(pid), "task alive after stop");
    b.remove(&id).ctx("remove")?;
    ensure!(f.task_cgroups(&id).is_empty(), "cgroups left");
    Ok(())
}

fn shim_is_detached_and_its_death_kills_the_task() -> TestResult {
    let f = Fixture::new()?;
    let id = unique("shim");
    let pid = running_pid(&f.ex.start(&spec(&id, &["sleep", "60"])).ctx("start")?)?;
    let st = f.state(&id)?;
    let shim = u32::try_from(st["shim_pid"].as_u64().ctx("shim_pid")?).ctx("shim pid")?;
    let ppid = stat_field(shim, 4).ctx("shim ppid")?;
    let sid = stat_field(shim, 6).ctx("shim sid")?;
    ensure!(
        ppid != i64::from(std::process::id()),
        "the shim is our child"
    );
    ensure!(
        sid == i64::from(shim),
        "the shim is no session leader (sid {sid})"
    );
    ensure!(
        stat_field(pid, 4) == Some(i64::from(shim)),
        "task's parent is not the shim"
    );
    kill(shim, libc::SIGKILL);
    wait_until(
        "the task to die with its shim",
        Duration::from_secs(5),
        || dead(pid),
    )?;
    let rt = wait_exited(&f.ex, &id)?;
    ensure!(
        matches!(
            rt,
            TaskRuntime::Exited {
                code: None,
                signal: Some(9),
                ..
            }
        ),
        "{rt:?}"
    );
    // The synthesized record is persisted and stable.
    ensure!(
        f.root().join("tasks").join(&id).join("exit.json").exists(),
        "exit.json not written"
    );
    ensure!(f.ex.status(&id) == Some(rt), "status changed");
    f.ex.remove(&id).ctx("remove")?;
    ensure!(f.task_cgroups(&id).is_empty(), "cgroups left");
    Ok(())
}

fn stop_and_remove_leave_nothing() -> TestResult {
    let f = Fixture::new()?;
    let id = unique("stubborn");
    // Ignores SIGTERM, as do its children (ignored signals are inherited).
    let script = "trap '' TERM; sleep 1000 & sleep 1000 & echo ready; wait";
    let pid = running_pid(&f.ex.start(&spec(&id, &["sh", "-c", script])).ctx("start")?)?;
    wait_until("ready", Duration::from_secs(5), || {
        stdout_of(&f.ex, &id).contains("ready")
    })?;
    let pids = f.ex.layout().task_pids(&f.parent, &id);
    ensure!(
        pids.len() == 3 && pids.contains(&pid),
        "cgroup pids {pids:?}"
    );
    // An exec'd process that lingers is killed too.
    let o =
        f.ex.exec(
            &id,
            &sv(&["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"]),
            Duration::from_secs(5),
        )
        .ctx("exec")?;
    let exec_bg: u32 = String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .ctx("exec pid")?;
    let t = Instant::now();
    f.ex.stop(&id, Duration::from_millis(700)).ctx("stop")?;
    let took = t.elapsed();
    ensure!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(700 + 5000),
        "stop took {took:?}"
    );
    for p in pids.iter().chain([&exec_bg]) {
        wait_until(&format!("pid {p} to die"), Duration::from_secs(5), || {
            dead(*p)
        })?;
    }
    let rt = f.ex.status(&id).ctx("status")?;
    ensure!(
        matches!(
            rt,
            TaskRuntime::Exited {
                signal: Some(9),
                ..
            }
        ),
        "{rt:?}"
    );
    ensure!(
        f.ex.layout().task_pids(&f.parent, &id).is_empty(),
        "processes left"
    );
    // An ended task keeps its state directory (logs) until `remove`, not its
    // cgroups.
    ensure!(
        f.task_cgroups(&id).is_empty(),
        "stop left the cgroups: {:?}",
        f.task_cgroups(&id)
    );
    ensure!(
        stdout_of(&f.ex, &id).contains("ready"),
        "logs gone after stop"
    );
    // stop of a stopped task is fine.
    f.ex.stop(&id, Duration::from_secs(1)).ctx("second stop")?;
    f.ex.remove(&id).ctx("remove")?;
    ensure!(
        f.task_cgroups(&id).is_empty(),
        "cgroups left: {:?}",
        f.task_cgroups(&id)
    );
    ensure!(!f.root().join("tasks").join(&id).exists(), "state dir left");
    // remove of a running task kills it.
    let id2 = unique("running");
    let pid2 = running_pid(&f.ex.start(&spec(&id2, &["sleep", "1000"])).ctx("start")?)?;
    let shim2 = u32::try_from(f.state(&id2)?["shim_pid"].as_u64().ctx("shim")?).ctx("shim pid")?;
    f.ex.remove(&id2).ctx("remove running")?;
    ensure!(dead(pid2) && dead(shim2), "task or shim alive after remove");
    ensure!(f.task_cgroups(&id2).is_empty(), "cgroups left");
    ensure!(f.ex.list().is_empty(), "list {:?}", f.ex.list());
    f.ex.remove(&id2).ctx("remove twice")?;
    Ok(())
}

/// A task that exits by itself (leaving a background process in its
/// cgroups), a stopped task and a task whose shim was SIGKILLed, all started
/// by `starter` and watched by `ex`: once `ex` knows each has ended, its
/// cgroups are gone (in every hierarchy) while its state directory, logs and
/// exit record stay for `service logs` and `service ps` until `remove`.
fn ended_tasks_scenario(f: &Fixture, starter: &Executor, ex: &Executor) -> TestResult {
    let gone = |id: &str, when: &str| -> TestResult {
        let left = f.task_cgroups(id);
        ensure!(left.is_empty(), "cgroups of {id} left {when}: {left:?}");
        Ok(())
    };
    let all = f.ex.layout().task_paths(&f.parent, "x").len();
    // 1. Exits by itself (code 4) on SIGUSR1.
    let exits = unique("exits");
    let script = "sleep 1000 & trap 'echo bye; exit 4' USR1; echo up; \
                  while :; do sleep 0.05; done";
    let pid = running_pid(
        &starter
            .start(&spec(&exits, &["sh", "-c", script]))
            .ctx("start")?,
    )?;
    wait_until("the task to be up", Duration::from_secs(5), || {
        stdout_of(ex, &exits).contains("up\n")
    })?;
    ensure!(
        f.task_cgroups(&exits).len() == all,
        "cgroups of a running task: {:?}",
        f.task_cgroups(&exits)
    );
    kill(pid, libc::SIGUSR1);
    let rt = wait_exited(ex, &exits)?;
    ensure!(
        matches!(rt, TaskRuntime::Exited { code: Some(4), .. }),
        "{rt:?}"
    );
    gone(&exits, "after it exited")?;
    ensure!(stdout_of(ex, &exits).contains("bye\n"), "logs of {exits}");
    // 2. Stopped: gone when `stop` returns.
    let stopped = unique("stopped");
    running_pid(
        &starter
            .start(&spec(&stopped, &["sleep", "1000"]))
            .ctx("start")?,
    )?;
    ex.stop(&stopped, Duration::from_secs(5)).ctx("stop")?;
    gone(&stopped, "after stop returned")?;
    // 3. Its shim SIGKILLed (the task dies with it): gone once the executor
    // has seen it dead.
    let shimless = unique("shimless");
    running_pid(
        &starter
            .start(&spec(&shimless, &["sleep", "1000"]))
            .ctx("start")?,
    )?;
    let shim =
        u32::try_from(f.state(&shimless)?["shim_pid"].as_u64().ctx("shim")?).ctx("shim pid")?;
    kill(shim, libc::SIGKILL);
    wait_until(
        "the task of a killed shim to be seen exited, without cgroups",
        Duration::from_secs(5),
        || {
            ex.status(&shimless).is_some_and(|rt| !rt.is_running())
                && f.task_cgroups(&shimless).is_empty()
        },
    )
    .map_err(|e| format!("{e}: {:?} left", f.task_cgroups(&shimless)))?;
    // All three are still listed, with their logs, until removed.
    let mut ids = vec![exits.clone(), stopped.clone(), shimless.clone()];
    ids.sort();
    let list = ex.list();
    ensure!(
        list.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>() == ids
            && list.iter().all(|(_, rt)| !rt.is_running()),
        "list {list:?}"
    );
    for id in &ids {
        ensure!(ex.logs(id, None, None).is_ok(), "logs of {id}");
        gone(id, "after list")?;
        ex.remove(id).ctx("remove")?;
        ensure!(!f.root().join("tasks").join(id).exists(), "state dir left");
    }
    Ok(())
}

fn ended_tasks_release_their_cgroups() -> TestResult {
    let f = Fixture::new()?;
    ended_tasks_scenario(&f, &f.ex, &f.ex)
}

/// The same for tasks a restarted meshd adopted (a new executor on the same
/// exec root and cgroup parent).
fn adopted_tasks_release_their_cgroups() -> TestResult {
    let f = Fixture::new()?;
    let adopter = f.another()?;
    ended_tasks_scenario(&f, &f.ex, &adopter)
}

/// meshd SIGKILLed during a start (its task waiting at the network gate):
/// the shim aborts, leaving a state directory without `state.json` and the
/// task's cgroups. The restarted meshd removes them, whether or not the task
/// is ever started again.
fn a_start_cut_by_a_daemon_death_leaves_nothing() -> TestResult {
    use std::os::unix::process::ExitStatusExt;
    let f = Fixture::new()?;
    let id = unique("cut");
    let exe = std::env::current_exe().ctx("current_exe")?;
    let out = Command::new(exe)
        .args([CHILD_ARG, "die-in-setup"])
        .arg(f.root())
        .args([&f.parent, &id, "-"])
        .output()
        .ctx("running the child")?;
    ensure!(
        out.status.signal() == Some(libc::SIGKILL),
        "the child should have SIGKILLed itself: {:?}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = f.root().join("tasks").join(&id);
    ensure!(
        dir.join("launch.json").exists() && !dir.join("state.json").exists(),
        "not the remains of a start: {:?}",
        fs::read_dir(&dir).map(|rd| rd.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    let restarted = f.another()?;
    wait_until(
        "the remains of the cut start to be removed",
        Duration::from_secs(10),
        || {
            let listed = restarted.list();
            listed.is_empty() && !dir.exists() && f.task_cgroups(&id).is_empty()
        },
    )
    .map_err(|e| {
        format!(
            "{e}: state dir exists {}, cgroups {:?}",
            dir.exists(),
            f.task_cgroups(&id)
        )
    })?;
    Ok(())
}

/// Child mode: a meshd that is SIGKILLed in the network setup of a start,
/// while the task waits at the gate.
fn child_die_in_setup(root: &Path, parent: &str, id: &str) -> TestResult {
    let ex = Executor::new(ExecutorConfig::new(root, parent)).ctx("Executor::new")?;
    let r = ex.start_with(&spec(id, &["sleep", "300"]), &mut |_| {
        kill(std::process::id(), libc::SIGKILL);
        thread::sleep(Duration::from_secs(10));
        Err("still alive after SIGKILL".into())
    });
    Err(format!("still alive after SIGKILL: {r:?}"))
}

fn concurrent_starts() -> TestResult {
    let f = Fixture::new()?;
    let ids: Vec<String> = (0..6).map(|_| unique("conc")).collect();
    let results: Vec<Result<TaskRuntime, String>> = thread::scope(|s| {
        let hs: Vec<_> = ids
            .iter()
            .map(|id| {
                let ex = &f.ex;
                s.spawn(move || {
                    ex.start(&spec(id, &["sleep", "60"]))
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    });
    for r in &results {
        running_pid(r.as_ref().map_err(Clone::clone)?)?;
    }
    // The same id from two threads: one task.
    let dup = unique("dup");
    let (a, b) = thread::scope(|s| {
        let h1 = s.spawn(|| {
            f.ex.start(&spec(&dup, &["sleep", "60"]))
                .map_err(|e| e.to_string())
        });
        let h2 = s.spawn(|| {
            f.ex.start(&spec(&dup, &["sleep", "60"]))
                .map_err(|e| e.to_string())
        });
        (
            h1.join().unwrap_or_else(|_| Err("panicked".into())),
            h2.join().unwrap_or_else(|_| Err("panicked".into())),
        )
    });
    ensure!(a.is_ok() && a == b, "duplicate starts: {a:?} {b:?}");
    let mut want = ids.clone();
    want.push(dup.clone());
    want.sort();
    let got: Vec<String> = f.ex.list().into_iter().map(|(i, _)| i).collect();
    ensure!(got == want, "list {got:?}");
    ensure!(
        f.ex.layout().task_pids(&f.parent, &dup).len() == 1,
        "duplicate task"
    );
    for id in &want {
        f.ex.remove(id).ctx("remove")?;
    }
    Ok(())
}

/// meshd under `ip netns exec`: no /sys/fs/cgroup, so the executor mounts
/// the hierarchies under its exec root; a "meshd" SIGKILLed there leaves its
/// task running, and the next one (new mount namespace) adopts it.
fn mounts_hierarchies_under_ip_netns_exec() -> TestResult {
    let f = Fixture::new()?;
    let ns = unique("mesh-exec-test");
    let out = Command::new("ip")
        .args(["netns", "add", &ns])
        .output()
        .ctx("ip netns add")?;
    ensure!(
        out.status.success(),
        "ip netns add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res = netns_scenario(&f, &ns);
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    res
}

fn run_child(ns: &str, mode: &str, f: &Fixture, id: &str) -> Result<std::process::Output, String> {
    let exe = std::env::current_exe().ctx("current_exe")?;
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args([CHILD_ARG, mode])
        .arg(f.root())
        .args([&f.parent, id, mode_name(f.ex.layout().mode())])
        .output()
        .ctx("ip netns exec")
}

fn mode_name(m: CgroupMode) -> &'static str {
    match m {
        CgroupMode::Unified => "unified",
        CgroupMode::Hybrid => "hybrid",
    }
}

fn root_mounts_under(p: &Path) -> Result<Vec<String>, String> {
    let text = fs::read_to_string("/proc/self/mountinfo").ctx("mountinfo")?;
    let prefix = p.to_string_lossy().into_owned();
    Ok(text
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&prefix)))
        .map(str::to_string)
        .collect())
}

fn netns_scenario(f: &Fixture, ns: &str) -> TestResult {
    let id = unique("netns");
    let out = run_child(ns, "start", f, &id)?;
    let log = |o: &std::process::Output| {
        format!(
            "stdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    use std::os::unix::process::ExitStatusExt;
    ensure!(
        out.status.signal() == Some(libc::SIGKILL),
        "child 1 should have SIGKILLed itself: {:?}\n{}",
        out.status,
        log(&out)
    );
    // The task survived "meshd"; the mounts stayed in its namespace.
    let st = f.state(&id)?;
    let pid = u32::try_from(st["pid"].as_u64().ctx("pid")?).ctx("pid")?;
    ensure!(!dead(pid), "task died with the child\n{}", log(&out));
    ensure!(
        f.ex.status(&id).is_some_and(|rt| rt.is_running()),
        "root-namespace executor: {:?}",
        f.ex.status(&id)
    );
    let leaked = root_mounts_under(f.root())?;
    ensure!(
        leaked.is_empty(),
        "mounts leaked into the root namespace: {leaked:?}"
    );
    let out2 = run_child(ns, "adopt", f, &id)?;
    ensure!(
        out2.status.success(),
        "child 2 failed: {:?}\n{}",
        out2.status,
        log(&out2)
    );
    ensure!(
        dead(pid),
        "task alive after the adopting executor removed it"
    );
    ensure!(
        f.task_cgroups(&id).is_empty(),
        "cgroups left: {:?}",
        f.task_cgroups(&id)
    );
    ensure!(!f.root().join("tasks").join(&id).exists(), "state dir left");
    Ok(())
}

/// Child mode (inside `ip netns exec`): `start` or `adopt`.
fn child_main(args: &[String]) -> i32 {
    let [mode, root, parent, id, expect_mode] = args else {
        eprintln!("child: bad arguments {args:?}");
        return 2;
    };
    let res = match mode.as_str() {
        "start" => child_start(Path::new(root), parent, id, expect_mode),
        "adopt" => child_adopt(Path::new(root), parent, id, expect_mode),
        "holder-create" => child_holder_create(Path::new(root), parent, id, expect_mode),
        "holder-find" => child_holder_find(Path::new(root), parent, id, expect_mode),
        "die-in-setup" => child_die_in_setup(Path::new(root), parent, id),
        _ => Err(format!("unknown child mode {mode}")),
    };
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("child {mode}: {e}");
            1
        }
    }
}

fn cgroup_mounts() -> Result<Vec<String>, String> {
    let text = fs::read_to_string("/proc/self/mountinfo").ctx("mountinfo")?;
    Ok(text
        .lines()
        .filter(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|r| r.starts_with("cgroup ") || r.starts_with("cgroup2 "))
        })
        .map(str::to_string)
        .collect())
}

fn child_executor(root: &Path, parent: &str, expect_mode: &str) -> Result<Executor, String> {
    let ex = Executor::new(ExecutorConfig::new(root, parent)).ctx("Executor::new")?;
    let layout = ex.layout();
    ensure!(
        mode_name(layout.mode()) == expect_mode,
        "mode {:?}",
        layout.mode()
    );
    ensure!(!layout.mounted().is_empty(), "nothing mounted: {layout:?}");
    let base = root.join("cgroup");
    for p in layout
        .v1_hierarchies()
        .iter()
        .map(|h| h.path.as_path())
        .chain([layout.v2_root()])
    {
        ensure!(
            p.starts_with(&base),
            "hierarchy {} not under {}",
            p.display(),
            base.display()
        );
    }
    // Idempotent: a second executor mounts nothing more.
    let before = cgroup_mounts()?;
    let again = Executor::new(ExecutorConfig::new(root, parent)).ctx("Executor::new again")?;
    ensure!(
        again.layout().mounted().is_empty(),
        "mounted again: {:?}",
        again.layout()
    );
    ensure!(cgroup_mounts()? == before, "mountinfo changed");
    Ok(ex)
}

fn child_start(root: &Path, parent: &str, id: &str, expect_mode: &str) -> TestResult {
    let visible = cgroup_mounts()?;
    ensure!(
        visible.is_empty(),
        "cgroup mounts visible under ip netns exec: {visible:?}"
    );
    let ex = child_executor(root, parent, expect_mode)?;
    let mut s = spec(id, &["sleep", "300"]);
    s.nano_cpus = 250_000_000;
    s.memory_bytes = 32 * 1024 * 1024;
    let pid = running_pid(&ex.start(&s).ctx("start")?)?;
    check_limits(ex.layout(), parent, id, pid, "25000", "33554432")?;
    let o = ex
        .exec(id, &sv(&["hostname"]), Duration::from_secs(10))
        .ctx("exec")?;
    ensure!(o.stdout == format!("host-{id}\n").as_bytes(), "exec {o:?}");
    // Simulate meshd being SIGKILLed.
    kill(std::process::id(), libc::SIGKILL);
    thread::sleep(Duration::from_secs(10));
    Err("still alive after SIGKILL".into())
}

fn child_adopt(root: &Path, parent: &str, id: &str, expect_mode: &str) -> TestResult {
    let ex = child_executor(root, parent, expect_mode)?;
    let list = ex.list();
    ensure!(
        list.len() == 1 && list[0].0 == id && list[0].1.is_running(),
        "list {list:?}"
    );
    let o = ex
        .exec(id, &sv(&["hostname"]), Duration::from_secs(10))
        .ctx("exec")?;
    ensure!(o.stdout == format!("host-{id}\n").as_bytes(), "exec {o:?}");
    ex.stop(id, Duration::from_secs(5)).ctx("stop")?;
    // Its shim lives in the first child's mount namespace; its cgroups are
    // gone here too once it has stopped, before `remove`.
    for p in ex.layout().task_paths(parent, id) {
        ensure!(!p.exists(), "{} left after stop", p.display());
    }
    ensure!(
        ex.list().len() == 1 && ex.logs(id, None, None).is_ok(),
        "the stopped task is no longer listed with its logs: {:?}",
        ex.list()
    );
    ex.remove(id).ctx("remove")?;
    for p in ex.layout().task_paths(parent, id) {
        ensure!(!p.exists(), "{} left", p.display());
    }
    Ok(())
}

/// Creates a link inside a namespace (a veth pair: the test kernel may lack
/// the `dummy` link type).
const VETH_ADD: [&str; 9] = [
    "ip", "link", "add", "gate0", "type", "veth", "peer", "name", "gate1",
];

/// Runs `argv` in the network namespace of `pid` (setns in the child; no
/// nsenter needed).
fn in_netns(pid: u32, argv: &[&str]) -> Result<std::process::Output, String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let ns = fs::File::open(format!("/proc/{pid}/ns/net")).ctx("open the netns")?;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    // SAFETY: setns on an fd opened before the fork; no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    };
    let out = cmd
        .output()
        .ctx(&format!("{argv:?} in the netns of {pid}"))?;
    drop(ns);
    Ok(out)
}

fn ok_output(what: &str, o: std::process::Output) -> Result<String, String> {
    ensure!(
        o.status.success(),
        "{what}: {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn start_with_runs_the_setup_before_the_command() -> TestResult {
    let f = Fixture::new()?;
    let id = unique("gate");
    let marker_dir = f.root().join(format!("marker-{id}"));
    fs::create_dir(&marker_dir).ctx("marker dir")?;
    let marker = marker_dir.join("marker");
    let content = format!("written-by-setup-{id}");
    let script = format!(
        "cat {}; cat /proc/net/dev; echo done; exec sleep 60",
        marker.display()
    );
    let own_net = readlink("/proc/self/ns/net")?;
    let own_exe = fs::read_link("/proc/self/exe").ctx("own exe")?;
    let mut seen = None;
    let rt =
        f.ex.start_with(&spec(&id, &["sh", "-c", &script]), &mut |pid| {
            seen = Some(pid);
            let net = readlink(&format!("/proc/{pid}/ns/net"))?;
            ensure!(net != own_net, "the task shares our netns");
            // Not exec'd yet: still the shim's binary, hostname already set.
            let exe = fs::read_link(format!("/proc/{pid}/exe")).ctx("task exe")?;
            ensure!(exe == own_exe, "the task already runs {}", exe.display());
            ensure!(!marker.exists(), "marker exists before the setup");
            fs::write(&marker, format!("{content}\n")).ctx("write marker")?;
            ok_output("ip link add", in_netns(pid, &VETH_ADD)?)?;
            Ok(())
        });
    let rt = rt.ctx("start_with")?;
    let pid = running_pid(&rt)?;
    ensure!(seen == Some(pid), "setup saw {seen:?}, task is {pid}");
    wait_until("the task's output", Duration::from_secs(5), || {
        stdout_of(&f.ex, &id).contains("done\n")
    })?;
    let out = stdout_of(&f.ex, &id);
    ensure!(
        out.starts_with(&format!("{content}\n")),
        "the command did not see the marker: {out}"
    );
    ensure!(out.contains("gate0:"), "gate0 not in the task: {out}");
    // Also visible to exec, and nowhere else.
    let o =
        f.ex.exec(
            &id,
            &sv(&["ip", "-o", "link", "show", "gate0"]),
            Duration::from_secs(10),
        )
        .ctx("exec ip")?;
    ensure!(o.status == 0, "ip link show gate0 in the task: {o:?}");
    ensure!(
        !fs::read_to_string("/proc/net/dev")
            .ctx("our /proc/net/dev")?
            .contains("gate0:"),
        "gate0 leaked into our namespace"
    );
    // start is start_with with no setup; a started id does not call setup.
    let again =
        f.ex.start_with(&spec(&id, &["sh", "-c", &script]), &mut |_| {
            Err("must not be called".into())
        })
        .ctx("start_with again")?;
    ensure!(running_pid(&again)? == pid, "second start: {again:?}");
    // The id of the holders' cgroup is not a task id.
    let msg =
        f.ex.start(&spec("netns", &["true"]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
    ensure!(msg.contains("invalid task id \"netns\""), "{msg}");
    f.ex.remove(&id).ctx("remove")?;
    Ok(())
}

fn failed_network_setup_leaves_nothing() -> TestResult {
    let f = Fixture::new()?;
    let id = unique("nonet");
    let ran = f.root().join(format!("ran-{id}"));
    let script = format!("echo ran > {}; exec sleep 60", ran.display());
    let mut seen: Option<(u32, u32)> = None;
    let t = Instant::now();
    let e =
        f.ex.start_with(&spec(&id, &["sh", "-c", &script]), &mut |pid| {
            let shim = stat_field(pid, 4)
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0);
            seen = Some((pid, shim));
            Err("no veth for you".into())
        });
    ensure!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    match &e {
        Err(ExecError::Start { task, reason }) => {
            ensure!(task == &format!("t.1.{id}"), "task {task}");
            ensure!(
                reason == "network setup failed: no veth for you",
                "reason {reason}"
            );
        }
        other => return Err(format!("expected a start error, got {other:?}")),
    }
    ensure!(
        e.err().map(|e| e.to_string()).unwrap_or_default()
            == format!("cannot start task t.1.{id}: network setup failed: no veth for you"),
        "message"
    );
    let (pid, shim) = seen.ctx("the setup was not called")?;
    ensure!(shim > 1, "no shim pid");
    wait_until("task and shim to die", Duration::from_secs(5), || {
        dead(pid) && dead(shim)
    })?;
    ensure!(!ran.exists(), "the command ran");
    ensure!(!f.root().join("tasks").join(&id).exists(), "state dir left");
    ensure!(
        f.task_cgroups(&id).is_empty(),
        "cgroups left: {:?}",
        f.task_cgroups(&id)
    );
    ensure!(f.ex.status(&id).is_none(), "status {:?}", f.ex.status(&id));
    ensure!(f.ex.list().is_empty(), "list {:?}", f.ex.list());
    // A panicking setup: the panic goes on, after the same cleanup.
    let id2 = unique("panic");
    let mut seen2 = None;
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| println!("    (the expected setup panic)")));
    let res = catch_unwind(AssertUnwindSafe(|| {
        f.ex.start_with(&spec(&id2, &["sleep", "60"]), &mut |pid| {
            seen2 = Some(pid);
            panic!("setup exploded");
        })
    }));
    std::panic::set_hook(hook);
    ensure!(res.is_err(), "no panic: {:?}", res.ok());
    let pid2 = seen2.ctx("the panicking setup was not called")?;
    wait_until("the task to die", Duration::from_secs(5), || dead(pid2))?;
    ensure!(
        !f.root().join("tasks").join(&id2).exists(),
        "state dir left"
    );
    ensure!(f.task_cgroups(&id2).is_empty(), "cgroups left");
    // The same id starts fine afterwards.
    let pid = running_pid(
        &f.ex
            .start(&spec(&id, &["sleep", "60"]))
            .ctx("start again")?,
    )?;
    ensure!(!dead(pid), "not running");
    f.ex.remove(&id).ctx("remove")?;
    println!(
        "    note: the {:?} setup bound is tested with a short bound in \
         shim::tests::a_slow_setup_is_aborted_while_it_runs",
        mesh_executor::NETWORK_SETUP_TIMEOUT
    );
    Ok(())
}

fn holder_start(pid: u32) -> Option<u64> {
    stat(pid).map(|s| s.1)
}

fn in_cgroup(dir: &Path, pid: u32) -> bool {
    fs::read_to_string(dir.join("cgroup.procs"))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == pid.to_string()))
}

fn netns_holders() -> TestResult {
    let f = Fixture::new()?;
    let name = unique("ovl");
    let pid = f.ex.netns_ensure(&name).ctx("netns_ensure")?;
    let start = holder_start(pid).ctx("holder stat")?;
    ensure!(
        f.ex.netns_ensure(&name).ctx("netns_ensure again")? == pid,
        "second ensure made a new holder"
    );
    ensure!(holder_start(pid) == Some(start), "holder restarted");
    // Its own namespace, with lo up.
    let net = readlink(&format!("/proc/{pid}/ns/net"))?;
    ensure!(
        net != readlink("/proc/self/ns/net")?,
        "holder shares our netns"
    );
    let lo = ok_output(
        "ip link show lo",
        in_netns(pid, &["ip", "-o", "link", "show", "lo"])?,
    )?;
    ensure!(lo.contains(",UP") || lo.contains("<UP"), "lo: {lo}");
    let links = ok_output("ip link", in_netns(pid, &["ip", "-o", "link"])?)?;
    ensure!(links.lines().count() == 1, "links: {links}");
    // Detached, in <parent>/netns of every hierarchy.
    ensure!(
        stat_field(pid, 4) != Some(i64::from(std::process::id())),
        "the holder is our child"
    );
    ensure!(
        stat_field(pid, 6) == Some(i64::from(pid)),
        "not a session leader"
    );
    for d in f.ex.layout().task_paths(&f.parent, "netns") {
        ensure!(in_cgroup(&d, pid), "holder not in {}", d.display());
    }
    ensure!(
        f.root().join("netns").join(format!("{name}.json")).exists(),
        "no record"
    );
    // A restarted meshd finds it.
    let b = f.another()?;
    ensure!(
        b.netns_pid(&name) == Some(pid),
        "netns_pid {:?}",
        b.netns_pid(&name)
    );
    ensure!(
        b.netns_list() == vec![(name.clone(), pid)],
        "netns_list {:?}",
        b.netns_list()
    );
    ensure!(
        b.netns_ensure(&name).ctx("ensure from b")? == pid,
        "b made a new one"
    );
    // A holder outlives the executor that made it.
    let name2 = unique("ovl");
    let pid2 = b.netns_ensure(&name2).ctx("ensure 2")?;
    drop(b);
    thread::sleep(Duration::from_millis(50));
    ensure!(!dead(pid2), "holder died with its executor");
    ensure!(f.ex.netns_pid(&name2) == Some(pid2), "not found after drop");
    let mut want = vec![(name.clone(), pid), (name2.clone(), pid2)];
    want.sort();
    ensure!(f.ex.netns_list() == want, "list {:?}", f.ex.netns_list());
    // Names are validated.
    for bad in ["", "a/b", "..", ".x", &"x".repeat(65)] {
        let msg =
            f.ex.netns_ensure(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
        ensure!(
            msg.starts_with(&format!(
                "cannot create network namespace {bad}: invalid network namespace name"
            )),
            "ensure({bad:?}): {msg}"
        );
        ensure!(f.ex.netns_pid(bad).is_none(), "netns_pid({bad:?})");
        ensure!(f.ex.netns_remove(bad).is_err(), "netns_remove({bad:?})");
    }
    // remove kills it and forgets it.
    f.ex.netns_remove(&name).ctx("netns_remove")?;
    ensure!(dead(pid), "holder alive after remove");
    ensure!(f.ex.netns_pid(&name).is_none(), "still found");
    ensure!(
        !f.root().join("netns").join(format!("{name}.json")).exists(),
        "record left"
    );
    ensure!(
        f.ex.netns_list() == vec![(name2.clone(), pid2)],
        "list {:?}",
        f.ex.netns_list()
    );
    f.ex.netns_remove(&name).ctx("remove twice")?;
    // Killed from outside: reported absent, record collected, recreated.
    let start2 = holder_start(pid2).ctx("stat 2")?;
    kill(pid2, libc::SIGKILL);
    wait_until("the holder to die", Duration::from_secs(5), || dead(pid2))?;
    ensure!(f.ex.netns_pid(&name2).is_none(), "dead holder reported");
    ensure!(f.ex.netns_list().is_empty(), "list {:?}", f.ex.netns_list());
    ensure!(
        !f.root()
            .join("netns")
            .join(format!("{name2}.json"))
            .exists(),
        "dead record kept"
    );
    let pid3 = f.ex.netns_ensure(&name2).ctx("ensure after kill")?;
    ensure!(
        pid3 != pid2 || holder_start(pid3) != Some(start2),
        "the dead holder was returned"
    );
    ensure!(!dead(pid3), "new holder not alive");
    // A stale record whose pid now belongs to another process.
    f.ex.netns_remove(&name2).ctx("remove 2")?;
    let me = std::process::id();
    let fake = serde_json::json!({"pid": me, "start_time": 1, "created_at_ms": 0});
    fs::write(
        f.root().join("netns").join(format!("{name2}.json")),
        fake.to_string(),
    )
    .ctx("write fake record")?;
    ensure!(
        f.ex.netns_pid(&name2).is_none(),
        "reused pid taken for the holder"
    );
    let pid4 =
        f.ex.netns_ensure(&name2)
            .ctx("ensure over a stale record")?;
    ensure!(pid4 != me, "ensure returned a reused pid");
    f.ex.netns_remove(&name2).ctx("remove 3")?;
    ensure!(dead(pid4) && dead(pid3), "holders alive");
    Ok(())
}

/// A holder made by one `ip netns exec` meshd (its own mount namespace,
/// SIGKILLed) is found, usable and removable by the next one.
fn netns_holder_survives_ip_netns_exec_restarts() -> TestResult {
    let f = Fixture::new()?;
    let ns = unique("mesh-exec-test");
    let out = Command::new("ip")
        .args(["netns", "add", &ns])
        .output()
        .ctx("ip netns add")?;
    ensure!(
        out.status.success(),
        "ip netns add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res = holder_netns_scenario(&f, &ns);
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    res
}

fn holder_netns_scenario(f: &Fixture, ns: &str) -> TestResult {
    use std::os::unix::process::ExitStatusExt;
    let name = unique("ovl");
    let log = |o: &std::process::Output| {
        format!(
            "stdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let out = run_child(ns, "holder-create", f, &name)?;
    ensure!(
        out.status.signal() == Some(libc::SIGKILL),
        "child 1 should have SIGKILLed itself: {:?}\n{}",
        out.status,
        log(&out)
    );
    let pid: u32 = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("holder pid ")?.trim().parse().ok())
        .ctx("holder pid in child 1's output")?;
    ensure!(!dead(pid), "holder died with child 1\n{}", log(&out));
    // The root-namespace executor sees it as well.
    ensure!(
        f.ex.netns_pid(&name) == Some(pid),
        "root executor: {:?}",
        f.ex.netns_pid(&name)
    );
    let out2 = run_child(ns, "holder-find", f, &name)?;
    ensure!(
        out2.status.success(),
        "child 2 failed: {:?}\n{}",
        out2.status,
        log(&out2)
    );
    ensure!(
        String::from_utf8_lossy(&out2.stdout).contains(&format!("found {pid}")),
        "child 2 did not find {pid}\n{}",
        log(&out2)
    );
    ensure!(dead(pid), "holder alive after child 2 removed it");
    ensure!(f.ex.netns_pid(&name).is_none(), "still found");
    Ok(())
}

fn child_holder_create(root: &Path, parent: &str, name: &str, expect_mode: &str) -> TestResult {
    let ex = child_executor(root, parent, expect_mode)?;
    let pid = ex.netns_ensure(name).ctx("netns_ensure")?;
    let mine = readlink("/proc/self/ns/net")?;
    ensure!(
        readlink(&format!("/proc/{pid}/ns/net"))? != mine,
        "same netns"
    );
    println!("holder pid {pid}");
    use std::io::Write;
    std::io::stdout().flush().ctx("flush")?;
    kill(std::process::id(), libc::SIGKILL);
    thread::sleep(Duration::from_secs(10));
    Err("still alive after SIGKILL".into())
}

fn child_holder_find(root: &Path, parent: &str, name: &str, expect_mode: &str) -> TestResult {
    let ex = child_executor(root, parent, expect_mode)?;
    let pid = ex.netns_pid(name).ctx("netns_pid")?;
    let list = ex.netns_list();
    ensure!(list == vec![(name.to_string(), pid)], "list {list:?}");
    ensure!(
        ex.netns_ensure(name).ctx("ensure")? == pid,
        "ensure made a new one"
    );
    // Usable from here: a link made in it is seen through /proc/<pid>.
    ok_output("ip link add", in_netns(pid, &VETH_ADD)?)?;
    let links = ok_output("ip link", in_netns(pid, &["ip", "-o", "link"])?)?;
    ensure!(links.contains("gate0"), "links {links}");
    ensure!(
        readlink(&format!("/proc/{pid}/ns/net"))? != readlink("/proc/self/ns/net")?,
        "same netns"
    );
    println!("found {pid}");
    ex.netns_remove(name).ctx("netns_remove")?;
    ensure!(ex.netns_pid(name).is_none(), "still found");
    Ok(())
}

// ---------------------------------------------------------------------------
// Runner

/// True if root. Otherwise prints why and returns false, or exits 1 in CI.
fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let ci = std::env::var("CI")
        .map(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
        .unwrap_or(false);
    if ci {
        eprintln!(
            "error: mesh-executor tests need root, and CI is set: failing instead of skipping"
        );
        std::process::exit(1);
    }
    eprintln!("skipped: needs root");
    false
}

fn main() {
    shim_main_if_requested();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD_ARG) {
        std::process::exit(child_main(&args[2..]));
    }
    if !root_or_skip() {
        return;
    }
    let tests: &[(&str, TestFn)] = &[
        (
            "namespaces_env_resolv_and_output",
            namespaces_env_resolv_and_output,
        ),
        ("exit_code_is_reported", exit_code_is_reported),
        ("kill_9_is_reported_as_signal", kill_9_is_reported_as_signal),
        ("start_errors_are_clear", start_errors_are_clear),
        ("limits_are_written", limits_are_written),
        ("adoption_by_a_new_executor", adoption_by_a_new_executor),
        (
            "shim_is_detached_and_its_death_kills_the_task",
            shim_is_detached_and_its_death_kills_the_task,
        ),
        (
            "stop_and_remove_leave_nothing",
            stop_and_remove_leave_nothing,
        ),
        (
            "ended_tasks_release_their_cgroups",
            ended_tasks_release_their_cgroups,
        ),
        (
            "adopted_tasks_release_their_cgroups",
            adopted_tasks_release_their_cgroups,
        ),
        (
            "a_start_cut_by_a_daemon_death_leaves_nothing",
            a_start_cut_by_a_daemon_death_leaves_nothing,
        ),
        ("concurrent_starts", concurrent_starts),
        (
            "mounts_hierarchies_under_ip_netns_exec",
            mounts_hierarchies_under_ip_netns_exec,
        ),
        (
            "start_with_runs_the_setup_before_the_command",
            start_with_runs_the_setup_before_the_command,
        ),
        (
            "failed_network_setup_leaves_nothing",
            failed_network_setup_leaves_nothing,
        ),
        ("netns_holders", netns_holders),
        (
            "netns_holder_survives_ip_netns_exec_restarts",
            netns_holder_survives_ip_netns_exec_restarts,
        ),
        (
            "image_task_runs_in_its_root_filesystem",
            images::image_task_runs_in_its_root_filesystem,
        ),
        (
            "image_task_user_workdir_mounts_and_readonly_root",
            images::image_task_user_workdir_mounts_and_readonly_root,
        ),
        (
            "image_task_with_init_reaps_and_passes_the_status",
            images::image_task_with_init_reaps_and_passes_the_status,
        ),
        (
            "image_task_gate_limits_and_adoption",
            images::image_task_gate_limits_and_adoption,
        ),
        ("image_task_start_errors", images::image_task_start_errors),
        (
            "image_task_writes_to_disk_not_to_memory",
            images::image_task_writes_to_disk_not_to_memory,
        ),
        (
            "image_task_with_many_layers",
            images::image_task_with_many_layers,
        ),
    ];
    mesh_netns::serial::run_serial(tests);
}
