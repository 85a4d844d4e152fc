//! Feeds arbitrary bytes to every parser of client input in the query
//! module: `filter`/`order`/`fields`/paging parameters, predicate bodies,
//! cursors (`by-query`) and `after` tokens (`/entities`), and by-refs bodies.
//! The property: each returns an answer or a `QueryError`, never panics.

#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use catalog_cache::entity::Entity;
use catalog_cache::index::Index;
use catalog_cache::query::cursor::Cursor;
use catalog_cache::query::predicate::Predicate;
use catalog_cache::query::{answer, parse_by_refs, render_by_refs, QueryKind, QueryRequest};
use libfuzzer_sys::fuzz_target;

fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        let bodies = [
            r#"{"apiVersion":"v1","kind":"Component","metadata":{"name":"Checkout","namespace":"default","uid":"u1","etag":"e1","tags":["java","Go"]},"spec":{"type":"service","owner":"team-a"},"relations":[{"type":"ownedBy","targetRef":"group:default/team-a"}]}"#,
            r#"{"apiVersion":"v1","kind":"API","metadata":{"name":"pay","uid":"u2","etag":"e2"},"spec":{"type":"openapi","n":1.5,"b":true,"z":null}}"#,
            r#"{"apiVersion":"v1","kind":"Group","metadata":{"name":"team-a","uid":"u3","etag":"e3"},"spec":{"members":[{"name":"x"}]}}"#,
        ];
        let entities = bodies
            .iter()
            .map(|b| Arc::new(Entity::from_json(Bytes::from_static(b.as_bytes())).expect("seed entity")))
            .collect();
        Index::build(1, entities)
    })
}

fn ask(kind: QueryKind, query_string: &str, body: &[u8]) {
    let _ = answer(index(), &QueryRequest { kind, query_string, body });
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match mode % 8 {
        0 => ask(QueryKind::GetEntities, &text, b""),
        1 => ask(QueryKind::GetByQuery, &text, b""),
        2 => ask(QueryKind::PostByQuery, "", rest),
        3 => {
            let _ = Cursor::decode(&text);
            ask(QueryKind::GetByQuery, &format!("cursor={text}"), b"");
        }
        4 => ask(QueryKind::PostFacets, "", rest),
        5 => ask(QueryKind::GetFacets, &text, b""),
        6 => {
            if let Ok(value) = serde_json::from_slice(rest) {
                if let Ok(p) = Predicate::parse(&value) {
                    let _ = p.eval(index());
                }
            }
        }
        _ => {
            if let Ok(req) = parse_by_refs("filter=kind=component", rest) {
                let found: Vec<_> = req
                    .entity_refs
                    .iter()
                    .map(|r| index().by_ref(r).cloned())
                    .collect();
                let _ = render_by_refs(&req, &found);
            }
        }
    }
});
