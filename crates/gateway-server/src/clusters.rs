//! The rules every backend shares, above the [`ClusterBackend`] seam: option validation and
//! settings, creation with its admission lock, stops, heartbeats and the events the gateway
//! notes. By job, in rooms of their own: reading clusters as a user may (`access`), the refusals
//! (`error`), per-user quotas (`quota`), scale and adapt and their forwarding to the scheduler
//! (`forward`), the lifetime sweeper (`lifetime`), the idle backstop (`idleness`), warm pools
//! (`pool`) and the service's metrics (`metrics`).

use crate::auth::{token_matches, User};
use crate::clock::Clock;
use crate::config::settings;
use crate::config::ClusterConfig;
use gateway_backend::metrics::Counter;
use gateway_backend::{ClusterBackend, ClusterView, NewCluster, StopRequest, WorkerGrant};
use gateway_model::{
    as_count, format_memory, py_repr, validate_options, ClusterEvent, ClusterStatus, EventType,
    Heartbeat, ScaleResponse, SchedulerMessage,
};
use gateway_proxy::{ClientConnections, Clients};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

mod access;
mod error;
mod forward;
mod idleness;
mod lifetime;
mod metrics;
mod pool;
mod quota;
pub use error::{ClusterError, Requester};
pub use pool::{configured_pools, pool_key, WarmPool, POOL_CHECK};
use quota::has_user_quota;

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
pub(crate) const WAIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Pauses between the three attempts to reach a scheduler's `/api/comm`.
const FORWARD_PAUSES_MS: [u64; 3] = [0, 100, 200];

/// The largest `cluster_options` a create accepts, serialized (64 KiB: far more than any set
/// of options needs; each cluster's are stored and listed).
const MAX_OPTIONS_BYTES: usize = 64 * 1024;

/// Event counters of the API side (Prometheus counters, see
/// [`ClusterService::register_metrics`]).
#[derive(Default)]
struct Counters {
    create_requests: Counter,
    create_refused: Counter,
    forward_failures: Counter,
    pool_claims: Counter,
    pool_misses: Counter,
    pool_starts: Counter,
    idle_stops: Counter,
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
    /// What this process has seen of each running cluster's idleness ([`idleness`]).
    idle_watches: Mutex<HashMap<String, idleness::IdleWatch>>,
    /// Clusters whose scheduler is being asked, for its own request to stop, whether it has
    /// work: one question per cluster at a time ([`idleness`]).
    stop_checks: Mutex<std::collections::HashSet<String>>,
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
    /// Where every time this service compares comes from.
    clock: Clock,
}

/// Who asks for workers: a user's request (scale, adapt) or the scheduler's heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Asker {
    Request,
    Heartbeat,
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
            idle_watches: Mutex::new(HashMap::new()),
            stop_checks: Mutex::new(Default::default()),
            http,
            admission: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            pools: Vec::new(),
            pool_backend_config: String::new(),
            pool_wake: tokio::sync::Notify::new(),
            clock: Clock::system(),
        }
    }

    /// Reads the time from `clock` instead of the system's (tests: [`Clock::tokio`]).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The clock this service reads the time from.
    pub fn clock(&self) -> Clock {
        self.clock
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
        self.counters.create_requests.inc();
        let (policy, config) = self.policy_for(user);
        let fields = &config.options;
        if let Some(given) = options {
            // Options are kept with the cluster (and for its retention after): no room for bulk.
            let size = serde_json::to_vec(given).map_or(usize::MAX, |b| b.len());
            if size > MAX_OPTIONS_BYTES {
                return Err(ClusterError::Invalid(format!(
                    "cluster_options take {size} bytes; at most {MAX_OPTIONS_BYTES} are accepted"
                )));
            }
        }
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
                self.counters.create_refused.inc();
                return Err(ClusterError::QuotaExceeded(format!(
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
                self.counters.create_refused.inc();
                return Err(ClusterError::QuotaExceeded(format!(
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

    /// Records an event the gateway itself saw (best effort; a failure is logged).
    async fn note(&self, name: &str, kind: EventType, reason: &str, message: String) {
        let event = ClusterEvent::new(self.clock.now_ms(), kind, reason, message, "gateway");
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

    /// Stops a cluster (idempotent: unknown or finished clusters are fine).
    pub async fn stop(&self, name: &str, who: Requester<'_>) -> Result<(), ClusterError> {
        let Some(view) = self.backend.get(name) else {
            return Ok(());
        };
        let reason = match who {
            Requester::User(user) => {
                if view.pool.is_some() {
                    // An unclaimed warm scheduler is no one's: to users it does not exist, and
                    // stopping what does not exist is done (the pool's size is configuration).
                    return Ok(());
                }
                if !user.may_access(&view.owner) {
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
                let held_ms = self.clock.now_ms() - view.start_time;
                if view.pool.is_some() || (held_ms as f64) < view.settings.idle_timeout * 1000.0 {
                    return Ok(());
                }
                // The preload does not count queued tasks as work; Dask itself does.
                if self.scheduler_says_busy(&view).await {
                    debug!(cluster = %name, "idle stop request declined: the scheduler has work");
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

    /// Whether the backend answers (health checks).
    pub async fn healthy(&self) -> bool {
        self.backend.healthy().await
    }
}
