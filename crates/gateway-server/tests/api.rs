//! In-process tests of the REST API paths that need no running Dask: authentication, input
//! validation, ownership of errors, and a scheduler that cannot be started.
//! (Everything with real Dask is in tests/e2e, driven by the stock Python client.)

use gateway_server::config::GatewayConfig;
use serde_json::{json, Value};
use std::time::Duration;

struct Gateway {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), gateway_server::StartError>>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free port that no other test of this process has been given. A port from `bind(0)` is
/// free again as soon as it is returned, and the kernel may hand the same one to a test running
/// alongside: two gateways would then share an address (or a data directory) and one of them
/// would fail to start.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

async fn start(yaml: &str) -> Gateway {
    start_tweaked(yaml, |_| {}).await
}

/// Starts a gateway from validated `yaml`, then applies `tweak` (to set values below the
/// operator minimums so a test stays fast).
async fn start_tweaked(yaml: &str, tweak: impl FnOnce(&mut GatewayConfig)) -> Gateway {
    let dir = std::env::temp_dir().join(format!(
        "dgrs-api-test-{}-{}",
        std::process::id(),
        free_port()
    ));
    let port = free_port();
    let mut config: GatewayConfig = serde_yaml::from_str(yaml).unwrap();
    config.address = format!("127.0.0.1:{port}").parse().unwrap();
    config.data_dir = Some(dir.clone());
    let mut config = config.check().unwrap();
    tweak(config.unchecked_mut());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let mut task = tokio::spawn(gateway_server::run(config, async move {
        let _ = rx.await;
    }));
    let base = format!("http://127.0.0.1:{port}");
    let started = tokio::time::timeout(Duration::from_secs(30), async {
        while reqwest::get(format!("{base}/api/health")).await.is_err() {
            if task.is_finished() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if task.is_finished() {
        panic!(
            "the gateway stopped while starting: {:?}",
            (&mut task).await
        );
    }
    assert!(
        started.is_ok(),
        "the gateway did not answer /api/health within 30 s"
    );
    Gateway {
        base,
        stop: Some(tx),
        task,
        _dir: TempDir(dir),
    }
}

impl Gateway {
    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// `POST path` of a JSON body with the given `Authorization` header.
    async fn post(&self, path: &str, auth: &str, body: Value) -> reqwest::Response {
        self.client()
            .post(self.url(path))
            .header("Authorization", auth)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// `GET path` with the given `Authorization` header.
    async fn get(&self, path: &str, auth: &str) -> reqwest::Response {
        self.client()
            .get(self.url(path))
            .header("Authorization", auth)
            .send()
            .await
            .unwrap()
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

fn basic(user: &str, pw: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

const CONFIG: &str = r#"
auth: {password: pw}
dask: {command: /bin/false}
cluster:
  options:
    - {field: worker_cores, type: int, default: 1, min: 1, max: 4, target: worker_cores}
    - {field: size, type: select, default: small, options: [small, large]}
"#;

#[tokio::test]
async fn health_version_and_challenge() {
    let gw = start(CONFIG).await;
    let c = gw.client();
    let r = c.get(gw.url("/api/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"status": "pass"}));
    let v: Value = c
        .get(gw.url("/api/version"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v["version"].is_string());

    let r = c.get(gw.url("/api/v1/clusters/")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Basic");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "Authentication required"})
    );

    let r = gw.get("/api/v1/clusters/", &basic("alice", "bad")).await;
    assert_eq!(r.status(), 401);

    let r = gw.get("/api/v1/clusters/", &basic("alice", "pw")).await;
    assert_eq!(r.status(), 200);
    // API answers (a cluster's carries its key) are never cached, nor sniffed as HTML.
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({}));
    // The cookie alone authenticates.
    let r = c
        .get(gw.url("/api/v1/clusters/"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_422_and_changes_nothing() {
    let gw = start(CONFIG).await;
    let c = gw.client();
    let auth = basic("alice", "pw");
    let post = |body: &'static str| {
        c.post(gw.url("/api/v1/clusters/"))
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .body(body)
    };
    for (body, needle) in [
        ("{not json", "Invalid request body"),
        ("[1, 2]", "must be a JSON object"),
        ("", "Invalid request body"),
        ("null", "must be a JSON object"),
        (
            r#"{"cluster_options": {"nope": 1}}"#,
            "Unknown fields ['nope']",
        ),
        (
            r#"{"cluster_options": {"worker_cores": "2"}}"#,
            "worker_cores must be an integer",
        ),
        (
            r#"{"cluster_options": {"worker_cores": 9}}"#,
            "worker_cores must be <= 4",
        ),
        (
            r#"{"cluster_options": {"size": "xl"}}"#,
            "'xl' is not a valid option for size",
        ),
        (r#"{"cluster_options": [1]}"#, "options must be a dict"),
    ] {
        let r = post(body).send().await.unwrap();
        assert_eq!(r.status(), 422, "{body}");
        let e: Value = r.json().await.unwrap();
        assert!(e["error"].as_str().unwrap().contains(needle), "{body}: {e}");
    }
    let r = gw.get("/api/v1/clusters/?status=bogus", &auth).await;
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "'bogus' is not a valid ClusterStatus"
    );
    let r = gw
        .get(
            "/api/v1/clusters/?status=stopped,failed,pending,running,stopping",
            &auth,
        )
        .await;
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({}),
        "nothing was created"
    );

    let r = gw.get("/api/v1/clusters/nope", &auth).await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "Cluster nope not found"
    );
    let r = gw
        .post("/api/v1/clusters/nope/scale", &auth, json!({"count": 1}))
        .await;
    assert_eq!(r.status(), 404);
    let r = c
        .delete(gw.url("/api/v1/clusters/nope"))
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .post(gw.url("/api/v1/clusters/nope/heartbeat"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "token");
    let r = gw.get("/api/v1/nothing-here", &auth).await;
    assert_eq!(r.status(), 404);
    gw.shutdown().await;
}

#[tokio::test]
async fn options_are_served_in_wire_form() {
    let gw = start(CONFIG).await;
    let r = gw.get("/api/v1/options", &basic("bob", "pw")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"cluster_options": [
            {"field": "worker_cores", "label": "worker_cores", "default": 1, "spec": {"type": "int", "min": 1, "max": 4}},
            {"field": "size", "label": "size", "default": "small", "spec": {"type": "select", "options": ["small", "large"]}}
        ]})
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_scheduler_that_cannot_start_fails_the_cluster() {
    let gw = start(
        r#"
dask: {command: /nonexistent/dask}
cluster: {start_timeout: 5}
"#,
    )
    .await;
    let auth = basic("alice", "");
    let r = gw.post("/api/v1/clusters/", &auth, json!({})).await;
    assert_eq!(r.status(), 500);
    let error = r.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        error.contains("Could not start the Dask scheduler"),
        "{error}"
    );
    assert!(
        !error.contains("/nonexistent"),
        "no server paths in user errors: {error}"
    );
    let list: Value = gw
        .get("/api/v1/clusters/?status=failed", &auth)
        .await
        .json()
        .await
        .unwrap();
    let clusters = list.as_object().unwrap();
    assert_eq!(clusters.len(), 1);
    let model = clusters.values().next().unwrap();
    assert_eq!(model["status"], "FAILED");
    assert!(model["stop_time"].is_i64());
    assert!(model["tls_cert"].is_null());
    let active: Value = gw
        .get("/api/v1/clusters/", &auth)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(active, json!({}));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_scheduler_that_exits_fails_the_cluster() {
    // `/bin/false scheduler ...` starts and exits 1 at once: PENDING then FAILED, never RUNNING.
    let gw = start(CONFIG).await;
    let c = gw.client();
    let auth = basic("alice", "pw");
    let r = gw.post("/api/v1/clusters/", &auth, json!({})).await;
    assert_eq!(r.status(), 201);
    let name = r.json::<Value>().await.unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let mut status = String::new();
    for _ in 0..100 {
        let m: Value = gw
            .get(&format!("/api/v1/clusters/{name}?wait"), &auth)
            .await
            .json()
            .await
            .unwrap();
        status = m["status"].as_str().unwrap().to_string();
        if status == "FAILED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "FAILED");
    let r = c.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let metrics = r.text().await.unwrap();
    assert!(metrics.ends_with("\n# EOF\n"), "{metrics}");
    let mut families: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
        .collect();
    let count = families.len();
    families.sort_unstable();
    families.dedup();
    assert_eq!(families.len(), count, "each family once:\n{metrics}");
    for line in [
        "dask_gateway_clusters{status=\"failed\"} 1",
        "dask_gateway_clusters{status=\"running\"} 0",
        "# TYPE dask_gateway_clusters_created counter",
        "dask_gateway_clusters_created_total 1",
        "dask_gateway_clusters_failed_total 1",
        "dask_gateway_routes 0",
        "dask_gateway_workers{state=\"running\"} 0",
        "# TYPE dask_gateway_usage_core_seconds counter",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from\n{metrics}"
        );
    }
    // Another user cannot see it.
    let r = gw
        .get(&format!("/api/v1/clusters/{name}"), &basic("mallory", "pw"))
        .await;
    assert_eq!(r.status(), 403);
    gw.shutdown().await;
}

#[tokio::test]
async fn one_gateway_per_data_directory() {
    let gw = start(CONFIG).await;
    let mut second: GatewayConfig = serde_yaml::from_str(CONFIG).unwrap();
    second.address = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    second.data_dir = Some(gw._dir.0.clone());
    let err = gateway_server::run(second.check().unwrap(), async {})
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("already using the data directory"),
        "{err}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn the_per_user_cluster_quota_is_enforced() {
    // A "scheduler" that just stays alive keeps its cluster PENDING (active).
    let script = std::env::temp_dir().join(format!("dgrs-idle-{}.sh", std::process::id()));
    std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let gw = start(&format!(
        "dask: {{command: {}}}\ncluster: {{max_clusters_per_user: 1}}\nstop_clusters_on_shutdown: true\n",
        script.display()
    ))
    .await;
    let c = gw.client();
    let create = |user: &str| {
        c.post(gw.url("/api/v1/clusters/"))
            .header("Authorization", basic(user, ""))
            .json(&json!({}))
    };
    assert_eq!(create("alice").send().await.unwrap().status(), 201);
    let r = create("alice").send().await.unwrap();
    assert_eq!(r.status(), 422);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("maximum per user is 1"),
        "{e}"
    );
    // Another user has a quota of their own.
    assert_eq!(create("bob").send().await.unwrap().status(), 201);
    let listed: Value = gw
        .get("/api/v1/clusters/", &basic("alice", ""))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed.as_object().unwrap().len(), 1);
    gw.shutdown().await;
    let _ = std::fs::remove_file(script);
}

#[tokio::test]
async fn a_trickled_request_body_times_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = start_tweaked(CONFIG, |c| c.request_timeout = 1.0).await;
    let addr = gw.base.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let auth = basic("alice", "pw");
    let head = format!(
        "POST /api/v1/clusters/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // Never send the rest of the body: the request must be answered 408, not held forever.
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    // Nothing was created.
    let listed: Value = gw
        .get("/api/v1/clusters/?status=pending,running,failed", &auth)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed, json!({}));
    gw.shutdown().await;
}

/// Lists every cluster of `auth`'s user, whatever its status.
async fn all_clusters(gw: &Gateway, auth: &str) -> Value {
    gw.get(
        "/api/v1/clusters/?status=pending,running,stopping,stopped,failed",
        auth,
    )
    .await
    .json()
    .await
    .unwrap()
}

#[tokio::test]
async fn cross_site_writes_are_refused_and_change_nothing() {
    let gw = start(CONFIG).await;
    let c = gw.client();
    let auth = basic("alice", "pw");
    let own_origin = gw.base.clone();
    // Bodies a browser sends cross-site without a preflight: refused with 415.
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        for path in [
            "/api/v1/clusters/",
            "/api/v1/clusters/nope/scale",
            "/api/v1/clusters/nope/adapt",
            "/api/v1/clusters/nope/heartbeat",
        ] {
            let mut req = c
                .post(gw.url(path))
                .header("Authorization", &auth)
                .body(r#"{"count": 1, "cluster_options": {}}"#);
            if let Some(ct) = content_type {
                req = req.header("Content-Type", ct);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 415, "{path} {content_type:?}");
            let e: Value = r.json().await.unwrap();
            assert!(e["error"].as_str().unwrap().contains("application/json"));
        }
    }
    // A JSON content type with parameters is JSON.
    let r = c
        .post(gw.url("/api/v1/clusters/nope/scale"))
        .header("Authorization", &auth)
        .header("Content-Type", "Application/JSON; charset=utf-8")
        .body(r#"{"count": 1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "past the guard, the cluster does not exist"
    );
    // Another origin (or a sandboxed page's "null") may not write, even with credentials.
    for origin in [
        "http://evil.example",
        "null",
        "http://127.0.0.1",
        "https://127.0.0.1:1",
    ] {
        let r = c
            .post(gw.url("/api/v1/clusters/"))
            .header("Authorization", &auth)
            .header("Origin", origin)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{origin}");
        let r = c
            .delete(gw.url("/api/v1/clusters/nope"))
            .header("Authorization", &auth)
            .header("Origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{origin}");
    }
    assert_eq!(
        all_clusters(&gw, &auth).await,
        json!({}),
        "nothing was created"
    );
    // The gateway's own origin may (a page served by the gateway itself).
    let r = c
        .post(gw.url("/api/v1/clusters/nope/scale"))
        .header("Authorization", &auth)
        .header("Origin", &own_origin)
        .json(&json!({"count": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Reads are not affected by Origin (the browser keeps their answers from other origins).
    let r = c
        .get(gw.url("/api/v1/clusters/"))
        .header("Authorization", &auth)
        .header("Origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    gw.shutdown().await;
}

#[tokio::test]
async fn session_cookies_are_http_only_same_site_and_secure_over_https() {
    let gw = start(CONFIG).await;
    let c = gw.client();
    let r = gw.get("/api/v1/clusters/", &basic("alice", "pw")).await;
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.ends_with("; Path=/; HttpOnly; SameSite=Lax"),
        "{cookie}"
    );
    let r = c
        .get(gw.url("/api/v1/clusters/"))
        .header("Authorization", basic("bob", "pw"))
        .header("X-Forwarded-Proto", "https")
        .send()
        .await
        .unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.ends_with("; HttpOnly; SameSite=Lax; Secure"),
        "{cookie}"
    );
    // UTF-8 user names (browsers, curl) are read as UTF-8.
    let r = gw.get("/api/v1/clusters/", &basic("zoë", "pw")).await;
    assert_eq!(r.status(), 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn metrics_can_require_a_token_or_move_to_their_own_address() {
    let dir = std::env::temp_dir().join(format!("dgrs-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let gw = start(&format!(
        "{CONFIG}\nmetrics: {{token_file: {}}}\n",
        token_file.display()
    ))
    .await;
    let c = gw.client();
    let r = c.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    for bad in ["Bearer nope", "Basic s3cret", "Bearer "] {
        let r = c
            .get(gw.url("/metrics"))
            .header("Authorization", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{bad}");
    }
    let r = c
        .get(gw.url("/metrics"))
        .header("Authorization", "Bearer s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("# TYPE"));
    gw.shutdown().await;

    let port = free_port();
    let gw = start(&format!(
        "{CONFIG}\nmetrics: {{address: 127.0.0.1:{port}}}\n"
    ))
    .await;
    let r = c.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404, "not on the public port");
    let r = c
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("http://127.0.0.1:{port}/api/v1/clusters/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "only metrics and health there");
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
