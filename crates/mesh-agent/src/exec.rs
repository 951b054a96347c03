//! The real task runtime: `mesh-executor` (namespaces, cgroups, a shim per
//! task so tasks survive a daemon restart) behind the agent's `Runtime` seam.

use std::path::PathBuf;
use std::time::Duration;

use crate::runtime::{ExecResult, PlaneError, RunSpec, RunState, Runtime, RuntimeError};
use mesh_api::{Mount, MountType};
use mesh_executor::ExecError;
use mesh_executor::{
    Executor, FileSpec, MountSource, MountSpec, RootfsSpec, TaskRuntime, TaskSpec,
};

pub struct ExecRuntime {
    pub executor: std::sync::Arc<Executor>,
    /// Where named volumes live: `<data-dir>/volumes/<name>/_data`, as Docker's local driver.
    pub volumes: PathBuf,
    /// How each task's output is kept (`--log-opt`).
    pub log: mesh_executor::LogOptions,
}

/// The executor's error as the seam's: its kinds kept, the rest as is.
fn runtime_error(e: ExecError) -> RuntimeError {
    match e {
        ExecError::NotFound { task } => RuntimeError::NotFound(task),
        ExecError::NotRunning { task } => RuntimeError::NotRunning(task),
        other => RuntimeError::Failed(Box::new(other)),
    }
}

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

impl ExecRuntime {
    fn task_spec(&self, spec: &RunSpec) -> Result<TaskSpec, RuntimeError> {
        let rootfs = match &spec.rootfs {
            None => None,
            Some(r) => Some(RootfsSpec {
                layers: r.layers.clone(),
                readonly: r.readonly,
                mounts: r
                    .mounts
                    .iter()
                    .enumerate()
                    .map(|(i, m)| self.mount(&spec.id, i, m))
                    .collect::<Result<_, _>>()?,
                user: r.user.clone(),
                workdir: r.workdir.clone(),
                init: r.init,
                hosts: r.hosts.clone(),
                files: r
                    .files
                    .iter()
                    .map(|f| FileSpec {
                        target: PathBuf::from(&f.target),
                        uid: f.uid,
                        gid: f.gid,
                        mode: f.mode,
                        data: f.data.clone(),
                    })
                    .collect(),
            }),
        };
        Ok(TaskSpec {
            id: spec.id.clone(),
            name: spec.name.clone(),
            hostname: spec.hostname.clone(),
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            nano_cpus: spec.nano_cpus,
            memory_bytes: spec.memory_bytes,
            resolv_conf: spec.resolv_conf.clone(),
            rootfs,
            log: self.log,
        })
    }

    /// A service's `--mount` on this node: a named volume is a directory of the node's
    /// volume store, created on first use and kept after the task (an anonymous one is the
    /// task's own); a bind source must exist, as Docker's swarm mode requires.
    fn mount(&self, task: &str, i: usize, m: &Mount) -> Result<MountSpec, RuntimeError> {
        let source = match m.kind {
            MountType::Bind => {
                let p = PathBuf::from(&m.source);
                if !p.exists() {
                    return Err(RuntimeError::Invalid(format!(
                        "invalid mount config for type \"bind\": bind source path does not exist: {}",
                        m.source
                    )));
                }
                MountSource::Bind(p)
            }
            MountType::Volume => {
                let name = if m.source.is_empty() {
                    format!("anon-{task}-{i}")
                } else {
                    m.source.clone()
                };
                let dir = self.volumes.join(name).join("_data");
                std::fs::create_dir_all(&dir).map_err(|e| {
                    RuntimeError::Failed(
                        format!("cannot create volume {}: {e}", dir.display()).into(),
                    )
                })?;
                MountSource::Bind(dir)
            }
            MountType::Tmpfs => MountSource::Tmpfs { size_bytes: 0 },
        };
        Ok(MountSpec {
            target: PathBuf::from(&m.target),
            source,
            readonly: m.readonly,
        })
    }
}

impl Runtime for ExecRuntime {
    fn start(&self, spec: &RunSpec) -> Result<RunState, RuntimeError> {
        self.executor
            .start(&self.task_spec(spec)?)
            .map(state)
            .map_err(runtime_error)
    }

    fn start_with(
        &self,
        spec: &RunSpec,
        setup: &mut dyn FnMut(u32) -> Result<(), PlaneError>,
    ) -> Result<RunState, RuntimeError> {
        // The executor knows nothing of the plane: it reports the setup's failure in words
        // ("network setup failed: ...").
        self.executor
            .start_with(&self.task_spec(spec)?, &mut |pid| {
                setup(pid).map_err(|e| e.to_string())
            })
            .map(state)
            .map_err(runtime_error)
    }

    fn status(&self, id: &str) -> Option<RunState> {
        self.executor.status(id).map(state)
    }

    fn list(&self) -> Vec<(String, RunState)> {
        self.executor
            .list()
            .into_iter()
            .map(|(id, r)| (id, state(r)))
            .collect()
    }

    fn stop(&self, id: &str, signal: i32, grace: Duration) -> Result<(), RuntimeError> {
        self.executor
            .stop_with(id, signal, grace)
            .map_err(runtime_error)
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.executor.remove(id).map_err(runtime_error)
    }

    fn logs(
        &self,
        id: &str,
        after_ns: Option<u64>,
        tail: Option<usize>,
    ) -> Result<Vec<mesh_api::LogLine>, RuntimeError> {
        let records = self
            .executor
            .logs(id, after_ns, tail)
            .map_err(runtime_error)?;
        Ok(records
            .into_iter()
            .map(|r| mesh_api::LogLine {
                time_ns: r.time_ns,
                stream: match r.stream {
                    mesh_executor::LogStream::Stdout => mesh_api::LogStream::Stdout,
                    mesh_executor::LogStream::Stderr => mesh_api::LogStream::Stderr,
                },
                text: r.text,
            })
            .collect())
    }

    fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecResult, RuntimeError> {
        self.executor
            .exec(id, argv, timeout)
            .map(|o| ExecResult {
                status: o.status,
                stdout: o.stdout,
                stderr: o.stderr,
            })
            .map_err(runtime_error)
    }
}
