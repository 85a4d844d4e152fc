//! `POST /entities/by-refs`: arbitrary bytes as a query string and a body
//! (split at the first newline). Properties: it parses or is a
//! `QueryError`, never a panic; the rendering is JSON with one item per ref
//! and as many nulls as it says; and evaluating the filter once against the
//! generation gives the bytes checking each entity on its own gives.

#![no_main]

mod common;

use catalog_cache::query::{parse_by_refs, render_by_refs, Budget};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (qs, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (String::from_utf8_lossy(&data[..i]), &data[i + 1..]),
        None => (Default::default(), data),
    };
    let budget = Budget::unlimited();
    let Ok(req) = parse_by_refs(&qs, body, &budget) else {
        return;
    };
    let index = common::index();
    let found: Vec<_> = req
        .entity_refs
        .iter()
        .map(|r| index.by_ref(&r.to_lowercase()).cloned())
        .collect();
    let Ok(rendering) = render_by_refs(&req, Some(index), found.clone(), &budget) else {
        return;
    };
    let nulls = rendering.nulls();
    let bytes = rendering.into_bytes().expect("no budget to spend");
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("by-refs renders JSON");
    let items = v["items"].as_array().expect("an items array");
    assert_eq!(items.len(), req.entity_refs.len());
    assert_eq!(items.iter().filter(|i| i.is_null()).count(), nulls);
    let alone = render_by_refs(&req, None, found, &budget)
        .and_then(|r| r.into_bytes())
        .expect("the same request renders alone");
    assert_eq!(
        alone, bytes,
        "one evaluation gives what one per entity gives"
    );
});
