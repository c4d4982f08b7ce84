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
//! * **Stopping** (`spec.active: false`, or a failure, whose reason is written before anything
//!   is deleted): delete every child, then `Stopped` or `Failed` with the completion time.
//!   Finished DaskClusters are deleted after the retention.
//!
//! Writes go through a token bucket ([`RateLimiter`]) at which the clusters take turns. The
//! watch caches lag behind our own writes, so creations and deletions made in a pass are
//! remembered ([`Expectations`]) until the cache shows them; a second pass never creates the
//! same workers twice. The status is written
//! with the object's resourceVersion: a pass based on a stale object gets a conflict and is
//! simply run again.
//!
//! The parts, one job each: `observe.rs` (what exists of a cluster, and pod predicates),
//! `lifecycle.rs` (bring-up, teardown, finished clusters and their retention), `workers.rs` (a
//! running cluster's worker pods), `status.rs` (the status write, its events, usage accounting)
//! and `writes.rs` (creations, deletions and log reads against the API server). This file holds
//! the pass itself ([`reconcile`], [`error_policy`]) and what every part shares ([`Context`]).

mod lifecycle;
mod observe;
mod status;
mod workers;
mod writes;

use crate::build::{self, BuildError};
use crate::crd::{DaskCluster, DaskClusterStatus, Phase};
use crate::limiter::RateLimiter;
use crate::metrics::ControllerMetrics;
use crate::pod_cache::PodCache;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use lifecycle::{bring_up, finished, tear_down};
use status::{account, fail, record_transitions, write_status, StatusWrite, UnwrittenUsage};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

pub use lifecycle::{sweep_finished, FINISHED_SETTLE};

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
    /// Pods of this installation (watch cache), read one cluster at a time.
    pub pods: PodCache,
    /// Secrets of this installation (watch cache).
    pub secrets: Store<Secret>,
    /// Services of this installation (watch cache).
    pub services: Store<Service>,
    /// Paces every write.
    pub limiter: RateLimiter,
    /// Bounds the creations and deletions waiting for the API server (see
    /// [`writes::WRITES_IN_FLIGHT`]).
    in_flight: tokio::sync::Semaphore,
    /// Per cluster id: our writes the caches have not shown yet.
    pub expectations: Mutex<HashMap<String, Expectations>>,
    /// Per cluster id: since when a status change waits to be written (a running cluster's
    /// counts, a start's progress).
    waiting_since: Mutex<HashMap<String, Instant>>,
    /// Per cluster id: usage accrued by passes whose status was not written (deferred counts,
    /// a teardown's progress), and the meter of the written record it continues; see
    /// [`Context::unwritten_usage`].
    unwritten_usage: Mutex<HashMap<String, UnwrittenUsage>>,
    /// Per cluster id: the resourceVersion our last status write replaced, and the one it made
    /// (see [`Context::predates_own_write`]).
    status_writes: Mutex<HashMap<String, (String, String)>>,
    /// Clusters whose status this process wrote with a usage record. One that comes back
    /// without it had it dropped by an API server whose CRD predates usage accounting.
    usage_written: Mutex<HashSet<String>>,
    /// Whether that was already reported (once per process).
    usage_pruned_reported: AtomicBool,
    /// Event recordings in flight (see [`Context::abort_event_tasks`]).
    event_tasks: Mutex<JoinSet<()>>,
    /// Settings.
    pub settings: ControllerSettings,
    /// Counters (the process's, shared by every leadership term).
    pub metrics: ControllerMetrics,
}

impl Context {
    /// A context over `client` and the three caches, counting in `metrics`.
    pub fn new(
        client: Client,
        pods: PodCache,
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
            in_flight: tokio::sync::Semaphore::new(writes::WRITES_IN_FLIGHT),
            expectations: Mutex::new(HashMap::new()),
            waiting_since: Mutex::new(HashMap::new()),
            unwritten_usage: Mutex::new(HashMap::new()),
            status_writes: Mutex::new(HashMap::new()),
            usage_written: Mutex::new(HashSet::new()),
            usage_pruned_reported: AtomicBool::new(false),
            event_tasks: Mutex::new(JoinSet::new()),
            settings,
            metrics,
        }
    }

    /// Runs `task` (an Event recording) as one of this context's tasks.
    fn spawn_event_task(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.event_tasks.lock().unwrap_or_else(|e| e.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// Aborts the Event recordings still in flight. The leadership term that made them ended,
    /// and another replica may lead now: it records its own.
    pub fn abort_event_tasks(&self) {
        self.event_tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abort_all();
    }

    /// Remembers that this pass created `name` for cluster `id`.
    fn expect_created(&self, id: &str, name: &str) {
        let mut e = self.expectations.lock().unwrap_or_else(|e| e.into_inner());
        e.entry(id.to_string())
            .or_default()
            .created
            .insert(name.to_string(), Instant::now());
    }

    /// Remembers that this pass deleted pod `name` of cluster `id`.
    fn expect_deleted(&self, id: &str, name: &str) {
        let mut e = self.expectations.lock().unwrap_or_else(|e| e.into_inner());
        e.entry(id.to_string())
            .or_default()
            .deleted
            .insert(name.to_string(), Instant::now());
    }

    /// Forgets everything remembered about cluster `id` (it left the controller's cache).
    fn forget_expectations(&self, id: &str) {
        self.expectations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.status_is_written(id);
        self.usage_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.status_writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Notes that our status write replaced version `replaced` of cluster `id` with `made`.
    fn note_status_write(&self, id: &str, replaced: Option<&str>, made: Option<&str>) {
        let mut writes = self.status_writes.lock().unwrap_or_else(|e| e.into_inner());
        match (replaced, made) {
            (Some(replaced), Some(made)) if replaced != made => {
                writes.insert(id.to_string(), (replaced.to_string(), made.to_string()));
            }
            _ => {
                writes.remove(id);
            }
        }
    }

    /// Whether `dc` is the very version our last status write replaced: the cache has not
    /// shown that write yet. A pass over it would decide from a status we already changed,
    /// and its own write would fail its precondition (a conflict, then a repeated pass); the
    /// watch event of our write triggers the next pass instead. Right after a create, the
    /// events of the children the first pass made used to trigger such a pass every time.
    fn predates_own_write(&self, id: &str, dc: &DaskCluster) -> bool {
        let writes = self.status_writes.lock().unwrap_or_else(|e| e.into_inner());
        writes.get(id).is_some_and(|(replaced, _)| {
            dc.metadata.resource_version.as_deref() == Some(replaced.as_str())
        })
    }
}

/// When a pass skipped over a cluster the cache showed older than our own status write looks
/// again, should the watch event of that write not arrive first (it normally does, within
/// milliseconds).
const OWN_WRITE_RETRY: Duration = Duration::from_secs(1);

/// One pass over one DaskCluster (see the module docs).
pub async fn reconcile(dc: Arc<DaskCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let (ns, id) = build::identity(&dc)?;
    if ctx.predates_own_write(&id, &dc) {
        debug!(cluster = %id, "the cache has not shown our status write yet; waiting for it");
        return Ok(Action::requeue(OWN_WRITE_RETRY));
    }
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
    // A failure this pass found (the spec still wants the cluster) is written before anything
    // is deleted, and the next pass tears down: a controller stopped in between would leave
    // its successor only the missing scheduler pod to report, not why the cluster failed. A
    // stop the spec asks for keeps its reason there and tears down at once.
    let failed_now = dc.spec.active && status.phase != Phase::Stopping;
    // When to look again if nothing happens before: a stopping cluster as its teardown says
    // (at once after a failure is written); otherwise after this long.
    let (teardown, look_again) = if next.phase == Phase::Stopping && failed_now {
        (None, Duration::ZERO)
    } else if next.phase == Phase::Stopping {
        let action = tear_down(&ctx, &ns, &id, &observed, &mut next).await?;
        (Some(action), Duration::ZERO)
    } else if next.phase == Phase::Pending {
        // Until the start timeout is checked.
        let remaining =
            Duration::from_secs_f64(dc.spec.runtime.start_timeout).saturating_sub(created_age(&dc));
        let look_again = remaining.clamp(Duration::from_millis(500), Duration::from_secs(10));
        (None, look_again)
    } else if more_to_create(&dc, &next) {
        // More workers to create: continue at once, behind the clusters already queued (and
        // their writes take turns with everyone else's at the write budget).
        (None, Duration::ZERO)
    } else {
        (None, Duration::from_secs(300))
    };
    account(&ctx, &id, &dc, &observed, &mut next);
    let written = write_status(&ctx, &dc, &next).await?;
    if written == StatusWrite::Written {
        record_transitions(&ctx, &dc, &status, &next);
    }
    if let Some(action) = teardown {
        return Ok(action);
    }
    Ok(Action::requeue(match written {
        // The pass that writes the waiting status comes when the wait ends, or sooner.
        StatusWrite::Deferred(wait) => wait.min(look_again),
        _ => look_again,
    }))
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

/// Whether a running cluster still has worker pods to create (a scale-up proceeds in slices).
fn more_to_create(dc: &DaskCluster, next: &DaskClusterStatus) -> bool {
    next.phase == Phase::Running && next.replicas < dc.spec.replicas
}

/// How long ago the DaskCluster was created (zero if unknown).
fn created_age(dc: &DaskCluster) -> Duration {
    dc.metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| jiff::Timestamp::now().duration_since(t.0).try_into().ok())
        .unwrap_or_default()
}

/// Now, as the status's RFC 3339 timestamps (milliseconds).
fn now_rfc3339() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

/// How long ago the RFC 3339 timestamp `ts` was (none if it does not parse or is ahead).
fn age(ts: &str) -> Option<Duration> {
    let t: jiff::Timestamp = ts.parse().ok()?;
    let d = jiff::Timestamp::now().duration_since(t);
    d.try_into().ok()
}

#[cfg(test)]
mod tests;
