//! catalog-cache behind catalog-cache: a regional tier A in front of the
//! demo catalog, a leaf B in front of A. Staleness survives the hop: B's
//! `Age` is the origin's, B is stale when A is, and `Cache-Status` lists
//! A's member, then B's.

use std::sync::Arc;
use std::time::Duration;

use catalog_cache::clock::Clock;
use catalog_fake::Faults;
use serde_json::{json, Value};

mod support;

use support::*;

/// Tier A (named `tier-a`) in front of the demo catalog.
async fn tier_a() -> TestSidecar {
    TestSidecar::builder()
        .configure(|c| c.listen.name = "tier-a".into())
        .start()
        .await
}

/// A leaf (named `tier-b`) whose upstream is `a`'s proxy listener, synced once.
async fn leaf_behind(a: &TestSidecar) -> TestSidecar {
    let dir = Arc::new(tempfile::tempdir().expect("a temp dir"));
    let mut config = a.builder_used().config(&a.url(""), dir.path());
    config.listen.name = "tier-b".into();
    let b = a.sibling(dir, config, Clock::system()).await;
    b.wait_for_first_sync().await;
    b
}

fn refused() -> Faults {
    Faults {
        refuse: true,
        ..Faults::default()
    }
}

/// The two reads and a facet request every check below is made with.
async fn reads(ts: &TestSidecar, entity: &Value) -> Vec<(&'static str, Answer)> {
    vec![
        ("by-name", ts.get(&by_name_path(entity)).await),
        (
            "by-query",
            ts.get("/entities/by-query?filter=kind=component&limit=5")
                .await,
        ),
        ("facets", ts.get("/entity-facets?facet=kind").await),
    ]
}

#[tokio::test]
async fn a_fresh_chain_is_fresh_and_names_both_tiers() {
    let a = tier_a().await;
    let b = leaf_behind(&a).await;
    let entity = a.upstream_entities()[3].clone();
    for (what, answer) in reads(&b, &entity).await {
        assert_eq!(answer.status, 200, "{what}");
        assert_eq!(answer.stale(), "false", "{what}");
        let status = answer.cache_status();
        assert!(
            status.starts_with("tier-a; ") && status.contains(", tier-b; hit"),
            "{what}: {status}"
        );
    }
}

#[tokio::test]
async fn when_the_origin_is_down_the_leaf_is_stale_with_the_origin_s_age() {
    let a = tier_a().await;
    let b = leaf_behind(&a).await;
    let entity = a.upstream_entities()[5].clone();
    a.faults(refused()).await;
    // A's data is now older than its fresh_for and its upstream is gone.
    a.age_past_fresh(Duration::from_secs(30));
    let at_a = a.get(&by_name_path(&entity)).await;
    assert_eq!(at_a.stale(), "true");
    let age_a = at_a.age();
    assert!(age_a >= 120, "A's age {age_a}");

    // The leaf learns it by syncing (its own clock has not moved: by its
    // own reckoning its copy is seconds old).
    let report = b.sidecar.syncer.sync_once(false).await;
    assert_eq!(report.result.as_str(), "unchanged", "{report:?}");
    for (what, answer) in reads(&b, &entity).await {
        assert_eq!(answer.status, 200, "{what}");
        assert_eq!(answer.stale(), "true", "{what}: laundered into fresh data");
        assert!(
            answer.age() >= age_a,
            "{what}: age {} < A's {age_a}",
            answer.age()
        );
        let status = answer.cache_status();
        let members: Vec<&str> = status.split(", ").collect();
        assert_eq!(members.len(), 2, "{what}: {status}");
        assert!(
            members[0].starts_with("tier-a; hit; ttl=-"),
            "{what}: {status}"
        );
        assert!(
            members[1].starts_with("tier-b; hit; ttl=-"),
            "{what}: {status}"
        );
    }
    // The leaf's status says where the staleness comes from.
    let status = b.status().await;
    assert_eq!(status["upstream"]["stale"], json!(true), "{status:#}");
    assert!(status["mirror"]["data_age_seconds"].as_f64().unwrap() >= age_a as f64);

    // Recovery clears the staleness at both tiers.
    a.faults(Faults::default()).await;
    let report = a.sidecar.syncer.sync_once(false).await;
    assert_ne!(report.result.as_str(), "failed", "{report:?}");
    let report = b.sidecar.syncer.sync_once(false).await;
    assert_ne!(report.result.as_str(), "failed", "{report:?}");
    for (what, answer) in reads(&b, &entity).await {
        assert_eq!(answer.stale(), "false", "{what}");
        assert!(answer.age() < 5, "{what}: age {}", answer.age());
    }
}

#[tokio::test]
async fn a_leaf_revalidating_through_a_stale_tier_relays_its_staleness() {
    let a = tier_a().await;
    let b = leaf_behind(&a).await;
    let entity = a.upstream_entities()[9].clone();
    a.faults(refused()).await;
    a.age_past_fresh(Duration::from_secs(30));
    // Past the leaf's fresh_for, too: it asks A, and A answers stale.
    b.age_past_fresh(Duration::from_secs(1));
    for (what, answer) in reads(&b, &entity).await {
        assert_eq!(answer.status, 200, "{what}");
        assert_eq!(answer.stale(), "true", "{what}");
        assert!(answer.age() >= 120, "{what}: age {}", answer.age());
        let status = answer.cache_status();
        assert!(
            status.starts_with("tier-a; hit; ttl=-") && status.contains(", tier-b; "),
            "{what}: {status}"
        );
    }
}

#[tokio::test]
async fn with_the_refuse_policy_a_leaf_refuses_what_its_tier_calls_stale() {
    let a = tier_a().await;
    let b = leaf_behind(&a).await;
    let entity = a.upstream_entities()[2].clone();
    a.faults(refused()).await;
    a.age_past_fresh(Duration::from_secs(30));
    b.set_stale(json!({"policy": "refuse", "reason": "no stale data for deploys"}))
        .await;
    b.sidecar.syncer.sync_once(false).await;
    let answer = b.get(&by_name_path(&entity)).await;
    assert_eq!(
        answer.status,
        503,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(
        String::from_utf8_lossy(&answer.body).contains("stale"),
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
}
