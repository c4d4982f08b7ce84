//! The local backend's lifecycle engine: every cluster's scheduler and workers as processes on
//! this machine, with their state in SQLite.
//!
//! Events only record what was observed: a heartbeat (addresses, wanted worker count, which
//! workers the scheduler reports active, closing or gone), a process exit, a stop request, the
//! passing of time. After each event one function, [`LocalBackend::reconcile`], compares what a
//! cluster should be with what was observed and decides what to do: fail it on a timeout, start
//! missing workers, terminate surplus or retired ones, tear a stopping cluster down. Work that
//! waits (terminating processes) runs after the state lock is released.
//!
//! Every change of a cluster's durable record is written to the [`Store`] before the lock is
//! released, so nothing becomes visible that a restarted gateway would not know.

use crate::launch::{LocalError, Processes, SchedulerSpec, WorkerSpec};
use crate::process::{ProcessExit, ProcessId, ProcessRole};
use crate::store::{ClusterRecord, Store, StoreError, UsageKey, WorkerRecord};
use gateway_backend::metrics::{self, Counter, Registry};
use gateway_backend::{
    new_api_token, new_cluster_id, BackendError, ClusterBackend, ClusterCredentials, ClusterTiming,
    ClusterView, NewCluster, SchedulerAddresses, StopRequest, TlsPair, WorkerGrant,
};
use gateway_model::{
    ClusterEvent, ClusterStatus, ClusterUsage, EventType, Heartbeat, RunningUnit, UsageMeter,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

/// Workers started per reconcile (a large scale-up continues on the next sweep, so the state
/// lock is never held for long).
const START_BATCH: usize = 16;

/// Timing and failure rules of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The clusters' timing: a scheduler that has not sent its first heartbeat after its
    /// `start_timeout` fails the cluster, so does a RUNNING cluster without a heartbeat for its
    /// `heartbeat_timeout`, and so do `worker_start_failure_limit` consecutive worker failures
    /// (start errors or unexpected exits).
    pub timing: ClusterTiming,
    /// How long finished clusters stay listable.
    pub retention: Duration,
    /// Grace between SIGTERM and SIGKILL when stopping processes.
    pub stop_grace: Duration,
    /// How often timeouts are checked and large scale-ups continued.
    pub sweep_period: Duration,
    /// How long usage (hourly core- and memory-seconds per cluster) is kept (zero: forever).
    pub usage_retention: Duration,
    /// The gateway API URL schedulers are started with (`DASK_GATEWAY_API_URL`), recorded with
    /// each cluster so that a restart on another URL can say why old schedulers fall silent.
    pub api_url: Option<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            timing: ClusterTiming::default(),
            retention: Duration::from_secs(86400),
            stop_grace: Duration::from_secs(5),
            sweep_period: Duration::from_secs(1),
            usage_retention: Duration::from_secs(400 * 86400),
            api_url: None,
        }
    }
}

/// A worker process, as far as the gateway knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WorkerState {
    /// Started, not yet reported active by the scheduler.
    Starting,
    /// Reported active.
    Running,
    /// Being retired by the scheduler; its exit is expected.
    Closing,
    /// The scheduler reports it gone; it still has to be terminated.
    Retired,
    /// Termination was issued; its exit is expected.
    Stopping,
}

impl WorkerState {
    /// Every state, for metrics.
    const ALL: [WorkerState; 5] = [
        WorkerState::Starting,
        WorkerState::Running,
        WorkerState::Closing,
        WorkerState::Retired,
        WorkerState::Stopping,
    ];

    fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Running => "running",
            WorkerState::Closing => "closing",
            WorkerState::Retired => "retired",
            WorkerState::Stopping => "stopping",
        }
    }

    /// Counts towards the wanted number of workers.
    fn is_live(self) -> bool {
        matches!(self, WorkerState::Starting | WorkerState::Running)
    }

    /// Its exit is expected (not a failure).
    fn exit_expected(self) -> bool {
        matches!(
            self,
            WorkerState::Closing | WorkerState::Retired | WorkerState::Stopping
        )
    }
}

#[derive(Debug)]
struct Worker {
    process: ProcessId,
    state: WorkerState,
    /// When it was started, ms since the Unix epoch (0: adopted after a restart, so already
    /// counted in the stored usage rate).
    started_ms: i64,
}

/// One cluster: its durable record plus what only this gateway run observes.
struct Cluster {
    record: ClusterRecord,
    workers: HashMap<String, Worker>,
    /// When the last heartbeat arrived (or the cluster was created or re-adopted), moved on
    /// by any time the gateway itself stood still (see [`LocalBackend::reconcile`]).
    last_heartbeat: Instant,
    /// When the cluster was last reconciled: every sweep does, so a longer gap means the
    /// gateway itself did not run.
    last_reconciled: Instant,
    /// The API URL its scheduler reports to, when this gateway no longer serves it (set at
    /// re-adoption, cleared by the first heartbeat: the old URL still reaches us then).
    reports_elsewhere: Option<String>,
    /// When the cluster was created (or re-adopted while PENDING).
    pending_since: Instant,
    /// Worker start failures and unexpected exits in a row.
    worker_failures: u32,
    /// A teardown task runs (STOPPING); never start a second one.
    tearing_down: bool,
    /// Status updates for `?wait` and DELETE.
    status_tx: watch::Sender<ClusterStatus>,
    /// The workers the API last granted within the owner's quotas (kept in memory: after a
    /// restart the target stands for it).
    grant: Option<WorkerGrant>,
    /// Usage accounting as last stored.
    meter: UsageMeter,
}

impl Cluster {
    fn new(record: ClusterRecord) -> Self {
        let (status_tx, _) = watch::channel(record.status);
        Cluster {
            record,
            workers: HashMap::new(),
            last_heartbeat: Instant::now(),
            last_reconciled: Instant::now(),
            reports_elsewhere: None,
            pending_since: Instant::now(),
            worker_failures: 0,
            tearing_down: false,
            status_tx,
            grant: None,
            meter: UsageMeter::default(),
        }
    }

    fn set_status(&mut self, status: ClusterStatus) {
        debug_assert!(
            self.record.status.can_transition_to(status),
            "{} -> {}",
            self.record.status,
            status
        );
        self.record.status = status;
        self.status_tx.send_replace(status);
    }

    /// Publishes a status already written to the record and the store (final statuses, which
    /// are stored before anyone may see them).
    fn set_status_after_store(&mut self, status: ClusterStatus) {
        self.status_tx.send_replace(status);
    }

    fn live_workers(&self) -> usize {
        self.workers.values().filter(|w| w.state.is_live()).count()
    }

    /// What usage accounting counts now: the scheduler and every worker process while the
    /// cluster is active and has an owner (an unclaimed warm-pool member is the operator's
    /// standing capacity, counted against no one; a claimed one counts from its claim).
    fn running_units(&self) -> Vec<RunningUnit> {
        let r = &self.record;
        if r.pool.is_some() || r.status.is_terminal() {
            return Vec::new();
        }
        let res = &r.settings.resources;
        let scheduler = r.scheduler.map(|_| RunningUnit {
            started_ms: r.start_time,
            cores: res.scheduler_cores,
            memory: res.scheduler_memory,
        });
        let workers = self.workers.values().map(|w| RunningUnit {
            started_ms: w.started_ms.max(r.start_time),
            cores: res.worker_cores,
            memory: res.worker_memory,
        });
        scheduler.into_iter().chain(workers).collect()
    }

    /// The scheduler and every worker process.
    fn processes(&self) -> Vec<ProcessId> {
        self.record
            .scheduler
            .into_iter()
            .chain(self.workers.values().map(|w| w.process))
            .collect()
    }

    fn addresses(&self) -> Option<SchedulerAddresses> {
        let r = &self.record;
        if r.status != ClusterStatus::Running {
            return None;
        }
        Some(SchedulerAddresses {
            scheduler: r.scheduler_address.clone()?,
            dashboard: r.dashboard_address.clone().filter(|d| !d.is_empty()),
            api: r.api_address.clone().unwrap_or_default(),
        })
    }

    fn view(&self) -> ClusterView {
        let r = &self.record;
        ClusterView {
            name: r.name.clone(),
            owner: r.owner.clone(),
            status: r.status,
            reason: r.reason.clone(),
            options: r.options.clone(),
            settings: r.settings.clone(),
            token: Some(r.token.clone()),
            tls: Some(TlsPair {
                cert: r.tls_cert.clone(),
                key: r.tls_key.clone(),
            }),
            addresses: self.addresses(),
            start_time: r.start_time,
            stop_time: r.stop_time,
            target_workers: r.target_workers,
            last_client_ms: None,
            grant: self.grant,
            pool: r.pool.clone(),
            workers_running: Some(
                self.workers
                    .values()
                    .filter(|w| w.state == WorkerState::Running)
                    .count() as u64,
            ),
        }
    }
}

/// Asynchronous work decided under the lock and carried out after it is released.
#[derive(Default)]
#[must_use]
struct Effects {
    /// Processes to terminate (each exit is reported back as an event).
    terminate: Vec<ProcessId>,
    /// Clusters whose processes must all go before they reach their final status.
    teardown: Vec<Teardown>,
}

/// What a stopping cluster's teardown ends: its workers first, then its scheduler (a scheduler
/// told to stop while its workers stop under it can hang in closing their connections until
/// it is killed).
struct Teardown {
    cluster: String,
    workers: Vec<ProcessId>,
    scheduler: Option<ProcessId>,
}

impl Effects {
    fn merge(&mut self, other: Effects) {
        self.terminate.extend(other.terminate);
        self.teardown.extend(other.teardown);
    }
}

/// Event counters since start (Prometheus counters, see [`LocalBackend::register_metrics`]).
#[derive(Default)]
struct Counters {
    clusters_created: Counter,
    clusters_failed: Counter,
    workers_started: Counter,
    worker_failures: Counter,
}

/// How an exit looks in an event or a failure reason.
fn describe_exit(code: Option<i32>) -> String {
    match code {
        Some(c) if c >= 0 => format!("exit code {c}"),
        Some(-9) => "killed by SIGKILL: out of memory, or a kill -9".into(),
        Some(-15) => "ended by SIGTERM".into(),
        Some(c) => format!("killed by signal {}", -c),
        None => "exit code unknown".into(),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn store_error(what: &str, e: StoreError) -> BackendError {
    error!("{what}: {e}");
    BackendError::Unavailable(format!("The gateway's state database failed while {what}"))
}

/// The local backend (see the module docs). Made by [`LocalBackend::start`].
pub struct LocalBackend {
    /// Every cluster known to this gateway run. A std mutex held only for short sections that
    /// never `.await`; the slow parts (process termination) run afterwards as [`Effects`].
    clusters: Mutex<HashMap<String, Cluster>>,
    store: Store,
    processes: Arc<dyn Processes>,
    config: EngineConfig,
    counters: Counters,
    /// When usage past its retention was last forgotten, ms since the Unix epoch.
    usage_forgotten_at: AtomicI64,
    /// Set while the gateway cannot take connections (see [`ClusterBackend::set_reachable`]):
    /// heartbeat and start timeouts wait meanwhile.
    unreachable: AtomicBool,
    /// Since when it could not.
    unreachable_since: Mutex<Option<Instant>>,
    /// To hand `Arc<Self>` to the tasks it spawns.
    me: Weak<LocalBackend>,
}

impl LocalBackend {
    /// Loads the stored clusters (re-adopting live processes, failing clusters whose scheduler
    /// is gone, finishing interrupted stops, terminating orphans) and starts the tasks that
    /// consume process exits and sweep for timeouts.
    pub fn start(
        config: EngineConfig,
        store: Store,
        processes: Arc<dyn Processes>,
        mut exits: mpsc::UnboundedReceiver<ProcessExit>,
    ) -> Result<Arc<Self>, StoreError> {
        let backend = Arc::new_cyclic(|me| LocalBackend {
            clusters: Mutex::new(HashMap::new()),
            store,
            processes,
            config,
            counters: Counters::default(),
            usage_forgotten_at: AtomicI64::new(0),
            unreachable: AtomicBool::new(false),
            unreachable_since: Mutex::new(None),
            me: me.clone(),
        });
        backend.recover()?;
        let weak = Arc::downgrade(&backend);
        tokio::spawn(async move {
            while let Some(exit) = exits.recv().await {
                let Some(backend) = weak.upgrade() else {
                    return;
                };
                backend.on_exit(exit);
            }
        });
        let weak = Arc::downgrade(&backend);
        let period = backend.config.sweep_period;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(backend) = weak.upgrade() else {
                    return;
                };
                backend.sweep();
            }
        });
        Ok(backend)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Cluster>> {
        self.clusters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, record: &ClusterRecord) {
        if let Err(e) = self.store.put_cluster(record) {
            error!(cluster = %record.name, "persisting cluster: {e}");
        }
    }

    /// Moves an active cluster to STOPPING (persisted; its route disappears with RUNNING).
    /// The next reconcile tears it down.
    fn begin_stop(&self, c: &mut Cluster, request: StopRequest) {
        if !c.record.status.is_active() {
            return;
        }
        if request.failed {
            self.counters.clusters_failed.inc();
            warn!(cluster = %c.record.name, reason = %request.reason, "cluster failed");
            self.event(
                &c.record.name,
                EventType::Warning,
                "Failing",
                &request.reason,
            );
        } else {
            info!(cluster = %c.record.name, reason = %request.reason, "stopping cluster");
            self.event(
                &c.record.name,
                EventType::Normal,
                "Stopping",
                &request.reason,
            );
        }
        c.set_status(ClusterStatus::Stopping);
        c.record.final_status = Some(if request.failed {
            ClusterStatus::Failed
        } else {
            ClusterStatus::Stopped
        });
        c.record.reason = Some(request.reason);
        for w in c.workers.values_mut() {
            w.state = WorkerState::Stopping;
        }
        self.persist(&c.record);
    }

    /// How long `record`'s RUNNING cluster may go without a heartbeat: the configured timeout,
    /// stretched by as much as its scheduler's own period (fixed when it started) is longer
    /// than the configured one, so that a restart with a shorter period fails no cluster whose
    /// scheduler still heartbeats at the old one.
    fn heartbeat_timeout(&self, record: &ClusterRecord) -> Duration {
        let timing = &self.config.timing;
        let stretch = record
            .heartbeat_period
            .filter(|p| p.is_finite())
            .map_or(1.0, |p| (p / timing.heartbeat_period).max(1.0));
        Duration::try_from_secs_f64(timing.heartbeat_timeout * stretch).unwrap_or(Duration::MAX)
    }

    /// Brings one cluster towards what it should be, from what was last observed: fails it on
    /// a timeout or too many worker failures; while RUNNING terminates surplus and retired
    /// workers and starts missing ones; once STOPPING starts its teardown (once).
    fn reconcile(&self, c: &mut Cluster, now: Instant) -> Effects {
        let mut fx = Effects::default();
        // A gateway that stood still (stopped, frozen, starved) heard no heartbeat meanwhile:
        // that time is not the scheduler's silence, and is not held against its timeouts.
        let stall_after = self.config.sweep_period * 5 + Duration::from_secs(1);
        let gap = now.saturating_duration_since(c.last_reconciled);
        if gap > stall_after {
            warn!(cluster = %c.record.name, "the gateway did not run for {:.1} s; its timeouts resume from now", gap.as_secs_f64());
            c.last_heartbeat = (c.last_heartbeat + gap).min(now);
            c.pending_since = (c.pending_since + gap).min(now);
        }
        c.last_reconciled = c.last_reconciled.max(now);
        let start_timeout = Duration::from_secs_f64(self.config.timing.start_timeout);
        let heartbeat_timeout = self.heartbeat_timeout(&c.record);
        // Schedulers cannot reach a gateway that turns connections away: no timeout meanwhile.
        let hearing = !self.unreachable.load(Ordering::Acquire);
        let timeout = match c.record.status {
            _ if !hearing => None,
            ClusterStatus::Pending if now.duration_since(c.pending_since) > start_timeout => {
                Some(format!(
                    "the scheduler did not start within {} s",
                    start_timeout.as_secs_f64()
                ))
            }
            ClusterStatus::Running if now.duration_since(c.last_heartbeat) > heartbeat_timeout => {
                let mut why = format!(
                    "no heartbeat from the scheduler for {} s",
                    heartbeat_timeout.as_secs_f64()
                );
                if let Some(url) = &c.reports_elsewhere {
                    why.push_str(&format!(
                        " (it reports to {url}, which this gateway no longer serves)"
                    ));
                }
                Some(why)
            }
            _ => None,
        };
        if let Some(reason) = timeout {
            self.begin_stop(c, StopRequest::failed(reason));
        }
        if c.record.status == ClusterStatus::Running {
            self.reconcile_workers(c, &mut fx);
        }
        if c.record.status == ClusterStatus::Stopping && !c.tearing_down {
            c.tearing_down = true;
            fx.teardown.push(Teardown {
                cluster: c.record.name.clone(),
                workers: c.workers.values().map(|w| w.process).collect(),
                scheduler: c.record.scheduler,
            });
        }
        self.account(c);
        fx
    }

    /// Brings the cluster's usage up to now if what runs changed since it was last stored.
    /// A failed write is logged and the meter left as stored: the next call accrues the same
    /// span again, so nothing is lost or counted twice.
    fn account(&self, c: &mut Cluster) {
        let units = c.running_units();
        if !c.meter.needs_accrual(&units) {
            return;
        }
        let mut meter = c.meter;
        let delta = meter.accrue(now_ms(), &units);
        let key = UsageKey {
            name: &c.record.name,
            owner: &c.record.owner,
            group: c.record.settings.policy.as_deref(),
            created: c.record.start_time,
        };
        match self.store.record_usage(&key, &meter, &delta) {
            Ok(()) => c.meter = meter,
            Err(e) => error!(cluster = %c.record.name, "recording usage: {e}"),
        }
    }

    /// RUNNING: surplus not-yet-joined workers and workers the scheduler reports gone are
    /// terminated; missing workers are started (at most [`START_BATCH`] at a time).
    fn reconcile_workers(&self, c: &mut Cluster, fx: &mut Effects) {
        let target = c.record.target_workers as usize;
        // Only workers that have not joined yet are cancelled: the scheduler itself retires
        // running ones (it reports them closing), so the gateway never picks which to kill.
        let mut surplus = c.live_workers().saturating_sub(target);
        for w in c.workers.values_mut() {
            if w.state == WorkerState::Retired {
                w.state = WorkerState::Stopping;
                fx.terminate.push(w.process);
            } else if w.state == WorkerState::Starting && surplus > 0 {
                surplus -= 1;
                w.state = WorkerState::Stopping;
                fx.terminate.push(w.process);
            }
        }
        let limit = self.config.timing.worker_start_failure_limit.max(1);
        let Some(address) = c.record.scheduler_address.clone() else {
            return;
        };
        if c.live_workers() < target && c.worker_failures < limit {
            // New workers read the cluster's files: bring back any that were deleted.
            let creds = ClusterCredentials {
                cert_pem: c.record.tls_cert.clone(),
                key_pem: c.record.tls_key.clone(),
            };
            match self
                .processes
                .restore_missing(&c.record.name, &c.record.owner, &creds)
            {
                Ok(false) => {}
                Ok(true) => {
                    warn!(cluster = %c.record.name, "the cluster's directory had lost files (credentials, logs or work directory); laid out again from its record")
                }
                Err(e) => {
                    error!(cluster = %c.record.name, "restoring the cluster's directory: {e}")
                }
            }
        }
        let mut started = 0;
        let mut launched = 0;
        while c.live_workers() < target && started < START_BATCH && c.worker_failures < limit {
            started += 1;
            let worker = new_cluster_id();
            let spec = WorkerSpec {
                cluster: &c.record.name,
                owner: &c.record.owner,
                worker: &worker,
                scheduler_address: &address,
                settings: &c.record.settings,
            };
            match self.processes.start_worker(&spec) {
                Ok(process) => {
                    let record = WorkerRecord {
                        cluster: c.record.name.clone(),
                        name: worker.clone(),
                        process,
                    };
                    if let Err(e) = self.store.put_worker(&record) {
                        error!(cluster = %c.record.name, "persisting worker: {e}");
                    }
                    self.counters.workers_started.inc();
                    info!(cluster = %c.record.name, worker = %worker, pid = process.pid, "worker starting");
                    launched += 1;
                    c.workers.insert(
                        worker,
                        Worker {
                            process,
                            state: WorkerState::Starting,
                            started_ms: now_ms(),
                        },
                    );
                }
                Err(e) => {
                    c.worker_failures += 1;
                    self.counters.worker_failures.inc();
                    error!(cluster = %c.record.name, failures = c.worker_failures, "starting worker: {e}");
                    self.event(
                        &c.record.name,
                        EventType::Warning,
                        "WorkerStartFailed",
                        &format!("could not start a worker: {e}"),
                    );
                    if c.worker_failures >= limit {
                        let reason = format!(
                            "{} consecutive worker failures; the last: could not start a worker: {e}",
                            c.worker_failures
                        );
                        self.begin_stop(c, StopRequest::failed(reason));
                    }
                    break;
                }
            }
        }
        if launched > 0 {
            let message = format!(
                "starting {launched} worker{} ({} wanted, {} running or starting)",
                if launched == 1 { "" } else { "s" },
                target,
                c.live_workers()
            );
            self.event(
                &c.record.name,
                EventType::Normal,
                "WorkersStarting",
                &message,
            );
        }
    }

    /// Appends an event to a cluster's history; best effort (a failed write is logged).
    fn event(&self, cluster: &str, kind: EventType, reason: &str, message: &str) {
        let event = ClusterEvent::new(now_ms(), kind, reason, message, "gateway");
        if let Err(e) = self.store.add_event(cluster, &event) {
            error!(%cluster, "recording an event: {e}");
        }
    }

    /// Reconciles one cluster by name and carries out the effects.
    fn reconcile_named(&self, name: &str) {
        let fx = {
            let mut clusters = self.lock();
            match clusters.get_mut(name) {
                Some(c) => self.reconcile(c, Instant::now()),
                None => return,
            }
        };
        self.apply(fx);
    }

    /// Carries out effects decided under the lock.
    fn apply(&self, fx: Effects) {
        let grace = self.config.stop_grace;
        for id in fx.terminate {
            tokio::spawn(self.processes.terminate(id, grace));
        }
        for teardown in fx.teardown {
            let Some(me) = self.me.upgrade() else { return };
            tokio::spawn(async move {
                let Teardown {
                    cluster: name,
                    workers,
                    scheduler,
                } = teardown;
                let waits = workers
                    .into_iter()
                    .map(|p| me.processes.terminate(p, grace));
                futures_util::future::join_all(waits).await;
                if let Some(scheduler) = scheduler {
                    me.processes.terminate(scheduler, grace).await;
                }
                // What the cluster's own processes started in sessions of their own (and so
                // outside their process groups) in its directory goes with it too.
                let strays: Vec<ProcessId> = me
                    .processes
                    .unknown_processes(&HashSet::new())
                    .into_iter()
                    .filter(|(cluster, _)| *cluster == name)
                    .map(|(_, id)| id)
                    .collect();
                for id in &strays {
                    warn!(cluster = %name, pid = id.pid, "stopping a process the cluster's processes left behind in its directory");
                }
                let waits = strays.into_iter().map(|p| me.processes.terminate(p, grace));
                futures_util::future::join_all(waits).await;
                me.finish_stop(&name);
            });
        }
    }

    /// A STOPPING cluster whose processes are gone reaches its final status.
    fn finish_stop(&self, name: &str) {
        let mut clusters = self.lock();
        let Some(c) = clusters.get_mut(name) else {
            return;
        };
        if c.record.status != ClusterStatus::Stopping {
            return;
        }
        let final_status = c.record.final_status.unwrap_or(ClusterStatus::Stopped);
        c.record.stop_time = Some(now_ms());
        c.record.target_workers = 0;
        for w in c.workers.keys() {
            if let Err(e) = self.store.delete_worker(name, w) {
                error!(cluster = %name, "forgetting worker: {e}");
            }
            // Its exit is not reported yet (it ended moments ago): told here, with the cluster.
            self.event(
                name,
                EventType::Normal,
                "WorkerStopped",
                &format!("worker {w} stopped with the cluster"),
            );
        }
        c.workers.clear();
        // Written before the status turns final: whoever sees it final finds the event too.
        let (kind, reason) = if final_status == ClusterStatus::Failed {
            (EventType::Warning, "Failed")
        } else {
            (EventType::Normal, "Stopped")
        };
        self.event(name, kind, reason, c.record.reason.as_deref().unwrap_or(""));
        c.record.status = final_status;
        self.persist(&c.record);
        c.set_status_after_store(final_status);
        self.account(c);
        self.processes.remove_credentials(name);
        info!(cluster = %name, status = %final_status, reason = c.record.reason.as_deref().unwrap_or(""), "cluster finished");
    }

    /// A scheduler or worker process exited.
    fn on_exit(&self, exit: ProcessExit) {
        self.processes.reap(exit.id);
        {
            let mut clusters = self.lock();
            let Some(c) = clusters.get_mut(&exit.cluster) else {
                return;
            };
            let code = describe_exit(exit.code);
            match &exit.role {
                ProcessRole::Scheduler => {
                    if c.record.scheduler == Some(exit.id) && c.record.status.is_active() {
                        let reason = format!("the scheduler exited ({code})");
                        self.begin_stop(c, StopRequest::failed(reason));
                    }
                }
                ProcessRole::Worker(worker) => {
                    let Some(w) = c.workers.get(worker).filter(|w| w.process == exit.id) else {
                        return;
                    };
                    // A worker that ran and then exited 0 was closed on purpose (retired by a
                    // client or by adaptive scaling, its `--lifetime` over) even when its exit
                    // arrives before the heartbeat that reports it closed. One that exits 0
                    // before it ever ran still counts: a start that keeps ending is a failure.
                    // A worker adopted from an earlier gateway process (no exit code: not this
                    // process's child) was running when adopted, and its end is judged the
                    // same way: a retirement after a restart is no failure. Starts that keep
                    // failing are this process's own children, whose codes it sees.
                    let clean_stop =
                        matches!(exit.code, Some(0) | None) && w.state == WorkerState::Running;
                    let expected = w.state.exit_expected() || clean_stop;
                    c.workers.remove(worker);
                    if let Err(e) = self.store.delete_worker(&exit.cluster, worker) {
                        error!(cluster = %exit.cluster, "forgetting worker: {e}");
                    }
                    if expected || !c.record.status.is_active() {
                        info!(cluster = %exit.cluster, worker = %worker, "worker stopped");
                        self.event(
                            &exit.cluster,
                            EventType::Normal,
                            "WorkerStopped",
                            &format!("worker {worker} stopped ({code})"),
                        );
                    } else {
                        c.worker_failures += 1;
                        self.counters.worker_failures.inc();
                        warn!(cluster = %exit.cluster, worker = %worker, exit = %code,
                              failures = c.worker_failures, "worker exited unexpectedly");
                        self.event(
                            &exit.cluster,
                            EventType::Warning,
                            "WorkerExited",
                            &format!(
                                "worker {worker} exited unexpectedly ({code}); it is replaced"
                            ),
                        );
                        let limit = self.config.timing.worker_start_failure_limit.max(1);
                        if c.worker_failures >= limit {
                            let reason = format!(
                                "{} consecutive worker failures; the last: a worker exited unexpectedly ({code})",
                                c.worker_failures
                            );
                            self.begin_stop(c, StopRequest::failed(reason));
                        }
                    }
                }
            }
        }
        self.reconcile_named(&exit.cluster);
    }

    /// Periodic pass: timeouts, continued scale-ups, forgetting clusters past retention.
    fn sweep(&self) {
        let now = Instant::now();
        let retention_ms = self.config.retention.as_millis() as i64;
        let mut fx = Effects::default();
        let mut clusters = self.lock();
        let mut forget = Vec::new();
        for c in clusters.values_mut() {
            fx.merge(self.reconcile(c, now));
            if c.record.status.is_terminal()
                && c.record
                    .stop_time
                    .is_some_and(|t| now_ms() - t > retention_ms)
            {
                forget.push(c.record.name.clone());
            }
        }
        for name in forget {
            clusters.remove(&name);
            if let Err(e) = self.store.delete_cluster(&name) {
                error!(cluster = %name, "forgetting cluster: {e}");
            }
            self.processes.remove_dir(&name);
        }
        drop(clusters);
        self.apply(fx);
        self.forget_old_usage();
    }

    /// Once an hour, forgets usage older than the usage retention.
    fn forget_old_usage(&self) {
        let now = now_ms();
        let last = self.usage_forgotten_at.load(Ordering::Relaxed);
        if now - last < 3_600_000 || self.config.usage_retention.is_zero() {
            return;
        }
        self.usage_forgotten_at.store(now, Ordering::Relaxed);
        let cutoff = now - self.config.usage_retention.as_millis() as i64;
        if let Err(e) = self.store.forget_usage_before(cutoff) {
            error!("forgetting old usage: {e}");
        }
    }

    /// Loads the stored clusters after a (re)start (see [`LocalBackend::start`]).
    fn recover(&self) -> Result<(), StoreError> {
        let records = self.store.load_clusters()?;
        let mut clusters = self.lock();
        for record in records {
            let name = record.name.clone();
            let workers = self.store.load_workers(&name)?;
            let mut c = Cluster::new(record);
            c.meter = self.store.usage_meter(&name)?.unwrap_or_default();
            // Workers that ended while no gateway watched: told in the events, as when watched.
            let mut lost = Vec::new();
            if !c.record.status.is_terminal() {
                for w in workers {
                    if self.processes.is_alive(w.process) {
                        self.processes
                            .adopt(&name, ProcessRole::Worker(w.name.clone()), w.process);
                        let state = if c.record.status == ClusterStatus::Stopping {
                            WorkerState::Stopping
                        } else {
                            WorkerState::Running
                        };
                        c.workers.insert(
                            w.name,
                            Worker {
                                process: w.process,
                                state,
                                started_ms: 0,
                            },
                        );
                    } else {
                        if let Err(e) = self.store.delete_worker(&name, &w.name) {
                            error!(cluster = %name, "forgetting worker: {e}");
                        }
                        lost.push(w.name);
                    }
                }
            }
            if c.record.status.is_active() {
                match c.record.scheduler {
                    Some(id) if self.processes.is_alive(id) => {
                        self.processes.adopt(&name, ProcessRole::Scheduler, id);
                        if let (Some(was), Some(now)) =
                            (&c.record.gateway_api_url, &self.config.api_url)
                        {
                            if was != now {
                                warn!(cluster = %name, started_with = %was, serving = %now, "this cluster's scheduler reports to an API URL this gateway no longer serves: unless that URL still reaches it, the cluster fails after heartbeat_timeout");
                                c.reports_elsewhere = Some(was.clone());
                            }
                        }
                        info!(cluster = %name, status = %c.record.status, workers = c.workers.len(), "re-adopted cluster");
                        self.event(
                            &name,
                            EventType::Normal,
                            "Adopted",
                            &format!(
                                "taken over by a restarted gateway with {} worker{}",
                                c.workers.len(),
                                if c.workers.len() == 1 { "" } else { "s" }
                            ),
                        );
                    }
                    gone => {
                        let reason = if gone.is_none() {
                            // Recorded, but the gateway stopped before it recorded the
                            // scheduler it was starting (which, if it started, is stopped
                            // below as a process no record accounts for).
                            "the gateway stopped while it was starting the scheduler"
                        } else {
                            "the scheduler process was gone when the gateway restarted"
                        };
                        self.begin_stop(&mut c, StopRequest::failed(reason));
                    }
                }
            }
            for worker in &lost {
                if !matches!(
                    c.record.status,
                    ClusterStatus::Pending | ClusterStatus::Running
                ) {
                    self.event(
                        &name,
                        EventType::Normal,
                        "WorkerStopped",
                        &format!("worker {worker} stopped while the gateway was down"),
                    );
                } else {
                    warn!(cluster = %name, worker = %worker, "a worker ended while the gateway was down");
                    self.event(
                        &name,
                        EventType::Warning,
                        "WorkerExited",
                        &format!(
                            "worker {worker} ended while the gateway was down; it is replaced"
                        ),
                    );
                }
            }
            clusters.insert(name, c);
        }
        // Processes in a cluster directory that no record accounts for would run forever.
        let known: HashSet<ProcessId> = clusters
            .values()
            .filter(|c| !c.record.status.is_terminal())
            .flat_map(|c| c.processes())
            .collect();
        for (cluster, id) in self.processes.unknown_processes(&known) {
            warn!(cluster = %cluster, pid = id.pid, "terminating a process no cluster record accounts for");
            tokio::spawn(self.processes.terminate(id, self.config.stop_grace));
        }
        let mut fx = Effects::default();
        let now = Instant::now();
        for c in clusters.values_mut() {
            fx.merge(self.reconcile(c, now));
        }
        drop(clusters);
        self.apply(fx);
        Ok(())
    }

    /// Checks the addresses of a scheduler's first heartbeat (see [`Self::observe_heartbeat`]):
    /// the scheduler's `tls://` address and its `http://` dashboard and API addresses (host and
    /// port, nothing more), each on loopback and listened on by the scheduler's own processes.
    fn check_reported_addresses(&self, c: &Cluster, hb: &Heartbeat) -> Result<(), String> {
        let scheduler = c.record.scheduler;
        let reported = [
            ("tls", "scheduler", &hb.scheduler_address, false),
            ("http", "dashboard", &hb.dashboard_address, true),
            ("http", "API", &hb.api_address, true),
        ];
        for (scheme, what, address, may_be_empty) in reported {
            if address.is_empty() && may_be_empty {
                continue;
            }
            let refused = |why: &str| {
                format!("the scheduler reported {what} address {address:?}, which {why}")
            };
            let Some(socket) = loopback_socket(address, scheme) else {
                return Err(refused(&format!(
                    "is not {scheme}://<loopback IP>:<port>, where local schedulers listen"
                )));
            };
            let owned = scheduler.is_some_and(|id| self.processes.listens_on(id, socket));
            if !owned {
                return Err(refused("is not a port its own processes listen on"));
            }
        }
        Ok(())
    }

    /// Records a heartbeat's observations; see wire-protocol 9.4.
    fn observe_heartbeat(
        &self,
        c: &mut Cluster,
        hb: &Heartbeat,
        target: u64,
    ) -> Result<(), BackendError> {
        c.last_heartbeat = Instant::now();
        c.reports_elsewhere = None;
        let mut dirty = false;
        let mut now_running = false;
        if c.record.status == ClusterStatus::Pending && !hb.scheduler_address.is_empty() {
            // The proxy will dial these addresses for anyone holding the cluster's name, and
            // the heartbeat is whatever code runs in the scheduler says: each must be a
            // loopback port the scheduler's own processes listen on (not the gateway's own
            // port, nor another service on this machine).
            if let Err(reason) = self.check_reported_addresses(c, hb) {
                self.begin_stop(c, StopRequest::failed(reason.clone()));
                return Err(BackendError::Invalid(reason));
            }
            c.record.scheduler_address = Some(hb.scheduler_address.clone());
            c.record.dashboard_address =
                Some(hb.dashboard_address.clone()).filter(|d| !d.is_empty());
            c.record.api_address = Some(hb.api_address.clone()).filter(|a| !a.is_empty());
            now_running = true;
            dirty = true;
        }
        if target != c.record.target_workers {
            c.record.target_workers = target;
            dirty = true;
        }
        let active: HashSet<&str> = hb.active_workers.iter().map(String::as_str).collect();
        let closing: HashSet<&str> = hb.closing_workers.iter().map(String::as_str).collect();
        let closed: HashSet<&str> = hb.closed_workers.iter().map(String::as_str).collect();
        for (name, w) in c.workers.iter_mut() {
            let name = name.as_str();
            if w.state == WorkerState::Stopping || w.state == WorkerState::Retired {
                continue;
            }
            if closing.contains(name) {
                w.state = WorkerState::Closing;
            } else if active.contains(name) {
                w.state = WorkerState::Running;
                c.worker_failures = 0;
            } else if closed.contains(name) {
                w.state = WorkerState::Retired;
            }
        }
        if dirty {
            let mut record = c.record.clone();
            if now_running {
                record.status = ClusterStatus::Running;
            }
            self.store
                .put_cluster(&record)
                .map_err(|e| store_error("recording a heartbeat", e))?;
        }
        if now_running {
            c.set_status(ClusterStatus::Running);
            info!(cluster = %c.record.name, scheduler = %hb.scheduler_address, "cluster running");
            self.event(
                &c.record.name,
                EventType::Normal,
                "Running",
                &format!("the scheduler is up at {}", hb.scheduler_address),
            );
        }
        Ok(())
    }

    /// Workers per state, every state included (0 when none).
    fn workers_by_state(&self) -> Vec<([(&'static str, &'static str); 1], u64)> {
        let mut by_state: HashMap<&'static str, u64> = HashMap::new();
        for c in self.lock().values() {
            for w in c.workers.values() {
                *by_state.entry(w.state.as_str()).or_default() += 1;
            }
        }
        WorkerState::ALL
            .iter()
            .map(|s| {
                let n = by_state.get(s.as_str()).copied().unwrap_or(0);
                ([("state", s.as_str())], n)
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl ClusterBackend for LocalBackend {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn set_reachable(&self, reachable: bool) {
        let mut since = self
            .unreachable_since
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match (reachable, *since) {
            (false, None) => {
                *since = Some(Instant::now());
                self.unreachable.store(true, Ordering::Release);
                warn!("schedulers' heartbeats cannot reach the gateway while it turns connections away: their timeouts wait");
            }
            (true, Some(from)) => {
                *since = None;
                drop(since);
                // The time nothing could be heard is not the schedulers' silence.
                let now = Instant::now();
                let gap = now.saturating_duration_since(from);
                let mut clusters = self.lock();
                for c in clusters.values_mut() {
                    c.last_heartbeat = (c.last_heartbeat + gap).min(now);
                    c.pending_since = (c.pending_since + gap).min(now);
                }
                self.unreachable.store(false, Ordering::Release);
                drop(clusters);
                warn!(
                    "heartbeat timeouts resume from now, after {:.1} s without connections",
                    gap.as_secs_f64()
                );
            }
            _ => {}
        }
    }

    async fn create(&self, request: NewCluster) -> Result<ClusterView, BackendError> {
        if let Some(env) = &request.settings.python_env {
            crate::launch::Launcher::check_python_env(env)
                .map_err(|e| BackendError::Invalid(format!("Cannot use this environment: {e}")))?;
        }
        let name = new_cluster_id();
        let creds = ClusterCredentials::generate(&name).map_err(|e| {
            error!("generating TLS credentials: {e}");
            BackendError::Internal("Could not generate the cluster's TLS credentials".into())
        })?;
        if let Err(e) = self.processes.prepare(&name, &request.owner, &creds) {
            self.processes.remove_dir(&name);
            if let (LocalError::Identity(_), Some(_)) = (&e, &request.pool) {
                return Err(BackendError::Invalid(
                    "Warm schedulers need clusters that run as the gateway's own account \
                     (dask.isolation: none): a pooled scheduler has no owner to run as"
                        .into(),
                ));
            }
            if let LocalError::Identity(why) = e {
                warn!(cluster = %name, owner = %request.owner, "no account to run as: {why}");
                return Err(BackendError::Invalid(format!(
                    "Cannot start a cluster for this user: {why}"
                )));
            }
            error!(cluster = %name, "preparing the cluster directory: {e}");
            return Err(BackendError::Internal(
                "Could not prepare the cluster's working directory".into(),
            ));
        }
        let record = ClusterRecord {
            name: name.clone(),
            owner: request.owner,
            status: ClusterStatus::Pending,
            reason: None,
            final_status: None,
            options: request.options,
            settings: request.settings,
            token: new_api_token(),
            tls_cert: creds.cert_pem,
            tls_key: creds.key_pem,
            scheduler: None,
            scheduler_address: None,
            dashboard_address: None,
            api_address: None,
            target_workers: 0,
            start_time: now_ms(),
            stop_time: None,
            pool: request.pool,
            heartbeat_period: Some(self.config.timing.heartbeat_period),
            gateway_api_url: self.config.api_url.clone(),
        };
        let mut clusters = self.lock();
        if let Err(e) = self.store.put_cluster(&record) {
            drop(clusters);
            self.processes.remove_dir(&name);
            return Err(store_error("creating a cluster", e));
        }
        let c = clusters.entry(name.clone()).or_insert(Cluster::new(record));
        let spec = SchedulerSpec {
            cluster: &name,
            owner: &c.record.owner,
            token: &c.record.token,
            settings: &c.record.settings,
        };
        match self.processes.start_scheduler(&spec) {
            Ok(pid) => {
                c.record.scheduler = Some(pid);
                if let Err(e) = self.store.put_cluster(&c.record) {
                    // The process is known to nobody durable: stop it and forget the cluster.
                    clusters.remove(&name);
                    drop(clusters);
                    let _ = self.store.delete_cluster(&name);
                    tokio::spawn(self.processes.terminate(pid, self.config.stop_grace));
                    self.processes.remove_dir(&name);
                    return Err(store_error("creating a cluster", e));
                }
                self.counters.clusters_created.inc();
                match &c.record.pool {
                    Some(pool) => {
                        info!(cluster = %name, pool = %pool, pid = pid.pid, "warm scheduler starting")
                    }
                    None => {
                        info!(cluster = %name, user = ?c.record.owner, pid = pid.pid, "cluster created, scheduler starting")
                    }
                }
                let message = match &c.record.pool {
                    Some(_) => format!("warm scheduler starting (pid {})", pid.pid),
                    None => format!("scheduler starting (pid {})", pid.pid),
                };
                self.event(&name, EventType::Normal, "Created", &message);
                Ok(c.view())
            }
            Err(e) => {
                error!(cluster = %name, "starting the scheduler: {e}");
                c.record.reason = Some(format!("could not start the Dask scheduler: {e}"));
                c.record.stop_time = Some(now_ms());
                c.record.status = ClusterStatus::Failed;
                self.persist(&c.record);
                c.set_status_after_store(ClusterStatus::Failed);
                self.counters.clusters_failed.inc();
                self.processes.remove_credentials(&name);
                Err(BackendError::Internal(
                    "Could not start the Dask scheduler; the gateway's log has the details".into(),
                ))
            }
        }
    }

    fn get(&self, name: &str) -> Option<ClusterView> {
        self.lock().get(name).map(Cluster::view)
    }

    fn list(&self, owner: Option<&str>) -> Vec<ClusterView> {
        let mut out: Vec<ClusterView> = self
            .lock()
            .values()
            .filter(|c| owner.is_none_or(|o| c.record.owner == o))
            .map(Cluster::view)
            .collect();
        out.sort_by(|a, b| (a.start_time, &a.name).cmp(&(b.start_time, &b.name)));
        out
    }

    fn route(&self, name: &str) -> Option<SchedulerAddresses> {
        self.lock()
            .get(name)
            .filter(|c| c.record.pool.is_none())
            .and_then(Cluster::addresses)
    }

    fn subscribe(&self, name: &str) -> Option<watch::Receiver<ClusterStatus>> {
        self.lock().get(name).map(|c| c.status_tx.subscribe())
    }

    async fn heartbeat(
        &self,
        name: &str,
        heartbeat: &Heartbeat,
        target_workers: u64,
    ) -> Result<(), BackendError> {
        let fx = {
            let mut clusters = self.lock();
            let c = clusters
                .get_mut(name)
                .ok_or_else(|| BackendError::NotFound(name.into()))?;
            if !c.record.status.is_active() {
                return Ok(());
            }
            self.observe_heartbeat(c, heartbeat, target_workers)?;
            self.reconcile(c, Instant::now())
        };
        self.apply(fx);
        Ok(())
    }

    async fn claim(
        &self,
        pool: &str,
        claim: NewCluster,
    ) -> Result<Option<ClusterView>, BackendError> {
        let mut clusters = self.lock();
        // RUNNING members first, then the oldest.
        let Some(c) = clusters
            .values_mut()
            .filter(|c| c.record.pool.as_deref() == Some(pool) && c.record.status.is_active())
            .min_by_key(|c| {
                (
                    c.record.status != ClusterStatus::Running,
                    c.record.start_time,
                )
            })
        else {
            return Ok(None);
        };
        let name = c.record.name.clone();
        let mut record = c.record.clone();
        record.owner = claim.owner;
        record.options = claim.options;
        record.settings = claim.settings;
        record.pool = None;
        record.start_time = now_ms();
        self.store
            .put_cluster(&record)
            .map_err(|e| store_error("handing out a warm scheduler", e))?;
        info!(cluster = %name, user = ?record.owner, "warm scheduler claimed");
        self.event(
            &name,
            EventType::Normal,
            "Claimed",
            "handed to its user from the warm pool of running schedulers",
        );
        c.record = record;
        Ok(Some(c.view()))
    }

    async fn events(&self, name: &str) -> Result<Vec<ClusterEvent>, BackendError> {
        self.store
            .events(name)
            .map_err(|e| store_error("reading events", e))
    }

    async fn usage(
        &self,
        owner: Option<&str>,
        since: i64,
        until: i64,
    ) -> Result<Vec<ClusterUsage>, BackendError> {
        self.store
            .usage(owner, since, until, now_ms())
            .map_err(|e| store_error("reading usage", e))
    }

    async fn record_event(&self, name: &str, event: ClusterEvent) -> Result<(), BackendError> {
        self.store
            .add_event(name, &event)
            .map_err(|e| store_error("recording an event", e))
    }

    async fn record_grant(&self, name: &str, grant: WorkerGrant) -> Result<(), BackendError> {
        let mut clusters = self.lock();
        let c = clusters
            .get_mut(name)
            .ok_or_else(|| BackendError::NotFound(name.into()))?;
        c.grant = Some(grant);
        Ok(())
    }

    async fn stop(&self, name: &str, request: StopRequest) -> Result<(), BackendError> {
        // A stop that could not be recorded would be answered as done and come back after a
        // restart as a cluster that failed: refuse it while the database takes no writes.
        self.store
            .probe_write()
            .map_err(|e| store_error("recording a stop", e))?;
        let fx = {
            let mut clusters = self.lock();
            let Some(c) = clusters.get_mut(name) else {
                return Ok(());
            };
            if request.if_pool.is_some() && c.record.pool != request.if_pool {
                return Ok(());
            }
            self.begin_stop(c, request);
            self.reconcile(c, Instant::now())
        };
        self.apply(fx);
        Ok(())
    }

    async fn healthy(&self) -> bool {
        // Writes, not only reads: with a full disk or a read-only file nothing a cluster does
        // can be recorded.
        match self.store.probe_write() {
            Ok(()) => true,
            Err(e) => {
                warn!("health: the state database takes no writes: {e}");
                false
            }
        }
    }

    fn register_metrics(&self, registry: &mut Registry) {
        let c = &self.counters;
        for (name, help, counter) in [
            (
                "clusters_created",
                "Clusters created since the gateway started",
                &c.clusters_created,
            ),
            (
                "clusters_failed",
                "Clusters that ended FAILED since the gateway started",
                &c.clusters_failed,
            ),
            (
                "workers_started",
                "Worker processes started since the gateway started",
                &c.workers_started,
            ),
            (
                "worker_failures",
                "Worker start failures and unexpected worker exits since the gateway started",
                &c.worker_failures,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        let me = self.me.clone();
        registry.register_collector(metrics::collector("local workers", move |scrape| {
            let Some(backend) = me.upgrade() else {
                return Ok(());
            };
            scrape.gauges(
                "workers",
                "Worker processes, by state",
                backend.workers_by_state(),
            )
        }));
    }

    async fn shutdown(&self, stop_clusters: bool) {
        if stop_clusters {
            let fx = {
                let mut clusters = self.lock();
                let mut fx = Effects::default();
                let now = Instant::now();
                for c in clusters.values_mut() {
                    self.begin_stop(c, StopRequest::stopped("the gateway shut down"));
                    fx.merge(self.reconcile(c, now));
                }
                fx
            };
            self.apply(fx);
        } else {
            warn!("leaving clusters running; a restarted gateway re-adopts them (stop_clusters_on_shutdown: false)");
        }
        // Stops already begun (a user's, or warm schedulers the gateway stops as it shuts down)
        // finish before the process exits: their signals are sent by tasks of this runtime.
        let deadline = Instant::now() + self.config.stop_grace + Duration::from_secs(3);
        while Instant::now() < deadline {
            let busy = self
                .lock()
                .values()
                .any(|c| c.record.status == ClusterStatus::Stopping);
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The socket address of `scheme://host:port` (exactly that: no path, no user, no name) when
/// the host is a loopback IP.
fn loopback_socket(address: &str, scheme: &str) -> Option<std::net::SocketAddr> {
    let authority = address.strip_prefix(scheme)?.strip_prefix("://")?;
    let socket = authority.parse::<std::net::SocketAddr>().ok()?;
    socket.ip().is_loopback().then_some(socket)
}

#[cfg(test)]
mod tests {
    use super::loopback_socket;

    #[test]
    fn only_loopback_ip_addresses_are_local_scheduler_addresses() {
        for (ok, scheme) in [
            ("tls://127.0.0.1:39211", "tls"),
            ("http://127.0.0.1:8787", "http"),
            ("tls://[::1]:4000", "tls"),
        ] {
            assert!(loopback_socket(ok, scheme).is_some(), "{ok}");
        }
        for (bad, scheme) in [
            ("tls://10.0.0.5:8786", "tls"),
            ("http://169.254.169.254:80", "http"),
            ("http://localhost.evil.example:80", "http"),
            ("http://127.0.0.1.nip.io:80", "http"),
            ("http://127.0.0.1", "http"),
            ("http://127.0.0.1:8787/status", "http"),
            ("http://127.0.0.1:8787/clusters/x", "http"),
            ("http://user@127.0.0.1:80", "http"),
            ("tls://0.0.0.0:8786", "tls"),
            ("http://127.0.0.1:8786", "tls"),
            ("tcp://127.0.0.1:8786", "tls"),
            ("garbage", "http"),
        ] {
            assert!(loopback_socket(bad, scheme).is_none(), "{bad}");
        }
    }
}
