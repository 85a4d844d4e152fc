//! The one place where the upstream catalog is asked.
//!
//! Every call — sync pages, revalidations, query forwards, read-through and
//! pass-through — goes through `Upstream::call`, which takes one breaker
//! permit, bounds the whole exchange (connect, headers, body) by
//! `upstream.timeout`, classifies the outcome for the breaker exactly once
//! (retries, when asked for, live inside that one permit) and records metrics
//! and the last error seen.
//!
//! Only what the upstream causes on requests the sidecar built counts for
//! the breaker: connect errors, timeouts, 5xx, 429 and malformed answers are
//! failures; 2xx and 404 are successes; any other 4xx (the client's doing)
//! counts as nothing, and neither does anything a pass-through write gets
//! back. Only the sync loop probes a recovering upstream. Calls made for
//! clients are bounded in number (`upstream.max_in_flight`). HTTP and HTTPS (rustls, ring provider) upstreams
//! both work; an HTTPS upstream is trusted through the system roots (or the
//! bundled web PKI roots when the system has none) plus `upstream.ca_file`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::breaker::{Breaker, Caller, Rejected};
use crate::clock::Clock;
use crate::config::UpstreamConfig;
use crate::metrics as m;
use crate::provenance::Provenance;
use crate::retry::{self, Attempt, RetryPolicy};

/// Why an upstream call was made (a metrics label and a log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// One page of a full sync.
    SyncPage,
    /// Re-reading one entity for a read that found local data too old or absent.
    Revalidate,
    /// Forwarding a query while the mirror is not fresh.
    Query,
    /// A read the mirror cannot compute (ancestry, locations).
    ReadThrough,
    /// A write or unknown route, passed through.
    PassThrough,
}

impl Operation {
    /// Who makes a call of this kind: the sync loop or a client.
    pub fn caller(self) -> Caller {
        match self {
            Self::SyncPage => Caller::Sync,
            _ => Caller::Client,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SyncPage => "sync_page",
            Self::Revalidate => "revalidate",
            Self::Query => "query",
            Self::ReadThrough => "read_through",
            Self::PassThrough => "pass_through",
        }
    }
}

/// What a successful answer must look like for the call to count as a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A 2xx answer must carry a JSON body (reads the sidecar interprets).
    Json,
    /// Anything the upstream answers is passed on as it is, 5xx included
    /// (pass-through writes).
    Any,
}

/// A request to the upstream, relative to its base URL.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// Method.
    pub method: Method,
    /// Path and query below the base URL, starting with `/`, e.g. `/entities/by-query?limit=500`.
    pub path_and_query: String,
    /// Headers to send besides the sidecar's own (content type, a caller's Authorization).
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Whether to send the sidecar's own token (reads) rather than the caller's (pass-through).
    pub own_identity: bool,
}

impl UpstreamRequest {
    /// A `GET` with the sidecar's identity.
    pub fn get(path_and_query: impl Into<String>) -> Self {
        Self {
            method: Method::GET,
            path_and_query: path_and_query.into(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            own_identity: true,
        }
    }
}

/// The upstream's answer.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body (decompressed).
    pub body: Bytes,
    /// What the answer says of its own freshness (a tiered upstream).
    pub provenance: Provenance,
    /// Bytes the body took on the wire (compressed, if it was).
    pub wire_bytes: u64,
}

/// The largest upstream answer taken, compressed or not (a sync page, a
/// by-refs chunk, a page of changes: a few MB at most).
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

/// Why the upstream gave no usable answer. Each says whose fault it is.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// The breaker did not let the call through: nothing was sent.
    #[error("{0}")]
    Rejected(Rejected),
    /// The sidecar already has `upstream.max_in_flight` calls out for
    /// clients: nothing was sent.
    #[error("the sidecar already has {0} calls in flight to the upstream catalog (upstream.max_in_flight)")]
    Saturated(usize),
    /// TCP/TLS connection failed (upstream down or unreachable).
    #[error("cannot connect to the upstream catalog: {0}")]
    Connect(String),
    /// No complete answer within `upstream.timeout`.
    #[error("the upstream catalog did not answer within {0:?}")]
    Timeout(Duration),
    /// The upstream answered with a server error or asked us to slow down.
    #[error("the upstream catalog answered {status}")]
    Status {
        /// The status.
        status: StatusCode,
        /// `Retry-After` seconds, when given.
        retry_after: Option<Duration>,
    },
    /// The answer contradicts what the sidecar has reason to trust more.
    #[error("the upstream catalog's answer is not trusted: {0}")]
    Untrusted(String),
    /// The upstream is a cache (another catalog-cache tier) that answered
    /// with data it calls stale, or older than this sidecar serves as fresh;
    /// the origin confirmed it this long ago. Nothing failed: it is what a
    /// 503 then says.
    #[error("the upstream tier serves stale data (the origin catalog confirmed it {} ago)", humantime::format_duration(Duration::from_secs(.0.as_secs())))]
    TierStale(Duration),
    /// The upstream's answer was not what a catalog sends (cut short, too
    /// large, undecodable).
    #[error("the upstream catalog sent a malformed answer: {0}")]
    Malformed(String),
    /// A complete answer, but not JSON (a wrong content type, an HTML
    /// sign-in page, invalid JSON). On a read-through route this says the
    /// route is broken, not the upstream: the breaker does not count it.
    #[error("the upstream catalog sent a malformed answer: {0}")]
    NotJson(String),
}

impl UpstreamError {
    /// A metrics label for the failure.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Rejected(_) | Self::Saturated(_) => "rejected",
            Self::Timeout(_) => "timeout",
            Self::TierStale(_) => "stale",
            _ => "error",
        }
    }

    /// Whether trying again soon could help (a retry inside the same permit).
    pub fn retryable(&self) -> bool {
        match self {
            Self::Rejected(_) | Self::Saturated(_) | Self::TierStale(_) => false,
            // An upstream that says when to come back is not retried
            // within the call: the sync loop waits what it asked.
            Self::Status {
                retry_after: Some(_),
                ..
            } => false,
            Self::Status { status, .. } => *status != StatusCode::NOT_IMPLEMENTED,
            _ => true,
        }
    }

    /// How long the caller should wait before trying again, if known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Rejected(r) => Some(r.retry_after),
            Self::Saturated(_) => Some(Duration::from_secs(1)),
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The last failure seen, for `status`.
#[derive(Debug, Clone)]
pub struct LastError {
    /// What happened.
    pub message: String,
    /// When.
    pub at: SystemTime,
}

/// The upstream catalog client.
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    token: TokenFile,
    breaker: Breaker,
    timeout: Duration,
    last_error: Mutex<Option<LastError>>,
    clock: Clock,
    /// Slots for calls made for clients (`upstream.max_in_flight`).
    client_calls: Arc<tokio::sync::Semaphore>,
    max_in_flight: usize,
}

impl Upstream {
    /// Builds the client for `config.url`, sharing `breaker`.
    pub fn new(config: &UpstreamConfig, breaker: Breaker, clock: Clock) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout.get()));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::tls::client_config(&config.ca_file))
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(32)
            .build(https);
        Self {
            client,
            base: config.url.trim_end_matches('/').to_string(),
            token: TokenFile::new(config.token_file.clone()),
            breaker,
            timeout: config.timeout.get(),
            last_error: Mutex::new(None),
            clock,
            client_calls: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight)),
            max_in_flight: config.max_in_flight,
        }
    }

    /// The base URL, e.g. `http://127.0.0.1:7007/api/catalog`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The last failure seen.
    pub fn last_error(&self) -> Option<LastError> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `Some` when a call for `op` would be refused by the breaker right now
    /// (counted as a rejected call, exactly as `call` would count it).
    pub fn refused_now(&self, op: Operation) -> Option<UpstreamError> {
        let rejected = self.breaker.would_reject(op.caller())?;
        // Every read takes this path while the breaker is open: the handle
        // is looked up once per thread and operation.
        thread_local! {
            static REJECTED: std::cell::RefCell<Vec<(&'static str, metrics::Counter)>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        REJECTED.with(|handles| {
            let mut handles = handles.borrow_mut();
            let name = op.as_str();
            match handles.iter().find(|(n, _)| *n == name) {
                Some((_, counter)) => counter.increment(1),
                None => {
                    let counter = metrics::counter!(m::UPSTREAM_REQUESTS_TOTAL, "operation" => name, "result" => "rejected");
                    counter.increment(1);
                    handles.push((name, counter));
                }
            }
        });
        Some(UpstreamError::Rejected(rejected))
    }

    /// One logical call: one breaker permit, one outcome. With `retries`,
    /// transient failures are retried inside the permit (the breaker sees one
    /// failure, never a storm).
    pub async fn call(
        &self,
        op: Operation,
        request: &UpstreamRequest,
        expect: Expect,
        retries: Option<&RetryPolicy>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let caller = op.caller();
        let _slot = match caller {
            Caller::Sync => None,
            Caller::Client => match self.client_calls.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => {
                    metrics::counter!(m::UPSTREAM_REQUESTS_TOTAL, "operation" => op.as_str(), "result" => "rejected")
                        .increment(1);
                    return Err(UpstreamError::Saturated(self.max_in_flight));
                }
            },
        };
        let permit = match self.breaker.try_acquire(caller) {
            Ok(p) => p,
            Err(rejected) => {
                metrics::counter!(m::UPSTREAM_REQUESTS_TOTAL, "operation" => op.as_str(), "result" => "rejected")
                    .increment(1);
                return Err(UpstreamError::Rejected(rejected));
            }
        };
        let started = tokio::time::Instant::now();
        let result = match retries {
            Some(policy) => {
                retry::retry(policy, || async {
                    self.send_once(request, expect).await.map_err(|e| {
                        if e.retryable() {
                            Attempt::Transient(e)
                        } else {
                            Attempt::Permanent(e)
                        }
                    })
                })
                .await
            }
            None => self.send_once(request, expect).await,
        };
        let label = match &result {
            Ok(r) if r.status == StatusCode::NOT_FOUND => "not_found",
            Ok(r) if r.status == StatusCode::NOT_MODIFIED => "not_modified",
            Ok(_) => "ok",
            Err(e) => e.label(),
        };
        metrics::counter!(m::UPSTREAM_REQUESTS_TOTAL, "operation" => op.as_str(), "result" => label)
            .increment(1);
        metrics::histogram!(m::UPSTREAM_REQUEST_DURATION_SECONDS, "operation" => op.as_str())
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::debug!(operation = op.as_str(), error = %e, "upstream call failed");
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(LastError {
                message: e.to_string(),
                at: self.clock.now(),
            });
        }
        match &result {
            // What answers a client's pass-through write says nothing the
            // breaker should act on, either way.
            _ if op == Operation::PassThrough => drop(permit),
            Ok(r)
                if r.status.is_success()
                    || r.status == StatusCode::NOT_FOUND
                    || r.status == StatusCode::NOT_MODIFIED =>
            {
                permit.success()
            }
            // Another 4xx: the client's request was wrong, not the upstream.
            Ok(_) => drop(permit),
            // One read-through route answering a sign-in page (a proxy in
            // front of the catalog, a misrouted path) must not open the
            // breaker for everyone: sync pages and entity reads, which
            // every catalog answers in JSON, still judge the upstream.
            Err(UpstreamError::NotJson(_)) if op == Operation::ReadThrough => drop(permit),
            Err(_) => permit.failure(),
        }
        result
    }

    async fn send_once(
        &self,
        request: &UpstreamRequest,
        expect: Expect,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let uri = format!("{}{}", self.base, request.path_and_query);
        let mut builder = http::Request::builder()
            .method(request.method.clone())
            .uri(&uri);
        if let Some(headers) = builder.headers_mut() {
            for (name, value) in &request.headers {
                headers.append(name, value.clone());
            }
            if request.own_identity {
                headers.remove(http::header::AUTHORIZATION);
                if let Some(token) = self.token.current() {
                    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
                        headers.insert(http::header::AUTHORIZATION, v);
                    }
                }
            }
            headers
                .entry(http::header::ACCEPT)
                .or_insert(HeaderValue::from_static("application/json"));
            // The sidecar's own reads are asked compressed (tier traffic
            // crosses real networks); a write's answer goes back to its
            // caller as it came, so it is asked as the caller asked.
            if request.own_identity {
                headers.insert(
                    http::header::ACCEPT_ENCODING,
                    HeaderValue::from_static("gzip"),
                );
            }
        }
        let req = builder
            .body(Full::new(request.body.clone()))
            .map_err(|e| UpstreamError::Malformed(format!("cannot build request to {uri}: {e}")))?;
        let exchange = async {
            let response = self.client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    UpstreamError::Connect(error_chain(&e))
                } else {
                    UpstreamError::Malformed(error_chain(&e))
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        UpstreamError::Malformed(format!(
                            "the answer is larger than {MAX_ANSWER_BYTES} bytes"
                        ))
                    } else {
                        UpstreamError::Malformed(format!("body cut short: {e}"))
                    }
                })?
                .to_bytes();
            let wire_bytes = body.len() as u64;
            let gzipped = parts
                .headers
                .get(http::header::CONTENT_ENCODING)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
            let body = if gzipped { gunzip(&body)? } else { body };
            Ok::<_, UpstreamError>(UpstreamResponse {
                status: parts.status,
                provenance: Provenance::from_headers(&parts.headers),
                headers: parts.headers,
                body,
                wire_bytes,
            })
        };
        let response = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))??;
        // A write's answer, whatever it is, is the caller's to see.
        if expect == Expect::Json
            && (response.status.is_server_error()
                || response.status == StatusCode::TOO_MANY_REQUESTS)
        {
            let retry_after = response
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(UpstreamError::Status {
                status: response.status,
                retry_after,
            });
        }
        if expect == Expect::Json && response.status.is_success() {
            let content_type = response
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !content_type.is_empty() && !content_type.contains("json") {
                return Err(UpstreamError::NotJson(format!(
                    "expected JSON, got content type {content_type}"
                )));
            }
            if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&response.body) {
                return Err(UpstreamError::NotJson(format!("invalid JSON: {e}")));
            }
        }
        Ok(response)
    }
}

/// Decompresses a gzip answer, at most [`MAX_ANSWER_BYTES`] of it.
fn gunzip(body: &[u8]) -> Result<Bytes, UpstreamError> {
    use std::io::Read;
    let mut out = Vec::with_capacity(body.len() * 4);
    flate2::read::GzDecoder::new(body)
        .take(MAX_ANSWER_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            UpstreamError::Malformed(format!("a gzip answer that does not decompress: {e}"))
        })?;
    if out.len() > MAX_ANSWER_BYTES {
        return Err(UpstreamError::Malformed(format!(
            "the answer decompresses to more than {MAX_ANSWER_BYTES} bytes"
        )));
    }
    Ok(Bytes::from(out))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The upstream bearer token, re-read whenever its file changes (so a
/// rotated token takes effect without a restart).
struct TokenFile {
    path: PathBuf,
    cached: Mutex<Option<(SystemTime, Arc<str>)>>,
}

impl TokenFile {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            cached: Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Arc<str>> {
        if self.path.as_os_str().is_empty() {
            return None;
        }
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok()?;
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, token)) = cached.as_ref() {
            if *at == modified {
                return Some(token.clone());
            }
        }
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                let token: Arc<str> = text.trim().into();
                *cached = Some((modified, token.clone()));
                Some(token)
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read upstream token file");
                cached.as_ref().map(|(_, t)| t.clone())
            }
        }
    }
}
