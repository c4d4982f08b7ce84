//! The REST API, the web page and the dashboard proxy called without a socket
//! (`tower::ServiceExt::oneshot`) over the in-memory backend: the status codes, headers and
//! bodies each route promises, for good and for bad input. (The dashboard proxy forwards to a
//! real local HTTP server standing in for a scheduler's dashboard.)

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use base64::Engine;
use gateway_backend::fake::FakeBackend;
use gateway_backend::{ClusterBackend, ClusterSettings, NewCluster, SchedulerAddresses};
use gateway_server::api::{router, AppState, AppStateFields};
use gateway_server::auth::Authenticator;
use gateway_server::clusters::ClusterService;
use gateway_server::config::GatewayConfig;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

const CONFIG: &str = "
auth:
  type: simple
  password: pw
  admin_users: [ada]
";

/// The gateway's router over a fresh in-memory backend, with `prefix`.
fn app(prefix: &str) -> Router {
    app_on(Arc::new(FakeBackend::new()), prefix)
}

/// The gateway's router over `backend`, with `prefix`.
fn app_on(backend: Arc<FakeBackend>, prefix: &str) -> Router {
    let mut config: GatewayConfig = serde_yaml::from_str(CONFIG).unwrap();
    config.prefix = prefix.into();
    config.validate().unwrap();
    let clusters = Arc::new(ClusterService::new(
        backend,
        Arc::new(config.cluster.clone()),
    ));
    let state = AppState::new(AppStateFields::new(
        clusters,
        Arc::new(Authenticator::new(&config.auth, &config.prefix())),
    ));
    router(state, &config.prefix(), true)
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&self.body));
        })
    }

    fn header(&self, name: header::HeaderName) -> &str {
        self.headers
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn call(app: &Router, method: Method, uri: &str, user: Option<&str>) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(u) = user {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:pw"));
        req = req.header(header::AUTHORIZATION, format!("Basic {token}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap()
        .to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

async fn get(app: &Router, uri: &str, user: Option<&str>) -> Answer {
    call(app, Method::GET, uri, user).await
}

#[tokio::test]
async fn usage_reports_refuse_strangers_other_users_and_bad_parameters() {
    let app = app("");
    assert_eq!(
        get(&app, "/api/v1/usage", None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let own = get(
        &app,
        "/api/v1/usage?since=2026-12-01&by=group",
        Some("alice"),
    )
    .await;
    assert_eq!(own.status, StatusCode::OK);
    let body = own.json();
    assert_eq!(body["since"], 1_796_083_200_000i64);
    assert_eq!(body["by"], "group");
    assert!(body["rows"].as_array().unwrap().is_empty());
    // Another user's usage: refused to a user, fine for an admin (and for oneself).
    let theirs = get(&app, "/api/v1/usage?user=bob", Some("alice")).await;
    assert_eq!(theirs.status, StatusCode::FORBIDDEN);
    assert!(theirs.json()["error"]
        .as_str()
        .unwrap()
        .contains("usage of user bob"));
    for (who, uri) in [
        ("ada", "/api/v1/usage?user=bob"),
        ("alice", "/api/v1/usage?user=alice"),
    ] {
        assert_eq!(
            get(&app, uri, Some(who)).await.status,
            StatusCode::OK,
            "{uri}"
        );
    }
    for (query, needle) in [
        ("since=yesterday", "since:"),
        ("until=12%3A00", "until:"),
        ("since=5&until=5", "before until"),
        ("by=planet", "by must be"),
        ("format=xml", "format must be"),
        ("since=99999999999999999999", "since:"),
        ("%3Cscript%3E=1", "unknown parameter"),
    ] {
        let a = get(&app, &format!("/api/v1/usage?{query}"), Some("alice")).await;
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        let message = a.json()["error"].as_str().unwrap().to_string();
        assert!(message.contains(needle), "{query}: {message}");
    }
    let csv = get(&app, "/api/v1/usage?format=csv", Some("ada")).await;
    assert_eq!(csv.status, StatusCode::OK);
    assert!(csv.header(header::CONTENT_TYPE).starts_with("text/csv"));
    assert!(String::from_utf8(csv.body)
        .unwrap()
        .starts_with("user,group,cluster,clusters_created"));
}

#[tokio::test]
async fn me_says_who_and_the_overview_is_for_admins_only() {
    let app = app("");
    let me = get(&app, "/api/v1/me", Some("alice")).await.json();
    assert_eq!(
        (me["name"].as_str(), me["admin"].as_bool()),
        (Some("alice"), Some(false))
    );
    assert_eq!(
        get(&app, "/api/v1/me", Some("ada")).await.json()["admin"],
        true
    );
    assert_eq!(
        get(&app, "/api/v1/overview", Some("alice")).await.status,
        StatusCode::FORBIDDEN
    );
    let first = get(&app, "/api/v1/overview", Some("ada")).await.json();
    assert_eq!(first["clusters"]["running"], 0);
    assert_eq!(first["workers"], 0);
    let second = get(&app, "/api/v1/overview", Some("ada")).await.json();
    assert!(
        second["api_requests"].as_u64() > first["api_requests"].as_u64(),
        "requests are counted"
    );
}

#[tokio::test]
async fn the_page_asks_a_stranger_to_sign_in_and_is_locked_down() {
    let app = app("");
    let stranger = get(&app, "/", None).await;
    assert_eq!(stranger.status, StatusCode::UNAUTHORIZED);
    assert!(stranger
        .header(header::WWW_AUTHENTICATE)
        .starts_with("Basic realm="));
    assert!(!String::from_utf8_lossy(&stranger.body).contains("ui/app.js"));
    let page = get(&app, "/", Some("alice")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.header(header::CONTENT_TYPE).starts_with("text/html"));
    let csp = page.header(header::CONTENT_SECURITY_POLICY);
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    assert!(!csp.contains("unsafe"));
    assert_eq!(page.header(header::X_FRAME_OPTIONS), "DENY");
    assert_eq!(page.header(header::CACHE_CONTROL), "no-store");
    assert!(page.header(header::SET_COOKIE).contains("HttpOnly"));
    // Its script and style need no sign-in; nothing else is served there.
    let js = get(&app, "/ui/app.js", None).await;
    assert_eq!(js.status, StatusCode::OK);
    assert!(js
        .header(header::CONTENT_TYPE)
        .starts_with("text/javascript"));
    assert_eq!(js.header(header::X_CONTENT_TYPE_OPTIONS), "nosniff");
    assert_eq!(get(&app, "/ui/app.css", None).await.status, StatusCode::OK);
    for path in ["/ui/../Cargo.toml", "/ui/index.html", "/ui/app.js.map"] {
        assert_eq!(
            get(&app, path, None).await.status,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
}

#[tokio::test]
async fn under_a_prefix_the_page_is_at_the_prefix_with_a_slash() {
    let app = app("/gw");
    let bare = get(&app, "/gw", Some("alice")).await;
    assert_eq!(bare.status, StatusCode::FOUND);
    assert_eq!(bare.header(header::LOCATION), "/gw/");
    assert_eq!(
        get(&app, "/gw/", Some("alice")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&app, "/gw/ui/app.css", None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&app, "/", Some("alice")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&app, "/gw/api/v1/usage", Some("alice")).await.status,
        StatusCode::OK
    );
}

/// A scheduler's dashboard on a local port: `GET /status` answers a fixed page.
async fn dashboard_server() -> String {
    let page = Router::new().route(
        "/status",
        axum::routing::get(|| async { "the scheduler's dashboard" }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, page).await.unwrap() });
    address
}

/// With several replicas, the one a browser reaches may hear that a cluster runs a moment after
/// the one that told its user: a dashboard request for a cluster this replica has as starting
/// waits for it to run (at most `ROUTE_WAIT`) instead of answering 404. An unknown name is
/// answered 404 at once.
#[tokio::test]
async fn a_dashboard_request_for_a_cluster_starting_here_is_served_once_it_runs() {
    let dashboard = dashboard_server().await;
    let backend = Arc::new(FakeBackend::new());
    let app = app_on(backend.clone(), "");

    assert_eq!(
        get(&app, "/clusters/nope/status", None).await.status,
        StatusCode::NOT_FOUND
    );

    let new = NewCluster::owned("alice", Default::default(), ClusterSettings::example());
    let starting = backend.create(new).await.unwrap();
    let name = starting.name.clone();
    let runs = tokio::spawn({
        let backend = backend.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            backend.make_running(
                &name,
                SchedulerAddresses {
                    scheduler: "tls://127.0.0.1:1".into(),
                    dashboard: Some(dashboard),
                    api: "http://127.0.0.1:1".into(),
                },
            );
        }
    });
    let page = get(&app, &format!("/clusters/{}/status", starting.name), None).await;
    runs.await.unwrap();
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.body, b"the scheduler's dashboard");
}
