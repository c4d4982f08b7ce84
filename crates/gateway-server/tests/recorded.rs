//! A recorded-response test: the stock Python client's requests (`dask_gateway.Gateway` and
//! `GatewayCluster`, plus the scheduler preload's heartbeat that makes a cluster RUNNING), run
//! as a fixed script against the router over the in-memory backend, must get byte for byte the
//! answers in `tests/recorded/stock-client.txt`: status, `Content-Type` and body. Any key added,
//! renamed, dropped or reordered, any value whose type or text changes, fails it. After an
//! intended change of the API, regenerate the recording and review its diff:
//! `UPDATE_RECORDED=1 cargo test -p gateway-server --test recorded`.
//!
//! What makes the answers repeatable: the users (`alice`, `bob`) and options are fixed; the
//! backend's clock is set by the script (start and stop times); cluster names come from a
//! counter in the fake backend (`FakeBackend::with_names`), and the fake derives its TLS pair
//! from the name. The one value of an answer replaced before the comparison is the server
//! version of `GET /api/version` (it changes with every release): it is recorded as
//! `<version>`. The scheduler that receives forwarded scale and adapt messages listens on a
//! random local port, which appears in no answer; in the recorded heartbeat request (whose
//! `api_address` it is) it is written `<port>`. Besides status, content type and body, a 401's
//! `WWW-Authenticate` challenge is recorded (§3.1: the client needs the 401; Kerberos clients
//! read the challenge); other headers (the random session cookie among them) are not.
//!
//! Besides the bytes, every answer is checked against the shape the stock client accepts, so
//! a regenerated recording cannot hold a shape it would reject. Each exchange's heading names
//! the section of `../shared/docs/wire-protocol.md` its shape follows (its route table and
//! error statuses are also summarised in `docs/api.md`):
//!
//! * options: §4.4 and §6.1 (`{"cluster_options": [{field, label, default, spec}]}`, `spec`
//!   with exactly the keys of its type);
//! * cluster model: §5 (exactly `name`, `status`, `dashboard_route`, `start_time`, `stop_time`,
//!   `options`, `tls_cert`, `tls_key`; credentials and dashboard route only while RUNNING);
//! * cluster list: §4.5 (an object keyed by name, values cluster models);
//! * create: §4.6 (`{"name"}`, 201); scale and adapt: §4.9, §4.10 (`{"ok", "msg"}`, the
//!   clipping messages of §8.1); delete: §4.8 (204, empty); heartbeat: §4.11 (200, empty);
//! * errors: §2.2 (`{"error": "<message>"}` with a JSON content type), with the statuses of
//!   §2.3, §3.1 (401), §3.6 (401 for a wrong cluster token), §4.5 (422 for a bad status
//!   filter), §4.6 (422 for bad options), §4.7 (403, 404), §4.9 (409 while not RUNNING, 422
//!   for a bad count);
//! * the messages the gateway forwards to the scheduler's `/api/comm`: §9.6 (recorded too).

use axum::body::Body;
use axum::http::{header, Method, Request};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use gateway_backend::fake::FakeBackend;
use gateway_backend::ClusterBackend;
use gateway_server::api::{router, AppState, AppStateFields};
use gateway_server::auth::Authenticator;
use gateway_server::clock::Clock;
use gateway_server::clusters::ClusterService;
use gateway_server::config::GatewayConfig;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tower::ServiceExt;

/// One field of every option type (wire-protocol §6.1), and a worker cap so that scale and
/// adapt are clipped (§8.1).
const CONFIG: &str = r#"
auth:
  type: simple
  password: pw
cluster:
  max_workers: 2
  options:
    - {field: worker_cores, label: Worker Cores, type: int, default: 1, min: 1, max: 4, target: worker_cores}
    - {field: worker_memory, label: Worker Memory (GiB), type: float, default: 1, min: 0.5, max: 8, target: worker_memory}
    - {field: image, label: Image, type: string, default: "daskgateway/dask-gateway:latest"}
    - {field: size, type: select, default: small, options: [small, large]}
    - {field: gpu, type: bool, default: false}
    - {field: env, type: mapping, default: {}, target: environment}
"#;

/// 2026-01-01T00:00:00Z, the backend's time when the script starts.
const T0: i64 = 1_767_225_600_000;

fn recording() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/recorded/stock-client.txt")
}

/// What the stock client expects of an answer's body.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// §4.3.
    Version,
    /// §4.4, §6.1.
    Options,
    /// §4.5: name → cluster model.
    List,
    /// §4.6.
    Created,
    /// §5.
    Model,
    /// §4.9, §4.10.
    ScaleResult,
    /// §4.8, §4.11.
    Empty,
    /// §2.2.
    Error,
}

/// The gateway under test, the fake backend and scheduler behind it, and the transcript.
struct Script {
    app: Router,
    backend: Arc<FakeBackend>,
    /// The backend's clock.
    now: Arc<AtomicI64>,
    /// What the scheduler's `/api/comm` received since the last exchange.
    comm: Arc<Mutex<Vec<String>>>,
    comm_address: String,
    transcript: String,
    step: usize,
}

/// How a request authenticates.
enum Auth<'a> {
    None,
    /// Basic, with the shared password (what the client sends after the first 401).
    User(&'a str),
    /// `Authorization: token <cluster token>` (the scheduler preload).
    Token(String),
}

impl Script {
    async fn new() -> Script {
        let config: GatewayConfig = serde_yaml::from_str(CONFIG).unwrap();
        config.validate().unwrap();
        let now = Arc::new(AtomicI64::new(T0));
        let counter = Arc::new(AtomicU64::new(0));
        let backend = Arc::new(
            FakeBackend::new()
                .with_clock({
                    let now = now.clone();
                    move || now.load(Ordering::SeqCst)
                })
                .with_names(move || format!("{:032x}", counter.fetch_add(1, Ordering::SeqCst) + 1)),
        );
        let clusters = Arc::new(
            ClusterService::new(backend.clone(), Arc::new(config.cluster.clone()))
                .with_clock(Clock::tokio_at(T0)),
        );
        let state = AppState::new(AppStateFields::new(
            clusters,
            Arc::new(Authenticator::new(&config.auth, &config.prefix())),
        ));
        // The scheduler preload's API (§9.5): records each forwarded message, answers 200.
        let comm = Arc::new(Mutex::new(Vec::new()));
        let scheduler = Router::new().route(
            "/api/comm",
            post({
                let comm = comm.clone();
                move |body: String| async move {
                    comm.lock().unwrap().push(body);
                    ""
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let comm_address = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, scheduler).await.unwrap() });
        Script {
            app: router(state, &config.prefix(), true),
            backend,
            now,
            comm,
            comm_address,
            transcript: "# The stock client's requests and the gateway's answers, byte for byte (status, content\n\
                 # type, body). Written by crates/gateway-server/tests/recorded.rs, which fails when an\n\
                 # answer differs: UPDATE_RECORDED=1 cargo test -p gateway-server --test recorded\n\
                 # regenerates it. Each heading names the section of wire-protocol.md its shape follows.\n\n"
                .to_string(),
            step: 0,
        }
    }

    /// Sets the backend's clock to `T0 + ms`.
    fn at(&self, ms: i64) {
        self.now.store(T0 + ms, Ordering::SeqCst);
    }

    /// Sends one request, checks its answer's shape, adds the exchange to the transcript and
    /// returns the answer's body.
    async fn exchange(
        &mut self,
        what: &str,
        method: Method,
        uri: &str,
        auth: Auth<'_>,
        body: Option<Value>,
        shape: Shape,
    ) -> Value {
        self.step += 1;
        let mut req = Request::builder().method(method.clone()).uri(uri);
        let who = match &auth {
            Auth::None => "no credentials".to_string(),
            Auth::User(u) => {
                let basic = base64::engine::general_purpose::STANDARD.encode(format!("{u}:pw"));
                req = req.header(header::AUTHORIZATION, format!("Basic {basic}"));
                u.to_string()
            }
            Auth::Token(t) => {
                req = req.header(header::AUTHORIZATION, format!("token {t}"));
                "token auth".to_string()
            }
        };
        let sent = body.as_ref().map(|b| b.to_string());
        // The fake scheduler's random port, in the heartbeat's `api_address`, is no answer's.
        let shown = sent
            .as_ref()
            .map(|b| b.replace(&self.comm_address, "http://127.0.0.1:<port>"));
        let req = match &sent {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.clone())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .map(|v| v.to_str().unwrap().to_string());
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).expect("a UTF-8 body");
        let parsed = check_shape(what, shape, status.as_u16(), content_type.as_deref(), &text);
        // The one value replaced: the release's version.
        let recorded = match shape {
            Shape::Version => text.replace(
                &format!("\"{}\"", env!("CARGO_PKG_VERSION")),
                "\"<version>\"",
            ),
            _ => text,
        };
        let t = &mut self.transcript;
        writeln!(t, "### {}. {what}", self.step).unwrap();
        writeln!(t, "{method} {uri} ({who})").unwrap();
        if let Some(b) = &shown {
            writeln!(t, "> {b}").unwrap();
        }
        writeln!(
            t,
            "< {} {}",
            status.as_u16(),
            content_type.as_deref().unwrap_or("(no content type)")
        )
        .unwrap();
        if let Some(c) = &challenge {
            writeln!(t, "< WWW-Authenticate: {c}").unwrap();
        }
        if !recorded.is_empty() {
            writeln!(t, "{recorded}").unwrap();
        }
        for message in self.comm.lock().unwrap().drain(..) {
            writeln!(t, "scheduler /api/comm received: {message}").unwrap();
        }
        writeln!(t).unwrap();
        parsed
    }
}

impl Script {
    async fn get(&mut self, what: &str, uri: &str, auth: Auth<'_>, shape: Shape) -> Value {
        self.exchange(what, Method::GET, uri, auth, None, shape)
            .await
    }

    async fn post(
        &mut self,
        what: &str,
        uri: &str,
        auth: Auth<'_>,
        body: Value,
        shape: Shape,
    ) -> Value {
        self.exchange(what, Method::POST, uri, auth, Some(body), shape)
            .await
    }

    async fn delete(&mut self, what: &str, uri: &str, auth: Auth<'_>, shape: Shape) -> Value {
        self.exchange(what, Method::DELETE, uri, auth, None, shape)
            .await
    }
}

/// Checks an answer against what the stock client accepts (see the module docs) and returns
/// its body as JSON (`null` when empty).
fn check_shape(
    what: &str,
    shape: Shape,
    status: u16,
    content_type: Option<&str>,
    body: &str,
) -> Value {
    let ctx = format!("{what}: {status} {body}");
    if let Shape::Empty = shape {
        assert!(body.is_empty(), "{ctx}");
        assert!((200..300).contains(&status), "{ctx}");
        return Value::Null;
    }
    // §2.2: every JSON answer, errors included, has a JSON content type.
    assert!(
        content_type.is_some_and(|c| c.starts_with("application/json")),
        "{ctx}: content type {content_type:?}"
    );
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .unwrap_or_else(|| panic!("{ctx}: not an object"))
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    };
    match shape {
        Shape::Error => {
            assert!(status >= 400, "{ctx}");
            assert_eq!(keys(&v), ["error"], "{ctx}");
            assert!(v["error"].is_string(), "{ctx}");
        }
        Shape::Version => {
            assert_eq!(keys(&v), ["version"], "{ctx}");
            assert!(v["version"].is_string(), "{ctx}");
        }
        Shape::Created => {
            assert_eq!(status, 201, "{ctx}");
            assert_eq!(keys(&v), ["name"], "{ctx}");
            assert!(v["name"].is_string(), "{ctx}");
        }
        Shape::ScaleResult => {
            assert_eq!(status, 200, "{ctx}");
            assert_eq!(keys(&v), ["msg", "ok"], "{ctx}");
            let ok = v["ok"].as_bool().unwrap_or_else(|| panic!("{ctx}: ok"));
            assert!(
                if ok {
                    v["msg"].is_null()
                } else {
                    v["msg"].is_string()
                },
                "{ctx}: msg"
            );
        }
        Shape::Model => {
            assert_eq!(status, 200, "{ctx}");
            check_model(&ctx, &v);
        }
        Shape::List => {
            assert_eq!(status, 200, "{ctx}");
            for (name, model) in v.as_object().unwrap_or_else(|| panic!("{ctx}: an object")) {
                check_model(&ctx, model);
                assert_eq!(model["name"], name.as_str(), "{ctx}: keyed by name");
            }
        }
        Shape::Options => {
            assert_eq!(status, 200, "{ctx}");
            assert_eq!(keys(&v), ["cluster_options"], "{ctx}");
            for f in v["cluster_options"].as_array().unwrap() {
                assert_eq!(keys(f), ["default", "field", "label", "spec"], "{ctx}");
                assert!(f["field"].is_string() && f["label"].is_string(), "{ctx}");
                let spec = &f["spec"];
                let d = &f["default"];
                let integral = |x: &Value| x.is_i64() || x.is_u64();
                let bound = |x: &Value, int: bool| {
                    x.is_null() || if int { integral(x) } else { x.is_number() }
                };
                let extra: &[&str] = match spec["type"].as_str() {
                    Some("int") => {
                        assert!(integral(d), "{ctx}: int default {d}");
                        assert!(
                            bound(&spec["min"], true) && bound(&spec["max"], true),
                            "{ctx}"
                        );
                        &["max", "min", "type"]
                    }
                    Some("float") => {
                        assert!(d.is_number(), "{ctx}");
                        assert!(
                            bound(&spec["min"], false) && bound(&spec["max"], false),
                            "{ctx}"
                        );
                        &["max", "min", "type"]
                    }
                    Some("string") => {
                        assert!(d.is_string(), "{ctx}");
                        &["type"]
                    }
                    Some("bool") => {
                        assert!(d.is_boolean(), "{ctx}");
                        &["type"]
                    }
                    Some("select") => {
                        let options = spec["options"].as_array().unwrap();
                        assert!(
                            !options.is_empty() && options.iter().all(Value::is_string),
                            "{ctx}"
                        );
                        assert!(options.contains(d), "{ctx}");
                        &["options", "type"]
                    }
                    Some("mapping") => {
                        assert!(d.is_object(), "{ctx}");
                        &["type"]
                    }
                    other => panic!("{ctx}: type {other:?}"),
                };
                assert_eq!(keys(spec), extra, "{ctx}: spec of {}", f["field"]);
            }
        }
        Shape::Empty => unreachable!(),
    }
    v
}

/// §5: exactly the eight keys, with their types and the RUNNING-only fields.
fn check_model(ctx: &str, m: &Value) {
    let mut keys: Vec<&str> = m
        .as_object()
        .unwrap_or_else(|| panic!("{ctx}: a model is an object"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "dashboard_route",
            "name",
            "options",
            "start_time",
            "status",
            "stop_time",
            "tls_cert",
            "tls_key"
        ],
        "{ctx}"
    );
    let name = m["name"].as_str().unwrap_or_else(|| panic!("{ctx}: name"));
    let status = m["status"]
        .as_str()
        .unwrap_or_else(|| panic!("{ctx}: status"));
    assert!(
        ["PENDING", "RUNNING", "STOPPING", "STOPPED", "FAILED"].contains(&status),
        "{ctx}"
    );
    let running = status == "RUNNING";
    assert!(m["start_time"].is_i64(), "{ctx}: start_time");
    let finished = matches!(status, "STOPPED" | "FAILED");
    assert_eq!(m["stop_time"].is_i64(), finished, "{ctx}: stop_time");
    assert!(finished || m["stop_time"].is_null(), "{ctx}");
    assert!(m["options"].is_object(), "{ctx}: options");
    for k in ["tls_cert", "tls_key"] {
        assert_eq!(m[k].is_string(), running, "{ctx}: {k}");
        assert!(running || m[k].is_null(), "{ctx}: {k}");
    }
    let route = format!("/clusters/{name}/status");
    assert!(
        m["dashboard_route"].is_null() || (running && m["dashboard_route"] == route.as_str()),
        "{ctx}: dashboard_route"
    );
}

#[tokio::test]
async fn the_stock_clients_requests_get_the_recorded_answers() {
    use Auth::{Token, User};
    let mut s = Script::new().await;

    s.get(
        "The client's first contact carries no credentials (§3.1)",
        "/api/v1/clusters/",
        Auth::None,
        Shape::Error,
    )
    .await;
    s.get(
        "Gateway.get_versions() (§4.3)",
        "/api/version",
        Auth::None,
        Shape::Version,
    )
    .await;
    s.get(
        "Gateway.cluster_options() (§4.4, §6.1)",
        "/api/v1/options",
        User("alice"),
        Shape::Options,
    )
    .await;
    s.get(
        "Gateway.list_clusters() of a new user (§4.5)",
        "/api/v1/clusters/",
        User("alice"),
        Shape::List,
    )
    .await;
    s.post(
        "new_cluster(unknown_option=1) (§4.6, §6.3)",
        "/api/v1/clusters/",
        User("alice"),
        json!({"cluster_options": {"unknown_option": 1}}),
        Shape::Error,
    )
    .await;
    s.post(
        "new_cluster(worker_cores=9): out of range (§4.6, §6.3)",
        "/api/v1/clusters/",
        User("alice"),
        json!({"cluster_options": {"worker_cores": 9}}),
        Shape::Error,
    )
    .await;
    s.post(
        "new_cluster(size=\"xl\"): not a choice (§4.6, §6.3)",
        "/api/v1/clusters/",
        User("alice"),
        json!({"cluster_options": {"size": "xl"}}),
        Shape::Error,
    )
    .await;
    s.at(1_000);
    let created = s
        .post(
            "new_cluster(worker_cores=2, env={\"A\": \"1\"}) (§4.6)",
            "/api/v1/clusters/",
            User("alice"),
            json!({"cluster_options": {"worker_cores": 2, "env": {"A": "1"}}}),
            Shape::Created,
        )
        .await;
    let name = created["name"].as_str().unwrap().to_string();
    let cluster = format!("/api/v1/clusters/{name}");
    s.get(
        "Gateway.get_cluster(name) while it starts (§4.7, §5)",
        &cluster,
        User("alice"),
        Shape::Model,
    )
    .await;
    s.get(
        "Another user's get_cluster(name) (§4.7)",
        &cluster,
        User("bob"),
        Shape::Error,
    )
    .await;
    s.get(
        "get_cluster of a name that does not exist (§4.7)",
        "/api/v1/clusters/0000000000000000000000000000dead",
        User("alice"),
        Shape::Error,
    )
    .await;
    s.post(
        "cluster.scale(1) before it runs (§4.9)",
        &format!("{cluster}/scale"),
        User("alice"),
        json!({"count": 1}),
        Shape::Error,
    )
    .await;
    let token = s.backend.get(&name).unwrap().token.unwrap();
    let heartbeat = json!({
        "scheduler_address": "tls://127.0.0.1:8786",
        "dashboard_address": "http://127.0.0.1:8787",
        "api_address": s.comm_address,
        "count": 0,
        "active_workers": [],
        "closing_workers": [],
        "closed_workers": [],
    });
    s.post(
        "The preload's heartbeat with a wrong token (§3.6)",
        &format!("{cluster}/heartbeat"),
        Token("0123456789abcdef0123456789abcdef".into()),
        heartbeat.clone(),
        Shape::Error,
    )
    .await;
    s.post(
        "The preload's first heartbeat: the cluster runs (§4.11, §9.4)",
        &format!("{cluster}/heartbeat"),
        Token(token),
        heartbeat,
        Shape::Empty,
    )
    .await;
    s.get(
        "The client waits for it to run (§4.7, §5, §7.2)",
        &format!("{cluster}?wait"),
        User("alice"),
        Shape::Model,
    )
    .await;
    s.get(
        "list_clusters() (§4.5)",
        "/api/v1/clusters/",
        User("alice"),
        Shape::List,
    )
    .await;
    s.get(
        "list_clusters(status=[\"running\", \"pending\"]) (§4.5)",
        "/api/v1/clusters/?status=RUNNING,PENDING",
        User("alice"),
        Shape::List,
    )
    .await;
    s.get(
        "list_clusters of another user (§4.1, §4.5)",
        "/api/v1/clusters/",
        User("bob"),
        Shape::List,
    )
    .await;
    s.get(
        "An unknown status filter (§4.5)",
        "/api/v1/clusters/?status=bogus",
        User("alice"),
        Shape::Error,
    )
    .await;
    s.post(
        "cluster.scale(1) (§4.9, §9.6)",
        &format!("{cluster}/scale"),
        User("alice"),
        json!({"count": 1}),
        Shape::ScaleResult,
    )
    .await;
    s.post(
        "cluster.scale(3) above the worker cap of 2 (§4.9, §8.1)",
        &format!("{cluster}/scale"),
        User("alice"),
        json!({"count": 3}),
        Shape::ScaleResult,
    )
    .await;
    s.post(
        "A negative scale (§4.9)",
        &format!("{cluster}/scale"),
        User("alice"),
        json!({"count": -1}),
        Shape::Error,
    )
    .await;
    s.post(
        "Another user's scale (§4.9)",
        &format!("{cluster}/scale"),
        User("bob"),
        json!({"count": 1}),
        Shape::Error,
    )
    .await;
    s.post(
        "cluster.adapt() (§4.10)",
        &format!("{cluster}/adapt"),
        User("alice"),
        json!({"minimum": null, "maximum": null, "active": true}),
        Shape::ScaleResult,
    )
    .await;
    s.post(
        "cluster.adapt(maximum=3) above the worker cap of 2 (§4.10, §8.1)",
        &format!("{cluster}/adapt"),
        User("alice"),
        json!({"minimum": null, "maximum": 3, "active": true}),
        Shape::ScaleResult,
    )
    .await;
    s.delete(
        "Another user's stop_cluster(name) (§4.8)",
        &cluster,
        User("bob"),
        Shape::Error,
    )
    .await;
    s.at(61_000);
    s.delete(
        "cluster.shutdown() (§4.8)",
        &cluster,
        User("alice"),
        Shape::Empty,
    )
    .await;
    s.get(
        "list_clusters() after it (§4.5)",
        "/api/v1/clusters/",
        User("alice"),
        Shape::List,
    )
    .await;
    s.get(
        "list_clusters(status=\"stopped\") (§4.5, §5)",
        "/api/v1/clusters/?status=STOPPED",
        User("alice"),
        Shape::List,
    )
    .await;
    s.get(
        "get_cluster(name) of the stopped cluster (§4.7, §5)",
        &cluster,
        User("alice"),
        Shape::Model,
    )
    .await;
    s.post(
        "scale of the stopped cluster (§4.9)",
        &format!("{cluster}/scale"),
        User("alice"),
        json!({"count": 1}),
        Shape::Error,
    )
    .await;
    s.delete(
        "stop_cluster(name) again: idempotent (§4.8)",
        &cluster,
        User("alice"),
        Shape::Empty,
    )
    .await;
    s.delete(
        "stop_cluster of a name that does not exist (§4.8)",
        "/api/v1/clusters/0000000000000000000000000000dead",
        User("alice"),
        Shape::Empty,
    )
    .await;

    let file = recording();
    if std::env::var_os("UPDATE_RECORDED").is_some() {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, &s.transcript).unwrap();
    }
    let recorded = std::fs::read_to_string(&file).unwrap_or_default();
    if recorded != s.transcript {
        let first = recorded
            .lines()
            .zip(s.transcript.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| recorded.lines().count().min(s.transcript.lines().count()));
        panic!(
            "the answers differ from {} at line {}:\n  recorded: {}\n  now:      {}\n\
             After an intended change of the API: UPDATE_RECORDED=1 cargo test -p gateway-server --test recorded, and review the diff",
            file.display(),
            first + 1,
            recorded.lines().nth(first).unwrap_or("(end)"),
            s.transcript.lines().nth(first).unwrap_or("(end)"),
        );
    }
}
