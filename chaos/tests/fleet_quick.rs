//! End-to-end: `catalog-chaos fleet --quick` against the real
//! `catalog-cache` binary, bounded to two minutes.
//!
//! The run itself is ignored by default because it needs that binary built
//! first (`cargo build --release --bins`, then run the test with
//! `--release`; or set `CATALOG_CACHE_BIN`) and takes about a minute and a
//! half: `cargo test --release -p catalog-chaos --test fleet_quick -- --ignored`.
//! The usage errors need no sidecar and always run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `catalog-chaos fleet ARGS`, killing it (by its PID) if it has not
/// finished within `limit`; returns its exit code and output.
fn fleet(args: &[&str], limit: Duration) -> (i32, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_catalog-chaos"))
        .arg("fleet")
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("catalog-chaos runs");
    let started = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code().unwrap_or(-1);
        }
        if started.elapsed() > limit {
            // SIGKILL by PID; its own children are killed when it dies
            // only if it gets to clean up, so this is a last resort.
            let _ = child.kill();
            let _ = child.wait();
            break -2;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = format!(
        "{}{}",
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    (code, text)
}

#[test]
#[ignore = "needs the catalog-cache binary; run with --ignored after cargo build --release --bins"]
fn quick_fleet_measures_compares_and_keeps_the_invariants() {
    let (code, text) = fleet(&["--quick", "--duration", "4s"], Duration::from_secs(115));
    assert_eq!(code, 0, "{text}");
    for table in [
        "MEASURED: load on the demo catalog",
        "MEASURED: cost of one sync",
        "MEASURED: faults",
        "MEASURED: restart storm",
        "MODEL (extrapolated",
    ] {
        assert!(text.contains(table), "no {table:?} in:\n{text}");
    }
    let has_row = |words: &[&str]| {
        text.lines()
            .any(|l| l.starts_with('|') && words.iter().all(|w| l.contains(w)))
    };
    for words in [
        &["direct", "id-walk, full walk every 10"][..],
        &["direct", "full walk every cycle"],
        &["tiered", "leaves follow a tier"],
        &["catalog outage (refuse)", "direct", "PASS"],
        &["catalog outage (refuse)", "tiered", "PASS"],
        &["tier-1 SIGKILL, restart", "PASS"],
        &["whole run", "PASS"],
    ] {
        assert!(has_row(words), "no row with {words:?} in:\n{text}");
    }
    assert!(
        text.contains("invariant 1") && text.contains("): held"),
        "{text}"
    );
    assert!(!text.contains("FAIL"), "{text}");
    assert!(!text.contains("BROKEN"), "{text}");
}

#[test]
fn impossible_fleets_are_usage_errors() {
    let limit = Duration::from_secs(30);
    let (code, text) = fleet(
        &["--sidecar", "/nonexistent", "--leaves", "2", "--tiers", "3"],
        limit,
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--tiers must not exceed --leaves"), "{text}");
    let (code, text) = fleet(
        &[
            "--sidecar",
            "/nonexistent",
            "--fresh-for",
            "30s",
            "--outage",
            "20s",
        ],
        limit,
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("must be longer than --fresh-for"), "{text}");
    let (code, text) = fleet(&["--duration", "soon"], limit);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--duration"), "{text}");
}
