//! Large-body attack `by-refs-24k`: 10 concurrent `POST /entities/by-refs`
//! of 24,000 real refs each (about 0.95 MB, just under
//! `proxy.max_request_body`).
//!
//! Called by `abuse::exercise`. Each must be answered 200 with one item per
//! ref; memory may grow by what ten such requests and their answers need
//! at once, no more (the RSS ceiling states it).

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::time::Instant;

use super::{Attack, Attacked, Field, Tally};
use crate::scenario::{client_error, size_text, HarnessError};

/// Attack 4.
pub(crate) const BY_REFS: Attack = Attack {
    name: "by-refs-24k",
    about: "10 concurrent POST /entities/by-refs, each of 24,000 refs of mirrored entities (the catalog's refs, repeated; ~0.95 MB bodies)",
    checks: "each answered 200 with 24,000 items; RSS under RSS before + 10 × (request body + its parsed refs + the answer) + margin",
};

/// Refs per request.
const REFS: usize = 24_000;
/// Requests at once.
const CONCURRENT: usize = 10;
/// How long one answer may take to arrive whole (no setting bounds it
/// below `listen.request_timeout`; this keeps the run finite).
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// Attack 4: `by-refs-24k`.
pub(crate) async fn by_refs(x: &mut Field<'_>) -> Result<Attacked, HarnessError> {
    let mut refs: Vec<String> = x
        .lab
        .targets
        .iter()
        .cycle()
        .take(REFS)
        .map(|t| t.lower_ref())
        .collect();
    let mut body = json!({ "entityRefs": refs }).to_string();
    // Stay under the body limit (refs are dropped from the end if needed).
    while body.len() as u64 > x.limits.max_request_body {
        refs.truncate(refs.len() * 95 / 100);
        body = json!({ "entityRefs": refs }).to_string();
    }
    let body = Bytes::from(body);
    let count = refs.len();
    let url = format!("{}/entities/by-refs", x.lab.sidecar.catalog_url());
    let handles: Vec<_> = (0..CONCURRENT)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let answer = reqwest::Client::new()
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body)
                    .timeout(ANSWER_WITHIN)
                    .send()
                    .await;
                match answer {
                    Err(e) => (
                        0,
                        started.elapsed(),
                        0,
                        Some(format!("no answer: {}", client_error(e))),
                    ),
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        match resp.bytes().await {
                            Err(e) => (
                                status,
                                started.elapsed(),
                                0,
                                Some(format!("answer cut short: {}", client_error(e))),
                            ),
                            Ok(bytes) => {
                                // A 37 MB parse is CPU work: off the async workers.
                                let parsed = bytes.clone();
                                let items = tokio::task::spawn_blocking(move || {
                                    serde_json::from_slice::<serde_json::Value>(&parsed)
                                        .ok()
                                        .and_then(|v| v["items"].as_array().map(Vec::len))
                                })
                                .await
                                .ok()
                                .flatten();
                                let bad = match (status, items) {
                                    (200, Some(n)) if n == count => None,
                                    (200, n) => {
                                        Some(format!("200 with {n:?} items for {count} refs"))
                                    }
                                    (s, _) => Some(format!(
                                        "answered {s}: {}",
                                        String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                                    )),
                                };
                                (status, started.elapsed(), bytes.len(), bad)
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let mut tally = Tally::default();
    let mut answer_bytes = 0usize;
    for h in handles {
        let (status, took, size, bad) = h
            .await
            .map_err(|e| HarnessError::Http(format!("by-refs task: {e}")))?;
        answer_bytes = answer_bytes.max(size);
        tally.add(status, took, bad);
    }
    let mut attacked = Attacked {
        requests: tally.count(),
        ..Attacked::default()
    };
    attacked.notes.push(format!(
        "{CONCURRENT} requests of {count} refs, {} bytes each; answers: {}; largest answer {}",
        body.len(),
        tally.describe(),
        size_text(answer_bytes as u64)
    ));
    if let Some(first) = &tally.first_bad {
        attacked.fail(format!(
            "{} of {} by-refs requests were not answered 200 with every item; first: {first}",
            tally.bad,
            tally.count()
        ));
    }
    // What each request in flight needs: its body, the refs parsed out of
    // it (24,000 strings of ~40 bytes with their allocations: 64 bytes
    // each) and its answer (as measured; a refused request has none).
    let parsed = (count * 64) as u64;
    let per_request = x.limits.max_request_body + parsed + answer_bytes as u64;
    attacked.ceiling = Some(x.ceiling(
        CONCURRENT as u64 * per_request,
        &format!(
            "{CONCURRENT} × (proxy.max_request_body {} + {count} parsed refs {} + answer {})",
            size_text(x.limits.max_request_body),
            size_text(parsed),
            size_text(answer_bytes as u64)
        ),
    ));
    Ok(attacked)
}
