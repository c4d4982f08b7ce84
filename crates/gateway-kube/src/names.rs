//! Names and labels of everything the backend creates.
//!
//! A cluster's object name is a random 32-hex id; its public name (URL path, SNI, the preload's
//! `DASK_GATEWAY_CLUSTER_NAME`) is `<namespace>.<id>`, like the reference gateway. User names are
//! arbitrary strings, so they are never used raw in names or label values.

use gateway_backend::WorkerGrant;
use std::collections::BTreeMap;

/// Label: which gateway installation owns the object (watches select on it).
pub const LABEL_INSTANCE: &str = "dask-gateway-rs.io/instance";
/// Label: the DaskCluster's object name (the id).
pub const LABEL_CLUSTER: &str = "dask-gateway-rs.io/cluster";
/// Label: the owner, made label-safe (see [`user_label`]).
pub const LABEL_USER: &str = "dask-gateway-rs.io/user";
/// Annotation: the owner's exact user name.
pub const ANNOTATION_USER: &str = "dask-gateway-rs.io/user";
/// Annotation on a DaskCluster: creation time in milliseconds since the epoch (the API's
/// `start_time`; `creationTimestamp` has only seconds).
pub const ANNOTATION_CREATED_MS: &str = "dask-gateway-rs.io/created-ms";
/// When a gateway replica last had a client of the cluster connected, ms since the epoch
/// (shared by the replicas' no-client timeouts).
pub const ANNOTATION_LAST_CLIENT_MS: &str = "dask-gateway-rs.io/last-client-ms";
/// Workers a gateway replica granted the cluster under the user's quota lock, as
/// `<workers>/<held until, ms since the epoch>` ([`format_grant`]).
pub const ANNOTATION_GRANTED_WORKERS: &str = "dask-gateway-rs.io/granted-workers";
/// Label the controller puts on a finished DaskCluster once nothing of it runs: the watches
/// of controller and gateways exclude such clusters, which are read on demand.
pub const LABEL_FINISHED: &str = "dask-gateway-rs.io/finished";
/// Label on an unclaimed warm-pool DaskCluster: its pool's key.
pub const LABEL_POOL: &str = "dask-gateway-rs.io/pool";
/// `spec.user` of an unclaimed warm-pool DaskCluster (the API shows no owner for it).
pub const POOL_USER: &str = gateway_backend::POOL_OWNER;
/// Standard label: the role of the object.
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Component of scheduler pods (and their Service).
pub const COMPONENT_SCHEDULER: &str = "dask-scheduler";
/// Component of worker pods.
pub const COMPONENT_WORKER: &str = "dask-worker";
/// Component of credentials Secrets.
pub const COMPONENT_CREDENTIALS: &str = "credentials";
/// Component of the installation's session-key Secret.
pub const COMPONENT_SESSION_KEY: &str = "session-key";

/// Scheduler port (Dask comm, TLS).
pub const SCHEDULER_PORT: i32 = 8786;
/// Dashboard port (HTTP).
pub const DASHBOARD_PORT: i32 = 8787;
/// The preload's API port (HTTP).
pub const API_PORT: i32 = 8788;
/// Where the credentials Secret is mounted in pods.
pub const CREDENTIALS_DIR: &str = "/etc/dask-credentials";

/// Secret holding `dask.crt`, `dask.pem` and `api-token`.
pub fn secret_name(id: &str) -> String {
    format!("dask-credentials-{id}")
}

/// The scheduler pod.
pub fn scheduler_pod_name(id: &str) -> String {
    format!("dask-scheduler-{id}")
}

/// The scheduler's Service.
pub fn service_name(id: &str) -> String {
    format!("dask-{id}")
}

/// Prefix of worker pod names; each gets a random suffix.
pub fn worker_pod_prefix(id: &str) -> String {
    format!("dask-worker-{id}-")
}

/// A new worker pod name (also the worker's `--name`, shared with the scheduler).
pub fn new_worker_pod_name(id: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::thread_rng();
    let suffix: String = (0..6)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{}{suffix}", worker_pod_prefix(id))
}

/// The public cluster name of object `id` in `namespace`.
pub fn public_name(namespace: &str, id: &str) -> String {
    format!("{namespace}.{id}")
}

/// The object id of a public name, if it belongs to `namespace` and looks like one of ours.
pub fn object_id<'a>(namespace: &str, public: &'a str) -> Option<&'a str> {
    let id = public.strip_prefix(namespace)?.strip_prefix('.')?;
    let valid = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    valid.then_some(id)
}

/// A label-safe form of a user name: at most 63 characters of `[A-Za-z0-9._-]`, starting and
/// ending alphanumeric. Names that had to change get a short hash suffix so two different users
/// never share a label value.
pub fn user_label(user: &str) -> String {
    let cleaned: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if trimmed == user && !user.is_empty() && user.len() <= 63 {
        return user.to_string();
    }
    let hash = fnv1a(user.as_bytes());
    let head: String = trimmed.chars().take(50).collect();
    let head = head.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if head.is_empty() {
        format!("u{hash:012x}")
    } else {
        format!("{head}-{hash:012x}")
    }
}

/// 48 bits of FNV-1a: stable across releases (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h & 0xffff_ffff_ffff
}

/// Labels every object of cluster `id` carries, plus its component.
pub fn labels(instance: &str, id: &str, user: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "dask-gateway".into()),
        ("app.kubernetes.io/part-of".into(), "dask-gateway".into()),
        (
            "app.kubernetes.io/managed-by".into(),
            "dask-gateway-rs".into(),
        ),
        (LABEL_COMPONENT.into(), component.into()),
        (LABEL_INSTANCE.into(), instance.into()),
        (LABEL_CLUSTER.into(), id.into()),
        (LABEL_USER.into(), user_label(user)),
    ])
}

/// The value of [`ANNOTATION_GRANTED_WORKERS`] for `grant`.
pub fn format_grant(grant: WorkerGrant) -> String {
    format!("{}/{}", grant.workers, grant.held_until_ms)
}

/// Reads a [`ANNOTATION_GRANTED_WORKERS`] value (a bare worker count is held no longer).
pub fn parse_grant(value: &str) -> Option<WorkerGrant> {
    let (workers, held) = value.split_once('/').unwrap_or((value, "0"));
    Some(WorkerGrant {
        workers: workers.trim().parse().ok()?,
        held_until_ms: held.trim().parse().ok()?,
    })
}

/// Label selector for everything of one installation.
pub fn instance_selector(instance: &str) -> String {
    format!("{LABEL_INSTANCE}={instance}")
}

/// The selector of an installation's DaskClusters that are not finished (the hot caches).
pub fn active_selector(instance: &str) -> String {
    format!("{},!{LABEL_FINISHED}", instance_selector(instance))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_names_round_trip() {
        let id = "0123456789abcdef0123456789abcdef";
        let public = public_name("dask", id);
        assert_eq!(public, format!("dask.{id}"));
        assert_eq!(object_id("dask", &public), Some(id));
        assert_eq!(object_id("other", &public), None);
        assert_eq!(object_id("dask", "dask."), None);
        assert_eq!(object_id("dask", "dask.UPPER"), None);
        assert_eq!(object_id("dask", "dask.a/b"), None);
        assert_eq!(object_id("da", &public), None);
    }

    #[test]
    fn user_labels_are_valid_and_distinct() {
        let valid = |s: &str| {
            s.len() <= 63
                && s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.ends_with(|c: char| c.is_ascii_alphanumeric())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        };
        for u in [
            "alice",
            "alice@non-alpha.characters",
            "a b",
            "-x-",
            "名前",
            &"x".repeat(100),
            "",
        ] {
            assert!(valid(&user_label(u)), "{u:?} -> {}", user_label(u));
        }
        assert_eq!(user_label("alice"), "alice");
        assert_ne!(user_label("a b"), user_label("a-b"));
        assert_ne!(user_label("a@b"), user_label("a#b"));
    }

    #[test]
    fn grants_round_trip() {
        let g = WorkerGrant {
            workers: 3,
            held_until_ms: 1_764_100_000_000,
        };
        assert_eq!(parse_grant(&format_grant(g)), Some(g));
        assert_eq!(
            parse_grant("4"),
            Some(WorkerGrant {
                workers: 4,
                held_until_ms: 0
            })
        );
        for bad in ["", "x", "3/x", "-1/0", "3/"] {
            assert_eq!(parse_grant(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn worker_names_fit_dns_labels() {
        let id = "0123456789abcdef0123456789abcdef";
        let n = new_worker_pod_name(id);
        assert!(n.len() <= 63, "{n}");
        assert!(n.starts_with(&worker_pod_prefix(id)));
        assert_ne!(n, new_worker_pod_name(id));
    }
}
