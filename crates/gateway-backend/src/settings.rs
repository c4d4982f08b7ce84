//! What one cluster runs with, resolved once at creation from the operator's configuration and
//! the user's options, and stored with the cluster (so later configuration changes never alter a
//! running cluster).

use gateway_model::{ClusterResources, ResourceLimits};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Everything that decides how one cluster runs, whatever the backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ClusterSettings {
    /// Cores and memory the scheduler and each worker ask for (Kubernetes requests; on the local
    /// backend the worker memory is also `--memory-limit`).
    pub resources: ClusterResources,
    /// Optional hard ceilings per container (Kubernetes limits). Unset: memory is limited to
    /// its request, cores are not limited.
    #[serde(default)]
    pub container_limits: ContainerLimits,
    /// `--nthreads` of each worker.
    pub worker_threads: u32,
    /// Per-cluster caps on scheduler plus workers (wire-protocol section 8).
    pub limits: ResourceLimits,
    /// `--dg-idle-timeout` in seconds (0 = never).
    pub idle_timeout: f64,
    /// Seconds after creation at which the gateway stops the cluster (0 = never).
    #[serde(default)]
    pub max_lifetime: f64,
    /// Seconds a running cluster may go without any client connected through the proxy
    /// before the gateway stops it (0 = never).
    #[serde(default)]
    pub no_client_timeout: f64,
    /// The group policy the cluster was created under (`None`: the default `cluster` section);
    /// its per-user quotas apply to the cluster's scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Environment of scheduler and workers (operator defaults merged with user options).
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Container image of scheduler and workers (Kubernetes; ignored by the local backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Name of a backend profile chosen by an option (Kubernetes: pod template overrides such
    /// as GPUs or node selectors; ignored by the local backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// A Python environment (venv or conda prefix) whose `bin/dask` runs scheduler and workers
    /// (local backend; on Kubernetes the image plays this part).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python_env: Option<String>,
}

/// Per-container ceilings; `None` means "the default rule" (see [`ClusterSettings`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContainerLimits {
    /// Scheduler CPU limit in cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_cores: Option<f64>,
    /// Scheduler memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_memory: Option<u64>,
    /// Worker CPU limit in cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_cores: Option<f64>,
    /// Worker memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_memory: Option<u64>,
}

impl ClusterSettings {
    /// Memory a worker may use: its container limit if set, else its request. This is the
    /// worker's `--memory-limit`, so Dask spills and pauses before the kernel kills it.
    pub fn worker_memory_limit(&self) -> u64 {
        self.container_limits
            .worker_memory
            .unwrap_or(self.resources.worker_memory)
    }

    /// Memory the scheduler may use: its container limit if set, else its request.
    pub fn scheduler_memory_limit(&self) -> u64 {
        self.container_limits
            .scheduler_memory
            .unwrap_or(self.resources.scheduler_memory)
    }

    /// The effective worker cap of this cluster (`None` = no cap).
    pub fn worker_cap(&self) -> Option<u64> {
        self.limits.worker_cap(&self.resources)
    }

    /// A small, valid set of settings (tests and examples).
    pub fn example() -> Self {
        ClusterSettings {
            resources: ClusterResources {
                scheduler_cores: 1.0,
                scheduler_memory: 1 << 30,
                worker_cores: 1.0,
                worker_memory: 1 << 30,
            },
            container_limits: ContainerLimits::default(),
            worker_threads: 1,
            limits: ResourceLimits::default(),
            idle_timeout: 0.0,
            max_lifetime: 0.0,
            no_client_timeout: 0.0,
            policy: None,
            environment: BTreeMap::new(),
            image: None,
            profile: None,
            python_env: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_records_without_new_fields_still_load() {
        let json = r#"{"resources":{"scheduler_cores":1.0,"scheduler_memory":1,"worker_cores":1.0,
            "worker_memory":2},"worker_threads":1,"limits":{"max_workers":null,"max_cores":null,
            "max_memory":null},"idle_timeout":0.0,"environment":{}}"#;
        let s: ClusterSettings = serde_json::from_str(json).unwrap();
        assert_eq!(s.container_limits, ContainerLimits::default());
        assert_eq!(s.worker_memory_limit(), 2);
        assert_eq!(s.image, None);
    }

    #[test]
    fn memory_limit_prefers_the_container_limit() {
        let mut s = ClusterSettings::example();
        assert_eq!(s.worker_memory_limit(), 1 << 30);
        s.container_limits.worker_memory = Some(3 << 30);
        assert_eq!(s.worker_memory_limit(), 3 << 30);
    }
}
