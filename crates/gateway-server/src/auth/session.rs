//! Sessions: the signed value a login hands out, checked on every later request, and the
//! cookie plumbing around it (building the `Set-Cookie`, reading cookies, keeping the session
//! cookie away from dashboards).

use super::{Authenticator, User};
use base64::Engine;
use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};
use rand::RngCore;

/// What a session value says (short keys: it travels in every request's cookie).
#[derive(serde::Serialize, serde::Deserialize)]
struct SessionClaims {
    /// User name.
    n: String,
    /// Admin.
    a: bool,
    /// Groups.
    g: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    e: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A random session-signing key (when none is configured).
pub(super) fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    k
}

impl Authenticator {
    /// The value of cookie `name` in `headers`, if present.
    pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim())
    }

    /// The path the session cookie is scoped to (the gateway's prefix plus `/`).
    pub fn cookie_path(&self) -> &str {
        &self.cookie_path
    }

    /// The `Set-Cookie` value for a session: scoped to the gateway's path, `HttpOnly` (page
    /// scripts never see it), `SameSite=Lax` (not sent on cross-site subrequests or POSTs, nor
    /// from sandboxed dashboard pages) and `Secure` when the request came over HTTPS.
    pub fn session_cookie(&self, token: &str, secure: bool) -> Option<HeaderValue> {
        let cookie = format!(
            "{}={}; Max-Age={}; Path={}; HttpOnly; SameSite=Lax{}",
            self.cookie_name,
            token,
            self.max_age.as_secs() * 2,
            self.cookie_path,
            if secure { "; Secure" } else { "" }
        );
        HeaderValue::from_str(&cookie).ok()
    }

    /// Removes the gateway's session cookie from `headers` (other cookies stay), so requests
    /// passed on to user-controlled servers (dashboards) never carry it.
    pub fn strip_session_cookie(&self, headers: &mut HeaderMap) {
        let kept: Vec<String> = headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .map(str::trim)
            .filter(|pair| {
                let name = pair.split_once('=').map_or(*pair, |(k, _)| k);
                !pair.is_empty() && name.trim() != self.cookie_name
            })
            .map(String::from)
            .collect();
        headers.remove(COOKIE);
        if !kept.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
                headers.insert(COOKIE, v);
            }
        }
    }

    /// Whether a `Set-Cookie` value (from a dashboard's response) would set or clear one of
    /// the gateway's own cookies (the session, or a login's OAuth state): such headers are
    /// dropped (no session fixation, no planted login state).
    pub fn is_session_set_cookie(&self, value: &HeaderValue) -> bool {
        let text = String::from_utf8_lossy(value.as_bytes());
        let name = text.split(';').next().unwrap_or("");
        let name = name.split_once('=').map_or(name, |(k, _)| k).trim();
        name == self.cookie_name || name == self.oauth_state_cookie_name()
    }

    /// The user of the first valid session cookie in `headers`.
    pub(super) fn session_user(&self, headers: &HeaderMap) -> Option<User> {
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|h| h.to_str().ok())
            .flat_map(|text| text.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(k, _)| *k == self.cookie_name)
            .find_map(|(_, v)| self.verify_session(v.trim()))
    }

    /// The user a session value stands for, if its signature is ours and it has not expired.
    fn verify_session(&self, value: &str) -> Option<User> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let (body, mac) = value.rsplit_once('.')?;
        let mac = B64.decode(mac).ok()?;
        ring::hmac::verify(&self.session_key, body.as_bytes(), &mac).ok()?;
        let claims: SessionClaims = serde_json::from_slice(&B64.decode(body).ok()?).ok()?;
        (claims.e > unix_now()).then_some(User {
            name: claims.n,
            admin: claims.a,
            groups: claims.g,
        })
    }

    /// A session value for `user`: who they are and until when, signed with the session key
    /// (so every replica sharing the key, and this one after a restart, accepts it). The value
    /// last handed to the same user is reused while it has most of its life left.
    pub(super) fn session_for(&self, user: &User) -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let now = unix_now();
        let max_age = self.max_age.as_secs();
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((token, for_user, exp)) = issued.get(&user.name) {
            if for_user == user && *exp > now + max_age / 2 {
                return token.clone();
            }
        }
        if issued.len() > 4096 {
            issued.retain(|_, (_, _, exp)| *exp > now);
        }
        let claims = SessionClaims {
            n: user.name.clone(),
            a: user.admin,
            g: user.groups.clone(),
            e: now + max_age,
        };
        let body = B64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let mac = ring::hmac::sign(&self.session_key, body.as_bytes());
        let token = format!("{body}.{}", B64.encode(mac.as_ref()));
        issued.insert(user.name.clone(), (token.clone(), user.clone(), claims.e));
        token
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{auth, basic, AuthNow};
    use super::*;
    use crate::auth::AuthError;
    use crate::config::AuthConfig;

    #[test]
    fn session_cookie_attributes_and_stripping() {
        let a = Authenticator::new(
            &AuthConfig {
                cookie_name: Some("gw".into()),
                ..Default::default()
            },
            "/prefix",
        );
        let plain = a.session_cookie("t0k", false).unwrap();
        assert_eq!(
            plain,
            "gw=t0k; Max-Age=600; Path=/prefix/; HttpOnly; SameSite=Lax"
        );
        let secure = a.session_cookie("t0k", true).unwrap();
        assert!(secure.to_str().unwrap().ends_with("; Secure"));

        let mut h = HeaderMap::new();
        h.append(COOKIE, "a=1; gw=secret; b=2".parse().unwrap());
        h.append(COOKIE, "gw=other".parse().unwrap());
        a.strip_session_cookie(&mut h);
        assert_eq!(h.get_all(COOKIE).iter().count(), 1);
        assert_eq!(h[COOKIE], "a=1; b=2");
        let mut only = HeaderMap::new();
        only.insert(COOKIE, "gw=secret".parse().unwrap());
        a.strip_session_cookie(&mut only);
        assert!(only.get(COOKIE).is_none());

        assert!(a.is_session_set_cookie(&"gw=x; Path=/".parse().unwrap()));
        assert!(a.is_session_set_cookie(&" gw =; Max-Age=0".parse().unwrap()));
        assert!(a.is_session_set_cookie(&"gw-oauth-state=n.b".parse().unwrap()));
        assert!(!a.is_session_set_cookie(&"x-gw=1".parse().unwrap()));
        assert!(!a.is_session_set_cookie(&"gwx=1".parse().unwrap()));
    }

    fn cookie_header(a: &Authenticator, token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            format!("{}={token}", a.cookie_name).parse().unwrap(),
        );
        h
    }

    #[test]
    fn signed_sessions_span_replicas_and_refuse_tampering() {
        let config = AuthConfig {
            cookie_name: Some("gw".into()),
            cookie_secret: Some("k".repeat(32)),
            admin_users: vec!["root".into()],
            ..Default::default()
        };
        let one = Authenticator::new(&config, "");
        let two = Authenticator::new(&config, "");
        let token = one
            .auth_now(&basic("root", ""))
            .unwrap()
            .new_session
            .unwrap();
        // Another replica (or this one restarted) with the same key accepts it.
        let user = two.auth_now(&cookie_header(&two, &token)).unwrap().user;
        assert_eq!((user.name.as_str(), user.admin), ("root", true));
        // Another key does not.
        let other = Authenticator::new(
            &AuthConfig {
                cookie_secret: Some("x".repeat(32)),
                ..config.clone()
            },
            "",
        );
        assert_eq!(
            other.auth_now(&cookie_header(&other, &token)).unwrap_err(),
            AuthError::Required
        );
        // A body changed to claim someone else (or admin) fails the signature.
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let (_, mac) = token.rsplit_once('.').unwrap();
        let forged = B64.encode(br#"{"n":"mallory","a":true,"g":[],"e":99999999999}"#);
        for bad in [
            format!("{forged}.{mac}"),
            "garbage".into(),
            format!("{token}x"),
        ] {
            assert_eq!(
                two.auth_now(&cookie_header(&two, &bad)).unwrap_err(),
                AuthError::Required,
                "{bad}"
            );
        }
        // An expired one is ignored.
        let body = B64.encode(br#"{"n":"root","a":true,"g":[],"e":1}"#);
        let mac = ring::hmac::sign(&two.session_key, body.as_bytes());
        let expired = format!("{body}.{}", B64.encode(mac.as_ref()));
        assert!(two.verify_session(&expired).is_none());
    }

    #[test]
    fn cookie_replay_and_reuse() {
        let a = auth(None);
        let first = a.auth_now(&basic("alice", "")).unwrap();
        let cookie = a
            .session_cookie(&first.new_session.unwrap(), false)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(cookie.contains("Max-Age=600; Path=/;"));
        let pair = cookie.split(';').next().unwrap().to_string();
        let mut h = HeaderMap::new();
        h.insert(COOKIE, format!("other=1; {pair}").parse().unwrap());
        let again = a.auth_now(&h).unwrap();
        assert_eq!(again.user.name, "alice");
        assert!(again.new_session.is_none());
        // The same session value is reused while valid.
        let second = a
            .auth_now(&basic("alice", ""))
            .unwrap()
            .new_session
            .unwrap();
        assert!(cookie.contains(&second));
        let mut bad = HeaderMap::new();
        bad.insert(
            COOKIE,
            format!("{}=deadbeef", a.cookie_name).parse().unwrap(),
        );
        assert_eq!(a.auth_now(&bad).unwrap_err(), AuthError::Required);
    }
}
