//! Multi-host test harness for mesh.
//!
//! Simulated hosts are network namespaces attached to an underlay bridge;
//! each host can run its own `meshd` (treated as a black box) and be driven
//! with the `mesh` CLI. Used by the integration tests in `netns-tests/tests/`,
//! by `xtask demo` and by the benchmarks.
//!
//! ```no_run
//! use mesh_netns::{require_root, Cluster, ClusterOpts};
//! # fn main() -> anyhow::Result<()> {
//! if !require_root()? {
//!     return Ok(());
//! }
//! let cluster = Cluster::new(ClusterOpts { hosts: 3, start_daemons: true, name_hint: "doc" })?;
//! let out = cluster.host(1).mesh_ok(&["version"])?;
//! # let _ = out;
//! # Ok(())
//! # }
//! ```
//!
//! Rules the harness follows: the root network namespace is never modified
//! (all links are created inside namespaces the harness made); names are
//! unique per process and instance (`m<pid>x<n>-ul`, `m<pid>x<n>-h<i>`);
//! every wait is bounded; and everything is removed when the [`Cluster`] is
//! dropped, also on panic. On panic, daemon logs are printed to stderr; with
//! `MESH_KEEP_LOGS` set, the log directory is kept and its path printed.

mod binaries;
mod cgroups;
mod cluster;
pub mod control;
mod host;
mod process;
pub mod procs;
pub mod registry;
pub mod serial;
pub mod soak;
pub mod swarm;
pub mod tls;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub use binaries::{binaries, Binaries};
pub use cgroups::hierarchies as cgroup_hierarchies;
pub use cluster::{Cluster, ClusterOpts, CLIENT_ADDR, MAX_HOSTS, UNDERLAY_PREFIX_LEN};
pub use host::{
    Host, MeshOutput, DAEMON_READY_TIMEOUT, DAEMON_STOP_TIMEOUT, EXEC_TIMEOUT, MESH_CLI_TIMEOUT,
    START_MARKER,
};
pub use process::output_with_timeout;

/// A task server (`python3 -c HOSTNAME_SERVER`) on TCP 8080: answers each connection with the
/// task's hostname and closes it.
pub const HOSTNAME_SERVER: &str = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',8080))\ns.listen(512)\nh=socket.gethostname().encode()\nwhile True:\n c,_=s.accept()\n try:\n  c.sendall(h)\n except OSError:\n  pass\n c.close()";

/// Polls `f` every `every` until it returns `Ok(Some(v))`, or fails once
/// `timeout` has passed. Errors from `f` do not abort the wait; the timeout
/// error includes the last error (or says the last result was `None`).
/// `f` is called at least once.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last = match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => "not yet (None)".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            bail!("timed out after {timeout:?} ({attempts} attempts) waiting for {what}; last result: {last}");
        }
        std::thread::sleep(every.min(timeout - elapsed));
    }
}

/// Checks that the harness can run (it needs root).
///
/// Returns `Ok(true)` when running as root. Otherwise prints a reason and,
/// in CI (`CI` set to anything but "", "0" or "false"), returns `Err` so the
/// test fails instead of silently skipping; outside CI it prints
/// "skipped: needs root" and returns `Ok(false)` (the test should return).
pub fn require_root() -> Result<bool> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(true);
    }
    let ci = std::env::var("CI")
        .map(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
        .unwrap_or(false);
    if ci {
        eprintln!("error: mesh-netns tests need root, and CI is set: failing instead of skipping");
        bail!("mesh-netns tests need root (refusing to skip in CI)");
    }
    eprintln!("skipped: needs root");
    Ok(false)
}

// Tests may drive a cluster from several threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Cluster>();
    assert_send_sync::<Host>();
};

#[cfg(test)]
mod tests;
