//! A cluster's events on Kubernetes: the core/v1 Events of its DaskCluster and its pods (the
//! scheduler's `FailedScheduling`, image pulls, OOM kills, evictions, and what the controller
//! and the gateway record on the DaskCluster), read on demand, and the recording of new ones.
//!
//! Kubernetes keeps Events for the API server's `--event-ttl` (one hour by default), so a
//! cluster's history on this backend reaches back that far.

use crate::names;
use gateway_model::{ClusterEvent, EventType};
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
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

/// When an Event last happened, ms since the epoch.
fn event_time(event: &Event) -> i64 {
    let micros = event.event_time.as_ref().map(|t| t.0.as_millisecond());
    let last = event.last_timestamp.as_ref().map(|t| t.0.as_millisecond());
    let first = event.first_timestamp.as_ref().map(|t| t.0.as_millisecond());
    let created = event
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_millisecond());
    last.or(micros).or(first).or(created).unwrap_or(0)
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
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        count: Some(1),
        source: Some(EventSource {
            component: Some(format!("{COMPONENT}-{}", event.source)),
            host: None,
        }),
        ..Event::default()
    };
    api.create(&PostParams::default(), &object).await?;
    Ok(())
}
