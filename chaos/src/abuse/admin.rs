//! Attacks on the admin listener: `snapshot-flood` (`GET /admin/snapshot`
//! without a token, then 20 at once with it, read slowly) and
//! `breaker-forever` (`PUT /admin/breaker` open for 10,000 years).
//!
//! Called by `abuse::exercise`. `snapshot-flood` checks the unauthenticated
//! export is refused (401) and that twenty slow downloads do not hold the
//! mirror in memory twenty times (a streamed export: its RSS ceiling);
//! `breaker-forever` checks the absurd duration is refused (400 naming the
//! limit) and that `/status` and `/admin/breaker` keep answering, also
//! after a restart.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::{Attack, Attacked, Field};
use crate::scenario::{client_error, size_text, HarnessError, ADMIN_TOKEN};

/// Attack 5.
pub(crate) const SNAPSHOT: Attack = Attack {
    name: "snapshot-flood",
    about: "GET /admin/snapshot without a token, then 20 at once with the admin token on sockets with a 4 KiB receive buffer, each read at 16 KiB per 100 ms for 3 s (quick) / 5 s",
    checks: "the first is 401; the 20 answer 200 (429/503 allowed, at least one 200); RSS under RSS before + 20 × 3 MiB + margin (a streamed export)",
};

/// Attack 10.
pub(crate) const BREAKER_FOREVER: Attack = Attack {
    name: "breaker-forever",
    about: "PUT /admin/breaker {\"mode\":\"open\",\"for\":\"10000y\"} with the admin token, then GET /status and /admin/breaker, a restart of the sidecar, and both again",
    checks: "the PUT is answered 400 with a message naming the longest duration allowed; every /status and /admin/breaker answers 200, before and after the restart",
};

/// Concurrent authorized downloads.
const DOWNLOADS: usize = 20;
/// What one streamed download may hold in the sidecar: the page cache of
/// a SQLite connection reading the mirror (2,000 KiB by default) and 1 MiB
/// for a read buffer of the file, hyper's write buffer and the chunk in
/// flight.
const PER_DOWNLOAD: u64 = 3 << 20;
/// The receive buffer of each download's socket: little of the mirror
/// sits in the kernel's buffers instead of the sidecar's memory.
const RECV_BUFFER: u32 = 4096;
/// Read pace of each download.
const READ_CHUNK: usize = 16 * 1024;
const READ_EVERY: Duration = Duration::from_millis(100);

/// Attack 5: `snapshot-flood`.
pub(crate) async fn snapshot(x: &mut Field<'_>) -> Result<Attacked, HarnessError> {
    let admin = x.admin();
    let mut attacked = Attacked::default();
    let anonymous = reqwest::Client::new()
        .get(format!("http://{admin}/admin/snapshot"))
        .timeout(Duration::from_secs(30))
        .send()
        .await;
    attacked.requests += 1;
    match anonymous {
        Ok(r) if r.status() == 401 => {}
        Ok(r) => {
            let status = r.status().as_u16();
            let size = r.bytes().await.map(|b| b.len()).unwrap_or(0);
            attacked.fail(format!(
                "GET /admin/snapshot without a token answered {status} ({size} bytes), not 401"
            ));
        }
        Err(e) => attacked.fail(format!(
            "GET /admin/snapshot without a token: {}",
            client_error(e)
        )),
    }
    let hold = if x.sizes.quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(5)
    };
    let request = format!(
        "GET /admin/snapshot HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
    );
    let handles: Vec<_> = (0..DOWNLOADS)
        .map(|_| {
            let (admin, request) = (admin.clone(), request.clone());
            tokio::spawn(async move { slow_download(&admin, request.as_bytes(), hold).await })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let mut read = 0usize;
    for h in handles {
        let (status, bytes) = h
            .await
            .map_err(|e| HarnessError::Http(format!("download task: {e}")))?;
        *statuses.entry(status).or_default() += 1;
        read += bytes;
    }
    attacked.requests += DOWNLOADS;
    let refused: usize = statuses
        .iter()
        .filter(|(s, _)| ![200, 429, 503].contains(*s))
        .map(|(_, n)| n)
        .sum();
    if refused > 0 || !statuses.contains_key(&200) {
        attacked.fail(format!(
            "authorized downloads answered {statuses:?} (status 0: no status line)"
        ));
    }
    let file = std::fs::metadata(x.lab.sidecar.db())
        .map(|m| m.len())
        .unwrap_or(0);
    attacked.notes.push(format!(
        "{DOWNLOADS} downloads, statuses {statuses:?}, {} read in all; the mirror file is {}, so {DOWNLOADS} copies held whole would take {}",
        size_text(read as u64),
        size_text(file),
        size_text(file * DOWNLOADS as u64)
    ));
    attacked.ceiling = Some(x.ceiling(
        DOWNLOADS as u64 * PER_DOWNLOAD,
        &format!(
            "{DOWNLOADS} streamed downloads × {} each (a SQLite connection's page cache, a read buffer, hyper's write buffer, a chunk in flight)",
            size_text(PER_DOWNLOAD)
        ),
    ));
    Ok(attacked)
}

/// One download on a socket with a small receive buffer, read slowly for
/// `hold`, then dropped: (status, bytes read).
async fn slow_download(addr: &str, request: &[u8], hold: Duration) -> (u16, usize) {
    let Ok(addr) = addr.parse::<std::net::SocketAddr>() else {
        return (0, 0);
    };
    let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
        return (0, 0);
    };
    let _ = socket.set_recv_buffer_size(RECV_BUFFER);
    let Ok(mut stream) = socket.connect(addr).await else {
        return (0, 0);
    };
    if stream.write_all(request).await.is_err() {
        return (0, 0);
    }
    let until = Instant::now() + hold;
    let mut first = Vec::new();
    let mut total = 0usize;
    let mut chunk = vec![0u8; READ_CHUNK];
    while Instant::now() < until {
        match tokio::time::timeout_at(until, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                if first.len() < 64 {
                    first.extend_from_slice(&chunk[..n.min(64)]);
                }
                total += n;
            }
        }
        tokio::time::sleep(READ_EVERY).await;
    }
    let status = String::from_utf8_lossy(&first)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, total)
}

/// Words a message naming a limit uses.
const LIMIT_WORDS: &[&str] = &[
    "at most",
    "longest",
    "limit",
    "maximum",
    "max",
    "exceed",
    "longer than",
    "up to",
];

/// Whether an error message names a limit: one of [`LIMIT_WORDS`] and a
/// number.
fn names_a_limit(message: &str) -> bool {
    let lower = message.to_lowercase();
    LIMIT_WORDS.iter().any(|w| lower.contains(w)) && lower.chars().any(|c| c.is_ascii_digit())
}

/// Attack 10: `breaker-forever`.
pub(crate) async fn breaker_forever(x: &mut Field<'_>) -> Result<Attacked, HarnessError> {
    let admin = x.admin();
    let http = reqwest::Client::new();
    let mut attacked = Attacked::default();
    let put = http
        .put(format!("http://{admin}/admin/breaker"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"mode": "open", "for": "10000y", "reason": "abuse: forever"}))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    attacked.requests += 1;
    match put {
        Err(e) => attacked.fail(format!(
            "PUT /admin/breaker for 10000y: no answer: {}",
            client_error(e)
        )),
        Ok(r) => {
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            let message = body["error"]["message"].as_str().unwrap_or("").to_string();
            attacked.notes.push(format!(
                "PUT /admin/breaker for 10000y answered {status}: {message:?}"
            ));
            if status != 400 {
                attacked.fail(format!(
                    "PUT /admin/breaker for 10000y answered {status}, not 400 ({message:?})"
                ));
            } else if !names_a_limit(&message) {
                attacked.fail(format!(
                    "the 400 does not name the longest duration allowed: {message:?}"
                ));
            }
        }
    }
    attacked.requests += keeps_answering(&http, &admin, "before the restart", &mut attacked).await;
    if let Some(why) = x.restart_sidecar().await? {
        attacked.fail(why);
    }
    attacked.requests += keeps_answering(&http, &admin, "after the restart", &mut attacked).await;
    Ok(attacked)
}

/// `GET /status` and `GET /admin/breaker` three times each: every one 200.
async fn keeps_answering(
    http: &reqwest::Client,
    admin: &str,
    when: &str,
    attacked: &mut Attacked,
) -> usize {
    let mut sent = 0;
    for _ in 0..3 {
        for path in ["/status", "/admin/breaker"] {
            sent += 1;
            let got = http
                .get(format!("http://{admin}{path}"))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            let status = match got {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            };
            if status != 200 {
                attacked.fail(format!(
                    "GET {path} {when} answered {}",
                    if status == 0 {
                        "nothing".to_string()
                    } else {
                        status.to_string()
                    }
                ));
                return sent;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_is_named_with_a_word_and_a_number() {
        assert!(names_a_limit("'for' is at most 30d (10000y given)"));
        assert!(names_a_limit(
            "Invalid duration: longer than the maximum of 365 days"
        ));
        assert!(!names_a_limit("Invalid request body"));
        assert!(!names_a_limit("too long"));
    }
}
