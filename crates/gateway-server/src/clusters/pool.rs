//! Warm schedulers: clusters started ahead with no owner, each handed whole to the next user
//! whose scheduler settings it fits.
//!
//! A section of the configuration (`cluster`, or a group policy) with `warm_schedulers: n`
//! gets a pool of `n` members started from the section's default options. A create whose
//! resolved settings have the pool's [`pool_key`] claims a member through the backend
//! ([`ClusterBackend::claim`], atomic across gateway replicas) instead of starting a
//! scheduler. The claimer's own settings replace the member's, so only what a running
//! scheduler was started with has to match: image, profile, Python environment, environment
//! variables, scheduler resources and the idle timeout.
//!
//! Members show in no listing, count against no user, are not stopped for lifetimes or
//! missing clients, and their scheduler's idle-timeout requests are ignored until a user has
//! held them for that timeout (see [`ClusterService::stop`]). [`ClusterService::maintain_pools`]
//! refills and trims the pools; [`ClusterService::stop_pools`] empties them.

use super::ClusterService;
use crate::config::settings;
use crate::config::ClusterConfig;
use gateway_backend::{ClusterSettings, ClusterView, NewCluster, StopRequest, POOL_OWNER};
use gateway_model::{validate_options, ClusterStatus};
use serde_json::{json, Map, Value};
use std::time::Duration;
use tracing::{info, warn};

/// How often pools are checked without a claim waking the maintainer.
pub const POOL_CHECK: Duration = Duration::from_secs(5);
/// Members of one pool that may fail within [`FAILURE_WINDOW_MS`] before refilling pauses
/// (a scheduler that cannot start would otherwise be restarted in a tight loop).
const FAILURE_BUDGET: usize = 3;
const FAILURE_WINDOW_MS: i64 = 60_000;

/// One pool: its key, its size and what its members are started with.
#[derive(Clone, Debug)]
pub struct WarmPool {
    /// The key members are labelled with and claims look for ([`pool_key`]).
    pub key: String,
    /// Members to keep.
    pub size: u32,
    /// Where it is configured (`cluster` or `groups[<group>]`), for logs.
    pub source: String,
    options: Map<String, Value>,
    settings: ClusterSettings,
}

/// The key of the pool whose schedulers fit a cluster with `settings`: a digest of what its
/// scheduler is started with, and of `backend_config` (the backend's own section, so a new
/// default image or pod template retires the members started under the old one).
pub fn pool_key(settings: &ClusterSettings, backend_config: &str) -> String {
    let s = settings;
    let fit = json!({
        "backend": backend_config,
        "image": s.image,
        "profile": s.profile,
        "python_env": s.python_env,
        "environment": s.environment,
        "scheduler_cores": s.resources.scheduler_cores,
        "scheduler_memory": s.resources.scheduler_memory,
        "scheduler_cores_limit": s.container_limits.scheduler_cores,
        "scheduler_memory_limit": s.container_limits.scheduler_memory,
        "idle_timeout": s.idle_timeout,
    });
    let digest = ring::digest::digest(&ring::digest::SHA256, fit.to_string().as_bytes());
    // A valid Kubernetes label value: 21 characters of [a-z0-9].
    format!("w{}", &hex::encode(digest.as_ref())[..20])
}

/// The pools the configuration asks for: one per section with `warm_schedulers` above 0,
/// started from the section's default options. Sections whose defaults fit the same
/// schedulers share one pool, of the largest size asked.
pub fn configured_pools(
    sections: &[(Option<&str>, &ClusterConfig)],
    backend_config: &str,
) -> Result<Vec<WarmPool>, String> {
    let mut pools: Vec<WarmPool> = Vec::new();
    for (policy, config) in sections {
        if config.warm_schedulers == 0 {
            continue;
        }
        let source = policy.map_or("cluster".to_string(), |g| format!("groups[{g}]"));
        let options = validate_options(&config.options, None)
            .map_err(|e| format!("{source}: warm schedulers: {}", e.0))?;
        let mut settings = settings::resolve(config, &config.options, &options)
            .map_err(|e| format!("{source}: warm schedulers: {e}"))?;
        settings.policy = policy.map(str::to_string);
        let key = pool_key(&settings, backend_config);
        match pools.iter_mut().find(|p| p.key == key) {
            Some(p) => p.size = p.size.max(config.warm_schedulers),
            None => pools.push(WarmPool {
                key,
                size: config.warm_schedulers,
                source,
                options,
                settings,
            }),
        }
    }
    Ok(pools)
}

impl ClusterService {
    /// The pool whose members fit a cluster with `settings`, if one is configured.
    pub(super) fn pool_for(&self, settings: &ClusterSettings) -> Option<&WarmPool> {
        if self.pools.is_empty() {
            return None;
        }
        let key = pool_key(settings, &self.pool_backend_config);
        self.pools.iter().find(|p| p.key == key)
    }

    /// Hands a member of `pool` to the request's owner; `None` when none is free (or the
    /// backend failed, which is logged: the caller then starts a cluster as usual).
    pub(super) async fn claim_from(
        &self,
        pool: &WarmPool,
        request: &NewCluster,
    ) -> Option<ClusterView> {
        let claimed = self.backend.claim(&pool.key, request.clone()).await;
        // Whatever happened, the pool is one short or empty: refill now.
        self.pool_wake.notify_one();
        match claimed {
            Ok(Some(view)) => {
                self.counters.pool_claims.inc();
                info!(cluster = %view.name, user = %request.owner, pool = %pool.key, "warm scheduler handed out");
                Some(view)
            }
            Ok(None) => {
                self.counters.pool_misses.inc();
                None
            }
            Err(e) => {
                self.counters.pool_misses.inc();
                warn!(pool = %pool.key, "could not hand out a warm scheduler: {e}");
                None
            }
        }
    }

    /// Waits until a claim asks for a refill, or [`POOL_CHECK`] has passed.
    pub async fn pool_check_due(&self) {
        let _ = tokio::time::timeout(POOL_CHECK, self.pool_wake.notified()).await;
    }

    /// Whether any pool is configured.
    pub fn has_pools(&self) -> bool {
        !self.pools.is_empty()
    }

    /// Brings every pool to its size: starts members that are missing (under the pool lock
    /// other replicas hold too, counting afresh), stops surplus members and members of pools
    /// no longer configured. A member stops only while still unclaimed.
    pub async fn maintain_pools(&self) {
        let members = self.pool_members();
        for (key, view) in &members {
            if view.status.is_active() && !self.pools.iter().any(|p| &p.key == key) {
                self.stop_member(view, key, "its warm pool is no longer configured")
                    .await;
            }
        }
        for pool in &self.pools {
            let count = |members: &[(String, ClusterView)]| {
                members
                    .iter()
                    .filter(|(k, v)| k == &pool.key && v.status.is_active())
                    .count()
            };
            let active = count(&members);
            if active > pool.size as usize {
                // Surplus: newest first, starting ones before running ones.
                let mut surplus: Vec<&ClusterView> = members
                    .iter()
                    .filter(|(k, v)| k == &pool.key && v.status.is_active())
                    .map(|(_, v)| v)
                    .collect();
                surplus.sort_by_key(|v| {
                    (
                        v.status == ClusterStatus::Running,
                        std::cmp::Reverse(v.start_time),
                    )
                });
                for v in surplus.into_iter().take(active - pool.size as usize) {
                    self.stop_member(v, &pool.key, "its warm pool shrank").await;
                }
                continue;
            }
            if active == pool.size as usize {
                continue;
            }
            let recent_failures = members
                .iter()
                .filter(|(k, v)| {
                    k == &pool.key
                        && v.status == ClusterStatus::Failed
                        && v.stop_time
                            .is_some_and(|t| self.clock.now_ms() - t < FAILURE_WINDOW_MS)
                })
                .count();
            if recent_failures >= FAILURE_BUDGET {
                warn!(pool = %pool.key, source = %pool.source, failures = recent_failures, "warm schedulers keep failing; refilling pauses for a minute (see the failed clusters' reasons)");
                continue;
            }
            // Other replicas refill too: count again under the shared lock.
            let _lock = match self.backend.lock_user_quota(POOL_OWNER).await {
                Ok(lock) => lock,
                Err(e) => {
                    warn!(pool = %pool.key, "could not lock the warm pools: {e}");
                    continue;
                }
            };
            let active = count(&self.pool_members());
            for _ in active..pool.size as usize {
                let request = NewCluster {
                    owner: String::new(),
                    options: pool.options.clone(),
                    settings: pool.settings.clone(),
                    pool: Some(pool.key.clone()),
                };
                match self.backend.create(request).await {
                    Ok(v) => {
                        self.counters.pool_starts.inc();
                        info!(cluster = %v.name, pool = %pool.key, source = %pool.source, "warm scheduler started");
                    }
                    Err(e) => {
                        warn!(pool = %pool.key, source = %pool.source, "could not start a warm scheduler: {e}");
                        break;
                    }
                }
            }
        }
    }

    /// Stops every unclaimed member (a gateway whose pools nobody else keeps shuts down).
    pub async fn stop_pools(&self) {
        for (key, view) in self.pool_members() {
            if view.status.is_active() {
                self.stop_member(&view, &key, "the gateway shut down").await;
            }
        }
    }

    /// Unclaimed members of any pool, with their pool's key.
    fn pool_members(&self) -> Vec<(String, ClusterView)> {
        self.backend
            .list(None)
            .into_iter()
            .filter_map(|v| v.pool.clone().map(|k| (k, v)))
            .collect()
    }

    async fn stop_member(&self, view: &ClusterView, key: &str, why: &str) {
        info!(cluster = %view.name, pool = %key, "stopping a warm scheduler: {why}");
        let request = StopRequest::stopped(format!("warm scheduler: {why}")).if_pool(key);
        if let Err(e) = self.backend.stop(&view.name, request).await {
            warn!(cluster = %view.name, "could not stop a warm scheduler: {e}");
        }
    }

    /// Members per pool and state, for the metrics: `pool` and `state` labels, and the count.
    pub(super) fn pool_gauges(&self) -> Vec<([(&'static str, String); 2], u64)> {
        let members = self.pool_members();
        let mut out = Vec::new();
        for pool in &self.pools {
            for (state, wanted) in [
                ("running", ClusterStatus::Running),
                ("pending", ClusterStatus::Pending),
            ] {
                let n = members
                    .iter()
                    .filter(|(k, v)| k == &pool.key && v.status == wanted)
                    .count() as u64;
                out.push(([("pool", pool.key.clone()), ("state", state.into())], n));
            }
        }
        out
    }
}
