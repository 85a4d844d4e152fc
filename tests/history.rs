//! The status page's last hour agrees with `/metrics`: the reads of each
//! outcome in `GET /history` add up to `catalog_cache_requests_total` of that
//! outcome. One in-process sidecar in this test binary, so the process-wide
//! metrics recorder counts only its requests. And the real binary, over
//! loopback, answers `GET /history` in the shape the status page reads, to
//! whoever may read `GET /status`.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use catalog_fake::Faults;
use serde_json::{json, Value};

use support::process::{fake, start, wait_ready};
use support::*;

fn metric_by_outcome(text: &str, outcome: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("catalog_cache_requests_total{"))
        .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hour_of_reads_adds_up_to_the_request_metrics() {
    let ts = TestSidecar::builder()
        .with(|b| b.budget = Duration::from_millis(200))
        .start()
        .await;
    let entities = ts.upstream_entities();
    for e in entities.iter().take(20) {
        assert_eq!(ts.get(&by_name_path(e)).await.status, 200);
    }
    assert_eq!(ts.get("/entities/by-uid/%zz").await.status, 400);
    ts.faults(Faults {
        refuse: true,
        ..Faults::default()
    })
    .await;
    ts.age_past_fresh(Duration::from_secs(1));
    for e in entities.iter().take(5) {
        let a = ts.get(&by_name_path(e)).await;
        assert_eq!(a.stale(), "true");
    }
    ts.set_stale(json!({"policy": "refuse", "reason": "test"}))
        .await;
    for e in entities.iter().take(3) {
        assert_eq!(ts.get(&by_name_path(e)).await.status, 503);
    }
    // Let the next second close.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let history = ts.admin_get("/history").await.json();
    // The status page marks fresh_for on its data-age chart.
    let status = ts.admin_get("/status").await.json();
    assert_eq!(status["freshness"]["fresh_for_seconds"], 90.0);
    let metrics = String::from_utf8_lossy(&ts.admin_get("/metrics").await.body).into_owned();
    for outcome in ["hit", "stale", "refused", "error"] {
        let in_history: u64 = history["reads"][outcome]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum();
        let in_metrics = metric_by_outcome(&metrics, outcome) as u64;
        assert_eq!(in_history, in_metrics, "{outcome}: history vs /metrics");
        assert_eq!(
            history["totals"][outcome].as_u64(),
            Some(in_metrics),
            "{outcome}"
        );
    }
    assert_eq!(history["totals"]["stale"], 5);
    assert_eq!(history["totals"]["refused"], 3);
    assert!(history["totals"]["hit"].as_u64().unwrap() >= 20);
    let breaker: Vec<&str> = history["breaker"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b.as_str())
        .collect();
    assert!(!breaker.is_empty());
    assert!(
        !history["syncs"].as_array().unwrap().is_empty(),
        "the first sync"
    );
    let ages = history["data_age_seconds"].as_array().unwrap();
    assert!(
        ages.iter().any(|a| a.as_f64().is_some_and(|a| a >= 90.0)),
        "{ages:?}"
    );
}

/// The outcomes `GET /history` has a column for, as the request metrics name them.
const OUTCOMES: [&str; 6] = ["hit", "miss", "stale", "refused", "error", "bypass"];

/// A `GET` on the admin listener with an optional `Authorization` header:
/// status, content type and JSON body (`Null` when not JSON).
async fn admin_json(admin: &str, path: &str, auth: Option<&str>) -> (u16, String, Value) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut request = client.get(format!("http://{admin}{path}"));
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let answer = request.send().await.expect("the admin listener answers");
    let status = answer.status().as_u16();
    let content_type = answer
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = answer.json().await.unwrap_or(Value::Null);
    (status, content_type, body)
}

/// Checks `GET /history` column by column, as the status page reads it
/// (see `parseHistory` in src/status_page.html); returns the number of seconds.
fn assert_history_shape(h: &Value) -> usize {
    let at: Vec<u64> = h["at"]
        .as_array()
        .expect("'at' is an array")
        .iter()
        .map(|t| t.as_u64().expect("'at' holds Unix seconds"))
        .collect();
    let n = at.len();
    assert!(n > 0, "no second closed yet: {h}");
    assert!(at.windows(2).all(|w| w[0] < w[1]), "'at' rises: {at:?}");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        at[n - 1] <= now + 1 && at[n - 1] + 5 >= now,
        "the last second is now"
    );
    let reads = h["reads"].as_object().expect("'reads' is an object");
    let mut keys: Vec<&str> = reads.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = OUTCOMES.to_vec();
    want.sort_unstable();
    assert_eq!(keys, want, "a column per outcome");
    for outcome in OUTCOMES {
        let column = reads[outcome].as_array().expect("a reads column");
        assert_eq!(column.len(), n, "reads.{outcome}: one value per second");
        let sum: u64 = column
            .iter()
            .map(|v| v.as_u64().expect("reads are counts"))
            .sum();
        let total = h["totals"][outcome].as_u64().expect("a total per outcome");
        assert!(
            sum <= total,
            "{outcome}: the hour ({sum}) is within the total ({total})"
        );
    }
    let ages = h["data_age_seconds"].as_array().expect("data_age_seconds");
    assert_eq!(ages.len(), n, "data_age_seconds: one value per second");
    for a in ages {
        assert!(
            a.is_null() || a.as_f64().is_some_and(|a| a >= 0.0),
            "an age is null or seconds: {a}"
        );
    }
    let breaker = h["breaker"].as_array().expect("breaker");
    assert_eq!(breaker.len(), n, "breaker: one value per second");
    for b in breaker {
        assert!(
            b.is_null() || ["closed", "half_open", "open"].contains(&b.as_str().unwrap_or("")),
            "a breaker state: {b}"
        );
    }
    let syncs = h["syncs"].as_array().expect("syncs");
    for s in syncs {
        assert!(s["at"].as_u64().is_some(), "a sync's time: {s}");
        assert!(
            ["applied", "unchanged", "failed", "held"]
                .contains(&s["result"].as_str().unwrap_or("")),
            "a sync's result: {s}"
        );
        assert!(
            s["duration_seconds"].as_f64().is_some_and(|d| d >= 0.0),
            "a sync's duration: {s}"
        );
    }
    assert!(
        syncs
            .windows(2)
            .all(|w| w[0]["at"].as_u64() <= w[1]["at"].as_u64()),
        "syncs oldest first"
    );
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_history_the_status_page_reads_under_the_rules_of_status() {
    let upstream = fake(50).await;
    let dir = tempfile::tempdir().unwrap();
    let process = start(
        dir.path(),
        &upstream.base_url(),
        &[("CATALOG_CACHE_FRESHNESS_FRESH_FOR", "7s")],
    );
    wait_ready(&process.admin, Duration::from_secs(20)).await;

    // A few reads through the sidecar, then let their second close.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let list: Value = client
        .get(format!(
            "http://{}/api/catalog/entities/by-query?limit=5",
            process.proxy
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = list["items"].as_array().expect("entities").clone();
    assert_eq!(items.len(), 5);
    for e in &items {
        let answer = client
            .get(format!(
                "http://{}/api/catalog{}",
                process.proxy,
                by_name_path(e)
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;

    // The page's two sources: no token needed for either, and a wrong one
    // is ignored by both alike (reads are open; only changes need the token).
    for auth in [None, Some("Bearer not-the-admin-token")] {
        let (status_code, _, status) = admin_json(&process.admin, "/status", auth).await;
        let (history_code, content_type, history) =
            admin_json(&process.admin, "/history", auth).await;
        assert_eq!(status_code, 200, "GET /status with {auth:?}");
        assert_eq!(
            history_code, status_code,
            "GET /history with {auth:?}, as /status"
        );
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        assert_eq!(status["freshness"]["fresh_for_seconds"], 7.0);
        let n = assert_history_shape(&history);
        let hits: u64 = history["reads"]["hit"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_u64)
            .sum::<u64>()
            + history["reads"]["miss"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_u64)
                .sum::<u64>();
        assert!(hits >= 5, "the reads made are in the hour: {history}");
        assert_eq!(history["breaker"][n - 1], "closed");
        assert!(history["data_age_seconds"][n - 1].as_f64().is_some());
        assert!(
            history["syncs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["result"] == "applied"),
            "the first sync: {history}"
        );
    }

    // The page itself: it reads history, and loads nothing from elsewhere.
    let page = client
        .get(format!("http://{}/", process.admin))
        .send()
        .await
        .unwrap();
    assert!(page
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/html")));
    let html = page.text().await.unwrap();
    assert!(
        html.contains("fetch(\"history\""),
        "the page polls GET history"
    );
    for external in ["<link", "<img", "src=", "@import", "url(", "@font-face"] {
        assert!(
            !html.contains(external),
            "the page loads nothing: {external}"
        );
    }
}
