//! Reading requests by hand: query parameters (`?wait`, `?follow`, percent-decoding) and JSON
//! bodies, with the answers the stock client expects when they are malformed.

use super::{ApiError, ApiResult};
use axum::body::Bytes;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Parses a JSON request body, which must be an object; anything else is a 422 with a clear
/// message (serde would also read a struct from an array, which no client sends).
pub(super) fn parse_body<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    let invalid = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    let value: Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("Invalid request body: {e}")))?;
    if !value.is_object() {
        return Err(invalid("The request body must be a JSON object".into()));
    }
    serde_json::from_value(value).map_err(|e| invalid(format!("Invalid request body: {e}")))
}

/// The raw (still percent-encoded) value of `key` in a query string; `Some("")` for a bare key.
pub(super) fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

/// `?wait` semantics: absent → false; empty → true; otherwise a non-zero integer.
pub(super) fn wait_flag(query: Option<&str>) -> bool {
    match query_param(query, "wait") {
        None => false,
        Some("") => true,
        Some(v) => v.parse::<i64>().is_ok_and(|n| n != 0),
    }
}

/// `?follow`, `?follow=1` or `?follow=true`.
pub(super) fn follow_flag(query: Option<&str>) -> bool {
    matches!(query_param(query, "follow"), Some("" | "1" | "true"))
}

/// Decodes `%XX` escapes and `+` (a space) in a query value; malformed escapes stay as they are.
pub(super) fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex(bytes[i + 1])? * 16 + hex(bytes[i + 2])?))
            .flatten();
        match (decoded, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_flag_follows_the_protocol() {
        assert!(!wait_flag(None));
        assert!(wait_flag(Some("wait")));
        assert!(wait_flag(Some("wait=")));
        assert!(wait_flag(Some("wait=1")));
        assert!(!wait_flag(Some("wait=0")));
        assert!(!wait_flag(Some("wait=true")));
        assert!(wait_flag(Some("x=1&wait")));
    }

    #[test]
    fn decodes_status_filters() {
        assert_eq!(percent_decode("RUNNING%2CPENDING"), "RUNNING,PENDING");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%é%4"), "%é%4");
    }
}
