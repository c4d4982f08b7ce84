//! [`PodCache`]: the controller's watch cache of its installation's pods, read one cluster at
//! a time.
//!
//! A reconcile pass reads the pods of one cluster. kube-runtime's `Store` finds an object by
//! name only, so a pass that read its cluster's pods from it went over every pod of the
//! installation: with `n` clusters of `w` workers, a pass cost `n·w` label comparisons, and the
//! passes of a busy installation grew with the square of its clusters. This cache keeps the
//! pods grouped by namespace and cluster (the `dask-gateway-rs.io/cluster` label), so a pass
//! reads only its own cluster's pods.
//!
//! It is filled from the watch's events as kube-runtime's store is: an applied pod replaces
//! its last version (moving to another cluster if its label changed), a deleted one goes, and a
//! listing (the first, or again after the watch lost its place) is built aside and replaces
//! the whole cache when it completes, so that readers never see a half-listed cache. The
//! cache is ready once its first listing completes.

use crate::lean::LeanPod;
use crate::names;
use kube::runtime::watcher::Event;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// The pods of one namespace: by cluster, then by name; and the cluster of each pod.
#[derive(Default)]
struct Namespace {
    /// Each cluster's pods, by name.
    clusters: HashMap<String, HashMap<String, LeanPod>>,
    /// The cluster each pod was filed under, by pod name: where an update or a deletion
    /// finds the pod's last version.
    cluster_of: HashMap<String, String>,
}

/// Every pod the watch shows, by namespace.
#[derive(Default)]
struct Pods(HashMap<String, Namespace>);

impl Pods {
    /// Files `pod` under its cluster, replacing its last version (wherever that was filed).
    /// A pod without a cluster label is only removed.
    fn apply(&mut self, pod: &LeanPod) {
        let (ns, name) = (namespace_of(pod), name_of(pod));
        let Some(cluster) = cluster_of(pod) else {
            self.remove(pod);
            return;
        };
        let entry = slot(&mut self.0, ns);
        if entry.cluster_of.get(name).is_some_and(|c| c != cluster) {
            entry.forget(name);
        }
        let pods = slot(&mut entry.clusters, cluster);
        match pods.get_mut(name) {
            Some(last) => *last = pod.clone(),
            None => {
                pods.insert(name.to_string(), pod.clone());
                entry
                    .cluster_of
                    .insert(name.to_string(), cluster.to_string());
            }
        }
    }

    /// The pods filed under cluster `cluster` of namespace `ns`.
    fn cluster(&self, ns: &str, cluster: &str) -> Option<&HashMap<String, LeanPod>> {
        self.0.get(ns)?.clusters.get(cluster)
    }

    /// Removes `pod` (found by its namespace and name).
    fn remove(&mut self, pod: &LeanPod) {
        let ns = namespace_of(pod);
        if let Some(entry) = self.0.get_mut(ns) {
            entry.forget(name_of(pod));
            if entry.cluster_of.is_empty() {
                self.0.remove(ns);
            }
        }
    }
}

impl Namespace {
    /// Removes pod `name` from the cluster it was filed under.
    fn forget(&mut self, name: &str) {
        let Some(cluster) = self.cluster_of.remove(name) else {
            return;
        };
        if let Some(pods) = self.clusters.get_mut(&cluster) {
            pods.remove(name);
            if pods.is_empty() {
                self.clusters.remove(&cluster);
            }
        }
    }
}

/// What the reader and the writer share.
#[derive(Default)]
struct Shared {
    /// The pods as the watch last showed them.
    current: Pods,
    /// A listing under way, built aside until it completes.
    listing: Option<Pods>,
}

/// The reading side: the pods of a cluster, and whether the first listing is complete.
/// Clones share the cache.
#[derive(Clone)]
pub struct PodCache {
    shared: Arc<RwLock<Shared>>,
    ready: tokio::sync::watch::Receiver<bool>,
}

/// The writing side, fed every event of the pod watch in order.
pub struct PodCacheWriter {
    shared: Arc<RwLock<Shared>>,
    ready: tokio::sync::watch::Sender<bool>,
}

/// An empty cache, not ready until its writer has applied a complete listing.
pub fn pod_cache() -> (PodCache, PodCacheWriter) {
    let shared = Arc::new(RwLock::new(Shared::default()));
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    (
        PodCache {
            shared: shared.clone(),
            ready: ready_rx,
        },
        PodCacheWriter {
            shared,
            ready: ready_tx,
        },
    )
}

impl PodCache {
    /// The pods of cluster `cluster` in namespace `ns`, in no particular order.
    pub fn cluster_pods(&self, ns: &str, cluster: &str) -> Vec<LeanPod> {
        let shared = self.shared.read().unwrap_or_else(|e| e.into_inner());
        shared
            .current
            .cluster(ns, cluster)
            .map(|pods| pods.values().cloned().collect())
            .unwrap_or_default()
    }

    /// How many pods cluster `cluster` in namespace `ns` has.
    pub fn count(&self, ns: &str, cluster: &str) -> usize {
        let shared = self.shared.read().unwrap_or_else(|e| e.into_inner());
        shared.current.cluster(ns, cluster).map_or(0, HashMap::len)
    }

    /// Waits until the first listing is complete; false if the writer went before that.
    /// Any number of tasks may wait at once.
    pub async fn wait_until_ready(&self) -> bool {
        let mut ready = self.ready.clone();
        // Bound first: the result borrows `ready`, which must outlive it.
        let waited = ready.wait_for(|r| *r).await;
        waited.is_ok()
    }
}

impl PodCacheWriter {
    /// Applies one event of the pod watch (named as kube-runtime's store names it).
    pub fn apply_watcher_event(&mut self, event: &Event<LeanPod>) {
        let mut shared = self.shared.write().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Apply(pod) => shared.current.apply(pod),
            Event::Delete(pod) => shared.current.remove(pod),
            Event::Init => shared.listing = Some(Pods::default()),
            Event::InitApply(pod) => shared.listing.get_or_insert_default().apply(pod),
            Event::InitDone => {
                shared.current = shared.listing.take().unwrap_or_default();
                drop(shared);
                self.ready.send_replace(true);
            }
        }
    }
}

/// The value of `map` at `key`, inserted (as the default) if missing. Looked up by reference
/// first, so that the common case, a key already there, allocates nothing.
fn slot<'a, V: Default>(map: &'a mut HashMap<String, V>, key: &str) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("inserted just above")
}

fn namespace_of(pod: &LeanPod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or_default()
}

fn name_of(pod: &LeanPod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

fn cluster_of(pod: &LeanPod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()?
        .get(names::LABEL_CLUSTER)
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::ObjectMeta;

    fn pod(ns: &str, name: &str, cluster: Option<&str>, version: &str) -> LeanPod {
        LeanPod(Arc::new(Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                resource_version: Some(version.into()),
                labels: cluster.map(|c| [(names::LABEL_CLUSTER.to_string(), c.to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }))
    }

    fn names(cache: &PodCache, ns: &str, cluster: &str) -> Vec<(String, String)> {
        let mut out: Vec<_> = cache
            .cluster_pods(ns, cluster)
            .iter()
            .map(|p| {
                (
                    name_of(p).to_string(),
                    p.metadata.resource_version.clone().unwrap_or_default(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn listed(writer: &mut PodCacheWriter, pods: &[LeanPod]) {
        writer.apply_watcher_event(&Event::Init);
        for p in pods {
            writer.apply_watcher_event(&Event::InitApply(p.clone()));
        }
        writer.apply_watcher_event(&Event::InitDone);
    }

    fn pair(name: &str, version: &str) -> (String, String) {
        (name.to_string(), version.to_string())
    }

    #[test]
    fn a_cluster_reads_its_own_pods_in_its_own_namespace_only() {
        let (cache, mut writer) = pod_cache();
        listed(
            &mut writer,
            &[
                pod("a", "w1", Some("c1"), "1"),
                pod("a", "w2", Some("c1"), "1"),
                pod("a", "w3", Some("c2"), "1"),
                pod("b", "w1", Some("c1"), "1"),
                pod("a", "stray", None, "1"),
            ],
        );
        assert_eq!(names(&cache, "a", "c1"), [pair("w1", "1"), pair("w2", "1")]);
        assert_eq!(names(&cache, "a", "c2"), [pair("w3", "1")]);
        assert_eq!(names(&cache, "b", "c1"), [pair("w1", "1")]);
        assert_eq!(cache.count("a", "c1"), 2);
        assert_eq!(cache.count("a", "nope"), 0);
        assert!(cache.cluster_pods("c", "c1").is_empty());
    }

    #[test]
    fn updates_replace_deletions_remove_and_a_relabelled_pod_moves() {
        let (cache, mut writer) = pod_cache();
        listed(&mut writer, &[pod("a", "w1", Some("c1"), "1")]);
        writer.apply_watcher_event(&Event::Apply(pod("a", "w1", Some("c1"), "2")));
        writer.apply_watcher_event(&Event::Apply(pod("a", "w2", Some("c1"), "1")));
        assert_eq!(names(&cache, "a", "c1"), [pair("w1", "2"), pair("w2", "1")]);
        // Relabelled: it leaves c1 for c2; without the label it is in no cluster.
        writer.apply_watcher_event(&Event::Apply(pod("a", "w1", Some("c2"), "3")));
        assert_eq!(names(&cache, "a", "c1"), [pair("w2", "1")]);
        assert_eq!(names(&cache, "a", "c2"), [pair("w1", "3")]);
        writer.apply_watcher_event(&Event::Apply(pod("a", "w1", None, "4")));
        assert!(names(&cache, "a", "c2").is_empty());
        // A deletion finds the pod by its name, whatever labels the event carries.
        writer.apply_watcher_event(&Event::Delete(pod("a", "w2", None, "2")));
        assert!(names(&cache, "a", "c1").is_empty());
        let shared = cache.shared.read().unwrap();
        assert!(shared.current.0.is_empty(), "nothing left behind");
    }

    #[tokio::test]
    async fn a_relisting_replaces_the_cache_when_complete_and_readiness_wakes_every_waiter() {
        let (cache, mut writer) = pod_cache();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.wait_until_ready().await })
            })
            .collect();
        tokio::task::yield_now().await;
        listed(
            &mut writer,
            &[
                pod("a", "w1", Some("c1"), "1"),
                pod("a", "w2", Some("c1"), "1"),
            ],
        );
        for w in waiters {
            assert!(w.await.unwrap(), "every waiter is woken");
        }
        // A relisting under way: readers still see the last complete listing.
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitApply(pod("a", "w2", Some("c1"), "5")));
        assert_eq!(names(&cache, "a", "c1"), [pair("w1", "1"), pair("w2", "1")]);
        // Complete: w1, gone meanwhile, is gone.
        writer.apply_watcher_event(&Event::InitDone);
        assert_eq!(names(&cache, "a", "c1"), [pair("w2", "5")]);
        assert!(cache.wait_until_ready().await);
    }

    #[tokio::test]
    async fn a_writer_gone_before_the_first_listing_is_not_ready() {
        let (cache, writer) = pod_cache();
        drop(writer);
        assert!(!cache.wait_until_ready().await);
    }
}
