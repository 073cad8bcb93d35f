//! Who may use the API: loopback clients freely, everyone else with `Authorization: Bearer`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::{ApiError, HttpState};

/// Whether a request may go on. Clients on a loopback address need no token; any other client
/// must send `Authorization: Bearer <token>` with the configured token. With no token
/// configured, non-loopback clients are always refused.
pub fn authorized(peer: IpAddr, header: Option<&str>, token: Option<&str>) -> bool {
    if peer.to_canonical().is_loopback() {
        return true;
    }
    let (Some(header), Some(token)) = (header, token) else {
        return false;
    };
    let Some((scheme, presented)) = header.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && constant_time_eq(presented.trim().as_bytes(), token.as_bytes())
}

/// Compares the SHA-256 digests of both sides without an early exit, so neither the content
/// nor the length of the token leaks through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    let diff = da.iter().zip(db.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Middleware: refuses unauthorized requests with 401 and a JSON error.
pub(super) async fn require_auth(State(state): State<Arc<HttpState>>, request: Request, next: Next) -> Response {
    // Without connection info (a router not served by `serve`) the peer is unknown: treat it as
    // remote, so only a valid token gets in.
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let presented = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if authorized(peer, presented, state.token.as_deref()) {
        return next.run(request).await;
    }
    let message = if state.token.is_some() {
        "a valid bearer token is required from non-loopback clients"
    } else {
        "no token is configured ([http] token_file): only loopback clients are allowed"
    };
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_needs_no_token() {
        for peer in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            assert!(authorized(ip(peer), None, None), "{peer}");
            assert!(authorized(ip(peer), Some("Bearer wrong"), Some("secret")), "{peer}");
        }
    }

    #[test]
    fn remote_without_configured_token_is_refused() {
        assert!(!authorized(ip("192.0.2.1"), None, None));
        assert!(!authorized(ip("192.0.2.1"), Some("Bearer anything"), None));
        assert!(!authorized(ip("2001:db8::1"), Some("Bearer "), None));
    }

    #[test]
    fn remote_needs_the_right_bearer_token() {
        let remote = ip("10.1.2.3");
        assert!(authorized(remote, Some("Bearer secret"), Some("secret")));
        assert!(authorized(remote, Some("bearer  secret "), Some("secret")));
        assert!(!authorized(remote, None, Some("secret")));
        assert!(!authorized(remote, Some("Bearer secre"), Some("secret")));
        assert!(!authorized(remote, Some("Bearer secret2"), Some("secret")));
        assert!(!authorized(remote, Some("Basic secret"), Some("secret")));
        assert!(!authorized(remote, Some("secret"), Some("secret")));
        assert!(!authorized(ip("::ffff:10.1.2.3"), None, Some("secret")));
        assert!(!authorized(ip("0.0.0.0"), None, Some("secret")));
    }

    #[test]
    fn comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
