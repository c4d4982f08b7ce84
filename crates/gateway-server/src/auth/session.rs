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

/// The key session values are signed with: `secret` (the configured cookie secret, or a
/// random one) bound to what vouches for identities here (see [`who_vouches`]). A gateway
/// that shares the secret but authenticates differently, or was restarted with other admins,
/// groups or identity settings, does not accept these sessions: their users log in again.
pub(super) fn session_key(secret: &[u8], vouching: &str) -> ring::hmac::Key {
    let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(
        &derive,
        format!("dask-gateway-rs session key\n{vouching}").as_bytes(),
    );
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, tag.as_ref())
}

/// What decides who a session's user is and what they may do: the method in use and the
/// authentication settings (admins, groups, the method's own section), without the session
/// settings themselves. Never shown anywhere: only signed into the session key.
pub(super) fn who_vouches(config: &crate::config::AuthConfig, method: &super::Method) -> String {
    let crate::config::AuthConfig {
        kind: _,
        password,
        admin_users,
        admin_groups,
        groups,
        cookie_max_age: _,
        cookie_name: _,
        cookie_secret_file: _,
        cookie_secret: _,
        jwt,
        jupyterhub,
        kerberos,
    } = config;
    format!(
        "{:?}\n{password:?}\n{admin_users:?}\n{admin_groups:?}\n{groups:?}\n{jwt:?}\n{jupyterhub:?}\n{kerberos:?}",
        method.challenge()
    )
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
        // A nameless cookie (`=<name>=<value>`) is one some browsers send back as
        // `<name>=<value>`: dropped as well.
        name.is_empty() || name == self.cookie_name || name == self.oauth_state_cookie_name()
    }

    /// The user of the valid session cookies in `headers`. Valid sessions of two different
    /// users (a cookie planted beside the user's own) stand for no one: the request must
    /// authenticate afresh.
    pub(super) fn session_user(&self, headers: &HeaderMap) -> Option<User> {
        let mut users = headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|h| h.to_str().ok())
            .flat_map(|text| text.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(k, _)| *k == self.cookie_name)
            .filter_map(|(_, v)| self.verify_session(v.trim()));
        let first = users.next()?;
        users.all(|u| u.name == first.name).then_some(first)
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
    pub(super) fn session_for(&self, user: &User, until: Option<u64>) -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let now = unix_now();
        let max_age = self.max_age.as_secs();
        let expiry = until.map_or(now + max_age, |u| u.min(now + max_age));
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((token, for_user, exp)) = issued.get(&user.name) {
            if for_user == user && *exp > now + max_age / 2 && *exp <= expiry {
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
            e: expiry,
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
        assert!(a.is_session_set_cookie(&"=gw=planted; Path=/api".parse().unwrap()));
        assert!(a.is_session_set_cookie(&" =x".parse().unwrap()));
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
    fn sessions_do_not_cross_to_a_gateway_that_vouches_differently() {
        let config = AuthConfig {
            cookie_name: Some("gw".into()),
            cookie_secret: Some("k".repeat(32)),
            admin_users: vec!["mallory".into()],
            ..Default::default()
        };
        let token = Authenticator::new(&config, "")
            .auth_now(&basic("mallory", ""))
            .unwrap()
            .new_session
            .unwrap();
        // A replica, or this gateway restarted, with the same settings accepts it.
        let same = Authenticator::new(&config, "");
        assert!(
            same.auth_now(&cookie_header(&same, &token))
                .unwrap()
                .user
                .admin
        );
        // Same secret, mallory no longer an admin: her session is refused, and she logs in
        // again as what she is now.
        let demoted = Authenticator::new(
            &AuthConfig {
                admin_users: vec![],
                ..config.clone()
            },
            "",
        );
        assert_eq!(
            demoted
                .auth_now(&cookie_header(&demoted, &token))
                .unwrap_err(),
            AuthError::Required
        );
        assert!(!demoted.auth_now(&basic("mallory", "")).unwrap().user.admin);
        // Same secret, another way of vouching (a password now): refused too.
        let other = Authenticator::new(
            &AuthConfig {
                password: Some("pw".into()),
                ..config.clone()
            },
            "",
        );
        assert_eq!(
            other.auth_now(&cookie_header(&other, &token)).unwrap_err(),
            AuthError::Required
        );
    }

    #[tokio::test]
    async fn a_session_ends_when_the_token_that_opened_it_expires() {
        let path = std::env::temp_dir().join(format!("dgrs-session-jwt-{}", std::process::id()));
        let secret = "a-shared-secret-of-32-bytes-long!";
        std::fs::write(&path, secret).unwrap();
        let config = AuthConfig {
            kind: crate::config::AuthKind::Jwt,
            jwt: Some(crate::config::JwtConfig {
                secret_file: Some(path.clone()),
                admin_groups: vec!["ops".into()],
                ..Default::default()
            }),
            cookie_max_age: 300,
            ..Default::default()
        };
        let a = Authenticator::from_config(&config, "").await.unwrap();
        std::fs::remove_file(path).unwrap();
        let now = unix_now();
        let mut expiries = Vec::new();
        for exp in [now + 20, now + 3600] {
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &serde_json::json!({"sub": "shorty", "exp": exp}),
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap();
            let mut h = HeaderMap::new();
            h.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
            let value = a.authenticate(&h).await.unwrap().new_session.unwrap();
            use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
            let body = B64.decode(value.split_once('.').unwrap().0).unwrap();
            expiries.push(serde_json::from_slice::<SessionClaims>(&body).unwrap().e);
        }
        assert_eq!(expiries[0], now + 20, "the token's end, not 300 s later");
        // Another user's token beside a session: the token decides (a proxy that adds the
        // signed-in user's token to a browser that kept the previous user's cookie).
        let bearer = |sub: &str| {
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &serde_json::json!({"sub": sub, "exp": now + 600}),
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap();
            let mut h = HeaderMap::new();
            h.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
            h
        };
        let shorty = a.authenticate(&bearer("shorty")).await.unwrap();
        let mut h = bearer("next-user");
        h.insert(
            COOKIE,
            format!("{}={}", a.cookie_name, shorty.new_session.unwrap())
                .parse()
                .unwrap(),
        );
        assert_eq!(a.authenticate(&h).await.unwrap().user.name, "next-user");
        // A fresher token of the same user with fewer rights: they apply at once.
        let token = |groups: &[&str]| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &serde_json::json!({"sub": "op", "groups": groups, "exp": now + 600}),
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        };
        let mut h = HeaderMap::new();
        let admin_token = format!("Bearer {}", token(&["ops"]));
        h.insert(http::header::AUTHORIZATION, admin_token.parse().unwrap());
        let admin = a.authenticate(&h).await.unwrap();
        assert!(admin.user.admin);
        h.insert(
            COOKIE,
            format!("{}={}", a.cookie_name, admin.new_session.unwrap())
                .parse()
                .unwrap(),
        );
        let demoted = format!("Bearer {}", token(&[]));
        h.insert(http::header::AUTHORIZATION, demoted.parse().unwrap());
        let now_plain = a.authenticate(&h).await.unwrap();
        assert!(!now_plain.user.admin);
        assert!(now_plain.new_session.is_some(), "the session is replaced");
        let long = expiries[1];
        assert!((now + 299..=now + 301).contains(&long), "{long}");
    }

    #[test]
    fn credentials_beside_a_session_decide() {
        let a = auth(Some("pw"));
        let root = a
            .auth_now(&basic("root", "pw"))
            .unwrap()
            .new_session
            .unwrap();
        let with_session = |mut h: HeaderMap| {
            h.insert(COOKIE, format!("{}={root}", a.cookie_name).parse().unwrap());
            h
        };
        // Alone, the session stands for root.
        let alone = a.auth_now(&with_session(HeaderMap::new())).unwrap();
        assert!(alone.user.admin && alone.new_session.is_none());
        // Root's own credentials again: root, and no new cookie on every request.
        let again = a.auth_now(&with_session(basic("root", "pw"))).unwrap();
        assert!(again.user.admin && again.new_session.is_none());
        // Another user's: that user, with a session of their own.
        let bob = a.auth_now(&with_session(basic("bob", "pw"))).unwrap();
        assert_eq!((bob.user.name.as_str(), bob.user.admin), ("bob", false));
        assert!(bob.new_session.is_some());
        // Wrong credentials are refused, whatever the session says.
        assert_eq!(
            a.auth_now(&with_session(basic("root", "nope")))
                .unwrap_err(),
            AuthError::Invalid
        );
        // A header in another scheme is no credential of this method: the session stands.
        let mut other = HeaderMap::new();
        other.insert(http::header::AUTHORIZATION, "Bearer x.y.z".parse().unwrap());
        assert_eq!(a.auth_now(&with_session(other)).unwrap().user.name, "root");
    }

    #[test]
    fn valid_sessions_of_two_users_stand_for_no_one() {
        let a = auth(None);
        let session = |user: &str| a.auth_now(&basic(user, "")).unwrap().new_session.unwrap();
        let (alice, mallory) = (session("alice"), session("mallory"));
        let with = |pairs: &[&str]| {
            let mut h = HeaderMap::new();
            let v = pairs
                .iter()
                .map(|t| format!("{}={t}", a.cookie_name))
                .collect::<Vec<_>>()
                .join("; ");
            h.insert(COOKIE, v.parse().unwrap());
            h
        };
        assert_eq!(
            a.auth_now(&with(&[&mallory, &alice])).unwrap_err(),
            AuthError::Required
        );
        assert_eq!(
            a.auth_now(&with(&["forged.x", &alice, &alice]))
                .unwrap()
                .user
                .name,
            "alice"
        );
    }

    #[test]
    fn credentials_of_another_user_outweigh_the_session_cookie() {
        let a = auth(None);
        let alice = a
            .auth_now(&basic("alice", ""))
            .unwrap()
            .new_session
            .unwrap();
        let mut h = basic("bob", "");
        h.insert(
            COOKIE,
            format!("{}={alice}", a.cookie_name).parse().unwrap(),
        );
        let got = a.auth_now(&h).unwrap();
        assert_eq!(got.user.name, "bob");
        assert!(got.new_session.is_some(), "bob gets a session of his own");
        // The cookie's own user's credentials beside it: the session stands, as before.
        let mut h = basic("alice", "");
        h.insert(
            COOKIE,
            format!("{}={alice}", a.cookie_name).parse().unwrap(),
        );
        let got = a.auth_now(&h).unwrap();
        assert_eq!((got.user.name.as_str(), got.new_session), ("alice", None));
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
