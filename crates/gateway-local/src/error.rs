//! The local backend's error type, shared by the launcher and user identities.

use std::path::PathBuf;

/// Failures of the local backend.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A name that is not safe to use in a path.
    #[error("invalid name {0:?}")]
    BadName(String),
    /// Creating the working directory or credential files failed.
    #[error("preparing {path}: {source}")]
    Prepare {
        /// What was being written.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The user has no account to run as (user isolation).
    #[error("{0}")]
    Identity(String),
    /// A cluster's Python environment has no `bin/dask` (or is not an absolute path).
    #[error(
        "the Python environment {0:?} has no bin/dask (an absolute path to a venv or conda prefix)"
    )]
    NoPythonEnv(String),
    /// The Dask command could not be started.
    #[error("starting {command}: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// Why it failed.
        source: std::io::Error,
    },
}
