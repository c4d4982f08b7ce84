//! The local process backend: Dask schedulers and workers as processes on this machine.
//!
//! * [`credentials`] makes each cluster's self-signed TLS pair and API token.
//! * [`process`] identifies processes robustly (pid + kernel start time, so a recycled pid is
//!   never mistaken for ours), signals whole process groups and watches for exits.
//! * [`LocalBackend`] lays out a private working directory per cluster and launches
//!   `dask scheduler` (with the `dask_gateway.scheduler_preload`) and `dask worker` with the
//!   environment and flags of wire-protocol section 9.
//!
//! Processes run in their own process group, so they outlive a gateway restart (even `kill -9`)
//! and are re-adopted by pid afterwards; the gateway decides what to keep from its state store.

#![warn(missing_docs)]

pub mod backend;
pub mod credentials;
pub mod process;

pub use backend::{LocalBackend, LocalConfig, LocalError, SchedulerSpec, WorkerSpec};
pub use credentials::{new_api_token, ClusterCredentials};
pub use process::{group_leaders_under, ProcessExit, ProcessId, ProcessRole};
