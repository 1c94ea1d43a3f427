//! Optional bearer tokens. With an API token set, every endpoint but `/healthz` (a liveness
//! probe that says nothing) answers 401 without `Authorization: Bearer <token>`. `/metrics`
//! takes its own token when one is given (Prometheus then holds only that one), else the API's.
//! Tokens are compared in constant time; TLS is left to a reverse proxy (docs/security.md).
//!
//! A browser proves it has the API token with the console's session cookie instead (set by the
//! console's login form: HttpOnly, SameSite=Strict, Secure behind an HTTPS proxy, never in a
//! URL). The cookie holds when the session ends and a MAC of that keyed by the token, not the
//! token: it opens the console and the API's reads for [`SESSION_LASTS`] at most, and is worth
//! nothing as a bearer token. The console's login page and its static assets ask for nothing;
//! any other console page sends a browser without a valid cookie to the login page.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};
use hmac::{Hmac, Mac};
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

/// How long a console session lasts after its login.
pub const SESSION_LASTS: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

impl Token {
    /// The console's session cookie value for a session that ends at `until` (seconds since the
    /// epoch): `<until>.<HMAC-SHA256 of it, keyed by the token>`. It is not the token and
    /// cannot be turned into one; it opens the console until it ends or the token changes, on
    /// every instance of the API that has the token (nothing is kept per session).
    pub fn session(&self, until: i64) -> String {
        let tag: String = self
            .session_mac(until)
            .finalize()
            .into_bytes()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        format!("{until}.{tag}")
    }

    /// Whether `presented` is a session cookie value of this token that has not ended at `now`
    /// (and does not end further ahead than a session lasts). The tag is checked in constant
    /// time.
    pub fn matches_session(&self, presented: &str, now: i64) -> bool {
        let Some((until, tag)) = presented.split_once('.') else {
            return false;
        };
        let (Ok(until), Some(tag)) = (until.parse::<i64>(), decode_hex(tag)) else {
            return false;
        };
        let lasts = SESSION_LASTS.as_secs() as i64;
        until > now
            && until <= now.saturating_add(lasts)
            && self.session_mac(until).verify_slice(&tag).is_ok()
    }

    fn session_mac(&self, until: i64) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_slice())
            .expect("HMAC takes a key of any length");
        mac.update(b"ordo console session\0");
        mac.update(until.to_string().as_bytes());
        mac
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
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
        if crate::console::is_console_path(path)
            && let Some(refused) = crate::console::reached_by_name(&request)
        {
            return refused;
        }
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
        (_, Some(session)) if required.matches_session(session, chrono::Utc::now().timestamp()) => {
            next.run(request).await
        }
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
    fn a_session_opens_the_console_until_it_ends_and_only_for_its_token() {
        let token = Token::new("s3cret-token");
        let now = 1_800_000_000;
        let until = now + 3600;
        let session = token.session(until);
        assert!(token.matches_session(&session, now));
        assert!(!token.matches_session(&session, until), "ended");
        assert!(!Token::new("another").matches_session(&session, now));
        assert!(!token.matches(&session), "a session is not the token");
        let tag = session.split_once('.').unwrap().1;
        let extended = format!("{}.{tag}", until + 60);
        assert!(!token.matches_session(&extended, now), "its end is signed");
        let far = token.session(now + SESSION_LASTS.as_secs() as i64 + 60);
        assert!(
            !token.matches_session(&far, now),
            "longer than a session lasts"
        );
        for forged in [
            "",
            ".",
            "1.",
            "x.00",
            &format!("{until}.zz"),
            &format!("{until}"),
        ] {
            assert!(!token.matches_session(forged, now), "{forged:?}");
        }
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

    /// The console's cookie opens what the API's token opens, and not `/metrics` when that has
    /// a token of its own.
    #[tokio::test]
    async fn the_session_cookie_stands_for_the_apis_token_only() {
        let tokens = AccessTokens {
            api: Some(Token::new("api")),
            metrics: Some(Token::new("metrics")),
        };
        let session = tokens
            .api
            .as_ref()
            .unwrap()
            .session(chrono::Utc::now().timestamp() + 60);
        let router = axum::Router::new()
            .route("/metrics", axum::routing::get(|| async { "metrics" }))
            .route("/orders", axum::routing::get(|| async { "orders" }))
            .layer(axum::middleware::from_fn_with_state(tokens, require_token));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(async move { axum::serve(listener, router).await });
        let status = |path: &'static str, cookie: String| async move {
            reqwest::Client::new()
                .get(format!("http://{addr}{path}"))
                .header(header::COOKIE, cookie)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        };
        let cookie = format!("{SESSION_COOKIE}={session}");
        assert_eq!(status("/orders", cookie.clone()).await, 200);
        assert_eq!(status("/metrics", cookie).await, 401);
        assert_eq!(
            status("/orders", format!("{SESSION_COOKIE}=api")).await,
            401,
            "the token itself is no session"
        );
        serving.abort();
    }
}
