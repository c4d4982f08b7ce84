//! The local engine's rules (heartbeat bookkeeping, timeouts, worker failures, teardown,
//! recovery after a restart), driven through the `ClusterBackend` trait with in-memory
//! processes: fast, and no Dask needed.

use gateway_backend::{
    ClusterBackend, ClusterCredentials, ClusterSettings, ClusterTiming, NewCluster, StopRequest,
};
use gateway_local::{
    BoxFuture, EngineConfig, LocalBackend, LocalError, ProcessExit, ProcessId, ProcessRole,
    Processes, SchedulerSpec, Store, WorkerSpec,
};
use gateway_model::{ClusterStatus, Heartbeat};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Processes that exist only in memory. Exits are reported like the real launcher does: once,
/// on the channel, after `terminate` or `crash`.
struct FakeProcesses {
    next_pid: AtomicU32,
    alive: Arc<Mutex<HashMap<ProcessId, (String, ProcessRole)>>>,
    exits: mpsc::UnboundedSender<ProcessExit>,
    fail_workers: AtomicBool,
    fail_scheduler: AtomicBool,
    terminated: Arc<Mutex<Vec<ProcessId>>>,
    dirs: Mutex<HashSet<String>>,
    credentials: Mutex<HashSet<String>>,
}

impl FakeProcesses {
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<ProcessExit>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let p = Arc::new(FakeProcesses {
            next_pid: AtomicU32::new(1000),
            alive: Arc::new(Mutex::new(HashMap::new())),
            exits: tx,
            fail_workers: AtomicBool::new(false),
            fail_scheduler: AtomicBool::new(false),
            terminated: Arc::new(Mutex::new(Vec::new())),
            dirs: Mutex::new(HashSet::new()),
            credentials: Mutex::new(HashSet::new()),
        });
        (p, rx)
    }

    /// A fresh exit channel (what a restarted gateway gets), keeping the processes.
    fn reattach(&self) -> (Arc<Self>, mpsc::UnboundedReceiver<ProcessExit>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let p = Arc::new(FakeProcesses {
            next_pid: AtomicU32::new(self.next_pid.load(Ordering::SeqCst)),
            alive: Arc::new(Mutex::new(self.alive.lock().unwrap().clone())),
            exits: tx,
            fail_workers: AtomicBool::new(false),
            fail_scheduler: AtomicBool::new(false),
            terminated: Arc::new(Mutex::new(Vec::new())),
            dirs: Mutex::new(self.dirs.lock().unwrap().clone()),
            credentials: Mutex::new(self.credentials.lock().unwrap().clone()),
        });
        (p, rx)
    }

    fn spawn(&self, cluster: &str, role: ProcessRole) -> ProcessId {
        let id = ProcessId {
            pid: self.next_pid.fetch_add(1, Ordering::SeqCst),
            start_ticks: 7,
        };
        self.alive
            .lock()
            .unwrap()
            .insert(id, (cluster.to_string(), role));
        id
    }

    /// The process exits by itself with `code`.
    fn crash(&self, id: ProcessId, code: i32) {
        if let Some((cluster, role)) = self.alive.lock().unwrap().remove(&id) {
            let _ = self.exits.send(ProcessExit {
                cluster,
                role,
                id,
                code: Some(code),
            });
        }
    }

    /// An adopted process ends: its end is seen, its exit code is not (as `/proc` shows it).
    fn vanish(&self, id: ProcessId) {
        if let Some((cluster, role)) = self.alive.lock().unwrap().remove(&id) {
            let _ = self.exits.send(ProcessExit {
                cluster,
                role,
                id,
                code: None,
            });
        }
    }

    fn scheduler_of(&self, cluster: &str) -> Option<ProcessId> {
        self.alive
            .lock()
            .unwrap()
            .iter()
            .find(|(_, (c, r))| c == cluster && *r == ProcessRole::Scheduler)
            .map(|(id, _)| *id)
    }

    /// Live workers of `cluster`: name -> process.
    fn workers_of(&self, cluster: &str) -> HashMap<String, ProcessId> {
        self.alive
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(id, (c, r))| match r {
                ProcessRole::Worker(w) if c == cluster => Some((w.clone(), *id)),
                _ => None,
            })
            .collect()
    }

    fn alive_count(&self) -> usize {
        self.alive.lock().unwrap().len()
    }
}

impl Processes for FakeProcesses {
    fn prepare(&self, cluster: &str, _: &str, _: &ClusterCredentials) -> Result<(), LocalError> {
        self.dirs.lock().unwrap().insert(cluster.into());
        self.credentials.lock().unwrap().insert(cluster.into());
        Ok(())
    }
    fn remove_dir(&self, cluster: &str) {
        self.dirs.lock().unwrap().remove(cluster);
        self.credentials.lock().unwrap().remove(cluster);
    }
    fn remove_credentials(&self, cluster: &str) {
        self.credentials.lock().unwrap().remove(cluster);
    }
    fn start_scheduler(&self, spec: &SchedulerSpec<'_>) -> Result<ProcessId, LocalError> {
        if self.fail_scheduler.load(Ordering::SeqCst) {
            return Err(LocalError::BadName("scheduler refused by the test".into()));
        }
        Ok(self.spawn(spec.cluster, ProcessRole::Scheduler))
    }
    fn start_worker(&self, spec: &WorkerSpec<'_>) -> Result<ProcessId, LocalError> {
        if self.fail_workers.load(Ordering::SeqCst) {
            return Err(LocalError::BadName("worker refused by the test".into()));
        }
        Ok(self.spawn(spec.cluster, ProcessRole::Worker(spec.worker.into())))
    }
    fn is_alive(&self, id: ProcessId) -> bool {
        self.alive.lock().unwrap().contains_key(&id)
    }
    fn adopt(&self, _: &str, _: ProcessRole, _: ProcessId) {}
    fn reap(&self, _: ProcessId) {}
    fn terminate(&self, id: ProcessId, _: Duration) -> BoxFuture {
        // Like the real launcher, nothing happens until the future runs.
        let (terminated, alive, exits) = (
            self.terminated.clone(),
            self.alive.clone(),
            self.exits.clone(),
        );
        Box::pin(async move {
            terminated.lock().unwrap().push(id);
            if let Some((cluster, role)) = alive.lock().unwrap().remove(&id) {
                let _ = exits.send(ProcessExit {
                    cluster,
                    role,
                    id,
                    code: None,
                });
            }
        })
    }
    /// A live fake scheduler listens on the ports [`heartbeat`] reports, and nothing else.
    fn listens_on(&self, process: ProcessId, address: std::net::SocketAddr) -> bool {
        let alive = self.alive.lock().unwrap().contains_key(&process);
        alive && address.ip().is_loopback() && (40000..=40002).contains(&address.port())
    }

    fn unknown_processes(&self, known: &HashSet<ProcessId>) -> Vec<(String, ProcessId)> {
        self.alive
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _)| !known.contains(id))
            .map(|(id, (c, _))| (c.clone(), *id))
            .collect()
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        timing: ClusterTiming {
            start_timeout: 30.0,
            heartbeat_timeout: 30.0,
            worker_start_failure_limit: 3,
            ..ClusterTiming::default()
        },
        retention: Duration::from_secs(3600),
        stop_grace: Duration::from_millis(10),
        sweep_period: Duration::from_millis(20),
        usage_retention: Duration::from_secs(86400),
        api_url: Some("http://127.0.0.1:8000/api".into()),
    }
}

fn db_path(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dgrs-engine-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("gateway.sqlite")
}

async fn start(
    test: &str,
    config: EngineConfig,
) -> (Arc<LocalBackend>, Arc<FakeProcesses>, PathBuf) {
    let db = db_path(test);
    let (procs, exits) = FakeProcesses::new();
    let backend =
        LocalBackend::start(config, Store::open(&db).unwrap(), procs.clone(), exits).unwrap();
    (backend, procs, db)
}

fn request() -> NewCluster {
    NewCluster::owned("alice", Default::default(), ClusterSettings::example())
}

/// Polls `check` for up to 5 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn heartbeat(count: i64, active: &[&str], closing: &[&str], closed: &[&str]) -> Heartbeat {
    let names = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
    Heartbeat {
        scheduler_address: "tls://127.0.0.1:40000".into(),
        dashboard_address: "http://127.0.0.1:40001".into(),
        api_address: "http://127.0.0.1:40002".into(),
        count,
        active_workers: names(active),
        closing_workers: names(closing),
        closed_workers: names(closed),
    }
}

fn status(b: &LocalBackend, name: &str) -> ClusterStatus {
    b.get(name).unwrap().status
}

#[tokio::test]
async fn first_heartbeat_makes_the_cluster_running_and_routable() {
    let (b, procs, _) = start("running", config()).await;
    let c = b.create(request()).await.unwrap();
    assert_eq!(c.status, ClusterStatus::Pending);
    assert!(procs.scheduler_of(&c.name).is_some());
    assert!(b.route(&c.name).is_none());
    assert!(c.model().tls_key.is_none(), "no credentials before RUNNING");
    b.heartbeat(&c.name, &heartbeat(0, &[], &[], &[]), 0)
        .await
        .unwrap();
    let v = b.get(&c.name).unwrap();
    assert_eq!(v.status, ClusterStatus::Running);
    assert_eq!(b.route(&c.name).unwrap().scheduler, "tls://127.0.0.1:40000");
    let m = v.model();
    assert!(m.tls_key.is_some() && m.tls_cert.is_some());
    assert_eq!(
        m.dashboard_route.as_deref(),
        Some(format!("/clusters/{}/status", c.name).as_str())
    );
}

#[tokio::test]
async fn a_scheduler_reporting_addresses_not_its_own_fails_and_is_never_routed() {
    let (b, _procs, _) = start("not-its-own", config()).await;
    let cases = [
        (
            "dashboard",
            "http://169.254.169.254:80",
            "is not http://<loopback IP>:<port>",
        ),
        (
            "dashboard",
            "http://127.0.0.1:40001/clusters/x",
            "is not http://",
        ),
        // A loopback port the scheduler does not hold: the gateway's own, say.
        (
            "scheduler",
            "tls://127.0.0.1:8000",
            "not a port its own processes listen on",
        ),
        (
            "api",
            "http://127.0.0.1:9100",
            "not a port its own processes listen on",
        ),
    ];
    for (field, address, why) in cases {
        let c = b.create(request()).await.unwrap();
        let mut hb = heartbeat(0, &[], &[], &[]);
        match field {
            "dashboard" => hb.dashboard_address = address.into(),
            "scheduler" => hb.scheduler_address = address.into(),
            _ => hb.api_address = address.into(),
        }
        let err = b.heartbeat(&c.name, &hb, 0).await.unwrap_err().to_string();
        assert!(err.contains(address) && err.contains(why), "{err}");
        assert!(b.route(&c.name).is_none());
        let v = b.get(&c.name).unwrap();
        assert_eq!(v.status, ClusterStatus::Stopping);
        assert_eq!(v.reason.as_deref(), Some(err.as_str()));
        // A later, proper heartbeat does not bring it back.
        b.heartbeat(&c.name, &heartbeat(0, &[], &[], &[]), 0)
            .await
            .unwrap();
        assert!(b.route(&c.name).is_none());
        eventually("the cluster failed", || {
            status(&b, &c.name) == ClusterStatus::Failed
        })
        .await;
    }
}

#[tokio::test]
async fn workers_follow_the_target_and_the_scheduler_retires_them() {
    let (b, procs, _) = start("workers", config()).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(3, &[], &[], &[]), 3)
        .await
        .unwrap();
    assert_eq!(procs.workers_of(&c.name).len(), 3);
    let names: Vec<String> = procs.workers_of(&c.name).into_keys().collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    // All three join; a repeated heartbeat starts nothing more.
    b.heartbeat(&c.name, &heartbeat(3, &refs, &[], &[]), 3)
        .await
        .unwrap();
    assert_eq!(procs.workers_of(&c.name).len(), 3);
    // Scale down to 1: the scheduler retires two; the gateway kills nobody itself.
    b.heartbeat(&c.name, &heartbeat(1, &refs[..1], &refs[1..], &[]), 1)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(procs.workers_of(&c.name).len(), 3);
    assert!(procs.terminated.lock().unwrap().is_empty());
    // They exit by themselves: expected, so no replacement and no failure.
    let workers = procs.workers_of(&c.name);
    for n in &refs[1..] {
        procs.crash(workers[*n], 0);
    }
    eventually("retired workers to be forgotten", || {
        procs.workers_of(&c.name).len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(procs.workers_of(&c.name).len(), 1);
    assert_eq!(status(&b, &c.name), ClusterStatus::Running);
}

#[tokio::test]
async fn surplus_workers_that_never_joined_are_cancelled() {
    let (b, procs, _) = start("surplus", config()).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(4, &[], &[], &[]), 4)
        .await
        .unwrap();
    assert_eq!(procs.workers_of(&c.name).len(), 4);
    b.heartbeat(&c.name, &heartbeat(1, &[], &[], &[]), 1)
        .await
        .unwrap();
    eventually("surplus starting workers to be stopped", || {
        procs.workers_of(&c.name).len() == 1
    })
    .await;
    assert_eq!(procs.terminated.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn workers_the_scheduler_reports_gone_are_terminated() {
    let (b, procs, _) = start("closed", config()).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(2, &[], &[], &[]), 2)
        .await
        .unwrap();
    let names: Vec<String> = procs.workers_of(&c.name).into_keys().collect();
    b.heartbeat(&c.name, &heartbeat(2, &[&names[0], &names[1]], &[], &[]), 2)
        .await
        .unwrap();
    // The scheduler lost names[1] (still running as a process): it is terminated and replaced.
    b.heartbeat(&c.name, &heartbeat(2, &[&names[0]], &[], &[&names[1]]), 2)
        .await
        .unwrap();
    eventually("the lost worker to be replaced", || {
        let w = procs.workers_of(&c.name);
        w.len() == 2 && !w.contains_key(&names[1])
    })
    .await;
    assert_eq!(status(&b, &c.name), ClusterStatus::Running);
}

#[tokio::test]
async fn a_crashed_worker_is_replaced_until_the_failure_limit() {
    let (b, procs, _) = start("failures", config()).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(1, &[], &[], &[]), 1)
        .await
        .unwrap();
    for round in 1..=3 {
        let workers = procs.workers_of(&c.name);
        assert_eq!(workers.len(), 1, "round {round}");
        let (_, id) = workers.into_iter().next().unwrap();
        procs.crash(id, 1);
        if round < 3 {
            eventually("a replacement", || {
                procs.workers_of(&c.name).values().any(|p| *p != id)
            })
            .await;
        }
    }
    eventually("the cluster to fail", || {
        status(&b, &c.name) == ClusterStatus::Failed
    })
    .await;
    let v = b.get(&c.name).unwrap();
    assert!(
        v.reason
            .as_deref()
            .unwrap()
            .contains("3 consecutive worker failures"),
        "{:?}",
        v.reason
    );
    assert!(v.stop_time.is_some());
    assert_eq!(procs.alive_count(), 0, "scheduler and workers are gone");
    assert!(!procs.credentials.lock().unwrap().contains(&c.name));
}

/// A new cluster whose `n` workers have started and joined its scheduler.
async fn with_running_workers(
    b: &LocalBackend,
    procs: &FakeProcesses,
    n: u64,
) -> gateway_backend::ClusterView {
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(n as i64, &[], &[], &[]), n)
        .await
        .unwrap();
    let names: Vec<String> = procs.workers_of(&c.name).into_keys().collect();
    let running: Vec<&str> = names.iter().map(String::as_str).collect();
    b.heartbeat(&c.name, &heartbeat(n as i64, &running, &[], &[]), n)
        .await
        .unwrap();
    c
}

#[tokio::test]
async fn running_workers_that_exit_cleanly_are_no_failures() {
    // Retired workers exit 0, often before the heartbeat that reports them closed: however
    // many at once, the cluster keeps running and they are replaced as any stopped worker.
    let (b, procs, _) = start("clean-exits", config()).await;
    let c = with_running_workers(&b, &procs, 4).await;
    let first: Vec<_> = procs.workers_of(&c.name).into_values().collect();
    for id in &first {
        procs.crash(*id, 0);
    }
    eventually("four replacements", || {
        let now = procs.workers_of(&c.name);
        now.len() == 4 && now.values().all(|p| !first.contains(p))
    })
    .await;
    assert_eq!(status(&b, &c.name), ClusterStatus::Running);
    // A worker that exits 0 before it ever ran is still a failed start.
    for round in 1..=3 {
        let starting: Vec<_> = procs.workers_of(&c.name).into_values().collect();
        procs.crash(starting[0], 0);
        if round < 3 {
            eventually("a replacement", || {
                !procs
                    .workers_of(&c.name)
                    .values()
                    .any(|p| *p == starting[0])
            })
            .await;
        }
    }
    eventually("the cluster to fail", || {
        status(&b, &c.name) == ClusterStatus::Failed
    })
    .await;
}

#[tokio::test]
async fn a_worker_that_joins_resets_the_failure_count() {
    let (b, procs, _) = start("reset", config()).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(1, &[], &[], &[]), 1)
        .await
        .unwrap();
    for _ in 0..5 {
        let (name, id) = procs.workers_of(&c.name).into_iter().next().unwrap();
        // It joins (resetting the count), then crashes.
        b.heartbeat(&c.name, &heartbeat(1, &[&name], &[], &[]), 1)
            .await
            .unwrap();
        procs.crash(id, 1);
        eventually("a replacement", || {
            procs.workers_of(&c.name).values().any(|p| *p != id)
        })
        .await;
    }
    assert_eq!(status(&b, &c.name), ClusterStatus::Running);
}

#[tokio::test]
async fn worker_start_errors_fail_the_cluster() {
    let (b, procs, _) = start("start-errors", config()).await;
    let c = b.create(request()).await.unwrap();
    procs.fail_workers.store(true, Ordering::SeqCst);
    b.heartbeat(&c.name, &heartbeat(2, &[], &[], &[]), 2)
        .await
        .unwrap();
    eventually("the cluster to fail", || {
        status(&b, &c.name) == ClusterStatus::Failed
    })
    .await;
    let reason = b.get(&c.name).unwrap().reason.unwrap();
    assert!(reason.contains("could not start a worker"), "{reason}");
}

#[tokio::test]
async fn a_scheduler_that_never_reports_times_out() {
    let cfg = EngineConfig {
        timing: ClusterTiming {
            start_timeout: 0.2,
            ..config().timing
        },
        ..config()
    };
    let (b, procs, _) = start("start-timeout", cfg).await;
    let c = b.create(request()).await.unwrap();
    let mut rx = b.subscribe(&c.name).unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.is_terminal()))
        .await
        .unwrap()
        .unwrap();
    let v = b.get(&c.name).unwrap();
    assert_eq!(v.status, ClusterStatus::Failed);
    assert!(v.reason.unwrap().contains("did not start within"));
    assert_eq!(procs.alive_count(), 0);
}

#[tokio::test]
async fn a_silent_running_cluster_fails() {
    let cfg = EngineConfig {
        timing: ClusterTiming {
            heartbeat_timeout: 0.2,
            ..config().timing
        },
        ..config()
    };
    let (b, _, _) = start("heartbeat-timeout", cfg).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(0, &[], &[], &[]), 0)
        .await
        .unwrap();
    eventually("the cluster to fail", || {
        status(&b, &c.name) == ClusterStatus::Failed
    })
    .await;
    assert!(b
        .get(&c.name)
        .unwrap()
        .reason
        .unwrap()
        .contains("no heartbeat"));
    assert!(b.route(&c.name).is_none());
}

#[tokio::test]
async fn a_gateway_that_stood_still_does_not_blame_the_schedulers() {
    let cfg = EngineConfig {
        timing: ClusterTiming {
            // Longer than a stall is allowed before it is excused (5 sweeps and a second):
            // any pause of the test is either shorter than the timeout or excused.
            heartbeat_timeout: 1.5,
            ..config().timing
        },
        ..config()
    };
    let (b, _, _) = start("stall", cfg).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(0, &[], &[], &[]), 0)
        .await
        .unwrap();
    // The runtime (one thread in this test) stands still for longer than the timeout, as a
    // gateway stopped with SIGSTOP or frozen in its cgroup would.
    std::thread::sleep(Duration::from_millis(2500));
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(status(&b, &c.name), ClusterStatus::Running);
    // Its timeout still runs from the gateway's return.
    eventually("the silent cluster to fail", || {
        status(&b, &c.name) == ClusterStatus::Failed
    })
    .await;
}

#[tokio::test]
async fn while_the_gateway_turns_connections_away_no_scheduler_is_blamed_for_silence() {
    let cfg = EngineConfig {
        timing: ClusterTiming {
            heartbeat_timeout: 0.3,
            ..config().timing
        },
        ..config()
    };
    let (b, _, _) = start("unreachable", cfg).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(0, &[], &[], &[]), 0)
        .await
        .unwrap();
    // Connections are turned away (an exhausted connection or descriptor limit) for three
    // heartbeat timeouts: the heartbeats could not arrive, and nobody fails for it.
    b.set_reachable(false);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(status(&b, &c.name), ClusterStatus::Running);
    // Taking connections again, the timeout runs from then: a scheduler that is really
    // silent still fails, one timeout later.
    b.set_reachable(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(status(&b, &c.name), ClusterStatus::Running);
    eventually("the silent cluster to fail", || {
        status(&b, &c.name) == ClusterStatus::Failed
    })
    .await;
}

#[tokio::test]
async fn a_scheduler_started_with_a_longer_heartbeat_period_is_judged_by_it() {
    let (b, procs, db) = start("period-change", config()).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(0, &[], &[], &[]), 0)
        .await
        .unwrap();
    drop(b);
    // Restarted with a period 30 times shorter: the running scheduler still heartbeats every
    // 15 s, as it was started.
    let shorter = EngineConfig {
        timing: ClusterTiming {
            heartbeat_period: 0.5,
            heartbeat_timeout: 1.0,
            ..config().timing
        },
        ..config()
    };
    let (procs2, exits) = procs.reattach();
    let b = LocalBackend::start(shorter, Store::open(&db).unwrap(), procs2, exits).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(status(&b, &c.name), ClusterStatus::Running);
    // A cluster started now is judged by the new period.
    let new = b.create(request()).await.unwrap();
    b.heartbeat(&new.name, &heartbeat(0, &[], &[], &[]), 0)
        .await
        .unwrap();
    eventually("the new silent cluster to fail", || {
        status(&b, &new.name) == ClusterStatus::Failed
    })
    .await;
    assert_eq!(status(&b, &c.name), ClusterStatus::Running);
}

#[tokio::test]
async fn a_dead_scheduler_fails_the_cluster() {
    let (b, procs, _) = start("scheduler-exit", config()).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(2, &[], &[], &[]), 2)
        .await
        .unwrap();
    procs.crash(procs.scheduler_of(&c.name).unwrap(), 137);
    eventually("the cluster to fail", || {
        status(&b, &c.name) == ClusterStatus::Failed
    })
    .await;
    let reason = b.get(&c.name).unwrap().reason.unwrap();
    assert!(reason.contains("exit code 137"), "{reason}");
    assert_eq!(procs.alive_count(), 0, "its workers were stopped too");
}

#[tokio::test]
async fn stop_tears_everything_down_and_keeps_the_record() {
    let (b, procs, _) = start("stop", config()).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(2, &[], &[], &[]), 2)
        .await
        .unwrap();
    let mut rx = b.subscribe(&c.name).unwrap();
    b.stop(&c.name, StopRequest::stopped("stopped by alice"))
        .await
        .unwrap();
    assert!(b.route(&c.name).is_none(), "no route once stopping");
    tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.is_terminal()))
        .await
        .unwrap()
        .unwrap();
    let v = b.get(&c.name).unwrap();
    assert_eq!(v.status, ClusterStatus::Stopped);
    assert_eq!(v.reason.as_deref(), Some("stopped by alice"));
    assert_eq!(procs.alive_count(), 0);
    // Heartbeats after the end are accepted and ignored; a second stop is harmless.
    b.heartbeat(&c.name, &heartbeat(5, &[], &[], &[]), 5)
        .await
        .unwrap();
    b.stop(&c.name, StopRequest::failed("late")).await.unwrap();
    assert_eq!(status(&b, &c.name), ClusterStatus::Stopped);
    assert_eq!(procs.alive_count(), 0);
}

#[tokio::test]
async fn a_restarted_engine_readopts_running_clusters_and_fails_dead_ones() {
    let (b, procs, db) = start("recover", config()).await;
    let alive = b.create(request()).await.unwrap();
    let dead = b.create(request()).await.unwrap();
    for c in [&alive, &dead] {
        b.heartbeat(&c.name, &heartbeat(2, &[], &[], &[]), 2)
            .await
            .unwrap();
    }
    let pending = b.create(request()).await.unwrap();
    // The gateway dies (its tasks with it); one scheduler dies while it is down.
    drop(b);
    procs.crash(procs.scheduler_of(&dead.name).unwrap(), 1);
    // A process started just before the crash but never recorded.
    let orphan = procs.spawn(&alive.name, ProcessRole::Worker("orphan".into()));
    let (procs2, exits) = procs.reattach();
    let b =
        LocalBackend::start(config(), Store::open(&db).unwrap(), procs2.clone(), exits).unwrap();
    let v = b.get(&alive.name).unwrap();
    assert_eq!(v.status, ClusterStatus::Running);
    assert!(b.route(&alive.name).is_some());
    eventually("the unrecorded process to be terminated", || {
        !procs2.is_alive(orphan)
    })
    .await;
    assert_eq!(
        procs2.workers_of(&alive.name).len(),
        2,
        "workers re-adopted"
    );
    eventually("the dead cluster to end", || {
        status(&b, &dead.name) == ClusterStatus::Failed
    })
    .await;
    assert!(b
        .get(&dead.name)
        .unwrap()
        .reason
        .unwrap()
        .contains("gone when the gateway restarted"));
    assert!(procs2.workers_of(&dead.name).is_empty());
    assert_eq!(status(&b, &pending.name), ClusterStatus::Pending);
    // The re-adopted cluster keeps working.
    let names: Vec<String> = procs2.workers_of(&alive.name).into_keys().collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    b.heartbeat(&alive.name, &heartbeat(3, &refs, &[], &[]), 3)
        .await
        .unwrap();
    assert_eq!(procs2.workers_of(&alive.name).len(), 3);
}

#[tokio::test]
async fn adopted_workers_that_end_after_a_restart_are_no_failures() {
    // Workers retired after a restart end without an exit code this gateway can read (they
    // are not its children): however many end at once, the cluster keeps running.
    let (b, procs, db) = start("adopted-ends", config()).await;
    let c = with_running_workers(&b, &procs, 4).await;
    drop(b);
    let (procs2, exits) = procs.reattach();
    let b =
        LocalBackend::start(config(), Store::open(&db).unwrap(), procs2.clone(), exits).unwrap();
    let adopted: Vec<_> = procs2.workers_of(&c.name).into_values().collect();
    assert_eq!(adopted.len(), 4);
    for id in &adopted {
        procs2.vanish(*id);
    }
    eventually("four replacements", || {
        let now = procs2.workers_of(&c.name);
        now.len() == 4 && now.values().all(|p| !adopted.contains(p))
    })
    .await;
    assert_eq!(status(&b, &c.name), ClusterStatus::Running);
    let events = b.events(&c.name).await.unwrap();
    assert!(
        !events.iter().any(|e| e.reason == "WorkerExited"),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_scheduler_reporting_to_a_url_no_longer_served_fails_saying_so() {
    let (b, procs, db) = start("moved-url", config()).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(0, &[], &[], &[]), 0)
        .await
        .unwrap();
    drop(b);
    let moved = EngineConfig {
        api_url: Some("http://127.0.0.1:9999/api".into()),
        timing: ClusterTiming {
            heartbeat_timeout: 1.5,
            ..config().timing
        },
        ..config()
    };
    let (procs2, exits) = procs.reattach();
    let b = LocalBackend::start(moved, Store::open(&db).unwrap(), procs2, exits).unwrap();
    eventually("the silent cluster to fail", || {
        status(&b, &c.name) == ClusterStatus::Failed
    })
    .await;
    let reason = b.get(&c.name).unwrap().reason.unwrap();
    assert!(
        reason.ends_with(
            "(it reports to http://127.0.0.1:8000/api, which this gateway no longer serves)"
        ),
        "{reason}"
    );
}

#[tokio::test]
async fn a_gateway_stopped_while_starting_a_scheduler_says_so_after_a_restart() {
    let (b, procs, db) = start("interrupted-start", config()).await;
    let name = b.create(request()).await.unwrap().name;
    drop(b);
    // What a gateway killed between recording a cluster and recording its scheduler leaves:
    // the record without its scheduler (and a scheduler no record accounts for).
    let store = Store::open(&db).unwrap();
    let mut record = store.load_clusters().unwrap().pop().unwrap();
    record.scheduler = None;
    store.put_cluster(&record).unwrap();
    drop(store);
    let (procs2, exits) = procs.reattach();
    let b =
        LocalBackend::start(config(), Store::open(&db).unwrap(), procs2.clone(), exits).unwrap();
    eventually("the cluster to end", || {
        status(&b, &name) == ClusterStatus::Failed
    })
    .await;
    assert_eq!(
        b.get(&name).unwrap().reason.as_deref(),
        Some("the gateway stopped while it was starting the scheduler")
    );
    eventually("the unrecorded scheduler to be stopped", || {
        procs2.alive_count() == 0
    })
    .await;
}

#[tokio::test]
async fn an_interrupted_stop_is_finished_after_a_restart() {
    let (b, procs, db) = start("resume-stop", config()).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(1, &[], &[], &[]), 1)
        .await
        .unwrap();
    // Simulate a gateway killed in the middle of a stop: STOPPING is stored, processes live.
    drop(b);
    {
        let store = Store::open(&db).unwrap();
        let mut rec = store
            .load_clusters()
            .unwrap()
            .into_iter()
            .find(|r| r.name == c.name)
            .unwrap();
        rec.status = ClusterStatus::Stopping;
        rec.final_status = Some(ClusterStatus::Stopped);
        store.put_cluster(&rec).unwrap();
    }
    let (procs2, exits) = procs.reattach();
    let b =
        LocalBackend::start(config(), Store::open(&db).unwrap(), procs2.clone(), exits).unwrap();
    eventually("the stop to finish", || {
        status(&b, &c.name) == ClusterStatus::Stopped
    })
    .await;
    assert_eq!(procs2.alive_count(), 0);
}

#[tokio::test]
async fn a_scheduler_that_cannot_start_leaves_a_failed_record_and_no_process() {
    let (b, procs, _) = start("no-scheduler", config()).await;
    procs.fail_scheduler.store(true, Ordering::SeqCst);
    let err = b.create(request()).await.unwrap_err();
    assert!(err
        .to_string()
        .contains("Could not start the Dask scheduler"));
    let all = b.list(None);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].status, ClusterStatus::Failed);
    assert_eq!(procs.alive_count(), 0);
}

#[tokio::test]
async fn finished_clusters_are_forgotten_after_the_retention() {
    let cfg = EngineConfig {
        retention: Duration::from_millis(100),
        ..config()
    };
    let (b, procs, _) = start("retention", cfg).await;
    let c = b.create(request()).await.unwrap();
    b.stop(&c.name, StopRequest::stopped("done")).await.unwrap();
    eventually("the cluster to be forgotten", || b.get(&c.name).is_none()).await;
    assert!(!procs.dirs.lock().unwrap().contains(&c.name));
}

#[tokio::test]
async fn large_scale_ups_continue_in_batches() {
    let (b, procs, _) = start("batches", config()).await;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(40, &[], &[], &[]), 40)
        .await
        .unwrap();
    assert!(procs.workers_of(&c.name).len() < 40, "one batch at a time");
    eventually("all 40 workers", || procs.workers_of(&c.name).len() == 40).await;
}

#[tokio::test]
async fn list_filters_by_owner_oldest_first() {
    let (b, _, _) = start("list", config()).await;
    let a = b.create(request()).await.unwrap();
    let mut other = request();
    other.owner = "bob".into();
    let o = b.create(other).await.unwrap();
    let c = b.create(request()).await.unwrap();
    let names: Vec<String> = b.list(Some("alice")).into_iter().map(|v| v.name).collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&a.name) && names.contains(&c.name));
    assert_eq!(b.list(Some("bob"))[0].name, o.name);
    assert_eq!(b.list(None).len(), 3);
}

#[tokio::test]
async fn a_stop_begun_before_shutdown_finishes_even_when_clusters_are_kept() {
    let (b, procs, _) = start("stop-then-shutdown", config()).await;
    let kept = b.create(request()).await.unwrap();
    let stopped = b.create(request()).await.unwrap();
    b.stop(&stopped.name, StopRequest::stopped("by its user"))
        .await
        .unwrap();
    // The gateway shuts down at once, keeping clusters for the next run (the default).
    b.shutdown(false).await;
    assert_eq!(status(&b, &stopped.name), ClusterStatus::Stopped);
    assert_eq!(procs.terminated.lock().unwrap().len(), 1);
    assert_eq!(status(&b, &kept.name), ClusterStatus::Pending);
}

/// The cluster's core-seconds so far, as the usage report has them.
async fn core_seconds(b: &LocalBackend, name: &str) -> (f64, f64) {
    let all = b.usage(None, 0, i64::MAX).await.unwrap();
    let u = all.iter().find(|u| u.cluster == name).expect("a usage row");
    (u.amount.core_seconds, u.cores_now)
}

#[tokio::test]
async fn usage_counts_every_process_while_it_runs_across_a_restart_until_the_stop() {
    let (b, procs, db) = start("usage", config()).await;
    let r = ClusterSettings::example().resources;
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(2, &[], &[], &[]), 2)
        .await
        .unwrap();
    let (_, now) = core_seconds(&b, &c.name).await;
    assert_eq!(now, r.scheduler_cores + 2.0 * r.worker_cores);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (early, _) = core_seconds(&b, &c.name).await;
    assert!(early >= 0.3 * now, "{early}");
    // One worker exits: the rate drops at once.
    let workers = procs.workers_of(&c.name);
    let one = *workers.values().next().unwrap();
    b.heartbeat(&c.name, &heartbeat(1, &[], &[], &[]), 1)
        .await
        .unwrap();
    procs.crash(one, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while core_seconds(&b, &c.name).await.1 != r.scheduler_cores + r.worker_cores {
        assert!(Instant::now() < deadline, "the rate did not drop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The gateway dies and comes back; what kept running kept counting.
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (procs2, exits) = procs.reattach();
    let b =
        LocalBackend::start(config(), Store::open(&db).unwrap(), procs2.clone(), exits).unwrap();
    let (after_restart, rate) = core_seconds(&b, &c.name).await;
    assert_eq!(rate, r.scheduler_cores + r.worker_cores);
    assert!(
        after_restart >= early + 0.2 * rate,
        "{after_restart} after {early}"
    );
    b.stop(&c.name, StopRequest::stopped("done")).await.unwrap();
    eventually("the stop", || status(&b, &c.name) == ClusterStatus::Stopped).await;
    let (total, rate) = core_seconds(&b, &c.name).await;
    assert_eq!(rate, 0.0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        core_seconds(&b, &c.name).await.0,
        total,
        "nothing accrues once stopped"
    );
    // Another owner's view has none of it.
    assert!(b.usage(Some("bob"), 0, i64::MAX).await.unwrap().is_empty());
}

#[tokio::test]
async fn metrics_show_workers_by_state_and_the_event_counters() {
    use gateway_backend::metrics;
    let (b, procs, _) = start("metrics", config()).await;
    let mut registry = metrics::registry();
    b.register_metrics(&mut registry);
    let c = b.create(request()).await.unwrap();
    b.heartbeat(&c.name, &heartbeat(2, &[], &[], &[]), 2)
        .await
        .unwrap();
    let names: Vec<String> = procs.workers_of(&c.name).into_keys().collect();
    b.heartbeat(&c.name, &heartbeat(2, &[&names[0]], &[], &[]), 2)
        .await
        .unwrap();
    let text = metrics::render(&registry).unwrap();
    let expected = [
        "# HELP dask_gateway_clusters_created Clusters created since the gateway started.",
        "# TYPE dask_gateway_clusters_created counter",
        "dask_gateway_clusters_created_total 1",
        "# HELP dask_gateway_clusters_failed Clusters that ended FAILED since the gateway started.",
        "# TYPE dask_gateway_clusters_failed counter",
        "dask_gateway_clusters_failed_total 0",
        "# HELP dask_gateway_workers_started Worker processes started since the gateway started.",
        "# TYPE dask_gateway_workers_started counter",
        "dask_gateway_workers_started_total 2",
        "# HELP dask_gateway_worker_failures Worker start failures and unexpected worker exits since the gateway started.",
        "# TYPE dask_gateway_worker_failures counter",
        "dask_gateway_worker_failures_total 0",
        "# HELP dask_gateway_workers Worker processes, by state.",
        "# TYPE dask_gateway_workers gauge",
        "dask_gateway_workers{state=\"starting\"} 1",
        "dask_gateway_workers{state=\"running\"} 1",
        "dask_gateway_workers{state=\"closing\"} 0",
        "dask_gateway_workers{state=\"retired\"} 0",
        "dask_gateway_workers{state=\"stopping\"} 0",
        "# EOF",
    ];
    assert_eq!(text.lines().collect::<Vec<_>>(), expected, "{text}");
}
