//! End-to-end: `catalog-chaos abuse` against the real `catalog-cache` binary.
//!
//! The attack runs are ignored by default because they need that binary
//! built first (`cargo build --bin catalog-cache`; or set
//! `CATALOG_CACHE_BIN`): `cargo test -p catalog-chaos --test abuse_quick --
//! --ignored`. `raw-paths` takes a few seconds, the weakened `slow-clients`
//! about twenty. The usage checks run always.

use std::process::Command;

fn abuse(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_catalog-chaos"))
        .arg("abuse")
        .args(args)
        .output()
        .expect("catalog-chaos runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
#[ignore = "needs the catalog-cache binary; run with --ignored after cargo build --bin catalog-cache"]
fn raw_paths_pass_against_the_real_sidecar() {
    let (code, text) = abuse(&["--quick", "--only", "raw-paths"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("| raw-paths"), "{text}");
    assert!(text.contains("PASS"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
#[ignore = "needs the catalog-cache binary; run with --ignored after cargo build --bin catalog-cache"]
fn a_sidecar_without_timeouts_fails_the_slow_clients() {
    let (code, text) = abuse(&["--quick", "--weaken", "no-timeouts"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("| slow-clients"), "{text}");
    assert!(text.contains("still open"), "{text}");
}

#[test]
fn the_list_names_every_attack_and_weakening() {
    let (code, text) = abuse(&["--list"]);
    assert_eq!(code, 0, "{text}");
    for name in [
        "contains-1000",
        "deep-fields",
        "order-3500",
        "by-refs-24k",
        "snapshot-flood",
        "raw-paths",
        "html-upstream",
        "slow-clients",
        "read-through-3000",
        "breaker-forever",
        "file-modes",
        "--weaken no-budget",
        "--weaken huge-sort-cache",
        "--weaken no-timeouts",
        "--weaken huge-read-through",
    ] {
        assert!(text.contains(name), "{name} missing from: {text}");
    }
}

#[test]
fn unknown_attacks_and_weakenings_are_usage_errors() {
    let (code, text) = abuse(&["--only", "no-such-attack", "--sidecar", "/nonexistent"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("unknown attack 'no-such-attack'"), "{text}");
    let (code, text) = abuse(&["--weaken", "nope", "--sidecar", "/nonexistent"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("unknown weakening 'nope'"), "{text}");
}
