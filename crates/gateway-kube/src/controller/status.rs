//! The status a pass writes: conditions, failures, the write itself (skipped when unchanged;
//! deferred while only a running cluster's counts change or a start progresses; held while a
//! teardown progresses), the Kubernetes Events its transitions record, and usage accounting
//! (the running pods' requests, metered into the status).

use super::observe::{Observed, RunningPod};
use super::{now_rfc3339, Context, Error};
use crate::build;
use crate::crd::{Condition, DaskCluster, DaskClusterStatus, Phase};
use gateway_model::{ClusterEvent, EventType, RunningUnit, UsageLedger, UsageMeter};
use kube::api::{Api, PostParams};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;

/// While a running cluster's workers are on their way to its target (pods created, starting,
/// stopping), status changes that only update counts (workers, ready workers, conditions,
/// usage) wait until the target is reached, or at most this long after the first change that
/// waits: a 100-worker scale-up, whose pods start one after another over ~20 s, then costs one
/// status write beside its 100 pod creations instead of one per pod event (or one every few
/// seconds), and a slower one still shows its progress. The gateway shows the written
/// ready-worker count (`workers_running`).
pub(crate) const COUNTS_WAIT_AT_MOST: Duration = Duration::from_secs(30);

/// While a cluster starts (Pending before and after a pass), its status changes (the
/// credentials and scheduler pod named, then the scheduler's condition going Created,
/// Starting, ContainerCreating, Starting again) wait at most this long after the first change
/// that waits. A scheduler on a ready node is ready in about 2 s, so a start writes its status
/// once, as Running, instead of five times; a slow one (an image pull, a full node) still shows
/// why it waits a few seconds later. A failure or a stop is written at once.
pub(crate) const START_PROGRESS_WAIT_AT_MOST: Duration = Duration::from_secs(3);

/// Usage buckets one DaskCluster's status keeps (35 days of hours; older ones merge).
const MAX_USAGE_HOURS: usize = 35 * 24;

/// Brings the status's usage record up to now if the running pods changed since it was
/// written (see [`gateway_model::usage`]). Each pod counts what its containers request (the
/// cluster's settings where they name nothing) from when its container started running (at
/// the earliest from the cluster's creation or claim) to when a pass sees it gone; an
/// unclaimed warm-pool member counts against no one.
pub(super) fn account(
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
    // Passes whose status waited accrued on top of the written record: continue from there,
    // so that a pod that ended meanwhile is counted until the pass that saw it gone, not until
    // the status is written at last.
    let unwritten = ctx.unwritten_usage(id, next.usage.as_ref());
    let continues_unwritten = unwritten.is_some();
    let mut ledger = unwritten.or_else(|| next.usage.clone()).unwrap_or_default();
    let needs_accrual = ledger.meter.needs_accrual(&units);
    if !needs_accrual && !continues_unwritten {
        return;
    }
    if needs_accrual {
        ledger.accrue(
            jiff::Timestamp::now().as_millisecond(),
            &units,
            MAX_USAGE_HOURS,
        );
    }
    next.usage = Some(ledger);
}

/// Usage a pass accrued but did not write (its status change waited), and the meter of the
/// written record it continues.
pub(super) struct UnwrittenUsage {
    written: Option<UsageMeter>,
    ledger: UsageLedger,
}

impl Context {
    /// Whether the API server dropped the usage record this process wrote for `id` (its CRD
    /// has no `status.usage`): accounting then stops for the cluster instead of rewriting the
    /// record on every pass; reported once.
    pub(super) fn usage_was_pruned(&self, id: &str, status: &DaskClusterStatus) -> bool {
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

    /// How much longer cluster `id`'s counts-only status change should wait before it is
    /// written (none: write it now), while its workers are short of or over `target`; see
    /// [`COUNTS_WAIT_AT_MOST`].
    pub(super) fn counts_wait(
        &self,
        id: &str,
        next: &DaskClusterStatus,
        target: i32,
    ) -> Option<Duration> {
        if next.replicas == target && next.ready_workers == target {
            return None;
        }
        self.wait_left(id, COUNTS_WAIT_AT_MOST)
    }

    /// How much longer cluster `id`'s status change should wait, `at_most` after the first
    /// change that waited (none: write it now).
    fn wait_left(&self, id: &str, at_most: Duration) -> Option<Duration> {
        let mut waiting = self.waiting_since.lock().unwrap_or_else(|e| e.into_inner());
        let first = *waiting.entry(id.to_string()).or_insert_with(Instant::now);
        Some(at_most.saturating_sub(first.elapsed())).filter(|w| !w.is_zero())
    }

    /// Notes that cluster `id`'s status is as written (nothing waits to be written).
    pub(super) fn status_is_written(&self, id: &str) {
        self.waiting_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.unwritten_usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// The usage cluster `id`'s unwritten passes accrued on top of `written` (the status's
    /// record), if they did. None if nothing waits, or if the status holds another record than
    /// the one they continued (another leader wrote since).
    pub(super) fn unwritten_usage(
        &self,
        id: &str,
        written: Option<&UsageLedger>,
    ) -> Option<UsageLedger> {
        let unwritten = self
            .unwritten_usage
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let u = unwritten.get(id)?;
        (u.written == written.map(|w| w.meter)).then(|| u.ledger.clone())
    }

    /// Keeps the usage of cluster `id`'s pass whose status was not written: `written` is the
    /// status's record, `accrued` the pass's.
    fn keep_unwritten_usage(
        &self,
        id: &str,
        written: Option<&UsageLedger>,
        accrued: Option<&UsageLedger>,
    ) {
        let mut unwritten = self
            .unwritten_usage
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match accrued {
            Some(ledger) if accrued != written => {
                unwritten.insert(
                    id.to_string(),
                    UnwrittenUsage {
                        written: written.map(|w| w.meter),
                        ledger: ledger.clone(),
                    },
                );
            }
            _ => {
                unwritten.remove(id);
            }
        }
    }
}

/// Sets condition `type_` in `status`, keeping its transition time when `status` is unchanged.
pub(super) fn set_condition(
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
pub(super) fn only_counts_differ(a: &DaskClusterStatus, b: &DaskClusterStatus) -> bool {
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
/// changes of counts, conditions and usage. A stopping cluster's passes pace its teardown,
/// and a deferral would hold them back (see [`is_teardown_progress`] for its counts).
pub(super) fn may_defer(old: &DaskClusterStatus, next: &DaskClusterStatus) -> bool {
    next.phase == Phase::Running && only_counts_differ(old, next)
}

/// Whether `next` only counts the progress of a teardown already written as Stopping: its
/// worker pods going one after another, the conditions and the usage they accrue. Such a
/// status is not written at all; the write that ends the teardown (Stopped or Failed) carries
/// the final counts and the usage up to that moment. A 100-worker teardown used to write its
/// status once per pass, about 25 times in a few seconds; nothing reads those counts while
/// the cluster stops (the gateway shows STOPPING).
pub(super) fn is_teardown_progress(old: &DaskClusterStatus, next: &DaskClusterStatus) -> bool {
    old.phase == Phase::Stopping && next.phase == Phase::Stopping && only_counts_differ(old, next)
}

/// Whether `next` only tells how a start goes: the cluster is Pending before and after (a
/// failure or a stop is not: it leaves Pending). Such a change waits at most
/// [`START_PROGRESS_WAIT_AT_MOST`]. A cluster without a status yet counts as Pending.
pub(super) fn is_start_progress(old: &DaskClusterStatus, next: &DaskClusterStatus) -> bool {
    old.phase == Phase::Pending && next.phase == Phase::Pending
}

/// What became of a status write.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum StatusWrite {
    /// Nothing changed.
    Unchanged,
    /// Written.
    Written,
    /// Only counts changed and they are still changing, or the cluster is still starting:
    /// deferred to a pass this much later.
    Deferred(Duration),
    /// Only a teardown's progress changed: left for the write that ends it
    /// ([`is_teardown_progress`]).
    Held,
}

/// Writes the status if it changed, with the object's resourceVersion as precondition.
pub(super) async fn write_status(
    ctx: &Context,
    dc: &DaskCluster,
    next: &DaskClusterStatus,
) -> Result<StatusWrite, Error> {
    let (ns, id) = build::identity(dc)?;
    let none = DaskClusterStatus::default();
    let old = dc.status.as_ref().unwrap_or(&none);
    let wait = if dc.status.as_ref() == Some(next) {
        ctx.status_is_written(&id);
        return Ok(StatusWrite::Unchanged);
    } else if may_defer(old, next) {
        ctx.counts_wait(&id, next, dc.spec.replicas.max(0))
    } else if is_start_progress(old, next) {
        ctx.wait_left(&id, START_PROGRESS_WAIT_AT_MOST)
    } else if is_teardown_progress(old, next) {
        ctx.keep_unwritten_usage(&id, old.usage.as_ref(), next.usage.as_ref());
        return Ok(StatusWrite::Held);
    } else {
        None
    };
    if let Some(wait) = wait {
        ctx.keep_unwritten_usage(&id, old.usage.as_ref(), next.usage.as_ref());
        return Ok(StatusWrite::Deferred(wait));
    }
    let mut obj = dc.clone();
    obj.status = Some(next.clone());
    obj.metadata.managed_fields = None;
    ctx.limiter.acquire(&id).await;
    let api: Api<DaskCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let written = api
        .replace_status(&id, &PostParams::default(), &obj)
        .await?;
    ctx.note_status_write(
        &id,
        dc.metadata.resource_version.as_deref(),
        written.metadata.resource_version.as_deref(),
    );
    ctx.status_is_written(&id);
    if next.usage.is_some() {
        ctx.usage_written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone());
    }
    Ok(StatusWrite::Written)
}

/// Moves `next` to Stopping because of a failure (written at once; the next pass tears down).
pub(super) fn fail(ctx: &Context, id: &str, next: &mut DaskClusterStatus, reason: String) {
    warn!(cluster = %id, %reason, "cluster failed");
    ctx.metrics.clusters_failed.inc();
    next.phase = Phase::Stopping;
    next.stop_failed = true;
    next.reason = Some(reason);
    next.addresses = None;
    next.stopping_since.get_or_insert_with(now_rfc3339);
}

/// The events a written status change tells: the cluster turned Running, began stopping
/// (failing), ended, or a worker failed. Each is recorded on the DaskCluster in a task of its
/// own (one of the term's: see [`Context::abort_event_tasks`]), behind the write budget; a
/// failure to record is logged, never retried.
pub(super) fn record_transitions(
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
        let task_ctx = ctx.clone();
        let (ns, id, uid) = (ns.clone(), id.clone(), dc.metadata.uid.clone());
        ctx.spawn_event_task(async move {
            task_ctx.limiter.acquire(&id).await;
            let client = task_ctx.client.clone();
            if let Err(e) = crate::events::record(client, &ns, &id, uid, &event).await {
                warn!(cluster = %id, "recording an event: {e}");
            }
        });
    }
}
