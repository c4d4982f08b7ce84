//! The `cluster` section and the `groups` policies: cluster defaults, timing, limits, quotas
//! and user options; memory sizes in the YAML; merging each group's keys over the `cluster`
//! section; and the checks every such section must pass.

use super::option_target::OptionTarget;
use super::{BackendKind, ConfigError, GatewayConfig, IsolationKind};
use gateway_model::limits::BadMemory;
use gateway_model::{parse_memory, ClusterResources, OptionField, ResourceLimits};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;

/// The most warm schedulers one section may keep.
pub const MAX_WARM_SCHEDULERS: u32 = 100;

/// Cluster defaults, timing, limits and exposed options.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Seconds of idleness after which the scheduler asks to be stopped (0 = never).
    pub idle_timeout: f64,
    /// Seconds after creation at which the gateway stops a cluster, busy or not (0 = never).
    pub max_lifetime: f64,
    /// Seconds a running cluster may have no client connected through the proxy (a notebook
    /// kernel that died, a script that exited without closing it) before the gateway stops
    /// it (0 = never). Workers do not go through the proxy and do not count.
    pub no_client_timeout: f64,
    /// Seconds between scheduler heartbeats.
    pub heartbeat_period: f64,
    /// Seconds without heartbeat before a running cluster is FAILED (default 2 × period).
    pub heartbeat_timeout: Option<f64>,
    /// Seconds between the scheduler's adaptive-scaling decisions.
    pub adaptive_period: f64,
    /// Seconds a scheduler may take to start.
    pub start_timeout: f64,
    /// Consecutive worker start failures after which the cluster is FAILED.
    pub worker_start_failure_limit: u32,
    /// Scheduler cores.
    pub scheduler_cores: f64,
    /// Scheduler memory.
    #[serde(deserialize_with = "memory")]
    pub scheduler_memory: u64,
    /// Cores per worker.
    pub worker_cores: f64,
    /// Memory per worker (`--memory-limit`).
    #[serde(deserialize_with = "memory")]
    pub worker_memory: u64,
    /// Threads per worker (default: cores, at least 1).
    pub worker_threads: Option<u32>,
    /// CPU limit per worker container (Kubernetes; default none).
    pub worker_cores_limit: Option<f64>,
    /// Memory limit per worker container (default: the worker memory).
    #[serde(deserialize_with = "opt_memory")]
    pub worker_memory_limit: Option<u64>,
    /// CPU limit of the scheduler container (Kubernetes; default none).
    pub scheduler_cores_limit: Option<f64>,
    /// Memory limit of the scheduler container (default: the scheduler memory).
    #[serde(deserialize_with = "opt_memory")]
    pub scheduler_memory_limit: Option<u64>,
    /// Container image of scheduler and workers (Kubernetes; default from the backend section).
    pub image: Option<String>,
    /// Backend profile applied to every cluster unless an option picks another (Kubernetes).
    pub profile: Option<String>,
    /// Python environment of every cluster unless an option picks another (local backend;
    /// default: `dask.python_env`).
    pub python_env: Option<String>,
    /// Per-cluster worker cap.
    pub max_workers: Option<u64>,
    /// The maximum of an `adapt()` that names none (none: as many as the caps and quotas allow).
    pub adapt_maximum_default: Option<u64>,
    /// The largest maximum an `adapt()` may name; larger ones are clipped with a warning.
    pub adapt_maximum_max: Option<u64>,
    /// Per-cluster core cap (scheduler + workers).
    pub max_cores: Option<f64>,
    /// Per-cluster memory cap (scheduler + workers).
    #[serde(deserialize_with = "opt_memory")]
    pub max_memory: Option<u64>,
    /// Active (PENDING or RUNNING) clusters one user may have (none = unlimited).
    pub max_clusters_per_user: Option<u64>,
    /// Workers one user may have across all their active clusters.
    pub max_workers_per_user: Option<u64>,
    /// Cores (schedulers + workers) one user may have across all their active clusters.
    pub max_cores_per_user: Option<f64>,
    /// Memory (schedulers + workers) one user may have across all their active clusters.
    #[serde(deserialize_with = "opt_memory")]
    pub max_memory_per_user: Option<u64>,
    /// Environment of schedulers and workers.
    pub environment: BTreeMap<String, String>,
    /// Seconds finished clusters stay listable before they are forgotten.
    pub retention: f64,
    /// Options users may set, in display order.
    pub options: Vec<OptionField>,
    /// Schedulers kept started ahead for this section's users (0 = none): a user whose
    /// scheduler settings match those of the section's defaults gets one at once instead of
    /// waiting for a scheduler to start. See docs/configuration.md, "Warm schedulers".
    pub warm_schedulers: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            idle_timeout: 0.0,
            max_lifetime: 0.0,
            no_client_timeout: 0.0,
            heartbeat_period: 15.0,
            heartbeat_timeout: None,
            adaptive_period: 3.0,
            start_timeout: 60.0,
            worker_start_failure_limit: 3,
            scheduler_cores: 1.0,
            scheduler_memory: 2 << 30,
            worker_cores: 1.0,
            worker_memory: 2 << 30,
            worker_threads: None,
            worker_cores_limit: None,
            worker_memory_limit: None,
            scheduler_cores_limit: None,
            scheduler_memory_limit: None,
            image: None,
            profile: None,
            python_env: None,
            max_workers: None,
            adapt_maximum_default: None,
            adapt_maximum_max: None,
            max_cores: None,
            max_memory: None,
            max_clusters_per_user: None,
            max_workers_per_user: None,
            max_cores_per_user: None,
            max_memory_per_user: None,
            environment: BTreeMap::new(),
            retention: 86400.0,
            options: Vec::new(),
            warm_schedulers: 0,
        }
    }
}

fn memory<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = serde_yaml::Value::deserialize(d)?;
    memory_value(&v).map_err(serde::de::Error::custom)
}

fn opt_memory<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = serde_yaml::Value::deserialize(d)?;
    if v.is_null() {
        return Ok(None);
    }
    memory_value(&v).map(Some).map_err(serde::de::Error::custom)
}

fn memory_value(v: &serde_yaml::Value) -> Result<u64, BadMemory> {
    match v {
        serde_yaml::Value::Number(n) if n.as_u64().is_some() => Ok(n.as_u64().unwrap()),
        serde_yaml::Value::String(s) => parse_memory(s),
        other => Err(BadMemory(format!("{other:?}"))),
    }
}

impl ClusterConfig {
    /// Resources of a cluster with these settings.
    pub fn resources(&self) -> ClusterResources {
        ClusterResources {
            scheduler_cores: self.scheduler_cores,
            scheduler_memory: self.scheduler_memory,
            worker_cores: self.worker_cores,
            worker_memory: self.worker_memory,
        }
    }

    /// Per-container ceilings of a cluster with these settings.
    pub fn container_limits(&self) -> gateway_backend::ContainerLimits {
        gateway_backend::ContainerLimits {
            scheduler_cores: self.scheduler_cores_limit,
            scheduler_memory: self.scheduler_memory_limit,
            worker_cores: self.worker_cores_limit,
            worker_memory: self.worker_memory_limit,
        }
    }

    /// Limits of a cluster with these settings.
    pub fn limits(&self) -> ResourceLimits {
        ResourceLimits {
            max_workers: self.max_workers,
            max_cores: self.max_cores,
            max_memory: self.max_memory,
            adapt_maximum_default: self.adapt_maximum_default,
            adapt_maximum_max: self.adapt_maximum_max,
        }
    }

    /// Worker threads: explicit, or the worker cores rounded down, at least 1.
    pub fn threads(&self) -> u32 {
        self.worker_threads
            .unwrap_or_else(|| (self.worker_cores.floor() as u32).max(1))
    }

    /// Seconds without heartbeat before a running cluster is FAILED.
    pub fn heartbeat_timeout(&self) -> f64 {
        self.heartbeat_timeout
            .unwrap_or(2.0 * self.heartbeat_period)
            .max(1.0)
    }

    /// The timing every backend gives this section's clusters.
    pub fn timing(&self) -> gateway_backend::ClusterTiming {
        gateway_backend::ClusterTiming {
            heartbeat_period: self.heartbeat_period,
            adaptive_period: self.adaptive_period,
            start_timeout: self.start_timeout,
            heartbeat_timeout: self.heartbeat_timeout(),
            worker_start_failure_limit: self.worker_start_failure_limit,
        }
    }
}

/// What one group's users get instead of the `cluster` section's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupPolicy {
    /// The group (as the authenticator or `auth.groups` reports it).
    pub group: String,
    /// Keys of the `cluster` section with other values for this group: options (profiles)
    /// and their bounds, defaults, per-cluster limits, per-user quotas, lifetimes. Keys not
    /// given keep the `cluster` section's value.
    #[serde(default)]
    pub cluster: serde_yaml::Mapping,
}

/// Keys of the `cluster` section the gateway applies to every cluster alike (the timing every
/// scheduler is started with and judged by, and how long finished clusters are kept), so a
/// group policy may not set them.
const GATEWAY_WIDE_KEYS: [&str; 6] = [
    "heartbeat_period",
    "heartbeat_timeout",
    "adaptive_period",
    "start_timeout",
    "worker_start_failure_limit",
    "retention",
];

impl GatewayConfig {
    /// The cluster settings of each group policy, in priority order: the `cluster` section
    /// with the policy's keys replaced, each checked like the `cluster` section.
    pub(super) fn group_clusters(&self) -> Result<Vec<(String, ClusterConfig)>, ConfigError> {
        let base = match serde_yaml::to_value(&self.cluster) {
            Ok(serde_yaml::Value::Mapping(m)) => m,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "cannot merge group policies over the cluster section: {other:?}"
                )))
            }
        };
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(self.groups.len());
        for policy in &self.groups {
            let section = format!("groups[{}].cluster", policy.group);
            if policy.group.is_empty() {
                return Err(ConfigError::Invalid(
                    "groups: an entry has an empty group name".into(),
                ));
            }
            if !seen.insert(&policy.group) {
                return Err(ConfigError::Invalid(format!(
                    "groups: {} is listed twice",
                    policy.group
                )));
            }
            if let Some(key) = policy.cluster.keys().find_map(|k| {
                k.as_str()
                    .filter(|k| GATEWAY_WIDE_KEYS.contains(k))
                    .map(str::to_string)
            }) {
                return Err(ConfigError::Invalid(format!(
                    "{section}.{key}: set for the whole gateway, in the cluster section; a group policy cannot change it"
                )));
            }
            let mut merged = base.clone();
            for (k, v) in &policy.cluster {
                merged.insert(k.clone(), v.clone());
            }
            let config: ClusterConfig = serde_yaml::from_value(serde_yaml::Value::Mapping(merged))
                .map_err(|e| ConfigError::Invalid(format!("{section}: {e}")))?;
            self.validate_cluster(&config, &section)?;
            out.push((policy.group.clone(), config));
        }
        Ok(out)
    }

    /// The checks of one cluster section (`cluster`, or a group's merged one).
    pub(super) fn validate_cluster(
        &self,
        c: &ClusterConfig,
        section: &str,
    ) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if let Some(v) = c.max_cores_per_user {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!(
                    "{section}.max_cores_per_user must be a positive number, got {v}"
                ));
            }
        }
        for (name, v) in [
            ("heartbeat_period", c.heartbeat_period),
            ("adaptive_period", c.adaptive_period),
            ("start_timeout", c.start_timeout),
            ("worker_cores", c.worker_cores),
            ("scheduler_cores", c.scheduler_cores),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!(
                    "{section}.{name} must be a positive number, got {v}"
                ));
            }
        }
        if let Some(t) = c.heartbeat_timeout {
            // A scheduler heartbeats once per period: a shorter timeout fails every cluster
            // between two heartbeats.
            if !(t.is_finite() && t > c.heartbeat_period) {
                return bad(format!(
                    "{section}.heartbeat_timeout must be longer than heartbeat_period ({} s), got {t}",
                    c.heartbeat_period
                ));
            }
        }
        for (name, v) in [
            ("idle_timeout", c.idle_timeout),
            ("max_lifetime", c.max_lifetime),
            ("no_client_timeout", c.no_client_timeout),
            ("retention", c.retention),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!(
                    "{section}.{name} must be a non-negative number, got {v}"
                ));
            }
        }
        if c.worker_memory == 0 {
            return bad(format!("{section}.worker_memory must be positive"));
        }
        if let (Some(default), Some(max)) = (c.adapt_maximum_default, c.adapt_maximum_max) {
            if default > max {
                return bad(format!(
                    "{section}.adapt_maximum_default ({default}) may not exceed adapt_maximum_max ({max})"
                ));
            }
        }
        if c.warm_schedulers > MAX_WARM_SCHEDULERS {
            return bad(format!(
                "{section}.warm_schedulers may be at most {MAX_WARM_SCHEDULERS}, got {}",
                c.warm_schedulers
            ));
        }
        if c.warm_schedulers > 0
            && self.backend == BackendKind::Local
            && self.dask.isolation != IsolationKind::None
        {
            return bad(format!(
                "{section}.warm_schedulers needs dask.isolation: none (a warm scheduler is \
                 started before anyone claims it, so it cannot run under its user's account)"
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &c.options {
            f.check_declaration()
                .map_err(|e| ConfigError::Invalid(format!("{section}.options: {}", e.0)))?;
            if !seen.insert(&f.field) {
                return bad(format!(
                    "{section}.options: field {} is declared twice",
                    f.field
                ));
            }
            if let Some(t) = &f.target {
                let target = match t.parse::<OptionTarget>() {
                    Ok(t) => t,
                    Err(e) => return bad(format!("{section}.options: {} has {e}", f.field)),
                };
                if target == OptionTarget::PythonEnv {
                    self.check_python_env_option(f)?;
                }
            }
        }
        c.limits()
            .check_scheduler(&c.resources())
            .map_err(|e| ConfigError::Invalid(format!("{section}: {e}")))?;
        if let (Some(env), BackendKind::Local) = (&c.python_env, self.backend) {
            gateway_local::Launcher::check_python_env(env)
                .map_err(|e| ConfigError::Invalid(format!("{section}.python_env: {e}")))?;
        }
        Ok(())
    }

    /// A `python_env` option: a `select` whose valued choices are Python environments with
    /// `bin/dask` (users pick among the operator's environments, never a path of their own).
    fn check_python_env_option(&self, f: &OptionField) -> Result<(), ConfigError> {
        let gateway_model::OptionKind::Select { options, .. } = &f.kind else {
            return Err(ConfigError::Invalid(format!(
                "option {} targets python_env, which only a select option may do",
                f.field
            )));
        };
        if self.backend != BackendKind::Local {
            return Ok(());
        }
        for choice in options {
            if let gateway_model::SelectChoice::Valued { value, .. } = choice {
                let env = value.as_str().unwrap_or_default();
                gateway_local::Launcher::check_python_env(env).map_err(|e| {
                    ConfigError::Invalid(format!("option {} choice {}: {e}", f.field, choice.key()))
                })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_env_options_are_selects_of_real_environments() {
        let env = std::env::temp_dir().join(format!("dgrs-pyenv-{}", std::process::id()));
        std::fs::create_dir_all(env.join("bin")).unwrap();
        std::fs::write(env.join("bin/dask"), "#!/bin/sh\n").unwrap();
        let yaml = |kind: &str, value: &str| {
            format!(
                "cluster: {{options: [{{field: py, type: {kind}, default: a, {choices} target: python_env}}]}}",
                choices = if kind == "select" {
                    format!("options: [a, {{key: b, value: '{value}'}}],")
                } else {
                    String::new()
                }
            )
        };
        let ok: GatewayConfig =
            serde_yaml::from_str(&yaml("select", env.to_str().unwrap())).unwrap();
        ok.validate().unwrap();
        let missing: GatewayConfig =
            serde_yaml::from_str(&yaml("select", "/nonexistent/env")).unwrap();
        assert!(missing
            .validate()
            .unwrap_err()
            .to_string()
            .contains("has no bin/dask"));
        let free_text: GatewayConfig = serde_yaml::from_str(&yaml("string", "")).unwrap();
        assert!(free_text
            .validate()
            .unwrap_err()
            .to_string()
            .contains("only a select option may do"));
        let _ = std::fs::remove_dir_all(env);
    }

    #[test]
    fn the_gateways_own_python_env_must_be_real() {
        let config = |env: &str| -> GatewayConfig {
            serde_yaml::from_str(&format!("dask: {{python_env: '{env}'}}")).unwrap()
        };
        let err = config("/nonexistent/env")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("dask.python_env: "), "{err}");
        assert!(err.contains("has no bin/dask"), "{err}");
        assert!(config("relative/env").validate().is_err());
        let env = std::env::temp_dir().join(format!("dgrs-own-pyenv-{}", std::process::id()));
        std::fs::create_dir_all(env.join("bin")).unwrap();
        std::fs::write(env.join("bin/dask"), "#!/bin/sh\n").unwrap();
        config(env.to_str().unwrap()).validate().unwrap();
        // On Kubernetes the image holds the environment: the gateway's own path is not used.
        let mut kube = config("/nonexistent/env");
        kube.backend = BackendKind::Kubernetes;
        kube.api_url = Some("http://gw:8000/api".into());
        assert!(!kube
            .validate()
            .err()
            .is_some_and(|e| e.to_string().contains("python_env")));
        let _ = std::fs::remove_dir_all(env);
    }

    #[test]
    fn a_heartbeat_timeout_must_outlast_the_heartbeat_period() {
        let config = |yaml: &str| -> GatewayConfig { serde_yaml::from_str(yaml).unwrap() };
        let err = config("cluster: {heartbeat_period: 5, heartbeat_timeout: 3}")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(
                "cluster.heartbeat_timeout must be longer than heartbeat_period (5 s), got 3"
            ),
            "{err}"
        );
        assert!(
            config("cluster: {heartbeat_period: 5, heartbeat_timeout: 5}")
                .validate()
                .is_err()
        );
        config("cluster: {heartbeat_period: 5, heartbeat_timeout: 12}")
            .validate()
            .unwrap();
        config("cluster: {heartbeat_period: 5}").validate().unwrap();
    }

    #[test]
    fn group_policies_cannot_set_what_applies_to_every_cluster() {
        let config = |yaml: &str| -> GatewayConfig { serde_yaml::from_str(yaml).unwrap() };
        let err = config("groups: [{group: g, cluster: {idle_timeout: 60, heartbeat_period: 30}}]")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(
                "groups[g].cluster.heartbeat_period: set for the whole gateway, in the cluster \
                 section; a group policy cannot change it"
            ),
            "{err}"
        );
        config("groups: [{group: g, cluster: {idle_timeout: 60}}]")
            .validate()
            .unwrap();
    }
}
