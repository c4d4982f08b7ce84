//! [`KubeBackend`] against a mocked API server (the `tower_test` service of
//! [`crate::mock_api`], as in the controller's tests): each test fills the watch caches through
//! the same event handlers the watches call, runs one backend operation, and checks exactly
//! which requests it makes and what it does with the answers. The mocked server applies merge
//! and JSON patches to the object it holds (JSON patches with their `test` operations), as the
//! real one does.

use super::*;
use crate::build::tests::cluster;
use crate::crd::{DaskClusterStatus, StatusAddresses};
use crate::mock_api::{ApiServer, Call};
use gateway_backend::ClusterSettings;
use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::ByteString;
use serde_json::{Map, Value};
use std::future::Future;
use tokio::task::JoinHandle;

const A: &str = "0123456789abcdef0123456789abcdef";
const B: &str = "fedcba9876543210fedcba9876543210";
const C: &str = "00000000000000000000000000000c0c";
const D: &str = "00000000000000000000000000000d0d";
const CLUSTERS: &str = "/apis/dask-gateway-rs.io/v1alpha1/namespaces/dask/daskclusters";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/dask/leases";
const MERGE: &str = "application/merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";

fn backend() -> (Arc<KubeBackend>, ApiServer) {
    backend_with(None, false)
}

/// [`backend`] with an installation owner, and every cluster hung on it or only pool members.
fn backend_with(
    installation_owner: Option<OwnerReference>,
    clusters_go_with_installation: bool,
) -> (Arc<KubeBackend>, ApiServer) {
    let (client, api) = crate::mock_api::pair();
    let config = KubeConfig {
        instance: "gw".into(),
        image: "img:1".into(),
        ..KubeConfig::default()
    };
    let runtime = GatewayRuntime {
        api_url: "http://gateway:8000/api".into(),
        timing: gateway_backend::ClusterTiming::default(),
        installation_owner,
        clusters_go_with_installation,
    };
    (
        KubeBackend::new(client, config, "dask".into(), runtime),
        api,
    )
}

/// Runs `f` on the backend in a task of its own, so the test can answer its requests.
fn spawn<T, F>(b: &Arc<KubeBackend>, f: impl FnOnce(Arc<KubeBackend>) -> F) -> JoinHandle<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(f(b.clone()))
}

/// What a spawned operation returned: it must finish once its requests are answered (a test
/// fails, rather than hangs, when the operation makes a request the test does not expect).
async fn done<T>(task: JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the operation did not finish: waiting for an unanswered request?")
        .unwrap()
}

/// What an operation returned that must answer without a request (it would wait forever for
/// an answer from the mocked server otherwise).
async fn no_request<T>(operation: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(2), operation)
        .await
        .expect("the operation made a request")
}

fn public(id: &str) -> String {
    format!("dask.{id}")
}

/// `user`'s DaskCluster `id` as the API server returns it: created at `created_ms`, labelled
/// and annotated as the backend creates it, no status yet.
fn object(id: &str, user: &str, created_ms: i64) -> DaskCluster {
    let mut dc = cluster(id);
    dc.spec.user = user.into();
    dc.metadata.resource_version = Some("7".into());
    let mut labels = names::labels("gw", id, user, "cluster");
    labels.remove(names::LABEL_COMPONENT);
    dc.metadata.labels = Some(labels);
    dc.metadata.annotations = Some(BTreeMap::from([
        (names::ANNOTATION_USER.to_string(), user.to_string()),
        (
            names::ANNOTATION_CREATED_MS.to_string(),
            created_ms.to_string(),
        ),
    ]));
    dc
}

/// An unclaimed member of warm pool `pool`.
fn member(id: &str, pool: &str, created_ms: i64) -> DaskCluster {
    let mut dc = object(id, names::POOL_USER, created_ms);
    dc.spec.pool = Some(pool.into());
    dc.labels_mut()
        .insert(names::LABEL_POOL.into(), pool.into());
    dc
}

/// `dc` with its scheduler up (RUNNING once its credentials are cached too).
fn running(mut dc: DaskCluster) -> DaskCluster {
    let id = dc.name_any();
    dc.status = Some(DaskClusterStatus {
        phase: Phase::Running,
        credentials: Some(names::secret_name(&id)),
        addresses: Some(StatusAddresses {
            scheduler: "tls://10.0.0.9:8786".into(),
            dashboard: "http://10.0.0.9:8787".into(),
            api: "http://10.0.0.9:8788".into(),
        }),
        ..Default::default()
    });
    dc
}

/// `dc` in phase `phase`, its credentials made.
fn in_phase(mut dc: DaskCluster, phase: Phase) -> DaskCluster {
    let id = dc.name_any();
    dc.status = Some(DaskClusterStatus {
        phase,
        credentials: Some(names::secret_name(&id)),
        completion_time: phase
            .is_terminal()
            .then(|| "2026-01-02T03:04:05.000Z".to_string()),
        ..Default::default()
    });
    dc
}

/// The credentials Secret of cluster `id`, as the controller makes it.
fn credentials(id: &str) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(names::secret_name(id));
    s.metadata.labels = Some(names::labels("gw", id, "x", names::COMPONENT_CREDENTIALS));
    s.data = Some(BTreeMap::from([
        (
            "api-token".into(),
            ByteString(format!("token-{id}\n").into()),
        ),
        ("dask.crt".into(), ByteString(b"CERT".to_vec())),
        ("dask.pem".into(), ByteString(b"KEY".to_vec())),
    ]));
    s
}

/// Feeds the caches a complete listing, the events the watches deliver when they (re)connect.
fn listed(b: &KubeBackend, clusters: Vec<DaskCluster>, secrets: Vec<Secret>) {
    let mut buffer = Vec::new();
    b.on_cluster_event(Event::Init, &mut buffer);
    for dc in clusters {
        b.on_cluster_event(Event::InitApply(dc), &mut buffer);
    }
    b.on_cluster_event(Event::InitDone, &mut buffer);
    let mut buffer = Vec::new();
    b.on_secret_event(Event::Init, &mut buffer);
    for s in secrets {
        b.on_secret_event(Event::InitApply(s), &mut buffer);
    }
    b.on_secret_event(Event::InitDone, &mut buffer);
}

/// One watch event of a changed DaskCluster.
fn applied(b: &KubeBackend, dc: DaskCluster) {
    b.on_cluster_event(Event::Apply(dc), &mut Vec::new());
}

/// Answers a PATCH of `current` as the API server does: applies the merge or JSON patch
/// (failing with 422 if a JSON patch's `test` fails) and returns the result, one
/// resourceVersion newer.
fn apply(c: Call, current: &DaskCluster) -> DaskCluster {
    assert_eq!(c.method, Method::PATCH);
    assert_eq!(c.path, format!("{CLUSTERS}/{}", current.name_any()));
    let mut doc = serde_json::to_value(current).unwrap();
    match c.content_type.as_str() {
        MERGE => json_patch::merge(&mut doc, &c.body),
        JSON_PATCH => {
            let patch: json_patch::Patch = serde_json::from_value(c.body.clone()).unwrap();
            json_patch::patch(&mut doc, &patch).expect("the patch applies (its tests pass)");
        }
        other => panic!("unexpected patch type {other:?}"),
    }
    let next = version(current).unwrap() + 1;
    doc["metadata"]["resourceVersion"] = json!(next.to_string());
    let updated: DaskCluster = serde_json::from_value(doc.clone()).unwrap();
    c.ok(doc);
    updated
}

/// The label selector of a LIST request, decoded.
fn selector(c: &Call) -> String {
    let raw = c
        .query
        .split('&')
        .find_map(|kv| kv.strip_prefix("labelSelector="))
        .unwrap_or_else(|| panic!("no labelSelector in {:?}", c.query));
    let mut out = Vec::new();
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(&raw[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn list_of(items: &[DaskCluster]) -> Value {
    json!({"apiVersion": "dask-gateway-rs.io/v1alpha1", "kind": "DaskClusterList",
           "metadata": {"resourceVersion": "9"}, "items": items})
}

fn options() -> Map<String, Value> {
    json!({"worker_cores": 2, "environment": {"A": "1"}})
        .as_object()
        .unwrap()
        .clone()
}

fn settings() -> ClusterSettings {
    let mut s = ClusterSettings::example();
    s.policy = Some("team-a".into());
    s.resources.worker_cores = 2.0;
    s
}

#[tokio::test]
async fn a_create_posts_one_daskcluster_with_owner_options_settings_and_labels() {
    let (b, mut api) = backend();
    let request = NewCluster::owned("alice@example.org", options(), settings());
    let before = now_ms();
    let task = spawn(&b, |b| async move { b.create(request).await });
    let c = api.next().await;
    assert_eq!((&c.method, c.path.as_str()), (&Method::POST, CLUSTERS));
    let id = c.body["metadata"]["name"].as_str().unwrap().to_string();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    let spec = &c.body["spec"];
    assert_eq!(spec["user"], "alice@example.org");
    assert_eq!(spec["options"], Value::Object(options()));
    assert_eq!(spec["settings"], serde_json::to_value(settings()).unwrap());
    assert_eq!(
        (&spec["replicas"], &spec["active"]),
        (&json!(0), &json!(true))
    );
    assert!(
        spec.get("pool").is_none() && spec.get("stop").is_none(),
        "{spec}"
    );
    assert_eq!(spec["runtime"]["image"], "img:1");
    assert_eq!(spec["runtime"]["apiUrl"], "http://gateway:8000/api");
    assert_eq!(spec["runtime"]["workerFailureLimit"], 3);
    let labels: BTreeMap<String, String> =
        serde_json::from_value(c.body["metadata"]["labels"].clone()).unwrap();
    let mut expected = names::labels("gw", &id, "alice@example.org", "cluster");
    expected.remove(names::LABEL_COMPONENT);
    assert_eq!(labels, expected);
    assert_eq!(
        labels[names::LABEL_USER],
        names::user_label("alice@example.org")
    );
    let annotations = &c.body["metadata"]["annotations"];
    assert_eq!(annotations[names::ANNOTATION_USER], "alice@example.org");
    let created: i64 = annotations[names::ANNOTATION_CREATED_MS]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((before..=now_ms()).contains(&created));
    c.echo();
    let view = done(task).await.unwrap();
    assert_eq!(view.name, public(&id));
    assert_eq!(view.owner, "alice@example.org");
    assert_eq!(view.status, ClusterStatus::Pending);
    assert_eq!(
        (view.options.clone(), view.start_time),
        (options(), created)
    );
    assert_eq!(view.settings, settings());
    assert_eq!((view.token.as_ref(), view.addresses.as_ref()), (None, None));
    // Known at once, before the watch reports it; nothing more is asked of the API server.
    assert_eq!(b.get(&view.name), Some(view.clone()));
    assert_eq!(b.list(Some("alice@example.org")), [view]);
    assert_eq!(b.counters.creates.get(), 1);
    api.silent().await;
}

/// Warm-pool members hang on the installation's owner (its Lease), so that uninstalling removes
/// them by garbage collection; user clusters do only when every cluster goes with it.
#[tokio::test]
async fn pool_members_and_only_they_go_with_the_installation_unless_all_clusters_do() {
    let lease = OwnerReference {
        api_version: "coordination.k8s.io/v1".into(),
        kind: "Lease".into(),
        name: "gw-controller".into(),
        uid: "lease-uid".into(),
        ..OwnerReference::default()
    };
    for all in [false, true] {
        let (b, mut api) = backend_with(Some(lease.clone()), all);
        let mut pooled = NewCluster::owned("", options(), settings());
        pooled.pool = Some("default".into());
        for (request, hung) in [
            (pooled, true),
            (NewCluster::owned("alice", options(), settings()), all),
        ] {
            let task = spawn(&b, |b| async move { b.create(request).await });
            let c = api.next().await;
            let owners = &c.body["metadata"]["ownerReferences"];
            if hung {
                assert_eq!(owners[0]["uid"], "lease-uid", "{}", c.body);
                assert_eq!(owners[0]["kind"], "Lease");
            } else {
                assert!(owners.is_null(), "{owners}");
            }
            c.echo();
            done(task).await.unwrap();
        }
        // A claimed member keeps the owner only when every cluster goes with the installation.
        let current = running(member(D, "default", 1_000));
        listed(&b, vec![current.clone()], vec![credentials(D)]);
        let task = spawn(&b, |b| async move {
            b.claim("default", NewCluster::owned("bob", options(), settings()))
                .await
        });
        let c = api.next().await;
        let last = c.body.as_array().unwrap().last().unwrap().clone();
        let expected = if all { json!([lease]) } else { json!([]) };
        assert_eq!(
            last,
            json!({"op": "add", "path": "/metadata/ownerReferences", "value": expected})
        );
        apply(c, &current);
        done(task).await.unwrap().expect("claimed");
        api.silent().await;
    }
}

#[tokio::test]
async fn a_refused_create_is_a_typed_error_and_leaves_nothing_behind() {
    type Check = fn(&BackendError) -> bool;
    let cases: [(u16, &str, Check); 4] = [
        (
            403,
            "Forbidden",
            |e| matches!(e, BackendError::Internal(m) if m.contains("not allowed to create DaskClusters (check its RBAC)")),
        ),
        (
            422,
            "Invalid",
            |e| matches!(e, BackendError::Invalid(m) if m == "Kubernetes refused the cluster: Invalid"),
        ),
        (
            500,
            "InternalError",
            |e| matches!(e, BackendError::Unavailable(m) if m == "Kubernetes is unavailable (500 InternalError)"),
        ),
        (
            409,
            "Conflict",
            |e| matches!(e, BackendError::Internal(m) if m == "Kubernetes answered 409: Conflict"),
        ),
    ];
    for (code, reason, check) in cases {
        let (b, mut api) = backend();
        let request = NewCluster::owned("alice", options(), settings());
        let task = spawn(&b, |b| async move { b.create(request).await });
        let c = api.next().await;
        assert_eq!(c.method, Method::POST);
        c.status(code, reason);
        let err = done(task).await.unwrap_err();
        assert!(check(&err), "{code}: {err:?}");
        // No retry and no clean-up request (nothing was made); nothing cached or counted.
        api.silent().await;
        assert_eq!(b.list(None), []);
        assert_eq!(b.counters.creates.get(), 0);
    }
}

#[tokio::test]
async fn a_taken_name_is_retried_under_a_new_one_at_most_three_times() {
    let (b, mut api) = backend();
    let task = spawn(&b, |b| async move {
        b.create(NewCluster::owned("alice", options(), settings()))
            .await
    });
    let mut tried = Vec::new();
    for _ in 0..3 {
        let c = api.next().await;
        assert_eq!((&c.method, c.path.as_str()), (&Method::POST, CLUSTERS));
        tried.push(c.body["metadata"]["name"].as_str().unwrap().to_string());
        c.status(409, "AlreadyExists");
    }
    let err = done(task).await.unwrap_err();
    assert!(
        matches!(&err, BackendError::Internal(m) if m == "Kubernetes answered 409: AlreadyExists"),
        "{err:?}"
    );
    tried.sort();
    tried.dedup();
    assert_eq!(tried.len(), 3, "a new name each time");
    api.silent().await;
    assert_eq!(b.list(None), []);

    // Taken once, then created under the second name.
    let task = spawn(&b, |b| async move {
        b.create(NewCluster::owned("alice", options(), settings()))
            .await
    });
    api.next().await.status(409, "AlreadyExists");
    let c = api.next().await;
    let id = c.body["metadata"]["name"].as_str().unwrap().to_string();
    c.echo();
    assert_eq!(done(task).await.unwrap().name, public(&id));
    assert_eq!(b.list(None).len(), 1);
}

#[tokio::test]
async fn reads_come_from_the_watch_cache_without_a_request() {
    let (b, mut api) = backend();
    listed(
        &b,
        vec![
            running(object(A, "alice", 2_000)),
            object(B, "alice", 1_000),
            running(object(C, "bob", 1_500)),
            running(member(D, "default", 500)),
        ],
        vec![credentials(A), credentials(D)],
    );
    assert!(b.healthy().await);
    let all: Vec<String> = b.list(None).into_iter().map(|c| c.name).collect();
    assert_eq!(
        all,
        [public(D), public(B), public(C), public(A)],
        "oldest first"
    );
    let alice: Vec<String> = b.list(Some("alice")).into_iter().map(|c| c.name).collect();
    assert_eq!(alice, [public(B), public(A)]);
    assert_eq!(
        b.list(Some(names::POOL_USER)),
        [],
        "pool members are nobody's"
    );

    let a = b.get(&public(A)).unwrap();
    assert_eq!(a.status, ClusterStatus::Running);
    assert_eq!(a.token.as_deref(), Some(format!("token-{A}").as_str()));
    assert_eq!(a.tls.as_ref().map(|t| t.cert.as_str()), Some("CERT"));
    assert_eq!(a.start_time, 2_000);
    let route = b.route(&public(A)).unwrap();
    assert_eq!(
        (route.scheduler.as_str(), route.dashboard.as_deref()),
        ("tls://10.0.0.9:8786", Some("http://10.0.0.9:8787"))
    );
    // Without its credentials cached a scheduler that is up is not RUNNING yet.
    let c = b.get(&public(C)).unwrap();
    assert_eq!(
        (c.status, c.addresses, b.route(&public(C))),
        (ClusterStatus::Pending, None, None)
    );
    let mut status = b.subscribe(&public(C)).unwrap();
    b.on_secret_event(Event::Apply(credentials(C)), &mut Vec::new());
    assert!(status.has_changed().unwrap());
    assert_eq!(*status.borrow_and_update(), ClusterStatus::Running);
    let d = b.get(&public(D)).unwrap();
    assert_eq!((d.owner.as_str(), d.pool.as_deref()), ("", Some("default")));

    // An older version from a slow watch does not replace a newer one.
    let mut stale = object(B, "alice", 1_000);
    stale.metadata.resource_version = Some("6".into());
    stale.spec.replicas = 9;
    applied(&b, stale);
    assert_eq!(b.get(&public(B)).unwrap().target_workers, 0);
    // A finished cluster leaves the cache (read on demand from then on); so does a deleted one.
    let mut finished = in_phase(object(B, "alice", 1_000), Phase::Stopped);
    finished.metadata.resource_version = Some("8".into());
    finished
        .labels_mut()
        .insert(names::LABEL_FINISHED.into(), "true".into());
    applied(&b, finished);
    b.on_cluster_event(Event::Delete(object(C, "bob", 0)), &mut Vec::new());
    assert_eq!(b.get(&public(B)), None);
    assert!(b.subscribe(&public(C)).is_none());
    assert_eq!(b.list(None).len(), 2);
    // Names of another namespace, or not ids at all, are nobody's.
    assert_eq!(b.get(&format!("other.{A}")), None);
    assert_eq!(b.get(A), None);
    api.silent().await;
}

#[tokio::test]
async fn a_heartbeats_new_worker_count_is_written_once_as_a_merge_patch() {
    let (b, mut api) = backend();
    let mut current = running(object(A, "alice", 1_000));
    listed(&b, vec![current.clone()], vec![credentials(A)]);
    let ours = format!("{}abcdef", names::worker_pod_prefix(A));
    let hb = Heartbeat {
        count: 3,
        closed_workers: vec![
            ours.clone(),
            "dask-worker-of-another-cluster".into(),
            ours.clone(),
        ],
        ..Heartbeat::default()
    };
    let task = spawn(&b, |b| async move { b.heartbeat(&public(A), &hb, 3).await });
    let c = api.next().await;
    assert_eq!(c.content_type, MERGE);
    assert_eq!(
        c.body,
        json!({"spec": {"replicas": 3, "retiredWorkers": [ours]}})
    );
    current = apply(c, &current);
    done(task).await.unwrap();
    assert_eq!(b.get(&public(A)).unwrap().target_workers, 3);
    assert_eq!(b.counters.spec_patches.get(), 1);

    // The same count again: nothing to write.
    let hb = Heartbeat {
        count: 3,
        ..Heartbeat::default()
    };
    let task = spawn(&b, |b| async move { b.heartbeat(&public(A), &hb, 3).await });
    api.silent().await;
    done(task).await.unwrap();
    // A lower one: only the count.
    let task = spawn(&b, |b| async move {
        b.heartbeat(&public(A), &Heartbeat::default(), 1).await
    });
    let c = api.next().await;
    assert_eq!(c.body, json!({"spec": {"replicas": 1}}));
    apply(c, &current);
    done(task).await.unwrap();
    assert_eq!(b.get(&public(A)).unwrap().target_workers, 1);
    api.silent().await;
}

#[tokio::test]
async fn heartbeats_of_unknown_stopping_or_finished_clusters_write_nothing() {
    let (b, mut api) = backend();
    let mut stopping = running(object(B, "alice", 1_000));
    stopping.spec.active = false;
    listed(
        &b,
        vec![
            stopping,
            in_phase(object(C, "alice", 1_000), Phase::Stopping),
            in_phase(object(D, "alice", 1_000), Phase::Failed),
        ],
        vec![],
    );
    let task = spawn(&b, |b| async move {
        let hb = Heartbeat::default();
        let unknown = b.heartbeat(&public(A), &hb, 5).await;
        let foreign = b.heartbeat(&format!("other.{B}"), &hb, 5).await;
        let rest = [
            b.heartbeat(&public(B), &hb, 5).await,
            b.heartbeat(&public(C), &hb, 5).await,
            b.heartbeat(&public(D), &hb, 5).await,
        ];
        (unknown, foreign, rest)
    });
    api.silent().await;
    let (unknown, foreign, rest) = done(task).await;
    assert!(matches!(unknown, Err(BackendError::NotFound(n)) if n == public(A)));
    assert!(matches!(foreign, Err(BackendError::NotFound(_))));
    for r in rest {
        r.unwrap();
    }
    assert_eq!(b.counters.spec_patches.get(), 0);
}

#[tokio::test]
async fn a_grant_is_one_annotation_patch_and_a_vanished_cluster_is_not_found() {
    let (b, mut api) = backend();
    let current = running(object(A, "alice", 1_000));
    listed(&b, vec![current.clone()], vec![credentials(A)]);
    let grant = WorkerGrant {
        workers: 3,
        held_until_ms: 1_764_100_000_000,
    };
    let task = spawn(
        &b,
        |b| async move { b.record_grant(&public(A), grant).await },
    );
    let c = api.next().await;
    assert_eq!(c.content_type, MERGE);
    assert_eq!(
        c.body,
        json!({"metadata": {"annotations": {names::ANNOTATION_GRANTED_WORKERS: "3/1764100000000"}}})
    );
    apply(c, &current);
    done(task).await.unwrap();
    assert_eq!(b.get(&public(A)).unwrap().grant, Some(grant));
    // Another replica's client activity: the same kind of write, another annotation.
    let task = spawn(&b, |b| async move {
        b.record_client_activity(&public(A), 1_764_000_000_123)
            .await
    });
    let c = api.next().await;
    assert_eq!(
        c.body,
        json!({"metadata": {"annotations": {names::ANNOTATION_LAST_CLIENT_MS: "1764000000123"}}})
    );
    c.status(404, "NotFound");
    let err = done(task).await.unwrap_err();
    assert!(
        matches!(&err, BackendError::NotFound(n) if *n == public(A)),
        "{err:?}"
    );
    // Not one of ours: refused without a request.
    let err = no_request(b.record_grant(&format!("other.{A}"), grant))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::NotFound(_)));
    api.silent().await;
}

#[tokio::test]
async fn a_stop_writes_the_stop_request_once() {
    let (b, mut api) = backend();
    let current = running(object(A, "alice", 1_000));
    listed(&b, vec![current.clone()], vec![credentials(A)]);
    let task = spawn(&b, |b| async move {
        b.stop(&public(A), StopRequest::failed("the scheduler died"))
            .await
    });
    let c = api.next().await;
    assert_eq!(c.content_type, MERGE);
    assert_eq!(
        c.body,
        json!({"spec": {"active": false, "stop": {"reason": "the scheduler died", "failed": true}}})
    );
    apply(c, &current);
    done(task).await.unwrap();
    let a = b.get(&public(A)).unwrap();
    assert_eq!(
        (a.status, a.reason.as_deref()),
        (ClusterStatus::Stopping, Some("the scheduler died"))
    );
    // Stopping already, unknown, or not ours: nothing to write.
    no_request(b.stop(&public(A), StopRequest::stopped("again")))
        .await
        .unwrap();
    no_request(b.stop(&public(B), StopRequest::stopped("unknown")))
        .await
        .unwrap();
    no_request(b.stop(&format!("other.{A}"), StopRequest::stopped("x")))
        .await
        .unwrap();
    api.silent().await;
    // Gone from the API server meanwhile: stopped as far as the caller is concerned.
    listed(&b, vec![running(object(B, "bob", 1_000))], vec![]);
    let task = spawn(&b, |b| async move {
        b.stop(&public(B), StopRequest::stopped("x")).await
    });
    api.next().await.status(404, "NotFound");
    done(task).await.unwrap();
    api.silent().await;
}

#[tokio::test]
async fn a_pool_stop_tests_that_the_member_is_unclaimed_and_a_failed_test_leaves_it_alone() {
    let (b, mut api) = backend();
    let current = running(member(D, "default", 1_000));
    listed(&b, vec![current.clone()], vec![credentials(D)]);
    let stop = || StopRequest::stopped("the pool shrank").if_pool("default");
    let task = spawn(&b, |b| async move { b.stop(&public(D), stop()).await });
    let c = api.next().await;
    assert_eq!(c.content_type, JSON_PATCH);
    assert_eq!(
        c.body,
        json!([
            {"op": "test", "path": "/spec/pool", "value": "default"},
            {"op": "replace", "path": "/spec/active", "value": false},
            {"op": "add", "path": "/spec/stop", "value": {"reason": "the pool shrank", "failed": false}},
        ])
    );
    // Claimed by another replica meanwhile: the test fails, and that is not an error.
    c.status(422, "Invalid");
    done(task).await.unwrap();
    assert_eq!(b.get(&public(D)).unwrap().status, ClusterStatus::Running);
    api.silent().await;
    // Still unclaimed: stopped.
    let task = spawn(&b, |b| async move { b.stop(&public(D), stop()).await });
    apply(api.next().await, &current);
    done(task).await.unwrap();
    assert_eq!(b.get(&public(D)).unwrap().status, ClusterStatus::Stopping);
    api.silent().await;
}

/// The claim patch the backend sends for `owner`, except the new creation time.
fn claim_patch(owner: &str) -> Value {
    json!([
        {"op": "test", "path": "/spec/pool", "value": "default"},
        {"op": "test", "path": "/spec/active", "value": true},
        {"op": "replace", "path": "/spec/user", "value": owner},
        {"op": "replace", "path": "/spec/options", "value": options()},
        {"op": "replace", "path": "/spec/settings", "value": settings()},
        {"op": "remove", "path": "/spec/pool"},
        {"op": "remove", "path": "/metadata/labels/dask-gateway-rs.io~1pool"},
        {"op": "add", "path": "/metadata/labels/dask-gateway-rs.io~1user", "value": names::user_label(owner)},
        {"op": "add", "path": "/metadata/annotations/dask-gateway-rs.io~1user", "value": owner},
        {"op": "add", "path": "/metadata/annotations/dask-gateway-rs.io~1created-ms", "value": "<now>"},
        {"op": "add", "path": "/metadata/ownerReferences", "value": []},
    ])
}

/// The request's body with the created-ms value replaced by `<now>`, and that value.
fn without_time(c: &Call) -> (Value, i64) {
    let mut body = c.body.clone();
    let at = body[9]["value"].as_str().unwrap().parse().unwrap();
    body[9]["value"] = json!("<now>");
    (body, at)
}

#[tokio::test]
async fn a_claim_is_one_json_patch_that_tests_the_member_is_still_free() {
    let (b, mut api) = backend();
    let current = running(member(D, "default", 1_000));
    listed(&b, vec![current.clone()], vec![credentials(D)]);
    let before = now_ms();
    let task = spawn(&b, |b| async move {
        b.claim(
            "default",
            NewCluster::owned("bob@example.org", options(), settings()),
        )
        .await
    });
    let c = api.next().await;
    assert_eq!(c.content_type, JSON_PATCH);
    let (body, at) = without_time(&c);
    assert_eq!(body, claim_patch("bob@example.org"));
    assert!((before..=now_ms()).contains(&at));
    let claimed = apply(c, &current);
    assert_eq!(
        claimed.labels().get(names::LABEL_USER),
        Some(&names::user_label("bob@example.org"))
    );
    assert_eq!(claimed.labels().get(names::LABEL_POOL), None);
    let view = done(task).await.unwrap().expect("claimed");
    assert_eq!(view.name, public(D));
    assert_eq!(
        (view.owner.as_str(), view.pool.as_deref(), view.status),
        ("bob@example.org", None, ClusterStatus::Running)
    );
    assert_eq!((view.start_time, view.options.clone()), (at, options()));
    assert_eq!(b.list(Some("bob@example.org")), [view]);
    api.silent().await;
}

#[tokio::test]
async fn a_conflicting_claim_tries_each_other_member_once_then_none() {
    let (b, mut api) = backend();
    let m1 = running(member(A, "default", 1_000));
    let m2 = in_phase(member(B, "default", 500), Phase::Pending);
    let m3 = running(member(C, "default", 2_000));
    let mut stopped = running(member(D, "default", 100));
    stopped.spec.active = false;
    let mut gpu = running(member("0000000000000000000000000000e0e0", "gpu", 100));
    gpu.status.as_mut().unwrap().credentials = None;
    listed(
        &b,
        vec![m1, m2, m3.clone(), stopped, gpu],
        vec![credentials(A), credentials(C), credentials(D)],
    );
    let claim = || NewCluster::owned("bob", options(), settings());
    let task = spawn(&b, |b| async move { b.claim("default", claim()).await });
    // RUNNING members first, oldest first; each refusal (a failed test, a conflict, gone)
    // means another replica got there first: the next member, never the same one again.
    let mut tried = Vec::new();
    for answer in [(422, "Invalid"), (409, "Conflict"), (404, "NotFound")] {
        let c = api.next().await;
        assert_eq!(
            (&c.method, c.content_type.as_str()),
            (&Method::PATCH, JSON_PATCH)
        );
        assert_eq!(without_time(&c).0, claim_patch("bob"));
        tried.push(c.path.rsplit('/').next().unwrap().to_string());
        c.status(answer.0, answer.1);
    }
    assert_eq!(tried, [A, C, B]);
    assert_eq!(
        done(task).await.unwrap(),
        None,
        "no member free: the caller starts cold"
    );
    api.silent().await;
    assert_eq!(b.get(&public(A)).unwrap().pool.as_deref(), Some("default"));

    // Taken by the second try.
    let task = spawn(&b, |b| async move { b.claim("default", claim()).await });
    api.next().await.status(409, "Conflict");
    let view = apply(api.next().await, &m3);
    assert_eq!(view.spec.user, "bob");
    let got = done(task).await.unwrap().unwrap();
    assert_eq!((got.name, got.owner), (public(C), "bob".to_string()));
    api.silent().await;

    // Any other failure ends the claim at once, as an error.
    let task = spawn(&b, |b| async move { b.claim("default", claim()).await });
    api.next().await.status(503, "ServiceUnavailable");
    let err = done(task).await.unwrap_err();
    assert!(matches!(err, BackendError::Unavailable(_)), "{err:?}");
    api.silent().await;
}

fn lease(name: &str, uid: &str, renewed: jiff::Timestamp) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": name, "uid": uid, "resourceVersion": "5"},
           "spec": {"holderIdentity": "other-gateway", "leaseDurationSeconds": 10,
                    "acquireTime": renewed, "renewTime": renewed}})
}

#[tokio::test]
async fn a_quota_lock_is_a_lease_then_a_fresh_read_of_the_users_clusters() {
    let (b, mut api) = backend();
    listed(&b, vec![], vec![]);
    let lease_name = b.quota_locks.lease_name("alice@example.org");
    let task = spawn(&b, |b| async move {
        b.lock_user_quota("alice@example.org").await
    });
    let c = api.next().await;
    assert_eq!((&c.method, c.path.as_str()), (&Method::POST, LEASES));
    assert_eq!(c.body["metadata"]["name"], lease_name.as_str());
    assert_eq!(c.body["metadata"]["labels"][names::LABEL_INSTANCE], "gw");
    assert_eq!(c.body["spec"]["leaseDurationSeconds"], 10);
    assert!(c.body["spec"]["holderIdentity"].is_string());
    let mut created = c.body.clone();
    created["metadata"]["uid"] = json!("lease-uid");
    c.ok(created);
    // What another replica created for alice, straight from the API server.
    let c = api.next().await;
    assert_eq!((&c.method, c.path.as_str()), (&Method::GET, CLUSTERS));
    assert_eq!(
        selector(&c),
        format!(
            "dask-gateway-rs.io/instance=gw,!dask-gateway-rs.io/finished,dask-gateway-rs.io/user={}",
            names::user_label("alice@example.org")
        )
    );
    c.ok(list_of(&[object(A, "alice@example.org", 1_000)]));
    let guard = done(task)
        .await
        .unwrap()
        .expect("a lock shared with other replicas");
    assert_eq!(b.list(Some("alice@example.org")).len(), 1);
    api.silent().await;
    // Released on drop: the Lease is deleted, only if it is still the one taken.
    drop(guard);
    let c = api.next().await;
    assert_eq!(
        (&c.method, c.path.clone()),
        (&Method::DELETE, format!("{LEASES}/{lease_name}"))
    );
    assert_eq!(c.body["preconditions"]["uid"], "lease-uid");
    c.ok(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
    api.silent().await;
}

#[tokio::test(start_paused = true)]
async fn a_quota_lock_held_by_a_live_replica_is_waited_for_then_busy() {
    let (b, mut api) = backend();
    let lease_name = b.quota_locks.lease_name("alice");
    let started = tokio::time::Instant::now();
    let mut task = spawn(&b, |b| async move { b.lock_user_quota("alice").await });
    let mut creates = 0;
    let result = loop {
        tokio::select! {
            biased;
            r = &mut task => break r.unwrap(),
            c = api.next() => match c.method {
                Method::POST => {
                    creates += 1;
                    assert_eq!(c.body["metadata"]["name"], lease_name.as_str());
                    c.status(409, "AlreadyExists");
                }
                Method::GET => {
                    assert_eq!(c.path, format!("{LEASES}/{lease_name}"));
                    c.ok(lease(&lease_name, "live", jiff::Timestamp::now()));
                }
                // A live holder's Lease is never deleted, nor anything else asked.
                m => panic!("unexpected {m} {}", c.path),
            },
        }
    };
    assert!(
        matches!(&result, Err(BackendError::Unavailable(m)) if m == "another gateway replica is deciding this user's quota; try again"),
        "{:?}",
        result.as_ref().map(|_| ())
    );
    assert!(started.elapsed() >= crate::quota_lock::QUOTA_LOCK_WAIT);
    assert!(creates > 5, "retried with backoff: {creates}");
    api.silent().await;
}

#[tokio::test]
async fn an_expired_quota_lock_is_deleted_by_uid_and_a_lost_race_tries_again() {
    let (b, mut api) = backend();
    let lease_name = b.quota_locks.lease_name("alice");
    let task = spawn(&b, |b| async move { b.lock_user_quota("alice").await });
    api.next().await.status(409, "AlreadyExists");
    let c = api.next().await;
    assert_eq!(c.method, Method::GET);
    let long_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3600);
    c.ok(lease(&lease_name, "dead", long_ago));
    let c = api.next().await;
    assert_eq!(
        (&c.method, c.path.clone()),
        (&Method::DELETE, format!("{LEASES}/{lease_name}"))
    );
    assert_eq!(
        c.body["preconditions"],
        json!({"uid": "dead", "resourceVersion": "5"})
    );
    // Another replica took it over first: the precondition fails; start again.
    c.status(409, "Conflict");
    let c = api.next().await;
    assert_eq!((&c.method, c.path.as_str()), (&Method::POST, LEASES));
    c.echo();
    let c = api.next().await;
    assert_eq!(c.method, Method::GET);
    assert!(c.path.ends_with("/daskclusters"), "{}", c.path);
    c.ok(list_of(&[]));
    let guard = done(task).await.unwrap();
    assert!(guard.is_some());
    api.silent().await;
    drop(guard);
    assert_eq!(api.next().await.method, Method::DELETE);

    // An API server that forbids Leases is an error, not a wait.
    let task = spawn(&b, |b| async move { b.lock_user_quota("alice").await });
    api.next().await.status(403, "Forbidden");
    let err = done(task).await.map(|_| ()).unwrap_err();
    assert!(
        matches!(&err, BackendError::Internal(m) if m.contains("not allowed to lock a user's quota")),
        "{err:?}"
    );
    api.silent().await;
}

#[tokio::test]
async fn finished_clusters_are_read_from_the_api_server_on_demand() {
    let (b, mut api) = backend();
    let task = spawn(&b, |b| async move { b.finished(Some("alice")).await });
    let c = api.next().await;
    assert_eq!((&c.method, c.path.as_str()), (&Method::GET, CLUSTERS));
    assert_eq!(
        selector(&c),
        "dask-gateway-rs.io/instance=gw,dask-gateway-rs.io/finished=true,dask-gateway-rs.io/user=alice"
    );
    let mut pooled = in_phase(member(C, "default", 100), Phase::Stopped);
    pooled.spec.user = "alice".into();
    c.ok(list_of(&[
        in_phase(object(A, "alice", 2_000), Phase::Stopped),
        in_phase(object(B, "alice", 1_000), Phase::Failed),
        pooled,
    ]));
    let views = done(task).await.unwrap();
    let got: Vec<(String, ClusterStatus, Option<i64>)> = views
        .into_iter()
        .map(|v| (v.name, v.status, v.stop_time))
        .collect();
    let stop = Some(
        "2026-01-02T03:04:05Z"
            .parse::<jiff::Timestamp>()
            .unwrap()
            .as_millisecond(),
    );
    assert_eq!(
        got,
        [
            (public(B), ClusterStatus::Failed, stop),
            (public(A), ClusterStatus::Stopped, stop)
        ]
    );
    assert_eq!(b.list(None), [], "not cached");

    // One by name: a GET of that object, of this installation.
    let task = spawn(&b, |b| async move { b.stored_cluster(&public(A)).await });
    let c = api.next().await;
    assert_eq!(
        (&c.method, c.path.clone()),
        (&Method::GET, format!("{CLUSTERS}/{A}"))
    );
    let mut labelled = in_phase(object(A, "alice", 2_000), Phase::Stopped);
    labelled
        .labels_mut()
        .insert(names::LABEL_FINISHED.into(), "true".into());
    c.ok(serde_json::to_value(&labelled).unwrap());
    let view = done(task).await.unwrap().unwrap();
    assert_eq!((view.status, view.token), (ClusterStatus::Stopped, None));
    assert_eq!(b.list(None), [], "a finished one is not cached");
    let task = spawn(&b, |b| async move { b.stored_cluster(&public(B)).await });
    api.next().await.status(404, "NotFound");
    assert_eq!(done(task).await.unwrap(), None);
    assert_eq!(
        no_request(b.stored_cluster(&format!("other.{A}")))
            .await
            .unwrap(),
        None
    );
    api.silent().await;
}

#[tokio::test]
async fn a_cluster_another_replica_just_created_is_read_kept_and_can_be_stopped() {
    let (b, mut api) = backend();
    listed(&b, vec![], vec![]);
    // Created through the other replica; this one's watch has not brought it yet.
    let created = object(A, "alice", 2_000);
    let task = spawn(&b, |b| async move { b.stored_cluster(&public(A)).await });
    let c = api.next().await;
    assert_eq!(
        (&c.method, c.path.clone()),
        (&Method::GET, format!("{CLUSTERS}/{A}"))
    );
    c.ok(serde_json::to_value(&created).unwrap());
    let view = done(task).await.unwrap().unwrap();
    assert_eq!(
        (view.name.as_str(), view.owner.as_str(), view.status),
        (public(A).as_str(), "alice", ClusterStatus::Pending)
    );
    assert_eq!(
        b.get(&public(A)).map(|v| v.name),
        Some(public(A)),
        "kept in memory"
    );
    // So a stop that follows is written, not dropped as one of an unknown cluster.
    let task = spawn(&b, |b| async move {
        b.stop(&public(A), StopRequest::stopped("user asked")).await
    });
    let c = api.next().await;
    assert_eq!(c.content_type, MERGE);
    assert_eq!(c.body["spec"]["active"], json!(false));
    apply(c, &created);
    done(task).await.unwrap();

    // One of another installation in the same namespace is not ours, and is not kept.
    let mut other = object(B, "alice", 2_000);
    other
        .labels_mut()
        .insert(names::LABEL_INSTANCE.into(), "other".into());
    let task = spawn(&b, |b| async move { b.stored_cluster(&public(B)).await });
    api.next().await.ok(serde_json::to_value(&other).unwrap());
    assert_eq!(done(task).await.unwrap(), None);
    assert_eq!(b.get(&public(B)), None);
    api.silent().await;
}

#[tokio::test]
async fn metrics_show_the_cached_objects_and_the_event_counters() {
    let (b, _api) = backend();
    let mut registry = metrics::registry();
    b.register_metrics(&mut registry);
    listed(
        &b,
        vec![object(A, "alice", 1_000), object(B, "bob", 2_000)],
        vec![credentials(A)],
    );
    b.counters.spec_patches.inc();
    let text = metrics::render(&registry).unwrap();
    for line in [
        "# HELP dask_gateway_kube_cached_objects Objects in the gateway's watch caches.",
        "# TYPE dask_gateway_kube_cached_objects gauge",
        "dask_gateway_kube_cached_objects{kind=\"daskcluster\"} 2",
        "dask_gateway_kube_cached_objects{kind=\"secret\"} 1",
        "# HELP dask_gateway_kube_creates DaskClusters created by this gateway.",
        "# TYPE dask_gateway_kube_creates counter",
        "dask_gateway_kube_creates_total 0",
        "# TYPE dask_gateway_kube_spec_patches counter",
        "dask_gateway_kube_spec_patches_total 1",
        "# TYPE dask_gateway_kube_watch_errors counter",
        "dask_gateway_kube_watch_errors_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from\n{text}"
        );
    }
    assert_eq!(text.matches("# TYPE").count(), 4, "{text}");
}
