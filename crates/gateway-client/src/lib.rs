//! A Rust client for Dask Gateway, speaking the same REST API and scheduler proxy protocol as
//! the stock Python `dask_gateway.Gateway`:
//!
//! * [`GatewayClient`]: list, create (with options), get, wait until running, scale, adapt and
//!   stop clusters. Credentials are sent after the gateway's 401 challenge, then the session
//!   cookie is used, like the Python client.
//! * [`ClientConfig`]: settings from arguments, `DASK_GATEWAY__*` variables or the dask config
//!   files (`gateway.address`, `gateway.auth.type`, ...), shared with the Python client.
//! * [`GatewayClient::connect_scheduler`]: TLS to a cluster's scheduler through the proxy (SNI
//!   `daskgateway-<name>`, the cluster's own credentials); [`comm`] asks it for its
//!   [`SchedulerIdentity`] (workers, threads, memory) without Python.
//! * [`tunnel`]: a local TLS port forwarding to the scheduler, for tools that cannot send SNI.
//!
//! Request and response bodies are the server's own types from `gateway-model`.

#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod tunnel;

pub use config::{Auth, ClientConfig, HttpProxy};
pub use error::ClientError;
/// Dask's comm protocol (the requests this library sends to schedulers).
pub use gateway_comm::protocol as comm;
/// TLS with a cluster's own credentials.
pub use gateway_comm::tls;
pub use gateway_comm::ClusterTls;
pub use gateway_comm::{SchedulerIdentity, WorkerIdentity};
/// The API types shared with the server.
pub use gateway_model as model;
pub use gateway_model::{
    ClusterDetails, ClusterEvent, ClusterModel, ClusterStatus, EventType, OptionSpec,
    ScaleResponse, UsageGrouping, UsageReport, UsageRow,
};

use gateway_model::{
    AdaptRequest, ClusterEvents, CreateClusterRequest, CreateClusterResponse, ErrorBody,
    OptionsResponse, ScaleRequest,
};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A TLS stream to a cluster's scheduler, through the gateway's proxy.
pub type SchedulerStream = TlsStream<TcpStream>;

/// A connection to one gateway (cheap to clone; clones share the session cookie).
#[derive(Clone, Debug)]
pub struct GatewayClient {
    config: ClientConfig,
    http: reqwest::Client,
}

impl GatewayClient {
    /// A client for `config`: its address must be an `http://` or `https://` URL with a host
    /// and no user name or password in it, and its request timeout a positive number of
    /// seconds.
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        check_address(&config.address)?;
        let timeout = config.request_timeout;
        if !(timeout.is_finite() && timeout > 0.0 && timeout <= MAX_REQUEST_TIMEOUT) {
            return Err(ClientError::Config(format!(
                "the request timeout must be a number of seconds above 0 and at most {MAX_REQUEST_TIMEOUT}, not {timeout}"
            )));
        }
        // Trusted: the system's certificate store (or `SSL_CERT_FILE` / `SSL_CERT_DIR`, as
        // Python's `ssl` reads them) and the Mozilla roots compiled in.
        let mut http = reqwest::Client::builder()
            .cookie_store(true)
            .timeout(Duration::from_secs_f64(timeout.max(1.0)));
        http = match &config.http_proxy {
            HttpProxy::FromEnvironment => http,
            HttpProxy::Off => http.no_proxy(),
            HttpProxy::Url(url) => {
                http.no_proxy().proxy(reqwest::Proxy::all(url).map_err(|e| {
                    ClientError::Config(format!("the HTTP proxy {url:?} is not usable: {e}"))
                })?)
            }
        };
        let http = http
            .build()
            .map_err(|e| ClientError::Config(error_chain(&e)))?;
        Ok(GatewayClient { config, http })
    }

    /// The settings in use.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// One API call: without credentials first (the session cookie may do), and with them
    /// after a 401 challenge.
    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Option<T>, ClientError> {
        let url = format!("{}{}", self.config.address, path);
        let mut with_auth = false;
        loop {
            let mut req = self.http.request(method.clone(), &url);
            if let Some(b) = body {
                req = req.json(b);
            }
            if with_auth {
                if let Some(h) = self.config.auth.header() {
                    req = req.header(reqwest::header::AUTHORIZATION, h);
                }
            }
            let resp = req.send().await.map_err(|e| self.transport_error(e))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !with_auth && self.config.auth != Auth::None {
                with_auth = true;
                continue;
            }
            if status == StatusCode::NO_CONTENT {
                return Ok(None);
            }
            let limit = if status.is_success() {
                MAX_ANSWER_BYTES
            } else {
                MAX_ERROR_BYTES
            };
            let bytes = self.read_body(resp, limit).await?;
            if status.is_success() {
                return serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| ClientError::Server {
                        status: status.as_u16(),
                        message: format!("unexpected answer to {method} {path}: {e}"),
                    });
            }
            return Err(error_from(status, &bytes));
        }
    }

    /// A failed request as a typed error: a timeout, or the gateway out of reach.
    fn transport_error(&self, source: reqwest::Error) -> ClientError {
        if source.is_timeout() {
            ClientError::Timeout(format!(
                "the gateway at {} did not answer within {} s",
                self.config.address, self.config.request_timeout
            ))
        } else {
            ClientError::Connect {
                address: self.config.address.clone(),
                source,
            }
        }
    }

    /// A response body, refused once it grows past `limit` bytes (a gateway's answers are
    /// small; a peer that streams without end must not fill the memory). Error bodies are
    /// read up to their limit and cut there.
    async fn read_body(
        &self,
        mut resp: reqwest::Response,
        limit: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport_error(e))? {
            if body.len() + chunk.len() > limit {
                if !status.is_success() {
                    body.extend_from_slice(&chunk[..limit - body.len()]);
                    return Ok(body);
                }
                return Err(ClientError::Server {
                    status: status.as_u16(),
                    message: format!(
                        "the answer is larger than {} MiB, more than any gateway answer",
                        limit >> 20
                    ),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None)
            .await?
            .ok_or_else(|| ClientError::Server {
                status: 204,
                message: format!("no body from GET {path}"),
            })
    }

    /// The gateway's version (`GET /api/version`).
    pub async fn version(&self) -> Result<String, ClientError> {
        let v: Value = self.get_json("/api/version").await?;
        Ok(v["version"].as_str().unwrap_or_default().to_string())
    }

    /// The options users may set when creating a cluster.
    pub async fn options(&self) -> Result<Vec<OptionSpec>, ClientError> {
        let r: OptionsResponse = self.get_json("/api/v1/options").await?;
        Ok(r.cluster_options)
    }

    /// The user's clusters (every user's for admins); `statuses` filters (default: the active
    /// ones, PENDING and RUNNING).
    pub async fn list(&self, statuses: &[ClusterStatus]) -> Result<Vec<ClusterModel>, ClientError> {
        let path = if statuses.is_empty() {
            "/api/v1/clusters/".to_string()
        } else {
            let names: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
            format!("/api/v1/clusters/?status={}", names.join(","))
        };
        let map: BTreeMap<String, ClusterModel> = self.get_json(&path).await?;
        let mut clusters: Vec<ClusterModel> = map.into_values().collect();
        clusters.sort_by_key(|c| c.start_time);
        Ok(clusters)
    }

    /// Like [`Self::list`], with each cluster's owner, group policy, worker target, lifetime
    /// deadline and stop reason (a gateway extension: `GET /api/v1/clusters/?details`).
    pub async fn list_details(
        &self,
        statuses: &[ClusterStatus],
    ) -> Result<Vec<ClusterDetails>, ClientError> {
        let mut path = "/api/v1/clusters/?details".to_string();
        if !statuses.is_empty() {
            let names: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
            path.push_str(&format!("&status={}", names.join(",")));
        }
        let map: BTreeMap<String, ClusterDetails> = self.get_json(&path).await?;
        let mut clusters: Vec<ClusterDetails> = map.into_values().collect();
        clusters.sort_by_key(|c| c.start_time);
        Ok(clusters)
    }

    /// The details of one cluster (`GET /api/v1/clusters/<name>/details`).
    pub async fn details(&self, name: &str) -> Result<ClusterDetails, ClientError> {
        self.get_json(&format!("/api/v1/clusters/{}/details", check_name(name)?))
            .await
    }

    /// Core- and memory-seconds used within a window (`GET /api/v1/usage`): every user's for
    /// an admin, the caller's own otherwise.
    pub async fn usage(&self, request: &UsageRequest) -> Result<UsageReport, ClientError> {
        let mut query = Vec::new();
        for (key, value) in [
            ("since", request.since.as_deref()),
            ("until", request.until.as_deref()),
            ("user", request.user.as_deref()),
        ] {
            if let Some(v) = value {
                query.push(format!("{key}={}", query_escape(v)));
            }
        }
        if let Some(by) = request.by {
            let by = match by {
                UsageGrouping::User => "user",
                UsageGrouping::Group => "group",
                UsageGrouping::Cluster => "cluster",
            };
            query.push(format!("by={by}"));
        }
        let path = if query.is_empty() {
            "/api/v1/usage".to_string()
        } else {
            format!("/api/v1/usage?{}", query.join("&"))
        };
        self.get_json(&path).await
    }

    /// What happened to a cluster, oldest first (`GET /api/v1/clusters/<name>/events`).
    pub async fn events(&self, name: &str) -> Result<Vec<ClusterEvent>, ClientError> {
        let body: ClusterEvents = self
            .get_json(&format!("/api/v1/clusters/{}/events", check_name(name)?))
            .await?;
        Ok(body.events)
    }

    /// Follows a cluster's events (`?follow`, server-sent events): `on_event` gets the history
    /// and then each new event as it happens; returns once the gateway ends the stream (the
    /// cluster has finished). Credentials go as for every call (after a 401). The gateway
    /// sends a keep-alive every 15 s: a stream silent for [`FOLLOW_IDLE_TIMEOUT`] is a
    /// connection lost, and an error.
    pub async fn follow_events(
        &self,
        name: &str,
        mut on_event: impl FnMut(ClusterEvent),
    ) -> Result<(), ClientError> {
        let url = format!(
            "{}/api/v1/clusters/{}/events?follow",
            self.config.address,
            check_name(name)?
        );
        let mut with_auth = false;
        let mut resp = loop {
            // The stream lasts as long as the cluster: no overall timeout, only the idle one.
            let mut req = self
                .http
                .get(&url)
                .timeout(Duration::from_secs(365 * 24 * 3600));
            if with_auth {
                if let Some(h) = self.config.auth.header() {
                    req = req.header(reqwest::header::AUTHORIZATION, h);
                }
            }
            let resp = tokio::time::timeout(FOLLOW_IDLE_TIMEOUT, req.send())
                .await
                .map_err(|_| self.silent(FOLLOW_IDLE_TIMEOUT))?
                .map_err(|e| self.transport_error(e))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !with_auth && self.config.auth != Auth::None {
                with_auth = true;
                continue;
            }
            if !status.is_success() {
                let bytes = self.read_body(resp, MAX_ERROR_BYTES).await?;
                return Err(error_from(status, &bytes));
            }
            break resp;
        };
        let mut events = SseBuffer::default();
        loop {
            let chunk = tokio::time::timeout(FOLLOW_IDLE_TIMEOUT, resp.chunk())
                .await
                .map_err(|_| self.silent(FOLLOW_IDLE_TIMEOUT))?
                .map_err(|e| self.transport_error(e))?;
            let Some(chunk) = chunk else {
                return Ok(());
            };
            for block in events.push(&chunk)? {
                if let Some(event) = parse_sse_event(&block) {
                    on_event(event);
                }
            }
        }
    }

    fn silent(&self, idle: Duration) -> ClientError {
        ClientError::Timeout(format!(
            "the gateway at {} sent nothing for {} s (the connection is lost)",
            self.config.address,
            idle.as_secs()
        ))
    }

    /// Creates a cluster with the given option values; returns its name.
    pub async fn create(&self, options: Map<String, Value>) -> Result<String, ClientError> {
        let body = CreateClusterRequest {
            cluster_options: Some(Value::Object(options)),
        };
        let r: Option<CreateClusterResponse> = self
            .call(Method::POST, "/api/v1/clusters/", Some(&body))
            .await?;
        r.map(|r| r.name).ok_or_else(|| ClientError::Server {
            status: 204,
            message: "no cluster name in the answer".into(),
        })
    }

    /// One cluster's model.
    pub async fn get(&self, name: &str) -> Result<ClusterModel, ClientError> {
        self.get_json(&format!("/api/v1/clusters/{}", check_name(name)?))
            .await
    }

    /// Waits until the cluster is RUNNING (using the gateway's `?wait` long poll); fails if it
    /// stops or fails first, or after `timeout`.
    pub async fn wait_until_running(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<ClusterModel, ClientError> {
        let name = check_name(name)?;
        // A timeout too long to add to the clock waits without end.
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return Err(ClientError::Timeout(format!(
                    "cluster {name} was not running after {:.0} s",
                    timeout.as_secs_f64()
                )));
            }
            let path = format!("/api/v1/clusters/{name}?wait");
            let model = match tokio::time::timeout(left, self.get_json::<ClusterModel>(&path)).await
            {
                Ok(r) => r?,
                Err(_) => continue,
            };
            match model.status {
                ClusterStatus::Running => return Ok(model),
                ClusterStatus::Pending => continue,
                other => {
                    return Err(ClientError::ClusterEnded {
                        name: name.to_string(),
                        status: other.as_str().to_string(),
                    })
                }
            }
        }
    }

    /// Sets the number of workers (switches adaptive scaling off). The answer says whether the
    /// gateway clipped the request to a limit.
    pub async fn scale(&self, name: &str, count: u64) -> Result<ScaleResponse, ClientError> {
        let body = ScaleRequest {
            count: Value::from(count),
        };
        self.post_scaling(
            &format!("/api/v1/clusters/{}/scale", check_name(name)?),
            &body,
        )
        .await
    }

    /// Turns adaptive scaling on between `minimum` and `maximum` workers (`None`: no bound).
    pub async fn adapt(
        &self,
        name: &str,
        minimum: Option<u64>,
        maximum: Option<u64>,
    ) -> Result<ScaleResponse, ClientError> {
        let body = AdaptRequest {
            minimum: minimum.map(Value::from).unwrap_or(Value::Null),
            maximum: maximum.map(Value::from).unwrap_or(Value::Null),
            active: true,
        };
        self.post_scaling(
            &format!("/api/v1/clusters/{}/adapt", check_name(name)?),
            &body,
        )
        .await
    }

    async fn post_scaling<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<ScaleResponse, ClientError> {
        let r: Option<ScaleResponse> = self.call(Method::POST, path, Some(body)).await?;
        Ok(r.unwrap_or(ScaleResponse {
            ok: true,
            msg: None,
        }))
    }

    /// Stops a cluster (stopping an unknown or stopped cluster is not an error).
    pub async fn stop(&self, name: &str) -> Result<(), ClientError> {
        self.call::<(), Value>(
            Method::DELETE,
            &format!("/api/v1/clusters/{}", check_name(name)?),
            None,
        )
        .await
        .map(|_| ())
    }

    /// `gateway://<proxy>/<name>`, the address the Python client gives Dask.
    pub fn scheduler_address(&self, name: &str) -> Result<String, ClientError> {
        Ok(format!("gateway://{}/{name}", self.proxy_address()?))
    }

    /// The dashboard's URL for a model (when the cluster has one).
    pub fn dashboard_url(&self, model: &ClusterModel) -> Option<String> {
        let base = self
            .config
            .public_address
            .as_deref()
            .unwrap_or(&self.config.address)
            .trim_end_matches('/');
        model
            .dashboard_route
            .as_ref()
            .map(|route| format!("{base}{route}"))
    }

    /// `host:port` of the scheduler proxy: configured, or the gateway address's own (a bare
    /// port means the address's host with that port).
    pub fn proxy_address(&self) -> Result<String, ClientError> {
        let url = check_address(&self.config.address)?;
        // IPv6 hosts come in brackets, as `host:port` needs them.
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default().unwrap_or(80);
        Ok(match self.config.proxy_address.as_deref() {
            None => format!("{host}:{port}"),
            Some(p) if p.chars().all(|c| c.is_ascii_digit()) => format!("{host}:{p}"),
            Some(p) => p
                .trim_start_matches("gateway://")
                .trim_start_matches("tls://")
                .trim_end_matches('/')
                .to_string(),
        })
    }

    /// The cluster's TLS credentials (it must be RUNNING and yours).
    pub async fn credentials(&self, name: &str) -> Result<ClusterTls, ClientError> {
        let model = self.get(name).await?;
        match (&model.tls_cert, &model.tls_key) {
            (Some(cert), Some(key)) => Ok(ClusterTls::from_pem(cert, key)?),
            _ => Err(ClientError::Conflict(format!(
                "cluster {name} is {}, not running: it has no credentials yet",
                model.status.as_str()
            ))),
        }
    }

    /// Opens TLS to the cluster's scheduler through the proxy (SNI `daskgateway-<name>`).
    pub async fn connect_scheduler(
        &self,
        name: &str,
        tls: &ClusterTls,
    ) -> Result<SchedulerStream, ClientError> {
        connect_via_proxy(&self.proxy_address()?, check_name(name)?, tls).await
    }

    /// Connects to the scheduler and asks for its identity: id, workers, threads and memory.
    /// A scheduler (or a peer) that does not answer within [`IDENTITY_TIMEOUT`] is an error.
    pub async fn scheduler_identity(&self, name: &str) -> Result<SchedulerIdentity, ClientError> {
        let tls = self.credentials(name).await?;
        let ask = async {
            let mut stream = self.connect_scheduler(name, &tls).await?;
            comm::handshake(&mut stream).await?;
            let id = comm::identity(&mut stream).await?;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
            Ok(id)
        };
        tokio::time::timeout(IDENTITY_TIMEOUT, ask)
            .await
            .map_err(|_| {
                ClientError::Timeout(format!(
                    "the scheduler of cluster {name} did not tell its workers within {} s",
                    IDENTITY_TIMEOUT.as_secs()
                ))
            })?
    }
}

/// TLS through the gateway proxy at `proxy` (`host:port`) to cluster `name`'s scheduler.
pub async fn connect_via_proxy(
    proxy: &str,
    name: &str,
    tls: &ClusterTls,
) -> Result<SchedulerStream, ClientError> {
    // The proxy routes on the name; the scheduler's certificate is checked, not the name.
    let sni = format!("daskgateway-{name}");
    Ok(gateway_comm::connect(proxy, &sni, tls, Duration::from_secs(20)).await?)
}

/// The longest request timeout a configuration may set (a day), in seconds.
pub const MAX_REQUEST_TIMEOUT: f64 = 86_400.0;
/// The largest successful API answer read (a listing of thousands of clusters is far less).
const MAX_ANSWER_BYTES: usize = 16 << 20;
/// How much of an error answer is read (its message is shown to the user).
const MAX_ERROR_BYTES: usize = 64 << 10;
/// The largest single server-sent event.
const MAX_EVENT_BYTES: usize = 1 << 20;
/// How long a followed event stream may stay silent (the gateway's keep-alive comes every
/// 15 s) before it counts as lost.
pub const FOLLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long asking a scheduler for its identity may take, TLS through the proxy included.
pub const IDENTITY_TIMEOUT: Duration = Duration::from_secs(30);

/// The gateway address as a URL: `http` or `https`, with a host, and without credentials
/// (they would be sent with every request, and printed in every scheduler address).
fn check_address(address: &str) -> Result<reqwest::Url, ClientError> {
    let bad = |why: &str| ClientError::Config(format!("the gateway address {address:?} {why}"));
    let url = reqwest::Url::parse(address).map_err(|e| bad(&format!("is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("must start with http:// or https://"));
    }
    if url.host().is_none() {
        return Err(bad("has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "holds a user name or password: give them with --user / --password or the auth settings instead",
        ));
    }
    Ok(url)
}

/// An error and its causes, outermost first (`a: b: c`), for one-line messages.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// Cluster names go into URL paths: refuse anything but the characters names are made of,
/// and names of dots only (`.` and `..` are path steps).
fn check_name(name: &str) -> Result<&str, ClientError> {
    let ok = !name.is_empty()
        && !name.chars().all(|c| c == '.')
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(name)
    } else {
        Err(ClientError::Invalid(format!(
            "{name:?} is not a cluster name"
        )))
    }
}

/// The typed error for an API answer that is not a success, with the server's message (a
/// body that is no gateway error, such as a proxy's HTML page, is cut to its start).
fn error_from(status: StatusCode, body: &[u8]) -> ClientError {
    const SHOWN: usize = 300;
    let message = serde_json::from_slice::<ErrorBody>(body)
        .map(|b| b.error)
        .unwrap_or_else(|_| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            match text.char_indices().nth(SHOWN) {
                Some((cut, _)) => format!("{}… ({} bytes)", &text[..cut], body.len()),
                None => text.to_string(),
            }
        });
    match status.as_u16() {
        401 => ClientError::Unauthorized(message),
        403 => ClientError::Forbidden(message),
        404 => ClientError::NotFound(message),
        422 => ClientError::Invalid(message),
        409 => ClientError::Conflict(message),
        s => ClientError::Server { status: s, message },
    }
}

/// Where the first server-sent event in `buffer` ends (after its blank line).
fn find_blank_line(buffer: &[u8]) -> Option<usize> {
    buffer.windows(2).position(|w| w == b"\n\n").map(|i| i + 2)
}

/// Bytes of a server-sent event stream, cut into event blocks as they complete. Each byte is
/// searched once, and an event may not grow past [`MAX_EVENT_BYTES`].
#[derive(Default)]
struct SseBuffer {
    pending: Vec<u8>,
    /// How far `pending` has been searched for a blank line.
    searched: usize,
}

impl SseBuffer {
    /// Adds `chunk`; returns the blocks it completed.
    fn push(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, ClientError> {
        self.pending.extend_from_slice(chunk);
        let mut blocks = Vec::new();
        loop {
            // A blank line may straddle the previous search's end.
            let from = self.searched.saturating_sub(1);
            match find_blank_line(&self.pending[from..]) {
                Some(end) => {
                    blocks.push(self.pending.drain(..from + end).collect());
                    self.searched = 0;
                }
                None => {
                    self.searched = self.pending.len();
                    break;
                }
            }
        }
        if self.pending.len() > MAX_EVENT_BYTES {
            return Err(ClientError::Protocol(format!(
                "the event stream sent more than {} KiB without ending an event",
                MAX_EVENT_BYTES >> 10
            )));
        }
        Ok(blocks)
    }
}

/// The cluster event in one server-sent event block (`data:` lines joined); `None` for
/// keep-alive comments and anything else.
fn parse_sse_event(block: &[u8]) -> Option<ClusterEvent> {
    let text = std::str::from_utf8(block).ok()?;
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    if data.is_empty() {
        return None;
    }
    serde_json::from_str(&data.join("\n")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_server_sent_cluster_events() {
        let stream = b": keep-alive\n\nevent: cluster-event\ndata: {\"time\":1,\"type\":\"Warning\",\"reason\":\"WorkerExited\",\"message\":\"m\",\"source\":\"gateway\"}\n\nevent: cluster-ev";
        let first = find_blank_line(stream).unwrap();
        assert!(parse_sse_event(&stream[..first]).is_none());
        let rest = &stream[first..];
        let second = find_blank_line(rest).unwrap();
        let event = parse_sse_event(&rest[..second]).unwrap();
        assert_eq!(
            (event.kind, event.reason.as_str()),
            (EventType::Warning, "WorkerExited")
        );
        assert!(
            find_blank_line(&rest[second..]).is_none(),
            "an incomplete event waits"
        );
    }

    fn client(address: &str, proxy: Option<&str>) -> GatewayClient {
        let mut c = ClientConfig::new(address);
        c.proxy_address = proxy.map(Into::into);
        GatewayClient::new(c).unwrap()
    }

    #[test]
    fn proxy_addresses() {
        let p = |a, p| client(a, p).proxy_address().unwrap();
        assert_eq!(p("http://127.0.0.1:8000", None), "127.0.0.1:8000");
        assert_eq!(p("http://gw.example/prefix", None), "gw.example:80");
        assert_eq!(p("https://gw.example", None), "gw.example:443");
        assert_eq!(p("http://gw:8000", Some("8786")), "gw:8786");
        assert_eq!(p("http://gw:8000", Some("tls://proxy:443")), "proxy:443");
        assert_eq!(p("http://[::1]:8000", None), "[::1]:8000");
        assert_eq!(p("http://[::1]", None), "[::1]:80");
        assert_eq!(
            p("https://[2001:db8::1]/x", Some("8786")),
            "[2001:db8::1]:8786"
        );
        assert_eq!(
            client("http://gw:8000", None)
                .scheduler_address("abc")
                .unwrap(),
            "gateway://gw:8000/abc"
        );
    }

    #[test]
    fn names_and_addresses_are_checked() {
        assert!(check_name("ns.abc-1").is_ok());
        for bad in ["", "../x", "a/b", "a?b", "a b", ".", "..", "..."] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_name("a..b").is_ok());
        for bad in [
            "gw:8000",
            "ftp://gw",
            "http://",
            "http://u:p@gw:8000",
            "http://u@gw:8000",
        ] {
            assert!(
                matches!(
                    GatewayClient::new(ClientConfig::new(bad)),
                    Err(ClientError::Config(_))
                ),
                "{bad}"
            );
        }
        for timeout in [f64::NAN, f64::INFINITY, -1.0, 0.0, 1e19] {
            let mut c = ClientConfig::new("http://gw:8000");
            c.request_timeout = timeout;
            assert!(
                matches!(GatewayClient::new(c), Err(ClientError::Config(_))),
                "{timeout}"
            );
        }
    }

    #[test]
    fn event_streams_are_cut_once_and_bounded() {
        let mut b = SseBuffer::default();
        assert!(b.push(b"data: 1\n").unwrap().is_empty());
        // The blank line arrives split over two chunks.
        let blocks = b.push(b"\ndata: 2\n\n: keep-alive\n").unwrap();
        assert_eq!(
            blocks,
            vec![b"data: 1\n\n".to_vec(), b"data: 2\n\n".to_vec()]
        );
        assert_eq!(b.push(b"\n").unwrap(), vec![b": keep-alive\n\n".to_vec()]);
        let mut endless = SseBuffer::default();
        let chunk = vec![b'x'; 64 << 10];
        let mut failed = false;
        for _ in 0..20 {
            if endless.push(&chunk).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "an event without an end is refused past its limit");
    }

    #[test]
    fn error_bodies_are_cut() {
        let page = format!("<html>{}</html>", "x".repeat(5000));
        let ClientError::Server { message, .. } =
            error_from(StatusCode::BAD_GATEWAY, page.as_bytes())
        else {
            panic!("a server error")
        };
        assert!(
            message.len() < 400 && message.ends_with("(5013 bytes)"),
            "{message}"
        );
        let ClientError::NotFound(m) =
            error_from(StatusCode::NOT_FOUND, br#"{"error": "no such cluster"}"#)
        else {
            panic!("not found")
        };
        assert_eq!(m, "no such cluster");
    }

    #[tokio::test]
    async fn waiting_without_end_does_not_overflow_the_clock() {
        // Nothing listens on port 9 of this host: the wait fails at once, and without a panic.
        let c = client("http://127.0.0.1:9", None);
        let e = c
            .wait_until_running("abc", Duration::MAX)
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
        assert!(e.to_string().contains("onnect"), "the cause is told: {e}");
    }
}

/// What [`GatewayClient::usage`] asks for; unset fields take the gateway's defaults (since
/// the oldest usage kept, until now, by user, every user an admin may see).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UsageRequest {
    /// Window start: RFC 3339, a UTC date (`2026-12-01`), or ms since the Unix epoch.
    pub since: Option<String>,
    /// Window end, in the same forms.
    pub until: Option<String>,
    /// Row grouping.
    pub by: Option<UsageGrouping>,
    /// Only this user's clusters (admins; others may name only themselves).
    pub user: Option<String>,
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
