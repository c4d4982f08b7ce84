//! The Kubernetes client: kube-rs's own layers (base URL, credentials, extra headers, retries
//! on 429/503/504) over a connection pool that speaks HTTP/2 when the API server offers it.
//!
//! kube-rs's default client offers only HTTP/1.1, so every request in flight holds a
//! connection of its own: a 100-worker scale-up opened about 100 TLS connections, a handshake
//! each, and every watch held one more. Over HTTP/2 (what `kubectl` and client-go use) they are
//! streams of two connections: watches go through one pool and all other requests through
//! another, so a burst of creations does not queue, in either direction, behind the event
//! streams of the watches that report on the same pods. A server that answers ALPN with
//! HTTP/1.1 (or a plain-HTTP URL) gets HTTP/1.1 as before, and so does every server when the
//! environment sets `DISABLE_HTTP2` (client-go's switch, for proxies in front of an API server
//! that mishandle HTTP/2).

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::{retry::RetryPolicy, ConfigExt};
use std::task::{Context, Poll};
use std::time::Duration;
use tower::ServiceBuilder;

/// How often an HTTP/2 connection is pinged, busy or idle, so that a dead one is found and
/// replaced instead of stalling every request on it.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before its connection is closed.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Neither a kubeconfig nor an in-cluster service account was usable.
    #[error("no Kubernetes configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The configuration was found but a client cannot be built from it (TLS material,
    /// credentials, headers).
    #[error("Kubernetes client: {0}")]
    Build(#[from] kube::Error),
    /// The kubeconfig's `tls-server-name` is not a DNS name or an IP address.
    #[error("Kubernetes client: tls-server-name {0:?} is not a DNS name or an IP address")]
    ServerName(String),
}

/// A client for `config` (usually `kube::Config::infer()`: `KUBECONFIG`, `~/.kube/config` or
/// the in-cluster service account), like `kube::Client::try_from`, but over HTTP/2 where the
/// API server offers it. A configuration that names a proxy gets kube-rs's default client,
/// which knows how to tunnel through it. Make it inside the tokio runtime that will use it:
/// its request queue and its connections run as tasks of that runtime.
pub fn from_config(config: kube::Config) -> Result<kube::Client, ClientError> {
    if config.proxy_url.is_some() {
        return Ok(kube::Client::try_from(config)?);
    }
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    // Requests share the connection, and an HTTP/2 request is a HEADERS and a DATA frame
    // written one after the other: with Nagle's algorithm the second waits for the peer's
    // delayed ACK (~40 ms on Linux), once per write.
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let mut https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config.rustls_client_config()?)
        .https_or_http();
    if let Some(name) = &config.tls_server_name {
        // The name the API server's certificate must carry, when it is not the URL's host.
        let name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|_| ClientError::ServerName(name.clone()))?;
        https = https.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name));
    }
    let https = if std::env::var_os("DISABLE_HTTP2").is_some() {
        https.enable_http1().wrap_connector(http)
    } else {
        https.enable_all_versions().wrap_connector(http)
    };
    let mut builder = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .http2_keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .http2_keep_alive_while_idle(true);
    let pool = SplitPools {
        requests: builder.build(https.clone()),
        watches: builder.build(https),
    };
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| tower::retry::RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(pool);
    Ok(kube::Client::new(service, config.default_namespace))
}

/// A connection pool to the API server.
type Pool = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<HttpConnector>,
    kube::client::Body,
>;

/// Two pools to the same API server: watches take one, every other request the other.
#[derive(Clone)]
struct SplitPools {
    requests: Pool,
    watches: Pool,
}

impl tower::Service<http::Request<kube::client::Body>> for SplitPools {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper_util::client::legacy::Error;
    type Future = hyper_util::client::legacy::ResponseFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A pool is always ready: it queues a request until a connection takes it.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        if is_watch(request.uri()) {
            self.watches.request(request)
        } else {
            self.requests.request(request)
        }
    }
}

/// Whether a request to the API server is a watch (`?watch=true`, or `watch=1`).
fn is_watch(uri: &http::Uri) -> bool {
    uri.query().is_some_and(|query| {
        query
            .split('&')
            .any(|pair| pair == "watch=true" || pair == "watch=1")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    use std::sync::Arc;

    /// A TLS server on 127.0.0.1 that offers `alpn` and answers every request with the HTTP
    /// version it was made in and the client's port (one per connection); its URL and its
    /// certificate (DER) for 127.0.0.1.
    async fn version_server(alpn: &[&[u8]]) -> (String, Vec<u8>) {
        version_server_named(alpn, "127.0.0.1").await
    }

    /// The same, with a certificate for `name`.
    async fn version_server_named(alpn: &[&[u8]], name: &str) -> (String, Vec<u8>) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
        tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let answer =
                        hyper::service::service_fn(move |req: http::Request<_>| async move {
                            let text = format!("{:?} {}", req.version(), peer.port());
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(text),
                            )))
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), answer)
                        .await;
                });
            }
        });
        (url, cert.to_vec())
    }

    /// The HTTP version the client used for two requests at once to a server offering `alpn`.
    async fn versions_used(alpn: &[&[u8]]) -> Vec<String> {
        let (url, ca) = version_server(alpn).await;
        let mut config = kube::Config::new(url.parse().unwrap());
        config.root_cert = Some(vec![ca]);
        let client = from_config(config).unwrap();
        let ask = || {
            let client = client.clone();
            async move {
                let request = http::Request::get("/version").body(Vec::new()).unwrap();
                client.request_text(request).await.unwrap()
            }
        };
        let (a, b) = tokio::join!(ask(), ask());
        [a, b]
            .iter()
            .map(|answer| version(answer).to_string())
            .collect()
    }

    /// The HTTP version in a test server's answer.
    fn version(answer: &str) -> &str {
        answer.split(' ').next().unwrap()
    }

    #[tokio::test]
    async fn watches_have_a_connection_of_their_own() {
        let (url, ca) = version_server(&[b"h2"]).await;
        let mut config = kube::Config::new(url.parse().unwrap());
        config.root_cert = Some(vec![ca]);
        let client = from_config(config).unwrap();
        let ask = |path: &str| {
            let client = client.clone();
            let request = http::Request::get(path).body(Vec::new()).unwrap();
            async move { client.request_text(request).await.unwrap() }
        };
        let plain = ask("/api/v1/namespaces/dask/pods").await;
        let watch = ask("/api/v1/namespaces/dask/pods?&watch=true&resourceVersion=1").await;
        let again = ask("/api/v1/namespaces/dask/pods?limit=500").await;
        let watch_again = ask("/api/v1/namespaces/dask/secrets?watch=1").await;
        assert_eq!(version(&plain), "HTTP/2.0");
        // One connection for the plain requests, another for the watches.
        assert_eq!(plain, again);
        assert_eq!(watch, watch_again);
        assert_ne!(plain, watch);
    }

    #[test]
    fn tells_a_watch_from_other_requests() {
        let watch = |uri: &str| is_watch(&uri.parse().unwrap());
        assert!(watch(
            "https://k/api/v1/pods?&watch=true&timeoutSeconds=290"
        ));
        assert!(watch("https://k/api/v1/pods?labelSelector=a%3Db&watch=1"));
        assert!(!watch("https://k/api/v1/pods"));
        assert!(!watch("https://k/api/v1/pods?watch=false"));
        assert!(!watch("https://k/api/v1/pods?labelSelector=watch%3Dtrue"));
        assert!(!watch("https://k/api/v1/namespaces/watch/pods?limit=1"));
    }

    #[tokio::test]
    async fn speaks_http2_where_the_server_offers_it() {
        assert_eq!(versions_used(&[b"h2", b"http/1.1"]).await, ["HTTP/2.0"; 2]);
    }

    #[tokio::test]
    async fn checks_the_certificate_against_the_configured_tls_server_name() {
        let (url, ca) = version_server_named(&[b"h2"], "api.cluster.test").await;
        let ask = |server_name: Option<&str>| {
            let mut config = kube::Config::new(url.parse().unwrap());
            config.root_cert = Some(vec![ca.clone()]);
            config.tls_server_name = server_name.map(str::to_string);
            async move {
                let client = from_config(config).unwrap();
                let request = http::Request::get("/version").body(Vec::new()).unwrap();
                client.request_text(request).await
            }
        };
        // The certificate names api.cluster.test, not the address in the URL.
        assert!(ask(None).await.is_err());
        assert_eq!(
            version(&ask(Some("api.cluster.test")).await.unwrap()),
            "HTTP/2.0"
        );
        assert!(ask(Some("other.test")).await.is_err());
        let mut config = kube::Config::new(url.parse().unwrap());
        config.tls_server_name = Some("not a name".into());
        assert!(matches!(
            from_config(config),
            Err(ClientError::ServerName(_))
        ));
    }

    #[tokio::test]
    async fn speaks_http1_to_a_server_that_offers_only_that() {
        assert_eq!(versions_used(&[b"http/1.1"]).await, ["HTTP/1.1"; 2]);
    }
}
