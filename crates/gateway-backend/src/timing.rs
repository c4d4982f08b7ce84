//! The timing every cluster of one gateway runs with, from the operator's `cluster` section:
//! what schedulers are told (heartbeat and adaptive periods) and what the backend enforces
//! (start and heartbeat timeouts, worker start failures). One value, handed to whichever
//! backend runs the clusters.

/// Timing of a gateway's clusters (seconds, except the failure count).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClusterTiming {
    /// Seconds between scheduler heartbeats (`--dg-heartbeat-period`).
    pub heartbeat_period: f64,
    /// Seconds between the scheduler's adaptive-scaling decisions (`--dg-adaptive-period`).
    pub adaptive_period: f64,
    /// Seconds a scheduler may take to start before its cluster fails.
    pub start_timeout: f64,
    /// Seconds a running cluster may go without a heartbeat before it fails.
    pub heartbeat_timeout: f64,
    /// Consecutive worker start failures that fail the cluster.
    pub worker_start_failure_limit: u32,
}

impl Default for ClusterTiming {
    /// The configuration's defaults: heartbeats every 15 s (30 s without one fail a running
    /// cluster), adaptive decisions every 3 s, 60 s to start, 3 worker failures.
    fn default() -> Self {
        ClusterTiming {
            heartbeat_period: 15.0,
            adaptive_period: 3.0,
            start_timeout: 60.0,
            heartbeat_timeout: 30.0,
            worker_start_failure_limit: 3,
        }
    }
}
