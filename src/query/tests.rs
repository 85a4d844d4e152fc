//! Golden cases for every query rule, plus property tests that compare the
//! index with a plain scan over `serde_json::Value` (the oracle).

use super::params::form_encode;
use super::{
    answer, parse_by_refs, render_by_refs, Budget, QueryError, QueryKind, QueryRequest,
    MAX_QUERY_STRING,
};
use crate::entity::Entity;
use crate::index::{Index, IndexLimits};
use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

fn entity(v: Value) -> Arc<Entity> {
    Arc::new(Entity::from_json(Bytes::from(v.to_string())).expect("test entity"))
}

fn component(uid: &str, name: &str, extra: Value) -> Value {
    let mut e = json!({
        "apiVersion": "backstage.io/v1alpha1",
        "kind": "Component",
        "metadata": {"name": name, "namespace": "default", "uid": uid, "etag": format!("e-{uid}")},
        "spec": {}
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

fn catalog() -> Index {
    let es = vec![
        component(
            "u1",
            "Checkout",
            json!({"metadata": {"tags": ["java", "Payments"]}, "spec": {"type": "service", "lifecycle": "production", "owner": "team-a"},
            "relations": [{"type": "ownedBy", "targetRef": "group:default/team-a"}]}),
        ),
        component(
            "u2",
            "cart",
            json!({"metadata": {"tags": ["go"]}, "spec": {"type": "service", "lifecycle": "experimental"},
            "relations": [{"type": "ownedBy", "targetRef": "group:default/TEAM-B"}]}),
        ),
        component("u3", "docs-site", json!({"spec": {"type": "website"}})),
        component(
            "u4",
            "api-gw",
            json!({"kind": "API", "spec": {"type": "openapi", "lifecycle": "production"}}),
        ),
        component(
            "u5",
            "billing",
            json!({"kind": "api", "metadata": {"tags": ["Java"]}, "spec": {"type": "grpc"}}),
        ),
        component(
            "u6",
            "team-a",
            json!({"kind": "Group", "spec": {"type": "team"}}),
        ),
    ];
    Index::build(
        1,
        es.into_iter().map(entity).collect(),
        &IndexLimits::default(),
    )
}

fn run(
    index: &Index,
    kind: QueryKind,
    qs: &str,
    body: &str,
) -> Result<(Value, Option<String>), QueryError> {
    let a = answer(
        index,
        &QueryRequest {
            kind,
            query_string: qs,
            body: body.as_bytes(),
        },
        &Budget::unlimited(),
    )?;
    let bytes = a.body.into_bytes()?;
    Ok((
        serde_json::from_slice(&bytes).expect("answer is JSON"),
        a.link,
    ))
}

fn get_uids(index: &Index, qs: &str) -> Vec<String> {
    let (v, _) = run(index, QueryKind::GetEntities, qs, "").unwrap();
    uids(&v)
}

fn uids(items: &Value) -> Vec<String> {
    items
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["metadata"]["uid"].as_str().unwrap().to_string())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn filters_or_across_params_and_within_a_param() {
    let ix = catalog();
    assert_eq!(
        sorted(get_uids(
            &ix,
            "filter=kind=component,spec.type=service&filter=kind=api"
        )),
        ["u1", "u2", "u4", "u5"]
    );
    assert_eq!(
        sorted(get_uids(&ix, "filter=kind=component,spec.type=website")),
        ["u3"]
    );
    // The same key twice inside one filter means either value.
    assert_eq!(
        sorted(get_uids(&ix, "filter=spec.type=website,spec.type=grpc")),
        ["u3", "u5"]
    );
}

#[test]
fn matching_is_case_insensitive_on_keys_and_values() {
    let ix = catalog();
    assert_eq!(
        sorted(get_uids(
            &ix,
            "filter=KIND=COMPONENT,Metadata.Name=CHECKOUT"
        )),
        ["u1"]
    );
    assert_eq!(sorted(get_uids(&ix, "filter=kind%3DAPI")), ["u4", "u5"]);
}

#[test]
fn arrays_match_by_value_and_by_key_form() {
    let ix = catalog();
    assert_eq!(
        sorted(get_uids(&ix, "filter=metadata.tags=java")),
        ["u1", "u5"]
    );
    assert_eq!(
        sorted(get_uids(&ix, "filter=metadata.tags.java")),
        ["u1", "u5"]
    );
    assert_eq!(
        sorted(get_uids(
            &ix,
            "filter=metadata.tags.java=true,metadata.tags.payments"
        )),
        ["u1"]
    );
}

#[test]
fn relations_match_by_type_and_target_ref() {
    let ix = catalog();
    assert_eq!(
        get_uids(&ix, "filter=relations.ownedBy=group:default/team-b"),
        ["u2"]
    );
    assert_eq!(
        get_uids(&ix, "filter=relations.ownedby=Group:Default/Team-A"),
        ["u1"]
    );
}

#[test]
fn bare_key_tests_existence_and_empty_value_matches_empty_strings() {
    let ix = catalog();
    assert_eq!(
        sorted(get_uids(&ix, "filter=spec.lifecycle")),
        ["u1", "u2", "u4"]
    );
    assert!(get_uids(&ix, "filter=spec.lifecycle=").is_empty());
    assert_eq!(get_uids(&ix, "filter=").len(), 6);
}

#[test]
fn get_entities_orders_by_ref_by_default_and_missing_order_values_sort_last() {
    let ix = catalog();
    // entity_ref order: api:default/api-gw, api:default/billing, component:…
    assert_eq!(get_uids(&ix, ""), ["u4", "u5", "u2", "u1", "u3", "u6"]);
    assert_eq!(
        get_uids(&ix, "order=asc:spec.lifecycle"),
        ["u2", "u1", "u4", "u3", "u5", "u6"]
    );
    assert_eq!(
        get_uids(&ix, "order=desc:spec.lifecycle"),
        ["u1", "u4", "u2", "u3", "u5", "u6"]
    );
    let e = run(&ix, QueryKind::GetEntities, "order=up:name", "").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Invalid order parameter \"up:name\", expected \"<asc or desc>:<field name>\""
    );
}

#[test]
fn get_entities_pages_with_link_and_after_limit_wins() {
    let ix = catalog();
    let (v, link) = run(
        &ix,
        QueryKind::GetEntities,
        "limit=4&offset=0&filter=kind%3Dcomponent",
        "",
    )
    .unwrap();
    assert_eq!(uids(&v), ["u2", "u1", "u3"]);
    assert!(link.is_none(), "3 components fit in one page of 4");

    let (v, link) = run(&ix, QueryKind::GetEntities, "limit=2&offset=1", "").unwrap();
    assert_eq!(uids(&v), ["u5", "u2"]);
    let link = link.expect("more remain");
    let after = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        r#"{"limit":2,"offset":3}"#,
    );
    let mut enc = String::new();
    form_encode(&after, &mut enc);
    assert_eq!(
        link,
        format!("</entities?limit=2&after={enc}>; rel=\"next\"")
    );

    // Follow the link; the limit inside `after` wins over the query's.
    let qs = link
        .trim_start_matches("</entities?")
        .trim_end_matches(">; rel=\"next\"");
    let qs = qs.replace("limit=2", "limit=1");
    let (v, link) = run(&ix, QueryKind::GetEntities, &qs, "").unwrap();
    assert_eq!(uids(&v), ["u1", "u3"]);
    assert!(link.is_some());
    let e = run(&ix, QueryKind::GetEntities, "limit=0", "").unwrap_err();
    assert_eq!(e.to_string(), "Invalid limit, must be greater than zero");
    // Negative numbers never reach the handler: the OpenAPI schema says
    // `minimum: 0`.
    let e = run(&ix, QueryKind::GetEntities, "limit=-1", "").unwrap_err();
    assert_eq!(e.to_string(), "request/query/limit must be >= 0");
    let e = run(&ix, QueryKind::GetEntities, "offset=-1&limit=2", "").unwrap_err();
    assert_eq!(e.to_string(), "request/query/offset must be >= 0");
    // `after` and `cursor` have `minLength: 1`.
    let e = run(&ix, QueryKind::GetEntities, "after=", "").unwrap_err();
    assert_eq!(
        e.to_string(),
        "request/query/after must NOT have fewer than 1 characters"
    );
    let e = run(&ix, QueryKind::GetByQuery, "cursor=&limit=2", "").unwrap_err();
    assert_eq!(
        e.to_string(),
        "request/query/cursor must NOT have fewer than 1 characters"
    );
    let e = run(&ix, QueryKind::GetEntities, "limit=ten", "").unwrap_err();
    assert_eq!(e.to_string(), "request/query/limit must be integer");
    let e = run(&ix, QueryKind::GetEntities, "after=%%%", "").unwrap_err();
    assert_eq!(e.to_string(), "Malformed after cursor, could not be parsed");
}

#[test]
fn fields_keep_named_subtrees_in_request_order() {
    let ix = catalog();
    let (v, _) = run(
        &ix,
        QueryKind::GetEntities,
        "filter=metadata.uid=u1&fields=metadata.name,kind",
        "",
    )
    .unwrap();
    assert_eq!(
        v,
        json!([{"metadata": {"name": "Checkout"}, "kind": "Component"}])
    );
    assert_eq!(
        serde_json::to_string(&v).unwrap(),
        r#"[{"metadata":{"name":"Checkout"},"kind":"Component"}]"#
    );
    let (v, _) = run(
        &ix,
        QueryKind::GetEntities,
        "filter=metadata.uid=u1&fields=spec.nope",
        "",
    )
    .unwrap();
    // lodash path resolution keeps the deepest existing prefix.
    assert_eq!(v[0]["spec"]["owner"], "team-a");
    let e = run(&ix, QueryKind::GetEntities, "fields=relations[0]", "").unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid fields, array type fields are not supported"
    );
}

#[test]
fn unprojected_bodies_are_the_stored_bytes() {
    let ix = catalog();
    let a = answer(
        &ix,
        &QueryRequest {
            kind: QueryKind::GetEntities,
            query_string: "filter=metadata.uid=u3",
            body: b"",
        },
        &Budget::unlimited(),
    )
    .unwrap();
    let body = a.body.into_bytes().unwrap();
    let stored = ix.by_uid("u3").unwrap().body();
    assert_eq!(&body[1..body.len() - 1], &stored[..]);
}

#[test]
fn facets_keep_original_casing_sorted_with_counts() {
    let ix = catalog();
    let (v, _) = run(
        &ix,
        QueryKind::GetFacets,
        "facet=kind&facet=metadata.tags",
        "",
    )
    .unwrap();
    assert_eq!(
        v,
        json!({"facets": {
            "kind": [{"value": "API", "count": 1}, {"value": "Component", "count": 3},
                     {"value": "Group", "count": 1}, {"value": "api", "count": 1}],
            "metadata.tags": [{"value": "Java", "count": 1}, {"value": "Payments", "count": 1},
                              {"value": "go", "count": 1}, {"value": "java", "count": 1}]
        }})
    );
    let (v, _) = run(
        &ix,
        QueryKind::GetFacets,
        "facet=spec.type&filter=kind=component",
        "",
    )
    .unwrap();
    assert_eq!(
        v,
        json!({"facets": {"spec.type": [{"value": "service", "count": 2}, {"value": "website", "count": 1}]}})
    );
    let (v, _) = run(
        &ix,
        QueryKind::PostFacets,
        "",
        r#"{"facets":["kind"],"query":{"metadata.tags":"java"}}"#,
    )
    .unwrap();
    assert_eq!(
        v,
        json!({"facets": {"kind": [{"value": "Component", "count": 1}, {"value": "api", "count": 1}]}})
    );
    // A unique mixed-case value keeps its spelling too (read back from the body).
    let (v, _) = run(
        &ix,
        QueryKind::GetFacets,
        "facet=metadata.name&filter=metadata.uid=u1,metadata.uid=u2",
        "",
    )
    .unwrap();
    assert_eq!(
        v,
        json!({"facets": {"metadata.name": [{"value": "Checkout", "count": 1}, {"value": "cart", "count": 1}]}})
    );
    // Absent, the OpenAPI validator answers (the schema marks `facet`
    // required); present but empty, `parseEntityFacetParams` does.
    let e = run(&ix, QueryKind::GetFacets, "", "").unwrap_err();
    assert_eq!(
        e.to_string(),
        "request/query must have required property 'facet'"
    );
    let e = run(&ix, QueryKind::GetFacets, "facet=", "").unwrap_err();
    assert_eq!(e.to_string(), "Missing facet parameter");
}

#[test]
fn by_query_limit_zero_counts_only() {
    let ix = catalog();
    let (v, _) = run(
        &ix,
        QueryKind::GetByQuery,
        "limit=0&filter=kind=component",
        "",
    )
    .unwrap();
    assert_eq!(v, json!({"items": [], "totalItems": 3, "pageInfo": {}}));
    let e = run(&ix, QueryKind::GetByQuery, "limit=-1", "").unwrap_err();
    assert!(e.to_string().starts_with("request/query/limit"));
    let e = run(&ix, QueryKind::GetByQuery, "limit=1.5", "").unwrap_err();
    assert_eq!(e.to_string(), "request/query/limit must be integer");
    let e = run(
        &ix,
        QueryKind::GetByQuery,
        "orderField=metadata.name,up",
        "",
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Invalid order field order, must be asc or desc"
    );
}

#[test]
fn by_query_default_order_is_uid_and_default_limit_is_200() {
    let ix = catalog();
    let (v, _) = run(&ix, QueryKind::GetByQuery, "", "").unwrap();
    assert_eq!(uids(&v["items"]), ["u1", "u2", "u3", "u4", "u5", "u6"]);
    assert_eq!(v["totalItems"], 6);
    assert_eq!(v["pageInfo"], json!({}));
}

/// Walks `by-query` to the end; returns the pages' uids and the totals seen.
fn walk(
    ix: &Index,
    kind: QueryKind,
    first: &str,
    body_of: impl Fn(&str) -> String,
) -> (Vec<Vec<String>>, Vec<u64>, Vec<Value>) {
    let mut pages = Vec::new();
    let mut totals = Vec::new();
    let mut raws = Vec::new();
    let (mut v, _) = match kind {
        QueryKind::GetByQuery => run(ix, kind, first, "").unwrap(),
        _ => run(ix, kind, "", first).unwrap(),
    };
    loop {
        pages.push(uids(&v["items"]));
        totals.push(v["totalItems"].as_u64().unwrap());
        raws.push(v.clone());
        let Some(next) = v["pageInfo"]["nextCursor"].as_str().map(str::to_string) else {
            break;
        };
        assert!(pages.len() < 100, "walk does not end");
        v = match kind {
            QueryKind::GetByQuery => {
                run(ix, kind, &format!("limit=2&cursor={}", enc(&next)), "")
                    .unwrap()
                    .0
            }
            _ => run(ix, kind, "", &body_of(&next)).unwrap().0,
        };
    }
    (pages, totals, raws)
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    form_encode(s, &mut out);
    out
}

#[test]
fn get_cursors_walk_to_the_end_without_repeats_and_back() {
    let ix = catalog();
    let (pages, totals, raws) = walk(
        &ix,
        QueryKind::GetByQuery,
        "limit=2&orderField=metadata.name,asc",
        |_| String::new(),
    );
    assert_eq!(
        pages,
        [vec!["u4", "u5"], vec!["u2", "u1"], vec!["u3", "u6"]]
    );
    assert_eq!(totals, [6, 6, 6]);
    assert!(raws[0]["pageInfo"].get("prevCursor").is_none());
    assert!(raws[2]["pageInfo"].get("nextCursor").is_none());
    // Going back from the last page gives the middle page, then the first.
    let prev = raws[2]["pageInfo"]["prevCursor"].as_str().unwrap();
    let (v, _) = run(
        &ix,
        QueryKind::GetByQuery,
        &format!("limit=2&cursor={}", enc(prev)),
        "",
    )
    .unwrap();
    assert_eq!(uids(&v["items"]), ["u2", "u1"]);
    let prev = v["pageInfo"]["prevCursor"].as_str().unwrap();
    let (v, _) = run(
        &ix,
        QueryKind::GetByQuery,
        &format!("limit=2&cursor={}", enc(prev)),
        "",
    )
    .unwrap();
    assert_eq!(uids(&v["items"]), ["u4", "u5"]);
    assert!(v["pageInfo"].get("prevCursor").is_none());
    assert!(v["pageInfo"].get("nextCursor").is_some());
    // GET cursors carry the filter, never a `query` key.
    let cursor = raws[0]["pageInfo"]["nextCursor"].as_str().unwrap();
    let decoded: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::STANDARD, cursor).unwrap(),
    )
    .unwrap();
    assert!(decoded.get("query").is_none());
    assert_eq!(decoded["orderFieldValues"], json!(["billing", "u5"]));
    assert_eq!(decoded["totalItems"], 6);
}

#[test]
fn post_cursors_walk_to_the_end_and_carry_the_query() {
    let ix = catalog();
    let first = r#"{"query":{"$any":[{"kind":"component"},{"kind":{"$in":["API"]}}]},"limit":2,"orderBy":[{"field":"metadata.name","order":"desc"}]}"#;
    let (pages, totals, raws) = walk(&ix, QueryKind::PostByQuery, first, |c| {
        json!({"cursor": c, "limit": 2}).to_string()
    });
    assert_eq!(pages, [vec!["u3", "u1"], vec!["u2", "u5"], vec!["u4"]]);
    assert_eq!(totals, [5, 5, 5]);
    let cursor = raws[0]["pageInfo"]["nextCursor"].as_str().unwrap();
    let decoded: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::STANDARD, cursor).unwrap(),
    )
    .unwrap();
    assert!(decoded.get("query").is_some());
    // A POST-born cursor is also accepted on GET.
    let (v, _) = run(
        &ix,
        QueryKind::GetByQuery,
        &format!("limit=2&cursor={}", enc(cursor)),
        "",
    )
    .unwrap();
    assert_eq!(uids(&v["items"]), ["u2", "u5"]);
}

#[test]
fn predicates_follow_backstage_semantics() {
    let ix = catalog();
    let q = |body: Value| {
        let (v, _) = run(
            &ix,
            QueryKind::PostByQuery,
            "",
            &json!({"query": body}).to_string(),
        )
        .unwrap();
        uids(&v["items"])
    };
    assert_eq!(q(json!({"$all": []})).len(), 6);
    assert!(q(json!({"$any": []})).is_empty());
    assert_eq!(
        q(json!({"$not": {"kind": "component"}})),
        ["u4", "u5", "u6"]
    );
    assert_eq!(
        q(json!({"spec.lifecycle": {"$exists": false}})),
        ["u3", "u5", "u6"]
    );
    assert_eq!(
        q(json!({"metadata.name": {"$hasPrefix": "C"}})),
        ["u1", "u2"]
    );
    assert_eq!(
        q(json!({"kind": "component", "spec.type": "service"})),
        ["u1", "u2"]
    );
    assert_eq!(
        q(json!({"metadata.tags": {"$contains": "JAVA"}})),
        ["u1", "u5"]
    );
    assert_eq!(
        q(
            json!({"relations": {"$contains": {"type": "ownedBy", "targetRef": "group:default/team-b"}}})
        ),
        ["u2"]
    );
    assert_eq!(q(json!({})).len(), 6);
}

#[test]
fn full_text_is_a_case_insensitive_substring() {
    let ix = catalog();
    let (v, _) = run(
        &ix,
        QueryKind::GetByQuery,
        "fullTextFilterTerm=%20CHECK%20&orderField=metadata.name",
        "",
    )
    .unwrap();
    assert_eq!(uids(&v["items"]), ["u1"]);
    let (v, _) = run(
        &ix,
        QueryKind::GetByQuery,
        "fullTextFilterTerm=A&fullTextFilterFields=metadata.name,spec.type",
        "",
    )
    .unwrap();
    assert_eq!(uids(&v["items"]), ["u2", "u4", "u6"]);
    // Without fields or an order field, the term searches metadata.uid.
    let (v, _) = run(&ix, QueryKind::GetByQuery, "fullTextFilterTerm=u3", "").unwrap();
    assert_eq!(uids(&v["items"]), ["u3"]);
}

#[test]
fn bad_input_is_refused_with_backstage_messages() {
    let ix = catalog();
    for bad in ["Zm9v", "not-base64!", "eyJvcmRlckZpZWxkcyI6MX0="] {
        let e = run(&ix, QueryKind::GetByQuery, &format!("cursor={bad}"), "").unwrap_err();
        assert!(e.to_string().starts_with("Malformed cursor: "), "{e}");
        let e = run(
            &ix,
            QueryKind::PostByQuery,
            "",
            &json!({"cursor": bad}).to_string(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("Malformed cursor: "), "{e}");
    }
    let e = run(&ix, QueryKind::PostByQuery, "", r#"{"cursor":""}"#).unwrap_err();
    assert_eq!(e.to_string(), "Cursor cannot be empty");
    let e = run(
        &ix,
        QueryKind::PostByQuery,
        "",
        r#"{"query":{"kind":{"$like":"x"}}}"#,
    )
    .unwrap_err();
    assert!(e
        .to_string()
        .starts_with("Invalid filter predicate value for field \"kind\""));
    let e = run(&ix, QueryKind::PostByQuery, "", r#"{"query":["kind"]}"#).unwrap_err();
    assert_eq!(e.to_string(), "Query must be an object");
    let e = run(&ix, QueryKind::PostByQuery, "", r#"{"query":"#).unwrap_err();
    assert!(matches!(e, QueryError::Body(_)));
    let e = run(&ix, QueryKind::PostByQuery, "", r#"{"limit":"5"}"#).unwrap_err();
    assert_eq!(e.to_string(), "request/body/limit must be integer");
    let e = run(&ix, QueryKind::GetEntities, "filter=%3Dfoo", "").unwrap_err();
    assert_eq!(
        e.to_string(),
        "Invalid filter, '=foo' is not a valid statement (expected a string on the form a=b or a= or a)"
    );
    let long = format!("filter=kind={}", "x".repeat(MAX_QUERY_STRING));
    assert!(matches!(
        run(&ix, QueryKind::GetEntities, &long, ""),
        Err(QueryError::TooLarge(_))
    ));
}

#[test]
fn walk_continues_across_generations_without_skips_or_repeats() {
    let mut es: Vec<Arc<Entity>> = (0..20)
        .map(|i| {
            entity(component(
                &format!("u{i:02}"),
                &format!("n{:02}", (i * 7) % 20),
                json!({}),
            ))
        })
        .collect();
    let gen1 = Index::build(1, es.clone(), &IndexLimits::default());
    let (v, _) = run(
        &gen1,
        QueryKind::GetByQuery,
        "limit=5&orderField=metadata.name,asc",
        "",
    )
    .unwrap();
    let mut seen: Vec<String> = uids(&v["items"]);
    let mut cursor = v["pageInfo"]["nextCursor"].as_str().unwrap().to_string();
    // A new generation lands: two entities go, two arrive (one before the
    // cursor position, one after).
    es.retain(|e| &*e.uid != "u03" && &*e.uid != "u11");
    es.push(entity(component("u90", "a-first", json!({}))));
    es.push(entity(component("u91", "z-last", json!({}))));
    let gen2 = Index::build(2, es, &IndexLimits::default());
    loop {
        let (v, _) = run(
            &gen2,
            QueryKind::GetByQuery,
            &format!("limit=5&cursor={}", enc(&cursor)),
            "",
        )
        .unwrap();
        seen.extend(uids(&v["items"]));
        match v["pageInfo"]["nextCursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no entity repeated");
    for i in 0..20 {
        let uid = format!("u{i:02}");
        if uid != "u03" && uid != "u11" {
            assert!(seen.contains(&uid), "{uid} skipped");
        }
    }
    assert!(seen.contains(&"u91".to_string()));
}

#[test]
fn by_refs_keeps_order_applies_filter_and_fields() {
    let ix = catalog();
    let req = parse_by_refs(
        "filter=kind=component&fields=metadata.name",
        br#"{"entityRefs":["component:default/checkout","api:default/api-gw","nope:x/y"]}"#,
        &Budget::unlimited(),
    )
    .unwrap();
    assert_eq!(req.entity_refs.len(), 3);
    let found: Vec<Option<Arc<Entity>>> = req
        .entity_refs
        .iter()
        .map(|r| ix.by_ref(r).cloned())
        .collect();
    let body = render_by_refs(&req, Some(&ix), found, &Budget::unlimited())
        .unwrap()
        .into_bytes()
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        json!({"items": [{"metadata": {"name": "Checkout"}}, null, null]})
    );
    // The OpenAPI schema is checked before Backstage's handler.
    let e = parse_by_refs("", br#"{"entityRefs":"x"}"#, &Budget::unlimited()).unwrap_err();
    assert_eq!(e.to_string(), "request/body/entityRefs must be array");
    let e = parse_by_refs("", br#"{"entityRefs":["a",1]}"#, &Budget::unlimited()).unwrap_err();
    assert_eq!(e.to_string(), "request/body/entityRefs/1 must be string");
    let e = parse_by_refs("", br#"{}"#, &Budget::unlimited()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "request/body must have required property 'entityRefs'"
    );
    let e = parse_by_refs("", b"not json", &Budget::unlimited()).unwrap_err();
    assert!(e.to_string().starts_with("Malformed request body"));
    let req = parse_by_refs(
        "",
        br#"{"entityRefs":["component:default/cart"],"query":{"spec.lifecycle":"experimental"}}"#,
        &Budget::unlimited(),
    )
    .unwrap();
    let found = vec![ix.by_ref("component:default/cart").cloned()];
    let body = render_by_refs(&req, Some(&ix), found, &Budget::unlimited())
        .unwrap()
        .into_bytes()
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["items"][0]["metadata"]["uid"], "u2");
}

#[test]
fn memory_estimate_counts_bodies() {
    let ix = catalog();
    let bodies: usize = ix.entities().map(|e| e.body_held_bytes()).sum();
    assert!(ix.approximate_memory_bytes() > bodies);
    assert_eq!(ix.len(), 6);
    assert_eq!(ix.generation(), 1);
}

// ------------------------------------------------------------ the oracle

/// A scan over JSON written independently of the index: the set of
/// (lower key, lower value) pairs an entity has, for the test catalog shape.
fn oracle_rows(e: &Value) -> (BTreeSet<(String, Option<String>)>, BTreeSet<String>) {
    fn walk(path: &str, v: &Value, rows: &mut BTreeSet<(String, Option<String>)>) {
        if ["relations", "status", "metadata.etag"].contains(&path) {
            return;
        }
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(&p, v, rows);
                }
            }
            Value::Array(items) => {
                for i in items {
                    walk(path, i, rows);
                    if let Value::String(s) = i {
                        rows.insert((format!("{path}.{s}").to_lowercase(), Some("true".into())));
                    }
                }
            }
            Value::String(s) => {
                rows.insert((path.to_lowercase(), Some(s.to_lowercase())));
            }
            Value::Bool(b) => {
                rows.insert((path.to_lowercase(), Some(b.to_string())));
            }
            Value::Number(n) => {
                rows.insert((path.to_lowercase(), Some(n.to_string())));
            }
            Value::Null => {
                rows.insert((path.to_lowercase(), None));
            }
        }
    }
    let mut rows = BTreeSet::new();
    walk("", e, &mut rows);
    if let Some(rels) = e["relations"].as_array() {
        for r in rels {
            rows.insert((
                format!("relations.{}", r["type"].as_str().unwrap()).to_lowercase(),
                Some(r["targetRef"].as_str().unwrap().to_lowercase()),
            ));
        }
    }
    let keys = rows.iter().map(|(k, _)| k.clone()).collect();
    (rows, keys)
}

#[derive(Debug, Clone)]
enum TestPred {
    Eq(String, String),
    Exists(String, bool),
    In(String, Vec<String>),
    Prefix(String, String),
    All(Vec<TestPred>),
    Any(Vec<TestPred>),
    Not(Box<TestPred>),
}

impl TestPred {
    fn json(&self) -> Value {
        match self {
            TestPred::Eq(k, v) => json!({ k: v }),
            TestPred::Exists(k, b) => json!({ k: {"$exists": b} }),
            TestPred::In(k, vs) => json!({ k: {"$in": vs} }),
            TestPred::Prefix(k, p) => json!({ k: {"$hasPrefix": p} }),
            TestPred::All(ps) => json!({"$all": ps.iter().map(Self::json).collect::<Vec<_>>()}),
            TestPred::Any(ps) => json!({"$any": ps.iter().map(Self::json).collect::<Vec<_>>()}),
            TestPred::Not(p) => json!({"$not": p.json()}),
        }
    }

    fn oracle(&self, e: &Value) -> bool {
        let (rows, keys) = oracle_rows(e);
        let has = |k: &str, v: &str| rows.contains(&(k.to_lowercase(), Some(v.to_lowercase())));
        match self {
            TestPred::Eq(k, v) => has(k, v),
            TestPred::Exists(k, b) => keys.contains(&k.to_lowercase()) == *b,
            TestPred::In(k, vs) => vs.iter().any(|v| has(k, v)),
            TestPred::Prefix(k, p) => rows.iter().any(|(rk, rv)| {
                rk == &k.to_lowercase()
                    && rv
                        .as_ref()
                        .is_some_and(|v| v.starts_with(&p.to_lowercase()))
            }),
            TestPred::All(ps) => ps.iter().all(|p| p.oracle(e)),
            TestPred::Any(ps) => ps.iter().any(|p| p.oracle(e)),
            TestPred::Not(p) => !p.oracle(e),
        }
    }
}

const KEYS: [&str; 6] = [
    "kind",
    "metadata.name",
    "spec.type",
    "metadata.tags",
    "relations.ownedBy",
    "metadata.tags.java",
];
const VALUES: [&str; 8] = [
    "component",
    "API",
    "service",
    "java",
    "Go",
    "group:default/a",
    "true",
    "n1",
];

fn arb_entity() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec!["Component", "API", "component", "Group"]),
        prop::sample::select(vec!["n1", "N1", "n2", "alpha", "Beta"]),
        prop::option::of(prop::sample::select(vec!["service", "website", "Service"])),
        prop::collection::vec(
            prop::sample::select(vec!["java", "Go", "rust", "JAVA"]),
            0..3,
        ),
        prop::option::of(prop::sample::select(vec![
            "group:default/a",
            "group:default/B",
        ])),
    )
        .prop_map(|(kind, name, ty, tags, owner)| {
            let mut spec = Map::new();
            if let Some(t) = ty {
                spec.insert("type".into(), json!(t));
            }
            let mut e = json!({"apiVersion": "v1", "kind": kind,
                "metadata": {"name": name, "namespace": "default", "tags": tags}, "spec": spec});
            if let Some(o) = owner {
                e["relations"] = json!([{"type": "ownedBy", "targetRef": o}]);
            }
            e
        })
}

fn arb_catalog() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::vec(arb_entity(), 0..25).prop_map(|mut es| {
        for (i, e) in es.iter_mut().enumerate() {
            e["metadata"]["uid"] = json!(format!("uid-{i:03}"));
            e["metadata"]["etag"] = json!("e");
            // Distinct names keep refs unique.
            let n = e["metadata"]["name"].as_str().unwrap().to_string();
            e["metadata"]["name"] = json!(format!("{n}-{i}"));
        }
        es
    })
}

fn arb_leaf() -> impl Strategy<Value = TestPred> {
    let key = prop::sample::select(KEYS.to_vec()).prop_map(str::to_string);
    let value = prop::sample::select(VALUES.to_vec()).prop_map(str::to_string);
    prop_oneof![
        (key.clone(), value.clone()).prop_map(|(k, v)| TestPred::Eq(k, v)),
        (key.clone(), any::<bool>()).prop_map(|(k, b)| TestPred::Exists(k, b)),
        (key.clone(), prop::collection::vec(value, 0..3)).prop_map(|(k, v)| TestPred::In(k, v)),
        (key, prop::sample::select(vec!["", "n", "A", "gro", "j"]))
            .prop_map(|(k, p)| TestPred::Prefix(k, p.into())),
    ]
}

fn arb_pred() -> impl Strategy<Value = TestPred> {
    arb_leaf().prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(TestPred::All),
            prop::collection::vec(inner.clone(), 0..3).prop_map(TestPred::Any),
            inner.prop_map(|p| TestPred::Not(Box::new(p))),
        ]
    })
}

/// A filter: OR of ANDs of `key=value` or bare `key` statements.
fn arb_filter() -> impl Strategy<Value = Vec<Vec<(String, Option<String>)>>> {
    let stmt = (
        prop::sample::select(KEYS.to_vec()).prop_map(str::to_string),
        prop::option::of(prop::sample::select(VALUES.to_vec()).prop_map(str::to_string)),
    );
    prop::collection::vec(prop::collection::vec(stmt, 1..3), 1..3)
}

fn filter_oracle(filter: &[Vec<(String, Option<String>)>], e: &Value) -> bool {
    let (rows, keys) = oracle_rows(e);
    filter.iter().any(|all| {
        // Statements on the same key merge their values (OR).
        let mut by_key: Vec<(String, Vec<String>)> = Vec::new();
        for (k, v) in all {
            match by_key.iter_mut().find(|(bk, _)| bk == k) {
                Some((_, vs)) => vs.extend(v.clone()),
                None => by_key.push((k.clone(), v.clone().into_iter().collect())),
            }
        }
        by_key.iter().all(|(k, vs)| {
            if vs.is_empty() {
                keys.contains(&k.to_lowercase())
            } else {
                vs.iter()
                    .any(|v| rows.contains(&(k.to_lowercase(), Some(v.to_lowercase()))))
            }
        })
    })
}

fn filter_qs(filter: &[Vec<(String, Option<String>)>]) -> String {
    filter
        .iter()
        .map(|all| {
            let s = all
                .iter()
                .map(|(k, v)| match v {
                    Some(v) => format!("{k}={v}"),
                    None => k.clone(),
                })
                .collect::<Vec<_>>()
                .join(",");
            format!("filter={}", enc(&s))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The oracle's order: lower-cased smallest value of the key, nulls last,
/// then uid; desc reverses both but keeps nulls last.
fn oracle_order(es: &[Value], field: &str, desc: bool) -> Vec<String> {
    let mut keyed: Vec<(Option<String>, String)> = es
        .iter()
        .map(|e| {
            let (rows, _) = oracle_rows(e);
            let v = rows
                .iter()
                .filter(|(k, v)| k == field && v.is_some())
                .filter_map(|(_, v)| v.clone())
                .min();
            (v, e["metadata"]["uid"].as_str().unwrap().to_string())
        })
        .collect();
    keyed.sort_by(|a, b| match (&a.0, &b.0) {
        (None, None) => {
            if desc {
                b.1.cmp(&a.1)
            } else {
                a.1.cmp(&b.1)
            }
        }
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(x), Some(y)) => {
            let c = x.cmp(y).then_with(|| a.1.cmp(&b.1));
            if desc {
                c.reverse()
            } else {
                c
            }
        }
    });
    keyed.into_iter().map(|(_, u)| u).collect()
}

fn build(es: &[Value]) -> Index {
    Index::build(
        1,
        es.iter().cloned().map(entity).collect(),
        &IndexLimits::default(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

    #[test]
    fn filters_agree_with_a_scan(es in arb_catalog(), filter in arb_filter()) {
        let ix = build(&es);
        let got = sorted(get_uids(&ix, &filter_qs(&filter)));
        let want: Vec<String> = sorted(es.iter().filter(|e| filter_oracle(&filter, e))
            .map(|e| e["metadata"]["uid"].as_str().unwrap().to_string()).collect());
        prop_assert_eq!(got, want);
    }

    #[test]
    fn predicates_and_paging_agree_with_a_scan(
        es in arb_catalog(),
        pred in arb_pred(),
        field in prop::sample::select(vec!["metadata.name", "spec.type", "metadata.tags", "kind"]),
        desc in any::<bool>(),
        limit in 1usize..7,
    ) {
        let ix = build(&es);
        let matching: Vec<Value> = es.iter().filter(|e| pred.oracle(e)).cloned().collect();
        let want = oracle_order(&matching, field, desc);
        let order = if desc { "desc" } else { "asc" };
        let first = json!({"query": pred.json(), "limit": limit,
            "orderBy": [{"field": field, "order": order}]}).to_string();
        let (pages, totals, raws) = walk(&ix, QueryKind::PostByQuery, &first, |c| {
            json!({"cursor": c, "limit": limit}).to_string()
        });
        let got: Vec<String> = pages.iter().flatten().cloned().collect();
        prop_assert_eq!(&got, &want);
        prop_assert!(totals.iter().all(|t| *t == want.len() as u64));
        for p in &pages[..pages.len() - 1] {
            prop_assert_eq!(p.len(), limit);
        }
        // Walking back from the last page retraces the pages.
        let mut back = vec![pages.last().unwrap().clone()];
        let mut v = raws.last().unwrap().clone();
        while let Some(prev) = v["pageInfo"]["prevCursor"].as_str().map(str::to_string) {
            prop_assert!(back.len() <= pages.len());
            v = run(&ix, QueryKind::PostByQuery, "", &json!({"cursor": prev, "limit": limit}).to_string()).unwrap().0;
            back.push(uids(&v["items"]));
        }
        back.reverse();
        prop_assert_eq!(back, pages);
    }

    #[test]
    fn get_entities_paging_agrees_with_a_scan(
        es in arb_catalog(),
        filter in arb_filter(),
        limit in 1usize..6,
        field in prop::sample::select(vec!["metadata.name", "spec.type", "kind"]),
    ) {
        let ix = build(&es);
        let matching: Vec<Value> = es.iter().filter(|e| filter_oracle(&filter, e)).cloned().collect();
        let want = oracle_order(&matching, field, false);
        let mut qs = format!("{}&order=asc:{field}&limit={limit}", filter_qs(&filter));
        let mut got = Vec::new();
        for _ in 0..100 {
            let (v, link) = run(&ix, QueryKind::GetEntities, &qs, "").unwrap();
            got.extend(uids(&v));
            match link {
                Some(l) => qs = l.trim_start_matches("</entities?").trim_end_matches(">; rel=\"next\"").to_string(),
                None => break,
            }
        }
        prop_assert_eq!(got, want);
    }
}

// ------------------------------------------------------- bounded queries

/// `n` components with tags, relations and a list of objects: enough
/// documents for a pathological query to take seconds without a budget.
fn many(n: usize) -> Index {
    let tags = ["java", "go", "rust", "Python"];
    let es = (0..n)
        .map(|i| {
            entity(component(
                &format!("u{i:05}"),
                &format!("svc-{i}"),
                json!({
                    "metadata": {"tags": [tags[i % 4], tags[(i / 4) % 4]]},
                    "spec": {"type": if i % 3 == 0 { "service" } else { "website" },
                             "owner": format!("team-{}", i % 40),
                             "ports": [{"name": "http", "port": 8000 + i % 7}]},
                    "relations": [
                        {"type": "ownedBy", "targetRef": format!("group:default/team-{}", i % 40)},
                        {"type": "dependsOn", "targetRef": format!("component:default/svc-{}", (i + 1) % n)}
                    ]
                }),
            ))
        })
        .collect();
    Index::build(1, es, &IndexLimits::default())
}

fn any_of(n: usize, one: Value) -> String {
    json!({"query": {"$any": vec![one; n]}, "limit": 20}).to_string()
}

fn ask_within(
    ix: &Index,
    kind: QueryKind,
    qs: &str,
    body: &str,
    budget: Budget,
) -> Result<Bytes, QueryError> {
    answer(
        ix,
        &QueryRequest {
            kind,
            query_string: qs,
            body: body.as_bytes(),
        },
        &budget,
    )?
    .body
    .into_bytes()
}

#[test]
fn a_thousand_contains_that_no_row_can_narrow_stop_at_the_budget() {
    let ix = many(3000);
    // `$not` inside `$contains` tells the index nothing: each of the 1,000
    // branches reads every body (seconds of work in all).
    let body = any_of(
        1000,
        json!({"metadata.tags": {"$contains": {"$not": {"$not": "x"}}}}),
    );
    let started = std::time::Instant::now();
    let e = ask_within(
        &ix,
        QueryKind::PostByQuery,
        "",
        &body,
        Budget::new(std::time::Duration::from_millis(50)),
    )
    .unwrap_err();
    assert!(matches!(e, QueryError::Budget { .. }), "{e}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "stopped after {:?}",
        started.elapsed()
    );
    assert!(e.to_string().contains("proxy.query_budget"));
}

#[test]
fn a_thousand_contains_the_rows_rule_out_read_no_body() {
    let ix = many(3000);
    // The shape seen in the wild: every branch needs a tag no entity has, so
    // the index answers without parsing a body.
    let body = any_of(1000, json!({"metadata.tags": {"$contains": "x"}}));
    let started = std::time::Instant::now();
    let got = ask_within(&ix, QueryKind::PostByQuery, "", &body, Budget::unlimited()).unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let v: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(v["totalItems"], 0);
    // And branches that do match still match.
    let body = any_of(
        1000,
        json!({"relations": {"$contains": {"type": "ownedBy", "targetRef": "group:default/team-7"}}}),
    );
    let got = ask_within(&ix, QueryKind::PostByQuery, "", &body, Budget::unlimited()).unwrap();
    let v: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(v["totalItems"], 75);
}

#[test]
fn a_spent_budget_stops_every_kind_of_query() {
    let ix = many(300);
    let spent = || Budget::new(std::time::Duration::ZERO);
    let cases: [(QueryKind, &str, &str); 9] = [
        (QueryKind::GetEntities, "filter=kind=component", ""),
        (
            QueryKind::GetEntities,
            "order=asc:metadata.name&limit=5",
            "",
        ),
        (QueryKind::GetEntities, "fields=metadata.name", ""),
        (QueryKind::GetByQuery, "orderField=metadata.name", ""),
        (QueryKind::GetByQuery, "fullTextFilterTerm=svc", ""),
        (
            QueryKind::PostByQuery,
            "",
            r#"{"query":{"metadata.tags":{"$contains":"java"}}}"#,
        ),
        (QueryKind::GetFacets, "facet=metadata.tags", ""),
        (
            QueryKind::PostFacets,
            "",
            r#"{"facets":["kind"],"query":{"kind":"component"}}"#,
        ),
        (QueryKind::GetByQuery, "filter=kind=component&limit=0", ""),
    ];
    for (kind, qs, body) in cases {
        let e = ask_within(&ix, kind, qs, body, spent()).unwrap_err();
        assert!(
            matches!(e, QueryError::Budget { .. }),
            "{kind:?} {qs} {body}: {e}"
        );
        // The same query answers within an unlimited budget.
        ask_within(&ix, kind, qs, body, Budget::unlimited()).unwrap();
    }
    let e = parse_by_refs("", br#"{"entityRefs":[]}"#, &spent()).unwrap_err();
    assert!(matches!(e, QueryError::Budget { .. }));
    let req = parse_by_refs(
        "filter=kind=component",
        br#"{"entityRefs":["component:default/svc-1"]}"#,
        &Budget::unlimited(),
    )
    .unwrap();
    let found = vec![ix.by_ref("component:default/svc-1").cloned()];
    let e = render_by_refs(&req, Some(&ix), found, &spent()).unwrap_err();
    assert!(matches!(e, QueryError::Budget { .. }));
}

#[test]
fn a_64k_part_fields_path_renders_in_linear_time() {
    let ix = many(2000);
    let path = vec!["a"; 64 * 1024].join(".");
    let body = json!({"fields": [path], "limit": 2000}).to_string();
    let started = std::time::Instant::now();
    let got = ask_within(&ix, QueryKind::PostByQuery, "", &body, Budget::unlimited()).unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let v: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 2000);
    assert_eq!(v["items"][0], json!({}));
    // A long path that does resolve keeps its (lodash) meaning: the parts
    // after the deepest match are glued on and never match.
    let path = format!("spec.owner.{}", vec!["x"; 30_000].join("."));
    let body = json!({"fields": [path], "limit": 1}).to_string();
    let got = ask_within(&ix, QueryKind::PostByQuery, "", &body, Budget::unlimited()).unwrap();
    let v: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(v["items"][0], json!({"spec": {"owner": "team-0"}}));
}

#[test]
fn ordering_by_thousands_of_unknown_fields_builds_no_column() {
    let ix = many(2000);
    // Warm the query index, so that only columns could grow memory.
    get_uids(&ix, "filter=metadata.uid=u00001");
    let before = ix.approximate_memory_bytes();
    for round in 0..6 {
        let mut qs: String = (0..3500)
            .map(|i| format!("order=asc:f{round}x{i}&"))
            .collect();
        qs.push_str("limit=3");
        assert!(qs.len() < MAX_QUERY_STRING);
        // Every value is null: the order is the tie-break (document order).
        assert_eq!(get_uids(&ix, &qs), ["u00000", "u00001", "u00002"]);
    }
    let (columns, bytes) = ix.sort_cache_settled();
    assert_eq!((columns, bytes), (0, 0));
    assert_eq!(ix.approximate_memory_bytes(), before);
    // A known field still orders, and its column is counted.
    assert_eq!(
        get_uids(&ix, "order=desc:metadata.name&order=asc:f1&limit=2"),
        ["u00999", "u00998"]
    );
    let (columns, bytes) = ix.sort_cache_settled();
    assert_eq!(columns, 1);
    assert!(bytes >= 2000 * 4);
    assert!(ix.approximate_memory_bytes() >= before + 2000 * 4);
}

#[test]
fn several_order_fields_sort_like_one_comparator() {
    let ix = many(500);
    let es: Vec<Value> = ix
        .entities()
        .map(|e| serde_json::from_slice(&e.body()).unwrap())
        .collect();
    let fields = [
        "spec.type",
        "metadata.tags",
        "nope",
        "spec.owner",
        "spec.type",
        "metadata.name",
    ];
    for (dirs, n) in [
        (["asc", "desc", "asc", "desc", "desc", "asc"], 6),
        (["desc", "asc", "asc", "asc", "asc", "desc"], 4),
        (["asc"; 6], 2),
    ] {
        let qs: String = fields[..n]
            .iter()
            .zip(dirs)
            .map(|(f, d)| format!("order={d}:{f}&"))
            .collect();
        // The oracle: one comparator over every field, then document order.
        let mut want: Vec<(Vec<Option<String>>, String)> = es
            .iter()
            .map(|e| {
                let (rows, _) = oracle_rows(e);
                let values = fields[..n]
                    .iter()
                    .map(|f| {
                        rows.iter()
                            .filter(|(k, v)| k == *f && v.is_some())
                            .filter_map(|(_, v)| v.clone())
                            .min()
                    })
                    .collect();
                (values, e["metadata"]["uid"].as_str().unwrap().to_string())
            })
            .collect();
        want.sort_by(|a, b| {
            for (i, d) in dirs[..n].iter().enumerate() {
                let c = match (&a.0[i], &b.0[i]) {
                    (None, None) => Ordering::Equal,
                    (None, Some(_)) => Ordering::Greater,
                    (Some(_), None) => Ordering::Less,
                    (Some(x), Some(y)) if *d == "asc" => x.cmp(y),
                    (Some(x), Some(y)) => y.cmp(x),
                };
                if c != Ordering::Equal {
                    return c;
                }
            }
            a.1.cmp(&b.1)
        });
        let want: Vec<String> = want.into_iter().map(|(_, u)| u).collect();
        assert_eq!(get_uids(&ix, &qs), want, "{qs}");
    }
}

#[test]
fn unpaged_entities_stream_the_bytes_a_single_page_has() {
    let ix = many(1200);
    for (unpaged, paged) in [
        ("", "limit=100000"),
        (
            "fields=metadata.name,spec.ports",
            "fields=metadata.name,spec.ports&limit=100000",
        ),
        (
            "order=desc:spec.owner&offset=7",
            "order=desc:spec.owner&offset=7&limit=100000",
        ),
    ] {
        let ask = |qs: &str| {
            answer(
                &ix,
                &QueryRequest {
                    kind: QueryKind::GetEntities,
                    query_string: qs,
                    body: b"",
                },
                &Budget::unlimited(),
            )
            .unwrap()
        };
        let streamed = ask(unpaged);
        let super::Body::Stream(mut rendering) = streamed.body else {
            panic!("an unpaged list streams");
        };
        assert_eq!(rendering.nulls(), 0);
        let mut chunks = Vec::new();
        while let Some(chunk) = rendering.next_chunk() {
            chunks.push(chunk.unwrap());
        }
        assert!(
            chunks.len() > 1,
            "{unpaged}: more than 64 KiB comes in chunks"
        );
        let whole: Vec<u8> = chunks.concat();
        let super::Body::Full(page) = ask(paged).body else {
            panic!("a page is rendered whole");
        };
        assert_eq!(whole, &page[..], "{unpaged}");
    }
}

/// by-refs as it was answered before: each found entity checked against an
/// index of its own.
fn by_refs_one_index_each(qs: &str, body: &[u8], found: &[Option<Arc<Entity>>]) -> Vec<u8> {
    use super::filter::parse_filter_params;
    use super::predicate::Predicate;
    let params = super::params::Params::parse(qs).unwrap();
    let filter = parse_filter_params(&params.all("filter")).unwrap();
    let v: Value = serde_json::from_slice(body).unwrap();
    let query = v.get("query").map(|q| Predicate::parse(q).unwrap());
    let mut fields: Vec<String> = params.all("fields");
    if let Some(f) = v.get("fields").and_then(Value::as_array) {
        fields.extend(f.iter().map(|s| s.as_str().unwrap().to_string()));
    }
    let fields = super::fields::parse_fields(&fields).unwrap();
    let mut out = b"{\"items\":[".to_vec();
    for (i, e) in found.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let accepted = e.as_ref().filter(|e| {
            let one = Index::build(0, vec![Arc::clone(e)], &IndexLimits::default());
            let b = Budget::unlimited();
            filter
                .as_ref()
                .is_none_or(|f| f.eval(&one, &b).unwrap().contains(0))
                && query
                    .as_ref()
                    .is_none_or(|q| q.eval(&one, &b).unwrap().contains(0))
        });
        match accepted {
            Some(e) => super::fields::write_entity(&e.body(), fields.as_deref(), &mut out),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.extend_from_slice(b"]}");
    out
}

#[test]
fn by_refs_filters_once_against_the_generation_with_the_same_bytes() {
    let ix = many(400);
    // A revalidated copy the generation does not hold: checked on its own.
    let mut newer: Value =
        serde_json::from_slice(&ix.by_ref("component:default/svc-5").unwrap().body()).unwrap();
    newer["spec"]["type"] = json!("service");
    newer["metadata"]["tags"] = json!(["kotlin"]);
    let newer = entity(newer);
    let refs = [
        "component:default/svc-3",
        "component:default/svc-4",
        "component:default/svc-5",
        "component:default/svc-6",
        "component:default/svc-3",
        "component:default/none",
        "component:default/svc-399",
    ];
    let body = json!({"entityRefs": refs}).to_string();
    let cases: [(&str, Option<Value>); 6] = [
        ("", None),
        ("filter=spec.type=service", None),
        ("filter=spec.type=service&fields=metadata.name", None),
        ("", Some(json!({"metadata.tags": {"$contains": "KOTLIN"}}))),
        (
            "filter=kind=component",
            Some(
                json!({"$not": {"relations": {"$contains": {"type": "ownedBy", "targetRef": "group:default/team-6"}}}}),
            ),
        ),
        (
            "fields=spec.ports",
            Some(json!({"spec.ports": {"$contains": {"port": 8003}}})),
        ),
    ];
    for (qs, query) in cases {
        let mut body: Value = serde_json::from_str(&body).unwrap();
        if let Some(q) = &query {
            body["query"] = q.clone();
        }
        let body = body.to_string();
        let req = parse_by_refs(qs, body.as_bytes(), &Budget::unlimited()).unwrap();
        let found: Vec<Option<Arc<Entity>>> = refs
            .iter()
            .map(|r| match *r {
                "component:default/svc-5" => Some(newer.clone()),
                r => ix.by_ref(r).cloned(),
            })
            .collect();
        let want = by_refs_one_index_each(qs, body.as_bytes(), &found);
        let rendering =
            render_by_refs(&req, Some(&ix), found.clone(), &Budget::unlimited()).unwrap();
        let nulls = rendering.nulls();
        let got = rendering.into_bytes().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{qs} {query:?}"
        );
        let v: Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(
            nulls,
            v["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i.is_null())
                .count()
        );
        // Without a generation every entity is checked on its own, alike.
        let alone = render_by_refs(&req, None, found, &Budget::unlimited())
            .unwrap()
            .into_bytes()
            .unwrap();
        assert_eq!(alone, got);
    }
    // The revalidated copy is judged by its own body.
    let req = parse_by_refs(
        "filter=metadata.tags=kotlin",
        body.as_bytes(),
        &Budget::unlimited(),
    )
    .unwrap();
    let found: Vec<Option<Arc<Entity>>> = refs.iter().map(|r| ix.by_ref(r).cloned()).collect();
    let mut with_newer = found.clone();
    with_newer[2] = Some(newer.clone());
    let v: Value = serde_json::from_slice(
        &render_by_refs(&req, Some(&ix), found, &Budget::unlimited())
            .unwrap()
            .into_bytes()
            .unwrap(),
    )
    .unwrap();
    assert!(v["items"].as_array().unwrap().iter().all(Value::is_null));
    let v: Value = serde_json::from_slice(
        &render_by_refs(&req, Some(&ix), with_newer, &Budget::unlimited())
            .unwrap()
            .into_bytes()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(v["items"][2]["metadata"]["name"], "svc-5");
}

#[test]
fn a_zero_limit_never_links_to_the_same_page() {
    let ix = catalog();
    // `GET /entities`: only an `after` token can carry a zero limit (the
    // parameter is refused). Backstage links such a page to itself; here
    // the empty page has no next page.
    let after = |limit: u64, offset: u64| {
        enc(&base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{{\"limit\":{limit},\"offset\":{offset}}}"),
        ))
    };
    for qs in [
        format!("after={}", after(0, 0)),
        format!("after={}", after(0, 2)),
        format!("limit=3&after={}", after(0, 1)),
        format!("after={}&order=asc:metadata.name", after(0, 0)),
    ] {
        let (v, link) = run(&ix, QueryKind::GetEntities, &qs, "").unwrap();
        assert_eq!(v, json!([]), "{qs}");
        assert_eq!(link, None, "{qs}");
    }
    // A non-zero limit still links onwards, never to itself.
    let (v, link) = run(
        &ix,
        QueryKind::GetEntities,
        &format!("after={}", after(2, 1)),
        "",
    )
    .unwrap();
    assert_eq!(uids(&v).len(), 2);
    assert!(link.unwrap().contains(&after(2, 3)));

    // `by-query`: a cursor with `limit: 0` (GET or POST, forward or
    // backward) counts and issues no cursor, as Backstage does.
    let (first, _) = run(
        &ix,
        QueryKind::GetByQuery,
        "limit=2&orderField=metadata.name",
        "",
    )
    .unwrap();
    let next = first["pageInfo"]["nextCursor"]
        .as_str()
        .unwrap()
        .to_string();
    let (second, _) = run(
        &ix,
        QueryKind::GetByQuery,
        &format!("limit=2&cursor={}", enc(&next)),
        "",
    )
    .unwrap();
    let prev = second["pageInfo"]["prevCursor"]
        .as_str()
        .unwrap()
        .to_string();
    for cursor in [&next, &prev] {
        let (v, _) = run(
            &ix,
            QueryKind::GetByQuery,
            &format!("limit=0&cursor={}", enc(cursor)),
            "",
        )
        .unwrap();
        assert_eq!(v, json!({"items": [], "totalItems": 6, "pageInfo": {}}));
        let (v, _) = run(
            &ix,
            QueryKind::PostByQuery,
            "",
            &json!({"cursor": cursor, "limit": 0}).to_string(),
        )
        .unwrap();
        assert_eq!(v, json!({"items": [], "totalItems": 6, "pageInfo": {}}));
    }
    let (v, _) = run(&ix, QueryKind::PostByQuery, "", r#"{"limit":0,"offset":3}"#).unwrap();
    assert_eq!(v, json!({"items": [], "totalItems": 6, "pageInfo": {}}));
}
