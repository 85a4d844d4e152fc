//! The last hour, second by second: reads by outcome, the data's age, the
//! breaker's state, and the syncs with their results and durations. It is
//! what the status page charts and `GET /history` serves, from memory (a
//! ring of one sample a second, an hour deep), so it works offline and
//! costs the same however long the sidecar runs.
//!
//! Reads are counted where the request metrics are recorded (the proxy's
//! answer), from the same outcome, so the history and `/metrics` agree: the
//! reads of an outcome over the history are the increase of
//! `catalog_cache_requests_total{outcome}` over the same seconds.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::breaker::BreakerState;

/// Seconds kept: one hour.
pub const SECONDS: usize = 3600;
/// Syncs kept (a sync a second at the shortest interval, for an hour).
pub const SYNCS: usize = 3600;

/// The outcomes the history counts, as the `outcome` label names them.
pub const OUTCOMES: [&str; 6] = ["hit", "miss", "stale", "refused", "error", "bypass"];

/// One second.
#[derive(Debug, Clone, Copy, Default)]
struct Second {
    /// Unix seconds.
    at: u64,
    reads: [u32; OUTCOMES.len()],
    data_age: Option<f64>,
    breaker: Option<BreakerState>,
}

/// One sync, as it ended.
#[derive(Debug, Clone, Serialize)]
pub struct SyncEvent {
    /// Unix seconds.
    pub at: u64,
    /// `applied`, `unchanged`, `failed` or `held`.
    pub result: &'static str,
    /// How long it took.
    pub duration_seconds: f64,
}

/// The ring and the counters it samples.
#[derive(Debug)]
pub struct History {
    counts: [AtomicU64; OUTCOMES.len()],
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    seconds: VecDeque<Second>,
    syncs: VecDeque<SyncEvent>,
    /// The counters at the last tick.
    last: [u64; OUTCOMES.len()],
}

impl Default for History {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            inner: Mutex::new(Inner::default()),
        }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one answer of the proxy (cheap: one atomic add).
    pub fn record(&self, outcome: &'static str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the second ending `now`: the reads counted since the last
    /// tick, the data's age and the breaker's state then.
    pub fn tick(&self, now: SystemTime, data_age: Option<Duration>, breaker: BreakerState) {
        let mut inner = self.lock();
        let mut reads = [0u32; OUTCOMES.len()];
        for (i, count) in self.counts.iter().enumerate() {
            let total = count.load(Ordering::Relaxed);
            reads[i] = u32::try_from(total - inner.last[i]).unwrap_or(u32::MAX);
            inner.last[i] = total;
        }
        let at = unix(now);
        // Two ticks in one wall-clock second (a slow tick, a clock step):
        // fold into the second already recorded.
        if let Some(last) = inner.seconds.back_mut().filter(|s| s.at == at) {
            for (mine, new) in last.reads.iter_mut().zip(reads) {
                *mine = mine.saturating_add(new);
            }
            last.data_age = data_age.map(|d| d.as_secs_f64());
            last.breaker = Some(breaker);
            return;
        }
        if inner.seconds.len() == SECONDS {
            inner.seconds.pop_front();
        }
        inner.seconds.push_back(Second {
            at,
            reads,
            data_age: data_age.map(|d| d.as_secs_f64()),
            breaker: Some(breaker),
        });
        let horizon = at.saturating_sub(SECONDS as u64);
        while inner.syncs.front().is_some_and(|s| s.at < horizon) {
            inner.syncs.pop_front();
        }
    }

    /// Notes a sync that ended at `at`.
    pub fn sync_done(&self, at: SystemTime, result: &'static str, duration: Duration) {
        let mut inner = self.lock();
        if inner.syncs.len() == SYNCS {
            inner.syncs.pop_front();
        }
        inner.syncs.push_back(SyncEvent {
            at: unix(at),
            result,
            duration_seconds: duration.as_secs_f64(),
        });
    }

    /// The hour as columns: one value per second, oldest first.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        let mut reads: Vec<(&'static str, Vec<u32>)> = OUTCOMES
            .iter()
            .map(|o| (*o, Vec::with_capacity(inner.seconds.len())))
            .collect();
        let mut at = Vec::with_capacity(inner.seconds.len());
        let mut data_age = Vec::with_capacity(inner.seconds.len());
        let mut breaker = Vec::with_capacity(inner.seconds.len());
        for s in &inner.seconds {
            at.push(s.at);
            for (i, (_, column)) in reads.iter_mut().enumerate() {
                column.push(s.reads[i]);
            }
            data_age.push(s.data_age);
            breaker.push(s.breaker.map(BreakerState::as_str));
        }
        let totals = OUTCOMES
            .iter()
            .enumerate()
            .map(|(i, o)| (*o, self.counts[i].load(Ordering::Relaxed)))
            .collect();
        Snapshot {
            at,
            reads: reads.into_iter().collect(),
            data_age_seconds: data_age,
            breaker,
            syncs: inner.syncs.iter().cloned().collect(),
            totals,
        }
    }
}

/// `GET /history`: the last hour in columns.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Each second's end, Unix seconds.
    pub at: Vec<u64>,
    /// Reads a second by outcome (`hit` fresh, `miss` asked of the upstream,
    /// `stale`, `refused` by the stale policy or without a copy, `error`,
    /// `bypass` writes passed through).
    pub reads: std::collections::BTreeMap<&'static str, Vec<u32>>,
    /// The data's age at each second (none before the first generation).
    pub data_age_seconds: Vec<Option<f64>>,
    /// The breaker's state at each second.
    pub breaker: Vec<Option<&'static str>>,
    /// The syncs of the hour.
    pub syncs: Vec<SyncEvent>,
    /// Reads by outcome since the start (what `/metrics` counts).
    pub totals: std::collections::BTreeMap<&'static str, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_second_holds_the_reads_since_the_last_and_the_ring_keeps_an_hour() {
        let history = History::default();
        let start = UNIX_EPOCH + Duration::from_secs(1_000_000);
        for _ in 0..3 {
            history.record("hit");
        }
        history.record("stale");
        history.record("no-such-outcome");
        history.tick(start, Some(Duration::from_secs(5)), BreakerState::Closed);
        history.record("refused");
        history.tick(start + Duration::from_secs(1), None, BreakerState::Open);
        let s = history.snapshot();
        assert_eq!(s.at, vec![1_000_000, 1_000_001]);
        assert_eq!(s.reads["hit"], vec![3, 0]);
        assert_eq!(s.reads["stale"], vec![1, 0]);
        assert_eq!(s.reads["refused"], vec![0, 1]);
        assert_eq!(s.breaker, vec![Some("closed"), Some("open")]);
        assert_eq!(s.data_age_seconds, vec![Some(5.0), None]);
        assert_eq!(s.totals["hit"], 3);

        for i in 2..(SECONDS as u64 + 100) {
            history.tick(start + Duration::from_secs(i), None, BreakerState::Closed);
        }
        let s = history.snapshot();
        assert_eq!(s.at.len(), SECONDS);
        assert_eq!(*s.at.last().unwrap(), 1_000_000 + SECONDS as u64 + 99);
        // The totals still count everything, as /metrics does.
        assert_eq!(s.totals["hit"], 3);
    }

    #[test]
    fn syncs_older_than_the_hour_are_dropped() {
        let history = History::default();
        let start = UNIX_EPOCH + Duration::from_secs(2_000_000);
        history.sync_done(start, "applied", Duration::from_millis(120));
        history.tick(start + Duration::from_secs(10), None, BreakerState::Closed);
        assert_eq!(history.snapshot().syncs.len(), 1);
        history.tick(
            start + Duration::from_secs(SECONDS as u64 + 11),
            None,
            BreakerState::Closed,
        );
        assert!(history.snapshot().syncs.is_empty());
    }
}
