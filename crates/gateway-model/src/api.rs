//! JSON bodies of the REST API (wire-protocol sections 4, 5 and 9.4).

use crate::status::ClusterStatus;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The cluster model as the stock client parses it. Exactly these eight keys: the client
/// crashes on any extra key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ClusterModel {
    /// Cluster name (unique id).
    pub name: String,
    /// Public status.
    pub status: ClusterStatus,
    /// `/clusters/<name>/status` while RUNNING with a dashboard, else null.
    pub dashboard_route: Option<String>,
    /// Creation time, milliseconds since the Unix epoch. Never null.
    pub start_time: i64,
    /// When the cluster reached STOPPED/FAILED, in milliseconds; null before.
    pub stop_time: Option<i64>,
    /// Validated user options with every exposed field filled in.
    pub options: Map<String, Value>,
    /// PEM certificate while RUNNING, else null.
    pub tls_cert: Option<String>,
    /// PEM private key while RUNNING, else null.
    pub tls_key: Option<String>,
}

/// A cluster as `GET /api/v1/clusters/{name}/details` (and the list with `?details`) shows it
/// to its owner and admins: whose it is, under which group policy, why it stopped. A gateway
/// extension; the stock client never asks for it (its cluster model admits no extra keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ClusterDetails {
    /// Cluster name.
    pub name: String,
    /// The user who owns it.
    pub owner: String,
    /// Public status.
    pub status: ClusterStatus,
    /// Why it stopped or failed (who stopped it, or which policy), once known.
    #[serde(default)]
    pub reason: Option<String>,
    /// The group policy it was created under (`None`: the default `cluster` section).
    #[serde(default)]
    pub group: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub start_time: i64,
    /// When it reached STOPPED/FAILED, ms since the Unix epoch.
    #[serde(default)]
    pub stop_time: Option<i64>,
    /// `/clusters/<name>/status` while RUNNING with a dashboard.
    #[serde(default)]
    pub dashboard_route: Option<String>,
    /// The validated options.
    #[serde(default)]
    pub options: Map<String, Value>,
    /// Workers it currently wants (last scale or adaptive target).
    #[serde(default)]
    pub workers: u64,
    /// When its maximum lifetime ends, ms since the Unix epoch (none: no maximum).
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// Seconds it may run without a client connected through the proxy (none: no limit).
    #[serde(default)]
    pub no_client_timeout: Option<f64>,
    /// Workers that have joined and run (none: the backend does not know).
    #[serde(default)]
    pub workers_running: Option<u64>,
    /// Cores the scheduler and the wanted workers request.
    #[serde(default)]
    pub cores: f64,
    /// Memory (bytes) the scheduler and the wanted workers request.
    #[serde(default)]
    pub memory: u64,
}

/// One user option as `GET /api/v1/options` describes it (wire-protocol section 6).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OptionSpec {
    /// The option's key in `cluster_options`.
    pub field: String,
    /// Display label.
    pub label: String,
    /// Value used when the user gives none.
    pub default: Value,
    /// `{"type": "int" | "float" | "string" | "bool" | "select" | "mapping", ...bounds or choices}`.
    pub spec: Map<String, Value>,
}

/// `GET /api/v1/options` answer: the options in display order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct OptionsResponse {
    /// The exposed options.
    pub cluster_options: Vec<OptionSpec>,
}

/// `POST /api/v1/clusters/` body. A missing or null `cluster_options` means `{}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateClusterRequest {
    /// The user's option values (validated by the server).
    #[serde(default)]
    pub cluster_options: Option<Value>,
}

/// `POST /api/v1/clusters/` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateClusterResponse {
    /// The new cluster's name.
    pub name: String,
}

/// `POST .../scale` body. `count` is kept as raw JSON so a bad value gets a clear 422.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ScaleRequest {
    /// Wanted number of workers.
    #[serde(default)]
    pub count: Value,
}

/// `POST .../adapt` body; the client always sends all three keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AdaptRequest {
    /// Lower bound (null = none).
    #[serde(default)]
    pub minimum: Value,
    /// Upper bound (null = none).
    #[serde(default)]
    pub maximum: Value,
    /// `false` switches adaptive scaling off.
    #[serde(default = "default_true")]
    pub active: bool,
}

fn default_true() -> bool {
    true
}

/// Answer of scale and adapt: `ok` false with a `msg` when the request was clipped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ScaleResponse {
    /// True when nothing was changed from the request.
    pub ok: bool,
    /// Explanation of the clipping, or null.
    pub msg: Option<String>,
}

/// Heartbeat sent by the scheduler preload (wire-protocol 9.4).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Heartbeat {
    /// `tls://host:port` of the scheduler.
    #[serde(default)]
    pub scheduler_address: String,
    /// `http://host:port` of the dashboard, or empty.
    #[serde(default)]
    pub dashboard_address: String,
    /// `http://host:port` of the preload's API.
    #[serde(default)]
    pub api_address: String,
    /// Number of workers the scheduler wants.
    #[serde(default)]
    pub count: i64,
    /// Connected workers that stay.
    #[serde(default)]
    pub active_workers: Vec<String>,
    /// Workers being retired now.
    #[serde(default)]
    pub closing_workers: Vec<String>,
    /// Workers that have left.
    #[serde(default)]
    pub closed_workers: Vec<String>,
}

/// Message forwarded to the preload's `/api/comm`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum SchedulerMessage {
    /// Set the worker count (switches adaptive scaling off).
    Scale {
        /// Wanted workers.
        count: u64,
    },
    /// Configure adaptive scaling.
    Adapt {
        /// Lower bound.
        minimum: Option<u64>,
        /// Upper bound.
        maximum: Option<u64>,
        /// On or off.
        active: bool,
    },
}

/// Error body of every API error: `{"error": "..."}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ErrorBody {
    /// Human readable message.
    pub error: String,
}

/// Parses a JSON value as a non-negative integer (accepting integral floats such as `2.0`).
pub fn as_count(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1e15)
                .map(|f| f as u64)
        }),
        _ => None,
    }
}

/// Renders a JSON value the way Python's `repr` would show it in error messages.
pub fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::String(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(py_repr).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("'{}': {}", k, py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Number(n) => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cluster_model_has_exactly_the_client_keys() {
        let m = ClusterModel {
            name: "abc".into(),
            status: ClusterStatus::Pending,
            dashboard_route: None,
            start_time: 1,
            stop_time: None,
            options: Map::new(),
            tls_cert: None,
            tls_key: None,
        };
        let v = serde_json::to_value(&m).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "dashboard_route",
                "name",
                "options",
                "start_time",
                "status",
                "stop_time",
                "tls_cert",
                "tls_key"
            ]
        );
    }

    #[test]
    fn counts() {
        assert_eq!(as_count(&json!(3)), Some(3));
        assert_eq!(as_count(&json!(3.0)), Some(3));
        assert_eq!(as_count(&json!(-1)), None);
        assert_eq!(as_count(&json!(1.5)), None);
        assert_eq!(as_count(&json!("2")), None);
        assert_eq!(as_count(&json!(null)), None);
    }

    #[test]
    fn scheduler_messages() {
        assert_eq!(
            serde_json::to_value(SchedulerMessage::Scale { count: 2 }).unwrap(),
            json!({"op": "scale", "count": 2})
        );
        assert_eq!(
            serde_json::to_value(SchedulerMessage::Adapt {
                minimum: None,
                maximum: Some(3),
                active: true
            })
            .unwrap(),
            json!({"op": "adapt", "minimum": null, "maximum": 3, "active": true})
        );
    }

    #[test]
    fn python_repr() {
        assert_eq!(py_repr(&json!("x")), "'x'");
        assert_eq!(py_repr(&json!([1, "a"])), "[1, 'a']");
        assert_eq!(py_repr(&json!(true)), "True");
    }
}

/// Whether an event reports normal progress or something that went wrong (as Kubernetes
/// classifies its Events).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum EventType {
    /// Progress: created, started, scaled, stopped.
    Normal,
    /// Something the user may need to act on: a failure, a refusal, a killed process.
    Warning,
}

/// One thing that happened to a cluster, as `GET /api/v1/clusters/{name}/events` lists it
/// (oldest first). A gateway extension.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ClusterEvent {
    /// When, ms since the Unix epoch.
    pub time: i64,
    /// `Normal` or `Warning`.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// What happened, in UpperCamelCase (`Created`, `SchedulerStarted`, `WorkerExited`,
    /// `FailedScheduling`, ...).
    pub reason: String,
    /// What happened, in words.
    pub message: String,
    /// Where it was seen: `gateway`, `scheduler`, `worker <name>`, or a Kubernetes object
    /// such as `Pod/dask-worker-...`.
    #[serde(default)]
    pub source: String,
}

impl ClusterEvent {
    /// An event of `kind` seen by `source` at `time` (ms since the epoch).
    pub fn new(
        time: i64,
        kind: EventType,
        reason: impl Into<String>,
        message: impl Into<String>,
        source: impl Into<String>,
    ) -> Self {
        ClusterEvent {
            time,
            kind,
            reason: reason.into(),
            message: message.into(),
            source: source.into(),
        }
    }
}

/// The body of `GET /api/v1/clusters/{name}/events`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ClusterEvents {
    /// The cluster's events, oldest first (at most the most recent few hundred).
    pub events: Vec<ClusterEvent>,
}
