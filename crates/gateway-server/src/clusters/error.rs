//! What the cluster rules answer when they refuse: [`ClusterError`] (the API maps each to a
//! status code) and who asks to stop a cluster ([`Requester`]).

use crate::auth::User;
use gateway_backend::BackendError;

/// Failures the API maps to status codes.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// 404.
    #[error("Cluster {0} not found")]
    NotFound(String),
    /// 403.
    #[error("User {user} lacks permissions to {action} cluster {name}")]
    Forbidden {
        /// Who asked.
        user: String,
        /// What they tried.
        action: &'static str,
        /// Which cluster.
        name: String,
    },
    /// 403: a user asked for another user's usage.
    #[error("User {user} lacks permissions to view the usage of user {other}")]
    ForbiddenUsage {
        /// Who asked.
        user: String,
        /// Whose usage they asked for.
        other: String,
    },
    /// 422: bad input.
    #[error("{0}")]
    Invalid(String),
    /// 422 (the stock client's `ValueError`, as the protocol asks): a new cluster would
    /// exceed one of its owner's quotas; the message names the quota.
    #[error("{0}")]
    QuotaExceeded(String),
    /// 409: the cluster cannot take the request in its state.
    #[error("cluster {0} is not running")]
    NotRunning(String),
    /// 409: the backend refused the request in the cluster's state.
    #[error("{0}")]
    Conflict(String),
    /// 401 on token-only routes.
    #[error("Unauthorized")]
    BadToken,
    /// 503: the backend's store or platform does not answer.
    #[error("{0}")]
    Unavailable(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl From<BackendError> for ClusterError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::NotFound(n) => ClusterError::NotFound(n),
            BackendError::Invalid(m) => ClusterError::Invalid(m),
            BackendError::Conflict(m) => ClusterError::Conflict(m),
            BackendError::Unavailable(m) => ClusterError::Unavailable(m),
            BackendError::Internal(m) => ClusterError::Internal(m),
        }
    }
}

/// Who asks to stop a cluster.
pub enum Requester<'a> {
    /// An authenticated user.
    User(&'a User),
    /// The cluster itself, by its token (the preload's idle timeout).
    Token(&'a str),
}
