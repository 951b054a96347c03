//! Unit tests of the harness itself (most need root and skip otherwise).
//!
//! Daemon lifecycle tests use a fake meshd: a shell script that re-executes
//! this test binary, running only [`fake_meshd_main`], which listens on
//! `<exec-root>/meshd.sock` like the real daemon.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::cluster::{next_prefix, owner_pid, reclaim_dead_leftovers};
use crate::*;

/// Environment variable carrying the fake daemon's command line.
const FAKE_ENV: &str = "MESH_NETNS_FAKE_MESHD_ARGS";

fn opts(hosts: usize, name_hint: &'static str) -> ClusterOpts {
    ClusterOpts {
        hosts,
        start_daemons: false,
        name_hint,
    }
}

fn netns_list() -> HashSet<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// With `MESH_KEEP_LOGS` set, clusters keep their temp dir on drop.
fn keep_logs() -> bool {
    std::env::var_os("MESH_KEEP_LOGS").is_some()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Not a test: the body of the fake meshd process (see [`fake_meshd`]).
/// Does nothing unless [`FAKE_ENV`] is set.
#[test]
#[ignore = "helper: the body of the fake meshd process"]
fn fake_meshd_main() {
    let Ok(args) = std::env::var(FAKE_ENV) else {
        return;
    };
    let args: Vec<&str> = args.split_whitespace().collect();
    println!("fake meshd args: {args:?}");
    if args.contains(&"--fail-early") {
        eprintln!("fake meshd: failing early as asked");
        std::process::exit(3);
    }
    let pos = args.iter().position(|a| *a == "--exec-root").unwrap();
    let sock = Path::new(args[pos + 1]).join("meshd.sock");
    let _ = fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    println!("fake meshd listening on {}", sock.display());
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        // One answer line per connection, as the harness asks before it calls a daemon
        // ready.
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut req = [0u8; 256];
            let _ = std::io::Read::read(&mut s, &mut req);
            let _ = std::io::Write::write_all(&mut s, b"{\"Ok\":null}\n");
        }
        thread::sleep(Duration::from_millis(20));
    }
    std::process::exit(0);
}

/// Writes the fake meshd script into `dir` and returns its path.
fn fake_meshd(dir: &Path) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let script = dir.join("fake-meshd");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\nexport {FAKE_ENV}=\"$*\"\nexec '{}' --exact tests::fake_meshd_main \
             --ignored --nocapture --test-threads=1\n",
            exe.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn prefixes_are_unique_across_threads() {
    let all = Mutex::new(HashSet::new());
    thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..100 {
                    let p = next_prefix();
                    assert!(p.starts_with(&format!("m{}x", std::process::id())));
                    assert!(all.lock().unwrap().insert(p));
                }
            });
        }
    });
    assert_eq!(all.lock().unwrap().len(), 400);
}

#[test]
fn wait_for_succeeds_and_times_out() {
    let mut n = 0;
    let v = wait_for(
        "n to reach 3",
        Duration::from_secs(5),
        Duration::from_millis(1),
        || {
            n += 1;
            Ok((n >= 3).then_some(n))
        },
    )
    .unwrap();
    assert_eq!(v, 3);

    let start = Instant::now();
    let err = wait_for::<()>(
        "never",
        Duration::from_millis(100),
        Duration::from_millis(10),
        || anyhow::bail!("still broken"),
    )
    .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2));
    let msg = format!("{err:#}");
    assert!(
        msg.contains("never") && msg.contains("still broken"),
        "{msg}"
    );
}

#[test]
fn concurrent_clusters_get_distinct_names() {
    if !require_root().unwrap() {
        return;
    }
    let barrier = Barrier::new(2);
    let (a, b) = thread::scope(|s| {
        let make = || {
            barrier.wait();
            let c = Cluster::new(opts(2, "concurrent")).unwrap();
            // Keep both alive at the same time.
            barrier.wait();
            c
        };
        let a = s.spawn(make);
        let b = s.spawn(make);
        (a.join().unwrap(), b.join().unwrap())
    });
    let names_a: HashSet<&String> = a.namespaces().iter().collect();
    let names_b: HashSet<&String> = b.namespaces().iter().collect();
    assert_eq!(names_a.len(), 3);
    assert_eq!(names_b.len(), 3);
    assert!(names_a.is_disjoint(&names_b), "{names_a:?} vs {names_b:?}");
    assert_ne!(a.prefix(), b.prefix());
    assert_ne!(a.base_dir(), b.base_dir());
    let listed = netns_list();
    for ns in names_a.iter().chain(&names_b) {
        assert!(listed.contains(*ns), "{ns} not in {listed:?}");
    }
}

#[test]
fn daemon_lifecycle_with_fake_meshd() {
    if !require_root().unwrap() {
        return;
    }
    let cluster = Cluster::new(opts(2, "lifecycle")).unwrap();
    let fake = fake_meshd(cluster.base_dir());
    let h1 = cluster.host(1);
    assert!(!h1.daemon_running());
    assert_eq!(h1.daemon_pid(), None);

    h1.start_daemon_bin(&fake, vec!["--extra".into()]).unwrap();
    let pid = h1.daemon_pid().unwrap();
    assert!(h1.socket().exists());
    let log = fs::read_to_string(h1.log_path()).unwrap();
    assert!(log.contains(START_MARKER), "{log}");
    assert!(log.contains("--node-name"), "{log}");
    assert!(log.contains("h1"), "{log}");
    assert!(log.contains("--extra"), "{log}");
    let cgroup_arg = format!("--cgroup-parent {}", h1.cgroup_parent());
    assert!(log.contains(&cgroup_arg), "{log}");
    assert_ne!(h1.cgroup_parent(), cluster.host(2).cgroup_parent());

    // Double start is refused and leaves the daemon alone.
    let err = h1.start_daemon_bin(&fake, vec![]).unwrap_err();
    assert!(format!("{err:#}").contains("already running"), "{err:#}");
    assert_eq!(h1.daemon_pid(), Some(pid));

    // SIGKILL leaves a stale socket; a new start must still work.
    h1.kill_daemon().unwrap();
    assert!(!h1.daemon_running());
    assert!(!pid_alive(pid));
    h1.kill_daemon().unwrap(); // idempotent

    h1.start_daemon_bin(&fake, vec![]).unwrap();
    let pid2 = h1.daemon_pid().unwrap();
    h1.restart_daemon().unwrap();
    let pid3 = h1.daemon_pid().unwrap();
    assert_ne!(pid2, pid3);
    assert!(!pid_alive(pid2));
    h1.stop_daemon().unwrap();
    assert!(!h1.daemon_running());
    h1.stop_daemon().unwrap(); // idempotent
    let log = fs::read_to_string(h1.log_path()).unwrap();
    assert_eq!(log.matches(START_MARKER).count(), 3, "{log}");

    // A daemon that exits before it is ready: error with the log tail.
    let err = h1
        .start_daemon_bin(&fake, vec!["--fail-early".into()])
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("exited before becoming ready"), "{msg}");
    assert!(msg.contains("failing early as asked"), "{msg}");

    // The daemon runs inside the host namespace.
    let h2 = cluster.host(2);
    h2.start_daemon_bin(&fake, vec![]).unwrap();
    let pid_h2 = h2.daemon_pid().unwrap();
    let ours = fs::read_link(format!("/proc/{pid_h2}/ns/net")).unwrap();
    let root = fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(ours, root);

    // Drop kills the running daemon and removes everything.
    let namespaces = cluster.namespaces().to_vec();
    let base = cluster.base_dir().to_path_buf();
    drop(cluster);
    assert!(!pid_alive(pid_h2));
    let listed = netns_list();
    assert!(namespaces.iter().all(|ns| !listed.contains(ns)));
    assert!(!base.exists() || keep_logs());
}

#[test]
fn panic_with_running_daemon_cleans_up() {
    if !require_root().unwrap() {
        return;
    }
    let seen = Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let cluster = Cluster::new(opts(1, "panic")).unwrap();
        let fake = fake_meshd(cluster.base_dir());
        cluster.host(1).start_daemon_bin(&fake, vec![]).unwrap();
        *seen.lock().unwrap() = Some((
            cluster.host(1).daemon_pid().unwrap(),
            cluster.namespaces().to_vec(),
            cluster.base_dir().to_path_buf(),
        ));
        panic!("intentional panic with a running daemon");
    });
    assert!(result.is_err());
    let (pid, namespaces, base) = seen.lock().unwrap().take().unwrap();
    assert!(!pid_alive(pid));
    let listed = netns_list();
    assert!(namespaces.iter().all(|ns| !listed.contains(ns)));
    assert!(!base.exists() || keep_logs());
}

#[test]
fn failed_creation_cleans_up() {
    if !require_root().unwrap() {
        return;
    }
    let err = Cluster::new(opts(MAX_HOSTS + 1, "too-many")).unwrap_err();
    assert!(format!("{err:#}").contains("at most"));

    // A temp dir so long that the socket path does not fit in sun_path:
    // creation fails after namespaces were made, and must undo them.
    let tmp = std::env::temp_dir().join(format!(
        "mesh-netns-long-{}-{}",
        std::process::id(),
        "x".repeat(100)
    ));
    fs::create_dir_all(&tmp).unwrap();
    let err = Cluster::new_in(opts(2, "long-tmp"), &tmp).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("too long"), "{msg}");
    if keep_logs() {
        fs::remove_dir_all(&tmp).unwrap();
    } else {
        fs::remove_dir(&tmp).unwrap(); // fails unless the cluster dir is gone
    }
    let prefix = msg
        .split("creating cluster ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap();
    assert!(prefix.starts_with('m'), "{msg}");
    let leaked: Vec<String> = netns_list()
        .into_iter()
        .filter(|ns| ns.starts_with(&format!("{prefix}-")))
        .collect();
    assert!(leaked.is_empty(), "leaked {leaked:?}");
}

#[test]
fn owner_pids_from_namespace_names() {
    assert_eq!(owner_pid("m20074x0-h1"), Some(20074));
    assert_eq!(owner_pid("m20074x12-ul"), Some(20074));
    assert_eq!(owner_pid("mesh-overlay"), None);
    assert_eq!(owner_pid("m1x-h1"), None);
    assert_eq!(owner_pid("other"), None);
}

/// A test binary killed by a signal leaves its cluster behind; the next cluster made on the
/// machine removes it (and never touches a live process's clusters).
#[test]
fn leftovers_of_a_killed_test_process_are_reclaimed() {
    if !require_root().unwrap() {
        return;
    }
    // A pid that is gone: a child that already ended (its pid is not reused this soon).
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let dead = child.id();
    let tmp = std::env::temp_dir();
    let leftover = format!("m{dead}x0-h1");
    let dir = tmp.join(format!("mesh-test-m{dead}x0"));
    {
        // Other threads' clusters sweep leftovers too: plant it whole before any of them looks.
        let _planting = crate::cluster::RECLAIM
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        crate::cluster::ip(&["netns", "add", &leftover]).unwrap();
        fs::create_dir_all(dir.join("h1")).unwrap();
    }
    // Ours (a live pid) stays.
    let c = Cluster::new(opts(1, "reclaim")).unwrap();
    let ours = c.namespaces().to_vec();
    reclaim_dead_leftovers(&tmp);
    let now = netns_list();
    assert!(!now.contains(&leftover), "{leftover} was not reclaimed");
    assert!(
        keep_logs() || !dir.exists(),
        "{} was not removed",
        dir.display()
    );
    for ns in &ours {
        assert!(now.contains(ns), "a live cluster's {ns} was removed");
    }
}
