//! What the HTTP handlers share: the state they run with, the API's error answer, and the
//! pieces of signing a browser in (challenges, session cookies) that the API routes, the
//! dashboards and the web page all use.

use crate::auth::{AuthError, Authenticator};
use crate::clusters::{ClusterError, ClusterService};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gateway_proxy::{ConnMeta, HttpForwarder};
use serde_json::json;
use std::sync::Arc;

/// What a handler answers: its value, or an [`ApiError`].
pub type ApiResult<T> = Result<T, ApiError>;

/// Shared state of all handlers: a handle on [`AppStateFields`] that clones with one reference
/// count, since every request clones it several times (each middleware layer and each `State`
/// extractor). Fields read through it as if it were the struct.
#[derive(Clone)]
pub struct AppState(Arc<AppStateFields>);

impl AppState {
    /// The state handlers run with.
    pub fn new(fields: AppStateFields) -> Self {
        AppState(Arc::new(fields))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppStateFields;

    fn deref(&self) -> &AppStateFields {
        &self.0
    }
}

/// What the handlers share (see [`AppState`]).
pub struct AppStateFields {
    /// The cluster rules over the backend.
    pub clusters: Arc<ClusterService>,
    /// User authentication.
    pub auth: Arc<Authenticator>,
    /// Dashboard reverse proxy.
    pub forwarder: HttpForwarder,
    /// Require owner credentials for dashboards.
    pub dashboard_auth: bool,
    /// `Content-Security-Policy` added to every dashboard response (empty: none).
    pub dashboard_csp: Option<HeaderValue>,
    /// Bearer token `/metrics` requires (none: open).
    pub metrics_token: Option<String>,
    /// What `/metrics` encodes: the registry every part of the gateway registered in.
    pub metrics: Arc<crate::metrics::GatewayMetrics>,
    /// Upper bound on one API request, reading its body included.
    pub request_timeout: std::time::Duration,
    /// Open `?follow` event streams per user (each reads the backend once a second).
    pub event_followers: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    /// API requests served since the gateway started (the page's request rate).
    pub api_requests: Arc<std::sync::atomic::AtomicU64>,
    /// When the gateway started.
    pub started: std::time::Instant,
    /// Which `Host` names requests may carry.
    pub hosts: HostRule,
}

/// Which `Host` names the gateway answers. A web page can point its own name at a gateway on a
/// private or loopback address (DNS rebinding) and then reach it from a visitor's browser as
/// "its own origin"; a gateway that answers only the names it is known by is safe from that.
///
/// Addresses (`127.0.0.1:8000`, `[::1]`) are always answered: a page cannot rebind one. Names
/// listed in `names` or `also` are answered (`*.example.org` matches any name below it).
/// Without `names`, a gateway that listens on loopback only answers `localhost` and nothing
/// else by name, and one that listens on other addresses answers every name.
#[derive(Clone, Debug, Default)]
pub struct HostRule {
    /// The names answered, as configured (lower case, no port); none: see above.
    pub names: Vec<String>,
    /// Names answered in any case (the API URL's host, which the schedulers use).
    pub also: Vec<String>,
    /// Whether the gateway listens on a loopback address only.
    pub loopback_only: bool,
}

impl HostRule {
    /// Whether a request addressed to `host` (a `Host` value: a name or address, with or
    /// without a port) is answered.
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim();
        let name = match host.strip_prefix('[') {
            // [v6]:port
            Some(rest) => rest.split(']').next().unwrap_or(rest),
            None => host.rsplit_once(':').map_or(host, |(n, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    n
                } else {
                    host
                }
            }),
        };
        if name.parse::<std::net::IpAddr>().is_ok() {
            return true;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let listed = self
            .names
            .iter()
            .chain(&self.also)
            .any(|n| match n.strip_prefix("*.") {
                Some(parent) => {
                    name.len() > parent.len() + 1
                        && name.ends_with(parent)
                        && name.as_bytes()[name.len() - parent.len() - 1] == b'.'
                }
                None => *n == name,
            });
        if listed {
            return true;
        }
        if self.loopback_only {
            name == "localhost" || name.ends_with(".localhost")
        } else {
            self.names.is_empty()
        }
    }
}

impl AppStateFields {
    /// The state for `clusters` and `auth` with every other setting at its default: open
    /// dashboards and `/metrics`, no dashboard CSP, `/metrics` with the families of `clusters`
    /// (no per-user usage labels, no in-process controller), 30 s per request. The server sets
    /// the rest from its configuration.
    pub fn new(clusters: Arc<ClusterService>, auth: Arc<Authenticator>) -> Self {
        let metrics = crate::metrics::GatewayMetrics::new(&clusters, Arc::default(), false);
        AppStateFields {
            clusters,
            auth,
            forwarder: HttpForwarder::new(),
            dashboard_auth: false,
            dashboard_csp: None,
            metrics_token: None,
            metrics: Arc::new(metrics),
            request_timeout: std::time::Duration::from_secs(30),
            event_followers: Arc::default(),
            api_requests: Arc::default(),
            started: std::time::Instant::now(),
            hosts: HostRule::default(),
        }
    }
}

/// An error answered as `{"error": "..."}` with a JSON content type.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    challenge: Option<&'static str>,
}

impl ApiError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            challenge: None,
        }
    }

    /// A 401 with `message` and the `WWW-Authenticate` challenge `scheme`.
    pub fn unauthorized(message: &str, scheme: &'static str) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            challenge: Some(scheme),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(json!({ "error": self.message }))).into_response();
        if let Some(scheme) = self.challenge {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(scheme));
        }
        resp
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        let status = match &e {
            ClusterError::NotFound(_) => StatusCode::NOT_FOUND,
            ClusterError::Forbidden { .. } | ClusterError::ForbiddenUsage { .. } => {
                StatusCode::FORBIDDEN
            }
            ClusterError::Invalid(_) | ClusterError::QuotaExceeded(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ClusterError::NotRunning(_) | ClusterError::Conflict(_) => StatusCode::CONFLICT,
            ClusterError::BadToken => return ApiError::unauthorized("Unauthorized", "token"),
            ClusterError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ClusterError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// A 401 with the authenticator's challenge (`Basic`, `Bearer` for JWT, `jupyterhub`), or a
/// 502 when the identity provider could not be asked.
pub fn refused(auth: &Authenticator, e: AuthError) -> ApiError {
    match e {
        AuthError::Unavailable(m) => ApiError::new(StatusCode::BAD_GATEWAY, m),
        e => ApiError::unauthorized(&e.to_string(), auth.challenge()),
    }
}

/// Whether the client reached us over HTTPS: TLS on our port, or `X-Forwarded-Proto: https`
/// from a proxy in front (which only ever makes the session cookie `Secure`).
pub fn is_https(req_headers: &HeaderMap, meta: Option<&ConnMeta>) -> bool {
    meta.is_some_and(|m| m.tls)
        || req_headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// Adds Kerberos' mutual-authentication reply to the response of a request it authenticated.
pub fn set_negotiate_reply(resp: &mut Response, reply: Option<HeaderValue>) {
    if let Some(v) = reply {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
}

/// Adds the session cookie for a fresh login to a successful response.
pub fn set_session_cookie(
    state: &AppState,
    resp: &mut Response,
    session: Option<String>,
    https: bool,
) {
    if let Some(token) = session {
        if resp.status().as_u16() < 400 {
            if let Some(cookie) = state.auth.session_cookie(&token, https) {
                resp.headers_mut().append(header::SET_COOKIE, cookie);
            }
        }
    }
}

#[cfg(test)]
mod host_tests {
    use super::HostRule;

    #[test]
    fn a_loopback_gateway_answers_addresses_and_localhost_only() {
        let rule = HostRule {
            names: vec![],
            also: vec!["gw.internal".into()],
            loopback_only: true,
        };
        for ok in [
            "127.0.0.1:8000",
            "127.0.0.1",
            "[::1]:8000",
            "localhost:8000",
            "LOCALHOST",
            "a.localhost",
            "10.1.2.3:80",
            "gw.internal:8000",
        ] {
            assert!(rule.allows(ok), "{ok}");
        }
        for bad in [
            "attacker.example:8000",
            "attacker.example",
            "localhost.attacker.example",
            "",
            "gw.example.org",
        ] {
            assert!(!rule.allows(bad), "{bad}");
        }
    }

    #[test]
    fn listed_names_and_their_subdomains_are_answered() {
        let rule = HostRule {
            names: vec!["gw.example.org".into(), "*.dask.example.org".into()],
            also: vec![],
            loopback_only: false,
        };
        for ok in [
            "gw.example.org",
            "GW.example.org.:443",
            "a.dask.example.org",
            "b.a.dask.example.org",
            "192.0.2.1",
        ] {
            assert!(rule.allows(ok), "{ok}");
        }
        for bad in [
            "dask.example.org",
            "evildask.example.org",
            "attacker.example",
            "localhost",
        ] {
            assert!(!rule.allows(bad), "{bad}");
        }
        // No list, not loopback: any name (the gateway cannot know its public names), also
        // when the API URL has a name of its own.
        assert!(HostRule::default().allows("anything.example"));
        let rule = HostRule {
            also: vec!["gw.svc".into()],
            ..HostRule::default()
        };
        assert!(rule.allows("anything.example"));
    }
}
