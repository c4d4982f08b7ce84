//! The cluster manager: owns every cluster's lifecycle on the local backend.
//!
//! State lives in memory behind one mutex (never held across an `.await`) and is written
//! through to the [`Store`] before a change becomes visible. Process exits arrive as events
//! from the backend; heartbeats arrive from the API; a one-second tick enforces timeouts.

use crate::auth::{token_matches, User};
use crate::cluster_settings::{self, ClusterSettings};
use crate::config::GatewayConfig;
use crate::store::{ClusterRecord, Store, StoreError, WorkerRecord};
use gateway_local::{
    new_api_token, ClusterCredentials, LocalBackend, ProcessExit, ProcessId, ProcessRole,
    SchedulerSpec, WorkerSpec,
};
use gateway_model::{
    as_count, validate_options, ClusterModel, ClusterStatus, Heartbeat, ScaleResponse,
    SchedulerMessage,
};
use gateway_proxy::{ClusterRoute, RouteTable};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::{error, info, warn};

/// How long `?wait` holds a request.
const WAIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Workers started per heartbeat, exit or tick.
const START_BATCH: usize = 16;
/// Grace period between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Failures the API maps to status codes.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// 404.
    #[error("Cluster {0} not found")]
    NotFound(String),
    /// 403.
    #[error("User {user} lacks permissions to {action} cluster {name}")]
    Forbidden {
        /// Who asked.
        user: String,
        /// What they tried.
        action: &'static str,
        /// Which cluster.
        name: String,
    },
    /// 422: bad input.
    #[error("{0}")]
    Invalid(String),
    /// 409: the cluster cannot take the request in its state.
    #[error("cluster {0} is not running")]
    NotRunning(String),
    /// 401 on token-only routes.
    #[error("Unauthorized")]
    BadToken,
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ManagerError {
    fn from(e: StoreError) -> Self {
        ManagerError::Internal(e.to_string())
    }
}

/// Who asks to stop a cluster.
pub enum Requester<'a> {
    /// An authenticated user.
    User(&'a User),
    /// The cluster itself, by its token (idle timeout).
    Token(&'a str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WorkerState {
    /// Started, not yet reported active by the scheduler.
    Starting,
    /// Reported active.
    Running,
    /// Being retired by the scheduler; its exit is expected.
    Closing,
    /// We are terminating it; its exit is expected.
    Stopping,
}

struct Worker {
    process: ProcessId,
    state: WorkerState,
}

struct Cluster {
    rec: ClusterRecord,
    workers: HashMap<String, Worker>,
    last_heartbeat: Instant,
    pending_since: Instant,
    worker_failures: u32,
    /// A teardown task is running (STOPPING); never start a second one.
    tearing_down: bool,
    status_tx: watch::Sender<ClusterStatus>,
}

impl Cluster {
    fn new(rec: ClusterRecord) -> Self {
        let (status_tx, _) = watch::channel(rec.status);
        Cluster {
            rec,
            workers: HashMap::new(),
            last_heartbeat: Instant::now(),
            pending_since: Instant::now(),
            worker_failures: 0,
            tearing_down: false,
            status_tx,
        }
    }

    fn model(&self) -> ClusterModel {
        let r = &self.rec;
        let running = r.status == ClusterStatus::Running;
        let has_dashboard = r
            .dashboard_address
            .as_deref()
            .is_some_and(|d| !d.is_empty());
        ClusterModel {
            name: r.name.clone(),
            status: r.status,
            dashboard_route: (running && has_dashboard)
                .then(|| format!("/clusters/{}/status", r.name)),
            start_time: r.start_time,
            stop_time: r.stop_time,
            options: r.options.clone(),
            tls_cert: running.then(|| r.tls_cert.clone()),
            tls_key: running.then(|| r.tls_key.clone()),
        }
    }

    fn set_status(&mut self, status: ClusterStatus) {
        debug_assert!(
            self.rec.status.can_transition_to(status),
            "{} -> {}",
            self.rec.status,
            status
        );
        self.rec.status = status;
        self.status_tx.send_replace(status);
    }

    fn live_workers(&self) -> usize {
        self.workers
            .values()
            .filter(|w| matches!(w.state, WorkerState::Starting | WorkerState::Running))
            .count()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn new_name() -> String {
    new_api_token()
}

/// Processes to terminate once the state lock is released.
#[derive(Default)]
#[must_use]
struct Kills(Vec<ProcessId>);

impl Kills {
    fn run(self) {
        for id in self.0 {
            tokio::spawn(async move { id.terminate(STOP_GRACE).await });
        }
    }
}

/// Event counters since start (exposed as Prometheus counters).
#[derive(Default)]
struct Counters {
    clusters_created: AtomicU64,
    clusters_failed: AtomicU64,
    workers_started: AtomicU64,
}

/// The cluster manager (see the module docs).
pub struct Manager {
    counters: Counters,
    clusters: Mutex<HashMap<String, Cluster>>,
    store: Store,
    backend: LocalBackend,
    routes: RouteTable,
    config: Arc<GatewayConfig>,
    http: reqwest::Client,
}

impl Manager {
    /// A manager over `store`, launching through `backend` and publishing routes to `routes`.
    pub fn new(
        config: Arc<GatewayConfig>,
        store: Store,
        backend: LocalBackend,
        routes: RouteTable,
    ) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("HTTP client");
        Arc::new(Manager {
            counters: Counters::default(),
            clusters: Mutex::new(HashMap::new()),
            store,
            backend,
            routes,
            config,
            http,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Cluster>> {
        self.clusters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cluster options as sent by `GET /api/v1/options`.
    pub fn options_wire(&self) -> Value {
        let fields: Vec<Value> = self
            .config
            .cluster
            .options
            .iter()
            .map(|f| f.to_wire())
            .collect();
        serde_json::json!({ "cluster_options": fields })
    }

    /// Creates a cluster for `user` from the request's `cluster_options`; returns its name.
    pub fn create(&self, user: &User, options: Option<&Value>) -> Result<String, ManagerError> {
        let fields = &self.config.cluster.options;
        let options = validate_options(fields, options).map_err(|e| ManagerError::Invalid(e.0))?;
        let settings = cluster_settings::resolve(&self.config.cluster, fields, &options)
            .map_err(ManagerError::Invalid)?;
        self.check_cluster_quota(&self.lock(), user)?;
        let name = new_name();
        let creds = ClusterCredentials::generate(&name)
            .map_err(|e| ManagerError::Internal(format!("generating TLS credentials: {e}")))?;
        if let Err(e) = self.backend.prepare(&name, &creds) {
            self.backend.remove_dir(&name);
            return Err(ManagerError::Internal(format!(
                "preparing cluster directory: {e}"
            )));
        }
        let rec = ClusterRecord {
            name: name.clone(),
            owner: user.name.clone(),
            status: ClusterStatus::Pending,
            reason: None,
            final_status: None,
            options,
            settings,
            token: new_api_token(),
            tls_cert: creds.cert_pem,
            tls_key: creds.key_pem,
            scheduler: None,
            scheduler_address: None,
            dashboard_address: None,
            api_address: None,
            target: 0,
            start_time: now_ms(),
            stop_time: None,
        };
        let mut clusters = self.lock();
        // Checked again under the lock that inserts: concurrent creates cannot pass the quota.
        let admitted = self.check_cluster_quota(&clusters, user);
        if let Err(e) = admitted.and_then(|()| Ok(self.store.put_cluster(&rec)?)) {
            drop(clusters);
            self.backend.remove_dir(&name);
            return Err(e);
        }
        let cluster = clusters
            .entry(name.clone())
            .or_insert_with(|| Cluster::new(rec));
        let spec = SchedulerSpec {
            cluster: &name,
            owner: &user.name,
            token: &cluster.rec.token,
            idle_timeout: cluster.rec.settings.idle_timeout,
            environment: &cluster.rec.settings.environment,
        };
        match self.backend.start_scheduler(&spec) {
            Ok(pid) => {
                cluster.rec.scheduler = Some(pid);
                self.store.put_cluster(&cluster.rec)?;
                self.counters
                    .clusters_created
                    .fetch_add(1, Ordering::Relaxed);
                info!(cluster = %name, user = ?user.name, pid = pid.pid, "cluster created, scheduler starting");
                Ok(name)
            }
            Err(e) => {
                let msg = format!("could not start the Dask scheduler: {e}");
                error!(cluster = %name, "{msg}");
                cluster.set_status(ClusterStatus::Failed);
                cluster.rec.reason = Some(msg.clone());
                cluster.rec.stop_time = Some(now_ms());
                self.store.put_cluster(&cluster.rec)?;
                self.backend.remove_credentials(&name);
                Err(ManagerError::Internal(msg))
            }
        }
    }

    /// Refuses a new cluster when `user` already has `max_clusters_per_user` active ones.
    fn check_cluster_quota(
        &self,
        clusters: &HashMap<String, Cluster>,
        user: &User,
    ) -> Result<(), ManagerError> {
        let Some(max) = self.config.cluster.max_clusters_per_user else {
            return Ok(());
        };
        let active = clusters
            .values()
            .filter(|c| c.rec.owner == user.name && c.rec.status.is_active())
            .count() as u64;
        if active >= max {
            return Err(ManagerError::Invalid(format!(
                "User {} already has {active} active clusters; the maximum per user is {max}",
                user.name
            )));
        }
        Ok(())
    }

    fn check_access<'a>(
        clusters: &'a mut HashMap<String, Cluster>,
        user: &User,
        name: &str,
        action: &'static str,
    ) -> Result<&'a mut Cluster, ManagerError> {
        let c = clusters
            .get_mut(name)
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
        if !user.may_access(&c.rec.owner) {
            return Err(ManagerError::Forbidden {
                user: user.name.clone(),
                action,
                name: name.to_string(),
            });
        }
        Ok(c)
    }

    /// The cluster's model; with `wait`, first holds until it has left PENDING (at most 20 s).
    pub async fn get(
        &self,
        user: &User,
        name: &str,
        wait: bool,
    ) -> Result<ClusterModel, ManagerError> {
        let mut rx = {
            let mut clusters = self.lock();
            let c = Self::check_access(&mut clusters, user, name, "view")?;
            if !wait || c.rec.status != ClusterStatus::Pending {
                return Ok(c.model());
            }
            c.status_tx.subscribe()
        };
        let _ =
            tokio::time::timeout(WAIT_TIMEOUT, rx.wait_for(|s| *s != ClusterStatus::Pending)).await;
        let mut clusters = self.lock();
        Ok(Self::check_access(&mut clusters, user, name, "view")?.model())
    }

    /// The user's clusters (all clusters for admins) with one of `statuses`
    /// (default: the active ones).
    pub fn list(&self, user: &User, statuses: Option<&[ClusterStatus]>) -> Vec<ClusterModel> {
        let clusters = self.lock();
        let mut out: Vec<ClusterModel> = clusters
            .values()
            .filter(|c| user.may_access(&c.rec.owner))
            .filter(|c| match statuses {
                Some(list) => list.contains(&c.rec.status),
                None => c.rec.status.is_active(),
            })
            .map(Cluster::model)
            .collect();
        out.sort_by_key(|m| m.start_time);
        out
    }

    /// Stops a cluster (idempotent: unknown or finished clusters are fine).
    pub fn stop(self: &Arc<Self>, name: &str, who: Requester<'_>) -> Result<(), ManagerError> {
        let mut clusters = self.lock();
        let Some(c) = clusters.get_mut(name) else {
            return Ok(());
        };
        let by = match who {
            Requester::User(user) => {
                if !user.may_access(&c.rec.owner) {
                    return Err(ManagerError::Forbidden {
                        user: user.name.clone(),
                        action: "stop",
                        name: name.into(),
                    });
                }
                format!("stopped by {}", user.name)
            }
            Requester::Token(token) => {
                if !token_matches(token, &c.rec.token) {
                    return Err(ManagerError::BadToken);
                }
                "stopped by its scheduler (idle timeout)".to_string()
            }
        };
        if c.rec.status.is_active() {
            info!(cluster = %name, reason = %by, "stopping cluster");
            self.begin_stop(c, ClusterStatus::Stopped, by);
        }
        drop(clusters);
        self.spawn_teardown_if_needed(name);
        Ok(())
    }

    /// Waits (at most `timeout`) until a stopping cluster has finished, so that a DELETE usually
    /// answers with the processes already gone and the cluster already STOPPED.
    pub async fn wait_finished(&self, name: &str, timeout: Duration) {
        let rx = self.lock().get(name).map(|c| c.status_tx.subscribe());
        if let Some(mut rx) = rx {
            let _ = tokio::time::timeout(timeout, rx.wait_for(|s| s.is_terminal())).await;
        }
    }

    /// Whether `user` may access cluster `name` (false for unknown clusters).
    pub fn owner_allows(&self, name: &str, user: &User) -> bool {
        self.lock()
            .get(name)
            .is_some_and(|c| user.may_access(&c.rec.owner))
    }

    /// Whether `token` is the token of cluster `name`.
    pub fn token_is_valid(&self, name: &str, token: &str) -> bool {
        self.lock()
            .get(name)
            .is_some_and(|c| token_matches(token, &c.rec.token))
    }

    /// Moves an active cluster to STOPPING (persisted) and drops its routes. Its processes are
    /// terminated and the final status reached by [`Manager::spawn_teardown_if_needed`].
    fn begin_stop(&self, c: &mut Cluster, final_status: ClusterStatus, reason: String) {
        c.set_status(ClusterStatus::Stopping);
        c.rec.final_status = Some(final_status);
        c.rec.reason = Some(reason);
        self.routes.remove(&c.rec.name);
        if let Err(e) = self.store.put_cluster(&c.rec) {
            error!(cluster = %c.rec.name, "persisting stop: {e}");
        }
        for w in c.workers.values_mut() {
            w.state = WorkerState::Stopping;
        }
    }

    /// For a STOPPING cluster: waits until its processes are gone, then records the final status.
    fn spawn_teardown_if_needed(self: &Arc<Self>, name: &str) {
        let procs: Vec<ProcessId> = {
            let mut clusters = self.lock();
            let Some(c) = clusters
                .get_mut(name)
                .filter(|c| c.rec.status == ClusterStatus::Stopping && !c.tearing_down)
            else {
                return;
            };
            c.tearing_down = true;
            c.rec
                .scheduler
                .into_iter()
                .chain(c.workers.values().map(|w| w.process))
                .collect()
        };
        let me = Arc::clone(self);
        let name = name.to_string();
        tokio::spawn(async move {
            let waits = procs
                .into_iter()
                .map(|p| async move { p.terminate(STOP_GRACE).await });
            futures_util::future::join_all(waits).await;
            me.finish_stop(&name);
        });
    }

    fn finish_stop(&self, name: &str) {
        let mut clusters = self.lock();
        let Some(c) = clusters.get_mut(name) else {
            return;
        };
        if c.rec.status != ClusterStatus::Stopping {
            return;
        }
        let final_status = c.rec.final_status.unwrap_or(ClusterStatus::Stopped);
        c.set_status(final_status);
        c.rec.stop_time = Some(now_ms());
        c.rec.target = 0;
        for w in c.workers.keys() {
            let _ = self.store.delete_worker(name, w);
        }
        c.workers.clear();
        if let Err(e) = self.store.put_cluster(&c.rec) {
            error!(cluster = %name, "persisting final status: {e}");
        }
        self.backend.remove_credentials(name);
        info!(cluster = %name, status = %final_status, reason = c.rec.reason.as_deref().unwrap_or(""), "cluster finished");
    }

    fn fail(&self, c: &mut Cluster, reason: String) {
        self.counters
            .clusters_failed
            .fetch_add(1, Ordering::Relaxed);
        warn!(cluster = %c.rec.name, %reason, "cluster failed");
        self.begin_stop(c, ClusterStatus::Failed, reason)
    }

    /// Validates and forwards a scale request; returns the clipping report.
    pub async fn scale(
        self: &Arc<Self>,
        user: &User,
        name: &str,
        count: &Value,
    ) -> Result<ScaleResponse, ManagerError> {
        let (msg, report) = {
            let mut clusters = self.lock();
            let c = Self::check_access(&mut clusters, user, name, "scale")?;
            let Some(n) = as_count(count) else {
                return Err(ManagerError::Invalid(format!(
                    "Scale expects a non-negative integer, got {}",
                    gateway_model::py_repr(count)
                )));
            };
            if c.rec.status != ClusterStatus::Running {
                return Err(ManagerError::NotRunning(name.into()));
            }
            let (n, clipped) = c
                .rec
                .settings
                .limits
                .clip_scale(&c.rec.settings.resources, n);
            (SchedulerMessage::Scale { count: n }, clipped)
        };
        self.forward(name, &msg).await?;
        Ok(ScaleResponse {
            ok: report.is_none(),
            msg: report,
        })
    }

    /// Validates and forwards an adapt request; returns the clipping report.
    pub async fn adapt(
        self: &Arc<Self>,
        user: &User,
        name: &str,
        minimum: &Value,
        maximum: &Value,
        active: bool,
    ) -> Result<ScaleResponse, ManagerError> {
        let bound = |v: &Value, what: &str| -> Result<Option<u64>, ManagerError> {
            if v.is_null() {
                return Ok(None);
            }
            as_count(v).map(Some).ok_or_else(|| {
                ManagerError::Invalid(format!(
                    "Adapt expects a non-negative integer {what}, got {}",
                    gateway_model::py_repr(v)
                ))
            })
        };
        let (msg, report) = {
            let mut clusters = self.lock();
            let c = Self::check_access(&mut clusters, user, name, "adapt")?;
            let (min, max) = (bound(minimum, "minimum")?, bound(maximum, "maximum")?);
            if c.rec.status != ClusterStatus::Running {
                return Err(ManagerError::NotRunning(name.into()));
            }
            let (min, max, clipped) =
                c.rec
                    .settings
                    .limits
                    .clip_adapt(&c.rec.settings.resources, min, max);
            (
                SchedulerMessage::Adapt {
                    minimum: min,
                    maximum: max,
                    active,
                },
                clipped,
            )
        };
        self.forward(name, &msg).await?;
        Ok(ScaleResponse {
            ok: report.is_none(),
            msg: report,
        })
    }

    /// Sends a message to the scheduler's `/api/comm` (3 attempts); on failure the cluster fails.
    async fn forward(
        self: &Arc<Self>,
        name: &str,
        msg: &SchedulerMessage,
    ) -> Result<(), ManagerError> {
        let (url, token) = {
            let clusters = self.lock();
            let c = clusters
                .get(name)
                .ok_or_else(|| ManagerError::NotFound(name.into()))?;
            match (&c.rec.api_address, c.rec.status) {
                (Some(api), ClusterStatus::Running) => (
                    format!("{}/api/comm", api.trim_end_matches('/')),
                    c.rec.token.clone(),
                ),
                _ => return Err(ManagerError::NotRunning(name.into())),
            }
        };
        let mut last_error = String::new();
        for (attempt, pause) in [0u64, 100, 200].into_iter().enumerate() {
            if pause > 0 {
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            match self
                .http
                .post(&url)
                .header("Authorization", format!("token {token}"))
                .json(msg)
                .send()
                .await
            {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => last_error = format!("scheduler answered {}", resp.status()),
                Err(e) => last_error = e.to_string(),
            }
            warn!(cluster = %name, attempt = attempt + 1, error = %last_error, "forwarding to scheduler failed");
        }
        if let Some(c) = self
            .lock()
            .get_mut(name)
            .filter(|c| c.rec.status.is_active())
        {
            self.fail(c, format!("could not reach the scheduler: {last_error}"));
        }
        self.spawn_teardown_if_needed(name);
        Err(ManagerError::NotRunning(name.into()))
    }

    /// Handles a scheduler heartbeat (wire-protocol 9.4).
    pub fn heartbeat(
        self: &Arc<Self>,
        name: &str,
        token: &str,
        hb: &Heartbeat,
    ) -> Result<(), ManagerError> {
        let mut kills = Kills::default();
        let result = {
            let mut clusters = self.lock();
            let c = clusters.get_mut(name).ok_or(ManagerError::BadToken)?;
            if !token_matches(token, &c.rec.token) {
                return Err(ManagerError::BadToken);
            }
            self.apply_heartbeat(c, hb, &mut kills)
        };
        kills.run();
        self.spawn_teardown_if_needed(name);
        result
    }

    fn apply_heartbeat(
        &self,
        c: &mut Cluster,
        hb: &Heartbeat,
        kills: &mut Kills,
    ) -> Result<(), ManagerError> {
        if !c.rec.status.is_active() {
            return Ok(());
        }
        let name = c.rec.name.clone();
        c.last_heartbeat = Instant::now();
        let mut dirty = false;
        if c.rec.status == ClusterStatus::Pending && !hb.scheduler_address.is_empty() {
            c.rec.scheduler_address = Some(hb.scheduler_address.clone());
            c.rec.dashboard_address = Some(hb.dashboard_address.clone()).filter(|d| !d.is_empty());
            c.rec.api_address = Some(hb.api_address.clone()).filter(|a| !a.is_empty());
            self.install_route(&c.rec);
            c.set_status(ClusterStatus::Running);
            dirty = true;
            info!(cluster = %name, scheduler = %hb.scheduler_address, "cluster running");
        }
        let wanted = hb.count.max(0) as u64;
        let (target, _) = c
            .rec
            .settings
            .limits
            .clip_scale(&c.rec.settings.resources, wanted);
        if target != c.rec.target {
            c.rec.target = target;
            dirty = true;
        }
        let active: HashSet<&str> = hb.active_workers.iter().map(String::as_str).collect();
        let closing: HashSet<&str> = hb.closing_workers.iter().map(String::as_str).collect();
        let closed: HashSet<&str> = hb.closed_workers.iter().map(String::as_str).collect();
        for (wname, w) in c.workers.iter_mut() {
            let n = wname.as_str();
            if w.state == WorkerState::Stopping {
                continue;
            }
            if closing.contains(n) {
                w.state = WorkerState::Closing;
            } else if active.contains(n) {
                w.state = WorkerState::Running;
                c.worker_failures = 0;
            } else if closed.contains(n) {
                w.state = WorkerState::Stopping;
                kills.0.push(w.process);
            }
        }
        // Cancel surplus workers that have not joined yet.
        let starting: Vec<String> = c
            .workers
            .iter()
            .filter(|(_, w)| w.state == WorkerState::Starting)
            .map(|(n, _)| n.clone())
            .collect();
        let surplus = (active.len() + starting.len()).saturating_sub(target as usize);
        for wname in starting.into_iter().take(surplus) {
            if let Some(w) = c.workers.get_mut(&wname) {
                w.state = WorkerState::Stopping;
                kills.0.push(w.process);
            }
        }
        if dirty {
            self.store.put_cluster(&c.rec)?;
        }
        if c.rec.status == ClusterStatus::Running {
            self.start_missing_workers(c);
        }
        Ok(())
    }

    fn install_route(&self, rec: &ClusterRecord) {
        if let Some(addr) = &rec.scheduler_address {
            self.routes.set(
                &rec.name,
                ClusterRoute {
                    scheduler: addr.trim_start_matches("tls://").to_string(),
                    dashboard: rec
                        .dashboard_address
                        .as_ref()
                        .map(|d| d.trim_start_matches("http://").to_string()),
                },
            );
        }
    }

    /// Starts workers until the live count reaches the target, at most [`START_BATCH`] per call
    /// (the one-second tick continues a large scale-up without holding the lock for long).
    fn start_missing_workers(&self, c: &mut Cluster) {
        let Some(address) = c.rec.scheduler_address.clone() else {
            return;
        };
        let limit = self.config.cluster.worker_start_failure_limit.max(1);
        let mut started = 0;
        while c.live_workers() < c.rec.target as usize && started < START_BATCH {
            started += 1;
            let wname = new_name();
            let spec = WorkerSpec {
                cluster: &c.rec.name,
                owner: &c.rec.owner,
                worker: &wname,
                scheduler_address: &address,
                threads: c.rec.settings.worker_threads,
                memory_limit: c.rec.settings.resources.worker_memory,
                environment: &c.rec.settings.environment,
            };
            match self.backend.start_worker(&spec) {
                Ok(process) => {
                    let record = WorkerRecord {
                        cluster: c.rec.name.clone(),
                        name: wname.clone(),
                        process,
                    };
                    if let Err(e) = self.store.put_worker(&record) {
                        error!(cluster = %c.rec.name, "persisting worker: {e}");
                    }
                    self.counters
                        .workers_started
                        .fetch_add(1, Ordering::Relaxed);
                    info!(cluster = %c.rec.name, worker = %wname, pid = process.pid, "worker starting");
                    c.workers.insert(
                        wname,
                        Worker {
                            process,
                            state: WorkerState::Starting,
                        },
                    );
                }
                Err(e) => {
                    c.worker_failures += 1;
                    error!(cluster = %c.rec.name, "starting worker: {e}");
                    if c.worker_failures >= limit {
                        let reason = format!(
                            "{} consecutive worker start failures: {e}",
                            c.worker_failures
                        );
                        self.fail(c, reason);
                    }
                    return;
                }
            }
        }
    }

    /// Handles the exit of a scheduler or worker process.
    pub fn on_exit(self: &Arc<Self>, exit: ProcessExit) {
        exit.id.kill_remnants();
        {
            let mut clusters = self.lock();
            let Some(c) = clusters.get_mut(&exit.cluster) else {
                return;
            };
            let code = exit.code.map_or("unknown".to_string(), |c| c.to_string());
            match &exit.role {
                ProcessRole::Scheduler => {
                    if c.rec.scheduler == Some(exit.id) && c.rec.status.is_active() {
                        self.fail(c, format!("the scheduler exited (exit code {code})"));
                    }
                }
                ProcessRole::Worker(wname) => {
                    let Some(w) = c.workers.get(wname).filter(|w| w.process == exit.id) else {
                        return;
                    };
                    let expected = matches!(w.state, WorkerState::Closing | WorkerState::Stopping);
                    c.workers.remove(wname);
                    if let Err(e) = self.store.delete_worker(&exit.cluster, wname) {
                        error!(cluster = %exit.cluster, "forgetting worker: {e}");
                    }
                    if expected || !c.rec.status.is_active() {
                        info!(cluster = %exit.cluster, worker = %wname, "worker stopped");
                    } else {
                        c.worker_failures += 1;
                        warn!(cluster = %exit.cluster, worker = %wname, exit_code = %code, failures = c.worker_failures, "worker exited unexpectedly");
                        if c.worker_failures
                            >= self.config.cluster.worker_start_failure_limit.max(1)
                        {
                            let reason = format!(
                                "{} workers in a row exited unexpectedly",
                                c.worker_failures
                            );
                            self.fail(c, reason);
                        } else if c.rec.status == ClusterStatus::Running {
                            self.start_missing_workers(c);
                        }
                    }
                }
            }
        }
        self.spawn_teardown_if_needed(&exit.cluster);
    }

    /// Enforces start and heartbeat timeouts and forgets clusters past their retention.
    pub fn tick(self: &Arc<Self>) {
        let now = Instant::now();
        let start_timeout = Duration::from_secs_f64(self.config.cluster.start_timeout);
        let hb_timeout = Duration::from_secs_f64(self.config.cluster.heartbeat_timeout());
        let retention_ms = (self.config.cluster.retention * 1000.0) as i64;
        let mut stopping = Vec::new();
        let mut forget = Vec::new();
        {
            let mut clusters = self.lock();
            for c in clusters.values_mut() {
                let reason = match c.rec.status {
                    ClusterStatus::Pending
                        if now.duration_since(c.pending_since) > start_timeout =>
                    {
                        Some(format!(
                            "the scheduler did not start within {} s",
                            start_timeout.as_secs_f64()
                        ))
                    }
                    ClusterStatus::Running if now.duration_since(c.last_heartbeat) > hb_timeout => {
                        Some(format!(
                            "no heartbeat from the scheduler for {} s",
                            hb_timeout.as_secs_f64()
                        ))
                    }
                    _ => None,
                };
                if let Some(reason) = reason {
                    self.fail(c, reason);
                    stopping.push(c.rec.name.clone());
                } else if c.rec.status == ClusterStatus::Running && c.worker_failures == 0 {
                    self.start_missing_workers(c);
                }
                if c.rec.status.is_terminal()
                    && c.rec.stop_time.is_some_and(|t| now_ms() - t > retention_ms)
                {
                    forget.push(c.rec.name.clone());
                }
            }
            for name in &forget {
                clusters.remove(name);
                if let Err(e) = self.store.delete_cluster(name) {
                    error!(cluster = %name, "forgetting cluster: {e}");
                }
                self.backend.remove_dir(name);
            }
        }
        for name in stopping {
            self.spawn_teardown_if_needed(&name);
        }
    }

    /// Loads the stored clusters after a (re)start: re-adopts live processes and routes,
    /// fails clusters whose scheduler is gone, and finishes interrupted stops.
    pub fn recover(self: &Arc<Self>) -> Result<(), ManagerError> {
        let records = self.store.load_clusters()?;
        let mut resume = Vec::new();
        let mut clusters = self.lock();
        for rec in records {
            let name = rec.name.clone();
            let workers = self.store.load_workers(&name)?;
            let mut c = Cluster::new(rec);
            if !c.rec.status.is_terminal() {
                for w in workers {
                    if w.process.is_alive() {
                        self.backend
                            .adopt(&name, ProcessRole::Worker(w.name.clone()), w.process);
                        c.workers.insert(
                            w.name,
                            Worker {
                                process: w.process,
                                state: WorkerState::Running,
                            },
                        );
                    } else {
                        let _ = self.store.delete_worker(&name, &w.name);
                    }
                }
            }
            if c.rec.status.is_active() {
                match c.rec.scheduler {
                    Some(id) if id.is_alive() => {
                        self.backend.adopt(&name, ProcessRole::Scheduler, id);
                        if c.rec.status == ClusterStatus::Running {
                            self.install_route(&c.rec);
                        }
                        info!(cluster = %name, status = %c.rec.status, workers = c.workers.len(), "re-adopted cluster");
                    }
                    _ => {
                        let reason = "the scheduler process was gone when the gateway restarted";
                        self.fail(&mut c, reason.into());
                    }
                }
            }
            if c.rec.status == ClusterStatus::Stopping {
                for w in c.workers.values_mut() {
                    w.state = WorkerState::Stopping;
                }
                resume.push(name.clone());
            }
            clusters.insert(name, c);
        }
        // Processes in a cluster directory that no record accounts for (a crash between starting
        // a process and storing it) would otherwise run forever: stop them.
        let known: HashSet<ProcessId> = clusters
            .values()
            .filter(|c| !c.rec.status.is_terminal())
            .flat_map(|c| {
                c.rec
                    .scheduler
                    .into_iter()
                    .chain(c.workers.values().map(|w| w.process))
            })
            .collect();
        for (cluster, id) in self.backend.unknown_processes(&known) {
            warn!(cluster = %cluster, pid = id.pid, "terminating a process no cluster record accounts for");
            tokio::spawn(async move { id.terminate(STOP_GRACE).await });
        }
        drop(clusters);
        for name in resume {
            self.spawn_teardown_if_needed(&name);
        }
        Ok(())
    }

    /// Stops every active cluster and waits (bounded) until they are finished.
    pub async fn stop_all(self: &Arc<Self>, reason: &str) {
        let names: Vec<String> = {
            let mut clusters = self.lock();
            let mut names = Vec::new();
            for c in clusters.values_mut().filter(|c| c.rec.status.is_active()) {
                self.begin_stop(c, ClusterStatus::Stopped, reason.to_string());
                names.push(c.rec.name.clone());
            }
            names
        };
        for n in &names {
            self.spawn_teardown_if_needed(n);
        }
        let deadline = Instant::now() + STOP_GRACE + Duration::from_secs(3);
        while Instant::now() < deadline {
            let busy = self
                .lock()
                .values()
                .any(|c| c.rec.status == ClusterStatus::Stopping);
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the state store answers (health checks).
    pub fn store_ok(&self) -> bool {
        self.store.ping().is_ok()
    }

    /// Prometheus text exposition of the gateway's state and counters.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut by_status: HashMap<ClusterStatus, usize> = HashMap::new();
        let mut workers: HashMap<&'static str, usize> = HashMap::new();
        {
            let clusters = self.lock();
            for c in clusters.values() {
                *by_status.entry(c.rec.status).or_default() += 1;
                for w in c.workers.values() {
                    let state = match w.state {
                        WorkerState::Starting => "starting",
                        WorkerState::Running => "running",
                        WorkerState::Closing => "closing",
                        WorkerState::Stopping => "stopping",
                    };
                    *workers.entry(state).or_default() += 1;
                }
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP dask_gateway_clusters Clusters known to the gateway, by status."
        );
        let _ = writeln!(out, "# TYPE dask_gateway_clusters gauge");
        for st in ClusterStatus::ALL {
            let n = by_status.get(&st).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "dask_gateway_clusters{{status=\"{}\"}} {n}",
                st.as_str().to_ascii_lowercase()
            );
        }
        let _ = writeln!(
            out,
            "# HELP dask_gateway_workers Worker processes, by state."
        );
        let _ = writeln!(out, "# TYPE dask_gateway_workers gauge");
        for state in ["starting", "running", "closing", "stopping"] {
            let n = workers.get(state).copied().unwrap_or(0);
            let _ = writeln!(out, "dask_gateway_workers{{state=\"{state}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP dask_gateway_routes Clusters reachable through the proxy."
        );
        let _ = writeln!(out, "# TYPE dask_gateway_routes gauge");
        let _ = writeln!(out, "dask_gateway_routes {}", self.routes.len());
        for (name, help, value) in [
            (
                "clusters_created",
                "Clusters created since the gateway started.",
                &self.counters.clusters_created,
            ),
            (
                "clusters_failed",
                "Clusters that ended FAILED since the gateway started.",
                &self.counters.clusters_failed,
            ),
            (
                "workers_started",
                "Worker processes started since the gateway started.",
                &self.counters.workers_started,
            ),
        ] {
            let _ = writeln!(out, "# HELP dask_gateway_{name}_total {help}");
            let _ = writeln!(out, "# TYPE dask_gateway_{name}_total counter");
            let _ = writeln!(
                out,
                "dask_gateway_{name}_total {}",
                value.load(Ordering::Relaxed)
            );
        }
        out
    }

    /// Settings of a cluster (tests, diagnostics).
    pub fn settings(&self, name: &str) -> Option<ClusterSettings> {
        self.lock().get(name).map(|c| c.rec.settings.clone())
    }
}
