//! The DaskCluster controller: one level-triggered [`reconcile`] per cluster that compares the
//! spec (what the gateway asked for) with the children that exist (from watch caches) and acts:
//!
//! * **Pending**: make the credentials Secret, the scheduler Pod and its Service; the cluster is
//!   `Running` once the scheduler pod is ready (its preload answers `/api/health`), with the pod's
//!   address in the status. A scheduler pod that ends, or that is not ready within the start
//!   timeout, fails the cluster with a reason that names the cause (exit code and last log
//!   lines, image pull errors, the scheduler's "Unschedulable" message...).
//! * **Running**: keep `spec.replicas` worker pods. Finished workers (the scheduler retires
//!   surplus workers itself; they exit 0) and workers named in `spec.retiredWorkers` are deleted;
//!   failed workers are deleted and replaced, and the last failure is recorded with its reason
//!   (`OOMKilled` names the memory limit, other ends quote the last log lines); workers that
//!   fail before they joined the scheduler (never ready, and no "Registered to:" in their log)
//!   are start failures, and `workerFailureLimit` of them in a row fail the cluster; surplus
//!   workers that are not running yet are deleted. At most `worker_batch` pods are created per
//!   pass, concurrently, so a huge scale-up proceeds in slices and other clusters get their turn.
//! * **Stopping** (`spec.active: false`, or a failure): delete every child, then `Stopped` or
//!   `Failed` with the completion time. Finished DaskClusters are deleted after the retention.
//!
//! Writes go through a FIFO token bucket ([`RateLimiter`]). The watch caches lag behind our own
//! writes, so creations and deletions made in a pass are remembered ([`Expectations`]) until the
//! cache shows them; a second pass never creates the same workers twice. The status is written
//! with the object's resourceVersion: a pass based on a stale object gets a conflict and is
//! simply run again.

use crate::build::{self, BuildError};
use crate::crd::{
    Condition, DaskCluster, DaskClusterStatus, Phase, StatusAddresses, WorkerFailure,
};
use crate::lean::LeanPod;
use crate::limiter::RateLimiter;
use crate::metrics::ControllerMetrics;
use crate::names::{self, API_PORT, DASHBOARD_PORT, SCHEDULER_PORT};
use futures_util::future::join_all;
use gateway_model::{ClusterEvent, EventType, RunningUnit};
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{
    Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams, PropagationPolicy,
};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Creations and deletions sent to the API server at once, by all passes together. The client
/// speaks HTTP/1.1, one request per connection at a time: a scale-up that sent its 100 creations
/// at once opened 100 connections (a TLS handshake each, on both ends) that idled out after it.
/// A few in flight keep the API server as busy (it answers a creation in milliseconds) over
/// connections that stay open.
const WRITES_IN_FLIGHT: usize = 8;

/// How long a stop waits for pods to disappear before the cluster is declared finished anyway
/// (a node that is gone never confirms; garbage collection finishes the job).
const STOP_WAIT: Duration = Duration::from_secs(30);
/// How long our own creations and deletions are remembered while the cache catches up.
const EXPECTATION_TTL: Duration = Duration::from_secs(60);
/// A worker running this long proves the workers can run: the failure count resets, and its
/// failure later is not a start failure.
const WORKER_PROVEN_AFTER: Duration = Duration::from_secs(20);
/// Log lines of a failed scheduler or worker quoted in the cluster's status.
const LOG_LINES: i64 = 12;
/// Log lines read from a failed worker to tell whether it had joined the scheduler: enough to
/// reach the start-up banner of a worker that died soon after it.
const WORKER_LOG_LINES: i64 = 80;
/// What a Dask worker logs once the scheduler accepted it.
const WORKER_REGISTERED: &str = "Registered to:";
/// Status changes of a running cluster that only update counts (workers, ready workers,
/// conditions) are written at most this often per cluster: a 100-worker scale-up whose pods start over ~20 s then costs
/// about five status writes beside its 100 pod creations, not one per pod event. Nothing in the
/// gateway reads these counts; they are what `kubectl get daskclusters` shows.
pub(crate) const COUNTS_WRITE_EVERY: Duration = Duration::from_secs(5);

/// Why a reconcile pass failed; the error policy decides when to retry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The object is malformed (no namespace, name or uid).
    #[error(transparent)]
    Build(#[from] BuildError),
}

impl Error {
    /// A write based on a stale object: retry at once.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.is_conflict())
    }

    /// Short label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.is_conflict() => "conflict",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::Build(_) => "build",
        }
    }
}

/// Settings of the controller.
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// Namespace it manages.
    pub namespace: String,
    /// Installation id (label selector of every watch).
    pub instance: String,
    /// Worker pods created per pass of one cluster.
    pub worker_batch: usize,
    /// How long finished DaskClusters are kept.
    pub retention: Duration,
    /// Record Kubernetes Events on the DaskCluster when its phase changes or a worker fails
    /// (what `kubectl describe daskcluster` and the gateway's events API show).
    pub record_events: bool,
}

/// Creations and deletions made by earlier passes that the caches do not show yet.
#[derive(Default)]
pub struct Expectations {
    created: HashMap<String, Instant>,
    deleted: HashMap<String, Instant>,
}

/// What every reconcile pass shares.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Pods of this installation (watch cache).
    pub pods: Store<LeanPod>,
    /// Secrets of this installation (watch cache).
    pub secrets: Store<Secret>,
    /// Services of this installation (watch cache).
    pub services: Store<Service>,
    /// Paces every write.
    pub limiter: RateLimiter,
    /// Bounds the creations and deletions waiting for the API server (see
    /// [`WRITES_IN_FLIGHT`]).
    in_flight: tokio::sync::Semaphore,
    /// Per cluster id: our writes the caches have not shown yet.
    pub expectations: Mutex<HashMap<String, Expectations>>,
    /// Per cluster id: when its status was last written.
    status_written: Mutex<HashMap<String, Instant>>,
    /// Clusters whose status this process wrote with a usage record. One that comes back
    /// without it had it dropped by an API server whose CRD predates usage accounting.
    usage_written: Mutex<HashSet<String>>,
    /// Whether that was already reported (once per process).
    usage_pruned_reported: AtomicBool,
    /// Settings.
    pub settings: ControllerSettings,
    /// Counters (the process's, shared by every leadership term).
    pub metrics: ControllerMetrics,
}

fn now_rfc3339() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

fn age(ts: &str) -> Option<Duration> {
    let t: jiff::Timestamp = ts.parse().ok()?;
    let d = jiff::Timestamp::now().duration_since(t);
    d.try_into().ok()
}

/// A pod's phase, from its status.
fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn is_being_deleted(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// When the pod's (first) container started, if it runs now.
fn running_since(pod: &Pod) -> Option<jiff::Timestamp> {
    let state = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?;
    Some(state.running.as_ref()?.started_at.as_ref()?.0)
}

/// How long the pod's (first) container has been running.
fn running_for(pod: &Pod) -> Option<Duration> {
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

/// Usage buckets one DaskCluster's status keeps (35 days of hours; older ones merge).
const MAX_USAGE_HOURS: usize = 35 * 24;

/// Brings the status's usage record up to now if the running pods changed since it was
/// written (see [`gateway_model::usage`]). Each pod counts what its containers request (the
/// cluster's settings where they name nothing) from when its container started running (at
/// the earliest from the cluster's creation or claim) to when a pass sees it gone; an
/// unclaimed warm-pool member counts against no one.
fn account(
    ctx: &Context,
    id: &str,
    dc: &DaskCluster,
    observed: &Observed,
    next: &mut DaskClusterStatus,
) {
    if ctx.usage_was_pruned(id, next) {
        return;
    }
    let res = &dc.spec.settings.resources;
    let created = crate::backend::created_ms(dc).unwrap_or(0);
    let units: Vec<RunningUnit> = if dc.spec.pool.is_some() || next.phase.is_terminal() {
        Vec::new()
    } else {
        let unit = |p: &RunningPod, cores: f64, memory: u64| RunningUnit {
            started_ms: p.since.max(created),
            cores: p.cores.unwrap_or(cores),
            memory: p.memory.map_or(memory, |m| m.round() as u64),
        };
        observed
            .scheduler_running
            .iter()
            .map(|p| unit(p, res.scheduler_cores, res.scheduler_memory))
            .chain(
                observed
                    .workers_running
                    .iter()
                    .map(|p| unit(p, res.worker_cores, res.worker_memory)),
            )
            .collect()
    };
    let mut ledger = next.usage.clone().unwrap_or_default();
    if !ledger.meter.needs_accrual(&units) {
        return;
    }
    ledger.accrue(
        jiff::Timestamp::now().as_millisecond(),
        &units,
        MAX_USAGE_HOURS,
    );
    next.usage = Some(ledger);
}

/// Whether a pod that ended had become ready first (a worker's readiness probe passes once its
/// process serves): its Ready condition changed after the container started. A pod that never
/// became ready keeps the condition it got before its container ran.
fn was_ready(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    let changed = status
        .conditions
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_transition_time.as_ref());
    let started = status
        .container_statuses
        .as_ref()
        .and_then(|cs| cs.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .and_then(|t| t.started_at.as_ref());
    matches!((changed, started), (Some(c), Some(s)) if c.0 > s.0)
}

/// How long the pod's (first) container ran before it ended.
fn ran_for(pod: &Pod) -> Option<Duration> {
    let state = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?;
    let t = state.terminated.as_ref()?;
    let (started, finished) = (t.started_at.as_ref()?, t.finished_at.as_ref()?);
    finished.0.duration_since(started.0).try_into().ok()
}

/// What became of a failed worker pod, from its container's termination.
fn worker_failure(pod: &Pod) -> WorkerFailure {
    let name = pod.name_any();
    let (exit_code, reason, message) =
        termination(pod).unwrap_or((-1, String::new(), String::new()));
    let state = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    let time = state
        .and_then(|t| t.finished_at.as_ref())
        .map(|t| t.0.to_string());
    let text = if reason == "OOMKilled" {
        let limit = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.resources.as_ref())
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .map(|q| {
                let limit = gateway_model::parse_memory(&q.0)
                    .map(gateway_model::format_memory)
                    .unwrap_or_else(|_| q.0.clone());
                format!(" of {limit}")
            })
            .unwrap_or_default();
        format!("worker pod {name} was killed for exceeding its memory limit{limit} (OOMKilled)")
    } else {
        let reason = if reason.is_empty() { "ended" } else { &reason };
        let detail = if message.is_empty() {
            String::new()
        } else {
            format!(": {message}")
        };
        format!("worker pod {name} failed ({reason}, exit code {exit_code}){detail}")
    };
    WorkerFailure {
        pod: name,
        reason,
        exit_code,
        message: text,
        time,
    }
}

/// The pod's container ended: `(exit code, reason, message)`.
fn termination(pod: &Pod) -> Option<(i32, String, String)> {
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
fn waiting_reason(pod: &Pod) -> Option<(String, String)> {
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
fn is_hopeless(reason: &str) -> bool {
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
fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

/// What exists of one cluster, from the caches corrected by our expectations.
struct Observed {
    secret: bool,
    scheduler: Option<Arc<LeanPod>>,
    scheduler_expected: bool,
    service: bool,
    /// Worker pods not being deleted (by us or anyone).
    workers: Vec<Arc<LeanPod>>,
    /// Worker pods being deleted whose container was killed for its memory limit meanwhile
    /// (a worker the scheduler reported gone, deleted as retired before its pod said why).
    oom_killed_while_deleted: Vec<Arc<LeanPod>>,
    /// Names of worker pods we created that the cache does not show yet.
    workers_expected: Vec<String>,
    /// The scheduler pod, if its container runs (being deleted or not).
    scheduler_running: Option<RunningPod>,
    /// Every worker pod whose container runs (being deleted or not: it holds what it
    /// requested until it ends).
    workers_running: Vec<RunningPod>,
}

/// A pod whose container runs, as usage accounting sees it.
#[derive(Clone, Copy, Debug)]
struct RunningPod {
    /// When its (first) container started, ms since the Unix epoch.
    since: i64,
    /// The cores its containers request (none: no container says).
    cores: Option<f64>,
    /// The memory (bytes) its containers request (none: no container says).
    memory: Option<f64>,
}

impl RunningPod {
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
    /// A context over `client` and the three caches, counting in `metrics`.
    pub fn new(
        client: Client,
        pods: Store<LeanPod>,
        secrets: Store<Secret>,
        services: Store<Service>,
        limiter: RateLimiter,
        settings: ControllerSettings,
        metrics: ControllerMetrics,
    ) -> Self {
        Context {
            client,
            pods,
            secrets,
            services,
            limiter,
            in_flight: tokio::sync::Semaphore::new(WRITES_IN_FLIGHT),
            expectations: Mutex::new(HashMap::new()),
            status_written: Mutex::new(HashMap::new()),
            usage_written: Mutex::new(HashSet::new()),
            usage_pruned_reported: AtomicBool::new(false),
            settings,
            metrics,
        }
    }

    fn expect_created(&self, id: &str, name: &str) {
        let mut e = self.expectations.lock().unwrap_or_else(|e| e.into_inner());
        e.entry(id.to_string())
            .or_default()
            .created
            .insert(name.to_string(), Instant::now());
    }

    fn expect_deleted(&self, id: &str, name: &str) {
        let mut e = self.expectations.lock().unwrap_or_else(|e| e.into_inner());
        e.entry(id.to_string())
            .or_default()
            .deleted
            .insert(name.to_string(), Instant::now());
    }

    fn forget_expectations(&self, id: &str) {
        self.expectations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.status_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.usage_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Whether the API server dropped the usage record this process wrote for `id` (its CRD
    /// has no `status.usage`): accounting then stops for the cluster instead of rewriting the
    /// record on every pass; reported once.
    fn usage_was_pruned(&self, id: &str, status: &DaskClusterStatus) -> bool {
        let written = self
            .usage_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id);
        if !written || status.usage.is_some() {
            return false;
        }
        if !self.usage_pruned_reported.swap(true, Ordering::Relaxed) {
            warn!(cluster = %id, "the API server drops status.usage: the DaskCluster CRD predates usage accounting; apply the chart's CRD (charts/dask-gateway-rs/files/daskcluster-crd.yaml) to account usage");
        }
        true
    }

    /// Whether a status change that only updates counts should wait (one was written less
    /// than [`COUNTS_WRITE_EVERY`] ago).
    fn counts_write_deferred(&self, id: &str) -> bool {
        self.status_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .is_some_and(|t| t.elapsed() < COUNTS_WRITE_EVERY)
    }

    fn status_was_written(&self, id: &str) {
        self.status_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), Instant::now());
    }

    fn observe(&self, ns: &str, id: &str) -> Observed {
        let in_store = |name: &str| -> Option<Arc<LeanPod>> {
            self.pods.get(&ObjectRef::new(name).within(ns))
        };
        // Runs on every pass over every pod of the installation: compares in place, copies
        // nothing but the pointers it keeps.
        let mut workers: Vec<Arc<LeanPod>> = self
            .pods
            .state()
            .into_iter()
            .filter(|p| {
                p.metadata.namespace.as_deref() == Some(ns)
                    && label(p, names::LABEL_CLUSTER) == Some(id)
                    && label(p, names::LABEL_COMPONENT) == Some(names::COMPONENT_WORKER)
            })
            .collect();
        let scheduler_name = names::scheduler_pod_name(id);
        let (secret_name, service_name) = (names::secret_name(id), names::service_name(id));
        let mut scheduler = in_store(&scheduler_name);
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
        let scheduler_running = scheduler.as_deref().and_then(|p| RunningPod::of(p));
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

/// Creates `obj` unless it exists already (rate limited, at most [`WRITES_IN_FLIGHT`] at once).
/// The API server's answer (the whole object) is read but not decoded: nothing uses it.
async fn create<K>(ctx: &Context, ns: &str, obj: &K) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + serde::Serialize,
{
    let body = serde_json::to_vec(obj).map_err(kube::Error::SerdeError)?;
    let request = kube::core::Request::new(K::url_path(&(), Some(ns)))
        .create(&PostParams::default(), body)
        .map_err(kube::Error::BuildRequest)?;
    ctx.limiter.acquire().await;
    let _slot = ctx.in_flight.acquire().await;
    match ctx.client.request_text(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes object `name` (rate limited, at most [`WRITES_IN_FLIGHT`] at once); a missing
/// object is fine. The answer is not decoded.
async fn delete<K>(ctx: &Context, ns: &str, name: &str) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    let request = kube::core::Request::new(K::url_path(&(), Some(ns)))
        .delete(name, &dp)
        .map_err(kube::Error::BuildRequest)?;
    ctx.limiter.acquire().await;
    let _slot = ctx.in_flight.acquire().await;
    match ctx.client.request_text(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn delete_pod(ctx: &Context, ns: &str, id: &str, name: &str) -> Result<(), Error> {
    delete::<Pod>(ctx, ns, name).await?;
    ctx.expect_deleted(id, name);
    ctx.metrics.pods_deleted.inc();
    Ok(())
}

/// The last lines of a pod's log, for failure reasons (empty if unavailable).
async fn last_log_lines(ctx: &Context, ns: &str, pod: &str, container: &str, lines: i64) -> String {
    ctx.limiter.acquire().await;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let lp = LogParams {
        container: Some(container.into()),
        tail_lines: Some(lines),
        ..LogParams::default()
    };
    match api.logs(pod, &lp).await {
        Ok(text) => text.trim().to_string(),
        Err(e) => {
            debug!(pod, "no logs: {e}");
            String::new()
        }
    }
}

/// Sets condition `type_` in `status`, keeping its transition time when `status` is unchanged.
fn set_condition(
    status: &mut DaskClusterStatus,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
) {
    let value = if ok { "True" } else { "False" };
    let time = match status.conditions.iter().find(|c| c.type_ == type_) {
        Some(c) if c.status == value => c.last_transition_time.clone(),
        _ => now_rfc3339(),
    };
    status.conditions.retain(|c| c.type_ != type_);
    status.conditions.push(Condition {
        type_: type_.into(),
        status: value.into(),
        reason: reason.into(),
        message: message.chars().take(1024).collect(),
        last_transition_time: time,
    });
    status.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// Whether `a` and `b` differ in worker counts and conditions only.
fn only_counts_differ(a: &DaskClusterStatus, b: &DaskClusterStatus) -> bool {
    let strip = |s: &DaskClusterStatus| DaskClusterStatus {
        replicas: 0,
        ready_workers: 0,
        conditions: Vec::new(),
        usage: None,
        ..s.clone()
    };
    strip(a) == strip(b)
}

/// Whether writing `next` over `old` may wait for a later pass: only a running cluster's
/// changes of counts, conditions and usage, when its status was written a moment ago. A
/// stopping cluster's passes pace its teardown, and a deferral would hold them back.
fn may_defer(old: &DaskClusterStatus, next: &DaskClusterStatus, written_recently: bool) -> bool {
    next.phase == Phase::Running && only_counts_differ(old, next) && written_recently
}

/// What became of a status write.
#[derive(Debug, PartialEq, Eq)]
enum StatusWrite {
    /// Nothing changed.
    Unchanged,
    /// Written.
    Written,
    /// Only counts changed and they were written a moment ago: deferred to a later pass.
    Deferred,
}

/// Writes the status if it changed, with the object's resourceVersion as precondition.
async fn write_status(
    ctx: &Context,
    dc: &DaskCluster,
    next: &DaskClusterStatus,
) -> Result<StatusWrite, Error> {
    let (ns, id) = build::identity(dc)?;
    match dc.status.as_ref() {
        Some(old) if old == next => return Ok(StatusWrite::Unchanged),
        Some(old) if may_defer(old, next, ctx.counts_write_deferred(&id)) => {
            return Ok(StatusWrite::Deferred)
        }
        _ => {}
    }
    let mut obj = dc.clone();
    obj.status = Some(next.clone());
    obj.metadata.managed_fields = None;
    ctx.limiter.acquire().await;
    let api: Api<DaskCluster> = Api::namespaced(ctx.client.clone(), &ns);
    api.replace_status(&id, &PostParams::default(), &obj)
        .await?;
    ctx.status_was_written(&id);
    if next.usage.is_some() {
        ctx.usage_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone());
    }
    Ok(StatusWrite::Written)
}

/// Moves `next` to Stopping because of a failure (teardown follows in the same pass).
fn fail(ctx: &Context, id: &str, next: &mut DaskClusterStatus, reason: String) {
    warn!(cluster = %id, %reason, "cluster failed");
    ctx.metrics.clusters_failed.inc();
    next.phase = Phase::Stopping;
    next.stop_failed = true;
    next.reason = Some(reason);
    next.addresses = None;
    next.stopping_since.get_or_insert_with(now_rfc3339);
}

/// One pass over one DaskCluster (see the module docs).
pub async fn reconcile(dc: Arc<DaskCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let (ns, id) = build::identity(&dc)?;
    let status = dc.status.clone().unwrap_or_default();
    let mut next = status.clone();
    let observed = ctx.observe(&ns, &id);

    if status.phase.is_terminal() {
        return finished(&dc, &ctx, &ns, &id, &observed).await;
    }
    if !dc.spec.active && next.phase != Phase::Stopping {
        let stop = dc.spec.stop.clone();
        next.phase = Phase::Stopping;
        next.stop_failed = stop.as_ref().is_some_and(|s| s.failed);
        next.reason = Some(stop.map_or_else(|| "stopped".to_string(), |s| s.reason));
        next.addresses = None;
        next.stopping_since = Some(now_rfc3339());
        info!(cluster = %id, reason = next.reason.as_deref().unwrap_or(""), "stopping cluster");
    }
    if next.phase != Phase::Stopping {
        if let Err(e) = bring_up(&dc, &ctx, &ns, &id, &observed, &mut next).await {
            match e {
                Error::Build(b) => fail(&ctx, &id, &mut next, b.to_string()),
                other => return Err(other),
            }
        }
    }
    let action = if next.phase == Phase::Stopping {
        tear_down(&ctx, &ns, &id, &observed, &mut next).await?
    } else if next.phase == Phase::Pending {
        let remaining =
            Duration::from_secs_f64(dc.spec.runtime.start_timeout).saturating_sub(created_age(&dc));
        Action::requeue(remaining.clamp(Duration::from_millis(500), Duration::from_secs(10)))
    } else if more_to_create(&dc, &next) {
        // More workers to create: continue at once, behind the clusters already queued (the
        // write budget is shared first come, first served).
        Action::requeue(Duration::ZERO)
    } else {
        Action::requeue(Duration::from_secs(300))
    };
    account(&ctx, &id, &dc, &observed, &mut next);
    let written = write_status(&ctx, &dc, &next).await?;
    if written == StatusWrite::Written {
        record_transitions(&ctx, &dc, &status, &next);
    }
    if written == StatusWrite::Deferred && !more_to_create(&dc, &next) {
        return Ok(Action::requeue(COUNTS_WRITE_EVERY));
    }
    Ok(action)
}

/// The events a written status change tells: the cluster turned Running, began stopping
/// (failing), ended, or a worker failed. Each is recorded on the DaskCluster in a task of its
/// own, behind the write budget; a failure to record is logged, never retried.
fn record_transitions(
    ctx: &Arc<Context>,
    dc: &DaskCluster,
    old: &DaskClusterStatus,
    next: &DaskClusterStatus,
) {
    if !ctx.settings.record_events {
        return;
    }
    let reason_text = || next.reason.clone().unwrap_or_default();
    let mut events = Vec::new();
    if next.phase != old.phase {
        match next.phase {
            Phase::Running => {
                let at = next
                    .addresses
                    .as_ref()
                    .map_or(String::new(), |a| a.scheduler.clone());
                events.push((
                    EventType::Normal,
                    "Running",
                    format!("the scheduler is up at {at}"),
                ));
            }
            Phase::Stopping if next.stop_failed => {
                events.push((EventType::Warning, "Failing", reason_text()))
            }
            Phase::Stopping => events.push((EventType::Normal, "Stopping", reason_text())),
            Phase::Stopped => events.push((EventType::Normal, "Stopped", reason_text())),
            Phase::Failed => events.push((EventType::Warning, "Failed", reason_text())),
            Phase::Pending => {}
        }
    }
    if let Some(failure) = &next.last_worker_failure {
        if old.last_worker_failure.as_ref().map(|f| &f.pod) != Some(&failure.pod) {
            events.push((EventType::Warning, "WorkerFailed", failure.message.clone()));
        }
    }
    let Ok((ns, id)) = build::identity(dc) else {
        return;
    };
    for (kind, reason, message) in events {
        let event = ClusterEvent::new(
            jiff::Timestamp::now().as_millisecond(),
            kind,
            reason,
            message,
            "controller",
        );
        let (ctx, ns, id, uid) = (ctx.clone(), ns.clone(), id.clone(), dc.metadata.uid.clone());
        tokio::spawn(async move {
            ctx.limiter.acquire().await;
            if let Err(e) = crate::events::record(ctx.client.clone(), &ns, &id, uid, &event).await {
                warn!(cluster = %id, "recording an event: {e}");
            }
        });
    }
}

/// Whether a running cluster still has worker pods to create (a scale-up proceeds in slices).
fn more_to_create(dc: &DaskCluster, next: &DaskClusterStatus) -> bool {
    next.phase == Phase::Running && next.replicas < dc.spec.replicas
}

fn created_age(dc: &DaskCluster) -> Duration {
    dc.metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| jiff::Timestamp::now().duration_since(t.0).try_into().ok())
        .unwrap_or_default()
}

/// Pending and Running: credentials, scheduler, service, then the workers.
async fn bring_up(
    dc: &DaskCluster,
    ctx: &Context,
    ns: &str,
    id: &str,
    observed: &Observed,
    next: &mut DaskClusterStatus,
) -> Result<(), Error> {
    if !observed.secret {
        create(ctx, ns, &build::secret(dc)?).await?;
        ctx.expect_created(id, &names::secret_name(id));
    }
    next.credentials = Some(names::secret_name(id));
    let scheduler_name = names::scheduler_pod_name(id);
    let scheduler = match &observed.scheduler {
        Some(pod) => pod.clone(),
        None if observed.scheduler_expected => {
            next.scheduler_pod = Some(scheduler_name);
            return Ok(());
        }
        None if next.scheduler_pod.is_some() => {
            fail(ctx, id, next, "the scheduler pod was deleted".into());
            return Ok(());
        }
        None => {
            create(ctx, ns, &build::scheduler_pod(dc)?).await?;
            ctx.expect_created(id, &scheduler_name);
            next.scheduler_pod = Some(scheduler_name);
            set_condition(
                next,
                "SchedulerReady",
                false,
                "Created",
                "the scheduler pod was created",
            );
            return Ok(());
        }
    };
    if !observed.service {
        create(ctx, ns, &build::service(dc)?).await?;
        ctx.expect_created(id, &names::service_name(id));
    }
    next.service = Some(names::service_name(id));

    // The scheduler ended: the cluster fails with what it said last.
    if let Some((code, reason, message)) = termination(&scheduler).or_else(|| {
        matches!(pod_phase(&scheduler), "Failed" | "Succeeded")
            .then(|| (-1, String::new(), String::new()))
    }) {
        let logs =
            last_log_lines(ctx, ns, &scheduler.name_any(), "dask-scheduler", LOG_LINES).await;
        let mut why = format!("the scheduler exited (exit code {code}");
        if !reason.is_empty() {
            why.push_str(&format!(", {reason}"));
        }
        why.push(')');
        if !message.is_empty() {
            why.push_str(&format!(": {message}"));
        }
        if !logs.is_empty() {
            why.push_str(&format!("; last log lines:\n{logs}"));
        }
        set_condition(next, "SchedulerReady", false, "Terminated", &why);
        fail(ctx, id, next, why);
        return Ok(());
    }

    let pod_ip = scheduler.status.as_ref().and_then(|s| s.pod_ip.clone());
    match pod_ip.filter(|_| pod_ready(&scheduler)) {
        Some(ip) => {
            if next.phase == Phase::Pending {
                info!(cluster = %id, scheduler = %ip, "cluster running");
                ctx.metrics.clusters_running.inc();
                next.start_time = Some(now_rfc3339());
            }
            next.phase = Phase::Running;
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip
            };
            next.addresses = Some(StatusAddresses {
                scheduler: format!("tls://{host}:{SCHEDULER_PORT}"),
                dashboard: format!("http://{host}:{DASHBOARD_PORT}"),
                api: format!("http://{host}:{API_PORT}"),
            });
            next.reason = None;
            set_condition(next, "SchedulerReady", true, "Ready", "");
        }
        None if next.phase == Phase::Running => {
            // Ready once, not now (probe failing): keep running; a real end shows as termination.
            set_condition(
                next,
                "SchedulerReady",
                false,
                "NotReady",
                "the scheduler's readiness probe fails",
            );
        }
        None => {
            let (reason, message) = waiting_reason(&scheduler)
                .unwrap_or_else(|| ("Starting".into(), "the scheduler is starting".into()));
            set_condition(next, "SchedulerReady", false, &reason, &message);
            let timeout = Duration::from_secs_f64(dc.spec.runtime.start_timeout);
            let waited = created_age(dc);
            let detail = if message.is_empty() {
                reason.clone()
            } else {
                format!("{reason}: {message}")
            };
            next.reason = Some(format!("waiting for the scheduler ({detail})"));
            if is_hopeless(&reason) {
                fail(
                    ctx,
                    id,
                    next,
                    format!("the scheduler cannot start: {detail}"),
                );
            } else if waited > timeout {
                fail(
                    ctx,
                    id,
                    next,
                    format!(
                        "the scheduler did not become ready within {} s ({detail})",
                        timeout.as_secs_f64()
                    ),
                );
            }
            return Ok(());
        }
    }
    let address = next
        .addresses
        .as_ref()
        .map(|a| a.scheduler.clone())
        .unwrap_or_default();
    reconcile_workers(dc, ctx, ns, id, observed, next, &address).await
}

/// Running: make the worker pods match `spec.replicas` (see the module docs).
async fn reconcile_workers(
    dc: &DaskCluster,
    ctx: &Context,
    ns: &str,
    id: &str,
    observed: &Observed,
    next: &mut DaskClusterStatus,
    scheduler_address: &str,
) -> Result<(), Error> {
    let retired: HashSet<&str> = dc.spec.retired_workers.iter().map(String::as_str).collect();
    let mut live: Vec<&Arc<LeanPod>> = Vec::new();
    let mut last_failure = None;
    // A worker that ended in failure is recorded whichever way its pod goes; one the scheduler
    // reported gone (retired) had joined it, so it is never a start failure.
    let record = |next: &mut DaskClusterStatus, failure: WorkerFailure| {
        if next.last_worker_failure.as_ref().map(|f| &f.pod) != Some(&failure.pod) {
            info!(cluster = %id, "{}", failure.message);
            next.last_worker_failure = Some(failure);
        }
    };
    for pod in &observed.oom_killed_while_deleted {
        record(next, worker_failure(pod));
    }
    for pod in &observed.workers {
        let name = pod_name(pod);
        let phase = pod_phase(pod);
        let ended_in_failure = phase == "Failed"
            || termination(pod).is_some_and(|(code, reason, _)| code != 0 || reason == "OOMKilled");
        if retired.contains(name) || phase == "Succeeded" {
            if phase == "Succeeded" {
                next.worker_failures = 0;
            }
            if ended_in_failure {
                record(next, worker_failure(pod));
            }
            delete_pod(ctx, ns, id, name).await?;
        } else if ended_in_failure {
            let mut failure = worker_failure(pod);
            let mut proven =
                was_ready(pod) || ran_for(pod).is_some_and(|d| d >= WORKER_PROVEN_AFTER);
            let oom = failure.reason == "OOMKilled";
            if !proven || !oom {
                // Its log tells whether it joined the scheduler, and why it ended.
                let log = last_log_lines(ctx, ns, name, "dask-worker", WORKER_LOG_LINES).await;
                proven |= log.contains(WORKER_REGISTERED);
                let tail: Vec<&str> = log.lines().rev().take(LOG_LINES as usize).collect();
                if !oom && !tail.is_empty() {
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    failure.message =
                        format!("{}; last log lines:\n{}", failure.message, tail.join("\n"));
                }
            }
            if proven {
                // It ran: the workers can start; this one died at work (e.g. out of memory).
                next.worker_failures = 0;
            } else {
                next.worker_failures += 1;
                last_failure = Some(failure.message.clone());
            }
            record(next, failure);
            delete_pod(ctx, ns, id, name).await?;
        } else {
            if running_for(pod).is_some_and(|d| d >= WORKER_PROVEN_AFTER) {
                next.worker_failures = 0;
            }
            live.push(pod);
        }
    }
    let limit = dc.spec.runtime.worker_failure_limit.max(1);
    if next.worker_failures >= limit {
        let last = last_failure.unwrap_or_else(|| "worker pods kept failing".into());
        fail(
            ctx,
            id,
            next,
            format!(
                "{} worker pods failed in a row; the last: {last}",
                next.worker_failures
            ),
        );
        return Ok(());
    }
    let wanted = dc.spec.replicas.max(0) as usize;
    let mut count = live.len() + observed.workers_expected.len();
    if count < wanted {
        let n = (wanted - count).min(ctx.settings.worker_batch);
        let mut pods = Vec::with_capacity(n);
        for _ in 0..n {
            let name = names::new_worker_pod_name(id);
            pods.push((
                name.clone(),
                build::worker_pod(dc, &name, scheduler_address)?,
            ));
        }
        let results = join_all(pods.iter().map(|(_, p)| create(ctx, ns, p))).await;
        let mut first_error = None;
        for ((name, _), r) in pods.iter().zip(results) {
            match r {
                Ok(()) => {
                    ctx.expect_created(id, name);
                    ctx.metrics.pods_created.inc();
                    count += 1;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            // Quota refusals and the like: report what was created, retry later.
            next.replicas = count as i32;
            warn!(cluster = %id, "creating worker pods: {e}");
            set_condition(next, "WorkersReady", false, "CreateFailed", &e.to_string());
            return Err(e);
        }
    } else if count > wanted {
        // Only workers that are not running yet are removed; the scheduler retires running ones.
        let mut pending: Vec<&&Arc<LeanPod>> =
            live.iter().filter(|p| pod_phase(p) == "Pending").collect();
        pending.sort_by_key(|p| std::cmp::Reverse(p.metadata.creation_timestamp.clone()));
        for pod in pending.into_iter().take(count - wanted) {
            delete_pod(ctx, ns, id, &pod.name_any()).await?;
            count -= 1;
        }
    }
    next.replicas = count as i32;
    next.ready_workers = live.iter().filter(|p| pod_ready(p)).count() as i32;
    let ready = next.ready_workers as usize >= wanted;
    set_condition(
        next,
        "WorkersReady",
        ready,
        if ready { "Ready" } else { "Scaling" },
        &format!("{} of {wanted} workers ready", next.ready_workers),
    );
    Ok(())
}

/// Stopping: delete every child; finished once nothing is left (or after [`STOP_WAIT`]).
async fn tear_down(
    ctx: &Context,
    ns: &str,
    id: &str,
    observed: &Observed,
    next: &mut DaskClusterStatus,
) -> Result<Action, Error> {
    next.addresses = None;
    for pod in &observed.workers {
        delete_pod(ctx, ns, id, &pod.name_any()).await?;
    }
    if let Some(s) = &observed.scheduler {
        delete_pod(ctx, ns, id, &s.name_any()).await?;
    }
    if observed.service {
        delete::<Service>(ctx, ns, &names::service_name(id)).await?;
    }
    if observed.secret {
        delete::<Secret>(ctx, ns, &names::secret_name(id)).await?;
    }
    // Pods stay in the cache until the kubelet has stopped them.
    let remaining = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns)
                && p.labels().get(names::LABEL_CLUSTER).map(String::as_str) == Some(id)
        })
        .count();
    let since = next.stopping_since.get_or_insert_with(now_rfc3339).clone();
    let waited = age(&since).unwrap_or_default();
    if remaining == 0 || waited > STOP_WAIT {
        next.phase = if next.stop_failed {
            Phase::Failed
        } else {
            Phase::Stopped
        };
        next.completion_time = Some(now_rfc3339());
        next.replicas = 0;
        next.ready_workers = 0;
        set_condition(next, "SchedulerReady", false, "Stopped", "");
        set_condition(next, "WorkersReady", false, "Stopped", "");
        info!(cluster = %id, phase = ?next.phase, "cluster finished");
        return Ok(Action::requeue(
            ctx.settings.retention.max(Duration::from_secs(1)),
        ));
    }
    next.replicas = observed.workers.len() as i32;
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// Stopped or Failed: nothing may remain; past the retention the DaskCluster itself goes.
async fn finished(
    dc: &DaskCluster,
    ctx: &Context,
    ns: &str,
    id: &str,
    observed: &Observed,
) -> Result<Action, Error> {
    for pod in &observed.workers {
        delete_pod(ctx, ns, id, &pod.name_any()).await?;
    }
    if let Some(s) = &observed.scheduler {
        delete_pod(ctx, ns, id, &s.name_any()).await?;
    }
    // The teardown deleted what the cache showed then; a child it had not seen yet (created
    // just before the failure) is removed here.
    if observed.service {
        delete::<Service>(ctx, ns, &names::service_name(id)).await?;
    }
    if observed.secret {
        delete::<Secret>(ctx, ns, &names::secret_name(id)).await?;
    }
    let ended = finished_for(dc);
    let retention = ctx.settings.retention;
    if ended >= retention {
        info!(cluster = %id, "deleting finished cluster past its retention");
        delete::<DaskCluster>(ctx, ns, id).await?;
        ctx.forget_expectations(id);
        return Ok(Action::await_change());
    }
    // Settled (nothing left, and long enough for the caches to show any child made just
    // before the end): out of the hot caches. The controller's and the gateways' watches
    // exclude labelled clusters; the API reads them on demand and the retention sweep
    // (`sweep_finished`) deletes them.
    let had_children = observed.scheduler.is_some()
        || !observed.workers.is_empty()
        || observed.service
        || observed.secret;
    if ended >= FINISHED_SETTLE && !had_children {
        mark_finished(ctx, ns, id).await?;
        ctx.forget_expectations(id);
        return Ok(Action::await_change());
    }
    let next = if ended < FINISHED_SETTLE {
        FINISHED_SETTLE - ended
    } else {
        Duration::from_secs(1)
    };
    Ok(Action::requeue(
        next.min(retention - ended).max(Duration::from_secs(1)),
    ))
}

/// How long ago a finished cluster completed (zero if it has no completion time).
fn finished_for(dc: &DaskCluster) -> Duration {
    dc.status
        .as_ref()
        .and_then(|s| s.completion_time.as_deref())
        .and_then(age)
        .unwrap_or_default()
}

/// How long a finished cluster stays in the controller's cache before it is labelled out.
pub const FINISHED_SETTLE: Duration = Duration::from_secs(30);

/// Labels a finished DaskCluster `dask-gateway-rs.io/finished=true`.
async fn mark_finished(ctx: &Context, ns: &str, id: &str) -> Result<(), Error> {
    ctx.limiter.acquire().await;
    let api: Api<DaskCluster> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({"metadata": {"labels": {names::LABEL_FINISHED: "true"}}});
    match api
        .patch(id, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the finished (labelled) DaskClusters of `instance` in `ns` whose completion is
/// older than `retention`; returns how many. The controller runs it periodically.
pub async fn sweep_finished(ctx: &Context, ns: &str, retention: Duration) -> Result<usize, Error> {
    let api: Api<DaskCluster> = Api::namespaced(ctx.client.clone(), ns);
    let selector = format!(
        "{},{}=true",
        names::instance_selector(&ctx.settings.instance),
        names::LABEL_FINISHED
    );
    ctx.limiter.acquire().await;
    let list = api.list(&ListParams::default().labels(&selector)).await?;
    let mut deleted = 0;
    for dc in list.items {
        if finished_for(&dc) >= retention {
            delete::<DaskCluster>(ctx, ns, &dc.name_any()).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// When a failed pass is retried: conflicts at once, everything else after a pause.
pub fn error_policy(dc: Arc<DaskCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    if error.is_conflict() {
        debug!(cluster = %dc.name_any(), "stale object; reconciling again");
        return Action::requeue(Duration::from_millis(50));
    }
    warn!(cluster = %dc.name_any(), kind = error.metric_label(), "reconcile failed: {error}");
    Action::requeue(Duration::from_secs(2))
}

#[cfg(test)]
mod tests;
