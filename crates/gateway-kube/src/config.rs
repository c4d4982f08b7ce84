//! The `kubernetes:` section of the gateway configuration.

use crate::crd::PodTemplate;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Settings of the Kubernetes backend and its controller.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubeConfig {
    /// Namespace of the DaskCluster objects and their pods (default: the namespace of the
    /// in-cluster service account, else of the kubeconfig context, else `default`).
    pub namespace: Option<String>,
    /// Installation id: the `dask-gateway-rs.io/instance` label on everything this gateway makes;
    /// every watch selects on it, so several installations can share a namespace.
    pub instance: String,
    /// Image of scheduler and worker pods (Python with dask, distributed and dask-gateway).
    pub image: String,
    /// `imagePullPolicy` of the Dask containers.
    pub image_pull_policy: Option<String>,
    /// Image pull Secrets of the pods.
    pub image_pull_secrets: Vec<String>,
    /// ServiceAccount of the Dask pods (default: none, and no API token mounted).
    pub service_account: Option<String>,
    /// Scheduler pod template.
    pub scheduler: PodTemplate,
    /// Worker pod template.
    pub worker: PodTemplate,
    /// Named overrides picked by the `profile` setting (a cluster option can target it).
    pub profiles: BTreeMap<String, Profile>,
    /// Grace period of deleted Dask pods, in seconds.
    pub termination_grace_period_seconds: i64,
    /// `securityContext` of Dask pods (Kubernetes field names). Default: non-root as uid and
    /// gid 1000 (the Dask image's user), `fsGroup` 1000, seccomp `RuntimeDefault`. `{}` sets
    /// none; an `fsGroup` is always added so the credentials volume stays readable.
    pub pod_security_context: Value,
    /// `securityContext` of Dask containers. Default: read-only root filesystem (pods get a
    /// writable emptyDir at `/tmp`), no privilege escalation, every capability dropped.
    pub security_context: Value,
    /// Run the controller inside the gateway process (otherwise run `gateway-server controller`).
    pub controller: bool,
    /// Elect one controller among replicas with a Lease (always on in production; tests may
    /// turn it off).
    pub leader_election: bool,
    /// Controller: API write requests per second (token bucket rate).
    pub api_qps: f64,
    /// Controller: API write burst (token bucket size).
    pub api_burst: u32,
    /// Controller: clusters reconciled at the same time. A pass that waits for write tokens
    /// keeps its place, and the clusters take turns at the tokens, so this should exceed the
    /// clusters that scale up at the same time.
    pub reconcile_concurrency: u16,
    /// Controller: worker pods created per reconcile of one cluster (one big scale-up then
    /// proceeds in slices and never holds back other clusters).
    pub worker_batch: usize,
    /// Controller: seconds finished DaskClusters are kept before they are deleted.
    pub completed_cluster_max_age: f64,
}

/// A named set of pod template overrides (for example a GPU profile).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Profile {
    /// Image instead of the default one.
    pub image: Option<String>,
    /// Overrides of the scheduler template.
    pub scheduler: PodTemplate,
    /// Overrides of the worker template.
    pub worker: PodTemplate,
}

/// The default `securityContext` of Dask pods.
pub fn default_pod_security_context() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// The default `securityContext` of Dask containers.
pub fn default_security_context() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

impl Default for KubeConfig {
    fn default() -> Self {
        KubeConfig {
            namespace: None,
            instance: "dask-gateway".into(),
            image: "ghcr.io/dask-gateway-rs/dask:2026.11.0".into(),
            image_pull_policy: None,
            image_pull_secrets: Vec::new(),
            service_account: None,
            scheduler: PodTemplate::default(),
            worker: PodTemplate::default(),
            profiles: BTreeMap::new(),
            termination_grace_period_seconds: 10,
            pod_security_context: default_pod_security_context(),
            security_context: default_security_context(),
            controller: true,
            leader_election: true,
            api_qps: 50.0,
            api_burst: 100,
            reconcile_concurrency: 64,
            worker_batch: 100,
            completed_cluster_max_age: 86400.0,
        }
    }
}

impl KubeConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        let label_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.ends_with(|c: char| c.is_ascii_alphanumeric())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !label_ok(&self.instance) {
            return Err(format!(
                "kubernetes.instance {:?} must be a valid label value (1-63 of [A-Za-z0-9._-], alphanumeric at both ends)",
                self.instance
            ));
        }
        if let Some(ns) = &self.namespace {
            let ok = !ns.is_empty()
                && ns.len() <= 63
                && ns
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !ns.starts_with('-')
                && !ns.ends_with('-');
            if !ok {
                return Err(format!(
                    "kubernetes.namespace {ns:?} is not a valid namespace name"
                ));
            }
        }
        if self.image.trim().is_empty() {
            return Err("kubernetes.image must not be empty".into());
        }
        if !(self.api_qps.is_finite() && self.api_qps > 0.0) || self.api_burst == 0 {
            return Err("kubernetes.api_qps and api_burst must be positive".into());
        }
        if self.reconcile_concurrency == 0 || self.worker_batch == 0 {
            return Err(
                "kubernetes.reconcile_concurrency and worker_batch must be positive".into(),
            );
        }
        if self.termination_grace_period_seconds < 0 {
            return Err("kubernetes.termination_grace_period_seconds must not be negative".into());
        }
        if !(self.completed_cluster_max_age.is_finite() && self.completed_cluster_max_age >= 0.0) {
            return Err("kubernetes.completed_cluster_max_age must not be negative".into());
        }
        for (key, value, check) in [
            (
                "pod_security_context",
                &self.pod_security_context,
                check_as::<k8s_openapi::api::core::v1::PodSecurityContext> as fn(&Value) -> _,
            ),
            (
                "security_context",
                &self.security_context,
                check_as::<k8s_openapi::api::core::v1::SecurityContext>,
            ),
        ] {
            check(value)
                .map_err(|e| format!("kubernetes.{key} is not a valid securityContext: {e}"))?;
        }
        Ok(())
    }
}

/// Whether `value` (an object, or null for none) parses as the Kubernetes type `T`.
fn check_as<T: serde::de::DeserializeOwned>(value: &Value) -> Result<(), String> {
    if !(value.is_object() || value.is_null()) {
        return Err("expected a mapping".into());
    }
    serde_json::from_value::<T>(value.clone())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_templates_and_profiles() {
        let c: KubeConfig = serde_yaml::from_str(
            r#"
namespace: dask
image: example.org/dask:1
worker:
  nodeSelector: {pool: workers}
  tolerations: [{key: dedicated, operator: Equal, value: dask, effect: NoSchedule}]
profiles:
  gpu:
    worker: {resources: {limits: {nvidia.com/gpu: 1}}}
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.worker.node_selector["pool"], "workers");
        assert!(c.profiles["gpu"].worker.resources.is_some());
        assert!(serde_yaml::from_str::<KubeConfig>("imag: x").is_err());
        let bad: KubeConfig = serde_yaml::from_str("instance: 'a b'").unwrap();
        assert!(bad.validate().is_err());
        let bad: KubeConfig = serde_yaml::from_str("namespace: Dask").unwrap();
        assert!(bad.validate().is_err());
    }
}
