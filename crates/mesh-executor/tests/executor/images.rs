//! Image tasks (`TaskSpec::rootfs`) on the real kernel: a root filesystem of
//! two layers built from Debian's `busybox-static` (`/bin/busybox`): a base
//! with busybox, its applet links, `/etc/passwd` and `/etc/group` (a
//! non-root user `app`), a file and a directory that the second layer hides
//! (a whiteout, character device 0/0, and an opaque directory).
//!
//! Without `/bin/busybox` the tests print why and pass, unless `CI` is set:
//! then they fail (`.ci/run` installs `busybox-static`).

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_executor::{MountSource, MountSpec, RootfsSpec, TaskRuntime, TaskSpec};
use mesh_netns::serial::{Ctx, TestResult};
use mesh_netns::serial_ensure as ensure;

use super::{
    check_limits, dead, in_netns, kill, ok_output, readlink, running_pid, stat_field, stdout_of,
    unique, wait_exited, wait_until, Fixture, RESOLV,
};

const BUSYBOX: &str = "/bin/busybox";
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n";
const GROUP: &str = "root:x:0:\nwheel:x:10:root\nstaff:x:50:app\napp:x:1000:\n";
const HOSTS: &str = "127.0.0.1\tlocalhost\n10.0.0.5\tmesh-test-peer\n";
/// Docker's default bounding set.
const CAP_BND: &str = "00000000a80425fb";

/// True if busybox is there; otherwise prints why and returns false, or
/// fails in CI.
fn have_busybox() -> Result<bool, String> {
    if Path::new(BUSYBOX).is_file() {
        return Ok(true);
    }
    let ci = std::env::var("CI")
        .map(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
        .unwrap_or(false);
    ensure!(
        !ci,
        "{BUSYBOX} is missing (install busybox-static) and CI is set"
    );
    println!("    skipped: {BUSYBOX} is missing (install busybox-static)");
    Ok(false)
}

fn c(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).ctx("path")
}

/// The two layers, base first, under `<root>/image`.
fn build_image(root: &Path) -> Result<Vec<PathBuf>, String> {
    let base = root.join("image/0");
    let top = root.join("image/1");
    for d in ["bin", "etc", "root", "home/app", "hidden-dir", "opaque"] {
        fs::create_dir_all(base.join(d)).ctx("mkdir base")?;
    }
    fs::copy(BUSYBOX, base.join("bin/busybox")).ctx("copy busybox")?;
    let list = std::process::Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .ctx("busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" {
            symlink("busybox", base.join("bin").join(applet)).ctx("applet link")?;
        }
    }
    // A command only the image has, found through the task's PATH.
    fs::write(
        base.join("bin/mesh-image-only"),
        "#!/bin/sh\necho \"image-only $*\"\n",
    )
    .ctx("script")?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(
        base.join("bin/mesh-image-only"),
        fs::Permissions::from_mode(0o755),
    )
    .ctx("chmod")?;
    fs::write(base.join("etc/passwd"), PASSWD).ctx("passwd")?;
    fs::write(base.join("etc/group"), GROUP).ctx("group")?;
    fs::write(base.join("etc/whited-out"), "base\n").ctx("file")?;
    fs::write(base.join("opaque/from-base"), "base\n").ctx("file")?;
    fs::write(base.join("base-file"), "base\n").ctx("file")?;
    for d in ["etc", "opaque"] {
        fs::create_dir_all(top.join(d)).ctx("mkdir top")?;
    }
    fs::write(top.join("opaque/from-top"), "top\n").ctx("file")?;
    fs::write(top.join("top-file"), "top\n").ctx("file")?;
    // The whiteout: a character device 0/0.
    let wh = c(&top.join("etc/whited-out"))?;
    // SAFETY: a NUL-terminated path; plain syscall.
    let rc = unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) };
    ensure!(rc == 0, "mknod: {}", std::io::Error::last_os_error());
    let op = c(&top.join("opaque"))?;
    // SAFETY: NUL-terminated strings and a 1-byte value valid for the call.
    let rc = unsafe {
        libc::setxattr(
            op.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    ensure!(rc == 0, "setxattr: {}", std::io::Error::last_os_error());
    Ok(vec![base, top])
}

/// A spec running `argv` in the image.
fn image_spec(id: &str, argv: &[&str], layers: &[PathBuf]) -> TaskSpec {
    let mut s = super::spec(id, argv);
    s.rootfs = Some(RootfsSpec {
        layers: layers.to_vec(),
        hosts: HOSTS.to_string(),
        ..RootfsSpec::default()
    });
    s
}

/// Mounts of our mount namespace that concern the test: under its exec
/// root, or overlays (no test of ours mounts any in this namespace).
fn our_mounts(root: &Path) -> Result<Vec<String>, String> {
    let text = fs::read_to_string("/proc/self/mountinfo").ctx("mountinfo")?;
    let prefix = root.to_string_lossy().into_owned();
    Ok(text
        .lines()
        .filter(|l| {
            l.split(' ').nth(4).is_some_and(|m| m.starts_with(&prefix)) || l.contains(" - overlay ")
        })
        .map(str::to_string)
        .collect())
}

fn mountinfo_lines() -> usize {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// The lines of the task's stdout once it printed `done`.
fn output_when_done(f: &Fixture, id: &str) -> Result<String, String> {
    wait_until("the task's output", Duration::from_secs(10), || {
        stdout_of(&f.ex, id).contains("done\n")
            || f.ex.status(id).is_some_and(|rt| !rt.is_running())
    })?;
    let out = stdout_of(&f.ex, id);
    let err = super::stderr_of(&f.ex, id);
    ensure!(
        out.contains("done\n"),
        "no 'done' in stdout: {out}\nstderr: {err}"
    );
    Ok(out)
}

fn has_line(out: &str, line: &str) -> bool {
    out.lines().any(|l| l.trim_end() == line)
}

pub(super) fn image_task_runs_in_its_root_filesystem() -> TestResult {
    if !have_busybox()? {
        return Ok(());
    }
    let f = Fixture::new()?;
    let layers = build_image(f.root())?;
    let id = unique("img");
    let host_only = f.root().join("host-only");
    fs::write(&host_only, "host\n").ctx("host-only file")?;
    let mounts_before = our_mounts(f.root())?;
    let lines_before = mountinfo_lines();
    let script = format!(
        "echo pid=$$; echo comm1=$(cat /proc/1/comm); \
         test -e {host} && echo host-file-visible; \
         test -e /etc/debian_version && echo host-etc-visible; \
         cat /base-file /top-file; \
         test -e /etc/whited-out && echo whiteout-ignored; \
         echo opaque=$(ls /opaque); \
         echo written > /written-file && echo wrote; \
         echo hostname=$(hostname) etc-hostname=$(cat /etc/hostname); \
         cat /etc/hosts /etc/resolv.conf; \
         for d in null zero full random urandom tty; do test -c /dev/$d || echo no-dev-$d; done; \
         test -c /dev/pts/ptmx && test -L /dev/ptmx && echo pts-ok; \
         test -d /dev/shm && echo shm-ok; test -L /dev/fd && echo fd-ok; \
         touch /sys/x 2>/dev/null || echo sys-readonly; \
         grep -E '^(CapBnd|CapEff|CapPrm|CapInh|NoNewPrivs)' /proc/self/status; \
         echo home=$HOME cwd=$(pwd); \
         ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '; echo; \
         echo done; exec sleep 60",
        host = host_only.display()
    );
    let mut s = image_spec(&id, &["sh", "-c", &script], &layers);
    s.nano_cpus = 500_000_000;
    s.memory_bytes = 64 * 1024 * 1024;
    let t0 = std::time::Instant::now();
    let rt = f.ex.start(&s).ctx("start")?;
    println!("    start of an image task took {:?}", t0.elapsed());
    let pid = running_pid(&rt)?;
    let out = output_when_done(&f, &id)?;
    println!(
        "    task output:\n{}",
        out.trim_end().replace('\n', "\n      ")
    );
    ensure!(has_line(&out, "pid=1"), "not pid 1: {out}");
    ensure!(has_line(&out, "comm1=sh"), "/proc/1 is not the task: {out}");
    ensure!(
        !out.contains("host-file-visible") && !out.contains("host-etc-visible"),
        "host files visible: {out}"
    );
    ensure!(out.contains("base\ntop\n"), "image files not seen: {out}");
    ensure!(
        !out.contains("whiteout-ignored"),
        "the whiteout did not hide: {out}"
    );
    ensure!(has_line(&out, "opaque=from-top"), "opaque dir: {out}");
    ensure!(has_line(&out, "wrote"), "cannot write: {out}");
    ensure!(
        has_line(&out, &format!("hostname=host-{id} etc-hostname=host-{id}")),
        "hostname: {out}"
    );
    ensure!(
        out.contains(HOSTS) && out.contains(RESOLV),
        "etc files: {out}"
    );
    ensure!(!out.contains("no-dev-"), "/dev nodes: {out}");
    for want in ["pts-ok", "shm-ok", "fd-ok", "sys-readonly"] {
        ensure!(has_line(&out, want), "{want} missing: {out}");
    }
    ensure!(
        has_line(&out, &format!("CapBnd:\t{CAP_BND}")),
        "CapBnd: {out}"
    );
    ensure!(
        has_line(&out, &format!("CapEff:\t{CAP_BND}")),
        "CapEff: {out}"
    );
    ensure!(has_line(&out, "CapInh:\t0000000000000000"), "CapInh: {out}");
    ensure!(has_line(&out, "NoNewPrivs:\t1"), "NoNewPrivs: {out}");
    ensure!(has_line(&out, "home=/root cwd=/"), "home/cwd: {out}");
    // The task's own pid namespace: few processes, numbered from 1.
    ensure!(
        out.lines().any(|l| l.starts_with("1 ")),
        "/proc of the task: {out}"
    );
    // Writes went to the upper directory of the task's writable layer, linked from its
    // state directory, not into the layers.
    let dir = f.root().join("tasks").join(&id);
    let rw = f.rw_root().join(&id);
    ensure!(
        fs::read_link(dir.join("rw")).ctx("rw link")? == rw,
        "the rw link does not name {}",
        rw.display()
    );
    ensure!(
        fs::read_to_string(rw.join("upper/written-file")).ctx("upper file")? == "written\n",
        "not in upper"
    );
    for l in &layers {
        ensure!(!l.join("written-file").exists(), "written into a layer");
    }
    // Its own namespaces, including pid and ipc.
    for ns in ["net", "uts", "mnt", "pid", "ipc"] {
        ensure!(
            readlink(&format!("/proc/self/ns/{ns}"))? != readlink(&format!("/proc/{pid}/ns/{ns}"))?,
            "the task shares our {ns} namespace"
        );
    }
    // Nothing of it in our mount namespace.
    ensure!(
        our_mounts(f.root())? == mounts_before,
        "mounts leaked: {:?}",
        our_mounts(f.root())
    );
    // Limits apply to it.
    check_limits(f.ex.layout(), &f.parent, &id, pid, "50000", "67108864")?;
    // exec: in its root, pid namespace, user and PATH.
    let o =
        f.ex.exec(
            &id,
            &super::sv(&["mesh-image-only", "via-exec"]),
            Duration::from_secs(10),
        )
        .ctx("exec")?;
    ensure!(
        o.status == 0 && o.stdout == b"image-only via-exec\n",
        "exec: {o:?}"
    );
    let o = f
        .ex
        .exec(
            &id,
            &super::sv(&["sh", "-c", "echo $$; read -r p rest < /proc/self/stat; echo $p; cat /etc/hostname; test -e /etc/debian_version || echo no-host"]),
            Duration::from_secs(10),
        )
        .ctx("exec sh")?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    ensure!(
        lines.len() == 4
            && lines[0] == lines[1]
            && lines[0].parse::<u32>().is_ok_and(|p| p > 1 && p < 100)
            && lines[2] == format!("host-{id}")
            && lines[3] == "no-host",
        "exec in the pid namespace and root: {text:?} {:?}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o =
        f.ex.exec(
            &id,
            &super::sv(&["sh", "-c", "exit 4"]),
            Duration::from_secs(10),
        )
        .ctx("exec exit")?;
    ensure!(o.status == 4, "exec status: {o:?}");
    let e =
        f.ex.exec(&id, &super::sv(&["nft"]), Duration::from_secs(10))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
    ensure!(
        e.ends_with("command not found: nft"),
        "a host command found by exec: {e}"
    );
    // Stop, then remove: no mount, no upper directory, no cgroup left.
    f.ex.stop(&id, Duration::from_millis(300)).ctx("stop")?;
    ensure!(dead(pid), "alive after stop");
    let rt = f.ex.status(&id).ctx("status")?;
    ensure!(!rt.is_running(), "{rt:?}");
    f.ex.remove(&id).ctx("remove")?;
    ensure!(!dir.exists(), "state dir left");
    ensure!(!rw.exists(), "writable layer left");
    ensure!(f.task_cgroups(&id).is_empty(), "cgroups left");
    ensure!(
        our_mounts(f.root())? == mounts_before,
        "mounts left: {:?}",
        our_mounts(f.root())
    );
    println!(
        "    mountinfo lines before {lines_before}, after {} (other tests may mount meanwhile)",
        mountinfo_lines()
    );
    // The layers are untouched.
    ensure!(
        layers[0].join("etc/whited-out").exists() && layers[1].join("opaque/from-top").exists(),
        "layers changed"
    );
    Ok(())
}

pub(super) fn image_task_user_workdir_mounts_and_readonly_root() -> TestResult {
    if !have_busybox()? {
        return Ok(());
    }
    let f = Fixture::new()?;
    let layers = build_image(f.root())?;
    let id = unique("imgusr");
    let shared = f.root().join("shared");
    fs::create_dir(&shared).ctx("shared dir")?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).ctx("chmod")?;
    fs::write(shared.join("from-host"), "host data\n").ctx("file")?;
    let ro_file = f.root().join("config.txt");
    fs::write(&ro_file, "config\n").ctx("file")?;
    let script = "echo id=$(id -u):$(id -g):$(id -G); echo cwd=$(pwd) home=$HOME; \
                  touch /rootfile 2>/dev/null || echo root-readonly; \
                  cat /data/from-host; echo from-task > /data/from-task && echo data-rw; \
                  cat /etc/app/config.txt; echo x >> /etc/app/config.txt 2>/dev/null || echo config-readonly; \
                  echo t > /scratch/t && echo tmpfs-rw; \
                  grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status; \
                  grep ' /scratch ' /proc/self/mountinfo | grep -q tmpfs && echo scratch-is-tmpfs; \
                  echo done; exec sleep 60";
    let mut s = image_spec(&id, &["sh", "-c", script], &layers);
    if let Some(r) = s.rootfs.as_mut() {
        r.user = "app".into();
        r.workdir = "/work/dir".into();
        r.readonly = true;
        r.mounts = vec![
            MountSpec {
                target: "/data".into(),
                source: MountSource::Bind(shared.clone()),
                readonly: false,
            },
            MountSpec {
                target: "/etc/app/config.txt".into(),
                source: MountSource::Bind(ro_file.clone()),
                readonly: true,
            },
            MountSpec {
                target: "/scratch".into(),
                source: MountSource::Tmpfs {
                    size_bytes: 1 << 20,
                },
                readonly: false,
            },
        ];
    }
    running_pid(&f.ex.start(&s).ctx("start")?)?;
    let out = output_when_done(&f, &id)?;
    println!(
        "    task output:\n{}",
        out.trim_end().replace('\n', "\n      ")
    );
    ensure!(has_line(&out, "id=1000:1000:1000 50"), "user: {out}");
    ensure!(
        has_line(&out, "cwd=/work/dir home=/home/app"),
        "workdir: {out}"
    );
    for want in [
        "root-readonly",
        "host data",
        "data-rw",
        "config",
        "config-readonly",
        "tmpfs-rw",
        "scratch-is-tmpfs",
    ] {
        ensure!(has_line(&out, want), "{want} missing: {out}");
    }
    ensure!(
        has_line(&out, &format!("CapBnd:\t{CAP_BND}")),
        "CapBnd: {out}"
    );
    ensure!(has_line(&out, "CapEff:\t0000000000000000"), "CapEff: {out}");
    ensure!(has_line(&out, "NoNewPrivs:\t1"), "NoNewPrivs: {out}");
    ensure!(
        fs::read_to_string(shared.join("from-task")).ctx("bind write")? == "from-task\n",
        "the bind write did not reach the host"
    );
    ensure!(
        fs::read_to_string(&ro_file).ctx("ro file")? == "config\n",
        "the read-only file changed"
    );
    // exec runs as the task's user, in its working directory.
    let o =
        f.ex.exec(
            &id,
            &super::sv(&["sh", "-c", "id -u; pwd"]),
            Duration::from_secs(10),
        )
        .ctx("exec")?;
    ensure!(o.stdout == b"1000\n/work/dir\n", "exec: {o:?}");
    f.ex.remove(&id).ctx("remove")?;
    ensure!(our_mounts(f.root())?.is_empty(), "mounts left");
    Ok(())
}

pub(super) fn image_task_with_init_reaps_and_passes_the_status() -> TestResult {
    if !have_busybox()? {
        return Ok(());
    }
    let f = Fixture::new()?;
    let layers = build_image(f.root())?;
    let id = unique("imginit");
    // `(sleep 0.3 &)`: the subshell exits at once, its sleep is reparented
    // to pid 1 and must be reaped there when it ends.
    let script = "trap 'echo got-usr1' USR1; echo pid=$$; (sleep 0.3 &); echo up; \
                  i=0; while [ $i -lt 10 ]; do sleep 0.1; i=$((i+1)); done; \
                  echo done; exit 7";
    let mut s = image_spec(&id, &["sh", "-c", script], &layers);
    if let Some(r) = s.rootfs.as_mut() {
        r.init = true;
    }
    let init = running_pid(&f.ex.start(&s).ctx("start")?)?;
    wait_until("up", Duration::from_secs(5), || {
        stdout_of(&f.ex, &id).contains("up\n")
    })?;
    let out = stdout_of(&f.ex, &id);
    ensure!(has_line(&out, "pid=2"), "the command is not pid 2: {out}");
    // pid 1 is the reaper: the shim binary (this test), never exec'd.
    let own_exe = fs::read_link("/proc/self/exe").ctx("own exe")?;
    ensure!(
        fs::read_link(format!("/proc/{init}/exe")).ctx("init exe")? == own_exe,
        "pid 1 is not the reaper"
    );
    // Signals to pid 1 reach the command.
    kill(init, libc::SIGUSR1);
    wait_until("the forwarded signal", Duration::from_secs(5), || {
        stdout_of(&f.ex, &id).contains("got-usr1\n")
    })?;
    // The orphaned sleep was reaped: no zombie in the task.
    thread_sleep(Duration::from_millis(600));
    let zombies: Vec<u32> =
        f.ex.layout()
            .task_pids(&f.parent, &id)
            .into_iter()
            .filter(|p| super::stat(*p).is_some_and(|(s, _)| s == 'Z'))
            .collect();
    ensure!(zombies.is_empty(), "zombies in the task: {zombies:?}");
    let rt = wait_exited(&f.ex, &id)?;
    ensure!(
        matches!(
            rt,
            TaskRuntime::Exited {
                code: Some(7),
                signal: None,
                ..
            }
        ),
        "{rt:?}"
    );
    ensure!(dead(init), "the reaper outlived the command");
    // A command not found is reported as without --init.
    let id2 = unique("imginit");
    let mut s = image_spec(&id2, &["mesh-no-such-command"], &layers);
    if let Some(r) = s.rootfs.as_mut() {
        r.init = true;
    }
    let msg =
        f.ex.start(&s)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
    ensure!(
        msg == format!("cannot start task t.1.{id2}: command not found: mesh-no-such-command"),
        "{msg}"
    );
    f.ex.remove(&id).ctx("remove")?;
    ensure!(our_mounts(f.root())?.is_empty(), "mounts left");
    Ok(())
}

fn thread_sleep(d: Duration) {
    std::thread::sleep(d);
}

pub(super) fn image_task_gate_limits_and_adoption() -> TestResult {
    if !have_busybox()? {
        return Ok(());
    }
    let f = Fixture::new()?;
    let layers = build_image(f.root())?;
    let id = unique("imggate");
    let own_net = readlink("/proc/self/ns/net")?;
    let own_exe = fs::read_link("/proc/self/exe").ctx("own exe")?;
    // argv[0] exists only in the image: found through its PATH.
    let mut s = image_spec(
        &id,
        &[
            "sh",
            "-c",
            "cat /proc/net/dev; mesh-image-only started; echo done; exec sleep 60",
        ],
        &layers,
    );
    s.memory_bytes = 32 * 1024 * 1024;
    s.nano_cpus = 250_000_000;
    let mut seen = None;
    let rt =
        f.ex.start_with(&s, &mut |pid| {
            seen = Some(pid);
            ensure!(
                readlink(&format!("/proc/{pid}/ns/net"))? != own_net,
                "the task shares our netns"
            );
            let exe = fs::read_link(format!("/proc/{pid}/exe")).ctx("task exe")?;
            ensure!(exe == own_exe, "already exec'd: {}", exe.display());
            // Its host pid, parent: the shim.
            ensure!(stat_field(pid, 4).is_some_and(|p| p > 1), "no parent");
            ok_output("ip link add", in_netns(pid, &super::VETH_ADD)?)?;
            Ok(())
        })
        .ctx("start_with")?;
    let pid = running_pid(&rt)?;
    ensure!(seen == Some(pid), "setup saw {seen:?}, task is {pid}");
    let out = output_when_done(&f, &id)?;
    ensure!(out.contains("gate0:"), "gate0 not in the task: {out}");
    ensure!(has_line(&out, "image-only started"), "PATH lookup: {out}");
    check_limits(f.ex.layout(), &f.parent, &id, pid, "25000", "33554432")?;
    // A restarted meshd adopts it.
    let b = f.another()?;
    let list = b.list();
    ensure!(
        list.len() == 1 && list[0].0 == id && running_pid(&list[0].1)? == pid,
        "list {list:?}"
    );
    let o = b
        .exec(
            &id,
            &super::sv(&["cat", "/etc/hostname"]),
            Duration::from_secs(10),
        )
        .ctx("exec from the adopter")?;
    ensure!(o.stdout == format!("host-{id}\n").as_bytes(), "exec {o:?}");
    // pid 1 ignores SIGTERM without a handler (as in Docker): SIGKILL
    // after the grace period.
    b.stop(&id, Duration::from_millis(200)).ctx("stop")?;
    ensure!(dead(pid), "alive after stop");
    b.remove(&id).ctx("remove")?;
    ensure!(!f.root().join("tasks").join(&id).exists(), "state dir left");
    ensure!(f.task_cgroups(&id).is_empty(), "cgroups left");
    ensure!(our_mounts(f.root())?.is_empty(), "mounts left");
    Ok(())
}

pub(super) fn image_task_start_errors() -> TestResult {
    if !have_busybox()? {
        return Ok(());
    }
    let f = Fixture::new()?;
    let layers = build_image(f.root())?;
    let cases: Vec<(TaskSpec, String)> = {
        let id = unique("imgerr");
        let mut no_user = image_spec(&id, &["true"], &layers);
        if let Some(r) = no_user.rootfs.as_mut() {
            r.user = "nobody".into();
        }
        let id2 = unique("imgerr");
        // On the host, not in the image.
        let no_cmd = image_spec(&id2, &["nft", "list", "ruleset"], &layers);
        let id3 = unique("imgerr");
        let mut no_src = image_spec(&id3, &["true"], &layers);
        let missing = f.root().join("no-such-source");
        if let Some(r) = no_src.rootfs.as_mut() {
            r.mounts.push(MountSpec {
                target: "/x".into(),
                source: MountSource::Bind(missing.clone()),
                readonly: false,
            });
        }
        let id4 = unique("imgerr");
        let mut no_layer = image_spec(&id4, &["true"], &layers);
        if let Some(r) = no_layer.rootfs.as_mut() {
            r.layers.push(f.root().join("no-such-layer"));
        }
        vec![
            (
                no_user,
                format!("cannot start task t.1.{id}: unable to find user nobody: no matching entries in passwd file"),
            ),
            (no_cmd, format!("cannot start task t.1.{id2}: command not found: nft")),
            (
                no_src,
                format!(
                    "cannot start task t.1.{id3}: invalid mount config for type \"bind\": bind source path does not exist: {}: No such file or directory (os error 2)",
                    missing.display()
                ),
            ),
            (
                no_layer,
                format!(
                    "cannot start task t.1.{id4}: layer {} is not a directory",
                    f.root().join("no-such-layer").display()
                ),
            ),
        ]
    };
    for (s, want) in cases {
        let msg =
            f.ex.start(&s)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
        ensure!(msg == want, "got {msg:?}\nwant {want:?}");
        ensure!(
            !f.root().join("tasks").join(&s.id).exists(),
            "state dir left"
        );
        ensure!(f.task_cgroups(&s.id).is_empty(), "cgroups left");
    }
    ensure!(our_mounts(f.root())?.is_empty(), "mounts left");
    ensure!(f.ex.list().is_empty(), "list {:?}", f.ex.list());
    Ok(())
}

/// 200 layers with long absolute paths (their `lowerdir=` would need ~20
/// KiB, five times a page): each adds a file, the task sees them all.
pub(super) fn image_task_with_many_layers() -> TestResult {
    if !have_busybox()? {
        return Ok(());
    }
    let f = Fixture::new()?;
    let mut layers = build_image(f.root())?;
    let long = "a-rather-long-directory-name-for-a-layer-of-an-image-with-many-layers";
    for i in 0..198 {
        let l = f.root().join("many").join(format!("{long}-{i:03}"));
        fs::create_dir_all(l.join("layers")).ctx("mkdir layer")?;
        fs::write(l.join("layers").join(i.to_string()), "x").ctx("layer file")?;
        layers.push(l);
    }
    let total: usize = layers.iter().map(|l| l.as_os_str().len() + 1).sum();
    ensure!(total > 4 * 4096, "paths too short to matter: {total}");
    let id = unique("imgmany");
    let s = image_spec(
        &id,
        &[
            "sh",
            "-c",
            "echo n=$(ls /layers | wc -l); cat /top-file; echo done",
        ],
        &layers,
    );
    running_pid(&f.ex.start(&s).ctx("start")?)?;
    let out = output_when_done(&f, &id)?;
    ensure!(has_line(&out, "n=198") && has_line(&out, "top"), "{out}");
    f.ex.remove(&id).ctx("remove")?;
    ensure!(our_mounts(f.root())?.is_empty(), "mounts left");
    Ok(())
}

/// An image task's writes go to its writable layer on disk (the data directory), not to
/// the exec root: there (a tmpfs on a host, as here) 64 MiB written by a task limited to
/// 32 MiB are memory it cannot reclaim, and the kernel kills it. A restarted executor
/// removes the layers of tasks that are gone and keeps the others.
pub(super) fn image_task_writes_to_disk_not_to_memory() -> TestResult {
    if !have_busybox()? {
        return Ok(());
    }
    let f = Fixture::on_tmpfs()?;
    let layers = build_image(f.dir.path())?;
    let id = unique("imgdisk");
    let mut s = image_spec(
        &id,
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/big bs=1M count=64 2>&1 && echo wrote; echo done; exec sleep 60",
        ],
        &layers,
    );
    s.memory_bytes = 32 * 1024 * 1024;
    let rt = f.ex.start(&s).ctx("start")?;
    let pid = running_pid(&rt)?;
    let mut status = None;
    super::wait_until("the write", Duration::from_secs(60), || {
        status = f.ex.status(&id);
        stdout_of(&f.ex, &id).contains("done\n")
            || status.as_ref().is_some_and(|rt| !rt.is_running())
    })?;
    let out = stdout_of(&f.ex, &id);
    ensure!(
        has_line(&out, "wrote") && f.ex.status(&id).is_some_and(|rt| rt.is_running()),
        "the task could not write 64 MiB: {status:?}\nstdout: {out}\nstderr: {}",
        super::stderr_of(&f.ex, &id)
    );
    let rw = f.rw_root().join(&id);
    let len = fs::metadata(rw.join("upper/big"))
        .ctx("the written file")?
        .len();
    ensure!(len == 64 << 20, "{len} bytes in the writable layer");
    let used = tmpfs_used(f.root())?;
    ensure!(used < 4 << 20, "{used} bytes of the exec root's tmpfs used");
    // A restarted executor: the layer of a task that is gone goes, this one stays.
    let orphan = f.rw_root().join("gone-task");
    fs::create_dir_all(orphan.join("upper/etc")).ctx("orphan layer")?;
    fs::write(orphan.join("upper/etc/file"), "x").ctx("orphan file")?;
    let b = f.another()?;
    ensure!(!orphan.exists(), "the orphan layer is still there");
    ensure!(rw.join("upper/big").exists(), "the live task's layer went");
    b.stop(&id, Duration::from_millis(200)).ctx("stop")?;
    ensure!(dead(pid), "alive after stop");
    b.remove(&id).ctx("remove")?;
    ensure!(!rw.exists(), "writable layer left");
    ensure!(!f.root().join("tasks").join(&id).exists(), "state dir left");
    Ok(())
}

/// Bytes used in the filesystem of `p`.
fn tmpfs_used(p: &Path) -> Result<u64, String> {
    let c = c(p)?;
    // SAFETY: a zeroed plain-data struct and a NUL-terminated path valid for the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    ensure!(rc == 0, "statvfs: {}", std::io::Error::last_os_error());
    Ok((st.f_blocks - st.f_bfree) * st.f_frsize)
}
