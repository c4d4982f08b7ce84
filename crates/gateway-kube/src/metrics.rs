//! The controller's metric families: its counters ([`ControllerMetrics`], kept for the life of
//! the process, across leadership terms) and whether this process leads now ([`LiveContext`])
//! (`controller_leading`), registered by [`LiveContext::register_metrics`]. The gateway side's
//! families are registered by [`crate::KubeBackend`]'s `register_metrics`.

use gateway_backend::metrics::{self, Counter, Registry};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Counters of the controller. One set per process: every leadership term adds to the same
/// counters, so they never go back when another term starts.
#[derive(Clone, Debug, Default)]
pub struct ControllerMetrics {
    /// Reconcile passes.
    pub reconciles: Counter,
    /// Passes that ended in an error.
    pub reconcile_errors: Counter,
    /// Pods created.
    pub pods_created: Counter,
    /// Pods deleted.
    pub pods_deleted: Counter,
    /// Kubernetes API writes (the tokens the write limiter handed out).
    pub api_writes: Counter,
    /// Kubernetes API writes waiting for the write limiter now (a gauge).
    pub api_writes_waiting: Arc<AtomicU64>,
    /// Clusters that became Running.
    pub clusters_running: Counter,
    /// Clusters that failed.
    pub clusters_failed: Counter,
}

impl ControllerMetrics {
    /// Registers the counters as `controller_<name>_total`.
    pub fn register(&self, registry: &mut Registry) {
        for (name, help, counter) in [
            (
                "controller_reconciles",
                "Reconcile passes",
                &self.reconciles,
            ),
            (
                "controller_reconcile_errors",
                "Reconcile passes that failed (retried)",
                &self.reconcile_errors,
            ),
            (
                "controller_pods_created",
                "Pods created by the controller",
                &self.pods_created,
            ),
            (
                "controller_pods_deleted",
                "Pods deleted by the controller",
                &self.pods_deleted,
            ),
            (
                "controller_api_writes",
                "Kubernetes API writes made by the controller",
                &self.api_writes,
            ),
            (
                "controller_clusters_running",
                "Clusters that became Running",
                &self.clusters_running,
            ),
            (
                "controller_clusters_failed",
                "Clusters that failed",
                &self.clusters_failed,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
    }
}

/// The controller of this process as its metrics see it : whether
/// this process leads now, and the counters every leadership term adds to. Clones share them.
#[derive(Clone, Default)]
pub struct LiveContext(Arc<Live>);

#[derive(Default)]
struct Live {
    leading: AtomicBool,
    metrics: ControllerMetrics,
}

impl LiveContext {
    /// Whether this process runs the controller now (a term has started and not ended).
    pub fn leading(&self) -> bool {
        self.0.leading.load(Ordering::Relaxed)
    }

    /// The controller's counters, for the life of the process.
    pub fn metrics(&self) -> &ControllerMetrics {
        &self.0.metrics
    }

    fn set_leading(&self, leading: bool) {
        self.0.leading.store(leading, Ordering::Relaxed);
    }

    /// Leading until the returned guard drops: when the term ends, or when its future is
    /// dropped because the lease was lost.
    pub(crate) fn lead(&self) -> Leading {
        self.set_leading(true);
        Leading(self.clone())
    }
}

/// This process leads while it lives (see [`LiveContext::lead`]).
pub(crate) struct Leading(LiveContext);

impl Drop for Leading {
    fn drop(&mut self) {
        self.0.set_leading(false);
    }
}

impl LiveContext {
    /// Registers the controller's families: its counters, `controller_leading` (1 while this
    /// process runs the controller, 0 while another replica does) and
    /// `controller_api_writes_waiting`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.metrics().register(registry);
        let live = self.clone();
        registry.register_collector(metrics::collector("controller", move |scrape| {
            scrape.gauge(
                "controller_leading",
                "Whether this process runs the DaskCluster controller now",
                u64::from(live.leading()),
            )?;
            scrape.gauge(
                "controller_api_writes_waiting",
                "Kubernetes API writes waiting for the controller's write budget now",
                live.metrics().api_writes_waiting.load(Ordering::Relaxed),
            )
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_families_count_across_terms() {
        let live = LiveContext::default();
        let mut registry = metrics::registry();
        live.register_metrics(&mut registry);
        let text = metrics::render(&registry).unwrap();
        for line in [
            "# HELP dask_gateway_controller_reconciles Reconcile passes.",
            "# TYPE dask_gateway_controller_reconciles counter",
            "dask_gateway_controller_reconciles_total 0",
            "# TYPE dask_gateway_controller_api_writes counter",
            "dask_gateway_controller_api_writes_total 0",
            "# HELP dask_gateway_controller_leading Whether this process runs the DaskCluster controller now.",
            "# TYPE dask_gateway_controller_leading gauge",
            "dask_gateway_controller_leading 0",
            "# TYPE dask_gateway_controller_api_writes_waiting gauge",
            "dask_gateway_controller_api_writes_waiting 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        // A term counts; the next one adds to the same counters.
        let term = live.lead();
        live.metrics().reconciles.inc();
        drop(term);
        assert!(
            !live.leading(),
            "a term that ends (or is dropped) stops leading"
        );
        let _term = live.lead();
        live.metrics().reconciles.inc();
        let text = metrics::render(&registry).unwrap();
        for line in [
            "dask_gateway_controller_reconciles_total 2",
            "dask_gateway_controller_leading 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        let families = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        assert_eq!(families, 9, "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
