//! The public front door of the gateway.
//!
//! This crate owns everything that touches the public port(s):
//!
//! * **SNI routing of scheduler TLS** ([`serve_shared`], [`serve_scheduler`]). The stock
//!   `dask-gateway` client opens a TCP connection to the proxy and starts TLS with the server
//!   name `daskgateway-<cluster>`. The proxy reads (never terminates) the ClientHello, extracts
//!   the SNI with the parser in [`sni`], looks the cluster up in a [`RouteSource`], dials
//!   the scheduler and splices bytes both ways, replaying what it already read. The end-to-end
//!   TLS session (mutual TLS with the cluster's own certificate) is between client and scheduler.
//! * **Demultiplexing on a shared port.** The first byte tells TLS (`0x16`) from anything else;
//!   TLS whose SNI does not start with [`SNI_PREFIX`] (or carries none) is HTTPS for the HTTP
//!   side (only when TLS for HTTP is configured); everything else is HTTP. HTTP connections are
//!   served by hyper (HTTP/1.1 with upgrades, or HTTP/2 when the client asks for it) with the
//!   caller's `axum::Router`, after replaying the sniffed bytes through [`Rewind`].
//! * **Dashboard reverse proxying** ([`HttpForwarder`]): plain HTTP and WebSocket forwarding to
//!   a scheduler's Bokeh dashboard, with hop-by-hop headers handled and upgrades relayed raw.
//!
//! Design points:
//!
//! * Every accepted connection is its own task; nothing on the accept path blocks on a peer. The
//!   first bytes are *read* (not peeked) with a deadline ([`SNIFF_TIMEOUT`]) and a size cap, so a
//!   silent or slow client costs one task and is dropped after the deadline.
//! * Accept errors (`EMFILE`, aborted handshakes...) are logged and the loop carries on after a
//!   short pause, so a burst of file-descriptor exhaustion cannot kill the listener.
//! * Routing failures on the TLS side close the connection silently: no TLS alert, nothing
//!   written, exactly like the reference proxy.
//! * Routes come from a [`RouteSource`] (the gateway's cluster backend, or a [`RouteTable`]):
//!   one lookup per new connection.
//! * HTTP connections get a header-read timeout (which also bounds idle keep-alive time) and
//!   HTTP/2 keep-alive pings, so garbage or abandoned connections never hang forever.

#![warn(missing_docs)]

mod capacity;
mod connections;
mod forward;
mod listener;
mod relay;
mod rewind;
mod routes;
pub mod sni;
mod tls;
mod turns;

use std::time::Duration;

pub use capacity::{raise_open_file_limit, ConnectionLimit, HeldConnection};
pub use connections::{ClientConnections, Clients, ConnectionGuard};
pub use forward::HttpForwarder;
pub use listener::{bind, serve_scheduler, serve_shared, ConnMeta};
pub use rewind::Rewind;
pub use routes::{ClusterRoute, RouteFuture, RouteSource, RouteTable};
pub use tls::load_server_tls;

/// SNI prefix the stock client puts before the cluster name.
pub const SNI_PREFIX: &str = "daskgateway-";

/// How long a new connection may take to send enough bytes to be classified (ClientHello or the
/// first byte of HTTP).
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Timeout for dialling a scheduler or a dashboard.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a scheduler connection or a dashboard request for a cluster that is still starting
/// here waits for its route (see [`RouteSource::route_soon`]) before it is closed (or answered
/// 404).
pub const ROUTE_WAIT: Duration = Duration::from_secs(3);

/// Time an HTTP/1 connection may take to send a request head; also the idle keep-alive limit.
pub const HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Maximum number of bytes buffered while looking for a complete ClientHello.
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// Extract the cluster name from an SNI server name, if it is a gateway name
/// (`daskgateway-<cluster>` with a non-empty cluster).
pub fn cluster_from_sni(sni: &str) -> Option<&str> {
    sni.strip_prefix(SNI_PREFIX).filter(|name| !name.is_empty())
}

/// Errors produced by the proxy's setup functions.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file that failed.
        path: std::path::PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate.
    #[error("no PEM certificate found in {0}")]
    NoCertificate(std::path::PathBuf),
    /// The key file holds no PEM private key.
    #[error("no PEM private key found in {0}")]
    NoPrivateKey(std::path::PathBuf),
    /// rustls rejected the certificate/key pair or the configuration.
    #[error("TLS configuration error: {0}")]
    Tls(#[from] rustls::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_from_sni() {
        assert_eq!(cluster_from_sni("daskgateway-abc"), Some("abc"));
        assert_eq!(cluster_from_sni("daskgateway-ns.abc"), Some("ns.abc"));
        assert_eq!(cluster_from_sni("daskgateway-"), None);
        assert_eq!(cluster_from_sni("example.com"), None);
    }
}
