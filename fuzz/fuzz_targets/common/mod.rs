//! What every fuzz target shares: a small generation (with arrays, objects
//! in arrays, relations and odd spellings, so `$contains` and projections
//! have something to walk) and a helper that asks the query module.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use catalog_cache::entity::Entity;
use catalog_cache::index::{Index, IndexLimits};
use catalog_cache::query::{answer, Budget, QueryKind, QueryRequest};

/// The generation every target queries.
pub fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        let bodies = [
            r#"{"apiVersion":"v1","kind":"Component","metadata":{"name":"Checkout","namespace":"default","uid":"u1","etag":"e1","tags":["java","Go"]},"spec":{"type":"service","owner":"team-a"},"relations":[{"type":"ownedBy","targetRef":"group:default/team-a"}]}"#,
            r#"{"apiVersion":"v1","kind":"API","metadata":{"name":"pay","uid":"u2","etag":"e2"},"spec":{"type":"openapi","n":1.5,"b":true,"z":null}}"#,
            r#"{"apiVersion":"v1","kind":"Group","metadata":{"name":"team-a","uid":"u3","etag":"e3"},"spec":{"members":[{"name":"x"}]}}"#,
            r#"{"apiVersion":"v1","kind":"Component","metadata":{"name":"Straße","uid":"u4","etag":"e4","tags":["ß","ſ",5,true,null,["x"]],"a.b":[{"c":"d"}]},"spec":{"list":[{"a":1,"b":{"c":["ı"]}},{}],"owner":"TEAM-A"},"relations":[{"type":"dependſOn","targetRef":"component:default/checkout"},{"type":7}]}"#,
        ];
        let entities = bodies
            .iter()
            .map(|b| {
                Arc::new(Entity::from_json(Bytes::from_static(b.as_bytes())).expect("seed entity"))
            })
            .collect();
        let index = Index::build(1, entities, &IndexLimits::default());
        index.wait_query_ready();
        index
    })
}

/// Asks one query; the answer (streamed or whole) is rendered to its end.
#[allow(dead_code)] // by_refs renders its own answers
pub fn ask(kind: QueryKind, query_string: &str, body: &[u8]) {
    let request = QueryRequest {
        kind,
        query_string,
        body,
    };
    if let Ok(answered) = answer(index(), &request, &Budget::unlimited()) {
        let _ = answered.body.into_bytes();
    }
}
