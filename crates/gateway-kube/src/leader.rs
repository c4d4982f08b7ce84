//! Leader election with a `coordination.k8s.io/v1` Lease, so that among several gateway or
//! controller replicas exactly one runs the controller.
//!
//! The holder renews the Lease every [`RENEW_EVERY`]; others take it over once it has not been
//! renewed for [`LEASE_DURATION`]. Every write carries the Lease's resourceVersion, so two
//! candidates racing for an expired Lease cannot both win: the loser gets a conflict. A holder
//! that shuts down clears the holder, so a replacement (a rolling update) leads at once. The
//! Lease may exist beforehand (the Helm chart makes it, so that uninstalling removes it).

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use std::future::Future;
use std::time::Duration;
use tracing::{info, warn};

/// A Lease not renewed for this long may be taken over.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews.
pub const RENEW_EVERY: Duration = Duration::from_secs(4);
/// How often a candidate retries.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// One candidate for the Lease `name` in `namespace`.
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
}

impl LeaderElection {
    /// A candidate called `identity` (unique per process, e.g. pod name plus a random suffix).
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        LeaderElection {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let taking_over = previous
            .and_then(|s| s.holder_identity.as_deref())
            .is_none_or(|h| h != self.identity);
        let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: if taking_over {
                Some(MicroTime(now))
            } else {
                previous.and_then(|s| s.acquire_time.clone())
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if taking_over {
                transitions + 1
            } else {
                transitions
            }),
            ..LeaseSpec::default()
        }
    }

    /// Takes or renews the Lease; `Ok(true)` while we hold it.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let existing = match self.api.get(&self.name).await {
            Ok(l) => l,
            Err(kube::Error::Api(s)) if s.is_not_found() => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(None, now)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(false),
                    Err(e) => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        let spec = existing.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(secs)) => {
                now.duration_since(renewed.0).as_secs() > i64::from(secs)
            }
            _ => true,
        };
        if !mine && !expired && spec.holder_identity.is_some() {
            return Ok(false);
        }
        let mut lease = existing;
        lease.spec = Some(self.spec(Some(&spec), now));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if we hold it: clears the holder (an update with the Lease's
    /// resourceVersion, so a Lease someone else took meanwhile is left alone).
    pub async fn release(&self) {
        let Ok(mut lease) = self.api.get(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.name, "released the lease"),
            Err(e) => warn!(lease = %self.name, "releasing the lease: {e}"),
        }
    }

    /// Runs `work` while we hold the Lease: waits to acquire it, runs `work` and renews in the
    /// background; if renewal fails for longer than the Lease lasts, `work` is dropped and we
    /// go back to waiting. Returns when `work` returns or `shutdown` resolves.
    pub async fn run<F, Fut>(&self, mut work: F, shutdown: impl Future<Output = ()>)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        tokio::pin!(shutdown);
        loop {
            // Wait for the Lease.
            loop {
                match self.try_acquire().await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => warn!(lease = %self.name, "leader election: {e}"),
                }
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(RETRY_EVERY) => {}
                }
            }
            info!(lease = %self.name, identity = %self.identity, "leading: controller running");
            let renew = async {
                let mut last_ok = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(RENEW_EVERY).await;
                    match self.try_acquire().await {
                        Ok(true) => last_ok = tokio::time::Instant::now(),
                        Ok(false) => return "another candidate holds the lease",
                        Err(e) => warn!(lease = %self.name, "renewing the lease: {e}"),
                    }
                    if last_ok.elapsed() > LEASE_DURATION - RENEW_EVERY {
                        return "the lease could not be renewed in time";
                    }
                }
            };
            tokio::select! {
                _ = &mut shutdown => {
                    self.release().await;
                    return;
                }
                _ = work() => {
                    self.release().await;
                    return;
                }
                why = renew => warn!(lease = %self.name, "lost leadership ({why}); controller stopped"),
            }
        }
    }
}
