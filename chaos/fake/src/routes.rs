//! Which requests are Backstage catalog routes, judged on the method and
//! the path exactly as received (before any decoding or normalising).
//!
//! The demo catalog's request counter (`fake::count`) asks
//! [`is_catalog_route`] about every request that reaches the catalog port
//! and records the ones that are not (see `Stats::unrouted` and
//! `FakeCatalogHandle::unrouted_paths`): the abuse suite of `catalog-chaos`
//! checks that a sidecar in front of it never sends anything else.
//!
//! Invariant: a path with an empty segment, a dot segment (`.` or `..`,
//! literal or percent-encoded in any case) or an encoded `/` is never a
//! route, even when it would normalise to one; the routes are Backstage's
//! catalog routes under [`crate::fake::MOUNT`], each with its methods, and
//! the tier probe `GET /.catalog-cache/v1/generation` a sidecar sends.

use axum::http::Method;

use crate::fake::MOUNT;

/// How many unrouted requests are kept word for word (the count goes on).
pub const UNROUTED_KEPT: usize = 100;

/// Whether `method path` (the path as received, without the query) is one
/// of Backstage's catalog routes.
pub fn is_catalog_route(method: &Method, path: &str) -> bool {
    let Some(rest) = path
        .strip_prefix(MOUNT)
        .and_then(|rest| rest.strip_prefix('/'))
    else {
        return false;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    if segments.iter().any(|s| !plain_segment(s)) {
        return false;
    }
    let get = method == Method::GET;
    let post = method == Method::POST;
    let delete = method == Method::DELETE;
    match segments.as_slice() {
        ["entities"] => get,
        ["entities", "by-query"] => get || post,
        ["entity-facets"] => get || post,
        ["entities", "by-refs"] => post,
        ["entities", "by-name", _, _, _] => get,
        ["entities", "by-name", _, _, _, "ancestry"] => get,
        ["entities", "by-uid", _] => get || delete,
        ["locations"] => get || post,
        ["locations", "by-entity", _, _, _] => get,
        ["locations", _] => get || delete,
        ["refresh"] | ["analyze-location"] | ["validate-entity"] => post,
        // Not Backstage's, and answered 404 like any unknown path: the probe
        // a sidecar makes to learn whether its upstream is another
        // catalog-cache tier. It is expected traffic, not a stray request.
        [".catalog-cache", "v1", "generation"] => get,
        _ => false,
    }
}

/// A segment that addresses nothing but itself: not empty, not a dot
/// segment (however it is spelled), no encoded `/`.
fn plain_segment(segment: &str) -> bool {
    if segment.is_empty() {
        return false;
    }
    let lower = segment.to_ascii_lowercase();
    if lower.contains("%2f") {
        return false;
    }
    let dots = lower.replace("%2e", ".");
    dots != "." && dots != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_catalog_route_with_its_methods_is_a_route() {
        let routes = [
            (Method::GET, "/entities"),
            (Method::GET, "/entities/by-query"),
            (Method::POST, "/entities/by-query"),
            (Method::GET, "/entity-facets"),
            (Method::POST, "/entity-facets"),
            (Method::POST, "/entities/by-refs"),
            (Method::GET, "/entities/by-name/component/default/a%20b"),
            (
                Method::GET,
                "/entities/by-name/component/default/x/ancestry",
            ),
            (Method::GET, "/entities/by-uid/u-1"),
            (Method::DELETE, "/entities/by-uid/u-1"),
            (Method::GET, "/locations"),
            (Method::POST, "/locations"),
            (Method::GET, "/locations/abc"),
            (Method::DELETE, "/locations/abc"),
            (Method::GET, "/locations/by-entity/component/default/x"),
            (Method::POST, "/refresh"),
            (Method::POST, "/analyze-location"),
            (Method::POST, "/validate-entity"),
        ];
        for (method, path) in routes {
            let full = format!("{MOUNT}{path}");
            assert!(is_catalog_route(&method, &full), "{method} {full}");
        }
    }

    #[test]
    fn other_paths_methods_and_paths_that_would_normalise_to_a_route_are_not() {
        let not = [
            (Method::GET, "/api/catalog"),
            (Method::GET, "/api/catalog/"),
            (Method::GET, "/admin/secret"),
            (Method::GET, "/api/catalogue/entities"),
            (Method::GET, "/api/catalog/entities/"),
            (Method::GET, "/api/catalog//entities"),
            (Method::GET, "/api/catalog/locations/../../../admin/secret"),
            (Method::GET, "/api/catalog/locations/%2e%2e/%2E%2E/admin"),
            (Method::GET, "/api/catalog/entities/by-uid/."),
            (Method::GET, "/api/catalog/entities/by-uid/%2E"),
            (Method::GET, "/api/catalog/entities/by-uid/.%2e"),
            (Method::GET, "/api/catalog/entities/by-uid/a%2Fb"),
            (Method::GET, "/api/catalog/entities/by-uid/a%2fb"),
            (Method::GET, "/api/catalog/./entities"),
            (Method::GET, "/api/catalog/entities/by-name/a/b"),
            (Method::GET, "/api/catalog/entities/by-name/a/b/c/d"),
            (Method::GET, "/api/catalog/refresh"),
            (Method::PUT, "/api/catalog/entities"),
            (Method::POST, "/api/catalog/entities"),
            (Method::DELETE, "/api/catalog/entities/by-name/a/b/c"),
        ];
        for (method, path) in not {
            assert!(!is_catalog_route(&method, path), "{method} {path}");
        }
    }
}
