//! User authentication: the 401 challenge, HTTP Basic with an optional shared password,
//! and session cookies (wire-protocol section 3).

pub mod hub;
pub mod jwt;
pub mod kerberos;

use crate::config::AuthConfig;
use base64::Engine;
use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderValue};
use hub::{HubAuthenticator, HubError};
use jwt::JwtVerifier;
use kerberos::KerberosAuthenticator;
use rand::RngCore;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

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

/// What a session value says (short keys: it travels in every request's cookie).
#[derive(serde::Serialize, serde::Deserialize)]
struct SessionClaims {
    /// User name.
    n: String,
    /// Admin.
    a: bool,
    /// Groups.
    g: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    e: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The simple authenticator plus the session cache.
pub struct Authenticator {
    password: Option<String>,
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
    jwt: Option<JwtVerifier>,
    hub: Option<HubAuthenticator>,
    kerberos: Option<KerberosAuthenticator>,
}

/// The challenge scheme sent in `WWW-Authenticate`.
pub const CHALLENGE: &str = "Basic";

fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    k
}

fn random_hex() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Compares secrets without an early exit on the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= (*x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

impl Authenticator {
    /// An authenticator for `config`; its session cookie is scoped to `prefix` (the gateway's
    /// URL prefix, empty for none).
    pub fn new(config: &AuthConfig, prefix: &str) -> Self {
        Authenticator {
            password: config.password.clone(),
            admins: config.admin_users.clone(),
            admin_groups: config.admin_groups.clone(),
            static_groups: config.members(),
            relevant_groups: None,
            cookie_name: config
                .cookie_name
                .clone()
                .unwrap_or_else(|| format!("dask-gateway-{}", random_hex())),
            cookie_path: format!("{prefix}/"),
            max_age: Duration::from_secs(config.cookie_max_age.max(1)),
            session_key: ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                config
                    .cookie_secret
                    .as_deref()
                    .map(str::as_bytes)
                    .unwrap_or(&random_key()),
            ),
            issued: Mutex::new(HashMap::new()),
            jwt: None,
            hub: None,
            kerberos: None,
        }
    }

    /// Keeps only these groups on users (admin status is decided before, from all of them).
    pub fn with_relevant_groups(mut self, groups: impl IntoIterator<Item = String>) -> Self {
        self.relevant_groups = Some(groups.into_iter().collect());
        self
    }

    /// Authenticates Kerberos `Negotiate` tokens instead of Basic credentials.
    pub fn with_kerberos(mut self, kerberos: KerberosAuthenticator) -> Self {
        self.kerberos = Some(kerberos);
        self
    }

    /// Authenticates JupyterHub tokens with `hub` instead of Basic credentials.
    pub fn with_hub(mut self, hub: HubAuthenticator) -> Self {
        self.hub = Some(hub);
        self
    }

    /// The hub, when browsers log in through its OAuth flow.
    pub fn hub_login(&self) -> Option<&HubAuthenticator> {
        self.hub.as_ref().filter(|h| h.oauth_enabled())
    }

    /// Completes a hub OAuth login: the user behind `code`, logged in with a new session.
    pub async fn hub_callback(&self, code: &str) -> Result<Authenticated, AuthError> {
        let hub = self
            .hub
            .as_ref()
            .ok_or_else(|| AuthError::Rejected("JupyterHub login is not configured".into()))?;
        let u = hub.complete_login(code).await.map_err(hub_error)?;
        Ok(self.logged_in(self.user(u.name, u.groups, u.admin)))
    }

    /// The name of the short-lived cookie holding an OAuth login's state.
    pub fn oauth_state_cookie_name(&self) -> String {
        format!("{}-oauth-state", self.cookie_name)
    }

    /// The value of cookie `name` in `headers`, if present.
    pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim())
    }

    /// The path the session cookie is scoped to (the gateway's prefix plus `/`).
    pub fn cookie_path(&self) -> &str {
        &self.cookie_path
    }

    /// A fresh random value (OAuth states).
    pub fn random_state() -> String {
        random_hex()
    }

    /// Authenticates bearer tokens with `verifier` instead of Basic credentials.
    pub fn with_jwt(mut self, verifier: JwtVerifier) -> Self {
        self.jwt = Some(verifier);
        self
    }

    /// The `WWW-Authenticate` scheme of a 401.
    pub fn challenge(&self) -> &'static str {
        if self.jwt.is_some() {
            "Bearer"
        } else if self.hub.is_some() {
            "jupyterhub"
        } else if self.kerberos.is_some() {
            "Negotiate"
        } else {
            CHALLENGE
        }
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
        let token = self.session_for(&user);
        Authenticated {
            user,
            new_session: Some(token),
            negotiate_reply: None,
        }
    }

    /// Authenticates a request: a valid session cookie wins; otherwise `Authorization: Basic`
    /// (or `Bearer` with JWT).
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Authenticated, AuthError> {
        if let Some(user) = self.session_user(headers) {
            return Ok(Authenticated {
                user,
                new_session: None,
                negotiate_reply: None,
            });
        }
        let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return Err(AuthError::Required);
        };
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if let Some(krb) = &self.kerberos {
            if !scheme.eq_ignore_ascii_case("negotiate") {
                return Err(AuthError::Required);
            }
            let n = krb.accept(rest).await.map_err(AuthError::Rejected)?;
            let mut done = self.logged_in(self.user(n.name, Vec::new(), false));
            done.negotiate_reply = n
                .reply
                .and_then(|r| HeaderValue::from_str(&format!("Negotiate {r}")).ok());
            return Ok(done);
        }
        if let Some(hub) = &self.hub {
            // The stock client's scheme is `jupyterhub`; hub-style `token` and `Bearer` too.
            if !["jupyterhub", "token", "bearer"]
                .iter()
                .any(|s| scheme.eq_ignore_ascii_case(s))
            {
                return Err(AuthError::Required);
            }
            let u = hub.user_for_token(rest.trim()).await.map_err(hub_error)?;
            return Ok(self.logged_in(self.user(u.name, u.groups, u.admin)));
        }
        if let Some(jwt) = &self.jwt {
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(AuthError::Required);
            }
            let claims = jwt.verify(rest.trim()).await.map_err(AuthError::Rejected)?;
            let admin = jwt.is_admin_group(&claims.groups);
            return Ok(self.logged_in(self.user(claims.name, claims.groups, admin)));
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(AuthError::Required);
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .map_err(|_| AuthError::Invalid)?;
        let text = decode_credentials(decoded);
        let (name, password) = text.split_once(':').unwrap_or((&text, ""));
        if let Some(expected) = &self.password {
            if !constant_time_eq(password.as_bytes(), expected.as_bytes()) {
                return Err(AuthError::Invalid);
            }
        }
        // User names become process environment (USER) and log fields: refuse control characters.
        if name.is_empty() || name.chars().any(char::is_control) {
            return Err(AuthError::Invalid);
        }
        Ok(self.logged_in(self.user(name.to_string(), Vec::new(), false)))
    }

    /// The `Set-Cookie` value for a session: scoped to the gateway's path, `HttpOnly` (page
    /// scripts never see it), `SameSite=Lax` (not sent on cross-site subrequests or POSTs, nor
    /// from sandboxed dashboard pages) and `Secure` when the request came over HTTPS.
    pub fn session_cookie(&self, token: &str, secure: bool) -> Option<HeaderValue> {
        let cookie = format!(
            "{}={}; Max-Age={}; Path={}; HttpOnly; SameSite=Lax{}",
            self.cookie_name,
            token,
            self.max_age.as_secs() * 2,
            self.cookie_path,
            if secure { "; Secure" } else { "" }
        );
        HeaderValue::from_str(&cookie).ok()
    }

    /// Removes the gateway's session cookie from `headers` (other cookies stay), so requests
    /// passed on to user-controlled servers (dashboards) never carry it.
    pub fn strip_session_cookie(&self, headers: &mut HeaderMap) {
        let kept: Vec<String> = headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .map(str::trim)
            .filter(|pair| {
                let name = pair.split_once('=').map_or(*pair, |(k, _)| k);
                !pair.is_empty() && name.trim() != self.cookie_name
            })
            .map(String::from)
            .collect();
        headers.remove(COOKIE);
        if !kept.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
                headers.insert(COOKIE, v);
            }
        }
    }

    /// Whether a `Set-Cookie` value (from a dashboard's response) would set or clear one of
    /// the gateway's own cookies (the session, or a login's OAuth state): such headers are
    /// dropped (no session fixation, no planted login state).
    pub fn is_session_set_cookie(&self, value: &HeaderValue) -> bool {
        let text = String::from_utf8_lossy(value.as_bytes());
        let name = text.split(';').next().unwrap_or("");
        let name = name.split_once('=').map_or(name, |(k, _)| k).trim();
        name == self.cookie_name || name == self.oauth_state_cookie_name()
    }

    fn session_user(&self, headers: &HeaderMap) -> Option<User> {
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|h| h.to_str().ok())
            .flat_map(|text| text.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(k, _)| *k == self.cookie_name)
            .find_map(|(_, v)| self.verify_session(v.trim()))
    }

    /// The user a session value stands for, if its signature is ours and it has not expired.
    fn verify_session(&self, value: &str) -> Option<User> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let (body, mac) = value.rsplit_once('.')?;
        let mac = B64.decode(mac).ok()?;
        ring::hmac::verify(&self.session_key, body.as_bytes(), &mac).ok()?;
        let claims: SessionClaims = serde_json::from_slice(&B64.decode(body).ok()?).ok()?;
        (claims.e > unix_now()).then_some(User {
            name: claims.n,
            admin: claims.a,
            groups: claims.g,
        })
    }

    /// A session value for `user`: who they are and until when, signed with the session key
    /// (so every replica sharing the key, and this one after a restart, accepts it). The value
    /// last handed to the same user is reused while it has most of its life left.
    fn session_for(&self, user: &User) -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let now = unix_now();
        let max_age = self.max_age.as_secs();
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((token, for_user, exp)) = issued.get(&user.name) {
            if for_user == user && *exp > now + max_age / 2 {
                return token.clone();
            }
        }
        if issued.len() > 4096 {
            issued.retain(|_, (_, _, exp)| *exp > now);
        }
        let claims = SessionClaims {
            n: user.name.clone(),
            a: user.admin,
            g: user.groups.clone(),
            e: now + max_age,
        };
        let body = B64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let mac = ring::hmac::sign(&self.session_key, body.as_bytes());
        let token = format!("{body}.{}", B64.encode(mac.as_ref()));
        issued.insert(user.name.clone(), (token.clone(), user.clone(), claims.e));
        token
    }
}

fn hub_error(e: HubError) -> AuthError {
    match e {
        HubError::Refused(m) => AuthError::Rejected(m),
        HubError::Unavailable(m) => AuthError::Unavailable(m),
    }
}

/// Basic credentials as text: UTF-8 when they are valid UTF-8 (browsers and most clients),
/// otherwise Latin-1 (the stock Python client's `BasicAuth` encodes Latin-1, where every byte
/// is the code point of the same value).
fn decode_credentials(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| e.into_bytes().iter().map(|&b| b as char).collect())
}

/// Extracts the token of `Authorization: token <t>`.
pub fn cluster_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("token").then(|| token.trim())
}

/// Whether `given` equals the cluster's `expected` token (constant time).
pub fn token_matches(given: &str, expected: &str) -> bool {
    !expected.is_empty() && constant_time_eq(given.as_bytes(), expected.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `authenticate`, run to completion (Basic and cookies never wait on anything).
    trait AuthNow {
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

    fn basic(user: &str, pw: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
        h.insert(AUTHORIZATION, format!("Basic {v}").parse().unwrap());
        h
    }

    fn auth(password: Option<&str>) -> Authenticator {
        Authenticator::new(
            &AuthConfig {
                password: password.map(Into::into),
                admin_users: vec!["root".into()],
                ..Default::default()
            },
            "",
        )
    }

    fn basic_bytes(raw: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(raw);
        h.insert(AUTHORIZATION, format!("Basic {v}").parse().unwrap());
        h
    }

    #[test]
    fn names_in_utf8_and_latin1() {
        let a = auth(None);
        // UTF-8 (browsers, curl, most clients).
        let name = a.auth_now(&basic("zoë-日本", "")).unwrap().user.name;
        assert_eq!(name, "zoë-日本");
        // Latin-1 (the stock Python client's BasicAuth): 0xEB is ë.
        let name = a.auth_now(&basic_bytes(b"zo\xeb:")).unwrap().user.name;
        assert_eq!(name, "zoë");
        // Control characters stay refused in either encoding.
        for raw in [&b"a\x1bb:"[..], "a\u{85}b:".as_bytes(), b"a\x7fb:"] {
            assert_eq!(
                a.auth_now(&basic_bytes(raw)).unwrap_err(),
                AuthError::Invalid
            );
        }
    }

    #[test]
    fn session_cookie_attributes_and_stripping() {
        let a = Authenticator::new(
            &AuthConfig {
                cookie_name: Some("gw".into()),
                ..Default::default()
            },
            "/prefix",
        );
        let plain = a.session_cookie("t0k", false).unwrap();
        assert_eq!(
            plain,
            "gw=t0k; Max-Age=600; Path=/prefix/; HttpOnly; SameSite=Lax"
        );
        let secure = a.session_cookie("t0k", true).unwrap();
        assert!(secure.to_str().unwrap().ends_with("; Secure"));

        let mut h = HeaderMap::new();
        h.append(COOKIE, "a=1; gw=secret; b=2".parse().unwrap());
        h.append(COOKIE, "gw=other".parse().unwrap());
        a.strip_session_cookie(&mut h);
        assert_eq!(h.get_all(COOKIE).iter().count(), 1);
        assert_eq!(h[COOKIE], "a=1; b=2");
        let mut only = HeaderMap::new();
        only.insert(COOKIE, "gw=secret".parse().unwrap());
        a.strip_session_cookie(&mut only);
        assert!(only.get(COOKIE).is_none());

        assert!(a.is_session_set_cookie(&"gw=x; Path=/".parse().unwrap()));
        assert!(a.is_session_set_cookie(&" gw =; Max-Age=0".parse().unwrap()));
        assert!(a.is_session_set_cookie(&"gw-oauth-state=n.b".parse().unwrap()));
        assert!(!a.is_session_set_cookie(&"x-gw=1".parse().unwrap()));
        assert!(!a.is_session_set_cookie(&"gwx=1".parse().unwrap()));
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
    fn basic_with_shared_password() {
        let a = auth(Some("pw"));
        assert_eq!(
            a.auth_now(&basic("alice@x y", "pw")).unwrap().user.name,
            "alice@x y"
        );
        assert_eq!(
            a.auth_now(&basic("alice", "nope")).unwrap_err(),
            AuthError::Invalid
        );
        assert_eq!(
            a.auth_now(&basic("alice", "")).unwrap_err(),
            AuthError::Invalid
        );
        assert!(auth(None).auth_now(&basic("bob", "anything")).is_ok());
        assert!(a.auth_now(&basic("root", "pw")).unwrap().user.admin);
        assert_eq!(
            a.auth_now(&basic("a\u{0}b", "pw")).unwrap_err(),
            AuthError::Invalid
        );
        assert_eq!(
            a.auth_now(&basic("a\nb", "pw")).unwrap_err(),
            AuthError::Invalid
        );
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

    fn cookie_header(a: &Authenticator, token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            format!("{}={token}", a.cookie_name).parse().unwrap(),
        );
        h
    }

    #[test]
    fn signed_sessions_span_replicas_and_refuse_tampering() {
        let config = AuthConfig {
            cookie_name: Some("gw".into()),
            cookie_secret: Some("k".repeat(32)),
            admin_users: vec!["root".into()],
            ..Default::default()
        };
        let one = Authenticator::new(&config, "");
        let two = Authenticator::new(&config, "");
        let token = one
            .auth_now(&basic("root", ""))
            .unwrap()
            .new_session
            .unwrap();
        // Another replica (or this one restarted) with the same key accepts it.
        let user = two.auth_now(&cookie_header(&two, &token)).unwrap().user;
        assert_eq!((user.name.as_str(), user.admin), ("root", true));
        // Another key does not.
        let other = Authenticator::new(
            &AuthConfig {
                cookie_secret: Some("x".repeat(32)),
                ..config.clone()
            },
            "",
        );
        assert_eq!(
            other.auth_now(&cookie_header(&other, &token)).unwrap_err(),
            AuthError::Required
        );
        // A body changed to claim someone else (or admin) fails the signature.
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let (_, mac) = token.rsplit_once('.').unwrap();
        let forged = B64.encode(br#"{"n":"mallory","a":true,"g":[],"e":99999999999}"#);
        for bad in [
            format!("{forged}.{mac}"),
            "garbage".into(),
            format!("{token}x"),
        ] {
            assert_eq!(
                two.auth_now(&cookie_header(&two, &bad)).unwrap_err(),
                AuthError::Required,
                "{bad}"
            );
        }
        // An expired one is ignored.
        let body = B64.encode(br#"{"n":"root","a":true,"g":[],"e":1}"#);
        let mac = ring::hmac::sign(&two.session_key, body.as_bytes());
        let expired = format!("{body}.{}", B64.encode(mac.as_ref()));
        assert!(two.verify_session(&expired).is_none());
    }

    #[test]
    fn cookie_replay_and_reuse() {
        let a = auth(None);
        let first = a.auth_now(&basic("alice", "")).unwrap();
        let cookie = a
            .session_cookie(&first.new_session.unwrap(), false)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(cookie.contains("Max-Age=600; Path=/;"));
        let pair = cookie.split(';').next().unwrap().to_string();
        let mut h = HeaderMap::new();
        h.insert(COOKIE, format!("other=1; {pair}").parse().unwrap());
        let again = a.auth_now(&h).unwrap();
        assert_eq!(again.user.name, "alice");
        assert!(again.new_session.is_none());
        // The same session value is reused while valid.
        let second = a
            .auth_now(&basic("alice", ""))
            .unwrap()
            .new_session
            .unwrap();
        assert!(cookie.contains(&second));
        let mut bad = HeaderMap::new();
        bad.insert(
            COOKIE,
            format!("{}=deadbeef", a.cookie_name).parse().unwrap(),
        );
        assert_eq!(a.auth_now(&bad).unwrap_err(), AuthError::Required);
    }

    #[test]
    fn tokens() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "token abc".parse().unwrap());
        assert_eq!(cluster_token(&h), Some("abc"));
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("", ""));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
