//! The catalog API listener: Backstage's `/api/catalog` routes, mapped onto
//! the read path, and the read path's answers turned into headers and bytes.
//!
//! Every response carries `Cache-Status`, `Age` and `X-Catalog-Stale`. The
//! proxy only ever talks to the configured upstream, and only for
//! Backstage's catalog routes ([`crate::route`]): the request target's
//! scheme and authority and the `Host` header are ignored, malformed or
//! ambiguous paths are refused here, other paths are a 404 here. In order:
//! the optional client-token check, the route, the request body limit
//! (`proxy.max_request_body`); around it all, a panic catcher that answers
//! 500 in Backstage's shape instead of dropping the connection.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;
use tower_http::compression::predicate::{DefaultPredicate, Predicate};
use tower_http::compression::CompressionLayer;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::{HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;

use crate::api_error::{ApiError, ErrorKind};
use crate::entity::EntityRef;
use crate::history::History;
use crate::metrics as m;
use crate::query::QueryKind;
use crate::read::{Answer, CacheStatus, Incoming, Lookup, Payload, ReadError, ReadPath};
use crate::route::{self, Class, Route, RouteError};

/// Where the catalog API is mounted, as in Backstage.
pub const MOUNT: &str = "/api/catalog";

pub use crate::provenance::{CACHE_STATUS, STALE_HEADER};

/// What the proxy listener needs: the read path and its own limits.
#[derive(Clone)]
pub struct ProxyState {
    /// Where every answer comes from.
    pub read: Arc<ReadPath>,
    /// Accepted client bearer tokens, when the proxy requires them.
    pub client_tokens: Option<Arc<HashSet<String>>>,
    /// Largest request body accepted (`proxy.max_request_body`).
    pub max_request_body: usize,
    /// The last hour, counted where the request metrics are.
    pub history: Arc<History>,
    /// This cache's name in `Cache-Status` (`listen.name`).
    pub names: CacheNames,
    /// The tier extension downstream sidecars follow.
    pub extension: Arc<crate::extension::Extension>,
}

/// This cache's name in `Cache-Status`, and its most common member made
/// once (a fresh hit's header costs no formatting).
#[derive(Clone)]
pub struct CacheNames {
    name: Arc<str>,
    hit: HeaderValue,
}

impl CacheNames {
    /// Names this cache `name` (checked by config validation to be a token).
    pub fn new(name: &str) -> Self {
        let hit = HeaderValue::from_str(&CacheStatus::Hit.member(name))
            .unwrap_or(HeaderValue::from_static("catalog-cache; hit"));
        Self {
            name: name.into(),
            hit,
        }
    }

    /// The `Cache-Status` value: the upstream's members, then ours.
    fn header(&self, cache: CacheStatus, via: Option<&str>) -> HeaderValue {
        match (cache, via) {
            (CacheStatus::Hit, None) => self.hit.clone(),
            (cache, via) => {
                let value = crate::provenance::cache_status(via, &cache.member(&self.name));
                HeaderValue::from_str(&value).unwrap_or_else(|_| self.hit.clone())
            }
        }
    }
}

/// The proxy's router.
pub fn router(state: ProxyState) -> Router {
    Router::new()
        .fallback(handle)
        .layer(crate::api_error::CatchPanicLayer::new(MOUNT))
        // Query answers, by-refs and the tier extension are compressed for
        // clients that ask (gzip or zstd); entity hits never are.
        .layer(CompressionLayer::new().gzip(true).zstd(true).compress_when(
            DefaultPredicate::new().and(
                |_: StatusCode,
                 _: http::Version,
                 _: &http::HeaderMap,
                 extensions: &http::Extensions| {
                    extensions.get::<Compressible>().is_some()
                },
            ),
        ))
        .with_state(Arc::new(state))
}

/// Marks a response the compression layer may compress (set by the routes
/// whose answers are large: queries, by-refs, the tier extension).
#[derive(Debug, Clone, Copy)]
struct Compressible;

fn compressible(route: &Route) -> bool {
    matches!(
        route,
        Route::ByRefs
            | Route::GetEntities
            | Route::GetByQuery
            | Route::PostByQuery
            | Route::GetFacets
            | Route::PostFacets
            | Route::TierGeneration
            | Route::TierChanges
    )
}

async fn handle(State(state): State<Arc<ProxyState>>, request: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let method = &parts.method;
    let full_path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    let Some(path) = full_path
        .strip_prefix(MOUNT)
        .filter(|p| p.is_empty() || p.starts_with('/'))
    else {
        let error = ApiError::new(
            ErrorKind::NotFound,
            format!(
                "catalog-cache serves the catalog API under {MOUNT}; {full_path} is not part of it"
            ),
            method,
            &path_and_query(full_path, query),
        );
        return render_error(&state, error, "unknown", started);
    };
    let path = if path.is_empty() { "/" } else { path };
    let url = || path_and_query(path, query);
    if let Some(tokens) = &state.client_tokens {
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
            let error = ApiError::new(ErrorKind::Authentication, message, method, &url());
            return render_error(&state, error, "unauthorized", started);
        }
    }
    // Only Backstage's catalog routes are served (and ever sent upstream);
    // anything else is answered here, before its body is read.
    let route = match route::parse(method, path) {
        Ok(r) => r,
        Err(RouteError::BadPath(message)) => {
            let error = ApiError::new(ErrorKind::Input, message, method, &url());
            return render_error(&state, error, "invalid", started);
        }
        Err(e @ RouteError::NotFound { .. }) => {
            let error = ApiError::new(ErrorKind::NotFound, e.to_string(), method, &url());
            return render_error(&state, error, "unknown", started);
        }
    };
    let limit = state.max_request_body;
    let body = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let error = if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    ErrorKind::TooLarge,
                    format!("Request body is larger than proxy.max_request_body ({limit} bytes)"),
                    method,
                    &url(),
                )
            } else {
                ApiError::new(
                    ErrorKind::RequestTimeout,
                    format!("The request body did not arrive: {e} (listen.body_read_timeout)"),
                    method,
                    &url(),
                )
            };
            return render_error(&state, error, "too_large", started);
        }
    };
    let incoming = Incoming {
        method,
        route: &route,
        path,
        query,
        headers: &parts.headers,
        body,
    };
    let label = route.label();
    let read = &state.read;
    let answered = match &route {
        Route::ByName(n) => {
            read.read_entity(Lookup::ByName(EntityRef {
                kind: n.kind.clone(),
                namespace: n.namespace.clone(),
                name: n.name.clone(),
            }))
            .await
        }
        Route::ByUid(uid) => read.read_entity(Lookup::ByUid(uid.clone())).await,
        Route::ByRefs => read.read_by_refs(&incoming).await,
        Route::GetEntities => read.read_query(QueryKind::GetEntities, &incoming).await,
        Route::GetByQuery => read.read_query(QueryKind::GetByQuery, &incoming).await,
        Route::PostByQuery => read.read_query(QueryKind::PostByQuery, &incoming).await,
        Route::GetFacets => read.read_query(QueryKind::GetFacets, &incoming).await,
        Route::PostFacets => read.read_query(QueryKind::PostFacets, &incoming).await,
        Route::TierGeneration => state.extension.generation(&parts.headers).await,
        Route::TierChanges => state.extension.changes(query).await,
        r => match r.class() {
            Class::ReadThrough => read.read_through(&incoming).await,
            _ => read.pass_through(&incoming).await,
        },
    };
    match answered {
        Ok(answer) => {
            let mut response = render(&state, answer, label, started);
            if compressible(&route) {
                response.extensions_mut().insert(Compressible);
            }
            response
        }
        Err(e) => render_read_error(&state, e, method, &url(), label, started),
    }
}

fn path_and_query(path: &str, query: &str) -> String {
    if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    }
}

/// Turns a read-path answer into an HTTP response with the staleness headers.
fn render(state: &ProxyState, answer: Answer, route: &'static str, started: Instant) -> Response {
    // Data an upstream tier called stale is a stale answer here too.
    let outcome = if answer.stale {
        "stale"
    } else {
        answer.cache.outcome()
    };
    m::record_request(route, outcome, started.elapsed().as_secs_f64());
    state.history.record(outcome);
    let mut response = Response::new(match answer.body {
        Payload::Bytes(bytes) => Body::from(bytes),
        Payload::Stream { chunks, .. } => Body::from_stream(chunks),
    });
    *response.status_mut() = answer.status;
    *response.headers_mut() = answer.headers;
    let cache_status = state.names.header(answer.cache, answer.via.as_deref());
    staleness_headers(
        &mut response,
        cache_status,
        answer.age.as_secs(),
        answer.stale,
    );
    if answer.status == StatusCode::NO_CONTENT {
        response.headers_mut().remove(http::header::CONTENT_TYPE);
    }
    response
}

/// Turns a read-path error into Backstage's error answer with the
/// staleness headers.
fn render_read_error(
    state: &ProxyState,
    error: ReadError,
    method: &Method,
    url: &str,
    route: &'static str,
    started: Instant,
) -> Response {
    let (cache, age, stale) = error.served();
    let mut api = ApiError::new(error.kind(), error.message(), method, url);
    api.retry_after = error.retry_after();
    // A stale "not found" is an answer from the mirror; the sidecar's own
    // 503 is a refusal; anything else its own error.
    let outcome = match &error {
        ReadError::NotFound { .. } => cache.outcome(),
        ReadError::Unavailable { .. } => "refused",
        _ => "error",
    };
    m::record_request(route, outcome, started.elapsed().as_secs_f64());
    state.history.record(outcome);
    let mut response = api.into_response();
    let cache_status = state.names.header(cache, None);
    staleness_headers(&mut response, cache_status, age.as_secs(), stale);
    response
}

/// An error the proxy answers before the read path is involved.
fn render_error(
    state: &ProxyState,
    error: ApiError,
    route: &'static str,
    started: Instant,
) -> Response {
    m::record_request(route, "error", started.elapsed().as_secs_f64());
    state.history.record("error");
    let mut response = error.into_response();
    let cache_status = state.names.header(CacheStatus::Hit, None);
    staleness_headers(&mut response, cache_status, 0, false);
    response
}

fn staleness_headers(response: &mut Response, cache_status: HeaderValue, age: u64, stale: bool) {
    let headers = response.headers_mut();
    headers.insert(CACHE_STATUS, cache_status);
    headers.insert(http::header::AGE, HeaderValue::from(age));
    headers.insert(
        STALE_HEADER,
        HeaderValue::from_static(if stale { "true" } else { "false" }),
    );
}
