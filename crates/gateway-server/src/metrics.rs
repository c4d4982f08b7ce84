//! `/metrics`: the gateway's one registry ([`gateway_backend::metrics`]), filled once at start-up
//! by the cluster service and its backend, the in-process controller if any, and the usage
//! counters, and encoded once per scrape.

use crate::clusters::ClusterService;
use crate::usage::{self, UsageCache};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use gateway_backend::metrics::{self, Registry};
use gateway_backend::ClusterBackend;
use std::sync::Arc;

/// The registry `/metrics` encodes, and the usage it reads before each scrape.
pub struct GatewayMetrics {
    registry: Registry,
    usage: Arc<UsageCache>,
    backend: Arc<dyn ClusterBackend>,
}

impl GatewayMetrics {
    /// The families of `clusters` (its own and its backend's) and the usage counters, read
    /// through `usage` and labelled by user and group when `usage_by_user`.
    pub fn new(
        clusters: &Arc<ClusterService>,
        usage: Arc<UsageCache>,
        usage_by_user: bool,
    ) -> Self {
        let mut registry = metrics::registry();
        clusters.register_metrics(&mut registry);
        usage::register_metrics(&mut registry, usage.clone(), usage_by_user);
        GatewayMetrics {
            registry,
            usage,
            backend: clusters.backend().clone(),
        }
    }

    /// With more families, registered by `register` (the in-process controller's).
    pub fn with(mut self, register: impl FnOnce(&mut Registry)) -> Self {
        register(&mut self.registry);
        self
    }

    /// One scrape's text: reads the usage (at most once per [`usage::METRICS_USAGE_TTL`];
    /// without the usage families if that fails), then encodes the registry.
    pub async fn render(&self) -> Result<String, std::fmt::Error> {
        let backend = &self.backend;
        if let Err(e) = self.usage.get(|now| backend.usage(None, 0, now)).await {
            tracing::warn!("reading usage for /metrics: {e}");
        }
        metrics::render(&self.registry)
    }

    /// One scrape as the `/metrics` response (see [`response`]).
    pub async fn response(&self) -> Response {
        response(self.render().await)
    }
}

/// A scrape's text as the `/metrics` response, with the OpenMetrics content type; a 500 if a
/// collector failed.
pub fn response(text: Result<String, std::fmt::Error>) -> Response {
    match text {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => {
            tracing::error!("encoding /metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
