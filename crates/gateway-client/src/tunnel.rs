//! A local port that forwards to a cluster's scheduler through the gateway's proxy.
//!
//! Tools that cannot send SNI (or cannot speak `gateway://`) connect to
//! `tls://127.0.0.1:<port>` with the cluster's certificate and key, as Dask's TLS does; the
//! tunnel ends that TLS (accepting only clients presenting the cluster's certificate), opens
//! its own TLS through the proxy with SNI `daskgateway-<name>`, and relays bytes both ways.

use crate::error::ClientError;
use crate::tls::ClusterTls;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

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
            let _ = tcp.set_nodelay(true);
            let acceptor = self.acceptor.clone();
            let (proxy, cluster, tls) =
                (self.proxy.clone(), self.cluster.clone(), self.tls.clone());
            tokio::spawn(async move {
                let local = match acceptor.accept(tcp).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::info!(%peer, "tunnel: local TLS refused: {e}");
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
