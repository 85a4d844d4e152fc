//! Path attacks: `raw-paths` (request targets that would address something
//! else once normalised, sent as raw bytes) and `html-upstream` (a route
//! the upstream answers with an HTML sign-in page).
//!
//! Called by `abuse::exercise`. `raw-paths` checks each is answered by the
//! sidecar itself, 400 or 404 in Backstage's error shape, and that the
//! demo catalog saw nothing but its sync (plus the shared check: no
//! unrouted request). `html-upstream` checks that the breaker stays closed
//! and writes (`POST /refresh`) are not refused with 503 while one route
//! answers HTML.

use std::time::Duration;

use serde_json::{json, Value};

use super::{Attack, Attacked, Field, Tally};
use crate::scenario::{client_error, raw_request, HarnessError};

/// Attack 6.
pub(crate) const RAW_PATHS: Attack = Attack {
    name: "raw-paths",
    about: "GET /api/catalog/locations/../../../admin/secret, …/locations/%2e%2e/%2e%2e/admin, …/entities/by-uid/a%2Fb, …/entities/by-uid/a\\b and /api/catalog//entities as raw bytes over TCP (4 times each quick, 10 full)",
    checks: "each answered 400 or 404 with Backstage's error body (error.name, error.message, request.method/url, response.statusCode); the demo catalog received no request but by-query pages meanwhile",
};

/// Attack 7.
pub(crate) const HTML_UPSTREAM: Attack = Attack {
    name: "html-upstream",
    about: "the demo catalog answers /locations/… with a 200 text/html sign-in page (fault wrong_content_type_paths); 8 GET /api/catalog/locations/<id> (4 of its location, 4 random ids), then 3 POST /refresh",
    checks: "the breaker stays closed; no POST /refresh is answered 503",
};

/// The paths of `raw-paths`, as sent.
pub(crate) const HOSTILE_PATHS: &[&str] = &[
    "/api/catalog/locations/../../../admin/secret",
    "/api/catalog/locations/%2e%2e/%2e%2e/admin",
    "/api/catalog/entities/by-uid/a%2Fb",
    "/api/catalog/entities/by-uid/a\\b",
    "/api/catalog//entities",
];

/// The demo catalog's one location.
const LOCATION_ID: &str = "9d4a6c51-7b0e-4b8a-9a43-5c0c2b1e7f10";

/// Whether `body` is Backstage's error body for `status`.
fn backstage_error(body: &[u8], status: u16) -> Result<(), String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON ({e})"))?;
    let checks = [
        ("error.name", v["error"]["name"].is_string()),
        ("error.message", v["error"]["message"].is_string()),
        ("request.method", v["request"]["method"].is_string()),
        ("request.url", v["request"]["url"].is_string()),
        (
            "response.statusCode",
            v["response"]["statusCode"].as_u64() == Some(u64::from(status)),
        ),
    ];
    match checks.iter().find(|(_, ok)| !ok) {
        Some((field, _)) => Err(format!("{field} is missing or wrong in {v}")),
        None => Ok(()),
    }
}

/// The demo catalog's requests other than by-query (the sync's pages).
fn not_sync(stats: &Value) -> u64 {
    stats["total"].as_u64().unwrap_or(0) - stats["by_query"].as_u64().unwrap_or(0)
}

/// Attack 6: `raw-paths`.
pub(crate) async fn raw_paths(x: &mut Field<'_>) -> Result<Attacked, HarnessError> {
    let proxy = x.proxy();
    let before = x.lab.upstream.stats().await?;
    let rounds = if x.sizes.quick { 4 } else { 10 };
    let mut attacked = Attacked::default();
    let mut tally = Tally::default();
    for _ in 0..rounds {
        for path in HOSTILE_PATHS {
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {proxy}\r\nConnection: close\r\n\r\n");
            let started = tokio::time::Instant::now();
            match raw_request(&proxy, request.as_bytes(), Duration::from_secs(5)).await {
                Err(e) => tally.add(0, started.elapsed(), Some(format!("{path}: {e}"))),
                Ok(answer) => {
                    let bad = if ![400, 404].contains(&answer.status) {
                        Some(format!(
                            "{path} answered {}: {}",
                            answer.status,
                            String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)])
                        ))
                    } else {
                        backstage_error(&answer.body, answer.status)
                            .err()
                            .map(|why| format!("{path} answered {}: {why}", answer.status))
                    };
                    tally.add(answer.status, started.elapsed(), bad);
                }
            }
        }
    }
    let after = x.lab.upstream.stats().await?;
    attacked.requests = tally.count();
    attacked
        .notes
        .push(format!("answers: {}", tally.describe()));
    if let Some(first) = &tally.first_bad {
        attacked.fail(format!(
            "{} of {} hostile paths were not answered 400/404 in Backstage's shape; first: {first}",
            tally.bad,
            tally.count()
        ));
    }
    let reached = not_sync(&after).saturating_sub(not_sync(&before));
    if reached > 0 {
        attacked.fail(format!(
            "the demo catalog received {reached} request(s) other than by-query pages while the hostile paths were sent"
        ));
    }
    Ok(attacked)
}

/// Attack 7: `html-upstream`.
pub(crate) async fn html_upstream(x: &mut Field<'_>) -> Result<Attacked, HarnessError> {
    let base = x.lab.sidecar.catalog_url();
    let http = reqwest::Client::new();
    let mut attacked = Attacked::default();
    x.lab
        .upstream
        .set_faults(json!({"wrong_content_type_paths": ["/locations/"]}))
        .await?;
    let mut reads = Tally::default();
    for i in 0..8u32 {
        let id = if i % 2 == 0 {
            LOCATION_ID.to_string()
        } else {
            format!(
                "00000000-0000-4000-8000-{:012x}",
                x.sizes.seed * 100 + u64::from(i)
            )
        };
        let started = tokio::time::Instant::now();
        let got = http
            .get(format!("{base}/locations/{id}"))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let status = got.map(|r| r.status().as_u16()).unwrap_or(0);
        reads.add(status, started.elapsed(), None);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut writes = Tally::default();
    let entity_ref = x.lab.targets[0].lower_ref();
    for _ in 0..3 {
        let started = tokio::time::Instant::now();
        let got = http
            .post(format!("{base}/refresh"))
            .json(&json!({ "entityRef": entity_ref }))
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let (status, message) = match got {
            Ok(r) => {
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                (
                    status,
                    v["error"]["message"].as_str().unwrap_or("").to_string(),
                )
            }
            Err(e) => (0, client_error(e)),
        };
        let bad = match status {
            503 => Some(format!("POST /refresh answered 503: {message}")),
            0 => Some(format!("POST /refresh got no answer: {message}")),
            _ => None,
        };
        writes.add(status, started.elapsed(), bad);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    x.lab.upstream.clear_faults().await?;
    attacked.requests = reads.count() + writes.count();
    attacked.notes.push(format!(
        "reads of the HTML route: {}; POST /refresh: {}",
        reads.describe(),
        writes.describe()
    ));
    if let Some(first) = &writes.first_bad {
        attacked.fail(format!(
            "{} of {} writes were refused while one route answered HTML; first: {first}",
            writes.bad,
            writes.count()
        ));
    }
    Ok(attacked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backstage_error_bodies_are_recognised() {
        let good = json!({
            "error": {"name": "InputError", "message": "no"},
            "request": {"method": "GET", "url": "/x"},
            "response": {"statusCode": 400}
        })
        .to_string();
        assert!(backstage_error(good.as_bytes(), 400).is_ok());
        assert!(backstage_error(good.as_bytes(), 404).is_err());
        assert!(backstage_error(b"<html>", 400).is_err());
        assert!(backstage_error(br#"{"error": "x"}"#, 400).is_err());
    }
}
