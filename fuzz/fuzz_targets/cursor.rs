//! Cursor decoding: arbitrary text as a `by-query` cursor. Properties: it
//! decodes or is a `QueryError`, never a panic; a decoded cursor encodes to
//! one that decodes to the same state; and the cursor walks a page (GET and
//! POST) without panicking.

#![no_main]

mod common;

use catalog_cache::query::cursor::Cursor;
use catalog_cache::query::QueryKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(cursor) = Cursor::decode(&text) {
        let again = Cursor::decode(&cursor.encode()).expect("an encoded cursor decodes");
        assert_eq!(again, cursor, "a cursor survives encoding");
        let encoded = cursor.encode();
        common::ask(
            QueryKind::PostByQuery,
            "",
            serde_json::json!({"cursor": encoded, "limit": 2})
                .to_string()
                .as_bytes(),
        );
    }
    let mut qs = String::from("limit=1&cursor=");
    for b in text.bytes() {
        qs.push_str(&format!("%{b:02X}"));
    }
    common::ask(QueryKind::GetByQuery, &qs, b"");
});
