//! A cluster's events on Kubernetes: the core/v1 Events of its DaskCluster and its pods (the
//! scheduler's `FailedScheduling`, image pulls, OOM kills, evictions, and what the controller
//! and the gateway record on the DaskCluster), read on demand, and the recording of new ones.
//!
//! Kubernetes keeps Events for the API server's `--event-ttl` (one hour by default), so a
//! cluster's history on this backend reaches back that far.

use crate::names;
use gateway_model::{ClusterEvent, EventType};
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, ListParams, PostParams};
use kube::Client;

/// The component name on the Events this project writes.
pub const COMPONENT: &str = "dask-gateway-rs";

/// Whether an Event's object is cluster `id`'s DaskCluster or one of its pods.
fn concerns(event: &Event, id: &str) -> bool {
    let Some(name) = event.involved_object.name.as_deref() else {
        return false;
    };
    match event.involved_object.kind.as_deref() {
        Some("DaskCluster") => name == id,
        Some("Pod") => {
            name == names::scheduler_pod_name(id) || name.starts_with(&names::worker_pod_prefix(id))
        }
        _ => false,
    }
}

/// When an Event last happened, ms since the epoch: the later of its `eventTime` (microseconds)
/// and its `lastTimestamp` (whole seconds, later for a repeated event), else when it was made.
fn event_time(event: &Event) -> i64 {
    let micros = event.event_time.as_ref().map(|t| t.0.as_millisecond());
    let last = event.last_timestamp.as_ref().map(|t| t.0.as_millisecond());
    let first = event.first_timestamp.as_ref().map(|t| t.0.as_millisecond());
    let created = event
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_millisecond());
    match (micros, last) {
        (Some(m), Some(l)) => m.max(l),
        (m, l) => m.or(l).or(first).or(created).unwrap_or(0),
    }
}

/// One Event as the API shows it.
fn to_cluster_event(event: &Event) -> ClusterEvent {
    let kind = if event.type_.as_deref() == Some("Warning") {
        EventType::Warning
    } else {
        EventType::Normal
    };
    let mut message = event.message.clone().unwrap_or_default();
    if let Some(n) = event.count.filter(|n| *n > 1) {
        message = format!("{message} (x{n})");
    }
    let object = &event.involved_object;
    let source = if object.kind.as_deref() == Some("DaskCluster") {
        let component = event
            .source
            .as_ref()
            .and_then(|s| s.component.clone())
            .or_else(|| event.reporting_component.clone())
            .unwrap_or_else(|| "kubernetes".into());
        // Ours are `dask-gateway-rs-<gateway|controller>`: show the part after the prefix.
        component
            .strip_prefix(&format!("{COMPONENT}-"))
            .map(str::to_string)
            .unwrap_or(component)
    } else {
        format!(
            "{}/{}",
            object.kind.as_deref().unwrap_or(""),
            object.name.as_deref().unwrap_or("")
        )
    };
    ClusterEvent::new(
        event_time(event),
        kind,
        event.reason.clone().unwrap_or_default(),
        message,
        source,
    )
}

/// Cluster `id`'s events in `namespace`, oldest first.
pub async fn cluster_events(
    client: Client,
    namespace: &str,
    id: &str,
) -> Result<Vec<ClusterEvent>, kube::Error> {
    let api: Api<Event> = Api::namespaced(client, namespace);
    let list = api.list(&ListParams::default()).await?;
    let mut events: Vec<ClusterEvent> = list
        .items
        .iter()
        .filter(|e| concerns(e, id))
        .map(to_cluster_event)
        .collect();
    events.sort_by_key(|e| e.time);
    Ok(events)
}

/// Records an Event on cluster `id`'s DaskCluster (what `kubectl describe daskcluster` shows).
/// `source` is `gateway` or `controller`.
pub async fn record(
    client: Client,
    namespace: &str,
    id: &str,
    uid: Option<String>,
    event: &ClusterEvent,
) -> Result<(), kube::Error> {
    let api: Api<Event> = Api::namespaced(client, namespace);
    let now =
        jiff::Timestamp::from_millisecond(event.time).unwrap_or_else(|_| jiff::Timestamp::now());
    let object = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{id}.")),
            namespace: Some(namespace.to_string()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some(format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION)),
            kind: Some("DaskCluster".into()),
            name: Some(id.to_string()),
            namespace: Some(namespace.to_string()),
            uid,
            ..ObjectReference::default()
        },
        type_: Some(match event.kind {
            EventType::Normal => "Normal".into(),
            EventType::Warning => "Warning".into(),
        }),
        reason: Some(event.reason.clone()),
        message: Some(event.message.chars().take(1024).collect()),
        // eventTime orders events within a second (the timestamps are whole seconds); with it
        // the API server requires the reporting controller, its instance and an action.
        event_time: Some(MicroTime(now)),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        reporting_component: Some(format!("{COMPONENT}-{}", event.source)),
        reporting_instance: Some(
            std::env::var("HOSTNAME")
                .unwrap_or_else(|_| COMPONENT.to_string())
                .chars()
                .take(128)
                .collect(),
        ),
        action: Some(event.reason.chars().take(128).collect()),
        source: Some(EventSource {
            component: Some(format!("{COMPONENT}-{}", event.source)),
            host: None,
        }),
        ..Event::default()
    };
    api.create(&PostParams::default(), &object).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, name: &str) -> Event {
        Event {
            involved_object: ObjectReference {
                kind: Some(kind.into()),
                name: Some(name.into()),
                ..ObjectReference::default()
            },
            ..Event::default()
        }
    }

    fn at(text: &str) -> jiff::Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn a_clusters_events_are_its_daskclusters_and_its_pods() {
        let id = "0123abcd";
        assert!(concerns(&event("DaskCluster", id), id));
        assert!(concerns(&event("Pod", &names::scheduler_pod_name(id)), id));
        let worker = format!("{}x7k2p", names::worker_pod_prefix(id));
        assert!(concerns(&event("Pod", &worker), id));
        assert!(!concerns(&event("DaskCluster", "0123abcd9"), id));
        assert!(!concerns(&event("Pod", "dask-scheduler-other"), id));
        assert!(!concerns(&event("Service", &names::service_name(id)), id));
    }

    #[test]
    fn events_are_timed_to_the_millisecond_and_repeats_by_their_last_time() {
        let mut e = event("Pod", "p");
        e.last_timestamp = Some(Time(at("2026-12-05T07:00:01Z")));
        e.event_time = Some(MicroTime(at("2026-12-05T07:00:01.250Z")));
        assert_eq!(
            event_time(&e),
            at("2026-12-05T07:00:01.250Z").as_millisecond()
        );
        // Repeated later: its last time wins.
        e.last_timestamp = Some(Time(at("2026-12-05T07:05:00Z")));
        e.count = Some(3);
        e.type_ = Some("Warning".into());
        e.reason = Some("FailedScheduling".into());
        e.message = Some("0/1 nodes are available".into());
        let shown = to_cluster_event(&e);
        assert_eq!(shown.time, at("2026-12-05T07:05:00Z").as_millisecond());
        assert_eq!(shown.kind, EventType::Warning);
        assert_eq!(shown.message, "0/1 nodes are available (x3)");
        assert_eq!(shown.source, "Pod/p");
        // Ours on the DaskCluster name the part of the project that wrote them.
        let mut ours = event("DaskCluster", "c");
        ours.source = Some(EventSource {
            component: Some("dask-gateway-rs-controller".into()),
            host: None,
        });
        assert_eq!(to_cluster_event(&ours).source, "controller");
    }
}
