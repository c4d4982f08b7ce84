//! HttpForwarder: plain requests, streaming, WebSocket relaying and failures.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use bytes::Bytes;
use common::*;
use gateway_proxy::{HttpForwarder, RouteTable};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

/// Describe what the backend received.
async fn echo(req: Request) -> String {
    let head = describe(&req);
    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
        .await
        .unwrap();
    format!("{head}body={}", String::from_utf8_lossy(&body))
}

fn describe(req: &Request) -> String {
    let h = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("?").to_string())
            .unwrap_or_else(|| "-".to_string())
    };
    let head = format!(
        "method={}\nuri={}\nhost={}\nxff={}\nproto={}\nxhost={}\nx-drop={}\ncookie={}\nauth={}\n",
        req.method(),
        req.uri(),
        h("host"),
        h("x-forwarded-for"),
        h("x-forwarded-proto"),
        h("x-forwarded-host"),
        h("x-drop"),
        h("cookie"),
        h("authorization"),
    );
    head
}

/// A body fed from a channel, so the test controls when chunks are produced.
struct ChannelBody(mpsc::Receiver<Bytes>);
impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

#[derive(Clone)]
struct BackendState {
    release: std::sync::Arc<Notify>,
}

async fn stream(State(st): State<BackendState>) -> Response {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        tx.send(Bytes::from_static(b"first;")).await.unwrap();
        st.release.notified().await;
        tx.send(Bytes::from_static(b"second")).await.unwrap();
    });
    Body::new(ChannelBody(rx)).into_response()
}

async fn ws_echo(ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            let reply = match msg {
                Message::Text(t) => Message::Text(format!("echo:{t}").into()),
                Message::Binary(b) => Message::Binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

async fn start_backend(release: std::sync::Arc<Notify>) -> SocketAddr {
    let app = Router::new()
        .route("/", any(echo))
        .route("/echo/{*rest}", any(echo))
        .route("/stream", get(stream))
        .route("/ws", get(ws_echo))
        .with_state(BackendState { release });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// The front: `/clusters/{name}/...` forwarded to the named backend (table in state), served by
/// `serve_shared` so ConnectInfo is present.
async fn start_front(targets: Vec<(&'static str, SocketAddr)>) -> SocketAddr {
    start_front_limited(targets, gateway_proxy::ConnectionLimit::new(1000)).await
}

/// [`start_front`] holding at most `limit` connections.
async fn start_front_limited(
    targets: Vec<(&'static str, SocketAddr)>,
    limit: std::sync::Arc<gateway_proxy::ConnectionLimit>,
) -> SocketAddr {
    let fwd = HttpForwarder::new();
    let targets = std::sync::Arc::new(targets);
    let handler = move |req: Request| {
        let fwd = fwd.clone();
        let targets = targets.clone();
        async move {
            let path = req.uri().path().to_string();
            let rest = path.strip_prefix("/clusters/").unwrap();
            let (name, tail) = rest.split_once('/').map_or((rest, ""), |(n, t)| (n, t));
            let Some((_, target)) = targets.iter().find(|(n, _)| *n == name) else {
                return (http::StatusCode::NOT_FOUND, "Not Found").into_response();
            };
            let mut pq = format!("/{tail}");
            if let Some(q) = req.uri().query() {
                pq.push('?');
                pq.push_str(q);
            }
            fwd.forward(req, &target.to_string(), &pq).await
        }
    };
    let app = Router::new()
        .route("/clusters/{name}", any(handler.clone()))
        .route("/clusters/{name}/", any(handler.clone()))
        .route("/clusters/{name}/{*rest}", any(handler));
    let (addr, stop, _task) = start_shared_limited(RouteTable::new(), app, None, limit).await;
    std::mem::forget(stop);
    addr
}

async fn setup() -> (SocketAddr, SocketAddr, std::sync::Arc<Notify>) {
    let release = std::sync::Arc::new(Notify::new());
    let backend = start_backend(release.clone()).await;
    let dead = dead_addr().await;
    let front = start_front(vec![("abc", backend), ("dead", dead)]).await;
    (front, backend, release)
}

fn body_of(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

#[tokio::test]
async fn forwards_path_query_and_headers() {
    let (front, backend, _) = setup().await;
    let resp = http_get(front, "/clusters/abc/echo/status?a=1&b=two%20words").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let body = body_of(&resp);
    assert!(body.contains("method=GET\n"), "{body}");
    assert!(
        body.contains("uri=/echo/status?a=1&b=two%20words\n"),
        "{body}"
    );
    assert!(body.contains(&format!("host={backend}\n")), "{body}");
    assert!(body.contains("xff=127.0.0.1\n"), "{body}");
    assert!(body.contains("proto=http\n"), "{body}");
    assert!(body.contains(&format!("xhost={front}\n")), "{body}");

    // The bare cluster path maps to "/".
    let resp = http_get(front, "/clusters/abc").await;
    assert!(body_of(&resp).contains("uri=/\n"), "{resp}");
    let resp = http_get(front, "/clusters/abc/?x=1").await;
    assert!(body_of(&resp).contains("uri=/?x=1\n"), "{resp}");
}

#[tokio::test]
async fn post_body_hop_by_hop_and_auth_headers() {
    let (front, _, _) = setup().await;
    let req =
        "POST /clusters/abc/echo/x HTTP/1.1\r\nHost: gw.example\r\nConnection: close, x-drop\r\n\
         X-Drop: secret\r\nX-Forwarded-For: 10.9.9.9\r\nCookie: a=b\r\nAuthorization: token t\r\n\
         Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let resp = String::from_utf8_lossy(&raw_exchange(front, req.as_bytes()).await).into_owned();
    let body = body_of(&resp);
    assert!(body.contains("method=POST\n"), "{resp}");
    assert!(body.contains("x-drop=-\n"), "{body}");
    assert!(body.contains("xff=10.9.9.9, 127.0.0.1\n"), "{body}");
    assert!(body.contains("xhost=gw.example\n"), "{body}");
    assert!(body.contains("cookie=a=b\n"), "{body}");
    assert!(body.contains("auth=token t\n"), "{body}");
    assert!(body.ends_with("body=hello world"), "{body}");
}

#[tokio::test]
async fn streams_response_bodies() {
    let (front, _, release) = setup().await;
    let mut s = TcpStream::connect(front).await.unwrap();
    s.write_all(b"GET /clusters/abc/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // The first chunk must arrive while the backend is still holding the second one.
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&got).contains("first;") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("first chunk was not streamed through");
    release.notify_one();
    s.read_to_end(&mut got).await.unwrap();
    assert!(String::from_utf8_lossy(&got).contains("second"));
}

#[tokio::test]
async fn unreachable_backend_is_502_with_empty_body() {
    let (front, _, _) = setup().await;
    let resp = http_get(front, "/clusters/dead/status").await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("content-length: 0"),
        "{resp}"
    );
    assert_eq!(body_of(&resp), "");

    // A WebSocket to a dead backend too.
    let (resp, _) = ws_handshake(front, "/clusters/dead/ws").await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");

    // The forwarder as a plain value, without a server around it.
    let fwd = HttpForwarder::new();
    let req = Request::new(Body::empty());
    let resp = fwd.forward(req, &dead_addr().await.to_string(), "/x").await;
    assert_eq!(resp.status(), 502);
    let resp = fwd
        .forward(Request::new(Body::empty()), "bad host:1", "/x")
        .await;
    assert_eq!(resp.status(), 502);
}

/// Send a WebSocket handshake; returns the response head and the stream.
async fn ws_handshake(front: SocketAddr, path: &str) -> (String, TcpStream) {
    let mut s = TcpStream::connect(front).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {front}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    (String::from_utf8_lossy(&head).into_owned(), s)
}

/// Write one masked client frame.
async fn ws_send(s: &mut TcpStream, opcode: u8, payload: &[u8]) {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n < 65536 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).await.unwrap();
}

/// Read one unmasked server frame: (opcode, payload).
async fn ws_recv(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut hdr = [0u8; 2];
    s.read_exact(&mut hdr).await.unwrap();
    assert_eq!(hdr[1] & 0x80, 0, "server frames are not masked");
    let len = match hdr[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    (hdr[0] & 0x0f, payload)
}

#[tokio::test]
async fn websocket_round_trip() {
    let (front, _, _) = setup().await;
    let (head, mut s) = ws_handshake(front, "/clusters/abc/ws").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    assert!(lower.contains("upgrade: websocket"), "{head}");

    let msg = tokio::time::timeout(Duration::from_secs(10), async {
        ws_send(&mut s, 0x1, b"hello").await;
        let (op, payload) = ws_recv(&mut s).await;
        assert_eq!(op, 0x1);
        assert_eq!(payload, b"echo:hello");

        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        ws_send(&mut s, 0x2, &big).await;
        let (op, payload) = ws_recv(&mut s).await;
        assert_eq!(op, 0x2);
        assert_eq!(payload, big);

        ws_send(&mut s, 0x1, b"again").await;
        ws_recv(&mut s).await
    })
    .await
    .expect("websocket exchange timed out");
    assert_eq!(msg.1, b"echo:again");

    // Close: the backend ends the session (it may or may not echo a close frame first) and the
    // proxy propagates the end of the connection.
    ws_send(&mut s, 0x8, &[0x03, 0xe8]).await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("connection closed after close frame")
        .unwrap();
    if let Some(first) = rest.first() {
        assert_eq!(first & 0x0f, 0x8, "only a close frame may follow");
    }
}

/// An upgraded connection outlives its HTTP serving; it keeps its place under the connection
/// limit until the relay ends.
#[tokio::test]
async fn a_websocket_relay_holds_its_place_under_the_connection_limit() {
    let backend = start_backend(std::sync::Arc::new(Notify::new())).await;
    let limit = gateway_proxy::ConnectionLimit::new(64);
    let front = start_front_limited(vec![("abc", backend)], limit.clone()).await;
    let (head, mut s) = ws_handshake(front, "/clusters/abc/ws").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws_send(&mut s, 0x1, b"hello").await;
    assert_eq!(ws_recv(&mut s).await.1, b"echo:hello");
    // Long after the upgrade, the relay still counts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(limit.open(), 1);
    drop(s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while limit.open() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn upgrade_refused_by_backend_passes_response_through() {
    let (front, _, _) = setup().await;
    // `/echo/...` is not a WebSocket endpoint: the backend answers 200 and no upgrade happens.
    let (head, mut s) = ws_handshake(front, "/clusters/abc/echo/x").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = vec![0u8; 10];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"method=GET");
}

/// Upgrade requests reach the backend in origin form (`GET /path?query HTTP/1.1`): Tornado,
/// which serves the Bokeh dashboard, treats an absolute URI as a path and answers 404.
#[tokio::test]
async fn upgrade_request_line_is_origin_form() {
    let raw = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw_addr = raw.local_addr().unwrap();
    let (line_tx, line_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let (mut s, _) = raw.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).await.unwrap();
            buf.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&buf).to_string();
        let _ = line_tx.send(head.lines().next().unwrap_or("").to_string());
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            .await
            .unwrap();
        let _ = s.read(&mut byte).await;
    });
    let front = start_front(vec![("raw", raw_addr)]).await;
    let (head, _s) = ws_handshake(front, "/clusters/raw/status/ws?bokeh=1").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(line_rx.await.unwrap(), "GET /status/ws?bokeh=1 HTTP/1.1");
}
