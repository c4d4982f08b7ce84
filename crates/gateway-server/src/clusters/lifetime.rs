//! The lifetime sweeper: stops clusters past their `max_lifetime`, and running ones that have
//! had no client connected through the proxy for their `no_client_timeout`.

use super::*;

impl ClusterService {
    /// Stops clusters past their maximum lifetime, and running clusters that have had no
    /// client connected through the proxy for their no-client timeout (counted from when
    /// the last client left, or from when this process first saw the cluster without one,
    /// or from when another gateway replica last recorded a client of it with the backend).
    /// The reason goes to the cluster's status and the log. Called about once a second.
    pub async fn enforce_lifetimes(&self) {
        let now = self.clock.instant();
        let now_ms = self.clock.now_ms();
        let mut due = Vec::new();
        let mut record = Vec::new();
        {
            let mut recorded = self
                .client_recorded
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut since = self
                .unattended_since
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut watched = std::collections::HashSet::new();
            for v in self.backend.list(None) {
                // Warm schedulers wait for a user; their clocks start when one claims them.
                if !v.status.is_active() || v.pool.is_some() {
                    continue;
                }
                let s = &v.settings;
                let age = (now_ms - v.start_time) as f64 / 1000.0;
                if s.max_lifetime > 0.0 && age >= s.max_lifetime {
                    due.push((
                        v.name.clone(),
                        format!(
                            "reached its maximum lifetime of {}",
                            human_seconds(s.max_lifetime)
                        ),
                    ));
                    continue;
                }
                if s.no_client_timeout <= 0.0 || v.status != ClusterStatus::Running {
                    continue;
                }
                watched.insert(v.name.clone());
                let local_from = match self.activity.get(&v.name) {
                    Some(Clients::Open(_)) => {
                        since.remove(&v.name);
                        // Tell other replicas, a few times per timeout.
                        let every =
                            Duration::from_secs_f64((s.no_client_timeout / 4.0).clamp(1.0, 60.0));
                        if recorded
                            .get(&v.name)
                            .is_none_or(|t| now.duration_since(*t) >= every)
                        {
                            recorded.insert(v.name.clone(), now);
                            record.push(v.name.clone());
                        }
                        continue;
                    }
                    Some(Clients::ClosedAt(t)) => *since.entry(v.name.clone()).or_insert(t),
                    None => *since.entry(v.name.clone()).or_insert(now),
                };
                // A client another replica saw more recently counts too.
                let remote_from = v.last_client_ms.and_then(|ms| {
                    now.checked_sub(Duration::from_millis((now_ms - ms).max(0) as u64))
                });
                let from = remote_from.map_or(local_from, |r| r.max(local_from));
                if now.duration_since(from).as_secs_f64() >= s.no_client_timeout {
                    due.push((
                        v.name.clone(),
                        format!(
                            "no client connected for {}",
                            human_seconds(s.no_client_timeout)
                        ),
                    ));
                }
            }
            since.retain(|name, _| watched.contains(name));
            recorded.retain(|name, _| watched.contains(name));
            self.activity.retain(|name| watched.contains(name));
        }
        for name in record {
            if let Err(e) = self.backend.record_client_activity(&name, now_ms).await {
                warn!(cluster = %name, "could not record client activity: {e}");
            }
        }
        for (name, reason) in due {
            info!(cluster = %name, %reason, "stopping cluster by policy");
            self.unattended_since
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
            if let Err(e) = self
                .backend
                .stop(&name, StopRequest::stopped(format!("stopped: {reason}")))
                .await
            {
                warn!(cluster = %name, "could not stop the cluster: {e}");
            }
        }
    }
}
