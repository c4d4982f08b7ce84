//! A running cluster's workers: [`reconcile_workers`] keeps `spec.replicas` worker pods,
//! deletes finished, retired and surplus ones, and tells a worker that failed at work from one
//! that failed to start (its readiness, how long it ran, and its log).

use super::observe::{
    disruption, first_container_state, pod_name, pod_phase, pod_ready, running_for, termination,
    Observed,
};
use super::status::{fail, set_condition};
use super::writes::{create, delete_pod, last_log_lines, LOG_LINES};
use super::{Context, Error};
use crate::build;
use crate::crd::{DaskCluster, DaskClusterStatus, WorkerFailure};
use crate::lean::LeanPod;
use crate::names;
use futures_util::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use std::collections::HashSet;
use std::time::Duration;
use tracing::{info, warn};

/// A worker running this long proves the workers can run: the failure count resets, and its
/// failure later is not a start failure.
const WORKER_PROVEN_AFTER: Duration = Duration::from_secs(20);

/// Log lines read from a failed worker to tell whether it had joined the scheduler: enough to
/// reach the start-up banner of a worker that died soon after it.
const WORKER_LOG_LINES: i64 = 80;

/// What a Dask worker logs once the scheduler accepted it.
const WORKER_REGISTERED: &str = "Registered to:";

/// Running: make the worker pods match `spec.replicas` (see the controller's module docs).
pub(super) async fn reconcile_workers(
    dc: &DaskCluster,
    ctx: &Context,
    ns: &str,
    id: &str,
    observed: &Observed,
    next: &mut DaskClusterStatus,
    scheduler_address: &str,
) -> Result<(), Error> {
    let retired: HashSet<&str> = dc.spec.retired_workers.iter().map(String::as_str).collect();
    let mut live: Vec<&LeanPod> = Vec::new();
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
                let log = last_log_lines(ctx, ns, id, name, "dask-worker", WORKER_LOG_LINES).await;
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
        let results = join_all(pods.iter().map(|(_, p)| create(ctx, ns, id, p))).await;
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
        let mut pending: Vec<&&LeanPod> =
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
    let state = first_container_state(pod)?;
    let t = state.terminated.as_ref()?;
    let (started, finished) = (t.started_at.as_ref()?, t.finished_at.as_ref()?);
    finished.0.duration_since(started.0).try_into().ok()
}

/// What became of a failed worker pod, from its container's termination.
pub(super) fn worker_failure(pod: &Pod) -> WorkerFailure {
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
    } else if let (None, Some(why)) = (state, disruption(pod)) {
        // Ended by Kubernetes before its container said anything (a node under pressure
        // evicted it): Kubernetes' own reason.
        format!("worker pod {name} ended ({why})")
    } else {
        let reason = if reason.is_empty() { "ended" } else { &reason };
        let detail = if message.is_empty() {
            String::new()
        } else {
            format!(": {message}")
        };
        format!("worker pod {name} failed ({reason}, exit code {exit_code}){detail}")
    };
    // A pod Kubernetes ended has its reason on the pod (`Evicted`), not on a container.
    let reason = match pod.status.as_ref().and_then(|s| s.reason.clone()) {
        Some(pod_reason) if reason.is_empty() => pod_reason,
        _ => reason,
    };
    WorkerFailure {
        pod: name,
        reason,
        exit_code,
        message: text,
        time,
    }
}
