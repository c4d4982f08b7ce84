//! The cluster service's lines of `/metrics`: clusters by status, routes, API counters.

use super::*;

impl ClusterService {
    /// Prometheus text exposition: clusters by status, routes, API counters, then the
    /// backend's own lines.
    pub fn metrics_text(&self) -> String {
        use gateway_backend::metrics;
        let mut by_status: HashMap<ClusterStatus, u64> = HashMap::new();
        let mut routed = 0;
        for c in self.backend.list(None) {
            *by_status.entry(c.status).or_default() += 1;
            routed += u64::from(c.addresses.is_some());
        }
        let mut out = String::new();
        let labels: Vec<(String, u64)> = ClusterStatus::ALL
            .iter()
            .map(|st| {
                let n = by_status.get(st).copied().unwrap_or(0);
                (
                    format!("status=\"{}\"", st.as_str().to_ascii_lowercase()),
                    n,
                )
            })
            .collect();
        metrics::gauge(
            &mut out,
            "clusters",
            "Clusters known to the gateway, by status.",
            labels.iter().map(|(l, n)| (l.as_str(), *n)),
        );
        metrics::gauge(
            &mut out,
            "routes",
            "Clusters reachable through the proxy.",
            [("", routed)],
        );
        let c = &self.counters;
        for (name, help, value) in [
            (
                "create_requests",
                "Cluster create requests since the gateway started.",
                &c.create_requests,
            ),
            (
                "create_refused_quota",
                "Cluster creates refused by the per-user quota.",
                &c.create_refused,
            ),
            (
                "scheduler_forward_failures",
                "Scale/adapt messages that never reached their scheduler.",
                &c.forward_failures,
            ),
            (
                "warm_scheduler_claims",
                "Creates served by a warm scheduler.",
                &c.pool_claims,
            ),
            (
                "warm_scheduler_misses",
                "Creates that fit a warm pool but found it empty.",
                &c.pool_misses,
            ),
            (
                "warm_scheduler_starts",
                "Warm schedulers started to fill the pools.",
                &c.pool_starts,
            ),
        ] {
            metrics::counter(&mut out, name, help, value.load(Ordering::Relaxed));
        }
        let pools = self.pool_gauges();
        if !pools.is_empty() {
            metrics::gauge(
                &mut out,
                "warm_schedulers",
                "Unclaimed warm schedulers, by pool and state.",
                pools.iter().map(|(l, n)| (l.as_str(), *n)),
            );
        }
        self.backend.metrics(&mut out);
        out
    }
}
