//! End-to-end: `catalog-chaos soak` against the real `catalog-cache` binary.
//!
//! The soaks are ignored by default because they need that binary built
//! first (`cargo build --bin catalog-cache`; or set `CATALOG_CACHE_BIN`)
//! and take about 50 seconds each: `cargo test -p catalog-chaos --test
//! soak_quick -- --ignored --test-threads 1`. The usage check runs always.

use std::process::Command;

fn soak(args: &[&str], out: &std::path::Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_catalog-chaos"))
        .arg("soak")
        .arg("--out")
        .arg(out)
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
fn a_short_soak_passes_and_writes_its_time_series() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = soak(&["--duration", "40s"], dir.path());
    assert_eq!(code, 0, "{text}");
    for check in [
        "| mirrored reads",
        "| read latency",
        "| fresh marking",
        "| integrity_check",
        "| flat rss",
        "| flat tokio tasks",
        "| generations rows",
        "| read_through rows",
        "| audit rows",
    ] {
        assert!(text.contains(check), "{check} missing:\n{text}");
    }
    assert!(!text.contains("FAIL"), "{text}");
    let csv = std::fs::read_to_string(dir.path().join("soak.csv")).unwrap();
    let mut lines = csv.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("time_s,fault,restarts,ok_by_name"),
        "{header}"
    );
    assert!(header.contains("rss_bytes,fds,tokio_tasks"), "{header}");
    let rows: Vec<&str> = lines.collect();
    assert!(rows.len() >= 20, "{} rows:\n{csv}", rows.len());
    // The tokio gauge is exported and sampled.
    let tasks = header.split(',').position(|c| c == "tokio_tasks").unwrap();
    assert!(
        rows.iter()
            .any(|r| r.split(',').nth(tasks).is_some_and(|v| !v.is_empty())),
        "no tokio_tasks sample:\n{csv}"
    );
    assert!(dir.path().join("summary.txt").is_file());
}

#[test]
#[ignore = "needs the catalog-cache binary; run with --ignored after cargo build --bin catalog-cache"]
fn a_weakened_sidecar_fails_the_check_it_targets() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = soak(
        &["--duration", "40s", "--weaken", "long-budget"],
        dir.path(),
    );
    assert_eq!(code, 1, "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("| read latency"))
        .unwrap_or_else(|| panic!("no read latency line:\n{text}"));
    assert!(line.contains("FAIL"), "{text}");
    assert!(text.contains("weakening long-budget"), "{text}");
    assert!(text.contains("it did"), "{text}");
}

#[test]
fn the_list_names_every_weakening() {
    let dir = tempfile::tempdir().unwrap();
    let (code, text) = soak(&["--list"], dir.path());
    assert_eq!(code, 0, "{text}");
    for name in [
        "--weaken long-budget",
        "--weaken short-max-stale",
        "--weaken big-read-through",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}
