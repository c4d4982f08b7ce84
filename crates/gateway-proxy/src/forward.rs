//! HTTP / WebSocket reverse proxying to scheduler dashboards.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::capacity::HeldConnection;
use crate::listener::ConnMeta;
use crate::DIAL_TIMEOUT;

/// Headers that describe one hop and are never forwarded (RFC 9110 section 7.6.1, plus the
/// legacy `Proxy-Connection`).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Why a forward failed (every variant becomes a 502 for the client).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("invalid target URI {0:?}")]
    InvalidTarget(String),
    #[error("connect to {target} failed: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {0} timed out")]
    ConnectTimeout(String),
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    #[error("HTTP client error: {0}")]
    Client(#[from] hyper_util::client::legacy::Error),
}

/// HTTP reverse proxy for dashboards (pooled hyper client inside, cheap to clone).
#[derive(Clone, Debug)]
pub struct HttpForwarder {
    client: Client<HttpConnector, Body>,
}

impl Default for HttpForwarder {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpForwarder {
    /// A forwarder with a pooled HTTP/1.1 client (10 s connect timeout, 60 s idle pool timeout).
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(DIAL_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        HttpForwarder { client }
    }

    /// Forward `req` to `http://{target}{path_and_query}` (target = "host:port"; path_and_query
    /// starts with "/" and already has the `/clusters/<name>` prefix removed, query kept).
    ///
    /// Sets `Host` to the target, appends `X-Forwarded-For` (from the request's
    /// `ConnectInfo<SocketAddr>` or [`ConnMeta`] extension), sets `X-Forwarded-Proto` /
    /// `X-Forwarded-Host` unless already present, drops hop-by-hop headers and streams bodies
    /// both ways. HTTP/1.1 upgrade requests (WebSocket) are forwarded on a dedicated backend
    /// connection; on `101` both upgraded connections are relayed byte for byte. Any backend
    /// failure yields `502` with an empty body.
    pub async fn forward(&self, req: Request, target: &str, path_and_query: &str) -> Response {
        match self.try_forward(req, target, path_and_query).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!(target = %target, error = %e, "proxying to dashboard failed");
                let mut resp = Response::new(Body::empty());
                *resp.status_mut() = StatusCode::BAD_GATEWAY;
                resp
            }
        }
    }

    async fn try_forward(
        &self,
        mut req: Request,
        target: &str,
        path_and_query: &str,
    ) -> Result<Response, ForwardError> {
        let upgrade = upgrade_protocol(&req);
        let sep = if path_and_query.starts_with('/') {
            ""
        } else {
            "/"
        };
        let uri_text = format!("http://{target}{sep}{path_and_query}");
        let uri: Uri = uri_text
            .parse()
            .map_err(|_| ForwardError::InvalidTarget(uri_text.clone()))?;
        let host = HeaderValue::from_str(target)
            .map_err(|_| ForwardError::InvalidTarget(target.to_string()))?;

        let client_addr = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ci| ci.0)
            .or_else(|| req.extensions().get::<ConnMeta>().map(|m| m.peer));
        let proto = match req.extensions().get::<ConnMeta>() {
            Some(meta) if meta.tls => "https",
            Some(_) => "http",
            None if req.uri().scheme_str() == Some("https") => "https",
            None => "http",
        };
        let original_host = req.headers().get(header::HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });

        // Taken before the request is consumed: the client side of a future upgrade.
        let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        if let Some(proto_value) = &upgrade {
            headers.insert(header::UPGRADE, proto_value.clone());
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        headers.insert(header::HOST, host);
        append_forwarded_for(headers, client_addr);
        if !headers.contains_key(X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if let Some(h) = original_host {
            if !headers.contains_key(X_FORWARDED_HOST) {
                headers.insert(X_FORWARDED_HOST, h);
            }
        }
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;

        match client_upgrade {
            None => {
                let resp = self.client.request(req).await?;
                let mut resp = resp.map(Body::new);
                strip_hop_by_hop(resp.headers_mut());
                Ok(resp)
            }
            Some(client_upgrade) => forward_upgrade(req, target, client_upgrade).await,
        }
    }
}

/// Forward an upgrade request on its own backend connection and relay the upgraded streams.
/// The request line carries only the path and query (origin form): a raw connection, unlike
/// the pooled client, sends the URI as it is, and servers such as Tornado take an absolute URI
/// for a path.
async fn forward_upgrade(
    mut req: Request,
    target: &str,
    client_upgrade: hyper::upgrade::OnUpgrade,
) -> Result<Response, ForwardError> {
    let stream = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            return Err(ForwardError::Connect {
                target: target.to_string(),
                source,
            })
        }
        Err(_) => return Err(ForwardError::ConnectTimeout(target.to_string())),
    };
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let target_owned = target.to_string();
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(target = %target_owned, error = %e, "dashboard upgrade connection error");
        }
    });

    let origin_form = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    *req.uri_mut() = origin_form
        .parse()
        .map_err(|_| ForwardError::InvalidTarget(origin_form.clone()))?;
    // The client connection's place under the connection limit: its socket lives on in the
    // relay after its HTTP serving ends, and so does the place.
    let held = req.extensions().get::<HeldConnection>().cloned();
    let mut resp = sender.send_request(req).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let mut resp = resp.map(Body::new);
        strip_hop_by_hop(resp.headers_mut());
        return Ok(resp);
    }

    let backend_upgrade = hyper::upgrade::on(&mut resp);
    let target_owned = target.to_string();
    tokio::spawn(async move {
        // Keep the backend connection's request handle alive until the upgrade completes.
        let _sender = sender;
        let _held = held;
        let (client_io, backend_io) = match tokio::try_join!(client_upgrade, backend_upgrade) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(target = %target_owned, error = %e, "upgrade failed");
                return;
            }
        };
        let mut client_io = TokioIo::new(client_io);
        let mut backend_io = TokioIo::new(backend_io);
        match tokio::io::copy_bidirectional(&mut client_io, &mut backend_io).await {
            Ok((up, down)) => {
                tracing::debug!(target = %target_owned, bytes_up = up, bytes_down = down, "upgraded connection closed")
            }
            Err(e) => {
                tracing::debug!(target = %target_owned, error = %e, "upgraded connection ended with an error")
            }
        }
    });

    let (mut parts, _body) = resp.into_parts();
    let upgrade_value = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(v) = upgrade_value {
        parts.headers.insert(header::UPGRADE, v);
    }
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    Ok(Response::from_parts(parts, Body::empty()))
}

/// The `Upgrade` header value if `req` is an HTTP/1.1 upgrade request (`Connection: upgrade`).
fn upgrade_protocol(req: &Request) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let upgrade = req.headers().get(header::UPGRADE)?;
    let wants_upgrade = connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"));
    wants_upgrade.then(|| upgrade.clone())
}

/// Tokens listed in all `Connection` headers.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Remove hop-by-hop headers, including those named by `Connection`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Append the client address to `X-Forwarded-For` (joining any existing values).
fn append_forwarded_for(headers: &mut HeaderMap, client: Option<SocketAddr>) {
    let Some(addr) = client else { return };
    let ip = addr.ip().to_string();
    let existing: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let value = if existing.is_empty() {
        ip
    } else {
        format!("{}, {}", existing.join(", "), ip)
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-custom"),
        );
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("token x"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
        assert!(h.contains_key(header::COOKIE));
        assert!(h.contains_key(header::AUTHORIZATION));
    }

    #[test]
    fn forwarded_for_appends() {
        let addr: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, Some(addr));
        assert_eq!(h[X_FORWARDED_FOR], "10.1.2.3");
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2"));
        append_forwarded_for(&mut h, Some(addr));
        assert_eq!(h[X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 10.1.2.3");
    }

    #[test]
    fn detects_upgrades() {
        let req = Request::builder()
            .header(header::CONNECTION, "keep-alive, Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(Body::empty())
            .unwrap();
        assert_eq!(upgrade_protocol(&req).unwrap(), "websocket");
        let req = Request::builder()
            .header(header::UPGRADE, "websocket")
            .body(Body::empty())
            .unwrap();
        assert!(upgrade_protocol(&req).is_none());
    }
}
