//! JupyterHub authentication (wire-protocol 3.4): the stock client's
//! `Authorization: jupyterhub <token>` is checked against the hub's `GET /user` (the hub answers
//! with the token owner's name, groups, admin flag and the token's scopes), and browsers reach
//! dashboards through the hub's OAuth2 authorization-code flow, with the gateway registered as a
//! hub service (its API token is the OAuth client secret).
//!
//! The browser login's OAuth lives here as plain functions: where a login starts and its state
//! cookie ([`Authenticator::hub_login_start`]), and checking that cookie and exchanging the
//! code when the hub sends the browser back ([`Authenticator::hub_login_finish`]). The HTTP
//! handlers that call them are in `api/login.rs`.

use super::{AuthError, Authenticated, Authenticator, Method};
use crate::config::HubConfig;
use http::HeaderMap;
use reqwest::StatusCode;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one call to the hub may take.
pub const HUB_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a token's owner is remembered without asking the hub again.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(60);

/// Why the JupyterHub authenticator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HubSetupError {
    /// No hub API URL.
    #[error("auth.jupyterhub needs api_url (or the JUPYTERHUB_API_URL environment variable)")]
    ApiUrl,
    /// The URL is not http(s).
    #[error("auth.jupyterhub.{0} must be an http(s) URL, got {1:?}")]
    BadUrl(&'static str, String),
    /// No service token.
    #[error("auth.jupyterhub: the gateway's hub API token is missing: {0}")]
    Token(String),
}

/// Why the hub did not vouch for a token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    /// The hub refused the token, or it lacks access to the gateway service.
    #[error("{0}")]
    Refused(String),
    /// The hub could not be asked (down, slow, or answering 5xx).
    #[error("{0}")]
    Unavailable(String),
}

/// Who a hub token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubUser {
    /// The gateway user name: the hub name for users, `<kind>:<name>` for services.
    pub name: String,
    /// The user's hub groups.
    pub groups: Vec<String>,
    /// Whether the hub says the user is an admin.
    pub admin: bool,
}

#[derive(Deserialize)]
struct HubModel {
    name: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
}

/// Checks hub tokens (with a short cache) and runs the OAuth exchange.
pub struct HubAuthenticator {
    api_url: String,
    public_url: String,
    service_token: String,
    service_name: String,
    client_id: String,
    redirect_uri: Option<String>,
    hub_admins: bool,
    http: reqwest::Client,
    cache: Mutex<HashMap<String, (HubUser, Instant)>>,
}

fn check_url(what: &'static str, url: &str) -> Result<String, HubSetupError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(url.trim_end_matches('/').to_string())
    } else {
        Err(HubSetupError::BadUrl(what, url.into()))
    }
}

/// `application/x-www-form-urlencoded` value encoding.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl HubAuthenticator {
    /// Reads the configuration (and the environment for what it leaves out).
    pub fn new(config: &HubConfig) -> Result<Self, HubSetupError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let api_url = config
            .api_url
            .clone()
            .or_else(|| env("JUPYTERHUB_API_URL"))
            .ok_or(HubSetupError::ApiUrl)?;
        let api_url = check_url("api_url", &api_url)?;
        let public_url = match &config.public_url {
            Some(u) => check_url("public_url", u)?,
            None => api_url.strip_suffix("/api").unwrap_or(&api_url).to_string(),
        };
        let service_token = match &config.api_token_file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| HubSetupError::Token(format!("reading {}: {e}", path.display())))?
                .trim()
                .to_string(),
            None => env(&config.api_token_env).ok_or_else(|| {
                HubSetupError::Token(format!(
                    "set api_token_file, or the {} environment variable",
                    config.api_token_env
                ))
            })?,
        };
        if service_token.is_empty() {
            return Err(HubSetupError::Token("the token is empty".into()));
        }
        let service_name = config
            .service_name
            .clone()
            .or_else(|| env("JUPYTERHUB_SERVICE_NAME"))
            .unwrap_or_else(|| "dask-gateway".into());
        let client_id = config
            .oauth_client_id
            .clone()
            .unwrap_or_else(|| format!("service-{service_name}"));
        let redirect_uri = match &config.oauth_redirect_uri {
            Some(u) => Some(check_url("oauth_redirect_uri", u)?),
            None => None,
        };
        let http = reqwest::Client::builder()
            .timeout(HUB_TIMEOUT)
            .build()
            .map_err(|e| HubSetupError::Token(e.to_string()))?;
        Ok(HubAuthenticator {
            api_url,
            public_url,
            service_token,
            service_name,
            client_id,
            redirect_uri,
            hub_admins: config.hub_admins_are_admins,
            http,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The owner of a user's hub token (cached for [`TOKEN_CACHE_TTL`]).
    pub async fn user_for_token(&self, token: &str) -> Result<HubUser, HubError> {
        if token.is_empty() || token.chars().any(|c| c.is_control() || c == ' ') {
            return Err(HubError::Refused("Invalid JupyterHub token".into()));
        }
        if let Some((user, at)) = self.cache_lock().get(token) {
            if at.elapsed() < TOKEN_CACHE_TTL {
                return Ok(user.clone());
            }
        }
        let user = self.ask_hub(token).await?;
        let mut cache = self.cache_lock();
        if cache.len() > 4096 {
            cache.retain(|_, (_, at)| at.elapsed() < TOKEN_CACHE_TTL);
        }
        cache.insert(token.to_string(), (user.clone(), Instant::now()));
        Ok(user)
    }

    fn cache_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (HubUser, Instant)>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `GET <api>/user` with the token; checks the token may use the gateway service.
    async fn ask_hub(&self, token: &str) -> Result<HubUser, HubError> {
        let resp = self
            .http
            .get(format!("{}/user", self.api_url))
            .header("Authorization", format!("token {token}"))
            .send()
            .await
            .map_err(|e| HubError::Unavailable(format!("JupyterHub did not answer: {e}")))?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => {
                return Err(HubError::Refused(
                    "JupyterHub does not accept this token".into(),
                ))
            }
            s => {
                return Err(HubError::Unavailable(format!(
                    "JupyterHub answered {s} when checking a token"
                )))
            }
        }
        let model: HubModel = resp
            .json()
            .await
            .map_err(|e| HubError::Unavailable(format!("unreadable JupyterHub answer: {e}")))?;
        let scopes = model.scopes.unwrap_or_default();
        let wanted = format!("access:services!service={}", self.service_name);
        if !scopes
            .iter()
            .any(|s| s == "access:services" || *s == wanted)
        {
            return Err(HubError::Refused(format!(
                "this JupyterHub token has no access to the {} service (scope {wanted})",
                self.service_name
            )));
        }
        let kind = model.kind.unwrap_or_else(|| "user".into());
        let name = if kind == "user" && !model.name.contains(':') {
            model.name
        } else {
            format!("{kind}:{}", model.name)
        };
        if !super::is_usable_user_name(&name) {
            return Err(HubError::Refused(format!(
                "JupyterHub's name for this token ({} bytes) cannot be a gateway user's",
                name.len()
            )));
        }
        Ok(HubUser {
            name,
            groups: model.groups,
            admin: self.hub_admins && model.admin,
        })
    }

    /// Whether browsers can log in through the hub (an OAuth redirect URI is configured).
    pub fn oauth_enabled(&self) -> bool {
        self.redirect_uri.is_some()
    }

    /// The hub URL that starts a browser login, returning to the callback with `state`.
    pub fn authorize_url(&self, state: &str) -> Option<String> {
        let redirect = self.redirect_uri.as_deref()?;
        Some(format!(
            "{}/api/oauth2/authorize?client_id={}&redirect_uri={}&response_type=code&state={}",
            self.public_url,
            form_encode(&self.client_id),
            form_encode(redirect),
            form_encode(state)
        ))
    }

    /// Exchanges an authorization code for an access token, and returns its owner.
    pub async fn complete_login(&self, code: &str) -> Result<HubUser, HubError> {
        let redirect = self
            .redirect_uri
            .as_deref()
            .ok_or_else(|| HubError::Refused("JupyterHub login is not configured".into()))?;
        let body = [
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.service_token.as_str()),
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
        let resp = self
            .http
            .post(format!("{}/oauth2/token", self.api_url))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| HubError::Unavailable(format!("JupyterHub did not answer: {e}")))?;
        if resp.status().is_server_error() {
            return Err(HubError::Unavailable(format!(
                "JupyterHub answered {} to the code exchange",
                resp.status()
            )));
        }
        if !resp.status().is_success() {
            return Err(HubError::Refused(
                "JupyterHub refused the login code".into(),
            ));
        }
        let token: TokenResponse = resp
            .json()
            .await
            .map_err(|e| HubError::Unavailable(format!("unreadable JupyterHub answer: {e}")))?;
        self.ask_hub(&token.access_token).await
    }
}

/// A hub that did not vouch for a token or a login, as an [`AuthError`]: refused, or unavailable
/// (a 502).
pub(super) fn hub_error(e: HubError) -> AuthError {
    match e {
        HubError::Refused(m) => AuthError::Rejected(m),
        HubError::Unavailable(m) => AuthError::Unavailable(m),
    }
}

impl Authenticator {
    /// The hub, when browsers log in through its OAuth flow.
    fn hub_login(&self) -> Option<&HubAuthenticator> {
        match &self.method {
            Method::Hub(hub) if hub.oauth_enabled() => Some(hub),
            _ => None,
        }
    }

    /// Completes a hub OAuth login: the user behind `code`, logged in with a new session.
    async fn hub_callback(&self, code: &str) -> Result<Authenticated, AuthError> {
        let Method::Hub(hub) = &self.method else {
            return Err(AuthError::Rejected(
                "JupyterHub login is not configured".into(),
            ));
        };
        let u = hub.complete_login(code).await.map_err(hub_error)?;
        Ok(self.logged_in(self.user(u.name, u.groups, u.admin)))
    }

    /// The name of the short-lived cookie holding an OAuth login's state.
    pub fn oauth_state_cookie_name(&self) -> String {
        format!("{}-oauth-state", self.cookie_name)
    }

    /// Starts a hub login for a browser that has no session, to come back to `return_to` (a
    /// path on this gateway) through `/api/oauth_callback`; none when browsers do not log in
    /// through the hub.
    pub fn hub_login_start(&self, return_to: &str, https: bool) -> Option<HubLoginStart> {
        let hub = self.hub_login()?;
        let nonce = super::secret::random_hex();
        let location = hub.authorize_url(&nonce)?;
        use base64::Engine;
        let back = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(return_to);
        let state_cookie = format!(
            "{}={nonce}.{back}; Max-Age=600; Path={}; HttpOnly; SameSite=Lax{}",
            self.oauth_state_cookie_name(),
            self.cookie_path(),
            if https { "; Secure" } else { "" }
        );
        Some(HubLoginStart {
            location,
            state_cookie,
        })
    }

    /// Finishes a hub login: the `state` the hub sent back must match the state cookie in
    /// `headers` (set when the login began); the `code` is exchanged for the user's identity
    /// and a session starts. Says where the browser goes back to.
    pub async fn hub_login_finish(
        &self,
        headers: &HeaderMap,
        code: Option<String>,
        state: Option<String>,
    ) -> Result<HubLogin, LoginError> {
        let bad = LoginError::BadRequest;
        let cookie_name = self.oauth_state_cookie_name();
        let (nonce, back) = Authenticator::cookie(headers, &cookie_name)
            .and_then(|v| v.split_once('.'))
            .ok_or_else(|| bad("No login in progress (the login cookie is missing or expired)"))?;
        let (Some(code), Some(given)) = (code, state) else {
            return Err(bad("The login callback needs code and state"));
        };
        if !super::token_matches(&given, nonce) {
            return Err(bad("The login state does not match; start again"));
        }
        use base64::Engine;
        let return_to = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(back)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|p| {
                p.starts_with('/') && !p.starts_with("//") && !p.contains(['\\', '\r', '\n'])
            })
            .unwrap_or_else(|| self.cookie_path().to_string());
        let auth = self.hub_callback(&code).await.map_err(LoginError::Auth)?;
        Ok(HubLogin {
            auth,
            return_to,
            clear_state_cookie: format!(
                "{cookie_name}=; Max-Age=0; Path={}; HttpOnly; SameSite=Lax",
                self.cookie_path()
            ),
        })
    }
}

/// A hub login that has begun: send the browser to `location` with `state_cookie` set.
#[derive(Clone, Debug)]
pub struct HubLoginStart {
    /// The hub's authorize URL.
    pub location: String,
    /// The `Set-Cookie` value holding the login's state and where to return.
    pub state_cookie: String,
}

/// A hub login that has completed.
#[derive(Debug)]
pub struct HubLogin {
    /// The user, with the new session.
    pub auth: Authenticated,
    /// The path on this gateway the login began from.
    pub return_to: String,
    /// The `Set-Cookie` value that removes the state cookie.
    pub clear_state_cookie: String,
}

/// Why a hub login could not complete.
#[derive(Debug)]
pub enum LoginError {
    /// The callback itself is wrong: no login in progress, parameters missing, state mismatch.
    BadRequest(&'static str),
    /// The hub did not vouch for the code.
    Auth(AuthError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_form_values() {
        assert_eq!(form_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(
            form_encode("service-dask_gateway.1~"),
            "service-dask_gateway.1~"
        );
    }

    #[test]
    fn configuration_and_urls() {
        let config = HubConfig {
            api_url: Some("http://hub:8081/hub/api/".into()),
            api_token_env: "DGRS_TEST_HUB_TOKEN_UNSET".into(),
            ..Default::default()
        };
        assert!(matches!(
            HubAuthenticator::new(&config),
            Err(HubSetupError::Token(_))
        ));
        let dir = std::env::temp_dir().join(format!("hubcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let config = HubConfig {
            api_token_file: Some(file),
            oauth_redirect_uri: Some("https://gw.example/api/oauth_callback".into()),
            service_name: Some("dask-gateway".into()),
            ..config
        };
        let hub = HubAuthenticator::new(&config).unwrap();
        assert_eq!(hub.api_url, "http://hub:8081/hub/api");
        assert_eq!(hub.public_url, "http://hub:8081/hub");
        assert_eq!(hub.service_token, "s3cret");
        assert_eq!(
            hub.authorize_url("x y").unwrap(),
            "http://hub:8081/hub/api/oauth2/authorize?client_id=service-dask-gateway&redirect_uri=https%3A%2F%2Fgw.example%2Fapi%2Foauth_callback&response_type=code&state=x%20y"
        );
        let bad = HubConfig {
            api_url: Some("hub:8081".into()),
            ..config
        };
        assert!(matches!(
            HubAuthenticator::new(&bad),
            Err(HubSetupError::BadUrl("api_url", _))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
