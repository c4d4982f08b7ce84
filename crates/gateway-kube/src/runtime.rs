//! Running the controller: watch caches of the cluster's children, the kube-runtime
//! `Controller` over DaskClusters, and leader election around both.

use crate::config::KubeConfig;
use crate::controller::{error_policy, reconcile, Context, ControllerSettings};
use crate::crd::DaskCluster;
use crate::leader::LeaderElection;
use crate::lean::LeanPod;
use crate::limiter::RateLimiter;
use crate::metrics::LiveContext;
use crate::names;
use crate::pod_cache::pod_cache;
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tracing::{info, warn};

/// Why the controller could not run.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The DaskCluster CRD is not installed, or we may not list DaskClusters.
    #[error(transparent)]
    Crd(#[from] CrdError),
}

/// Why DaskClusters cannot be used in a namespace (checked once at start-up).
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The API server does not serve the DaskCluster resource.
    #[error("the DaskCluster CRD ({name}) is not installed: install it with the Helm chart (crds.install: true) or `kubectl apply -f manifests/dask-gateway-rs.yaml`, then restart the gateway")]
    NotInstalled {
        /// The CRD's name.
        name: String,
    },
    /// RBAC does not allow listing DaskClusters.
    #[error("the gateway may not list DaskClusters in namespace {namespace}: grant it the chart's Role (rbac.create: true, or templates/rbac.yaml)")]
    Forbidden {
        /// The namespace.
        namespace: String,
    },
    /// Anything else (API server unreachable, ...).
    #[error("cannot list DaskClusters in namespace {namespace}: {source}")]
    Api {
        /// The namespace.
        namespace: String,
        /// The API error.
        source: kube::Error,
    },
}

/// Checks that DaskClusters can be listed in `namespace`: the CRD is installed and RBAC allows
/// it. A missing CRD and a refusal get errors that say how to fix them.
pub async fn check_crd(client: &Client, namespace: &str) -> Result<(), CrdError> {
    let result = Api::<DaskCluster>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().limit(1))
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(CrdError::NotInstalled {
            name: format!("daskclusters.{}", crate::crd::GROUP),
        }),
        Err(kube::Error::Api(s)) if s.code == 403 => Err(CrdError::Forbidden {
            namespace: namespace.to_string(),
        }),
        Err(source) => Err(CrdError::Api {
            namespace: namespace.to_string(),
            source,
        }),
    }
}

/// How long a change of a child (a pod's status, mostly) may wait to trigger its cluster's pass,
/// so that the changes of many children in that time trigger one pass. A 100-worker scale-up
/// brings about 500 pod changes in ~20 s, and each pass looks at every pod of the cluster: one
/// pass per change made the controller's CPU grow with the square of the workers. A change
/// after a quiet spell (the scheduler turning ready, a worker failing) waits for nothing; see
/// [`forward_in_batches`].
const TRIGGER_BATCH: Duration = Duration::from_millis(250);

/// Events read at the end of a batch's window between two yields to the runtime.
const DRAIN_YIELD_EVERY: usize = 256;

/// How long the end of a batch's window waits for the next event before it counts the batch as
/// read. What a watch has received is usually there at once; over HTTP/1.1, though, the
/// connection's task reads the socket only when asked, a moment after the first poll.
const DRAIN_GRACE: Duration = Duration::from_millis(2);

/// How long the end of a batch's window reads at most: events that keep coming (a burst of
/// thousands of pods) go to the next batch, so that this one's triggers are not held back.
const DRAIN_AT_MOST: Duration = Duration::from_millis(25);

/// A cache of objects of this installation, filled by a watch in its own task (spawned in
/// `tasks`) that hands each event to `apply` (a cache's writer), and the stream of changed
/// objects that triggers the controller. The watch does not depend on the controller polling
/// it, so the cache completes its first listing before the controller starts (a controller
/// that reconciled on a half-filled cache would create children that exist). Changes are
/// passed on in batches of [`TRIGGER_BATCH`], one per owner, and the watch is read once per
/// batch (see [`forward_in_batches`]): a pass reads the cache, which holds every change its
/// trigger names, so only the number of passes changes. A pass started otherwise (a
/// DaskCluster's change, a requeue) may find the cache up to a batch behind, as a watch always
/// may be: the controller remembers its own creations and deletions until the cache shows them.
fn watch_into<K>(
    api: Api<K>,
    selector: &str,
    tasks: &mut JoinSet<()>,
    mut apply: impl FnMut(&watcher::Event<K>) + Send + 'static,
) -> impl futures_util::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let events = watcher(api, watcher::Config::default().labels(selector))
        .default_backoff()
        .modify(|obj: &mut K| obj.meta_mut().managed_fields = None)
        .inspect_ok(move |event| apply(event));
    tasks.spawn(forward_in_batches(events, tx, TRIGGER_BATCH));
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (event, rx))
    })
}

/// For [`watch_into`]: applies a watch's events to the kube-runtime
/// [`Store`](reflector::Store) of `writer`.
fn into_store<K>(mut writer: Writer<K>) -> impl FnMut(&watcher::Event<K>) + Send + 'static
where
    K: kube::Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    move |event| writer.apply_watcher_event(event)
}

/// Passes the changes of a watch's `events` on to `tx` in batches of `window`, one change per
/// owner ([`TriggerBatch`]), until either side ends. The first change after a quiet spell
/// (nothing passed on for `window`) goes on at once, and the changes within `window` after it
/// wait for the batch; a steady stream of changes goes on once per `window`.
///
/// `events` is not polled while a batch waits: the changes of its window are read when it
/// ends, all at once, as far as they have arrived. A watch's events are read (and applied to
/// its cache) when its stream is polled, so a burst of pod changes is read in one go per
/// window instead of one wake-up, read and decode each as it arrives; the cache is as current
/// as the triggers, which only ever name changes already in it. A listing under way (the
/// first, or again after the watch lost its place) is read as it comes: the watcher asks for
/// each page only once the last one has been read.
///
/// The listing is followed in the events themselves (`Init` to `InitDone`), not by waiting on
/// the cache's readiness: a kube-runtime [`Store`](reflector::Store)'s `wait_until_ready`
/// wakes only the last task that polled it, and `run_term` waits on it too.
async fn forward_in_batches<K, S>(
    events: S,
    tx: tokio::sync::mpsc::UnboundedSender<Result<K, watcher::Error>>,
    window: Duration,
) where
    K: kube::Resource,
    S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut changes = Changes {
        events: Box::pin(events),
        listing: false,
    };
    let mut last_sent: Option<tokio::time::Instant> = None;
    while let Some(first) = changes.next().await {
        let mut batch = TriggerBatch::default();
        if last_sent.is_none_or(|t| t.elapsed() >= window) {
            if tx.send(first).is_err() {
                return;
            }
        } else {
            batch.add(first);
        }
        let until = tokio::time::sleep(window);
        tokio::pin!(until);
        let mut ended = false;
        while changes.listing && !ended {
            tokio::select! {
                change = changes.next() => match change {
                    Some(change) => batch.add(change),
                    None => ended = true,
                },
                () = &mut until => break,
            }
        }
        if !ended {
            until.await;
            ended = changes.drain_into(&mut batch).await;
        }
        for event in batch.events {
            if tx.send(event).is_err() {
                return;
            }
        }
        if ended {
            return;
        }
        last_sent = Some(tokio::time::Instant::now());
    }
}

/// A watch's events, reflected into its cache, as changed objects; `Init` and `InitDone` only
/// mark a listing under way.
struct Changes<S> {
    events: std::pin::Pin<Box<S>>,
    /// Between `Init` and `InitDone`.
    listing: bool,
}

impl<K, S> Changes<S>
where
    S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    /// The next changed object (or watch error); `None` once the watch ended. Cancel safe.
    async fn next(&mut self) -> Option<Result<K, watcher::Error>> {
        loop {
            match self.events.next().await? {
                Ok(
                    watcher::Event::Apply(obj)
                    | watcher::Event::InitApply(obj)
                    | watcher::Event::Delete(obj),
                ) => return Some(Ok(obj)),
                Ok(watcher::Event::Init) => self.listing = true,
                Ok(watcher::Event::InitDone) => self.listing = false,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Reads what arrived into `batch`, until nothing more comes within [`DRAIN_GRACE`], for at
    /// most [`DRAIN_AT_MOST`]; whether the watch ended. Outside the runtime's budget of work per
    /// poll, which would otherwise cut a large burst short (the rest waiting for the next
    /// window); a yield now and then lets other tasks run.
    async fn drain_into(&mut self, batch: &mut TriggerBatch<K>) -> bool
    where
        K: kube::Resource,
    {
        let drain_ends = tokio::time::Instant::now() + DRAIN_AT_MOST;
        let mut read = 0usize;
        loop {
            let until = drain_ends.min(tokio::time::Instant::now() + DRAIN_GRACE);
            match tokio::time::timeout_at(until, tokio::task::unconstrained(self.next())).await {
                Ok(Some(change)) => batch.add(change),
                Ok(None) => return true,
                Err(_) => return false,
            }
            read += 1;
            if read.is_multiple_of(DRAIN_YIELD_EVERY) {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// The changes of one [`TRIGGER_BATCH`]: the last changed object of each owner (what the
/// controller maps a change to), and every watch error.
struct TriggerBatch<K> {
    events: Vec<Result<K, watcher::Error>>,
    /// Owner uid (or, for an object without owner, its own name) -> index in `events`.
    by_owner: std::collections::HashMap<String, usize>,
}

impl<K> Default for TriggerBatch<K> {
    fn default() -> Self {
        TriggerBatch {
            events: Vec::new(),
            by_owner: std::collections::HashMap::new(),
        }
    }
}

impl<K: kube::Resource> TriggerBatch<K> {
    fn add(&mut self, event: Result<K, watcher::Error>) {
        let Ok(obj) = &event else {
            self.events.push(event);
            return;
        };
        let meta = obj.meta();
        let key = match meta.owner_references.as_deref() {
            Some([owner, ..]) => owner.uid.clone(),
            _ => format!("/{}", meta.name.as_deref().unwrap_or_default()),
        };
        match self.by_owner.get(&key) {
            Some(&i) => self.events[i] = event,
            None => {
                self.by_owner.insert(key, self.events.len());
                self.events.push(event);
            }
        }
    }
}

/// Runs the controller once (this process leads): caches, then reconciles until `shutdown`.
///
/// The term's tasks (the three cache watches and the sweeper of finished clusters) live in a
/// [`JoinSet`] owned by this future, which aborts them when it drops: when the term ends, and
/// also when leader election drops the term because the lease was lost (another replica leads
/// then, and must be the only one that watches, deletes and records). The Event recordings its
/// passes start are aborted with it too.
async fn run_term(
    client: Client,
    config: KubeConfig,
    namespace: String,
    live: LiveContext,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let mut tasks = JoinSet::new();
    let selector = names::instance_selector(&config.instance);
    // Pods are read one cluster at a time (see `crate::pod_cache`).
    let (pods, mut pod_writer) = pod_cache();
    let pod_events = watch_into(
        Api::<LeanPod>::namespaced(client.clone(), &namespace),
        &selector,
        &mut tasks,
        move |event| pod_writer.apply_watcher_event(event),
    );
    let (secrets, secret_writer) = reflector::store();
    let secret_events = watch_into(
        Api::<Secret>::namespaced(client.clone(), &namespace),
        &selector,
        &mut tasks,
        into_store(secret_writer),
    );
    let (services, service_writer) = reflector::store();
    let service_events = watch_into(
        Api::<Service>::namespaced(client.clone(), &namespace),
        &selector,
        &mut tasks,
        into_store(service_writer),
    );
    for (what, ready) in [
        ("pods", pods.wait_until_ready().await),
        ("secrets", secrets.wait_until_ready().await.is_ok()),
        ("services", services.wait_until_ready().await.is_ok()),
    ] {
        if !ready {
            warn!("the {what} cache stopped before its first listing");
            return;
        }
    }
    let ctx = Arc::new(Context::new(
        client.clone(),
        pods,
        secrets,
        services,
        RateLimiter::new(config.api_qps, config.api_burst)
            .counting_in(live.metrics().api_writes.clone())
            .waiting_in(live.metrics().api_writes_waiting.clone()),
        ControllerSettings {
            namespace: namespace.clone(),
            instance: config.instance.clone(),
            worker_batch: config.worker_batch,
            record_events: true,
            retention: Duration::from_secs_f64(config.completed_cluster_max_age),
        },
        live.metrics().clone(),
    ));
    // The term's Event recordings end with it, however it ends (a lost lease drops it).
    let _events = AbortEventsOnDrop(ctx.clone());
    let _leading = live.lead();
    // Finished clusters left the cache: delete them past the retention from here.
    {
        let (ctx, ns) = (ctx.clone(), namespace.clone());
        let retention = Duration::from_secs_f64(config.completed_cluster_max_age);
        let every = (retention / 10).clamp(Duration::from_secs(10), Duration::from_secs(600));
        tasks.spawn(async move {
            loop {
                match crate::controller::sweep_finished(&ctx, &ns, retention).await {
                    Ok(0) => {}
                    Ok(n) => info!(
                        deleted = n,
                        "deleted finished clusters past their retention"
                    ),
                    Err(e) => warn!("sweeping finished clusters: {e}"),
                }
                tokio::time::sleep(every).await;
            }
        });
    }
    info!(namespace = %namespace, instance = %config.instance, "DaskCluster controller started");
    // DaskClusters as the controller caches them: slimmed (see `crd::slim_for_controller`).
    let (clusters, writer) = reflector::store();
    let cluster_events = watcher(
        Api::<DaskCluster>::namespaced(client, &namespace),
        watcher::Config::default().labels(&names::active_selector(&config.instance)),
    )
    .default_backoff()
    .modify(crate::crd::slim_for_controller)
    .reflect(writer)
    .applied_objects();
    Controller::for_stream(cluster_events, clusters)
        .owns_stream(pod_events)
        .owns_stream(secret_events)
        .owns_stream(service_events)
        .with_config(ControllerConfig::default().concurrency(config.reconcile_concurrency))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
    tasks.abort_all();
    info!("DaskCluster controller stopped");
}

/// Aborts a term's Event recordings when dropped (see [`Context::abort_event_tasks`]).
struct AbortEventsOnDrop(Arc<Context>);

impl Drop for AbortEventsOnDrop {
    fn drop(&mut self) {
        self.0.abort_event_tasks();
    }
}

/// The controller's leader-election Lease of the installation `instance`.
pub fn lease_name(instance: &str) -> String {
    format!("{instance}-controller")
}

/// How long the controller waits after its first failed check of DaskClusters before the
/// next; each further wait doubles, up to [`START_RETRY_AT_MOST`].
const START_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two checks of DaskClusters at the controller's start.
const START_RETRY_AT_MOST: Duration = Duration::from_secs(30);

/// Runs the controller for `namespace` until `shutdown` resolves: checks that DaskClusters
/// can be listed, then (with leader election unless disabled) runs terms of leadership.
///
/// A missing CRD or a refusal by RBAC ends it with an error at once: it needs an operator.
/// Any other failure of the check (the API server unreachable, restarting or overloaded) is
/// logged and the check tried again, after 1 s, then 2 s, ... up to every 30 s, until it
/// passes or `shutdown` resolves: a controller that gave up on a passing outage would leave
/// the gateway taking clusters that never start.
pub async fn run_controller(
    client: Client,
    config: KubeConfig,
    namespace: String,
    live: LiveContext,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    let mut shutdown = Box::pin(shutdown);
    let mut wait = START_RETRY_FIRST;
    loop {
        match check_crd(&client, &namespace).await {
            Ok(()) => break,
            Err(e @ CrdError::Api { .. }) => {
                warn!(
                    "the DaskCluster controller cannot start yet ({e}); trying again in {wait:?}"
                );
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(START_RETRY_AT_MOST);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    };
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    tokio::pin!(shutdown);
    if !config.leader_election {
        let term = run_term(client, config, namespace, live, stopped());
        tokio::pin!(term);
        tokio::select! {
            _ = &mut term => {}
            _ = &mut shutdown => {
                // The term stops on the same signal: let it finish its passes in flight.
                let _ = tokio::time::timeout(crate::leader::STOP_GRACE, &mut term).await;
            }
        }
        return Ok(());
    }
    let identity = format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "gateway".into()),
        gateway_backend::new_cluster_id().get(..8).unwrap_or("0")
    );
    let lease = lease_name(&config.instance);
    let election = LeaderElection::new(client.clone(), &namespace, &lease, &identity);
    let term = || {
        run_term(
            client.clone(),
            config.clone(),
            namespace.clone(),
            live.clone(),
            stopped(),
        )
    };
    election.run(term, shutdown).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        forward_in_batches, run_controller, run_term, ControllerError, CrdError, LiveContext,
        TriggerBatch, DRAIN_AT_MOST, DRAIN_GRACE,
    };
    use crate::config::KubeConfig;
    use crate::crd::{GROUP, VERSION};
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use kube::runtime::watcher;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn pod(name: &str, owner: Option<&str>, version: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(version.into()),
                owner_references: owner.map(|uid| {
                    vec![OwnerReference {
                        uid: uid.into(),
                        ..OwnerReference::default()
                    }]
                }),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    fn version(event: &Result<Pod, watcher::Error>) -> &str {
        event
            .as_ref()
            .unwrap()
            .metadata
            .resource_version
            .as_deref()
            .unwrap()
    }

    /// A pod's change as a watch reports it.
    fn applied(pod: Pod) -> Result<watcher::Event<Pod>, watcher::Error> {
        Ok(watcher::Event::Apply(pod))
    }

    /// Where a test sends watch events to `forward_in_batches`.
    type ChangesIn =
        tokio::sync::mpsc::UnboundedSender<Result<watcher::Event<Pod>, watcher::Error>>;
    /// Where a test receives what `forward_in_batches` passed on.
    type ChangesOut = tokio::sync::mpsc::UnboundedReceiver<Result<Pod, watcher::Error>>;

    /// Watch events sent to `forward_in_batches` (over `window`) in a task of its own: the
    /// sender of the events, the receiver of what it passes on, and how often it has polled
    /// the events.
    fn batching(window: Duration) -> (ChangesIn, ChangesOut, Arc<AtomicUsize>) {
        let (changes, mut changes_rx) = tokio::sync::mpsc::unbounded_channel();
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        let events = futures_util::stream::poll_fn(move |cx| {
            counted.fetch_add(1, Ordering::SeqCst);
            changes_rx.poll_recv(cx)
        });
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(forward_in_batches(events, tx, window));
        (changes, rx, polls)
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_after_a_quiet_spell_goes_on_at_once_and_a_burst_in_one_batch() {
        use tokio::time::{timeout, Instant};
        let window = Duration::from_millis(250);
        let (changes, mut rx, _) = batching(window);
        let owner = Some("cluster-a");
        // The first change goes on at once.
        let start = Instant::now();
        changes.send(applied(pod("w1", owner, "1"))).unwrap();
        assert_eq!(version(&rx.recv().await.unwrap()), "1");
        assert_eq!(start.elapsed(), Duration::ZERO);
        // The changes right after it wait for the end of its window, and go on as one.
        changes.send(applied(pod("w2", owner, "2"))).unwrap();
        changes.send(applied(pod("w3", owner, "3"))).unwrap();
        assert_eq!(version(&rx.recv().await.unwrap()), "3");
        assert_eq!(start.elapsed(), window + DRAIN_GRACE);
        // A change right after a batch is part of a steady stream: it waits for a window too.
        changes.send(applied(pod("w4", owner, "4"))).unwrap();
        assert!(timeout(window / 2, rx.recv()).await.is_err());
        assert_eq!(version(&rx.recv().await.unwrap()), "4");
        // After a quiet spell, a change goes on at once again.
        tokio::time::sleep(window * 4).await;
        let quiet = Instant::now();
        changes.send(applied(pod("w5", owner, "5"))).unwrap();
        assert_eq!(version(&rx.recv().await.unwrap()), "5");
        assert_eq!(quiet.elapsed(), Duration::ZERO);
    }

    /// A watch is read when its stream is polled: while a batch waits, the stream is left
    /// alone, and at the window's end everything that arrived is read at once, however much
    /// (more than the runtime's budget of work per poll, here 1,000 changes).
    #[tokio::test(start_paused = true)]
    async fn a_batch_reads_what_arrived_in_its_window_at_its_end_all_at_once() {
        use tokio::time::Instant;
        let window = Duration::from_millis(250);
        let (changes, mut rx, polls) = batching(window);
        let start = Instant::now();
        changes
            .send(applied(pod("first", Some("cluster-0"), "0")))
            .unwrap();
        assert_eq!(version(&rx.recv().await.unwrap()), "0");
        tokio::task::yield_now().await;
        let polled = polls.load(Ordering::SeqCst);
        for i in 1..=1000 {
            let owner = format!("cluster-{i}");
            changes
                .send(applied(pod("w", Some(&owner), &i.to_string())))
                .unwrap();
        }
        tokio::time::sleep(window / 2).await;
        assert_eq!(
            polls.load(Ordering::SeqCst),
            polled,
            "polled during the window"
        );
        for i in 1..=1000 {
            assert_eq!(version(&rx.recv().await.unwrap()), i.to_string());
            assert_eq!(
                start.elapsed(),
                window + DRAIN_GRACE,
                "change {i} came late"
            );
        }
    }

    /// A listing under way (from `Init` to `InitDone`) is read as it comes, its changes still
    /// passed on as one batch: the watcher asks for a listing's next page only once it has read
    /// the last. After `InitDone`, the watch is left alone during a window again.
    #[tokio::test(start_paused = true)]
    async fn a_listing_is_read_as_it_comes_and_passed_on_in_a_batch() {
        use tokio::time::Instant;
        let window = Duration::from_millis(250);
        let (changes, mut rx, polls) = batching(window);
        let listed = |i: u32| {
            Ok(watcher::Event::InitApply(pod(
                "w",
                Some("cluster-a"),
                &i.to_string(),
            )))
        };
        let start = Instant::now();
        changes.send(Ok(watcher::Event::Init)).unwrap();
        changes.send(listed(1)).unwrap();
        assert_eq!(version(&rx.recv().await.unwrap()), "1");
        assert_eq!(start.elapsed(), Duration::ZERO);
        // The next page, mid-window: read as it comes, passed on at the window's end.
        tokio::time::sleep(window / 5).await;
        let before = polls.load(Ordering::SeqCst);
        changes.send(listed(2)).unwrap();
        changes.send(listed(3)).unwrap();
        changes.send(Ok(watcher::Event::InitDone)).unwrap();
        tokio::task::yield_now().await;
        assert!(
            polls.load(Ordering::SeqCst) >= before + 3,
            "the listing was not read as it came"
        );
        assert_eq!(version(&rx.recv().await.unwrap()), "3");
        assert_eq!(start.elapsed(), window + DRAIN_GRACE);
        // Listed: a change right after waits for a window, unread until its end.
        changes
            .send(applied(pod("w", Some("cluster-a"), "4")))
            .unwrap();
        tokio::task::yield_now().await;
        let polled = polls.load(Ordering::SeqCst);
        tokio::time::sleep(window / 2).await;
        assert_eq!(
            polls.load(Ordering::SeqCst),
            polled,
            "polled during the window"
        );
        assert_eq!(version(&rx.recv().await.unwrap()), "4");
        assert_eq!(start.elapsed(), (window + DRAIN_GRACE) * 2);
    }

    /// Changes that keep coming at the end of a window (every millisecond, within the grace)
    /// are read for at most `DRAIN_AT_MOST`: the batch then goes on, and the rest wait for the
    /// next one.
    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_does_not_hold_a_batch_back() {
        use tokio::time::Instant;
        let window = Duration::from_millis(250);
        let (changes, mut rx, _) = batching(window);
        let start = Instant::now();
        tokio::spawn(async move {
            for i in 0..1000 {
                let owner = format!("cluster-{i}");
                if changes
                    .send(applied(pod("w", Some(&owner), &i.to_string())))
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        assert_eq!(version(&rx.recv().await.unwrap()), "0");
        // The batch: everything read until the drain had read for DRAIN_AT_MOST.
        let first: u32 = version(&rx.recv().await.unwrap()).parse().unwrap();
        let sent = start.elapsed();
        let mut last = first;
        while let Ok(event) = rx.try_recv() {
            last = version(&event).parse().unwrap();
        }
        assert_eq!(first, 1);
        assert!(sent >= window + DRAIN_AT_MOST, "{sent:?}");
        assert!(sent <= window + DRAIN_AT_MOST + DRAIN_GRACE, "{sent:?}");
        assert!(last >= 270, "the batch ended at change {last}");
    }

    #[test]
    fn a_batch_keeps_the_last_change_per_owner_and_every_error() {
        let mut batch = TriggerBatch::default();
        batch.add(Ok(pod("w1", Some("cluster-a"), "1")));
        batch.add(Ok(pod("w2", Some("cluster-b"), "2")));
        batch.add(Err(watcher::Error::NoResourceVersion));
        batch.add(Ok(pod("w3", Some("cluster-a"), "3")));
        batch.add(Ok(pod("lone", None, "4")));
        batch.add(Ok(pod("lone", None, "5")));
        batch.add(Ok(pod("other", None, "6")));
        let events = batch.events;
        assert_eq!(events.len(), 5);
        assert_eq!(version(&events[0]), "3", "cluster-a: its latest pod change");
        assert_eq!(version(&events[1]), "2");
        assert!(events[2].is_err(), "errors are all kept");
        assert_eq!(
            version(&events[3]),
            "5",
            "an ownerless object: its own latest"
        );
        assert_eq!(version(&events[4]), "6");
    }

    /// Answers a listing of `resource` (the last part of `call`'s path) with no objects.
    fn list_nothing(call: crate::mock_api::Call, resource: &str) {
        let (api_version, kind) = match resource {
            "pods" => ("v1".to_string(), "PodList"),
            "secrets" => ("v1".to_string(), "SecretList"),
            "services" => ("v1".to_string(), "ServiceList"),
            "daskclusters" => (format!("{GROUP}/{VERSION}"), "DaskClusterList"),
            other => panic!("unexpected request for {other}: {}", call.path),
        };
        call.ok(json!({"apiVersion": api_version, "kind": kind,
                       "metadata": {"resourceVersion": "1"}, "items": []}));
    }

    /// A term polled by nothing but its own wake-ups (in a task of its own, as when the lease
    /// is not renewed meanwhile) starts its controller once the caches have listed: the
    /// controller's DaskCluster watch comes. A wake-up lost while the term waits for the
    /// caches (a second task waiting on a store's readiness takes it) would leave it waiting.
    #[tokio::test]
    async fn a_term_starts_its_controller_once_its_caches_have_listed() {
        let (client, mut api) = crate::mock_api::pair();
        let config = KubeConfig {
            instance: "gw".into(),
            ..KubeConfig::default()
        };
        let never = std::future::pending::<()>();
        let term = tokio::spawn(run_term(
            client,
            config,
            "dask".into(),
            LiveContext::default(),
            never,
        ));
        let serve = async {
            let mut watches = Vec::new();
            loop {
                let call = api.next().await;
                let resource = call.path.rsplit('/').next().unwrap_or_default().to_string();
                if call.query.contains("watch=true") {
                    if resource == "daskclusters" {
                        return watches;
                    }
                    watches.push(call); // held unanswered: the watch stays open
                    continue;
                }
                list_nothing(call, &resource);
            }
        };
        // The mocked API server fails the test if no further request comes within its wait.
        let watches = serve.await;
        assert_eq!(watches.len(), 3, "the three caches watch");
        term.abort();
    }

    /// Leader election drops a term's future when the lease is lost: the term's tasks must go
    /// with it. Every one of them (the three cache watches, the sweeper of finished clusters)
    /// holds a clone of the API client, and the test holds none, so once they are all gone
    /// the mocked API server sees its client dropped; a task left running would keep it (and
    /// keep watching, or sweep, while another replica leads).
    #[tokio::test]
    async fn a_dropped_term_aborts_its_watches_and_its_sweeper() {
        let (client, mut api) = crate::mock_api::pair();
        let live = LiveContext::default();
        let config = KubeConfig {
            instance: "gw".into(),
            ..KubeConfig::default()
        };
        let never = std::future::pending::<()>();
        let mut term = Box::pin(run_term(client, config, "dask".into(), live.clone(), never));
        // Serve the term until every task has shown up: the four watches (the three caches
        // and the controller's DaskClusters) and the sweeper's listing of finished clusters.
        let serve = async {
            let mut watches = Vec::new();
            let mut swept = false;
            while watches.len() < 4 || !swept {
                let call = api.next().await;
                if call.query.contains("watch=true") {
                    watches.push(call); // held unanswered: the watch stays open
                    continue;
                }
                let resource = call.path.rsplit('/').next().unwrap_or_default().to_string();
                swept |= resource == "daskclusters" && call.query.contains("finished%3Dtrue");
                list_nothing(call, &resource);
            }
            watches
        };
        let watches = tokio::select! {
            () = &mut term => panic!("the term ended by itself"),
            watches = serve => watches,
        };
        assert!(live.leading());

        drop(term);
        assert!(!live.leading());
        let next = tokio::time::timeout(Duration::from_secs(2), api.0.next_request()).await;
        match next {
            Ok(None) => {}
            Ok(Some((req, _))) => panic!(
                "a task of the dropped term still made {} {}",
                req.method(),
                req.uri()
            ),
            Err(_) => panic!("a task of the dropped term still holds the API client"),
        }
        drop(watches);
    }

    /// The API server failing the start's check of DaskClusters (restarting, overloaded) does
    /// not end the controller: it checks again, 1 s and then 2 s later, and once the check
    /// passes it goes on to lead and watch. It stops, with no error, when told to.
    #[tokio::test(start_paused = true)]
    async fn the_controller_waits_out_an_api_server_that_fails_at_its_start() {
        let (client, mut api) = crate::mock_api::pair();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = KubeConfig {
            instance: "gw".into(),
            leader_election: false,
            ..KubeConfig::default()
        };
        let controller = tokio::spawn(run_controller(
            client,
            config,
            "dask".into(),
            LiveContext::default(),
            async {
                let _ = stopped.await;
            },
        ));
        let start = tokio::time::Instant::now();
        let mut checks = Vec::new();
        for answer in [503, 500, 200] {
            let call = api.next().await;
            assert!(call.path.ends_with("/daskclusters"), "{}", call.path);
            assert!(call.query.contains("limit=1"), "{}", call.query);
            checks.push(start.elapsed().as_secs());
            match answer {
                200 => list_nothing(call, "daskclusters"),
                code => call.status(code, "the API server is restarting"),
            }
        }
        assert_eq!(checks, [0, 1, 3]);
        // It went on: the caches list and watch.
        let call = api.next().await;
        assert!(!call.path.ends_with("/daskclusters"), "{}", call.path);
        stop.send(()).unwrap();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), controller).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    }

    /// A missing CRD and a refusal are not waited out: they need an operator, and the error
    /// says what to do.
    #[tokio::test]
    async fn a_missing_crd_or_a_refusal_ends_the_controller_at_once() {
        for (code, want) in [
            (404, "is not installed"),
            (403, "may not list DaskClusters"),
        ] {
            let (client, mut api) = crate::mock_api::pair();
            let controller = tokio::spawn(run_controller(
                client,
                KubeConfig::default(),
                "dask".into(),
                LiveContext::default(),
                std::future::pending(),
            ));
            api.next().await.status(code, "no");
            let result = controller.await.unwrap();
            let Err(ControllerError::Crd(
                e @ (CrdError::NotInstalled { .. } | CrdError::Forbidden { .. }),
            )) = result
            else {
                panic!("{code}: {result:?}");
            };
            assert!(e.to_string().contains(want), "{e}");
        }
    }
}
