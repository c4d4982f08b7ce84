//! Wire types shared by the Dask Gateway server and its clients.
//!
//! Everything here is plain data plus the pure rules that go with it: the cluster status
//! machine ([`status`]), the JSON shapes of the REST API ([`api`]), the typed cluster options
//! and their validation ([`options`]), per-cluster resource limits ([`limits`]), usage
//! accounting ([`usage`]) and the rules for text people read ([`text`]). No I/O.

#![warn(missing_docs)]

pub mod api;
pub mod limits;
pub mod options;
pub mod status;
pub mod text;
pub mod usage;

pub use api::*;
pub use limits::{format_memory, parse_memory, ClusterResources, ResourceLimits};
pub use options::{validate_options, OptionField, OptionKind, OptionsError, SelectChoice};
pub use status::{ClusterStatus, UnknownStatus};
pub use usage::{
    ClusterUsage, RunningUnit, UsageAmount, UsageGrouping, UsageHour, UsageLedger, UsageMeter,
    UsageReport, UsageRow,
};
