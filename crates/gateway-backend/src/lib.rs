//! The seam between the gateway's API and the places clusters run.
//!
//! Above the seam the server does what is the same everywhere: authentication, options and their
//! validation, quotas, ownership, clipping of scale requests, forwarding to the scheduler's
//! `/api/comm`, the `?wait` long-poll and the cluster JSON. Below it a [`ClusterBackend`] owns the
//! lifecycle of its clusters and where their state is kept:
//!
//! * `gateway-local`: Dask processes on this machine, state in SQLite;
//! * `gateway-kube`: `DaskCluster` objects reconciled into pods by a controller, no local state;
//! * [`fake::FakeBackend`]: an in-memory backend for tests of the rules above the seam.
//!
//! Backends make the cluster's name and credentials, decide when a cluster is RUNNING (and only
//! then report scheduler addresses, which the proxy routes to), and react to scheduler heartbeats
//! by starting or removing workers. They never see users' credentials or HTTP.

#![warn(missing_docs)]

pub mod credentials;
pub mod fake;
pub mod metrics;
pub mod settings;
pub mod timing;

pub use credentials::{new_api_token, new_cluster_id, ClusterCredentials};
pub use settings::{ClusterSettings, ContainerLimits};
pub use timing::ClusterTiming;

use gateway_model::{ClusterEvent, ClusterModel, ClusterStatus, ClusterUsage, Heartbeat};
use serde_json::{Map, Value};
use std::time::Duration;
use tokio::sync::watch;

/// Workers a gateway process granted one cluster within its owner's quotas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerGrant {
    /// How many workers.
    pub workers: u64,
    /// Until when (ms since the Unix epoch) a scheduler heartbeat may not lower the grant: a
    /// heartbeat sent before the scheduler received the request that made it still carries
    /// the old count, and must not hand the workers to another cluster meanwhile.
    pub held_until_ms: i64,
}

/// The owner under which warm-pool members are kept (`spec.user` on Kubernetes) and whose
/// quota lock ([`ClusterBackend::lock_user_quota`]) serialises refilling the pools across
/// gateway replicas. Listings by owner never return pool members, whatever the name.
pub const POOL_OWNER: &str = "(warm pool)";

/// What the API asks a backend to create: owner, validated options and resolved settings.
#[derive(Clone, Debug, PartialEq)]
pub struct NewCluster {
    /// User name that owns the cluster (any string; never used raw in paths or labels). Empty
    /// for a warm-pool member, which has no owner until it is claimed.
    pub owner: String,
    /// The validated options, every exposed field filled in (reported back to the user).
    pub options: Map<String, Value>,
    /// The resolved settings.
    pub settings: ClusterSettings,
    /// Set for a warm-pool member: the key of the pool it belongs to (see
    /// [`ClusterBackend::claim`]).
    pub pool: Option<String>,
}

impl NewCluster {
    /// A cluster for `owner`.
    pub fn owned(
        owner: impl Into<String>,
        options: Map<String, Value>,
        settings: ClusterSettings,
    ) -> Self {
        NewCluster {
            owner: owner.into(),
            options,
            settings,
            pool: None,
        }
    }
}

/// Where a RUNNING cluster's scheduler listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerAddresses {
    /// Dask comm address, `tls://host:port`: the proxy's SNI route target.
    pub scheduler: String,
    /// Dashboard `http://host:port`, if the scheduler runs one.
    pub dashboard: Option<String>,
    /// The preload's HTTP API, `http://host:port` (scale/adapt go to `<api>/api/comm`).
    pub api: String,
}

/// The cluster's TLS pair (PEM), given to its clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPair {
    /// Self-signed certificate, also the cluster's only trust anchor.
    pub cert: String,
    /// PKCS#8 private key.
    pub key: String,
}

/// A snapshot of one cluster, as a backend knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterView {
    /// Public cluster name (URL path segment, SNI suffix).
    pub name: String,
    /// Owning user.
    pub owner: String,
    /// Public status.
    pub status: ClusterStatus,
    /// Why it stopped or failed (for operators and the log), once known.
    pub reason: Option<String>,
    /// The validated options.
    pub options: Map<String, Value>,
    /// The resolved settings.
    pub settings: ClusterSettings,
    /// The cluster's API token, once it exists (authenticates heartbeats and `/api/comm`).
    pub token: Option<String>,
    /// The TLS pair, once it exists.
    pub tls: Option<TlsPair>,
    /// Scheduler addresses; set exactly when the cluster is RUNNING and routable.
    pub addresses: Option<SchedulerAddresses>,
    /// Creation time, ms since the Unix epoch.
    pub start_time: i64,
    /// When it reached STOPPED or FAILED, ms since the Unix epoch.
    pub stop_time: Option<i64>,
    /// Workers the cluster currently wants (its last scale, or its scheduler's last heartbeat).
    pub target_workers: u64,
    /// The workers a gateway process last granted this cluster under its owner's quotas
    /// ([`ClusterBackend::record_grant`]); counted before the scheduler acts on them.
    pub grant: Option<WorkerGrant>,
    /// When some gateway process last recorded a client of this cluster connected through it,
    /// ms since the Unix epoch (backends shared by several gateway replicas; see
    /// [`ClusterBackend::record_client_activity`]).
    pub last_client_ms: Option<i64>,
    /// Set while the cluster is an unclaimed warm-pool member: its pool's key. Such a cluster
    /// has no owner, shows in no listing and counts against no user.
    pub pool: Option<String>,
    /// Workers that have joined the scheduler and run, as far as the backend knows (none:
    /// it does not know).
    pub workers_running: Option<u64>,
}

impl ClusterView {
    /// The cluster JSON of the REST API (wire-protocol section 5): credentials and the
    /// dashboard route only while RUNNING.
    pub fn model(&self) -> ClusterModel {
        let running = self.status == ClusterStatus::Running;
        let has_dashboard = self
            .addresses
            .as_ref()
            .is_some_and(|a| a.dashboard.as_deref().is_some_and(|d| !d.is_empty()));
        let tls = self.tls.as_ref().filter(|_| running);
        ClusterModel {
            name: self.name.clone(),
            status: self.status,
            dashboard_route: (running && has_dashboard)
                .then(|| format!("/clusters/{}/status", self.name)),
            start_time: self.start_time,
            stop_time: self.stop_time,
            options: self.options.clone(),
            tls_cert: tls.map(|t| t.cert.clone()),
            tls_key: tls.map(|t| t.key.clone()),
        }
    }
}

/// Why a cluster is being stopped, and which terminal status it should end in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopRequest {
    /// Human-readable reason, kept with the cluster and logged.
    pub reason: String,
    /// End as FAILED instead of STOPPED.
    pub failed: bool,
    /// Stop the cluster only if it is still an unclaimed member of this warm pool (checked
    /// atomically with the stop, so a member handed to a user meanwhile keeps running).
    pub if_pool: Option<String>,
}

impl StopRequest {
    /// A normal stop (ends STOPPED).
    pub fn stopped(reason: impl Into<String>) -> Self {
        StopRequest {
            reason: reason.into(),
            failed: false,
            if_pool: None,
        }
    }

    /// A stop caused by a failure (ends FAILED).
    pub fn failed(reason: impl Into<String>) -> Self {
        StopRequest {
            reason: reason.into(),
            failed: true,
            if_pool: None,
        }
    }

    /// Makes the stop conditional: only while the cluster is an unclaimed member of `pool`.
    pub fn if_pool(mut self, pool: impl Into<String>) -> Self {
        self.if_pool = Some(pool.into());
        self
    }
}

/// A held per-user quota lock ([`ClusterBackend::lock_user_quota`]); dropping it releases it.
pub type QuotaLock = Box<dyn std::any::Any + Send + Sync>;

/// Failures a backend reports across the seam. The messages are shown to users, so they say
/// what went wrong without internal paths or secrets; details go to the log.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No such cluster.
    #[error("Cluster {0} not found")]
    NotFound(String),
    /// The backend cannot run a cluster with these settings (e.g. an unknown profile).
    #[error("{0}")]
    Invalid(String),
    /// The request cannot be carried out in the cluster's current state.
    #[error("{0}")]
    Conflict(String),
    /// The backend's own store or platform is unreachable right now; retrying may work.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

/// One place where clusters run. Every method is cheap unless it says otherwise: reads come
/// from memory (a map, or a watch cache), writes go to the backend's durable store before they
/// are visible.
#[async_trait::async_trait]
pub trait ClusterBackend: Send + Sync + 'static {
    /// Short name for logs and metrics (`local`, `kubernetes`, `fake`).
    fn kind(&self) -> &'static str;

    /// Creates a cluster (PENDING) and returns it. The backend picks the name, makes the
    /// credentials and starts the scheduler (or asks its controller to). On error nothing of
    /// the cluster is left behind.
    async fn create(&self, request: NewCluster) -> Result<ClusterView, BackendError>;

    /// One cluster, if known (terminal clusters stay known for the retention period).
    fn get(&self, name: &str) -> Option<ClusterView>;

    /// Every known cluster of `owner` (every cluster for `None`), oldest first.
    fn list(&self, owner: Option<&str>) -> Vec<ClusterView>;

    /// The scheduler addresses of a RUNNING cluster: the proxy's route (scheduler TLS and
    /// dashboard). None for an unclaimed warm-pool member, which belongs to nobody yet. Called
    /// once per new proxied connection, so it must be a map lookup.
    fn route(&self, name: &str) -> Option<SchedulerAddresses>;

    /// Status updates of one cluster, for `?wait` and for DELETE waiting on the teardown.
    fn subscribe(&self, name: &str) -> Option<watch::Receiver<ClusterStatus>>;

    /// The route of a cluster as soon as it runs: at once while it runs, after waiting at most
    /// `within` while this backend has it PENDING, `None` at once for a cluster it does not
    /// know. With several gateway replicas one may hear that a cluster runs a moment after
    /// another has told its user, who connects at once.
    async fn route_soon(&self, name: &str, within: Duration) -> Option<SchedulerAddresses> {
        if let Some(route) = self.route(name) {
            return Some(route);
        }
        let mut status = self.subscribe(name)?;
        let _ =
            tokio::time::timeout(within, status.wait_for(|s| *s != ClusterStatus::Pending)).await;
        self.route(name)
    }

    /// Applies a scheduler heartbeat whose token the caller has checked. `target_workers` is
    /// the heartbeat's `count` after the cluster's worker cap. Heartbeats for clusters that are
    /// not active are accepted and ignored.
    async fn heartbeat(
        &self,
        name: &str,
        heartbeat: &Heartbeat,
        target_workers: u64,
    ) -> Result<(), BackendError>;

    /// Finished clusters (of `owner`, or all) that this backend no longer keeps in memory and
    /// so leaves out of [`Self::list`], read from where they are stored. A backend that keeps
    /// every cluster in memory has none.
    async fn finished(&self, owner: Option<&str>) -> Result<Vec<ClusterView>, BackendError> {
        let _ = owner;
        Ok(Vec::new())
    }

    /// One cluster that [`Self::get`] does not know, read from where the backend stores
    /// clusters: a finished one it no longer keeps in memory (see [`Self::finished`]), or, with
    /// several gateway replicas, one that another replica created a moment ago and that this
    /// one has not heard of yet, which it keeps in memory from then on. `None` if there is no
    /// such cluster. A backend that keeps every cluster in memory has none.
    async fn stored_cluster(&self, name: &str) -> Result<Option<ClusterView>, BackendError> {
        let _ = name;
        Ok(None)
    }

    /// What happened to cluster `name`, oldest first: what the backend saw (processes or pods
    /// starting, exiting, failing) and what the gateway recorded with [`Self::record_event`].
    /// Kept as long as the cluster record is, bounded per cluster. Empty for a backend that
    /// keeps none.
    async fn events(&self, name: &str) -> Result<Vec<ClusterEvent>, BackendError> {
        let _ = name;
        Ok(Vec::new())
    }

    /// Each cluster's use within `[since, until)` (ms since the Unix epoch; every owner's, or
    /// only `owner`'s): the cores and memory its running scheduler and workers requested,
    /// integrated over the time they ran. Includes finished clusters for as long as the
    /// backend keeps their usage. Empty for a backend that keeps none.
    async fn usage(
        &self,
        owner: Option<&str>,
        since: i64,
        until: i64,
    ) -> Result<Vec<ClusterUsage>, BackendError> {
        let _ = (owner, since, until);
        Ok(Vec::new())
    }

    /// Records an event the gateway saw for cluster `name` (a quota clipping a request, a stop
    /// for idleness or lifetime). Best effort: a backend that keeps no events drops it.
    async fn record_event(&self, name: &str, event: ClusterEvent) -> Result<(), BackendError> {
        let _ = (name, event);
        Ok(())
    }

    /// Hands an active member of the warm pool `pool` to `claim.owner`, atomically (two
    /// claims never get the same member, also across gateway processes sharing the backend):
    /// the cluster takes the claim's owner, options and settings (its scheduler keeps running;
    /// workers start with the new settings) and its start time becomes now. Prefers members
    /// that are RUNNING. `None`: no member is free.
    async fn claim(
        &self,
        pool: &str,
        claim: NewCluster,
    ) -> Result<Option<ClusterView>, BackendError>;

    /// Starts stopping an active cluster; idempotent (unknown or finished clusters are fine).
    async fn stop(&self, name: &str, request: StopRequest) -> Result<(), BackendError>;

    /// Locks `owner`'s quotas against every other gateway process sharing this backend, and
    /// brings the view of `owner`'s clusters up to date (so what another process has just
    /// created or granted is counted). The lock lasts until the returned value is dropped.
    /// `None`: only this process uses the backend, and the caller's own lock is enough.
    async fn lock_user_quota(&self, _owner: &str) -> Result<Option<QuotaLock>, BackendError> {
        Ok(None)
    }

    /// Records, under the owner's quota lock, the workers granted to cluster `name`; its
    /// [`ClusterView::grant`] shows them from then on (to every gateway process sharing the
    /// backend), so quotas count them before the scheduler acts.
    async fn record_grant(&self, name: &str, grant: WorkerGrant) -> Result<(), BackendError>;

    /// Records that a client of `name` is connected through this gateway process at `at_ms`,
    /// where several gateway processes share the backend, so that each one's no-client
    /// timeout sees the others' clients ([`ClusterView::last_client_ms`]). A backend only one
    /// process uses has nothing to share: the default does nothing.
    async fn record_client_activity(&self, _name: &str, _at_ms: i64) -> Result<(), BackendError> {
        Ok(())
    }

    /// Tells the backend whether the gateway takes new connections now. While it cannot (its
    /// listeners turn connections away, or cannot accept them), schedulers' heartbeats cannot
    /// reach it, and a backend that fails silent schedulers must not count that time against
    /// them. Called about once a second; the default ignores it.
    fn set_reachable(&self, reachable: bool) {
        let _ = reachable;
    }

    /// Whether the backend's store or platform answers (health checks).
    async fn healthy(&self) -> bool;

    /// Registers the backend's own metric families (its counters, and collectors of what it
    /// reads at scrape time) in the gateway's registry, once at start-up (see [`metrics`]).
    fn register_metrics(&self, registry: &mut metrics::Registry);

    /// Called once when the gateway shuts down: stop every active cluster (bounded wait) if
    /// `stop_clusters` is true, then release what the backend holds.
    async fn shutdown(&self, stop_clusters: bool);
}
