//! The REST API (wire-protocol sections 2–4) and the dashboard routes, as one axum Router:
//! the state and error types, the cluster handlers and the router here; the layers in front of
//! the handlers in `guard.rs`, request parsing in `http.rs`, the event stream in `events.rs`
//! and the dashboard proxy in `dashboard.rs`.

mod dashboard;
mod events;
mod guard;
mod http;
pub(crate) mod login;

use self::dashboard::{dashboard_path, dashboard_root};
use self::events::cluster_events;
use self::guard::{bounded, count_request, guard_writes, require_user};
use self::http::{parse_body, percent_decode, query_param, wait_flag};
use crate::auth::{cluster_token, User};
use crate::clusters::Requester;
use crate::http_shared::{is_https, refused, set_negotiate_reply, set_session_cookie};
pub use crate::http_shared::{ApiError, ApiResult, AppState, AppStateFields};
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Json, Router};
use gateway_model::{
    AdaptRequest, ClusterModel, ClusterStatus, CreateClusterRequest, CreateClusterResponse,
    Heartbeat, ScaleRequest,
};
use gateway_proxy::ConnMeta;
use serde_json::{json, Value};

/// How long a user's DELETE waits for the cluster's processes to exit before answering.
const DELETE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

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
    state.metrics.response().await
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
    let hosts = state.hosts.clone();
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
        .route("/api/oauth_callback", get(login::oauth_callback));
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
    let app = if prefix.is_empty() {
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
    };
    let api_root = format!("{prefix}/api/");
    app.layer(middleware::from_fn(
        move |req: Request, next: middleware::Next| {
            let allowed = guard::request_host(&req).is_none_or(|h| hosts.allows(&h));
            async move {
                if allowed {
                    next.run(req).await
                } else {
                    ApiError::new(
                        StatusCode::FORBIDDEN,
                        "This gateway does not answer requests for that host name (see allowed_hosts)",
                    )
                    .into_response()
                }
            }
        },
    ))
    .layer(middleware::from_fn(
        move |req: Request, next: middleware::Next| {
            let api = req.uri().path().starts_with(&api_root);
            async move {
                let resp = next.run(req).await;
                if api {
                    let mut resp = json_error_body(resp).await;
                    api_headers(resp.headers_mut());
                    resp
                } else {
                    resp
                }
            }
        },
    ))
}

/// Headers of every API answer: its JSON is never to be sniffed as anything else (errors echo
/// what a request sent), and never kept by a cache (a cluster's answer carries its key).
fn api_headers(headers: &mut axum::http::HeaderMap) {
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(header::HeaderValue::from_static("no-store"));
}

/// An API error answer as `{"error": ...}`, whoever made it: axum's own refusals (an unknown
/// path, a method the route lacks, a body too large, a path that is not UTF-8) come as plain
/// text or empty, and clients read every API error as JSON.
async fn json_error_body(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let text = text.trim();
    let message = match text.strip_prefix(&format!("{}: ", status.as_u16())) {
        _ if text.is_empty() => status.canonical_reason().unwrap_or("Error").to_string(),
        Some(rest) => rest.to_string(),
        None => text.to_string(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(
        parts,
        axum::body::Body::from(json!({ "error": message }).to_string()),
    )
}
