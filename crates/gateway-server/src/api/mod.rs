//! The REST API (wire-protocol sections 2–4) and the dashboard routes, as one axum Router.

use crate::auth::{cluster_token, AuthError, User};
use crate::clusters::{ClusterService, Requester};
use crate::http_shared::{is_https, refused, set_negotiate_reply, set_session_cookie};
pub use crate::http_shared::{ApiError, ApiResult, AppState, AppStateFields};
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router};
use gateway_model::{
    AdaptRequest, ClusterModel, ClusterStatus, CreateClusterRequest, CreateClusterResponse,
    Heartbeat, ScaleRequest,
};
use gateway_proxy::{ClusterRoute, ConnMeta};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::sync::Arc;

/// How long a user's DELETE waits for the cluster's processes to exit before answering.
const DELETE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Parses a JSON request body, which must be an object; anything else is a 422 with a clear
/// message (serde would also read a struct from an array, which no client sends).
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    let invalid = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    let value: Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("Invalid request body: {e}")))?;
    if !value.is_object() {
        return Err(invalid("The request body must be a JSON object".into()));
    }
    serde_json::from_value(value).map_err(|e| invalid(format!("Invalid request body: {e}")))
}

pub(crate) fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

/// `?wait` semantics: absent → false; empty → true; otherwise a non-zero integer.
fn wait_flag(query: Option<&str>) -> bool {
    match query_param(query, "wait") {
        None => false,
        Some("") => true,
        Some(v) => v.parse::<i64>().is_ok_and(|n| n != 0),
    }
}

/// `?follow`, `?follow=1` or `?follow=true`.
fn follow_flag(query: Option<&str>) -> bool {
    matches!(query_param(query, "follow"), Some("" | "1" | "true"))
}

pub(crate) fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex(bytes[i + 1])? * 16 + hex(bytes[i + 2])?))
            .flatten();
        match (decoded, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Middleware for user routes: authenticates, stores the [`User`] as an extension and sets the
/// session cookie on successful responses.
async fn require_user(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let auth = match state.auth.authenticate(req.headers()).await {
        Ok(a) => a,
        Err(e) => return refused(&state.auth, e).into_response(),
    };
    let https = is_https(req.headers(), req.extensions().get::<ConnMeta>());
    req.extensions_mut().insert(auth.user);
    let mut resp = next.run(req).await;
    set_session_cookie(&state, &mut resp, auth.new_session, https);
    set_negotiate_reply(&mut resp, auth.negotiate_reply);
    resp
}

/// The host (and port) a browser addressed: `Host`, or the URI authority on HTTP/2.
fn request_host(req: &Request) -> Option<String> {
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
async fn guard_writes(req: Request, next: Next) -> Response {
    let method = req.method();
    if method == http::Method::GET || method == http::Method::HEAD {
        return next.run(req).await;
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        if !origin_is_ours(origin, &req) {
            return ApiError::new(StatusCode::FORBIDDEN, "Cross-origin request refused")
                .into_response();
        }
    }
    if method == http::Method::POST && !is_json(req.headers()) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "The request body must be JSON, sent with Content-Type: application/json",
        )
        .into_response();
    }
    next.run(req).await
}

/// Counts API requests (the page's request rate).
async fn count_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    state
        .api_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    next.run(req).await
}

/// Bounds every API request (a client trickling its body cannot hold a task forever).
async fn bounded(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(state.request_timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(StatusCode::REQUEST_TIMEOUT, "Request timed out").into_response(),
    }
}

async fn health(State(state): State<AppState>) -> Response {
    if state.clusters.healthy().await {
        Json(json!({"status": "pass"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "fail"})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(expected) = &state.metrics_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        if !given.is_some_and(|g| crate::auth::token_matches(g, expected)) {
            return ApiError::unauthorized("Unauthorized", "Bearer").into_response();
        }
    }
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    let mut text = state.clusters.metrics_text()
        + &state
            .controller
            .as_ref()
            .map(crate::controller_metrics)
            .unwrap_or_default();
    let backend = state.clusters.backend();
    let usage = state
        .metrics_usage
        .get(|now| backend.usage(None, 0, now))
        .await;
    match usage {
        Ok(usage) => crate::usage::metrics_text(&usage, state.usage_metrics_by_user, &mut text),
        Err(e) => tracing::warn!("reading usage for /metrics: {e}"),
    }
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

/// `GET /api/v1/usage`: core- and memory-seconds per user, group or cluster within a window
/// (see [`crate::usage::UsageQuery`]); JSON, or CSV with `format=csv`.
async fn usage(
    State(state): State<AppState>,
    Extension(user): Extension<User>,
    req: Request,
) -> ApiResult<Response> {
    let pairs: Vec<(String, String)> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let query = crate::usage::UsageQuery::parse(&pairs, state.clusters.clock().now_ms())
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    let report = crate::usage::report(state.clusters.backend().as_ref(), &user, &query).await?;
    if query.csv {
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"dask-gateway-usage.csv\"",
                ),
            ],
            report.to_csv(),
        )
            .into_response());
    }
    Ok(Json(report).into_response())
}

/// `GET /api/openapi.json`: the REST API as OpenAPI 3.1 (see [`crate::openapi`]).
async fn openapi() -> Json<Value> {
    static DOCUMENT: std::sync::LazyLock<Value> =
        std::sync::LazyLock::new(crate::openapi::document);
    Json(DOCUMENT.clone())
}

async fn version() -> Json<Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

async fn options(
    State(state): State<AppState>,
    Extension(user): Extension<User>,
) -> Json<gateway_model::OptionsResponse> {
    Json(state.clusters.options_wire(&user))
}

async fn list_clusters(
    State(state): State<AppState>,
    Extension(user): Extension<User>,
    req: Request,
) -> ApiResult<Response> {
    let query = req.uri().query();
    let statuses = match query_param(query, "status") {
        None => None,
        Some(raw) => Some(
            ClusterStatus::parse_filter(&percent_decode(raw))
                .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?,
        ),
    };
    // `?details`: the gateway's own view (owner, group, reason); the stock client never asks.
    if query_param(query, "details").is_some() {
        let details: std::collections::BTreeMap<String, gateway_model::ClusterDetails> = state
            .clusters
            .list_details(&user, statuses.as_deref())
            .await?
            .into_iter()
            .map(|d| (d.name.clone(), d))
            .collect();
        return Ok(Json(details).into_response());
    }
    // An object keyed by name (the client iterates its values), serialised straight from the models.
    let models: std::collections::BTreeMap<String, ClusterModel> = state
        .clusters
        .list(&user, statuses.as_deref())
        .await?
        .into_iter()
        .map(|m| (m.name.clone(), m))
        .collect();
    Ok(Json(models).into_response())
}

async fn cluster_details(
    State(state): State<AppState>,
    Extension(user): Extension<User>,
    Path(name): Path<String>,
) -> ApiResult<Json<gateway_model::ClusterDetails>> {
    Ok(Json(state.clusters.details(&user, &name).await?))
}

/// `GET /api/v1/clusters/{name}/events`: the cluster's events as JSON, or with `?follow` as a
/// stream of server-sent events (`event: cluster-event`, one JSON event per `data:` line) that
/// starts with the history and ends once the cluster has finished and every event was sent.
async fn cluster_events(
    State(state): State<AppState>,
    Extension(user): Extension<User>,
    Path(name): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let events = state.clusters.events(&user, &name).await?;
    if !follow_flag(req.uri().query()) {
        return Ok(Json(gateway_model::ClusterEvents { events }).into_response());
    }
    let Some(slot) = FollowerSlot::take(&state.event_followers, &user.name) else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{MAX_FOLLOWERS_PER_USER} event streams are open for {}; close one first",
                user.name
            ),
        ));
    };
    let follow = EventFollower {
        _slot: slot,
        clusters: state.clusters.clone(),
        user,
        name,
        queue: events.into(),
        last: None,
        finished: false,
    };
    let stream = futures_util::stream::unfold(follow, |mut f| async move {
        let event = f.next().await?;
        let sse = axum::response::sse::Event::default()
            .event("cluster-event")
            .json_data(&event)
            .ok()?;
        Some((Ok::<_, std::convert::Infallible>(sse), f))
    });
    let mut response = axum::response::sse::Sse::new(stream)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response();
    // Proxies in front must pass events on as they come.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// How often a followed cluster's events are read again.
const EVENT_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// `?follow` streams one user may have open at once (each costs a backend read a second).
const MAX_FOLLOWERS_PER_USER: usize = 8;

/// One of a user's open `?follow` streams; given back when the stream ends or the client goes.
struct FollowerSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    user: String,
}

impl FollowerSlot {
    /// A slot for `user`, unless they have [`MAX_FOLLOWERS_PER_USER`] already.
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
        user: &str,
    ) -> Option<FollowerSlot> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(user.to_string()).or_default();
        if *n >= MAX_FOLLOWERS_PER_USER {
            return None;
        }
        *n += 1;
        Some(FollowerSlot {
            counts: counts.clone(),
            user: user.to_string(),
        })
    }
}

impl Drop for FollowerSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.user);
            }
        }
    }
}

/// The state of one `?follow` stream: events read but not yet sent, and the last one sent.
struct EventFollower {
    _slot: FollowerSlot,
    clusters: Arc<ClusterService>,
    user: User,
    name: String,
    queue: std::collections::VecDeque<gateway_model::ClusterEvent>,
    last: Option<gateway_model::ClusterEvent>,
    finished: bool,
}

impl EventFollower {
    /// The next event to send; `None` ends the stream (the cluster finished and everything was
    /// sent, or it is gone or no longer this user's to see).
    async fn next(&mut self) -> Option<gateway_model::ClusterEvent> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                self.last = Some(event.clone());
                return Some(event);
            }
            if self.finished {
                return None;
            }
            tokio::time::sleep(EVENT_POLL).await;
            // Whether it has finished is read before its events: events a backend writes
            // before a cluster's status turns final are then in this read.
            self.finished = self.clusters.has_finished(&self.name).await;
            let events = self.clusters.events(&self.user, &self.name).await.ok()?;
            self.queue.extend(events_after(events, self.last.as_ref()));
        }
    }
}

/// The events that came after `last` (all of them if `last` is not among them any more).
fn events_after(
    events: Vec<gateway_model::ClusterEvent>,
    last: Option<&gateway_model::ClusterEvent>,
) -> Vec<gateway_model::ClusterEvent> {
    let Some(last) = last else { return events };
    match events.iter().rposition(|e| e == last) {
        Some(i) => events[i + 1..].to_vec(),
        None => events.into_iter().filter(|e| e.time >= last.time).collect(),
    }
}

async fn create_cluster(
    State(state): State<AppState>,
    Extension(user): Extension<User>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: CreateClusterRequest = parse_body(&body)?;
    let name = state
        .clusters
        .create(&user, req.cluster_options.as_ref())
        .await?;
    Ok((StatusCode::CREATED, Json(CreateClusterResponse { name })).into_response())
}

async fn get_cluster(
    State(state): State<AppState>,
    Extension(user): Extension<User>,
    Path(name): Path<String>,
    req: Request,
) -> ApiResult<Response> {
    let wait = wait_flag(req.uri().query());
    Ok(Json(state.clusters.get(&user, &name, wait).await?).into_response())
}

async fn delete_cluster(
    State(state): State<AppState>,
    Path(name): Path<String>,
    meta: Option<Extension<ConnMeta>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if let Some(token) = cluster_token(&headers) {
        if state.clusters.token_is_valid(&name, token) {
            // The scheduler asks for its own shutdown (idle timeout): answer at once.
            state.clusters.stop(&name, Requester::Token(token)).await?;
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
    let auth = state
        .auth
        .authenticate(&headers)
        .await
        .map_err(|e| refused(&state.auth, e))?;
    let mut resp = match state
        .clusters
        .stop(&name, Requester::User(&auth.user))
        .await
    {
        Ok(()) => {
            state.clusters.wait_finished(&name, DELETE_WAIT).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    };
    let https = is_https(&headers, meta.as_ref().map(|m| &m.0));
    set_session_cookie(&state, &mut resp, auth.new_session, https);
    set_negotiate_reply(&mut resp, auth.negotiate_reply);
    Ok(resp)
}

async fn scale_cluster(
    State(state): State<AppState>,
    Extension(user): Extension<User>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: ScaleRequest = parse_body(&body)?;
    Ok(Json(state.clusters.scale(&user, &name, &req.count).await?).into_response())
}

async fn adapt_cluster(
    State(state): State<AppState>,
    Extension(user): Extension<User>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: AdaptRequest = parse_body(&body)?;
    Ok(Json(
        state
            .clusters
            .adapt(&user, &name, &req.minimum, &req.maximum, req.active)
            .await?,
    )
    .into_response())
}

async fn heartbeat(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let Some(token) = cluster_token(&headers) else {
        return Err(ApiError::unauthorized("Unauthorized", "token"));
    };
    if !state.clusters.token_is_valid(&name, token) {
        return Err(ApiError::unauthorized("Unauthorized", "token"));
    }
    let hb: Heartbeat = parse_body(&body)?;
    state.clusters.heartbeat(&name, token, &hb).await?;
    Ok(StatusCode::OK.into_response())
}

async fn dashboard_root(
    state: State<AppState>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    dashboard(state, name, String::new(), req).await
}

async fn dashboard_path(
    state: State<AppState>,
    Path((name, rest)): Path<(String, String)>,
    req: Request,
) -> Response {
    dashboard(state, name, rest, req).await
}

/// Proxies a dashboard request to the cluster's scheduler.
///
/// A dashboard is user-controlled content (anyone can add handlers to their own scheduler), so
/// it must never act with a visitor's gateway credentials: the request loses `Authorization`
/// and the session cookie, the response may not set the session cookie or clear site data, and
/// it carries the configured `Content-Security-Policy` (by default a sandbox: the page runs in
/// an opaque origin, so it can neither read the gateway's cookies nor read API responses, and
/// browsers send it no `SameSite` cookies).
async fn dashboard(
    State(state): State<AppState>,
    name: String,
    rest: String,
    mut req: Request,
) -> Response {
    let not_found = || (StatusCode::NOT_FOUND, "404: Not Found").into_response();
    let route = state
        .clusters
        .backend()
        .route(&name)
        .map(|a| ClusterRoute::new(a.scheduler, a.dashboard).dashboard);
    let Some(target) = route.flatten() else {
        return not_found();
    };
    if state.dashboard_auth {
        match state.auth.authenticate(req.headers()).await {
            Ok(a) if state.clusters.may_access(&a.user, &name) => {}
            Ok(_) => return not_found(),
            Err(AuthError::Required) if req.method() == http::Method::GET => {
                let https = is_https(req.headers(), req.extensions().get::<ConnMeta>());
                // The path as the browser sent it (a nested router strips the prefix).
                let here = req
                    .extensions()
                    .get::<axum::extract::OriginalUri>()
                    .map_or(req.uri(), |o| &o.0)
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string();
                if let Some(resp) = state.auth.hub_login_redirect(&here, https) {
                    return resp;
                }
                return refused(&state.auth, AuthError::Required).into_response();
            }
            Err(e) => return refused(&state.auth, e).into_response(),
        }
    }
    // Keep the raw (still percent-encoded) remainder of the path.
    let raw_path = req.uri().path();
    let marker = format!("/clusters/{name}");
    let remainder = raw_path
        .find(&marker)
        .map(|i| &raw_path[i + marker.len()..])
        .unwrap_or("");
    let remainder = if remainder.is_empty() && !rest.is_empty() {
        format!("/{rest}")
    } else {
        remainder.to_string()
    };
    let mut path = if remainder.is_empty() {
        "/".to_string()
    } else {
        remainder
    };
    if let Some(q) = req.uri().query() {
        path.push('?');
        path.push_str(q);
    }
    req.headers_mut().remove(header::AUTHORIZATION);
    state.auth.strip_session_cookie(req.headers_mut());
    let mut resp = state.forwarder.forward(req, &target, &path).await;
    let headers = resp.headers_mut();
    let set_cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    if set_cookies
        .iter()
        .any(|c| state.auth.is_session_set_cookie(c))
    {
        headers.remove(header::SET_COOKIE);
        for c in set_cookies {
            if !state.auth.is_session_set_cookie(&c) {
                headers.append(header::SET_COOKIE, c);
            }
        }
    }
    headers.remove("clear-site-data");
    if let Some(csp) = &state.dashboard_csp {
        headers.append(header::CONTENT_SECURITY_POLICY, csp.clone());
    }
    resp
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "404: Not Found").into_response()
}

/// `/metrics` alone (with `/api/health`), for a separate metrics listen address.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/health", get(health))
        .fallback(not_found)
        .with_state(state)
}

/// The complete HTTP application, mounted under `prefix` (empty or `/something`);
/// `with_metrics` serves `/metrics` on it too.
pub fn router(state: AppState, prefix: &str, with_metrics: bool) -> Router {
    let user_routes = Router::new()
        .route("/api/v1/options", get(options))
        .route("/api/v1/clusters/", get(list_clusters).post(create_cluster))
        .route("/api/v1/clusters", get(list_clusters).post(create_cluster))
        .route("/api/v1/clusters/{name}", get(get_cluster))
        .route("/api/v1/clusters/{name}/details", get(cluster_details))
        .route("/api/v1/clusters/{name}/events", get(cluster_events))
        .route("/api/v1/clusters/{name}/scale", post(scale_cluster))
        .route("/api/v1/clusters/{name}/adapt", post(adapt_cluster))
        .route("/api/v1/usage", get(usage))
        .route("/api/v1/me", get(crate::web::me))
        .route("/api/v1/overview", get(crate::web::overview))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_user));
    let mut api_routes = user_routes
        .route("/api/health", get(health))
        .route("/api/version", get(version))
        .route("/api/openapi.json", get(openapi))
        .route("/api/oauth_callback", get(crate::auth::hub::oauth_callback));
    if with_metrics {
        api_routes = api_routes.route("/metrics", get(metrics));
    }
    let api_routes = api_routes
        .route(
            "/api/v1/clusters/{name}",
            axum::routing::delete(delete_cluster),
        )
        .route("/api/v1/clusters/{name}/heartbeat", post(heartbeat))
        .route_layer(middleware::from_fn_with_state(state.clone(), bounded))
        .route_layer(middleware::from_fn(guard_writes))
        .route_layer(middleware::from_fn_with_state(state.clone(), count_request));
    // The web page (it signs the browser in itself) and its script and style.
    let api_routes = api_routes
        .route("/", get(crate::web::page))
        .route("/ui/{file}", get(crate::web::asset));
    // Dashboards stream (WebSockets, long polls): no request bound.
    let dashboard_routes = Router::new()
        .route("/clusters/{name}", any(dashboard_root))
        .route("/clusters/{name}/", any(dashboard_root))
        .route("/clusters/{name}/{*rest}", any(dashboard_path));
    let app = api_routes
        .merge(dashboard_routes)
        .fallback(not_found)
        .with_state(state.clone());
    if prefix.is_empty() {
        app
    } else {
        // A nested router serves `{prefix}` for its `/`; the page lives at `{prefix}/`.
        Router::new()
            .nest(prefix, app)
            .route(
                &format!("{prefix}/"),
                get(crate::web::page).with_state(state),
            )
            .fallback(not_found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_has_a_bounded_number_of_event_streams() {
        let counts = Arc::default();
        let slots: Vec<_> = (0..MAX_FOLLOWERS_PER_USER)
            .map(|_| FollowerSlot::take(&counts, "alice").unwrap())
            .collect();
        assert!(FollowerSlot::take(&counts, "alice").is_none());
        assert!(FollowerSlot::take(&counts, "bob").is_some(), "per user");
        drop(slots);
        assert!(FollowerSlot::take(&counts, "alice").is_some());
        assert!(
            counts.lock().unwrap().is_empty(),
            "closed streams leave nothing"
        );
    }

    #[test]
    fn a_follower_sends_what_came_after_the_last_event_it_sent() {
        use gateway_model::{ClusterEvent, EventType};
        let e = |t: i64, r: &str| ClusterEvent::new(t, EventType::Normal, r, "", "gateway");
        let all = vec![
            e(1, "Created"),
            e(2, "Running"),
            e(2, "ScaleRequested"),
            e(3, "Stopped"),
        ];
        assert_eq!(events_after(all.clone(), None), all);
        assert_eq!(events_after(all.clone(), Some(&all[1])), all[2..].to_vec());
        assert!(events_after(all.clone(), Some(&all[3])).is_empty());
        // The last one sent was dropped from a bounded history: everything not older.
        assert_eq!(
            events_after(all[2..].to_vec(), Some(&e(2, "Running"))),
            all[2..].to_vec()
        );
        assert!(follow_flag(Some("follow")));
        assert!(follow_flag(Some("follow=1")));
        assert!(follow_flag(Some("x=2&follow=true")));
        assert!(!follow_flag(Some("follow=0")));
        assert!(!follow_flag(None));
    }

    #[test]
    fn wait_flag_follows_the_protocol() {
        assert!(!wait_flag(None));
        assert!(wait_flag(Some("wait")));
        assert!(wait_flag(Some("wait=")));
        assert!(wait_flag(Some("wait=1")));
        assert!(!wait_flag(Some("wait=0")));
        assert!(!wait_flag(Some("wait=true")));
        assert!(wait_flag(Some("x=1&wait")));
    }

    #[test]
    fn decodes_status_filters() {
        assert_eq!(percent_decode("RUNNING%2CPENDING"), "RUNNING,PENDING");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%é%4"), "%é%4");
    }
}
