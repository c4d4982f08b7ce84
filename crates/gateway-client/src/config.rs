//! Client settings from arguments, environment variables and the dask configuration files the
//! Python client reads (`gateway.address`, `gateway.proxy-address`, `gateway.public-address`,
//! `gateway.auth.type`, `gateway.auth.kwargs`, `gateway.http-client.proxy`,
//! `gateway.cluster.options`), read as it reads them (`{VAR}` templates filled from the
//! environment), so one configuration serves both clients.

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
    /// Seconds one HTTP request may take (above 0, at most a day).
    pub request_timeout: f64,
    /// How HTTP requests reach the gateway.
    pub http_proxy: HttpProxy,
}

/// How HTTP requests reach the gateway (`gateway.http-client.proxy`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HttpProxy {
    /// Through the proxy that `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` name, except for the
    /// hosts in `NO_PROXY` (`true`, the default, as for the Python client).
    #[default]
    FromEnvironment,
    /// Directly (`false`).
    Off,
    /// Through this proxy URL.
    Url(String),
}

/// Settings given on a command line: each one set wins over the dask configuration.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// The gateway address.
    pub address: Option<String>,
    /// The scheduler proxy address.
    pub proxy_address: Option<String>,
    /// The auth type.
    pub auth_type: Option<String>,
    /// The basic-auth user name.
    pub username: Option<String>,
    /// The basic-auth password.
    pub password: Option<String>,
    /// The JWT or JupyterHub token.
    pub token: Option<String>,
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
            http_proxy: HttpProxy::FromEnvironment,
        }
    }

    /// Settings as the Python client finds them: dask config files, then `DASK_*` environment
    /// variables (e.g. `DASK_GATEWAY__ADDRESS`), later sources winning.
    pub fn from_dask_config() -> Result<Self, ClientError> {
        Self::resolve(&DaskConfig::load(), &Overrides::default())
    }

    /// Settings from `over` where given, else from the dask configuration `cfg` (its strings
    /// filled in from the environment, as the Python client's `format_template` does).
    pub fn resolve(cfg: &DaskConfig, over: &Overrides) -> Result<Self, ClientError> {
        let setting = |path: &[&str]| cfg.template(path);
        let address = match &over.address {
            Some(a) => a.clone(),
            None => setting(&["gateway", "address"])?.ok_or_else(|| {
                ClientError::Config(
                    "no gateway address: pass --address, set DASK_GATEWAY__ADDRESS, or gateway.address in a dask config file".into(),
                )
            })?,
        };
        let mut c = ClientConfig::new(address);
        c.proxy_address = match &over.proxy_address {
            Some(p) => Some(p.clone()),
            None => setting(&["gateway", "proxy-address"])?,
        };
        c.public_address = setting(&["gateway", "public-address"])?;
        c.http_proxy = match cfg.value(&["gateway", "http-client", "proxy"]) {
            None | Some(Value::Null) | Some(Value::Bool(true)) => HttpProxy::FromEnvironment,
            Some(Value::Bool(false)) => HttpProxy::Off,
            Some(Value::String(_)) => match setting(&["gateway", "http-client", "proxy"])? {
                Some(url) => HttpProxy::Url(url),
                None => HttpProxy::FromEnvironment,
            },
            Some(other) => {
                return Err(ClientError::Config(format!(
                    "gateway.http-client.proxy must be true, false or a URL, not {}",
                    serde_yaml::to_string(other).unwrap_or_default().trim()
                )))
            }
        };
        let kind = match &over.auth_type {
            Some(k) => k.clone(),
            None => setting(&["gateway", "auth", "type"])?.unwrap_or_else(|| "basic".into()),
        };
        let mut kwargs = std::collections::HashMap::new();
        for key in ["username", "password", "api_token", "token", "token_file"] {
            let given = match key {
                "username" => over.username.clone(),
                "password" => over.password.clone(),
                "token" | "api_token" => over.token.clone(),
                _ => None,
            };
            let value = match given {
                Some(v) => Some(v),
                None => setting(&["gateway", "auth", "kwargs", key])?,
            };
            if let Some(v) = value {
                kwargs.insert(key, v);
            }
        }
        c.auth = auth_from(&kind, &|k: &str| kwargs.get(k).cloned())?;
        Ok(c)
    }
}

/// The user's login name as Python's `getpass.getuser()` finds it: `LOGNAME`, `USER`,
/// `LNAME` or `USERNAME`, else the account of the process's user id.
pub fn login_name() -> Option<String> {
    for var in ["LOGNAME", "USER", "LNAME", "USERNAME"] {
        if let Some(name) = std::env::var(var).ok().filter(|n| !n.is_empty()) {
            return Some(name);
        }
    }
    account_name()
}

/// The name of the account of this process's real user id (through NSS, as `getpwuid`).
fn account_name() -> Option<String> {
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to a live local of the right type and size; the result's
    // strings point into `buffer`, which outlives their use below.
    let rc = unsafe {
        libc::getpwuid_r(
            libc::getuid(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() || entry.pw_name.is_null() {
        return None;
    }
    // SAFETY: `pw_name` is a NUL-terminated string inside `buffer`.
    let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) };
    name.to_str()
        .ok()
        .filter(|n| !n.is_empty())
        .map(String::from)
}

/// Python's `str.format(**os.environ)` on a setting: `{NAME}` becomes the environment
/// variable `NAME`, `{{` and `}}` stand for braces. A variable that is not set, or any other
/// replacement field, is a configuration error that names it.
pub fn format_template(text: &str) -> Result<String, ClientError> {
    format_with(text, &|name| std::env::var(name).ok())
}

fn format_with(text: &str, var: &dyn Fn(&str) -> Option<String>) -> Result<String, ClientError> {
    let bad = |why: String| ClientError::Config(format!("the setting {text:?} {why}"));
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) if ch.is_alphanumeric() || ch == '_' => name.push(ch),
                        Some(_) | None => {
                            return Err(bad(
                                "has a `{` that opens no `{NAME}` of an environment variable (write `{{` for a brace)".into(),
                            ))
                        }
                    }
                }
                match var(&name) {
                    Some(v) => out.push_str(&v),
                    None => {
                        return Err(bad(format!(
                            "names the environment variable {name}, which is not set"
                        )))
                    }
                }
            }
            '}' => return Err(bad("has a single `}` (write `}}` for a brace)".into())),
            other => out.push(other),
        }
    }
    Ok(out)
}

/// Builds credentials from an auth type name (`basic`, `jupyterhub`, `jwt`, or a dotted class
/// name ending in `JWTAuth`) and its keyword arguments.
pub fn auth_from(kind: &str, kwarg: &dyn Fn(&str) -> Option<String>) -> Result<Auth, ClientError> {
    let lower = kind.to_ascii_lowercase();
    match lower.as_str() {
        "basic" | "dask_gateway.auth.basicauth" => Ok(Auth::Basic {
            username: kwarg("username").or_else(login_name).ok_or_else(|| {
                ClientError::Config(
                    "no user name: none of LOGNAME, USER, LNAME, USERNAME is set and this user id has no account; pass --user or set gateway.auth.kwargs.username".into(),
                )
            })?,
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
    /// Files from `$DASK_ROOT_CONFIG` (default `/etc/dask`), `~/.config/dask` and
    /// `$DASK_CONFIG` (when set, read last), then `DASK_*` environment variables: dask's
    /// own order.
    pub fn load() -> Self {
        let mut cfg = DaskConfig::default();
        let root = std::env::var("DASK_ROOT_CONFIG").unwrap_or_else(|_| "/etc/dask".into());
        let mut dirs = vec![PathBuf::from(root)];
        if let Ok(home) = std::env::var("HOME") {
            dirs.push(Path::new(&home).join(".config/dask"));
        }
        if let Ok(extra) = std::env::var("DASK_CONFIG") {
            dirs.push(PathBuf::from(extra));
        }
        for dir in dirs {
            cfg.merge_dir(&dir);
        }
        cfg.merge_env(std::env::vars());
        cfg
    }

    /// The value at `path`, as YAML.
    pub fn value(&self, path: &[&str]) -> Option<&Value> {
        let mut node = &self.root;
        for key in path {
            node = node.as_mapping()?.get(Value::String(canonical(key)))?;
        }
        Some(node)
    }

    /// [`Self::string`] with `{VAR}` templates filled in ([`format_template`]).
    pub fn template(&self, path: &[&str]) -> Result<Option<String>, ClientError> {
        self.string(path).map(|s| format_template(&s)).transpose()
    }

    /// `gateway.cluster.options`: the option values a new cluster gets unless given, as JSON
    /// (strings with templates filled in).
    pub fn cluster_options(
        &self,
    ) -> Result<serde_json::Map<String, serde_json::Value>, ClientError> {
        let mut out = serde_json::Map::new();
        let Some(options) = self.value(&["gateway", "cluster", "options"]) else {
            return Ok(out);
        };
        let Some(map) = options.as_mapping() else {
            return Ok(out);
        };
        for (k, v) in map {
            let Some(key) = k.as_str().map(String::from) else {
                continue;
            };
            let value = match v {
                Value::String(s) => serde_json::Value::String(format_template(s)?),
                other => serde_json::to_value(other).map_err(|e| {
                    ClientError::Config(format!("gateway.cluster.options.{key}: {e}"))
                })?,
            };
            out.insert(key, value);
        }
        Ok(out)
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
            // Lower case, as dask reads them; `_` stays `_` below the verbatim settings.
            let verbatim = rest
                .split("__")
                .take(VERBATIM.len())
                .map(canonical)
                .eq(VERBATIM);
            let path: Vec<String> = rest
                .split("__")
                .enumerate()
                .map(|(i, part)| {
                    if verbatim && i >= VERBATIM.len() {
                        part.to_ascii_lowercase()
                    } else {
                        canonical(part)
                    }
                })
                .collect();
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
        match self.value(path)? {
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

/// Where the values are the user's own: the option values of new clusters, whose names and
/// contents (an environment mapping, say) are kept as written.
const VERBATIM: [&str; 3] = ["gateway", "cluster", "options"];

/// Settings keys in their canonical spelling ([`canonical`]), except below [`VERBATIM`].
fn normalize(v: Value) -> Value {
    normalize_below(v, &mut Vec::new())
}

fn normalize_below(v: Value, path: &mut Vec<String>) -> Value {
    if path.iter().map(String::as_str).eq(VERBATIM) {
        return v;
    }
    match v {
        Value::Mapping(m) => Value::Mapping(
            m.into_iter()
                .map(|(k, v)| match k {
                    Value::String(s) => {
                        let key = canonical(&s);
                        path.push(key.clone());
                        let v = normalize_below(v, path);
                        path.pop();
                        (Value::String(key), v)
                    }
                    other => (other, v),
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
        let c = ClientConfig::resolve(&cfg, &Overrides::default()).unwrap();
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
        let c = ClientConfig::resolve(&cfg, &Overrides::default()).unwrap();
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
        assert!(ClientConfig::resolve(&DaskConfig::default(), &Overrides::default()).is_err());
    }

    fn config(yaml: &str) -> DaskConfig {
        let mut cfg = DaskConfig::default();
        merge(
            &mut cfg.root,
            normalize(serde_yaml::from_str(yaml).unwrap()),
        );
        cfg
    }

    #[test]
    fn templates_are_filled_from_the_environment() {
        let env = |n: &str| (n == "GWHOST").then(|| "gw.example".to_string());
        assert_eq!(
            format_with("http://{GWHOST}:8000", &env).unwrap(),
            "http://gw.example:8000"
        );
        assert_eq!(format_with("{{literal}}", &env).unwrap(), "{literal}");
        for bad in ["{MISSING}", "{", "a}b", "{GWHOST!r}", "{0:>4}"] {
            assert!(
                matches!(format_with(bad, &env), Err(ClientError::Config(_))),
                "{bad}"
            );
        }
        // A variable every environment of these tests has.
        let path = std::env::var("PATH").unwrap();
        let cfg = config(
            "gateway:\n  address: 'http://gw:8000/{PATH}'\n  cluster:\n    options:\n      worker_cores: 2\n      image: 'img:{PATH}'\n      env: {A: '1'}\n",
        );
        let c = ClientConfig::resolve(&cfg, &Overrides::default()).unwrap();
        assert_eq!(c.address, format!("http://gw:8000/{path}"));
        let mut cfg = cfg;
        cfg.merge_env([(
            "DASK_GATEWAY__CLUSTER__OPTIONS__WORKER_MEMORY".into(),
            "4".into(),
        )]);
        let options = cfg.cluster_options().unwrap();
        assert_eq!(options["worker_cores"], serde_json::json!(2));
        assert_eq!(options["worker_memory"], serde_json::json!(4));
        assert_eq!(options["image"], serde_json::json!(format!("img:{path}")));
        assert_eq!(options["env"], serde_json::json!({"A": "1"}));
    }

    #[test]
    fn flags_win_and_the_http_proxy_setting_is_read() {
        let cfg = config(
            "gateway:\n  address: http://file:8000\n  http-client: {proxy: false}\n  auth: {type: jupyterhub, kwargs: {api_token: fromfile}}\n",
        );
        let c = ClientConfig::resolve(&cfg, &Overrides::default()).unwrap();
        assert_eq!(c.http_proxy, HttpProxy::Off);
        assert_eq!(c.auth, Auth::JupyterHub("fromfile".into()));
        let flags = Overrides {
            address: Some("http://flag:1".into()),
            token: Some("fromflag".into()),
            ..Default::default()
        };
        let c = ClientConfig::resolve(&cfg, &flags).unwrap();
        assert_eq!(c.address, "http://flag:1");
        assert_eq!(c.auth, Auth::JupyterHub("fromflag".into()));
        let proxied = config(
            "gateway:\n  address: http://a:1\n  http-client:\n    proxy: http://proxy:3128\n",
        );
        let c = ClientConfig::resolve(&proxied, &Overrides::default()).unwrap();
        assert_eq!(c.http_proxy, HttpProxy::Url("http://proxy:3128".into()));
        let c = ClientConfig::resolve(
            &config("gateway: {address: 'http://a:1'}"),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.http_proxy, HttpProxy::FromEnvironment);
        let odd = config("gateway:\n  address: http://a:1\n  http-client: {proxy: 3}\n");
        assert!(ClientConfig::resolve(&odd, &Overrides::default()).is_err());
    }

    #[test]
    fn this_process_has_a_login_name() {
        // The account of this uid, whatever the environment says (the tests run as a user
        // with an account).
        assert!(account_name().is_some_and(|n| !n.is_empty()));
        assert!(login_name().is_some());
    }
}
