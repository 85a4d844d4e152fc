//! The control API of the demo catalog, on its own listener so that faults
//! on the catalog port never lock the operator out.
//!
//! Endpoints: `GET|PUT|DELETE /faults` (PUT replaces the whole set),
//! `GET /stats` (counts, `unrouted` and `unrouted_paths`, `peak_in_flight`),
//! `POST /stats/reset`, `POST /entities` (a JSON array of entities to add
//! or replace), `POST /entities/{uid}/touch` (new etag), `POST /mutate`
//! (`{"count": n}` random small edits).

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
