//! The status page's last hour agrees with `/metrics`: the reads of each
//! outcome in `GET /history` add up to `catalog_cache_requests_total` of that
//! outcome. One sidecar in this test binary, so the process-wide metrics
//! recorder counts only its requests.

mod support;

use std::time::Duration;

use catalog_fake::Faults;
use serde_json::json;

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
