//! Reading clusters as one user may: the lookup (live, then finished), the owner-or-admin
//! check, a cluster's model, details and events, the listings, and cluster-token checks.

use super::{ClusterError, ClusterService, WAIT_TIMEOUT};
use crate::auth::{token_matches, User};
use gateway_backend::ClusterView;
use gateway_model::{ClusterEvent, ClusterModel, ClusterStatus};

impl ClusterService {
    /// The cluster `name`: from the backend's memory, else from where the backend stores
    /// clusters (a finished one, or one another replica has just created).
    pub(super) async fn lookup(&self, name: &str) -> Result<Option<ClusterView>, ClusterError> {
        if let Some(view) = self.backend.get(name) {
            return Ok(Some(view));
        }
        Ok(self.backend.stored_cluster(name).await?)
    }

    /// The cluster `name` if `user` may act on it.
    pub(super) async fn accessible(
        &self,
        user: &User,
        name: &str,
        action: &'static str,
    ) -> Result<ClusterView, ClusterError> {
        let view = self
            .lookup(name)
            .await?
            .filter(|v| v.pool.is_none())
            .ok_or_else(|| ClusterError::NotFound(name.to_string()))?;
        if !user.may_access(&view.owner) {
            return Err(ClusterError::Forbidden {
                user: user.name.clone(),
                action,
                name: name.to_string(),
            });
        }
        Ok(view)
    }

    /// What happened to cluster `name`, oldest first (owner or admin).
    pub async fn events(&self, user: &User, name: &str) -> Result<Vec<ClusterEvent>, ClusterError> {
        let view = self.accessible(user, name, "view").await?;
        Ok(self.backend.events(&view.name).await?)
    }

    /// Whether cluster `name` has finished (STOPPED or FAILED) or is gone: no more events come.
    /// A failed lookup counts as not finished (it is asked again).
    pub async fn has_finished(&self, name: &str) -> bool {
        match self.lookup(name).await {
            Ok(Some(v)) => v.status.is_terminal(),
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// The cluster's model; with `wait`, first holds until it has left PENDING (at most 20 s).
    pub async fn get(
        &self,
        user: &User,
        name: &str,
        wait: bool,
    ) -> Result<ClusterModel, ClusterError> {
        let view = self.accessible(user, name, "view").await?;
        if !wait || view.status != ClusterStatus::Pending {
            return Ok(view.model());
        }
        if let Some(mut rx) = self.backend.subscribe(name) {
            let _ =
                tokio::time::timeout(WAIT_TIMEOUT, rx.wait_for(|s| *s != ClusterStatus::Pending))
                    .await;
        }
        Ok(self.accessible(user, name, "view").await?.model())
    }

    /// The user's clusters (every cluster for admins) with one of `statuses` (default: the
    /// active ones), oldest first.
    pub async fn list(
        &self,
        user: &User,
        statuses: Option<&[ClusterStatus]>,
    ) -> Result<Vec<ClusterModel>, ClusterError> {
        Ok(self
            .visible(user, statuses)
            .await?
            .iter()
            .map(ClusterView::model)
            .collect())
    }

    /// The clusters `user` may list (all for admins) with one of `statuses` (default: the
    /// active ones), oldest first.
    pub(super) async fn visible(
        &self,
        user: &User,
        statuses: Option<&[ClusterStatus]>,
    ) -> Result<Vec<ClusterView>, ClusterError> {
        let owner = (!user.admin).then_some(user.name.as_str());
        let mut views = self.backend.list(owner);
        if statuses.is_some_and(|wanted| wanted.iter().any(|s| s.is_terminal())) {
            let known: std::collections::HashSet<String> =
                views.iter().map(|v| v.name.clone()).collect();
            let finished = self.backend.finished(owner).await?;
            views.extend(finished.into_iter().filter(|v| !known.contains(&v.name)));
            views.sort_by(|a, b| (a.start_time, &a.name).cmp(&(b.start_time, &b.name)));
        }
        views.retain(|c| c.pool.is_none());
        views.retain(|c| match statuses {
            Some(list) => list.contains(&c.status),
            None => c.status.is_active(),
        });
        Ok(views)
    }

    /// Whether `user` may access cluster `name` (false for unknown clusters).
    pub fn may_access(&self, user: &User, name: &str) -> bool {
        self.backend
            .get(name)
            .is_some_and(|c| c.pool.is_none() && user.may_access(&c.owner))
    }

    /// Whether `token` is the token of cluster `name`.
    pub fn token_is_valid(&self, name: &str, token: &str) -> bool {
        self.backend
            .get(name)
            .and_then(|c| c.token)
            .is_some_and(|t| token_matches(token, &t))
    }

    /// The cluster's details (owner, group policy, why it stopped) for its owner and admins.
    pub async fn details(
        &self,
        user: &User,
        name: &str,
    ) -> Result<gateway_model::ClusterDetails, ClusterError> {
        Ok(details_of(&self.accessible(user, name, "view").await?))
    }

    /// [`Self::list`] with details.
    pub async fn list_details(
        &self,
        user: &User,
        statuses: Option<&[ClusterStatus]>,
    ) -> Result<Vec<gateway_model::ClusterDetails>, ClusterError> {
        Ok(self
            .visible(user, statuses)
            .await?
            .iter()
            .map(details_of)
            .collect())
    }
}

/// What the details endpoints tell about one cluster.
fn details_of(v: &ClusterView) -> gateway_model::ClusterDetails {
    let m = v.model();
    let s = &v.settings;
    gateway_model::ClusterDetails {
        name: m.name,
        owner: v.owner.clone(),
        status: m.status,
        reason: v.reason.clone(),
        group: s.policy.clone(),
        start_time: m.start_time,
        stop_time: m.stop_time,
        dashboard_route: m.dashboard_route,
        options: m.options,
        workers: v.target_workers,
        expires_at: (s.max_lifetime > 0.0).then(|| v.start_time + (s.max_lifetime * 1000.0) as i64),
        no_client_timeout: (s.no_client_timeout > 0.0).then_some(s.no_client_timeout),
        workers_running: v.workers_running,
        cores: s.resources.scheduler_cores + v.target_workers as f64 * s.resources.worker_cores,
        memory: s
            .resources
            .scheduler_memory
            .saturating_add(v.target_workers.saturating_mul(s.resources.worker_memory)),
    }
}
