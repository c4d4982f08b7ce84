//! The server configuration: one YAML file, every key optional, documented in
//! `docs/configuration.md`.

pub mod option_target;
pub mod settings;

use gateway_model::limits::BadMemory;
use gateway_model::{parse_memory, ClusterResources, OptionField, ResourceLimits};
use option_target::OptionTarget;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The YAML is malformed or has unknown/mistyped keys.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_yaml::Error,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Top-level configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Public listen address: REST API, dashboards and (unless `scheduler_address` is set)
    /// scheduler TLS, told apart by their first bytes.
    pub address: SocketAddr,
    /// Optional separate listen address for scheduler TLS only.
    pub scheduler_address: Option<SocketAddr>,
    /// URL path prefix of every HTTP route, e.g. `/gateway` (empty = none).
    pub prefix: String,
    /// Directory for the SQLite state and per-cluster working directories.
    pub data_dir: Option<PathBuf>,
    /// `DASK_GATEWAY_API_URL` given to schedulers (default `http://<address><prefix>/api`).
    pub api_url: Option<String>,
    /// Log output: `text` or `json`.
    pub log_format: LogFormat,
    /// Default log filter (overridden by `RUST_LOG`).
    pub log_level: String,
    /// Optional HTTPS on the public port.
    pub tls: Option<TlsConfig>,
    /// Stop all clusters when the gateway shuts down on SIGTERM/SIGINT. `false` keeps them
    /// running so a restarted gateway re-adopts them.
    pub stop_clusters_on_shutdown: bool,
    /// Require the owner's credentials for dashboards (default: open, like the reference).
    pub dashboard_auth: bool,
    /// `Content-Security-Policy` of every dashboard response. The default sandboxes dashboard
    /// pages (user-controlled content) into an opaque origin so their scripts cannot use a
    /// visitor's gateway session; an empty string sends none (see docs/security.md).
    pub dashboard_csp: String,
    /// Who may read `/metrics`, and where it is served.
    pub metrics: MetricsConfig,
    /// Seconds one API request may take, reading its body included (408 after that).
    pub request_timeout: f64,
    /// Seconds usage (hourly core- and memory-seconds per cluster) is kept on the local
    /// backend; 0 keeps it forever. On Kubernetes usage lives in the DaskCluster records and
    /// goes with them (`cluster.retention`).
    pub usage_retention: f64,
    /// User authentication.
    pub auth: AuthConfig,
    /// Where clusters run: `local` (processes on this machine) or `kubernetes` (pods).
    pub backend: BackendKind,
    /// How Dask is launched (local backend).
    pub dask: DaskConfig,
    /// The Kubernetes backend and its controller.
    pub kubernetes: gateway_kube::KubeConfig,
    /// Cluster defaults, limits and user options.
    pub cluster: ClusterConfig,
    /// Group policies in priority order: a user gets the first one whose group they are in
    /// (`cluster` with that entry's keys replaced); users in none of them get `cluster`.
    pub groups: Vec<GroupPolicy>,
}

/// What one group's users get instead of the `cluster` section's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupPolicy {
    /// The group (as the authenticator or `auth.groups` reports it).
    pub group: String,
    /// Keys of the `cluster` section with other values for this group: options (profiles)
    /// and their bounds, defaults, per-cluster limits, per-user quotas, lifetimes. Keys not
    /// given keep the `cluster` section's value.
    #[serde(default)]
    pub cluster: serde_yaml::Mapping,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            address: "127.0.0.1:8000".parse().unwrap(),
            scheduler_address: None,
            prefix: String::new(),
            data_dir: None,
            api_url: None,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            tls: None,
            stop_clusters_on_shutdown: false,
            dashboard_auth: false,
            dashboard_csp: DEFAULT_DASHBOARD_CSP.into(),
            metrics: MetricsConfig::default(),
            request_timeout: 60.0,
            usage_retention: 400.0 * 86400.0,
            auth: AuthConfig::default(),
            backend: BackendKind::Local,
            dask: DaskConfig::default(),
            kubernetes: gateway_kube::KubeConfig::default(),
            cluster: ClusterConfig::default(),
            groups: Vec::new(),
        }
    }
}

/// The default dashboard `Content-Security-Policy`: scripts, forms, popups, downloads and
/// dialogs work (Bokeh needs scripts and its WebSocket), but without `allow-same-origin` the
/// page never shares the gateway's origin.
pub const DEFAULT_DASHBOARD_CSP: &str =
    "sandbox allow-scripts allow-forms allow-popups allow-popups-to-escape-sandbox allow-downloads allow-modals";

/// Access to the Prometheus metrics.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` (and `/api/health`) on this address only, not on the public port.
    pub address: Option<SocketAddr>,
    /// A file holding a token that `/metrics` then requires as `Authorization: Bearer <token>`.
    pub token_file: Option<PathBuf>,
    /// Label the usage counters by `user` and `group` (one series per user and group: mind
    /// the cardinality); off, they are gateway totals.
    pub usage_by_user: bool,
}

impl MetricsConfig {
    /// The bearer token from `token_file` (trimmed), if one is configured.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "metrics.token_file {} is empty",
                path.display()
            )));
        }
        Ok(Some(token.to_string()))
    }
}

/// Where clusters run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Dask processes on this machine, state in SQLite in the data directory.
    #[default]
    Local,
    /// Pods on Kubernetes, state in DaskCluster objects.
    Kubernetes,
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(BackendKind::Local),
            "kubernetes" | "kube" | "k8s" => Ok(BackendKind::Kubernetes),
            other => Err(format!(
                "unknown backend {other:?}: use local or kubernetes"
            )),
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human readable.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// PEM files for HTTPS on the public port.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// Authenticator selection and settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `simple`: HTTP Basic, any user name, optional shared password.
    #[serde(rename = "type")]
    pub kind: AuthKind,
    /// Shared password for `simple` (none = any password).
    pub password: Option<String>,
    /// Users who may see and act on every cluster.
    pub admin_users: Vec<String>,
    /// Members of these groups are admins (whatever method vouched for the membership).
    pub admin_groups: Vec<String>,
    /// Group memberships kept here, added to what the authenticator reports (the only source
    /// of groups for `simple`): group name → user names.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Seconds a session cookie stays valid on the server.
    pub cookie_max_age: u64,
    /// Session cookie name (default `dask-gateway-<random>` per process).
    pub cookie_name: Option<String>,
    /// A file with the key that signs session cookies (at least 32 characters; or the
    /// `GATEWAY_COOKIE_SECRET` environment variable). Replicas sharing it accept each other's
    /// sessions, and sessions survive restarts. Without one, a random key per process.
    pub cookie_secret_file: Option<PathBuf>,
    /// The session key itself, read from `cookie_secret_file` or the environment at startup
    /// (never from the YAML).
    #[serde(skip)]
    pub cookie_secret: Option<String>,
    /// Settings of the `jwt` authenticator.
    pub jwt: Option<crate::auth::jwt::JwtConfig>,
    /// Settings of the `jupyterhub` authenticator (defaults from the hub's environment
    /// variables when the section is left out).
    pub jupyterhub: Option<crate::auth::hub::HubConfig>,
    /// Settings of the `kerberos` authenticator (defaults when left out).
    pub kerberos: Option<crate::auth::kerberos::KerberosConfig>,
}

impl AuthConfig {
    /// The session-signing key: `cookie_secret` if already set, else `cookie_secret_file`,
    /// else the `GATEWAY_COOKIE_SECRET` environment variable (none: a random key per process).
    pub fn resolve_cookie_secret(&self) -> Result<Option<String>, ConfigError> {
        let secret = match (&self.cookie_secret, &self.cookie_secret_file) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, None) => std::env::var("GATEWAY_COOKIE_SECRET")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        };
        if let Some(s) = &secret {
            if s.len() < 32 {
                return Err(ConfigError::Invalid(
                    "the session cookie secret must have at least 32 characters".into(),
                ));
            }
        }
        Ok(secret)
    }

    /// `groups` turned around: user name → the groups it is listed in.
    pub fn members(&self) -> std::collections::HashMap<String, Vec<String>> {
        let mut out: std::collections::HashMap<String, Vec<String>> = Default::default();
        for (group, users) in &self.groups {
            for user in users {
                out.entry(user.clone()).or_default().push(group.clone());
            }
        }
        out
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            kind: AuthKind::Simple,
            password: None,
            admin_users: vec![],
            admin_groups: vec![],
            groups: BTreeMap::new(),
            cookie_max_age: 300,
            cookie_name: None,
            cookie_secret_file: None,
            cookie_secret: None,
            jwt: None,
            jupyterhub: None,
            kerberos: None,
        }
    }
}

/// Supported authenticators.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthKind {
    /// HTTP Basic with an optional shared password.
    #[default]
    Simple,
    /// `Authorization: Bearer <JWT>` (see `auth.jwt`).
    Jwt,
    /// JupyterHub API tokens, as the stock client's `JupyterHubAuth` sends them, checked with
    /// the hub; browsers log in through the hub's OAuth (see `auth.jupyterhub`).
    Jupyterhub,
    /// Kerberos `Negotiate` tokens (the stock client's `KerberosAuth`, and browsers' SPNEGO),
    /// accepted with a keytab (see `auth.kerberos`).
    Kerberos,
}

/// Where the `dask` command comes from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaskConfig {
    /// A venv or conda prefix: `<env>/bin/dask` is used and `<env>/bin` leads `PATH`.
    pub python_env: Option<PathBuf>,
    /// The command when `python_env` is unset (default `dask`, found on `PATH`).
    pub command: Option<PathBuf>,
    /// Which account runs each user's processes: `none` (all as the gateway's account, the
    /// single-user default), `system-users` (the system account named like the user) or
    /// `uid-range` (a uid of their own from `uid_range`). Isolation needs a root gateway.
    pub isolation: IsolationKind,
    /// The uids `uid-range` isolation hands out.
    pub uid_range: UidRange,
    /// Start workers and schedulers by forking them from a long-lived Python per environment
    /// that has imported `distributed` already (default on); off starts each by exec.
    pub fork_server: bool,
    /// Modules the fork server imports ahead besides `distributed` (e.g. `numpy`, `pandas`).
    pub preimport: Vec<String>,
}

/// A dotted Python module name: `numpy`, `dask.dataframe`.
fn is_module_name(name: &str) -> bool {
    name.split('.').all(|part| {
        let mut chars = part.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

impl Default for DaskConfig {
    fn default() -> Self {
        DaskConfig {
            python_env: None,
            command: None,
            isolation: IsolationKind::default(),
            uid_range: UidRange::default(),
            fork_server: true,
            preimport: Vec::new(),
        }
    }
}

/// How the local backend isolates users from each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationKind {
    /// Every cluster runs as the gateway's own account.
    #[default]
    None,
    /// Each user runs as the system account of the same name.
    SystemUsers,
    /// Each user runs under a uid of their own from `uid_range`.
    UidRange,
}

/// A range of uids (and equal gids) for `uid-range` isolation.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UidRange {
    /// First uid.
    pub first: u32,
    /// How many.
    pub count: u32,
}

impl Default for UidRange {
    fn default() -> Self {
        UidRange {
            first: 200_000,
            count: 65_536,
        }
    }
}

impl DaskConfig {
    /// The `dask` executable and the directory to put first on `PATH`.
    pub fn command_and_path(&self) -> (PathBuf, Option<PathBuf>) {
        match (&self.python_env, &self.command) {
            (_, Some(cmd)) => (cmd.clone(), self.python_env.as_ref().map(|e| e.join("bin"))),
            (Some(env), None) => (env.join("bin").join("dask"), Some(env.join("bin"))),
            (None, None) => ("dask".into(), None),
        }
    }
}

/// The most warm schedulers one section may keep.
pub const MAX_WARM_SCHEDULERS: u32 = 100;

/// Cluster defaults, timing, limits and exposed options.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Seconds of idleness after which the scheduler asks to be stopped (0 = never).
    pub idle_timeout: f64,
    /// Seconds after creation at which the gateway stops a cluster, busy or not (0 = never).
    pub max_lifetime: f64,
    /// Seconds a running cluster may have no client connected through the proxy (a notebook
    /// kernel that died, a script that exited without closing it) before the gateway stops
    /// it (0 = never). Workers do not go through the proxy and do not count.
    pub no_client_timeout: f64,
    /// Seconds between scheduler heartbeats.
    pub heartbeat_period: f64,
    /// Seconds without heartbeat before a running cluster is FAILED (default 2 × period).
    pub heartbeat_timeout: Option<f64>,
    /// Seconds between the scheduler's adaptive-scaling decisions.
    pub adaptive_period: f64,
    /// Seconds a scheduler may take to start.
    pub start_timeout: f64,
    /// Consecutive worker start failures after which the cluster is FAILED.
    pub worker_start_failure_limit: u32,
    /// Scheduler cores.
    pub scheduler_cores: f64,
    /// Scheduler memory.
    #[serde(deserialize_with = "memory")]
    pub scheduler_memory: u64,
    /// Cores per worker.
    pub worker_cores: f64,
    /// Memory per worker (`--memory-limit`).
    #[serde(deserialize_with = "memory")]
    pub worker_memory: u64,
    /// Threads per worker (default: cores, at least 1).
    pub worker_threads: Option<u32>,
    /// CPU limit per worker container (Kubernetes; default none).
    pub worker_cores_limit: Option<f64>,
    /// Memory limit per worker container (default: the worker memory).
    #[serde(deserialize_with = "opt_memory")]
    pub worker_memory_limit: Option<u64>,
    /// CPU limit of the scheduler container (Kubernetes; default none).
    pub scheduler_cores_limit: Option<f64>,
    /// Memory limit of the scheduler container (default: the scheduler memory).
    #[serde(deserialize_with = "opt_memory")]
    pub scheduler_memory_limit: Option<u64>,
    /// Container image of scheduler and workers (Kubernetes; default from the backend section).
    pub image: Option<String>,
    /// Backend profile applied to every cluster unless an option picks another (Kubernetes).
    pub profile: Option<String>,
    /// Python environment of every cluster unless an option picks another (local backend;
    /// default: `dask.python_env`).
    pub python_env: Option<String>,
    /// Per-cluster worker cap.
    pub max_workers: Option<u64>,
    /// The maximum of an `adapt()` that names none (none: as many as the caps and quotas allow).
    pub adapt_maximum_default: Option<u64>,
    /// The largest maximum an `adapt()` may name; larger ones are clipped with a warning.
    pub adapt_maximum_max: Option<u64>,
    /// Per-cluster core cap (scheduler + workers).
    pub max_cores: Option<f64>,
    /// Per-cluster memory cap (scheduler + workers).
    #[serde(deserialize_with = "opt_memory")]
    pub max_memory: Option<u64>,
    /// Active (PENDING or RUNNING) clusters one user may have (none = unlimited).
    pub max_clusters_per_user: Option<u64>,
    /// Workers one user may have across all their active clusters.
    pub max_workers_per_user: Option<u64>,
    /// Cores (schedulers + workers) one user may have across all their active clusters.
    pub max_cores_per_user: Option<f64>,
    /// Memory (schedulers + workers) one user may have across all their active clusters.
    #[serde(deserialize_with = "opt_memory")]
    pub max_memory_per_user: Option<u64>,
    /// Environment of schedulers and workers.
    pub environment: BTreeMap<String, String>,
    /// Seconds finished clusters stay listable before they are forgotten.
    pub retention: f64,
    /// Options users may set, in display order.
    pub options: Vec<OptionField>,
    /// Schedulers kept started ahead for this section's users (0 = none): a user whose
    /// scheduler settings match those of the section's defaults gets one at once instead of
    /// waiting for a scheduler to start. See docs/configuration.md, "Warm schedulers".
    pub warm_schedulers: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            idle_timeout: 0.0,
            max_lifetime: 0.0,
            no_client_timeout: 0.0,
            heartbeat_period: 15.0,
            heartbeat_timeout: None,
            adaptive_period: 3.0,
            start_timeout: 60.0,
            worker_start_failure_limit: 3,
            scheduler_cores: 1.0,
            scheduler_memory: 2 << 30,
            worker_cores: 1.0,
            worker_memory: 2 << 30,
            worker_threads: None,
            worker_cores_limit: None,
            worker_memory_limit: None,
            scheduler_cores_limit: None,
            scheduler_memory_limit: None,
            image: None,
            profile: None,
            python_env: None,
            max_workers: None,
            adapt_maximum_default: None,
            adapt_maximum_max: None,
            max_cores: None,
            max_memory: None,
            max_clusters_per_user: None,
            max_workers_per_user: None,
            max_cores_per_user: None,
            max_memory_per_user: None,
            environment: BTreeMap::new(),
            retention: 86400.0,
            options: Vec::new(),
            warm_schedulers: 0,
        }
    }
}

fn memory<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = serde_yaml::Value::deserialize(d)?;
    memory_value(&v).map_err(serde::de::Error::custom)
}

fn opt_memory<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let v = serde_yaml::Value::deserialize(d)?;
    if v.is_null() {
        return Ok(None);
    }
    memory_value(&v).map(Some).map_err(serde::de::Error::custom)
}

fn memory_value(v: &serde_yaml::Value) -> Result<u64, BadMemory> {
    match v {
        serde_yaml::Value::Number(n) if n.as_u64().is_some() => Ok(n.as_u64().unwrap()),
        serde_yaml::Value::String(s) => parse_memory(s),
        other => Err(BadMemory(format!("{other:?}"))),
    }
}

impl ClusterConfig {
    /// Resources of a cluster with these settings.
    pub fn resources(&self) -> ClusterResources {
        ClusterResources {
            scheduler_cores: self.scheduler_cores,
            scheduler_memory: self.scheduler_memory,
            worker_cores: self.worker_cores,
            worker_memory: self.worker_memory,
        }
    }

    /// Per-container ceilings of a cluster with these settings.
    pub fn container_limits(&self) -> gateway_backend::ContainerLimits {
        gateway_backend::ContainerLimits {
            scheduler_cores: self.scheduler_cores_limit,
            scheduler_memory: self.scheduler_memory_limit,
            worker_cores: self.worker_cores_limit,
            worker_memory: self.worker_memory_limit,
        }
    }

    /// Limits of a cluster with these settings.
    pub fn limits(&self) -> ResourceLimits {
        ResourceLimits {
            max_workers: self.max_workers,
            max_cores: self.max_cores,
            max_memory: self.max_memory,
            adapt_maximum_default: self.adapt_maximum_default,
            adapt_maximum_max: self.adapt_maximum_max,
        }
    }

    /// Worker threads: explicit, or the worker cores rounded down, at least 1.
    pub fn threads(&self) -> u32 {
        self.worker_threads
            .unwrap_or_else(|| (self.worker_cores.floor() as u32).max(1))
    }

    /// Seconds without heartbeat before a running cluster is FAILED.
    pub fn heartbeat_timeout(&self) -> f64 {
        self.heartbeat_timeout
            .unwrap_or(2.0 * self.heartbeat_period)
            .max(1.0)
    }
}

impl GatewayConfig {
    /// Reads and validates a YAML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let config: GatewayConfig = if text.trim().is_empty() {
            GatewayConfig::default()
        } else {
            serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.into(),
                source,
            })?
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks values serde cannot: ranges, option declarations, the prefix. (Whether every
    /// option value resolves to usable cluster settings is checked on top of this by
    /// `settings::check_config`, which start-up runs.)
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !self.prefix.is_empty() && !self.prefix.starts_with('/') {
            return bad(format!("prefix {:?} must start with '/'", self.prefix));
        }
        if self.prefix.contains(['?', '#', ' ']) {
            return bad(format!(
                "prefix {:?} may not contain '?', '#' or spaces",
                self.prefix
            ));
        }
        if http::HeaderValue::from_str(&self.dashboard_csp).is_err() {
            return bad(format!(
                "dashboard_csp {:?} is not a valid header value",
                self.dashboard_csp
            ));
        }
        if self.metrics.address.is_some() && self.metrics.address == Some(self.address) {
            return bad("metrics.address must differ from address".into());
        }
        if (self.auth.kind == AuthKind::Jwt) != self.auth.jwt.is_some() {
            return bad("auth.type jwt and an auth.jwt section go together".into());
        }
        if self.auth.kind != AuthKind::Jupyterhub && self.auth.jupyterhub.is_some() {
            return bad("an auth.jupyterhub section needs auth.type jupyterhub".into());
        }
        if self.auth.kind != AuthKind::Kerberos && self.auth.kerberos.is_some() {
            return bad("an auth.kerberos section needs auth.type kerberos".into());
        }
        if !(self.request_timeout.is_finite() && self.request_timeout >= 25.0) {
            return bad(format!(
                "request_timeout must be at least 25 seconds (a ?wait request is held 20 s), got {}",
                self.request_timeout
            ));
        }
        if !(self.usage_retention.is_finite() && self.usage_retention >= 0.0) {
            return bad(format!(
                "usage_retention must be a non-negative number of seconds (0: forever), got {}",
                self.usage_retention
            ));
        }
        if let Some(bad_name) = self.dask.preimport.iter().find(|m| !is_module_name(m)) {
            return bad(format!(
                "dask.preimport: {bad_name:?} is not a Python module name (like numpy or dask.dataframe)"
            ));
        }
        self.validate_cluster(&self.cluster, "cluster")?;
        self.group_clusters()?;
        if self.backend == BackendKind::Kubernetes {
            self.kubernetes.validate().map_err(ConfigError::Invalid)?;
            if self.api_url.is_none() {
                return bad("the kubernetes backend needs api_url: the gateway API address scheduler pods reach (e.g. http://dask-gateway.<namespace>:8000/api)".into());
            }
        }
        if let Some(u) = &self.api_url {
            let ok = (u.starts_with("http://") || u.starts_with("https://"))
                && u.trim_end_matches('/').ends_with("/api");
            if !ok {
                return bad(format!(
                    "api_url {u:?} must be an http(s) URL ending in /api"
                ));
            }
        }
        Ok(())
    }

    /// The cluster settings of each group policy, in priority order: the `cluster` section
    /// with the policy's keys replaced, each checked like the `cluster` section.
    pub fn group_clusters(&self) -> Result<Vec<(String, ClusterConfig)>, ConfigError> {
        let base = match serde_yaml::to_value(&self.cluster) {
            Ok(serde_yaml::Value::Mapping(m)) => m,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "cannot merge group policies over the cluster section: {other:?}"
                )))
            }
        };
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(self.groups.len());
        for policy in &self.groups {
            let section = format!("groups[{}].cluster", policy.group);
            if policy.group.is_empty() {
                return Err(ConfigError::Invalid(
                    "groups: an entry has an empty group name".into(),
                ));
            }
            if !seen.insert(&policy.group) {
                return Err(ConfigError::Invalid(format!(
                    "groups: {} is listed twice",
                    policy.group
                )));
            }
            let mut merged = base.clone();
            for (k, v) in &policy.cluster {
                merged.insert(k.clone(), v.clone());
            }
            let config: ClusterConfig = serde_yaml::from_value(serde_yaml::Value::Mapping(merged))
                .map_err(|e| ConfigError::Invalid(format!("{section}: {e}")))?;
            self.validate_cluster(&config, &section)?;
            out.push((policy.group.clone(), config));
        }
        Ok(out)
    }

    /// The checks of one cluster section (`cluster`, or a group's merged one).
    fn validate_cluster(&self, c: &ClusterConfig, section: &str) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if let Some(v) = c.max_cores_per_user {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!(
                    "{section}.max_cores_per_user must be a positive number, got {v}"
                ));
            }
        }
        for (name, v) in [
            ("heartbeat_period", c.heartbeat_period),
            ("adaptive_period", c.adaptive_period),
            ("start_timeout", c.start_timeout),
            ("worker_cores", c.worker_cores),
            ("scheduler_cores", c.scheduler_cores),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!(
                    "{section}.{name} must be a positive number, got {v}"
                ));
            }
        }
        for (name, v) in [
            ("idle_timeout", c.idle_timeout),
            ("max_lifetime", c.max_lifetime),
            ("no_client_timeout", c.no_client_timeout),
            ("retention", c.retention),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!(
                    "{section}.{name} must be a non-negative number, got {v}"
                ));
            }
        }
        if c.worker_memory == 0 {
            return bad(format!("{section}.worker_memory must be positive"));
        }
        if let (Some(default), Some(max)) = (c.adapt_maximum_default, c.adapt_maximum_max) {
            if default > max {
                return bad(format!(
                    "{section}.adapt_maximum_default ({default}) may not exceed adapt_maximum_max ({max})"
                ));
            }
        }
        if c.warm_schedulers > MAX_WARM_SCHEDULERS {
            return bad(format!(
                "{section}.warm_schedulers may be at most {MAX_WARM_SCHEDULERS}, got {}",
                c.warm_schedulers
            ));
        }
        if c.warm_schedulers > 0
            && self.backend == BackendKind::Local
            && self.dask.isolation != IsolationKind::None
        {
            return bad(format!(
                "{section}.warm_schedulers needs dask.isolation: none (a warm scheduler is \
                 started before anyone claims it, so it cannot run under its user's account)"
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &c.options {
            f.check_declaration()
                .map_err(|e| ConfigError::Invalid(format!("{section}.options: {}", e.0)))?;
            if !seen.insert(&f.field) {
                return bad(format!(
                    "{section}.options: field {} is declared twice",
                    f.field
                ));
            }
            if let Some(t) = &f.target {
                let target = match t.parse::<OptionTarget>() {
                    Ok(t) => t,
                    Err(e) => return bad(format!("{section}.options: {} has {e}", f.field)),
                };
                if target == OptionTarget::PythonEnv {
                    self.check_python_env_option(f)?;
                }
            }
        }
        c.limits()
            .check_scheduler(&c.resources())
            .map_err(|e| ConfigError::Invalid(format!("{section}: {e}")))?;
        if let (Some(env), BackendKind::Local) = (&c.python_env, self.backend) {
            gateway_local::Launcher::check_python_env(env)
                .map_err(|e| ConfigError::Invalid(format!("{section}.python_env: {e}")))?;
        }
        Ok(())
    }

    /// A `python_env` option: a `select` whose valued choices are Python environments with
    /// `bin/dask` (users pick among the operator's environments, never a path of their own).
    fn check_python_env_option(&self, f: &OptionField) -> Result<(), ConfigError> {
        let gateway_model::OptionKind::Select { options, .. } = &f.kind else {
            return Err(ConfigError::Invalid(format!(
                "option {} targets python_env, which only a select option may do",
                f.field
            )));
        };
        if self.backend != BackendKind::Local {
            return Ok(());
        }
        for choice in options {
            if let gateway_model::SelectChoice::Valued { value, .. } = choice {
                let env = value.as_str().unwrap_or_default();
                gateway_local::Launcher::check_python_env(env).map_err(|e| {
                    ConfigError::Invalid(format!("option {} choice {}: {e}", f.field, choice.key()))
                })?;
            }
        }
        Ok(())
    }

    /// The normalised URL prefix: empty or `/something` without a trailing slash.
    pub fn prefix(&self) -> String {
        self.prefix.trim_end_matches('/').to_string()
    }

    /// The data directory: configured, or `$XDG_DATA_HOME/dask-gateway-rs`, or
    /// `~/.local/share/dask-gateway-rs`.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(d) = &self.data_dir {
            return d.clone();
        }
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|x| !x.is_empty()) {
            return PathBuf::from(x).join("dask-gateway-rs");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        home.join(".local/share/dask-gateway-rs")
    }

    /// `DASK_GATEWAY_API_URL` for schedulers.
    pub fn api_url(&self) -> String {
        if let Some(u) = &self.api_url {
            return u.trim_end_matches('/').to_string();
        }
        // Plain HTTP even with `tls`: the shared port also serves HTTP, and the preload would
        // not trust an operator certificate unless the scheduler host does.
        let mut addr = self.address;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}{}/api", self.prefix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = GatewayConfig::default();
        c.validate().unwrap();
        assert_eq!(c.api_url(), "http://127.0.0.1:8000/api");
        assert_eq!(c.cluster.threads(), 1);
    }

    #[test]
    fn parses_full_example() {
        let c: GatewayConfig = serde_yaml::from_str(
            r#"
address: 0.0.0.0:9000
prefix: /gw/
auth: {password: secret, admin_users: [root]}
cluster:
  worker_memory: 512M
  max_memory: 4G
  options:
    - {field: worker_cores, type: int, default: 1, min: 1, max: 4, target: worker_cores}
    - {field: size, type: select, default: small, options: [small, {key: large, value: 4}], target: worker_threads}
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.prefix(), "/gw");
        assert_eq!(c.api_url(), "http://127.0.0.1:9000/gw/api");
        assert_eq!(c.cluster.worker_memory, 512 << 20);
        assert_eq!(c.cluster.max_memory, Some(4 << 30));
    }

    #[test]
    fn rejects_typos_and_bad_values() {
        assert!(serde_yaml::from_str::<GatewayConfig>("adress: x").is_err());
        assert!(serde_yaml::from_str::<GatewayConfig>("cluster: {worker_memory: lots}").is_err());
        let c: GatewayConfig = serde_yaml::from_str("cluster: {heartbeat_period: 0}").unwrap();
        assert!(c.validate().is_err());
        let c: GatewayConfig = serde_yaml::from_str(
            "cluster: {options: [{field: x, type: int, default: 1, target: nope}]}",
        )
        .unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("unknown target"));
        let c: GatewayConfig = serde_yaml::from_str("prefix: gw").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn python_env_options_are_selects_of_real_environments() {
        let env = std::env::temp_dir().join(format!("dgrs-pyenv-{}", std::process::id()));
        std::fs::create_dir_all(env.join("bin")).unwrap();
        std::fs::write(env.join("bin/dask"), "#!/bin/sh\n").unwrap();
        let yaml = |kind: &str, value: &str| {
            format!(
                "cluster: {{options: [{{field: py, type: {kind}, default: a, {choices} target: python_env}}]}}",
                choices = if kind == "select" {
                    format!("options: [a, {{key: b, value: '{value}'}}],")
                } else {
                    String::new()
                }
            )
        };
        let ok: GatewayConfig =
            serde_yaml::from_str(&yaml("select", env.to_str().unwrap())).unwrap();
        ok.validate().unwrap();
        let missing: GatewayConfig =
            serde_yaml::from_str(&yaml("select", "/nonexistent/env")).unwrap();
        assert!(missing
            .validate()
            .unwrap_err()
            .to_string()
            .contains("has no bin/dask"));
        let free_text: GatewayConfig = serde_yaml::from_str(&yaml("string", "")).unwrap();
        assert!(free_text
            .validate()
            .unwrap_err()
            .to_string()
            .contains("only a select option may do"));
        let _ = std::fs::remove_dir_all(env);
    }
}
