//! Upstream faults, the breaker, the stale-data flag, operator overrides,
//! audit, readiness and metrics.

use std::time::{Duration, Instant};

use catalog_cache::breaker::{BreakerMode, BreakerState};
use catalog_fake::Faults;
use reqwest::Method;
use serde_json::{json, Value};

mod support;

use support::*;

fn refused() -> Faults {
    Faults {
        refuse: true,
        ..Faults::default()
    }
}

/// Reads of mirrored entities, past `fresh_for`, with `faults` on the
/// upstream: every one is 200, marked stale, the body unchanged, and no read
/// waits much longer than the revalidate budget.
async fn reads_survive(faults: Faults) {
    // The upstream timeout is well past budget + margin, so a read that
    // waited on the upstream instead of the budget would show.
    let ts = TestSidecar::builder()
        .with(|b| {
            b.budget = Duration::from_millis(200);
            b.upstream_timeout = Duration::from_secs(3);
        })
        .start()
        .await;
    let entities: Vec<Value> = ts
        .upstream_entities()
        .into_iter()
        .step_by(7)
        .take(10)
        .collect();
    let mut bodies = Vec::new();
    for e in &entities {
        bodies.push(ts.get(&by_name_path(e)).await.body);
    }
    ts.faults(faults).await;
    ts.age_past_fresh(Duration::from_secs(10));
    let limit = ts.config.freshness.revalidate_budget.get() + Duration::from_millis(1300);
    for (e, before) in entities.iter().zip(&bodies) {
        let started = Instant::now();
        let a = ts.get(&by_name_path(e)).await;
        let took = started.elapsed();
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.stale(), "true");
        assert!(
            a.cache_status().starts_with("catalog-cache; hit; ttl=-"),
            "{}",
            a.cache_status()
        );
        assert_eq!(&a.body, before);
        assert!(
            took < limit,
            "a read took {took:?}, the budget is {:?}",
            ts.config.freshness.revalidate_budget.get()
        );
    }
    // by-uid and by-refs too.
    let a = ts
        .get(&format!("/entities/by-uid/{}", uid(&entities[0])))
        .await;
    assert_eq!((a.status, a.stale().as_str()), (200, "true"));
    let refs = json!({"entityRefs": [canonical_ref(&entities[1]), canonical_ref(&entities[2])]});
    let a = ts.post("/entities/by-refs", &refs).await;
    assert_eq!((a.status, a.stale().as_str()), (200, "true"));
    assert_eq!(a.json()["items"].as_array().map(Vec::len), Some(2));
    assert!(a.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .all(|i| !i.is_null()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_a_refusing_upstream() {
    reads_survive(refused()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_a_black_holed_upstream_within_the_budget() {
    reads_survive(Faults {
        black_hole: true,
        ..Faults::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_an_upstream_answering_500s() {
    reads_survive(Faults {
        error_rate: 1.0,
        ..Faults::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_malformed_upstream_answers() {
    reads_survive(Faults {
        malformed: true,
        ..Faults::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_an_upstream_answering_429() {
    reads_survive(Faults {
        too_many_requests: Some(30),
        ..Faults::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_an_upstream_answering_a_sign_in_page() {
    reads_survive(Faults {
        wrong_content_type: true,
        ..Faults::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_truncated_upstream_answers() {
    reads_survive(Faults {
        truncated: true,
        ..Faults::default()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_after_the_configured_consecutive_failures() {
    let ts = TestSidecar::builder()
        .with(|b| b.consecutive_failures = 3)
        .start()
        .await;
    let entities = ts.upstream_entities();
    ts.faults(refused()).await;
    ts.age_past_fresh(Duration::from_secs(1));
    for (i, e) in entities.iter().take(2).enumerate() {
        assert_eq!(ts.get(&by_name_path(e)).await.status, 200);
        let status = ts.sidecar.breaker.status();
        assert_eq!(
            status.state,
            BreakerState::Closed,
            "after {} failures",
            i + 1
        );
        assert_eq!(status.consecutive_failures, i as u32 + 1);
    }
    assert_eq!(ts.get(&by_name_path(&entities[2])).await.status, 200);
    assert_eq!(
        ts.sidecar.breaker.state(),
        BreakerState::Open,
        "the third failure opens it"
    );
    let status = ts.status().await;
    assert_eq!(status["breaker"]["state"], "open");
    // Open: reads are answered from the mirror without trying the upstream.
    ts.fake.reset_stats();
    let a = ts.get(&by_name_path(&entities[3])).await;
    assert_eq!((a.status, a.stale().as_str()), (200, "true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_recovers_without_client_traffic() {
    let ts = TestSidecar::builder()
        .with(|b| {
            b.consecutive_failures = 3;
            b.open_for = Duration::from_millis(200);
            b.max_open = Duration::from_millis(800);
            b.sync_interval = Duration::from_millis(500);
            b.upstream_timeout = Duration::from_millis(300);
        })
        .start()
        .await;
    let entities = ts.upstream_entities();
    ts.faults(refused()).await;
    ts.age_past_fresh(Duration::from_secs(1));
    for e in entities.iter().take(3) {
        assert_eq!(ts.get(&by_name_path(e)).await.status, 200);
    }
    ts.wait_breaker("open").await;
    ts.faults(Faults::default()).await;
    ts.fake.reset_stats();
    // No client request from here on: the sync loop is the probe.
    ts.wait_breaker("closed").await;
    let stats = ts.fake.stats();
    assert_eq!(
        stats.by_name + stats.by_uid + stats.by_refs,
        0,
        "no client read reached the upstream"
    );
    assert!(stats.by_query > 0, "the sync loop probed the upstream");
    // The transitions are in the audit trail.
    let ts_ref = &ts;
    eventually("breaker transitions audited", WAIT, || async move {
        let audit = ts_ref.status().await["audit"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let has = |from: &str, to: &str| {
            audit.iter().any(|a| {
                a["subject"] == "breaker_state"
                    && a["actor"] == "breaker"
                    && a["from"] == from
                    && a["to"] == to
            })
        };
        has("closed", "open") && has("half_open", "closed")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_open_breaker_serves_the_mirror_without_calling_the_upstream() {
    let ts = TestSidecar::builder().start().await;
    let entities = ts.upstream_entities();
    let view = ts
        .set_breaker(json!({"mode": "open", "reason": "upstream maintenance"}))
        .await;
    assert_eq!(view["mode"], "open");
    assert_eq!(ts.sidecar.breaker.mode(), BreakerMode::Open);
    ts.age_past_fresh(Duration::from_secs(1));
    ts.fake.reset_stats();
    for e in entities.iter().take(5) {
        let a = ts.get(&by_name_path(e)).await;
        assert_eq!((a.status, a.stale().as_str()), (200, "true"));
    }
    // Absent from a complete generation: Backstage's 404, marked stale.
    let missing = ts
        .get("/entities/by-name/component/default/not-in-the-mirror")
        .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["name"], "NotFoundError");
    assert_eq!(missing.stale(), "true");
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, catalog_cache::sync::SyncResult::Failed);
    assert_eq!(
        ts.fake.stats().total,
        0,
        "forced open: nothing reaches the upstream, sync included"
    );

    // Forced closed: every stale read is revalidated.
    ts.set_breaker(json!({"mode": "closed", "reason": "trust the upstream"}))
        .await;
    let a = ts.get(&by_name_path(&entities[0])).await;
    assert_eq!(a.cache_status(), "catalog-cache; fwd=stale; fwd-status=200");
    assert_eq!(ts.fake.stats().by_name, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_breaker_override_returns_to_auto() {
    let ts = TestSidecar::builder().start().await;
    let view = ts
        .set_breaker(json!({"mode": "open", "reason": "short test", "for": "1s"}))
        .await;
    assert_eq!(view["mode"], "open");
    assert!(view["mode_expires_at"].is_string(), "{view}");
    let ts_ref = &ts;
    eventually("the override to expire", WAIT, || async move {
        ts_ref.admin_get("/admin/breaker").await.json()["mode"] == "auto"
    })
    .await;
    assert_eq!(
        ts.sidecar.breaker.mode(),
        BreakerMode::Auto,
        "the breaker itself is back to auto"
    );
    let audit = ts.status().await["audit"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        audit
            .iter()
            .any(|a| a["subject"] == "breaker_mode" && a["actor"] == "expiry" && a["to"] == "auto"),
        "{audit:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refuse_policy_answers_503_instead_of_stale_data() {
    let ts = TestSidecar::builder().start().await;
    let e = ts.upstream_entities()[4].clone();
    ts.set_stale(json!({"policy": "refuse", "reason": "compliance"}))
        .await;
    // Fresh data is still served.
    assert_eq!(ts.get(&by_name_path(&e)).await.status, 200);
    ts.faults(refused()).await;
    ts.age_past_fresh(Duration::from_secs(1));
    let a = ts.get(&by_name_path(&e)).await;
    assert_eq!(a.status, 503);
    assert!(!a.header("retry-after").is_empty());
    let body = a.json();
    assert_eq!(body["error"]["name"], "ServiceUnavailableError");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("'refuse'"),
        "{body}"
    );
    assert_eq!(body["response"]["statusCode"], 503);
    // Back to serve: the same read is served stale.
    ts.set_stale(json!({"policy": "serve"})).await;
    let a = ts.get(&by_name_path(&e)).await;
    assert_eq!((a.status, a.stale().as_str()), (200, "true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_older_than_max_stale_is_never_served() {
    let ts = TestSidecar::builder()
        .with(|b| b.max_stale = Duration::from_secs(3600))
        .start()
        .await;
    let e = ts.upstream_entities()[6].clone();
    ts.faults(refused()).await;
    ts.clock.advance(Duration::from_secs(2 * 3600));
    let a = ts.get(&by_name_path(&e)).await;
    assert_eq!(a.status, 503);
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("max_stale"),
        "{}",
        a.json()
    );
    let ready = ts.admin_get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(ready.json()["reason"]
        .as_str()
        .unwrap_or("")
        .contains("max_stale"));
    // The operator may widen it.
    ts.set_stale(json!({"policy": "serve", "max_stale": "3h", "reason": "long outage"}))
        .await;
    let a = ts.get(&by_name_path(&e)).await;
    assert_eq!((a.status, a.stale().as_str()), (200, "true"));
    assert_eq!(ts.admin_get("/readyz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_overrides_survive_a_restart() {
    let ts = TestSidecar::builder().start().await;
    ts.set_breaker(json!({"mode": "open", "reason": "planned upstream migration"}))
        .await;
    ts.set_stale(json!({"policy": "refuse", "max_stale": "2h", "reason": "audit season"}))
        .await;
    let ts = ts.restart().await;
    assert_eq!(ts.sidecar.breaker.mode(), BreakerMode::Open);
    let status = ts.status().await;
    assert_eq!(status["breaker"]["mode"], "open");
    assert_eq!(status["breaker"]["reason"], "planned upstream migration");
    assert_eq!(status["stale"]["policy"], "refuse");
    assert_eq!(status["stale"]["max_stale_seconds"], 7200);
    assert_eq!(status["stale"]["reason"], "audit season");
    // And they are in force, not only displayed.
    ts.fake.reset_stats();
    ts.age_past_fresh(Duration::from_secs(1));
    let a = ts.get(&by_name_path(&ts.upstream_entities()[0])).await;
    assert_eq!(a.status, 503, "refuse: stale data is not served");
    assert_eq!(
        ts.fake.stats().by_name,
        0,
        "open: the upstream is not called"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_without_the_admin_token_are_refused_and_change_nothing() {
    let ts = TestSidecar::builder().start().await;
    let before = ts.status().await;
    ts.fake.reset_stats();
    let mutations = [
        (
            Method::PUT,
            "/admin/breaker",
            Some(json!({"mode": "open", "reason": "x"})),
        ),
        (
            Method::PUT,
            "/admin/stale",
            Some(json!({"policy": "refuse"})),
        ),
        (Method::POST, "/admin/sync", None),
    ];
    for (method, path, body) in mutations {
        for token in [None, Some("wrong-token"), Some("")] {
            let a = ts
                .admin_send(method.clone(), path, token, body.clone())
                .await;
            assert_eq!(a.status, 401, "{method} {path} with {token:?}");
            let json = a.json();
            assert_eq!(json["error"]["name"], "AuthenticationError");
            let message = json["error"]["message"].as_str().unwrap_or("");
            match token {
                Some("wrong-token") => assert_eq!(message, "Illegal token"),
                _ => assert!(
                    message.starts_with("Missing credentials") || message == "Illegal token",
                    "{message}"
                ),
            }
        }
    }
    let after = ts.status().await;
    assert_eq!(after["breaker"]["mode"], "auto");
    assert_eq!(after["stale"]["policy"], "serve");
    assert_eq!(after["last_sync"], before["last_sync"], "no sync ran");
    assert_eq!(after["audit"], before["audit"], "nothing was audited");
    assert_eq!(ts.fake.stats().by_query, 0);
    assert_eq!(ts.sidecar.breaker.mode(), BreakerMode::Auto);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_changes_are_audited_with_actor_and_reason() {
    let ts = TestSidecar::builder().start().await;
    let a = ts
        .http
        .put(ts.admin_url("/admin/breaker"))
        .bearer_auth(ADMIN_TOKEN)
        .header("x-catalog-cache-actor", "cli")
        .json(&json!({"mode": "open", "reason": "upstream maintenance"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(a.status(), 200);
    ts.set_stale(json!({"policy": "refuse", "reason": "compliance freeze"}))
        .await;
    let audit = ts.status().await["audit"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let breaker = audit
        .iter()
        .find(|a| a["subject"] == "breaker_mode")
        .unwrap_or_else(|| panic!("no breaker_mode entry: {audit:#?}"));
    assert_eq!(breaker["actor"], "cli");
    assert_eq!(
        (breaker["from"].as_str(), breaker["to"].as_str()),
        (Some("auto"), Some("open"))
    );
    assert_eq!(breaker["reason"], "upstream maintenance");
    assert!(breaker["at"].is_string());
    let stale = audit
        .iter()
        .find(|a| a["subject"] == "stale_policy")
        .unwrap_or_else(|| panic!("no stale_policy entry: {audit:#?}"));
    assert_eq!(stale["actor"], "admin-token");
    assert_eq!(
        (stale["from"].as_str(), stale["to"].as_str()),
        (Some("serve"), Some("refuse"))
    );
    assert_eq!(stale["reason"], "compliance freeze");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_does_not_depend_on_the_upstream_but_follows_the_policy() {
    let ts = TestSidecar::builder().start().await;
    assert_eq!(ts.admin_get("/livez").await.status, 200);
    let page = ts.admin_get("/").await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").starts_with("text/html"));
    assert_eq!(ts.admin_get("/readyz").await.status, 200);
    ts.faults(refused()).await;
    ts.age_past_fresh(Duration::from_secs(1));
    let ready = ts.admin_get("/readyz").await;
    assert_eq!(
        ready.status, 200,
        "upstream down, stale serving allowed: ready"
    );
    assert_eq!(ready.json()["ready"], true);
    ts.set_stale(json!({"policy": "refuse"})).await;
    let ready = ts.admin_get("/readyz").await;
    assert_eq!(ready.status, 503);
    let reason = ready.json()["reason"].as_str().unwrap_or("").to_string();
    assert!(reason.contains("refuse"), "{reason}");
    assert_eq!(ts.status().await["ready"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_and_outcome() {
    let ts = TestSidecar::builder().start().await;
    let e = ts.upstream_entities()[1].clone();
    let series = [
        r#"catalog_cache_requests_total{route="by_name",outcome="hit"}"#,
        r#"catalog_cache_requests_total{route="by_name",outcome="stale"}"#,
        r#"catalog_cache_requests_total{route="pass_through",outcome="bypass"}"#,
        r#"catalog_cache_syncs_total{result="unchanged"}"#,
    ];
    let scrape = |ts: &TestSidecar| {
        let url = ts.admin_url("/metrics");
        let http = ts.http.clone();
        async move {
            let a = http.get(url).send().await.expect("metrics");
            assert_eq!(a.status(), 200);
            a.text().await.expect("text")
        }
    };
    let before = scrape(&ts).await;
    for _ in 0..3 {
        assert_eq!(
            ts.get(&by_name_path(&e)).await.cache_status(),
            "catalog-cache; hit"
        );
    }
    ts.post("/refresh", &json!({"entityRef": canonical_ref(&e)}))
        .await;
    assert_eq!(
        ts.sidecar.syncer.sync_once(false).await.result,
        catalog_cache::sync::SyncResult::Unchanged
    );
    ts.faults(refused()).await;
    ts.age_past_fresh(Duration::from_secs(1));
    assert_eq!(ts.get(&by_name_path(&e)).await.stale(), "true");
    let after = scrape(&ts).await;
    let delta = |s: &str| metric(&after, s) - metric(&before, s);
    assert!(
        delta(series[0]) >= 3.0,
        "hits: {}\n{after}",
        delta(series[0])
    );
    assert!(delta(series[1]) >= 1.0, "stale: {}", delta(series[1]));
    assert!(delta(series[2]) >= 1.0, "bypass: {}", delta(series[2]));
    assert!(
        delta(series[3]) >= 1.0,
        "unchanged syncs: {}",
        delta(series[3])
    );
    assert!(
        after.contains("catalog_cache_mirror_entities"),
        "the gauges are exported"
    );
}
