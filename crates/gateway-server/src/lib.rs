//! The Dask Gateway server: configuration, REST API, authentication, the rules shared by every
//! backend ([`clusters`]), and the wiring that puts a backend behind the public proxy.
//!
//! The binary `gateway-server` calls [`run`]; tests can do the same in-process.

#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod clock;
pub mod clusters;
pub mod config;
pub mod http_shared;
pub mod metrics;
pub mod openapi;
mod start;
pub mod usage;
pub mod web;

pub use start::kube::run_controller;
pub use start::StartError;

use crate::api::{AppState, AppStateFields};
use crate::auth::Authenticator;
use crate::clusters::ClusterService;
use crate::config::{BackendKind, CheckedConfig};
use gateway_backend::ClusterBackend;
use gateway_proxy::{ClientConnections, RouteSource};
use start::kube::{gateway_runtime, kube_access, spawn_controller, KubeAccess};
use start::local::start_local_backend;
use start::BackendRoutes;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// How often the gateway checks clusters against their maximum lifetime and no-client timeout.
const LIFETIME_SWEEP: Duration = Duration::from_secs(1);

/// Runs the gateway until `shutdown` resolves.
pub async fn run(
    config: CheckedConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    for exposure in config.exposures() {
        warn!("insecure setting: {exposure}");
    }
    let metrics_token = config.metrics.token()?;
    // Every connection costs descriptors: use all the process may have, and hold no more
    // connections than they allow (see gateway_proxy::ConnectionLimit).
    let open_files = gateway_proxy::raise_open_file_limit().unwrap_or_else(|e| {
        warn!("reading the open-file limit: {e}");
        1024
    });
    let connection_limit = match config.max_connections {
        Some(n) => gateway_proxy::ConnectionLimit::new(n),
        None => gateway_proxy::ConnectionLimit::for_open_files(open_files),
    };
    info!(
        open_files,
        max_connections = connection_limit.max(),
        "connection limit"
    );
    // Kubernetes: a client, and the CRD checked before anything is written.
    let kube = match config.backend {
        BackendKind::Kubernetes => {
            let access = kube_access(&config).await?;
            gateway_kube::check_crd(&access.client, &access.namespace)
                .await
                .map_err(gateway_kube::ControllerError::from)?;
            Some(access)
        }
        BackendKind::Local => None,
    };
    let mut auth_config = config.auth.clone();
    auth_config.cookie_secret = auth_config.resolve_cookie_secret()?;
    if auth_config.cookie_secret.is_none() {
        if let Some(KubeAccess {
            client, namespace, ..
        }) = &kube
        {
            let instance = &config.kubernetes.instance;
            auth_config.cookie_secret =
                Some(gateway_kube::shared_session_key(client, namespace, instance).await?);
            info!(secret = %gateway_kube::session_key::secret_name(instance), "session cookies signed with the key the replicas share");
        } else {
            info!("no session cookie secret: sessions last for this process only (set auth.cookie_secret_file or GATEWAY_COOKIE_SECRET to share them between restarts)");
        }
    }
    let authenticator = Authenticator::from_config(&auth_config, &config.prefix())
        .await?
        .with_relevant_groups(config.groups.iter().map(|g| g.group.clone()));
    let config = Arc::new(config);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let (controller_stop_tx, controller_stop_rx) = tokio::sync::watch::channel(false);
    let mut _data_dir_lock = None;
    let mut controller_live: Option<gateway_kube::LiveContext> = None;
    let mut controller_thread = None;
    // A Kubernetes client exists exactly when the backend is Kubernetes.
    let backend: Arc<dyn ClusterBackend> = match kube {
        None => {
            let (backend, lock) = start_local_backend(&config)?;
            _data_dir_lock = Some(lock);
            backend
        }
        Some(KubeAccess {
            client,
            config: kube_config,
            namespace,
        }) => {
            if config.kubernetes.controller {
                let live: gateway_kube::LiveContext = Default::default();
                controller_live = Some(live.clone());
                // Stopped last, after the backend's shutdown (which may need it to stop clusters).
                let stop = stopped(controller_stop_rx.clone());
                controller_thread = Some(
                    spawn_controller(
                        kube_config,
                        config.kubernetes.clone(),
                        namespace.clone(),
                        live,
                        stop,
                    )
                    .map_err(StartError::ControllerThread)?,
                );
            }
            info!(namespace = %namespace, instance = %config.kubernetes.instance, controller = config.kubernetes.controller, "kubernetes backend");
            let mut runtime = gateway_runtime(&config);
            runtime.installation_owner =
                gateway_kube::installation_owner(&client, &namespace, &config.kubernetes.instance)
                    .await;
            if runtime.installation_owner.is_none() {
                warn!(instance = %config.kubernetes.instance, "no controller Lease to hang warm schedulers on: removing the installation will leave them running");
            }
            gateway_kube::KubeBackend::start(client, config.kubernetes.clone(), namespace, runtime)
                .await
        }
    };
    let connections = Arc::new(ClientConnections::default());
    let routes: Arc<dyn RouteSource> =
        Arc::new(BackendRoutes(backend.clone(), connections.clone()));
    let policies = config.policies().to_vec();
    // Pool keys cover the backend's section: new pod templates or Python settings retire
    // the warm schedulers started under the old ones.
    let backend_config = match config.backend {
        BackendKind::Local => format!("{:?}", config.dask),
        BackendKind::Kubernetes => format!("{:?}", config.kubernetes),
    };
    let sections: Vec<_> = config.sections().collect();
    let pools = clusters::configured_pools(&sections, &backend_config)
        .map_err(crate::config::ConfigError::Invalid)?;
    for p in &pools {
        info!(pool = %p.key, source = %p.source, size = p.size, "warm schedulers configured");
    }
    let clusters = Arc::new(
        ClusterService::new(backend.clone(), Arc::new(config.cluster.clone()))
            .with_clock(crate::clock::Clock::system())
            .with_policies(policies)
            .with_pools(pools, backend_config)
            .with_activity(connections),
    );
    // Keeps the pools full (and trims them); also runs with no pool configured, to stop
    // the members a previous configuration left.
    let pool_keeper = {
        let clusters = clusters.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            loop {
                clusters.maintain_pools().await;
                tokio::select! {
                    _ = clusters.pool_check_due() => {}
                    _ = async { let _ = stop.wait_for(|v| *v).await; } => break,
                }
            }
        })
    };
    let sweeper = {
        let clusters = clusters.clone();
        every(LIFETIME_SWEEP, stop_rx.clone(), move || {
            let clusters = clusters.clone();
            async move { clusters.enforce_lifetimes().await }
        })
    };
    // While the listeners turn connections away, heartbeats cannot arrive: the backend is told,
    // so that it blames no scheduler for that silence.
    let reachability = {
        let backend = backend.clone();
        let limit = connection_limit.clone();
        let mut reachable = true;
        every(LIFETIME_SWEEP, stop_rx.clone(), move || {
            let now = !limit.take_turned_away();
            if now != reachable {
                if now {
                    info!(open = limit.open(), "taking connections again");
                } else {
                    warn!(open = limit.open(), max_connections = limit.max(), "turning connections away: the connection limit is reached, or the open-file limit");
                }
                reachable = now;
            }
            backend.set_reachable(now);
            std::future::ready(())
        })
    };
    // The idle backstop (clusters::idleness): its questions to schedulers take network time,
    // so it runs beside the lifetime sweeper, not in it.
    let idle_checker = {
        let clusters = clusters.clone();
        every(LIFETIME_SWEEP, stop_rx.clone(), move || {
            let clusters = clusters.clone();
            async move { clusters.check_idleness().await }
        })
    };

    let http_tls = match &config.tls {
        Some(t) => Some(gateway_proxy::load_server_tls(&t.cert, &t.key)?),
        None => None,
    };
    let public = gateway_proxy::bind(config.address)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.address,
            source,
        })?;
    let metrics_listener = match config.metrics.address {
        Some(addr) => Some(
            gateway_proxy::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };
    let scheduler_listener = match config.scheduler_address {
        Some(addr) => Some(
            gateway_proxy::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?,
        ),
        None => None,
    };

    let clusters_for_shutdown = clusters.clone();
    let metrics_usage = Arc::new(usage::UsageCache::new(
        clusters.clock(),
        usage::METRICS_USAGE_TTL,
    ));
    let metrics =
        metrics::GatewayMetrics::new(&clusters, metrics_usage, config.metrics.usage_by_user).with(
            |registry| {
                if let Some(live) = &controller_live {
                    live.register_metrics(registry);
                }
            },
        );
    let state = AppState::new(AppStateFields {
        dashboard_auth: config.dashboard_auth,
        dashboard_csp: Some(config.dashboard_csp.as_str())
            .filter(|csp| !csp.trim().is_empty())
            .and_then(|csp| http::HeaderValue::from_str(csp).ok()),
        metrics_token,
        metrics: Arc::new(metrics),
        request_timeout: Duration::from_secs_f64(config.request_timeout),
        hosts: host_rule(&config),
        ..AppStateFields::new(clusters, Arc::new(authenticator))
    });
    let app = api::router(state.clone(), &config.prefix(), metrics_listener.is_none());

    let mut servers = Vec::new();
    if let Some(listener) = metrics_listener {
        info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics listening");
        let app = api::metrics_router(state);
        let stop = stopped(stop_rx.clone());
        servers.push(tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await;
        }));
    }
    if let Some(listener) = scheduler_listener {
        info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "scheduler TLS port listening");
        servers.push(tokio::spawn(gateway_proxy::serve_scheduler(
            listener,
            routes.clone(),
            connection_limit.clone(),
            stopped(stop_rx.clone()),
        )));
    }
    info!(
        address = %public.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        backend = backend.kind(),
        api_url = %config.api_url(),
        "gateway listening"
    );
    servers.push(tokio::spawn(gateway_proxy::serve_shared(
        public,
        routes,
        app,
        http_tls,
        connection_limit,
        stopped(stop_rx),
    )));

    // The embedded controller runs until the end: if it stops first, so does the gateway
    // (with an error, so that it is restarted) rather than take clusters that never start.
    let controller_stopped = tokio::select! {
        () = shutdown => None,
        why = async {
            match controller_thread.as_mut() {
                Some(thread) => thread.ended().await.err().unwrap_or_else(|| "by itself".into()),
                None => std::future::pending().await,
            }
        } => Some(why),
    };
    if let Some(why) = &controller_stopped {
        error!("the DaskCluster controller stopped: {why}; the gateway stops too");
    }
    info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = sweeper.await;
    let _ = idle_checker.await;
    let _ = reachability.await;
    let _ = pool_keeper.await;
    // Local pools are this process's alone; on Kubernetes the other replicas keep using them.
    if config.backend == BackendKind::Local {
        clusters_for_shutdown.stop_pools().await;
    }
    backend.shutdown(config.stop_clusters_on_shutdown).await;
    let _ = controller_stop_tx.send(true);
    if let Some(thread) = controller_thread {
        thread.join(Duration::from_secs(5)).await;
    }
    for s in servers {
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    match controller_stopped {
        Some(why) => Err(StartError::ControllerStopped(why)),
        None => Ok(()),
    }
}

/// The host names requests may carry: the configured ones and the host of the API URL the
/// schedulers report to (see [`http_shared::HostRule`]).
fn host_rule(config: &CheckedConfig) -> http_shared::HostRule {
    let names = config
        .allowed_hosts
        .iter()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    let also = config
        .api_url()
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| {
            u.host()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        })
        .into_iter()
        .collect();
    http_shared::HostRule {
        names,
        also,
        loopback_only: config.address.ip().is_loopback(),
    }
}

/// Runs `job` every `period` (a run that takes longer delays the next one) until `stop` turns
/// true; a run in progress then is abandoned.
fn every<F, Fut>(
    period: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut job: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = async { tick.tick().await; job().await } => {}
                _ = async { let _ = stop.wait_for(|v| *v).await; } => break,
            }
        }
    })
}
