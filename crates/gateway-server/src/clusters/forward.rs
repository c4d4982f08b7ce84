//! Scale and adapt: clipping a request to the cluster's limits and its owner's quotas, and
//! forwarding it to the scheduler's `/api/comm` with retries.

use super::*;

impl ClusterService {
    /// The cluster if `user` may `action` it and it is RUNNING with a scheduler API.
    pub(super) async fn running(
        &self,
        user: &User,
        name: &str,
        action: &'static str,
    ) -> Result<ClusterView, ClusterError> {
        let view = self.accessible(user, name, action).await?;
        if view.status != ClusterStatus::Running || view.addresses.is_none() {
            return Err(ClusterError::NotRunning(name.into()));
        }
        Ok(view)
    }

    /// Validates, clips and forwards a scale request; returns the clipping report.
    pub async fn scale(
        &self,
        user: &User,
        name: &str,
        count: &Value,
    ) -> Result<ScaleResponse, ClusterError> {
        self.accessible(user, name, "scale").await?;
        let n = as_count(count).ok_or_else(|| {
            ClusterError::Invalid(format!(
                "Scale expects a non-negative integer, got {}",
                py_repr(count)
            ))
        })?;
        let view = self.running(user, name, "scale").await?;
        let requested = n;
        let (n, clipped) = view.settings.limits.clip_scale(&view.settings.resources, n);
        let (n, quota_clip) = self.grant_workers(&view, n, Asker::Request).await;
        let clipped = both_clips(clipped, quota_clip);
        self.forward(&view, &SchedulerMessage::Scale { count: n })
            .await?;
        self.note(
            &view.name,
            EventType::Normal,
            "ScaleRequested",
            match (requested, n) {
                (1, 1) => format!("{} asked for 1 worker", user.name),
                (r, n) if r == n => format!("{} asked for {n} workers", user.name),
                (r, n) => format!("{} asked for {r} workers; {n} granted", user.name),
            },
        )
        .await;
        self.note_clipped(&view.name, clipped.as_deref()).await;
        Ok(ScaleResponse {
            ok: clipped.is_none(),
            msg: clipped,
        })
    }

    /// Validates, clips and forwards an adapt request; returns the clipping report.
    pub async fn adapt(
        &self,
        user: &User,
        name: &str,
        minimum: &Value,
        maximum: &Value,
        active: bool,
    ) -> Result<ScaleResponse, ClusterError> {
        let bound = |v: &Value, what: &str| -> Result<Option<u64>, ClusterError> {
            if v.is_null() {
                return Ok(None);
            }
            as_count(v).map(Some).ok_or_else(|| {
                ClusterError::Invalid(format!(
                    "Adapt expects a non-negative integer {what}, got {}",
                    py_repr(v)
                ))
            })
        };
        self.accessible(user, name, "adapt").await?;
        let (min, max) = (bound(minimum, "minimum")?, bound(maximum, "maximum")?);
        if let (Some(lo), Some(hi)) = (min, max) {
            if lo > hi {
                return Err(ClusterError::Invalid(format!(
                    "Adapt expects minimum <= maximum, got minimum={lo}, maximum={hi}"
                )));
            }
        }
        let view = self.running(user, name, "adapt").await?;
        let (min, max, clipped) =
            view.settings
                .limits
                .clip_adapt(&view.settings.resources, min, max);
        // Within the owner's quotas: the maximum is clipped to the room left (heartbeats keep
        // the running total there), and the minimum is granted now. An unbounded maximum
        // becomes the room without a warning, as under a per-cluster cap.
        let room = self.user_room(&view);
        let max = match (&room, max) {
            (Some((r, _)), None) => Some(*r),
            (_, m) => m,
        };
        let (min, max, clipped) = match room {
            Some((room, quota))
                if max.is_some_and(|m| m > room) || min.is_some_and(|m| m > room) =>
            {
                let (new_min, new_max) = (
                    min.map(|m| m.min(room)),
                    Some(max.map_or(room, |m| m.min(room))),
                );
                let msg = format!(
                    "Adapt with `maximum={}, minimum={}` workers would exceed the quota of {quota}. Using `maximum={}, minimum={}` instead.",
                    max.map_or("None".into(), |m| m.to_string()),
                    min.unwrap_or(0),
                    new_max.unwrap_or(room),
                    new_min.unwrap_or(0)
                );
                (new_min, new_max, both_clips(clipped, Some(msg)))
            }
            _ => (min, max, clipped),
        };
        self.grant_workers(&view, min.unwrap_or(0), Asker::Request)
            .await;
        let msg = SchedulerMessage::Adapt {
            minimum: min,
            maximum: max,
            active,
        };
        self.forward(&view, &msg).await?;
        let bound = |b: Option<u64>| b.map_or("none".to_string(), |b| b.to_string());
        self.note(
            &view.name,
            EventType::Normal,
            "AdaptRequested",
            format!(
                "{} turned adaptive scaling {} (minimum {}, maximum {})",
                user.name,
                if active { "on" } else { "off" },
                bound(min),
                bound(max)
            ),
        )
        .await;
        self.note_clipped(&view.name, clipped.as_deref()).await;
        Ok(ScaleResponse {
            ok: clipped.is_none(),
            msg: clipped,
        })
    }

    /// Sends a message to the scheduler's `/api/comm` (three attempts); if none gets through,
    /// the cluster is stopped as FAILED and the caller gets 409.
    pub(super) async fn forward(
        &self,
        view: &ClusterView,
        msg: &SchedulerMessage,
    ) -> Result<(), ClusterError> {
        let name = &view.name;
        let (Some(addresses), Some(token)) = (&view.addresses, &view.token) else {
            return Err(ClusterError::NotRunning(name.clone()));
        };
        let url = format!("{}/api/comm", addresses.api.trim_end_matches('/'));
        let mut last_error = String::new();
        for (attempt, pause) in FORWARD_PAUSES_MS.into_iter().enumerate() {
            if pause > 0 {
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            match self
                .http
                .post(&url)
                .header("Authorization", format!("token {token}"))
                .json(msg)
                .send()
                .await
            {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => last_error = format!("scheduler answered {}", resp.status()),
                Err(e) => last_error = e.to_string(),
            }
            warn!(cluster = %name, attempt = attempt + 1, error = %last_error, "forwarding to scheduler failed");
        }
        self.counters.forward_failures.inc();
        let reason = format!("could not reach the scheduler: {last_error}");
        info!(cluster = %name, %reason, "failing cluster");
        if let Err(e) = self.backend.stop(name, StopRequest::failed(reason)).await {
            warn!(cluster = %name, "could not stop the unreachable cluster: {e}");
        }
        Err(ClusterError::NotRunning(name.clone()))
    }
}

/// The report of a request clipped first to the cluster's cap and then to the owner's quota:
/// both steps, in order, so that the numbers in each are the ones it saw.
fn both_clips(cap: Option<String>, quota: Option<String>) -> Option<String> {
    match (cap, quota) {
        (Some(cap), Some(quota)) => Some(format!("{cap} {quota}")),
        (cap, quota) => quota.or(cap),
    }
}
