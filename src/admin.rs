//! The admin listener: health, metrics, status and the operator API.
//!
//! - `GET /livez` — 200 while the process serves.
//! - `GET /readyz` — 200 when reads can be served (independent of the upstream), else 503 with the reason.
//! - `GET /status` — JSON: breaker, stale policy, freshness, mirror, last sync, held deletions, upstream error, audit.
//! - `GET /history` — JSON: the last hour, second by second (reads by outcome, data age, breaker
//!   state) and its syncs; what the status page charts.
//! - `GET /` — the status page (self-contained HTML).
//! - `GET /metrics` — Prometheus text format.
//! - `GET/PUT /admin/breaker`, `GET/PUT /admin/stale`, `POST /admin/sync`, `GET /admin/snapshot`.
//!
//! Mutations and the snapshot need `Authorization: Bearer <admin token>`;
//! without it they answer 401 and change (and give) nothing. Operator input
//! is range-checked (a 400 names the limit); bodies are at most 64 KiB.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{HeaderMap, Method, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};

use crate::api_error::{ApiError, ErrorKind};
use crate::breaker::{Breaker, BreakerMode};
use crate::cache::HotCache;
use crate::clock::Clock;
use crate::config::StalePolicy;
use crate::flags::{FlagError, Flags};
use crate::generation::Generations;
use crate::health::{readiness, Readiness};
use crate::history::History;
use crate::metrics as m;
use crate::mirror::{rfc3339, Mirror};
use crate::sync::Syncer;
use crate::units::Dur;
use crate::upstream::Upstream;

/// Header the CLI and the status page send so the audit trail says who acted.
pub const ACTOR_HEADER: &str = "x-catalog-cache-actor";

const STATUS_PAGE: &str = include_str!("status_page.html");

/// The largest admin request body accepted.
pub const ADMIN_MAX_BODY: usize = 64 * 1024;

/// What the admin listener reads and changes.
#[derive(Clone)]
pub struct AdminState {
    /// The current generation (mirror facts, readiness).
    pub generations: Arc<Generations>,
    /// The operator's flags.
    pub flags: Arc<Flags>,
    /// The breaker (its state for status).
    pub breaker: Breaker,
    /// The sync loop (`POST /admin/sync`, last report, held deletions).
    pub syncer: Arc<Syncer>,
    /// The mirror (audit trail, snapshot export).
    pub mirror: Arc<Mirror>,
    /// The upstream client (its URL and last error).
    pub upstream: Arc<Upstream>,
    /// The hot cache (its size).
    pub hot: HotCache,
    /// The admin token mutations must present.
    pub token: Arc<str>,
    /// `freshness.fresh_for`, for readiness.
    pub fresh_for: Duration,
    /// The Prometheus recorder's handle.
    pub prometheus: PrometheusHandle,
    /// The sidecar's clock.
    pub clock: Clock,
    /// Snapshot exports at once (one).
    pub exports: Arc<tokio::sync::Semaphore>,
    /// The last hour, for the status page.
    pub history: Arc<History>,
}

impl AdminState {
    /// Refreshes the gauges that describe state rather than events (every
    /// scrape, and every second from the housekeeping task).
    pub fn publish_gauges(&self) {
        self.generations.publish_gauges();
        self.breaker.publish_gauges();
        self.syncer.status().publish_gauges();
        metrics::gauge!(m::HOT_CACHE_ENTRIES).set(self.hot.entry_count() as f64);
        metrics::gauge!(m::HOT_CACHE_BYTES).set(self.hot.weighted_bytes() as f64);
        // Outside a runtime (a unit test calling this directly) there is no
        // task count to give.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            metrics::gauge!(m::TOKIO_ALIVE_TASKS).set(rt.metrics().num_alive_tasks() as f64);
        }
        let policy = self.flags.stale_rule().0;
        for p in [StalePolicy::Serve, StalePolicy::Refuse] {
            metrics::gauge!(m::STALE_POLICY, "policy" => p.as_str()).set(if p == policy {
                1.0
            } else {
                0.0
            });
        }
    }

    /// Whether reads can be served now.
    pub fn readiness(&self) -> Readiness {
        let generation = self.generations.current();
        let age = self.generations.age().unwrap_or_default();
        let (policy, max_stale) = self.flags.stale_rule();
        readiness(
            generation.as_deref(),
            age,
            self.fresh_for,
            policy,
            max_stale,
        )
    }
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/history", get(history))
        .route("/", get(|| async { Html(STATUS_PAGE) }))
        .route("/metrics", get(metrics_text))
        .route("/admin/breaker", get(get_breaker).put(put_breaker))
        .route("/admin/stale", get(get_stale).put(put_stale))
        .route("/admin/sync", post(post_sync))
        .route("/admin/snapshot", get(get_snapshot))
        // Operator requests are small JSON documents.
        .layer(axum::extract::DefaultBodyLimit::max(ADMIN_MAX_BODY))
        .layer(crate::api_error::CatchPanicLayer::new(""))
        .with_state(state)
}

async fn metrics_text(State(state): State<AdminState>) -> Response {
    state.publish_gauges();
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.prometheus.render(),
    )
        .into_response()
}

fn admin_error(kind: ErrorKind, message: impl Into<String>, method: Method, url: &str) -> ApiError {
    ApiError::new(kind, message, &method, url)
}

fn authorize(
    state: &AdminState,
    headers: &HeaderMap,
    method: Method,
    url: &'static str,
) -> Result<String, ApiError> {
    let presented = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), state.token.as_bytes()) => Ok(headers
            .get(ACTOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|a| matches!(*a, "cli" | "status-page"))
            .unwrap_or("admin-token")
            .to_string()),
        Some(_) => Err(admin_error(
            ErrorKind::Authentication,
            "Illegal token",
            method,
            url,
        )),
        None => Err(admin_error(
            ErrorKind::Authentication,
            "Missing credentials: send Authorization: Bearer <admin token> (admin.token_file)",
            method,
            url,
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let readiness = state.readiness();
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

/// `GET /status`.
#[derive(Serialize)]
struct Status {
    version: &'static str,
    ready: bool,
    ready_reason: String,
    breaker: BreakerView,
    stale: StaleView,
    freshness: FreshnessView,
    mirror: Option<MirrorView>,
    last_sync: Option<crate::sync::SyncReport>,
    held_deletions: Option<crate::sync::HeldDeletions>,
    upstream: UpstreamView,
    audit: Vec<crate::mirror::AuditEntry>,
}

#[derive(Serialize)]
struct BreakerView {
    state: &'static str,
    mode: &'static str,
    reason: Option<String>,
    since: String,
    mode_set_by: String,
    mode_expires_at: Option<String>,
    consecutive_failures: u32,
}

#[derive(Serialize)]
struct StaleView {
    policy: StalePolicy,
    max_stale_seconds: u64,
    set_by: String,
    reason: Option<String>,
}

/// Data younger than `fresh_for` is served as fresh; older data is
/// revalidated, and served stale when the upstream cannot answer.
#[derive(Serialize)]
struct FreshnessView {
    fresh_for_seconds: f64,
}

#[derive(Serialize)]
struct MirrorView {
    generation: u64,
    entities: usize,
    /// When the origin catalog last confirmed the generation.
    synced_at: String,
    /// When this sidecar last heard from its upstream about it.
    checked_at: String,
    /// Since the origin's confirmation, whatever tiers sit in between.
    data_age_seconds: f64,
}

#[derive(Serialize)]
struct UpstreamView {
    url: String,
    /// `catalog-cache` when the upstream is another tier (it answers the
    /// tier extension), `backstage` when it does not, `unknown` before the
    /// first sync has asked.
    kind: &'static str,
    /// The upstream said its data was stale when last asked.
    stale: bool,
    /// The upstream's `Cache-Status` members, as last received.
    cache_status: Option<String>,
    last_error: Option<LastErrorView>,
}

#[derive(Serialize)]
struct LastErrorView {
    message: String,
    at: String,
}

fn breaker_view(state: &AdminState) -> BreakerView {
    let status = state.breaker.status();
    let mode = state.flags.mode();
    BreakerView {
        state: status.state.as_str(),
        mode: mode.mode.as_str(),
        reason: mode.reason.clone().or(status.reason.clone()),
        since: rfc3339(status.since_wall),
        mode_set_by: mode.actor.clone(),
        mode_expires_at: mode.expires_at.map(rfc3339),
        consecutive_failures: status.consecutive_failures,
    }
}

fn stale_view(state: &AdminState) -> StaleView {
    let stale = state.flags.stale();
    StaleView {
        policy: stale.policy,
        max_stale_seconds: stale.max_stale.as_secs(),
        set_by: stale.actor,
        reason: stale.reason,
    }
}

async fn status(State(state): State<AdminState>) -> Response {
    let readiness = state.readiness();
    let current = state.generations.current();
    let mirror = current.as_ref().map(|g| MirrorView {
        generation: g.meta.id,
        entities: g.index.len(),
        synced_at: rfc3339(g.meta.synced_at),
        checked_at: rfc3339(g.meta.checked_at),
        data_age_seconds: state.clock.since(g.meta.synced_at).as_secs_f64(),
    });
    let via = current
        .as_ref()
        .and_then(|g| g.meta.via.as_deref().map(str::to_string));
    let audit = {
        let m = state.mirror.clone();
        tokio::task::spawn_blocking(move || m.recent_audit(20))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    let sync = state.syncer.status();
    Json(Status {
        version: env!("CARGO_PKG_VERSION"),
        ready: readiness.ready,
        ready_reason: readiness.reason,
        breaker: breaker_view(&state),
        stale: stale_view(&state),
        freshness: FreshnessView {
            fresh_for_seconds: state.fresh_for.as_secs_f64(),
        },
        mirror,
        last_sync: sync.last_sync(),
        held_deletions: sync.held_deletions(),
        upstream: UpstreamView {
            url: state.upstream.base_url().to_string(),
            kind: match state.syncer.upstream_kind() {
                crate::sync::UpstreamKind::Unknown if via.is_some() => "catalog-cache",
                crate::sync::UpstreamKind::Unknown => "unknown",
                kind => kind.as_str(),
            },
            stale: current.as_ref().is_some_and(|g| g.meta.upstream_stale),
            cache_status: via,
            last_error: state.upstream.last_error().map(|e| LastErrorView {
                message: e.message,
                at: rfc3339(e.at),
            }),
        },
        audit,
    })
    .into_response()
}

async fn history(State(state): State<AdminState>) -> Response {
    Json(state.history.snapshot()).into_response()
}

async fn get_breaker(State(state): State<AdminState>) -> Json<BreakerView> {
    Json(breaker_view(&state))
}

/// `PUT /admin/breaker` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakerChange {
    mode: String,
    reason: Option<String>,
    #[serde(rename = "for")]
    for_: Option<String>,
}

fn bad_request(method: Method, url: &'static str, message: String) -> ApiError {
    admin_error(ErrorKind::Input, message, method, url)
}

fn parse_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    method: Method,
    url: &'static str,
) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| bad_request(method, url, format!("Invalid request body: {e}")))
}

async fn put_breaker(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<BreakerView>, ApiError> {
    let url = "/admin/breaker";
    let actor = authorize(&state, &headers, Method::PUT, url)?;
    let change: BreakerChange = parse_body(&body, Method::PUT, url)?;
    let mode: BreakerMode =
        change
            .mode
            .parse()
            .map_err(|e: crate::breaker::ParseBreakerError| {
                bad_request(Method::PUT, url, e.to_string())
            })?;
    let for_ = change
        .for_
        .as_deref()
        .map(|d| positive_duration(d, "for", "10m, 2h", url))
        .transpose()?;
    let flags = state.flags.clone();
    let reason = change.reason.clone();
    tokio::task::spawn_blocking(move || flags.set_mode(mode, reason.as_deref(), for_, &actor))
        .await
        .map_err(|e| internal(Method::PUT, url, e.to_string()))?
        .map_err(|e| flag_error(Method::PUT, url, e))?;
    state.publish_gauges();
    Ok(Json(breaker_view(&state)))
}

/// A duration field of a PUT body, e.g. `"for": "10m"`; zero is refused.
fn positive_duration(
    text: &str,
    field: &str,
    example: &str,
    url: &'static str,
) -> Result<Duration, ApiError> {
    text.parse::<Dur>()
        .ok()
        .map(Dur::get)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            bad_request(
                Method::PUT,
                url,
                format!("Invalid duration '{text}' for '{field}': write e.g. {example}"),
            )
        })
}

fn internal(method: Method, url: &'static str, message: String) -> ApiError {
    admin_error(ErrorKind::Internal, message, method, url)
}

fn flag_error(method: Method, url: &'static str, error: FlagError) -> ApiError {
    match error {
        FlagError::OutOfRange(message) => bad_request(method, url, message),
        FlagError::Mirror(e) => internal(method, url, e.to_string()),
    }
}

async fn get_stale(State(state): State<AdminState>) -> Json<StaleView> {
    Json(stale_view(&state))
}

/// `PUT /admin/stale` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StaleChange {
    policy: String,
    max_stale: Option<String>,
    reason: Option<String>,
}

async fn put_stale(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<StaleView>, ApiError> {
    let url = "/admin/stale";
    let actor = authorize(&state, &headers, Method::PUT, url)?;
    let change: StaleChange = parse_body(&body, Method::PUT, url)?;
    let policy: StalePolicy = change
        .policy
        .parse()
        .map_err(|e: String| bad_request(Method::PUT, url, e))?;
    let max_stale = change
        .max_stale
        .as_deref()
        .map(|d| positive_duration(d, "max_stale", "24h", url))
        .transpose()?;
    let flags = state.flags.clone();
    tokio::task::spawn_blocking(move || {
        flags.set_stale(policy, max_stale, change.reason.as_deref(), &actor)
    })
    .await
    .map_err(|e| internal(Method::PUT, url, e.to_string()))?
    .map_err(|e| flag_error(Method::PUT, url, e))?;
    state.publish_gauges();
    Ok(Json(stale_view(&state)))
}

/// `POST /admin/sync` body (optional).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SyncRequest {
    #[serde(default)]
    accept_deletions: bool,
}

async fn post_sync(
    State(state): State<AdminState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let url = "/admin/sync";
    authorize(&state, &headers, Method::POST, url)?;
    let request: SyncRequest = if body.is_empty() {
        SyncRequest::default()
    } else {
        parse_body(&body, Method::POST, url)?
    };
    let report = state.syncer.sync_once(request.accept_deletions).await;
    Ok(Json(report).into_response())
}

async fn get_snapshot(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let url = "/admin/snapshot";
    authorize(&state, &headers, Method::GET, url)?;
    // One export at a time: each is a full copy of the mirror on disk.
    let Ok(_one) = state.exports.clone().try_acquire_owned() else {
        return Err(admin_error(
            ErrorKind::Unavailable,
            "a snapshot is being exported already; retry when it is done",
            Method::GET,
            url,
        )
        .retry_after(Duration::from_secs(5)));
    };
    let mirror = state.mirror.clone();
    let (dir, file) = tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("snapshot.db");
        mirror
            .export(&file)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok::<_, std::io::Error>((dir, file))
    })
    .await
    .map_err(|e| internal(Method::GET, url, e.to_string()))?
    .map_err(|e| internal(Method::GET, url, e.to_string()))?;
    let opened = tokio::fs::File::open(&file)
        .await
        .map_err(|e| internal(Method::GET, url, e.to_string()))?;
    let length = opened
        .metadata()
        .await
        .map_err(|e| internal(Method::GET, url, e.to_string()))?
        .len();
    // Streamed from the file in chunks: an export never sits in memory.
    // The temporary directory lives as long as the stream, then goes.
    let chunks = futures::stream::unfold(
        (opened, dir, _one, vec![0u8; EXPORT_CHUNK]),
        |(mut file, dir, one, mut buf)| async move {
            use tokio::io::AsyncReadExt;
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => Some((
                    Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(&buf[..n])),
                    (file, dir, one, buf),
                )),
                Err(e) => Some((Err(e), (file, dir, one, buf))),
            }
        },
    );
    Ok((
        [
            (
                http::header::CONTENT_TYPE,
                "application/vnd.sqlite3".to_string(),
            ),
            (
                http::header::CONTENT_DISPOSITION,
                "attachment; filename=\"catalog-cache-snapshot.db\"".to_string(),
            ),
            (http::header::CONTENT_LENGTH, length.to_string()),
        ],
        Body::from_stream(chunks),
    )
        .into_response())
}

/// Bytes read from an export file per chunk of the answer.
const EXPORT_CHUNK: usize = 64 * 1024;
