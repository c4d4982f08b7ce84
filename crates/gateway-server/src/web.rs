//! The gateway's web page, embedded in the binary: `GET {prefix}/` (behind the API's
//! authentication in each method's browser form) and its script and style under `ui/`. The
//! page itself only calls the REST API, so it can do nothing the API would not allow.

use crate::auth::{AuthError, User};
use crate::http_shared::{
    is_https, refused, set_negotiate_reply, set_session_cookie, ApiError, AppState,
};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use gateway_model::ClusterStatus;
use gateway_proxy::ConnMeta;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const APP_CSS: &str = include_str!("../web/app.css");

/// The page's policy: its own script and style only, API calls to this origin only, no
/// framing, no inline code; user-controlled text is never markup in it.
pub const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; \
     base-uri 'none'";

/// Headers every page response carries.
fn harden(resp: &mut Response, cache: &'static str) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
}

/// A small static HTML answer (sign-in needed, or a bad path).
fn message_page(status: StatusCode, title: &str, text: &str) -> Response {
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let body = format!(
        "<!doctype html><html lang=\"en\"><meta charset=\"utf-8\"><title>{}</title>\
         <h1>{}</h1><p>{}</p></html>",
        escape(title),
        escape(title),
        escape(text)
    );
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response();
    harden(&mut resp, "no-store");
    resp
}

/// `GET {prefix}/`: the page for a signed-in user. Without credentials the browser is asked
/// for them the method's way: the hub's login (JupyterHub), a Basic prompt (simple), a
/// Negotiate exchange (Kerberos); JWT needs a proxy in front that adds the bearer token.
pub async fn page(State(state): State<AppState>, req: Request) -> Response {
    let original = req
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| req.uri().clone(), |o| o.0.clone());
    // The page addresses the API relatively: it must be served from a path ending in `/`.
    if !original.path().ends_with('/') {
        let mut resp = StatusCode::FOUND.into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("{}/", original.path())) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return resp;
    }
    let https = is_https(req.headers(), req.extensions().get::<ConnMeta>());
    match state.auth.authenticate(req.headers()).await {
        Ok(auth) => {
            let mut resp = (
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                INDEX_HTML,
            )
                .into_response();
            harden(&mut resp, "no-store");
            set_session_cookie(&state, &mut resp, auth.new_session, https);
            set_negotiate_reply(&mut resp, auth.negotiate_reply);
            resp
        }
        Err(AuthError::Required) => {
            let here = original.path_and_query().map_or("/", |p| p.as_str());
            if let Some(resp) = crate::api::login::hub_login_redirect(&state.auth, here, https) {
                return resp;
            }
            let challenge = state.auth.challenge();
            let text = if challenge == "Bearer" {
                "This gateway authenticates with JSON Web Tokens. Open this page through a \
                 proxy that signs you in and adds your token as Authorization: Bearer (see \
                 docs/operations.md, \"The web page\")."
            } else {
                "Sign in with your gateway credentials to see your clusters."
            };
            let mut resp = message_page(StatusCode::UNAUTHORIZED, "Sign-in required", text);
            let value = if challenge == "Basic" {
                "Basic realm=\"Dask Gateway\", charset=\"UTF-8\""
            } else {
                challenge
            };
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(value));
            resp
        }
        Err(e) => {
            let mut resp = refused(&state.auth, e).into_response();
            harden(&mut resp, "no-store");
            resp
        }
    }
}

/// `GET {prefix}/ui/{file}`: the page's script and style (no user data in them: no sign-in).
pub async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return message_page(StatusCode::NOT_FOUND, "Not found", "No such file."),
    };
    let mut resp = ([(header::CONTENT_TYPE, kind)], body).into_response();
    harden(&mut resp, "no-cache");
    resp
}

/// `GET /api/v1/me`: who the caller is, as the gateway sees them.
pub async fn me(State(state): State<AppState>, Extension(user): Extension<User>) -> Json<Value> {
    let (policy, _) = state.clusters.policy_for(&user);
    Json(json!({
        "name": user.name,
        "admin": user.admin,
        "groups": user.groups,
        "policy": policy,
    }))
}

/// `GET /api/v1/overview` (admins): clusters by status, workers wanted, API requests served
/// and uptime, for the page's health panel.
pub async fn overview(
    State(state): State<AppState>,
    Extension(user): Extension<User>,
) -> Result<Json<Value>, ApiError> {
    if !user.admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "User {} lacks permissions to read the gateway's overview",
                user.name
            ),
        ));
    }
    let mut clusters: BTreeMap<String, u64> = ClusterStatus::ALL
        .iter()
        .map(|s| (s.as_str().to_ascii_lowercase(), 0))
        .collect();
    let mut workers = 0;
    for c in state.clusters.backend().list(None) {
        *clusters
            .entry(c.status.as_str().to_ascii_lowercase())
            .or_default() += 1;
        if c.status.is_active() {
            workers += c.target_workers;
        }
    }
    Ok(Json(json!({
        "clusters": clusters,
        "workers": workers,
        "api_requests": state.api_requests.load(Ordering::Relaxed),
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_inert_markup_with_no_inline_code() {
        for forbidden in ["<script>", "onclick", "onload", "style=", "javascript:"] {
            assert!(!INDEX_HTML.contains(forbidden), "{forbidden} in index.html");
        }
        assert!(!APP_JS.contains("innerHTML") && !APP_JS.contains("outerHTML"));
        assert!(!APP_JS.contains("insertAdjacentHTML") && !APP_JS.contains("eval("));
        assert!(PAGE_CSP.contains("script-src 'self'") && !PAGE_CSP.contains("unsafe"));
    }
}
