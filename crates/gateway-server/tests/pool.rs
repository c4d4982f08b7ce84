//! Warm-scheduler pools over the in-memory fake backend: claims, refills, privacy, quotas,
//! the idle-timeout rule and concurrent claims. The service and the backend share a clock that
//! follows tokio's, so tests about time pause it and move it instead of sleeping.

use gateway_backend::fake::FakeBackend;
use gateway_backend::{ClusterBackend, SchedulerAddresses};
use gateway_model::ClusterStatus;
use gateway_server::auth::User;
use gateway_server::clock::Clock;
use gateway_server::clusters::{configured_pools, ClusterError, ClusterService, Requester};
use gateway_server::config::GatewayConfig;
use serde_json::json;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

fn user(name: &str) -> User {
    User::named(name, false)
}

fn member_of(u: User, groups: &[&str]) -> User {
    let mut u = u;
    u.groups = groups.iter().map(|g| g.to_string()).collect();
    u
}

fn pooled_service(yaml: &str) -> (Arc<ClusterService>, Arc<FakeBackend>) {
    let clock = Clock::tokio();
    let backend = Arc::new(FakeBackend::new().with_clock(move || clock.now_ms()));
    (service_on(&backend, clock, yaml), backend)
}

/// A service with the configuration `yaml` over an existing backend (on its clock).
fn service_on(backend: &Arc<FakeBackend>, clock: Clock, yaml: &str) -> Arc<ClusterService> {
    let config: GatewayConfig = serde_yaml::from_str(yaml).unwrap();
    let config = config.check().unwrap();
    let policies = config.policies().to_vec();
    let sections: Vec<_> = config.sections().collect();
    let pools = configured_pools(&sections, "test").unwrap();
    let svc = ClusterService::new(backend.clone(), Arc::new(config.cluster.clone()))
        .with_policies(policies.clone())
        .with_pools(pools, "test".into())
        .with_clock(clock);
    Arc::new(svc)
}

/// Unclaimed members, as the backend sees them.
fn members(b: &FakeBackend) -> Vec<String> {
    b.list(None)
        .into_iter()
        .filter(|v| v.pool.is_some() && v.status.is_active())
        .map(|v| v.name)
        .collect()
}

fn run(b: &FakeBackend, name: &str) {
    b.make_running(
        name,
        SchedulerAddresses {
            scheduler: "tls://127.0.0.1:1".into(),
            dashboard: None,
            api: "http://127.0.0.1:1".into(),
        },
    );
}

#[tokio::test]
async fn a_create_gets_a_warm_scheduler_and_the_pool_refills() {
    let (svc, b) = pooled_service("cluster: {warm_schedulers: 2}");
    svc.maintain_pools().await;
    let warm = members(&b);
    assert_eq!(warm.len(), 2);
    for n in &warm {
        run(&b, n);
    }
    let name = svc.create(&user("alice"), None).await.unwrap();
    assert!(warm.contains(&name), "the create was served from the pool");
    let v = b.get(&name).unwrap();
    assert_eq!(v.owner, "alice");
    assert_eq!(v.pool, None);
    assert_eq!(
        v.status,
        ClusterStatus::Running,
        "a warm scheduler is ready at once"
    );
    assert_eq!(members(&b).len(), 1);
    svc.maintain_pools().await;
    assert_eq!(members(&b).len(), 2, "the pool refilled");
    // Nothing more once full.
    svc.maintain_pools().await;
    assert_eq!(members(&b).len(), 2);
    let mut registry = gateway_backend::metrics::registry();
    svc.register_metrics(&mut registry);
    let metrics = gateway_backend::metrics::render(&registry).unwrap();
    assert!(
        metrics.contains("dask_gateway_warm_scheduler_claims_total 1"),
        "{metrics}"
    );
    // The unclaimed members by pool and state: the one left running, and the new one.
    let samples: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("dask_gateway_warm_schedulers{"))
        .collect();
    let pool = samples[0].split('"').nth(1).unwrap();
    assert_eq!(
        samples,
        [
            format!("dask_gateway_warm_schedulers{{pool=\"{pool}\",state=\"running\"}} 1"),
            format!("dask_gateway_warm_schedulers{{pool=\"{pool}\",state=\"pending\"}} 1"),
        ],
        "{metrics}"
    );
    for line in [
        "# HELP dask_gateway_warm_schedulers Unclaimed warm schedulers, by pool and state.",
        "# TYPE dask_gateway_warm_schedulers gauge",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from\n{metrics}"
        );
    }
}

#[tokio::test]
async fn warm_schedulers_are_nobodys_and_invisible() {
    let (svc, b) = pooled_service("cluster: {warm_schedulers: 1, max_clusters_per_user: 1}");
    svc.maintain_pools().await;
    let warm = members(&b).pop().unwrap();
    let admin = User::named("root", true);
    assert!(
        svc.list(&admin, None).await.unwrap().is_empty(),
        "admins do not see pool members"
    );
    assert!(svc.list_details(&admin, None).await.unwrap().is_empty());
    assert!(matches!(
        svc.get(&admin, &warm, false).await,
        Err(ClusterError::NotFound(_))
    ));
    assert!(!svc.may_access(&admin, &warm));
    // Stopping it is answered as for an unknown cluster (done), and stops nothing.
    assert!(svc.stop(&warm, Requester::User(&admin)).await.is_ok());
    assert!(b.get(&warm).unwrap().status.is_active());
    // A member counts against nobody's quota: alice may still create her one cluster.
    let name = svc.create(&user("alice"), None).await.unwrap();
    assert_eq!(name, warm);
    assert_eq!(svc.list(&user("alice"), None).await.unwrap().len(), 1);
    assert!(
        svc.list(&user("bob"), None).await.unwrap().is_empty(),
        "bob does not see alice's cluster"
    );
    let e = svc.create(&user("alice"), None).await.unwrap_err();
    assert!(matches!(e, ClusterError::QuotaExceeded(_)), "{e}");
}

#[tokio::test]
async fn only_matching_scheduler_settings_claim() {
    let (svc, b) = pooled_service(
        r#"
cluster:
  warm_schedulers: 1
  options:
    - {field: worker_cores, type: int, default: 1, min: 1, max: 4, target: worker_cores}
    - {field: scheduler_cores, type: int, default: 1, min: 1, max: 2, target: scheduler_cores}
"#,
    );
    svc.maintain_pools().await;
    let warm = members(&b).pop().unwrap();
    // Another scheduler size does not fit.
    let other = svc
        .create(&user("alice"), Some(&json!({"scheduler_cores": 2})))
        .await
        .unwrap();
    assert_ne!(other, warm);
    // Other worker settings do: the claimer's settings replace the member's.
    let claimed = svc
        .create(&user("bob"), Some(&json!({"worker_cores": 3})))
        .await
        .unwrap();
    assert_eq!(claimed, warm);
    let v = b.get(&claimed).unwrap();
    assert_eq!(v.settings.resources.worker_cores, 3.0);
    assert_eq!(v.options["worker_cores"], json!(3));
}

#[tokio::test]
async fn group_policies_have_their_own_pools() {
    let (svc, b) = pooled_service(
        r#"
cluster: {warm_schedulers: 1}
groups:
  - group: big
    cluster: {scheduler_memory: 4G, warm_schedulers: 2}
  - group: same
    cluster: {max_clusters_per_user: 3}
"#,
    );
    svc.maintain_pools().await;
    // The `same` group inherits warm_schedulers: 1 and fits the default pool: shared.
    assert_eq!(members(&b).len(), 3);
    let big = svc
        .create(&member_of(user("carol"), &["big"]), None)
        .await
        .unwrap();
    let v = b.get(&big).unwrap();
    assert_eq!(v.settings.resources.scheduler_memory, 4 << 30);
    assert_eq!(v.settings.policy.as_deref(), Some("big"));
    let same = svc
        .create(&member_of(user("dan"), &["same"]), None)
        .await
        .unwrap();
    assert_eq!(
        b.get(&same).unwrap().settings.policy.as_deref(),
        Some("same")
    );
    assert_eq!(members(&b).len(), 1, "one of each pool was claimed");
}

#[tokio::test]
async fn a_shrunk_or_removed_pool_stops_its_unclaimed_members_only() {
    let (svc, b) = pooled_service("cluster: {warm_schedulers: 3}");
    svc.maintain_pools().await;
    let claimed = svc.create(&user("alice"), None).await.unwrap();
    // The same backend under a configuration without pools.
    service_on(&b, svc.clock(), "cluster: {}")
        .maintain_pools()
        .await;
    assert!(members(&b).is_empty());
    assert!(
        b.get(&claimed).unwrap().status.is_active(),
        "alice keeps hers"
    );
    // Shrinking: a pool of three down to one.
    let (svc, b) = pooled_service("cluster: {warm_schedulers: 3}");
    svc.maintain_pools().await;
    assert_eq!(members(&b).len(), 3);
    service_on(&b, svc.clock(), "cluster: {warm_schedulers: 1}")
        .maintain_pools()
        .await;
    assert_eq!(members(&b).len(), 1);
}

#[tokio::test]
async fn stop_pools_empties_them() {
    let (svc, b) = pooled_service("cluster: {warm_schedulers: 2}");
    svc.maintain_pools().await;
    let claimed = svc.create(&user("alice"), None).await.unwrap();
    svc.stop_pools().await;
    assert!(members(&b).is_empty());
    assert!(b.get(&claimed).unwrap().status.is_active());
}

#[tokio::test(start_paused = true)]
async fn the_idle_timeout_counts_from_the_claim() {
    let (svc, b) = pooled_service("cluster: {warm_schedulers: 1, idle_timeout: 3600}");
    svc.maintain_pools().await;
    let warm = members(&b).pop().unwrap();
    let token = b.get(&warm).unwrap().token.unwrap();
    // While pooled its scheduler's idle requests are answered and ignored.
    svc.stop(&warm, Requester::Token(&token)).await.unwrap();
    assert!(b.get(&warm).unwrap().status.is_active());
    // Claimed just now: still too early for its user's idle timeout.
    let name = svc.create(&user("alice"), None).await.unwrap();
    svc.stop(&name, Requester::Token(&token)).await.unwrap();
    assert!(b.get(&name).unwrap().status.is_active());
    // A wrong token is still refused.
    assert!(matches!(
        svc.stop(&name, Requester::Token("nope")).await,
        Err(ClusterError::BadToken)
    ));

    // The request counts once the user held the cluster that long, however long it waited
    // in the pool.
    let (svc, b) = pooled_service("cluster: {warm_schedulers: 1, idle_timeout: 60}");
    svc.maintain_pools().await;
    tokio::time::advance(Duration::from_secs(3600)).await;
    let name = svc.create(&user("alice"), None).await.unwrap();
    let token = b.get(&name).unwrap().token.unwrap();
    tokio::time::advance(Duration::from_millis(59_999)).await;
    svc.stop(&name, Requester::Token(&token)).await.unwrap();
    assert!(b.get(&name).unwrap().status.is_active(), "one tick early");
    tokio::time::advance(Duration::from_millis(1)).await;
    svc.stop(&name, Requester::Token(&token)).await.unwrap();
    assert_eq!(b.get(&name).unwrap().status, ClusterStatus::Stopped);
}

#[tokio::test]
async fn concurrent_creates_never_share_a_warm_scheduler() {
    let (svc, b) = pooled_service("cluster: {warm_schedulers: 5}");
    svc.maintain_pools().await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            svc.create(&user(&format!("u{i}")), None).await.unwrap()
        }));
    }
    let mut names = HashSet::new();
    for t in tasks {
        assert!(
            names.insert(t.await.unwrap()),
            "one cluster went to two users"
        );
    }
    let owners: HashSet<String> = names.iter().map(|n| b.get(n).unwrap().owner).collect();
    assert_eq!(owners.len(), 12);
    svc.maintain_pools().await;
    assert_eq!(members(&b).len(), 5);
}

#[tokio::test]
async fn a_pool_that_keeps_failing_pauses() {
    let (svc, b) = pooled_service("cluster: {warm_schedulers: 1}");
    for _ in 0..3 {
        svc.maintain_pools().await;
        let warm = members(&b).pop().unwrap();
        b.stop(
            &warm,
            gateway_backend::StopRequest::failed("the scheduler exited"),
        )
        .await
        .unwrap();
    }
    svc.maintain_pools().await;
    assert!(
        members(&b).is_empty(),
        "refilling paused after three failures"
    );
}

#[tokio::test(start_paused = true)]
async fn a_paused_pool_refills_once_its_failures_are_a_minute_old() {
    let (svc, b) = pooled_service("cluster: {warm_schedulers: 1}");
    for i in 0..3 {
        svc.maintain_pools().await;
        let warm = members(&b).pop().unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        b.stop(
            &warm,
            gateway_backend::StopRequest::failed(format!("failure {i}")),
        )
        .await
        .unwrap();
    }
    // The failures were at 10, 20 and 30 s; the window is a minute.
    tokio::time::advance(Duration::from_millis(39_999)).await;
    svc.maintain_pools().await;
    assert!(members(&b).is_empty(), "three failures within the minute");
    tokio::time::advance(Duration::from_millis(1)).await;
    svc.maintain_pools().await;
    assert_eq!(members(&b).len(), 1, "the first failure left the window");
}

#[test]
fn warm_schedulers_need_a_shared_account_locally() {
    let config: GatewayConfig =
        serde_yaml::from_str("cluster: {warm_schedulers: 1}\ndask: {isolation: system-users}")
            .unwrap();
    let e = config.validate().unwrap_err().to_string();
    assert!(
        e.contains("warm_schedulers needs dask.isolation: none"),
        "{e}"
    );
    let config: GatewayConfig = serde_yaml::from_str("cluster: {warm_schedulers: 1000}").unwrap();
    assert!(config.validate().is_err());
}
