//! [`LeanPod`]: a Pod as the controller's watch cache reads it: without `managedFields`, and
//! with only the parts of its spec and its status the controller reads.
//!
//! Every watch event carries the whole object, and a Pod's `metadata.managedFields` (who set
//! which field, as a JSON tree per field manager) is often the largest part of it. Decoded into
//! `k8s-openapi`'s types it is a tree of maps and strings built only to be thrown away: a
//! profile of a 100-worker scale-up (about 500 pod events) spent a tenth of the process's CPU
//! there. The spec is the next largest part (each container's command, environment and mounts,
//! the volumes, the tolerations the API server adds), and the controller reads only each
//! container's name and resources from it (for accounting and for an OOM kill's message). Of
//! the status it reads the phase, the pod's IP, the conditions and each container's state; the
//! rest (each container's image, image ID, container ID, mounts, user and resources, the host's
//! and the pod's IP lists, the QoS class) changes on every kubelet update and is never read.
//! `LeanPod` decodes the same JSON into the same [`Pod`], skipping the rest without building
//! anything; the metadata is decoded whole.
//!
//! The decoded pod is shared, not copied: the watch cache keeps a copy of each object it
//! applies and the event goes on to the controller's triggers, so a pod held by value was
//! cloned once per event and both copies freed again (about a twentieth of the process's
//! samples in a 100-worker scale-up's profile). A `LeanPod` clones by a reference count.

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStatus, Pod, PodCondition, PodSpec, PodStatus,
    ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A [`Pod`] decoded without its `metadata.managedFields`, with each container's name and
/// resources as its whole spec, and with only the status fields `LeanStatus` names; derefs to
/// the [`Pod`], and clones by a reference count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeanPod(pub Arc<Pod>);

impl std::ops::Deref for LeanPod {
    type Target = Pod;
    fn deref(&self) -> &Pod {
        &self.0
    }
}

/// A pod as the watch cache holds it (for tests that fill the cache by hand): encoded as the
/// API server would send it and decoded again, by the same decoder as the watch's.
#[cfg(test)]
impl From<Pod> for LeanPod {
    fn from(pod: Pod) -> Self {
        let json = serde_json::to_value(pod).expect("a Pod encodes as JSON");
        serde_json::from_value(json).expect("an encoded Pod decodes as a LeanPod")
    }
}

/// The part of a pod's status the controller reads; serde skips every other field.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanStatus {
    conditions: Option<Vec<PodCondition>>,
    container_statuses: Option<Vec<LeanContainerStatus>>,
    message: Option<String>,
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    reason: Option<String>,
}

/// The part of a container's status the controller reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanContainerStatus {
    name: String,
    #[serde(default)]
    ready: bool,
    #[serde(default)]
    restart_count: i32,
    started: Option<bool>,
    state: Option<ContainerState>,
    last_state: Option<ContainerState>,
}

impl From<LeanStatus> for PodStatus {
    fn from(s: LeanStatus) -> Self {
        PodStatus {
            conditions: s.conditions,
            container_statuses: s.container_statuses.map(|cs| {
                cs.into_iter()
                    .map(|c| ContainerStatus {
                        name: c.name,
                        ready: c.ready,
                        restart_count: c.restart_count,
                        started: c.started,
                        state: c.state,
                        last_state: c.last_state,
                        ..ContainerStatus::default()
                    })
                    .collect()
            }),
            message: s.message,
            phase: s.phase,
            pod_ip: s.pod_ip,
            reason: s.reason,
            ..PodStatus::default()
        }
    }
}

/// The part of a container the controller reads.
#[derive(Deserialize)]
struct LeanContainer {
    name: String,
    resources: Option<ResourceRequirements>,
}

/// The part of a pod's spec the controller reads: its containers, each only as a name and
/// resources; serde skips every other field.
#[derive(Deserialize)]
struct LeanSpec {
    #[serde(default)]
    containers: Vec<LeanContainer>,
}

/// A [`PodSpec`] that holds only `containers`' names and resources.
fn lean_spec(containers: Vec<LeanContainer>) -> PodSpec {
    PodSpec {
        containers: containers
            .into_iter()
            .map(|c| Container {
                name: c.name,
                resources: c.resources,
                ..Container::default()
            })
            .collect(),
        ..PodSpec::default()
    }
}

impl k8s_openapi::Resource for LeanPod {
    const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Pod as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for LeanPod {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.0.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut Arc::make_mut(&mut self.0).metadata
    }
}

/// `ObjectMeta`'s fields but `managedFields`, which serde skips as an unknown field.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanMeta {
    annotations: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
    deletion_grace_period_seconds: Option<i64>,
    deletion_timestamp: Option<Time>,
    finalizers: Option<Vec<String>>,
    generate_name: Option<String>,
    generation: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
    name: Option<String>,
    namespace: Option<String>,
    owner_references: Option<Vec<OwnerReference>>,
    resource_version: Option<String>,
    self_link: Option<String>,
    uid: Option<String>,
}

impl From<LeanMeta> for ObjectMeta {
    fn from(m: LeanMeta) -> Self {
        ObjectMeta {
            annotations: m.annotations,
            creation_timestamp: m.creation_timestamp,
            deletion_grace_period_seconds: m.deletion_grace_period_seconds,
            deletion_timestamp: m.deletion_timestamp,
            finalizers: m.finalizers,
            generate_name: m.generate_name,
            generation: m.generation,
            labels: m.labels,
            managed_fields: None,
            name: m.name,
            namespace: m.namespace,
            owner_references: m.owner_references,
            resource_version: m.resource_version,
            self_link: m.self_link,
            uid: m.uid,
        }
    }
}

/// A Pod's top-level keys, as the decoder tells them apart.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
enum Field {
    Metadata,
    Spec,
    Status,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for LeanPod {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PodVisitor;
        impl<'de> Visitor<'de> for PodVisitor {
            type Value = LeanPod;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a Pod")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LeanPod, A::Error> {
                let mut pod = Pod::default();
                while let Some(key) = map.next_key::<Field>()? {
                    match key {
                        Field::Metadata => pod.metadata = map.next_value::<LeanMeta>()?.into(),
                        Field::Spec => {
                            pod.spec = map
                                .next_value::<Option<LeanSpec>>()?
                                .map(|s| lean_spec(s.containers))
                        }
                        Field::Status => {
                            pod.status = map.next_value::<Option<LeanStatus>>()?.map(Into::into)
                        }
                        // `apiVersion` and `kind` are the type's own.
                        Field::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(LeanPod(Arc::new(pod)))
            }
        }
        deserializer.deserialize_map(PodVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_pod_as_k8s_openapi_does_without_managed_fields_or_the_unread_spec() {
        let json = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "dask-worker-1",
                "namespace": "ns",
                "uid": "u-1",
                "resourceVersion": "42",
                "generation": 1,
                "creationTimestamp": "2026-12-05T16:07:14Z",
                "deletionTimestamp": "2026-12-05T16:08:14Z",
                "deletionGracePeriodSeconds": 1,
                "labels": {"app.kubernetes.io/component": "dask-worker"},
                "annotations": {"a": "b"},
                "finalizers": ["f"],
                "generateName": "dask-worker-",
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "ux"}],
                "managedFields": [{
                    "manager": "kubelet",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2026-12-05T16:07:15Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:status": {"f:phase": {}}},
                    "subresource": "status"
                }]
            },
            "spec": {"containers": [{"name": "dask-worker", "image": "img",
                                     "env": [{"name": "A", "value": "1"}],
                                     "resources": {"requests": {"cpu": "10m"},
                                                   "limits": {"memory": "1G"}}},
                                    {"name": "sidecar", "image": "img2"}],
                     "volumes": [{"name": "v", "emptyDir": {}}],
                     "nodeName": "n1",
                     "tolerations": [{"key": "k", "operator": "Exists"}]},
            "status": {
                "phase": "Running",
                "podIP": "10.0.0.7",
                "podIPs": [{"ip": "10.0.0.7"}],
                "hostIP": "192.168.1.2",
                "hostIPs": [{"ip": "192.168.1.2"}],
                "qosClass": "Burstable",
                "startTime": "2026-12-05T16:07:14Z",
                "conditions": [{"type": "Ready", "status": "True",
                                "lastTransitionTime": "2026-12-05T16:07:20Z"}],
                "containerStatuses": [{
                    "name": "dask-worker",
                    "image": "img",
                    "imageID": "sha256:0123",
                    "containerID": "containerd://abc",
                    "ready": true,
                    "restartCount": 2,
                    "started": true,
                    "state": {"running": {"startedAt": "2026-12-05T16:07:18Z"}},
                    "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
                    "volumeMounts": [{"name": "v", "mountPath": "/v"}],
                    "user": {"linux": {"uid": 1000, "gid": 1000}}
                }]
            },
            "someFutureField": {"x": [1, 2, 3]}
        });
        let lean: LeanPod = serde_json::from_value(json.clone()).unwrap();
        let mut full: Pod = serde_json::from_value(json).unwrap();
        assert!(full.metadata.managed_fields.is_some());
        full.metadata.managed_fields = None;
        let containers = |pod: &Pod| {
            let spec = pod.spec.as_ref().unwrap();
            spec.containers
                .iter()
                .map(|c| (c.name.clone(), c.resources.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(containers(&lean.0), containers(&full));
        assert_eq!(containers(&lean.0).len(), 2);
        assert!(containers(&lean.0)[0].1.as_ref().unwrap().limits.is_some());
        // Nothing else of the spec is kept.
        let spec = lean.0.spec.as_ref().unwrap();
        assert_eq!(spec.node_name, None);
        assert_eq!(spec.volumes, None);
        assert_eq!(spec.containers[0].env, None);
        // Of the status, what the controller reads, as the full decode has it; nothing else.
        let (status, full_status) = (
            lean.0.status.as_ref().unwrap(),
            full.status.as_ref().unwrap(),
        );
        assert_eq!(status.phase, full_status.phase);
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(status.conditions, full_status.conditions);
        let (c, full_c) = (
            &status.container_statuses.as_ref().unwrap()[0],
            &full_status.container_statuses.as_ref().unwrap()[0],
        );
        assert_eq!(
            (c.name.as_str(), c.ready, c.restart_count, c.started),
            ("dask-worker", true, 2, Some(true))
        );
        assert_eq!(
            (&c.state, &c.last_state),
            (&full_c.state, &full_c.last_state)
        );
        assert!(c.last_state.as_ref().unwrap().terminated.is_some());
        assert_eq!(
            (c.image.as_str(), c.image_id.as_str(), &c.container_id),
            ("", "", &None)
        );
        assert_eq!((&c.volume_mounts, &c.user), (&None, &None));
        assert_eq!(
            (&status.host_ip, &status.pod_ips, &status.qos_class),
            (&None, &None, &None)
        );
        assert_eq!(status.start_time, None);
        // The metadata is whole but for managedFields; the rest of the pod is nothing.
        assert_eq!(lean.0.metadata, full.metadata);
        let mut rest = Pod::clone(&lean.0);
        rest.metadata = Default::default();
        rest.spec = None;
        rest.status = None;
        assert_eq!(rest, Pod::default());
    }

    #[test]
    fn a_clone_shares_the_decoded_pod() {
        let pod: LeanPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "dask", "labels": {"a": "b"}},
            "status": {"phase": "Running"},
        }))
        .unwrap();
        let copy = pod.clone();
        assert!(Arc::ptr_eq(&pod.0, &copy.0));
        // Changing one copy's metadata (the Resource trait allows it) leaves the other alone.
        let mut changed = copy.clone();
        k8s_openapi::Metadata::metadata_mut(&mut changed).name = Some("q".into());
        assert_eq!(
            (
                pod.metadata.name.as_deref(),
                changed.metadata.name.as_deref()
            ),
            (Some("p"), Some("q"))
        );
    }

    #[test]
    fn a_pod_that_is_not_an_object_is_an_error() {
        assert!(serde_json::from_str::<LeanPod>("[1]").is_err());
        assert!(serde_json::from_str::<LeanPod>(r#"{"metadata": 3}"#).is_err());
    }
}
