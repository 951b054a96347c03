//! Processes of tasks as the host sees them: the pid and start time a task's executor
//! recorded, and whether that very process is still alive (not a zombie, not a reused pid).
//! Read here from `/proc` directly, not through `mesh-executor`'s helpers: the harness checks
//! the executor from outside and shares none of its code.

use std::fs;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::Host;

impl Host {
    /// The task's process as the executor recorded it in `EXEC_ROOT/tasks/<id>/state.json`:
    /// its pid (in the host's pid namespace) and `/proc` start time.
    pub fn task_process(&self, id: &str) -> Result<(u32, u64)> {
        let path = self.exec_root().join("tasks").join(id).join("state.json");
        let v: Value = serde_json::from_slice(
            &fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        let pid = v["pid"].as_u64().context("state.json: pid")?;
        let start = v["pid_start_time"]
            .as_u64()
            .context("state.json: pid_start_time")?;
        Ok((u32::try_from(pid)?, start))
    }
}

/// The state (field 3 of `/proc/<pid>/stat`) and start time (field 22) of a process.
pub fn stat_of(pid: u32) -> Option<(String, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3, fields[19] field 22.
    Some((fields.first()?.to_string(), fields.get(19)?.parse().ok()?))
}

/// True if `pid` is alive and still the process that started at `start`: not a zombie, not
/// dead (`X`).
pub fn alive(pid: u32, start: u64) -> bool {
    stat_of(pid)
        .is_some_and(|(state, st)| !matches!(state.as_str(), "Z" | "X" | "x") && st == start)
}
