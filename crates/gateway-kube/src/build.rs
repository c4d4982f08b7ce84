//! Pure builders of a cluster's child objects: credentials Secret, scheduler Pod, Service and
//! worker Pods, from the DaskCluster alone. Every child carries the cluster's labels and an owner
//! reference to the DaskCluster, so deleting the DaskCluster removes everything.

use crate::crd::{deep_merge, DaskCluster, PodTemplate};
use crate::names::{self, API_PORT, CREDENTIALS_DIR, DASHBOARD_PORT, SCHEDULER_PORT};
use gateway_backend::ClusterCredentials;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::ByteString;
use kube::{Resource, ResourceExt};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Why a child object could not be built (the cluster fails with this reason).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The DaskCluster has no namespace or name (never true for objects from the API).
    #[error("the DaskCluster has no {0}")]
    Missing(&'static str),
    /// A pod template or extra config does not make a valid pod.
    #[error("the {role} pod template does not make a valid pod: {source}")]
    InvalidTemplate {
        /// `scheduler` or `worker`.
        role: &'static str,
        /// What did not parse.
        source: serde_json::Error,
    },
    /// The TLS credentials could not be generated.
    #[error("generating TLS credentials: {0}")]
    Credentials(String),
}

/// Namespace and object name (the id) of a DaskCluster.
pub fn identity(dc: &DaskCluster) -> Result<(String, String), BuildError> {
    let ns = dc.namespace().ok_or(BuildError::Missing("namespace"))?;
    let id = dc.meta().name.clone().ok_or(BuildError::Missing("name"))?;
    Ok((ns, id))
}

fn owner_reference(dc: &DaskCluster) -> Result<OwnerReference, BuildError> {
    dc.controller_owner_ref(&())
        .ok_or(BuildError::Missing("uid"))
}

fn instance(dc: &DaskCluster) -> String {
    dc.labels()
        .get(names::LABEL_INSTANCE)
        .cloned()
        .unwrap_or_default()
}

fn meta(
    dc: &DaskCluster,
    name: String,
    component: &str,
    extra_labels: &BTreeMap<String, String>,
    extra_annotations: &BTreeMap<String, String>,
) -> Result<ObjectMeta, BuildError> {
    let (ns, id) = identity(dc)?;
    let mut labels = extra_labels.clone();
    labels.extend(names::labels(&instance(dc), &id, &dc.spec.user, component));
    let mut annotations = extra_annotations.clone();
    annotations.insert(names::ANNOTATION_USER.into(), dc.spec.user.clone());
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(ns),
        labels: Some(labels),
        annotations: Some(annotations),
        owner_references: Some(vec![owner_reference(dc)?]),
        ..ObjectMeta::default()
    })
}

/// The credentials Secret with fresh TLS credentials and API token.
pub fn secret(dc: &DaskCluster) -> Result<Secret, BuildError> {
    let (_, id) = identity(dc)?;
    let creds =
        ClusterCredentials::generate(&id).map_err(|e| BuildError::Credentials(e.to_string()))?;
    let token = gateway_backend::new_api_token();
    let data = BTreeMap::from([
        (
            "dask.crt".to_string(),
            ByteString(creds.cert_pem.into_bytes()),
        ),
        (
            "dask.pem".to_string(),
            ByteString(creds.key_pem.into_bytes()),
        ),
        ("api-token".to_string(), ByteString(token.into_bytes())),
    ]);
    Ok(Secret {
        metadata: meta(
            dc,
            names::secret_name(&id),
            names::COMPONENT_CREDENTIALS,
            &BTreeMap::new(),
            &BTreeMap::new(),
        )?,
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    })
}

/// Kubernetes CPU quantity for `cores` (millicores).
fn cpu(cores: f64) -> String {
    format!("{}m", (cores * 1000.0).round().max(1.0) as u64)
}

/// Requests and limits from the cluster's cores and memory, with the template's extra
/// resources merged over them.
fn resources(
    cores: f64,
    memory: u64,
    cores_limit: Option<f64>,
    memory_limit: u64,
    template: &PodTemplate,
) -> Value {
    let mut limits = json!({ "memory": memory_limit.to_string() });
    if let Some(l) = cores_limit {
        limits["cpu"] = json!(cpu(l));
    }
    let mut r = json!({
        "requests": {"cpu": cpu(cores), "memory": memory.to_string()},
        "limits": limits,
    });
    if let Some(extra) = &template.resources {
        deep_merge(&mut r, extra);
    }
    r
}

fn env_var(name: &str, value: &str) -> Value {
    json!({"name": name, "value": value})
}

/// Environment shared by scheduler and workers: TLS for Dask comms, then the cluster's own
/// environment (operator defaults and user options).
fn common_env(dc: &DaskCluster) -> Vec<Value> {
    let crt = format!("{CREDENTIALS_DIR}/dask.crt");
    let key = format!("{CREDENTIALS_DIR}/dask.pem");
    let mut env: Vec<Value> = dc
        .spec
        .settings
        .environment
        .iter()
        .filter(|(k, _)| !k.starts_with("DASK_GATEWAY_"))
        .map(|(k, v)| env_var(k, v))
        .collect();
    env.extend([
        env_var("DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION", "True"),
        env_var("DASK_DISTRIBUTED__COMM__TLS__CA_FILE", &crt),
        env_var("DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT", &crt),
        env_var("DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY", &key),
        env_var("DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT", &crt),
        env_var("DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY", &key),
    ]);
    env
}

/// A pod around one Dask container, with the template and its extra configs applied.
#[allow(clippy::too_many_arguments)]
fn pod(
    dc: &DaskCluster,
    role: &'static str,
    name: String,
    component: &str,
    template: &PodTemplate,
    container: Value,
    credential_items: &[&str],
    restart_policy: &str,
) -> Result<Pod, BuildError> {
    let (_, id) = identity(dc)?;
    let runtime = &dc.spec.runtime;
    let metadata = meta(dc, name, component, &template.labels, &template.annotations)?;
    let mut spec = json!({
        "restartPolicy": restart_policy,
        "automountServiceAccountToken": runtime.service_account_name.is_some(),
        "enableServiceLinks": false,
        "terminationGracePeriodSeconds": runtime.termination_grace_period_seconds,
        "securityContext": pod_security_context(runtime.pod_security_context.as_ref()),
        "volumes": [
            {
                "name": "dask-credentials",
                "secret": {
                    "secretName": names::secret_name(&id),
                    "defaultMode": 0o440,
                    "items": credential_items.iter().map(|k| json!({"key": k, "path": k})).collect::<Vec<_>>(),
                },
            },
            {"name": SCRATCH_VOLUME, "emptyDir": {}},
        ],
    });
    if let Some(sa) = &runtime.service_account_name {
        spec["serviceAccountName"] = json!(sa);
    }
    if !runtime.image_pull_secrets.is_empty() {
        spec["imagePullSecrets"] = json!(runtime
            .image_pull_secrets
            .iter()
            .map(|n| json!({ "name": n }))
            .collect::<Vec<_>>());
    }
    if !template.node_selector.is_empty() {
        spec["nodeSelector"] = json!(template.node_selector);
    }
    if !template.tolerations.is_empty() {
        spec["tolerations"] = json!(template.tolerations);
    }
    if let Some(a) = &template.affinity {
        spec["affinity"] = a.clone();
    }
    if let Some(volumes) = spec["volumes"].as_array_mut() {
        volumes.extend(template.volumes.iter().cloned());
    }
    let mut container = container;
    if let Some(env) = container["env"].as_array_mut() {
        env.extend(template.env.iter().cloned());
    }
    if let Some(mounts) = container["volumeMounts"].as_array_mut() {
        mounts.extend(template.volume_mounts.iter().cloned());
    }
    deep_merge(
        &mut container,
        &Value::Object(template.extra_container_config.clone()),
    );
    spec["containers"] = json!([container]);
    deep_merge(&mut spec, &Value::Object(template.extra_pod_config.clone()));
    let value = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": spec,
    });
    serde_json::from_value(value).map_err(|source| BuildError::InvalidTemplate { role, source })
}

/// The worker's HTTP port: dashboard, `/health` (its readiness probe) and `/metrics`.
const WORKER_DASHBOARD_PORT: u16 = 8789;

/// The pod-wide writable scratch directory (`/tmp`): Dask's temporary and spill directory, and
/// the only writable place when the root filesystem is read-only.
const SCRATCH_VOLUME: &str = "dask-tmp";

fn volume_mounts() -> Value {
    json!([
        {"name": "dask-credentials", "mountPath": CREDENTIALS_DIR, "readOnly": true},
        {"name": SCRATCH_VOLUME, "mountPath": "/tmp"},
    ])
}

/// The pod's `securityContext`: the configured one, with an `fsGroup` added when it has none
/// (its `runAsGroup`, else 1000). The credentials files are mode 0440 and owned by the
/// `fsGroup`, which every container process holds as a supplementary group, so a non-root
/// container user can read them whatever its own uid and gid.
fn pod_security_context(configured: Option<&Value>) -> Value {
    let mut context = match configured {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    if !context.contains_key("fsGroup") {
        let group = context.get("runAsGroup").cloned().unwrap_or(json!(1000));
        context.insert("fsGroup".into(), group);
    }
    Value::Object(context)
}

fn base_container(dc: &DaskCluster, name: &str) -> Map<String, Value> {
    let runtime = &dc.spec.runtime;
    let mut c = Map::new();
    c.insert("name".into(), json!(name));
    c.insert("image".into(), json!(runtime.image));
    if let Some(p) = &runtime.image_pull_policy {
        c.insert("imagePullPolicy".into(), json!(p));
    }
    let security = match &runtime.security_context {
        Some(v) => v.clone(),
        None => json!({"allowPrivilegeEscalation": false}),
    };
    c.insert("securityContext".into(), security);
    c.insert("volumeMounts".into(), volume_mounts());
    c
}

/// The scheduler pod: `dask scheduler` with the gateway preload on fixed ports, ready once the
/// preload's `/api/health` answers. It is never restarted: if it ends, the cluster fails.
pub fn scheduler_pod(dc: &DaskCluster) -> Result<Pod, BuildError> {
    let (ns, id) = identity(dc)?;
    let s = &dc.spec.settings;
    let runtime = &dc.spec.runtime;
    let mut env = common_env(dc);
    env.extend([
        env_var("DASK_GATEWAY_API_URL", &runtime.api_url),
        env_var(
            "DASK_GATEWAY_API_TOKEN",
            &format!("{CREDENTIALS_DIR}/api-token"),
        ),
        env_var("DASK_GATEWAY_CLUSTER_NAME", &names::public_name(&ns, &id)),
    ]);
    let mut c = base_container(dc, "dask-scheduler");
    c.insert(
        "args".into(),
        json!([
            "dask",
            "scheduler",
            "--protocol",
            "tls",
            "--host",
            "0.0.0.0",
            "--port",
            SCHEDULER_PORT.to_string(),
            "--dashboard-address",
            format!(":{DASHBOARD_PORT}"),
            "--preload",
            "dask_gateway.scheduler_preload",
            "--dg-api-address",
            format!("0.0.0.0:{API_PORT}"),
            "--dg-heartbeat-period",
            runtime.heartbeat_period.to_string(),
            "--dg-adaptive-period",
            runtime.adaptive_period.to_string(),
            "--dg-idle-timeout",
            s.idle_timeout.to_string(),
        ]),
    );
    c.insert("env".into(), json!(env));
    c.insert(
        "ports".into(),
        json!([
            {"name": "scheduler", "containerPort": SCHEDULER_PORT},
            {"name": "dashboard", "containerPort": DASHBOARD_PORT},
            {"name": "api", "containerPort": API_PORT},
        ]),
    );
    c.insert(
        "readinessProbe".into(),
        json!({
            "httpGet": {"path": "/api/health", "port": API_PORT},
            "periodSeconds": 1,
            "failureThreshold": 3,
            "timeoutSeconds": 2,
        }),
    );
    c.insert(
        "resources".into(),
        resources(
            s.resources.scheduler_cores,
            s.resources.scheduler_memory,
            s.container_limits.scheduler_cores,
            s.scheduler_memory_limit(),
            &dc.spec.scheduler,
        ),
    );
    pod(
        dc,
        "scheduler",
        names::scheduler_pod_name(&id),
        names::COMPONENT_SCHEDULER,
        &dc.spec.scheduler,
        Value::Object(c),
        &["dask.crt", "dask.pem", "api-token"],
        "Never",
    )
}

/// The scheduler's Service (stable in-cluster name `dask-<id>.<namespace>`).
pub fn service(dc: &DaskCluster) -> Result<Service, BuildError> {
    let (_, id) = identity(dc)?;
    let metadata = meta(
        dc,
        names::service_name(&id),
        names::COMPONENT_SCHEDULER,
        &BTreeMap::new(),
        &BTreeMap::new(),
    )?;
    let value = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": {
                names::LABEL_INSTANCE: instance(dc),
                names::LABEL_CLUSTER: id,
                names::LABEL_COMPONENT: names::COMPONENT_SCHEDULER,
            },
            "ports": [
                {"name": "scheduler", "port": SCHEDULER_PORT, "targetPort": SCHEDULER_PORT},
                {"name": "dashboard", "port": DASHBOARD_PORT, "targetPort": DASHBOARD_PORT},
                {"name": "api", "port": API_PORT, "targetPort": API_PORT},
            ],
        },
    });
    serde_json::from_value(value).map_err(|source| BuildError::InvalidTemplate {
        role: "scheduler",
        source,
    })
}

/// One worker pod named `pod_name` (also its Dask `--name`), connecting to the scheduler at
/// `scheduler_address`. Workers get the TLS pair but not the cluster's API token.
///
/// The worker runs without a nanny: Kubernetes supervises it. A worker killed by the kernel for
/// exceeding its memory limit then ends its container (`OOMKilled`), which the controller sees,
/// records and replaces (with a nanny the nanny would restart it unseen); `Client.restart()`
/// closes the workers and the controller starts new pods for them.
pub fn worker_pod(
    dc: &DaskCluster,
    pod_name: &str,
    scheduler_address: &str,
) -> Result<Pod, BuildError> {
    let s = &dc.spec.settings;
    let mut env = common_env(dc);
    env.push(env_var("DASK_GATEWAY_WORKER_NAME", pod_name));
    let mut c = base_container(dc, "dask-worker");
    c.insert(
        "args".into(),
        json!([
            "dask",
            "worker",
            scheduler_address,
            "--dashboard-address",
            format!(":{WORKER_DASHBOARD_PORT}"),
            "--name",
            pod_name,
            "--no-nanny",
            "--nthreads",
            s.worker_threads.max(1).to_string(),
            "--memory-limit",
            s.worker_memory_limit().to_string(),
        ]),
    );
    c.insert("env".into(), json!(env));
    c.insert(
        "ports".into(),
        json!([{"name": "dashboard", "containerPort": WORKER_DASHBOARD_PORT}]),
    );
    // Ready once the worker process serves: a worker that dies after that died at work, not at
    // start (the controller tells the two apart).
    c.insert(
        "readinessProbe".into(),
        json!({
            "httpGet": {"path": "/health", "port": WORKER_DASHBOARD_PORT},
            "periodSeconds": 2,
            "failureThreshold": 3,
            "timeoutSeconds": 2,
        }),
    );
    c.insert(
        "resources".into(),
        resources(
            s.resources.worker_cores,
            s.resources.worker_memory,
            s.container_limits.worker_cores,
            s.worker_memory_limit(),
            &dc.spec.worker,
        ),
    );
    pod(
        dc,
        "worker",
        pod_name.to_string(),
        names::COMPONENT_WORKER,
        &dc.spec.worker,
        Value::Object(c),
        &["dask.crt", "dask.pem"],
        "Never",
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::{DaskClusterSpec, RuntimeSpec};
    use gateway_backend::ClusterSettings;

    /// A DaskCluster as the API server would return it.
    pub(crate) fn cluster(id: &str) -> DaskCluster {
        let mut dc = DaskCluster::new(
            id,
            DaskClusterSpec {
                user: "alice@example.org".into(),
                options: Map::new(),
                settings: ClusterSettings::example(),
                scheduler: PodTemplate::default(),
                worker: PodTemplate::default(),
                runtime: RuntimeSpec {
                    image: "img:1".into(),
                    image_pull_policy: None,
                    image_pull_secrets: vec![],
                    service_account_name: None,
                    api_url: "http://10.0.0.1:8000/api".into(),
                    heartbeat_period: 15.0,
                    adaptive_period: 3.0,
                    start_timeout: 60.0,
                    worker_failure_limit: 3,
                    termination_grace_period_seconds: 10,
                    pod_security_context: Some(crate::config::default_pod_security_context()),
                    security_context: Some(crate::config::default_security_context()),
                },
                replicas: 0,
                active: true,
                retired_workers: vec![],
                stop: None,
                pool: None,
            },
        );
        dc.metadata.namespace = Some("dask".into());
        dc.metadata.uid = Some("uid-1".into());
        dc.metadata.labels = Some(BTreeMap::from([(
            names::LABEL_INSTANCE.to_string(),
            "gw".to_string(),
        )]));
        dc
    }

    #[test]
    fn scheduler_pod_runs_the_preload_with_the_protocol_environment() {
        let dc = cluster("abc");
        let pod = scheduler_pod(&dc).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("dask-scheduler-abc"));
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "DaskCluster");
        assert_eq!(owner.controller, Some(true));
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[names::LABEL_CLUSTER], "abc");
        assert_eq!(labels[names::LABEL_INSTANCE], "gw");
        assert!(labels[names::LABEL_USER].starts_with("alice-example.org-"));
        let spec = pod.spec.unwrap();
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let c = &spec.containers[0];
        let cmd = c.args.as_ref().unwrap().join(" ");
        assert!(cmd.starts_with("dask scheduler --protocol tls"), "{cmd}");
        assert!(cmd.contains("--preload dask_gateway.scheduler_preload"));
        let env: BTreeMap<String, String> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(env["DASK_GATEWAY_CLUSTER_NAME"], "dask.abc");
        assert_eq!(env["DASK_GATEWAY_API_URL"], "http://10.0.0.1:8000/api");
        assert_eq!(
            env["DASK_GATEWAY_API_TOKEN"],
            "/etc/dask-credentials/api-token"
        );
        assert_eq!(env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"], "True");
        let res = c.resources.as_ref().unwrap();
        assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "1000m");
        assert_eq!(
            res.limits.as_ref().unwrap()["memory"].0,
            (1u64 << 30).to_string()
        );
        assert!(c.readiness_probe.is_some());
    }

    #[test]
    fn pods_run_as_a_non_root_user_that_can_read_the_credentials() {
        let dc = cluster("abc");
        for pod in [
            scheduler_pod(&dc).unwrap(),
            worker_pod(&dc, "dask-worker-abc-x", "tls://10.1.2.3:8786").unwrap(),
        ] {
            let spec = pod.spec.unwrap();
            let psc = spec.security_context.unwrap();
            assert_eq!(psc.run_as_non_root, Some(true));
            assert_eq!((psc.run_as_user, psc.fs_group), (Some(1000), Some(1000)));
            let volumes = spec.volumes.unwrap();
            let creds = volumes[0].secret.as_ref().unwrap();
            assert_eq!(creds.default_mode, Some(0o440), "owner and fsGroup only");
            assert!(volumes[1].empty_dir.is_some());
            let c = &spec.containers[0];
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            let mounts: Vec<_> = c
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .map(|m| (m.mount_path.as_str(), m.read_only.unwrap_or(false)))
                .collect();
            assert_eq!(mounts, [("/etc/dask-credentials", true), ("/tmp", false)]);
            assert!(c.command.is_none(), "the image's entrypoint stays PID 1");
        }
    }

    #[test]
    fn a_security_context_without_fs_group_gets_one() {
        let mut dc = cluster("abc");
        dc.spec.runtime.pod_security_context = Some(json!({"runAsUser": 1234, "runAsGroup": 99}));
        let psc = scheduler_pod(&dc)
            .unwrap()
            .spec
            .unwrap()
            .security_context
            .unwrap();
        assert_eq!((psc.run_as_user, psc.fs_group), (Some(1234), Some(99)));
        dc.spec.runtime.pod_security_context = None;
        let psc = scheduler_pod(&dc)
            .unwrap()
            .spec
            .unwrap()
            .security_context
            .unwrap();
        assert_eq!((psc.run_as_user, psc.fs_group), (None, Some(1000)));
    }

    #[test]
    fn workers_get_tls_but_not_the_token_and_templates_apply() {
        let mut dc = cluster("abc");
        dc.spec.worker = serde_json::from_value(json!({
            "nodeSelector": {"pool": "dask"},
            "resources": {"limits": {"nvidia.com/gpu": 1}},
            "env": [{"name": "EXTRA", "value": "1"}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            "extraPodConfig": {"priorityClassName": "batch"},
            "extraContainerConfig": {"workingDir": "/work"}
        }))
        .unwrap();
        dc.spec
            .settings
            .environment
            .insert("FROM_USER".into(), "x".into());
        let pod = worker_pod(&dc, "dask-worker-abc-xyz", "tls://10.1.2.3:8786").unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.priority_class_name.as_deref(), Some("batch"));
        assert_eq!(spec.node_selector.unwrap()["pool"], "dask");
        let c = &spec.containers[0];
        assert_eq!(c.working_dir.as_deref(), Some("/work"));
        let cmd = c.args.as_ref().unwrap().join(" ");
        assert!(cmd.contains("tls://10.1.2.3:8786"));
        assert!(cmd.contains("--name dask-worker-abc-xyz"));
        let names: Vec<&str> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert!(names.contains(&"EXTRA") && names.contains(&"FROM_USER"));
        assert!(!names.contains(&"DASK_GATEWAY_API_TOKEN"));
        let volumes = spec.volumes.unwrap();
        let items = volumes[0].secret.as_ref().unwrap().items.clone().unwrap();
        assert!(items.iter().all(|i| i.key != "api-token"));
        // Template volumes come after the gateway's own, which they never replace.
        let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["dask-credentials", "dask-tmp", "data"]);
        let mounts: Vec<&str> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(mounts, ["/etc/dask-credentials", "/tmp", "/data"]);
        let limits = c.resources.as_ref().unwrap().limits.clone().unwrap();
        assert_eq!(limits["nvidia.com/gpu"].0, "1");
    }

    #[test]
    fn a_bad_template_is_a_clear_error() {
        let mut dc = cluster("abc");
        dc.spec.worker.extra_pod_config =
            serde_json::from_value(json!({"restartPolicy": 5})).unwrap();
        let e = worker_pod(&dc, "w", "tls://x:1").unwrap_err();
        assert!(e
            .to_string()
            .starts_with("the worker pod template does not make a valid pod"));
    }

    #[test]
    fn secret_and_service() {
        let dc = cluster("abc");
        let s = secret(&dc).unwrap();
        let data = s.data.unwrap();
        assert!(String::from_utf8(data["dask.crt"].0.clone())
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(data["api-token"].0.len(), 32);
        let svc = service(&dc).unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some("dask-abc"));
        let sel = svc.spec.unwrap().selector.unwrap();
        assert_eq!(sel[names::LABEL_COMPONENT], "dask-scheduler");
    }
}
