//! Read-through flood (`read-through-3000`): 3,000 ancestry reads of random
//! mirrored entities, each with a query string of its own, so that every
//! one is a new read-through key.
//!
//! Called by `abuse::exercise`. While it runs the demo catalog answers 10 ms
//! late (so that upstream calls overlap), 16 readers share the reads, and
//! the sidecar runs with `upstream.max_in_flight` = 8; a read refused for
//! want of a call slot (503) is sent again, so that every one of the 3,000
//! keys is fetched and offered to the store. Afterwards the `read_through` table of the
//! mirror file (read with rusqlite) must hold at most
//! `read_through.max_entries` rows and `read_through.max_bytes` bytes, and
//! the demo catalog must never have answered more than `max_in_flight`
//! calls at once (plus one page of the sync loop, which is not counted).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::time::Instant;

use super::{Attack, Attacked, Field, Limits, Tally};
use crate::scenario::{encode_segment, size_text, HarnessError};

/// Attack 9.
pub(crate) const READ_THROUGH: Attack = Attack {
    name: "read-through-3000",
    about: "3,000 GET /entities/by-name/…/ancestry?probe=N of random mirrored entities (N distinct), 16 readers at once, the demo catalog answering 10 ms late; upstream.max_in_flight = 8; a read answered 503 (no call slot free) is sent again after 10 ms, with the same N",
    checks: "the mirror's read_through table holds ≤ read_through.max_entries rows and ≤ read_through.max_bytes (keys + content types + bodies); the demo catalog's peak of requests in flight ≤ upstream.max_in_flight + 1 (the sync loop's page)",
};

/// Reads sent.
const READS: usize = 3000;
/// Readers at once: twice `upstream.max_in_flight`, so that it is reached.
const READERS: usize = 16;
/// The demo catalog's delay while the attack runs, so that calls overlap.
const UPSTREAM_LATENCY_MS: u64 = 10;
/// How often one read is sent again while it is answered 503 (every call
/// slot taken), and the pause before each time.
const RETRIES: usize = 100;
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// How long the sidecar's background writes of the last answers may take
/// to reach the mirror file.
const STORE_SETTLE: Duration = Duration::from_secs(1);

/// The settings this attack runs with: few client calls at once, so that
/// the limit is reached.
pub(crate) fn limits() -> Limits {
    Limits {
        upstream_max_in_flight: 8,
        ..Limits::DEFAULT
    }
}

/// Rows and bytes of the `read_through` table.
fn stored(db: &Path) -> Result<(u64, u64), String> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("cannot open {}: {e}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(key) + COALESCE(LENGTH(content_type), 0) + LENGTH(body)), 0) FROM read_through",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .map_err(|e| format!("reading read_through in {}: {e}", db.display()))
}

/// Attack 9: `read-through-3000`.
pub(crate) async fn read_through(x: &mut Field<'_>) -> Result<Attacked, HarnessError> {
    let base = x.lab.sidecar.catalog_url();
    // The peak is counted since the demo catalog started: the sync's pages
    // before the attack came one at a time. (The counts are not reset, so
    // that no unrouted request is forgotten.)
    x.lab
        .upstream
        .set_faults(json!({ "latency": UPSTREAM_LATENCY_MS }))
        .await?;
    let next = Arc::new(AtomicUsize::new(0));
    let targets = x.lab.targets.clone();
    let seed = x.sizes.seed;
    let handles: Vec<_> = (0..READERS)
        .map(|w| {
            let (next, targets, base) = (next.clone(), targets.clone(), base.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(w as u64 * 7));
                let mut tally = Tally::default();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= READS {
                        break;
                    }
                    let t = &targets[rng.random_range(0..targets.len())];
                    let url = format!(
                        "{base}/entities/by-name/{}/{}/{}/ancestry?probe={n}",
                        encode_segment(&t.kind),
                        encode_segment(&t.namespace),
                        encode_segment(&t.name)
                    );
                    for _ in 0..RETRIES {
                        let started = Instant::now();
                        let got = http
                            .get(url.as_str())
                            .timeout(Duration::from_secs(10))
                            .send()
                            .await;
                        let status = match got {
                            Ok(r) => {
                                let s = r.status().as_u16();
                                let _ = r.bytes().await;
                                s
                            }
                            Err(_) => 0,
                        };
                        tally.add(status, started.elapsed(), None);
                        if status != 503 {
                            break;
                        }
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
                tally
            })
        })
        .collect();
    let mut tally = Tally::default();
    for h in handles {
        let t = h
            .await
            .map_err(|e| HarnessError::Http(format!("reader task: {e}")))?;
        for (s, n) in t.by_status {
            *tally.by_status.entry(s).or_default() += n;
        }
        tally.slowest = tally.slowest.max(t.slowest);
    }
    x.lab.upstream.clear_faults().await?;
    let upstream = x.lab.upstream.stats().await?;
    tokio::time::sleep(STORE_SETTLE).await;
    let db = x.lab.sidecar.db();
    let table = tokio::task::spawn_blocking(move || stored(&db))
        .await
        .map_err(|e| HarnessError::Http(format!("read_through check: {e}")))?;

    let mut attacked = Attacked {
        requests: tally.count(),
        ..Attacked::default()
    };
    attacked.notes.push(format!(
        "{READS} distinct reads, {} requests with the retries: {}",
        tally.count(),
        tally.describe()
    ));
    let limits = x.limits;
    match table {
        Err(e) => attacked.fail(e),
        Ok((rows, bytes)) => {
            attacked.notes.push(format!(
                "read_through table: {rows} rows, {} (limits {} rows, {})",
                size_text(bytes),
                limits.read_through_max_entries,
                size_text(limits.read_through_max_bytes)
            ));
            if rows > limits.read_through_max_entries {
                attacked.fail(format!(
                    "the read_through table holds {rows} rows, over read_through.max_entries {}",
                    limits.read_through_max_entries
                ));
            }
            if bytes > limits.read_through_max_bytes {
                attacked.fail(format!(
                    "the read_through table holds {}, over read_through.max_bytes {}",
                    size_text(bytes),
                    size_text(limits.read_through_max_bytes)
                ));
            }
        }
    }
    let peak = upstream["peak_in_flight"].as_u64().unwrap_or(0);
    let allowed = limits.upstream_max_in_flight as u64 + 1;
    attacked.notes.push(format!(
        "the demo catalog answered at most {peak} requests at once (allowed: upstream.max_in_flight {} + 1 sync page)",
        limits.upstream_max_in_flight
    ));
    if peak > allowed {
        attacked.fail(format!(
            "the demo catalog answered {peak} requests at once, over upstream.max_in_flight {} + 1",
            limits.upstream_max_in_flight
        ));
    }
    attacked.ceiling = Some(x.ceiling(
        limits.hot_cache_max_bytes,
        &format!(
            "hot_cache.max_bytes {} (read-through answers are also kept in memory)",
            size_text(limits.hot_cache_max_bytes)
        ),
    ));
    Ok(attacked)
}
