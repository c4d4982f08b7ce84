//! What can go wrong talking to a gateway.

/// Errors of [`crate::GatewayClient`] and the scheduler connection helpers.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway refused the credentials (401), or none are configured.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The user may not act on this cluster (403).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// No such cluster, or it belongs to someone else (404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The request was invalid: bad options, bad bounds, over a quota (422).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The cluster is not in a state for this (409), e.g. scaling a pending cluster.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The gateway failed (5xx) or answered something unexpected.
    #[error("gateway error (HTTP {status}): {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// The gateway's message.
        message: String,
    },
    /// The gateway could not be reached.
    #[error("cannot reach the gateway at {address}: {}", crate::error_chain(.source))]
    Connect {
        /// The address tried.
        address: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The proxy refused or dropped the scheduler connection, or TLS failed.
    #[error("scheduler connection through the proxy failed: {0}")]
    Proxy(String),
    /// The scheduler answered something that is not the Dask protocol.
    #[error("Dask protocol error: {0}")]
    Protocol(String),
    /// Waiting ran out of time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The cluster stopped or failed while waiting for it.
    #[error("cluster {name} is {status}")]
    ClusterEnded {
        /// The cluster.
        name: String,
        /// Its final status.
        status: String,
    },
    /// The client configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// A process exit code for command-line tools: 3 not found, 4 unauthorized or forbidden,
    /// 5 invalid request, 6 conflict or ended cluster, 7 timeout, 1 anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::NotFound(_) => 3,
            ClientError::Unauthorized(_) | ClientError::Forbidden(_) => 4,
            ClientError::Invalid(_) | ClientError::Config(_) => 5,
            ClientError::Conflict(_) | ClientError::ClusterEnded { .. } => 6,
            ClientError::Timeout(_) => 7,
            _ => 1,
        }
    }
}

impl From<gateway_comm::CommError> for ClientError {
    fn from(e: gateway_comm::CommError) -> Self {
        use gateway_comm::CommError;
        match e {
            CommError::Connection(m) | CommError::Tls(m) => ClientError::Proxy(m),
            CommError::Protocol(m) => ClientError::Protocol(m),
        }
    }
}
