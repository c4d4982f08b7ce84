//! The rules every backend shares, above the [`ClusterBackend`] seam: option validation and
//! settings, the per-user cluster quota, ownership and admin checks, cluster-token checks,
//! clipping of scale and adapt requests, forwarding them to the scheduler, the `?wait`
//! long-poll, and the cluster JSON.

use crate::auth::{token_matches, User};
use crate::config::ClusterConfig;
use crate::settings;
use gateway_backend::{
    BackendError, ClusterBackend, ClusterView, NewCluster, StopRequest, WorkerGrant,
};
use gateway_model::{
    as_count, format_memory, py_repr, validate_options, ClusterEvent, ClusterModel, ClusterStatus,
    EventType, Heartbeat, ScaleResponse, SchedulerMessage,
};
use gateway_proxy::{ClientConnections, Clients};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

mod pool;
pub use pool::{configured_pools, pool_key, WarmPool, POOL_CHECK};

/// Whether `c` sets any per-user resource quota.
fn has_user_quota(c: &ClusterConfig) -> bool {
    c.max_workers_per_user.is_some()
        || c.max_cores_per_user.is_some()
        || c.max_memory_per_user.is_some()
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Seconds as people say them: `90 s`, `15 min`, `2 h`.
fn human_seconds(s: f64) -> String {
    if s >= 3600.0 && (s % 3600.0).abs() < 1e-9 {
        format!("{} h", s / 3600.0)
    } else if s >= 60.0 && (s % 60.0).abs() < 1e-9 {
        format!("{} min", s / 60.0)
    } else {
        format!("{s} s")
    }
}

/// How long `?wait` holds a request.
const WAIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Pauses between the three attempts to reach a scheduler's `/api/comm`.
const FORWARD_PAUSES_MS: [u64; 3] = [0, 100, 200];

/// Failures the API maps to status codes.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
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
    /// 403: a user asked for another user's usage.
    #[error("User {user} lacks permissions to view the usage of user {other}")]
    ForbiddenUsage {
        /// Who asked.
        user: String,
        /// Whose usage they asked for.
        other: String,
    },
    /// 422: bad input.
    #[error("{0}")]
    Invalid(String),
    /// 409: the cluster cannot take the request in its state.
    #[error("cluster {0} is not running")]
    NotRunning(String),
    /// 409: the backend refused the request in the cluster's state.
    #[error("{0}")]
    Conflict(String),
    /// 401 on token-only routes.
    #[error("Unauthorized")]
    BadToken,
    /// 503: the backend's store or platform does not answer.
    #[error("{0}")]
    Unavailable(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl From<BackendError> for ClusterError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::NotFound(n) => ClusterError::NotFound(n),
            BackendError::Invalid(m) => ClusterError::Invalid(m),
            BackendError::Conflict(m) => ClusterError::Conflict(m),
            BackendError::Unavailable(m) => ClusterError::Unavailable(m),
            BackendError::Internal(m) => ClusterError::Internal(m),
        }
    }
}

/// Who asks to stop a cluster.
pub enum Requester<'a> {
    /// An authenticated user.
    User(&'a User),
    /// The cluster itself, by its token (the preload's idle timeout).
    Token(&'a str),
}

/// Event counters of the API side (Prometheus counters).
#[derive(Default)]
struct Counters {
    create_requests: AtomicU64,
    create_refused: AtomicU64,
    forward_failures: AtomicU64,
    pool_claims: AtomicU64,
    pool_misses: AtomicU64,
    pool_starts: AtomicU64,
}

/// The shared rules over one backend (see the module docs).
pub struct ClusterService {
    backend: Arc<dyn ClusterBackend>,
    /// The `cluster` section: users in no policy's group.
    config: Arc<ClusterConfig>,
    /// Group policies in priority order (group name, merged cluster settings).
    policies: Vec<(String, Arc<ClusterConfig>)>,
    /// Client connections through the proxy, per cluster (the no-client timeout).
    activity: Arc<ClientConnections>,
    /// When the lifetime sweep first saw each running cluster without clients.
    unattended_since: Mutex<HashMap<String, Instant>>,
    /// When this process last recorded a connected client with the backend, per cluster.
    client_recorded: Mutex<HashMap<String, Instant>>,
    /// Client for the schedulers' `/api/comm` (plain HTTP inside the cluster network).
    http: reqwest::Client,
    /// One lock per user, held while counting that user's clusters and creating one, so
    /// concurrent creates cannot overshoot `max_clusters_per_user`. Entries nobody holds are
    /// pruned as new users arrive.
    admission: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    counters: Counters,
    /// Warm-scheduler pools ([`pool`]).
    pools: Vec<WarmPool>,
    /// The backend's configuration as part of every pool key ([`pool_key`]).
    pool_backend_config: String,
    /// Woken by each claim, so the pool maintainer refills at once.
    pool_wake: tokio::sync::Notify,
}

/// Who asks for workers: a user's request (scale, adapt) or the scheduler's heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Asker {
    Request,
    Heartbeat,
}

/// The workers a cluster holds against its owner's quotas: the larger of what its backend
/// runs for it and what it was granted.
fn held_workers(view: &ClusterView) -> u64 {
    view.target_workers.max(view.grant.map_or(0, |g| g.workers))
}

/// What one user's active clusters hold.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    workers: u64,
    cores: f64,
    memory: u64,
}

impl ClusterService {
    /// The rules of `config` over `backend`.
    pub fn new(backend: Arc<dyn ClusterBackend>, config: Arc<ClusterConfig>) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client without TLS roots always builds");
        ClusterService {
            backend,
            config,
            policies: Vec::new(),
            activity: Arc::new(ClientConnections::default()),
            unattended_since: Mutex::new(HashMap::new()),
            client_recorded: Mutex::new(HashMap::new()),
            http,
            admission: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            pools: Vec::new(),
            pool_backend_config: String::new(),
            pool_wake: tokio::sync::Notify::new(),
        }
    }

    /// Adds warm-scheduler pools ([`configured_pools`], built with the same `backend_config`).
    pub fn with_pools(mut self, pools: Vec<WarmPool>, backend_config: String) -> Self {
        self.pools = pools;
        self.pool_backend_config = backend_config;
        self
    }

    /// Adds group policies (priority order): their members get those settings instead.
    pub fn with_policies(mut self, policies: Vec<(String, ClusterConfig)>) -> Self {
        self.policies = policies
            .into_iter()
            .map(|(group, config)| (group, Arc::new(config)))
            .collect();
        self
    }

    /// Shares the proxy's client-connection counts (see [`ClientConnections`]).
    pub fn with_activity(mut self, activity: Arc<ClientConnections>) -> Self {
        self.activity = activity;
        self
    }

    /// The backend below the seam.
    pub fn backend(&self) -> &Arc<dyn ClusterBackend> {
        &self.backend
    }

    /// The policy that applies to `user`: the first whose group they are in, else the
    /// `cluster` section (`None`).
    pub fn policy_for(&self, user: &User) -> (Option<&str>, &ClusterConfig) {
        self.policies
            .iter()
            .find(|(group, _)| user.groups.contains(group))
            .map_or((None, &*self.config), |(g, c)| (Some(g.as_str()), &**c))
    }

    /// The settings of the policy a cluster was created under (the `cluster` section when
    /// that policy no longer exists).
    fn policy_named(&self, name: Option<&str>) -> &ClusterConfig {
        name.and_then(|n| self.policies.iter().find(|(g, _)| g == n))
            .map_or(&*self.config, |(_, c)| &**c)
    }

    /// The cluster options `user` may set, as sent by `GET /api/v1/options`.
    pub fn options_wire(&self, user: &User) -> gateway_model::OptionsResponse {
        let (_, config) = self.policy_for(user);
        gateway_model::OptionsResponse {
            cluster_options: config.options.iter().map(|f| f.to_spec()).collect(),
        }
    }

    fn admission_lock(&self, user: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.admission.lock().unwrap_or_else(|e| e.into_inner());
        if locks.len() > 1024 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(user.to_string()).or_default().clone()
    }

    /// Creates a cluster for `user` from the request's `cluster_options`; returns its name.
    pub async fn create(
        &self,
        user: &User,
        options: Option<&Value>,
    ) -> Result<String, ClusterError> {
        self.counters
            .create_requests
            .fetch_add(1, Ordering::Relaxed);
        let (policy, config) = self.policy_for(user);
        let fields = &config.options;
        let options = validate_options(fields, options).map_err(|e| ClusterError::Invalid(e.0))?;
        let mut settings =
            settings::resolve(config, fields, &options).map_err(ClusterError::Invalid)?;
        settings.policy = policy.map(str::to_string);
        let lock = self.admission_lock(&user.name);
        let _admitted = lock.lock().await;
        // Other gateway replicas decide for this user too: hold their lock as well.
        let _shared = if has_user_quota(config) || config.max_clusters_per_user.is_some() {
            self.backend.lock_user_quota(&user.name).await?
        } else {
            None
        };
        if has_user_quota(config) {
            let used = self.user_usage(&user.name, None);
            let r = &settings.resources;
            let over = match (config.max_cores_per_user, config.max_memory_per_user) {
                (Some(max), _) if used.cores + r.scheduler_cores > max + 1e-9 => {
                    Some(format!("{max} cores per user ({} in use)", used.cores))
                }
                (_, Some(max)) if used.memory + r.scheduler_memory > max => Some(format!(
                    "{} of memory per user ({} in use)",
                    format_memory(max),
                    format_memory(used.memory)
                )),
                _ => None,
            };
            if let Some(quota) = over {
                self.counters.create_refused.fetch_add(1, Ordering::Relaxed);
                return Err(ClusterError::Invalid(format!(
                    "A new cluster for {} would exceed the quota of {quota}",
                    user.name
                )));
            }
        }
        if let Some(max) = config.max_clusters_per_user {
            let active = self
                .backend
                .list(Some(&user.name))
                .iter()
                .filter(|c| c.status.is_active())
                .count() as u64;
            if active >= max {
                self.counters.create_refused.fetch_add(1, Ordering::Relaxed);
                return Err(ClusterError::Invalid(format!(
                    "User {} already has {active} active clusters; the maximum per user is {max}",
                    user.name
                )));
            }
        }
        let request = NewCluster::owned(user.name.clone(), options, settings);
        if let Some(pool) = self.pool_for(&request.settings) {
            if let Some(view) = self.claim_from(pool, &request).await {
                return Ok(view.name);
            }
        }
        let view = self.backend.create(request).await?;
        Ok(view.name)
    }

    /// What `owner`'s active clusters (but `except`) hold: each at the larger of its
    /// backend target and its grant.
    fn user_usage(&self, owner: &str, except: Option<&str>) -> Usage {
        let mut used = Usage::default();
        for v in self.backend.list(Some(owner)) {
            if !v.status.is_active() || Some(v.name.as_str()) == except {
                continue;
            }
            let w = held_workers(&v);
            let r = &v.settings.resources;
            used.workers += w;
            used.cores += r.scheduler_cores + w as f64 * r.worker_cores;
            used.memory += r.scheduler_memory + w * r.worker_memory;
        }
        used
    }

    /// Workers `view` may have within its owner's quotas, and the quota that binds.
    fn user_room(&self, view: &ClusterView) -> Option<(u64, String)> {
        let c = self.policy_named(view.settings.policy.as_deref());
        if !has_user_quota(c) {
            return None;
        }
        let used = self.user_usage(&view.owner, Some(&view.name));
        let r = &view.settings.resources;
        let mut room: Option<(u64, String)> = None;
        let mut consider = |n: u64, quota: String| {
            if room.as_ref().is_none_or(|(m, _)| n < *m) {
                room = Some((n, quota));
            }
        };
        if let Some(max) = c.max_workers_per_user {
            consider(
                max.saturating_sub(used.workers),
                format!("{max} workers per user"),
            );
        }
        if let Some(max) = c.max_cores_per_user {
            let left = max - used.cores - r.scheduler_cores;
            let n = if r.worker_cores > 0.0 {
                ((left + 1e-9) / r.worker_cores).floor().max(0.0) as u64
            } else {
                u64::MAX
            };
            consider(n, format!("{max} cores per user"));
        }
        if let Some(max) = c.max_memory_per_user {
            let left = max.saturating_sub(used.memory + r.scheduler_memory);
            let n = left.checked_div(r.worker_memory).unwrap_or(u64::MAX);
            consider(n, format!("{} of memory per user", format_memory(max)));
        }
        room
    }

    /// How long a grant made by a request outlasts heartbeats asking for fewer workers: two
    /// heartbeat periods and a second, so every heartbeat the scheduler sent before it got the
    /// request has arrived.
    fn grant_hold_ms(&self) -> i64 {
        (2000.0 * self.config.heartbeat_period) as i64 + 1000
    }

    /// Clips a worker count to the owner's quotas (under the owner's admission lock) and
    /// records the grant; the message names the quota that clipped it. A heartbeat asking for
    /// fewer workers than a recent request granted lowers the target but not the grant (its
    /// scheduler may not have seen the request yet, see [`WorkerGrant::held_until_ms`]).
    async fn grant_workers(
        &self,
        view: &ClusterView,
        wanted: u64,
        asker: Asker,
    ) -> (u64, Option<String>) {
        if !has_user_quota(self.policy_named(view.settings.policy.as_deref())) {
            return (wanted, None);
        }
        let lock = self.admission_lock(&view.owner);
        let _held = lock.lock().await;
        let latest = self.backend.get(&view.name);
        let held_before = held_workers(latest.as_ref().unwrap_or(view));
        // Growing needs the other replicas' lock too (and their latest grants); shrinking
        // never passes a quota.
        let _shared = if wanted > held_before {
            match self.backend.lock_user_quota(&view.owner).await {
                Ok(lock) => lock,
                Err(e) => {
                    warn!(cluster = %view.name, "quota lock: {e}");
                    let n = wanted.min(held_before);
                    return (
                        n,
                        Some(format!(
                            "Could not check the quotas of {} ({e}). Scaling to {n} instead.",
                            view.owner
                        )),
                    );
                }
            }
        } else {
            None
        };
        let fresh = self.backend.get(&view.name);
        let view = fresh.as_ref().unwrap_or(view);
        let (n, msg) = match self.user_room(view) {
            Some((room, quota)) if wanted > room => (
                room,
                Some(format!(
                    "Scale request of {wanted} workers would exceed the quota of {quota}. Scaling to {room} instead."
                )),
            ),
            _ => (wanted, None),
        };
        let now = now_ms();
        let current = view.grant.unwrap_or_default();
        let grant = match asker {
            Asker::Request => WorkerGrant {
                workers: n,
                held_until_ms: now + self.grant_hold_ms(),
            },
            Asker::Heartbeat if n < current.workers && now < current.held_until_ms => current,
            Asker::Heartbeat => WorkerGrant {
                workers: n,
                held_until_ms: current.held_until_ms,
            },
        };
        if view.grant != Some(grant) {
            if let Err(e) = self.backend.record_grant(&view.name, grant).await {
                warn!(cluster = %view.name, "recording a grant: {e}");
                if n > held_before {
                    return (
                        held_before,
                        Some(format!(
                            "Could not record the workers of {} ({e}). Scaling to {held_before} instead.",
                            view.name
                        )),
                    );
                }
            }
        }
        (n, msg)
    }

    /// The cluster `name`: from the backend's memory, else among the finished clusters it
    /// keeps elsewhere.
    async fn lookup(&self, name: &str) -> Result<Option<ClusterView>, ClusterError> {
        if let Some(view) = self.backend.get(name) {
            return Ok(Some(view));
        }
        Ok(self.backend.finished_cluster(name).await?)
    }

    /// The cluster `name` if `user` may act on it.
    async fn accessible(
        &self,
        user: &User,
        name: &str,
        action: &'static str,
    ) -> Result<ClusterView, ClusterError> {
        let view = self
            .lookup(name)
            .await?
            .filter(|v| v.pool.is_none())
            .ok_or_else(|| ClusterError::NotFound(name.to_string()))?;
        if !user.may_access(&view.owner) {
            return Err(ClusterError::Forbidden {
                user: user.name.clone(),
                action,
                name: name.to_string(),
            });
        }
        Ok(view)
    }

    /// What happened to cluster `name`, oldest first (owner or admin).
    pub async fn events(&self, user: &User, name: &str) -> Result<Vec<ClusterEvent>, ClusterError> {
        let view = self.accessible(user, name, "view").await?;
        Ok(self.backend.events(&view.name).await?)
    }

    /// Whether cluster `name` has finished (STOPPED or FAILED) or is gone: no more events come.
    /// A failed lookup counts as not finished (it is asked again).
    pub async fn has_finished(&self, name: &str) -> bool {
        match self.lookup(name).await {
            Ok(Some(v)) => v.status.is_terminal(),
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Records an event the gateway itself saw (best effort; a failure is logged).
    async fn note(&self, name: &str, kind: EventType, reason: &str, message: String) {
        let event = ClusterEvent::new(now_ms(), kind, reason, message, "gateway");
        if let Err(e) = self.backend.record_event(name, event).await {
            warn!(cluster = %name, "recording an event: {e}");
        }
    }

    /// Records that a limit or quota cut a scale or adapt request, in the words the client got.
    async fn note_clipped(&self, name: &str, why: Option<&str>) {
        if let Some(why) = why {
            self.note(name, EventType::Warning, "RequestClipped", why.to_string())
                .await;
        }
    }

    /// The cluster's model; with `wait`, first holds until it has left PENDING (at most 20 s).
    pub async fn get(
        &self,
        user: &User,
        name: &str,
        wait: bool,
    ) -> Result<ClusterModel, ClusterError> {
        let view = self.accessible(user, name, "view").await?;
        if !wait || view.status != ClusterStatus::Pending {
            return Ok(view.model());
        }
        if let Some(mut rx) = self.backend.subscribe(name) {
            let _ =
                tokio::time::timeout(WAIT_TIMEOUT, rx.wait_for(|s| *s != ClusterStatus::Pending))
                    .await;
        }
        Ok(self.accessible(user, name, "view").await?.model())
    }

    /// The user's clusters (every cluster for admins) with one of `statuses` (default: the
    /// active ones), oldest first.
    pub async fn list(
        &self,
        user: &User,
        statuses: Option<&[ClusterStatus]>,
    ) -> Result<Vec<ClusterModel>, ClusterError> {
        Ok(self
            .visible(user, statuses)
            .await?
            .iter()
            .map(ClusterView::model)
            .collect())
    }

    /// The clusters `user` may list (all for admins) with one of `statuses` (default: the
    /// active ones), oldest first.
    async fn visible(
        &self,
        user: &User,
        statuses: Option<&[ClusterStatus]>,
    ) -> Result<Vec<ClusterView>, ClusterError> {
        let owner = (!user.admin).then_some(user.name.as_str());
        let mut views = self.backend.list(owner);
        if statuses.is_some_and(|wanted| wanted.iter().any(|s| s.is_terminal())) {
            let known: std::collections::HashSet<String> =
                views.iter().map(|v| v.name.clone()).collect();
            let finished = self.backend.finished(owner).await?;
            views.extend(finished.into_iter().filter(|v| !known.contains(&v.name)));
            views.sort_by(|a, b| (a.start_time, &a.name).cmp(&(b.start_time, &b.name)));
        }
        views.retain(|c| c.pool.is_none());
        views.retain(|c| match statuses {
            Some(list) => list.contains(&c.status),
            None => c.status.is_active(),
        });
        Ok(views)
    }

    /// Stops a cluster (idempotent: unknown or finished clusters are fine).
    pub async fn stop(&self, name: &str, who: Requester<'_>) -> Result<(), ClusterError> {
        let Some(view) = self.backend.get(name) else {
            return Ok(());
        };
        let reason = match who {
            Requester::User(user) => {
                if view.pool.is_some() || !user.may_access(&view.owner) {
                    return Err(ClusterError::Forbidden {
                        user: user.name.clone(),
                        action: "stop",
                        name: name.into(),
                    });
                }
                format!("stopped by {}", user.name)
            }
            Requester::Token(token) => {
                if !view
                    .token
                    .as_deref()
                    .is_some_and(|t| token_matches(token, t))
                {
                    return Err(ClusterError::BadToken);
                }
                // A warm scheduler idles until claimed, and its idle clock started before
                // its user got it: its request counts only once the user has held it for the
                // idle timeout (the preload asks again every quarter of the timeout).
                let held_ms = now_ms() - view.start_time;
                if view.pool.is_some() || (held_ms as f64) < view.settings.idle_timeout * 1000.0 {
                    return Ok(());
                }
                "stopped by its scheduler (idle timeout)".to_string()
            }
        };
        if view.status.is_active() {
            self.backend
                .stop(name, StopRequest::stopped(reason))
                .await?;
        }
        Ok(())
    }

    /// Waits (at most `timeout`) until a stopping cluster has finished, so that a DELETE usually
    /// answers with the cluster already STOPPED.
    pub async fn wait_finished(&self, name: &str, timeout: Duration) {
        if let Some(mut rx) = self.backend.subscribe(name) {
            let _ = tokio::time::timeout(timeout, rx.wait_for(|s| s.is_terminal())).await;
        }
    }

    /// Whether `user` may access cluster `name` (false for unknown clusters).
    pub fn may_access(&self, user: &User, name: &str) -> bool {
        self.backend
            .get(name)
            .is_some_and(|c| c.pool.is_none() && user.may_access(&c.owner))
    }

    /// Whether `token` is the token of cluster `name`.
    pub fn token_is_valid(&self, name: &str, token: &str) -> bool {
        self.backend
            .get(name)
            .and_then(|c| c.token)
            .is_some_and(|t| token_matches(token, &t))
    }

    /// Handles a scheduler heartbeat (wire-protocol 9.4): checks the token, clips the wanted
    /// worker count to the cluster's cap, hands the rest to the backend.
    pub async fn heartbeat(
        &self,
        name: &str,
        token: &str,
        heartbeat: &Heartbeat,
    ) -> Result<(), ClusterError> {
        let view = self.backend.get(name).ok_or(ClusterError::BadToken)?;
        if !view
            .token
            .as_deref()
            .is_some_and(|t| token_matches(token, t))
        {
            return Err(ClusterError::BadToken);
        }
        // Nobody scales a warm scheduler: it holds no workers until claimed.
        let wanted = if view.pool.is_some() {
            0
        } else {
            heartbeat.count.max(0) as u64
        };
        let (target, _) = view
            .settings
            .limits
            .clip_scale(&view.settings.resources, wanted);
        let (target, _) = self.grant_workers(&view, target, Asker::Heartbeat).await;
        self.backend.heartbeat(name, heartbeat, target).await?;
        Ok(())
    }

    /// The cluster if `user` may `action` it and it is RUNNING with a scheduler API.
    async fn running(
        &self,
        user: &User,
        name: &str,
        action: &'static str,
    ) -> Result<ClusterView, ClusterError> {
        let view = self.accessible(user, name, action).await?;
        if view.status != ClusterStatus::Running || view.addresses.is_none() {
            return Err(ClusterError::NotRunning(name.into()));
        }
        Ok(view)
    }

    /// Validates, clips and forwards a scale request; returns the clipping report.
    pub async fn scale(
        &self,
        user: &User,
        name: &str,
        count: &Value,
    ) -> Result<ScaleResponse, ClusterError> {
        self.accessible(user, name, "scale").await?;
        let n = as_count(count).ok_or_else(|| {
            ClusterError::Invalid(format!(
                "Scale expects a non-negative integer, got {}",
                py_repr(count)
            ))
        })?;
        let view = self.running(user, name, "scale").await?;
        let requested = n;
        let (n, clipped) = view.settings.limits.clip_scale(&view.settings.resources, n);
        let (n, quota_clip) = self.grant_workers(&view, n, Asker::Request).await;
        let clipped = quota_clip.or(clipped);
        self.forward(&view, &SchedulerMessage::Scale { count: n })
            .await?;
        self.note(
            &view.name,
            EventType::Normal,
            "ScaleRequested",
            match (requested, n) {
                (1, 1) => format!("{} asked for 1 worker", user.name),
                (r, n) if r == n => format!("{} asked for {n} workers", user.name),
                (r, n) => format!("{} asked for {r} workers; {n} granted", user.name),
            },
        )
        .await;
        self.note_clipped(&view.name, clipped.as_deref()).await;
        Ok(ScaleResponse {
            ok: clipped.is_none(),
            msg: clipped,
        })
    }

    /// Validates, clips and forwards an adapt request; returns the clipping report.
    pub async fn adapt(
        &self,
        user: &User,
        name: &str,
        minimum: &Value,
        maximum: &Value,
        active: bool,
    ) -> Result<ScaleResponse, ClusterError> {
        let bound = |v: &Value, what: &str| -> Result<Option<u64>, ClusterError> {
            if v.is_null() {
                return Ok(None);
            }
            as_count(v).map(Some).ok_or_else(|| {
                ClusterError::Invalid(format!(
                    "Adapt expects a non-negative integer {what}, got {}",
                    py_repr(v)
                ))
            })
        };
        self.accessible(user, name, "adapt").await?;
        let (min, max) = (bound(minimum, "minimum")?, bound(maximum, "maximum")?);
        if let (Some(lo), Some(hi)) = (min, max) {
            if lo > hi {
                return Err(ClusterError::Invalid(format!(
                    "Adapt expects minimum <= maximum, got minimum={lo}, maximum={hi}"
                )));
            }
        }
        let view = self.running(user, name, "adapt").await?;
        let (min, max, clipped) =
            view.settings
                .limits
                .clip_adapt(&view.settings.resources, min, max);
        // Within the owner's quotas: the maximum is clipped to the room left (heartbeats keep
        // the running total there), and the minimum is granted now. An unbounded maximum
        // becomes the room without a warning, as under a per-cluster cap.
        let room = self.user_room(&view);
        let max = match (&room, max) {
            (Some((r, _)), None) => Some(*r),
            (_, m) => m,
        };
        let (min, max, clipped) = match room {
            Some((room, quota))
                if max.is_some_and(|m| m > room) || min.is_some_and(|m| m > room) =>
            {
                let (new_min, new_max) = (
                    min.map(|m| m.min(room)),
                    Some(max.map_or(room, |m| m.min(room))),
                );
                let msg = format!(
                    "Adapt with `maximum={}, minimum={}` workers would exceed the quota of {quota}. Using `maximum={}, minimum={}` instead.",
                    max.map_or("None".into(), |m| m.to_string()),
                    min.unwrap_or(0),
                    new_max.unwrap_or(room),
                    new_min.unwrap_or(0)
                );
                (new_min, new_max, Some(msg))
            }
            _ => (min, max, clipped),
        };
        self.grant_workers(&view, min.unwrap_or(0), Asker::Request)
            .await;
        let msg = SchedulerMessage::Adapt {
            minimum: min,
            maximum: max,
            active,
        };
        self.forward(&view, &msg).await?;
        let bound = |b: Option<u64>| b.map_or("none".to_string(), |b| b.to_string());
        self.note(
            &view.name,
            EventType::Normal,
            "AdaptRequested",
            format!(
                "{} turned adaptive scaling {} (minimum {}, maximum {})",
                user.name,
                if active { "on" } else { "off" },
                bound(min),
                bound(max)
            ),
        )
        .await;
        self.note_clipped(&view.name, clipped.as_deref()).await;
        Ok(ScaleResponse {
            ok: clipped.is_none(),
            msg: clipped,
        })
    }

    /// Sends a message to the scheduler's `/api/comm` (three attempts); if none gets through,
    /// the cluster is stopped as FAILED and the caller gets 409.
    async fn forward(
        &self,
        view: &ClusterView,
        msg: &SchedulerMessage,
    ) -> Result<(), ClusterError> {
        let name = &view.name;
        let (Some(addresses), Some(token)) = (&view.addresses, &view.token) else {
            return Err(ClusterError::NotRunning(name.clone()));
        };
        let url = format!("{}/api/comm", addresses.api.trim_end_matches('/'));
        let mut last_error = String::new();
        for (attempt, pause) in FORWARD_PAUSES_MS.into_iter().enumerate() {
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
        self.counters
            .forward_failures
            .fetch_add(1, Ordering::Relaxed);
        let reason = format!("could not reach the scheduler: {last_error}");
        info!(cluster = %name, %reason, "failing cluster");
        if let Err(e) = self.backend.stop(name, StopRequest::failed(reason)).await {
            warn!(cluster = %name, "could not stop the unreachable cluster: {e}");
        }
        Err(ClusterError::NotRunning(name.clone()))
    }

    /// Stops clusters past their maximum lifetime, and running clusters that have had no
    /// client connected through the proxy for their no-client timeout (counted from when
    /// the last client left, or from when this process first saw the cluster without one,
    /// or from when another gateway replica last recorded a client of it with the backend).
    /// The reason goes to the cluster's status and the log. Called about once a second.
    pub async fn enforce_lifetimes(&self) {
        let now = Instant::now();
        let now_ms = now_ms();
        let mut due = Vec::new();
        let mut record = Vec::new();
        {
            let mut recorded = self
                .client_recorded
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut since = self
                .unattended_since
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut watched = std::collections::HashSet::new();
            for v in self.backend.list(None) {
                // Warm schedulers wait for a user; their clocks start when one claims them.
                if !v.status.is_active() || v.pool.is_some() {
                    continue;
                }
                let s = &v.settings;
                let age = (now_ms - v.start_time) as f64 / 1000.0;
                if s.max_lifetime > 0.0 && age >= s.max_lifetime {
                    due.push((
                        v.name.clone(),
                        format!(
                            "reached its maximum lifetime of {}",
                            human_seconds(s.max_lifetime)
                        ),
                    ));
                    continue;
                }
                if s.no_client_timeout <= 0.0 || v.status != ClusterStatus::Running {
                    continue;
                }
                watched.insert(v.name.clone());
                let local_from = match self.activity.get(&v.name) {
                    Some(Clients::Open(_)) => {
                        since.remove(&v.name);
                        // Tell other replicas, a few times per timeout.
                        let every =
                            Duration::from_secs_f64((s.no_client_timeout / 4.0).clamp(1.0, 60.0));
                        if recorded
                            .get(&v.name)
                            .is_none_or(|t| now.duration_since(*t) >= every)
                        {
                            recorded.insert(v.name.clone(), now);
                            record.push(v.name.clone());
                        }
                        continue;
                    }
                    Some(Clients::ClosedAt(t)) => *since.entry(v.name.clone()).or_insert(t),
                    None => *since.entry(v.name.clone()).or_insert(now),
                };
                // A client another replica saw more recently counts too.
                let remote_from = v.last_client_ms.and_then(|ms| {
                    now.checked_sub(Duration::from_millis((now_ms - ms).max(0) as u64))
                });
                let from = remote_from.map_or(local_from, |r| r.max(local_from));
                if now.duration_since(from).as_secs_f64() >= s.no_client_timeout {
                    due.push((
                        v.name.clone(),
                        format!(
                            "no client connected for {}",
                            human_seconds(s.no_client_timeout)
                        ),
                    ));
                }
            }
            since.retain(|name, _| watched.contains(name));
            recorded.retain(|name, _| watched.contains(name));
            self.activity.retain(|name| watched.contains(name));
        }
        for name in record {
            if let Err(e) = self.backend.record_client_activity(&name, now_ms).await {
                warn!(cluster = %name, "could not record client activity: {e}");
            }
        }
        for (name, reason) in due {
            info!(cluster = %name, %reason, "stopping cluster by policy");
            self.unattended_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
            if let Err(e) = self
                .backend
                .stop(&name, StopRequest::stopped(format!("stopped: {reason}")))
                .await
            {
                warn!(cluster = %name, "could not stop the cluster: {e}");
            }
        }
    }

    /// The cluster's details (owner, group policy, why it stopped) for its owner and admins.
    pub async fn details(
        &self,
        user: &User,
        name: &str,
    ) -> Result<gateway_model::ClusterDetails, ClusterError> {
        Ok(details_of(&self.accessible(user, name, "view").await?))
    }

    /// [`Self::list`] with details.
    pub async fn list_details(
        &self,
        user: &User,
        statuses: Option<&[ClusterStatus]>,
    ) -> Result<Vec<gateway_model::ClusterDetails>, ClusterError> {
        Ok(self
            .visible(user, statuses)
            .await?
            .iter()
            .map(details_of)
            .collect())
    }

    /// Whether the backend answers (health checks).
    pub async fn healthy(&self) -> bool {
        self.backend.healthy().await
    }

    /// Prometheus text exposition: clusters by status, routes, API counters, then the
    /// backend's own lines.
    pub fn metrics_text(&self) -> String {
        use gateway_backend::metrics;
        let mut by_status: HashMap<ClusterStatus, u64> = HashMap::new();
        let mut routed = 0;
        for c in self.backend.list(None) {
            *by_status.entry(c.status).or_default() += 1;
            routed += u64::from(c.addresses.is_some());
        }
        let mut out = String::new();
        let labels: Vec<(String, u64)> = ClusterStatus::ALL
            .iter()
            .map(|st| {
                let n = by_status.get(st).copied().unwrap_or(0);
                (
                    format!("status=\"{}\"", st.as_str().to_ascii_lowercase()),
                    n,
                )
            })
            .collect();
        metrics::gauge(
            &mut out,
            "clusters",
            "Clusters known to the gateway, by status.",
            labels.iter().map(|(l, n)| (l.as_str(), *n)),
        );
        metrics::gauge(
            &mut out,
            "routes",
            "Clusters reachable through the proxy.",
            [("", routed)],
        );
        let c = &self.counters;
        for (name, help, value) in [
            (
                "create_requests",
                "Cluster create requests since the gateway started.",
                &c.create_requests,
            ),
            (
                "create_refused_quota",
                "Cluster creates refused by the per-user quota.",
                &c.create_refused,
            ),
            (
                "scheduler_forward_failures",
                "Scale/adapt messages that never reached their scheduler.",
                &c.forward_failures,
            ),
            (
                "warm_scheduler_claims",
                "Creates served by a warm scheduler.",
                &c.pool_claims,
            ),
            (
                "warm_scheduler_misses",
                "Creates that fit a warm pool but found it empty.",
                &c.pool_misses,
            ),
            (
                "warm_scheduler_starts",
                "Warm schedulers started to fill the pools.",
                &c.pool_starts,
            ),
        ] {
            metrics::counter(&mut out, name, help, value.load(Ordering::Relaxed));
        }
        let pools = self.pool_gauges();
        if !pools.is_empty() {
            metrics::gauge(
                &mut out,
                "warm_schedulers",
                "Unclaimed warm schedulers, by pool and state.",
                pools.iter().map(|(l, n)| (l.as_str(), *n)),
            );
        }
        self.backend.metrics(&mut out);
        out
    }
}

/// What the details endpoints tell about one cluster.
fn details_of(v: &ClusterView) -> gateway_model::ClusterDetails {
    let m = v.model();
    let s = &v.settings;
    gateway_model::ClusterDetails {
        name: m.name,
        owner: v.owner.clone(),
        status: m.status,
        reason: v.reason.clone(),
        group: s.policy.clone(),
        start_time: m.start_time,
        stop_time: m.stop_time,
        dashboard_route: m.dashboard_route,
        options: m.options,
        workers: v.target_workers,
        expires_at: (s.max_lifetime > 0.0).then(|| v.start_time + (s.max_lifetime * 1000.0) as i64),
        no_client_timeout: (s.no_client_timeout > 0.0).then_some(s.no_client_timeout),
        workers_running: v.workers_running,
        cores: s.resources.scheduler_cores + v.target_workers as f64 * s.resources.worker_cores,
        memory: s
            .resources
            .scheduler_memory
            .saturating_add(v.target_workers.saturating_mul(s.resources.worker_memory)),
    }
}
