//! Starting the gateway's parts: why a start can fail ([`StartError`]), the proxy's routes over
//! the backend ([`BackendRoutes`]), and one file per backend with what it takes to start it
//! ([`local`], [`kube`]). The order of the wiring itself is [`crate::run`].

pub mod kube;
pub mod local;

use gateway_backend::ClusterBackend;
use gateway_proxy::{ClientConnections, ClusterRoute, RouteSource};
use std::sync::Arc;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The local backend could not start: its data directory, user isolation, its database.
    #[error(transparent)]
    Local(#[from] gateway_local::SetupError),
    /// A listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTPS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] gateway_proxy::ProxyError),
    /// No Kubernetes configuration (neither `KUBECONFIG`/`~/.kube/config` nor in-cluster).
    #[error("connecting to Kubernetes: {0}")]
    Kube(String),
    /// User isolation cannot work as configured.
    #[error("{0}")]
    Isolation(String),
    /// The configured authentication method (JWT, JupyterHub, Kerberos) cannot start.
    #[error(transparent)]
    Auth(#[from] crate::auth::SetupError),
    /// A secret named by the configuration could not be read.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// DaskClusters cannot be used: the CRD is missing, or RBAC refuses.
    #[error(transparent)]
    Controller(#[from] gateway_kube::ControllerError),
    /// The session key the replicas share could not be read or made.
    #[error(transparent)]
    SessionKey(#[from] gateway_kube::SessionKeyError),
}

/// The proxy's routes, straight from the backend: a cluster is routable exactly while the
/// backend reports it RUNNING.
pub(crate) struct BackendRoutes(
    pub(crate) Arc<dyn ClusterBackend>,
    pub(crate) Arc<ClientConnections>,
);

impl RouteSource for BackendRoutes {
    fn route(&self, cluster: &str) -> Option<ClusterRoute> {
        self.0
            .route(cluster)
            .map(|a| ClusterRoute::new(a.scheduler, a.dashboard))
    }

    fn connections(&self) -> Option<&Arc<ClientConnections>> {
        Some(&self.1)
    }
}
