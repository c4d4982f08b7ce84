//! Client settings from arguments, environment variables and the dask configuration files the
//! Python client reads (`gateway.address`, `gateway.proxy-address`, `gateway.public-address`,
//! `gateway.auth.type`, `gateway.auth.kwargs`), so one configuration serves both clients.

use crate::error::ClientError;
use serde_yaml::Value;
use std::path::{Path, PathBuf};

/// How the client authenticates (sent only after the gateway answers 401, like the Python
/// client; afterwards the session cookie is used).
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// No credentials (a gateway that needs them answers 401).
    None,
    /// HTTP Basic (the `simple` authenticator); the password may be empty.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// `Authorization: Bearer <token>` (JWT / OIDC).
    Bearer(String),
    /// `Authorization: token <token>` (a JupyterHub API token).
    JupyterHub(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        match self {
            Auth::None => write!(f, "None"),
            Auth::Basic { username, .. } => write!(f, "Basic({username})"),
            Auth::Bearer(_) => write!(f, "Bearer(..)"),
            Auth::JupyterHub(_) => write!(f, "JupyterHub(..)"),
        }
    }
}

impl Auth {
    /// The `Authorization` header value, if any.
    pub fn header(&self) -> Option<String> {
        use base64::Engine;
        match self {
            Auth::None => None,
            Auth::Basic { username, password } => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
            )),
            Auth::Bearer(t) => Some(format!("Bearer {t}")),
            Auth::JupyterHub(t) => Some(format!("token {t}")),
        }
    }
}

/// Where the gateway is and how to authenticate.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The gateway's HTTP(S) address, e.g. `http://127.0.0.1:8000` (with any prefix).
    pub address: String,
    /// `host:port` of the scheduler proxy (default: the address's host and port).
    pub proxy_address: Option<String>,
    /// Address to show in dashboard links (default: `address`).
    pub public_address: Option<String>,
    /// Credentials.
    pub auth: Auth,
    /// Seconds one HTTP request may take.
    pub request_timeout: f64,
}

impl ClientConfig {
    /// A configuration for `address` with no credentials.
    pub fn new(address: impl Into<String>) -> Self {
        ClientConfig {
            address: address.into().trim_end_matches('/').to_string(),
            proxy_address: None,
            public_address: None,
            auth: Auth::None,
            request_timeout: 60.0,
        }
    }

    /// Settings as the Python client finds them: dask config files, then `DASK_*` environment
    /// variables (e.g. `DASK_GATEWAY__ADDRESS`), later sources winning.
    pub fn from_dask_config() -> Result<Self, ClientError> {
        let merged = DaskConfig::load();
        Self::from_values(&merged)
    }

    fn from_values(cfg: &DaskConfig) -> Result<Self, ClientError> {
        let address = cfg.string(&["gateway", "address"]).ok_or_else(|| {
            ClientError::Config(
                "no gateway address: pass --address, set DASK_GATEWAY__ADDRESS, or gateway.address in a dask config file".into(),
            )
        })?;
        let mut c = ClientConfig::new(address);
        c.proxy_address = cfg.string(&["gateway", "proxy-address"]);
        c.public_address = cfg.string(&["gateway", "public-address"]);
        let kind = cfg
            .string(&["gateway", "auth", "type"])
            .unwrap_or_else(|| "basic".into());
        let kwarg = |k: &str| cfg.string(&["gateway", "auth", "kwargs", k]);
        c.auth = auth_from(&kind, &kwarg)?;
        Ok(c)
    }
}

/// Builds credentials from an auth type name (`basic`, `jupyterhub`, `jwt`, or a dotted class
/// name ending in `JWTAuth`) and its keyword arguments.
pub fn auth_from(kind: &str, kwarg: &dyn Fn(&str) -> Option<String>) -> Result<Auth, ClientError> {
    let lower = kind.to_ascii_lowercase();
    match lower.as_str() {
        "basic" | "dask_gateway.auth.basicauth" => Ok(Auth::Basic {
            username: kwarg("username")
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "user".into()),
            password: kwarg("password").unwrap_or_default(),
        }),
        "jupyterhub" | "dask_gateway.auth.jupyterhubauth" => kwarg("api_token")
            .or_else(|| std::env::var("JUPYTERHUB_API_TOKEN").ok())
            .map(Auth::JupyterHub)
            .ok_or_else(|| {
                ClientError::Config(
                    "JupyterHub auth needs an API token (JUPYTERHUB_API_TOKEN or gateway.auth.kwargs.api_token)".into(),
                )
            }),
        "none" => Ok(Auth::None),
        _ if lower == "jwt" || lower.ends_with("jwtauth") => {
            if let Some(t) = kwarg("token") {
                return Ok(Auth::Bearer(t));
            }
            if let Some(path) = kwarg("token_file") {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| ClientError::Config(format!("reading {path}: {e}")))?;
                return Ok(Auth::Bearer(text.trim().to_string()));
            }
            std::env::var("DASK_GATEWAY_JWT")
                .map(Auth::Bearer)
                .map_err(|_| {
                    ClientError::Config(
                        "JWT auth needs a token (DASK_GATEWAY_JWT, gateway.auth.kwargs.token or token_file)".into(),
                    )
                })
        }
        "kerberos" | "dask_gateway.auth.kerberosauth" => Err(ClientError::Config(
            "Kerberos auth is not supported by the Rust client; use basic, jupyterhub or jwt".into(),
        )),
        other => Err(ClientError::Config(format!(
            "unknown auth type {other:?}: use basic, jupyterhub or jwt"
        ))),
    }
}

/// The dask configuration, merged from files and environment like `dask.config`.
#[derive(Debug, Default)]
pub struct DaskConfig {
    root: Value,
}

impl DaskConfig {
    /// Files from `$DASK_ROOT_CONFIG` (default `/etc/dask`), `~/.config/dask` (or
    /// `$DASK_CONFIG`), then `DASK_*` environment variables.
    pub fn load() -> Self {
        let mut cfg = DaskConfig::default();
        let root = std::env::var("DASK_ROOT_CONFIG").unwrap_or_else(|_| "/etc/dask".into());
        let user = std::env::var("DASK_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                Path::new(&std::env::var("HOME").unwrap_or_default()).join(".config/dask")
            });
        for dir in [PathBuf::from(root), user] {
            cfg.merge_dir(&dir);
        }
        cfg.merge_env(std::env::vars());
        cfg
    }

    /// Merges every `*.yaml` / `*.yml` file of `dir` (in name order); unreadable files are
    /// skipped, as dask does.
    pub fn merge_dir(&mut self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        for f in files {
            if let Ok(text) = std::fs::read_to_string(&f) {
                if let Ok(v) = serde_yaml::from_str::<Value>(&text) {
                    merge(&mut self.root, normalize(v));
                }
            }
        }
    }

    /// Merges `DASK_A__B=value` variables as `a.b: value` (values read as YAML scalars).
    pub fn merge_env(&mut self, vars: impl IntoIterator<Item = (String, String)>) {
        for (k, v) in vars {
            let Some(rest) = k.strip_prefix("DASK_") else {
                continue;
            };
            let path: Vec<String> = rest.split("__").map(canonical).collect();
            if path.iter().any(String::is_empty) {
                continue;
            }
            let value = match serde_yaml::from_str::<Value>(&v) {
                Ok(parsed @ (Value::Bool(_) | Value::Number(_) | Value::String(_))) => parsed,
                _ => Value::String(v),
            };
            let mut node = value;
            for key in path.iter().rev() {
                let mut m = serde_yaml::Mapping::new();
                m.insert(Value::String(key.clone()), node);
                node = Value::Mapping(m);
            }
            merge(&mut self.root, node);
        }
    }

    /// The value at `path` as text (numbers and booleans too).
    pub fn string(&self, path: &[&str]) -> Option<String> {
        let mut node = &self.root;
        for key in path {
            node = node.as_mapping()?.get(Value::String(canonical(key)))?;
        }
        match node {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
}

/// dask treats `_` and `-` in keys alike, and keys from the environment are lower-cased.
fn canonical(key: &str) -> String {
    key.to_ascii_lowercase().replace('_', "-")
}

fn normalize(v: Value) -> Value {
    match v {
        Value::Mapping(m) => Value::Mapping(
            m.into_iter()
                .map(|(k, v)| {
                    let k = match k {
                        Value::String(s) => Value::String(canonical(&s)),
                        other => other,
                    };
                    (k, normalize(v))
                })
                .collect(),
        ),
        other => other,
    }
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_then_environment() {
        let dir = std::env::temp_dir().join(format!("dgrs-client-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("gateway.yaml"),
            "gateway:\n  address: http://file:8000\n  proxy_address: file:8786\n  auth:\n    type: basic\n    kwargs: {username: alice, password: pw}\n",
        )
        .unwrap();
        let mut cfg = DaskConfig::default();
        cfg.merge_dir(&dir);
        let c = ClientConfig::from_values(&cfg).unwrap();
        assert_eq!(c.address, "http://file:8000");
        assert_eq!(c.proxy_address.as_deref(), Some("file:8786"));
        assert_eq!(
            c.auth,
            Auth::Basic {
                username: "alice".into(),
                password: "pw".into()
            }
        );
        cfg.merge_env([
            ("DASK_GATEWAY__ADDRESS".into(), "http://env:9000/".into()),
            ("DASK_GATEWAY__PROXY_ADDRESS".into(), "8786".into()),
            ("DASK_GATEWAY__AUTH__TYPE".into(), "jupyterhub".into()),
            ("DASK_GATEWAY__AUTH__KWARGS__API_TOKEN".into(), "tok".into()),
            ("NOT_DASK".into(), "x".into()),
        ]);
        let c = ClientConfig::from_values(&cfg).unwrap();
        assert_eq!(c.address, "http://env:9000");
        assert_eq!(c.proxy_address.as_deref(), Some("8786"));
        assert_eq!(c.auth, Auth::JupyterHub("tok".into()));
        assert_eq!(c.auth.header().unwrap(), "token tok");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn auth_types() {
        let none = |_: &str| None;
        assert!(matches!(
            auth_from("kerberos", &none),
            Err(ClientError::Config(_))
        ));
        assert!(matches!(
            auth_from("nope", &none),
            Err(ClientError::Config(_))
        ));
        let tok = |k: &str| (k == "token").then(|| "abc".to_string());
        assert_eq!(
            auth_from("mypkg.JWTAuth", &tok).unwrap(),
            Auth::Bearer("abc".into())
        );
        let basic = auth_from("basic", &|k: &str| (k == "username").then(|| "zoë".into()));
        assert_eq!(
            basic.unwrap().header().unwrap(),
            format!(
                "Basic {}",
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "zoë:")
            )
        );
        assert_eq!(format!("{:?}", Auth::Bearer("secret".into())), "Bearer(..)");
        assert!(ClientConfig::from_values(&DaskConfig::default()).is_err());
    }
}
