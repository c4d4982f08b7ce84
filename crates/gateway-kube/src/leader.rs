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
use tokio::time::Instant;
use tracing::{info, warn};

/// A Lease not renewed for this long may be taken over.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews.
pub const RENEW_EVERY: Duration = Duration::from_secs(4);
/// How often a candidate retries.
const RETRY_EVERY: Duration = Duration::from_secs(2);
/// How long a holder trusts a renewal, counted from when it sent the request (the renewal
/// time it writes is taken then): others may take over after [`LEASE_DURATION`], and the
/// margin covers a renewal still on its way and clocks that differ a little.
const TRUST_RENEWAL_FOR: Duration = Duration::from_secs(11);
/// How long a holder that shuts down waits for its work to finish its passes in flight
/// before it gives the Lease up: a successor must not start while those writes can land.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

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
            let acquired_at = loop {
                let attempt = Instant::now();
                match tokio::time::timeout(TRUST_RENEWAL_FOR, self.try_acquire()).await {
                    Ok(Ok(true)) => break attempt,
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => warn!(lease = %self.name, "leader election: {e}"),
                    Err(_) => warn!(lease = %self.name, "leader election: no answer in time"),
                }
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(RETRY_EVERY) => {}
                }
            };
            info!(lease = %self.name, identity = %self.identity, "leading: controller running");
            let renew = async {
                // Ours until then, as far as we may assume: a renewal that has not answered
                // by then (a hung connection) ends the term as surely as a refused one.
                let mut trusted_until = acquired_at + TRUST_RENEWAL_FOR;
                loop {
                    tokio::time::sleep(RENEW_EVERY).await;
                    let attempt = Instant::now();
                    let left = trusted_until.saturating_duration_since(attempt);
                    match tokio::time::timeout(left, self.try_acquire()).await {
                        Ok(Ok(true)) => trusted_until = attempt + TRUST_RENEWAL_FOR,
                        Ok(Ok(false)) => return "another candidate holds the lease",
                        Ok(Err(e)) => warn!(lease = %self.name, "renewing the lease: {e}"),
                        Err(_) => {}
                    }
                    if Instant::now() + RENEW_EVERY >= trusted_until {
                        return "the lease could not be renewed in time";
                    }
                }
            };
            let term = work();
            tokio::pin!(term);
            tokio::select! {
                _ = &mut shutdown => {
                    // The work stops on the same signal and finishes its passes in flight.
                    if tokio::time::timeout(STOP_GRACE, &mut term).await.is_err() {
                        warn!(lease = %self.name, "the controller did not stop within {STOP_GRACE:?}");
                    }
                    self.release().await;
                    return;
                }
                _ = &mut term => {
                    self.release().await;
                    return;
                }
                why = renew => warn!(lease = %self.name, "lost leadership ({why}); controller stopped"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_api;
    use http::Method;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// Set when dropped: the work of a term, to see when the term ends.
    struct Flag(Arc<AtomicBool>);

    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    async fn until(flag: &AtomicBool) {
        while !flag.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Answers the first acquisition (no Lease yet: created); the Lease as written.
    async fn acquire(api: &mut mock_api::ApiServer) -> serde_json::Value {
        let get = api.next().await;
        assert_eq!(get.method, Method::GET);
        get.status(404, "NotFound");
        let create = api.next().await;
        assert_eq!(create.method, Method::POST);
        let lease = create.body.clone();
        create.echo();
        lease
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_never_answers_ends_the_term_before_others_may_take_over() {
        let (client, mut api) = mock_api::pair();
        let election = LeaderElection::new(client, "dask", "ctl", "me");
        let ended = Arc::new(AtomicBool::new(false));
        let flag = ended.clone();
        let run = tokio::spawn(async move {
            let work = move || {
                let f = Flag(flag.clone());
                async move {
                    let _f = f;
                    std::future::pending::<()>().await
                }
            };
            election.run(work, std::future::pending()).await
        });
        let lease = acquire(&mut api).await;
        // One renewal answered: the Lease is ours until 15 s after it.
        let get = api.next().await;
        let renewed = Instant::now();
        get.ok(lease);
        let put = api.next().await;
        assert_eq!(put.method, Method::PUT);
        put.echo();
        // The next renewal is never answered (a hung connection).
        let hung = api.next().await;
        assert_eq!(hung.method, Method::GET);
        tokio::time::timeout(Duration::from_secs(60), until(&ended))
            .await
            .expect("the term outlived a renewal that never answered");
        // Trusted for 11 s from the renewal (seen here to within the 50 ms of `until`),
        // well before another candidate may take the Lease over (15 s).
        let held = renewed.elapsed();
        assert!(
            held <= TRUST_RENEWAL_FOR + Duration::from_millis(50),
            "{held:?}"
        );
        assert!(held < LEASE_DURATION - Duration::from_secs(3), "{held:?}");
        drop(hung);
        run.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_that_shuts_down_lets_its_work_finish_then_releases() {
        let (client, mut api) = mock_api::pair();
        let election = LeaderElection::new(client, "dask", "ctl", "me");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let finished = Arc::new(AtomicBool::new(false));
        let done = finished.clone();
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|v| *v).await;
            }
        };
        let shutdown = stopped();
        let run = tokio::spawn(async move {
            let work = move || {
                let (stopped, done) = (stopped(), done.clone());
                async move {
                    // A pass in flight when the signal comes takes another second.
                    stopped.await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    done.store(true, Ordering::SeqCst);
                }
            };
            election.run(work, shutdown).await
        });
        let lease = acquire(&mut api).await;
        stop_tx.send(true).unwrap();
        // The release reads the Lease only once the work has finished.
        let get = api.next().await;
        assert_eq!(get.method, Method::GET);
        assert!(
            finished.load(Ordering::SeqCst),
            "released before the work finished"
        );
        get.ok(lease);
        let put = api.next().await;
        assert_eq!(put.body["spec"]["holderIdentity"], serde_json::Value::Null);
        put.echo();
        run.await.unwrap();
    }
}
