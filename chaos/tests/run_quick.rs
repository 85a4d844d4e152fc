//! End-to-end: `catalog-chaos run` against the real `catalog-cache` binary.
//!
//! Ignored by default because it needs that binary built first
//! (`cargo build --bin catalog-cache`; or set `CATALOG_CACHE_BIN`) and takes
//! about half a minute: `cargo test -p catalog-chaos --test run_quick -- --ignored`.

use std::process::Command;

fn chaos(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_catalog-chaos"))
        .arg("run")
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
fn refuse_and_fail_page_pass_against_the_real_sidecar() {
    let (code, text) = chaos(&["--quick", "--only", "refuse,fail-page"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("| refuse"), "{text}");
    assert!(text.contains("| fail-page"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
#[ignore = "needs the catalog-cache binary; run with --ignored after cargo build --bin catalog-cache"]
fn a_weakened_sidecar_fails_the_scenario_it_targets() {
    let (code, text) = chaos(&["--quick", "--weaken", "one-page"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("fail-page"), "{text}");
    assert!(text.contains("the generation changed"), "{text}");
}

#[test]
fn unknown_scenarios_and_weakenings_are_usage_errors() {
    let (code, text) = chaos(&["--only", "no-such-thing", "--sidecar", "/nonexistent"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("unknown scenario 'no-such-thing'"), "{text}");
    let (code, text) = chaos(&["--weaken", "nope", "--sidecar", "/nonexistent"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("unknown weakening 'nope'"), "{text}");
}
