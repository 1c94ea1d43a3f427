//! Optional bearer tokens. With an API token set, every endpoint but `/healthz` (a liveness
//! probe that says nothing) answers 401 without `Authorization: Bearer <token>`. `/metrics`
//! takes its own token when one is given (Prometheus then holds only that one), else the API's.
//! Tokens are compared in constant time; TLS is left to a reverse proxy (docs/security.md).

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

/// Middleware: lets a request through when it carries the token its path requires.
pub async fn require_token(
    State(tokens): State<AccessTokens>,
    request: Request,
    next: Next,
) -> Response {
    let Some(required) = tokens.required_for(request.uri().path()) else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match presented {
        Some(presented) if required.matches(presented.trim()) => next.run(request).await,
        Some(_) => ApiError::Unauthorized("the bearer token is not valid".into()).into_response(),
        None => {
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
