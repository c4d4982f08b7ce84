//! JWT bearer authentication: HS256 with a shared secret (from a file or an environment
//! variable, never the YAML), or RS256/ES256 with keys from a JWKS file or URL.
//!
//! Keys from a URL are cached; a token signed with an unknown `kid` triggers one refetch, at
//! most every [`REFETCH_PAUSE`], bounded by [`FETCH_TIMEOUT`] so a slow or dead identity provider
//! never holds requests for long.

use crate::config::JwtConfig;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// The shortest pause between two JWKS fetches.
pub const REFETCH_PAUSE: Duration = Duration::from_secs(5);
/// How long one JWKS fetch may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a JWT setup cannot start.
#[derive(Debug, thiserror::Error)]
pub enum JwtSetupError {
    /// Not exactly one key source.
    #[error("auth.jwt needs exactly one of secret_file, secret_env, jwks_file or jwks_url")]
    KeySource,
    /// The secret or JWKS could not be read.
    #[error("auth.jwt: {0}")]
    Keys(String),
}

/// What a valid token says about its bearer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// User name.
    pub name: String,
    /// Groups.
    pub groups: Vec<String>,
    /// When the token expires (`exp`, seconds since the Unix epoch): the session it opens
    /// ends then too.
    pub expires: Option<u64>,
}

enum Keys {
    Secret(DecodingKey),
    Jwks {
        url: Option<String>,
        by_kid: RwLock<HashMap<String, (DecodingKey, Algorithm)>>,
        last_fetch: tokio::sync::Mutex<Option<Instant>>,
    },
}

/// Verifies bearer tokens.
pub struct JwtVerifier {
    config: JwtConfig,
    keys: Keys,
    http: reqwest::Client,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.config.issuer)
            .field("audience", &self.config.audience)
            .finish_non_exhaustive()
    }
}

/// The signing keys of a JWKS document by key id. Keys this gateway cannot use (encryption
/// keys, algorithms it does not know, keys without an id) are skipped with a log line, so that
/// an identity provider publishing one does not take the others down with it.
fn parse_jwks(text: &str) -> Result<HashMap<String, (DecodingKey, Algorithm)>, String> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<Value>,
    }
    let set: RawSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut out = HashMap::new();
    for raw in set.keys {
        let kid = raw
            .get("kid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let jwk: jsonwebtoken::jwk::Jwk = match serde_json::from_value(raw) {
            Ok(jwk) => jwk,
            Err(e) => {
                tracing::info!(kid, "skipping a JWKS key this gateway cannot use: {e}");
                continue;
            }
        };
        if kid.is_empty()
            || jwk.common.public_key_use == Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
        {
            continue;
        }
        let alg = match &jwk.algorithm {
            jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            _ => continue,
        };
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => {
                out.insert(kid, (key, alg));
            }
            Err(e) => tracing::info!(kid, "skipping a JWKS key this gateway cannot use: {e}"),
        }
    }
    Ok(out)
}

/// Whether the token's header lists critical parameters (`crit`): none is understood here,
/// and a token that has them must be refused (RFC 7515, 4.1.11).
fn critical_header(token: &str) -> bool {
    use base64::Engine as _;
    let Some(header) = token.split('.').next() else {
        return false;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Map<String, Value>>(&bytes).ok())
        .is_some_and(|h| h.contains_key("crit"))
}

impl JwtVerifier {
    /// Loads the keys (fetching a JWKS URL once; a failure there is logged and retried on
    /// the first token, so the gateway starts while the identity provider is down).
    pub async fn new(config: JwtConfig) -> Result<Self, JwtSetupError> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| JwtSetupError::Keys(e.to_string()))?;
        let sources = [
            config.secret_file.is_some(),
            config.secret_env.is_some(),
            config.jwks_file.is_some(),
            config.jwks_url.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(JwtSetupError::KeySource);
        }
        let keys = if let Some(path) = &config.secret_file {
            let secret = std::fs::read(path)
                .map_err(|e| JwtSetupError::Keys(format!("{}: {e}", path.display())))?;
            // A text secret loses the whitespace around it (an editor's final newline); any
            // other file is the key, byte for byte.
            let secret = match std::str::from_utf8(&secret) {
                Ok(text) => text.trim().as_bytes().to_vec(),
                Err(_) => secret,
            };
            if secret.len() < 16 {
                return Err(JwtSetupError::Keys(format!(
                    "the secret in {} is shorter than 16 bytes",
                    path.display()
                )));
            }
            Keys::Secret(DecodingKey::from_secret(&secret))
        } else if let Some(var) = &config.secret_env {
            let secret = std::env::var(var).map_err(|_| {
                JwtSetupError::Keys(format!("environment variable {var} is not set"))
            })?;
            if secret.len() < 16 {
                return Err(JwtSetupError::Keys(format!(
                    "the secret in {var} is shorter than 16 bytes"
                )));
            }
            Keys::Secret(DecodingKey::from_secret(secret.as_bytes()))
        } else if let Some(path) = &config.jwks_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| JwtSetupError::Keys(format!("{}: {e}", path.display())))?;
            let by_kid = parse_jwks(&text)
                .map_err(|e| JwtSetupError::Keys(format!("{}: {e}", path.display())))?;
            Keys::Jwks {
                url: None,
                by_kid: RwLock::new(by_kid),
                last_fetch: tokio::sync::Mutex::new(None),
            }
        } else {
            Keys::Jwks {
                url: config.jwks_url.clone(),
                by_kid: RwLock::new(HashMap::new()),
                last_fetch: tokio::sync::Mutex::new(None),
            }
        };
        let verifier = JwtVerifier { config, keys, http };
        if let Keys::Jwks { url: Some(url), .. } = &verifier.keys {
            if let Err(e) = verifier.refetch().await {
                tracing::warn!(%url, "fetching the JWKS failed (retried on the first token): {e}");
            }
        }
        Ok(verifier)
    }

    /// Refetches the JWKS URL unless it was fetched within [`REFETCH_PAUSE`].
    async fn refetch(&self) -> Result<bool, String> {
        let Keys::Jwks {
            url: Some(url),
            by_kid,
            last_fetch,
        } = &self.keys
        else {
            return Ok(false);
        };
        let mut last = last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < REFETCH_PAUSE) {
            return Ok(false);
        }
        *last = Some(Instant::now());
        let text = tokio::time::timeout(FETCH_TIMEOUT, async {
            self.http
                .get(url)
                .send()
                .await?
                .error_for_status()?
                .text()
                .await
        })
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let keys = parse_jwks(&text)?;
        *by_kid.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(true)
    }

    fn lookup(&self, kid: &str) -> Option<(DecodingKey, Algorithm)> {
        match &self.keys {
            Keys::Jwks { by_kid, .. } => by_kid
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(kid)
                .cloned(),
            Keys::Secret(_) => None,
        }
    }

    /// Checks a token; the error says why it was refused (never echoing the token).
    pub async fn verify(&self, token: &str) -> Result<Claims, String> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| "malformed token".to_string())?;
        let (key, alg) = match &self.keys {
            Keys::Secret(key) => (key.clone(), Algorithm::HS256),
            Keys::Jwks { .. } => {
                let kid = header
                    .kid
                    .clone()
                    .ok_or_else(|| "the token has no key id (kid)".to_string())?;
                match self.lookup(&kid) {
                    Some(found) => found,
                    None => {
                        // Keys may have rotated: fetch again (rate limited).
                        if let Err(e) = self.refetch().await {
                            tracing::warn!("refetching the JWKS failed: {e}");
                        }
                        self.lookup(&kid)
                            .ok_or_else(|| "unknown signing key".to_string())?
                    }
                }
            }
        };
        if header.alg != alg {
            return Err(format!("algorithm {:?} is not allowed", header.alg));
        }
        if critical_header(token) {
            return Err(
                "the token has critical header parameters this gateway does not know".into(),
            );
        }
        let mut validation = Validation::new(alg);
        validation.leeway = self.config.leeway;
        validation.validate_nbf = true;
        // A configured issuer or audience must be in the token, not merely not contradicted.
        let mut required = vec!["exp"];
        required.extend(self.config.issuer.as_ref().map(|_| "iss"));
        required.extend(self.config.audience.as_ref().map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        match &self.config.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.config.issuer {
            validation.set_issuer(&[iss]);
        }
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired",
                    ErrorKind::ImmatureSignature => "the token is not valid yet",
                    ErrorKind::InvalidAudience => "wrong audience",
                    ErrorKind::InvalidIssuer => "wrong issuer",
                    ErrorKind::InvalidSignature => "bad signature",
                    ErrorKind::MissingRequiredClaim(c) if c == "iss" => "wrong issuer",
                    ErrorKind::MissingRequiredClaim(c) if c == "aud" => "wrong audience",
                    ErrorKind::MissingRequiredClaim(_) => {
                        "the expiry (exp) is missing or not a time in seconds since 1970"
                    }
                    ErrorKind::InvalidAlgorithm => "algorithm not allowed",
                    _ => "malformed token",
                }
                .to_string()
            })?;
        let claims = data.claims;
        // The library skips time and issuer claims of the wrong type; they are refused here.
        if claims.get("nbf").is_some_and(|v| !v.is_number()) {
            return Err("malformed token".into());
        }
        if self.config.issuer.is_some() && !claims.get("iss").is_some_and(Value::is_string) {
            return Err("wrong issuer".into());
        }
        let name = claims
            .get(&self.config.username_claim)
            .and_then(Value::as_str)
            .filter(|n| super::is_usable_user_name(n))
            .ok_or_else(|| {
                format!(
                    "the token has no usable user name claim ({})",
                    self.config.username_claim
                )
            })?
            .to_string();
        let groups = claims
            .get(&self.config.groups_claim)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let expires = claims.get("exp").and_then(|v| {
            v.as_u64().or_else(|| {
                v.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .map(|f| f as u64)
            })
        });
        Ok(Claims {
            name,
            groups,
            expires,
        })
    }

    /// Whether these groups make their member an admin.
    pub fn is_admin_group(&self, groups: &[String]) -> bool {
        groups.iter().any(|g| self.config.admin_groups.contains(g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    async fn hs256(config: JwtConfig, secret: &str) -> JwtVerifier {
        let path =
            std::env::temp_dir().join(format!("dgrs-jwt-{}-{}", std::process::id(), secret.len()));
        std::fs::write(&path, format!("{secret}\n")).unwrap();
        let v = JwtVerifier::new(JwtConfig {
            secret_file: Some(path.clone()),
            ..config
        })
        .await
        .unwrap();
        std::fs::remove_file(path).unwrap();
        v
    }

    fn token(secret: &str, claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn hs256_claims_and_reasons() {
        let secret = "0123456789abcdef-secret";
        let v = hs256(
            JwtConfig {
                issuer: Some("https://idp".into()),
                audience: Some("dask".into()),
                leeway: 5,
                admin_groups: vec!["ops".into()],
                ..Default::default()
            },
            secret,
        )
        .await;
        let good = json!({"sub": "alice", "groups": ["ops", "x"], "iss": "https://idp", "aud": "dask", "exp": now() + 60});
        let c = v.verify(&token(secret, good.clone())).await.unwrap();
        assert_eq!(c.name, "alice");
        assert!(v.is_admin_group(&c.groups));
        let with = |k: &str, val: Value| {
            let mut g = good.clone();
            g[k] = val;
            token(secret, g)
        };
        for (t, why) in [
            (with("exp", json!(now() - 60)), "expired"),
            (with("exp", json!(-1)), "not a time in seconds"),
            (with("exp", json!(1e30)), "not a time in seconds"),
            (with("nbf", json!(now() + 600)), "not valid yet"),
            (with("aud", json!("other")), "wrong audience"),
            (with("iss", json!("https://evil")), "wrong issuer"),
            (with("sub", json!("")), "user name"),
            (
                token("another-secret-of-16+", good.clone()),
                "bad signature",
            ),
            ("not.a.jwt".to_string(), "malformed"),
            (with("aud", Value::Null), "wrong audience"),
            (with("aud", json!(5)), "wrong audience"),
            (with("iss", json!(5)), "wrong issuer"),
            (
                with("iss", json!(["https://idp", "https://evil"])),
                "wrong issuer",
            ),
            (with("nbf", json!(format!("{}", now() + 600))), "malformed"),
            (
                with("sub", json!("a".repeat(crate::auth::MAX_USER_NAME + 1))),
                "user name",
            ),
            (
                encode(
                    &Header::new(Algorithm::HS256),
                    &good,
                    &EncodingKey::from_secret(secret.as_bytes()),
                )
                .map(|t| {
                    use base64::Engine as _;
                    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(r#"{"alg":"HS256","typ":"JWT","crit":["exp-unknown"]}"#);
                    let rest = t.split_once('.').unwrap().1.to_string();
                    // Signed again over the new header.
                    let signing_input = format!("{header}.{}", rest.split_once('.').unwrap().0);
                    let sig = jsonwebtoken::crypto::sign(
                        signing_input.as_bytes(),
                        &EncodingKey::from_secret(secret.as_bytes()),
                        Algorithm::HS256,
                    )
                    .unwrap();
                    format!("{signing_input}.{sig}")
                })
                .unwrap(),
                "critical header",
            ),
        ] {
            let e = v.verify(&t).await.unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
            assert!(!e.contains(&t), "the reason never echoes the token");
        }
        // Within the leeway an expired token still passes.
        assert!(v.verify(&with("exp", json!(now() - 2))).await.is_ok());
        let without = |claim: &str| {
            let mut g = good.clone();
            g.as_object_mut().unwrap().remove(claim);
            token(secret, g)
        };
        for (claim, why) in [
            ("exp", "exp"),
            ("iss", "wrong issuer"),
            ("aud", "wrong audience"),
        ] {
            let e = v.verify(&without(claim)).await.unwrap_err();
            assert!(e.contains(why), "without {claim}: {e}");
        }
        // Without an issuer or audience configured, tokens need not carry them.
        let open = hs256(JwtConfig::default(), secret).await;
        let mut bare = good.clone();
        bare.as_object_mut().unwrap().remove("iss");
        bare.as_object_mut().unwrap().remove("aud");
        assert_eq!(
            open.verify(&token(secret, bare)).await.unwrap().name,
            "alice"
        );
    }

    #[test]
    fn a_jwks_key_this_gateway_cannot_use_leaves_the_others_usable() {
        let rsa = json!({"kty": "RSA", "kid": "r2", "use": "sig", "alg": "RS256",
            "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw",
            "e": "AQAB"});
        let unusable = json!({"kty": "RSA", "kid": "enc1", "use": "enc", "alg": "RSA-OAEP-512",
            "n": "sXch", "e": "AQAB"});
        let no_kid = json!({"kty": "RSA", "n": rsa["n"], "e": "AQAB"});
        let doc = json!({"keys": [unusable, rsa, no_kid]}).to_string();
        let keys = parse_jwks(&doc).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["r2"]);
        assert!(parse_jwks("{\"nokeys\": 1}").is_err(), "not a JWKS at all");
    }

    #[tokio::test]
    async fn a_binary_secret_file_is_the_key_byte_for_byte() {
        let secret: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(200))
            .collect();
        assert!(std::str::from_utf8(&secret).is_err());
        let path = std::env::temp_dir().join(format!("dgrs-jwt-bin-{}", std::process::id()));
        std::fs::write(&path, &secret).unwrap();
        let v = JwtVerifier::new(JwtConfig {
            secret_file: Some(path.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
        std::fs::remove_file(path).unwrap();
        let claims = json!({"sub": "alice", "exp": now() + 60});
        let signed = |key: &[u8]| {
            encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(key),
            )
            .unwrap()
        };
        assert_eq!(v.verify(&signed(&secret)).await.unwrap().name, "alice");
        let lossy = String::from_utf8_lossy(&secret).trim().as_bytes().to_vec();
        assert!(v.verify(&signed(&lossy)).await.is_err());
    }

    #[tokio::test]
    async fn setup_errors() {
        assert!(matches!(
            JwtVerifier::new(JwtConfig::default()).await,
            Err(JwtSetupError::KeySource)
        ));
        assert!(JwtVerifier::new(JwtConfig {
            secret_env: Some("DGRS_SURELY_UNSET_VARIABLE".into()),
            ..Default::default()
        })
        .await
        .is_err());
        assert!(JwtVerifier::new(JwtConfig {
            jwks_file: Some("/nonexistent/jwks.json".into()),
            ..Default::default()
        })
        .await
        .is_err());
    }
}
