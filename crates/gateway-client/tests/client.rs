//! The client library against a real gateway (in-process, local backend) running real Dask
//! schedulers and workers from the test environment (`tests/env/python-venv`).
//!
//! A recording relay sits between client and gateway so the tests see what the client sends:
//! no credentials at first, credentials after the 401 challenge, then only the cookie.

use gateway_client::{
    Auth, ClientConfig, ClientError, ClusterStatus, GatewayClient, SchedulerIdentity,
};
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Python environment with dask, distributed and dask-gateway (created on first use).
fn python_env() -> String {
    let out = std::process::Command::new(repo().join("tests/env/python-venv"))
        .output()
        .expect("tests/env/python-venv runs");
    assert!(out.status.success(), "python-venv failed: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string()
}

/// A free port that no other test of this process has been given. A port from `bind(0)` is
/// free again as soon as it is returned, and the kernel may hand the same one to a test running
/// alongside: two gateways would then share an address (and a data directory) and one of them
/// would fail to start.
fn free_port() -> u16 {
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
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

struct Gateway {
    port: u16,
    dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), gateway_server::StartError>>,
}

impl Gateway {
    async fn start(extra: &str) -> Gateway {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("dgrs-client-test-{}-{port}", std::process::id()));
        let yaml = format!(
            "address: 127.0.0.1:{port}\ndata_dir: {}\nauth: {{password: pw, admin_users: [root]}}\n\
             stop_clusters_on_shutdown: true\ndask: {{python_env: {}}}\n\
             cluster:\n  heartbeat_period: 1\n  adaptive_period: 1\n  worker_memory: 512M\n  \
             options:\n    - {{field: worker_cores, type: int, default: 1, min: 1, max: 2, target: worker_cores}}\n    \
             - {{field: colour, type: select, default: red, options: [red, blue]}}\n{extra}",
            dir.display(),
            python_env()
        );
        let config: gateway_server::config::GatewayConfig = serde_yaml::from_str(&yaml).unwrap();
        let config = config.check().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut task = tokio::spawn(gateway_server::run(config, async move {
            let _ = rx.await;
        }));
        let started = tokio::time::timeout(Duration::from_secs(30), async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
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
        assert!(started.is_ok(), "the gateway did not listen within 30 s");
        Gateway {
            port,
            dir,
            stop: Some(tx),
            task,
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `(Authorization, Cookie)` of every request seen.
type Seen = Arc<Mutex<Vec<(Option<String>, Option<String>)>>>;

/// Relays TCP to the gateway and records the `Authorization` and `Cookie` headers of each
/// request (one request per connection read; the client reuses connections, so each read of
/// a request head is parsed).
struct Recorder {
    port: u16,
    seen: Seen,
}

impl Recorder {
    async fn start(target: u16) -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Seen = Arc::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let mut server = tokio::net::TcpStream::connect(("127.0.0.1", target))
                        .await
                        .unwrap();
                    let (mut cr, mut cw) = client.split();
                    let (mut sr, mut sw) = server.split();
                    let up = async {
                        let mut buf = vec![0u8; 65536];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let text = String::from_utf8_lossy(&buf[..n]).to_string();
                            if text.starts_with("GET ")
                                || text.starts_with("POST ")
                                || text.starts_with("DELETE ")
                            {
                                let header = |name: &str| {
                                    text.lines()
                                        .find(|l| l.to_ascii_lowercase().starts_with(name))
                                        .map(|l| l.split_once(':').unwrap().1.trim().to_string())
                                };
                                seen.lock()
                                    .unwrap()
                                    .push((header("authorization:"), header("cookie:")));
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Recorder { port, seen }
    }
}

fn client(port: u16, user: &str, password: &str) -> GatewayClient {
    let mut c = ClientConfig::new(format!("http://127.0.0.1:{port}"));
    c.auth = Auth::Basic {
        username: user.into(),
        password: password.into(),
    };
    GatewayClient::new(c).unwrap()
}

async fn wait_workers(c: &GatewayClient, name: &str, n: usize) -> SchedulerIdentity {
    for _ in 0..240 {
        let id = c.scheduler_identity(name).await.unwrap();
        if id.workers.len() == n {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("cluster {name} never had {n} workers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_against_a_real_gateway_and_dask() {
    let gw = Gateway::start("").await;
    let recorder = Recorder::start(gw.port).await;
    let alice = client(recorder.port, "alice", "pw");

    // 401 challenge, then credentials, then the cookie alone.
    assert!(!alice.version().await.unwrap().is_empty());
    let options = alice.options().await.unwrap();
    assert_eq!(
        options.iter().map(|o| o.field.as_str()).collect::<Vec<_>>(),
        ["worker_cores", "colour"]
    );
    assert_eq!(options[1].spec["options"], json!(["red", "blue"]));
    assert!(alice.list(&[]).await.unwrap().is_empty());
    assert!(alice.list(&[]).await.unwrap().is_empty());
    {
        let seen = recorder.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 5, "{seen:?}");
        assert_eq!(seen[0], (None, None), "version is public: {seen:?}");
        assert_eq!(
            seen[1],
            (None, None),
            "no credentials before the challenge: {seen:?}"
        );
        assert!(
            seen[2].0.as_deref().unwrap().starts_with("Basic "),
            "{seen:?}"
        );
        for later in &seen[3..] {
            assert!(
                later.0.is_none() && later.1.is_some(),
                "then the cookie alone: {seen:?}"
            );
        }
    }

    // Create with options; wait; the model is typed.
    let mut opts = Map::new();
    opts.insert("worker_cores".into(), json!(2));
    opts.insert("colour".into(), json!("blue"));
    let name = alice.create(opts).await.unwrap();
    let running = alice
        .wait_until_running(&name, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(running.status, ClusterStatus::Running);
    assert_eq!(running.options["colour"], json!("blue"));
    assert!(running.tls_cert.is_some() && running.tls_key.is_some());
    assert_eq!(
        alice.dashboard_url(&running).unwrap(),
        format!("http://127.0.0.1:{}/clusters/{name}/status", recorder.port)
    );
    let listed = alice.list(&[ClusterStatus::Running]).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(alice
        .list(&[ClusterStatus::Stopped])
        .await
        .unwrap()
        .is_empty());

    // Scale, and see the workers through the proxy with the identity exchange.
    let r = alice.scale(&name, 2).await.unwrap();
    assert!(r.ok && r.msg.is_none());
    let id = wait_workers(&alice, &name, 2).await;
    assert!(!id.id.is_empty() && id.address.starts_with("tls://"));
    assert_eq!(id.threads(), 4, "2 workers with worker_cores=2: {id:?}");
    assert_eq!(id.memory(), 2 * 512 * 1024 * 1024);
    // Adapt down to exactly one.
    let r = alice.adapt(&name, Some(1), Some(1)).await.unwrap();
    assert!(r.ok);
    wait_workers(&alice, &name, 1).await;
    // Bad bounds and unknown clusters are typed errors.
    assert!(matches!(
        alice.adapt(&name, Some(3), Some(1)).await,
        Err(ClientError::Invalid(_))
    ));
    assert!(matches!(
        alice.get("nope").await,
        Err(ClientError::NotFound(_))
    ));
    assert!(matches!(
        alice.scale("nope", 1).await,
        Err(ClientError::NotFound(_))
    ));
    assert!(matches!(
        alice.get("../etc").await,
        Err(ClientError::Invalid(_))
    ));
    let mut bad = Map::new();
    bad.insert("colour".into(), json!("green"));
    assert!(matches!(alice.create(bad).await, Err(ClientError::Invalid(m)) if m.contains("green")));

    // Another user sees nothing and cannot act; an admin sees it and whose it is.
    let bob = client(gw.port, "bob", "pw");
    assert!(bob.list(&[]).await.unwrap().is_empty());
    assert!(matches!(
        bob.get(&name).await,
        Err(ClientError::Forbidden(_))
    ));
    let root = client(gw.port, "root", "pw");
    assert_eq!(root.list(&[]).await.unwrap().len(), 1);
    // Admins see whose it is; others cannot read the details.
    let details = root.list_details(&[]).await.unwrap();
    assert_eq!(details.len(), 1);
    assert_eq!(details[0].owner, "alice");
    assert_eq!(root.details(&name).await.unwrap().owner, "alice");
    assert!(matches!(
        bob.details(&name).await,
        Err(ClientError::Forbidden(_))
    ));
    // Wrong password.
    let mallory = client(gw.port, "alice", "wrong");
    assert!(matches!(
        mallory.list(&[]).await,
        Err(ClientError::Unauthorized(_))
    ));
    // Bob cannot get the credentials to reach the scheduler.
    assert!(matches!(
        bob.scheduler_identity(&name).await,
        Err(ClientError::Forbidden(_))
    ));

    // Stop; waiting on a stopped cluster reports it.
    alice.stop(&name).await.unwrap();
    let stopped = alice.get(&name).await.unwrap();
    assert!(matches!(
        stopped.status,
        ClusterStatus::Stopping | ClusterStatus::Stopped
    ));
    assert!(matches!(
        alice
            .wait_until_running(&name, Duration::from_secs(10))
            .await,
        Err(ClientError::ClusterEnded { .. })
    ));
    assert!(matches!(
        alice.scheduler_identity(&name).await,
        Err(ClientError::Conflict(_))
    ));
    gw.shutdown().await;
}

#[tokio::test]
async fn unreachable_gateways_and_bad_addresses_are_clear_errors() {
    let c = client(free_port(), "alice", "");
    assert!(matches!(
        c.list(&[]).await,
        Err(ClientError::Connect { .. })
    ));
    let e = GatewayClient::new(ClientConfig::new("127.0.0.1:1")).unwrap_err();
    assert!(matches!(e, ClientError::Config(_)));
    let tls = gateway_client::ClusterTls::from_pem("nope", "nope").map_err(ClientError::from);
    assert!(matches!(tls, Err(ClientError::Protocol(_))));
    let _ = Value::Null;
}
