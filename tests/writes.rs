//! Read your own writes: a write that passes through the sidecar makes
//! what it names no longer fresh here, so the next read asks the upstream,
//! and the next sync comes soon.

use std::sync::Arc;
use std::time::Duration;

use catalog_cache::clock::Clock;
use reqwest::Method;
use serde_json::json;

mod support;

use support::*;

async fn send(
    ts: &TestSidecar,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> u16 {
    let mut request = ts.http.request(method, ts.url(path));
    if let Some(b) = body {
        request = request.json(&b);
    }
    request
        .send()
        .await
        .expect("the proxy answers")
        .status()
        .as_u16()
}

#[tokio::test]
async fn an_entity_deleted_through_the_sidecar_is_gone_at_the_next_read() {
    let ts = TestSidecar::builder().start().await;
    let entity = ts.upstream_entities()[4].clone();
    let path = by_name_path(&entity);
    let before = ts.get(&path).await;
    assert_eq!(before.status, 200);
    assert_eq!(before.cache_status(), "catalog-cache; hit");

    let status = send(
        &ts,
        Method::DELETE,
        &format!("/entities/by-uid/{}", uid(&entity)),
        None,
    )
    .await;
    assert_eq!(status, 204);

    // By name, by uid and in by-refs: not served as a fresh hit.
    let after = ts.get(&path).await;
    assert_eq!(
        after.status,
        404,
        "{}",
        String::from_utf8_lossy(&after.body)
    );
    assert_eq!(after.stale(), "false");
    assert!(
        after.cache_status().contains("fwd="),
        "{}",
        after.cache_status()
    );
    let by_uid = ts.get(&format!("/entities/by-uid/{}", uid(&entity))).await;
    assert_eq!(by_uid.status, 404);
    let refs = ts
        .post(
            "/entities/by-refs",
            &json!({"entityRefs": [canonical_ref(&entity)]}),
        )
        .await;
    assert_eq!(refs.json()["items"], json!([null]), "{}", refs.json());
    // A query, until the next sync, asks the upstream too.
    let name = entity_ref(&entity).2;
    let query = ts
        .get(&format!("/entities/by-query?filter=metadata.name={name}"))
        .await;
    assert_eq!(query.json()["items"], json!([]), "{}", query.json());

    // The sync the write brought forward removes it from the mirror.
    let sidecar = ts.sidecar.clone();
    let gone_uid = uid(&entity);
    eventually("the next sync to drop the entity", WAIT, || {
        let s = sidecar.clone();
        let u = gone_uid.clone();
        async move {
            s.generations
                .current()
                .is_some_and(|g| g.index.by_uid(&u).is_none())
        }
    })
    .await;
    let query = ts
        .get(&format!("/entities/by-query?filter=metadata.name={name}"))
        .await;
    assert_eq!(query.cache_status(), "catalog-cache; hit");
    assert_eq!(query.json()["items"], json!([]));
}

#[tokio::test]
async fn a_refresh_through_the_sidecar_makes_that_entity_revalidate() {
    let ts = TestSidecar::builder().start().await;
    let entity = ts.upstream_entities()[6].clone();
    let path = by_name_path(&entity);
    assert_eq!(ts.get(&path).await.cache_status(), "catalog-cache; hit");
    // The catalog changes the entity; a refresh is what a user would send.
    ts.fake.update_entity(&uid(&entity), |e| {
        e["metadata"]["description"] = json!("refreshed");
    });
    let status = send(
        &ts,
        Method::POST,
        "/refresh",
        Some(json!({"entityRef": canonical_ref(&entity)})),
    )
    .await;
    assert_eq!(status, 200);
    let after = ts.get(&path).await;
    assert_eq!(after.json()["metadata"]["description"], json!("refreshed"));
    assert!(
        after.cache_status().contains("fwd=stale"),
        "{}",
        after.cache_status()
    );
    // Once confirmed, it is a hit again.
    assert_eq!(ts.get(&path).await.cache_status(), "catalog-cache; hit");
    // A different entity was never named: still a hit.
    let other = by_name_path(&ts.upstream_entities()[7]);
    assert_eq!(ts.get(&other).await.cache_status(), "catalog-cache; hit");
}

#[tokio::test]
async fn a_written_entity_the_upstream_cannot_confirm_is_served_stale_not_fresh() {
    let ts = TestSidecar::builder()
        .with(|b| b.budget = Duration::from_millis(300))
        .start()
        .await;
    let entity = ts.upstream_entities()[8].clone();
    let path = by_name_path(&entity);
    let status = send(
        &ts,
        Method::POST,
        "/refresh",
        Some(json!({"entityRef": canonical_ref(&entity)})),
    )
    .await;
    assert_eq!(status, 200);
    ts.faults(catalog_fake::Faults {
        refuse: true,
        ..Default::default()
    })
    .await;
    let after = ts.get(&path).await;
    assert_eq!(after.status, 200);
    assert_eq!(after.stale(), "true", "{}", after.cache_status());
}

#[tokio::test]
async fn a_write_through_a_leaf_reaches_the_leaf_s_reads_through_its_tier() {
    let a = TestSidecar::builder()
        .configure(|c| c.listen.name = "tier-a".into())
        .start()
        .await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut config = a.builder_used().config(&a.url(""), dir.path());
    config.listen.name = "tier-b".into();
    let b = a.sibling(dir, config, Clock::system()).await;
    b.wait_for_first_sync().await;
    let entity = a.upstream_entities()[10].clone();
    let path = by_name_path(&entity);
    assert_eq!(b.get(&path).await.status, 200);
    let status = send(
        &b,
        Method::DELETE,
        &format!("/entities/by-uid/{}", uid(&entity)),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let at_b = b.get(&path).await;
    assert_eq!(at_b.status, 404, "{}", at_b.cache_status());
    let at_a = a.get(&path).await;
    assert_eq!(at_a.status, 404, "{}", at_a.cache_status());
}
