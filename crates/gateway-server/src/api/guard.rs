//! The layers in front of the API handlers: authentication of the user routes, the guard
//! against cross-site writes (origin check, JSON-only POSTs), the bound on each request's time,
//! and the request counter.

use super::{ApiError, AppState};
use crate::http_shared::{is_https, refused, set_negotiate_reply, set_session_cookie};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use gateway_proxy::ConnMeta;

/// Middleware for user routes: authenticates, stores the [`User`](crate::auth::User) as an
/// extension and sets the session cookie on successful responses.
pub(super) async fn require_user(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let auth = match state.auth.authenticate(req.headers()).await {
        Ok(a) => a,
        Err(e) => {
            let resp = refused(&state.auth, e).into_response();
            drain_body(req).await;
            return resp;
        }
    };
    let https = is_https(req.headers(), req.extensions().get::<ConnMeta>());
    req.extensions_mut().insert(auth.user);
    let mut resp = next.run(req).await;
    set_session_cookie(&state, &mut resp, auth.new_session, https);
    set_negotiate_reply(&mut resp, auth.negotiate_reply);
    resp
}

/// The most of a refused request's body read before answering: axum's default body limit,
/// what an accepted request may send.
const DRAIN_LIMIT: usize = 2 * 1024 * 1024;

/// How long a refused request's body is waited for.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and discards what is left of a refused request's body (bounded in size and time).
/// Answering before reading it would close the connection under a client still sending, which
/// then fails to write instead of reading the answer: the stock client sends its first request
/// without credentials and only answers the 401's challenge, so a create with large options
/// failed with a broken pipe.
async fn drain_body(req: Request) {
    let body = axum::body::to_bytes(req.into_body(), DRAIN_LIMIT);
    let _ = tokio::time::timeout(DRAIN_WAIT, body).await;
}

/// The host (and port) a browser addressed: `Host`, or the URI authority on HTTP/2.
pub(super) fn request_host(req: &Request) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

/// `host[:port]` without the scheme's default port, lowercased, for comparing origins.
fn normalize_authority(authority: &str, scheme: &str) -> String {
    let a = authority.trim().to_ascii_lowercase();
    let default = if scheme == "https" { ":443" } else { ":80" };
    a.strip_suffix(default).map(str::to_string).unwrap_or(a)
}

/// Whether an `Origin` header names this gateway (as the browser addressed it directly, or
/// through a proxy that reports `X-Forwarded-Host`). `null` (sandboxed pages, such as the
/// dashboards) never does.
fn origin_is_ours(origin: &HeaderValue, req: &Request) -> bool {
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let scheme = scheme.to_ascii_lowercase();
    let theirs = normalize_authority(authority, &scheme);
    let forwarded = req
        .headers()
        .get("x-forwarded-host")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::to_string);
    request_host(req)
        .into_iter()
        .chain(forwarded)
        .any(|ours| normalize_authority(&ours, &scheme) == theirs)
}

/// Whether the body is declared as JSON (`application/json`, parameters allowed).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// Guards state-changing API requests against cross-site use of a browser's credentials:
/// a request from another origin (`Origin` present and not ours) gets 403, and a POST whose
/// body is not declared as JSON gets 415 — browsers send `text/plain` and form bodies
/// cross-site without asking, but never `application/json`.
pub(super) async fn guard_writes(req: Request, next: Next) -> Response {
    let method = req.method();
    if method == http::Method::GET || method == http::Method::HEAD {
        return next.run(req).await;
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        if !origin_is_ours(origin, &req) {
            drain_body(req).await;
            return ApiError::new(StatusCode::FORBIDDEN, "Cross-origin request refused")
                .into_response();
        }
    }
    if method == http::Method::POST && !is_json(req.headers()) {
        drain_body(req).await;
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "The request body must be JSON, sent with Content-Type: application/json",
        )
        .into_response();
    }
    next.run(req).await
}

/// Counts API requests (the page's request rate).
pub(super) async fn count_request(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    state
        .api_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    next.run(req).await
}

/// Bounds every API request (a client trickling its body cannot hold a task forever).
pub(super) async fn bounded(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(state.request_timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(StatusCode::REQUEST_TIMEOUT, "Request timed out").into_response(),
    }
}
