//! The cluster service's metric families: clusters by status, routes and warm schedulers (read
//! at scrape time), and the API side's counters.

use super::*;
use gateway_backend::metrics::{self, Registry};

impl ClusterService {
    /// Registers the service's families, then its backend's ([`ClusterBackend::register_metrics`]).
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        let c = &self.counters;
        for (name, help, counter) in [
            (
                "create_requests",
                "Cluster create requests since the gateway started",
                &c.create_requests,
            ),
            (
                "create_refused_quota",
                "Cluster creates refused by the per-user quota",
                &c.create_refused,
            ),
            (
                "scheduler_forward_failures",
                "Scale/adapt messages that never reached their scheduler",
                &c.forward_failures,
            ),
            (
                "warm_scheduler_claims",
                "Creates served by a warm scheduler",
                &c.pool_claims,
            ),
            (
                "warm_scheduler_misses",
                "Creates that fit a warm pool but found it empty",
                &c.pool_misses,
            ),
            (
                "warm_scheduler_starts",
                "Warm schedulers started to fill the pools",
                &c.pool_starts,
            ),
            (
                "idle_clusters_stopped_by_gateway",
                "Idle clusters the gateway stopped because their scheduler's request never came",
                &c.idle_stops,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        let service = Arc::downgrade(self);
        registry.register_collector(metrics::collector("clusters", move |scrape| {
            let Some(service) = service.upgrade() else {
                return Ok(());
            };
            let mut by_status: HashMap<ClusterStatus, u64> = HashMap::new();
            let mut routed = 0u64;
            for c in service.backend.list(None) {
                *by_status.entry(c.status).or_default() += 1;
                routed += u64::from(c.addresses.is_some());
            }
            scrape.gauges(
                "clusters",
                "Clusters known to the gateway, by status",
                ClusterStatus::ALL.iter().map(|st| {
                    let n = by_status.get(st).copied().unwrap_or(0);
                    ([("status", st.as_str().to_ascii_lowercase())], n)
                }),
            )?;
            scrape.gauge("routes", "Clusters reachable through the proxy", routed)?;
            // No family without a pool.
            scrape.gauges(
                "warm_schedulers",
                "Unclaimed warm schedulers, by pool and state",
                service.pool_gauges(),
            )
        }));
        self.backend.register_metrics(registry);
    }
}
