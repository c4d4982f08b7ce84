//! The `auth` section: which authentication method the gateway uses and the settings of each
//! (simple, JWT, JupyterHub, Kerberos), plus reading the session-signing secret. Plain data:
//! the methods themselves live in `crate::auth`, which builds them from these types.

use super::ConfigError;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

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
    pub jwt: Option<JwtConfig>,
    /// Settings of the `jupyterhub` authenticator (defaults from the hub's environment
    /// variables when the section is left out).
    pub jupyterhub: Option<HubConfig>,
    /// Settings of the `kerberos` authenticator (defaults when left out).
    pub kerberos: Option<KerberosConfig>,
}

impl AuthConfig {
    /// Checks that the method and the sections given go together.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if (self.kind == AuthKind::Jwt) != self.jwt.is_some() {
            return bad("auth.type jwt and an auth.jwt section go together");
        }
        if self.kind != AuthKind::Jupyterhub && self.jupyterhub.is_some() {
            return bad("an auth.jupyterhub section needs auth.type jupyterhub");
        }
        if self.kind != AuthKind::Kerberos && self.kerberos.is_some() {
            return bad("an auth.kerberos section needs auth.type kerberos");
        }
        Ok(())
    }

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

/// `auth.jwt` in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// A file holding the HS256 shared secret.
    pub secret_file: Option<PathBuf>,
    /// An environment variable holding the HS256 shared secret.
    pub secret_env: Option<String>,
    /// A JWKS file (RS256 / ES256 public keys).
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (fetched at startup and on unknown key ids).
    pub jwks_url: Option<String>,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's audiences).
    pub audience: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway: u64,
    /// The claim holding the user name.
    pub username_claim: String,
    /// The claim holding the user's groups (a list of strings).
    pub groups_claim: String,
    /// Members of these groups are admins.
    pub admin_groups: Vec<String>,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            secret_file: None,
            secret_env: None,
            jwks_file: None,
            jwks_url: None,
            issuer: None,
            audience: None,
            leeway: 30,
            username_claim: "sub".into(),
            groups_claim: "groups".into(),
            admin_groups: Vec::new(),
        }
    }
}

/// `auth.jupyterhub` in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// The hub's API URL as the gateway reaches it, e.g. `http://hub:8081/hub/api` (default:
    /// the `JUPYTERHUB_API_URL` environment variable).
    pub api_url: Option<String>,
    /// The hub's URL as browsers reach it, for the OAuth redirect (e.g.
    /// `https://hub.example.org/hub`; default: `api_url` without its `/api`).
    pub public_url: Option<String>,
    /// A file with the gateway's own hub API token (its service token, the OAuth client
    /// secret). Default: the `JUPYTERHUB_API_TOKEN` environment variable.
    pub api_token_file: Option<PathBuf>,
    /// The environment variable with that token when no file is given.
    pub api_token_env: String,
    /// The gateway's service name on the hub. Tokens must carry `access:services` or
    /// `access:services!service=<name>`. Default: `JUPYTERHUB_SERVICE_NAME`, else `dask-gateway`.
    pub service_name: Option<String>,
    /// OAuth client id (default `service-<service_name>`, the hub's default for services).
    pub oauth_client_id: Option<String>,
    /// Where the hub sends browsers back: `<the gateway's public URL>/api/oauth_callback`.
    /// Without it, dashboards cannot log in through the hub (API use is unaffected).
    pub oauth_redirect_uri: Option<String>,
    /// Hub admins are gateway admins too.
    pub hub_admins_are_admins: bool,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            api_url: None,
            public_url: None,
            api_token_file: None,
            api_token_env: "JUPYTERHUB_API_TOKEN".into(),
            service_name: None,
            oauth_client_id: None,
            oauth_redirect_uri: None,
            hub_admins_are_admins: false,
        }
    }
}

/// `auth.kerberos` in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KerberosConfig {
    /// The keytab with the service's keys (default: `KRB5_KTNAME`, else the system keytab).
    pub keytab: Option<PathBuf>,
    /// The acceptor's service name: `HTTP` accepts any `HTTP/<host>` key in the keytab;
    /// `HTTP@host` only that host's.
    pub service_name: String,
    /// Keep the realm in user names (`alice@EXAMPLE.ORG` rather than `alice`). Needed when
    /// several realms are trusted and the same short name could mean different people.
    pub keep_realm: bool,
}

impl Default for KerberosConfig {
    fn default() -> Self {
        KerberosConfig {
            keytab: None,
            service_name: "HTTP".into(),
            keep_realm: false,
        }
    }
}
