//! The cluster settings a user option may set (its `target` in the configuration).

use std::fmt;
use std::str::FromStr;

/// The cluster settings an option may set (its `target`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionTarget {
    /// Cores per worker (requests; also the default thread count).
    WorkerCores,
    /// Memory per worker (numbers are GiB; strings such as `2G`).
    WorkerMemory,
    /// Threads per worker.
    WorkerThreads,
    /// CPU limit per worker container.
    WorkerCoresLimit,
    /// Memory limit per worker container.
    WorkerMemoryLimit,
    /// Scheduler cores.
    SchedulerCores,
    /// Scheduler memory.
    SchedulerMemory,
    /// CPU limit of the scheduler container.
    SchedulerCoresLimit,
    /// Memory limit of the scheduler container.
    SchedulerMemoryLimit,
    /// Idle timeout in seconds.
    IdleTimeout,
    /// Extra environment variables (a mapping).
    Environment,
    /// Container image (Kubernetes).
    Image,
    /// Backend profile name (Kubernetes pod template overrides).
    Profile,
    /// Python environment (venv or conda prefix) of scheduler and workers (local backend);
    /// only from a `select` option, so users choose among the operator's environments.
    PythonEnv,
}

impl OptionTarget {
    /// Every target, in documentation order.
    pub const ALL: [OptionTarget; 14] = [
        OptionTarget::WorkerCores,
        OptionTarget::WorkerMemory,
        OptionTarget::WorkerThreads,
        OptionTarget::WorkerCoresLimit,
        OptionTarget::WorkerMemoryLimit,
        OptionTarget::SchedulerCores,
        OptionTarget::SchedulerMemory,
        OptionTarget::SchedulerCoresLimit,
        OptionTarget::SchedulerMemoryLimit,
        OptionTarget::IdleTimeout,
        OptionTarget::Environment,
        OptionTarget::Image,
        OptionTarget::Profile,
        OptionTarget::PythonEnv,
    ];

    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            OptionTarget::WorkerCores => "worker_cores",
            OptionTarget::WorkerMemory => "worker_memory",
            OptionTarget::WorkerThreads => "worker_threads",
            OptionTarget::WorkerCoresLimit => "worker_cores_limit",
            OptionTarget::WorkerMemoryLimit => "worker_memory_limit",
            OptionTarget::SchedulerCores => "scheduler_cores",
            OptionTarget::SchedulerMemory => "scheduler_memory",
            OptionTarget::SchedulerCoresLimit => "scheduler_cores_limit",
            OptionTarget::SchedulerMemoryLimit => "scheduler_memory_limit",
            OptionTarget::IdleTimeout => "idle_timeout",
            OptionTarget::Environment => "environment",
            OptionTarget::Image => "image",
            OptionTarget::Profile => "profile",
            OptionTarget::PythonEnv => "python_env",
        }
    }

    /// All names, comma separated (for error messages).
    pub fn names() -> String {
        Self::ALL.map(OptionTarget::as_str).join(", ")
    }
}

impl FromStr for OptionTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown target {s:?}; known targets: {}", Self::names()))
    }
}

impl fmt::Display for OptionTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
