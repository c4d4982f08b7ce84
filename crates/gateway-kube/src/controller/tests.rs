//! Reconcile passes against a mocked API server (a `tower_test` service): each test sets the
//! watch caches, runs one pass, and checks exactly which requests the controller makes and the
//! status it writes.
//!
//! One file over 500 lines: each test is one scenario through the whole pass, and they share
//! the fixtures at the top (caches, pods in every state, the status a pass writes).

use super::observe::pod_name;
use super::status::{
    account, is_start_progress, is_teardown_progress, may_defer, record_transitions,
    COUNTS_WAIT_AT_MOST, START_PROGRESS_WAIT_AT_MOST,
};
use super::*;
use crate::build::tests::cluster;
use crate::crd::{DaskClusterStatus, Phase, StopSpec};
use crate::lean::LeanPod;
use crate::mock_api::{ApiServer, Call};
use crate::names;
use crate::pod_cache::{pod_cache, PodCacheWriter};
use http::Method;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::{store, store::Writer};
use kube::runtime::watcher::Event;
use serde_json::json;

struct Caches {
    pods: PodCacheWriter,
    secrets: Writer<Secret>,
    services: Writer<Service>,
}

fn context(batch: usize) -> (Arc<Context>, ApiServer, Caches) {
    context_with(batch, false)
}

fn context_with(batch: usize, record_events: bool) -> (Arc<Context>, ApiServer, Caches) {
    let (client, api) = crate::mock_api::pair();
    let (pods, pod_writer) = pod_cache();
    let (secrets, secret_writer) = store();
    let (services, service_writer) = store();
    let ctx = Context::new(
        client,
        pods,
        secrets,
        services,
        RateLimiter::new(1000.0, 1000),
        ControllerSettings {
            namespace: "dask".into(),
            instance: "gw".into(),
            worker_batch: batch,
            retention: Duration::from_secs(3600),
            record_events,
        },
        crate::metrics::ControllerMetrics::default(),
    );
    (
        Arc::new(ctx),
        api,
        Caches {
            pods: pod_writer,
            secrets: secret_writer,
            services: service_writer,
        },
    )
}

impl Caches {
    fn pod(&mut self, pod: Pod) {
        self.pods.apply_watcher_event(&Event::Apply(pod.into()));
    }
    fn children_of(&mut self, dc: &DaskCluster) {
        self.secrets
            .apply_watcher_event(&Event::Apply(build::secret(dc).unwrap()));
        self.services
            .apply_watcher_event(&Event::Apply(build::service(dc).unwrap()));
    }
}

const ID: &str = "0123456789abcdef0123456789abcdef";

fn ready_scheduler(dc: &DaskCluster) -> Pod {
    let mut pod = build::scheduler_pod(dc).unwrap();
    pod.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some("10.0.0.9".into()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }]),
        ..Default::default()
    });
    pod
}

fn worker(dc: &DaskCluster, name: &str, phase: &str, exit: Option<i32>) -> Pod {
    let mut pod = build::worker_pod(dc, name, "tls://10.0.0.9:8786").unwrap();
    let state = match exit {
        Some(code) => ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        None => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(jiff::Timestamp::now())),
            }),
            ..Default::default()
        },
    };
    pod.status = Some(PodStatus {
        phase: Some(phase.into()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: if phase == "Running" { "True" } else { "False" }.into(),
            ..Default::default()
        }]),
        container_statuses: Some(vec![ContainerStatus {
            name: "dask-worker".into(),
            state: Some(state),
            ..Default::default()
        }]),
        ..Default::default()
    });
    pod
}

/// The terminated state of a pod made by [`worker`] with an exit code.
fn terminated(pod: &mut Pod) -> &mut ContainerStateTerminated {
    pod.status
        .as_mut()
        .and_then(|s| s.container_statuses.as_mut())
        .and_then(|c| c[0].state.as_mut())
        .and_then(|s| s.terminated.as_mut())
        .expect("a worker pod made with an exit code")
}

fn with_status(mut dc: DaskCluster, phase: Phase) -> DaskCluster {
    dc.metadata.resource_version = Some("7".into());
    dc.metadata.creation_timestamp = Some(Time(jiff::Timestamp::now()));
    dc.status = Some(DaskClusterStatus {
        phase,
        credentials: Some(names::secret_name(ID)),
        scheduler_pod: Some(names::scheduler_pod_name(ID)),
        service: Some(names::service_name(ID)),
        ..Default::default()
    });
    dc
}

fn written_status(call: &Call) -> DaskClusterStatus {
    assert_eq!(call.method, Method::PUT, "{}", call.path);
    assert_eq!(
        call.path,
        format!("/apis/dask-gateway-rs.io/v1alpha1/namespaces/dask/daskclusters/{ID}/status")
    );
    serde_json::from_value(call.body["status"].clone()).unwrap()
}

/// Answers a pass's requests before its status write (deletions, log reads) with success, and
/// returns the status it writes.
async fn status_after_other_requests(api: &mut ApiServer) -> DaskClusterStatus {
    loop {
        let c = api.next().await;
        if c.method == Method::PUT {
            let st = written_status(&c);
            c.echo();
            return st;
        }
        c.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    }
}

async fn run(
    dc: DaskCluster,
    ctx: &Arc<Context>,
) -> tokio::task::JoinHandle<Result<Action, Error>> {
    let ctx = ctx.clone();
    tokio::spawn(async move { reconcile(Arc::new(dc), ctx).await })
}

/// The scheduler pod of `dc`, its container waiting for `reason`.
fn waiting_scheduler(dc: &DaskCluster, reason: &str) -> Pod {
    let mut pod = build::scheduler_pod(dc).unwrap();
    pod.status = Some(PodStatus {
        phase: Some("Pending".into()),
        container_statuses: Some(vec![ContainerStatus {
            name: "dask-scheduler".into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    });
    pod
}

#[tokio::test]
async fn a_start_writes_its_status_when_running_or_once_it_waited_long_enough() {
    let (ctx, mut api, mut caches) = context(10);
    let mut dc = cluster(ID);
    dc.metadata.creation_timestamp = Some(Time(jiff::Timestamp::now()));
    // The first pass makes the credentials and the scheduler pod, and writes no status yet:
    // it comes back when the wait is over.
    let pass = run(dc.clone(), &ctx).await;
    let c = api.next().await;
    assert_eq!(
        (c.method.clone(), c.path.as_str()),
        (Method::POST, "/api/v1/namespaces/dask/secrets")
    );
    assert!(c.body["data"]["api-token"].is_string());
    c.echo();
    let c = api.next().await;
    assert_eq!(
        (c.method.clone(), c.path.as_str()),
        (Method::POST, "/api/v1/namespaces/dask/pods")
    );
    assert_eq!(c.body["metadata"]["name"], format!("dask-scheduler-{ID}"));
    c.echo();
    api.silent().await;
    let action = pass.await.unwrap().unwrap();
    assert_ne!(action, Action::requeue(Duration::ZERO));
    assert_ne!(action, Action::requeue(Duration::from_secs(10)));
    // The scheduler's image is being pulled: still nothing written.
    caches.children_of(&dc);
    caches.pod(waiting_scheduler(&dc, "ContainerCreating"));
    let pass = run(dc.clone(), &ctx).await;
    api.silent().await;
    pass.await.unwrap().unwrap();
    // Once the first change waited long enough, the start's progress is written.
    age_waiting(&ctx, ID, START_PROGRESS_WAIT_AT_MOST);
    let pass = run(dc.clone(), &ctx).await;
    let c = api.next().await;
    let st = written_status(&c);
    assert_eq!(st.phase, Phase::Pending);
    assert_eq!(
        st.credentials.as_deref(),
        Some(names::secret_name(ID).as_str())
    );
    assert_eq!(
        st.scheduler_pod.as_deref(),
        Some(names::scheduler_pod_name(ID).as_str())
    );
    assert_eq!(
        st.reason.as_deref(),
        Some("waiting for the scheduler (ContainerCreating)")
    );
    c.echo();
    pass.await.unwrap().unwrap();
    assert!(ctx.waiting_since.lock().unwrap().is_empty());
    // Its container starts (a new change waits), then it is ready: Running is written at once.
    dc.metadata.resource_version = Some("8".into());
    dc.status = Some(st);
    let mut starting = ready_scheduler(&dc);
    starting
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()[0]
        .status = "False".into();
    caches.pod(starting);
    let pass = run(dc.clone(), &ctx).await;
    api.silent().await;
    pass.await.unwrap().unwrap();
    caches.pod(ready_scheduler(&dc));
    let pass = run(dc, &ctx).await;
    let c = api.next().await;
    let st = written_status(&c);
    assert_eq!(st.phase, Phase::Running);
    assert!(st.addresses.is_some());
    c.echo();
    pass.await.unwrap().unwrap();
    assert!(ctx.waiting_since.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_scheduler_that_cannot_start_fails_the_cluster_at_once() {
    let (ctx, mut api, mut caches) = context(10);
    let mut dc = cluster(ID);
    dc.metadata.creation_timestamp = Some(Time(jiff::Timestamp::now()));
    caches.children_of(&dc);
    caches.pod(waiting_scheduler(&dc, "InvalidImageName"));
    let pass = run(dc, &ctx).await;
    let st = status_after_other_requests(&mut api).await;
    assert_eq!(st.phase, Phase::Stopping);
    assert!(st.stop_failed);
    assert!(
        st.reason.as_deref().unwrap().contains("InvalidImageName"),
        "{:?}",
        st.reason
    );
    pass.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_ready_scheduler_makes_the_cluster_running_and_workers_follow_once() {
    let (ctx, mut api, mut caches) = context(10);
    let mut dc = with_status(cluster(ID), Phase::Pending);
    dc.spec.replicas = 3;
    caches.children_of(&dc);
    caches.pod(ready_scheduler(&dc));
    let pass = run(dc.clone(), &ctx).await;
    let mut created = Vec::new();
    for _ in 0..3 {
        let c = api.next().await;
        assert_eq!(c.method, Method::POST);
        assert_eq!(c.path, "/api/v1/namespaces/dask/pods");
        let name = c.body["metadata"]["name"].as_str().unwrap().to_string();
        assert!(name.starts_with(&names::worker_pod_prefix(ID)));
        let cmd = c.body["spec"]["containers"][0]["args"].clone();
        assert_eq!(
            cmd[2], "tls://10.0.0.9:8786",
            "workers dial the scheduler pod"
        );
        created.push(name);
        c.echo();
    }
    let c = api.next().await;
    let st = written_status(&c);
    assert_eq!(st.phase, Phase::Running);
    assert_eq!(st.replicas, 3);
    let a = st.addresses.clone().unwrap();
    assert_eq!(
        (a.scheduler.as_str(), a.dashboard.as_str(), a.api.as_str()),
        (
            "tls://10.0.0.9:8786",
            "http://10.0.0.9:8787",
            "http://10.0.0.9:8788"
        )
    );
    c.echo();
    pass.await.unwrap().unwrap();
    // The caches have not seen the new pods yet: a second pass must not create them again.
    let mut dc2 = dc.clone();
    dc2.status = Some(st);
    let pass = run(dc2, &ctx).await;
    api.silent().await;
    pass.await.unwrap().unwrap();
    created.sort();
    created.dedup();
    assert_eq!(created.len(), 3);
}

#[tokio::test]
async fn phase_changes_and_worker_failures_are_recorded_as_events_on_the_daskcluster() {
    let (ctx, mut api, mut caches) = context_with(10, true);
    let dc = pending_with_a_ready_scheduler(&mut caches);
    let pass = run(dc.clone(), &ctx).await;
    let c = api.next().await;
    let st = written_status(&c);
    assert_eq!(st.phase, Phase::Running);
    c.echo();
    // After the status write: one Event on the DaskCluster, from the controller.
    let c = api.next().await;
    assert_eq!(c.method, Method::POST);
    assert_eq!(c.path, "/api/v1/namespaces/dask/events");
    assert_eq!(c.body["reason"], "Running");
    assert_eq!(c.body["type"], "Normal");
    assert_eq!(c.body["involvedObject"]["kind"], "DaskCluster");
    assert_eq!(c.body["involvedObject"]["name"], ID);
    assert_eq!(c.body["source"]["component"], "dask-gateway-rs-controller");
    assert!(c.body["message"]
        .as_str()
        .unwrap()
        .contains("tls://10.0.0.9:8786"));
    c.echo();
    pass.await.unwrap().unwrap();
    // The same status again: nothing is written, nothing recorded.
    let mut dc2 = dc.clone();
    dc2.status = Some(st);
    let pass = run(dc2, &ctx).await;
    api.silent().await;
    pass.await.unwrap().unwrap();
}

/// Moves the start of cluster `id`'s waiting status change back in time by `by`.
fn age_waiting(ctx: &Context, id: &str, by: Duration) {
    let mut waiting = ctx.waiting_since.lock().unwrap();
    *waiting.get_mut(id).expect("a status change waits") -= by;
}

#[tokio::test]
async fn count_only_status_changes_wait_until_the_workers_reach_their_target() {
    let (ctx, mut api, mut caches) = context(10);
    let mut dc = with_status(cluster(ID), Phase::Running);
    dc.spec.replicas = 3;
    caches.children_of(&dc);
    caches.pod(ready_scheduler(&dc));
    caches.pod(worker(&dc, "dask-worker-x-a", "Running", None));
    caches.pod(worker(&dc, "dask-worker-x-b", "Pending", None));
    caches.pod(worker(&dc, "dask-worker-x-c", "Pending", None));
    let pass = run(dc.clone(), &ctx).await;
    let c = api.next().await;
    let st = written_status(&c);
    assert_eq!(
        (st.phase, st.replicas, st.ready_workers),
        (Phase::Running, 3, 1)
    );
    c.echo();
    pass.await.unwrap().unwrap();
    let mut dc2 = dc.clone();
    dc2.status = Some(st.clone());
    // The second worker starts: only counts change and the target is not reached, so nothing
    // is written yet, and the pass comes back before the wait is over.
    caches.pod(worker(&dc, "dask-worker-x-b", "Running", None));
    let pass = run(dc2.clone(), &ctx).await;
    api.silent().await;
    let action = pass.await.unwrap().unwrap();
    assert_ne!(action, Action::requeue(Duration::from_secs(300)));
    assert_ne!(action, Action::requeue(Duration::ZERO));
    // The third starts: the target is reached, so the counts are written at once.
    caches.pod(worker(&dc, "dask-worker-x-c", "Running", None));
    let pass = run(dc2.clone(), &ctx).await;
    let c = api.next().await;
    let st = written_status(&c);
    assert_eq!(st.ready_workers, 3);
    c.echo();
    pass.await.unwrap().unwrap();
    assert!(ctx.waiting_since.lock().unwrap().is_empty());
    // Counts short of the target are written once the first change waited long enough.
    dc2.status = Some(st);
    caches.pod(worker(&dc, "dask-worker-x-c", "Pending", None));
    let pass = run(dc2.clone(), &ctx).await;
    api.silent().await;
    pass.await.unwrap().unwrap();
    age_waiting(&ctx, ID, COUNTS_WAIT_AT_MOST);
    let pass = run(dc2, &ctx).await;
    let c = api.next().await;
    assert_eq!(written_status(&c).ready_workers, 2);
    c.echo();
    pass.await.unwrap().unwrap();
    // A change that matters (the gateway stops the cluster) is written at once.
    dc.spec.active = false;
    let pass = run(dc, &ctx).await;
    let st = status_after_other_requests(&mut api).await;
    assert_eq!(st.phase, Phase::Stopping);
    pass.await.unwrap().unwrap();
}

#[tokio::test]
async fn big_scale_ups_proceed_in_batches() {
    let (ctx, mut api, mut caches) = context(4);
    let mut dc = with_status(cluster(ID), Phase::Running);
    dc.spec.replicas = 10;
    caches.children_of(&dc);
    caches.pod(ready_scheduler(&dc));
    let pass = run(dc, &ctx).await;
    for _ in 0..4 {
        let c = api.next().await;
        assert_eq!(c.method, Method::POST);
        c.echo();
    }
    let c = api.next().await;
    assert_eq!(written_status(&c).replicas, 4);
    c.echo();
    let action = pass.await.unwrap().unwrap();
    assert_eq!(
        action,
        Action::requeue(Duration::ZERO),
        "the next slice at once"
    );
}

#[tokio::test]
async fn finished_retired_and_surplus_workers_are_deleted() {
    let (ctx, mut api, mut caches) = context(10);
    let mut dc = with_status(cluster(ID), Phase::Running);
    dc.spec.replicas = 1;
    dc.spec.retired_workers = vec!["dask-worker-x-retired".into()];
    caches.children_of(&dc);
    caches.pod(ready_scheduler(&dc));
    caches.pod(worker(&dc, "dask-worker-x-running", "Running", None));
    caches.pod(worker(&dc, "dask-worker-x-retired", "Running", None));
    caches.pod(worker(&dc, "dask-worker-x-done", "Succeeded", Some(0)));
    caches.pod(worker(&dc, "dask-worker-x-pending", "Pending", None));
    let pass = run(dc, &ctx).await;
    let mut deleted = Vec::new();
    for _ in 0..3 {
        let c = api.next().await;
        assert_eq!(c.method, Method::DELETE);
        deleted.push(c.path.rsplit('/').next().unwrap().to_string());
        c.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    }
    deleted.sort();
    assert_eq!(
        deleted,
        [
            "dask-worker-x-done",
            "dask-worker-x-pending",
            "dask-worker-x-retired"
        ]
    );
    let c = api.next().await;
    let st = written_status(&c);
    assert_eq!(st.replicas, 1);
    assert_eq!(st.worker_failures, 0);
    c.echo();
    pass.await.unwrap().unwrap();
}

#[tokio::test]
async fn failed_workers_are_replaced_until_the_limit() {
    let (ctx, mut api, mut caches) = context(10);
    let mut dc = with_status(cluster(ID), Phase::Running);
    dc.spec.replicas = 1;
    caches.children_of(&dc);
    caches.pod(ready_scheduler(&dc));
    caches.pod(worker(&dc, "dask-worker-x-a", "Failed", Some(1)));
    let pass = run(dc.clone(), &ctx).await;
    // Its log: it never joined the scheduler (a start failure), and why it ended.
    let c = api.next().await;
    assert_eq!(c.method, Method::GET);
    assert!(c.path.ends_with("pods/dask-worker-x-a/log"), "{}", c.path);
    c.text("Traceback (most recent call last):\nModuleNotFoundError: No module named 'dask'\n");
    let c = api.next().await;
    assert_eq!(
        (c.method.clone(), c.path.as_str()),
        (
            Method::DELETE,
            "/api/v1/namespaces/dask/pods/dask-worker-x-a"
        )
    );
    c.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    let c = api.next().await;
    assert_eq!(c.method, Method::POST, "a replacement");
    c.echo();
    let c = api.next().await;
    let st = written_status(&c);
    assert_eq!(st.worker_failures, 1);
    let failure = st.last_worker_failure.unwrap();
    assert!(
        failure
            .message
            .starts_with("worker pod dask-worker-x-a failed (Error, exit code 1)"),
        "{}",
        failure.message
    );
    assert!(
        failure.message.contains("No module named 'dask'"),
        "{}",
        failure.message
    );
    c.echo();
    pass.await.unwrap().unwrap();

    // Two failures already counted; the third fails the cluster (the next pass tears down).
    let (ctx, mut api, mut caches) = context(10);
    let mut st = dc.status.clone().unwrap();
    st.worker_failures = 2;
    dc.status = Some(st);
    caches.children_of(&dc);
    caches.pod(ready_scheduler(&dc));
    caches.pod(worker(&dc, "dask-worker-x-b", "Failed", Some(137)));
    let pass = run(dc, &ctx).await;
    let c = api.next().await;
    assert!(c.path.ends_with("pods/dask-worker-x-b/log"), "{}", c.path);
    c.text("Killed\n");
    let mut paths = Vec::new();
    loop {
        let c = api.next().await;
        if c.method == Method::PUT {
            let st = written_status(&c);
            assert_eq!(st.phase, Phase::Stopping);
            assert!(st.stop_failed);
            let reason = st.reason.unwrap();
            assert!(reason.contains("3 worker pods failed in a row"), "{reason}");
            assert!(reason.contains("exit code 137"), "{reason}");
            c.echo();
            break;
        }
        assert_eq!(c.method, Method::DELETE);
        paths.push(c.path.clone());
        c.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    }
    // Written before the teardown (the next pass's), which the dead-scheduler test follows.
    assert!(
        !paths
            .iter()
            .any(|p| p.ends_with(&names::scheduler_pod_name(ID))
                || p.ends_with(&names::secret_name(ID))),
        "{paths:?}"
    );
    let action = pass.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(Duration::ZERO));
}

#[tokio::test]
async fn a_worker_oom_killed_at_work_is_reported_and_replaced_without_counting_against_the_limit() {
    let (ctx, mut api, mut caches) = context(10);
    let mut dc = with_status(cluster(ID), Phase::Running);
    dc.spec.replicas = 1;
    let mut st = dc.status.clone().unwrap();
    st.worker_failures = 2; // one more start failure would fail the cluster
    dc.status = Some(st);
    caches.children_of(&dc);
    caches.pod(ready_scheduler(&dc));
    let mut oom = worker(&dc, "dask-worker-x-a", "Failed", Some(137));
    let t = terminated(&mut oom);
    t.reason = Some("OOMKilled".into());
    // It died two seconds after it started, before its readiness probe passed.
    let now = jiff::Timestamp::now();
    t.started_at = Some(Time(now - jiff::SignedDuration::from_secs(2)));
    t.finished_at = Some(Time(now));
    caches.pod(oom);
    let pass = run(dc.clone(), &ctx).await;
    // Its log shows it had joined the scheduler: it died at work.
    let c = api.next().await;
    assert!(c.path.ends_with("pods/dask-worker-x-a/log"), "{}", c.path);
    assert!(c.query.contains("tailLines=80"), "{}", c.query);
    c.text("distributed.worker - INFO -         Registered to: tls://10.0.0.9:8786\n");
    let c = api.next().await;
    assert_eq!(c.method, Method::DELETE);
    c.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    let c = api.next().await;
    assert_eq!(c.method, Method::POST, "a replacement");
    c.echo();
    let c = api.next().await;
    let st = written_status(&c);
    assert_eq!(st.phase, Phase::Running);
    assert_eq!(
        st.worker_failures, 0,
        "it had joined the scheduler: not a start failure"
    );
    let failure = st.last_worker_failure.unwrap();
    assert_eq!(
        (failure.reason.as_str(), failure.exit_code),
        ("OOMKilled", 137)
    );
    let limit = gateway_model::format_memory(dc.spec.settings.worker_memory_limit());
    assert_eq!(
        failure.message,
        format!("worker pod dask-worker-x-a was killed for exceeding its memory limit of {limit} (OOMKilled)")
    );
    c.echo();
    pass.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_worker_the_scheduler_retired_after_an_oom_kill_is_still_reported() {
    let (ctx, mut api, mut caches) = context(10);
    let mut dc = with_status(cluster(ID), Phase::Running);
    dc.spec.replicas = 1;
    // The scheduler's heartbeat named the dead worker before the controller saw its pod fail.
    dc.spec.retired_workers = vec!["dask-worker-x-a".into()];
    caches.children_of(&dc);
    caches.pod(ready_scheduler(&dc));
    let mut oom = worker(&dc, "dask-worker-x-a", "Running", Some(137));
    terminated(&mut oom).reason = Some("OOMKilled".into());
    caches.pod(oom);
    let pass = run(dc.clone(), &ctx).await;
    let c = api.next().await;
    assert_eq!(c.method, Method::DELETE, "retired: deleted, no log read");
    c.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    let c = api.next().await;
    assert_eq!(c.method, Method::POST, "a replacement");
    c.echo();
    let c = api.next().await;
    let st = written_status(&c);
    assert_eq!(st.worker_failures, 0);
    let failure = st.last_worker_failure.unwrap();
    assert_eq!(
        (failure.pod.as_str(), failure.reason.as_str()),
        ("dask-worker-x-a", "OOMKilled")
    );
    c.echo();
    pass.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_dead_scheduler_fails_the_cluster_with_its_last_log_lines() {
    let (ctx, mut api, mut caches) = context(10);
    let dc = with_status(cluster(ID), Phase::Running);
    caches.children_of(&dc);
    let mut sched = ready_scheduler(&dc);
    sched.status.as_mut().unwrap().phase = Some("Failed".into());
    sched.status.as_mut().unwrap().container_statuses = Some(vec![ContainerStatus {
        name: "dask-scheduler".into(),
        state: Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 1,
                reason: Some("Error".into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }]);
    caches.pod(sched);
    let pass = run(dc, &ctx).await;
    let c = api.next().await;
    assert_eq!(c.method, Method::GET);
    assert!(c
        .path
        .ends_with(&format!("pods/{}/log", names::scheduler_pod_name(ID))));
    assert!(c.query.contains("tailLines=12"), "{}", c.query);
    c.text("Traceback (most recent call last):\nValueError: no such preload\n");
    // The failure is written before anything is deleted: a controller that stops after this
    // pass leaves the reason for its successor, which only tears down.
    let c = api.next().await;
    let st = written_status(&c);
    c.echo();
    assert_eq!(st.phase, Phase::Stopping);
    assert!(st.stop_failed);
    assert!(st.addresses.is_none());
    let reason = st.reason.clone().unwrap();
    assert!(
        reason.starts_with("the scheduler exited (exit code 1, Error)"),
        "{reason}"
    );
    assert!(reason.contains("ValueError: no such preload"), "{reason}");
    let action = pass.await.unwrap().unwrap();
    assert_eq!(
        action,
        Action::requeue(Duration::ZERO),
        "the teardown comes next"
    );

    // The next pass (here a new controller's) deletes the children and keeps the reason.
    let (ctx, mut api, mut caches) = context(10);
    let mut dc = with_status(cluster(ID), Phase::Running);
    dc.status = Some(st);
    caches.children_of(&dc);
    caches.pod(ready_scheduler(&dc));
    let pass = run(dc, &ctx).await;
    let mut deleted = Vec::new();
    for _ in 0..3 {
        let c = api.next().await;
        assert_eq!(c.method, Method::DELETE, "{}", c.path);
        deleted.push(c.path.clone());
        c.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    }
    for child in [
        names::scheduler_pod_name(ID),
        names::service_name(ID),
        names::secret_name(ID),
    ] {
        assert!(deleted.iter().any(|p| p.ends_with(&child)), "{deleted:?}");
    }
    // The scheduler pod is still terminating: nothing new to write, the reason stays.
    api.silent().await;
    pass.await.unwrap().unwrap();
}

#[test]
fn a_scheduler_pod_ended_by_someone_else_says_who_ended_it() {
    let dc = with_status(cluster(ID), Phase::Running);
    let exited = |code: i32, reason: &str| Some((code, reason.to_string(), String::new()));
    let mut deleted = ready_scheduler(&dc);
    deleted.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
    assert_eq!(
        lifecycle::scheduler_end(&deleted, exited(0, "Completed"), "Received signal SIGTERM"),
        "the scheduler pod was deleted; it exited (exit code 0, Completed); \
         last log lines:\nReceived signal SIGTERM"
    );
    let mut preempted = deleted.clone();
    preempted
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()
        .push(PodCondition {
            type_: "DisruptionTarget".into(),
            status: "True".into(),
            reason: Some("PreemptionByScheduler".into()),
            message: Some("Preempted in order to admit critical pod".into()),
            ..Default::default()
        });
    assert_eq!(
        lifecycle::scheduler_end(&preempted, exited(143, "Error"), ""),
        "the scheduler pod was deleted (PreemptionByScheduler: Preempted in order to admit \
         critical pod); it exited (exit code 143, Error)"
    );
    let mut evicted = ready_scheduler(&dc);
    let status = evicted.status.as_mut().unwrap();
    status.phase = Some("Failed".into());
    status.reason = Some("Evicted".into());
    status.message = Some("The node was low on resource: memory.".into());
    assert_eq!(
        lifecycle::scheduler_end(&evicted, None, ""),
        "the scheduler pod ended (Evicted: The node was low on resource: memory.)"
    );
    let mut failed = ready_scheduler(&dc);
    failed.status.as_mut().unwrap().phase = Some("Failed".into());
    assert_eq!(
        lifecycle::scheduler_end(&failed, None, ""),
        "the scheduler pod ended (phase Failed)"
    );
    assert_eq!(
        lifecycle::scheduler_end(&failed, exited(1, "Error"), ""),
        "the scheduler exited (exit code 1, Error)"
    );
}

#[test]
fn a_worker_pod_evicted_before_its_container_ended_says_why() {
    let dc = with_status(cluster(ID), Phase::Running);
    let mut pod = worker(&dc, "w-evicted", "Failed", None);
    let status = pod.status.as_mut().unwrap();
    status.container_statuses = None;
    status.reason = Some("Evicted".into());
    status.message = Some("The node was low on resource: memory.".into());
    let failure = workers::worker_failure(&pod);
    assert_eq!(failure.reason, "Evicted");
    assert_eq!(
        failure.message,
        "worker pod w-evicted ended (Evicted: The node was low on resource: memory.)"
    );
    let mut pod = worker(&dc, "w-failed", "Failed", Some(1));
    let failure = workers::worker_failure(&pod);
    assert_eq!(failure.reason, "Error");
    assert_eq!(
        failure.message,
        "worker pod w-failed failed (Error, exit code 1)"
    );
    pod.status.as_mut().unwrap().container_statuses = None;
    assert_eq!(
        workers::worker_failure(&pod).message,
        "worker pod w-failed failed (ended, exit code -1)"
    );
}

/// A running cluster with its scheduler and Service in the caches but not its Secret.
fn running_without_its_secret_in_the_cache(caches: &mut Caches) -> DaskCluster {
    let dc = with_status(cluster(ID), Phase::Running);
    caches
        .services
        .apply_watcher_event(&Event::Apply(build::service(&dc).unwrap()));
    caches.pod(ready_scheduler(&dc));
    dc
}

#[tokio::test]
async fn a_running_clusters_deleted_secret_fails_it_instead_of_new_credentials() {
    let (ctx, mut api, mut caches) = context(10);
    let dc = running_without_its_secret_in_the_cache(&mut caches);
    let pass = run(dc, &ctx).await;
    let c = api.next().await;
    assert_eq!(c.method, Method::GET, "asks the API server, never creates");
    assert_eq!(
        c.path,
        format!("/api/v1/namespaces/dask/secrets/{}", names::secret_name(ID))
    );
    c.status(404, "NotFound");
    let st = status_after_other_requests(&mut api).await;
    assert_eq!(st.phase, Phase::Stopping);
    assert!(st.stop_failed);
    assert!(st.addresses.is_none());
    assert_eq!(
        st.reason.as_deref(),
        Some("the cluster's credentials Secret was deleted while its scheduler used it")
    );
    pass.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_secret_only_missing_from_a_cache_behind_the_api_server_fails_nothing() {
    let (ctx, mut api, mut caches) = context(10);
    let dc = running_without_its_secret_in_the_cache(&mut caches);
    let pass = run(dc, &ctx).await;
    let c = api.next().await;
    assert_eq!(c.method, Method::GET);
    c.ok(json!({"kind": "Secret", "apiVersion": "v1",
                "metadata": {"name": names::secret_name(ID), "namespace": "dask"}}));
    // No Secret created: the next request is the pass's status write, still running.
    let c = api.next().await;
    let st = written_status(&c);
    c.echo();
    assert_eq!(st.phase, Phase::Running);
    assert!(!st.stop_failed);
    assert_eq!(st.reason, None);
    pass.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_starting_clusters_missing_secret_is_created() {
    let (ctx, mut api, _caches) = context(10);
    let mut dc = cluster(ID);
    dc.metadata.creation_timestamp = Some(Time(jiff::Timestamp::now()));
    let pass = run(dc, &ctx).await;
    let c = api.next().await;
    assert_eq!(c.method, Method::POST);
    assert_eq!(c.path, "/api/v1/namespaces/dask/secrets");
    c.echo();
    let c = api.next().await;
    assert_eq!(c.method, Method::POST);
    assert_eq!(
        c.path, "/api/v1/namespaces/dask/pods",
        "then the scheduler pod"
    );
    c.echo();
    pass.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_stop_deletes_every_child_then_ends_stopped() {
    let (ctx, mut api, mut caches) = context(10);
    let mut dc = with_status(cluster(ID), Phase::Running);
    dc.spec.active = false;
    dc.spec.stop = Some(StopSpec {
        reason: "stopped by alice".into(),
        failed: false,
    });
    caches.children_of(&dc);
    caches.pod(ready_scheduler(&dc));
    caches.pod(worker(&dc, "dask-worker-x-a", "Running", None));
    let pass = run(dc.clone(), &ctx).await;
    let mut deleted = Vec::new();
    let st = loop {
        let c = api.next().await;
        if c.method == Method::PUT {
            let st = written_status(&c);
            c.echo();
            break st;
        }
        assert_eq!(c.method, Method::DELETE);
        deleted.push(c.path.clone());
        c.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    };
    assert_eq!(deleted.len(), 4, "{deleted:?}");
    assert_eq!(st.phase, Phase::Stopping, "pods are still terminating");
    assert_eq!(st.reason.as_deref(), Some("stopped by alice"));
    pass.await.unwrap().unwrap();

    // Once the caches show nothing left, the cluster is Stopped.
    let (ctx, mut api, _caches) = context(10);
    dc.status = Some(st);
    let pass = run(dc, &ctx).await;
    let c = api.next().await;
    let st = written_status(&c);
    assert_eq!(st.phase, Phase::Stopped);
    assert!(st.completion_time.is_some());
    c.echo();
    pass.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_unschedulable_scheduler_fails_after_the_start_timeout() {
    let (ctx, mut api, mut caches) = context(10);
    let mut dc = with_status(cluster(ID), Phase::Pending);
    dc.spec.runtime.start_timeout = 5.0;
    dc.metadata.creation_timestamp = Some(Time(
        jiff::Timestamp::now() - jiff::SignedDuration::from_secs(10),
    ));
    caches.children_of(&dc);
    let mut sched = build::scheduler_pod(&dc).unwrap();
    sched.status = Some(PodStatus {
        phase: Some("Pending".into()),
        conditions: Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some(
                "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
                    .into(),
            ),
            ..Default::default()
        }]),
        ..Default::default()
    });
    caches.pod(sched);
    let pass = run(dc, &ctx).await;
    let reason = status_after_other_requests(&mut api).await.reason.unwrap();
    assert!(
        reason.contains("did not become ready within 5 s"),
        "{reason}"
    );
    assert!(
        reason.contains("Unschedulable: 0/1 nodes are available"),
        "{reason}"
    );
    pass.await.unwrap().unwrap();
}

/// A Pending cluster whose children exist and whose scheduler is ready: a pass writes it
/// Running.
fn pending_with_a_ready_scheduler(caches: &mut Caches) -> DaskCluster {
    let dc = with_status(cluster(ID), Phase::Pending);
    caches.children_of(&dc);
    caches.pod(ready_scheduler(&dc));
    dc
}

#[tokio::test]
async fn a_stale_status_write_is_a_conflict_retried_at_once() {
    let (ctx, mut api, mut caches) = context(10);
    let dc = pending_with_a_ready_scheduler(&mut caches);
    let pass = run(dc.clone(), &ctx).await;
    let c = api.next().await;
    assert_eq!(c.method, Method::PUT);
    assert_eq!(
        c.body["metadata"]["resourceVersion"], "7",
        "the write carries its precondition"
    );
    c.status(409, "Conflict");
    let err = pass.await.unwrap().unwrap_err();
    assert!(err.is_conflict(), "{err}");
    let action = error_policy(Arc::new(dc), &err, ctx.clone());
    assert_eq!(action, Action::requeue(Duration::from_millis(50)));
    assert_eq!(ctx.metrics.reconcile_errors.get(), 1);
}

#[tokio::test]
async fn a_pass_over_the_version_its_own_status_write_replaced_waits_for_the_cache() {
    let (ctx, mut api, mut caches) = context(10);
    let dc = pending_with_a_ready_scheduler(&mut caches);
    let pass = run(dc.clone(), &ctx).await;
    let c = api.next().await;
    let st = written_status(&c);
    assert_eq!(st.phase, Phase::Running);
    let mut made = c.body.clone();
    made["metadata"]["resourceVersion"] = json!("8");
    c.ok(made);
    pass.await.unwrap().unwrap();
    // A child's event triggers a pass before the cache shows the write (version 7 still):
    // nothing is decided from the old status, nothing is written.
    let pass = run(dc.clone(), &ctx).await;
    api.silent().await;
    assert_eq!(
        pass.await.unwrap().unwrap(),
        Action::requeue(OWN_WRITE_RETRY)
    );
    // Once the cache shows the write, passes go on as usual.
    let mut caught_up = dc.clone();
    caught_up.metadata.resource_version = Some("8".into());
    caught_up.status = Some(st);
    let pass = run(caught_up, &ctx).await;
    api.silent().await;
    assert_ne!(
        pass.await.unwrap().unwrap(),
        Action::requeue(OWN_WRITE_RETRY)
    );
    // Another version than the one replaced (someone else wrote meanwhile) is acted on.
    let mut other = dc;
    other.metadata.resource_version = Some("9".into());
    let pass = run(other, &ctx).await;
    let c = api.next().await;
    assert_eq!(written_status(&c).phase, Phase::Running);
    c.echo();
    pass.await.unwrap().unwrap();
}

#[tokio::test]
async fn finished_clusters_are_deleted_after_the_retention() {
    let (ctx, mut api, _caches) = context(10);
    let mut dc = with_status(cluster(ID), Phase::Stopped);
    dc.status.as_mut().unwrap().completion_time = Some(format!(
        "{:.3}",
        jiff::Timestamp::now() - jiff::SignedDuration::from_secs(7200)
    ));
    let pass = run(dc, &ctx).await;
    let c = api.next().await;
    assert_eq!(c.method, Method::DELETE);
    assert_eq!(
        c.path,
        format!("/apis/dask-gateway-rs.io/v1alpha1/namespaces/dask/daskclusters/{ID}")
    );
    c.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    assert_eq!(pass.await.unwrap().unwrap(), Action::await_change());
}

#[tokio::test]
async fn a_finished_cluster_removes_children_the_teardown_had_not_seen() {
    // A secret and service the cache showed only after the teardown (created just before a
    // failure) must not stay behind until the retention.
    let (ctx, mut api, mut caches) = context(10);
    let mut dc = with_status(cluster(ID), Phase::Failed);
    dc.status.as_mut().unwrap().completion_time = Some(format!("{:.3}", jiff::Timestamp::now()));
    caches.children_of(&dc);
    let pass = run(dc, &ctx).await;
    let mut deleted = Vec::new();
    for _ in 0..2 {
        let c = api.next().await;
        assert_eq!(c.method, Method::DELETE);
        deleted.push(c.path.clone());
        c.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    }
    deleted.sort();
    assert_eq!(
        deleted,
        [
            format!("/api/v1/namespaces/dask/secrets/{}", names::secret_name(ID)),
            format!(
                "/api/v1/namespaces/dask/services/{}",
                names::service_name(ID)
            ),
        ]
    );
    assert!(pass.await.unwrap().is_ok());
    api.silent().await;
}

fn finished_ago(secs: i64) -> DaskCluster {
    let mut dc = with_status(cluster(ID), Phase::Stopped);
    dc.status.as_mut().unwrap().completion_time = Some(format!(
        "{:.3}",
        jiff::Timestamp::now() - jiff::SignedDuration::from_secs(secs)
    ));
    dc
}

#[tokio::test]
async fn a_settled_finished_cluster_is_labelled_out_of_the_caches() {
    let (ctx, mut api, _caches) = context(10);
    // Just finished: it stays a while, in case a child made just before the end shows up.
    let pass = run(finished_ago(1), &ctx).await;
    let action = pass.await.unwrap().unwrap();
    assert!(action != Action::await_change(), "{action:?}");
    api.silent().await;
    // Settled with nothing left: labelled, and the controller waits for no further change.
    let pass = run(finished_ago(60), &ctx).await;
    let c = api.next().await;
    assert_eq!(c.method, Method::PATCH);
    assert_eq!(
        c.path,
        format!("/apis/dask-gateway-rs.io/v1alpha1/namespaces/dask/daskclusters/{ID}")
    );
    assert_eq!(c.body["metadata"]["labels"][names::LABEL_FINISHED], "true");
    c.ok(serde_json::to_value(finished_ago(60)).unwrap());
    assert_eq!(pass.await.unwrap().unwrap(), Action::await_change());
}

#[tokio::test]
async fn the_sweep_deletes_labelled_clusters_past_the_retention_only() {
    let (ctx, mut api, _caches) = context(10);
    let sweep = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            crate::controller::sweep_finished(&ctx, "dask", Duration::from_secs(3600)).await
        })
    };
    let c = api.next().await;
    assert_eq!(c.method, Method::GET);
    assert!(
        c.query.contains("dask-gateway-rs.io%2Ffinished%3Dtrue")
            && c.query.contains("dask-gateway-rs.io%2Finstance%3Dgw"),
        "{}",
        c.query
    );
    let mut old = finished_ago(7200);
    old.metadata.name = Some("old".into());
    let mut recent = finished_ago(60);
    recent.metadata.name = Some("recent".into());
    c.ok(
        json!({"apiVersion": "dask-gateway-rs.io/v1alpha1", "kind": "DaskClusterList",
                "metadata": {}, "items": [old, recent]}),
    );
    let c = api.next().await;
    assert_eq!(c.method, Method::DELETE);
    assert!(c.path.ends_with("/daskclusters/old"), "{}", c.path);
    c.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    assert_eq!(sweep.await.unwrap().unwrap(), 1);
    api.silent().await;
}

/// `pod` with its first container running since `started`.
fn running_since(mut pod: Pod, started: jiff::Timestamp) -> Pod {
    let status = pod.status.get_or_insert_with(Default::default);
    status.container_statuses = Some(vec![ContainerStatus {
        name: "main".into(),
        state: Some(ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(started)),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }]);
    pod
}

#[tokio::test]
async fn running_pods_are_metered_from_their_start_and_only_changes_are_written() {
    let (ctx, mut api, mut caches) = context(10);
    let mut dc = with_status(cluster(ID), Phase::Running);
    dc.metadata.creation_timestamp = Some(Time(
        jiff::Timestamp::now() - jiff::SignedDuration::from_secs(600),
    ));
    dc.spec.replicas = 2;
    let r = dc.spec.settings.resources;
    // Start times to the whole second: the API server writes no finer, and the cache holds a
    // pod as it would come from a watch.
    let now = jiff::Timestamp::now();
    let ago = |secs: i64| jiff::Timestamp::from_second(now.as_second() - secs).unwrap();
    let ran = |secs: i64| now.duration_since(ago(secs)).as_secs_f64();
    caches.children_of(&dc);
    caches.pod(running_since(ready_scheduler(&dc), ago(60)));
    caches.pod(running_since(
        worker(&dc, "dask-worker-x-a", "Running", None),
        ago(30),
    ));
    caches.pod(running_since(
        worker(&dc, "dask-worker-x-b", "Running", None),
        ago(30),
    ));
    let pass = run(dc.clone(), &ctx).await;
    let c = api.next().await;
    let st = written_status(&c);
    c.echo();
    pass.await.unwrap().unwrap();
    let usage = st.usage.clone().expect("a usage record");
    assert_eq!(usage.meter.cores, r.scheduler_cores + 2.0 * r.worker_cores);
    let expected = ran(60) * r.scheduler_cores + 2.0 * ran(30) * r.worker_cores;
    let got = usage
        .within(usage.meter.accounted_until, 0, i64::MAX)
        .core_seconds;
    assert!(
        (got - expected).abs() < 1.0,
        "{got} core-seconds, expected {expected}"
    );
    // Nothing changed: no write (the running rate is in the record; time alone adds nothing).
    let mut dc2 = dc.clone();
    dc2.status = Some(st.clone());
    let pass = run(dc2, &ctx).await;
    api.silent().await;
    pass.await.unwrap().unwrap();
    // A pod of a warm-pool member is the operator's: nothing is metered.
    let mut pooled = with_status(cluster(ID), Phase::Running);
    pooled.spec.pool = Some("default".into());
    let mut next = pooled.status.clone().unwrap();
    let observed = ctx.observe("dask", ID);
    account(&ctx, ID, &pooled, &observed, &mut next);
    assert_eq!(next.usage, None);
    // Once the cluster has ended, the record is closed at the rate zero.
    let mut ended = with_status(cluster(ID), Phase::Running);
    let mut next = st;
    next.phase = Phase::Stopped;
    ended.status = Some(next.clone());
    account(&ctx, ID, &ended, &observed, &mut next);
    let closed = next.usage.unwrap();
    assert_eq!((closed.meter.cores, closed.meter.memory), (0.0, 0.0));
    assert!(closed.within(i64::MAX, 0, i64::MAX).core_seconds >= got);
    // An API server whose CRD predates usage drops the record we wrote: the controller then
    // leaves it out instead of rewriting it on every pass.
    let mut pruned = dc.status.clone().unwrap();
    pruned.usage = None;
    let mut next = pruned.clone();
    account(&ctx, ID, &dc, &observed, &mut next);
    assert_eq!(next, pruned, "no usage record is rewritten");
}

#[tokio::test]
async fn deferred_counts_keep_the_usage_their_passes_accrued() {
    let (ctx, mut api, mut caches) = context(10);
    let now = jiff::Timestamp::now();
    let ago = |secs: i64| jiff::Timestamp::from_second(now.as_second() - secs).unwrap();
    let mut dc = with_status(cluster(ID), Phase::Running);
    dc.metadata.creation_timestamp = Some(Time(ago(600)));
    dc.spec.replicas = 3;
    let running = |name: &str| running_since(worker(&dc, name, "Running", None), ago(30));
    let gone = running("dask-worker-x-c");
    for pod in [
        running("dask-worker-x-a"),
        running("dask-worker-x-b"),
        gone.clone(),
    ] {
        caches.pod(pod);
    }
    let mut written = dc.status.clone().unwrap();
    (written.replicas, written.ready_workers) = (3, 3);
    account(&ctx, ID, &dc, &ctx.observe("dask", ID), &mut written);
    dc.status = Some(written.clone());

    // Worker c goes; its replacement is on its way: the counts wait for the target, and the
    // pass's usage (c metered until now) waits with them.
    caches
        .pods
        .apply_watcher_event(&Event::Delete(LeanPod::from(gone)));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut short = written.clone();
    short.ready_workers = 2;
    account(&ctx, ID, &dc, &ctx.observe("dask", ID), &mut short);
    let seen_gone = short.usage.clone().unwrap();
    assert!(matches!(
        write_status(&ctx, &dc, &short).await.unwrap(),
        StatusWrite::Deferred(_)
    ));
    // The replacement is ready (not running in the cache yet): written with c metered until
    // the pass that saw it gone, not until this one.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut back = written.clone();
    back.ready_workers = 3;
    account(&ctx, ID, &dc, &ctx.observe("dask", ID), &mut back);
    assert_eq!(back.usage.as_ref(), Some(&seen_gone));
    let write = tokio::spawn({
        let (ctx, dc) = (ctx.clone(), dc.clone());
        async move { write_status(&ctx, &dc, &back).await }
    });
    let c = api.next().await;
    // As the API server gets it, through JSON: a float may come back a bit off in its last
    // digit (serde_json parses fast, not exactly), so the totals are compared within 1e-6.
    let usage = written_status(&c).usage.expect("a usage record");
    assert_eq!(
        usage.meter.accounted_until, seen_gone.meter.accounted_until,
        "no accrual after the pass that saw the worker gone"
    );
    let total = |l: &gateway_model::UsageLedger| {
        l.within(l.meter.accounted_until, 0, i64::MAX).core_seconds
    };
    assert!((total(&usage) - total(&seen_gone)).abs() < 1e-6);
    c.echo();
    assert_eq!(write.await.unwrap().unwrap(), StatusWrite::Written);
}

#[tokio::test]
async fn a_teardown_writes_its_status_once_it_ends_and_meters_each_pod_until_seen_gone() {
    let (ctx, mut api, mut caches) = context(10);
    let now = jiff::Timestamp::now();
    let ago = |secs: i64| jiff::Timestamp::from_second(now.as_second() - secs).unwrap();
    let mut dc = with_status(cluster(ID), Phase::Running);
    dc.metadata.creation_timestamp = Some(Time(ago(600)));
    dc.spec.active = false;
    dc.spec.stop = Some(StopSpec {
        reason: "stopped by alice".into(),
        failed: false,
    });
    let terminating = |name: &str| {
        let mut pod = running_since(worker(&dc, name, "Running", None), ago(30));
        pod.metadata.deletion_timestamp = Some(Time(now));
        pod
    };
    let (a, b) = (
        terminating("dask-worker-x-a"),
        terminating("dask-worker-x-b"),
    );
    caches.pod(a.clone());
    caches.pod(b.clone());
    // What the teardown's first pass wrote: Stopping, with both workers metered.
    let mut written = dc.status.clone().unwrap();
    written.phase = Phase::Stopping;
    written.stopping_since = Some(now_rfc3339());
    written.replicas = 2;
    account(&ctx, ID, &dc, &ctx.observe("dask", ID), &mut written);
    let base = written.usage.clone().expect("a usage record");
    dc.status = Some(written.clone());

    // Worker a is gone, b still stops: progress only, nothing is written.
    caches
        .pods
        .apply_watcher_event(&Event::Delete(LeanPod::from(a)));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let pass = run(dc.clone(), &ctx).await;
    api.silent().await;
    pass.await.unwrap().unwrap();
    let seen_gone = ctx
        .unwritten_usage(ID, written.usage.as_ref())
        .expect("the pass's usage is kept until it is written");
    assert_eq!(
        seen_gone.meter.cores,
        dc.spec.settings.resources.worker_cores
    );

    // b is gone too: one write ends the teardown, with a metered until the pass that saw it
    // gone and b until now.
    caches
        .pods
        .apply_watcher_event(&Event::Delete(LeanPod::from(b)));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let pass = run(dc, &ctx).await;
    let c = api.next().await;
    let st = written_status(&c);
    c.echo();
    pass.await.unwrap().unwrap();
    assert_eq!(st.phase, Phase::Stopped);
    assert_eq!((st.replicas, st.ready_workers), (0, 0));
    let usage = st.usage.expect("a usage record");
    let (t0, t1, t2) = (
        base.meter.accounted_until,
        seen_gone.meter.accounted_until,
        usage.meter.accounted_until,
    );
    assert!(t0 < t1 && t1 < t2, "{t0} < {t1} < {t2}");
    let total = |l: &gateway_model::UsageLedger| {
        l.within(l.meter.accounted_until, 0, i64::MAX).core_seconds
    };
    let worker_cores = base.meter.cores / 2.0;
    let expected =
        total(&base) + worker_cores * (2.0 * (t1 - t0) as f64 + (t2 - t1) as f64) / 1000.0;
    assert!(
        (total(&usage) - expected).abs() < 1e-6,
        "{} core-seconds, expected {expected}",
        total(&usage)
    );
    assert_eq!((usage.meter.cores, usage.meter.memory), (0.0, 0.0));
}

#[test]
fn which_status_changes_wait_and_which_are_written_at_once() {
    let status = |phase: Phase, ready_workers: i32| DaskClusterStatus {
        phase,
        replicas: 2,
        ready_workers,
        ..Default::default()
    };
    let running = status(Phase::Running, 1);
    let counted = DaskClusterStatus {
        usage: Some(Default::default()),
        ..status(Phase::Running, 2)
    };
    let stopping = status(Phase::Stopping, 1);
    let pending = status(Phase::Pending, 0);
    let starting = DaskClusterStatus {
        reason: Some("waiting for the scheduler (ContainerCreating)".into()),
        ..pending.clone()
    };
    let reason = DaskClusterStatus {
        reason: Some("why".into()),
        ..counted.clone()
    };
    // (old, next, [may wait for the target, is a start's progress, is a teardown's
    // progress], what it is)
    let cases = [
        (
            &running,
            &counted,
            [true, false, false],
            "a running cluster's counts",
        ),
        (&running, &reason, [false; 3], "a new reason"),
        (&running, &stopping, [false; 3], "the change to Stopping"),
        (
            &pending,
            &starting,
            [false, true, false],
            "a start's progress",
        ),
        (&pending, &running, [false; 3], "the change to Running"),
        (&pending, &stopping, [false; 3], "a failed start"),
        (
            &stopping,
            &status(Phase::Stopping, 0),
            [false, false, true],
            "a teardown's counts",
        ),
        (
            &stopping,
            &status(Phase::Stopped, 0),
            [false; 3],
            "the end of a teardown",
        ),
    ];
    for (old, next, [deferred, starts, held], what) in cases {
        assert_eq!(may_defer(old, next), deferred, "{what}: may_defer");
        assert_eq!(is_start_progress(old, next), starts, "{what}: start");
        assert_eq!(is_teardown_progress(old, next), held, "{what}: held");
    }
}

#[tokio::test]
async fn event_recordings_in_flight_end_with_the_term() {
    let (ctx, mut api, _caches) = context_with(10, true);
    let old = DaskClusterStatus {
        phase: Phase::Pending,
        ..Default::default()
    };
    let next = DaskClusterStatus {
        phase: Phase::Running,
        ..Default::default()
    };
    let dc = with_status(cluster(ID), Phase::Pending);
    record_transitions(&ctx, &dc, &old, &next);
    // The recording reaches the API server, which does not answer yet; meanwhile the term ends.
    let c = api.next().await;
    assert_eq!(c.method, Method::POST);
    assert!(c.path.contains("/events"), "{}", c.path);
    assert!(
        Arc::strong_count(&ctx) > 1,
        "the recording holds the context"
    );
    ctx.abort_event_tasks();
    // The recording is gone, and with it its hold on the context (and its client).
    tokio::time::timeout(Duration::from_secs(5), async {
        while Arc::strong_count(&ctx) > 1 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the aborted recording released the context");
    drop(c);
}

/// A pass reads its own cluster's pods only: another cluster's pods in the namespace, and a
/// pod with the cluster's label in another namespace, are not its workers (nor its scheduler).
#[tokio::test]
async fn a_pass_observes_only_its_own_clusters_pods() {
    const OTHER: &str = "fedcba9876543210fedcba9876543210";
    let (ctx, _api, mut caches) = context(100);
    let (dc, other) = (cluster(ID), cluster(OTHER));
    caches.pod(ready_scheduler(&dc));
    caches.pod(worker(
        &dc,
        &format!("{}a", names::worker_pod_prefix(ID)),
        "Running",
        None,
    ));
    caches.pod(ready_scheduler(&other));
    for i in 0..3 {
        let name = format!("{}{i}", names::worker_pod_prefix(OTHER));
        caches.pod(worker(&other, &name, "Running", None));
    }
    let mut elsewhere = worker(
        &dc,
        &format!("{}b", names::worker_pod_prefix(ID)),
        "Running",
        None,
    );
    elsewhere.metadata.namespace = Some("elsewhere".into());
    caches.pod(elsewhere);

    let observed = ctx.observe("dask", ID);
    let workers: Vec<&str> = observed.workers.iter().map(|p| pod_name(p)).collect();
    assert_eq!(workers, [format!("{}a", names::worker_pod_prefix(ID))]);
    assert_eq!(observed.workers_running.len(), 1);
    assert_eq!(
        observed.scheduler.as_ref().map(|p| pod_name(p).to_string()),
        Some(names::scheduler_pod_name(ID))
    );
    assert_eq!(ctx.observe("dask", OTHER).workers.len(), 3);
    assert_eq!(ctx.pods.count("dask", ID), 2);
    assert_eq!(ctx.pods.count("elsewhere", ID), 1);
}
