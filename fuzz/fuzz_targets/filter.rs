//! The legacy `filter=` syntax: arbitrary text as one or more `filter`
//! parameters (split on newlines). Properties: it parses or is a
//! `QueryError`, never a panic; a parsed filter survives its JSON form (as
//! cursors carry it); and it evaluates, alone and through `GET /entities`.

#![no_main]

mod common;

use catalog_cache::query::filter::{parse_filter_params, EntityFilter};
use catalog_cache::query::{Budget, QueryKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let params: Vec<String> = text.split('\n').map(str::to_string).collect();
    if let Ok(Some(filter)) = parse_filter_params(&params) {
        let back = EntityFilter::from_json(&filter.to_json()).expect("a filter's JSON reads back");
        assert_eq!(back, filter);
        let matched = filter
            .eval(common::index(), &Budget::unlimited())
            .expect("no budget to spend");
        assert!(matched.len() <= common::index().len() as u64);
    }
    let mut qs = String::new();
    for p in &params {
        qs.push_str("filter=");
        for b in p.bytes() {
            qs.push_str(&format!("%{b:02X}"));
        }
        qs.push('&');
    }
    common::ask(QueryKind::GetEntities, &qs, b"");
});
