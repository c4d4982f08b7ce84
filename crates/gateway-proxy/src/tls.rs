//! TLS configuration for the HTTPS side of the public port.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::ProxyError;

/// Build a rustls `ServerConfig` from PEM cert chain + key files (for optional HTTPS on the
/// public port). ALPN offers `h2` and `http/1.1`; the ring crypto provider is used explicitly so
/// no process-wide default provider is needed.
pub fn load_server_tls(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, ProxyError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| ProxyError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    server_config_from_pem(&cert_pem, &key_pem, cert_path, key_path)
}

fn server_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ServerConfig>, ProxyError> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|source| ProxyError::Read {
            path: cert_path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(ProxyError::NoCertificate(cert_path.to_path_buf()));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|source| ProxyError::Read {
            path: key_path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| ProxyError::NoPrivateKey(key_path.to_path_buf()))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_rcgen_pem() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let dir = std::env::temp_dir().join(format!("gwproxy-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let cfg = load_server_tls(&cert, &key).unwrap();
        assert_eq!(cfg.alpn_protocols.len(), 2);

        // Swapped files: no certificate in the key file.
        assert!(matches!(
            load_server_tls(&key, &key),
            Err(ProxyError::NoCertificate(_))
        ));
        assert!(matches!(
            load_server_tls(&cert, &cert),
            Err(ProxyError::NoPrivateKey(_))
        ));
        assert!(matches!(
            load_server_tls(&dir.join("missing"), &key),
            Err(ProxyError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
