//! The OpenAPI 3.1 document of the read API (`GET /openapi.json`, and `contracts/openapi.json`
//! in the repository). Its paths come from the handlers' `#[utoipa::path]` and its schemas from
//! the types they return ([`crate::bodies`]), gathered as the router is built, so a route
//! cannot be served without being described.

use utoipa::{
    OpenApi,
    openapi::{
        self, ContentBuilder, Ref, ResponseBuilder,
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

/// Where the API serves the document.
pub const PATH: &str = "/openapi.json";

/// The name of the bearer token's security scheme.
const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ordo read API",
        description = "The read model of ordo: orders, stock, sagas and notifications as PostgreSQL views built from the event streams, and how far each view is behind. Commands are not sent here but over NATS (`ordo.cmd.>`; their JSON Schemas are in `contracts/`). A command's reply carries `seq`: pass it as `min_seq` to read your own write. When the deployment sets a token (`ORDO_HTTP_TOKEN`), every path but `/healthz` asks for `Authorization: Bearer <token>`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    security(("bearer" = [])),
    tags(
        (name = "reads", description = "The views"),
        (name = "operations", description = "Health, readiness, metrics and the views' progress"),
    ),
    components(schemas(crate::bodies::ErrorBody)),
)]
pub struct Document;

/// What every path shares, added to the document the routes gave: the bearer scheme, and the
/// errors any path but `/healthz` may answer (401 when a token is set; 500 and 503 where a read
/// may fail).
pub fn complete(document: &mut openapi::OpenApi) {
    document.info.version = env!("CARGO_PKG_VERSION").to_owned();
    document
        .components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            BEARER,
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build()
    };
    for (path, item) in document.paths.paths.iter_mut() {
        let Some(operation) = item.get.as_mut() else {
            continue;
        };
        let responses = &mut operation.responses.responses;
        let mut add = |status: &str, description: &str| {
            responses
                .entry(status.to_owned())
                .or_insert_with(|| error(description).into());
        };
        if path == "/healthz" {
            continue;
        }
        add(
            "401",
            "A token is set and the request did not carry it (`unauthorized`)",
        );
        if path == "/readyz" || path == "/metrics" {
            continue;
        }
        add(
            "500",
            "A row this build cannot read, written by a newer build (`internal`)",
        );
        add(
            "503",
            "PostgreSQL or NATS does not answer, or too many reads are in flight (`unavailable`; then with `Retry-After` and `retry_after_ms`)",
        );
    }
}
