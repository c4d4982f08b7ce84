//! Kerberos authentication (wire-protocol 3.5): the stock client's `KerberosAuth` sends
//! `Authorization: Negotiate <base64 token>` for the service `HTTP@<gateway host>`; the gateway
//! accepts it with its keytab (MIT GSSAPI; raw Kerberos and SPNEGO tokens, so browsers work too)
//! and answers the successful response with `WWW-Authenticate: Negotiate <mutual token>`, which
//! the client requires. The user name is the client principal up to `@`.
//!
//! GSSAPI calls block (keytab and replay-cache files), so each runs on tokio's blocking pool.

use crate::config::KerberosConfig;
use std::path::PathBuf;

/// Why the Kerberos authenticator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum KerberosSetupError {
    /// This binary was built without the `kerberos` feature.
    #[error("auth.type kerberos: this gateway-server was built without Kerberos support (the `kerberos` feature)")]
    NotBuilt,
    /// The keytab cannot be used.
    #[error("auth.kerberos: keytab {0}: {1}")]
    Keytab(PathBuf, String),
    /// No acceptor credentials (no key for the service in the keytab).
    #[error("auth.kerberos: no credentials for service {0}: {1}")]
    Credentials(String, String),
}

/// A successful negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The gateway user name.
    pub name: String,
    /// The client principal, e.g. `alice@EXAMPLE.ORG`.
    pub principal: String,
    /// The base64 mutual-authentication token for `WWW-Authenticate: Negotiate <token>`.
    pub reply: Option<String>,
}

/// The user name of a principal: up to the realm's `@` unless the realm is kept; `None` for
/// names a user cannot have (empty, control characters).
pub fn user_name(principal: &str, keep_realm: bool) -> Option<String> {
    let name = if keep_realm {
        principal
    } else {
        principal.rsplit_once('@').map_or(principal, |(n, _)| n)
    };
    super::is_usable_user_name(name).then(|| name.to_string())
}

#[cfg(feature = "kerberos")]
mod imp {
    use super::*;
    use base64::Engine;
    use libgssapi::context::{SecurityContext, ServerCtx};
    use libgssapi::credential::{Cred, CredUsage};
    use libgssapi::name::Name;
    use libgssapi::oid::GSS_NT_HOSTBASED_SERVICE;
    use std::ffi::{c_char, CString};

    // MIT's process-wide default acceptor keytab (gssapi/gssapi_krb5.h), not bound by
    // libgssapi: it spares setting KRB5_KTNAME in a running, multi-threaded process.
    #[link(name = "gssapi_krb5")]
    extern "C" {
        fn krb5_gss_register_acceptor_identity(keytab: *const c_char) -> u32;
    }

    /// Accepts Negotiate tokens with the service's keytab.
    pub struct KerberosAuthenticator {
        cred: Cred,
        keep_realm: bool,
    }

    impl KerberosAuthenticator {
        /// Registers the keytab and acquires the acceptor credentials.
        pub fn new(config: &KerberosConfig) -> Result<Self, KerberosSetupError> {
            if let Some(keytab) = &config.keytab {
                let bad = |m: String| KerberosSetupError::Keytab(keytab.clone(), m);
                std::fs::File::open(keytab).map_err(|e| bad(e.to_string()))?;
                let path = CString::new(keytab.as_os_str().as_encoded_bytes())
                    .map_err(|_| bad("the path has a NUL byte".into()))?;
                // SAFETY: a valid NUL-terminated string; MIT copies it.
                let status = unsafe { krb5_gss_register_acceptor_identity(path.as_ptr()) };
                if status != 0 {
                    return Err(bad(format!("GSSAPI refused it (status {status})")));
                }
            }
            let service = &config.service_name;
            let creds = |e: libgssapi::error::Error| {
                KerberosSetupError::Credentials(service.clone(), e.to_string().replace('\n', "; "))
            };
            let name =
                Name::new(service.as_bytes(), Some(GSS_NT_HOSTBASED_SERVICE)).map_err(creds)?;
            let cred = Cred::acquire(Some(&name), None, CredUsage::Accept, None).map_err(creds)?;
            Ok(KerberosAuthenticator {
                cred,
                keep_realm: config.keep_realm,
            })
        }

        /// Accepts one client token (base64). The error is safe to show (no token material).
        pub async fn accept(&self, token_b64: &str) -> Result<Negotiated, String> {
            let token = base64::engine::general_purpose::STANDARD
                .decode(token_b64.trim())
                .map_err(|_| "the Negotiate token is not base64".to_string())?;
            if token.is_empty() {
                return Err("the Negotiate token is empty".into());
            }
            let cred = self.cred.clone();
            let keep_realm = self.keep_realm;
            tokio::task::spawn_blocking(move || {
                let mut ctx = ServerCtx::new(Some(cred));
                let out = ctx
                    .step(&token, None)
                    .map_err(|e| format!("Kerberos rejected the token: {}", first_line(&e)))?;
                if !ctx.is_complete() {
                    return Err(
                        "Kerberos negotiation needs another round, which clients here cannot do"
                            .into(),
                    );
                }
                let principal = ctx
                    .source_name()
                    .map_err(|e| format!("Kerberos gave no client name: {}", first_line(&e)))?
                    .to_string();
                let name = user_name(&principal, keep_realm).ok_or_else(|| {
                    "the Kerberos principal is not a usable user name".to_string()
                })?;
                let reply = out.map(|b| base64::engine::general_purpose::STANDARD.encode(&*b));
                Ok(Negotiated {
                    name,
                    principal,
                    reply,
                })
            })
            .await
            .map_err(|e| format!("Kerberos negotiation failed: {e}"))?
        }
    }

    fn first_line(e: &libgssapi::error::Error) -> String {
        e.to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[cfg(not(feature = "kerberos"))]
mod imp {
    use super::*;

    /// Stands in for the Kerberos authenticator in builds without the `kerberos` feature:
    /// it cannot be constructed, so `auth.type: kerberos` fails at startup with a clear error.
    pub struct KerberosAuthenticator(std::convert::Infallible);

    impl KerberosAuthenticator {
        /// Always [`KerberosSetupError::NotBuilt`].
        pub fn new(_config: &KerberosConfig) -> Result<Self, KerberosSetupError> {
            Err(KerberosSetupError::NotBuilt)
        }

        /// Unreachable: no value of this type exists.
        pub async fn accept(&self, _token_b64: &str) -> Result<Negotiated, String> {
            match self.0 {}
        }
    }
}

pub use imp::KerberosAuthenticator;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_from_principals() {
        assert_eq!(
            user_name("alice@DGRS.TEST", false).as_deref(),
            Some("alice")
        );
        assert_eq!(
            user_name("alice@DGRS.TEST", true).as_deref(),
            Some("alice@DGRS.TEST")
        );
        assert_eq!(
            user_name("HTTP/host@R", false).as_deref(),
            Some("HTTP/host")
        );
        assert_eq!(user_name("@R", false), None);
        assert_eq!(user_name("a\nb@R", false), None);
    }
}
