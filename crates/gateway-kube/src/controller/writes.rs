//! The controller's writes to the API server other than the status: creating and deleting
//! children (rate limited, a few in flight at once, answers not decoded); and its two reads
//! past the caches: a pod's last log lines for a failure's reason, and whether a child the
//! caches miss really is gone.

use super::{Context, Error};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, LogParams, PostParams, PropagationPolicy};
use kube::Resource;
use tracing::debug;

/// Creations and deletions sent to the API server at once, by all passes together. Over
/// HTTP/1.1 (an API server or proxy without HTTP/2, or `DISABLE_HTTP2`) each holds a connection,
/// so this also bounds the connections a burst opens: 16 clusters scaling up at once would
/// otherwise open up to 1,600; over HTTP/2 they are streams of one connection. It is the write
/// budget's default burst, so one 100-worker scale-up still goes out at once: with 8 in flight
/// the 100 pod objects took 1.0 s instead of 0.3–0.7 s (each creation waits for its etcd write;
/// many in flight share them), for about the same CPU.
pub(super) const WRITES_IN_FLIGHT: usize = 100;

/// Log lines of a failed scheduler or worker quoted in the cluster's status.
pub(super) const LOG_LINES: i64 = 12;

/// Creates `obj`, a child of cluster `id`, unless it exists already (rate limited in `id`'s
/// turn, at most [`WRITES_IN_FLIGHT`] at once). The API server's answer (the whole object) is
/// read but not decoded: nothing uses it.
pub(super) async fn create<K>(ctx: &Context, ns: &str, id: &str, obj: &K) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + serde::Serialize,
{
    let body = serde_json::to_vec(obj).map_err(kube::Error::SerdeError)?;
    let request = kube::core::Request::new(K::url_path(&(), Some(ns)))
        .create(&PostParams::default(), body)
        .map_err(kube::Error::BuildRequest)?;
    ctx.limiter.acquire(id).await;
    let _slot = ctx.in_flight.acquire().await;
    match ctx.client.request_text(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes object `name` of cluster `id` (rate limited in `id`'s turn, at most
/// [`WRITES_IN_FLIGHT`] at once); a missing object is fine. The answer is not decoded.
pub(super) async fn delete<K>(ctx: &Context, ns: &str, id: &str, name: &str) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    let request = kube::core::Request::new(K::url_path(&(), Some(ns)))
        .delete(name, &dp)
        .map_err(kube::Error::BuildRequest)?;
    ctx.limiter.acquire(id).await;
    let _slot = ctx.in_flight.acquire().await;
    match ctx.client.request_text(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes pod `name` of cluster `id` and remembers it until the cache shows it going.
pub(super) async fn delete_pod(ctx: &Context, ns: &str, id: &str, name: &str) -> Result<(), Error> {
    delete::<Pod>(ctx, ns, id, name).await?;
    ctx.expect_deleted(id, name);
    ctx.metrics.pods_deleted.inc();
    Ok(())
}

/// The last lines of the log of pod `pod` of cluster `id`, for failure reasons (empty if
/// unavailable).
pub(super) async fn last_log_lines(
    ctx: &Context,
    ns: &str,
    id: &str,
    pod: &str,
    container: &str,
    lines: i64,
) -> String {
    ctx.limiter.acquire(id).await;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let lp = LogParams {
        container: Some(container.into()),
        tail_lines: Some(lines),
        ..LogParams::default()
    };
    match api.logs(pod, &lp).await {
        Ok(text) => text.trim().to_string(),
        Err(e) => {
            debug!(pod, "no logs: {e}");
            String::new()
        }
    }
}

/// Whether child `name` of cluster `id` exists, asked of the API server itself (rate limited in
/// `id`'s turn): for a child the caches miss whose loss would fail the cluster, so that a cache
/// that is only behind fails nothing. The answer is not decoded.
pub(super) async fn exists<K>(ctx: &Context, ns: &str, id: &str, name: &str) -> Result<bool, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    let request = kube::core::Request::new(K::url_path(&(), Some(ns)))
        .get(name, &Default::default())
        .map_err(kube::Error::BuildRequest)?;
    ctx.limiter.acquire(id).await;
    match ctx.client.request_text(request).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}
