//! Wire types shared by the Dask Gateway server and its clients.
//!
//! Everything here is plain data plus the pure rules that go with it: the cluster status
//! machine ([`status`]), the JSON shapes of the REST API ([`api`]), the typed cluster options
//! and their validation ([`options`]), and per-cluster resource limits ([`limits`]). No I/O.

#![warn(missing_docs)]

pub mod api;
pub mod limits;
pub mod options;
pub mod status;

pub use api::*;
pub use limits::{format_memory, parse_memory, ClusterResources, ResourceLimits};
pub use options::{validate_options, OptionField, OptionKind, OptionsError, SelectChoice};
pub use status::{ClusterStatus, UnknownStatus};
