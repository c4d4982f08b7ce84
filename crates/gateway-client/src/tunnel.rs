//! A local port that forwards to a cluster's scheduler through the gateway's proxy.
//!
//! Tools that cannot send SNI (or cannot speak `gateway://`) connect to
//! `tls://127.0.0.1:<port>` with the cluster's certificate and key, as Dask's TLS does; the
//! tunnel ends that TLS (accepting only clients presenting the cluster's certificate), opens
//! its own TLS through the proxy with SNI `daskgateway-<name>`, and relays bytes both ways.
//! A local connection gets [`HANDSHAKE_TIMEOUT`] to finish its TLS, and at most
//! [`MAX_CONNECTIONS`] are open at once, so idle sockets of another local user cannot pile up.

use crate::error::ClientError;
use crate::tls::ClusterTls;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// How long a local client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most connections relayed (or in their handshake) at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 256;

/// A bound, not yet running tunnel.
pub struct Tunnel {
    listener: TcpListener,
    proxy: String,
    cluster: String,
    tls: ClusterTls,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl Tunnel {
    /// Binds `local` (e.g. `127.0.0.1:0`) for cluster `cluster` behind `proxy` (`host:port`).
    pub async fn bind(
        local: SocketAddr,
        proxy: String,
        cluster: String,
        tls: ClusterTls,
    ) -> Result<Self, ClientError> {
        let listener = TcpListener::bind(local)
            .await
            .map_err(|e| ClientError::Config(format!("listening on {local}: {e}")))?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls.server_config()?));
        Ok(Tunnel {
            listener,
            proxy,
            cluster,
            tls,
            acceptor,
        })
    }

    /// The local address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves connections until `shutdown` resolves; each one is relayed on its own task.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!("tunnel accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(place) = places.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "tunnel: {MAX_CONNECTIONS} connections open; closing this one");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = self.acceptor.clone();
            let (proxy, cluster, tls) =
                (self.proxy.clone(), self.cluster.clone(), self.tls.clone());
            tokio::spawn(async move {
                let _place = place;
                let local = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, "tunnel: local TLS refused: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%peer, "tunnel: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
                        return;
                    }
                };
                let remote = match crate::connect_via_proxy(&proxy, &cluster, &tls).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%peer, "tunnel: {e}");
                        return;
                    }
                };
                let (mut a, mut b) = (local, remote);
                match tokio::io::copy_bidirectional(&mut a, &mut b).await {
                    Ok((up, down)) => tracing::debug!(%peer, up, down, "tunnel connection closed"),
                    Err(e) => tracing::debug!(%peer, "tunnel connection ended: {e}"),
                }
            });
        }
    }
}
