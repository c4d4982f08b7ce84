//! The dashboard reverse proxy: `/clusters/{name}/...` goes to the cluster's scheduler, with
//! the visitor's gateway credentials kept away from it (a dashboard is user-controlled content).

use super::AppState;
use crate::auth::AuthError;
use crate::http_shared::{is_https, refused};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use gateway_proxy::{ClusterRoute, ConnMeta, ROUTE_WAIT};

pub(super) async fn dashboard_root(
    state: State<AppState>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    dashboard(state, name, req).await
}

pub(super) async fn dashboard_path(
    state: State<AppState>,
    // The decoded remainder is not used: the raw one is forwarded (see `dashboard`).
    Path((name, _rest)): Path<(String, String)>,
    req: Request,
) -> Response {
    dashboard(state, name, req).await
}

/// Proxies a dashboard request to the cluster's scheduler.
///
/// A dashboard is user-controlled content (anyone can add handlers to their own scheduler), so
/// it must never act with a visitor's gateway credentials: the request loses `Authorization`
/// and the session cookie, the response may not set the session cookie or clear site data, and
/// it carries the configured `Content-Security-Policy` (by default a sandbox: the page runs in
/// an opaque origin, so it can neither read the gateway's cookies nor read API responses, and
/// browsers send it no `SameSite` cookies).
async fn dashboard(State(state): State<AppState>, name: String, mut req: Request) -> Response {
    let not_found = || (StatusCode::NOT_FOUND, "404: Not Found").into_response();
    // A cluster still starting here may already run for another replica, which told its user.
    let route = state
        .clusters
        .backend()
        .route_soon(&name, ROUTE_WAIT)
        .await
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
                if let Some(resp) = super::login::hub_login_redirect(&state.auth, &here, https) {
                    return resp;
                }
                return refused(&state.auth, AuthError::Required).into_response();
            }
            Err(e) => return refused(&state.auth, e).into_response(),
        }
    }
    // Keep the raw (still percent-encoded) remainder of the path. A cluster name is plain
    // text: a path that percent-encodes it is no link the gateway made, and its decoded rest
    // must not be passed on (`%3F` would become a query, `%2F` a real `/`).
    let raw_path = req.uri().path();
    let marker = format!("/clusters/{name}");
    let Some(at) = raw_path.find(&marker) else {
        return not_found();
    };
    let remainder = &raw_path[at + marker.len()..];
    let mut path = if remainder.is_empty() {
        "/".to_string()
    } else {
        remainder.to_string()
    };
    if let Some(q) = req.uri().query() {
        path.push('?');
        path.push_str(q);
    }
    // Where the dashboard lives for the browser: the path up to the cluster's name.
    let public_base = {
        let original = req
            .extensions()
            .get::<axum::extract::OriginalUri>()
            .map_or(req.uri().path(), |o| o.0.path());
        original
            .find(&marker)
            .map(|at| original[..at + marker.len()].to_string())
            .unwrap_or(marker.clone())
    };
    req.headers_mut().remove(header::AUTHORIZATION);
    state.auth.strip_session_cookie(req.headers_mut());
    let mut resp = state.forwarder.forward(req, &target, &path).await;
    let headers = resp.headers_mut();
    if let Some(location) = headers
        .get(header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .and_then(|l| dashboard_location(l, &target, &public_base))
    {
        headers.insert(header::LOCATION, location);
    }
    // A dashboard's cookies stay under its own route: it may neither set the gateway's
    // session nor cookies that other dashboards or the gateway's own pages would receive.
    let set_cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    if !set_cookies.is_empty() {
        headers.remove(header::SET_COOKIE);
        for c in set_cookies {
            if state.auth.is_session_set_cookie(&c) {
                continue;
            }
            if let Some(scoped) = scoped_cookie(&c, &public_base) {
                headers.append(header::SET_COOKIE, scoped);
            }
        }
    }
    headers.remove("clear-site-data");
    if let Some(csp) = &state.dashboard_csp {
        headers.append(header::CONTENT_SECURITY_POLICY, csp.clone());
    }
    resp
}

/// A dashboard redirect as the browser must follow it: a path of the dashboard's own
/// (`/status`), or a URL naming its address inside the cluster network, moves under the
/// cluster's public base (`/clusters/<name>/status`). Other locations stay as they are.
fn dashboard_location(location: &str, target: &str, public_base: &str) -> Option<HeaderValue> {
    let own_path = if location.starts_with('/') && !location.starts_with("//") {
        location
    } else {
        let rest = location
            .strip_prefix("http://")
            .and_then(|r| r.strip_prefix(target))?;
        if rest.is_empty() {
            "/"
        } else if rest.starts_with(['/', '?']) {
            rest
        } else {
            return None;
        }
    };
    if own_path.starts_with(public_base) {
        return None;
    }
    HeaderValue::from_str(&format!("{public_base}{own_path}")).ok()
}

/// A dashboard's `Set-Cookie` confined to the cluster's route: its `Path` moves under
/// `public_base` (a cookie without one gets the route itself) and a `Domain` is dropped, so
/// the browser sends it back to this dashboard only. `None` for a header that is not text.
fn scoped_cookie(cookie: &HeaderValue, public_base: &str) -> Option<HeaderValue> {
    let text = cookie.to_str().ok()?;
    let mut parts = text.split(';');
    let mut out = parts.next()?.trim().to_string();
    let mut path = None;
    for attribute in parts.map(str::trim).filter(|a| !a.is_empty()) {
        let key = attribute.split('=').next().unwrap_or_default().trim();
        if key.eq_ignore_ascii_case("domain") {
            continue;
        }
        if key.eq_ignore_ascii_case("path") {
            path = attribute.split_once('=').map(|(_, v)| v.trim().to_string());
            continue;
        }
        out.push_str("; ");
        out.push_str(attribute);
    }
    let own = path.filter(|p| p.starts_with('/')).unwrap_or_default();
    let scoped = if own.starts_with(&format!("{public_base}/")) {
        own
    } else {
        format!("{public_base}{}", if own.is_empty() { "/" } else { &own })
    };
    out.push_str("; Path=");
    out.push_str(&scoped);
    HeaderValue::from_str(&out).ok()
}

#[cfg(test)]
mod tests {
    use super::{dashboard_location, scoped_cookie};
    use axum::http::HeaderValue;

    #[test]
    fn dashboard_cookies_stay_under_the_clusters_route() {
        let base = "/gw/clusters/abc";
        let scope = |c: &str| {
            scoped_cookie(&HeaderValue::from_str(c).unwrap(), base)
                .map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(
            scope("_xsrf=2|ab; Path=/; Domain=example.org; Max-Age=600").as_deref(),
            Some("_xsrf=2|ab; Max-Age=600; Path=/gw/clusters/abc/")
        );
        assert_eq!(scope("a=b").as_deref(), Some("a=b; Path=/gw/clusters/abc/"));
        assert_eq!(
            scope("a=b; path=/status; HttpOnly").as_deref(),
            Some("a=b; HttpOnly; Path=/gw/clusters/abc/status")
        );
        // Already under the route (a dashboard that knows its prefix) it stays.
        assert_eq!(
            scope("a=b; Path=/gw/clusters/abc/lab").as_deref(),
            Some("a=b; Path=/gw/clusters/abc/lab")
        );
        // The route's name as a prefix of another cluster's is no escape.
        assert_eq!(
            scope("a=b; Path=/gw/clusters/abcd/").as_deref(),
            Some("a=b; Path=/gw/clusters/abc/gw/clusters/abcd/")
        );
        assert_eq!(
            scope("a=b; Path=relative").as_deref(),
            Some("a=b; Path=/gw/clusters/abc/")
        );
    }

    #[test]
    fn dashboard_redirects_stay_under_the_clusters_route() {
        let base = "/gw/clusters/abc";
        let to = |l: &str| {
            dashboard_location(l, "10.0.0.5:8787", base).map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(to("/status").as_deref(), Some("/gw/clusters/abc/status"));
        assert_eq!(
            to("/status?x=1").as_deref(),
            Some("/gw/clusters/abc/status?x=1")
        );
        assert_eq!(
            to("http://10.0.0.5:8787/info/main").as_deref(),
            Some("/gw/clusters/abc/info/main")
        );
        assert_eq!(
            to("http://10.0.0.5:8787").as_deref(),
            Some("/gw/clusters/abc/")
        );
        // Already public, elsewhere, or relative: left alone.
        assert_eq!(to("/gw/clusters/abc/status"), None);
        assert_eq!(to("https://docs.dask.org/"), None);
        assert_eq!(to("http://10.0.0.5:87870/x"), None);
        assert_eq!(to("//evil.example/x"), None);
        assert_eq!(to("status"), None);
    }
}
