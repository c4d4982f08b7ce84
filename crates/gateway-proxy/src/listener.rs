//! Accept loops for the public port(s): first-byte / SNI demultiplexing, TCP splicing of
//! scheduler TLS, and hyper serving of HTTP(S) with an axum `Router`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::capacity::{ConnectionLimit, HeldConnection};
use crate::rewind::Rewind;
use crate::routes::RouteSource;
use crate::sni::{self, SniError, Sniff};
use crate::{cluster_from_sni, DIAL_TIMEOUT, HTTP_HEADER_TIMEOUT, ROUTE_WAIT, SNIFF_TIMEOUT};

/// The HTTP/2 connection preface a prior-knowledge h2 client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Pause after an accept error that is not specific to one connection (e.g. `EMFILE`).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(200);

/// Interval of HTTP/2 keep-alive pings (a peer that does not answer is dropped).
const H2_KEEPALIVE: Duration = Duration::from_secs(30);

/// How often an HTTP/2 connection checks whether it has been idle for [`HTTP_HEADER_TIMEOUT`]
/// (no stream open, none started): such a connection is closed, as an idle HTTP/1 one is.
const H2_IDLE_CHECK: Duration = Duration::from_secs(5);

/// Facts about the client connection a request arrived on, inserted as a request extension
/// (next to `axum::extract::ConnectInfo<SocketAddr>`) by [`serve_shared`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnMeta {
    /// The client's address.
    pub peer: SocketAddr,
    /// Whether the connection is HTTPS (TLS terminated by this proxy).
    pub tls: bool,
}

/// What the first bytes of a connection turned out to be.
enum Sniffed {
    /// The peer closed, went silent past the deadline, or errored before saying enough.
    Gone(&'static str),
    /// Not TLS; `h2` when it starts with the HTTP/2 prior-knowledge preface.
    Plain { h2: bool },
    /// A complete ClientHello.
    Tls { sni: Option<String> },
    /// Starts like TLS but is not an acceptable ClientHello.
    BadTls(SniError),
}

/// Read from `stream` into `buf` until the first bytes can be classified, within
/// [`SNIFF_TIMEOUT`] and [`sni::MAX_SNIFF_BYTES`].
async fn sniff_stream(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Sniffed {
    let deadline = Instant::now() + SNIFF_TIMEOUT;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match sni::sniff(buf) {
            Ok(Sniff::Tls { sni }) => return Sniffed::Tls { sni },
            Err(e) => return Sniffed::BadTls(e),
            Ok(Sniff::NotTls) => {
                let maybe_h2 = buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf);
                if !maybe_h2 {
                    return Sniffed::Plain {
                        h2: buf.starts_with(H2_PREFACE),
                    };
                }
            }
            Ok(Sniff::Incomplete) => {}
        }
        let room = sni::MAX_SNIFF_BYTES
            .saturating_sub(buf.len())
            .min(chunk.len());
        if room == 0 {
            // Unreachable by construction of `sniff`, but never loop forever.
            return Sniffed::BadTls(SniError::TooLarge);
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..room])).await {
            Err(_) => return Sniffed::Gone("timed out before the protocol could be determined"),
            Ok(Err(_)) => {
                return Sniffed::Gone("read error before the protocol could be determined")
            }
            Ok(Ok(0)) => return Sniffed::Gone("closed before the protocol could be determined"),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Binds a public listener of the gateway, with `TCP_DEFER_ACCEPT` (Linux): the kernel hands a
/// connection to the gateway only once the client has sent its first bytes (a ClientHello or an
/// HTTP request line), and a connection whose client has sent nothing yet is never one the
/// gateway can close or reset.
///
/// That matters for the stock `dask-gateway` client: its connector calls `start_tls` right after
/// `connect`, and Tornado raises `ValueError("IOStream is not idle")` (not a comm error, so the
/// `Client` stops reconnecting for good) when the peer has closed the new connection before
/// that. Without the option a gateway that dies (`kill -9`, a crash, a deleted pod) resets the
/// connections already in its accept queue, and Linux closes the listening socket last, so a
/// client reconnecting the instant its old connection broke lands in that queue and is reset.
/// With it such a connection is still half-open in the kernel; the client sends its
/// ClientHello, gets a reset, and retries like after any network error.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    defer_accept(&listener)?;
    Ok(listener)
}

#[cfg(target_os = "linux")]
fn defer_accept(listener: &TcpListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // Seconds the kernel waits for the first bytes before it hands over the connection anyway
    // (and the sniff deadline applies); clients of the gateway speak first at once.
    let seconds: libc::c_int = SNIFF_TIMEOUT.as_secs() as libc::c_int;
    // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&seconds as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn defer_accept(_: &TcpListener) -> io::Result<()> {
    Ok(())
}

/// Accept errors that concern one connection only and need no pause.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Run an accept loop, spawning `handle` per connection, until `shutdown` resolves. The
/// returned receiver side of the shutdown signal is handed to each connection. A connection
/// over `limit` is closed at once.
async fn accept_loop<H, Fut>(
    listener: TcpListener,
    limit: Arc<ConnectionLimit>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    handle: H,
) where
    H: Fn(TcpStream, SocketAddr, watch::Receiver<bool>, HeldConnection) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let local = listener.local_addr().ok();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(slot) = limit.try_acquire() else {
                    tracing::debug!(%peer, limit = limit.max(), "connection limit reached; closing");
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // The place is held by the connection's task, and by anything that outlives
                // the task with the connection's socket (see HeldConnection).
                let connection = handle(stream, peer, stop_rx.clone(), HeldConnection::new(slot));
                tokio::spawn(connection);
            }
            Err(e) if is_connection_error(&e) => {
                tracing::debug!(error = %e, "accept: connection error");
            }
            Err(e) => {
                limit.note_turned_away();
                tracing::warn!(error = %e, listen = ?local, open = limit.open(), "accept failed; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
    tracing::debug!(listen = ?local, "accept loop stopped");
    let _ = stop_tx.send(true);
}

/// Accept loop for the public port shared by HTTP(S) and scheduler TLS.
///
/// Each connection is classified by its first bytes (read with [`SNIFF_TIMEOUT`]):
/// TLS with SNI `daskgateway-<name>` is spliced to the cluster's scheduler (no route or dial
/// failure → silent close); other TLS is served as HTTPS with `http_tls` if given (closed
/// otherwise); everything else is served as HTTP by hyper with `app`, the sniffed bytes replayed
/// first. Requests carry `ConnectInfo<SocketAddr>` and [`ConnMeta`] extensions.
///
/// Runs until `shutdown` resolves; HTTP connections then shut down gracefully, spliced scheduler
/// connections are left running. At most `limit` connections are held at once (shared with
/// the other listeners given the same limit).
pub async fn serve_shared(
    listener: TcpListener,
    routes: Arc<dyn RouteSource>,
    app: Router,
    http_tls: Option<Arc<rustls::ServerConfig>>,
    limit: Arc<ConnectionLimit>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let acceptor = http_tls.map(tokio_rustls::TlsAcceptor::from);
    accept_loop(
        listener,
        limit,
        shutdown,
        move |stream, peer, stop, held| {
            handle_shared(
                stream,
                peer,
                routes.clone(),
                app.clone(),
                acceptor.clone(),
                stop,
                held,
            )
        },
    )
    .await
}

/// Accept loop for a dedicated scheduler port: only `daskgateway-*` TLS is routed; anything
/// else is closed. At most `limit` connections are held at once (see [`serve_shared`]).
pub async fn serve_scheduler(
    listener: TcpListener,
    routes: Arc<dyn RouteSource>,
    limit: Arc<ConnectionLimit>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    accept_loop(listener, limit, shutdown, move |mut stream, peer, _stop, held| {
        let routes = routes.clone();
        async move {
            let _held = held;
            let mut buf = Vec::with_capacity(4096);
            match sniff_stream(&mut stream, &mut buf).await {
                Sniffed::Tls { sni: Some(sni) } => match cluster_from_sni(&sni) {
                    Some(cluster) => splice(stream, buf, cluster, &routes, peer).await,
                    None => tracing::debug!(%peer, sni = %sni, "scheduler port: non-gateway SNI; closing"),
                },
                Sniffed::Tls { sni: None } => {
                    tracing::debug!(%peer, "scheduler port: TLS without SNI; closing")
                }
                Sniffed::Plain { .. } => tracing::debug!(%peer, "scheduler port: not TLS; closing"),
                Sniffed::BadTls(e) => {
                    tracing::debug!(%peer, error = %e, "scheduler port: bad ClientHello; closing")
                }
                Sniffed::Gone(why) => tracing::debug!(%peer, "scheduler port: {why}"),
            }
        }
    })
    .await
}

async fn handle_shared(
    mut stream: TcpStream,
    peer: SocketAddr,
    routes: Arc<dyn RouteSource>,
    app: Router,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    stop: watch::Receiver<bool>,
    held: HeldConnection,
) {
    let mut buf = Vec::with_capacity(4096);
    match sniff_stream(&mut stream, &mut buf).await {
        Sniffed::Tls { sni } => {
            if let Some(cluster) = sni.as_deref().and_then(cluster_from_sni) {
                splice(stream, buf, cluster, &routes, peer).await;
                return;
            }
            let Some(acceptor) = acceptor else {
                tracing::debug!(%peer, sni = ?sni, "TLS for the HTTP side but HTTPS is not configured; closing");
                return;
            };
            let io = Rewind::new(buf, stream);
            let tls = match tokio::time::timeout(SNIFF_TIMEOUT, acceptor.accept(io)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTPS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "HTTPS handshake timed out");
                    return;
                }
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            serve_http(tls, h2, ConnMeta { peer, tls: true }, held, app, stop).await;
        }
        Sniffed::Plain { h2 } => {
            let io = Rewind::new(buf, stream);
            serve_http(io, h2, ConnMeta { peer, tls: false }, held, app, stop).await;
        }
        Sniffed::BadTls(e) => {
            tracing::debug!(%peer, error = %e, "malformed TLS ClientHello; closing");
        }
        Sniffed::Gone(why) => tracing::debug!(%peer, "{why}"),
    }
}

/// Resolve once the accept loop has signalled shutdown (or is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Serve one HTTP connection with hyper and the axum `app`, until it ends; on shutdown, ask it
/// to finish gracefully.
async fn serve_http<I>(
    io: I,
    h2: bool,
    meta: ConnMeta,
    held: HeldConnection,
    app: Router,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(meta.peer));
            req.extensions_mut().insert(meta);
            req.extensions_mut().insert(held.clone());
            // The stream is open until its response body is done (or dropped).
            let open = Activity::stream_opened(&activity);
            let response = app.clone().oneshot(req);
            async move {
                let response = response.await?;
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| axum::body::Body::new(OpenStream { body, _open: open })),
                )
            }
        })
    };
    let io = TokioIo::new(io);
    let peer = meta.peer;

    macro_rules! drive {
        ($conn:expr, $idle:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            let result = tokio::select! {
                res = conn.as_mut() => res,
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
                _ = $idle => {
                    tracing::debug!(%peer, "idle HTTP/2 connection; closing");
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        }};
    }

    if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(H2_KEEPALIVE))
            .keep_alive_timeout(Duration::from_secs(20));
        drive!(
            builder.serve_connection(io, service),
            activity.idle_for(HTTP_HEADER_TIMEOUT)
        );
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HTTP_HEADER_TIMEOUT);
        // hyper's header timeout closes an idle HTTP/1 connection itself.
        drive!(
            builder.serve_connection(io, service).with_upgrades(),
            std::future::pending::<()>()
        );
    }
}

/// The streams of one HTTP connection: how many are open, and when the last one closed
/// (in milliseconds since the connection began, so that a response's end costs two atomic
/// operations and no lock).
#[derive(Debug)]
struct Activity {
    began: Instant,
    open: AtomicUsize,
    last_closed_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            began: Instant::now(),
            open: AtomicUsize::new(0),
            last_closed_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// Counts a new stream, open until the returned guard is dropped.
    fn stream_opened(this: &Arc<Self>) -> StreamGuard {
        this.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(this.clone())
    }

    /// Milliseconds from the connection's start to now.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.began.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Resolves once no stream has been open for `limit`.
    async fn idle_for(&self, limit: Duration) {
        let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        loop {
            tokio::time::sleep(H2_IDLE_CHECK).await;
            let last = self.last_closed_ms.load(Ordering::Acquire);
            if self.open.load(Ordering::Acquire) == 0
                && self.now_ms().saturating_sub(last) >= limit_ms
            {
                return;
            }
        }
    }
}

/// One open stream of a connection (see [`Activity`]).
#[derive(Debug)]
struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // The time is stored before the count drops, so an idle check that sees no open
        // stream also sees this one's end.
        self.0
            .last_closed_ms
            .fetch_max(self.0.now_ms(), Ordering::AcqRel);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its stream counted as open until it is done or dropped.
struct OpenStream {
    body: axum::body::Body,
    _open: StreamGuard,
}

impl hyper::body::Body for OpenStream {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Splice a scheduler TLS connection to its cluster's scheduler: dial, replay `prefix`, copy
/// both ways until both directions are done. Routing failures close the client silently.
async fn splice(
    client: TcpStream,
    prefix: Vec<u8>,
    cluster: &str,
    routes: &Arc<dyn RouteSource>,
    peer: SocketAddr,
) {
    let Some(route) = routes.route_soon(cluster, ROUTE_WAIT).await else {
        tracing::info!(cluster = %cluster, %peer, "no route for cluster; closing scheduler connection");
        return;
    };
    let target = route.scheduler;
    let mut upstream = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(cluster = %cluster, %peer, target = %target, error = %e, "cannot reach scheduler; closing");
            return;
        }
        Err(_) => {
            tracing::warn!(cluster = %cluster, %peer, target = %target, "timed out dialling scheduler; closing");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if let Err(e) = upstream.write_all(&prefix).await {
        tracing::warn!(cluster = %cluster, %peer, target = %target, error = %e, "scheduler closed before the ClientHello was sent");
        return;
    }
    drop(prefix);
    tracing::debug!(cluster = %cluster, %peer, target = %target, "scheduler connection spliced");
    // Zero-copy through kernel pipes (see relay.rs). The connection counts as a client of the
    // cluster once its TLS handshake has completed (see turns.rs), not at its ClientHello.
    let turns = crate::turns::Turns::default();
    let relay = crate::relay::relay(client, upstream, &turns);
    tokio::pin!(relay);
    let mut counted = None;
    let ended = loop {
        tokio::select! {
            ended = &mut relay => break ended,
            _ = turns.established(), if counted.is_none() => {
                counted = Some(routes.connections().map(|c| c.opened(cluster)));
            }
        }
    };
    drop(counted);
    match ended {
        Ok((up, down)) => {
            tracing::debug!(cluster = %cluster, %peer, bytes_up = up, bytes_down = down, "scheduler connection closed")
        }
        Err(e) => {
            tracing::debug!(cluster = %cluster, %peer, error = %e, "scheduler connection ended with an error")
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_with_no_stream_open_for_the_whole_limit() {
        let activity = Arc::new(Activity::default());
        let limit = Duration::from_secs(30);
        // A stream open (a long response) for two minutes: not idle meanwhile.
        let stream = Activity::stream_opened(&activity);
        let idle = tokio::time::timeout(Duration::from_secs(120), activity.idle_for(limit)).await;
        assert!(idle.is_err(), "idle while a stream was open");
        drop(stream);
        // Then idle once the limit has passed since it closed, not before.
        let closed = Instant::now();
        activity.idle_for(limit).await;
        let after = closed.elapsed();
        assert!(
            after >= limit && after <= limit + H2_IDLE_CHECK,
            "{after:?}"
        );
    }
    use std::os::fd::AsRawFd;

    #[tokio::test]
    async fn listeners_hand_over_connections_only_once_the_client_spoke() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut seconds: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt on our socket into a live c_int of the given size.
        let rc = unsafe {
            libc::getsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&mut seconds as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        assert!(seconds > 0, "TCP_DEFER_ACCEPT is set");
        // A client that speaks is handed over with what it said.
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        let mut first = [0u8; 3];
        accepted.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"GET");
    }
}
