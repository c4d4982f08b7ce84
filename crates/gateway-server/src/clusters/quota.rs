//! Per-user quotas across a user's clusters: what their active clusters hold, the room left
//! for one cluster, and granting workers within it under the owner's admission lock.

use super::*;

/// Whether `c` sets any per-user resource quota.
pub(super) fn has_user_quota(c: &ClusterConfig) -> bool {
    c.max_workers_per_user.is_some()
        || c.max_cores_per_user.is_some()
        || c.max_memory_per_user.is_some()
}

/// The workers a cluster holds against its owner's quotas: the larger of what its backend
/// runs for it and what it was granted.
fn held_workers(view: &ClusterView) -> u64 {
    view.target_workers.max(view.grant.map_or(0, |g| g.workers))
}

/// What one user's active clusters hold.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Usage {
    pub(super) workers: u64,
    pub(super) cores: f64,
    pub(super) memory: u64,
}

impl ClusterService {
    /// What `owner`'s active clusters (but `except`) hold: each at the larger of its
    /// backend target and its grant.
    pub(super) fn user_usage(&self, owner: &str, except: Option<&str>) -> Usage {
        let mut used = Usage::default();
        for v in self.backend.list(Some(owner)) {
            if !v.status.is_active() || Some(v.name.as_str()) == except {
                continue;
            }
            let w = held_workers(&v);
            let r = &v.settings.resources;
            used.workers += w;
            used.cores += r.scheduler_cores + w as f64 * r.worker_cores;
            used.memory += r.scheduler_memory + w * r.worker_memory;
        }
        used
    }

    /// Workers `view` may have within its owner's quotas, and the quota that binds.
    pub(super) fn user_room(&self, view: &ClusterView) -> Option<(u64, String)> {
        let c = self.policy_named(view.settings.policy.as_deref());
        if !has_user_quota(c) {
            return None;
        }
        let used = self.user_usage(&view.owner, Some(&view.name));
        let r = &view.settings.resources;
        let mut room: Option<(u64, String)> = None;
        let mut consider = |n: u64, quota: String| {
            if room.as_ref().is_none_or(|(m, _)| n < *m) {
                room = Some((n, quota));
            }
        };
        if let Some(max) = c.max_workers_per_user {
            consider(
                max.saturating_sub(used.workers),
                format!("{max} workers per user"),
            );
        }
        if let Some(max) = c.max_cores_per_user {
            let left = max - used.cores - r.scheduler_cores;
            let n = if r.worker_cores > 0.0 {
                ((left + 1e-9) / r.worker_cores).floor().max(0.0) as u64
            } else {
                u64::MAX
            };
            consider(n, format!("{max} cores per user"));
        }
        if let Some(max) = c.max_memory_per_user {
            let left = max.saturating_sub(used.memory + r.scheduler_memory);
            let n = left.checked_div(r.worker_memory).unwrap_or(u64::MAX);
            consider(n, format!("{} of memory per user", format_memory(max)));
        }
        room
    }

    /// How long a grant made by a request outlasts heartbeats asking for fewer workers: two
    /// heartbeat periods and a second, so every heartbeat the scheduler sent before it got the
    /// request has arrived.
    pub(super) fn grant_hold_ms(&self) -> i64 {
        (2000.0 * self.config.heartbeat_period) as i64 + 1000
    }

    /// Clips a worker count to the owner's quotas (under the owner's admission lock) and
    /// records the grant; the message names the quota that clipped it. A heartbeat asking for
    /// fewer workers than a recent request granted lowers the target but not the grant (its
    /// scheduler may not have seen the request yet, see [`WorkerGrant::held_until_ms`]).
    pub(super) async fn grant_workers(
        &self,
        view: &ClusterView,
        wanted: u64,
        asker: Asker,
    ) -> (u64, Option<String>) {
        if !has_user_quota(self.policy_named(view.settings.policy.as_deref())) {
            return (wanted, None);
        }
        let lock = self.admission_lock(&view.owner);
        let _held = lock.lock().await;
        let latest = self.backend.get(&view.name);
        let held_before = held_workers(latest.as_ref().unwrap_or(view));
        // Growing needs the other replicas' lock too (and their latest grants); shrinking
        // never passes a quota.
        let _shared = if wanted > held_before {
            match self.backend.lock_user_quota(&view.owner).await {
                Ok(lock) => lock,
                Err(e) => {
                    warn!(cluster = %view.name, "quota lock: {e}");
                    let n = wanted.min(held_before);
                    return (
                        n,
                        Some(format!(
                            "Could not check the quotas of {} ({e}). Scaling to {n} instead.",
                            view.owner
                        )),
                    );
                }
            }
        } else {
            None
        };
        let fresh = self.backend.get(&view.name);
        let view = fresh.as_ref().unwrap_or(view);
        let (n, msg) = match self.user_room(view) {
            Some((room, quota)) if wanted > room => (
                room,
                Some(format!(
                    "Scale request of {wanted} workers would exceed the quota of {quota}. Scaling to {room} instead."
                )),
            ),
            _ => (wanted, None),
        };
        let now = self.clock.now_ms();
        let current = view.grant.unwrap_or_default();
        let grant = match asker {
            Asker::Request => WorkerGrant {
                workers: n,
                held_until_ms: now + self.grant_hold_ms(),
            },
            Asker::Heartbeat if n < current.workers && now < current.held_until_ms => current,
            Asker::Heartbeat => WorkerGrant {
                workers: n,
                held_until_ms: current.held_until_ms,
            },
        };
        if view.grant != Some(grant) {
            if let Err(e) = self.backend.record_grant(&view.name, grant).await {
                warn!(cluster = %view.name, "recording a grant: {e}");
                if n > held_before {
                    return (
                        held_before,
                        Some(format!(
                            "Could not record the workers of {} ({e}). Scaling to {held_before} instead.",
                            view.name
                        )),
                    );
                }
            }
        }
        (n, msg)
    }
}
