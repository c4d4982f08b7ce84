//! A cluster's phases other than keeping its workers: [`bring_up`] (credentials, scheduler and
//! Service, until the scheduler is ready), [`tear_down`] (Stopping: delete every child),
//! [`finished`] (Stopped or Failed: nothing may remain; labelled out of the caches once settled,
//! deleted past the retention) and the retention sweep of labelled clusters
//! ([`sweep_finished`]).

use super::observe::{
    disruption, is_being_deleted, is_hopeless, pod_phase, pod_ready, termination, waiting_reason,
    Observed,
};
use super::status::{fail, set_condition};
use super::workers::reconcile_workers;
use super::writes::{create, delete, delete_pod, exists, last_log_lines, LOG_LINES};
use super::{age, created_age, now_rfc3339, Context, Error};
use crate::build;
use crate::crd::{DaskCluster, DaskClusterStatus, Phase, StatusAddresses};
use crate::names::{self, API_PORT, DASHBOARD_PORT, SCHEDULER_PORT};
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;
use std::time::Duration;
use tracing::info;

/// How long a stop waits for pods to disappear before the cluster is declared finished anyway
/// (a node that is gone never confirms; garbage collection finishes the job).
const STOP_WAIT: Duration = Duration::from_secs(30);

/// Pending and Running: credentials, scheduler, service, then the workers.
pub(super) async fn bring_up(
    dc: &DaskCluster,
    ctx: &Context,
    ns: &str,
    id: &str,
    observed: &Observed,
    next: &mut DaskClusterStatus,
) -> Result<(), Error> {
    if !observed.secret {
        let secret_name = names::secret_name(id);
        let scheduler_made = observed.scheduler.is_some()
            || observed.scheduler_expected
            || next.scheduler_pod.is_some();
        if !scheduler_made {
            create(ctx, ns, id, &build::secret(dc)?).await?;
            ctx.expect_created(id, &secret_name);
        } else if !exists::<Secret>(ctx, ns, id, &secret_name).await? {
            // The scheduler read its certificate from this Secret when it started. A new
            // Secret would hold new credentials that neither it nor its workers trust: clients
            // would time out against a cluster shown as running, new workers would never join.
            fail(
                ctx,
                id,
                next,
                "the cluster's credentials Secret was deleted while its scheduler used it".into(),
            );
            return Ok(());
        }
        // Otherwise the Secret exists and the cache is only behind the API server.
    }
    next.credentials = Some(names::secret_name(id));
    let scheduler_name = names::scheduler_pod_name(id);
    let scheduler = match &observed.scheduler {
        Some(pod) => {
            // Named here too: the pass that created it may not have written its status.
            next.scheduler_pod = Some(scheduler_name);
            pod.clone()
        }
        None if observed.scheduler_expected => {
            next.scheduler_pod = Some(scheduler_name);
            return Ok(());
        }
        None if next.scheduler_pod.is_some() => {
            fail(ctx, id, next, "the scheduler pod was deleted".into());
            return Ok(());
        }
        None => {
            create(ctx, ns, id, &build::scheduler_pod(dc)?).await?;
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
        create(ctx, ns, id, &build::service(dc)?).await?;
        ctx.expect_created(id, &names::service_name(id));
    }
    next.service = Some(names::service_name(id));

    // The scheduler ended: the cluster fails with what it said last.
    let exit = termination(&scheduler);
    if exit.is_some() || matches!(pod_phase(&scheduler), "Failed" | "Succeeded") {
        let logs = last_log_lines(
            ctx,
            ns,
            id,
            &scheduler.name_any(),
            "dask-scheduler",
            LOG_LINES,
        )
        .await;
        let why = scheduler_end(&scheduler, exit, &logs);
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

/// Why the scheduler pod `pod` ended, as the cluster's reason: who ended it, when that was not
/// the scheduler itself (a deletion, or Kubernetes' eviction or preemption, which says why; our
/// own deletions never reach here), how its container exited, and its last log lines.
pub(super) fn scheduler_end(pod: &Pod, exit: Option<(i32, String, String)>, logs: &str) -> String {
    let ended_by = match (is_being_deleted(pod), disruption(pod)) {
        (true, Some(d)) => Some(format!("the scheduler pod was deleted ({d})")),
        (true, None) => Some("the scheduler pod was deleted".to_string()),
        (false, Some(d)) => Some(format!("the scheduler pod ended ({d})")),
        (false, None) => None,
    };
    let exited = exit.map(|(code, reason, message)| {
        let mut e = format!("exited (exit code {code}");
        if !reason.is_empty() {
            e.push_str(&format!(", {reason}"));
        }
        e.push(')');
        if !message.is_empty() {
            e.push_str(&format!(": {message}"));
        }
        e
    });
    let mut why = match (ended_by, exited) {
        (Some(by), Some(exited)) => format!("{by}; it {exited}"),
        (Some(by), None) => by,
        (None, Some(exited)) => format!("the scheduler {exited}"),
        (None, None) => format!("the scheduler pod ended (phase {})", pod_phase(pod)),
    };
    if !logs.is_empty() {
        why.push_str(&format!("; last log lines:\n{logs}"));
    }
    why
}

/// Stopping: delete every child; finished once nothing is left (or after [`STOP_WAIT`]).
pub(super) async fn tear_down(
    ctx: &Context,
    ns: &str,
    id: &str,
    observed: &Observed,
    next: &mut DaskClusterStatus,
) -> Result<Action, Error> {
    next.addresses = None;
    delete_children(ctx, ns, id, observed).await?;
    // Pods stay in the cache until the kubelet has stopped them.
    let remaining = ctx.pods.count(ns, id);
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
pub(super) async fn finished(
    dc: &DaskCluster,
    ctx: &Context,
    ns: &str,
    id: &str,
    observed: &Observed,
) -> Result<Action, Error> {
    // The teardown deleted what the cache showed then; a child it had not seen yet (created
    // just before the failure) is removed here.
    delete_children(ctx, ns, id, observed).await?;
    let ended = finished_for(dc);
    let retention = ctx.settings.retention;
    if ended >= retention {
        info!(cluster = %id, "deleting finished cluster past its retention");
        delete::<DaskCluster>(ctx, ns, id, id).await?;
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

/// Deletes every child `observed` shows: the worker pods, the scheduler pod, the Service and
/// the Secret (each deletion rate limited; a child already gone is fine).
async fn delete_children(
    ctx: &Context,
    ns: &str,
    id: &str,
    observed: &Observed,
) -> Result<(), Error> {
    for pod in &observed.workers {
        delete_pod(ctx, ns, id, &pod.name_any()).await?;
    }
    if let Some(s) = &observed.scheduler {
        delete_pod(ctx, ns, id, &s.name_any()).await?;
    }
    if observed.service {
        delete::<Service>(ctx, ns, id, &names::service_name(id)).await?;
    }
    if observed.secret {
        delete::<Secret>(ctx, ns, id, &names::secret_name(id)).await?;
    }
    Ok(())
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
    ctx.limiter.acquire(id).await;
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

/// The write limiter's flow of the retention sweep's listing (no cluster's: cluster names are
/// never empty).
const SWEEP_FLOW: &str = "";

/// Deletes the finished (labelled) DaskClusters of `instance` in `ns` whose completion is
/// older than `retention`; returns how many. The controller runs it periodically.
pub async fn sweep_finished(ctx: &Context, ns: &str, retention: Duration) -> Result<usize, Error> {
    let api: Api<DaskCluster> = Api::namespaced(ctx.client.clone(), ns);
    let selector = format!(
        "{},{}=true",
        names::instance_selector(&ctx.settings.instance),
        names::LABEL_FINISHED
    );
    ctx.limiter.acquire(SWEEP_FLOW).await;
    let list = api.list(&ListParams::default().labels(&selector)).await?;
    let mut deleted = 0;
    for dc in list.items {
        if finished_for(&dc) >= retention {
            let id = dc.name_any();
            delete::<DaskCluster>(ctx, ns, &id, &id).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}
