//! The container options of image services on a real cluster, with a real registry (Debian's
//! `docker-registry` in host 1's namespace, `meshd --insecure-registry`) and the test image of
//! `netns-tests/src/testimage.py`:
//!
//! - `--limit-memory` and `--limit-cpu` land in the task's cgroups (`memory.max`, `cpu.max`,
//!   or the v1 `memory.limit_in_bytes`, `cpu.cfs_quota_us`/`cpu.cfs_period_us`), with the
//!   task's process in them;
//! - `--hostname` and `--workdir` replace the task ID and the image's WorkingDir;
//! - `--init`: pid 1 is the reaper, the command its child; orphans are reaped (a zombie stays
//!   without it) and a signal sent to pid 1 is forwarded to the command;
//! - `--stop-signal` is the signal a stop sends, `--stop-grace-period` the wait before SIGKILL
//!   when the task ignores it;
//! - an image's Entrypoint and User apply (Docker's rules: service args replace the image's
//!   Cmd, `--entrypoint` replaces its Entrypoint and drops its Cmd, `--user` its User);
//! - a task shows `Preparing` in `service ps` while its image is pulled (the registry's
//!   answers to host 2 throttled by `tc` in host 1's namespace, so the pull lasts seconds).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_netns::procs::{alive, stat_of};
use mesh_netns::registry::{registry_cluster, TestImageConfig, REGISTRY_PORT};
use mesh_netns::swarm::{field, running_task, service_ps, task_exec, wait_tasks_running};
use mesh_netns::{cgroup_hierarchies, wait_for, Host};
use serde_json::Value;

/// The start time of a live process.
fn start_time(pid: u32) -> Option<u64> {
    stat_of(pid).map(|(_, start)| start)
}

/// The task's CPU limit as `"<quota> <period>"` (microseconds) and its memory limit in bytes,
/// read from its cgroups under the host's cgroup parent: `cpu.max` and `memory.max` where a
/// v2 hierarchy has the controllers, else the v1 `cpu` and `memory` hierarchies' files. Each
/// cgroup it is read from must hold `pid`.
fn task_limits(h: &Host, id: &str, pid: u32) -> Result<(String, String)> {
    let read = |p: &Path| -> Result<String> {
        Ok(fs::read_to_string(p)
            .with_context(|| format!("reading {}", p.display()))?
            .trim()
            .to_string())
    };
    let (mut cpu, mut memory) = (None, None);
    for hier in cgroup_hierarchies(Path::new("/sys/fs/cgroup")) {
        let dir = hier.join(h.cgroup_parent()).join(id);
        let found_cpu = if dir.join("cpu.max").exists() {
            Some(read(&dir.join("cpu.max"))?)
        } else if dir.join("cpu.cfs_quota_us").exists() {
            Some(format!(
                "{} {}",
                read(&dir.join("cpu.cfs_quota_us"))?,
                read(&dir.join("cpu.cfs_period_us"))?
            ))
        } else {
            None
        };
        let found_memory = if dir.join("memory.max").exists() {
            Some(read(&dir.join("memory.max"))?)
        } else if dir.join("memory.limit_in_bytes").exists() {
            Some(read(&dir.join("memory.limit_in_bytes"))?)
        } else {
            None
        };
        if found_cpu.is_some() || found_memory.is_some() {
            let procs = read(&dir.join("cgroup.procs"))?;
            ensure!(
                procs.lines().any(|l| l.trim() == pid.to_string()),
                "{} does not hold the task's process {pid}: {procs:?}",
                dir.display()
            );
        }
        cpu = cpu.or(found_cpu);
        memory = memory.or(found_memory);
    }
    Ok((
        cpu.with_context(|| format!("no cpu limit file in any cgroup of task {id}"))?,
        memory.with_context(|| format!("no memory limit file in any cgroup of task {id}"))?,
    ))
}

/// The `NSpid` of a process: its pid in each pid namespace, outermost first.
fn ns_pids(pid: u32) -> Result<Vec<u32>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .context("no NSpid line")?;
    Ok(line
        .split_whitespace()
        .skip(1)
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// The children of a process (`/proc/<pid>/task/<pid>/children`).
fn children(pid: u32) -> Result<Vec<u32>> {
    Ok(
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect(),
    )
}

/// A process of a task's pid namespace, as its `/proc/<pid>/stat` reads inside the task.
#[derive(Debug)]
struct TaskProc {
    pid: u32,
    comm: String,
    state: String,
    ppid: u32,
}

/// The processes of a task's pid namespace (seen from an exec inside it, the exec's own `sh`
/// and `cat` left out).
fn task_procs(h: &Host, task: &str) -> Result<Vec<TaskProc>> {
    let out = task_exec(
        h,
        task,
        &["sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null; true"],
    )?;
    let mut procs = Vec::new();
    for line in out.lines() {
        let (Some(open), Some(close)) = (line.find('('), line.rfind(')')) else {
            continue;
        };
        let rest: Vec<&str> = line[close + 1..].split_whitespace().collect();
        let (Some(state), Some(ppid)) = (rest.first(), rest.get(1)) else {
            continue;
        };
        let p = TaskProc {
            pid: line[..open].trim().parse()?,
            comm: line[open + 1..close].to_string(),
            state: state.to_string(),
            ppid: ppid.parse()?,
        };
        if p.comm != "sh" && p.comm != "cat" {
            procs.push(p);
        }
    }
    Ok(procs)
}

/// The `service ps` row of the one task of `svc` once it runs (60 s at most).
fn running_row(h: &Host, svc: &str) -> Result<Value> {
    let rows = wait_tasks_running(h, svc, 1, Duration::from_secs(60))?;
    Ok(rows[0].clone())
}

#[test]
fn limits_hostname_workdir_init_and_stop_options_apply_to_an_image_task() -> Result<()> {
    let Some((c, reg)) = registry_cluster(1, 1, "imgopts")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    reg.push_test_image("app", "v1", "v1", false)?;
    let image = format!("{}/app:v1", reg.host_port());
    let out_dir = |name: &str| -> Result<String> {
        let d = c.base_dir().join(name);
        fs::create_dir_all(&d)?;
        Ok(format!("type=bind,source={},target=/out", d.display()))
    };
    let (usr1_mount, grace_mount) = (out_dir("usr1")?, out_dir("grace")?);

    // Limits, hostname, workdir and an init whose child leaves an orphan behind.
    let orphan_cmd = "(sleep 1 &); exec sleep 100101";
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "opt-main",
        "--limit-memory",
        "64M",
        "--limit-cpu",
        "0.5",
        "--hostname",
        "opt-box",
        "--workdir",
        "/tmp",
        "--init",
        "-d",
        &image,
        "sh",
        "-c",
        orphan_cmd,
    ])?;
    // The same orphan without --init: the command is pid 1 and never reaps it.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "opt-noinit",
        "-d",
        &image,
        "sh",
        "-c",
        "(sleep 1 &); exec sleep 100102",
    ])?;
    // Stopped by SIGUSR1 (SIGTERM is noted and ignored), which it leaves a note of; its
    // child would note any signal it got (the stop signal is for pid 1 alone).
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "opt-usr1",
        "--stop-signal",
        "SIGUSR1",
        "--stop-grace-period",
        "20s",
        "--mount",
        &usr1_mount,
        "-d",
        &image,
        "sh",
        "-c",
        "(trap 'echo child >> /out/signals' USR1 TERM; while :; do sleep 1 & wait $!; done) & trap 'echo usr1 >> /out/signals; exit 0' USR1; trap 'echo term >> /out/signals' TERM; while :; do sleep 1 & wait $!; done",
    ])?;
    // Notes SIGTERM and goes on: SIGKILLed after its 2 s grace period.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "opt-grace",
        "--stop-grace-period",
        "2s",
        "--mount",
        &grace_mount,
        "-d",
        &image,
        "sh",
        "-c",
        "trap 'echo term >> /out/signals' TERM; while :; do sleep 1 & wait $!; done",
    ])?;
    let main = running_row(h1, "opt-main")?;
    let (main_id, main_task) = (field(&main, "ID").to_string(), field(&main, "Name"));
    let (reaper, reaper_start) = h1.task_process(&main_id)?;

    // The limits, in the task's cgroups, with its process in them.
    let (cpu, memory) = task_limits(h1, &main_id, reaper)?;
    ensure!(cpu == "50000 100000", "cpu limit {cpu:?}");
    ensure!(memory == "67108864", "memory limit {memory:?}");

    // --hostname: the UTS name and /etc/hostname.
    ensure!(task_exec(h1, main_task, &["hostname"])? == "opt-box\n");
    ensure!(task_exec(h1, main_task, &["cat", "/etc/hostname"])? == "opt-box\n");

    // --init: the recorded process is pid 1 of the task's namespace, not the command; its
    // only child is the command (once `sh` has exec'd it), not pid 1.
    ensure!(
        ns_pids(reaper)?.last() == Some(&1),
        "NSpid of {reaper}: {:?}",
        ns_pids(reaper)?
    );
    let command = wait_for(
        "the init's child runs the command",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let kids = children(reaper)?;
            let want = b"sleep\x00100101\x00";
            Ok(kids
                .iter()
                .copied()
                .find(|k| fs::read(format!("/proc/{k}/cmdline")).is_ok_and(|c| c == want)))
        },
    )?;
    let command_ns = *ns_pids(command)?.last().context("NSpid")?;
    ensure!(command_ns != 1, "the command is pid 1 despite --init");
    let init_cmdline = task_exec(h1, main_task, &["cat", "/proc/1/cmdline"])?;
    ensure!(
        !init_cmdline.starts_with("sleep") && !init_cmdline.starts_with("sh"),
        "pid 1 runs {init_cmdline:?}"
    );
    // --workdir: the command (and the init) run in /tmp, not the image's /srv.
    for pid in [command_ns, 1] {
        let cwd = task_exec(h1, main_task, &["readlink", &format!("/proc/{pid}/cwd")])?;
        ensure!(cwd == "/tmp\n", "pid {pid} runs in {cwd:?}");
    }
    // The reaper reaps the orphan once it exits: no zombie, only the command left.
    wait_for(
        "the orphan reaped under --init",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            let procs = task_procs(h1, main_task)?;
            let sleeps = procs.iter().filter(|p| p.comm == "sleep").count();
            let zombies = procs.iter().any(|p| p.state == "Z");
            Ok((sleeps == 1 && !zombies).then_some(()))
        },
    )?;
    // Without --init the orphan is a zombie of the command, pid 1.
    let noinit = running_row(h1, "opt-noinit")?;
    let noinit_task = field(&noinit, "Name").to_string();
    wait_for(
        "a zombie orphan without --init",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || {
            let procs = task_procs(h1, &noinit_task)?;
            Ok(procs
                .iter()
                .any(|p| p.comm == "sleep" && p.state == "Z" && p.ppid == 1 && p.pid != 1)
                .then_some(()))
        },
    )
    .with_context(|| format!("{:?}", task_procs(h1, &noinit_task)))?;
    h1.mesh_ok(&["service", "rm", "opt-noinit"])?;

    // The init forwards signals to the command: SIGTERM sent (from the host) to pid 1 alone,
    // which blocks it, reaches the command, not pid 1 of its namespace, so it dies of it, and
    // the init exits with it.
    let command_start = start_time(command).context("the command's start time")?;
    ensure!(alive(reaper, reaper_start) && alive(command, command_start));
    // SAFETY: plain syscall on the reaper's pid, just checked against its start time.
    unsafe { libc::kill(reaper as libc::pid_t, libc::SIGTERM) };
    wait_for(
        "the command and its init ended by a SIGTERM to the init",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || Ok((!alive(command, command_start) && !alive(reaper, reaper_start)).then_some(())),
    )?;

    // Stops: both services at once, each process watched until it is gone.
    let usr1 = running_row(h1, "opt-usr1")?;
    let grace = running_row(h1, "opt-grace")?;
    let watched = [
        ("opt-usr1", h1.task_process(field(&usr1, "ID"))?),
        ("opt-grace", h1.task_process(field(&grace, "ID"))?),
    ];
    for (svc, (p, st)) in &watched {
        ensure!(alive(*p, *st), "{svc}: process {p} is not running");
    }
    let grace_notes = c.base_dir().join("grace").join("signals");
    let t0 = Instant::now();
    h1.mesh_ok(&["service", "rm", "opt-main", "opt-usr1", "opt-grace"])?;
    let mut gone: [Option<Duration>; 2] = [None; 2];
    let mut term_at = None;
    while gone.iter().any(Option::is_none) {
        if t0.elapsed() > Duration::from_secs(40) {
            bail!("not stopped 40 s after service rm: {watched:?} {gone:?}");
        }
        for (i, (_, (p, st))) in watched.iter().enumerate() {
            if gone[i].is_none() && !alive(*p, *st) {
                gone[i] = Some(t0.elapsed());
            }
        }
        if term_at.is_none() && fs::read_to_string(&grace_notes).is_ok_and(|s| !s.is_empty()) {
            term_at = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let [usr1_gone, grace_gone] = gone.map(Option::unwrap_or_default);
    eprintln!(
        "stopped after service rm: usr1 {usr1_gone:?}, grace {grace_gone:?} (SIGTERM noted at {term_at:?})"
    );
    // The stop signal goes to the task's pid 1 alone, once, as Docker sends it: each trap
    // ran exactly once, for the right signal, and the USR1 task's child noted nothing.
    let only = |notes: &str, word: &str| notes.lines().eq([word]);
    // SIGUSR1 was sent, not SIGTERM, and ended the task well before its 20 s grace period.
    let notes = fs::read_to_string(c.base_dir().join("usr1").join("signals"))?;
    ensure!(only(&notes, "usr1"), "the USR1 task noted {notes:?}");
    ensure!(
        usr1_gone < Duration::from_secs(10),
        "--stop-signal task stopped after {usr1_gone:?}"
    );
    // SIGTERM, ignored, then SIGKILL after the 2 s grace period (not the default 5 s).
    let notes = fs::read_to_string(&grace_notes)?;
    ensure!(only(&notes, "term"), "the grace task noted {notes:?}");
    let term_at = term_at.context("SIGTERM never noted")?;
    let killed_after = grace_gone.saturating_sub(term_at);
    ensure!(
        killed_after >= Duration::from_millis(1500) && killed_after < Duration::from_millis(4500),
        "SIGKILL {killed_after:?} after SIGTERM, with --stop-grace-period 2s"
    );
    ensure!(
        grace_gone < Duration::from_secs(15),
        "--stop-grace-period task stopped after {grace_gone:?}"
    );
    Ok(())
}

/// Throttles what host 1's registry sends (TCP source port [`REGISTRY_PORT`], out of `eth0`
/// of host 1's namespace) to 1 Mbit/s, with an HTB class and a u32 filter; other traffic
/// goes unshaped. Only the cluster's namespace is touched.
fn throttle_registry(h: &Host) -> Result<()> {
    let port = REGISTRY_PORT.to_string();
    for argv in [
        &[
            "tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb",
        ][..],
        &[
            "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb", "rate",
            "1mbit", "ceil", "1mbit",
        ],
        &[
            "tc", "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1",
            "u32", "match", "ip", "sport", &port, "0xffff", "flowid", "1:1",
        ],
    ] {
        let out = h.exec(argv)?;
        ensure!(out.status.success(), "{argv:?} in {}: {out:?}", h.ns());
    }
    Ok(())
}

/// Removes [`throttle_registry`]'s qdisc.
fn unthrottle_registry(h: &Host) -> Result<()> {
    let out = h.exec(&["tc", "qdisc", "del", "dev", "eth0", "root"])?;
    ensure!(out.status.success(), "tc qdisc del in {}: {out:?}", h.ns());
    Ok(())
}

/// Waits (10 s at most) until a running task of `svc` has `cmdline` as its pid 1's
/// `/proc/1/cmdline` (a `sh -c "exec ..."` execs at once, but not before the task runs), then
/// checks it runs as `uid` (`id -u` in an exec, which runs as the task's user).
fn expect_task(c: &mesh_netns::Cluster, svc: &str, cmdline: &str, uid: &str) -> Result<()> {
    wait_tasks_running(c.host(1), svc, 1, Duration::from_secs(60))?;
    let (i, task) = running_task(c, svc)?;
    let h = c.host(i);
    let mut last = String::new();
    wait_for(
        &format!("{svc}: pid 1 runs {cmdline:?}"),
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            last = task_exec(h, &task, &["cat", "/proc/1/cmdline"])?;
            Ok((last == cmdline).then_some(()))
        },
    )
    .with_context(|| format!("{svc}: pid 1 runs {last:?}"))?;
    let got = task_exec(h, &task, &["id", "-u"])?;
    ensure!(got.trim() == uid, "{svc}: runs as uid {got:?}, not {uid}");
    // The process itself, not only the exec.
    let status = task_exec(h, &task, &["cat", "/proc/1/status"])?;
    ensure!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(uid)),
        "{svc}: pid 1 {status}"
    );
    Ok(())
}

#[test]
fn an_image_s_entrypoint_and_user_apply_and_a_slow_pull_shows_preparing() -> Result<()> {
    let Some((c, reg)) = registry_cluster(2, 1, "imgentry")? else {
        return Ok(());
    };
    let h1 = c.host(1);
    // The image runs `sleep 100201` (Entrypoint ["sleep"], Cmd ["100201"]) as app (1000).
    let config = TestImageConfig {
        entrypoint: Some(vec!["sleep".into()]),
        cmd: Some(vec!["100201".into()]),
        user: Some("app".into()),
    };
    reg.push_test_image_with("ep", "v1", "v1", &config)?;
    let image = format!("{}/ep:v1", reg.host_port());

    // The first pull on h2, throttled: the task is Preparing (Docker's word) for seconds.
    throttle_registry(h1)?;
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "ep-default",
        "--constraint",
        "node.hostname==h2",
        "-d",
        &image,
    ])?;
    let mut seen: Vec<String> = Vec::new();
    let preparing = wait_for(
        "ep-default Preparing",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || {
            let rows = service_ps(h1, "ep-default")?;
            let state = rows
                .first()
                .map(|t| field(t, "CurrentState").to_string())
                .unwrap_or_default();
            let word = state
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            if seen.last() != Some(&word) {
                seen.push(word);
            }
            Ok(state.starts_with("Preparing").then_some(rows))
        },
    );
    // The pull cannot be done 2 s later (1 MB at 1 Mbit/s takes 8 s): the throttle, not
    // luck, let the poll see Preparing.
    let held = preparing.is_ok() && {
        std::thread::sleep(Duration::from_secs(2));
        service_ps(h1, "ep-default")?
            .iter()
            .all(|t| field(t, "CurrentState").starts_with("Preparing"))
    };
    unthrottle_registry(h1)?;
    let preparing = preparing.with_context(|| format!("states seen: {seen:?}"))?;
    ensure!(
        held,
        "ep-default no longer Preparing 2 s into a throttled pull"
    );
    ensure!(
        field(&preparing[0], "Node") == "h2" && field(&preparing[0], "DesiredState") == "Running",
        "{preparing:?}"
    );
    // Then it runs: the image's entrypoint with its Cmd, as the image's user.
    expect_task(&c, "ep-default", "sleep\x00100201\x00", "1000")?;
    eprintln!("ep-default states: {seen:?}");

    // Service args replace the image's Cmd, after its entrypoint.
    h1.mesh_ok(&[
        "service", "create", "--name", "ep-args", "-d", &image, "100202",
    ])?;
    // --entrypoint replaces the image's and drops its Cmd; --user its user.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "ep-entry",
        "--entrypoint",
        "sleep 100203",
        "--user",
        "root",
        "-d",
        &image,
    ])?;
    // --entrypoint (split as a shell would) followed by the service's args.
    h1.mesh_ok(&[
        "service",
        "create",
        "--name",
        "ep-entry-args",
        "--entrypoint",
        "sh -c",
        "-d",
        &image,
        "exec sleep 100204",
    ])?;
    expect_task(&c, "ep-args", "sleep\x00100202\x00", "1000")?;
    expect_task(&c, "ep-entry", "sleep\x00100203\x00", "0")?;
    expect_task(&c, "ep-entry-args", "sleep\x00100204\x00", "1000")?;
    Ok(())
}
