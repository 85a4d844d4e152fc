//! Backstage's catalog routes, parsed from a request's method and raw path
//! (below `/api/catalog`). The proxy serves only these; the read path sends
//! the upstream only paths rebuilt from a parsed [`Route`], so a client
//! cannot make the sidecar send anything else — with its own token —
//! to the catalog or beyond it.
//!
//! A path is refused locally (400) when a segment is empty, is a dot segment
//! (`.`/`..`, written literally or percent-encoded), holds an encoded `/` or
//! a backslash, a control character, or percent-encoding that is broken or
//! not UTF-8. A well-formed path that is not a catalog route is a 404.

use http::Method;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// What RFC 3986 leaves unescaped in a path segment or query value; the
/// rest is percent-encoded when a path is rebuilt for the upstream.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes one path segment or query value.
pub fn encode_component(text: &str) -> String {
    utf8_percent_encode(text, COMPONENT).to_string()
}

/// An entity's `kind`, `namespace` and `name` as a route names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityName {
    /// Kind, as written.
    pub kind: String,
    /// Namespace, as written.
    pub namespace: String,
    /// Name, as written.
    pub name: String,
}

impl EntityName {
    fn path(&self) -> String {
        format!(
            "{}/{}/{}",
            encode_component(&self.kind),
            encode_component(&self.namespace),
            encode_component(&self.name)
        )
    }
}

/// One of Backstage's catalog routes, with its decoded parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /entities`.
    GetEntities,
    /// `GET /entities/by-query`.
    GetByQuery,
    /// `POST /entities/by-query`.
    PostByQuery,
    /// `GET /entity-facets`.
    GetFacets,
    /// `POST /entity-facets`.
    PostFacets,
    /// `POST /entities/by-refs`.
    ByRefs,
    /// `GET /entities/by-name/{kind}/{namespace}/{name}`.
    ByName(EntityName),
    /// `GET /entities/by-uid/{uid}`.
    ByUid(String),
    /// `GET /entities/by-name/{kind}/{namespace}/{name}/ancestry`.
    Ancestry(EntityName),
    /// `GET /locations`.
    Locations,
    /// `GET /locations/{id}`.
    Location(String),
    /// `GET /locations/by-entity/{kind}/{namespace}/{name}`.
    LocationByEntity(EntityName),
    /// `POST /refresh`.
    Refresh,
    /// `DELETE /entities/by-uid/{uid}`.
    DeleteByUid(String),
    /// `POST /locations`.
    CreateLocation,
    /// `DELETE /locations/{id}`.
    DeleteLocation(String),
    /// `POST /analyze-location`.
    AnalyzeLocation,
    /// `POST /validate-entity`.
    ValidateEntity,
    /// `GET /.catalog-cache/v1/generation`: the tier extension (never
    /// forwarded).
    TierGeneration,
    /// `GET /.catalog-cache/v1/changes`: the tier extension (never
    /// forwarded).
    TierChanges,
}

/// How the read path answers a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Computed from the mirror's index.
    Query,
    /// One entity: the mirror, revalidated with the upstream when old.
    Entity,
    /// Entities by ref: the mirror, revalidated when old.
    ByRefs,
    /// Not computable from the mirror: fetched, stored, served stale.
    ReadThrough,
    /// A write: passed through with the caller's credentials.
    Write,
    /// The tier extension: answered by this sidecar alone.
    Extension,
}

/// Why a path is not a catalog route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The path is malformed or could address something else (400).
    #[error("{0}")]
    BadPath(String),
    /// A well-formed path that is not a catalog route (404).
    #[error("{method} {path} is not a catalog API route")]
    NotFound {
        /// The method.
        method: Method,
        /// The path as sent.
        path: String,
    },
}

/// Longest path accepted, in bytes (entity names are at most 63
/// characters; a generous bound that keeps a hostile path cheap).
pub const MAX_PATH: usize = 4096;

/// Parses `raw` (the path below the catalog mount, as sent, starting with
/// `/`) for `method`.
pub fn parse(method: &Method, raw: &str) -> Result<Route, RouteError> {
    if raw.len() > MAX_PATH {
        return Err(RouteError::BadPath(format!(
            "Request path is longer than {MAX_PATH} bytes"
        )));
    }
    let rest = raw.strip_prefix('/').unwrap_or(raw);
    if rest.is_empty() {
        return Err(RouteError::NotFound {
            method: method.clone(),
            path: raw.to_string(),
        });
    }
    let mut segments = Vec::new();
    for segment in rest.split('/') {
        segments.push(decode_segment(segment, raw)?);
    }
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let name = |k: &str, ns: &str, n: &str| EntityName {
        kind: k.to_string(),
        namespace: ns.to_string(),
        name: n.to_string(),
    };
    let route = match (method, s.as_slice()) {
        (&Method::GET, ["entities"]) => Route::GetEntities,
        (&Method::GET, ["entities", "by-query"]) => Route::GetByQuery,
        (&Method::POST, ["entities", "by-query"]) => Route::PostByQuery,
        (&Method::GET, ["entity-facets"]) => Route::GetFacets,
        (&Method::POST, ["entity-facets"]) => Route::PostFacets,
        (&Method::POST, ["entities", "by-refs"]) => Route::ByRefs,
        (&Method::GET, ["entities", "by-name", k, ns, n]) => Route::ByName(name(k, ns, n)),
        (&Method::GET, ["entities", "by-name", k, ns, n, "ancestry"]) => {
            Route::Ancestry(name(k, ns, n))
        }
        (&Method::GET, ["entities", "by-uid", uid]) => Route::ByUid(uid.to_string()),
        (&Method::DELETE, ["entities", "by-uid", uid]) => Route::DeleteByUid(uid.to_string()),
        (&Method::GET, ["locations"]) => Route::Locations,
        (&Method::POST, ["locations"]) => Route::CreateLocation,
        (&Method::GET, ["locations", "by-entity", k, ns, n]) => {
            Route::LocationByEntity(name(k, ns, n))
        }
        (&Method::GET, ["locations", id]) => Route::Location(id.to_string()),
        (&Method::DELETE, ["locations", id]) => Route::DeleteLocation(id.to_string()),
        (&Method::POST, ["refresh"]) => Route::Refresh,
        (&Method::POST, ["analyze-location"]) => Route::AnalyzeLocation,
        (&Method::POST, ["validate-entity"]) => Route::ValidateEntity,
        (&Method::GET, [".catalog-cache", "v1", "generation"]) => Route::TierGeneration,
        (&Method::GET, [".catalog-cache", "v1", "changes"]) => Route::TierChanges,
        _ => {
            return Err(RouteError::NotFound {
                method: method.clone(),
                path: raw.to_string(),
            })
        }
    };
    Ok(route)
}

/// Decodes one segment, refusing what could address something else.
fn decode_segment(segment: &str, raw: &str) -> Result<String, RouteError> {
    let bad = |why: &str| RouteError::BadPath(format!("Invalid request path '{raw}': {why}"));
    if segment.is_empty() {
        return Err(bad("empty path segments are not allowed"));
    }
    if segment.contains('\\') {
        return Err(bad("backslashes are not allowed"));
    }
    // Every `%` must start a two-digit hex escape (percent-encoding's decoder
    // would pass a broken one through as it is).
    let bytes = segment.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        {
            return Err(bad("malformed percent-encoding"));
        }
    }
    let decoded = percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| bad("a path segment is not UTF-8"))?;
    if decoded == "." || decoded == ".." {
        return Err(bad("dot segments are not allowed"));
    }
    if decoded.contains('/') {
        return Err(bad("an encoded '/' is not allowed in a path segment"));
    }
    if decoded.contains('\\') {
        return Err(bad("backslashes are not allowed"));
    }
    if decoded.chars().any(char::is_control) {
        return Err(bad("control characters are not allowed"));
    }
    Ok(decoded.into_owned())
}

impl Route {
    /// How the read path answers it.
    pub fn class(&self) -> Class {
        match self {
            Self::GetEntities
            | Self::GetByQuery
            | Self::PostByQuery
            | Self::GetFacets
            | Self::PostFacets => Class::Query,
            Self::ByName(_) | Self::ByUid(_) => Class::Entity,
            Self::ByRefs => Class::ByRefs,
            Self::Ancestry(_) | Self::Locations | Self::Location(_) | Self::LocationByEntity(_) => {
                Class::ReadThrough
            }
            Self::Refresh
            | Self::DeleteByUid(_)
            | Self::CreateLocation
            | Self::DeleteLocation(_)
            | Self::AnalyzeLocation
            | Self::ValidateEntity => Class::Write,
            Self::TierGeneration | Self::TierChanges => Class::Extension,
        }
    }

    /// The method the upstream is asked with.
    pub fn method(&self) -> Method {
        match self {
            Self::PostByQuery
            | Self::PostFacets
            | Self::ByRefs
            | Self::Refresh
            | Self::CreateLocation
            | Self::AnalyzeLocation
            | Self::ValidateEntity => Method::POST,
            Self::DeleteByUid(_) | Self::DeleteLocation(_) => Method::DELETE,
            _ => Method::GET,
        }
    }

    /// The path the upstream is asked for (below its base URL), rebuilt
    /// from the parsed parameters, each percent-encoded.
    pub fn upstream_path(&self) -> String {
        match self {
            Self::GetEntities => "/entities".into(),
            Self::GetByQuery | Self::PostByQuery => "/entities/by-query".into(),
            Self::GetFacets | Self::PostFacets => "/entity-facets".into(),
            Self::ByRefs => "/entities/by-refs".into(),
            Self::ByName(n) => format!("/entities/by-name/{}", n.path()),
            Self::Ancestry(n) => format!("/entities/by-name/{}/ancestry", n.path()),
            Self::ByUid(uid) | Self::DeleteByUid(uid) => {
                format!("/entities/by-uid/{}", encode_component(uid))
            }
            Self::Locations | Self::CreateLocation => "/locations".into(),
            Self::Location(id) | Self::DeleteLocation(id) => {
                format!("/locations/{}", encode_component(id))
            }
            Self::LocationByEntity(n) => format!("/locations/by-entity/{}", n.path()),
            Self::Refresh => "/refresh".into(),
            Self::AnalyzeLocation => "/analyze-location".into(),
            Self::ValidateEntity => "/validate-entity".into(),
            Self::TierGeneration => "/.catalog-cache/v1/generation".into(),
            Self::TierChanges => "/.catalog-cache/v1/changes".into(),
        }
    }

    /// The `route` label of the request metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::GetEntities => "entities",
            Self::GetByQuery | Self::PostByQuery => "by_query",
            Self::GetFacets | Self::PostFacets => "facets",
            Self::ByRefs => "by_refs",
            Self::ByName(_) => "by_name",
            Self::ByUid(_) => "by_uid",
            Self::Ancestry(_) | Self::Locations | Self::Location(_) | Self::LocationByEntity(_) => {
                "read_through"
            }
            Self::TierGeneration | Self::TierChanges => "tier",
            _ => "pass_through",
        }
    }
}

/// The upstream path of one entity by name.
pub fn by_name_path(kind: &str, namespace: &str, name: &str) -> String {
    Route::ByName(EntityName {
        kind: kind.to_string(),
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
    .upstream_path()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: Method, path: &str) -> Route {
        parse(&method, path).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn bad(method: Method, path: &str) -> String {
        match parse(&method, path) {
            Err(RouteError::BadPath(why)) => why,
            other => panic!("{method} {path}: expected a bad path, got {other:?}"),
        }
    }

    #[test]
    fn every_catalog_route_parses_and_rebuilds_its_upstream_path() {
        let cases = [
            (Method::GET, "/entities", Class::Query),
            (Method::GET, "/entities/by-query", Class::Query),
            (Method::POST, "/entities/by-query", Class::Query),
            (Method::GET, "/entity-facets", Class::Query),
            (Method::POST, "/entity-facets", Class::Query),
            (Method::POST, "/entities/by-refs", Class::ByRefs),
            (
                Method::GET,
                "/entities/by-name/component/default/x",
                Class::Entity,
            ),
            (Method::GET, "/entities/by-uid/u-1", Class::Entity),
            (
                Method::GET,
                "/entities/by-name/component/default/x/ancestry",
                Class::ReadThrough,
            ),
            (Method::GET, "/locations", Class::ReadThrough),
            (Method::GET, "/locations/abc", Class::ReadThrough),
            (
                Method::GET,
                "/locations/by-entity/component/default/x",
                Class::ReadThrough,
            ),
            (Method::POST, "/refresh", Class::Write),
            (Method::DELETE, "/entities/by-uid/u-1", Class::Write),
            (Method::POST, "/locations", Class::Write),
            (Method::DELETE, "/locations/abc", Class::Write),
            (Method::POST, "/analyze-location", Class::Write),
            (Method::POST, "/validate-entity", Class::Write),
        ];
        for (method, path, class) in cases {
            let route = ok(method.clone(), path);
            assert_eq!(route.class(), class, "{method} {path}");
            assert_eq!(route.upstream_path(), path, "{method} {path}");
            assert_eq!(route.method(), method, "{method} {path}");
        }
    }

    #[test]
    fn parameters_are_decoded_and_re_encoded() {
        let route = ok(
            Method::GET,
            "/entities/by-name/Component/default/Checkout%2DService",
        );
        assert_eq!(
            route,
            Route::ByName(EntityName {
                kind: "Component".into(),
                namespace: "default".into(),
                name: "Checkout-Service".into()
            })
        );
        assert_eq!(
            route.upstream_path(),
            "/entities/by-name/Component/default/Checkout-Service"
        );
        let spaced = ok(Method::GET, "/entities/by-name/component/default/a%20b%3F");
        assert_eq!(
            spaced.upstream_path(),
            "/entities/by-name/component/default/a%20b%3F"
        );
    }

    #[test]
    fn paths_that_could_address_something_else_are_refused() {
        for path in [
            "/locations/../../../admin/secret",
            "/locations/%2e%2e/%2E%2E/admin",
            "/entities/by-uid/.",
            "/entities/by-uid/%2e",
            "/entities//by-query",
            "/entities/by-query/",
            "/entities/by-uid/a%2Fb",
            "/entities/by-uid/a%2fb",
            "/entities/by-uid/a\\b",
            "/entities/by-uid/a%5Cb",
            "/entities/by-uid/%zz",
            "/entities/by-uid/%4",
            "/entities/by-uid/%ff%fe",
            "/entities/by-uid/a%00b",
        ] {
            let why = bad(Method::GET, path);
            assert!(why.contains("Invalid request path"), "{path}: {why}");
        }
        assert!(parse(&Method::GET, &"/a".repeat(3000)).is_err());
    }

    #[test]
    fn well_formed_paths_outside_the_catalog_api_are_not_found() {
        for (method, path) in [
            (Method::GET, "/admin/secret"),
            (Method::GET, "/"),
            (Method::PUT, "/entities"),
            (Method::POST, "/entities/by-name/a/b/c"),
            (Method::GET, "/entities/by-name/a/b"),
            (Method::GET, "/entities/by-name/a/b/c/d/e"),
            (Method::PATCH, "/locations/x"),
        ] {
            assert!(
                matches!(parse(&method, path), Err(RouteError::NotFound { .. })),
                "{method} {path}"
            );
        }
    }
}
