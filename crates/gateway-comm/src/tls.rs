//! TLS for scheduler connections: the cluster's self-signed certificate is the only thing
//! trusted, on both ends, exactly as Dask's own TLS does with the gateway's credentials (the
//! certificate is its own CA; host names are not checked, the certificate is).

use crate::CommError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;

/// A cluster's TLS credentials (from its model while RUNNING).
#[derive(Clone)]
pub struct ClusterTls {
    cert: CertificateDer<'static>,
    key: Arc<PrivateKeyDer<'static>>,
    /// The PEM texts, for writing files other tools read.
    pub cert_pem: String,
    /// The private key as PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterTls(..)")
    }
}

impl ClusterTls {
    /// Parses the PEM certificate and key of a cluster.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CommError> {
        let bad =
            |what: &str| CommError::Protocol(format!("the cluster's {what} is not valid PEM"));
        let cert = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .and_then(|c| c.ok())
            .ok_or_else(|| bad("certificate"))?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .ok()
            .flatten()
            .ok_or_else(|| bad("key"))?;
        Ok(ClusterTls {
            cert,
            key: Arc::new(key),
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        })
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Client side: present the cluster certificate, accept only a server presenting it too.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, CommError> {
        let provider = Self::provider();
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| CommError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                cert: self.cert.clone(),
                provider,
            }))
            .with_client_auth_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(|e| CommError::Tls(format!("the cluster's key: {e}")))?;
        Ok(config)
    }

    /// Server side (the local end of a tunnel): present the cluster certificate, require
    /// clients to present it too.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, CommError> {
        let provider = Self::provider();
        rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| CommError::Tls(e.to_string()))?
            .with_client_cert_verifier(Arc::new(Pinned {
                cert: self.cert.clone(),
                provider,
            }))
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())
            .map_err(|e| CommError::Tls(format!("the cluster's key: {e}")))
    }
}

/// Accepts exactly one certificate (the cluster's) and checks handshake signatures with it.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Pinned {
    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if presented.as_ref() == self.cert.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}
