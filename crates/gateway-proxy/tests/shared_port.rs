//! End-to-end tests of the shared public port and the dedicated scheduler port on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::Router;
use common::*;
use gateway_proxy::{ClusterRoute, ConnMeta, RouteTable};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn app() -> Router {
    Router::new()
        .route("/hello", get(|| async { "hello world" }))
        .route(
            "/peer",
            get(
                |ConnectInfo(peer): ConnectInfo<SocketAddr>,
                 axum::Extension(meta): axum::Extension<ConnMeta>| async move {
                    format!("peer={} tls={}", peer.ip(), meta.tls)
                },
            ),
        )
}

fn route(addr: SocketAddr) -> ClusterRoute {
    ClusterRoute {
        scheduler: format!("tls://{addr}"),
        dashboard: None,
    }
}

/// Open a TLS session with SNI `daskgateway-<cluster>` through `proxy`, verifying `id`'s cert.
async fn gateway_tls(
    proxy: SocketAddr,
    id: &Identity,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&id.cert)));
    let tcp = TcpStream::connect(proxy).await?;
    connector
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
}

#[tokio::test]
async fn plain_http_reaches_the_app() {
    let (addr, _stop, _task) = start_shared(RouteTable::new(), app(), None).await;
    let resp = http_get(addr, "/hello").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("hello world"), "{resp}");
    let resp = http_get(addr, "/peer").await;
    assert!(resp.ends_with("peer=127.0.0.1 tls=false"), "{resp}");
    let resp = http_get(addr, "/missing").await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
}

#[tokio::test]
async fn keep_alive_requests_on_one_connection() {
    let (addr, _stop, _task) = start_shared(RouteTable::new(), app(), None).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = "GET /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out.matches("hello world").count(), 2, "{out}");
}

/// An HTTP/2 (prior knowledge) client connection to `addr`: its request sender, and the
/// connection to drive (it answers the server's pings while driven).
async fn h2_connect(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    hyper::client::conn::http2::Connection<
        hyper_util::rt::TokioIo<TcpStream>,
        http_body_util::Empty<bytes::Bytes>,
        hyper_util::rt::TokioExecutor,
    >,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn http2_prior_knowledge_reaches_the_app() {
    let (addr, _stop, _task) = start_shared(RouteTable::new(), app(), None).await;
    let (mut sender, conn) = h2_connect(addr).await;
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}/hello"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello world");
}

#[tokio::test]
async fn gateway_tls_is_spliced_not_terminated() {
    let id = identity(&["daskgateway-abc"]);
    let echo = tls_echo_server(&id).await;
    let routes = RouteTable::new();
    routes.set("abc", route(echo));
    let (addr, _stop, _task) = start_shared(routes, app(), None).await;

    // The client verifies the echo server's own certificate: the proxy did not terminate TLS.
    let mut tls = gateway_tls(addr, &id, "daskgateway-abc").await.unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    let big = vec![0x5au8; 200_000];
    tls.write_all(&big).await.unwrap();
    let mut back = vec![0u8; big.len()];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(back, big);
    // Closing our side: the server sees EOF, says goodbye and closes.
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"<bye>");

    // HTTP still works on the same port.
    assert!(http_get(addr, "/hello").await.ends_with("hello world"));
}

#[tokio::test]
async fn unknown_cluster_closes_silently() {
    let (addr, _stop, _task) = start_shared(RouteTable::new(), app(), None).await;
    let got = raw_exchange(addr, &client_hello("daskgateway-nope", true)).await;
    assert!(got.is_empty(), "received {} bytes", got.len());

    // Through a real TLS client: the handshake fails.
    let id = identity(&["daskgateway-nope"]);
    assert!(gateway_tls(addr, &id, "daskgateway-nope").await.is_err());
}

#[tokio::test]
async fn unreachable_scheduler_closes_silently() {
    let routes = RouteTable::new();
    routes.set("dead", route(dead_addr().await));
    let (addr, _stop, _task) = start_shared(routes, app(), None).await;
    let got = raw_exchange(addr, &client_hello("daskgateway-dead", true)).await;
    assert!(got.is_empty());
}

#[tokio::test]
async fn other_tls_without_https_is_closed() {
    let (addr, _stop, _task) = start_shared(RouteTable::new(), app(), None).await;
    assert!(raw_exchange(addr, &client_hello("example.com", true))
        .await
        .is_empty());
    assert!(raw_exchange(addr, &client_hello("example.com", false))
        .await
        .is_empty());
    assert!(http_get(addr, "/hello").await.ends_with("hello world"));
}

#[tokio::test]
async fn https_and_gateway_tls_share_the_port() {
    let web = identity(&["localhost"]);
    let dir = std::env::temp_dir().join(format!("gwproxy-https-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c.pem"), &web.cert_pem).unwrap();
    std::fs::write(dir.join("k.pem"), &web.key_pem).unwrap();
    let http_tls = gateway_proxy::load_server_tls(&dir.join("c.pem"), &dir.join("k.pem")).unwrap();
    std::fs::remove_dir_all(&dir).ok();

    let sched = identity(&["daskgateway-abc"]);
    let echo = tls_echo_server(&sched).await;
    let routes = RouteTable::new();
    routes.set("abc", route(echo));
    let (addr, _stop, _task) = start_shared(routes, app(), Some(http_tls)).await;

    // HTTPS with the web certificate.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&web.cert)));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /peer HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("peer=127.0.0.1 tls=true"), "{out}");

    // Scheduler TLS on the same port still reaches the scheduler untouched.
    let mut tls = gateway_tls(addr, &sched, "daskgateway-abc").await.unwrap();
    tls.write_all(b"dask").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"dask");

    // Plain HTTP too.
    assert!(http_get(addr, "/hello").await.ends_with("hello world"));
}

#[tokio::test]
async fn garbage_is_rejected_and_server_keeps_working() {
    let (addr, _stop, _task) = start_shared(RouteTable::new(), app(), None).await;
    let inputs: [&[u8]; 5] = [
        b"\x00\x01\x02\x03garbage\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"\x16\x03\x01\x00\x00",
        b"\x16\x03\x01\x40\x01xxxx",
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
    ];
    for input in inputs {
        let got = raw_exchange(addr, input).await;
        let text = String::from_utf8_lossy(&got);
        assert!(got.is_empty() || text.starts_with("HTTP/1.1 400"), "{text}");
        assert!(http_get(addr, "/hello").await.ends_with("hello world"));
    }
    // A client that connects and closes without a byte.
    drop(TcpStream::connect(addr).await.unwrap());
    assert!(http_get(addr, "/hello").await.ends_with("hello world"));
}

/// Backend that reads to EOF, then reports how many bytes it got and closes.
async fn counting_backend() -> SocketAddr {
    spawn_server(|mut s| async move {
        let mut all = Vec::new();
        if s.read_to_end(&mut all).await.is_ok() {
            let _ = s.write_all(format!("got {}", all.len()).as_bytes()).await;
        }
    })
    .await
}

#[tokio::test]
async fn half_close_is_propagated() {
    let backend = counting_backend().await;
    let routes = RouteTable::new();
    routes.set("half", route(backend));
    let (addr, _stop, _task) = start_shared(routes, app(), None).await;

    let hello = client_hello("daskgateway-half", true);
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello).await.unwrap();
    s.write_all(b"extra").await.unwrap();
    // Half-close: the backend must see EOF while we can still read its answer.
    s.shutdown().await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("answer after half-close")
        .unwrap();
    assert_eq!(out, format!("got {}", hello.len() + 5));
}

#[tokio::test]
async fn hello_split_across_tcp_writes() {
    let backend = counting_backend().await;
    let routes = RouteTable::new();
    routes.set("slow", route(backend));
    let (addr, _stop, _task) = start_shared(routes, app(), None).await;
    let hello = client_hello("daskgateway-slow", true);
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for chunk in hello.chunks(7) {
        s.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    s.shutdown().await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, format!("got {}", hello.len()));
}

#[tokio::test]
async fn route_changes_take_effect_for_new_connections() {
    let backend = counting_backend().await;
    let routes = RouteTable::new();
    let (addr, _stop, _task) = start_shared(routes.clone(), app(), None).await;
    let hello = client_hello("daskgateway-late", true);
    assert!(raw_exchange(addr, &hello).await.is_empty());
    routes.set("late", route(backend));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, format!("got {}", hello.len()));
    routes.remove("late");
    assert!(raw_exchange(addr, &hello).await.is_empty());
}

#[tokio::test]
async fn dedicated_scheduler_port() {
    let id = identity(&["daskgateway-abc"]);
    let echo = tls_echo_server(&id).await;
    let routes = RouteTable::new();
    routes.set("abc", route(echo));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(gateway_proxy::serve_scheduler(
        listener,
        std::sync::Arc::new(routes),
        gateway_proxy::ConnectionLimit::new(1000),
        async {
            let _ = rx.await;
        },
    ));

    let mut tls = gateway_tls(addr, &id, "daskgateway-abc").await.unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // HTTP and other TLS are closed without an answer.
    assert!(http_get(addr, "/hello").await.is_empty());
    assert!(raw_exchange(addr, &client_hello("example.com", true))
        .await
        .is_empty());
    assert!(raw_exchange(addr, &client_hello("daskgateway-nope", true))
        .await
        .is_empty());

    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    // The spliced connection survives the listener's shutdown.
    tls.write_all(b"more").await.unwrap();
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"more");
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let (addr, stop, task) = start_shared(RouteTable::new(), app(), None).await;
    // An idle keep-alive connection open at shutdown is closed gracefully.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("hello world"));

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("idle connection closed after shutdown")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn silent_and_stalled_clients_are_dropped() {
    let (addr, _stop, _task) = start_shared(RouteTable::new(), app(), None).await;
    let start = std::time::Instant::now();
    let hello = client_hello("daskgateway-abc", true);
    let cases: Vec<Vec<u8>> = vec![
        Vec::new(),                        // connects and says nothing
        hello[..hello.len() / 2].to_vec(), // half a ClientHello
        b"PRI * HTTP/2.0\r\n".to_vec(),    // half an HTTP/2 preface
    ];
    let tasks = cases.into_iter().map(|bytes| {
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&bytes).await.unwrap();
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
                .await
                .expect("stalled connection was never closed")
                .ok();
            out
        })
    });
    for t in tasks.collect::<Vec<_>>() {
        assert!(t.await.unwrap().is_empty());
    }
    assert!(start.elapsed() >= gateway_proxy::SNIFF_TIMEOUT - Duration::from_millis(100));
    assert!(http_get(addr, "/hello").await.ends_with("hello world"));
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_like_an_idle_http1_one() {
    // A client that answers every keep-alive ping but sends no request held its connection
    // (and a descriptor) for ever.
    let (addr, _stop, _task) = start_shared(RouteTable::new(), app(), None).await;
    let (mut sender, conn) = h2_connect(addr).await;
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{addr}/hello"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(60), conn).await;
    assert!(
        ended.is_ok(),
        "the idle connection is still open after 60 s"
    );
    let after = started.elapsed();
    assert!(
        after >= Duration::from_secs(25),
        "closed after {after:?}, before it was idle"
    );
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_and_places_come_back() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limit = gateway_proxy::ConnectionLimit::new(64);
    tokio::spawn(gateway_proxy::serve_shared(
        listener,
        Arc::new(RouteTable::new()),
        app(),
        None,
        limit.clone(),
        std::future::pending(),
    ));
    // 64 connections that have begun a request and hold it.
    let mut held = Vec::new();
    for _ in 0..64 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /hello HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while limit.open() < 64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} open",
            limit.open()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The next one is closed without an answer, and the gateway knows it turned it away.
    let mut over = TcpStream::connect(addr).await.unwrap();
    over.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), over.read_to_end(&mut out)).await;
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    assert!(limit.take_turned_away());
    // Places come back as connections end.
    held.truncate(10);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while limit.open() > 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} open",
            limit.open()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(http_get(addr, "/hello").await.ends_with("hello world"));
}
