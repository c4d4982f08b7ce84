//! The browser login through JupyterHub as HTTP: the redirect that sends a browser without a
//! session to the hub, and the callback the hub sends it back to. The OAuth itself (state
//! cookie, authorize URL, code exchange) is `crate::auth::hub`'s; these only read the request
//! and write the response.

use super::http::{percent_decode, query_param};
use crate::auth::hub::LoginError;
use crate::auth::Authenticator;
use crate::http_shared::{is_https, refused, set_session_cookie, ApiError, ApiResult, AppState};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use gateway_proxy::ConnMeta;

/// Sends a browser that has no session to the hub's login, to come back to `return_to` (a
/// path on this gateway) through `/api/oauth_callback`; none when browsers do not log in
/// through the hub.
pub(crate) fn hub_login_redirect(
    auth: &Authenticator,
    return_to: &str,
    https: bool,
) -> Option<Response> {
    let start = auth.hub_login_start(return_to, https)?;
    let mut resp = StatusCode::FOUND.into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&start.location).ok()?,
    );
    headers.insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&start.state_cookie).ok()?,
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Some(resp)
}

/// `GET /api/oauth_callback?code=..&state=..`: the hub sends the browser back here after its
/// login. The state must match the cookie set when the login began; the code is exchanged
/// for the user's identity, a session starts, and the browser goes back where it was.
pub(super) async fn oauth_callback(
    State(state): State<AppState>,
    meta: Option<Extension<ConnMeta>>,
    req: Request,
) -> ApiResult<Response> {
    let bad = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, m);
    let query = req.uri().query();
    let code = query_param(query, "code").map(percent_decode);
    let given = query_param(query, "state").map(percent_decode);
    let login = state
        .auth
        .hub_login_finish(req.headers(), code, given)
        .await
        .map_err(|e| match e {
            LoginError::BadRequest(m) => bad(m),
            LoginError::Auth(e) => refused(&state.auth, e),
        })?;
    let https = is_https(req.headers(), meta.as_ref().map(|m| &m.0));
    let mut resp = StatusCode::FOUND.into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::LOCATION,
        HeaderValue::from_str(&login.return_to).map_err(|_| bad("Bad return path"))?,
    );
    if let Ok(v) = HeaderValue::from_str(&login.clear_state_cookie) {
        headers.append(header::SET_COOKIE, v);
    }
    set_session_cookie(&state, &mut resp, login.auth.new_session, https);
    Ok(resp)
}
