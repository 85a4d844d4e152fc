//! The control API of the demo catalog, on its own listener so that faults
//! on the catalog port never lock the operator out.
//!
//! Endpoints: `GET|PUT|DELETE /faults` (PUT replaces the whole set),
//! `GET /stats` (counts, `unrouted` and `unrouted_paths`, `peak_in_flight`),
//! `POST /stats/reset`, `POST /entities` (a JSON array of entities to add
//! or replace), `POST /entities/{uid}/touch` (new etag), `POST /mutate`
//! (`{"count": n}` random small edits), `POST /churn`
//! (`{"change": n, "add": n, "delete": n}`, or `{"share": f}` for a share
//! of the catalog split 80/10/10 between changes, additions and deletions:
//! one atomic step of catalog churn, answered with the uids touched).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::Rng;
use serde_json::{json, Value};

use crate::fake::Shared;
use crate::faults::Faults;

type App = Arc<Shared>;

/// The control router over the shared state of one demo catalog.
pub(crate) fn router(app: App) -> Router {
    Router::new()
        .route(
            "/faults",
            get(get_faults).put(put_faults).delete(clear_faults),
        )
        .route("/stats", get(stats))
        .route("/stats/reset", post(reset_stats))
        .route("/entities", post(add_entities))
        .route("/entities/{uid}/touch", post(touch))
        .route("/mutate", post(mutate))
        .route("/churn", post(churn))
        .with_state(app)
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": message}))).into_response()
}

async fn get_faults(State(app): State<App>) -> Json<Faults> {
    Json(app.faults.get())
}

async fn put_faults(State(app): State<App>, body: Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(f) if !(0.0..=1.0).contains(&f.error_rate) => bad_request(format!(
            "error_rate must be within 0..=1, got {}",
            f.error_rate
        )),
        Ok(f) => {
            // Answer once the listener reflects the faults, so a script that
            // PUTs `refuse` can rely on refused connects right after.
            app.apply_faults(f.clone()).await;
            Json(f).into_response()
        }
        Err(e) => bad_request(format!("invalid fault set: {e}")),
    }
}

async fn clear_faults(State(app): State<App>) -> StatusCode {
    app.apply_faults(Faults::default()).await;
    StatusCode::NO_CONTENT
}

/// `GET /stats`: the counts, and the unrouted requests kept.
#[derive(serde::Serialize)]
struct StatsView {
    #[serde(flatten)]
    counts: crate::fake::Stats,
    unrouted_paths: Vec<String>,
}

async fn stats(State(app): State<App>) -> Json<StatsView> {
    Json(StatsView {
        counts: app.stats(),
        unrouted_paths: app.unrouted_paths(),
    })
}

async fn reset_stats(State(app): State<App>) -> StatusCode {
    app.reset_stats();
    StatusCode::NO_CONTENT
}

/// `POST /entities` with a JSON array of entities: adds them (an entity
/// whose ref exists replaces it; a missing namespace, uid and etag are
/// filled in).
async fn add_entities(State(app): State<App>, body: Bytes) -> Response {
    match serde_json::from_slice::<Vec<Value>>(&body) {
        Ok(entities)
            if entities
                .iter()
                .all(|e| e["metadata"]["name"].is_string() && e["kind"].is_string()) =>
        {
            let added = entities.len();
            app.store.add(entities);
            Json(json!({ "added": added })).into_response()
        }
        Ok(_) => bad_request("every entity needs a kind and a metadata.name".into()),
        Err(e) => bad_request(format!("expected a JSON array of entities: {e}")),
    }
}

async fn touch(State(app): State<App>, Path(uid): Path<String>) -> Response {
    match app.store.update(&uid, |_| {}) {
        Some(etag) => Json(json!({"uid": uid, "etag": etag})).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no entity with uid {uid}")})),
        )
            .into_response(),
    }
}

async fn mutate(State(app): State<App>, body: Bytes) -> Response {
    let count = if body.is_empty() {
        1
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) => v.get("count").and_then(Value::as_u64).unwrap_or(1) as usize,
            Err(e) => return bad_request(format!("invalid body: {e}")),
        }
    };
    let snapshot = app.store.snapshot(false);
    let mut changed = Vec::new();
    if !snapshot.items.is_empty() {
        for _ in 0..count {
            let (idx, n) = {
                let mut rng = app.rng.lock().unwrap_or_else(|p| p.into_inner());
                (
                    rng.random_range(0..snapshot.items.len()),
                    rng.random::<u32>(),
                )
            };
            let uid = snapshot.items[idx].uid.clone();
            app.store.update(&uid, |e| {
                e["metadata"]["description"] =
                    json!(format!("Changed by the chaos mutator ({n:08x})."));
            });
            changed.push(uid);
        }
    }
    Json(json!({ "changed": changed })).into_response()
}

/// `POST /churn`'s body.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ChurnRequest {
    #[serde(default)]
    change: usize,
    #[serde(default)]
    add: usize,
    #[serde(default)]
    delete: usize,
    /// A share of the catalog (0..=1): 80 % of it changed, 10 % added,
    /// 10 % deleted, on top of the explicit counts.
    #[serde(default)]
    share: f64,
}

async fn churn(State(app): State<App>, body: Bytes) -> Response {
    let request = if body.is_empty() {
        ChurnRequest::default()
    } else {
        match serde_json::from_slice::<ChurnRequest>(&body) {
            Ok(r) => r,
            Err(e) => return bad_request(format!("invalid churn request: {e}")),
        }
    };
    if !(0.0..=1.0).contains(&request.share) {
        return bad_request(format!("share must be within 0..=1, got {}", request.share));
    }
    let total = app.store.snapshot(false).items.len() as f64;
    let of_share = |f: f64| (total * request.share * f).round() as usize;
    let (change, add, delete) = (
        request.change + of_share(0.8),
        request.add + of_share(0.1),
        request.delete + of_share(0.1),
    );
    const MAX: usize = 1_000_000;
    if change > MAX || add > MAX || delete > MAX {
        return bad_request(format!("at most {MAX} of each per step"));
    }
    let churned = {
        let rng = &app.rng;
        app.store.churn(change, add, delete, |n| {
            rng.lock()
                .unwrap_or_else(|p| p.into_inner())
                .random_range(0..n)
        })
    };
    Json(churned).into_response()
}
