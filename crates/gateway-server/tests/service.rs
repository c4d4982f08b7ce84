//! The rules above the backend seam (quota, ownership, tokens, clipping, forwarding, `?wait`),
//! over the in-memory fake backend: no Dask, no processes.
//!
//! The service and the backend share a clock that follows tokio's: tests about time run under
//! paused time and move it with `tokio::time::advance` instead of sleeping.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use gateway_backend::fake::FakeBackend;
use gateway_backend::{ClusterBackend, SchedulerAddresses};
use gateway_model::{ClusterStatus, Heartbeat};
use gateway_server::auth::User;
use gateway_server::clock::Clock;
use gateway_server::clusters::{ClusterError, ClusterService, Requester};
use gateway_server::config::ClusterConfig;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn user(name: &str) -> User {
    User::named(name, false)
}

/// A fake backend that stamps times from `clock`.
fn fake_backend(clock: Clock) -> Arc<FakeBackend> {
    Arc::new(FakeBackend::new().with_clock(move || clock.now_ms()))
}

/// A service with the `cluster` section `yaml` over `backend`, on `clock`.
fn service_on(backend: &Arc<FakeBackend>, clock: Clock, yaml: &str) -> ClusterService {
    let config: ClusterConfig = serde_yaml::from_str(yaml).unwrap();
    ClusterService::new(backend.clone(), Arc::new(config)).with_clock(clock)
}

/// What `/metrics` shows of `svc`: its families and its backend's.
fn metrics_text(svc: &Arc<ClusterService>) -> String {
    let mut registry = gateway_backend::metrics::registry();
    svc.register_metrics(&mut registry);
    gateway_backend::metrics::render(&registry).unwrap()
}

fn service(yaml: &str) -> (ClusterService, Arc<FakeBackend>) {
    let clock = Clock::tokio();
    let backend = fake_backend(clock);
    (service_on(&backend, clock, yaml), backend)
}

/// Moves tokio's clock (and so the service's) by `ms` without waiting, in a test whose time
/// runs: paused only for the jump, so the test's real HTTP traffic meets no timer that jumped.
async fn skip(ms: u64) {
    tokio::time::pause();
    tokio::time::advance(Duration::from_millis(ms)).await;
    tokio::time::resume();
}

/// A scheduler preload API that records what `/api/comm` receives.
#[derive(Clone, Default)]
struct Comm {
    received: Arc<Mutex<Vec<(String, Value)>>>,
}

async fn comm(State(c): State<Comm>, headers: HeaderMap, body: String) -> &'static str {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    c.received
        .lock()
        .unwrap()
        .push((auth, serde_json::from_str(&body).unwrap()));
    ""
}

/// The largest worker count a fake scheduler was told to scale to (0 if none).
fn largest_scale(comm: &Comm) -> u64 {
    comm.received
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(_, m)| m["count"].as_u64())
        .max()
        .unwrap_or(0)
}

async fn fake_scheduler_api() -> (String, Comm) {
    let c = Comm::default();
    let app = Router::new()
        .route("/api/comm", post(comm))
        .with_state(c.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), c)
}

async fn running_cluster(svc: &ClusterService, b: &FakeBackend, owner: &str, api: &str) -> String {
    running_with_api(svc, b, &user(owner), api).await
}

/// A running cluster of `owner` whose scheduler API nothing contacts.
async fn running_as(svc: &ClusterService, b: &FakeBackend, owner: &User) -> String {
    running_with_api(svc, b, owner, "http://127.0.0.1:1").await
}

async fn running_with_api(
    svc: &ClusterService,
    b: &FakeBackend,
    owner: &User,
    api: &str,
) -> String {
    let name = svc.create(owner, None).await.unwrap();
    b.make_running(
        &name,
        SchedulerAddresses {
            scheduler: "tls://127.0.0.1:1".into(),
            dashboard: None,
            api: api.into(),
        },
    );
    name
}

#[tokio::test]
async fn bad_options_create_nothing() {
    let (svc, b) = service(
        "options: [{field: worker_cores, type: int, default: 1, min: 1, max: 4, target: worker_cores}]",
    );
    for bad in [json!({"nope": 1}), json!({"worker_cores": 9}), json!([1])] {
        let e = svc.create(&user("alice"), Some(&bad)).await.unwrap_err();
        assert!(matches!(e, ClusterError::Invalid(_)), "{e}");
    }
    assert!(b.list(None).is_empty());
    let name = svc
        .create(&user("alice"), Some(&json!({"worker_cores": 3})))
        .await
        .unwrap();
    let v = b.get(&name).unwrap();
    assert_eq!(v.settings.resources.worker_cores, 3.0);
    assert_eq!(v.options["worker_cores"], json!(3));
}

#[tokio::test]
async fn concurrent_creates_cannot_pass_the_per_user_quota() {
    let (svc, b) = service("max_clusters_per_user: 2");
    let svc = Arc::new(svc);
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.create(&user("alice"), None).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert!(
                e.to_string()
                    .contains("already has 2 active clusters; the maximum per user is 2"),
                "{e}"
            ),
        }
    }
    assert_eq!(ok, 2);
    assert_eq!(b.list(Some("alice")).len(), 2);
    // Another user has their own quota; a stopped cluster frees a place.
    svc.create(&user("bob"), None).await.unwrap();
    let first = b.list(Some("alice"))[0].name.clone();
    svc.stop(&first, Requester::User(&user("alice")))
        .await
        .unwrap();
    svc.create(&user("alice"), None).await.unwrap();
}

#[tokio::test]
async fn owners_and_admins() {
    let (svc, _b) = service("{}");
    let name = svc.create(&user("alice"), None).await.unwrap();
    let bob = user("bob");
    let e = svc.get(&bob, &name, false).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("User bob lacks permissions to view cluster {name}")
    );
    assert!(svc.list(&bob, None).await.unwrap().is_empty());
    let e = svc.stop(&name, Requester::User(&bob)).await.unwrap_err();
    assert!(matches!(e, ClusterError::Forbidden { action: "stop", .. }));
    let root = User::named("root", true);
    assert_eq!(svc.list(&root, None).await.unwrap().len(), 1);
    svc.get(&root, &name, false).await.unwrap();
    assert!(matches!(
        svc.get(&root, "nope", false).await.unwrap_err(),
        ClusterError::NotFound(_)
    ));
    // Unknown clusters stop without error (DELETE is idempotent).
    svc.stop("nope", Requester::User(&bob)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn wait_holds_until_the_cluster_runs() {
    let (svc, b) = service("{}");
    let name = svc.create(&user("alice"), None).await.unwrap();
    assert_eq!(
        svc.get(&user("alice"), &name, false).await.unwrap().status,
        ClusterStatus::Pending
    );
    let b2 = b.clone();
    let n2 = name.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        b2.make_running(
            &n2,
            SchedulerAddresses {
                scheduler: "tls://h:1".into(),
                dashboard: Some("http://h:2".into()),
                api: "http://h:3".into(),
            },
        );
    });
    let started = tokio::time::Instant::now();
    let m = svc.get(&user("alice"), &name, true).await.unwrap();
    assert_eq!(m.status, ClusterStatus::Running);
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(150),
        "held until it ran"
    );
    assert!(m.tls_cert.is_some());
    assert_eq!(m.dashboard_route, Some(format!("/clusters/{name}/status")));
}

#[tokio::test(start_paused = true)]
async fn wait_gives_up_after_twenty_seconds() {
    let (svc, _b) = service("{}");
    let name = svc.create(&user("alice"), None).await.unwrap();
    let started = tokio::time::Instant::now();
    let m = svc.get(&user("alice"), &name, true).await.unwrap();
    assert_eq!(m.status, ClusterStatus::Pending);
    assert_eq!(started.elapsed(), Duration::from_secs(20));
}

#[tokio::test]
async fn heartbeats_need_the_cluster_token_and_are_clipped() {
    let (svc, b) = service("max_workers: 2");
    let name = svc.create(&user("alice"), None).await.unwrap();
    let token = b.get(&name).unwrap().token.unwrap();
    let hb = Heartbeat {
        scheduler_address: "tls://127.0.0.1:9".into(),
        count: 5,
        ..Default::default()
    };
    assert!(matches!(
        svc.heartbeat(&name, "wrong", &hb).await.unwrap_err(),
        ClusterError::BadToken
    ));
    assert!(matches!(
        svc.heartbeat("other", &token, &hb).await.unwrap_err(),
        ClusterError::BadToken
    ));
    assert_eq!(b.heartbeats(&name), 0);
    svc.heartbeat(&name, &token, &hb).await.unwrap();
    assert_eq!(b.target_workers(&name), Some(2));
    assert!(svc.token_is_valid(&name, &token));
    assert!(!svc.token_is_valid(&name, ""));
}

#[tokio::test]
async fn the_cluster_token_may_stop_its_own_cluster_only() {
    let (svc, b) = service("{}");
    let a = svc.create(&user("alice"), None).await.unwrap();
    let other = svc.create(&user("alice"), None).await.unwrap();
    let token = b.get(&a).unwrap().token.unwrap();
    assert!(matches!(
        svc.stop(&other, Requester::Token(&token))
            .await
            .unwrap_err(),
        ClusterError::BadToken
    ));
    svc.stop(&a, Requester::Token(&token)).await.unwrap();
    let v = b.get(&a).unwrap();
    assert_eq!(v.status, ClusterStatus::Stopped);
    assert!(v.reason.unwrap().contains("idle timeout"));
    assert_eq!(b.get(&other).unwrap().status, ClusterStatus::Pending);
}

#[tokio::test]
async fn scale_and_adapt_are_checked_clipped_and_forwarded_with_the_token() {
    let (svc, b) = service("max_workers: 2");
    let (api, comm) = fake_scheduler_api().await;
    let pending = svc.create(&user("alice"), None).await.unwrap();
    assert!(matches!(
        svc.scale(&user("alice"), &pending, &json!(1))
            .await
            .unwrap_err(),
        ClusterError::NotRunning(_)
    ));
    let name = running_cluster(&svc, &b, "alice", &api).await;
    let token = b.get(&name).unwrap().token.unwrap();
    for bad in [json!(-1), json!("2"), json!(1.5), json!(null)] {
        let e = svc.scale(&user("alice"), &name, &bad).await.unwrap_err();
        assert!(e
            .to_string()
            .starts_with("Scale expects a non-negative integer"));
    }
    assert!(matches!(
        svc.scale(&user("bob"), &name, &json!(1)).await.unwrap_err(),
        ClusterError::Forbidden { .. }
    ));
    let r = svc.scale(&user("alice"), &name, &json!(1)).await.unwrap();
    assert!(r.ok && r.msg.is_none());
    let r = svc.scale(&user("alice"), &name, &json!(3)).await.unwrap();
    assert!(!r.ok);
    assert!(r.msg.unwrap().contains("Scaling to 2 instead"));
    let r = svc
        .adapt(&user("alice"), &name, &json!(null), &json!(3), true)
        .await
        .unwrap();
    assert!(r
        .msg
        .unwrap()
        .contains("Using `maximum=2, minimum=0` instead"));
    // minimum > maximum is refused before anything reaches the scheduler.
    let e = svc
        .adapt(&user("alice"), &name, &json!(5), &json!(2), true)
        .await
        .unwrap_err();
    assert!(matches!(e, ClusterError::Invalid(_)), "{e}");
    assert!(e.to_string().contains("minimum <= maximum"), "{e}");
    let got = comm.received.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got
        .iter()
        .all(|(auth, _)| *auth == format!("token {token}")));
    assert_eq!(got[0].1, json!({"op": "scale", "count": 1}));
    assert_eq!(got[1].1, json!({"op": "scale", "count": 2}));
    assert_eq!(
        got[2].1,
        json!({"op": "adapt", "minimum": 0, "maximum": 2, "active": true})
    );
}

// Paused: the pauses between the three attempts pass at once.
#[tokio::test(start_paused = true)]
async fn an_unreachable_scheduler_fails_its_cluster() {
    let (svc, b) = service("{}");
    // Nothing listens on port 9 of localhost.
    let name = running_cluster(&svc, &b, "alice", "http://127.0.0.1:9").await;
    let e = svc
        .scale(&user("alice"), &name, &json!(1))
        .await
        .unwrap_err();
    assert!(matches!(e, ClusterError::NotRunning(_)));
    let v = b.get(&name).unwrap();
    assert_eq!(v.status, ClusterStatus::Failed);
    assert!(v.reason.unwrap().contains("could not reach the scheduler"));
}

#[tokio::test]
async fn listing_defaults_to_active_clusters() {
    let (svc, _b) = service("{}");
    let svc = Arc::new(svc);
    let a = svc.create(&user("alice"), None).await.unwrap();
    let s = svc.create(&user("alice"), None).await.unwrap();
    svc.stop(&s, Requester::User(&user("alice"))).await.unwrap();
    let names = |l: Vec<gateway_model::ClusterModel>| -> Vec<String> {
        l.into_iter().map(|m| m.name).collect()
    };
    assert_eq!(
        names(svc.list(&user("alice"), None).await.unwrap()),
        vec![a.clone()]
    );
    assert_eq!(
        names(
            svc.list(&user("alice"), Some(&[ClusterStatus::Stopped]))
                .await
                .unwrap()
        ),
        vec![s.clone()]
    );
    let text = metrics_text(&svc);
    assert!(
        text.contains("dask_gateway_clusters{status=\"pending\"} 1"),
        "{text}"
    );
    assert!(text.contains("dask_gateway_clusters{status=\"stopped\"} 1"));
}

#[tokio::test]
async fn metrics_show_the_service_families() {
    let (svc, b) = service("{}");
    let svc = Arc::new(svc);
    let running = svc.create(&user("alice"), None).await.unwrap();
    b.make_running(
        &running,
        SchedulerAddresses {
            scheduler: "tls://127.0.0.1:1".into(),
            dashboard: None,
            api: "http://127.0.0.1:1".into(),
        },
    );
    svc.create(&user("alice"), None).await.unwrap();
    // The fake backend registers no families of its own, and no pool is configured.
    let expected = [
        "# HELP dask_gateway_create_requests Cluster create requests since the gateway started.",
        "# TYPE dask_gateway_create_requests counter",
        "dask_gateway_create_requests_total 2",
        "# HELP dask_gateway_create_refused_quota Cluster creates refused by the per-user quota.",
        "# TYPE dask_gateway_create_refused_quota counter",
        "dask_gateway_create_refused_quota_total 0",
        "# HELP dask_gateway_scheduler_forward_failures Scale/adapt messages that never reached their scheduler.",
        "# TYPE dask_gateway_scheduler_forward_failures counter",
        "dask_gateway_scheduler_forward_failures_total 0",
        "# HELP dask_gateway_warm_scheduler_claims Creates served by a warm scheduler.",
        "# TYPE dask_gateway_warm_scheduler_claims counter",
        "dask_gateway_warm_scheduler_claims_total 0",
        "# HELP dask_gateway_warm_scheduler_misses Creates that fit a warm pool but found it empty.",
        "# TYPE dask_gateway_warm_scheduler_misses counter",
        "dask_gateway_warm_scheduler_misses_total 0",
        "# HELP dask_gateway_warm_scheduler_starts Warm schedulers started to fill the pools.",
        "# TYPE dask_gateway_warm_scheduler_starts counter",
        "dask_gateway_warm_scheduler_starts_total 0",
        "# HELP dask_gateway_idle_clusters_stopped_by_gateway Idle clusters the gateway stopped because their scheduler's request never came.",
        "# TYPE dask_gateway_idle_clusters_stopped_by_gateway counter",
        "dask_gateway_idle_clusters_stopped_by_gateway_total 0",
        "# HELP dask_gateway_clusters Clusters known to the gateway, by status.",
        "# TYPE dask_gateway_clusters gauge",
        "dask_gateway_clusters{status=\"pending\"} 1",
        "dask_gateway_clusters{status=\"running\"} 1",
        "dask_gateway_clusters{status=\"stopping\"} 0",
        "dask_gateway_clusters{status=\"stopped\"} 0",
        "dask_gateway_clusters{status=\"failed\"} 0",
        "# HELP dask_gateway_routes Clusters reachable through the proxy.",
        "# TYPE dask_gateway_routes gauge",
        "dask_gateway_routes 1",
        "# EOF",
    ];
    let text = metrics_text(&svc);
    assert_eq!(text.lines().collect::<Vec<_>>(), expected, "{text}");
}

#[tokio::test]
async fn backend_failures_reach_the_caller_and_leave_nothing() {
    let (svc, b) = service("{}");
    b.fail_next_create("Could not start the Dask scheduler");
    let e = svc.create(&user("alice"), None).await.unwrap_err();
    assert!(matches!(e, ClusterError::Internal(_)));
    assert!(b.list(None).is_empty());
}

#[tokio::test]
async fn a_request_clipped_by_the_cap_and_the_quota_reports_both_steps() {
    let (svc, b) = service("max_workers: 4\nmax_workers_per_user: 2");
    let (api, _comm) = fake_scheduler_api().await;
    let a = running_cluster(&svc, &b, "alice", &api).await;
    let alice = user("alice");
    let msg = svc
        .scale(&alice, &a, &json!(10))
        .await
        .unwrap()
        .msg
        .unwrap();
    assert!(
        msg.starts_with("Scale request of 10 workers would exceed resource limit of 4 workers.")
            && msg.contains("Scale request of 4 workers would exceed the quota of 2 workers per user. Scaling to 2 instead."),
        "{msg}"
    );
    let msg = svc
        .adapt(&alice, &a, &json!(0), &json!(50), true)
        .await
        .unwrap()
        .msg
        .unwrap();
    assert!(
        msg.contains("maximum=50") && msg.contains("quota of 2 workers per user"),
        "{msg}"
    );
}

#[tokio::test]
async fn per_user_quotas_clip_scale_adapt_and_heartbeats_even_concurrently() {
    let (svc, b) = service(
        "max_workers_per_user: 3\nmax_cores_per_user: 6\nscheduler_cores: 1\nworker_cores: 1",
    );
    let svc = Arc::new(svc);
    let (api, _comm) = fake_scheduler_api().await;
    let (api_a, comm_a) = fake_scheduler_api().await;
    let (api_c, comm_c) = fake_scheduler_api().await;
    let a = running_cluster(&svc, &b, "alice", &api_a).await;
    let c = running_cluster(&svc, &b, "alice", &api_c).await;
    let bobs = running_cluster(&svc, &b, "bob", &api).await;
    let alice = user("alice");

    let r = svc.scale(&alice, &a, &json!(2)).await.unwrap();
    assert!(r.ok && r.msg.is_none());
    // One worker is left of alice's three; the message names the quota.
    let r = svc.scale(&alice, &c, &json!(2)).await.unwrap();
    assert!(!r.ok);
    let msg = r.msg.unwrap();
    assert!(
        msg.contains("quota of 3 workers per user") && msg.contains("Scaling to 1"),
        "{msg}"
    );
    // Bob has a quota of his own.
    assert!(svc.scale(&user("bob"), &bobs, &json!(3)).await.unwrap().ok);

    // Twenty concurrent scales across alice's clusters (from nothing) never grant more than
    // 3 in total: whichever comes first gets the room.
    svc.scale(&alice, &a, &json!(0)).await.unwrap();
    svc.scale(&alice, &c, &json!(0)).await.unwrap();
    comm_a.received.lock().unwrap().clear();
    comm_c.received.lock().unwrap().clear();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (svc, name) = (svc.clone(), if i % 2 == 0 { a.clone() } else { c.clone() });
        tasks.push(tokio::spawn(async move {
            svc.scale(&user("alice"), &name, &json!(3)).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (most_a, most_c) = (largest_scale(&comm_a), largest_scale(&comm_c));
    assert_eq!(most_a + most_c, 3, "a got up to {most_a}, c up to {most_c}");
    // Heartbeats are clipped too: each scheduler asks for 3, the total stays within 3.
    let token_a = b.get(&a).unwrap().token.unwrap();
    let token_c = b.get(&c).unwrap().token.unwrap();
    let hb = |n: i64| Heartbeat {
        scheduler_address: "tls://127.0.0.1:1".into(),
        api_address: api.clone(),
        count: n,
        ..Default::default()
    };
    svc.heartbeat(&a, &token_a, &hb(3)).await.unwrap();
    svc.heartbeat(&c, &token_c, &hb(3)).await.unwrap();
    let total = b.target_workers(&a).unwrap() + b.target_workers(&c).unwrap();
    assert!(total <= 3, "alice holds {total} workers");
    // Cores: a scheduler core each plus workers; 6 cores allow 4 workers over two clusters,
    // so the worker quota (3) binds first here. A third cluster still fits (3 + 1 <= 6 cores)...
    let third = svc.create(&alice, None).await.unwrap();
    // ...and a fourth would need a seventh core: refused, naming the quota, nothing created.
    b.heartbeat(&third, &hb(0), 0).await.unwrap();
    let before = b.list(Some("alice")).len();
    let e = svc.create(&alice, None).await.unwrap_err();
    assert!(matches!(e, ClusterError::QuotaExceeded(_)), "{e}");
    assert!(e.to_string().contains("6 cores per user"), "{e}");
    assert_eq!(b.list(Some("alice")).len(), before);

    // Adapt: the maximum is clipped to the room left.
    svc.stop(&third, Requester::User(&alice)).await.unwrap();
    svc.heartbeat(&a, &token_a, &hb(0)).await.unwrap();
    svc.heartbeat(&c, &token_c, &hb(0)).await.unwrap();
    svc.scale(&alice, &a, &json!(1)).await.unwrap();
    let r = svc
        .adapt(&alice, &c, &json!(1), &json!(10), true)
        .await
        .unwrap();
    let msg = r.msg.unwrap();
    assert!(
        msg.contains("quota of 3 workers per user") && msg.contains("maximum=2"),
        "{msg}"
    );
}

fn grouped(name: &str, groups: &[&str]) -> User {
    let mut u = User::named(name, false);
    u.groups = groups.iter().map(|g| g.to_string()).collect();
    u
}

fn service_with_groups(yaml: &str) -> (ClusterService, Arc<FakeBackend>) {
    let config: gateway_server::config::GatewayConfig = serde_yaml::from_str(yaml).unwrap();
    let config = config.check().unwrap();
    let clock = Clock::tokio();
    let backend = fake_backend(clock);
    let svc = ClusterService::new(backend.clone(), Arc::new(config.cluster.clone()))
        .with_clock(clock)
        .with_policies(config.policies().to_vec());
    (svc, backend)
}

#[tokio::test]
async fn group_policies_pick_options_bounds_and_quotas() {
    let (svc, b) = service_with_groups(
        r#"
cluster:
  max_clusters_per_user: 1
  options:
    - {field: worker_cores, type: int, default: 1, min: 1, max: 2, target: worker_cores}
groups:
  - group: gpu
    cluster:
      max_clusters_per_user: 3
      options:
        - {field: worker_cores, type: int, default: 4, min: 1, max: 16, target: worker_cores}
        - {field: gpus, type: select, default: "0", options: ["0", "1"]}
  - group: big
    cluster:
      max_lifetime: 3600
"#,
    );
    let plain = user("pat");
    let gpu = grouped("gina", &["big", "gpu"]);
    let big = grouped("bo", &["big"]);
    // What each sees.
    let fields = |u: &User| -> Vec<String> {
        svc.options_wire(u)
            .cluster_options
            .into_iter()
            .map(|o| o.field)
            .collect()
    };
    assert_eq!(fields(&plain), ["worker_cores"]);
    assert_eq!(
        fields(&gpu),
        ["worker_cores", "gpus"],
        "the first listed group wins"
    );
    assert_eq!(fields(&big), ["worker_cores"]);
    // Bounds per group: 8 cores is refused by default, allowed for gpu.
    let e = svc
        .create(&plain, Some(&json!({"worker_cores": 8})))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("worker_cores"), "{e}");
    assert!(b.list(Some("pat")).is_empty());
    let g = svc
        .create(&gpu, Some(&json!({"worker_cores": 8, "gpus": "1"})))
        .await
        .unwrap();
    let v = b.get(&g).unwrap();
    assert_eq!(v.settings.resources.worker_cores, 8.0);
    assert_eq!(v.settings.policy.as_deref(), Some("gpu"));
    assert_eq!(
        svc.details(&gpu, &g).await.unwrap().group.as_deref(),
        Some("gpu")
    );
    // Unknown option for a group that does not have it.
    assert!(svc
        .create(&plain, Some(&json!({"gpus": "1"})))
        .await
        .is_err());
    // Cluster quotas per group.
    svc.create(&plain, None).await.unwrap();
    let e = svc.create(&plain, None).await.unwrap_err();
    assert!(e.to_string().contains("maximum per user is 1"), "{e}");
    svc.create(&gpu, None).await.unwrap();
    svc.create(&gpu, None).await.unwrap();
    assert!(svc.create(&gpu, None).await.is_err());
    // Lifetimes per group, recorded with the cluster.
    let c = svc.create(&big, None).await.unwrap();
    assert_eq!(b.get(&c).unwrap().settings.max_lifetime, 3600.0);
    let d = svc.details(&big, &c).await.unwrap();
    assert_eq!(d.expires_at, Some(d.start_time + 3_600_000));
    assert_eq!(d.owner, "bo");
    // Others cannot read the details.
    assert!(matches!(
        svc.details(&plain, &c).await,
        Err(ClusterError::Forbidden { .. })
    ));
}

#[test]
fn group_policies_are_checked_at_startup() {
    for (yaml, wanted) in [
        (
            "groups: [{group: a, cluster: {worker_cores: -1}}]",
            "groups[a].cluster.worker_cores",
        ),
        ("groups: [{group: a, cluster: {nope: 1}}]", "unknown field"),
        ("groups: [{group: a}, {group: a}]", "listed twice"),
        (
            "groups: [{group: a, cluster: {max_lifetime: -5}}]",
            "groups[a].cluster.max_lifetime",
        ),
    ] {
        let config: gateway_server::config::GatewayConfig = serde_yaml::from_str(yaml).unwrap();
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains(wanted), "{yaml}: {e}");
    }
}

#[tokio::test(start_paused = true)]
async fn lifetimes_stop_clusters_and_say_why() {
    let connections = Arc::new(gateway_proxy::ClientConnections::default());
    let (svc, b) = service_with_groups(
        r#"
groups:
  - {group: short, cluster: {max_lifetime: 0.3}}
  - {group: attended, cluster: {no_client_timeout: 0.4}}
"#,
    );
    let svc = svc.with_activity(connections.clone());
    let short = running_as(&svc, &b, &grouped("s", &["short"])).await;
    let watched = running_as(&svc, &b, &grouped("w", &["attended"])).await;
    let forever = running_as(&svc, &b, &user("f")).await;
    let client = connections.opened(&watched);
    tokio::time::advance(Duration::from_millis(600)).await;
    svc.enforce_lifetimes().await;
    // Past its lifetime: stopped, with the reason kept.
    let v = b.get(&short).unwrap();
    assert!(!v.status.is_active(), "{:?}", v.status);
    assert!(
        v.reason.as_deref().unwrap().contains("maximum lifetime"),
        "{:?}",
        v.reason
    );
    // A client is connected: it stays, however long.
    assert_eq!(b.get(&watched).unwrap().status, ClusterStatus::Running);
    drop(client);
    svc.enforce_lifetimes().await;
    assert_eq!(b.get(&watched).unwrap().status, ClusterStatus::Running);
    tokio::time::advance(Duration::from_millis(500)).await;
    svc.enforce_lifetimes().await;
    let v = b.get(&watched).unwrap();
    assert!(!v.status.is_active());
    assert!(
        v.reason.as_deref().unwrap().contains("no client connected"),
        "{:?}",
        v.reason
    );
    let d = svc
        .details(&User::named("admin", true), &watched)
        .await
        .unwrap();
    assert!(d.reason.unwrap().contains("no client"));
    // No policy: nothing happens.
    assert_eq!(b.get(&forever).unwrap().status, ClusterStatus::Running);
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_stops_a_cluster_at_its_maximum_lifetime_not_a_tick_before() {
    let (svc, b) = service("max_lifetime: 60");
    let name = running_as(&svc, &b, &user("alice")).await;
    let pending = svc.create(&user("bob"), None).await.unwrap();
    tokio::time::advance(Duration::from_millis(59_999)).await;
    svc.enforce_lifetimes().await;
    assert_eq!(b.get(&name).unwrap().status, ClusterStatus::Running);
    assert_eq!(b.get(&pending).unwrap().status, ClusterStatus::Pending);
    tokio::time::advance(Duration::from_millis(1)).await;
    svc.enforce_lifetimes().await;
    // Running or not: the lifetime counts from the create.
    for n in [&name, &pending] {
        let v = b.get(n).unwrap();
        assert_eq!(v.status, ClusterStatus::Stopped);
        assert_eq!(
            v.reason.as_deref(),
            Some("stopped: reached its maximum lifetime of 1 min")
        );
        assert_eq!(v.stop_time, Some(v.start_time + 60_000));
    }
}

#[tokio::test(start_paused = true)]
async fn the_no_client_timeout_counts_from_the_last_client_or_the_first_look() {
    let connections = Arc::new(gateway_proxy::ClientConnections::default());
    let (svc, b) = service("no_client_timeout: 30");
    let svc = svc.with_activity(connections.clone());
    let attended = running_as(&svc, &b, &user("alice")).await;
    let client = connections.opened(&attended);
    // Never a client: counted from the sweep that first saw it running without one.
    let lonely = running_as(&svc, &b, &user("bob")).await;
    // Pending clusters have no clients to wait for: their time does not count.
    let pending = svc.create(&user("carol"), None).await.unwrap();
    svc.enforce_lifetimes().await;
    tokio::time::advance(Duration::from_millis(29_999)).await;
    svc.enforce_lifetimes().await;
    assert_eq!(b.get(&lonely).unwrap().status, ClusterStatus::Running);
    tokio::time::advance(Duration::from_millis(1)).await;
    svc.enforce_lifetimes().await;
    let v = b.get(&lonely).unwrap();
    assert_eq!(v.status, ClusterStatus::Stopped);
    assert_eq!(
        v.reason.as_deref(),
        Some("stopped: no client connected for 30 s")
    );
    // A connected client holds its cluster however long; the timeout starts when it leaves.
    tokio::time::advance(Duration::from_secs(3600)).await;
    svc.enforce_lifetimes().await;
    assert_eq!(b.get(&attended).unwrap().status, ClusterStatus::Running);
    drop(client);
    tokio::time::advance(Duration::from_millis(29_999)).await;
    svc.enforce_lifetimes().await;
    assert_eq!(b.get(&attended).unwrap().status, ClusterStatus::Running);
    tokio::time::advance(Duration::from_millis(1)).await;
    svc.enforce_lifetimes().await;
    assert_eq!(b.get(&attended).unwrap().status, ClusterStatus::Stopped);
    assert_eq!(b.get(&pending).unwrap().status, ClusterStatus::Pending);
}

#[tokio::test(start_paused = true)]
async fn replicas_share_client_activity_through_the_backend() {
    // Two gateway replicas over one backend, each with its own proxy connections.
    let yaml = "no_client_timeout: 1.5";
    let clock = Clock::tokio();
    let backend = fake_backend(clock);
    let conns_one = Arc::new(gateway_proxy::ClientConnections::default());
    let conns_two = Arc::new(gateway_proxy::ClientConnections::default());
    let one = service_on(&backend, clock, yaml).with_activity(conns_one.clone());
    let two = service_on(&backend, clock, yaml).with_activity(conns_two);
    let name = running_as(&one, &backend, &user("alice")).await;
    // The client is connected through replica one only.
    let client = conns_one.opened(&name);
    for _ in 0..8 {
        one.enforce_lifetimes().await;
        two.enforce_lifetimes().await;
        tokio::time::advance(Duration::from_millis(400)).await;
    }
    assert_eq!(
        backend.get(&name).unwrap().status,
        ClusterStatus::Running,
        "replica two saw replica one's client"
    );
    drop(client);
    for _ in 0..10 {
        one.enforce_lifetimes().await;
        two.enforce_lifetimes().await;
        tokio::time::advance(Duration::from_millis(400)).await;
    }
    assert!(!backend.get(&name).unwrap().status.is_active());
}

#[tokio::test]
async fn replicas_cannot_pass_a_quota_together() {
    // Two gateway replicas over one shared backend, each with its own in-process state.
    let yaml = "max_workers_per_user: 3";
    let clock = Clock::tokio();
    let backend = fake_backend(clock);
    let one = Arc::new(service_on(&backend, clock, yaml));
    let two = Arc::new(service_on(&backend, clock, yaml));
    let (api_a, comm_a) = fake_scheduler_api().await;
    let (api_b, comm_b) = fake_scheduler_api().await;
    let a = running_cluster(&one, &backend, "alice", &api_a).await;
    let b = running_cluster(&two, &backend, "alice", &api_b).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let svc = if i % 2 == 0 { one.clone() } else { two.clone() };
        let name = if i % 3 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            svc.scale(&user("alice"), &name, &json!(3)).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (most_a, most_b) = (largest_scale(&comm_a), largest_scale(&comm_b));
    assert!(
        most_a + most_b <= 3,
        "the replicas granted {most_a} + {most_b} workers against a quota of 3"
    );
}

#[tokio::test]
async fn a_heartbeat_sent_before_a_scale_does_not_free_its_workers() {
    // A heartbeat period of 0.1 s holds a scale's grant for 1.2 s against lower heartbeats.
    let (svc, b) = service("max_workers_per_user: 3\nheartbeat_period: 0.1");
    let (api_a, _comm_a) = fake_scheduler_api().await;
    let (api_c, _comm_c) = fake_scheduler_api().await;
    let a = running_cluster(&svc, &b, "alice", &api_a).await;
    let c = running_cluster(&svc, &b, "alice", &api_c).await;
    let alice = user("alice");
    let token_a = b.get(&a).unwrap().token.unwrap();
    let hb = |n: i64| Heartbeat {
        scheduler_address: "tls://127.0.0.1:1".into(),
        api_address: api_a.clone(),
        count: n,
        ..Default::default()
    };

    assert!(svc.scale(&alice, &a, &json!(3)).await.unwrap().ok);
    // a's scheduler heartbeats its old count before it acts on the scale: a's pods follow it,
    // but its three workers stay granted, so c gets none of them.
    svc.heartbeat(&a, &token_a, &hb(0)).await.unwrap();
    assert_eq!(b.target_workers(&a), Some(0));
    let r = svc.scale(&alice, &c, &json!(3)).await.unwrap();
    let msg = r.msg.unwrap_or_default();
    assert!(
        msg.contains("quota of 3 workers per user") && msg.contains("Scaling to 0"),
        "{msg}"
    );
    // Once the hold is over, a heartbeat that still asks for none frees them.
    skip(1300).await;
    svc.heartbeat(&a, &token_a, &hb(0)).await.unwrap();
    assert!(svc.scale(&alice, &c, &json!(3)).await.unwrap().ok);
}
