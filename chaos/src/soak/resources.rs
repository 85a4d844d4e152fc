//! What the soak samples of the sidecar every interval, the CSV it writes,
//! and the least-squares slopes it fits.
//!
//! A sample reads the process (`/proc/PID`: RSS, open descriptors), the
//! sidecar's `/metrics` (tokio tasks, hot-cache bytes), the data directory
//! (WAL and total bytes) and the mirror file, read-only with SQLite (rows
//! of `generations`, `read_through`, `audit`). The slope of a metric is
//! fitted per sidecar process (a restart starts a new segment, with its
//! own intercept), on the samples after the warm-up, so that a restart's
//! drop in RSS does not pass for a downward trend, and on each window's
//! lowest sample (`floors`), so that passing peaks do not pass for growth.
//! The caller passes only the samples taken between faults (see
//! `soak::BASELINE`), so every fitted sample is taken in the same state.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::load::{Tally, KINDS};

/// One CSV row.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// End of the interval, since the origin.
    pub at: Duration,
    /// The fault class in force at the sample.
    pub fault: String,
    /// Sidecar restarts so far.
    pub restarts: u32,
    /// Since the current sidecar process became ready (`None` while it is
    /// down).
    pub process_age: Option<Duration>,
    /// The interval's reads.
    pub reads: Tally,
    /// Resident set size, bytes.
    pub rss: Option<u64>,
    /// Open file descriptors.
    pub fds: Option<u64>,
    /// `catalog_cache_tokio_alive_tasks`.
    pub tasks: Option<u64>,
    /// `catalog_cache_hot_cache_bytes`.
    pub hot_cache: Option<u64>,
    /// The WAL file's size, bytes.
    pub wal: Option<u64>,
    /// The data directory's size, bytes.
    pub data_dir: Option<u64>,
    /// Rows of `generations`.
    pub generations: Option<u64>,
    /// Rows of `read_through`.
    pub read_through: Option<u64>,
    /// Rows of `audit`.
    pub audit: Option<u64>,
}

/// The CSV header.
pub fn csv_header() -> String {
    let mut cols: Vec<String> = vec!["time_s".into(), "fault".into(), "restarts".into()];
    for k in KINDS {
        cols.push(format!("ok_{}", k.as_str()));
    }
    for k in KINDS {
        cols.push(format!("failed_{}", k.as_str()));
    }
    cols.extend(
        [
            "excluded",
            "fresh",
            "stale",
            "revalidated",
            "refused_503",
            "worst_ms",
            "rss_bytes",
            "fds",
            "tokio_tasks",
            "hot_cache_bytes",
            "wal_bytes",
            "data_dir_bytes",
            "generations",
            "read_through_rows",
            "audit_rows",
        ]
        .map(String::from),
    );
    cols.join(",")
}

impl Row {
    /// The row as CSV (empty cells for what could not be read).
    pub fn csv(&self) -> String {
        let o = |v: Option<u64>| v.map_or(String::new(), |v| v.to_string());
        let r = &self.reads;
        let mut cells: Vec<String> = vec![
            format!("{:.1}", self.at.as_secs_f64()),
            self.fault.clone(),
            self.restarts.to_string(),
        ];
        cells.extend(r.ok.iter().map(u64::to_string));
        cells.extend(r.failed.iter().map(u64::to_string));
        cells.extend([
            r.excluded.to_string(),
            r.fresh.to_string(),
            r.stale.to_string(),
            r.revalidated.to_string(),
            r.refused.to_string(),
            r.worst.as_millis().to_string(),
            o(self.rss),
            o(self.fds),
            o(self.tasks),
            o(self.hot_cache),
            o(self.wal),
            o(self.data_dir),
            o(self.generations),
            o(self.read_through),
            o(self.audit),
        ]);
        cells.join(",")
    }
}

/// Open descriptors of a process (`/proc/PID/fd`).
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// The sum of the sizes of the files in `dir` (not recursive: the mirror's
/// directory holds its files only).
pub fn dir_bytes(dir: &Path) -> Option<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).ok()? {
        let m = e.ok()?.metadata().ok()?;
        if m.is_file() {
            total += m.len();
        }
    }
    Some(total)
}

/// The WAL file of the mirror at `db`, bytes (0 when there is none).
pub fn wal_bytes(db: &Path) -> u64 {
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
}

/// Rows of `generations`, `read_through` and `audit`, read with a
/// read-only connection (never the last one to close while the sidecar
/// runs, so it never checkpoints or removes the WAL).
pub fn table_rows(db: &Path) -> Option<(u64, u64, u64)> {
    use rusqlite::{Connection, OpenFlags};
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ok()?;
    conn.busy_timeout(Duration::from_secs(2)).ok()?;
    let count = |t: &str| -> Option<u64> {
        conn.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| {
            r.get::<_, i64>(0)
        })
        .ok()
        .map(|n| n as u64)
    };
    Some((
        count("generations")?,
        count("read_through")?,
        count("audit")?,
    ))
}

/// The value of an unlabelled gauge in a Prometheus text exposition.
pub fn gauge(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse::<f64>().ok())?
        })
        .map(|v| v.max(0.0) as u64)
}

/// A fitted slope and what it was fitted on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slope {
    /// Units per minute.
    pub per_minute: f64,
    /// Samples used.
    pub points: usize,
    /// Sidecar processes (segments) they came from.
    pub segments: usize,
    /// Minutes the samples span, summed over segments.
    pub minutes: f64,
}

/// The least-squares slope common to every segment, each with its own
/// intercept (a fixed-effects fit): `Σ (t − t̄ₛ)(y − ȳₛ) / Σ (t − t̄ₛ)²`,
/// `t` in minutes. Segments of fewer than three points are left out.
/// `None` when nothing is left.
pub fn pooled_slope(segments: &[Vec<(f64, f64)>]) -> Option<Slope> {
    let (mut num, mut den, mut points, mut used, mut minutes) = (0.0, 0.0, 0, 0, 0.0);
    for seg in segments.iter().filter(|s| s.len() >= 3) {
        let n = seg.len() as f64;
        let tm = seg.iter().map(|p| p.0).sum::<f64>() / n;
        let ym = seg.iter().map(|p| p.1).sum::<f64>() / n;
        for (t, y) in seg {
            num += (t - tm) * (y - ym);
            den += (t - tm) * (t - tm);
        }
        points += seg.len();
        used += 1;
        let (lo, hi) = seg.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
            (lo.min(p.0), hi.max(p.0))
        });
        minutes += hi - lo;
    }
    (den > 0.0).then(|| Slope {
        per_minute: num / den,
        points,
        segments: used,
        minutes,
    })
}

/// Each segment reduced to its floor: the lowest sample of every `window`
/// minutes, counted from the segment's first sample, at that sample's time.
/// A trailing window holding fewer than half the samples of a full one is
/// left out (its minimum is taken over too few samples to compare).
///
/// A leak raises the floor; a passing peak (a sync's connections and
/// tasks, a burst of client connections, a fault's retries) does not, so
/// the slope is fitted on floors rather than on every sample.
pub fn floors(segments: &[Vec<(f64, f64)>], window: f64) -> Vec<Vec<(f64, f64)>> {
    segments
        .iter()
        .map(|seg| {
            // (bucket, lowest sample, samples in the bucket)
            let mut buckets: Vec<(i64, (f64, f64), usize)> = Vec::new();
            let Some(start) = seg.first().map(|p| p.0) else {
                return Vec::new();
            };
            for &(t, y) in seg {
                let b = ((t - start) / window).floor() as i64;
                match buckets.last_mut() {
                    Some((last, low, n)) if *last == b => {
                        *n += 1;
                        if y < low.1 {
                            *low = (t, y);
                        }
                    }
                    _ => buckets.push((b, (t, y), 1)),
                }
            }
            let full = buckets.iter().map(|b| b.2).max().unwrap_or(0);
            if buckets.len() > 1 && buckets.last().is_some_and(|b| b.2 * 2 < full) {
                buckets.pop();
            }
            buckets.into_iter().map(|b| b.1).collect()
        })
        .collect()
}

/// The samples of one metric, split into segments by sidecar process,
/// keeping those at or after `warmup` and at least `rewarm` into their
/// process's life. Time in minutes.
pub fn segments(
    rows: &[Row],
    metric: impl Fn(&Row) -> Option<u64>,
    warmup: Duration,
    rewarm: Duration,
) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current: Option<u32> = None;
    for r in rows {
        let Some(age) = r.process_age else { continue };
        let Some(v) = metric(r) else { continue };
        // The first process has lived since before the origin's warm-up;
        // later ones need their own.
        if r.at < warmup || (r.restarts > 0 && age < rewarm) {
            continue;
        }
        if current != Some(r.restarts) {
            out.push(Vec::new());
            current = Some(r.restarts);
        }
        if let Some(seg) = out.last_mut() {
            seg.push((r.at.as_secs_f64() / 60.0, v as f64));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pooled_slope_ignores_the_drop_at_a_restart() {
        // 2 units a minute in each process; the second starts 100 lower.
        let a: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64, 500.0 + 2.0 * i as f64))
            .collect();
        let b: Vec<(f64, f64)> = (10..20)
            .map(|i| (i as f64, 400.0 + 2.0 * i as f64))
            .collect();
        let s = pooled_slope(&[a.clone(), b.clone()]).unwrap();
        assert!((s.per_minute - 2.0).abs() < 1e-9, "{s:?}");
        assert_eq!((s.points, s.segments), (20, 2));
        // One fit over both would see a fall.
        let mut all = a;
        all.extend(b);
        assert!(pooled_slope(&[all]).unwrap().per_minute < 0.0);
        assert!(pooled_slope(&[vec![(0.0, 1.0), (1.0, 2.0)]]).is_none());
    }

    #[test]
    fn floors_ignore_passing_peaks_and_keep_a_rising_floor() {
        // A flat floor of 40 with a peak of +30 in every third sample:
        // a fit on every sample sees whatever the peaks' phase makes of
        // them; the floors are flat.
        let flat: Vec<(f64, f64)> = (0..60)
            .map(|i| {
                let t = i as f64 / 6.0;
                (t, if i % 3 == 0 { 70.0 } else { 40.0 })
            })
            .collect();
        let f = floors(std::slice::from_ref(&flat), 1.0);
        assert_eq!(f[0].len(), 10);
        assert!(f[0].iter().all(|p| p.1 == 40.0), "{f:?}");
        assert_eq!(pooled_slope(&f).unwrap().per_minute, 0.0);
        // A floor that rises 2 a minute under the same peaks.
        let rising: Vec<(f64, f64)> = flat.iter().map(|&(t, y)| (t, y + 2.0 * t)).collect();
        let s = pooled_slope(&floors(&[rising], 1.0)).unwrap();
        assert!((s.per_minute - 2.0).abs() < 0.2, "{s:?}");
        // A trailing window with under half a window's samples is dropped.
        let short: Vec<(f64, f64)> = (0..13).map(|i| (i as f64 / 6.0, 1.0)).collect();
        assert_eq!(floors(&[short], 1.0)[0].len(), 2);
        assert!(floors(&[Vec::new()], 1.0)[0].is_empty());
    }

    #[test]
    fn segments_skip_the_warm_up_and_each_restart_s_rewarm() {
        let row = |s: u64, restarts: u32, age: Option<u64>| Row {
            at: Duration::from_secs(s),
            restarts,
            process_age: age.map(Duration::from_secs),
            rss: Some(s),
            ..Row::default()
        };
        let rows = vec![
            row(10, 0, Some(10)),
            row(70, 0, Some(70)),
            row(80, 0, Some(80)),
            row(90, 1, None),
            row(100, 1, Some(5)),
            row(130, 1, Some(35)),
        ];
        let segs = segments(
            &rows,
            |r| r.rss,
            Duration::from_secs(60),
            Duration::from_secs(30),
        );
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].len(), 2);
        assert_eq!(segs[1], vec![(130.0 / 60.0, 130.0)]);
    }

    #[test]
    fn a_gauge_is_read_from_the_exposition() {
        let text =
            "# HELP x y\ncatalog_cache_tokio_alive_tasks 42\ncatalog_cache_hot_cache_bytes 1.5e3\n";
        assert_eq!(gauge(text, "catalog_cache_tokio_alive_tasks"), Some(42));
        assert_eq!(gauge(text, "catalog_cache_hot_cache_bytes"), Some(1500));
        assert_eq!(gauge(text, "nope"), None);
    }
}
