//! Process tests: the real `catalog-cache` binary, killed with SIGKILL and
//! restarted, against the demo catalog over loopback, on real SQLite files.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use catalog_fake::Faults;
use rand::{Rng, SeedableRng};
use rusqlite::{Connection, OpenFlags};

use support::process::{fake, free_port, get, start, wait_ready, Process, BIN};

/// Checks the file as a crashed sidecar left it: SQLite's integrity check
/// passes and the stored generation is whole (its recorded entity count is
/// the number of entity rows, and the generation log agrees).
fn assert_one_complete_generation(db: &Path) -> Option<(i64, i64)> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE).unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok", "integrity_check after SIGKILL");
    let meta = |key: &str| -> Option<i64> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, String>(0)
        })
        .ok()
        .and_then(|v| v.parse().ok())
    };
    let (Some(generation), Some(count)) = (meta("generation"), meta("entities")) else {
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM entities", [], |r| r.get(0))
            .unwrap_or(0);
        assert_eq!(rows, 0, "entity rows without a generation");
        return None;
    };
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM entities", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        rows, count,
        "generation {generation} records {count} entities but {rows} rows exist"
    );
    let logged: i64 = conn
        .query_row(
            "SELECT entities FROM generations WHERE id = ?1",
            [generation],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(logged, count, "generation log disagrees");
    let distinct: i64 = conn
        .query_row(
            "SELECT COUNT(DISTINCT etag || uid) FROM entities",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(distinct, rows);
    Some((generation, count))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_sync_always_leaves_one_complete_generation() {
    let upstream = fake(20_000).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("catalog-cache.db");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut generations_seen = std::collections::BTreeSet::new();
    let uids: Vec<String> = upstream
        .entities()
        .iter()
        .filter_map(|e| e["metadata"]["uid"].as_str().map(str::to_string))
        .collect();
    for round in 0..20 {
        // Change the upstream a little every round so each sync has work.
        for uid in uids.iter().skip(round * 37).step_by(1999).take(10) {
            upstream.touch(uid);
        }
        let process = start(dir.path(), &upstream.base_url(), &[]);
        let delay = Duration::from_millis(rng.random_range(30..1500));
        tokio::time::sleep(delay).await;
        drop(process); // SIGKILL
        if let Some((generation, count)) = assert_one_complete_generation(&db) {
            assert_eq!(
                count, 20_000,
                "a partial generation is visible after round {round}"
            );
            generations_seen.insert(generation);
        }
    }
    // The kills landed at varied moments: some rounds completed syncs.
    assert!(
        !generations_seen.is_empty(),
        "no sync ever completed in 20 rounds; the test killed too early to prove anything"
    );
    // And the mirror opens in a fresh process and serves.
    let process = start(dir.path(), &upstream.base_url(), &[]);
    wait_ready(&process.admin, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_while_upstream_is_down_serves_from_disk_at_once() {
    let upstream = fake(2_000).await;
    let dir = tempfile::tempdir().unwrap();
    let first = start(dir.path(), &upstream.base_url(), &[]);
    wait_ready(&first.admin, Duration::from_secs(20)).await;
    let entity = upstream.entities()[17].clone();
    let name = entity["metadata"]["name"].as_str().unwrap().to_string();
    let kind = entity["kind"].as_str().unwrap().to_lowercase();
    drop(first);

    upstream.set_faults(Faults {
        refuse: true,
        ..Faults::default()
    });
    let second = start(dir.path(), &upstream.base_url(), &[]);
    wait_ready(&second.admin, Duration::from_secs(5)).await;
    let (status, body, headers) = get(&format!(
        "http://{}/api/catalog/entities/by-name/{kind}/default/{name}",
        second.proxy
    ))
    .await
    .expect("the proxy answers");
    assert_eq!(status, 200, "{body}");
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(served["metadata"]["uid"], entity["metadata"]["uid"]);
    assert!(headers.contains_key("cache-status"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_database_is_moved_aside_and_refilled() {
    let upstream = fake(500).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("catalog-cache.db");
    let garbage = b"this is not a SQLite database, it is a sentence".repeat(200);
    std::fs::write(&db, &garbage).unwrap();
    let process = start(dir.path(), &upstream.base_url(), &[]);
    wait_ready(&process.admin, Duration::from_secs(20)).await;
    let aside: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().contains("catalog-cache.db.corrupt-"))
        .filter(|p| {
            !p.to_string_lossy().ends_with("-wal") && !p.to_string_lossy().ends_with("-shm")
        })
        .collect();
    assert_eq!(aside.len(), 1, "exactly one moved-aside file: {aside:?}");
    assert_eq!(
        std::fs::read(&aside[0]).unwrap(),
        garbage,
        "the corrupt file is kept as it was"
    );
    let (_, status, _) = get(&format!("http://{}/status", process.admin))
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["mirror"]["entities"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let upstream = fake(200).await;
    let dir = tempfile::tempdir().unwrap();
    let mut process = start(
        dir.path(),
        &upstream.base_url(),
        &[("CATALOG_CACHE_UPSTREAM_TIMEOUT", "5s")],
    );
    wait_ready(&process.admin, Duration::from_secs(20)).await;
    upstream.set_faults(Faults {
        latency: Some(1_000),
        ..Faults::default()
    });
    let url = format!("http://{}/api/catalog/refresh", process.proxy);
    let in_flight = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .body(r#"{"entityRef":"component:default/x"}"#)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = process.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert!(status < 500, "in-flight pass-through answered {status}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = process.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "did not exit within the grace period"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "exit status {exit:?}");
}

#[test]
fn invalid_config_is_refused_with_the_key_and_exit_code_2() {
    let out = Command::new(BIN)
        .args(["config", "check"])
        .env_clear()
        .env("CATALOG_CACHE_BREAKER_FAILURE_RATE", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("breaker.failure_rate"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");

    let out = Command::new(BIN)
        .args([
            "config",
            "check",
            "--config",
            "/nonexistent/catalog-cache.toml",
        ])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let out = Command::new(BIN)
        .args(["breaker", "sideways"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn check_exits_1_when_no_sidecar_answers() {
    let out = Command::new(BIN)
        .args([
            "check",
            "--admin",
            &format!("http://127.0.0.1:{}", free_port()),
        ])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_line_per_event_and_no_per_request_noise() {
    let upstream = fake(300).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let log = dir.path().join("sidecar.log");
    let child = Command::new(BIN)
        .args(["--log-format", "json", "serve"])
        .env_clear()
        .env("CATALOG_CACHE_UPSTREAM_URL", upstream.base_url())
        .env("CATALOG_CACHE_LISTEN_PROXY", &proxy)
        .env("CATALOG_CACHE_LISTEN_ADMIN", &admin)
        .env(
            "CATALOG_CACHE_MIRROR_PATH",
            dir.path().join("catalog-cache.db"),
        )
        .env(
            "CATALOG_CACHE_ADMIN_TOKEN_FILE",
            dir.path().join("admin.token"),
        )
        .env("CATALOG_CACHE_MIRROR_SYNC_INTERVAL", "1h")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let process = Process {
        child,
        proxy,
        admin,
    };
    wait_ready(&process.admin, Duration::from_secs(20)).await;
    let e = &upstream.entities()[0];
    let path = format!(
        "http://{}/api/catalog/entities/by-name/{}/default/{}",
        process.proxy,
        e["kind"].as_str().unwrap(),
        e["metadata"]["name"].as_str().unwrap()
    );
    for _ in 0..20 {
        assert_eq!(get(&path).await.unwrap().0, 200);
    }
    drop(process);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"))
        })
        .collect();
    let sync = lines
        .iter()
        .find(|l| l["message"] == "sync done")
        .unwrap_or_else(|| panic!("no sync line in {text}"));
    assert_eq!(sync["result"], "applied");
    assert_eq!(sync["added"], 300);
    assert!(sync["duration_seconds"].is_number());
    assert!(sync["level"] == "INFO");
    assert!(
        lines.len() < 10,
        "20 reads must not log 20 lines at the default level: {text}"
    );
}

#[test]
fn snapshot_export_refuses_a_missing_mirror_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["snapshot", "export", "out.db"])
        .env_clear()
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no mirror at data/catalog-cache.db"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--config"),
        "says how to point at one: {stderr}"
    );
    assert!(!dir.path().join("data").exists(), "no mirror was invented");
    assert!(!dir.path().join("out.db").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_and_its_wal_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let fake = fake(50).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let proxy = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    // umask 022 would make files 0644 and directories 0755.
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("umask 022; exec {BIN} serve"))
        .env_clear()
        .env("CATALOG_CACHE_UPSTREAM_URL", fake.base_url())
        .env("CATALOG_CACHE_LISTEN_PROXY", &proxy)
        .env("CATALOG_CACHE_LISTEN_ADMIN", &admin)
        .env("CATALOG_CACHE_MIRROR_PATH", data.join("catalog-cache.db"))
        .env(
            "CATALOG_CACHE_ADMIN_TOKEN_FILE",
            dir.path().join("admin.token"),
        )
        .env("CATALOG_CACHE_LOG_LEVEL", "warn")
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _process = Process {
        child,
        proxy: proxy.clone(),
        admin: admin.clone(),
    };
    wait_ready(&admin, Duration::from_secs(30)).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "the data directory");
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!(
            "{}{suffix}",
            data.join("catalog-cache.db").display()
        ));
        assert!(file.exists(), "{} exists", file.display());
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    assert_eq!(mode(&dir.path().join("admin.token")), 0o600);
}
