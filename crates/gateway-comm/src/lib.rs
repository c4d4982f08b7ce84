//! Talking to a Dask scheduler without Python:
//!
//! * [`tls`]: TLS with a cluster's credentials, where the cluster's self-signed certificate is
//!   the only thing trusted on both ends (as Dask's own TLS uses the gateway's credentials).
//! * [`protocol`]: just enough of Dask's comm protocol for short requests: the framing, the
//!   connection handshake, and the `identity` and `check_idle` requests.
//! * [`connect`]: TCP and TLS to a scheduler in one step.
//!
//! The Rust client (`gateway-client`) asks schedulers who they are through the proxy; the
//! gateway asks its own schedulers whether they are idle.

#![warn(missing_docs)]

pub mod protocol;
pub mod tls;

pub use protocol::{SchedulerIdentity, WorkerIdentity};
pub use tls::ClusterTls;

use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// What can go wrong talking to a scheduler.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The connection could not be made, or broke.
    #[error("{0}")]
    Connection(String),
    /// The credentials or the TLS handshake failed.
    #[error("{0}")]
    Tls(String),
    /// The peer answered something that is not the Dask protocol, or refused the request.
    #[error("{0}")]
    Protocol(String),
}

/// Opens TCP to `address` (`host:port`) and TLS with the cluster's credentials, sending `sni`
/// as the server name; each step gives up after `timeout`.
pub async fn connect(
    address: &str,
    sni: &str,
    tls: &ClusterTls,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, CommError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| CommError::Connection(format!("connecting to {address} timed out")))?
        .map_err(|e| CommError::Connection(format!("connecting to {address}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls.client_config()?));
    let server_name = rustls::pki_types::ServerName::try_from(sni.to_string())
        .map_err(|e| CommError::Tls(format!("server name {sni:?}: {e}")))?;
    tokio::time::timeout(timeout, connector.connect(server_name, tcp))
        .await
        .map_err(|_| CommError::Tls("the TLS handshake timed out".into()))?
        .map_err(|e| CommError::Tls(format!("TLS to {address}: {e}")))
}
