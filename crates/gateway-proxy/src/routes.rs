//! Where the proxy learns a cluster's addresses: the [`RouteSource`] trait, and a simple
//! shared [`RouteTable`] implementing it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

/// What [`RouteSource::route_soon`] returns: a route, later.
pub type RouteFuture<'a> = Pin<Box<dyn Future<Output = Option<ClusterRoute>> + Send + 'a>>;

/// What the proxy knows about one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterRoute {
    /// The scheduler's TLS address as "host:port" (a leading "tls://" given to `set` is stripped).
    pub scheduler: String,
    /// The dashboard's "host:port" (a leading "http://" is stripped), if it runs one.
    pub dashboard: Option<String>,
}

impl ClusterRoute {
    /// Build a route, normalising the addresses like [`RouteTable::set`] does.
    pub fn new(scheduler: impl Into<String>, dashboard: Option<String>) -> Self {
        ClusterRoute {
            scheduler: scheduler.into(),
            dashboard,
        }
        .normalized()
    }

    /// Strip the `tls://` / `http://` schemes and trailing slashes from the addresses.
    pub fn normalized(self) -> Self {
        let scheduler = strip(&self.scheduler, "tls://");
        let dashboard = self
            .dashboard
            .as_deref()
            .map(|d| strip(d, "http://"))
            .filter(|d| !d.is_empty());
        ClusterRoute {
            scheduler,
            dashboard,
        }
    }
}

fn strip(addr: &str, scheme: &str) -> String {
    let addr = addr.trim();
    let addr = match addr.get(..scheme.len()) {
        Some(head) if head.eq_ignore_ascii_case(scheme) => &addr[scheme.len()..],
        _ => addr,
    };
    addr.trim_end_matches('/').to_string()
}

/// Answers "where does cluster X's scheduler listen?" once per new proxied connection or
/// dashboard request. The gateway implements it over its cluster backend, so a cluster is
/// routable exactly when the backend reports it RUNNING; [`RouteTable`] is a plain table.
pub trait RouteSource: Send + Sync + 'static {
    /// The route of `cluster`, if it is routable now.
    fn route(&self, cluster: &str) -> Option<ClusterRoute>;

    /// The route of `cluster` as soon as it is routable, waiting at most `within` if the
    /// source knows the cluster as starting; unknown clusters get `None` at once. With several
    /// gateway replicas, one may hear that a cluster runs a moment after another has told its
    /// user, who connects at once. The default waits for nothing.
    fn route_soon<'a>(&'a self, cluster: &'a str, within: Duration) -> RouteFuture<'a> {
        let _ = within;
        Box::pin(std::future::ready(self.route(cluster)))
    }

    /// Where spliced scheduler connections are counted, if anywhere.
    fn connections(&self) -> Option<&std::sync::Arc<crate::ClientConnections>> {
        None
    }
}

impl RouteSource for RouteTable {
    fn route(&self, cluster: &str) -> Option<ClusterRoute> {
        self.get(cluster)
    }
}

/// Shared, cheaply cloneable route table (cluster name -> route).
///
/// Clones share the same table. Reads happen once per new connection, writes are rare.
#[derive(Clone, Default, Debug)]
pub struct RouteTable {
    inner: Arc<RwLock<HashMap<String, ClusterRoute>>>,
}

impl RouteTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Insert or replace the route of `cluster` (addresses are normalised, see
    /// [`ClusterRoute::normalized`]).
    pub fn set(&self, cluster: &str, route: ClusterRoute) {
        let route = route.normalized();
        tracing::debug!(cluster = %cluster, scheduler = %route.scheduler, dashboard = ?route.dashboard, "route set");
        self.inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(cluster.to_string(), route);
    }

    /// Remove the route of `cluster` (no-op if absent).
    pub fn remove(&self, cluster: &str) {
        let removed = self
            .inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(cluster);
        if removed.is_some() {
            tracing::debug!(cluster = %cluster, "route removed");
        }
    }

    /// The route of `cluster`, if any.
    pub fn get(&self, cluster: &str) -> Option<ClusterRoute> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(cluster)
            .cloned()
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Names of all routed clusters (unordered).
    pub fn clusters(&self) -> Vec<String> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Replace the whole table at once.
    pub fn replace_all(&self, routes: impl IntoIterator<Item = (String, ClusterRoute)>) {
        let map = routes
            .into_iter()
            .map(|(k, v)| (k, v.normalized()))
            .collect();
        *self.inner.write().unwrap_or_else(PoisonError::into_inner) = map;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_remove() {
        let t = RouteTable::new();
        assert!(t.is_empty());
        t.set(
            "abc",
            ClusterRoute {
                scheduler: "tls://10.0.0.1:8786".into(),
                dashboard: Some("http://10.0.0.1:8787/".into()),
            },
        );
        let clone = t.clone();
        assert_eq!(
            clone.get("abc"),
            Some(ClusterRoute {
                scheduler: "10.0.0.1:8786".into(),
                dashboard: Some("10.0.0.1:8787".into()),
            })
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.get("abcd"), None);
        t.remove("abc");
        assert_eq!(clone.len(), 0);
        t.remove("abc");
    }

    #[test]
    fn plain_addresses_kept() {
        let r = ClusterRoute::new("host:1", None);
        assert_eq!(r.scheduler, "host:1");
        assert_eq!(r.dashboard, None);
        let r = ClusterRoute::new("TLS://host:1", Some(String::new()));
        assert_eq!(r.scheduler, "host:1");
        assert_eq!(r.dashboard, None);
    }
}
