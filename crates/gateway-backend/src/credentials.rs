//! Per-cluster secrets: a self-signed TLS certificate/key pair and an API token
//! (wire-protocol section 10).

use rand::RngCore;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType, SerialNumber};

/// A cluster's TLS identity, shared by its scheduler, workers and clients (PEM text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterCredentials {
    /// Self-signed certificate; also the only trust anchor for this cluster.
    pub cert_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
}

impl ClusterCredentials {
    /// Generates a fresh pair: ECDSA P-256, `CN=dask-internal`, SAN DNS names
    /// `<cluster>`, `dask-internal`, `skein-internal`, valid for 365 days, random serial.
    pub fn generate(cluster: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "dask-internal");
        params.distinguished_name = dn;
        params.subject_alt_names = [cluster, "dask-internal", "skein-internal"]
            .into_iter()
            .filter_map(|n| n.try_into().ok().map(SanType::DnsName))
            .collect();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(365);
        let mut serial = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut serial);
        serial[0] &= 0x7f; // positive
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(ClusterCredentials {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// 16 random bytes as 32 lowercase hex characters.
fn random_hex32() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// A new random API token: 32 lowercase hex characters (never contains `/`, which the preload
/// would read as a file path).
pub fn new_api_token() -> String {
    random_hex32()
}

/// A new random cluster (or worker) id: 32 lowercase hex characters, valid as a path component,
/// a DNS label and a Kubernetes object name.
pub fn new_cluster_id() -> String {
    random_hex32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_distinct_pem_pairs() {
        let a = ClusterCredentials::generate("abc").unwrap();
        let b = ClusterCredentials::generate("abc").unwrap();
        assert!(a.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(a.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_ne!(a.cert_pem, b.cert_pem);
        assert_ne!(a.key_pem, b.key_pem);
    }

    #[test]
    fn tokens_are_hex() {
        let t = new_api_token();
        assert_eq!(t.len(), 32);
        assert!(t
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(t, new_api_token());
        assert_ne!(new_cluster_id(), new_cluster_id());
    }
}
