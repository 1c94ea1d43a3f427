//! The operator console: HTML pages under `/ui/`, rendered on the server from the same views,
//! tables and streams as the API, with the assets compiled into the binary (nothing is fetched
//! from elsewhere, nothing to build on the user's side).
//!
//! Safe by construction: every value is escaped by the templates (maud escapes whatever it
//! splices), ids in URLs are percent-encoded, the one script is a static file that reads no
//! data from the page, and every answer carries a Content-Security-Policy that allows scripts,
//! styles and requests from this origin only. With an API token set, a browser logs in with a
//! form and gets a session cookie (HttpOnly, SameSite=Strict; see [`crate::auth`]); the token is
//! never put in a URL. Actions are POSTs from the console's own forms, refused from any other
//! origin, each confirmed in the browser before it is sent.
//!
//! Pages: [`pages`]. Actions (retries) are asked of the components that own the state, over NATS
//! (`ordo_saga::operations`): the API itself only reads.

mod actions;
mod pages;
mod rebuilds;

pub use pages::COMMANDS_GROUP;
pub use rebuilds::{RebuildStatus, Rebuilds};

use std::sync::Arc;

use axum::{
    Form, Router,
    extract::{Query, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use crate::{ApiState, auth};

pub const PREFIX: &str = "/ui";
pub const LOGIN: &str = "/ui/login";
pub const ASSETS: &str = "/ui/assets/";

/// Scripts, styles, images and requests from this origin only; no plugin, no frame, no form to
/// elsewhere.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

const STYLE: &str = include_str!("assets/console.css");
const SCRIPT: &str = include_str!("assets/console.js");

pub fn is_console_path(path: &str) -> bool {
    path == PREFIX || path.starts_with("/ui/")
}

/// The console's routes; [`crate::router`] adds them beside the API's. The pages read the same
/// tables as the API's reads, so the same bound on reads in flight sheds them (its 503 gets the
/// console's headers too).
pub fn routes(reads_in_flight: Arc<tokio::sync::Semaphore>) -> Router<Arc<ApiState>> {
    Router::new()
        .route(PREFIX, get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(pages::home))
        .route("/ui/orders/{order_id}", get(pages::order))
        .route("/ui/stock/{sku}", get(pages::stock))
        .route("/ui/projections", get(pages::projections))
        .route("/ui/partitions", get(pages::partitions))
        .route(LOGIN, get(login_form).post(log_in))
        .route("/ui/logout", post(log_out))
        .route("/ui/sagas/{order_id}/retry", post(actions::retry_saga))
        .route(
            "/ui/notifications/{order_id}/{kind}/retry",
            post(actions::retry_notification),
        )
        .route(
            "/ui/projections/{view}/rebuild",
            post(actions::rebuild_view),
        )
        .route("/ui/assets/console.css", get(|| asset(STYLE, "text/css")))
        .route(
            "/ui/assets/console.js",
            get(|| asset(SCRIPT, "text/javascript")),
        )
        .layer(middleware::from_fn_with_state(
            reads_in_flight,
            crate::app::shed_reads,
        ))
        .layer(middleware::from_fn(secure_headers))
}

/// A console path no route serves. (The API's router has one fallback for both; it sends
/// console paths here.)
pub fn not_found() -> Response {
    let mut response = (
        StatusCode::NOT_FOUND,
        message_page("Not found", "No such page."),
    )
        .into_response();
    protect(&mut response);
    response
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Every console answer: the policy, no sniffing, no framing, no referrer outside, and pages not cached
/// (they hold customer data).
async fn secure_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    protect(&mut response);
    response
}

fn protect(response: &mut Response) {
    let headers = response.headers_mut();
    let set = |headers: &mut HeaderMap, name, value| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set(
        headers,
        header::CONTENT_SECURITY_POLICY,
        CONTENT_SECURITY_POLICY,
    );
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    // The console's own pages see where a person came from; a link out (a trace viewer) gets
    // nothing, as ids in the console's URLs are customer data.
    set(headers, header::REFERRER_POLICY, "same-origin");
    if !headers.contains_key(header::CACHE_CONTROL) {
        set(headers, header::CACHE_CONTROL, "no-store");
    }
}

/// Without an API token, the console answers only when reached by an address (`127.0.0.1:8080`,
/// `localhost`), never by a name: a site whose name is made to resolve to this machine (DNS
/// rebinding) would be the console's own origin to a browser, free to read its pages and press
/// its buttons, and only the `Host` the browser sends gives it away. Behind a proxy, `Host` may
/// be the proxy's upstream address whatever name the browser used: the `X-Forwarded-Host` the
/// proxy adds must be an address too. `Some` is the refusal.
pub fn reached_by_name(request: &Request) -> Option<Response> {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok());
    let mut forwarded = headers
        .get_all("x-forwarded-host")
        .iter()
        .flat_map(|value| {
            value
                .to_str()
                .map_or(vec!["?"], |text| text.split(',').collect())
        });
    if host.is_some_and(actions::is_address)
        && forwarded.all(|host| actions::is_address(host.trim()))
    {
        return None;
    }
    let mut response = (
        StatusCode::FORBIDDEN,
        message_page(
            "Reached by a name",
            "This console has no API token, so it answers only at an address (such as \
             127.0.0.1:8080), not at a name that any site could point here. Open it by address, \
             or start the API with a token (--http-token) to use it by name.",
        ),
    )
        .into_response();
    protect(&mut response);
    Some(response)
}

/// What a console request without the session gets: a page is sent to the login form (which
/// comes back to it), anything else is refused. (Answered before the console's routes, so
/// the headers of [`secure_headers`] are added here.)
pub fn login_required(request: &Request) -> Response {
    let mut response = if request.method() == axum::http::Method::GET {
        let back = request
            .uri()
            .path_and_query()
            .map_or("/ui/", |path| path.as_str());
        let to = format!("{LOGIN}?next={}", encode(back));
        Redirect::to(&to).into_response()
    } else {
        (
            StatusCode::UNAUTHORIZED,
            message_page(
                "Log in first",
                "This action needs the API token: log in to the console, then try again.",
            ),
        )
            .into_response()
    };
    protect(&mut response);
    response
}

/// Percent-encodes `text` for a URL's path segment or query value.
pub(crate) fn encode(text: &str) -> String {
    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    const KEEP: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    utf8_percent_encode(text, KEEP).to_string()
}

/// Where a login may send the browser back to: a console page of this origin, nothing else
/// (and only as printable ASCII, which is what a `Location` header may hold).
fn console_page(next: Option<&str>) -> &str {
    match next {
        Some(next)
            if next.starts_with("/ui/")
                && !next.contains("//")
                && !next.contains('\\')
                && next.bytes().all(|byte| byte.is_ascii_graphic()) =>
        {
            next
        }
        _ => "/ui/",
    }
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

async fn login_form(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<LoginQuery>,
) -> Response {
    if state.tokens.api.is_none() {
        return Redirect::to("/ui/").into_response();
    }
    login_page(console_page(query.next.as_deref()), None).into_response()
}

fn login_page(next: &str, failed: Option<&str>) -> Markup {
    layout(
        "Log in",
        false,
        html! {
            @if let Some(failed) = failed {
                p.error role="alert" { (failed) }
            }
            form.login method="post" action=(LOGIN) {
                label for="token" { "API token" }
                input #token type="password" name="token" autocomplete="current-password" required autofocus;
                input type="hidden" name="next" value=(next);
                button type="submit" { "Log in" }
            }
            p.hint { "The token the API was started with (" code { "ORDO_HTTP_TOKEN" } "). \
                      It is kept in a cookie this page's scripts cannot read, for this browser session." }
        },
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn log_in(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = console_page(form.next.as_deref()).to_owned();
    let Some(api) = state.tokens.api.as_ref() else {
        return Redirect::to(&next).into_response();
    };
    if let Err(refused) = actions::same_origin(&headers) {
        return *refused;
    }
    if !api.matches(form.token.trim()) {
        return (
            StatusCode::UNAUTHORIZED,
            login_page(&next, Some("That is not the API token.")),
        )
            .into_response();
    }
    let lasts = auth::SESSION_LASTS.as_secs();
    let until = chrono::Utc::now().timestamp() + lasts as i64;
    let cookie = format!(
        "{}={}; Path=/; Max-Age={lasts}; HttpOnly; SameSite=Strict{}",
        auth::SESSION_COOKIE,
        api.session(until),
        secure(&headers)
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response()
}

async fn log_out(headers: HeaderMap) -> Response {
    if let Err(refused) = actions::same_origin(&headers) {
        return *refused;
    }
    let cookie = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        auth::SESSION_COOKIE,
        secure(&headers)
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to(LOGIN)).into_response()
}

/// `; Secure` when the browser reached the console over HTTPS, as the reverse proxy that ends
/// TLS says (`X-Forwarded-Proto`): the cookie then never travels over plain HTTP. (A client
/// that sends the header itself only restricts its own cookie.)
fn secure(headers: &HeaderMap) -> &'static str {
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    if https { "; Secure" } else { "" }
}

/// Every page: the navigation, the title, the body.
fn layout(title: &str, logged_in: bool, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · ordo" }
                link rel="stylesheet" href="/ui/assets/console.css";
                script src="/ui/assets/console.js" defer {}
            }
            body {
                header {
                    nav {
                        a.brand href="/ui/" { "ordo" }
                        a href="/ui/" { "Orders" }
                        a href="/ui/projections" { "Projections" }
                        a href="/ui/partitions" { "Partitions" }
                    }
                    @if logged_in {
                        form.logout method="post" action="/ui/logout" {
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page that only says something.
fn message_page(title: &str, message: &str) -> Markup {
    layout(title, false, html! { p { (message) } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_sends_back_to_a_console_page_of_this_origin_only() {
        assert_eq!(console_page(Some("/ui/orders/o-1")), "/ui/orders/o-1");
        assert_eq!(console_page(Some("/ui/stock/A1?x=1")), "/ui/stock/A1?x=1");
        for elsewhere in [
            "https://evil.example/ui/",
            "//evil.example/ui/",
            "/ui//evil.example",
            "/ui/\\evil.example",
            "/metrics",
            "/ui/é",
            "/ui/a b",
            "/ui/a\r\nSet-Cookie: x=1",
        ] {
            assert_eq!(console_page(Some(elsewhere)), "/ui/", "{elsewhere:?}");
        }
        assert_eq!(console_page(None), "/ui/");
    }
}
