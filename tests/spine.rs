//! The read path, sync and proxy surface while the upstream is healthy.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use catalog_cache::clock::Clock;
use catalog_cache::mirror::Mirror;
use catalog_cache::snapshot::import_into;
use catalog_cache::sync::SyncResult;
use catalog_fake::Faults;
use serde_json::{json, Value};

mod support;

use support::*;

/// A spread of entities: every kind the generator makes, a few of each.
fn sample(entities: &[Value], per_kind: usize) -> Vec<Value> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    entities
        .iter()
        .filter(|e| {
            let n = seen
                .entry(e["kind"].as_str().unwrap_or("").to_string())
                .or_default();
            *n += 1;
            *n <= per_kind
        })
        .cloned()
        .collect()
}

fn refused() -> Faults {
    Faults {
        refuse: true,
        ..Faults::default()
    }
}

/// `catalog-cache; hit; ttl=-N` → N.
fn negative_ttl(cache_status: &str) -> i64 {
    let ttl = cache_status
        .strip_prefix("catalog-cache; hit; ttl=")
        .unwrap_or_else(|| panic!("not a stale hit: {cache_status:?}"));
    let ttl: i64 = ttl
        .parse()
        .unwrap_or_else(|_| panic!("ttl is not a number: {cache_status:?}"));
    -ttl
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_reads_equal_the_upstreams_answers_while_healthy() {
    let ts = TestSidecar::builder().start().await;
    let entities = ts.upstream_entities();
    let picked = sample(&entities, 3);
    assert!(picked.len() >= 6, "the demo catalog has several kinds");
    for e in &picked {
        let (kind, ns, name) = entity_ref(e);
        let paths = [
            by_name_path(e),
            format!(
                "/entities/by-name/{}/{}/{}",
                kind.to_uppercase(),
                ns.to_uppercase(),
                name.to_uppercase()
            ),
            format!(
                "/entities/by-name/{}/{}/{}",
                kind.to_lowercase(),
                ns,
                name.to_lowercase()
            ),
            format!("/entities/by-uid/{}", uid(e)),
        ];
        for path in paths {
            let ours = ts.get(&path).await;
            let theirs = ts.get_upstream(&path).await;
            assert_eq!(ours.status, 200, "{path}");
            assert_eq!(ours.status, theirs.status, "{path}");
            assert_eq!(ours.json(), theirs.json(), "{path}");
            assert_eq!(ours.cache_status(), "catalog-cache; hit", "{path}");
        }
    }
    // Misses: the sidecar's 404 is the upstream's 404.
    for path in [
        "/entities/by-name/component/default/no-such-entity".to_string(),
        "/entities/by-uid/00000000-0000-0000-0000-000000000000".to_string(),
    ] {
        let ours = ts.get(&path).await;
        let theirs = ts.get_upstream(&path).await;
        assert_eq!((ours.status, theirs.status), (404, 404), "{path}");
        assert_eq!(ours.json(), theirs.json(), "{path}");
    }
    // by-refs: request order and length kept, a missing ref and an
    // upper-case ref both answer null, as Backstage does.
    let (k, ns, n) = entity_ref(&picked[1]);
    let refs = json!({"entityRefs": [
        canonical_ref(&picked[0]),
        "component:default/no-such-entity",
        format!("{}:{}/{}", k, ns, n.to_uppercase()),
        canonical_ref(&picked[2]),
        canonical_ref(&picked[0]),
    ]});
    let ours = ts.post("/entities/by-refs", &refs).await;
    let theirs = ts.post_upstream("/entities/by-refs", &refs).await;
    assert_eq!((ours.status, theirs.status), (200, 200));
    assert_eq!(ours.json(), theirs.json());
    let items = ours.json()["items"].as_array().cloned().expect("items");
    assert_eq!(items.len(), 5);
    assert_eq!(items[0]["metadata"]["uid"], picked[0]["metadata"]["uid"]);
    assert!(items[1].is_null(), "a missing ref is null");
    assert!(
        items[2].is_null(),
        "an upper-case ref is null, as Backstage compares refs"
    );
    assert_eq!(items[3]["metadata"]["uid"], picked[2]["metadata"]["uid"]);
    assert_eq!(items[4], items[0], "a repeated ref is answered twice");
    // by-refs of present, lower-case refs only is answered locally.
    let present = json!({"entityRefs": [canonical_ref(&picked[3]), canonical_ref(&picked[4])]});
    ts.fake.reset_stats();
    let ours = ts.post("/entities/by-refs", &present).await;
    assert_eq!(ours.cache_status(), "catalog-cache; hit");
    assert_eq!(
        ts.fake.stats().by_refs,
        0,
        "a fresh by-refs read does not reach the upstream"
    );
    assert_eq!(
        ours.json(),
        ts.post_upstream("/entities/by-refs", &present).await.json()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_read_is_a_hit_that_never_reaches_the_upstream() {
    let ts = TestSidecar::builder().start().await;
    let e = ts.upstream_entities()[5].clone();
    ts.fake.reset_stats();
    let a = ts.get(&by_name_path(&e)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.cache_status(), "catalog-cache; hit");
    assert_eq!(a.stale(), "false");
    assert!(a.age() < ts.config.freshness.fresh_for.get().as_secs());
    assert_eq!(a.json()["metadata"]["etag"], e["metadata"]["etag"]);
    assert_eq!(
        ts.fake.stats().total,
        0,
        "a fresh hit is answered from the mirror"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_past_fresh_for_is_revalidated_then_a_hit() {
    let ts = TestSidecar::builder().start().await;
    let e = ts.upstream_entities()[7].clone();
    ts.age_past_fresh(Duration::from_secs(1));
    ts.fake.reset_stats();
    let a = ts.get(&by_name_path(&e)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.cache_status(), "catalog-cache; fwd=stale; fwd-status=200");
    assert_eq!(a.stale(), "false");
    assert_eq!(a.age(), 0, "the upstream just confirmed it");
    assert_eq!(ts.fake.stats().by_name, 1);
    // The confirmation is kept: the next read is local again.
    let b = ts.get(&by_name_path(&e)).await;
    assert_eq!(b.cache_status(), "catalog-cache; hit");
    assert_eq!(ts.fake.stats().by_name, 1);
    assert_eq!(a.json(), b.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_added_after_the_sync_is_fetched_stored_then_a_hit() {
    let ts = TestSidecar::builder().start().await;
    ts.fake.add_entities(vec![new_component("late-arrival")]);
    let path = "/entities/by-name/component/default/late-arrival";
    let a = ts.get(path).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.cache_status(), "catalog-cache; fwd=miss; stored");
    assert_eq!(a.stale(), "false");
    assert_eq!(a.json(), ts.get_upstream(path).await.json());
    ts.fake.reset_stats();
    let b = ts.get(path).await;
    assert_eq!(b.status, 200);
    assert_eq!(b.cache_status(), "catalog-cache; hit");
    assert_eq!(ts.fake.stats().total, 0);
    // It is also found by uid and by ref now.
    let uid = a.json()["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_string();
    let by_uid = ts.get(&format!("/entities/by-uid/{uid}")).await;
    assert_eq!(by_uid.status, 200);
    assert_eq!(by_uid.json(), a.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_the_upstream_cannot_confirm_is_served_marked_stale() {
    let ts = TestSidecar::builder().start().await;
    let e = ts.upstream_entities()[9].clone();
    let before = ts.get(&by_name_path(&e)).await;
    ts.faults(refused()).await;
    ts.age_past_fresh(Duration::from_secs(30));
    let a = ts.get(&by_name_path(&e)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.stale(), "true");
    let ttl = negative_ttl(&a.cache_status());
    assert!(
        ttl >= 30,
        "ttl is minus the seconds past fresh_for: {}",
        a.cache_status()
    );
    assert!(
        a.age() >= ts.config.freshness.fresh_for.get().as_secs(),
        "Age {}",
        a.age()
    );
    assert_eq!(a.body, before.body, "staleness never changes the body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_of_a_stale_entity_share_one_upstream_call() {
    let ts = Arc::new(TestSidecar::builder().start().await);
    let e = ts.upstream_entities()[11].clone();
    ts.faults(Faults {
        latency: Some(100),
        ..Faults::default()
    })
    .await;
    ts.age_past_fresh(Duration::from_secs(1));
    ts.fake.reset_stats();
    let path = by_name_path(&e);
    let reads = (0..20).map(|_| {
        let ts = ts.clone();
        let path = path.clone();
        tokio::spawn(async move { ts.get(&path).await })
    });
    for read in futures::future::join_all(reads).await {
        let a = read.expect("the read task");
        assert_eq!(a.status, 200);
        assert_eq!(a.stale(), "false");
    }
    assert_eq!(
        ts.fake.stats().by_name,
        1,
        "20 concurrent reads, one upstream call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_of_a_missing_entity_share_one_upstream_call() {
    let ts = Arc::new(TestSidecar::builder().start().await);
    ts.fake
        .add_entities(vec![new_component("popular-newcomer")]);
    ts.faults(Faults {
        latency: Some(100),
        ..Faults::default()
    })
    .await;
    ts.fake.reset_stats();
    let reads = (0..20).map(|_| {
        let ts = ts.clone();
        tokio::spawn(async move {
            ts.get("/entities/by-name/component/default/popular-newcomer")
                .await
        })
    });
    for read in futures::future::join_all(reads).await {
        assert_eq!(read.expect("the read task").status, 200);
    }
    assert_eq!(
        ts.fake.stats().by_name,
        1,
        "20 concurrent misses, one upstream call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_404_is_cached() {
    let ts = TestSidecar::builder().start().await;
    let path = "/entities/by-name/component/default/does-not-exist";
    ts.fake.reset_stats();
    let first = ts.get(path).await;
    assert_eq!(first.status, 404);
    assert_eq!(first.json()["error"]["name"], "NotFoundError");
    assert_eq!(ts.fake.stats().by_name, 1);
    let second = ts.get(path).await;
    assert_eq!(second.status, 404);
    assert_eq!(second.json(), first.json());
    assert_eq!(
        ts.fake.stats().by_name,
        1,
        "the second miss is answered from the negative cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_deletion_is_held_until_accepted() {
    let ts = TestSidecar::builder().start().await;
    let entities = ts.upstream_entities();
    let total = entities.len();
    let doomed: HashSet<String> = entities.iter().take(total / 2).map(uid).collect();
    let victim = entities[0].clone();
    let generation = ts.generation();
    let removed = ts
        .fake
        .remove_entities(|e| doomed.contains(e["metadata"]["uid"].as_str().unwrap_or("")));
    assert_eq!(removed, total / 2);

    let held = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(held.result, SyncResult::Held, "{held:?}");
    assert_eq!(held.removed, total / 2);
    assert_eq!(ts.generation(), generation, "a held sync applies nothing");
    assert_eq!(
        ts.sidecar.generations.current().expect("view").index.len(),
        total
    );
    assert_eq!(
        ts.sidecar
            .mirror
            .meta()
            .expect("meta")
            .expect("a generation")
            .entities,
        total
    );
    assert_eq!(
        ts.get(&by_name_path(&victim)).await.status,
        200,
        "a held deletion still serves the entity"
    );
    let status = ts.status().await;
    assert_eq!(status["held_deletions"]["would_remove"], total / 2);
    assert_eq!(status["held_deletions"]["of"], total);
    assert_eq!(status["last_sync"]["result"], "held");

    let accepted = ts.sidecar.syncer.sync_once(true).await;
    assert_eq!(accepted.result, SyncResult::Applied, "{accepted:?}");
    assert_eq!(accepted.removed, total / 2);
    assert_eq!(
        ts.sidecar.generations.current().expect("view").index.len(),
        total - total / 2
    );
    assert_ne!(ts.generation(), generation);
    let status = ts.status().await;
    assert!(status["held_deletions"].is_null(), "{status:#}");
    assert_eq!(ts.get(&by_name_path(&victim)).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_upstream_catalog_is_held_even_when_deletions_are_allowed() {
    let ts = TestSidecar::builder()
        .with(|b| b.max_delete_ratio = 1.0)
        .start()
        .await;
    let total = ts.upstream_entities().len();
    let generation = ts.generation();
    ts.faults(Faults {
        empty_catalog: true,
        ..Faults::default()
    })
    .await;
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Held, "{report:?}");
    assert_eq!(ts.generation(), generation);
    assert_eq!(
        ts.sidecar.generations.current().expect("view").index.len(),
        total
    );
    assert_eq!(ts.status().await["held_deletions"]["would_remove"], total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_with_a_failed_page_keeps_the_old_generation() {
    let ts = TestSidecar::builder()
        .with(|b| b.upstream_timeout = Duration::from_millis(400))
        .start()
        .await;
    let entities = ts.upstream_entities();
    assert!(
        entities.len() > 2 * ts.config.mirror.page_size as usize,
        "the sync reads several pages"
    );
    let e = entities[entities.len() - 1].clone();
    let generation = ts.generation();
    let old_etag = etag(&e);
    let new_etag = ts
        .fake
        .update_entity(&uid(&e), |v| {
            v["metadata"]["description"] = json!("changed")
        })
        .expect("updated");
    assert_ne!(old_etag, new_etag);
    ts.faults(Faults {
        fail_page: Some(2),
        ..Faults::default()
    })
    .await;
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Failed, "{report:?}");
    assert!(
        report.error.as_deref().unwrap_or("").contains("page 2"),
        "{report:?}"
    );
    assert_eq!(ts.generation(), generation);
    assert_eq!(
        ts.sidecar.mirror.meta().expect("meta").map(|m| m.id),
        generation
    );
    let a = ts.get(&by_name_path(&e)).await;
    assert_eq!(
        a.json()["metadata"]["etag"],
        old_etag.as_str(),
        "nothing of the failed sync was applied"
    );
    assert_eq!(ts.status().await["last_sync"]["result"], "failed");
    // Once the page is served, the change arrives.
    ts.faults(Faults::default()).await;
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Applied, "{report:?}");
    assert_eq!(report.changed, 1);
    assert_eq!(
        ts.get(&by_name_path(&e)).await.json()["metadata"]["etag"],
        new_etag.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_detects_changes_by_etag() {
    let ts = TestSidecar::builder().start().await;
    let total = ts.upstream_entities().len();
    let generation = ts.generation();
    // Nothing changed upstream: the mirror is confirmed, not rewritten.
    ts.clock.advance(Duration::from_secs(60));
    assert!(ts.sidecar.generations.age().expect("age") >= Duration::from_secs(60));
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Unchanged, "{report:?}");
    assert_eq!(
        (
            report.added,
            report.changed,
            report.removed,
            report.unchanged
        ),
        (0, 0, 0, total)
    );
    assert_eq!(
        ts.generation(),
        generation,
        "an unchanged sync makes no new generation"
    );
    assert!(
        ts.sidecar.generations.age().expect("age") < Duration::from_secs(60),
        "the confirmation resets the data age"
    );
    // One entity changed upstream: one changed, the rest unchanged.
    let e = ts.upstream_entities()[3].clone();
    let new_etag = ts.fake.touch(&uid(&e)).expect("touched");
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Applied, "{report:?}");
    assert_eq!(
        (
            report.added,
            report.changed,
            report.removed,
            report.unchanged
        ),
        (0, 1, 0, total - 1)
    );
    assert_eq!(ts.generation(), generation.map(|g| g + 1));
    let a = ts.get(&by_name_path(&e)).await;
    assert_eq!(a.cache_status(), "catalog-cache; hit");
    assert_eq!(a.json()["metadata"]["etag"], new_etag.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_serves_the_mirror_at_once_while_the_upstream_is_down() {
    let ts = TestSidecar::builder().start().await;
    let e = ts.upstream_entities()[13].clone();
    let before = ts.get(&by_name_path(&e)).await;
    let generation = ts.generation();
    ts.faults(refused()).await;
    let ts = ts.restart().await;
    assert_eq!(
        ts.generation(),
        generation,
        "the generation is loaded from disk before any sync"
    );
    let ready = ts.admin_get("/readyz").await;
    assert_eq!(
        ready.status,
        200,
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
    let a = ts.get(&by_name_path(&e)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, before.body);
    assert_eq!(a.cache_status(), "catalog-cache; hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_database_is_moved_aside_and_the_mirror_refilled() {
    let dir = Arc::new(tempfile::tempdir().expect("a temp dir"));
    let db = dir.path().join("catalog-cache.db");
    let garbage: Vec<u8> = b"this is not an SQLite database; "
        .iter()
        .cycle()
        .take(8192)
        .copied()
        .collect();
    std::fs::write(&db, &garbage).expect("write garbage");
    let ts = TestSidecar::builder()
        .with(|b| {
            b.wait_for_sync = false;
            b.faults_at_start = Some(refused());
        })
        .start_in(dir.clone())
        .await;
    assert!(
        ts.sidecar.generations.current().is_none(),
        "the sidecar starts empty"
    );
    assert_eq!(
        ts.admin_get("/readyz").await.status,
        503,
        "not ready without a generation"
    );
    let read = ts.get(&by_name_path(&ts.upstream_entities()[0])).await;
    assert_eq!(read.status, 503, "no mirror, no upstream: nothing to serve");
    assert_eq!(read.json()["error"]["name"], "ServiceUnavailableError");
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read the data dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("catalog-cache.db.corrupt-")
                    && !n.ends_with("-wal")
                    && !n.ends_with("-shm")
            })
        })
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file is moved aside: {aside:?}");
    assert_eq!(
        std::fs::read(&aside[0]).expect("read the moved file"),
        garbage,
        "moved, not rewritten"
    );
    // The sync loop retries on its own once the upstream is back (and a
    // sync asked for now waits for one in progress).
    ts.faults(Faults::default()).await;
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert!(
        matches!(report.result, SyncResult::Applied | SyncResult::Unchanged),
        "{report:?}"
    );
    assert_eq!(
        ts.sidecar
            .generations
            .current()
            .expect("refilled")
            .index
            .len(),
        ts.upstream_entities().len()
    );
    assert_eq!(ts.admin_get("/readyz").await.status, 200);
    assert_eq!(
        ts.get(&by_name_path(&ts.upstream_entities()[0]))
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_seeds_a_new_sidecar_with_the_snapshots_age() {
    let ts = TestSidecar::builder().start().await;
    let e = ts.upstream_entities()[17].clone();
    let before = ts.get(&by_name_path(&e)).await;
    assert_eq!(
        ts.admin_get("/admin/snapshot").await.status,
        401,
        "the snapshot is the whole mirror: it needs the admin token"
    );
    let snapshot = ts
        .admin_send(
            reqwest::Method::GET,
            "/admin/snapshot",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(snapshot.status, 200);
    let synced_at = ts
        .sidecar
        .generations
        .current()
        .expect("view")
        .meta
        .synced_at;

    let dir = Arc::new(tempfile::tempdir().expect("a temp dir"));
    let file = dir.path().join("snapshot.db");
    std::fs::write(&file, &snapshot.body).expect("write the snapshot");
    let mut config = ts.builder_used().config(&ts.fake.base_url(), dir.path());
    config.freshness.fresh_for = ts.config.freshness.fresh_for;
    {
        let clock = Clock::system();
        let (mirror, _) = Mirror::open(&config.mirror.path, &clock).expect("a new mirror");
        let (meta, _) =
            import_into(&mirror, &file, &HashMap::new(), "snapshot", clock.now()).expect("import");
        assert_eq!(meta.entities, ts.upstream_entities().len());
    }
    ts.faults(refused()).await;
    let clock = Clock::system();
    clock.advance(Duration::from_secs(2 * 3600));
    let seeded = ts.sibling(dir, config, clock).await;
    let view = seeded
        .sidecar
        .generations
        .current()
        .expect("the snapshot is a generation");
    assert_eq!(
        catalog_cache::mirror::to_ms(view.meta.synced_at),
        catalog_cache::mirror::to_ms(synced_at),
        "the snapshot keeps the time its data was confirmed"
    );
    let a = seeded.get(&by_name_path(&e)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, before.body);
    assert_eq!(a.stale(), "true", "two hours old, upstream down: stale");
    assert!(a.age() >= 2 * 3600, "Age {}", a.age());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_pass_through_to_the_upstream() {
    let ts = TestSidecar::builder().start().await;
    let e = ts.upstream_entities()[2].clone();
    ts.fake.reset_stats();
    let a = ts
        .post("/refresh", &json!({"entityRef": canonical_ref(&e)}))
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.cache_status(), "catalog-cache; fwd=bypass");
    assert_eq!(ts.fake.stats().other, 1, "the write reached the upstream");
    // The upstream's own error passes through unchanged.
    let bad = ts.post("/refresh", &json!({})).await;
    let theirs = ts.post_upstream("/refresh", &json!({})).await;
    assert_eq!((bad.status, theirs.status), (400, 400));
    assert_eq!(bad.json(), theirs.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fail_fast_with_the_breaker_forced_open() {
    let ts = TestSidecar::builder().start().await;
    ts.set_breaker(json!({"mode": "open", "reason": "upstream maintenance"}))
        .await;
    ts.fake.reset_stats();
    let a = ts
        .post("/refresh", &json!({"entityRef": "component:default/x"}))
        .await;
    assert_eq!(a.status, 503);
    assert!(
        !a.header("retry-after").is_empty(),
        "503 carries Retry-After"
    );
    let body = a.json();
    assert_eq!(body["error"]["name"], "ServiceUnavailableError");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("not sent"),
        "{body}"
    );
    assert_eq!(body["request"]["method"], "POST");
    assert_eq!(body["request"]["url"], "/refresh");
    assert_eq!(body["response"]["statusCode"], 503);
    assert_eq!(ts.fake.stats().total, 0, "nothing reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_catalog_api_are_not_found() {
    let ts = TestSidecar::builder().start().await;
    ts.fake.reset_stats();
    for path in [
        "/",
        "/api/catalogue/entities",
        "/api/other/thing",
        "/metrics",
    ] {
        let a = capture_raw(
            &ts,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(a.starts_with("HTTP/1.1 404"), "{path}: {a}");
        let body: Value =
            serde_json::from_str(a.split("\r\n\r\n").nth(1).unwrap_or("")).expect("JSON body");
        assert_eq!(body["error"]["name"], "NotFoundError", "{path}");
        assert_eq!(body["response"]["statusCode"], 404);
    }
    assert_eq!(ts.fake.stats().total, 0);
}

/// Sends raw bytes to the proxy listener and reads the whole answer.
async fn capture_raw(ts: &TestSidecar, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(ts.proxy)
        .await
        .expect("connect to the proxy");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("the proxy answers and closes")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_never_talks_to_a_host_named_by_the_client() {
    let ts = TestSidecar::builder().start().await;
    ts.fake.reset_stats();
    let body = r#"{"entityRef":"component:default/x"}"#;
    for (target, host) in [
        (
            "http://198.51.100.7:7007/api/catalog/refresh",
            "198.51.100.7:7007",
        ),
        ("/api/catalog/refresh", "attacker.invalid"),
    ] {
        let request = format!(
            "POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = capture_raw(&ts, &request).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{target}: {answer}");
        assert!(
            answer
                .to_lowercase()
                .contains("cache-status: catalog-cache; fwd=bypass"),
            "{answer}"
        );
    }
    assert_eq!(
        ts.fake.stats().other,
        2,
        "both requests reached the configured upstream, and only it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_over_the_limit_is_refused() {
    let ts = TestSidecar::builder()
        .with(|b| b.max_request_body = 1024)
        .start()
        .await;
    ts.fake.reset_stats();
    let refs: Vec<String> = (0..200)
        .map(|i| format!("component:default/entity-{i:05}"))
        .collect();
    let a = ts
        .post("/entities/by-refs", &json!({"entityRefs": refs}))
        .await;
    assert_eq!(a.status, 413);
    assert_eq!(a.json()["error"]["name"], "PayloadTooLargeError");
    assert_eq!(ts.fake.stats().total, 0);
    // Under the limit it is served.
    let small = ts
        .post(
            "/entities/by-refs",
            &json!({"entityRefs": [canonical_ref(&ts.upstream_entities()[0])]}),
        )
        .await;
    assert_eq!(small.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tokens_are_required_when_configured() {
    let ts = TestSidecar::builder()
        .with(|b| {
            b.client_tokens = Some(vec!["# deploy controller".into(), "client-token-1".into()])
        })
        .start()
        .await;
    let url = ts.url(&by_name_path(&ts.upstream_entities()[0]));
    let none = ts.http.get(&url).send().await.expect("answer");
    assert_eq!(none.status(), 401);
    let body: Value = none.json().await.expect("JSON");
    assert_eq!(body["error"]["name"], "AuthenticationError");
    assert_eq!(body["error"]["message"], "Missing credentials");
    let wrong = ts
        .http
        .get(&url)
        .bearer_auth("nope")
        .send()
        .await
        .expect("answer");
    assert_eq!(wrong.status(), 401);
    let comment = ts
        .http
        .get(&url)
        .bearer_auth("# deploy controller")
        .send()
        .await
        .expect("answer");
    assert_eq!(comment.status(), 401, "a comment line is not a token");
    let right = ts
        .http
        .get(&url)
        .bearer_auth("client-token-1")
        .send()
        .await
        .expect("answer");
    assert_eq!(right.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_404_gives_way_to_an_entity_a_sync_brings_in() {
    let ts = TestSidecar::builder().start().await;
    let path = "/entities/by-name/component/default/arrives-later";
    assert_eq!(ts.get(path).await.status, 404);
    ts.fake.add_entities(vec![new_component("arrives-later")]);
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(
        (report.result, report.added),
        (SyncResult::Applied, 1),
        "{report:?}"
    );
    ts.fake.reset_stats();
    let a = ts.get(path).await;
    assert_eq!(
        a.status,
        200,
        "the mirror holds it now: {}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.cache_status(), "catalog-cache; hit");
    assert_eq!(ts.fake.stats().total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_deletions_survive_a_restart() {
    let ts = TestSidecar::builder().start().await;
    let entities = ts.upstream_entities();
    let doomed: HashSet<String> = entities.iter().take(entities.len() / 2).map(uid).collect();
    ts.fake
        .remove_entities(|e| doomed.contains(e["metadata"]["uid"].as_str().unwrap_or("")));
    assert_eq!(
        ts.sidecar.syncer.sync_once(false).await.result,
        SyncResult::Held
    );
    ts.faults(refused()).await;
    let ts = ts.restart().await;
    let status = ts.status().await;
    assert_eq!(
        status["held_deletions"]["would_remove"],
        entities.len() / 2,
        "{status:#}"
    );
    assert_eq!(
        status["last_sync"]["result"], "held",
        "the last sync report is kept too"
    );
    assert_eq!(
        ts.sidecar.generations.current().expect("view").index.len(),
        entities.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sidecar_seeds_its_mirror_from_a_peer() {
    let peer = TestSidecar::builder().start().await;
    let e = peer.upstream_entities()[21].clone();
    let before = peer.get(&by_name_path(&e)).await;
    peer.faults(refused()).await;
    let dir = Arc::new(tempfile::tempdir().expect("a temp dir"));
    let mut config = peer
        .builder_used()
        .config(&peer.fake.base_url(), dir.path());
    config.mirror.seed_from = format!("http://{}", peer.admin);
    let seeded = peer.sibling(dir, config, Clock::system()).await;
    seeded.wait_for_first_sync().await;
    assert_eq!(
        seeded
            .sidecar
            .generations
            .current()
            .expect("view")
            .index
            .len(),
        peer.upstream_entities().len()
    );
    let a = seeded.get(&by_name_path(&e)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, before.body);
    assert_eq!(seeded.admin_get("/readyz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_deleted_upstream_answers_404_without_a_miss_storm() {
    let ts = TestSidecar::builder().start().await;
    let e = ts.upstream_entities()[23].clone();
    let gone = uid(&e);
    ts.fake
        .remove_entities(|v| v["metadata"]["uid"].as_str() == Some(gone.as_str()));
    ts.age_past_fresh(Duration::from_secs(1));
    ts.fake.reset_stats();
    let first = ts.get(&by_name_path(&e)).await;
    assert_eq!(
        first.status, 404,
        "the upstream's word wins over a stale copy"
    );
    assert_eq!(
        first.cache_status(),
        "catalog-cache; fwd=stale; fwd-status=404"
    );
    for _ in 0..3 {
        assert_eq!(ts.get(&by_name_path(&e)).await.status, 404);
    }
    assert_eq!(
        ts.fake.stats().by_name,
        1,
        "the 404 is remembered for negative_ttl"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_404_for_a_mirrored_entity_asks_for_a_sync_at_once() {
    // The sync interval is an hour: only the 404 can bring a sync this soon.
    let ts = TestSidecar::builder().start().await;
    let e = ts.upstream_entities()[17].clone();
    let gone = uid(&e);
    ts.fake
        .remove_entities(|v| v["metadata"]["uid"].as_str() == Some(gone.as_str()));
    ts.age_past_fresh(Duration::from_secs(1));
    ts.fake.reset_stats();
    assert_eq!(ts.get(&by_name_path(&e)).await.status, 404);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while ts.fake.stats().by_query == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no sync followed the upstream's 404 for a mirrored entity"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // That sync takes the deletion into the mirror: the entity is gone
    // locally too, without asking the upstream again.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while ts
        .sidecar
        .syncer
        .status()
        .last_sync()
        .is_none_or(|r| r.removed == 0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the deletion was not synced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upper_case_ref_is_answered_null_locally() {
    let ts = TestSidecar::builder().start().await;
    let entities = ts.upstream_entities();
    let (k, ns, n) = entity_ref(&entities[0]);
    let refs = json!({"entityRefs": [canonical_ref(&entities[1]), format!("{}:{}/{}", k.to_uppercase(), ns, n)]});
    let theirs = ts.post_upstream("/entities/by-refs", &refs).await;
    ts.fake.reset_stats();
    let ours = ts.post("/entities/by-refs", &refs).await;
    assert_eq!(ours.json(), theirs.json());
    assert!(ours.json()["items"][1].is_null());
    assert_eq!(
        ours.cache_status(),
        "catalog-cache; hit",
        "an upper-case ref can never match, so nothing is unknown"
    );
    assert_eq!(ts.fake.stats().total, 0);
    // During an outage the same fresh answer is not marked stale.
    ts.faults(refused()).await;
    let ours = ts.post("/entities/by-refs", &refs).await;
    assert_eq!((ours.status, ours.stale().as_str()), (200, "false"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_through_the_sidecar_reaches_the_mirror() {
    let ts = TestSidecar::builder().start().await;
    let e = ts.upstream_entities()[31].clone();
    let path = format!("/entities/by-uid/{}", uid(&e));
    assert_eq!(ts.get(&path).await.status, 200);
    let deleted = ts.http.delete(ts.url(&path)).send().await.expect("answer");
    assert_eq!(deleted.status(), 204);
    assert_eq!(
        deleted.headers()["cache-status"],
        "catalog-cache; fwd=bypass"
    );
    let ts_ref = &ts;
    let gone = uid(&e);
    eventually("the mirror to drop the deleted entity", WAIT, || {
        let gone = gone.clone();
        async move {
            ts_ref
                .sidecar
                .generations
                .current()
                .is_some_and(|g| g.index.by_uid(&gone).is_none())
        }
    })
    .await;
    assert_eq!(ts.get(&path).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_through_answer_is_served_stale_during_an_outage() {
    let ts = TestSidecar::builder().start().await;
    let first = ts.get("/locations").await;
    let theirs = ts.get_upstream("/locations").await;
    assert_eq!((first.status, theirs.status), (200, 200));
    assert_eq!(first.json(), theirs.json());
    assert_eq!(first.cache_status(), "catalog-cache; fwd=miss; stored");
    ts.faults(refused()).await;
    ts.age_past_fresh(Duration::from_secs(1));
    let a = ts.get("/locations").await;
    assert_eq!((a.status, a.stale().as_str()), (200, "true"));
    assert_eq!(a.body, first.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_uses_its_own_upstream_identity_and_forwards_the_callers_on_writes() {
    let ts = TestSidecar::builder()
        .with(|b| b.upstream_token = Some("upstream-secret".into()))
        .start()
        .await;
    let e = ts.upstream_entities()[3].clone();
    // Synced with the sidecar's token; reads need none from the caller.
    assert_eq!(
        ts.sidecar.generations.current().expect("view").index.len(),
        ts.upstream_entities().len()
    );
    ts.age_past_fresh(Duration::from_secs(1));
    let a = ts.get(&by_name_path(&e)).await;
    assert_eq!(
        a.cache_status(),
        "catalog-cache; fwd=stale; fwd-status=200",
        "revalidated with the sidecar's token"
    );
    // Writes carry the caller's identity, not the sidecar's.
    let body = json!({"entityRef": canonical_ref(&e)});
    let anonymous = ts.post("/refresh", &body).await;
    assert_eq!(
        anonymous.status,
        401,
        "{}",
        String::from_utf8_lossy(&anonymous.body)
    );
    let signed = ts
        .http
        .post(ts.url("/refresh"))
        .bearer_auth("upstream-secret")
        .json(&body)
        .send()
        .await
        .expect("answer");
    assert_eq!(signed.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_sync_endpoint_runs_a_sync_and_can_accept_deletions() {
    let ts = TestSidecar::builder().start().await;
    let entities = ts.upstream_entities();
    let doomed: HashSet<String> = entities.iter().take(entities.len() / 2).map(uid).collect();
    ts.fake
        .remove_entities(|e| doomed.contains(e["metadata"]["uid"].as_str().unwrap_or("")));
    let held = ts
        .admin_send(
            reqwest::Method::POST,
            "/admin/sync",
            Some(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(held.status, 200);
    assert_eq!(held.json()["result"], "held");
    let accepted = ts
        .admin_send(
            reqwest::Method::POST,
            "/admin/sync",
            Some(ADMIN_TOKEN),
            Some(json!({"accept_deletions": true})),
        )
        .await;
    assert_eq!(accepted.json()["result"], "applied", "{}", accepted.json());
    assert_eq!(accepted.json()["removed"], entities.len() / 2);
    assert_eq!(
        ts.sidecar.generations.current().expect("view").index.len(),
        entities.len() - entities.len() / 2
    );
    let audit = ts.status().await["audit"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        audit.iter().any(|a| a["subject"] == "deletions"),
        "accepting deletions is audited: {audit:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_fetched_then_deleted_upstream_does_not_come_back_after_a_restart() {
    let ts = TestSidecar::builder().start().await;
    let path = "/entities/by-name/component/default/short-lived";
    ts.fake.add_entities(vec![new_component("short-lived")]);
    assert_eq!(
        ts.get(path).await.cache_status(),
        "catalog-cache; fwd=miss; stored"
    );
    // The fetched entity is written to the mirror file in the background.
    let db = ts.db_path();
    eventually("the fetched entity to reach the mirror file", WAIT, || {
        let db = db.clone();
        async move {
            let conn = rusqlite::Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .expect("open the mirror read-only");
            conn.query_row(
                "SELECT count(*) FROM entities WHERE entity_ref = 'component:default/short-lived'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or(0)
                == 1
        }
    })
    .await;
    ts.fake
        .remove_entities(|e| e["metadata"]["name"] == "short-lived");
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_ne!(report.result, SyncResult::Failed, "{report:?}");
    let total = ts.upstream_entities().len();
    let ts = ts.restart().await;
    assert_eq!(
        ts.sidecar.generations.current().expect("view").index.len(),
        total,
        "the mirror holds the upstream's catalog, nothing the upstream deleted"
    );
    assert_eq!(ts.get(path).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_deletions_are_held_mirrored_entities_keep_reading_stale_not_404() {
    let ts = TestSidecar::builder().start().await;
    let e = ts.upstream_entities()[3].clone();
    let (kind, namespace, name) = entity_ref(&e);
    let lower_ref = format!("{kind}:{namespace}/{name}").to_lowercase();
    ts.faults(Faults {
        empty_catalog: true,
        ..Faults::default()
    })
    .await;
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Held, "{report:?}");
    ts.age_past_fresh(Duration::from_secs(1));
    for _ in 0..2 {
        // Twice: the second read must not be answered by a remembered 404.
        let read = ts.get(&by_name_path(&e)).await;
        assert_eq!(read.status, 200, "{}", String::from_utf8_lossy(&read.body));
        assert_eq!(read.json()["metadata"]["uid"], e["metadata"]["uid"]);
        assert_eq!(read.stale(), "true", "{}", read.cache_status());
    }
    let refs = ts
        .post("/entities/by-refs", &json!({"entityRefs": [lower_ref]}))
        .await;
    assert_eq!(refs.status, 200);
    assert_eq!(
        refs.json()["items"][0]["metadata"]["uid"],
        e["metadata"]["uid"]
    );
    assert_eq!(refs.stale(), "true");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_deletions_are_held_a_doubted_404_is_not_asked_again_within_negative_ttl() {
    // Every mirrored entity is past fresh_for and the upstream is in
    // trouble: one upstream call per entity per negative_ttl, not per read.
    let ts = TestSidecar::builder().start().await;
    let e = ts.upstream_entities()[8].clone();
    ts.faults(Faults {
        empty_catalog: true,
        ..Faults::default()
    })
    .await;
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Held, "{report:?}");
    ts.age_past_fresh(Duration::from_secs(1));
    ts.fake.reset_stats();
    for _ in 0..5 {
        let read = ts.get(&by_name_path(&e)).await;
        assert_eq!(read.status, 200, "{}", String::from_utf8_lossy(&read.body));
        assert_eq!(read.json()["metadata"]["uid"], e["metadata"]["uid"]);
        assert_eq!(read.stale(), "true", "{}", read.cache_status());
    }
    assert_eq!(
        ts.fake.stats().by_name,
        1,
        "the doubted 404 is remembered for negative_ttl"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walk_that_ends_short_of_the_announced_total_applies_nothing() {
    // An upstream whose pages disagree with their own count (the catalog
    // emptied mid-walk, a page cut short): 3 announced, 2 sent.
    let entities = catalog_fake::generate(2, 5);
    let body = json!({"items": entities, "totalItems": 3, "pageInfo": {}}).to_string();
    let app = axum::Router::new().route(
        "/api/catalog/entities/by-query",
        axum::routing::get(move || {
            let body = body.clone();
            async move { ([("content-type", "application/json")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().unwrap();
    let config = TestSidecar::builder().config(&format!("http://{addr}/api/catalog"), dir.path());
    let sidecar = catalog_cache::sidecar::Sidecar::open(config, Clock::system()).unwrap();
    let report = sidecar.syncer.sync_once(false).await;
    server.abort();
    assert_eq!(report.result, SyncResult::Failed, "{report:?}");
    assert!(
        report.error.as_deref().unwrap_or("").contains("counted 3"),
        "{report:?}"
    );
    assert!(
        sidecar.generations.current().is_none(),
        "nothing was applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_sync_an_upstream_404_for_a_mirrored_entity_is_served_stale() {
    let ts = TestSidecar::builder().start().await;
    let entities = ts.upstream_entities();
    assert!(entities.len() > 2 * ts.config.mirror.page_size as usize);
    let e = entities[5].clone();
    let gone = uid(&e);
    ts.fake
        .remove_entities(|v| v["metadata"]["uid"].as_str() == Some(gone.as_str()));
    ts.faults(Faults {
        fail_page: Some(2),
        ..Faults::default()
    })
    .await;
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Failed, "{report:?}");
    ts.age_past_fresh(Duration::from_secs(1));
    let read = ts.get(&by_name_path(&e)).await;
    assert_eq!(read.status, 200, "{}", String::from_utf8_lossy(&read.body));
    assert_eq!(read.stale(), "true");
    // Once a sync succeeds again, the upstream's word is taken.
    ts.faults(Faults::default()).await;
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Applied, "{report:?}");
    assert_eq!(ts.get(&by_name_path(&e)).await.status, 404);
}
