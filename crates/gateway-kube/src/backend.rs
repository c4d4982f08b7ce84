//! The gateway side of the Kubernetes backend: [`KubeBackend`] keeps no state of its own. It
//! creates DaskCluster objects, answers every read from a watch cache of DaskClusters and of
//! their credentials Secrets, and turns heartbeats and stops into small patches of the spec.
//! A restarted gateway (or a second replica) rebuilds the same view from the watches.

use crate::config::KubeConfig;
use crate::crd::{DaskCluster, DaskClusterSpec, Phase, PodTemplate, RuntimeSpec, StopSpec};
use crate::names;
use futures_util::StreamExt;
use gateway_backend::metrics::{self, Counter, Registry};
use gateway_backend::{
    new_cluster_id, BackendError, ClusterBackend, ClusterTiming, ClusterView, NewCluster,
    SchedulerAddresses, StopRequest, TlsPair, WorkerGrant,
};
use gateway_model::{ClusterEvent, ClusterStatus, ClusterUsage, Heartbeat, UsageAmount};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::{info, warn};

/// Names the gateway writes into `spec.retiredWorkers` at most (the controller deletes those
/// pods if they still exist; older names belong to pods long gone).
const MAX_RETIRED: usize = 256;
/// How long a shutdown that stops clusters waits for them to finish.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(20);
/// How long to wait for the first complete listing before serving anyway.
const INITIAL_SYNC: Duration = Duration::from_secs(30);

/// What the pods of every cluster run with, beyond the kubernetes section: from the gateway's
/// own configuration.
#[derive(Clone, Debug)]
pub struct GatewayRuntime {
    /// `DASK_GATEWAY_API_URL` for schedulers.
    pub api_url: String,
    /// The clusters' timing: the periods schedulers are told, the seconds a scheduler may take
    /// to become ready, and the worker pods failing in a row that fail the cluster.
    pub timing: ClusterTiming,
    /// The installation's owner object ([`crate::installation_owner`]): what it owns is
    /// deleted by Kubernetes when the installation is uninstalled, even though the gateway's
    /// own rights are gone by the time it hears of it. Unclaimed warm-pool members are owned by
    /// it; so is every cluster with [`GatewayRuntime::clusters_go_with_installation`].
    pub installation_owner: Option<OwnerReference>,
    /// Every cluster goes with the installation (`stop_clusters_on_shutdown`), not only the
    /// unclaimed warm-pool members.
    pub clusters_go_with_installation: bool,
}

/// A cluster's credentials, from its Secret.
#[derive(Clone, Debug)]
struct Credentials {
    token: String,
    tls: TlsPair,
}

/// One cached DaskCluster and the status subscribers of its public status.
struct Entry {
    cluster: Arc<DaskCluster>,
    status_tx: watch::Sender<ClusterStatus>,
}

#[derive(Default)]
struct Cache {
    /// By object name (the id).
    clusters: HashMap<String, Entry>,
    /// By Secret name.
    secrets: HashMap<String, Credentials>,
}

/// Event counters since start (Prometheus counters, see `register_metrics`).
#[derive(Default)]
struct Counters {
    creates: Counter,
    spec_patches: Counter,
    watch_errors: Counter,
}

/// The gateway side of the Kubernetes backend (see the module docs).
pub struct KubeBackend {
    clusters_api: Api<DaskCluster>,
    /// Per-user quota locks shared with the other gateway replicas.
    quota_locks: crate::quota_lock::QuotaLocks,
    namespace: String,
    config: KubeConfig,
    runtime: GatewayRuntime,
    /// The watch caches. A std mutex, never held across an `.await`; shared with the metrics'
    /// collector.
    cache: Arc<Mutex<Cache>>,
    /// Both watches have delivered a complete listing.
    synced: [AtomicBool; 2],
    counters: Counters,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// resourceVersion as a number, for "is this newer" (etcd revisions in practice).
fn version(dc: &DaskCluster) -> Option<u64> {
    dc.metadata.resource_version.as_deref()?.parse().ok()
}

fn api_error(what: &str, e: kube::Error) -> BackendError {
    warn!("{what}: {e}");
    match &e {
        kube::Error::Api(s) if s.is_forbidden() => BackendError::Internal(format!(
            "The gateway is not allowed to {what} (check its RBAC)"
        )),
        kube::Error::Api(s) if s.is_invalid() => {
            BackendError::Invalid(format!("Kubernetes refused the cluster: {}", s.message))
        }
        kube::Error::Api(s) if s.code >= 500 || s.code == 429 => BackendError::Unavailable(
            format!("Kubernetes is unavailable ({} {})", s.code, s.reason),
        ),
        kube::Error::Api(s) => {
            BackendError::Internal(format!("Kubernetes answered {}: {}", s.code, s.message))
        }
        _ => BackendError::Unavailable("The Kubernetes API cannot be reached".into()),
    }
}

impl KubeBackend {
    /// The installation's DaskClusters straight from the API server (not the caches, which
    /// leave finished ones out): `owner`'s only (by label; callers compare the names
    /// themselves), and matching `extra` (a label selector) if given.
    async fn list_from_api(
        &self,
        owner: Option<&str>,
        extra: Option<&str>,
    ) -> Result<kube::core::ObjectList<DaskCluster>, kube::Error> {
        let mut selector = names::instance_selector(&self.config.instance);
        if let Some(extra) = extra {
            selector.push(',');
            selector.push_str(extra);
        }
        if let Some(o) = owner {
            selector.push_str(&format!(",{}={}", names::LABEL_USER, names::user_label(o)));
        }
        self.clusters_api
            .list(&ListParams::default().labels(&selector))
            .await
    }

    /// The backend without its watches: empty caches, nothing synced. [`Self::start`] feeds
    /// the caches from the watches; tests feed them the same events directly.
    pub(crate) fn new(
        client: Client,
        config: KubeConfig,
        namespace: String,
        runtime: GatewayRuntime,
    ) -> Arc<Self> {
        Arc::new(KubeBackend {
            clusters_api: Api::namespaced(client.clone(), &namespace),
            quota_locks: crate::quota_lock::QuotaLocks::new(
                client.clone(),
                &namespace,
                &config.instance,
                &format!(
                    "{}-{:08x}",
                    std::env::var("HOSTNAME").unwrap_or_else(|_| "gateway".into()),
                    rand::random::<u32>()
                ),
            ),
            namespace: namespace.clone(),
            config,
            runtime,
            cache: Arc::default(),
            synced: [AtomicBool::new(false), AtomicBool::new(false)],
            counters: Counters::default(),
        })
    }

    /// Starts the watches and waits (bounded) for their first complete listing, so that a
    /// restarted gateway knows every cluster before it answers.
    pub async fn start(
        client: Client,
        config: KubeConfig,
        namespace: String,
        runtime: GatewayRuntime,
    ) -> Arc<Self> {
        let backend = Self::new(client.clone(), config, namespace.clone(), runtime);
        let selector = names::instance_selector(&backend.config.instance);
        let clusters_selector = names::active_selector(&backend.config.instance);
        let secrets_selector = format!(
            "{selector},{}={}",
            names::LABEL_COMPONENT,
            names::COMPONENT_CREDENTIALS
        );
        backend.spawn_watch(
            Api::<DaskCluster>::namespaced(client.clone(), &namespace),
            &clusters_selector,
            "DaskClusters",
            KubeBackend::on_cluster_event,
        );
        backend.spawn_watch(
            Api::<Secret>::namespaced(client, &namespace),
            &secrets_selector,
            "credentials Secrets",
            KubeBackend::on_secret_event,
        );
        let deadline = tokio::time::Instant::now() + INITIAL_SYNC;
        while !backend.is_synced() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if backend.is_synced() {
            info!(namespace = %namespace, clusters = backend.lock().clusters.len(), "DaskCluster cache synced");
        } else {
            warn!(namespace = %namespace, "DaskCluster cache not synced yet; serving what is known");
        }
        backend
    }

    /// Feeds a watch of `api` (objects matching `selector`) to `on_event` until the backend
    /// is dropped; errors are counted and the watch retries with backoff.
    fn spawn_watch<K>(
        self: &Arc<Self>,
        api: Api<K>,
        selector: &str,
        what: &'static str,
        on_event: fn(&KubeBackend, Event<K>, &mut Vec<K>),
    ) where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + 'static,
    {
        let weak = Arc::downgrade(self);
        let events = watcher::watcher(api, watcher::Config::default().labels(selector));
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let mut stream = events.default_backoff().boxed();
            while let Some(event) = stream.next().await {
                let Some(b) = weak.upgrade() else { return };
                match event {
                    Ok(ev) => on_event(&b, ev, &mut buffer),
                    Err(e) => {
                        b.counters.watch_errors.inc();
                        warn!("watching {what}: {e}");
                    }
                }
            }
        });
    }

    fn is_synced(&self) -> bool {
        self.synced.iter().all(|s| s.load(Ordering::Acquire))
    }

    fn lock(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts or updates one cluster unless the cache already has a newer version.
    fn upsert(&self, cache: &mut Cache, mut dc: DaskCluster) {
        let id = dc.name_any();
        if dc.labels().contains_key(names::LABEL_FINISHED) {
            // Out of the hot cache; read on demand (`finished`, `stored_cluster`).
            cache.clusters.remove(&id);
            return;
        }
        crate::crd::slim_for_api(&mut dc);
        if let Some(e) = cache.clusters.get_mut(&id) {
            if let (Some(old), Some(new)) = (version(&e.cluster), version(&dc)) {
                if new < old {
                    return;
                }
            }
            e.cluster = Arc::new(dc);
        } else {
            let (status_tx, _) = watch::channel(ClusterStatus::Pending);
            cache.clusters.insert(
                id.clone(),
                Entry {
                    cluster: Arc::new(dc),
                    status_tx,
                },
            );
        }
        Self::publish(cache, &id);
    }

    /// Recomputes the public status of `id` and tells subscribers.
    fn publish(cache: &Cache, id: &str) {
        if let Some(e) = cache.clusters.get(id) {
            let status = public_status(&e.cluster, &cache.secrets);
            e.status_tx.send_if_modified(|s| {
                let changed = *s != status;
                *s = status;
                changed
            });
        }
    }

    fn on_cluster_event(&self, event: Event<DaskCluster>, buffer: &mut Vec<DaskCluster>) {
        match event {
            Event::Apply(dc) => {
                let mut cache = self.lock();
                self.upsert(&mut cache, dc);
            }
            Event::Delete(dc) => {
                let mut cache = self.lock();
                cache.clusters.remove(&dc.name_any());
            }
            Event::Init => buffer.clear(),
            Event::InitApply(dc) => buffer.push(dc),
            Event::InitDone => {
                let mut cache = self.lock();
                let listed: HashSet<String> = buffer.iter().map(|d| d.name_any()).collect();
                // Objects gone while the watch was down; keep ones we created a moment ago.
                let fresh = now_ms() - 10_000;
                cache.clusters.retain(|id, e| {
                    listed.contains(id) || created_ms(&e.cluster).is_some_and(|t| t > fresh)
                });
                for dc in buffer.drain(..) {
                    self.upsert(&mut cache, dc);
                }
                self.synced[0].store(true, Ordering::Release);
            }
        }
    }

    fn on_secret_event(&self, event: Event<Secret>, buffer: &mut Vec<Secret>) {
        let credentials = |s: &Secret| -> Option<Credentials> {
            let data = s.data.as_ref()?;
            let text = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
            Some(Credentials {
                token: text("api-token")?.trim().to_string(),
                tls: TlsPair {
                    cert: text("dask.crt")?,
                    key: text("dask.pem")?,
                },
            })
        };
        let cluster_of = |s: &Secret| s.labels().get(names::LABEL_CLUSTER).cloned();
        let mut touched = Vec::new();
        let mut cache = self.lock();
        match event {
            Event::Apply(s) => {
                if let Some(c) = credentials(&s) {
                    cache.secrets.insert(s.name_any(), c);
                }
                touched.extend(cluster_of(&s));
            }
            Event::Delete(s) => {
                cache.secrets.remove(&s.name_any());
                touched.extend(cluster_of(&s));
            }
            Event::Init => buffer.clear(),
            Event::InitApply(s) => buffer.push(s),
            Event::InitDone => {
                let listed: HashSet<String> = buffer.iter().map(|s| s.name_any()).collect();
                cache.secrets.retain(|name, _| listed.contains(name));
                for s in buffer.drain(..) {
                    if let Some(c) = credentials(&s) {
                        cache.secrets.insert(s.name_any(), c);
                    }
                }
                touched.extend(cache.clusters.keys().cloned());
                self.synced[1].store(true, Ordering::Release);
            }
        }
        for id in touched {
            Self::publish(&cache, &id);
        }
    }

    fn id<'a>(&self, name: &'a str) -> Option<&'a str> {
        names::object_id(&self.namespace, name)
    }

    fn view(&self, dc: &DaskCluster, secrets: &HashMap<String, Credentials>) -> ClusterView {
        let id = dc.name_any();
        let status = public_status(dc, secrets);
        let st = dc.status.clone().unwrap_or_default();
        let creds = secrets.get(
            st.credentials
                .as_deref()
                .unwrap_or(&names::secret_name(&id)),
        );
        let addresses = st
            .addresses
            .clone()
            .filter(|_| status == ClusterStatus::Running)
            .map(|a| SchedulerAddresses {
                scheduler: a.scheduler,
                dashboard: Some(a.dashboard).filter(|d| !d.is_empty()),
                api: a.api,
            });
        let reason = st
            .reason
            .clone()
            .filter(|_| st.phase != Phase::Running)
            .or_else(|| dc.spec.stop.as_ref().map(|s| s.reason.clone()));
        ClusterView {
            name: names::public_name(&self.namespace, &id),
            owner: if dc.spec.pool.is_some() {
                String::new()
            } else {
                dc.spec.user.clone()
            },
            status,
            reason,
            options: dc.spec.options.clone(),
            settings: dc.spec.settings.clone(),
            token: creds.map(|c| c.token.clone()),
            tls: creds.map(|c| c.tls.clone()),
            addresses,
            start_time: created_ms(dc).unwrap_or(0),
            stop_time: st
                .completion_time
                .as_deref()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .map(|t| t.as_millisecond())
                .filter(|_| status.is_terminal()),
            target_workers: dc.spec.replicas.max(0) as u64,
            last_client_ms: dc
                .annotations()
                .get(names::ANNOTATION_LAST_CLIENT_MS)
                .and_then(|v| v.parse().ok()),
            grant: dc
                .annotations()
                .get(names::ANNOTATION_GRANTED_WORKERS)
                .and_then(|v| names::parse_grant(v)),
            pool: dc.spec.pool.clone(),
            workers_running: ready_workers_of(dc),
        }
    }

    /// The DaskCluster object for a new cluster (templates and profile resolved now).
    fn new_object(&self, id: &str, request: &NewCluster) -> Result<DaskCluster, BackendError> {
        let settings = &request.settings;
        let profile = match settings.profile.as_deref() {
            None => None,
            Some(p) => Some(self.config.profiles.get(p).ok_or_else(|| {
                let known: Vec<&str> = self.config.profiles.keys().map(String::as_str).collect();
                BackendError::Invalid(format!(
                    "profile {p:?} is not configured; known profiles: {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })?),
        };
        let overlay = |base: &PodTemplate, pick: fn(&crate::config::Profile) -> &PodTemplate| {
            profile.map_or_else(|| base.clone(), |p| base.overlaid(pick(p)))
        };
        let image = settings
            .image
            .clone()
            .or_else(|| profile.and_then(|p| p.image.clone()))
            .unwrap_or_else(|| self.config.image.clone());
        let user = match &request.pool {
            Some(_) => names::POOL_USER.to_string(),
            None => request.owner.clone(),
        };
        let spec = DaskClusterSpec {
            user: user.clone(),
            options: request.options.clone(),
            settings: settings.clone(),
            scheduler: overlay(&self.config.scheduler, |p| &p.scheduler),
            worker: overlay(&self.config.worker, |p| &p.worker),
            runtime: RuntimeSpec {
                image,
                image_pull_policy: self.config.image_pull_policy.clone(),
                image_pull_secrets: self.config.image_pull_secrets.clone(),
                service_account_name: self.config.service_account.clone(),
                api_url: self.runtime.api_url.clone(),
                heartbeat_period: self.runtime.timing.heartbeat_period,
                adaptive_period: self.runtime.timing.adaptive_period,
                start_timeout: self.runtime.timing.start_timeout,
                worker_failure_limit: self.runtime.timing.worker_start_failure_limit.max(1),
                termination_grace_period_seconds: self.config.termination_grace_period_seconds,
                pod_security_context: Some(self.config.pod_security_context.clone())
                    .filter(|v| !v.is_null()),
                security_context: Some(self.config.security_context.clone())
                    .filter(|v| !v.is_null()),
            },
            replicas: 0,
            active: true,
            retired_workers: Vec::new(),
            stop: None,
            pool: request.pool.clone(),
        };
        let mut dc = DaskCluster::new(id, spec);
        dc.metadata.namespace = Some(self.namespace.clone());
        let mut labels = names::labels(&self.config.instance, id, &user, "cluster");
        labels.remove(names::LABEL_COMPONENT);
        if let Some(pool) = &request.pool {
            labels.insert(names::LABEL_POOL.to_string(), pool.clone());
        }
        dc.metadata.labels = Some(labels);
        if request.pool.is_some() || self.runtime.clusters_go_with_installation {
            dc.metadata.owner_references = self.runtime.installation_owner.clone().map(|o| vec![o]);
        }
        dc.metadata.annotations = Some(BTreeMap::from([
            (names::ANNOTATION_USER.to_string(), user),
            (
                names::ANNOTATION_CREATED_MS.to_string(),
                now_ms().to_string(),
            ),
        ]));
        Ok(dc)
    }

    /// The owner references of a claimed warm-pool member (see
    /// [`GatewayRuntime::installation_owner`]).
    fn claimed_owners(&self) -> Vec<OwnerReference> {
        match &self.runtime.installation_owner {
            Some(owner) if self.runtime.clusters_go_with_installation => vec![owner.clone()],
            _ => Vec::new(),
        }
    }

    /// Sets one annotation on the DaskCluster of public name `name`.
    async fn patch_annotation(
        &self,
        name: &str,
        key: &str,
        value: String,
    ) -> Result<(), BackendError> {
        let id = self
            .id(name)
            .ok_or_else(|| BackendError::NotFound(name.into()))?;
        self.merge_patch(
            id,
            json!({"metadata": {"annotations": {key: value}}}),
            "annotate",
        )
        .await
    }

    /// Merge-patches the spec of `id`.
    async fn patch_spec(&self, id: &str, patch: serde_json::Value) -> Result<(), BackendError> {
        self.counters.spec_patches.inc();
        self.merge_patch(id, json!({ "spec": patch }), "update")
            .await
    }

    /// Merge-patches DaskCluster `id` and stores the answer in the cache; `verb` names the
    /// action in errors ("update a DaskCluster").
    async fn merge_patch(
        &self,
        id: &str,
        body: serde_json::Value,
        verb: &str,
    ) -> Result<(), BackendError> {
        let updated = self
            .clusters_api
            .patch(id, &PatchParams::default(), &Patch::Merge(&body))
            .await;
        match updated {
            Ok(dc) => {
                let mut cache = self.lock();
                self.upsert(&mut cache, dc);
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.is_not_found() => Err(BackendError::NotFound(
                names::public_name(&self.namespace, id),
            )),
            Err(e) => Err(api_error(&format!("{verb} a DaskCluster"), e)),
        }
    }
}

/// The ready worker pods the controller last counted.
fn ready_workers_of(dc: &DaskCluster) -> Option<u64> {
    dc.status.as_ref().map(|s| s.ready_workers.max(0) as u64)
}

pub(crate) fn created_ms(dc: &DaskCluster) -> Option<i64> {
    dc.annotations()
        .get(names::ANNOTATION_CREATED_MS)
        .and_then(|t| t.parse().ok())
        .or_else(|| {
            dc.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_millisecond())
        })
}

/// The public status of a DaskCluster. RUNNING needs the scheduler's address and the
/// credentials (the cluster model hands them out); a cluster whose spec asks it to stop is
/// STOPPING until the controller has finished it.
fn public_status(dc: &DaskCluster, secrets: &HashMap<String, Credentials>) -> ClusterStatus {
    let st = dc.status.clone().unwrap_or_default();
    match st.phase {
        Phase::Stopped => return ClusterStatus::Stopped,
        Phase::Failed => return ClusterStatus::Failed,
        Phase::Stopping => return ClusterStatus::Stopping,
        _ => {}
    }
    if !dc.spec.active {
        return ClusterStatus::Stopping;
    }
    let secret = st
        .credentials
        .clone()
        .unwrap_or_else(|| names::secret_name(&dc.name_any()));
    if st.phase == Phase::Running && st.addresses.is_some() && secrets.contains_key(&secret) {
        ClusterStatus::Running
    } else {
        ClusterStatus::Pending
    }
}

#[async_trait::async_trait]
impl ClusterBackend for KubeBackend {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    async fn create(&self, request: NewCluster) -> Result<ClusterView, BackendError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let id = new_cluster_id();
            let dc = self.new_object(&id, &request)?;
            match self.clusters_api.create(&PostParams::default(), &dc).await {
                Ok(created) => {
                    self.counters.creates.inc();
                    info!(cluster = %names::public_name(&self.namespace, &id), user = ?request.owner, "DaskCluster created");
                    let mut cache = self.lock();
                    self.upsert(&mut cache, created);
                    let e = &cache.clusters[&id];
                    return Ok(self.view(&e.cluster, &cache.secrets));
                }
                // A random 128-bit name taken: astronomically unlikely, but retry.
                Err(kube::Error::Api(s)) if s.is_already_exists() && attempts < 3 => continue,
                Err(e) => return Err(api_error("create DaskClusters", e)),
            }
        }
    }

    fn get(&self, name: &str) -> Option<ClusterView> {
        let id = self.id(name)?;
        let cache = self.lock();
        let e = cache.clusters.get(id)?;
        Some(self.view(&e.cluster, &cache.secrets))
    }

    fn list(&self, owner: Option<&str>) -> Vec<ClusterView> {
        let cache = self.lock();
        let mut out: Vec<ClusterView> = cache
            .clusters
            .values()
            .filter(|e| {
                owner.is_none_or(|o| e.cluster.spec.pool.is_none() && e.cluster.spec.user == o)
            })
            .map(|e| self.view(&e.cluster, &cache.secrets))
            .collect();
        out.sort_by(|a, b| (a.start_time, &a.name).cmp(&(b.start_time, &b.name)));
        out
    }

    fn route(&self, name: &str) -> Option<SchedulerAddresses> {
        let id = self.id(name)?;
        let cache = self.lock();
        let e = cache.clusters.get(id)?;
        if public_status(&e.cluster, &cache.secrets) != ClusterStatus::Running
            || e.cluster.spec.pool.is_some()
        {
            return None;
        }
        let a = e.cluster.status.as_ref()?.addresses.clone()?;
        Some(SchedulerAddresses {
            scheduler: a.scheduler,
            dashboard: Some(a.dashboard).filter(|d| !d.is_empty()),
            api: a.api,
        })
    }

    fn subscribe(&self, name: &str) -> Option<watch::Receiver<ClusterStatus>> {
        let id = self.id(name)?;
        self.lock()
            .clusters
            .get(id)
            .map(|e| e.status_tx.subscribe())
    }

    async fn lock_user_quota(
        &self,
        owner: &str,
    ) -> Result<Option<gateway_backend::QuotaLock>, BackendError> {
        let guard = self.quota_locks.acquire(owner).await.map_err(|e| match e {
            crate::quota_lock::QuotaLockError::Busy => BackendError::Unavailable(e.to_string()),
            crate::quota_lock::QuotaLockError::Api(e) => api_error("lock a user's quota", e),
        })?;
        // What other replicas created or granted for this user, straight from the API server.
        let selector = format!(
            "{},{}={}",
            names::active_selector(&self.config.instance),
            names::LABEL_USER,
            names::user_label(owner)
        );
        let fresh = self
            .clusters_api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| api_error("list a user's DaskClusters", e))?;
        let mut cache = self.lock();
        for dc in fresh.items {
            self.upsert(&mut cache, dc);
        }
        Ok(Some(Box::new(guard)))
    }

    async fn finished(&self, owner: Option<&str>) -> Result<Vec<ClusterView>, BackendError> {
        let finished = format!("{}=true", names::LABEL_FINISHED);
        let list = self
            .list_from_api(owner, Some(&finished))
            .await
            .map_err(|e| api_error("list finished DaskClusters", e))?;
        let none = HashMap::new();
        let mut out: Vec<ClusterView> = list
            .items
            .iter()
            // The user label is a cleaned or hashed name: compare the names themselves.
            .filter(|dc| owner.is_none_or(|o| dc.spec.pool.is_none() && dc.spec.user == o))
            .map(|dc| self.view(dc, &none))
            .collect();
        out.sort_by(|a, b| (a.start_time, &a.name).cmp(&(b.start_time, &b.name)));
        Ok(out)
    }

    async fn stored_cluster(&self, name: &str) -> Result<Option<ClusterView>, BackendError> {
        let Some(id) = self.id(name) else {
            return Ok(None);
        };
        let dc = self
            .clusters_api
            .get_opt(id)
            .await
            .map_err(|e| api_error("read a DaskCluster", e))?;
        let Some(dc) =
            dc.filter(|dc| dc.labels().get(names::LABEL_INSTANCE) == Some(&self.config.instance))
        else {
            return Ok(None);
        };
        if dc.labels().contains_key(names::LABEL_FINISHED) {
            return Ok(Some(self.view(&dc, &HashMap::new())));
        }
        // Active, so the watch brings it soon: another replica created it a moment ago (a
        // user's create answered there, the next request of the same user here). Kept now, as
        // the create's answer is on the replica that made it, so that this request and the
        // next (a `?wait`, a scale, a stop) find it.
        let mut cache = self.lock();
        self.upsert(&mut cache, dc);
        Ok(cache
            .clusters
            .get(id)
            .map(|e| self.view(&e.cluster, &cache.secrets)))
    }

    async fn events(&self, name: &str) -> Result<Vec<ClusterEvent>, BackendError> {
        let Some(id) = self.id(name) else {
            return Ok(Vec::new());
        };
        let client = self.clusters_api.clone().into_client();
        crate::events::cluster_events(client, &self.namespace, id)
            .await
            .map_err(|e| api_error("list Events", e))
    }

    /// From the usage records in the DaskClusters' status (one list of the installation's
    /// DaskClusters, finished ones included): kept as long as the DaskClusters are.
    async fn usage(
        &self,
        owner: Option<&str>,
        since: i64,
        until: i64,
    ) -> Result<Vec<ClusterUsage>, BackendError> {
        let list = self
            .list_from_api(owner, None)
            .await
            .map_err(|e| api_error("list DaskClusters", e))?;
        let now = jiff::Timestamp::now().as_millisecond();
        let mut out: Vec<ClusterUsage> = list
            .items
            .iter()
            // The user label is a cleaned or hashed name: compare the names themselves.
            .filter(|dc| dc.spec.pool.is_none() && owner.is_none_or(|o| dc.spec.user == o))
            .filter_map(|dc| {
                let id = dc.metadata.name.as_deref()?;
                let created = created_ms(dc).unwrap_or(0);
                let ledger = dc.status.as_ref()?.usage.clone().unwrap_or_default();
                let amount = ledger.within(now, since, until);
                if amount == UsageAmount::default() && !(since..until).contains(&created) {
                    return None;
                }
                Some(ClusterUsage {
                    cluster: names::public_name(&self.namespace, id),
                    owner: dc.spec.user.clone(),
                    group: dc.spec.settings.policy.clone(),
                    created,
                    amount,
                    cores_now: ledger.meter.cores,
                    memory_now: ledger.meter.memory,
                })
            })
            .collect();
        out.sort_by(|a, b| (a.created, &a.cluster).cmp(&(b.created, &b.cluster)));
        Ok(out)
    }

    async fn record_event(&self, name: &str, event: ClusterEvent) -> Result<(), BackendError> {
        let Some(id) = self.id(name) else {
            return Ok(());
        };
        let uid = self
            .lock()
            .clusters
            .get(id)
            .and_then(|dc| dc.cluster.metadata.uid.clone());
        let client = self.clusters_api.clone().into_client();
        crate::events::record(client, &self.namespace, id, uid, &event)
            .await
            .map_err(|e| api_error("create an Event", e))
    }

    async fn claim(
        &self,
        pool: &str,
        claim: NewCluster,
    ) -> Result<Option<ClusterView>, BackendError> {
        // Candidates from the cache, RUNNING first, then the oldest. Each is taken with an
        // update that carries the resourceVersion seen: if another replica claimed (or changed)
        // it meanwhile the API server refuses it with a conflict, and the next one is tried.
        let mut candidates: Vec<(bool, i64, Arc<DaskCluster>)> = {
            let cache = self.lock();
            cache
                .clusters
                .values()
                .filter(|e| {
                    e.cluster.spec.pool.as_deref() == Some(pool)
                        && e.cluster.spec.active
                        && !public_status(&e.cluster, &cache.secrets).is_terminal()
                })
                .map(|e| {
                    let running =
                        public_status(&e.cluster, &cache.secrets) == ClusterStatus::Running;
                    (
                        !running,
                        created_ms(&e.cluster).unwrap_or(0),
                        e.cluster.clone(),
                    )
                })
                .collect()
        };
        candidates.sort_by_key(|(not_running, created, _)| (*not_running, *created));
        for (_, _, dc) in candidates {
            let id = dc.name_any();
            // One JSON patch: the API server tests that the member is still unclaimed and
            // active and applies the rest in the same step (re-testing on a conflict), so
            // two replicas never hand one member to two users.
            let escape = |key: &str| key.replace('~', "~0").replace('/', "~1");
            let label = |key: &str| format!("/metadata/labels/{}", escape(key));
            let annotation = |key: &str| format!("/metadata/annotations/{}", escape(key));
            let patch: json_patch::Patch = serde_json::from_value(json!([
                {"op": "test", "path": "/spec/pool", "value": pool},
                {"op": "test", "path": "/spec/active", "value": true},
                {"op": "replace", "path": "/spec/user", "value": claim.owner},
                {"op": "replace", "path": "/spec/options", "value": claim.options},
                {"op": "replace", "path": "/spec/settings", "value": claim.settings},
                {"op": "remove", "path": "/spec/pool"},
                {"op": "remove", "path": label(names::LABEL_POOL)},
                {"op": "add", "path": label(names::LABEL_USER), "value": names::user_label(&claim.owner)},
                {"op": "add", "path": annotation(names::ANNOTATION_USER), "value": claim.owner},
                {"op": "add", "path": annotation(names::ANNOTATION_CREATED_MS), "value": now_ms().to_string()},
                // The claimer's cluster outlives an uninstall as user clusters do, unless
                // every cluster goes with the installation.
                {"op": "add", "path": "/metadata/ownerReferences", "value": self.claimed_owners()},
            ]))
            .expect("a well-formed JSON patch");
            self.counters.spec_patches.inc();
            match self
                .clusters_api
                .patch(&id, &PatchParams::default(), &Patch::Json::<()>(patch))
                .await
            {
                Ok(updated) => {
                    info!(cluster = %names::public_name(&self.namespace, &id), user = ?claim.owner, "warm scheduler claimed");
                    let mut cache = self.lock();
                    self.upsert(&mut cache, updated);
                    let e = &cache.clusters[&id];
                    return Ok(Some(self.view(&e.cluster, &cache.secrets)));
                }
                // 422: a test failed (claimed or stopped meanwhile); 404: gone. Next one.
                Err(kube::Error::Api(s)) if s.code == 422 || s.code == 404 || s.code == 409 => {
                    continue
                }
                Err(e) => return Err(api_error("claim a warm DaskCluster", e)),
            }
        }
        Ok(None)
    }

    async fn record_grant(&self, name: &str, grant: WorkerGrant) -> Result<(), BackendError> {
        self.patch_annotation(
            name,
            names::ANNOTATION_GRANTED_WORKERS,
            names::format_grant(grant),
        )
        .await
    }

    async fn record_client_activity(&self, name: &str, at_ms: i64) -> Result<(), BackendError> {
        self.patch_annotation(name, names::ANNOTATION_LAST_CLIENT_MS, at_ms.to_string())
            .await
    }

    async fn heartbeat(
        &self,
        name: &str,
        heartbeat: &Heartbeat,
        target_workers: u64,
    ) -> Result<(), BackendError> {
        let id = self
            .id(name)
            .ok_or_else(|| BackendError::NotFound(name.into()))?;
        let prefix = names::worker_pod_prefix(id);
        let mut retired: Vec<String> = heartbeat
            .closed_workers
            .iter()
            .filter(|w| w.starts_with(&prefix))
            .cloned()
            .collect();
        retired.sort();
        retired.dedup();
        retired.truncate(MAX_RETIRED);
        let replicas = target_workers.min(i32::MAX as u64) as i32;
        let patch = {
            let cache = self.lock();
            let e = cache
                .clusters
                .get(id)
                .ok_or_else(|| BackendError::NotFound(name.into()))?;
            let spec = &e.cluster.spec;
            let phase = e
                .cluster
                .status
                .as_ref()
                .map(|s| s.phase)
                .unwrap_or_default();
            if !spec.active || phase.is_terminal() || phase == Phase::Stopping {
                return Ok(());
            }
            let mut patch = serde_json::Map::new();
            if spec.replicas != replicas {
                patch.insert("replicas".into(), json!(replicas));
            }
            if spec.retired_workers != retired {
                patch.insert("retiredWorkers".into(), json!(retired));
            }
            patch
        };
        if patch.is_empty() {
            return Ok(());
        }
        self.patch_spec(id, serde_json::Value::Object(patch)).await
    }

    async fn stop(&self, name: &str, request: StopRequest) -> Result<(), BackendError> {
        let Some(id) = self.id(name) else {
            return Ok(());
        };
        {
            let cache = self.lock();
            let Some(e) = cache.clusters.get(id) else {
                return Ok(());
            };
            let phase = e
                .cluster
                .status
                .as_ref()
                .map(|s| s.phase)
                .unwrap_or_default();
            if !e.cluster.spec.active || phase.is_terminal() {
                return Ok(());
            }
        }
        info!(cluster = %name, reason = %request.reason, "stopping cluster");
        let stop = StopSpec {
            reason: request.reason,
            failed: request.failed,
        };
        if let Some(pool) = &request.if_pool {
            // Only while still unclaimed: the API server tests `spec.pool` and applies the
            // stop in one step, so a member another replica just handed out is left alone.
            let patch: json_patch::Patch = serde_json::from_value(json!([
                {"op": "test", "path": "/spec/pool", "value": pool},
                {"op": "replace", "path": "/spec/active", "value": false},
                {"op": "add", "path": "/spec/stop", "value": stop},
            ]))
            .expect("a well-formed JSON patch");
            self.counters.spec_patches.inc();
            return match self
                .clusters_api
                .patch(id, &PatchParams::default(), &Patch::Json::<()>(patch))
                .await
            {
                Ok(dc) => {
                    let mut cache = self.lock();
                    self.upsert(&mut cache, dc);
                    Ok(())
                }
                // 422: the test failed (claimed meanwhile); 404: gone. Either way not ours.
                Err(kube::Error::Api(s)) if s.code == 422 || s.code == 404 => Ok(()),
                Err(e) => Err(api_error("stop a warm DaskCluster", e)),
            };
        }
        match self
            .patch_spec(id, json!({"active": false, "stop": stop}))
            .await
        {
            Err(BackendError::NotFound(_)) => Ok(()),
            other => other,
        }
    }

    async fn healthy(&self) -> bool {
        self.is_synced()
    }

    fn register_metrics(&self, registry: &mut Registry) {
        let c = &self.counters;
        for (name, help, counter) in [
            (
                "kube_creates",
                "DaskClusters created by this gateway",
                &c.creates,
            ),
            (
                "kube_spec_patches",
                "DaskCluster spec patches (heartbeats, stops)",
                &c.spec_patches,
            ),
            (
                "kube_watch_errors",
                "Errors of the DaskCluster and Secret watches",
                &c.watch_errors,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        let cache = self.cache.clone();
        registry.register_collector(metrics::collector("kube caches", move |scrape| {
            let (clusters, secrets) = {
                let c = cache.lock().unwrap_or_else(|e| e.into_inner());
                (c.clusters.len() as u64, c.secrets.len() as u64)
            };
            scrape.gauges(
                "kube_cached_objects",
                "Objects in the gateway's watch caches",
                [
                    ([("kind", "daskcluster")], clusters),
                    ([("kind", "secret")], secrets),
                ],
            )
        }));
    }

    async fn shutdown(&self, stop_clusters: bool) {
        if !stop_clusters {
            info!("leaving clusters running; their DaskCluster objects keep them (stop_clusters_on_shutdown: false)");
            return;
        }
        let names: Vec<String> = self
            .list(None)
            .into_iter()
            .filter(|c| c.status.is_active())
            .map(|c| c.name)
            .collect();
        for name in &names {
            if let Err(e) = self
                .stop(name, StopRequest::stopped("the gateway shut down"))
                .await
            {
                warn!(cluster = %name, "stopping at shutdown: {e}");
            }
        }
        // Give a controller (ours, if it runs in this process) time to finish them.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
        while tokio::time::Instant::now() < deadline {
            let busy = names
                .iter()
                .any(|n| self.get(n).is_some_and(|c| !c.status.is_terminal()));
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
#[path = "backend_tests.rs"]
mod tests;
