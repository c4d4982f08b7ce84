//! HTTP Basic (`auth.type: simple`): any user name, with the shared password when one is set.

use super::secret::constant_time_eq;
use super::AuthError;
use base64::Engine;

/// Checks `Authorization: Basic` credentials.
pub struct Basic {
    /// The shared password (none: any password).
    password: Option<String>,
}

impl Basic {
    /// Basic credentials checked against `password` (none: any password).
    pub fn new(password: Option<String>) -> Self {
        Basic { password }
    }

    /// The user name in `credentials` (the base64 after `Basic `), if the password is right
    /// and the name is one a user can have.
    pub(super) fn user_name(&self, credentials: &str) -> Result<String, AuthError> {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials.trim())
            .map_err(|_| AuthError::Invalid)?;
        let text = decode_credentials(decoded);
        let (name, password) = text.split_once(':').unwrap_or((&text, ""));
        if let Some(expected) = &self.password {
            if !constant_time_eq(password.as_bytes(), expected.as_bytes()) {
                return Err(AuthError::Invalid);
            }
        }
        if !super::is_usable_user_name(name) {
            return Err(AuthError::Invalid);
        }
        Ok(name.to_string())
    }
}

/// Basic credentials as text: UTF-8 when they are valid UTF-8 (browsers and most clients),
/// otherwise Latin-1 (the stock Python client's `BasicAuth` encodes Latin-1, where every byte
/// is the code point of the same value).
fn decode_credentials(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| e.into_bytes().iter().map(|&b| b as char).collect())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{auth, basic, AuthNow};
    use super::*;
    use http::header::AUTHORIZATION;
    use http::HeaderMap;

    fn basic_bytes(raw: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = base64::engine::general_purpose::STANDARD.encode(raw);
        h.insert(AUTHORIZATION, format!("Basic {v}").parse().unwrap());
        h
    }

    #[test]
    fn names_in_utf8_and_latin1() {
        let a = auth(None);
        // UTF-8 (browsers, curl, most clients).
        let name = a.auth_now(&basic("zoë-日本", "")).unwrap().user.name;
        assert_eq!(name, "zoë-日本");
        // Latin-1 (the stock Python client's BasicAuth): 0xEB is ë.
        let name = a.auth_now(&basic_bytes(b"zo\xeb:")).unwrap().user.name;
        assert_eq!(name, "zoë");
        // Control characters stay refused in either encoding, and so do overlong names.
        let long = format!("{}:", "a".repeat(super::super::MAX_USER_NAME + 1));
        for raw in [
            &b" :"[..],
            b"admin :",
            b" admin:",
            "admin\u{3000}:".as_bytes(),
            b"a\x1bb:",
            "a\u{85}b:".as_bytes(),
            b"a\x7fb:",
            "admin\u{200b}:".as_bytes(),
            "mal\u{202e}yrollam:".as_bytes(),
            "\u{feff}admin:".as_bytes(),
            long.as_bytes(),
        ] {
            assert_eq!(
                a.auth_now(&basic_bytes(raw)).unwrap_err(),
                AuthError::Invalid
            );
        }
    }

    #[test]
    fn basic_with_shared_password() {
        let a = auth(Some("pw"));
        assert_eq!(
            a.auth_now(&basic("alice@x y", "pw")).unwrap().user.name,
            "alice@x y"
        );
        assert_eq!(
            a.auth_now(&basic("alice", "nope")).unwrap_err(),
            AuthError::Invalid
        );
        assert_eq!(
            a.auth_now(&basic("alice", "")).unwrap_err(),
            AuthError::Invalid
        );
        assert!(auth(None).auth_now(&basic("bob", "anything")).is_ok());
        assert!(a.auth_now(&basic("root", "pw")).unwrap().user.admin);
        assert_eq!(
            a.auth_now(&basic("a\u{0}b", "pw")).unwrap_err(),
            AuthError::Invalid
        );
        assert_eq!(
            a.auth_now(&basic("a\nb", "pw")).unwrap_err(),
            AuthError::Invalid
        );
    }
}
