//! An in-memory [`ClusterBackend`] for tests of everything above the seam (API rules, quotas,
//! clipping, the `?wait` long-poll, token checks) without Dask or Kubernetes.
//!
//! It behaves like a well-mannered backend: a new cluster is PENDING, the first heartbeat that
//! carries a scheduler address makes it RUNNING with those addresses, a stop ends it at once
//! (STOPPED or FAILED). Tests can look at what it was asked to do.

use crate::{
    new_api_token, new_cluster_id, BackendError, ClusterBackend, ClusterView, NewCluster,
    SchedulerAddresses, StopRequest, TlsPair, WorkerGrant,
};
use gateway_model::{ClusterStatus, Heartbeat};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

struct Entry {
    view: ClusterView,
    status_tx: watch::Sender<ClusterStatus>,
    target_workers: u64,
    heartbeats: usize,
}

/// The in-memory backend (see the module docs).
#[derive(Default)]
pub struct FakeBackend {
    /// Clusters by name. A std mutex: never held across an `.await`.
    clusters: Mutex<HashMap<String, Entry>>,
    /// When set, the next `create` fails with this message.
    fail_next_create: Mutex<Option<String>>,
    /// Per-user quota locks, shared by every service over this backend (like the Leases
    /// gateway replicas share on Kubernetes).
    quota_locks: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    /// Where start and stop times come from (default: the system's wall clock).
    clock: Option<std::sync::Arc<dyn Fn() -> i64 + Send + Sync>>,
    /// Where new clusters' names come from (default: random ids, as real backends make).
    names: Option<std::sync::Arc<dyn Fn() -> String + Send + Sync>>,
}

fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl FakeBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stamps start and stop times with `now_ms` (milliseconds since the Unix epoch) instead
    /// of the system's wall clock: the clock of the service above it, in tests that move time.
    pub fn with_clock(mut self, now_ms: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        self.clock = Some(std::sync::Arc::new(now_ms));
        self
    }

    /// Names new clusters `next_name()` instead of a random id (and so their TLS pairs, which
    /// the fake derives from the name): tests that compare answers byte for byte.
    pub fn with_names(mut self, next_name: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.names = Some(std::sync::Arc::new(next_name));
        self
    }

    fn now_ms(&self) -> i64 {
        self.clock.as_ref().map_or_else(system_ms, |now| now())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.clusters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the next `create` fail with `message` (as an internal error).
    pub fn fail_next_create(&self, message: &str) {
        *self
            .fail_next_create
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(message.into());
    }

    /// The worker target the last heartbeat set (after clipping by the caller).
    pub fn target_workers(&self, name: &str) -> Option<u64> {
        self.lock().get(name).map(|e| e.target_workers)
    }

    /// How many heartbeats the cluster received while active.
    pub fn heartbeats(&self, name: &str) -> usize {
        self.lock().get(name).map_or(0, |e| e.heartbeats)
    }

    /// Moves a cluster to RUNNING with these addresses, as a first heartbeat would.
    pub fn make_running(&self, name: &str, addresses: SchedulerAddresses) {
        if let Some(e) = self.lock().get_mut(name) {
            e.view.addresses = Some(addresses);
            e.view.status = ClusterStatus::Running;
            e.status_tx.send_replace(ClusterStatus::Running);
        }
    }
}

#[async_trait::async_trait]
impl ClusterBackend for FakeBackend {
    fn kind(&self) -> &'static str {
        "fake"
    }

    async fn create(&self, request: NewCluster) -> Result<ClusterView, BackendError> {
        if let Some(msg) = self
            .fail_next_create
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Err(BackendError::Internal(msg));
        }
        let name = self
            .names
            .as_ref()
            .map_or_else(new_cluster_id, |next| next());
        let view = ClusterView {
            name: name.clone(),
            owner: request.owner,
            status: ClusterStatus::Pending,
            reason: None,
            options: request.options,
            settings: request.settings,
            token: Some(new_api_token()),
            tls: Some(TlsPair {
                cert: format!("-----BEGIN CERTIFICATE-----\n{name}\n-----END CERTIFICATE-----\n"),
                key: format!("-----BEGIN PRIVATE KEY-----\n{name}\n-----END PRIVATE KEY-----\n"),
            }),
            addresses: None,
            start_time: self.now_ms(),
            stop_time: None,
            target_workers: 0,
            last_client_ms: None,
            grant: None,
            pool: request.pool,
            workers_running: None,
        };
        let (status_tx, _) = watch::channel(ClusterStatus::Pending);
        self.lock().insert(
            name,
            Entry {
                view: view.clone(),
                status_tx,
                target_workers: 0,
                heartbeats: 0,
            },
        );
        Ok(view)
    }

    fn get(&self, name: &str) -> Option<ClusterView> {
        self.lock().get(name).map(|e| e.view.clone())
    }

    fn list(&self, owner: Option<&str>) -> Vec<ClusterView> {
        let mut out: Vec<ClusterView> = self
            .lock()
            .values()
            .filter(|e| owner.is_none_or(|o| e.view.owner == o))
            .map(|e| e.view.clone())
            .collect();
        out.sort_by_key(|v| v.start_time);
        out
    }

    fn route(&self, name: &str) -> Option<SchedulerAddresses> {
        self.lock()
            .get(name)
            .filter(|e| e.view.pool.is_none())
            .and_then(|e| e.view.addresses.clone())
    }

    fn subscribe(&self, name: &str) -> Option<watch::Receiver<ClusterStatus>> {
        self.lock().get(name).map(|e| e.status_tx.subscribe())
    }

    async fn heartbeat(
        &self,
        name: &str,
        heartbeat: &Heartbeat,
        target_workers: u64,
    ) -> Result<(), BackendError> {
        let mut clusters = self.lock();
        let e = clusters
            .get_mut(name)
            .ok_or_else(|| BackendError::NotFound(name.into()))?;
        if !e.view.status.is_active() {
            return Ok(());
        }
        e.heartbeats += 1;
        e.target_workers = target_workers;
        e.view.target_workers = target_workers;
        if e.view.status == ClusterStatus::Pending && !heartbeat.scheduler_address.is_empty() {
            e.view.addresses = Some(SchedulerAddresses {
                scheduler: heartbeat.scheduler_address.clone(),
                dashboard: Some(heartbeat.dashboard_address.clone()).filter(|d| !d.is_empty()),
                api: heartbeat.api_address.clone(),
            });
            e.view.status = ClusterStatus::Running;
            e.status_tx.send_replace(ClusterStatus::Running);
        }
        Ok(())
    }

    async fn claim(
        &self,
        pool: &str,
        claim: NewCluster,
    ) -> Result<Option<ClusterView>, BackendError> {
        let mut clusters = self.lock();
        let mut members: Vec<&mut Entry> = clusters
            .values_mut()
            .filter(|e| e.view.pool.as_deref() == Some(pool) && e.view.status.is_active())
            .collect();
        // RUNNING first, then the oldest.
        members.sort_by_key(|e| (e.view.status != ClusterStatus::Running, e.view.start_time));
        let Some(e) = members.into_iter().next() else {
            return Ok(None);
        };
        e.view.owner = claim.owner;
        e.view.options = claim.options;
        e.view.settings = claim.settings;
        e.view.pool = None;
        e.view.start_time = self.now_ms();
        Ok(Some(e.view.clone()))
    }

    /// Shared like a Kubernetes backend: one lock per user for every service over it.
    async fn lock_user_quota(&self, owner: &str) -> Result<Option<crate::QuotaLock>, BackendError> {
        let lock = self
            .quota_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(owner.to_string())
            .or_default()
            .clone();
        Ok(Some(Box::new(lock.lock_owned().await)))
    }

    /// Shared like a Kubernetes backend: the view keeps the last recorded grant.
    async fn record_grant(&self, name: &str, grant: WorkerGrant) -> Result<(), BackendError> {
        match self.lock().get_mut(name) {
            Some(e) => {
                e.view.grant = Some(grant);
                Ok(())
            }
            None => Err(BackendError::NotFound(name.into())),
        }
    }

    /// Shared like a Kubernetes backend: the view keeps the last recorded client time.
    async fn record_client_activity(&self, name: &str, at_ms: i64) -> Result<(), BackendError> {
        match self.lock().get_mut(name) {
            Some(e) => {
                e.view.last_client_ms = Some(at_ms);
                Ok(())
            }
            None => Err(BackendError::NotFound(name.into())),
        }
    }

    async fn stop(&self, name: &str, request: StopRequest) -> Result<(), BackendError> {
        if let Some(e) = self.lock().get_mut(name) {
            if request.if_pool.is_some() && e.view.pool != request.if_pool {
                return Ok(());
            }
            if e.view.status.is_active() {
                let end = if request.failed {
                    ClusterStatus::Failed
                } else {
                    ClusterStatus::Stopped
                };
                e.view.status = end;
                e.view.reason = Some(request.reason);
                e.view.addresses = None;
                e.view.stop_time = Some(self.now_ms());
                e.status_tx.send_replace(end);
            }
        }
        Ok(())
    }

    async fn healthy(&self) -> bool {
        true
    }

    fn register_metrics(&self, _registry: &mut crate::metrics::Registry) {}

    async fn shutdown(&self, stop_clusters: bool) {
        if !stop_clusters {
            return;
        }
        let names: Vec<String> = self.lock().keys().cloned().collect();
        for name in names {
            let _ = self
                .stop(&name, StopRequest::stopped("the gateway shut down"))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClusterSettings;

    fn request(owner: &str) -> NewCluster {
        NewCluster::owned(owner, Default::default(), ClusterSettings::example())
    }

    #[tokio::test]
    async fn lifecycle_through_heartbeat_and_stop() {
        let b = FakeBackend::new();
        let c = b.create(request("alice")).await.unwrap();
        assert_eq!(c.status, ClusterStatus::Pending);
        assert!(b.route(&c.name).is_none());
        let mut rx = b.subscribe(&c.name).unwrap();
        let hb = Heartbeat {
            scheduler_address: "tls://127.0.0.1:1".into(),
            api_address: "http://127.0.0.1:2".into(),
            count: 3,
            ..Default::default()
        };
        b.heartbeat(&c.name, &hb, 2).await.unwrap();
        assert_eq!(*rx.borrow_and_update(), ClusterStatus::Running);
        assert_eq!(b.target_workers(&c.name), Some(2));
        assert_eq!(
            b.route(&c.name).unwrap().scheduler,
            "tls://127.0.0.1:1".to_string()
        );
        let model = b.get(&c.name).unwrap().model();
        assert!(model.tls_key.is_some());
        assert_eq!(model.dashboard_route, None);
        b.stop(&c.name, StopRequest::failed("boom")).await.unwrap();
        let v = b.get(&c.name).unwrap();
        assert_eq!(v.status, ClusterStatus::Failed);
        assert!(v.model().tls_key.is_none());
        assert_eq!(b.list(Some("alice")).len(), 1);
        assert!(b.list(Some("bob")).is_empty());
    }
}
