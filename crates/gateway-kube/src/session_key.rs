//! The key that signs session cookies, shared by every gateway replica of an installation
//! through one Secret, so that a browser session made on one replica is accepted by the others
//! and survives restarts, with nothing for the operator to provide. The Secret is owned by the
//! installation's controller Lease when that exists (the Helm chart makes it), so uninstalling
//! the installation removes the key too.

use crate::names;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::{Client, Resource};
use std::collections::BTreeMap;

/// The Secret's key holding the session key.
const KEY: &str = "session-key";

/// Name of the installation's session-key Secret.
pub fn secret_name(instance: &str) -> String {
    format!("{instance}-session-key")
}

/// Why the shared session key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SessionKeyError {
    /// The API server refused or failed.
    #[error("reading or creating the session-key Secret {name}: {source}")]
    Api {
        /// The Secret's name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// The Secret exists but holds no usable key.
    #[error("the Secret {0} has no `session-key` of at least 32 characters")]
    Malformed(String),
}

/// A reference to the installation's controller Lease, for objects that should go when the
/// installation is uninstalled (garbage collection deletes what a deleted owner owned, with
/// the collector's own rights: nothing of the gateway's, whose RBAC an uninstall removes
/// first, is needed). `None` when the Lease is missing (plain manifests without it) or
/// unreadable.
pub async fn installation_owner(
    client: &Client,
    namespace: &str,
    instance: &str,
) -> Option<OwnerReference> {
    let lease = Api::<Lease>::namespaced(client.clone(), namespace)
        .get_opt(&crate::runtime::lease_name(instance))
        .await
        .ok()
        .flatten();
    lease
        .and_then(|l| l.controller_owner_ref(&()))
        .map(|mut o| {
            o.controller = None;
            o.block_owner_deletion = None;
            o
        })
}

/// The installation's session key: read from its Secret in `namespace`, or made (64 random
/// alphanumeric characters) by the first replica that finds none. Two replicas racing to make
/// it both end with the one that was created first.
pub async fn shared_session_key(
    client: &Client,
    namespace: &str,
    instance: &str,
) -> Result<String, SessionKeyError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let name = secret_name(instance);
    let api_error = |source| SessionKeyError::Api {
        name: name.clone(),
        source,
    };
    if let Some(secret) = api.get_opt(&name).await.map_err(api_error)? {
        return key_of(&secret).ok_or_else(|| SessionKeyError::Malformed(name.clone()));
    }
    let owner = installation_owner(client, namespace, instance).await;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            owner_references: owner.map(|o: OwnerReference| vec![o]),
            labels: Some(BTreeMap::from([
                (names::LABEL_INSTANCE.to_string(), instance.to_string()),
                (
                    names::LABEL_COMPONENT.to_string(),
                    names::COMPONENT_SESSION_KEY.to_string(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            KEY.to_string(),
            ByteString(random_key().into_bytes()),
        )])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => key_of(&created).ok_or_else(|| SessionKeyError::Malformed(name.clone())),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let secret = api.get(&name).await.map_err(api_error)?;
            key_of(&secret).ok_or_else(|| SessionKeyError::Malformed(name.clone()))
        }
        Err(e) => Err(api_error(e)),
    }
}

fn key_of(secret: &Secret) -> Option<String> {
    let bytes = &secret.data.as_ref()?.get(KEY)?.0;
    let key = std::str::from_utf8(bytes).ok()?.trim().to_string();
    (key.len() >= 32).then_some(key)
}

fn random_key() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_and_random() {
        let (a, b) = (random_key(), random_key());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        let secret = |v: &str| Secret {
            data: Some(BTreeMap::from([(KEY.to_string(), ByteString(v.into()))])),
            ..Secret::default()
        };
        assert_eq!(key_of(&secret(&a)), Some(a));
        assert_eq!(key_of(&secret("short")), None);
    }
}
