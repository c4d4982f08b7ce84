//! What exists of one cluster: [`Context::observe`] reads the watch caches, corrected by the
//! creations and deletions the caches do not show yet ([`super::Expectations`]), into an
//! [`Observed`]; and the predicates every phase asks of a pod (its phase, readiness, whether
//! and since when its container runs, how it ended, why it waits).

use super::Context;
use crate::lean::LeanPod;
use crate::names;
use k8s_openapi::api::core::v1::{ContainerState, Pod};
use kube::runtime::reflector::ObjectRef;
use std::collections::HashSet;
use std::time::Duration;

/// How long our own creations and deletions are remembered while the cache catches up.
const EXPECTATION_TTL: Duration = Duration::from_secs(60);

/// What exists of one cluster, from the caches corrected by our expectations.
pub(super) struct Observed {
    pub(super) secret: bool,
    pub(super) scheduler: Option<LeanPod>,
    pub(super) scheduler_expected: bool,
    pub(super) service: bool,
    /// Worker pods not being deleted (by us or anyone).
    pub(super) workers: Vec<LeanPod>,
    /// Worker pods being deleted whose container was killed for its memory limit meanwhile
    /// (a worker the scheduler reported gone, deleted as retired before its pod said why).
    pub(super) oom_killed_while_deleted: Vec<LeanPod>,
    /// Names of worker pods we created that the cache does not show yet.
    pub(super) workers_expected: Vec<String>,
    /// The scheduler pod, if its container runs (being deleted or not).
    pub(super) scheduler_running: Option<RunningPod>,
    /// Every worker pod whose container runs (being deleted or not: it holds what it
    /// requested until it ends).
    pub(super) workers_running: Vec<RunningPod>,
}

/// A pod whose container runs, as usage accounting sees it.
#[derive(Clone, Copy, Debug)]
pub(super) struct RunningPod {
    /// When its (first) container started, ms since the Unix epoch.
    pub(super) since: i64,
    /// The cores its containers request (none: no container says).
    pub(super) cores: Option<f64>,
    /// The memory (bytes) its containers request (none: no container says).
    pub(super) memory: Option<f64>,
}

impl RunningPod {
    /// The pod as accounting sees it, if its container runs.
    fn of(pod: &Pod) -> Option<RunningPod> {
        let since = running_since_ms(pod)?;
        let mut cores = None;
        let mut memory = None;
        for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
            let Some(r) = c.resources.as_ref() else {
                continue;
            };
            // Kubernetes takes a limit as the request when only the limit is given.
            let get = |key: &str| {
                r.requests
                    .as_ref()
                    .and_then(|m| m.get(key))
                    .or_else(|| r.limits.as_ref().and_then(|m| m.get(key)))
                    .and_then(|q| crate::quantity::parse_quantity(&q.0))
            };
            if let Some(v) = get("cpu") {
                *cores.get_or_insert(0.0) += v;
            }
            if let Some(v) = get("memory") {
                *memory.get_or_insert(0.0) += v;
            }
        }
        Some(RunningPod {
            since,
            cores,
            memory,
        })
    }
}

impl Context {
    /// What exists of cluster `id` in `ns`: the caches, corrected by our expectations (which
    /// it prunes of what the caches show now, and of what is older than [`EXPECTATION_TTL`]).
    pub(super) fn observe(&self, ns: &str, id: &str) -> Observed {
        // Only this cluster's pods (see `crate::pod_cache`); the scheduler among them.
        let scheduler_name = names::scheduler_pod_name(id);
        let mut scheduler = None;
        let mut workers: Vec<LeanPod> = Vec::new();
        for pod in self.pods.cluster_pods(ns, id) {
            if pod_name(&pod) == scheduler_name {
                scheduler = Some(pod);
            } else if label(&pod, names::LABEL_COMPONENT) == Some(names::COMPONENT_WORKER) {
                workers.push(pod);
            }
        }
        let (secret_name, service_name) = (names::secret_name(id), names::service_name(id));
        let secret = self
            .secrets
            .get(&ObjectRef::new(&secret_name).within(ns))
            .is_some();
        let service = self
            .services
            .get(&ObjectRef::new(&service_name).within(ns))
            .is_some();
        let mut all = self.expectations.lock().unwrap_or_else(|e| e.into_inner());
        let exp = all.entry(id.to_string()).or_default();
        if !exp.created.is_empty() {
            let present: HashSet<&str> = workers.iter().map(|p| pod_name(p)).collect();
            exp.created.retain(|name, at| {
                let seen = present.contains(name.as_str())
                    || (name == &scheduler_name && scheduler.is_some())
                    || (name == &secret_name && secret)
                    || (name == &service_name && service);
                !seen && at.elapsed() < EXPECTATION_TTL
            });
        }
        exp.deleted.retain(|name, at| {
            let still = workers
                .iter()
                .chain(scheduler.iter())
                .any(|p| pod_name(p) == name && !is_being_deleted(p));
            still && at.elapsed() < EXPECTATION_TTL
        });
        let deleted = &exp.deleted;
        let gone = |p: &Pod| is_being_deleted(p) || deleted.contains_key(pod_name(p));
        let scheduler_running = scheduler.as_deref().and_then(RunningPod::of);
        let workers_running = workers.iter().filter_map(|p| RunningPod::of(p)).collect();
        let oom_killed_while_deleted = workers
            .iter()
            .filter(|p| gone(p))
            .filter(|p| termination(p).is_some_and(|(_, reason, _)| reason == "OOMKilled"))
            .cloned()
            .collect();
        workers.retain(|p| !gone(p));
        if scheduler
            .as_ref()
            .is_some_and(|p| deleted.contains_key(pod_name(p)))
        {
            scheduler = None;
        }
        let worker_prefix = names::worker_pod_prefix(id);
        let workers_expected = exp
            .created
            .keys()
            .filter(|n| n.starts_with(&worker_prefix))
            .cloned()
            .collect();
        Observed {
            secret: secret || exp.created.contains_key(&secret_name),
            scheduler_expected: exp.created.contains_key(&scheduler_name),
            scheduler,
            service: service || exp.created.contains_key(&service_name),
            workers,
            oom_killed_while_deleted,
            workers_expected,
            scheduler_running,
            workers_running,
        }
    }
}

/// A pod's phase, from its status.
pub(super) fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Whether the pod is being deleted (it has a deletion timestamp).
pub(super) fn is_being_deleted(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Why Kubernetes itself ended or is ending the pod, if it says: its `DisruptionTarget`
/// condition (preemption, eviction through the API, a node's taint or shutdown) or the pod's
/// own reason (`Evicted` by a node under pressure), as "reason: message".
pub(super) fn disruption(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let condition = status.conditions.as_ref().and_then(|cs| {
        cs.iter()
            .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
    });
    let (reason, message) = match condition {
        Some(c) => (c.reason.as_deref(), c.message.as_deref()),
        None => (status.reason.as_deref(), status.message.as_deref()),
    };
    match (
        reason.filter(|r| !r.is_empty()),
        message.filter(|m| !m.is_empty()),
    ) {
        (Some(r), Some(m)) => Some(format!("{r}: {m}")),
        (Some(r), None) => Some(r.to_string()),
        (None, Some(m)) => Some(m.to_string()),
        (None, None) => None,
    }
}

/// Whether the pod's Ready condition is true.
pub(super) fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The state of the pod's (first) container, once the kubelet reports one.
pub(super) fn first_container_state(pod: &Pod) -> Option<&ContainerState> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()
}

/// When the pod's (first) container started, if it runs now.
fn running_since(pod: &Pod) -> Option<jiff::Timestamp> {
    let state = first_container_state(pod)?;
    Some(state.running.as_ref()?.started_at.as_ref()?.0)
}

/// How long the pod's (first) container has been running.
pub(super) fn running_for(pod: &Pod) -> Option<Duration> {
    jiff::Timestamp::now()
        .duration_since(running_since(pod)?)
        .try_into()
        .ok()
}

/// When the pod's (first) container started running, ms since the Unix epoch; none unless it
/// runs now.
fn running_since_ms(pod: &Pod) -> Option<i64> {
    running_since(pod).map(|t| t.as_millisecond())
}

/// The pod's container ended: `(exit code, reason, message)`.
pub(super) fn termination(pod: &Pod) -> Option<(i32, String, String)> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|cs| {
        let t = cs.state.as_ref()?.terminated.as_ref()?;
        Some((
            t.exit_code,
            t.reason.clone().unwrap_or_default(),
            t.message.clone().unwrap_or_default(),
        ))
    })
}

/// Why a pod is not running yet, in a few words (scheduling or container waiting reasons).
pub(super) fn waiting_reason(pod: &Pod) -> Option<(String, String)> {
    let status = pod.status.as_ref()?;
    if let Some(c) = status.conditions.as_ref().and_then(|cs| {
        cs.iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    }) {
        return Some((
            c.reason.clone().unwrap_or_else(|| "Unschedulable".into()),
            c.message.clone().unwrap_or_default(),
        ));
    }
    status.container_statuses.as_ref()?.iter().find_map(|cs| {
        let w = cs.state.as_ref()?.waiting.as_ref()?;
        Some((
            w.reason.clone().unwrap_or_else(|| "Waiting".into()),
            w.message.clone().unwrap_or_default(),
        ))
    })
}

/// A waiting reason that will not go away by itself.
pub(super) fn is_hopeless(reason: &str) -> bool {
    matches!(reason, "InvalidImageName" | "ErrImageNeverPull")
}

/// A pod's label `key`, borrowed.
fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

/// A pod's name, borrowed (empty if it has none).
pub(super) fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}
