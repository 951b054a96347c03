//! The task runtime `meshd` gives its agent: `mesh-executor` (namespaces, cgroups, a shim per
//! task so tasks survive a daemon restart) behind the manager's `Runtime` seam.

use std::time::Duration;

use mesh_executor::{Executor, TaskRuntime, TaskSpec};
use mesh_manager::runtime::{ExecResult, RunSpec, RunState, Runtime};

pub struct ExecRuntime(pub std::sync::Arc<Executor>);

fn state(r: TaskRuntime) -> RunState {
    match r {
        TaskRuntime::Running { pid, started_at_ms } => RunState::Running { pid, started_at_ms },
        TaskRuntime::Exited {
            code,
            signal,
            started_at_ms,
            finished_at_ms,
        } => RunState::Exited {
            code,
            signal,
            started_at_ms,
            finished_at_ms,
        },
    }
}

fn task_spec(spec: &RunSpec) -> TaskSpec {
    TaskSpec {
        id: spec.id.clone(),
        name: spec.name.clone(),
        hostname: spec.hostname.clone(),
        argv: spec.argv.clone(),
        env: spec.env.clone(),
        nano_cpus: spec.nano_cpus,
        memory_bytes: spec.memory_bytes,
        resolv_conf: spec.resolv_conf.clone(),
    }
}

impl Runtime for ExecRuntime {
    fn start(&self, spec: &RunSpec) -> Result<RunState, String> {
        self.0
            .start(&task_spec(spec))
            .map(state)
            .map_err(|e| e.to_string())
    }

    fn start_with(
        &self,
        spec: &RunSpec,
        setup: &mut dyn FnMut(u32) -> Result<(), String>,
    ) -> Result<RunState, String> {
        self.0
            .start_with(&task_spec(spec), setup)
            .map(state)
            .map_err(|e| e.to_string())
    }

    fn status(&self, id: &str) -> Option<RunState> {
        self.0.status(id).map(state)
    }

    fn list(&self) -> Vec<(String, RunState)> {
        self.0
            .list()
            .into_iter()
            .map(|(id, r)| (id, state(r)))
            .collect()
    }

    fn stop(&self, id: &str, grace: Duration) -> Result<(), String> {
        self.0.stop(id, grace).map_err(|e| e.to_string())
    }

    fn remove(&self, id: &str) -> Result<(), String> {
        self.0.remove(id).map_err(|e| e.to_string())
    }

    fn logs(&self, id: &str, max_bytes: usize) -> Result<(Vec<u8>, Vec<u8>), String> {
        self.0.logs(id, max_bytes).map_err(|e| e.to_string())
    }

    fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<ExecResult, String> {
        self.0
            .exec(id, argv, timeout)
            .map(|o| ExecResult {
                status: o.status,
                stdout: o.stdout,
                stderr: o.stderr,
            })
            .map_err(|e| e.to_string())
    }
}
