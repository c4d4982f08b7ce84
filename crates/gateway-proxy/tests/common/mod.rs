//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use gateway_proxy::RouteTable;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed certificate + key for `names`.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn identity(names: &[&str]) -> Identity {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    Identity {
        cert: ck.cert.der().clone(),
        key: PrivateKeyDer::try_from(ck.key_pair.serialize_der()).unwrap(),
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
    }
}

pub fn server_config(id: &Identity) -> Arc<rustls::ServerConfig> {
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
            .unwrap(),
    )
}

/// A client config trusting only `trusted`.
pub fn client_config(trusted: &CertificateDer<'static>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The bytes of a real rustls ClientHello for `server_name` (SNI omitted when `sni` is false).
pub fn client_hello(server_name: &str, sni: bool) -> Vec<u8> {
    let id = identity(&["unused"]);
    let mut cfg = client_config(&id.cert);
    cfg.enable_sni = sni;
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Start `serve_shared` on an ephemeral port; returns the address, a shutdown trigger and the
/// server task.
pub async fn start_shared(
    routes: RouteTable,
    app: axum::Router,
    http_tls: Option<Arc<rustls::ServerConfig>>,
) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<()>) {
    start_shared_limited(
        routes,
        app,
        http_tls,
        gateway_proxy::ConnectionLimit::new(1000),
    )
    .await
}

/// [`start_shared`] holding at most `limit` connections.
pub async fn start_shared_limited(
    routes: RouteTable,
    app: axum::Router,
    http_tls: Option<Arc<rustls::ServerConfig>>,
    limit: Arc<gateway_proxy::ConnectionLimit>,
) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(gateway_proxy::serve_shared(
        listener,
        Arc::new(routes),
        app,
        http_tls,
        limit,
        async {
            let _ = rx.await;
        },
    ));
    (addr, tx, task)
}

/// Spawn an accept loop calling `f` per connection; returns the bound address.
pub async fn spawn_server<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(f(s));
        }
    });
    addr
}

/// A TLS echo server: echoes until the client's EOF, then writes "<bye>" and closes.
pub async fn tls_echo_server(id: &Identity) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(id));
    spawn_server(move |s| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            let mut buf = [0u8; 4096];
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tls.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = tls.write_all(b"<bye>").await;
            let _ = tls.shutdown().await;
        }
    })
    .await
}

/// An address where nothing listens.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// Send raw `bytes`, then read until the peer closes (or resets); returns what was received.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let res = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(res.is_ok(), "connection was not closed in time");
    out
}

/// A plain HTTP/1.1 GET with `Connection: close`; returns the whole response text.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    String::from_utf8_lossy(&raw_exchange(addr, req.as_bytes()).await).into_owned()
}
