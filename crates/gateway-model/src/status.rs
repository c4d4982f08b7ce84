//! The public cluster lifecycle: `PENDING → RUNNING → STOPPING → STOPPED | FAILED`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Public status of a cluster, serialised in upper case as the client expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum ClusterStatus {
    /// Accepted; the scheduler is starting and not yet reachable.
    Pending,
    /// Scheduler up and routed; ready for clients, scale and adapt.
    Running,
    /// Stop requested or failure detected; processes are being torn down.
    Stopping,
    /// Ended on request.
    Stopped,
    /// Ended by a failure.
    Failed,
}

/// A status name that is not one of the five known ones.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a valid ClusterStatus")]
pub struct UnknownStatus(pub String);

impl ClusterStatus {
    /// All statuses, in lifecycle order.
    pub const ALL: [ClusterStatus; 5] = [
        ClusterStatus::Pending,
        ClusterStatus::Running,
        ClusterStatus::Stopping,
        ClusterStatus::Stopped,
        ClusterStatus::Failed,
    ];

    /// The wire name (upper case).
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterStatus::Pending => "PENDING",
            ClusterStatus::Running => "RUNNING",
            ClusterStatus::Stopping => "STOPPING",
            ClusterStatus::Stopped => "STOPPED",
            ClusterStatus::Failed => "FAILED",
        }
    }

    /// Active clusters are the ones listed by default: PENDING and RUNNING.
    pub fn is_active(self) -> bool {
        matches!(self, ClusterStatus::Pending | ClusterStatus::Running)
    }

    /// Terminal states never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, ClusterStatus::Stopped | ClusterStatus::Failed)
    }

    /// Whether the lifecycle allows moving from `self` to `next`.
    ///
    /// Allowed: PENDING→RUNNING, PENDING|RUNNING→STOPPING, STOPPING→STOPPED|FAILED, and the
    /// direct PENDING|RUNNING→FAILED used when a failure needs no teardown.
    pub fn can_transition_to(self, next: ClusterStatus) -> bool {
        use ClusterStatus::*;
        matches!(
            (self, next),
            (Pending, Running)
                | (Pending, Stopping)
                | (Running, Stopping)
                | (Pending, Failed)
                | (Running, Failed)
                | (Stopping, Stopped)
                | (Stopping, Failed)
        )
    }

    /// Parses a comma-separated, case-insensitive status filter such as `running,PENDING`.
    pub fn parse_filter(filter: &str) -> Result<Vec<ClusterStatus>, UnknownStatus> {
        filter.split(',').map(|s| s.parse()).collect()
    }
}

impl FromStr for ClusterStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.trim().to_ascii_uppercase();
        ClusterStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == upper)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

impl fmt::Display for ClusterStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_case_insensitively() {
        assert_eq!(
            "running".parse::<ClusterStatus>(),
            Ok(ClusterStatus::Running)
        );
        assert_eq!(
            "Stopped".parse::<ClusterStatus>(),
            Ok(ClusterStatus::Stopped)
        );
        assert_eq!(
            ClusterStatus::parse_filter("RUNNING,pending").unwrap(),
            vec![ClusterStatus::Running, ClusterStatus::Pending]
        );
    }

    #[test]
    fn rejects_unknown_and_empty() {
        let err = ClusterStatus::parse_filter("").unwrap_err();
        assert_eq!(err.to_string(), "'' is not a valid ClusterStatus");
        assert!(ClusterStatus::parse_filter("running,bogus").is_err());
    }

    #[test]
    fn lifecycle_transitions() {
        use ClusterStatus::*;
        assert!(Pending.can_transition_to(Running));
        assert!(Running.can_transition_to(Stopping));
        assert!(Stopping.can_transition_to(Stopped));
        assert!(Stopping.can_transition_to(Failed));
        assert!(!Stopped.can_transition_to(Running));
        assert!(!Failed.can_transition_to(Stopping));
        assert!(!Running.can_transition_to(Pending));
        assert!(!Stopping.can_transition_to(Running));
        for s in ClusterStatus::ALL {
            if s.is_terminal() {
                assert!(ClusterStatus::ALL.iter().all(|n| !s.can_transition_to(*n)));
            }
        }
    }

    #[test]
    fn serialises_upper_case() {
        assert_eq!(
            serde_json::to_string(&ClusterStatus::Running).unwrap(),
            "\"RUNNING\""
        );
    }
}
