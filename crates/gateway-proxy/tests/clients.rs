//! Which spliced scheduler connections count as clients of their cluster (the no-client
//! timeout): only those whose TLS handshake with the scheduler completed, not a bare
//! ClientHello or a client the scheduler refused.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use common::*;
use gateway_comm::ClusterTls;
use gateway_proxy::{ClientConnections, Clients, ClusterRoute, RouteSource, RouteTable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A route table that counts spliced connections, as the gateway's does.
struct Counted {
    table: RouteTable,
    connections: Arc<ClientConnections>,
}

impl RouteSource for Counted {
    fn route(&self, cluster: &str) -> Option<ClusterRoute> {
        self.table.get(cluster)
    }

    fn connections(&self) -> Option<&Arc<ClientConnections>> {
        Some(&self.connections)
    }
}

/// A cluster's credentials, as the gateway makes them.
fn cluster_tls() -> ClusterTls {
    let id = identity(&["dask-internal"]);
    ClusterTls::from_pem(&id.cert_pem, &id.key_pem).unwrap()
}

/// A scheduler stand-in: mutual TLS with `tls` (as Dask's), then a 100-byte greeting (Dask's
/// handshake) and an echo.
async fn scheduler(tls: &ClusterTls) -> std::net::SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls.server_config().unwrap()));
    spawn_server(move |s| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            if tls.write_all(&[7u8; 100]).await.is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            while let Ok(n) = tls.read(&mut buf).await {
                if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    })
    .await
}

async fn held_for_a_while(connections: &ClientConnections) -> Option<Clients> {
    tokio::time::sleep(Duration::from_millis(700)).await;
    connections.get("abc")
}

#[tokio::test]
async fn only_a_completed_handshake_counts_as_a_client() {
    let tls = cluster_tls();
    let table = RouteTable::new();
    table.set(
        "abc",
        ClusterRoute {
            scheduler: format!("tls://{}", scheduler(&tls).await),
            dashboard: None,
        },
    );
    let connections = Arc::new(ClientConnections::default());
    let routes = Counted {
        table,
        connections: connections.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gateway_proxy::serve_shared(
        listener,
        Arc::new(routes),
        Router::new(),
        None,
        gateway_proxy::ConnectionLimit::new(1000),
        std::future::pending(),
    ));

    // A ClientHello for the cluster, then nothing: the scheduler answers, nobody proves
    // anything. Held open, it is no client.
    let mut bare = TcpStream::connect(addr).await.unwrap();
    bare.write_all(&client_hello("daskgateway-abc", true))
        .await
        .unwrap();
    let mut first = [0u8; 5];
    bare.read_exact(&mut first).await.unwrap();
    assert_eq!(first[0], 0x16, "the scheduler's first flight came through");
    assert_eq!(held_for_a_while(&connections).await, None);

    // Someone else's credentials: the scheduler refuses them. Held open, no client either.
    let wrong = cluster_tls();
    let refused = gateway_comm::connect(
        &addr.to_string(),
        "daskgateway-abc",
        &wrong,
        Duration::from_secs(5),
    )
    .await;
    if let Ok(mut s) = refused {
        // TLS 1.3: the client's handshake ends before the scheduler has checked its proof.
        let mut buf = [0u8; 16];
        assert!(!matches!(s.read(&mut buf).await, Ok(n) if n > 0));
        assert_eq!(held_for_a_while(&connections).await, None);
        drop(s);
    }
    assert_eq!(connections.get("abc"), None);

    // The cluster's own credentials: a client, for as long as it stays connected.
    let mut client = gateway_comm::connect(
        &addr.to_string(),
        "daskgateway-abc",
        &tls,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let mut greeting = [0u8; 100];
    client.read_exact(&mut greeting).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while connections.get("abc") != Some(Clients::Open(1)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            connections.get("abc")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    client.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
    drop(client);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !matches!(connections.get("abc"), Some(Clients::ClosedAt(_))) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            connections.get("abc")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(bare);
}
