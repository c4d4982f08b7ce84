//! The local backend: Dask schedulers and workers as processes on this machine.
//!
//! * [`engine`]: [`LocalBackend`], the [`gateway_backend::ClusterBackend`] that owns every
//!   cluster's lifecycle (heartbeat bookkeeping, timeouts, worker failures, teardown, recovery
//!   after a restart) as one reconcile per cluster.
//! * [`store`]: its durable state, one SQLite file in the data directory.
//! * [`setup`]: opening it all from its settings: the data directory (locked against a second
//!   gateway), the store, the launcher and the engine.
//! * [`launch`]: [`Launcher`] lays out a private working directory per cluster (credentials
//!   mode 0600) and launches `dask scheduler` (with `dask_gateway.scheduler_preload`) and
//!   `dask worker` with the environment and flags of wire-protocol section 9; the engine uses it
//!   through the [`Processes`] trait so its rules can be tested without processes.
//! * [`forkserver`]: a long-lived Python per environment that has imported `distributed` and
//!   forks workers and schedulers from itself (milliseconds instead of a second of imports).
//! * [`identity`]: which OS account runs each user's processes (single-user by default; one
//!   uid per user with isolation).
//! * [`process`]: process identity (pid + kernel start time, so a recycled pid is never
//!   mistaken for ours), process-group signals and exit watching.
//!
//! Processes run in their own process group, so they outlive a gateway restart (even `kill -9`)
//! and are re-adopted by pid afterwards.

#![warn(missing_docs)]

pub mod engine;
pub mod error;
pub mod forkserver;
pub mod identity;
pub mod launch;
pub mod process;
pub mod setup;
pub mod store;

pub use engine::{EngineConfig, LocalBackend};
pub use identity::{Identities, Identity, Isolation};
pub use launch::{
    BoxFuture, DaskLaunch, ForkConfig, LaunchConfig, Launcher, LocalError, Processes,
    SchedulerSpec, WorkerSpec,
};
pub use process::{group_leaders_under, ProcessExit, ProcessId, ProcessRole};
pub use setup::{LocalSetup, OpenedBackend, SetupError};
pub use store::{Store, StoreError};
