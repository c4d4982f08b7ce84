//! The Dask Gateway server: configuration, REST API, authentication, the cluster manager,
//! its SQLite state store, and the wiring that puts them behind the public proxy.
//!
//! The binary `gateway-server` calls [`run`]; tests can do the same in-process.

#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod cluster_settings;
pub mod config;
pub mod manager;
pub mod store;

use crate::api::AppState;
use crate::auth::Authenticator;
use crate::config::GatewayConfig;
use crate::manager::Manager;
use crate::store::Store;
use gateway_local::{LocalBackend, LocalConfig};
use gateway_proxy::{HttpForwarder, RouteTable};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory is unusable.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another gateway already uses this data directory.
    #[error("another gateway-server is already using the data directory {0}")]
    Locked(std::path::PathBuf),
    /// The state database failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Re-adopting stored clusters failed.
    #[error("recovering clusters: {0}")]
    Recover(String),
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
}

/// Takes an exclusive `flock` on `<data_dir>/gateway.lock` for the life of the process.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, StartError> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join("gateway.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StartError::DataDir {
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(StartError::Locked(dir.to_path_buf()));
    }
    Ok(file)
}

/// Runs the gateway until `shutdown` resolves.
pub async fn run(
    config: GatewayConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let config = Arc::new(config);
    let data_dir = config.data_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&data_dir)
        .map_err(|source| StartError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
    let _lock = lock_data_dir(&data_dir)?;
    let store = Store::open(&data_dir.join("gateway.sqlite"))?;

    let (dask_command, path_prefix) = config.dask.command_and_path();
    let (exit_tx, mut exit_rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = LocalBackend::new(
        LocalConfig {
            work_root: data_dir.join("clusters"),
            dask_command,
            path_prefix,
            api_url: config.api_url(),
            bind_host: "127.0.0.1".into(),
            heartbeat_period: config.cluster.heartbeat_period,
            adaptive_period: config.cluster.adaptive_period,
        },
        exit_tx,
    );
    let routes = RouteTable::new();
    let manager = Manager::new(config.clone(), store, backend, routes.clone());
    manager
        .recover()
        .map_err(|e| StartError::Recover(e.to_string()))?;

    let http_tls = match &config.tls {
        Some(t) => Some(gateway_proxy::load_server_tls(&t.cert, &t.key)?),
        None => None,
    };
    let public = TcpListener::bind(config.address)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.address,
            source,
        })?;
    let scheduler_listener = match config.scheduler_address {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };

    // Process exits and the periodic tick.
    let m = manager.clone();
    tokio::spawn(async move {
        while let Some(exit) = exit_rx.recv().await {
            m.on_exit(exit);
        }
    });
    let m = manager.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            m.tick();
        }
    });

    let state = AppState {
        manager: manager.clone(),
        auth: Arc::new(Authenticator::new(&config.auth)),
        routes: routes.clone(),
        forwarder: HttpForwarder::new(),
        dashboard_auth: config.dashboard_auth,
        request_timeout: Duration::from_secs_f64(config.request_timeout),
    };
    let app = api::router(state, &config.prefix());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let mut servers = Vec::new();
    if let Some(listener) = scheduler_listener {
        info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "scheduler TLS port listening");
        servers.push(tokio::spawn(gateway_proxy::serve_scheduler(
            listener,
            routes.clone(),
            stopped(stop_rx.clone()),
        )));
    }
    info!(
        address = %public.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        data_dir = %data_dir.display(),
        api_url = %config.api_url(),
        "gateway listening"
    );
    servers.push(tokio::spawn(gateway_proxy::serve_shared(
        public,
        routes,
        app,
        http_tls,
        stopped(stop_rx),
    )));

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    if config.stop_clusters_on_shutdown {
        manager.stop_all("the gateway shut down").await;
    } else {
        warn!("leaving clusters running; a restarted gateway re-adopts them (stop_clusters_on_shutdown: false)");
    }
    for s in servers {
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    Ok(())
}
