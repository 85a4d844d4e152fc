//! The admin listener: health, metrics, status and the operator API.
//!
//! - `GET /livez` — 200 while the process serves.
//! - `GET /readyz` — 200 when reads can be served (independent of the upstream), else 503 with the reason.
//! - `GET /status` — JSON: breaker, stale policy, mirror, last sync, held deletions, upstream error, audit.
//! - `GET /` — the status page (self-contained HTML).
//! - `GET /metrics` — Prometheus text format.
//! - `GET/PUT /admin/breaker`, `GET/PUT /admin/stale`, `POST /admin/sync`, `GET /admin/snapshot`.
//!
//! Mutations need `Authorization: Bearer <admin token>`; without it they
//! answer 401 and change nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{HeaderMap, Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::breaker::BreakerMode;
use crate::config::StalePolicy;
use crate::mirror::rfc3339;
use crate::read::{error_body, ErrorKind};
use crate::sidecar::Sidecar;

/// Header the CLI and the status page send so the audit trail says who acted.
pub const ACTOR_HEADER: &str = "x-catalog-cache-actor";

const STATUS_PAGE: &str = include_str!("status_page.html");

/// The admin router.
pub fn router(sidecar: Arc<Sidecar>) -> Router {
    let prometheus = crate::metrics::install();
    crate::metrics::describe();
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/", get(|| async { Html(STATUS_PAGE) }))
        .route(
            "/metrics",
            get(move |State(sidecar): State<Arc<Sidecar>>| {
                let prometheus = prometheus.clone();
                async move {
                    sidecar.publish_gauges();
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        prometheus.render(),
                    )
                }
            }),
        )
        .route("/admin/breaker", get(get_breaker).put(put_breaker))
        .route("/admin/stale", get(get_stale).put(put_stale))
        .route("/admin/sync", post(post_sync))
        .route("/admin/snapshot", get(get_snapshot))
        .with_state(sidecar)
}

/// An admin API error, in Backstage's error shape.
struct AdminError {
    kind: ErrorKind,
    message: String,
    method: Method,
    url: &'static str,
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, body) = error_body(self.kind, &self.message, &self.method, self.url);
        (
            status,
            [(http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

fn authorize(
    sidecar: &Sidecar,
    headers: &HeaderMap,
    method: Method,
    url: &'static str,
) -> Result<String, AdminError> {
    let presented = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), sidecar.admin_token.as_bytes()) => Ok(headers
            .get(ACTOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|a| matches!(*a, "cli" | "status-page"))
            .unwrap_or("admin-token")
            .to_string()),
        Some(_) => Err(AdminError {
            kind: ErrorKind::Authentication,
            message: "Illegal token".into(),
            method,
            url,
        }),
        None => Err(AdminError {
            kind: ErrorKind::Authentication,
            message:
                "Missing credentials: send Authorization: Bearer <admin token> (admin.token_file)"
                    .into(),
            method,
            url,
        }),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn readyz(State(sidecar): State<Arc<Sidecar>>) -> Response {
    let readiness = sidecar.readiness();
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

#[derive(Serialize)]
struct MirrorView {
    generation: u64,
    entities: usize,
    synced_at: String,
    data_age_seconds: f64,
}

#[derive(Serialize)]
struct UpstreamView {
    url: String,
    last_error: Option<LastErrorView>,
}

#[derive(Serialize)]
struct LastErrorView {
    message: String,
    at: String,
}

fn breaker_view(sidecar: &Sidecar) -> BreakerView {
    let status = sidecar.breaker.status();
    let mode = sidecar.flags.mode();
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

fn stale_view(sidecar: &Sidecar) -> StaleView {
    let stale = sidecar.flags.stale();
    StaleView {
        policy: stale.policy,
        max_stale_seconds: stale.max_stale.as_secs(),
        set_by: stale.actor,
        reason: stale.reason,
    }
}

async fn status(State(sidecar): State<Arc<Sidecar>>) -> Response {
    let readiness = sidecar.readiness();
    let mirror = sidecar.view().map(|v| MirrorView {
        generation: v.meta.id,
        entities: v.index.len(),
        synced_at: rfc3339(v.meta.synced_at),
        data_age_seconds: sidecar.data_age().unwrap_or_default().as_secs_f64(),
    });
    let audit = {
        let m = sidecar.mirror.clone();
        tokio::task::spawn_blocking(move || m.recent_audit(20))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    Json(Status {
        version: env!("CARGO_PKG_VERSION"),
        ready: readiness.ready,
        ready_reason: readiness.reason,
        breaker: breaker_view(&sidecar),
        stale: stale_view(&sidecar),
        mirror,
        last_sync: sidecar.last_sync(),
        held_deletions: sidecar.held_deletions(),
        upstream: UpstreamView {
            url: sidecar.upstream.base_url().to_string(),
            last_error: sidecar.upstream.last_error().map(|e| LastErrorView {
                message: e.message,
                at: rfc3339(e.at),
            }),
        },
        audit,
    })
    .into_response()
}

async fn get_breaker(State(sidecar): State<Arc<Sidecar>>) -> Json<BreakerView> {
    Json(breaker_view(&sidecar))
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

fn bad_request(method: Method, url: &'static str, message: String) -> AdminError {
    AdminError {
        kind: ErrorKind::Input,
        message,
        method,
        url,
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    method: Method,
    url: &'static str,
) -> Result<T, AdminError> {
    serde_json::from_slice(body)
        .map_err(|e| bad_request(method, url, format!("Invalid request body: {e}")))
}

async fn put_breaker(
    State(sidecar): State<Arc<Sidecar>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<BreakerView>, AdminError> {
    let url = "/admin/breaker";
    let actor = authorize(&sidecar, &headers, Method::PUT, url)?;
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
    let s = sidecar.clone();
    let reason = change.reason.clone();
    tokio::task::spawn_blocking(move || {
        s.flags
            .set_mode(&s.mirror, mode, reason.as_deref(), for_, &actor)
    })
    .await
    .map_err(|e| internal(Method::PUT, url, e.to_string()))?
    .map_err(|e| internal(Method::PUT, url, e.to_string()))?;
    sidecar.breaker.set_mode(mode);
    sidecar.publish_gauges();
    Ok(Json(breaker_view(&sidecar)))
}

/// A duration field of a PUT body, e.g. `"for": "10m"`; zero is refused.
fn positive_duration(
    text: &str,
    field: &str,
    example: &str,
    url: &'static str,
) -> Result<Duration, AdminError> {
    humantime::parse_duration(text)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            bad_request(
                Method::PUT,
                url,
                format!("Invalid duration '{text}' for '{field}': write e.g. {example}"),
            )
        })
}

fn internal(method: Method, url: &'static str, message: String) -> AdminError {
    AdminError {
        kind: ErrorKind::Internal,
        message,
        method,
        url,
    }
}

async fn get_stale(State(sidecar): State<Arc<Sidecar>>) -> Json<StaleView> {
    Json(stale_view(&sidecar))
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
    State(sidecar): State<Arc<Sidecar>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<StaleView>, AdminError> {
    let url = "/admin/stale";
    let actor = authorize(&sidecar, &headers, Method::PUT, url)?;
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
    let s = sidecar.clone();
    tokio::task::spawn_blocking(move || {
        s.flags.set_stale(
            &s.mirror,
            policy,
            max_stale,
            change.reason.as_deref(),
            &actor,
        )
    })
    .await
    .map_err(|e| internal(Method::PUT, url, e.to_string()))?
    .map_err(|e| internal(Method::PUT, url, e.to_string()))?;
    sidecar.publish_gauges();
    Ok(Json(stale_view(&sidecar)))
}

/// `POST /admin/sync` body (optional).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SyncRequest {
    #[serde(default)]
    accept_deletions: bool,
}

async fn post_sync(
    State(sidecar): State<Arc<Sidecar>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, AdminError> {
    let url = "/admin/sync";
    authorize(&sidecar, &headers, Method::POST, url)?;
    let request: SyncRequest = if body.is_empty() {
        SyncRequest::default()
    } else {
        parse_body(&body, Method::POST, url)?
    };
    let report = sidecar.sync_once(request.accept_deletions).await;
    Ok(Json(report).into_response())
}

async fn get_snapshot(State(sidecar): State<Arc<Sidecar>>) -> Result<Response, AdminError> {
    let url = "/admin/snapshot";
    let mirror = sidecar.mirror.clone();
    let bytes = tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("snapshot.db");
        mirror
            .export(&file)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        std::fs::read(&file)
    })
    .await
    .map_err(|e| internal(Method::GET, url, e.to_string()))?
    .map_err(|e| internal(Method::GET, url, e.to_string()))?;
    Ok((
        [
            (http::header::CONTENT_TYPE, "application/vnd.sqlite3"),
            (
                http::header::CONTENT_DISPOSITION,
                "attachment; filename=\"catalog-cache-snapshot.db\"",
            ),
        ],
        Body::from(bytes),
    )
        .into_response())
}
