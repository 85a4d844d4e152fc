//! The catalog API listener: Backstage's `/api/catalog` routes, mapped onto
//! the read path, and the read path's answers turned into headers and bytes.
//!
//! Every response carries `Cache-Status`, `Age` and `X-Catalog-Stale`. The
//! proxy only ever talks to the configured upstream: the request target's
//! scheme and authority and the `Host` header are ignored, so it is never an
//! open proxy. Layers: a request body limit (`proxy.max_request_body`), the
//! optional client-token check, and a panic catcher that answers 500 in
//! Backstage's shape instead of dropping the connection.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;

use crate::entity::EntityRef;
use crate::metrics as m;
use crate::query::QueryKind;
use crate::read::{CacheStatus, ErrorKind, Incoming, Lookup, Reply};
use crate::sidecar::Sidecar;

/// Where the catalog API is mounted, as in Backstage.
pub const MOUNT: &str = "/api/catalog";

/// The header a client checks to know whether it got stale data.
pub const STALE_HEADER: http::HeaderName = http::HeaderName::from_static("x-catalog-stale");
/// RFC 9211's header.
pub const CACHE_STATUS: http::HeaderName = http::HeaderName::from_static("cache-status");

/// The proxy's router.
pub fn router(sidecar: Arc<Sidecar>) -> Router {
    Router::new()
        .fallback(handle)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .with_state(sidecar)
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let (status, body) = crate::read::error_body(
        ErrorKind::Internal,
        "catalog-cache hit an internal error answering this request",
        &Method::GET,
        "",
    );
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
}

/// Which read-path operation a request is.
enum Route {
    Entity(Lookup),
    ByRefs,
    Query(QueryKind),
    ReadThrough,
    PassThrough,
}

impl Route {
    fn label(&self) -> &'static str {
        match self {
            Self::Entity(Lookup::ByName(_)) => "by_name",
            Self::Entity(Lookup::ByUid(_)) => "by_uid",
            Self::ByRefs => "by_refs",
            Self::Query(QueryKind::GetEntities) => "entities",
            Self::Query(QueryKind::GetByQuery | QueryKind::PostByQuery) => "by_query",
            Self::Query(QueryKind::GetFacets | QueryKind::PostFacets) => "facets",
            Self::ReadThrough => "read_through",
            Self::PassThrough => "pass_through",
        }
    }
}

fn route(method: &Method, path: &str) -> Result<Route, String> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let decoded = |s: &str| percent_decode(s);
    Ok(match (method, segments.as_slice()) {
        (&Method::GET, ["entities"]) => Route::Query(QueryKind::GetEntities),
        (&Method::GET, ["entities", "by-query"]) => Route::Query(QueryKind::GetByQuery),
        (&Method::POST, ["entities", "by-query"]) => Route::Query(QueryKind::PostByQuery),
        (&Method::GET, ["entity-facets"]) => Route::Query(QueryKind::GetFacets),
        (&Method::POST, ["entity-facets"]) => Route::Query(QueryKind::PostFacets),
        (&Method::POST, ["entities", "by-refs"]) => Route::ByRefs,
        (&Method::GET, ["entities", "by-name", kind, namespace, name]) => {
            Route::Entity(Lookup::ByName(EntityRef {
                kind: decoded(kind)?,
                namespace: decoded(namespace)?,
                name: decoded(name)?,
            }))
        }
        (&Method::GET, ["entities", "by-uid", uid]) => Route::Entity(Lookup::ByUid(decoded(uid)?)),
        (&Method::GET, ["entities", "by-name", _, _, _, "ancestry"]) => Route::ReadThrough,
        (&Method::GET, ["locations", ..]) => Route::ReadThrough,
        _ => Route::PassThrough,
    })
}

fn percent_decode(segment: &str) -> Result<String, String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("Malformed percent-encoding in path segment '{segment}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("Path segment '{segment}' is not UTF-8"))
}

async fn handle(State(sidecar): State<Arc<Sidecar>>, request: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let method = parts.method.clone();
    let full_path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let Some(path) = full_path
        .strip_prefix(MOUNT)
        .filter(|p| p.is_empty() || p.starts_with('/'))
    else {
        let incoming = Incoming {
            method: &method,
            path: &full_path,
            query: &query,
            headers: &parts.headers,
            body: Bytes::new(),
        };
        let reply = sidecar.error_reply(
            ErrorKind::NotFound,
            &format!(
                "catalog-cache serves the catalog API under {MOUNT}; {full_path} is not part of it"
            ),
            &incoming,
        );
        return render(reply, "unknown", started);
    };
    let path = if path.is_empty() { "/" } else { path };
    let mut incoming = Incoming {
        method: &method,
        path,
        query: &query,
        headers: &parts.headers,
        body: Bytes::new(),
    };
    if let Some(tokens) = &sidecar.client_tokens {
        let presented = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let refusal = match presented {
            None => Some("Missing credentials"),
            Some(t) if !tokens.contains(t.trim()) => Some("Illegal token"),
            Some(_) => None,
        };
        if let Some(message) = refusal {
            return render(
                sidecar.error_reply(ErrorKind::Authentication, message, &incoming),
                "unauthorized",
                started,
            );
        }
    }
    let limit = sidecar.config.proxy.max_request_body.0 as usize;
    let body = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            let message =
                format!("Request body is larger than proxy.max_request_body ({limit} bytes)");
            return render(
                sidecar.error_reply(ErrorKind::TooLarge, &message, &incoming),
                "too_large",
                started,
            );
        }
    };
    incoming.body = body;
    let route = match route(&method, path) {
        Ok(r) => r,
        Err(message) => {
            return render(
                sidecar.error_reply(ErrorKind::Input, &message, &incoming),
                "invalid",
                started,
            )
        }
    };
    let label = route.label();
    let reply = match route {
        Route::Entity(lookup) => sidecar.read_entity(lookup, &incoming).await,
        Route::ByRefs => sidecar.read_by_refs(&incoming).await,
        Route::Query(kind) => sidecar.read_query(kind, &incoming).await,
        Route::ReadThrough => sidecar.read_through(&incoming).await,
        Route::PassThrough => sidecar.pass_through(&incoming).await,
    };
    render(reply, label, started)
}

/// Turns a read-path answer into an HTTP response with the staleness headers.
fn render(reply: Reply, route: &'static str, started: Instant) -> Response {
    m::record_request(
        route,
        reply.cache.outcome(),
        started.elapsed().as_secs_f64(),
    );
    let mut response = Response::new(Body::from(reply.body));
    *response.status_mut() = reply.status;
    let headers = response.headers_mut();
    *headers = reply.headers;
    let cache_status = match reply.cache {
        CacheStatus::Hit => HeaderValue::from_static("catalog-cache; hit"),
        other => HeaderValue::from_str(&other.header())
            .unwrap_or(HeaderValue::from_static("catalog-cache")),
    };
    headers.insert(CACHE_STATUS, cache_status);
    headers.insert(http::header::AGE, HeaderValue::from(reply.age.as_secs()));
    headers.insert(
        STALE_HEADER,
        HeaderValue::from_static(if reply.stale { "true" } else { "false" }),
    );
    if reply.status == StatusCode::NO_CONTENT {
        headers.remove(http::header::CONTENT_TYPE);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_follow_backstage_paths() {
        let r = |m: Method, p: &str| route(&m, p).unwrap().label();
        assert_eq!(r(Method::GET, "/entities"), "entities");
        assert_eq!(r(Method::POST, "/entities/by-query"), "by_query");
        assert_eq!(r(Method::GET, "/entity-facets"), "facets");
        assert_eq!(r(Method::POST, "/entities/by-refs"), "by_refs");
        assert!(matches!(
            route(&Method::GET, "/entities/by-name/Component/default/Checkout%2DService").unwrap(),
            Route::Entity(Lookup::ByName(ref r)) if r.name == "Checkout-Service"
        ));
        assert_eq!(
            r(
                Method::GET,
                "/entities/by-name/component/default/x/ancestry"
            ),
            "read_through"
        );
        assert_eq!(r(Method::GET, "/locations/abc"), "read_through");
        assert_eq!(r(Method::GET, "/locations"), "read_through");
        assert_eq!(r(Method::DELETE, "/entities/by-uid/u"), "pass_through");
        assert_eq!(r(Method::POST, "/refresh"), "pass_through");
        assert!(route(&Method::GET, "/entities/by-uid/%zz").is_err());
    }
}
