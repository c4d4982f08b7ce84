//! Secrets compared and made: constant-time comparison, the cluster token of
//! `Authorization: token <t>` and its check, and random hex values (cookie names, OAuth states).

use http::header::AUTHORIZATION;
use http::HeaderMap;
use rand::RngCore;

/// A fresh random value: 16 bytes as hex.
pub(super) fn random_hex() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Compares secrets without an early exit on the first difference.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= (*x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

/// Extracts the token of `Authorization: token <t>`.
pub fn cluster_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("token").then(|| token.trim())
}

/// Whether `given` equals the cluster's `expected` token (constant time).
pub fn token_matches(given: &str, expected: &str) -> bool {
    !expected.is_empty() && constant_time_eq(given.as_bytes(), expected.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, "token abc".parse().unwrap());
        assert_eq!(cluster_token(&h), Some("abc"));
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("", ""));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
