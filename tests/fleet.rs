//! Cheap syncs at fleet scale: the id-walk (ids and etags, then by-refs
//! for what changed) ends with the mirror a full walk would, under churn,
//! deletions and the deletion guard; a leaf behind another catalog-cache
//! follows its changes feed, a 304 when nothing moved, and a 410 makes it
//! walk and end identical.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use catalog_cache::clock::Clock;
use catalog_cache::sync::{SyncMethod, SyncResult};
use proptest::prelude::*;
use serde_json::json;

mod support;

use support::*;

/// uid → (etag, body) of the generation a sidecar serves.
fn mirror_of(ts: &TestSidecar) -> BTreeMap<String, (String, bytes::Bytes)> {
    let generation = ts.sidecar.generations.current().expect("a generation");
    generation
        .index
        .entities()
        .map(|e| (e.uid.to_string(), (e.etag.to_string(), e.body())))
        .collect()
}

/// uid → etag at the demo catalog.
fn catalog_of(ts: &TestSidecar) -> BTreeMap<String, String> {
    ts.upstream_entities()
        .iter()
        .map(|e| (uid(e), etag(e)))
        .collect()
}

/// A sidecar that walks ids on every cycle but the first (`ids`), and a
/// sibling in front of the same demo catalog that always walks whole
/// entities (`full`).
async fn pair(entities: usize, max_delete_ratio: f64) -> (TestSidecar, TestSidecar) {
    let ids = TestSidecar::builder()
        .with(|b| {
            b.entities = entities;
            b.max_delete_ratio = max_delete_ratio;
        })
        .configure(|c| {
            c.mirror.full_sync_every = 10_000;
            c.mirror.id_page_size = 37;
        })
        .start()
        .await;
    let dir = Arc::new(tempfile::tempdir().expect("a temp dir"));
    let mut config = ids.builder_used().config(&ids.fake.base_url(), dir.path());
    config.mirror.full_sync_every = 1;
    let full = ids.sibling(dir, config, Clock::system()).await;
    full.wait_for_first_sync().await;
    (ids, full)
}

#[tokio::test]
async fn an_unchanged_cycle_reads_only_ids() {
    let (ids, _full) = pair(150, 0.2).await;
    ids.fake.reset_stats();
    let report = ids.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Unchanged, "{report:?}");
    assert_eq!(report.method, Some(SyncMethod::IdWalk));
    let stats = ids.fake.stats();
    assert_eq!(
        stats.by_refs, 0,
        "nothing changed, nothing fetched: {stats:?}"
    );
    // 150 entities, 37 ids a page.
    assert_eq!(stats.by_query, 5, "{stats:?}");

    // One change: one by-refs request, for it alone.
    let entity = ids.upstream_entities()[10].clone();
    ids.fake.touch(&uid(&entity)).expect("the entity exists");
    ids.fake.reset_stats();
    let report = ids.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Applied, "{report:?}");
    assert_eq!(report.method, Some(SyncMethod::IdWalk));
    assert_eq!((report.changed, report.added, report.removed), (1, 0, 0));
    assert_eq!(ids.fake.stats().by_refs, 1);
    assert_eq!(
        mirror_of(&ids)
            .into_iter()
            .map(|(u, (e, _))| (u, e))
            .collect::<BTreeMap<_, _>>(),
        catalog_of(&ids)
    );
}

#[tokio::test]
async fn every_full_sync_every_cycles_a_full_walk_runs() {
    let ts = TestSidecar::builder()
        .configure(|c| c.mirror.full_sync_every = 3)
        .start()
        .await;
    let mut methods = Vec::new();
    for _ in 0..6 {
        methods.push(ts.sidecar.syncer.sync_once(false).await.method);
    }
    // The first sync (at start) was full: two id-walks (the second one all
    // 304s, the catalog being unchanged), then a full walk.
    use SyncMethod::*;
    assert_eq!(
        methods,
        [IdWalk, NotModified, FullWalk, IdWalk, NotModified, FullWalk].map(Some)
    );
}

#[tokio::test]
async fn an_unchanged_catalog_costs_one_304_a_page() {
    let (ids, _full) = pair(150, 0.2).await;
    // The first id-walk keeps every page's ETag (the first sync at start
    // was a full walk, which has none)...
    let report = ids.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.method, Some(SyncMethod::IdWalk), "{report:?}");
    // ...the next asks for each page with If-None-Match: five 304s.
    ids.fake.reset_stats();
    let report = ids.sidecar.syncer.sync_once(false).await;
    assert_eq!(
        (report.result, report.method),
        (SyncResult::Unchanged, Some(SyncMethod::NotModified)),
        "{report:?}"
    );
    let stats = ids.fake.stats();
    assert_eq!((stats.by_query, stats.by_refs), (5, 0), "{stats:?}");

    // A change: the pages before it answer 304, the first changed page 200,
    // and the walk starts again without conditions (a 304 page brought no
    // ids): at most 4 + 5 pages, one by-refs, and the mirror is the catalog.
    let entity = ids.upstream_entities()[100].clone();
    ids.fake.touch(&uid(&entity)).expect("the entity exists");
    ids.fake.reset_stats();
    let report = ids.sidecar.syncer.sync_once(false).await;
    assert_eq!(
        (report.result, report.method),
        (SyncResult::Applied, Some(SyncMethod::IdWalk)),
        "{report:?}"
    );
    assert_eq!((report.changed, report.added, report.removed), (1, 0, 0));
    let stats = ids.fake.stats();
    assert!((5..=9).contains(&stats.by_query), "{stats:?}");
    assert_eq!(stats.by_refs, 1, "{stats:?}");
    assert_eq!(
        mirror_of(&ids)
            .into_iter()
            .map(|(u, (e, _))| (u, e))
            .collect::<BTreeMap<_, _>>(),
        catalog_of(&ids)
    );
    // The walk that took the change kept the new tags.
    let report = ids.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.method, Some(SyncMethod::NotModified), "{report:?}");

    // A deletion changes the last page's count and totalItems: caught too.
    let gone = uid(&ids.upstream_entities()[3]);
    ids.fake
        .remove_entities(|v| v["metadata"]["uid"].as_str() == Some(gone.as_str()));
    let report = ids.sidecar.syncer.sync_once(false).await;
    assert_eq!(
        (report.result, report.method, report.removed),
        (SyncResult::Applied, Some(SyncMethod::IdWalk), 1),
        "{report:?}"
    );
}

#[tokio::test]
async fn an_inconsistent_upstream_is_walked_whole() {
    let ts = TestSidecar::builder()
        .configure(|c| c.mirror.full_sync_every = 10_000)
        .start()
        .await;
    // An entity whose uid changes under the same ref: by-refs answers
    // another uid than the id-walk listed only if the catalog moves between
    // the two, so here the id-walk itself sees a new uid and fetches it.
    let entity = ts.upstream_entities()[4].clone();
    ts.fake
        .update_entity(&uid(&entity), |e| e["metadata"]["uid"] = json!("a-new-uid"))
        .expect("the entity exists");
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Applied, "{report:?}");
    assert_eq!(report.method, Some(SyncMethod::IdWalk));
    assert!(mirror_of(&ts).contains_key("a-new-uid"));

    // A page that fails: the cycle fails, and the next one is a full walk.
    ts.faults(catalog_fake::Faults {
        error_rate: 1.0,
        ..Default::default()
    })
    .await;
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Failed, "{report:?}");
    ts.faults(catalog_fake::Faults::default()).await;
    ts.wait_breaker("closed").await;
    let report = ts.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.method, Some(SyncMethod::FullWalk), "{report:?}");
}

/// One step of a churn sequence: change, add and delete counts.
#[derive(Debug, Clone)]
struct Step {
    change: usize,
    add: usize,
    delete: usize,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (
            0usize..20,
            0usize..6,
            prop_oneof![4 => 0usize..5, 1 => 30usize..60],
        )
            .prop_map(|(change, add, delete)| Step {
                change,
                add,
                delete,
            }),
        1..5,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random churn (including deletions large enough for the guard to
    /// hold them): after every step the id-walking sidecar and the fully
    /// walking one hold the same mirror, byte for byte, and agree on the
    /// result (applied, unchanged or held).
    #[test]
    fn id_walk_and_full_walk_end_with_the_same_mirror(steps in steps()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let (ids, full) = pair(140, 0.2).await;
            for step in steps {
                ids.fake.churn(step.change, step.add, step.delete);
                let by_ids = ids.sidecar.syncer.sync_once(false).await;
                let by_full = full.sidecar.syncer.sync_once(false).await;
                assert_eq!(by_ids.result, by_full.result, "{step:?}: {by_ids:?} vs {by_full:?}");
                assert_eq!(by_ids.method, Some(SyncMethod::IdWalk), "{step:?}: {by_ids:?}");
                assert_eq!(by_full.method, Some(SyncMethod::FullWalk), "{step:?}");
                assert_eq!(
                    (by_ids.added, by_ids.changed, by_ids.removed),
                    (by_full.added, by_full.changed, by_full.removed),
                    "{step:?}"
                );
                assert_eq!(mirror_of(&ids), mirror_of(&full), "{step:?}");
                if by_ids.result == SyncResult::Held {
                    // Accepted on both, as an operator would.
                    let a = ids.sidecar.syncer.sync_once(true).await;
                    let b = full.sidecar.syncer.sync_once(true).await;
                    assert_eq!(a.result, SyncResult::Applied);
                    assert_eq!(b.result, SyncResult::Applied);
                    assert_eq!(mirror_of(&ids), mirror_of(&full), "{step:?}, accepted");
                }
            }
        });
    }
}

/// Tier A in front of the demo catalog; leaf B in front of A.
async fn chain() -> (TestSidecar, TestSidecar) {
    let a = TestSidecar::builder()
        .configure(|c| c.listen.name = "tier-a".into())
        .start()
        .await;
    let dir = Arc::new(tempfile::tempdir().expect("a temp dir"));
    let mut config = a.builder_used().config(&a.url(""), dir.path());
    config.listen.name = "tier-b".into();
    let b = a.sibling(dir, config, Clock::system()).await;
    b.wait_for_first_sync().await;
    (a, b)
}

#[tokio::test]
async fn a_leaf_follows_its_tier_by_304_and_changes_feed() {
    let (a, b) = chain().await;
    let status = b.status().await;
    assert_eq!(status["upstream"]["kind"], "catalog-cache", "{status:#}");

    // Nothing moved: a 304.
    let report = b.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.method, Some(SyncMethod::NotModified), "{report:?}");
    assert_eq!(report.result, SyncResult::Unchanged);

    // A change at the demo catalog reaches A, then B through the feed.
    let entities = a.upstream_entities();
    let changed = entities[3].clone();
    let deleted = entities[8].clone();
    a.fake
        .update_entity(&uid(&changed), |e| {
            e["metadata"]["description"] = json!("changed at the origin")
        })
        .expect("the entity exists");
    a.fake.remove_entities(|e| uid(e) == uid(&deleted));
    a.fake
        .add_entities(vec![new_component("born-at-the-origin")]);
    let report = a.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Applied, "{report:?}");
    let report = b.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.method, Some(SyncMethod::Changes), "{report:?}");
    assert_eq!(
        (report.added, report.changed, report.removed),
        (1, 1, 1),
        "{report:?}"
    );
    assert_eq!(mirror_of(&b), mirror_of(&a));
    let answer = b.get(&by_name_path(&changed)).await;
    assert!(String::from_utf8_lossy(&answer.body).contains("changed at the origin"));
    let answer = b.get(&by_name_path(&deleted)).await;
    assert_eq!(answer.status, 404);

    // The feed's bytes and requests are counted by kind.
    let metrics = b.admin_get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(
        metric(&text, "catalog_cache_sync_requests_total{kind=\"changes\"}") >= 1.0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "catalog_cache_sync_requests_total{kind=\"not_modified\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn a_changes_feed_that_is_gone_makes_the_leaf_walk_and_end_identical() {
    let (a, b) = chain().await;
    // A's changes log keeps nothing older than a second; two generations
    // later B's position is outside it.
    a.sidecar.mirror.keep_changes_for(Duration::from_secs(1));
    for i in 0..2 {
        let entity = a.upstream_entities()[20 + i].clone();
        a.fake.touch(&uid(&entity)).expect("the entity exists");
        let report = a.sidecar.syncer.sync_once(false).await;
        assert_eq!(report.result, SyncResult::Applied, "{report:?}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let entity = a.upstream_entities()[30].clone();
    a.fake.touch(&uid(&entity)).expect("the entity exists");
    a.sidecar.syncer.sync_once(false).await;
    let report = b.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result, SyncResult::Applied, "{report:?}");
    assert!(
        matches!(
            report.method,
            Some(SyncMethod::IdWalk | SyncMethod::FullWalk)
        ),
        "{report:?}"
    );
    assert_eq!(mirror_of(&b), mirror_of(&a));
    // From there on B follows the feed again.
    let entity = a.upstream_entities()[31].clone();
    a.fake.touch(&uid(&entity)).expect("the entity exists");
    a.sidecar.syncer.sync_once(false).await;
    let report = b.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.method, Some(SyncMethod::Changes), "{report:?}");
    assert_eq!(mirror_of(&b), mirror_of(&a));
}

#[tokio::test]
async fn a_leaf_asks_for_compressed_answers_and_a_tier_gives_them() {
    let (a, _b) = chain().await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .no_gzip()
        .build()
        .expect("a client");
    let query = client
        .get(a.url("/entities/by-query?limit=100"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("an answer");
    assert_eq!(query.status(), 200);
    assert_eq!(
        query
            .headers()
            .get("content-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("gzip")
    );
    let entity = a.upstream_entities()[1].clone();
    let hit = client
        .get(a.url(&by_name_path(&entity)))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("an answer");
    assert_eq!(hit.status(), 200);
    assert!(
        hit.headers().get("content-encoding").is_none(),
        "entity hits are served as stored"
    );
}

#[tokio::test]
async fn a_leaf_s_periodic_check_of_its_tier_is_an_id_walk() {
    let (a, b) = chain().await;
    // Every second cycle is the periodic check.
    let b = {
        let mut b = b;
        b.stop().await;
        let dir = b.dir.clone();
        let mut config = b.config.clone();
        config.mirror.full_sync_every = 2;
        drop(b);
        let b = a.sibling(dir, config, Clock::system()).await;
        b.wait_for_first_sync().await;
        b
    };
    let mut methods = Vec::new();
    for i in 0..4 {
        let entity = a.upstream_entities()[40 + i].clone();
        a.fake.touch(&uid(&entity)).expect("the entity exists");
        a.sidecar.syncer.sync_once(false).await;
        methods.push(b.sidecar.syncer.sync_once(false).await.method);
        assert_eq!(mirror_of(&b), mirror_of(&a), "cycle {i}");
    }
    assert!(
        !methods.contains(&Some(SyncMethod::FullWalk)),
        "{methods:?}"
    );
    assert!(methods.contains(&Some(SyncMethod::IdWalk)), "{methods:?}");
    assert!(methods.contains(&Some(SyncMethod::Changes)), "{methods:?}");
}
