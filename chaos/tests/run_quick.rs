//! End-to-end: `catalog-chaos run` against the real `catalog-cache` binary.
//!
//! Ignored by default because it needs that binary built first
//! (`cargo build --bin catalog-cache`; or set `CATALOG_CACHE_BIN`) and takes
//! about a minute: `cargo test -p catalog-chaos --test run_quick -- --ignored`.

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

#[test]
#[ignore = "needs the catalog-cache binary; run with --ignored after cargo build --bin catalog-cache"]
fn a_network_fault_through_the_fault_proxy_passes_and_names_its_mechanism() {
    let (code, text) = chaos(&["--quick", "--only", "net-reset-mid-body"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("| net-reset-mid-body"), "{text}");
    assert!(text.contains("fault-proxy"), "{text}");
    assert!(text.contains("reset mid-body"), "{text}");
}

#[test]
#[ignore = "needs the catalog-cache binary; run with --ignored after cargo build --bin catalog-cache"]
fn without_upstream_timeouts_a_half_open_upstream_fails_its_scenario() {
    let (code, text) = chaos(&["--quick", "--weaken", "no-upstream-timeout"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("net-half-open"), "{text}");
    assert!(text.contains("the breaker never opened"), "{text}");
}
