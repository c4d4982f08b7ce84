//! Starting the gateway's parts: why a start can fail ([`StartError`]), the proxy's routes over
//! the backend ([`BackendRoutes`]), and one file per backend with what it takes to start it
//! ([`local`], [`kube`]). The order of the wiring itself is [`crate::run`].

pub mod kube;
pub mod local;

use gateway_backend::ClusterBackend;
use gateway_proxy::{ClientConnections, ClusterRoute, RouteFuture, RouteSource};
use std::sync::Arc;
use std::time::Duration;

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
    /// The operating system would not start the controller's thread.
    #[error("starting the DaskCluster controller's thread: {0}")]
    ControllerThread(#[source] std::io::Error),
    /// The embedded controller stopped before the gateway was told to (its error, or why).
    #[error("the DaskCluster controller stopped: {0}")]
    ControllerStopped(String),
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

    /// Waits while the backend has the cluster PENDING ([`ClusterBackend::route_soon`]): this
    /// replica may learn that it runs a moment after the replica that answered the user's
    /// `?wait` did.
    fn route_soon<'a>(&'a self, cluster: &'a str, within: Duration) -> RouteFuture<'a> {
        Box::pin(async move {
            let a = self.0.route_soon(cluster, within).await?;
            Some(ClusterRoute::new(a.scheduler, a.dashboard))
        })
    }

    fn connections(&self) -> Option<&Arc<ClientConnections>> {
        Some(&self.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_backend::fake::FakeBackend;
    use gateway_backend::{ClusterSettings, NewCluster, SchedulerAddresses};

    fn addresses() -> SchedulerAddresses {
        SchedulerAddresses {
            scheduler: "tls://10.0.0.1:8786".into(),
            dashboard: None,
            api: "http://10.0.0.1:8788".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_scheduler_connection_waits_for_a_starting_cluster_not_for_an_unknown_one() {
        let backend = Arc::new(FakeBackend::new());
        let routes = BackendRoutes(backend.clone(), Arc::new(ClientConnections::default()));
        let new = || NewCluster::owned("alice", Default::default(), ClusterSettings::example());
        let wait = Duration::from_secs(3);

        // Unknown here: closed at once (paused time would have jumped the whole wait).
        let t = tokio::time::Instant::now();
        assert_eq!(routes.route_soon("nope", wait).await, None);
        assert_eq!(t.elapsed(), Duration::ZERO);

        // Starting here (running already, as another replica may have told its user): the
        // connection goes through as soon as this replica hears that it runs.
        let starting = backend.create(new()).await.unwrap();
        let t = tokio::time::Instant::now();
        let (route, ()) = tokio::join!(routes.route_soon(&starting.name, wait), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            backend.make_running(&starting.name, addresses());
        });
        assert_eq!(route.map(|r| r.scheduler).as_deref(), Some("10.0.0.1:8786"));
        assert_eq!(t.elapsed(), Duration::from_millis(200));

        // Still starting when the wait is over: closed then.
        let slow = backend.create(new()).await.unwrap();
        let t = tokio::time::Instant::now();
        assert_eq!(routes.route_soon(&slow.name, wait).await, None);
        assert_eq!(t.elapsed(), wait);
    }
}
