//! Optional bearer tokens. With an API token set, every endpoint but `/healthz` (a liveness
//! probe that says nothing) answers 401 without `Authorization: Bearer <token>`. `/metrics`
//! takes its own token when one is given (Prometheus then holds only that one), else the API's.
//! Tokens are compared in constant time; TLS is left to a reverse proxy (docs/security.md).
//!
//! A browser proves it has the API token with the console's session cookie instead (set by the
//! console's login form: HttpOnly, SameSite=Strict, never a URL). The cookie holds a value
//! derived from the token, not the token: it opens the console and the API's reads, and is
//! worth nothing as a bearer token anywhere else. The console's login page and its static
//! assets ask for nothing; any other console page sends a browser without the cookie to the
//! login page.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// A bearer token. It prints as `***`.
#[derive(Clone)]
pub struct Token(Arc<[u8; 32]>);

impl Token {
    pub fn new(secret: &str) -> Self {
        Self(Arc::new(Sha256::digest(secret.as_bytes()).into()))
    }

    /// Whether `presented` is this token. Both are hashed first, so that neither the time nor
    /// the length of the comparison says anything about the token.
    pub fn matches(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.0.ct_eq(&presented).into()
    }
}

impl Token {
    /// The console's session cookie value for this token: derived from it, so the cookie is not
    /// the token.
    pub fn session(&self) -> String {
        let mut digest = Sha256::new();
        digest.update(b"ordo console session\0");
        digest.update(self.0.as_slice());
        digest
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// Whether `presented` is this token's session cookie value, compared in constant time.
    pub fn matches_session(&self, presented: &str) -> bool {
        let expected = self.session();
        expected.len() == presented.len()
            && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// The tokens an HTTP listener asks for; none set, it asks for none.
#[derive(Clone, Debug, Default)]
pub struct AccessTokens {
    /// Every endpoint but `/healthz`.
    pub api: Option<Token>,
    /// `/metrics`, instead of the API's token.
    pub metrics: Option<Token>,
}

impl AccessTokens {
    /// The token `path` requires, if any.
    fn required_for(&self, path: &str) -> Option<&Token> {
        match path {
            "/healthz" => None,
            "/metrics" => self.metrics_token(),
            _ => self.api.as_ref(),
        }
    }

    /// The token `/metrics` requires: its own, else the API's.
    pub fn metrics_token(&self) -> Option<&Token> {
        self.metrics.as_ref().or(self.api.as_ref())
    }
}

/// The name of the console's session cookie.
pub const SESSION_COOKIE: &str = "ordo_console";

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        })
}

/// Console paths that ask for nothing: the login form and the static assets.
fn open_console_path(path: &str) -> bool {
    path == crate::console::LOGIN || path.starts_with(crate::console::ASSETS)
}

/// Middleware: lets a request through when it carries the token its path requires, as a bearer
/// token or, for the API's token, as the console's session cookie.
pub async fn require_token(
    State(tokens): State<AccessTokens>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let Some(required) = tokens.required_for(path) else {
        return next.run(request).await;
    };
    if open_console_path(path) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    // The cookie stands for the API's token only (not for a separate /metrics token).
    let asks_for_api_token = tokens
        .api
        .as_ref()
        .is_some_and(|api| std::ptr::eq(api, required));
    let session = cookie(request.headers(), SESSION_COOKIE).filter(|_| asks_for_api_token);
    match (presented, session) {
        (Some(presented), _) if required.matches(presented.trim()) => next.run(request).await,
        (_, Some(session)) if required.matches_session(session) => next.run(request).await,
        _ if crate::console::is_console_path(path) => {
            crate::console::login_required(&request).into_response()
        }
        (Some(_), _) => {
            ApiError::Unauthorized("the bearer token is not valid".into()).into_response()
        }
        (None, _) => {
            ApiError::Unauthorized("this endpoint requires `Authorization: Bearer <token>`".into())
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_matches_itself_only_and_does_not_print() {
        let token = Token::new("s3cret-token");
        assert!(token.matches("s3cret-token"));
        assert!(!token.matches("s3cret-tokeN"));
        assert!(!token.matches(""));
        assert_eq!(format!("{token:?}"), "Token(***)");
    }

    #[test]
    fn healthz_is_open_and_metrics_takes_its_own_token_else_the_apis() {
        let api = Token::new("api");
        let metrics = Token::new("metrics");
        let both = AccessTokens {
            api: Some(api.clone()),
            metrics: Some(metrics),
        };
        assert!(both.required_for("/healthz").is_none());
        assert!(both.required_for("/metrics").unwrap().matches("metrics"));
        assert!(both.required_for("/orders/o-1").unwrap().matches("api"));
        let api_only = AccessTokens {
            api: Some(api),
            metrics: None,
        };
        assert!(api_only.required_for("/metrics").unwrap().matches("api"));
        assert!(AccessTokens::default().required_for("/orders").is_none());
    }
}
