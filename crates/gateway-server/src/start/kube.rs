//! Starting on Kubernetes: the client and namespace, what the pods need from the gateway's own
//! configuration, and the controller-only role ([`run_controller`]) with its own small
//! metrics-and-health server.

use super::StartError;
use crate::config::{CheckedConfig, GatewayConfig};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::info;

/// How the gateway reaches Kubernetes: a client from `KUBECONFIG` (or `~/.kube/config`) or the
/// in-cluster service account (over HTTP/2 where the API server offers it), the configuration
/// it was made from, and the namespace to manage (configured, else the client's default).
pub(crate) struct KubeAccess {
    /// The gateway's client.
    pub(crate) client: kube::Client,
    /// What the client was made from: the controller's thread makes its own from it.
    pub(crate) config: kube::Config,
    /// The namespace of the DaskClusters and their pods.
    pub(crate) namespace: String,
}

/// Finds the Kubernetes configuration and makes the gateway's client (see [`KubeAccess`]).
pub(crate) async fn kube_access(config: &GatewayConfig) -> Result<KubeAccess, StartError> {
    let kube_config = kube::Config::infer()
        .await
        .map_err(|e| StartError::Kube(gateway_kube::client::ClientError::from(e).to_string()))?;
    let client = kube_client(kube_config.clone())?;
    let namespace = config
        .kubernetes
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    Ok(KubeAccess {
        client,
        config: kube_config,
        namespace,
    })
}

/// A client for `config`; it must be made on the runtime that will use it, whose tasks carry
/// its connections.
fn kube_client(config: kube::Config) -> Result<kube::Client, StartError> {
    gateway_kube::client::from_config(config).map_err(|e| StartError::Kube(e.to_string()))
}

/// The DaskCluster controller running on its own thread (see [`spawn_controller`]).
pub(crate) struct ControllerThread(Option<tokio::sync::oneshot::Receiver<Result<(), String>>>);

impl ControllerThread {
    /// Resolves when the controller has stopped: `Ok` if it ended without an error, else
    /// why it ended. Never resolves a second time.
    pub(crate) async fn ended(&mut self) -> Result<(), String> {
        let Some(done) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        let result = done.await;
        self.0 = None;
        result.unwrap_or_else(|_| Err("its thread panicked".to_string()))
    }

    /// Waits, at most `limit`, until the controller has stopped and its thread has ended.
    pub(crate) async fn join(self, limit: Duration) {
        if let Some(done) = self.0 {
            let _ = tokio::time::timeout(limit, done).await;
        }
    }
}

/// Starts the DaskCluster controller of an embedded gateway on a thread of its own, with a
/// single-threaded runtime and a client (so connections) of its own, until `shutdown` resolves.
///
/// The controller's work is many small wake-ups and little work each: a 100-worker scale-up
/// brings about 500 pod changes through its watches. On the gateway's multi-threaded runtime
/// they are shared out between threads (a connection read on one, the watch's reader woken on
/// another); on one thread, whose runtime also drives the controller's connections, an event
/// is read, cached and acted on where it arrived. Measured on `tests/kube-env` (12 scale-ups
/// each, `docs/benchmarks.md`): 0.11 s of CPU per 100-worker scale-up instead of 0.135 s. The
/// API, the proxy and the gateway's own watches keep the multi-threaded runtime.
///
/// The controller runs until `shutdown` resolves; [`ControllerThread::ended`] says when and why
/// it ended sooner (a missing CRD, an RBAC refusal), which stops the gateway too.
pub(crate) fn spawn_controller(
    kube_config: kube::Config,
    settings: gateway_kube::KubeConfig,
    namespace: String,
    live: gateway_kube::LiveContext,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<ControllerThread> {
    let (done, joined) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("dask-controller".into())
        .spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => {
                    let result = runtime.block_on(async move {
                        let client = kube_client(kube_config)?;
                        gateway_kube::run_controller(client, settings, namespace, live, shutdown)
                            .await?;
                        Ok::<(), StartError>(())
                    });
                    // Its tasks (watches, connections) end with the runtime, before `done`.
                    drop(runtime);
                    result.map_err(|e| e.to_string())
                }
                Err(e) => Err(format!("it could not start its runtime: {e}")),
            };
            let _ = done.send(result);
        })?;
    Ok(ControllerThread(Some(joined)))
}

/// What pods need from the gateway's own configuration, and which clusters go with the
/// installation (its owner object is looked up by the caller, see
/// [`gateway_kube::installation_owner`]).
pub(crate) fn gateway_runtime(config: &GatewayConfig) -> gateway_kube::GatewayRuntime {
    gateway_kube::GatewayRuntime {
        api_url: config.api_url(),
        timing: config.cluster.timing(),
        installation_owner: None,
        clusters_go_with_installation: config.stop_clusters_on_shutdown,
    }
}

/// Runs only the DaskCluster controller (no API, no proxy) until `shutdown` resolves; metrics
/// and health on `address` (`/metrics`, `/api/health`).
pub async fn run_controller(
    config: CheckedConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let KubeAccess {
        client, namespace, ..
    } = kube_access(&config).await?;
    let live: gateway_kube::LiveContext = Default::default();
    let listener = TcpListener::bind(config.address)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.address,
            source,
        })?;
    let mut registry = gateway_backend::metrics::registry();
    live.register_metrics(&mut registry);
    let registry = Arc::new(registry);
    let app = axum::Router::new()
        .route(
            "/api/health",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "pass"})) }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let text = gateway_backend::metrics::render(&registry);
                async move { crate::metrics::response(text) }
            }),
        );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(async move {
        let mut rx = stop_rx;
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.wait_for(|v| *v).await;
            })
            .await;
    });
    info!(namespace = %namespace, address = %config.address, "controller only: metrics and health listening");
    let result =
        gateway_kube::run_controller(client, config.kubernetes.clone(), namespace, live, shutdown)
            .await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An API server on 127.0.0.1 that answers every request `404 Not Found` (as one without
    /// the DaskCluster CRD answers its listing), and its URL.
    async fn api_server_without_the_crd() -> String {
        let app = axum::Router::new().fallback(|| async {
            (
                http::StatusCode::NOT_FOUND,
                axum::Json(serde_json::json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "NotFound", "message": "the server could not find the requested resource",
                    "code": 404,
                })),
            )
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    /// A controller that cannot run ends its thread, and the gateway learns why (it then stops
    /// too, rather than take clusters nobody would start).
    #[tokio::test]
    async fn a_controller_that_cannot_run_says_why_it_ended() {
        let url = api_server_without_the_crd().await;
        let config = kube::Config::new(url.parse().unwrap());
        let mut thread = spawn_controller(
            config,
            gateway_kube::KubeConfig::default(),
            "dask".into(),
            Default::default(),
            std::future::pending(),
        )
        .unwrap();
        let why = tokio::time::timeout(Duration::from_secs(10), thread.ended())
            .await
            .expect("the controller's thread did not end")
            .unwrap_err();
        assert!(
            why.contains("CRD") && why.contains("is not installed"),
            "{why}"
        );
        // Joining an ended thread returns at once.
        tokio::time::timeout(Duration::from_secs(1), thread.join(Duration::from_secs(5)))
            .await
            .unwrap();
    }

    /// A running controller has not ended; told to stop, it stops and its thread ends.
    #[tokio::test]
    async fn a_controller_told_to_stop_ends_its_thread() {
        // Nothing listens here: the controller waits out the failed check until told to stop.
        let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", unused.local_addr().unwrap());
        drop(unused);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut thread = spawn_controller(
            kube::Config::new(url.parse().unwrap()),
            gateway_kube::KubeConfig::default(),
            "dask".into(),
            Default::default(),
            async {
                let _ = stopped.await;
            },
        )
        .unwrap();
        let early = tokio::time::timeout(Duration::from_millis(1500), thread.ended()).await;
        assert!(early.is_err(), "the controller ended by itself: {early:?}");
        stop.send(()).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), thread.ended())
            .await
            .expect("the controller's thread did not end when told to stop");
        assert_eq!(ended, Ok(()));
    }
}
