//! How long a reconcile pass takes to find its cluster's pods as the installation grows: from
//! the pod cache, which groups pods by cluster (`gateway_kube::pod_cache`), and by the scan of
//! every cached pod that passes made before it (a kube-runtime `Store`, filtered by namespace
//! and labels). A benchmark that prints numbers, not a test:
//!
//! ```text
//! cargo bench -p gateway-kube --bench pod_cache
//! ```

use gateway_kube::lean::LeanPod;
use gateway_kube::names;
use gateway_kube::pod_cache::pod_cache;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ObjectMeta;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Workers per cluster (the maintainer's burst test in the field notes: 100 clusters × 25).
const WORKERS: usize = 25;

/// Worker `worker` of cluster number `cluster`, labelled as the controller labels them.
fn worker(cluster: usize, worker: usize) -> LeanPod {
    let id = cluster_id(cluster);
    LeanPod(Arc::new(Pod {
        metadata: ObjectMeta {
            namespace: Some("dask".into()),
            name: Some(format!("{}{worker}", names::worker_pod_prefix(&id))),
            labels: Some(
                [
                    (names::LABEL_CLUSTER.to_string(), id),
                    (
                        names::LABEL_COMPONENT.to_string(),
                        names::COMPONENT_WORKER.to_string(),
                    ),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        ..Pod::default()
    }))
}

fn cluster_id(cluster: usize) -> String {
    format!("{cluster:032x}")
}

fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

/// The mean time of `f` over enough calls to take about a fifth of a second.
fn time_per_call<T>(mut f: impl FnMut() -> T) -> Duration {
    let mut calls = 1u32;
    loop {
        let start = Instant::now();
        for _ in 0..calls {
            black_box(f());
        }
        let took = start.elapsed();
        if took > Duration::from_millis(200) {
            return took / calls;
        }
        calls *= 2;
    }
}

fn main() {
    println!("One cluster's {WORKERS} worker pods read from a cache of the whole installation:");
    println!();
    println!("| clusters of {WORKERS} workers | pods cached | grouped by cluster | scan of every pod | scan / grouped |");
    println!("|---:|---:|---:|---:|---:|");
    for clusters in [1, 10, 100, 1000] {
        let (grouped, mut grouped_writer) = pod_cache();
        let (store, mut store_writer) = reflector::store::<LeanPod>();
        for c in 0..clusters {
            for w in 0..WORKERS {
                let pod = worker(c, w);
                grouped_writer.apply_watcher_event(&Event::Apply(pod.clone()));
                store_writer.apply_watcher_event(&Event::Apply(pod));
            }
        }
        let id = cluster_id(clusters / 2);
        let by_cluster = time_per_call(|| {
            let pods = grouped.cluster_pods("dask", &id);
            assert_eq!(pods.len(), WORKERS);
            pods
        });
        let scan = time_per_call(|| {
            let pods: Vec<Arc<LeanPod>> = store
                .state()
                .into_iter()
                .filter(|p| {
                    p.metadata.namespace.as_deref() == Some("dask")
                        && label(p, names::LABEL_CLUSTER) == Some(id.as_str())
                        && label(p, names::LABEL_COMPONENT) == Some(names::COMPONENT_WORKER)
                })
                .collect();
            assert_eq!(pods.len(), WORKERS);
            pods
        });
        println!(
            "| {clusters} | {} | {:.1} µs | {:.1} µs | {:.0}× |",
            clusters * WORKERS,
            by_cluster.as_secs_f64() * 1e6,
            scan.as_secs_f64() * 1e6,
            scan.as_secs_f64() / by_cluster.as_secs_f64()
        );
    }
}
