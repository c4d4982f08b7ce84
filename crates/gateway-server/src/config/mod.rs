//! The top-level configuration: the YAML file's schema and defaults (one file, every key
//! optional, documented in `docs/configuration.md`), reading it, and the one start-up check that
//! turns it into a [`CheckedConfig`]. The sections live next door: [`auth`], [`cluster`] (with
//! the group policies), [`local`]; [`settings`] resolves user options against a cluster section.

pub mod auth;
pub mod cluster;
pub mod local;
pub mod option_target;
pub mod settings;

pub use auth::{AuthConfig, AuthKind, HubConfig, JwtConfig, KerberosConfig};
pub use cluster::{ClusterConfig, GroupPolicy, MAX_WARM_SCHEDULERS};
pub use local::{DaskConfig, IsolationKind, UidRange};

use serde::Deserialize;
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
    /// Host names requests may be addressed to, besides addresses (`*.example.org` for every
    /// name below one). Empty: `localhost` only when listening on loopback, any name otherwise
    /// (see `http_shared::HostRule`). The host of `api_url` is always answered.
    pub allowed_hosts: Vec<String>,
    /// Connections the public listeners hold at once; one more is closed at once (`None`:
    /// as many as the process's open-file limit allows, see `gateway_proxy::ConnectionLimit`).
    pub max_connections: Option<usize>,
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
            max_connections: None,
            allowed_hosts: Vec::new(),
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

impl GatewayConfig {
    /// Reads a YAML file (an empty file means every default). Nothing is checked beyond the
    /// keys and their types: [`GatewayConfig::check`] does that once, after the command line
    /// has overridden what it sets.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        if text.trim().is_empty() {
            return Ok(GatewayConfig::default());
        }
        serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    /// Runs every start-up check and merges the group policies over the `cluster` section:
    /// the configuration the gateway runs with.
    pub fn check(self) -> Result<CheckedConfig, ConfigError> {
        let policies = self.checked_policies()?;
        Ok(CheckedConfig {
            config: self,
            policies,
        })
    }

    /// The checks of [`GatewayConfig::check`], without keeping the result.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.checked_policies().map(drop)
    }

    /// Checks values serde cannot (ranges, option declarations, the prefix, the backend's
    /// needs), merges and checks the group policies, then checks that every value an option
    /// can give its target is usable, in the `cluster` section and every policy. Returns the
    /// merged policies.
    fn checked_policies(&self) -> Result<Vec<(String, ClusterConfig)>, ConfigError> {
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
        self.auth.check()?;
        for host in &self.allowed_hosts {
            let name = host.strip_prefix("*.").unwrap_or(host);
            let plain = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
            if !plain {
                return Err(ConfigError::Invalid(format!(
                    "allowed_hosts: {host:?} is not a host name (no scheme, port or path; `*.` \
                     may lead)"
                )));
            }
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
        self.dask.check()?;
        if let (Some(env), BackendKind::Local) = (&self.dask.python_env, self.backend) {
            gateway_local::Launcher::check_python_env(&env.to_string_lossy())
                .map_err(|e| ConfigError::Invalid(format!("dask.python_env: {e}")))?;
        }
        self.validate_cluster(&self.cluster, "cluster")?;
        let policies = self.group_clusters()?;
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
        let sections = std::iter::once(("cluster".to_string(), &self.cluster)).chain(
            policies
                .iter()
                .map(|(group, c)| (format!("groups[{group}].cluster"), c)),
        );
        for (section, c) in sections {
            settings::check_targets(c)
                .map_err(|e| ConfigError::Invalid(format!("{section}: {e}")))?;
        }
        Ok(policies)
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

    /// Settings that are valid but leave users exposed to each other or to anyone who can
    /// reach the gateway, each in a sentence for the start-up log.
    pub fn exposures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let open_door = self.auth.kind == AuthKind::Simple && self.auth.password.is_none();
        if open_door && !self.address.ip().is_loopback() {
            out.push(format!(
                "auth.type simple without a password on {}: anyone who can reach this address \
                 can sign in as any user and reach their clusters (fine for a trial, not for \
                 several users)",
                self.address
            ));
        }
        if open_door && !(self.auth.admin_users.is_empty() && self.auth.admin_groups.is_empty()) {
            out.push(
                "admin users or groups with auth.type simple and no password: anyone can sign \
                 in as an admin"
                    .to_string(),
            );
        }
        if self.metrics.usage_by_user
            && self.metrics.address.is_none()
            && self.metrics.token_file.is_none()
        {
            out.push(
                "metrics.usage_by_user on a /metrics without metrics.address or \
                 metrics.token_file: every user's name and usage is public"
                    .to_string(),
            );
        }
        out
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

/// A configuration that passed every start-up check ([`GatewayConfig::check`]), with the group
/// policies merged over the `cluster` section once. [`crate::run`] takes it; it reads as the
/// [`GatewayConfig`] it holds.
#[derive(Clone, Debug)]
pub struct CheckedConfig {
    config: GatewayConfig,
    policies: Vec<(String, ClusterConfig)>,
}

impl CheckedConfig {
    /// The cluster settings of each group policy, in priority order: the `cluster` section
    /// with the policy's keys replaced.
    pub fn policies(&self) -> &[(String, ClusterConfig)] {
        &self.policies
    }

    /// Every cluster section: the `cluster` section (no group), then each group's.
    pub fn sections(&self) -> impl Iterator<Item = (Option<&str>, &ClusterConfig)> {
        std::iter::once((None, &self.config.cluster))
            .chain(self.policies.iter().map(|(g, c)| (Some(g.as_str()), c)))
    }

    /// The configuration to change without checking it again, for tests that need values
    /// below the operator minimums (a short `request_timeout`). The group policies stay as
    /// merged.
    #[doc(hidden)]
    pub fn unchecked_mut(&mut self) -> &mut GatewayConfig {
        &mut self.config
    }
}

impl std::ops::Deref for CheckedConfig {
    type Target = GatewayConfig;

    fn deref(&self) -> &GatewayConfig {
        &self.config
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
    fn exposures_name_open_doors_and_nothing_else() {
        let parse = |y: &str| {
            serde_yaml::from_str::<GatewayConfig>(y)
                .unwrap()
                .exposures()
        };
        // The default listens on loopback: a single-user trial.
        assert!(GatewayConfig::default().exposures().is_empty());
        let open = parse("address: 0.0.0.0:8000");
        assert_eq!(open.len(), 1, "{open:?}");
        assert!(open[0].contains("anyone who can reach"), "{open:?}");
        let admins = parse("auth: {admin_users: [root]}");
        assert_eq!(admins.len(), 1, "{admins:?}");
        assert!(admins[0].contains("as an admin"), "{admins:?}");
        assert!(
            parse("address: 0.0.0.0:8000\nauth: {password: s, admin_users: [root]}").is_empty()
        );
        assert!(parse(
            "address: 0.0.0.0:8000\nauth: {type: jwt, jwt: {secret_file: /k}, admin_users: [a]}"
        )
        .is_empty());
        let usage = parse("metrics: {usage_by_user: true}");
        assert!(
            usage.iter().any(|e| e.contains("usage_by_user")),
            "{usage:?}"
        );
        assert!(parse("metrics: {usage_by_user: true, token_file: /t}").is_empty());
        assert!(parse("metrics: {usage_by_user: true, address: 127.0.0.1:9100}").is_empty());
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
}
