//! Config values as operators write them: durations, sizes and whole TOML
//! documents either parse into a validated config or are refused with a
//! message, never a panic (overflowing durations and sizes included).

#![no_main]

use catalog_cache::config::{ByteSize, Config, Dur};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = text.parse::<Dur>() {
        // What is written back reads back the same.
        assert_eq!(d.to_string().parse::<Dur>().ok(), Some(d), "{text:?}");
    }
    if let Ok(b) = text.parse::<ByteSize>() {
        assert_eq!(b.to_string().parse::<ByteSize>().ok(), Some(b), "{text:?}");
    }
    if let Ok(config) = Config::from_toml(text) {
        // A config that loads is written back as one that loads the same.
        assert_eq!(Config::from_toml(&config.to_toml()).ok(), Some(config));
    }
    for key in ["freshness", "breaker", "listen", "proxy", "stale"] {
        let _ = Config::from_toml(&format!("[{key}]\n{text}\n"));
    }
});
