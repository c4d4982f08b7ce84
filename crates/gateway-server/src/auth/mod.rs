//! User authentication: the 401 challenge, the one configured method (HTTP Basic with an
//! optional shared password, JWT, JupyterHub, Kerberos) and session cookies (wire-protocol
//! section 3).
//!
//! The method is picked once, from `auth.type`, when the [`Authenticator`] is built; each has
//! its own file. Sessions are in `session.rs`, secret comparison and cluster tokens in
//! `secret.rs`.

mod basic;
pub mod hub;
pub mod jwt;
pub mod kerberos;
mod secret;
mod session;

pub use basic::Basic;
pub use secret::{cluster_token, token_matches};

use crate::config::{AuthConfig, AuthKind};
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use hub::{HubAuthenticator, HubSetupError};
use jwt::{JwtSetupError, JwtVerifier};
use kerberos::{KerberosAuthenticator, KerberosSetupError};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// The longest user name any method accepts, in bytes (names go into session cookies, process
/// environments, listings and labels).
pub const MAX_USER_NAME: usize = 256;

/// Whether `name` can be a user's: not empty, at most [`MAX_USER_NAME`] bytes, no control
/// characters (names become process environment and log fields), no white space at either end
/// (`"admin "` would read as `admin` in every listing), and no invisible formatting characters
/// (`"admin\u{200b}"` would read as `admin` too, and a right-to-left override turns a name
/// around on screen).
pub(crate) fn is_usable_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_USER_NAME
        && !name
            .chars()
            .any(|c| c.is_control() || gateway_model::text::is_invisible_format(c))
        && name.trim() == name
}

/// An authenticated user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// The name that owns clusters.
    pub name: String,
    /// Admins see and act on every cluster.
    pub admin: bool,
    /// Groups from the authenticator (JWT claim, JupyterHub groups) plus the configured
    /// `auth.groups` memberships; they pick the user's group policy.
    pub groups: Vec<String>,
}

impl User {
    /// A user without groups (tests and tools).
    pub fn named(name: impl Into<String>, admin: bool) -> Self {
        User {
            name: name.into(),
            admin,
            groups: Vec::new(),
        }
    }

    /// Whether this user may see and act on a cluster owned by `owner`.
    pub fn may_access(&self, owner: &str) -> bool {
        self.admin || self.name == owner
    }
}

/// Why a request was not authenticated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No usable credentials: answer 401 with the challenge so the client retries.
    #[error("Authentication required")]
    Required,
    /// Credentials were given but are wrong.
    #[error("Invalid credentials")]
    Invalid,
    /// A bearer token was refused; the reason names the check that failed (never the token).
    #[error("Invalid token: {0}")]
    Rejected(String),
    /// The identity provider that must vouch for the credentials cannot be asked (502).
    #[error("{0}")]
    Unavailable(String),
}

/// Why the configured method cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The JWT authenticator cannot start.
    #[error(transparent)]
    Jwt(#[from] JwtSetupError),
    /// The JupyterHub authenticator cannot start.
    #[error(transparent)]
    Hub(#[from] HubSetupError),
    /// The Kerberos authenticator cannot start.
    #[error(transparent)]
    Kerberos(#[from] KerberosSetupError),
}

/// Successful authentication, and the session to hand out when it came from credentials.
#[derive(Clone, Debug)]
pub struct Authenticated {
    /// The user.
    pub user: User,
    /// The session token to set as a cookie ([`Authenticator::session_cookie`]) on success.
    pub new_session: Option<String>,
    /// Kerberos' mutual-authentication reply, sent back as `WWW-Authenticate` (the stock
    /// client refuses a response without it).
    pub negotiate_reply: Option<HeaderValue>,
}

/// How credentials are checked when a request has no valid session: one method per gateway.
pub enum Method {
    /// `Authorization: Basic` (`auth.type: simple`).
    Basic(Basic),
    /// `Authorization: Bearer <JWT>` (`auth.type: jwt`).
    Jwt(JwtVerifier),
    /// JupyterHub tokens, and browser logins through the hub (`auth.type: jupyterhub`).
    Hub(HubAuthenticator),
    /// Kerberos `Negotiate` tokens (`auth.type: kerberos`).
    Kerberos(KerberosAuthenticator),
}

impl Method {
    /// The method `config.kind` names, set up from its section (defaults when left out).
    pub async fn from_config(config: &AuthConfig) -> Result<Self, SetupError> {
        Ok(match config.kind {
            AuthKind::Simple => Method::Basic(Basic::new(config.password.clone())),
            AuthKind::Jwt => {
                let jwt = config.jwt.clone().unwrap_or_default();
                Method::Jwt(JwtVerifier::new(jwt).await?)
            }
            AuthKind::Jupyterhub => {
                let hub = config.jupyterhub.clone().unwrap_or_default();
                Method::Hub(HubAuthenticator::new(&hub)?)
            }
            AuthKind::Kerberos => {
                let krb = config.kerberos.clone().unwrap_or_default();
                Method::Kerberos(KerberosAuthenticator::new(&krb)?)
            }
        })
    }

    /// The `WWW-Authenticate` scheme of a 401.
    fn challenge(&self) -> &'static str {
        match self {
            Method::Basic(_) => CHALLENGE,
            Method::Jwt(_) => "Bearer",
            Method::Hub(_) => "jupyterhub",
            Method::Kerberos(_) => "Negotiate",
        }
    }

    /// The `Authorization` schemes the method reads (any case).
    fn schemes(&self) -> &'static [&'static str] {
        match self {
            Method::Basic(_) => &["basic"],
            Method::Jwt(_) => &["bearer"],
            // The stock client's scheme is `jupyterhub`; hub-style `token` and `Bearer` too.
            Method::Hub(_) => &["jupyterhub", "token", "bearer"],
            Method::Kerberos(_) => &["negotiate"],
        }
    }
}

/// The configured method plus the session cache.
pub struct Authenticator {
    method: Method,
    admins: Vec<String>,
    admin_groups: Vec<String>,
    /// Configured memberships: user name → groups.
    static_groups: HashMap<String, Vec<String>>,
    /// The groups anything is configured for (group policies); a user keeps only these, so
    /// a session cookie stays small however many groups an identity provider reports.
    relevant_groups: Option<std::collections::HashSet<String>>,
    cookie_name: String,
    cookie_path: String,
    max_age: Duration,
    /// Signs session values (`auth.cookie_secret_file` / `GATEWAY_COOKIE_SECRET`, else random
    /// per process).
    session_key: ring::hmac::Key,
    /// The session value last issued per user (reused while fresh).
    issued: Mutex<HashMap<String, (String, User, u64)>>,
}

/// The challenge scheme sent in `WWW-Authenticate`.
pub const CHALLENGE: &str = "Basic";

impl Authenticator {
    /// An authenticator with HTTP Basic (the `simple` method, whatever `config.kind` says; see
    /// [`Authenticator::from_config`]); its session cookie is scoped to `prefix` (the gateway's
    /// URL prefix, empty for none).
    pub fn new(config: &AuthConfig, prefix: &str) -> Self {
        let method = Method::Basic(Basic::new(config.password.clone()));
        Authenticator::with_method(config, prefix, method)
    }

    /// The authenticator `config` asks for: the method `auth.type` names, set up once here.
    pub async fn from_config(config: &AuthConfig, prefix: &str) -> Result<Self, SetupError> {
        let method = Method::from_config(config).await?;
        Ok(Authenticator::with_method(config, prefix, method))
    }

    fn with_method(config: &AuthConfig, prefix: &str, method: Method) -> Self {
        let vouching = session::who_vouches(config, &method);
        Authenticator {
            method,
            admins: config.admin_users.clone(),
            admin_groups: config.admin_groups.clone(),
            static_groups: config.members(),
            relevant_groups: None,
            cookie_name: config
                .cookie_name
                .clone()
                .unwrap_or_else(|| format!("dask-gateway-{}", secret::random_hex())),
            cookie_path: format!("{prefix}/"),
            max_age: Duration::from_secs(config.cookie_max_age.max(1)),
            session_key: session::session_key(
                config
                    .cookie_secret
                    .as_deref()
                    .map(str::as_bytes)
                    .unwrap_or(&session::random_key()),
                &vouching,
            ),
            issued: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps only these groups on users (admin status is decided before, from all of them).
    pub fn with_relevant_groups(mut self, groups: impl IntoIterator<Item = String>) -> Self {
        self.relevant_groups = Some(groups.into_iter().collect());
        self
    }

    /// The `WWW-Authenticate` scheme of a 401.
    pub fn challenge(&self) -> &'static str {
        self.method.challenge()
    }

    /// The user `name` with the groups its authenticator vouched for, plus the configured
    /// memberships; admin by name, by group, or because the authenticator says so.
    fn user(&self, name: String, mut groups: Vec<String>, admin_by_method: bool) -> User {
        if let Some(extra) = self.static_groups.get(&name) {
            groups.extend(extra.iter().cloned());
        }
        groups.sort();
        groups.dedup();
        let admin = admin_by_method
            || self.admins.contains(&name)
            || groups.iter().any(|g| self.admin_groups.contains(g));
        if let Some(relevant) = &self.relevant_groups {
            groups.retain(|g| relevant.contains(g));
        }
        User {
            name,
            admin,
            groups,
        }
    }

    /// A successful login: the user and a session for its cookie.
    fn logged_in(&self, user: User) -> Authenticated {
        self.logged_in_until(user, None)
    }

    /// A successful login whose credentials expire at `until` (seconds since the Unix epoch):
    /// its session ends then too, if sooner than the usual session age.
    fn logged_in_until(&self, user: User, until: Option<u64>) -> Authenticated {
        let token = self.session_for(&user, until);
        Authenticated {
            user,
            new_session: Some(token),
            negotiate_reply: None,
        }
    }

    /// Authenticates a request. Credentials in the `Authorization` header, in the configured
    /// method's scheme (`Basic`, `Bearer` with JWT, ...), decide: they are verified, and a
    /// session cookie beside them counts for nothing (a fresher token with fewer rights, or
    /// another user's, is not overruled by an older session). Without such a header, a valid
    /// session cookie stands in for the credentials it was made from.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Authenticated, AuthError> {
        let session = self.session_user(headers);
        let credentials = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(|value| value.split_once(' ').unwrap_or((value, "")))
            .filter(|(scheme, _)| {
                self.method
                    .schemes()
                    .iter()
                    .any(|s| scheme.eq_ignore_ascii_case(s))
            });
        let Some((_, rest)) = credentials else {
            return match session {
                Some(user) => Ok(Authenticated {
                    user,
                    new_session: None,
                    negotiate_reply: None,
                }),
                None => Err(AuthError::Required),
            };
        };
        let mut done = self.verify_credentials(rest).await?;
        if session.as_ref() == Some(&done.user) {
            // The session already says exactly this: no new cookie on every request.
            done.new_session = None;
        }
        Ok(done)
    }

    /// Verifies `rest`, the credentials after the scheme of an `Authorization` header.
    async fn verify_credentials(&self, rest: &str) -> Result<Authenticated, AuthError> {
        match &self.method {
            Method::Basic(basic) => {
                let name = basic.user_name(rest)?;
                Ok(self.logged_in(self.user(name, Vec::new(), false)))
            }
            Method::Jwt(jwt) => {
                let claims = jwt.verify(rest.trim()).await.map_err(AuthError::Rejected)?;
                let admin = jwt.is_admin_group(&claims.groups);
                let until = claims.expires;
                Ok(self.logged_in_until(self.user(claims.name, claims.groups, admin), until))
            }
            Method::Hub(hub) => {
                let u = hub
                    .user_for_token(rest.trim())
                    .await
                    .map_err(hub::hub_error)?;
                Ok(self.logged_in(self.user(u.name, u.groups, u.admin)))
            }
            Method::Kerberos(krb) => {
                let n = krb.accept(rest).await.map_err(AuthError::Rejected)?;
                let mut done = self.logged_in(self.user(n.name, Vec::new(), false));
                done.negotiate_reply = n
                    .reply
                    .and_then(|r| HeaderValue::from_str(&format!("Negotiate {r}")).ok());
                Ok(done)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use http::header::COOKIE;

    /// `authenticate`, run to completion (Basic and cookies never wait on anything).
    pub(super) trait AuthNow {
        fn auth_now(&self, headers: &HeaderMap) -> Result<Authenticated, AuthError>;
    }

    impl AuthNow for Authenticator {
        fn auth_now(&self, headers: &HeaderMap) -> Result<Authenticated, AuthError> {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(self.authenticate(headers))
        }
    }

    pub(super) fn basic(user: &str, pw: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
        h.insert(AUTHORIZATION, format!("Basic {v}").parse().unwrap());
        h
    }

    pub(super) fn auth(password: Option<&str>) -> Authenticator {
        Authenticator::new(
            &AuthConfig {
                password: password.map(Into::into),
                admin_users: vec!["root".into()],
                ..Default::default()
            },
            "",
        )
    }

    #[test]
    fn no_credentials_means_challenge() {
        assert_eq!(
            auth(None).auth_now(&HeaderMap::new()).unwrap_err(),
            AuthError::Required
        );
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "Bearer x".parse().unwrap());
        assert_eq!(auth(None).auth_now(&h).unwrap_err(), AuthError::Required);
    }

    #[test]
    fn configured_groups_and_admin_groups() {
        let mut config = AuthConfig {
            admin_groups: vec!["ops".into()],
            ..Default::default()
        };
        config
            .groups
            .insert("team-a".into(), vec!["alice".into(), "bob".into()]);
        config.groups.insert("ops".into(), vec!["olga".into()]);
        let a = Authenticator::new(&config, "");
        let alice = a.auth_now(&basic("alice", "")).unwrap();
        assert_eq!(alice.user.groups, vec!["team-a".to_string()]);
        assert!(!alice.user.admin);
        let olga = a.auth_now(&basic("olga", "")).unwrap();
        assert!(olga.user.admin);
        // Only groups something is configured for stay with the user (admin was decided first).
        let filtered = Authenticator::new(&config, "").with_relevant_groups(["team-a".to_string()]);
        let olga = filtered.auth_now(&basic("olga", "")).unwrap().user;
        assert!(olga.admin && olga.groups.is_empty());
        assert_eq!(
            filtered.auth_now(&basic("bob", "")).unwrap().user.groups,
            ["team-a"]
        );
        assert!(filtered
            .auth_now(&basic("zed", ""))
            .unwrap()
            .user
            .groups
            .is_empty());
        // The session remembers the groups.
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            format!("{}={}", a.cookie_name, alice.new_session.unwrap())
                .parse()
                .unwrap(),
        );
        assert_eq!(
            a.auth_now(&h).unwrap().user.groups,
            vec!["team-a".to_string()]
        );
    }
}
