//! Launching Dask schedulers and workers as local processes (wire-protocol section 9), and the
//! [`Processes`] trait through which the engine uses them.

pub use crate::error::LocalError;
use crate::forkserver::{python_behind, ForkRequest, ForkServers};
use crate::identity::{Identities, Identity};
use crate::process::{watch_adopted, ProcessExit, ProcessId, ProcessRole};
use gateway_backend::{ClusterCredentials, ClusterSettings, ClusterTiming};
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::debug;

/// Environment variables passed through from the gateway to Dask processes.
const PASS_THROUGH_ENV: &[&str] = &[
    "PATH",
    "PYTHONPATH",
    "CONDA_ROOT",
    "CONDA_DEFAULT_ENV",
    "VIRTUAL_ENV",
    "LANG",
    "LC_ALL",
    "HOME",
    "TMPDIR",
];

/// The `dask` command and the API it reports to: what the operator chooses about launching
/// Dask, whatever account a process runs under.
#[derive(Clone, Debug)]
pub struct DaskLaunch {
    /// The `dask` command (a path, or a name looked up on `PATH`).
    pub command: PathBuf,
    /// Directory put first on the processes' `PATH` (e.g. a venv's `bin`).
    pub path_prefix: Option<PathBuf>,
    /// `DASK_GATEWAY_API_URL` given to schedulers (ends in `/api`).
    pub api_url: String,
}

/// How Dask is launched on this machine.
#[derive(Clone, Debug)]
pub struct LaunchConfig {
    /// Parent of the per-cluster working directories.
    pub work_root: PathBuf,
    /// The `dask` command, its `PATH` and the API URL.
    pub dask: DaskLaunch,
    /// Host schedulers and workers bind to.
    pub bind_host: String,
    /// The clusters' timing: schedulers get `--dg-heartbeat-period` and
    /// `--dg-adaptive-period` from it.
    pub timing: ClusterTiming,
    /// The accounts users' processes run as (single-user by default).
    pub identities: Arc<Identities>,
    /// Start processes by forking them from a pre-imported Python (see [`crate::forkserver`]);
    /// `None` starts every process by exec. The server runs as the gateway's account: give it
    /// only when every process runs as that account too (no user isolation), or a Python
    /// environment a user can write to would run their code under the gateway's account.
    pub fork: Option<ForkConfig>,
}

/// Where the fork servers keep their script and what they import ahead.
#[derive(Clone, Debug)]
pub struct ForkConfig {
    /// A directory of the gateway's own (the server's script is written there).
    pub dir: PathBuf,
    /// Modules imported ahead besides `distributed` (e.g. `numpy`, `pandas`).
    pub preimport: Vec<String>,
}

/// Everything needed to start one cluster's scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerSpec<'a> {
    /// Cluster name (`[a-z0-9]` only; used in paths).
    pub cluster: &'a str,
    /// Owner; becomes `USER` of the processes.
    pub owner: &'a str,
    /// The cluster's API token.
    pub token: &'a str,
    /// The cluster's settings: idle timeout, environment, resources.
    pub settings: &'a ClusterSettings,
}

/// Everything needed to start one worker.
#[derive(Clone, Debug)]
pub struct WorkerSpec<'a> {
    /// Cluster name.
    pub cluster: &'a str,
    /// Owner; becomes `USER` of the process.
    pub owner: &'a str,
    /// The worker's `--name`, shared with the scheduler's heartbeats.
    pub worker: &'a str,
    /// The scheduler's `tls://host:port`.
    pub scheduler_address: &'a str,
    /// The cluster's settings: threads (`--nthreads`), memory (`--memory-limit`), environment.
    pub settings: &'a ClusterSettings,
}

/// A future the engine can spawn.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What the local engine needs from the operating system: cluster directories and processes.
/// [`Launcher`] is the real implementation; tests use an in-memory one.
///
/// Exits of started and adopted processes are reported on the channel the implementation was
/// made with, once each.
pub trait Processes: Send + Sync + 'static {
    /// Creates the cluster's private directory with its credentials, owned by `owner`'s account.
    fn prepare(
        &self,
        cluster: &str,
        owner: &str,
        credentials: &ClusterCredentials,
    ) -> Result<(), LocalError>;
    /// Lays out again whatever of the cluster's directory is gone (deleted by hand or by a
    /// cleaner of old files), with the credentials given; true if anything was missing.
    fn restore_missing(
        &self,
        cluster: &str,
        owner: &str,
        credentials: &ClusterCredentials,
    ) -> Result<bool, LocalError> {
        let _ = (cluster, owner, credentials);
        Ok(false)
    }
    /// Removes the cluster's directory (credentials and logs).
    fn remove_dir(&self, cluster: &str);
    /// Removes the cluster's credentials, keeping its logs.
    fn remove_credentials(&self, cluster: &str);
    /// Starts the scheduler.
    fn start_scheduler(&self, spec: &SchedulerSpec<'_>) -> Result<ProcessId, LocalError>;
    /// Starts one worker.
    fn start_worker(&self, spec: &WorkerSpec<'_>) -> Result<ProcessId, LocalError>;
    /// Whether this exact process still runs.
    fn is_alive(&self, id: ProcessId) -> bool;
    /// Watches a process started by an earlier gateway run, reporting its exit like any other.
    fn adopt(&self, cluster: &str, role: ProcessRole, id: ProcessId);
    /// Called once a process has exited: cleans up what it left (its process group).
    fn reap(&self, id: ProcessId);
    /// Terminates a process (and its group): SIGTERM, then SIGKILL after `grace`.
    fn terminate(&self, id: ProcessId, grace: Duration) -> BoxFuture;
    /// Live processes in cluster directories that are not in `known` (a crash between starting a
    /// process and recording it leaves such orphans).
    fn unknown_processes(&self, known: &HashSet<ProcessId>) -> Vec<(String, ProcessId)>;
    /// Whether `address` is a port that `process` (or its process group) itself listens on:
    /// the proxy dials a scheduler's reported addresses only if they are its own.
    fn listens_on(&self, process: ProcessId, address: std::net::SocketAddr) -> bool;
}

/// The gateway's variables that Dask processes inherit, with `prefix` leading `PATH`.
fn pass_through_env(prefix: Option<&Path>) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for key in PASS_THROUGH_ENV {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.to_string(), v);
        }
    }
    if let Some(prefix) = prefix {
        let path = env
            .get("PATH")
            .cloned()
            .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        env.insert("PATH".into(), format!("{}:{path}", prefix.display()));
    }
    env
}

/// Writes a secret file: mode 0600, never through a link, owned by `identity` when given.
fn write_private(path: &Path, text: &str, identity: Option<&Identity>) -> Result<(), LocalError> {
    let err = |source| LocalError::Prepare {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    if let Some(id) = identity {
        std::os::unix::fs::fchown(&f, Some(id.uid), Some(id.gid)).map_err(err)?;
    }
    Ok(())
}

/// Starts and stops Dask processes; reports every exit on the channel given to [`Launcher::new`].
#[derive(Clone, Debug)]
pub struct Launcher {
    config: LaunchConfig,
    events: mpsc::UnboundedSender<ProcessExit>,
    forks: Option<Arc<ForkServers>>,
    /// The interpreter behind each `dask` command, once looked up.
    pythons: Arc<Mutex<BTreeMap<PathBuf, Option<PathBuf>>>>,
}

impl Launcher {
    /// A launcher reporting process exits on `events`. With [`LaunchConfig::fork`] the fork
    /// server of the default environment starts right away (its imports take a second or two);
    /// processes are exec'd until it is ready.
    pub fn new(config: LaunchConfig, events: mpsc::UnboundedSender<ProcessExit>) -> Self {
        let forks = config.fork.as_ref().and_then(|fork| {
            let env = pass_through_env(config.dask.path_prefix.as_deref());
            match ForkServers::new(&fork.dir, fork.preimport.clone(), env, events.clone()) {
                Ok(servers) => Some(Arc::new(servers)),
                Err(e) => {
                    tracing::warn!(dir = %fork.dir.display(), "fork server disabled: {e}");
                    None
                }
            }
        });
        let launcher = Launcher {
            config,
            events,
            forks,
            pythons: Arc::default(),
        };
        if let (Some(forks), Some(python)) = (&launcher.forks, launcher.default_python()) {
            forks.warm(&python);
        }
        launcher
    }

    /// The Python interpreter running `dask` (a bare name is looked up on `path`), cached per
    /// command.
    fn python_for(&self, dask: &Path, path: Option<&str>) -> Option<PathBuf> {
        let mut pythons = self.pythons.lock().unwrap_or_else(|e| e.into_inner());
        pythons
            .entry(dask.to_path_buf())
            .or_insert_with(|| python_behind(dask, path))
            .clone()
    }

    /// The default environment's interpreter.
    fn default_python(&self) -> Option<PathBuf> {
        let path = pass_through_env(self.config.dask.path_prefix.as_deref()).remove("PATH");
        self.python_for(&self.config.dask.command, path.as_deref())
    }

    /// The cluster's private working directory.
    pub fn cluster_dir(&self, cluster: &str) -> PathBuf {
        self.config.work_root.join(cluster)
    }

    fn certs_dir(&self, cluster: &str) -> PathBuf {
        self.cluster_dir(cluster).join(".certs")
    }

    /// The processes' working directory (and `HOME` for users without a home of their own).
    fn work_dir(&self, cluster: &str) -> PathBuf {
        self.cluster_dir(cluster).join("work")
    }

    /// Lays out the cluster's directory:
    ///
    /// * `<cluster>/` — the gateway's, mode 0700 (0711 with user isolation: the user may pass
    ///   through it, not list or change it);
    /// * `.certs/` — `dask.crt`, `dask.pem` (and later `api-token`), files 0600 in a 0700
    ///   directory, owned by the user's account;
    /// * `work/` — the processes' working directory, 0700, the user's;
    /// * `logs/` — the processes' output, written by the gateway, 0700, the gateway's (a user
    ///   cannot plant links there).
    ///
    /// Parts that exist are left as they are, so this also restores a directory that lost
    /// some of them ([`Launcher::restore_missing`]).
    pub fn prepare(
        &self,
        cluster: &str,
        owner: &str,
        creds: &ClusterCredentials,
    ) -> Result<(), LocalError> {
        safe_name(cluster)?;
        let identity = self.config.identities.resolve(owner)?;
        let dir = self.cluster_dir(cluster);
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LocalError::Prepare { path, source }
        };
        let shared_mode = if identity.is_some() { 0o711 } else { 0o700 };
        for top in [&self.config.work_root, &dir] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(shared_mode)
                .create(top)
                .map_err(err(top))?;
            fs::set_permissions(top, fs::Permissions::from_mode(shared_mode)).map_err(err(top))?;
        }
        for sub in [
            self.certs_dir(cluster),
            dir.join("logs"),
            self.work_dir(cluster),
        ] {
            match fs::DirBuilder::new().mode(0o700).create(&sub) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(err(&sub)(e))
                }
                _ => {}
            }
        }
        for (file, text) in [("dask.crt", &creds.cert_pem), ("dask.pem", &creds.key_pem)] {
            // Running processes may be reading a file that exists: it is never rewritten.
            let path = self.certs_dir(cluster).join(file);
            if fs::symlink_metadata(&path).is_err() {
                write_private(&path, text, identity.as_ref())?;
            }
        }
        if let Some(id) = &identity {
            for path in [self.certs_dir(cluster), self.work_dir(cluster)] {
                std::os::unix::fs::chown(&path, Some(id.uid), Some(id.gid)).map_err(err(&path))?;
            }
        }
        Ok(())
    }

    /// The parts of the cluster's directory every new process needs.
    fn required_parts(&self, cluster: &str) -> [PathBuf; 4] {
        let certs = self.certs_dir(cluster);
        [
            certs.join("dask.crt"),
            certs.join("dask.pem"),
            self.cluster_dir(cluster).join("logs"),
            self.work_dir(cluster),
        ]
    }

    /// Lays out again the parts of the cluster's directory that are gone, with the
    /// credentials from its record; true if any was missing.
    pub fn restore_missing(
        &self,
        cluster: &str,
        owner: &str,
        creds: &ClusterCredentials,
    ) -> Result<bool, LocalError> {
        safe_name(cluster)?;
        if self
            .required_parts(cluster)
            .iter()
            .all(|p| fs::symlink_metadata(p).is_ok())
        {
            return Ok(false);
        }
        self.prepare(cluster, owner, creds)?;
        Ok(true)
    }

    /// Removes the cluster's working directory (credentials and logs).
    pub fn remove_dir(&self, cluster: &str) {
        if safe_name(cluster).is_ok() {
            let _ = fs::remove_dir_all(self.cluster_dir(cluster));
        }
    }

    /// Deletes the cluster's credential files, keeping its logs for diagnosis.
    pub fn remove_credentials(&self, cluster: &str) {
        if safe_name(cluster).is_ok() {
            let _ = fs::remove_dir_all(self.certs_dir(cluster));
        }
    }

    /// The `dask` command and the directory to put first on `PATH` for a cluster: its own
    /// Python environment if its settings name one, else the backend's.
    fn dask_command(
        &self,
        settings: &ClusterSettings,
    ) -> Result<(PathBuf, Option<PathBuf>), LocalError> {
        match &settings.python_env {
            None => Ok((
                self.config.dask.command.clone(),
                self.config.dask.path_prefix.clone(),
            )),
            Some(env) => {
                let bin = Path::new(env).join("bin");
                let dask = bin.join("dask");
                if !Path::new(env).is_absolute() || !dask.is_file() {
                    return Err(LocalError::NoPythonEnv(env.clone()));
                }
                Ok((dask, Some(bin)))
            }
        }
    }

    /// Checks that a Python environment can run Dask (has `bin/dask`).
    pub fn check_python_env(env: &str) -> Result<(), LocalError> {
        let dask = Path::new(env).join("bin").join("dask");
        if Path::new(env).is_absolute() && dask.is_file() {
            Ok(())
        } else {
            Err(LocalError::NoPythonEnv(env.to_string()))
        }
    }

    /// The environment shared by scheduler and workers (wire-protocol 9.2).
    fn base_env(
        &self,
        cluster: &str,
        owner: &str,
        identity: Option<&Identity>,
        extra: &BTreeMap<String, String>,
        path_prefix: Option<&Path>,
    ) -> BTreeMap<String, String> {
        let mut env = pass_through_env(path_prefix);
        env.insert("USER".into(), owner.into());
        if let Some(id) = identity {
            let home = id.home.clone().unwrap_or_else(|| self.work_dir(cluster));
            env.insert("HOME".into(), home.display().to_string());
        }
        for (k, v) in extra {
            env.insert(k.clone(), v.clone());
        }
        let certs = self.certs_dir(cluster);
        let crt = certs.join("dask.crt").display().to_string();
        let key = certs.join("dask.pem").display().to_string();
        env.insert(
            "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION".into(),
            "True".into(),
        );
        env.insert(crate::process::CLUSTER_PATH_VARIABLE.into(), crt.clone());
        env.insert(
            "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT".into(),
            crt.clone(),
        );
        env.insert(
            "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY".into(),
            key.clone(),
        );
        env.insert("DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT".into(), crt);
        env.insert("DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY".into(), key);
        env
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        cluster: &str,
        role: ProcessRole,
        identity: Option<&Identity>,
        dask: &Path,
        args: Vec<String>,
        env: BTreeMap<String, String>,
        log_name: &str,
    ) -> Result<ProcessId, LocalError> {
        let dir = self.cluster_dir(cluster);
        let log_path = dir.join("logs").join(log_name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&log_path)
            .map_err(|source| LocalError::Prepare {
                path: log_path.clone(),
                source,
            })?;
        let log2 = log.try_clone().map_err(|source| LocalError::Prepare {
            path: log_path.clone(),
            source,
        })?;
        // Clusters laid out by an older gateway have no `work/` yet (restarts re-adopt them).
        let work = self.work_dir(cluster);
        if !work.is_dir() {
            let err = |source| LocalError::Prepare {
                path: work.clone(),
                source,
            };
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&work)
                .map_err(err)?;
            if let Some(id) = identity {
                std::os::unix::fs::chown(&work, Some(id.uid), Some(id.gid)).map_err(err)?;
            }
        }
        if let Some(id) = self.fork(cluster, &role, identity, dask, &args, &env, &log_path) {
            return Ok(id);
        }
        let command = dask.display().to_string();
        let mut cmd = tokio::process::Command::new(dask);
        if let Some(id) = identity {
            // Supplementary groups are dropped too (std does so when root changes uid).
            cmd.uid(id.uid).gid(id.gid);
        }
        cmd.args(&args)
            .env_clear()
            .envs(&env)
            .current_dir(self.work_dir(cluster))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|source| LocalError::Spawn { command, source })?;
        let pid = child.id().unwrap_or(0);
        // Read the start time right away; the child cannot be reaped before we wait on it.
        let id = ProcessId::of(pid).unwrap_or(ProcessId {
            pid,
            start_ticks: 0,
        });
        let events = self.events.clone();
        let cluster = cluster.to_string();
        tokio::spawn(async move {
            // A signal is reported as its negative number, as Python does.
            let code = child.wait().await.ok().and_then(|s| {
                use std::os::unix::process::ExitStatusExt;
                s.code().or_else(|| s.signal().map(|sig| -sig))
            });
            let _ = events.send(ProcessExit {
                cluster,
                role,
                id,
                code,
            });
        });
        Ok(id)
    }

    /// Forks the process from the environment's fork server; `None` if it must be exec'd
    /// (no server, not ready yet, an environment that needs a fresh interpreter, a failure).
    #[allow(clippy::too_many_arguments)]
    fn fork(
        &self,
        cluster: &str,
        role: &ProcessRole,
        identity: Option<&Identity>,
        dask: &Path,
        args: &[String],
        env: &BTreeMap<String, String>,
        log: &Path,
    ) -> Option<ProcessId> {
        let forks = self.forks.as_ref()?;
        if identity.is_some() {
            // The server runs as the gateway's account; a user's own account means exec.
            return None;
        }
        // A bare `dask` is looked up on the gateway's own PATH, never on one a cluster's
        // environment sets: the server is shared by every cluster of the environment.
        let prefix = dask.parent().filter(|p| !p.as_os_str().is_empty());
        let path =
            pass_through_env(prefix.or(self.config.dask.path_prefix.as_deref())).remove("PATH");
        let python = self.python_for(dask, path.as_deref())?;
        let (command, args) = args.split_first()?;
        let work = self.work_dir(cluster);
        let request = ForkRequest {
            argv0: dask,
            command,
            args,
            env,
            cwd: &work,
            log,
            cluster,
            role: role.clone(),
        };
        match forks.start(&python, request) {
            Ok(id) => Some(id),
            Err(e) => {
                debug!(cluster, "starting by exec: {e}");
                None
            }
        }
    }

    /// Starts `dask scheduler` with the gateway preload.
    pub fn start_scheduler(&self, spec: &SchedulerSpec<'_>) -> Result<ProcessId, LocalError> {
        safe_name(spec.cluster)?;
        let h = &self.config.bind_host;
        let (dask, path_prefix) = self.dask_command(spec.settings)?;
        let identity = self.config.identities.resolve(spec.owner)?;
        let mut env = self.base_env(
            spec.cluster,
            spec.owner,
            identity.as_ref(),
            &spec.settings.environment,
            path_prefix.as_deref(),
        );
        // The token goes in a file (the preload reads a value containing "/" as a path), not
        // in the environment: other processes of the same account could read it there.
        let token_file = self.certs_dir(spec.cluster).join("api-token");
        write_private(&token_file, spec.token, identity.as_ref())?;
        env.insert(
            "DASK_GATEWAY_API_URL".into(),
            self.config.dask.api_url.clone(),
        );
        env.insert(
            "DASK_GATEWAY_API_TOKEN".into(),
            token_file.display().to_string(),
        );
        env.insert("DASK_GATEWAY_CLUSTER_NAME".into(), spec.cluster.into());
        let args = vec![
            "scheduler".into(),
            "--protocol".into(),
            "tls".into(),
            "--port".into(),
            "0".into(),
            "--host".into(),
            h.clone(),
            "--dashboard-address".into(),
            format!("{h}:0"),
            "--preload".into(),
            "dask_gateway.scheduler_preload".into(),
            "--dg-api-address".into(),
            format!("{h}:0"),
            "--dg-heartbeat-period".into(),
            self.config.timing.heartbeat_period.to_string(),
            "--dg-adaptive-period".into(),
            self.config.timing.adaptive_period.to_string(),
            "--dg-idle-timeout".into(),
            spec.settings.idle_timeout.to_string(),
        ];
        self.spawn(
            spec.cluster,
            ProcessRole::Scheduler,
            identity.as_ref(),
            &dask,
            args,
            env,
            "scheduler.log",
        )
    }

    /// Starts one `dask worker` connected directly to the scheduler.
    pub fn start_worker(&self, spec: &WorkerSpec<'_>) -> Result<ProcessId, LocalError> {
        safe_name(spec.cluster)?;
        safe_name(spec.worker)?;
        let h = &self.config.bind_host;
        let (dask, path_prefix) = self.dask_command(spec.settings)?;
        let identity = self.config.identities.resolve(spec.owner)?;
        let env = self.base_env(
            spec.cluster,
            spec.owner,
            identity.as_ref(),
            &spec.settings.environment,
            path_prefix.as_deref(),
        );
        let args = vec![
            "worker".into(),
            spec.scheduler_address.into(),
            "--dashboard-address".into(),
            format!("{h}:0"),
            "--host".into(),
            h.clone(),
            "--name".into(),
            spec.worker.into(),
            "--nthreads".into(),
            spec.settings.worker_threads.max(1).to_string(),
            "--memory-limit".into(),
            spec.settings.worker_memory_limit().to_string(),
        ];
        let log = format!("worker-{}.log", spec.worker);
        self.spawn(
            spec.cluster,
            ProcessRole::Worker(spec.worker.into()),
            identity.as_ref(),
            &dask,
            args,
            env,
            &log,
        )
    }
}

impl Processes for Launcher {
    fn prepare(
        &self,
        cluster: &str,
        owner: &str,
        credentials: &ClusterCredentials,
    ) -> Result<(), LocalError> {
        Launcher::prepare(self, cluster, owner, credentials)
    }

    fn restore_missing(
        &self,
        cluster: &str,
        owner: &str,
        credentials: &ClusterCredentials,
    ) -> Result<bool, LocalError> {
        Launcher::restore_missing(self, cluster, owner, credentials)
    }

    fn remove_dir(&self, cluster: &str) {
        Launcher::remove_dir(self, cluster)
    }

    fn remove_credentials(&self, cluster: &str) {
        Launcher::remove_credentials(self, cluster)
    }

    fn start_scheduler(&self, spec: &SchedulerSpec<'_>) -> Result<ProcessId, LocalError> {
        Launcher::start_scheduler(self, spec)
    }

    fn start_worker(&self, spec: &WorkerSpec<'_>) -> Result<ProcessId, LocalError> {
        Launcher::start_worker(self, spec)
    }

    fn is_alive(&self, id: ProcessId) -> bool {
        id.is_alive()
    }

    fn adopt(&self, cluster: &str, role: ProcessRole, id: ProcessId) {
        watch_adopted(cluster.to_string(), role, id, self.events.clone());
    }

    fn reap(&self, id: ProcessId) {
        id.kill_remnants();
    }

    fn terminate(&self, id: ProcessId, grace: Duration) -> BoxFuture {
        Box::pin(async move { id.terminate(grace).await })
    }

    fn listens_on(&self, process: ProcessId, address: std::net::SocketAddr) -> bool {
        process.is_alive() && crate::process::group_listens_on(process.pid, address)
    }

    fn unknown_processes(&self, known: &HashSet<ProcessId>) -> Vec<(String, ProcessId)> {
        crate::process::group_leaders_under(&self.config.work_root)
            .into_iter()
            .filter(|(_, id)| !known.contains(id))
            .collect()
    }
}

fn safe_name(name: &str) -> Result<&str, LocalError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.starts_with('-');
    ok.then_some(name)
        .ok_or_else(|| LocalError::BadName(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_path_safe() {
        assert!(safe_name("abc123").is_ok());
        for bad in ["", "../x", "a/b", "-rf", "a b", "x.y"] {
            assert!(safe_name(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn prepares_private_directory_and_reports_exits() {
        let root = std::env::temp_dir().join(format!("dgrs-local-test-{}", std::process::id()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let backend = Launcher::new(
            LaunchConfig {
                work_root: root.clone(),
                dask: DaskLaunch {
                    command: "/bin/sh".into(),
                    path_prefix: None,
                    api_url: "http://127.0.0.1:1/api".into(),
                },
                bind_host: "127.0.0.1".into(),
                timing: ClusterTiming::default(),
                identities: Arc::new(Identities::new(Default::default()).unwrap()),
                fork: None,
            },
            tx,
        );
        let creds = ClusterCredentials::generate("c1").unwrap();
        backend.prepare("c1", "alice", &creds).unwrap();
        let dir_mode = fs::metadata(backend.cluster_dir("c1"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let key_mode = fs::metadata(backend.certs_dir("c1").join("dask.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);
        // Deleted parts come back with the record's credentials; nothing else is touched.
        assert!(!backend.restore_missing("c1", "alice", &creds).unwrap());
        let log = backend.cluster_dir("c1").join("logs").join("scheduler.log");
        fs::write(&log, "kept").unwrap();
        fs::remove_dir_all(backend.certs_dir("c1")).unwrap();
        assert!(backend.restore_missing("c1", "alice", &creds).unwrap());
        let key = backend.certs_dir("c1").join("dask.pem");
        assert_eq!(fs::read_to_string(&key).unwrap(), creds.key_pem);
        assert_eq!(
            fs::read_to_string(backend.certs_dir("c1").join("dask.crt")).unwrap(),
            creds.cert_pem
        );
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let certs_mode = fs::metadata(backend.certs_dir("c1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(certs_mode & 0o777, 0o700);
        assert_eq!(fs::read_to_string(&log).unwrap(), "kept");
        assert!(!backend.restore_missing("c1", "alice", &creds).unwrap());
        // A cluster directory from an older gateway has no work/: it is made on start.
        fs::remove_dir(backend.work_dir("c1")).unwrap();
        // "/bin/sh scheduler ..." fails at once: the exit must still be reported with its code.
        let id = backend
            .start_scheduler(&SchedulerSpec {
                cluster: "c1",
                owner: "alice",
                token: "t",
                settings: &ClusterSettings::example(),
            })
            .unwrap();
        let exit = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.id, id);
        assert_eq!(exit.role, ProcessRole::Scheduler);
        assert!(exit.code.is_some_and(|c| c != 0));
        let token = backend.certs_dir("c1").join("api-token");
        assert_eq!(fs::read_to_string(&token).unwrap(), "t");
        assert_eq!(
            fs::metadata(&token).unwrap().permissions().mode() & 0o777,
            0o600
        );
        backend.remove_dir("c1");
        assert!(!backend.cluster_dir("c1").exists());
        let _ = fs::remove_dir_all(root);
    }
}
