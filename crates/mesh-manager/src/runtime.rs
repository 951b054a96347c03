//! The seam between the node agent and the kernel: what the agent needs from a task runtime.
//! `meshd` plugs in the real executor (`mesh-executor`: namespaces, cgroups, shims); tests can
//! plug in a fake.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What to run for a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    pub id: String,
    pub name: String,
    pub hostname: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub nano_cpus: u64,
    pub memory_bytes: u64,
    pub resolv_conf: String,
}

/// A task process as the runtime sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running {
        pid: u32,
        started_at_ms: u64,
    },
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        started_at_ms: u64,
        finished_at_ms: u64,
    },
}

/// The output of a command run inside a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs task processes. Blocking calls: the agent calls them from blocking threads.
pub trait Runtime: Send + Sync + 'static {
    fn start(&self, spec: &RunSpec) -> Result<RunState, String>;
    fn status(&self, id: &str) -> Option<RunState>;
    fn list(&self) -> Vec<(String, RunState)>;
    fn stop(&self, id: &str, grace: Duration) -> Result<(), String>;
    fn remove(&self, id: &str) -> Result<(), String>;
    fn logs(&self, id: &str, max_bytes: usize) -> Result<(Vec<u8>, Vec<u8>), String>;
    fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<ExecResult, String>;
}
