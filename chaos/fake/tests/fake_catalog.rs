//! The demo catalog over real HTTP on loopback: Backstage's semantics as
//! documented (golden cases on hand-written entities), paging, errors, auth,
//! the control API and every fault.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use catalog_fake::{FakeCatalog, FakeCatalogHandle, FakeOptions, Faults, SlowBody};
use serde_json::{json, Value};

async fn start(entities: usize) -> FakeCatalogHandle {
    FakeCatalog::start(FakeOptions {
        control: Some("127.0.0.1:0".parse().unwrap()),
        entities,
        ..FakeOptions::default()
    })
    .await
    .expect("demo catalog starts")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn entity(kind: &str, name: &str, uid: &str, extra: Value) -> Value {
    let mut e = json!({
        "apiVersion": "backstage.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "default", "uid": uid},
        "spec": {},
        "relations": []
    });
    merge(&mut e, extra);
    e
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// A small catalog whose answers can be written down by hand.
fn golden() -> Vec<Value> {
    vec![
        entity(
            "Component",
            "Checkout-Service",
            "u-01",
            json!({
                "metadata": {"tags": ["java", "grpc"]},
                "spec": {"type": "service", "lifecycle": "production", "owner": "team-a",
                         "dependsOn": ["resource:default/orders-db"]},
                "relations": [
                    {"type": "ownedBy", "targetRef": "group:default/team-a"},
                    {"type": "dependsOn", "targetRef": "resource:default/orders-db"}
                ]
            }),
        ),
        entity(
            "Component",
            "search-web",
            "u-02",
            json!({
                "metadata": {"tags": ["typescript"]},
                "spec": {"type": "website", "owner": "team-b"},
                "relations": [{"type": "ownedBy", "targetRef": "group:default/team-b"}]
            }),
        ),
        entity(
            "API",
            "checkout-api",
            "u-03",
            json!({"spec": {"type": "openapi", "lifecycle": "experimental", "owner": "team-a"},
                   "relations": [{"type": "ownedBy", "targetRef": "group:default/team-a"}]}),
        ),
        entity(
            "Resource",
            "orders-db",
            "u-04",
            json!({"spec": {"type": "database", "lifecycle": "production"},
                   "relations": [{"type": "dependencyOf", "targetRef": "component:default/checkout-service"}]}),
        ),
        entity("Group", "TEAM-A", "u-05", json!({"spec": {"type": "team"}})),
        entity("Group", "team-b", "u-06", json!({"spec": {"type": "team"}})),
    ]
}

async fn golden_catalog() -> FakeCatalogHandle {
    let h = start(0).await;
    h.replace_all(golden());
    h
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

async fn get_json(url: String) -> (u16, Value) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test]
async fn filters_or_and_arrays_relations_and_case() {
    let h = golden_catalog().await;
    let b = h.base_url();
    let q = |f: &str| format!("{b}/entities?{f}");
    // Without `order`, Backstage lists by the lower-cased entity ref
    // (`DefaultEntitiesCatalog.entities`: `orderBy('final_entities.entity_ref')`).
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "filter=kind=component",
            vec!["Checkout-Service", "search-web"],
        ),
        (
            "filter=KIND=Component,spec.type=SERVICE",
            vec!["Checkout-Service"],
        ),
        (
            "filter=kind=api&filter=spec.type=website",
            vec!["checkout-api", "search-web"],
        ),
        (
            "filter=kind=api,kind=resource",
            vec!["checkout-api", "orders-db"],
        ),
        (
            "filter=spec.lifecycle",
            vec!["checkout-api", "Checkout-Service", "orders-db"],
        ),
        ("filter=metadata.tags=java", vec!["Checkout-Service"]),
        ("filter=metadata.tags.typescript", vec!["search-web"]),
        (
            "filter=spec.dependsOn=resource:default/orders-db",
            vec!["Checkout-Service"],
        ),
        (
            "filter=relations.ownedBy=group:default/team-a",
            vec!["checkout-api", "Checkout-Service"],
        ),
        (
            "filter=relations.dependencyof=COMPONENT:default/checkout-service",
            vec!["orders-db"],
        ),
        ("filter=metadata.name=team-a", vec!["TEAM-A"]),
        ("filter=kind=group,spec.type=nope", vec![]),
    ];
    for (query, expected) in cases {
        let (status, body) = get_json(q(query)).await;
        assert_eq!(status, 200, "{query}");
        assert_eq!(names(&body), expected, "{query}");
    }
    // fields keeps only the named subtrees.
    let (_, body) = get_json(q("filter=kind=api&fields=metadata.name,kind")).await;
    assert_eq!(
        body,
        json!([{"metadata": {"name": "checkout-api"}, "kind": "API"}])
    );
}

#[tokio::test]
async fn by_query_orders_with_missing_field_last_in_both_directions() {
    let h = golden_catalog().await;
    let b = h.base_url();
    for (dir, expected) in [
        ("asc", vec!["checkout-api", "Checkout-Service", "orders-db"]),
        // Ties break by uid in the same direction.
        (
            "desc",
            vec!["orders-db", "Checkout-Service", "checkout-api"],
        ),
    ] {
        let (_, body) = get_json(format!(
            "{b}/entities/by-query?orderField=spec.lifecycle,{dir}&orderField=metadata.name,asc"
        ))
        .await;
        let got = names(&body["items"]);
        // Three with a lifecycle, then the three without.
        assert_eq!(&got[..3], &expected[..], "{dir}: {got:?}");
        assert_eq!(got.len(), 6);
        assert_eq!(body["totalItems"], 6);
    }
    let (_, body) = get_json(format!("{b}/entities/by-query")).await;
    let uids: Vec<&str> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["metadata"]["uid"].as_str().unwrap())
        .collect();
    assert_eq!(
        uids,
        ["u-01", "u-02", "u-03", "u-04", "u-05", "u-06"],
        "default order is by uid"
    );
    // Full text over the sort field, case-insensitive.
    let (_, body) = get_json(format!(
        "{b}/entities/by-query?orderField=metadata.name,asc&fullTextFilterTerm=CHECKOUT"
    ))
    .await;
    assert_eq!(names(&body["items"]), ["checkout-api", "Checkout-Service"]);
    let (_, body) = get_json(format!(
        "{b}/entities/by-query?fullTextFilterTerm=team&fullTextFilterFields=spec.owner"
    ))
    .await;
    assert_eq!(body["totalItems"], 3);
}

#[tokio::test]
async fn facets_keep_original_case_sorted_with_counts() {
    let h = golden_catalog().await;
    let (status, body) = get_json(format!(
        "{}/entity-facets?facet=kind&facet=metadata.name&filter=kind=group",
        h.base_url()
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"facets": {
            "kind": [{"value": "Group", "count": 2}],
            "metadata.name": [{"value": "TEAM-A", "count": 1}, {"value": "team-b", "count": 1}]
        }})
    );
    let (_, all) = get_json(format!("{}/entity-facets?facet=kind", h.base_url())).await;
    assert_eq!(
        all["facets"]["kind"],
        json!([{"value": "API", "count": 1}, {"value": "Component", "count": 2},
               {"value": "Group", "count": 2}, {"value": "Resource", "count": 1}])
    );
    let r = client()
        .post(format!("{}/entity-facets", h.base_url()))
        .json(&json!({"facets": ["spec.type"], "query": {"kind": "component"}}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["facets"]["spec.type"],
        json!([{"value": "service", "count": 1}, {"value": "website", "count": 1}])
    );
}

#[tokio::test]
async fn by_name_is_case_insensitive_and_misses_are_backstage_404s() {
    let h = golden_catalog().await;
    let b = h.base_url();
    let (status, body) = get_json(format!(
        "{b}/entities/by-name/COMPONENT/Default/checkout-SERVICE"
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["metadata"]["name"], "Checkout-Service");
    let (status, body) = get_json(format!("{b}/entities/by-name/component/default/x")).await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({
            "error": {"name": "NotFoundError",
                      "message": "No entity named 'x' found, with kind 'component' in namespace 'default'"},
            "request": {"method": "GET", "url": "/entities/by-name/component/default/x"},
            "response": {"statusCode": 404}
        })
    );
    let (status, body) = get_json(format!("{b}/entities/by-uid/u-03")).await;
    assert_eq!(
        (status, body["metadata"]["name"].clone()),
        (200, json!("checkout-api"))
    );
    let (status, _) = get_json(format!("{b}/entities/by-uid/nope")).await;
    assert_eq!(status, 404);
    let (status, body) = get_json(format!(
        "{b}/entities/by-name/group/default/team-a/ancestry"
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["rootEntityRef"], "group:default/team-a");
    assert_eq!(body["items"][0]["entity"]["metadata"]["uid"], "u-05");

    let r = client()
        .delete(format!("{b}/entities/by-uid/u-03"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (status, _) = get_json(format!("{b}/entities/by-uid/u-03")).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn by_refs_keeps_order_and_is_case_sensitive() {
    let h = golden_catalog().await;
    let r = client()
        .post(format!("{}/entities/by-refs", h.base_url()))
        .json(&json!({
            "entityRefs": ["group:default/team-a", "Group:default/TEAM-A", "component:default/nope",
                           "component:default/checkout-service"],
            "fields": ["metadata.name"]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"items": [{"metadata": {"name": "TEAM-A"}}, null, null, {"metadata": {"name": "Checkout-Service"}}]})
    );
    // A filter turns non-matching entities into null too.
    let r = client()
        .post(format!(
            "{}/entities/by-refs?filter=kind=group",
            h.base_url()
        ))
        .json(&json!({"entityRefs": ["group:default/team-b", "component:default/search-web"]}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["items"][0]["metadata"]["name"], "team-b");
    assert!(v["items"][1].is_null());
}

#[tokio::test]
async fn get_entities_link_paging_reaches_the_end() {
    let h = start(53).await;
    let b = h.base_url();
    let origin = format!("http://{}/api/catalog", h.addr());
    let mut url = format!("{b}/entities?limit=10&filter=kind=component,kind=api,kind=user,kind=group,kind=system,kind=resource,kind=domain");
    let mut seen = HashSet::new();
    let mut pages = 0;
    loop {
        let r = client().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let link = r
            .headers()
            .get("link")
            .map(|l| l.to_str().unwrap().to_string());
        let body: Value = r.json().await.unwrap();
        for e in body.as_array().unwrap() {
            assert!(
                seen.insert(e["metadata"]["uid"].as_str().unwrap().to_string()),
                "repeat"
            );
        }
        pages += 1;
        let Some(link) = link else { break };
        assert!(
            link.starts_with("</entities?"),
            "relative to the mount: {link}"
        );
        assert!(link.ends_with(">; rel=\"next\""));
        let target = &link[1..link.find('>').unwrap()];
        assert!(!target.contains("offset="));
        let after = target
            .split("after=")
            .nth(1)
            .unwrap()
            .replace("%3D", "=")
            .replace("%2B", "+")
            .replace("%2F", "/");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(after)
            .unwrap();
        let cursor: Value = serde_json::from_slice(&decoded).unwrap();
        assert_eq!(cursor["limit"], 10);
        url = format!("{origin}{target}");
    }
    assert_eq!(seen.len(), 53);
    assert_eq!(pages, 6);
    // The limit inside `after` wins over `limit`.
    let after = base64::engine::general_purpose::STANDARD.encode(r#"{"limit":3,"offset":50}"#);
    let (_, body) = get_json(format!("{b}/entities?limit=20&after={after}")).await;
    assert_eq!(body.as_array().unwrap().len(), 3);
    // Without a limit: a bare array of everything.
    let (_, body) = get_json(format!("{b}/entities")).await;
    assert_eq!(body.as_array().unwrap().len(), 53);
}

async fn walk_by_query(
    h: &FakeCatalogHandle,
    first: reqwest::RequestBuilder,
    limit: usize,
) -> (Vec<String>, Vec<Value>) {
    let mut seen = Vec::new();
    let mut cursors = Vec::new();
    let mut resp: Value = first.send().await.unwrap().json().await.unwrap();
    let total = resp["totalItems"].clone();
    let mut page = 1;
    loop {
        assert_eq!(
            resp["totalItems"], total,
            "later pages repeat page 1's total"
        );
        assert_eq!(resp["pageInfo"].get("prevCursor").is_some(), page > 1);
        for e in resp["items"].as_array().unwrap() {
            assert_eq!(
                e.as_object().unwrap().len(),
                1,
                "fields resent with the cursor apply"
            );
            seen.push(e["metadata"]["uid"].as_str().unwrap().to_string());
        }
        let Some(next) = resp["pageInfo"]["nextCursor"].as_str().map(str::to_string) else {
            break;
        };
        let decoded: Value = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(&next)
                .unwrap(),
        )
        .unwrap();
        assert!(decoded.get("fields").is_none() && decoded.get("limit").is_none());
        assert_eq!(decoded["totalItems"], total);
        let post = decoded.get("query").is_some();
        cursors.push(decoded);
        let req = if post {
            client()
                .post(format!("{}/entities/by-query", h.base_url()))
                .json(&json!({"cursor": next, "limit": limit, "fields": ["metadata.uid"]}))
        } else {
            client().get(format!(
                "{}/entities/by-query?cursor={}&limit={limit}&fields=metadata.uid",
                h.base_url(),
                next.replace('+', "%2B")
                    .replace('/', "%2F")
                    .replace('=', "%3D")
            ))
        };
        resp = req.send().await.unwrap().json().await.unwrap();
        page += 1;
    }
    (seen, cursors)
}

#[tokio::test]
async fn by_query_cursor_paging_get_and_post_end_without_repeats() {
    let h = start(230).await;
    let b = h.base_url();
    let first = client().get(format!(
        "{b}/entities/by-query?limit=17&fields=metadata.uid&orderField=metadata.name,desc&filter=kind=component"
    ));
    let (seen, cursors) = walk_by_query(&h, first, 17).await;
    let expected = h
        .entities()
        .iter()
        .filter(|e| e["kind"] == "Component")
        .count();
    assert_eq!(seen.len(), expected);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), expected);
    assert!(cursors[0].get("filter").is_some() && cursors[0].get("query").is_none());
    assert_eq!(
        cursors[0]["orderFields"],
        json!([{"field": "metadata.name", "order": "desc"}])
    );

    let first = client()
        .post(format!("{b}/entities/by-query"))
        .json(&json!({
            "query": {"$any": [{"kind": "api"}, {"kind": "user"}]},
            "limit": 9,
            "fields": ["metadata.uid"]
        }));
    let (seen, cursors) = walk_by_query(&h, first, 9).await;
    let expected = h
        .entities()
        .iter()
        .filter(|e| e["kind"] == "API" || e["kind"] == "User")
        .count();
    assert_eq!(seen.len(), expected);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), expected);
    assert_eq!(
        cursors[0]["query"],
        json!({"$any": [{"kind": "api"}, {"kind": "user"}]})
    );
    assert_eq!(cursors[0]["isPrevious"], false);
    assert!(cursors[0]["orderFieldValues"].as_array().unwrap().len() == 2);

    // Unfiltered default order walks the whole catalog.
    let first = client().get(format!(
        "{b}/entities/by-query?limit=50&fields=metadata.uid"
    ));
    let (seen, cursors) = walk_by_query(&h, first, 50).await;
    assert_eq!(seen.len(), 230);
    assert_eq!(
        cursors[0]["orderFields"],
        json!([{"field": "metadata.uid", "order": "asc"}])
    );
    assert!(cursors[0].get("filter").is_none() && cursors[0].get("query").is_none());
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "default order is by uid");
}

#[tokio::test]
async fn by_query_limit_zero_and_default_limit() {
    let h = start(450).await;
    let (_, body) = get_json(format!("{}/entities/by-query?limit=0", h.base_url())).await;
    assert_eq!(
        body,
        json!({"items": [], "totalItems": 450, "pageInfo": {}})
    );
    let (_, body) = get_json(format!("{}/entities/by-query", h.base_url())).await;
    assert_eq!(body["items"].as_array().unwrap().len(), 200);
    assert!(body["pageInfo"]["nextCursor"].is_string());
}

#[tokio::test]
async fn bad_input_gets_backstage_input_errors() {
    let h = golden_catalog().await;
    let b = h.base_url();
    let cases = [
        (format!("{b}/entities?filter=%3Dfoo"),
         "Invalid filter, '=foo' is not a valid statement (expected a string on the form a=b or a= or a)"),
        (format!("{b}/entities/by-query?limit=ten"), "request/query/limit must be integer"),
        (format!("{b}/entities/by-query?orderField=metadata.name,up"), "Invalid order field order, must be asc or desc"),
    ];
    for (url, message) in cases {
        let (status, body) = get_json(url.clone()).await;
        assert_eq!(status, 400, "{url}");
        assert_eq!(body["error"]["name"], "InputError");
        assert_eq!(body["error"]["message"], message);
        assert_eq!(body["response"]["statusCode"], 400);
        assert!(body["request"]["url"]
            .as_str()
            .unwrap()
            .starts_with("/entities"));
    }
    let (status, body) = get_json(format!("{b}/entities/by-query?cursor=bm9wZQ%3D%3D")).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Malformed cursor: "));
    let r = client()
        .post(format!("{b}/entities/by-query"))
        .json(&json!({"query": {"kind": {"$regex": "x"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn responses_are_json_without_cache_headers() {
    let h = golden_catalog().await;
    for path in [
        "/entities",
        "/entities/by-query",
        "/entities/by-name/api/default/checkout-api",
        "/entities/by-name/api/default/nope",
    ] {
        let r = client()
            .get(format!("{}{path}", h.base_url()))
            .send()
            .await
            .unwrap();
        let headers = r.headers();
        assert!(headers.get("cache-control").is_none(), "{path}");
        assert!(headers.get("last-modified").is_none(), "{path}");
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn token_is_required_when_configured() {
    let h = FakeCatalog::start(FakeOptions {
        entities: 10,
        token: Some("s3cret".into()),
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let url = format!("{}/entities", h.base_url());
    let (status, body) = get_json(url.clone()).await;
    assert_eq!(
        (status, body["error"]["message"].clone()),
        (401, json!("Missing credentials"))
    );
    assert_eq!(body["error"]["name"], "AuthenticationError");
    let r = client()
        .get(&url)
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["message"], "Illegal token");
    let r = client()
        .get(&url)
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn stats_count_requests_by_route() {
    let h = golden_catalog().await;
    let b = h.base_url();
    get_json(format!("{b}/entities/by-name/api/default/checkout-api")).await;
    get_json(format!("{b}/entities/by-name/api/default/missing")).await;
    get_json(format!("{b}/entities/by-uid/u-01")).await;
    get_json(format!("{b}/entities/by-query")).await;
    get_json(format!("{b}/entities")).await;
    get_json(format!("{b}/entity-facets?facet=kind")).await;
    get_json(format!("{b}/locations")).await;
    client()
        .post(format!("{b}/entities/by-refs"))
        .json(&json!({"entityRefs": []}))
        .send()
        .await
        .unwrap();
    let s = h.stats();
    assert_eq!(
        (s.by_name, s.by_uid, s.by_query, s.entities, s.facets, s.other, s.by_refs),
        (2, 1, 1, 1, 1, 1, 1)
    );
    assert_eq!(s.total, 8);
    // Also over the control API, and reset.
    let control = format!("http://{}", h.control_addr().unwrap());
    let (_, v) = get_json(format!("{control}/stats")).await;
    assert_eq!(v["total"], 8);
    client()
        .post(format!("{control}/stats/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(h.stats().total, 0);
}

#[tokio::test]
async fn mutations_change_etags() {
    let h = start(40).await;
    let e = h.entities()[0].clone();
    let uid = e["metadata"]["uid"].as_str().unwrap().to_string();
    let before = e["metadata"]["etag"].as_str().unwrap().to_string();
    let url = format!("{}/entities/by-uid/{uid}", h.base_url());
    let new = h
        .update_entity(&uid, |e| e["metadata"]["description"] = json!("changed"))
        .unwrap();
    assert_ne!(new, before);
    let (_, served) = get_json(url.clone()).await;
    assert_eq!(served["metadata"]["etag"], new.as_str());
    assert_eq!(served["metadata"]["description"], "changed");
    // Touch over the control API: new etag, same content otherwise.
    let control = format!("http://{}", h.control_addr().unwrap());
    let r = client()
        .post(format!("{control}/entities/{uid}/touch"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, touched) = get_json(url).await;
    assert_ne!(touched["metadata"]["etag"], served["metadata"]["etag"]);
    assert_eq!(touched["metadata"]["description"], "changed");
    let r = client()
        .post(format!("{control}/mutate"))
        .json(&json!({"count": 3}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["changed"].as_array().unwrap().len(), 3);

    assert_eq!(h.remove_entities(|e| e["kind"] == "User"), 8);
    assert_eq!(h.entities().len(), 32);
    h.add_entities(vec![entity("Component", "brand-new", "u-new", json!({}))]);
    let (status, _) = get_json(format!(
        "{}/entities/by-name/component/default/brand-new",
        h.base_url()
    ))
    .await;
    assert_eq!(status, 200);
}

// ---- faults ----

async fn put_faults(h: &FakeCatalogHandle, faults: Value) {
    let r = client()
        .put(format!("http://{}/faults", h.control_addr().unwrap()))
        .json(&faults)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{faults}");
}

#[tokio::test]
async fn black_hole_times_out_and_control_still_answers() {
    let h = start(20).await;
    put_faults(&h, json!({"black_hole": true})).await;
    let short = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = short
        .get(format!("{}/entities", h.base_url()))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let (status, v) = get_json(format!("http://{}/faults", h.control_addr().unwrap())).await;
    assert_eq!((status, v["black_hole"].clone()), (200, json!(true)));
    client()
        .delete(format!("http://{}/faults", h.control_addr().unwrap()))
        .send()
        .await
        .unwrap();
    let (status, _) = get_json(format!("{}/entities", h.base_url())).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn refuse_closes_the_port_and_clear_reopens_it() {
    let h = start(20).await;
    let url = format!("{}/entities/by-query?limit=1", h.base_url());
    let pooled = client();
    assert_eq!(pooled.get(&url).send().await.unwrap().status(), 200);
    h.apply_faults(Faults {
        refuse: true,
        ..Faults::default()
    })
    .await;
    let err = reqwest::Client::new().get(&url).send().await.unwrap_err();
    assert!(err.is_connect(), "connections must be refused: {err}");
    // A pooled keep-alive connection does not survive either.
    assert!(pooled.get(&url).send().await.is_err());
    // Clearing over the control API answers once the port is open again.
    let r = client()
        .delete(format!("http://{}/faults", h.control_addr().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let ok = reqwest::Client::new()
        .get(&url)
        .send()
        .await
        .unwrap()
        .status()
        == 200;
    assert!(ok, "same port serves again after clear");
}

#[tokio::test]
async fn fail_page_fails_only_that_page() {
    let h = start(100).await;
    let b = h.base_url();
    h.set_faults(Faults {
        fail_page: Some(3),
        ..Faults::default()
    });
    let mut url = format!("{b}/entities/by-query?limit=10&fields=metadata.uid");
    let mut statuses = Vec::new();
    let mut cursor_before_failure = None;
    for _ in 0..4 {
        let r = client().get(&url).send().await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() != 200 {
            break;
        }
        let v: Value = r.json().await.unwrap();
        let next = v["pageInfo"]["nextCursor"].as_str().unwrap().to_string();
        cursor_before_failure = Some(next.clone());
        url = format!(
            "{b}/entities/by-query?limit=10&cursor={}",
            next.replace('+', "%2B")
                .replace('/', "%2F")
                .replace('=', "%3D")
        );
    }
    assert_eq!(statuses, [200, 200, 500]);
    // The same page succeeds once the fault is cleared.
    h.faults().clear();
    assert!(cursor_before_failure.is_some());
    assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
    // GET /entities counts pages by offset.
    h.set_faults(Faults {
        fail_page: Some(2),
        ..Faults::default()
    });
    assert_eq!(
        client()
            .get(format!("{b}/entities?limit=10"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client()
            .get(format!("{b}/entities?limit=10&offset=10"))
            .send()
            .await
            .unwrap()
            .status(),
        500
    );
}

#[tokio::test]
async fn empty_catalog_serves_nothing() {
    let h = start(30).await;
    let some = h.entities()[0]["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    put_faults(&h, json!({"empty_catalog": true})).await;
    let (_, body) = get_json(format!("{}/entities/by-query", h.base_url())).await;
    assert_eq!(body["totalItems"], 0);
    assert_eq!(body["items"], json!([]));
    let (status, _) = get_json(format!("{}/entities/by-uid/{some}", h.base_url())).await;
    assert_eq!(status, 404);
    assert_eq!(h.entities().len(), 30, "the data itself is kept");
}

#[tokio::test]
async fn error_rate_one_always_fails_with_5xx_and_zero_never() {
    let h = start(10).await;
    h.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let mut seen = HashSet::new();
    for _ in 0..30 {
        let r = client()
            .get(format!("{}/entities", h.base_url()))
            .send()
            .await
            .unwrap();
        seen.insert(r.status().as_u16());
    }
    assert!(
        seen.is_subset(&HashSet::from([500, 503])) && !seen.is_empty(),
        "{seen:?}"
    );
    h.set_faults(Faults {
        error_rate: 0.0,
        ..Faults::default()
    });
    assert_eq!(
        client()
            .get(format!("{}/entities", h.base_url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn too_many_requests_sends_retry_after() {
    let h = start(10).await;
    put_faults(&h, json!({"too_many_requests": 7})).await;
    let r = client()
        .get(format!("{}/entities", h.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
}

#[tokio::test]
async fn malformed_truncated_and_wrong_content_type_bodies() {
    let h = start(50).await;
    let url = format!("{}/entities/by-query", h.base_url());

    h.set_faults(Faults {
        malformed: true,
        ..Faults::default()
    });
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.bytes().await.unwrap();
    assert!(serde_json::from_slice::<Value>(&text).is_err());

    h.set_faults(Faults {
        truncated: true,
        ..Faults::default()
    });
    let r = client().get(&url).send().await.unwrap();
    let announced: usize = r.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(announced > 1000);
    assert!(r.bytes().await.is_err(), "the body must end early");

    h.set_faults(Faults {
        wrong_content_type: true,
        ..Faults::default()
    });
    let r = client().get(&url).send().await.unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(r.text().await.unwrap().contains("<html>"));
}

#[tokio::test]
async fn latency_and_slow_body_delay_answers() {
    let h = start(5).await;
    let url = format!("{}/entities/by-name/group/default/team-0001", h.base_url());
    h.set_faults(Faults {
        latency: Some(150),
        ..Faults::default()
    });
    let t = std::time::Instant::now();
    assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(150));

    h.set_faults(Faults {
        slow_body: Some(SlowBody {
            bytes: 100,
            interval_ms: 20,
        }),
        ..Faults::default()
    });
    let mut r = client().get(&url).send().await.unwrap();
    let mut chunks = 0;
    let mut body = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        chunks += 1;
        body.extend_from_slice(&c);
    }
    assert!(chunks > 2, "trickled in {chunks} chunks");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["metadata"]["name"], "team-0001");
}

#[tokio::test]
async fn slow_body_holds_a_bodyless_304_as_long_as_its_headers_take() {
    let h = start(5).await;
    let url = format!(
        "{}/entities/by-query?limit=2&fields=metadata.uid",
        h.base_url()
    );
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let again = || client().get(&url).header("if-none-match", etag.as_str());
    let t = std::time::Instant::now();
    assert_eq!(again().send().await.unwrap().status(), 304);
    let quick = t.elapsed();

    h.set_faults(Faults {
        slow_body: Some(SlowBody {
            bytes: 16,
            interval_ms: 20,
        }),
        ..Faults::default()
    });
    let t = std::time::Instant::now();
    assert_eq!(again().send().await.unwrap().status(), 304);
    // At least the ETag header and the status line, 16 bytes every 20 ms.
    let held = t.elapsed();
    assert!(
        held >= Duration::from_millis(20 * (etag.len() as u64 + 17) / 16),
        "a 304 came through a slow link in {held:?} (unfaulted {quick:?})"
    );
}

#[tokio::test]
async fn body_breaking_faults_refuse_the_304_shortcut() {
    let h = start(5).await;
    let url = format!(
        "{}/entities/by-query?limit=2&fields=metadata.uid",
        h.base_url()
    );
    let r = client().get(&url).send().await.unwrap();
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let again = || client().get(&url).header("if-none-match", etag.as_str());
    assert_eq!(again().send().await.unwrap().status(), 304);

    h.set_faults(Faults {
        malformed: true,
        ..Faults::default()
    });
    let r = again().send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "a 304 would slip through a malformed fault"
    );
    assert!(serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).is_err());

    h.set_faults(Faults {
        truncated: true,
        ..Faults::default()
    });
    let r = again().send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "a 304 would slip through a truncated fault"
    );
    assert!(r.bytes().await.is_err(), "the body must end early");
}

#[tokio::test]
async fn flap_alternates_between_refused_and_serving() {
    let h = start(5).await;
    put_faults(&h, json!({"flap": 60})).await;
    let url = format!("{}/entities/by-query?limit=1", h.base_url());
    let (mut up, mut down) = (false, false);
    for _ in 0..200 {
        match reqwest::Client::new()
            .get(&url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => up = true,
            Err(e) if e.is_connect() => down = true,
            _ => {}
        }
        if up && down {
            break;
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    assert!(up && down, "up={up} down={down}");
}

#[tokio::test]
async fn control_rejects_bad_fault_sets() {
    let h = start(5).await;
    let r = client()
        .put(format!("http://{}/faults", h.control_addr().unwrap()))
        .body(r#"{"refuse_everything": true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(h.faults().get().is_healthy());
}

#[tokio::test]
async fn shutdown_closes_the_port() {
    let h = start(5).await;
    let url = format!("{}/entities", h.base_url());
    assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
    h.shutdown().await;
    let err = reqwest::Client::new().get(&url).send().await.unwrap_err();
    assert!(err.is_connect(), "{err}");
}

/// Not a timed assertion: prints how long paging 100,000 entities takes.
#[tokio::test]
#[ignore]
async fn measure_paging_100k() {
    let t = std::time::Instant::now();
    let h = start(100_000).await;
    println!("generate+start: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let first = client().get(format!(
        "{}/entities/by-query?limit=500&fields=metadata.uid",
        h.base_url()
    ));
    let (seen, _) = walk_by_query(&h, first, 500).await;
    println!(
        "paged {} (fields=metadata.uid) in {:?}",
        seen.len(),
        t.elapsed()
    );
    let t = std::time::Instant::now();
    let mut url = format!("{}/entities/by-query?limit=500", h.base_url());
    let mut n = 0;
    loop {
        let v: Value = client()
            .get(&url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        n += v["items"].as_array().unwrap().len();
        match v["pageInfo"]["nextCursor"].as_str() {
            Some(c) => {
                url = format!(
                    "{}/entities/by-query?limit=500&cursor={}",
                    h.base_url(),
                    c.replace('+', "%2B")
                        .replace('/', "%2F")
                        .replace('=', "%3D")
                )
            }
            None => break,
        }
    }
    println!("paged {n} full entities in {:?}", t.elapsed());
}

/// Sends `METHOD PATH` as raw bytes (no client normalises the path) and
/// returns the status line.
async fn raw_request(h: &FakeCatalogHandle, method: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn requests_outside_the_catalog_routes_are_recorded_as_received() {
    let h = start(10).await;
    get_json(format!("{}/entities", h.base_url())).await;
    get_json(format!("{}/locations", h.base_url())).await;
    assert_eq!(h.stats().unrouted, 0, "{:?}", h.unrouted_paths());
    for (method, path) in [
        ("GET", "/api/catalog/locations/../../../admin/secret"),
        ("GET", "/api/catalog/locations/%2e%2e/%2e%2e/admin"),
        ("GET", "/api/catalog//entities"),
        ("GET", "/api/catalog/entities/by-uid/a%2Fb"),
        ("GET", "/admin/secret"),
        ("GET", "/api/catalog/refresh"),
    ] {
        let status = raw_request(&h, method, path).await;
        assert!(status.starts_with("HTTP/1.1 "), "{method} {path}: {status}");
    }
    let s = h.stats();
    assert_eq!(s.unrouted, 6);
    let kept = h.unrouted_paths();
    assert_eq!(kept[0], "GET /api/catalog/locations/../../../admin/secret");
    assert_eq!(kept[2], "GET /api/catalog//entities");
    assert_eq!(kept.len(), 6);
    // Over the control API too, then reset.
    let control = format!("http://{}", h.control_addr().unwrap());
    let (_, v) = get_json(format!("{control}/stats")).await;
    assert_eq!(v["unrouted"], 6);
    assert_eq!(
        v["unrouted_paths"][1],
        "GET /api/catalog/locations/%2e%2e/%2e%2e/admin"
    );
    assert!(v["peak_in_flight"].as_u64().unwrap() >= 1);
    client()
        .post(format!("{control}/stats/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(h.stats().unrouted, 0);
    assert!(h.unrouted_paths().is_empty());
    // Only the first ones are kept word for word; all are counted.
    for n in 0..catalog_fake::routes::UNROUTED_KEPT + 5 {
        raw_request(&h, "GET", &format!("/nowhere/{n}")).await;
    }
    assert_eq!(
        h.stats().unrouted,
        catalog_fake::routes::UNROUTED_KEPT as u64 + 5
    );
    assert_eq!(
        h.unrouted_paths().len(),
        catalog_fake::routes::UNROUTED_KEPT
    );
}

#[tokio::test]
async fn peak_in_flight_counts_requests_answered_at_once() {
    let h = start(10).await;
    put_faults(&h, json!({"latency": 300})).await;
    let url = format!("{}/entities", h.base_url());
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { client().get(url).send().await.unwrap().status() })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    assert_eq!(h.stats().peak_in_flight, 5);
}

#[tokio::test]
async fn wrong_content_type_can_be_scoped_to_paths() {
    let h = start(10).await;
    put_faults(&h, json!({"wrong_content_type_paths": ["/locations/"]})).await;
    let r = client()
        .get(format!(
            "{}/locations/9d4a6c51-7b0e-4b8a-9a43-5c0c2b1e7f10",
            h.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/html"), "{ct}");
    let (status, v) = get_json(format!("{}/locations", h.base_url())).await;
    assert_eq!(status, 200);
    assert!(v.is_array());
    let (status, v) = get_json(format!("{}/entities?limit=1", h.base_url())).await;
    assert_eq!(status, 200);
    assert!(v.is_array());
}

#[tokio::test]
async fn entities_can_be_added_over_the_control_api() {
    let h = start(10).await;
    let control = format!("http://{}", h.control_addr().unwrap());
    let added = json!([{
        "apiVersion": "backstage.io/v1alpha1",
        "kind": "Component",
        "metadata": {"name": "added-one"},
        "spec": {"type": "service", "o00001": "x"}
    }]);
    let r = client()
        .post(format!("{control}/entities"))
        .json(&added)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h.entities().len(), 11);
    let (status, v) = get_json(format!(
        "{}/entities/by-name/component/default/added-one",
        h.base_url()
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["spec"]["o00001"], "x");
    assert!(v["metadata"]["uid"].is_string());
    let r = client()
        .post(format!("{control}/entities"))
        .json(&json!([{"kind": "Component"}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
