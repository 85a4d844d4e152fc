//! The route parser with percent-decoding: any method and raw path either
//! parse into a catalog route or are refused, never a panic; a parsed
//! route's upstream path parses back into the same route (what the sidecar
//! sends upstream is exactly what it parsed).

#![no_main]

use catalog_cache::route::{parse, Route};
use http::Method;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let method = match selector % 5 {
        0 => Method::GET,
        1 => Method::POST,
        2 => Method::DELETE,
        3 => Method::PUT,
        _ => Method::HEAD,
    };
    let Ok(path) = std::str::from_utf8(rest) else {
        return;
    };
    if let Ok(route) = parse(&method, path) {
        let rebuilt = route.upstream_path();
        let again: Route = parse(&route.method(), &rebuilt)
            .unwrap_or_else(|e| panic!("{method} {path:?} parsed, but its upstream path {rebuilt:?} did not: {e}"));
        assert_eq!(again, route, "{path:?} -> {rebuilt:?}");
        assert!(!rebuilt.contains("/../") && !rebuilt.contains("//"));
    }
});
