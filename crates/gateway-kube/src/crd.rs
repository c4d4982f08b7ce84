//! The `DaskCluster` custom resource (`dask-gateway-rs.io/v1alpha1`).
//!
//! The gateway writes the spec (what the user asked for, fully resolved at creation, so the
//! controller needs no gateway configuration), and later only `replicas`/`retiredWorkers` (from
//! heartbeats) and `active`/`stop` (on DELETE). The controller writes only the status. The CRD
//! YAML the Helm chart installs is generated from these types by the `crdgen` binary.

use gateway_backend::ClusterSettings;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// API group of the custom resource.
pub const GROUP: &str = "dask-gateway-rs.io";
/// API version of the custom resource.
pub const VERSION: &str = "v1alpha1";

fn default_true() -> bool {
    true
}

/// Schema of a free-form JSON object (kept as is by the API server).
fn free_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Schema of an optional free-form JSON object.
fn optional_free_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Schema of a list of free-form JSON objects (tolerations, env entries, ...).
fn free_object_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
    })
}

/// One Dask cluster of one user: a scheduler pod, its Service and credentials Secret, and
/// `replicas` worker pods.
// The printer columns repeat `type_`: not a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "dask-gateway-rs.io",
    version = "v1alpha1",
    kind = "DaskCluster",
    plural = "daskclusters",
    singular = "daskcluster",
    shortname = "dgc",
    category = "dask",
    namespaced,
    status = "DaskClusterStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas"
    ),
    printcolumn(name = "User", type_ = "string", json_path = ".spec.user"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Workers", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(
        name = "Wanted",
        type_ = "integer",
        json_path = ".spec.replicas",
        priority = 1
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DaskClusterSpec {
    /// The owner's user name, as authenticated by the gateway (any string).
    #[schemars(length(min = 1))]
    pub user: String,
    /// The validated cluster options, as reported to the user.
    #[schemars(schema_with = "free_object")]
    pub options: Map<String, Value>,
    /// Resolved settings: resources, threads, per-cluster limits, environment, idle timeout.
    pub settings: ClusterSettings,
    /// Shape of the scheduler pod.
    #[serde(default)]
    pub scheduler: PodTemplate,
    /// Shape of every worker pod.
    #[serde(default)]
    pub worker: PodTemplate,
    /// Image, gateway address and timing used by the pods.
    pub runtime: RuntimeSpec,
    /// Wanted number of workers (the scheduler's count after the cluster's cap).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// `false` asks the controller to stop the cluster.
    #[serde(default = "default_true")]
    pub active: bool,
    /// Workers the scheduler reports gone; their pods are deleted by name if still there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_workers: Vec<String>,
    /// Why the cluster is to stop (with `active: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopSpec>,
    /// Set while the cluster is an unclaimed member of a warm pool: the pool's key. `user` is
    /// a placeholder then; a gateway that hands the cluster to a user replaces both at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// Why a cluster is being stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StopSpec {
    /// Human-readable reason.
    pub reason: String,
    /// End as `Failed` instead of `Stopped`.
    #[serde(default)]
    pub failed: bool,
}

/// What every pod of the cluster runs with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSpec {
    /// Container image with Python, dask, distributed and dask-gateway (for the preload).
    #[schemars(length(min = 1))]
    pub image: String,
    /// `imagePullPolicy` of the containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// Names of image pull Secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
    /// ServiceAccount of the pods (none: the namespace default, with its token not mounted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// `DASK_GATEWAY_API_URL`: where the scheduler reaches the gateway API (ends in `/api`).
    #[schemars(length(min = 1))]
    pub api_url: String,
    /// `--dg-heartbeat-period` in seconds.
    pub heartbeat_period: f64,
    /// `--dg-adaptive-period` in seconds.
    pub adaptive_period: f64,
    /// Seconds the scheduler may take to become ready before the cluster fails.
    pub start_timeout: f64,
    /// Worker pods failing in a row after which the cluster fails.
    #[schemars(range(min = 1))]
    pub worker_failure_limit: u32,
    /// Grace period of deleted pods, in seconds.
    #[schemars(range(min = 0))]
    pub termination_grace_period_seconds: i64,
    /// `securityContext` of every pod (user, group, `fsGroup`, seccomp profile, ...). The
    /// credentials volume is readable by the pod's `fsGroup`, so one is always set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_free_object")]
    pub pod_security_context: Option<Value>,
    /// `securityContext` of every Dask container (read-only root filesystem, capabilities, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_free_object")]
    pub security_context: Option<Value>,
}

/// Pod template pieces for the scheduler or the workers (Kubernetes field names and shapes).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodTemplate {
    /// `nodeSelector` of the pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// `tolerations` of the pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "free_object_list")]
    pub tolerations: Vec<Value>,
    /// `affinity` of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_free_object")]
    pub affinity: Option<Value>,
    /// Extra labels on the pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on the pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra `env` entries of the container (after the gateway's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "free_object_list")]
    pub env: Vec<Value>,
    /// Extra container `resources`, merged over the requests and limits derived from the
    /// cluster's cores and memory (e.g. `{limits: {nvidia.com/gpu: 1}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_free_object")]
    pub resources: Option<Value>,
    /// Extra `volumes` of the pod, after the gateway's own (`dask-credentials`, `dask-tmp`):
    /// a shared data volume, a PersistentVolumeClaim, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "free_object_list")]
    pub volumes: Vec<Value>,
    /// Extra `volumeMounts` of the Dask container, after the gateway's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "free_object_list")]
    pub volume_mounts: Vec<Value>,
    /// Fields deep-merged into the pod spec last (anything the keys above do not cover; a list
    /// here replaces the gateway's list, so add volumes with `volumes`, not here).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    #[schemars(schema_with = "free_object")]
    pub extra_pod_config: Map<String, Value>,
    /// Fields deep-merged into the Dask container last.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    #[schemars(schema_with = "free_object")]
    pub extra_container_config: Map<String, Value>,
}

impl PodTemplate {
    /// This template with `over` applied on top: maps are merged key by key, lists and
    /// optional values of `over` win when set, the extra configs are deep-merged.
    pub fn overlaid(&self, over: &PodTemplate) -> PodTemplate {
        let mut out = self.clone();
        out.node_selector.extend(over.node_selector.clone());
        if !over.tolerations.is_empty() {
            out.tolerations = over.tolerations.clone();
        }
        if over.affinity.is_some() {
            out.affinity = over.affinity.clone();
        }
        out.labels.extend(over.labels.clone());
        out.annotations.extend(over.annotations.clone());
        out.env.extend(over.env.clone());
        out.volumes.extend(over.volumes.clone());
        out.volume_mounts.extend(over.volume_mounts.clone());
        out.resources = match (&self.resources, &over.resources) {
            (Some(a), Some(b)) => {
                let mut a = a.clone();
                deep_merge(&mut a, b);
                Some(a)
            }
            (a, b) => b.clone().or(a.clone()),
        };
        let mut pod = Value::Object(out.extra_pod_config);
        deep_merge(&mut pod, &Value::Object(over.extra_pod_config.clone()));
        out.extra_pod_config = into_map(pod);
        let mut container = Value::Object(out.extra_container_config);
        deep_merge(
            &mut container,
            &Value::Object(over.extra_container_config.clone()),
        );
        out.extra_container_config = into_map(container);
        out
    }
}

fn into_map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Merges `over` into `base`: objects key by key (recursively), anything else replaced.
pub fn deep_merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) => deep_merge(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Lifecycle phase of a DaskCluster (its public status, upper-cased, in the REST API).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Created; the scheduler is starting.
    #[default]
    Pending,
    /// The scheduler is ready and reachable.
    Running,
    /// Its pods are being deleted.
    Stopping,
    /// Ended on request.
    Stopped,
    /// Ended by a failure.
    Failed,
}

impl Phase {
    /// `Stopped` or `Failed`.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Stopped | Phase::Failed)
    }
}

/// Where the scheduler listens (its pod IP; the gateway proxies to it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusAddresses {
    /// `tls://<ip>:8786`.
    pub scheduler: String,
    /// `http://<ip>:8787`.
    pub dashboard: String,
    /// `http://<ip>:8788`.
    pub api: String,
}

/// A worker pod that ended in failure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerFailure {
    /// The pod's name (also the Dask worker's name).
    pub pod: String,
    /// The container's termination reason (`OOMKilled`, `Error`, ...), or the pod's when
    /// Kubernetes ended it without one (`Evicted`).
    pub reason: String,
    /// The container's exit code (137 for a kill).
    pub exit_code: i32,
    /// What happened, for people.
    pub message: String,
    /// When it ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// A status condition, as Kubernetes tools display them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `SchedulerReady` or `WorkersReady`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word.
    pub reason: String,
    /// Details for people.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time of the last change of `status`.
    pub last_transition_time: String,
}

/// What the controller observed and did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DaskClusterStatus {
    /// Lifecycle phase.
    #[serde(default)]
    pub phase: Phase,
    /// Why it stopped or failed, or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// While `Stopping`: end as `Failed` (a failure) rather than `Stopped`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stop_failed: bool,
    /// Name of the Secret with `dask.crt`, `dask.pem` and `api-token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
    /// Name of the scheduler pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_pod: Option<String>,
    /// Name of the scheduler's Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Scheduler addresses, set while `Running`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<StatusAddresses>,
    /// Worker pods that exist and have not finished.
    #[serde(default)]
    pub replicas: i32,
    /// Worker pods that are ready.
    #[serde(default)]
    pub ready_workers: i32,
    /// Worker pods that failed in a row before they had run for long (start failures).
    #[serde(default)]
    pub worker_failures: u32,
    /// The last worker pod that ended in failure, and why (e.g. `OOMKilled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_worker_failure: Option<WorkerFailure>,
    /// `SchedulerReady` and `WorkersReady`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the scheduler became ready (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// When stopping began (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopping_since: Option<String>,
    /// When it reached `Stopped` or `Failed` (RFC 3339, milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Usage accounting: the cores and memory its running pods request, and the core- and
    /// memory-seconds they accrued per hour. Written when the running pods change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<gateway_model::UsageLedger>,
}

/// Rewrites schema formats the API server does not know (`uint64` and friends, from unsigned
/// Rust integers) to the ones it does; `minimum: 0` still keeps them non-negative.
fn known_formats(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::String(f)) = map.get_mut("format") {
                match f.as_str() {
                    "uint64" | "uint" => *f = "int64".into(),
                    "uint32" | "uint16" | "uint8" => *f = "int32".into(),
                    _ => {}
                }
            }
            map.values_mut().for_each(known_formats);
        }
        Value::Array(items) => items.iter_mut().for_each(known_formats),
        _ => {}
    }
}

/// The CRD as YAML, exactly as the chart's `files/daskcluster-crd.yaml` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let mut crd = serde_json::to_value(DaskCluster::crd()).expect("the CRD serialises");
    known_formats(&mut crd);
    let body = serde_yaml::to_string(&crd).expect("the CRD serialises");
    format!(
        "# Generated by `cargo run -p gateway-kube --bin crdgen`; do not edit.\n# The DaskCluster custom resource of dask-gateway-rs.\n{body}"
    )
}

/// Drops from a watched DaskCluster what the controller's cache does not need: the server's
/// field-ownership records always, and for a finished cluster (kept for the retention, 24 h
/// by default) its pod templates and retired-worker list too; the controller only deletes
/// what is left of it and, past the retention, the object.
pub fn slim_for_controller(dc: &mut DaskCluster) {
    dc.metadata.managed_fields = None;
    if dc.status.as_ref().is_some_and(|s| s.phase.is_terminal()) {
        dc.spec.scheduler = PodTemplate::default();
        dc.spec.worker = PodTemplate::default();
        dc.spec.retired_workers = Vec::new();
    }
}

/// Drops from a DaskCluster what the gateway's API cache never reads: the server's
/// field-ownership records, the pod templates and the retired-worker list (the API shows
/// owner, status, options, settings and addresses; the controller builds pods from its own).
pub fn slim_for_api(dc: &mut DaskCluster) {
    dc.metadata.managed_fields = None;
    dc.spec.scheduler = PodTemplate::default();
    dc.spec.worker = PodTemplate::default();
    dc.spec.retired_workers = Vec::new();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn caches_keep_what_their_readers_need() {
        let mut dc = crate::build::tests::cluster("c1");
        dc.spec.worker = serde_json::from_value(json!({"nodeSelector": {"a": "1"}})).unwrap();
        dc.spec.retired_workers = vec!["w1".into()];
        dc.metadata.managed_fields = Some(vec![Default::default()]);
        // A running cluster keeps its templates in the controller's cache.
        let mut running = dc.clone();
        running.status = Some(DaskClusterStatus {
            phase: Phase::Running,
            ..Default::default()
        });
        slim_for_controller(&mut running);
        assert_eq!(running.metadata.managed_fields, None);
        assert_eq!(running.spec.worker, dc.spec.worker);
        assert_eq!(running.spec.retired_workers, ["w1"]);
        // A finished one keeps only what the API shows.
        let mut done = running.clone();
        done.status.as_mut().unwrap().phase = Phase::Stopped;
        slim_for_controller(&mut done);
        assert_eq!(done.spec.worker, PodTemplate::default());
        assert!(done.spec.retired_workers.is_empty());
        assert_eq!(done.spec.settings, dc.spec.settings);
        // The API's cache never needs templates.
        let mut api = dc.clone();
        slim_for_api(&mut api);
        assert_eq!(api.spec.worker, PodTemplate::default());
        assert_eq!(
            (api.spec.user, api.spec.options),
            (dc.spec.user, dc.spec.options)
        );
    }

    #[test]
    fn overlay_merges_maps_and_replaces_lists() {
        let base: PodTemplate = serde_json::from_value(json!({
            "nodeSelector": {"a": "1"},
            "tolerations": [{"key": "x"}],
            "resources": {"limits": {"cpu": "1"}},
            "extraPodConfig": {"priorityClassName": "low", "securityContext": {"runAsUser": 1000}}
        }))
        .unwrap();
        let over: PodTemplate = serde_json::from_value(json!({
            "nodeSelector": {"gpu": "yes"},
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "extraPodConfig": {"securityContext": {"fsGroup": 100}}
        }))
        .unwrap();
        let t = base.overlaid(&over);
        assert_eq!(t.node_selector.len(), 2);
        assert_eq!(t.tolerations, vec![json!({"key": "x"})]);
        assert_eq!(
            t.resources,
            Some(json!({"limits": {"cpu": "1", "nvidia.com/gpu": 1}}))
        );
        assert_eq!(
            Value::Object(t.extra_pod_config),
            json!({"priorityClassName": "low", "securityContext": {"runAsUser": 1000, "fsGroup": 100}})
        );
    }

    #[test]
    fn templates_refuse_unknown_keys() {
        assert!(serde_json::from_value::<PodTemplate>(json!({"nodeSelectr": {}})).is_err());
    }

    #[test]
    fn crd_has_a_structural_schema_and_subresources() {
        let y = crd_yaml();
        let crd: Value = serde_yaml::from_str(&y).unwrap();
        let v = &crd["spec"]["versions"][0];
        assert_eq!(crd["spec"]["group"], "dask-gateway-rs.io");
        assert_eq!(v["name"], "v1alpha1");
        assert!(v["subresources"]["status"].is_object());
        assert_eq!(
            v["subresources"]["scale"]["specReplicasPath"],
            ".spec.replicas"
        );
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let required: Vec<&str> = spec["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        for field in ["user", "options", "settings", "runtime"] {
            assert!(required.contains(&field), "{field} required: {required:?}");
        }
        assert_eq!(
            spec["properties"]["replicas"]["minimum"].as_f64(),
            Some(0.0)
        );
        // No `anyOf`/`$ref` left: the API server only takes structural schemas; and only
        // formats it knows.
        assert!(!y.contains("$ref") && !y.contains("anyOf"), "{y}");
        assert!(!y.contains("format: uint"), "{y}");
    }
}
