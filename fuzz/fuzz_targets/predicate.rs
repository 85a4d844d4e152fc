//! Filter predicates (`query` bodies): arbitrary bytes as JSON. Properties:
//! a predicate parses or is a `QueryError`, never a panic; evaluating it
//! within a scope (the first byte picks the documents) gives exactly the
//! scope's share of the whole answer; and it answers through
//! `POST /entities/by-query` and `POST /entity-facets`.

#![no_main]

mod common;

use catalog_cache::query::predicate::Predicate;
use catalog_cache::query::{Budget, QueryKind};
use libfuzzer_sys::fuzz_target;
use roaring::RoaringBitmap;

fuzz_target!(|data: &[u8]| {
    let Some((&bits, rest)) = data.split_first() else {
        return;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(rest) else {
        return;
    };
    if let Ok(p) = Predicate::parse(&value) {
        let index = common::index();
        let budget = Budget::unlimited();
        let all = p.eval(index, &budget).expect("no budget to spend");
        let scope: RoaringBitmap = (0..index.len() as u32)
            .filter(|d| bits & (1 << d) != 0)
            .collect();
        let within = p
            .eval_in(index, &scope, &budget)
            .expect("no budget to spend");
        assert_eq!(within, all & scope);
    }
    let body = serde_json::json!({"query": value, "limit": 2, "fields": ["metadata.name"]});
    common::ask(QueryKind::PostByQuery, "", body.to_string().as_bytes());
    let body = serde_json::json!({"query": value, "facets": ["kind", "metadata.tags"]});
    common::ask(QueryKind::PostFacets, "", body.to_string().as_bytes());
});
