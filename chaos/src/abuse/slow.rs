//! Slow clients (`slow-clients`): connections that send part of a request
//! and then nothing, and a connection cap smaller than the crowd.
//!
//! Called by `abuse::exercise`. Phase 1: 200 connections send a partial
//! request header, 200 a header announcing a 1,000-byte body and 1 byte of
//! it; each must be closed by the sidecar (read returns EOF or a reset)
//! within `listen.header_read_timeout` / `listen.body_read_timeout` plus
//! [`SCHEDULING_MARGIN`] of its last byte. Phase 2 restarts the sidecar
//! with `listen.proxy_max_connections` = [`CAP`] and opens [`CAP`] + 10
//! slow connections and then one good request: that request must not be
//! answered before a slot frees (the first slow connection closes), and
//! then within the header timeout; the admin bystander keeps answering
//! (the proxy bystander is paused, the proxy listener being full on
//! purpose).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::{Attack, Attacked, Field, Limits};
use crate::scenario::{encode_segment, raw_request, size_text, HarnessError, SCHEDULING_MARGIN};

/// Attack 8.
pub(crate) const SLOW_CLIENTS: Attack = Attack {
    name: "slow-clients",
    about: "200 connections send a partial request header, 200 a header announcing a 1,000-byte body and 1 byte; then, restarted with listen.proxy_max_connections = 50, 60 partial headers and one good GET",
    checks: "each slow connection closed by the sidecar within header_read_timeout / body_read_timeout (2s here) + 1.5s margin of its last byte; over the cap, the good GET is not answered before the first slot frees, then within header_read_timeout + margin; 10+ connections beyond the cap are closed a header timeout later than the first ones",
};

/// Connections of each kind in phase 1.
const EACH: usize = 200;
/// The connection cap of phase 2.
pub(crate) const CAP: usize = 50;
/// Connections beyond the cap in phase 2.
const BEYOND: usize = 10;
/// What one idle connection may hold in the sidecar: hyper's read buffer
/// (8 KiB at first), its task and timers.
const PER_CONNECTION: u64 = 64 << 10;
/// How early an answer may seem to come before a slot freed: the two are
/// timed by different tasks.
const TIMING_SLACK: Duration = Duration::from_millis(100);

/// The settings this attack runs with: short header and body timeouts.
pub(crate) fn limits() -> Limits {
    Limits {
        header_read_timeout: Duration::from_secs(2),
        body_read_timeout: Duration::from_secs(2),
        ..Limits::DEFAULT
    }
}

/// When a slow connection sent its last byte and when the sidecar closed
/// it (both since the origin); `closed` is `None` when it was still open
/// at the deadline, `sent` when it could not even send.
#[derive(Debug, Clone, Copy)]
struct Held {
    sent: Option<Duration>,
    closed: Option<Duration>,
}

/// Opens a connection, sends `bytes`, then reads (discarding any answer)
/// until the sidecar closes it or `give_up` after sending.
async fn hold(addr: String, bytes: &'static [u8], origin: Instant, give_up: Duration) -> Held {
    let none = Held {
        sent: None,
        closed: None,
    };
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    else {
        return none;
    };
    if stream.write_all(bytes).await.is_err() {
        return none;
    }
    let sent = origin.elapsed();
    let deadline = Instant::now() + give_up;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => {
                return Held {
                    sent: Some(sent),
                    closed: None,
                }
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Held {
                    sent: Some(sent),
                    closed: Some(origin.elapsed()),
                }
            }
            Ok(Ok(_)) => continue,
        }
    }
}

const PARTIAL_HEADER: &[u8] =
    b"GET /api/catalog/entities HTTP/1.1\r\nHost: catalog-cache\r\nUser-Agent: slow";
const PARTIAL_BODY: &[u8] = b"POST /api/catalog/entities/by-refs HTTP/1.1\r\nHost: catalog-cache\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{";

/// Judges one kind of slow connection against its bound.
fn judge(what: &str, held: &[Held], bound: Duration, attacked: &mut Attacked) {
    let unsent = held.iter().filter(|h| h.sent.is_none()).count();
    if unsent > 0 {
        attacked.fail(format!(
            "{unsent} of {} {what} connections could not be opened and sent",
            held.len()
        ));
    }
    let waits: Vec<Option<Duration>> = held
        .iter()
        .filter_map(|h| h.sent.map(|s| h.closed.map(|c| c.saturating_sub(s))))
        .collect();
    let open = waits.iter().filter(|w| w.is_none()).count();
    let late = waits.iter().flatten().filter(|w| **w > bound).count();
    let worst = waits.iter().flatten().max().copied().unwrap_or_default();
    attacked.notes.push(format!(
        "{what}: {} closed, slowest close {}ms after the last byte, bound {}ms",
        waits.len() - open,
        worst.as_millis(),
        bound.as_millis()
    ));
    if open > 0 || late > 0 {
        attacked.fail(format!(
            "{what}: {open} connection(s) still open {}ms after their last byte and {late} closed later than {}ms",
            (bound + Duration::from_secs(2)).as_millis(),
            bound.as_millis()
        ));
    }
}

/// Attack 8: `slow-clients`.
pub(crate) async fn slow_clients(x: &mut Field<'_>) -> Result<Attacked, HarnessError> {
    let mut attacked = Attacked::default();
    let origin = x.origin;
    let header_bound = x.limits.header_read_timeout + SCHEDULING_MARGIN;
    let body_bound = x.limits.body_read_timeout + SCHEDULING_MARGIN;
    let give_up = header_bound.max(body_bound) + Duration::from_secs(2);

    // Phase 1: the default cap, 400 slow connections.
    let proxy = x.proxy();
    let spawn = |bytes: &'static [u8], n: usize| -> Vec<tokio::task::JoinHandle<Held>> {
        (0..n)
            .map(|_| tokio::spawn(hold(proxy.clone(), bytes, origin, give_up)))
            .collect()
    };
    let headers = spawn(PARTIAL_HEADER, EACH);
    let bodies = spawn(PARTIAL_BODY, EACH);
    let headers = join(headers).await?;
    let bodies = join(bodies).await?;
    attacked.requests += 2 * EACH;
    judge("partial header", &headers, header_bound, &mut attacked);
    judge("partial body", &bodies, body_bound, &mut attacked);

    // Phase 2: a small cap, more slow connections than it, then a good GET.
    x.bystander.pause_proxy(true);
    x.lab.sidecar.set_env(
        "CATALOG_CACHE_LISTEN_PROXY_MAX_CONNECTIONS",
        &CAP.to_string(),
    );
    if let Some(why) = x.restart_sidecar().await? {
        attacked.fail(why);
        x.bystander.pause_proxy(false);
        return Ok(attacked);
    }
    let proxy = x.proxy();
    let crowd: Vec<_> = (0..CAP + BEYOND)
        .map(|_| tokio::spawn(hold(proxy.clone(), PARTIAL_HEADER, origin, give_up * 2)))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = &x.lab.targets[0];
    let request = format!(
        "GET /api/catalog/entities/by-name/{}/{}/{} HTTP/1.1\r\nHost: {proxy}\r\nConnection: close\r\n\r\n",
        encode_segment(&t.kind),
        encode_segment(&t.namespace),
        encode_segment(&t.name)
    );
    let probe_sent = origin.elapsed();
    // The probe gives up before the crowd does: a slot freed by the crowd
    // giving up must not look like one the sidecar freed.
    let probe = raw_request(&proxy, request.as_bytes(), give_up).await;
    let probe_answered = origin.elapsed();
    let crowd = join(crowd).await?;
    x.bystander.pause_proxy(false);
    attacked.requests += CAP + BEYOND + 1;

    let first_close = crowd.iter().filter_map(|h| h.closed).min();
    let crowd_sent = crowd.iter().filter(|h| h.sent.is_some()).count();
    attacked.notes.push(format!(
        "over the cap of {CAP}: {crowd_sent} of {} slow connections sent their partial header; the good GET was sent at {:.2}s and {} at {:.2}s",
        crowd.len(),
        probe_sent.as_secs_f64(),
        match &probe {
            Ok(a) => format!("answered {}", a.status),
            Err(e) => format!("not answered ({e})"),
        },
        probe_answered.as_secs_f64()
    ));
    let probe_bound = x.limits.header_read_timeout + SCHEDULING_MARGIN;
    match (&probe, first_close) {
        (Err(e), _) => attacked.fail(format!(
            "over the cap of {CAP}: the good GET got no answer ({e})"
        )),
        (Ok(answer), _) if answer.status != 200 => attacked.fail(format!(
            "over the cap of {CAP}: the good GET answered {}",
            answer.status
        )),
        (Ok(_), None) => attacked.fail(format!(
            "over the cap of {CAP}: the good GET was answered while no slow connection had been closed"
        )),
        (Ok(_), Some(first)) => {
            if probe_answered + TIMING_SLACK < first {
                attacked.fail(format!(
                    "over the cap of {CAP}: the good GET was answered at {:.2}s, before the first slot freed at {:.2}s (the cap did not hold)",
                    probe_answered.as_secs_f64(),
                    first.as_secs_f64()
                ));
            }
            if probe_answered - probe_sent > probe_bound {
                attacked.fail(format!(
                    "over the cap of {CAP}: the good GET waited {}ms, over header_read_timeout + margin {}ms",
                    (probe_answered - probe_sent).as_millis(),
                    probe_bound.as_millis()
                ));
            }
        }
    }
    if let Some(first) = first_close {
        let later = first + x.limits.header_read_timeout / 2;
        let waited = crowd
            .iter()
            .filter(|h| h.closed.is_some_and(|c| c >= later))
            .count();
        attacked.notes.push(format!(
            "over the cap of {CAP}: first slot freed at {:.2}s; {waited} of {} slow connections closed half a header timeout or more after the first",
            first.as_secs_f64(),
            crowd.len()
        ));
        if waited < BEYOND {
            attacked.fail(format!(
                "over the cap of {CAP}: only {waited} slow connections were closed a header timeout after the first ones; the {BEYOND} beyond the cap should have waited for a slot"
            ));
        }
    }
    attacked.ceiling = Some(x.ceiling(
        2 * EACH as u64 * PER_CONNECTION,
        &format!(
            "{} idle connections × {} (hyper's read buffer, the connection's task and timers)",
            2 * EACH,
            size_text(PER_CONNECTION)
        ),
    ));
    Ok(attacked)
}

async fn join(handles: Vec<tokio::task::JoinHandle<Held>>) -> Result<Vec<Held>, HarnessError> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(
            h.await
                .map_err(|e| HarnessError::Http(format!("slow client task: {e}")))?,
        );
    }
    Ok(out)
}
