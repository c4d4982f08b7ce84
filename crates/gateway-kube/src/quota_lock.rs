//! Per-user quota locks shared by every gateway replica: while one replica decides whether a
//! user's create or scale-up fits their quotas, it holds a `coordination.k8s.io/v1` Lease named
//! after the user; others wait (briefly) for it. Creating the Lease is the atomic step (the API
//! server refuses a second create); the holder deletes it when done. A replica that dies
//! holding one blocks that user for at most [`QUOTA_LOCK_DURATION`]: the next one deletes the
//! expired Lease (with its uid as precondition, so only that Lease) and takes a new one.

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::{Api, Client};
use std::time::Duration;

/// A held lock older than this may be taken over (its holder is presumed dead).
pub const QUOTA_LOCK_DURATION: Duration = Duration::from_secs(10);
/// How long a replica waits for another's lock before answering "busy".
pub const QUOTA_LOCK_WAIT: Duration = Duration::from_secs(5);

/// Why a quota lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum QuotaLockError {
    /// Another replica held it for all of [`QUOTA_LOCK_WAIT`].
    #[error("another gateway replica is deciding this user's quota; try again")]
    Busy,
    /// The API server refused or did not answer.
    #[error(transparent)]
    Api(#[from] kube::Error),
}

/// Takes per-user quota locks in one namespace for one installation.
pub struct QuotaLocks {
    api: Api<Lease>,
    instance: String,
    identity: String,
}

/// A held quota lock; dropping it deletes the Lease (in the background).
pub struct QuotaLockGuard {
    api: Api<Lease>,
    name: String,
    uid: Option<String>,
}

impl Drop for QuotaLockGuard {
    fn drop(&mut self) {
        let (api, name, uid) = (self.api.clone(), self.name.clone(), self.uid.take());
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid,
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            if let Err(e) = api.delete(&name, &params).await {
                tracing::debug!(lease = %name, "releasing a quota lock: {e}");
            }
        });
    }
}

/// 64-bit FNV-1a, for short stable object names.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn expired(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return true };
    match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(renewed), Some(secs)) => now.duration_since(renewed.0).as_secs() >= i64::from(secs),
        _ => true,
    }
}

impl QuotaLocks {
    /// Locks for installation `instance` in `namespace`, taken as `identity` (unique per
    /// process).
    pub fn new(client: Client, namespace: &str, instance: &str, identity: &str) -> Self {
        QuotaLocks {
            api: Api::namespaced(client, namespace),
            instance: instance.into(),
            identity: identity.into(),
        }
    }

    /// The Lease name of `owner`'s lock (a valid object name whatever the user name).
    pub fn lease_name(&self, owner: &str) -> String {
        let key = format!("{}/{owner}", self.instance);
        format!("dgrs-quota-{:016x}", fnv1a(key.as_bytes()))
    }

    /// Takes `owner`'s lock, waiting up to [`QUOTA_LOCK_WAIT`] for another holder.
    pub async fn acquire(&self, owner: &str) -> Result<QuotaLockGuard, QuotaLockError> {
        let name = self.lease_name(owner);
        let deadline = tokio::time::Instant::now() + QUOTA_LOCK_WAIT;
        let mut pause = Duration::from_millis(10);
        loop {
            let now = Timestamp::now();
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(
                        [
                            (
                                crate::names::LABEL_INSTANCE.to_string(),
                                self.instance.clone(),
                            ),
                            (
                                crate::names::LABEL_COMPONENT.to_string(),
                                "quota-lock".to_string(),
                            ),
                        ]
                        .into(),
                    ),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(QUOTA_LOCK_DURATION.as_secs() as i32),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    ..LeaseSpec::default()
                }),
            };
            match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    return Ok(QuotaLockGuard {
                        api: self.api.clone(),
                        name,
                        uid: created.metadata.uid,
                    })
                }
                Err(kube::Error::Api(s)) if s.is_already_exists() => {}
                Err(e) => return Err(e.into()),
            }
            // Held. A dead holder's Lease is removed (only that one: uid precondition).
            match self.api.get_opt(&name).await? {
                Some(held) if expired(&held, now) => {
                    tracing::warn!(lease = %name, holder = ?held.spec.as_ref().and_then(|s| s.holder_identity.as_deref()), "taking over an expired quota lock");
                    let params = DeleteParams {
                        preconditions: Some(Preconditions {
                            uid: held.metadata.uid.clone(),
                            resource_version: held.metadata.resource_version.clone(),
                        }),
                        ..DeleteParams::default()
                    };
                    match self.api.delete(&name, &params).await {
                        Ok(_) => continue,
                        Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                None => continue,
                Some(_) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QuotaLockError::Busy);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_and_per_instance() {
        let client_less = |instance: &str, owner: &str| {
            let key = format!("{instance}/{owner}");
            format!("dgrs-quota-{:016x}", fnv1a(key.as_bytes()))
        };
        let a = client_less("prod", "alice@example.org");
        assert_eq!(a.len(), "dgrs-quota-".len() + 16);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        assert_ne!(a, client_less("test", "alice@example.org"));
        assert_ne!(a, client_less("prod", "bob"));
    }
}
