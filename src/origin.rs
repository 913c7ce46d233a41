//! The `Origin` check before a WebSocket upgrade.
//!
//! Browsers send cookies with a WebSocket upgrade from any site, so a cookie-authenticated
//! application that upgrades whatever asks is open to cross-site WebSocket hijacking. The node
//! upgrades a browser's request only from its own origin (the `Origin`'s host and port equal
//! the request's `Host`) or from one the application listed; a request without `Origin` is no
//! browser's, and passes.

use axum::http::HeaderMap;
use axum::http::header::{HOST, ORIGIN};

/// Whether a request with `headers` may be upgraded, given the origins the application
/// allowed besides its own (`"*"`: any).
pub(crate) fn allowed(headers: &HeaderMap, extra: &[String]) -> bool {
    let Some(origin) = headers.get(ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    if extra
        .iter()
        .any(|allowed| allowed == "*" || allowed.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let authority = origin.split_once("://").map_or("", |(_, rest)| rest);
    let host = headers.get(HOST).and_then(|h| h.to_str().ok());
    !authority.is_empty() && host.is_some_and(|host| host.eq_ignore_ascii_case(authority))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HOST, host.parse().expect("valid"));
        if let Some(origin) = origin {
            h.insert(ORIGIN, origin.parse().expect("valid"));
        }
        h
    }

    #[test]
    fn same_origin_and_no_origin_pass_and_a_foreign_one_does_not() {
        assert!(allowed(&headers(None, "a.test:3000"), &[]));
        assert!(allowed(
            &headers(Some("http://a.test:3000"), "a.test:3000"),
            &[]
        ));
        assert!(!allowed(
            &headers(Some("http://evil.test"), "a.test:3000"),
            &[]
        ));
        assert!(!allowed(
            &headers(Some("http://a.test:3001"), "a.test:3000"),
            &[]
        ));
        assert!(!allowed(&headers(Some("null"), "a.test"), &[]));
    }

    #[test]
    fn listed_origins_and_the_wildcard_pass() {
        let listed = ["https://app.test".to_owned()];
        assert!(allowed(
            &headers(Some("https://app.test"), "api.test"),
            &listed
        ));
        assert!(!allowed(
            &headers(Some("https://other.test"), "api.test"),
            &listed
        ));
        assert!(allowed(
            &headers(Some("https://x.test"), "api.test"),
            &["*".to_owned()]
        ));
    }
}
