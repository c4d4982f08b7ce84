//! Starting on Kubernetes: the client and namespace, what the pods need from the gateway's own
//! configuration, and the controller-only role ([`run_controller`]) with its own small
//! metrics-and-health server.

use super::StartError;
use crate::config::{CheckedConfig, GatewayConfig};
use std::sync::Arc;
use tokio::net::TcpListener;
use tracing::info;

/// A Kubernetes client from `KUBECONFIG` (or `~/.kube/config`) or the in-cluster service
/// account (over HTTP/2 where the API server offers it), and the namespace to manage (configured, else the client's default).
pub(crate) async fn kube_client(
    config: &GatewayConfig,
) -> Result<(kube::Client, String), StartError> {
    let client = gateway_kube::client::client()
        .await
        .map_err(|e| StartError::Kube(e.to_string()))?;
    let namespace = config
        .kubernetes
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    Ok((client, namespace))
}

/// What pods need from the gateway's own configuration.
pub(crate) fn gateway_runtime(config: &GatewayConfig) -> gateway_kube::GatewayRuntime {
    gateway_kube::GatewayRuntime {
        api_url: config.api_url(),
        timing: config.cluster.timing(),
    }
}

/// Runs only the DaskCluster controller (no API, no proxy) until `shutdown` resolves; metrics
/// and health on `address` (`/metrics`, `/api/health`).
pub async fn run_controller(
    config: CheckedConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let (client, namespace) = kube_client(&config).await?;
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
