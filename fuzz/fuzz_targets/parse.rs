//! Feeds arbitrary bytes to every parser of client input in the query
//! module: `filter`/`order`/`fields`/paging parameters, predicate bodies,
//! cursors (`by-query`) and `after` tokens (`/entities`), and by-refs bodies.
//! The property: each returns an answer or a `QueryError`, never panics.

#![no_main]

mod common;

use catalog_cache::query::cursor::Cursor;
use catalog_cache::query::predicate::Predicate;
use catalog_cache::query::{parse_by_refs, render_by_refs, Budget, QueryKind};
use common::{ask, index};
use libfuzzer_sys::fuzz_target;

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
                    let _ = p.eval(index(), &Budget::unlimited());
                }
            }
        }
        _ => {
            let budget = Budget::unlimited();
            if let Ok(req) = parse_by_refs("filter=kind=component", rest, &budget) {
                let found: Vec<_> = req
                    .entity_refs
                    .iter()
                    .map(|r| index().by_ref(r).cloned())
                    .collect();
                let _ = render_by_refs(&req, Some(index()), found, &budget)
                    .and_then(|r| r.into_bytes());
            }
        }
    }
});
