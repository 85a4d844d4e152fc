//! `catalog-chaos soak --duration D`: the real `catalog-cache` binary in
//! front of the demo catalog for D, under mixed client load, a catalog
//! with churn, every fault class in rotation (`faults::rotation`), operator
//! toggles and restarts by SIGTERM and SIGKILL, checked all along.
//!
//! Called by `main`. It reuses the chaos harness (`scenario::Lab`: the
//! demo catalog, the sidecar, the fault proxy between them; `Timings` for
//! the sidecar's settings and the read bound; `integrity_check`) and adds
//! the soak's own pieces: `load` (readers and the judge of every read),
//! `faults` (the classes), `resources` (what is sampled, the CSV, the
//! slopes). Every wait has a deadline; every process is stopped by its PID.
//! A weakening (`--weaken`) starts the sidecar with a bad setting while the
//! checks keep the soak's own bounds; the checks it names must FAIL.

pub mod faults;
pub mod load;
pub mod resources;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::scenario::{
    http_client, integrity_check, render_grid, rss_bytes, size_text, HarnessError, Lab, LabOptions,
    Timings, Verdict, ADMIN_TOKEN,
};
use load::{Load, Shared, KINDS};
use resources::{floors, pooled_slope, segments, Row};

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// How long the load and the faults run.
    pub duration: Duration,
    /// The `catalog-cache` binary.
    pub sidecar: PathBuf,
    /// Where the CSV and the summary go.
    pub out: PathBuf,
    /// Entities in the demo catalog.
    pub entities: usize,
    /// Concurrent readers (plus one pager).
    pub clients: usize,
    /// Samples before this are not fitted (default: a quarter of the run,
    /// 20 s to 5 min).
    pub warmup: Option<Duration>,
    /// One CSV row per this (default: D / 300, 1 s to 10 s).
    pub interval: Option<Duration>,
    /// A weakening (see [`WEAKENINGS`]).
    pub weaken: Option<String>,
    /// Generator seed.
    pub seed: u64,
}

/// A deliberately bad sidecar setting and the checks it must turn to FAIL.
#[derive(Debug, Clone, Copy)]
pub struct SoakWeakening {
    /// Its `--weaken` name.
    pub name: &'static str,
    /// What it does.
    pub about: &'static str,
    /// `CATALOG_CACHE_*` overrides.
    pub env: &'static [(&'static str, &'static str)],
    /// Checks that must FAIL under it.
    pub breaks: &'static [&'static str],
}

/// Every weakening of the soak.
pub const WEAKENINGS: &[SoakWeakening] = &[
    SoakWeakening {
        name: "long-budget",
        about:
            "freshness.revalidate_budget = 30s: reads wait on a slow upstream up to its 2s timeout",
        env: &[("CATALOG_CACHE_FRESHNESS_REVALIDATE_BUDGET", "30s")],
        breaks: &["read latency"],
    },
    SoakWeakening {
        name: "short-max-stale",
        about: "stale.max_stale = 2s: nothing older than 2s is served, so outages fail reads",
        env: &[("CATALOG_CACHE_STALE_MAX_STALE", "2s")],
        breaks: &["mirrored reads"],
    },
    SoakWeakening {
        name: "big-read-through",
        about: "read_through.max_entries = 100000 while the soak holds the store to its own bound",
        env: &[("CATALOG_CACHE_READ_THROUGH_MAX_ENTRIES", "100000")],
        breaks: &["read_through rows"],
    },
];

/// The sidecar settings of the soak, on top of [`Timings::BASE`]: the
/// read-through store's bound (small, so that it fills and prunes within
/// minutes).
pub const READ_THROUGH_MAX_ENTRIES: u64 = 200;
/// `hot_cache.max_bytes` of the soak's sidecar (the default is 64 MiB).
/// The hot cache keeps read-through answers for `read_through.max_age`
/// (24 h) under keys the readers rarely repeat, so it grows until this
/// bound; at the default that takes longer than a 30-minute soak and passes
/// for a leak (RSS rose with it, about 3 MiB for each MiB the cache
/// weighed). At 2 MiB it fills within the first minutes of each process,
/// and what grows after that is not this bounded cache.
pub const HOT_CACHE_MAX_BYTES: u64 = 2 << 20;
/// The warm-up of each restarted sidecar process (the first one gets the
/// run's warm-up): long enough for its hot cache to fill to
/// [`HOT_CACHE_MAX_BYTES`] and its first sync and index build to finish.
pub const REWARM: Duration = Duration::from_secs(120);
/// The sidecar's `mirror::GENERATIONS_KEPT`: rows of `generations` it keeps
/// (the chaos crate does not link the sidecar; a test checks they agree).
pub const GENERATIONS_KEPT: u64 = 100;
/// The sidecar's `mirror::AUDIT_ENTRIES_KEPT`: audit entries it keeps.
pub const AUDIT_ENTRIES_KEPT: u64 = 10_000;
/// How often the catalog churns.
pub const CHURN_EVERY: Duration = Duration::from_secs(5);
/// One churn step: entities given new etags, added, deleted.
pub const CHURN_STEP: (usize, usize, usize) = (20, 2, 1);
/// The pause between two pages of a paging session.
pub const PAGE_PAUSE: Duration = Duration::from_millis(300);
/// The shortest slot a fault class gets (its hold and the recovery after).
pub const MIN_SLOT: Duration = Duration::from_secs(4);
/// The longest.
pub const MAX_SLOT: Duration = Duration::from_secs(40);
/// The share of a slot the fault holds; the rest is recovery.
pub const HOLD_SHARE: f64 = 0.7;
/// How long a SIGTERMed sidecar may take to exit.
pub const TERM_GRACE: Duration = Duration::from_secs(30);
/// How long a restarted sidecar may take to be ready (a debug build
/// loading the mirror on a busy machine).
pub const READY_WITHIN: Duration = Duration::from_secs(90);

/// The least fitted time (summed over processes) for a slope's verdict;
/// below it only the ceiling is judged and the slope is reported (SKIP): a
/// shorter run cannot tell a warm-up from a trend.
pub const MIN_FIT: Duration = Duration::from_secs(300);

/// A flatness bound: a slope per minute (or an allowance over the fitted
/// window, whichever is larger, so that a short run's noise is not a
/// trend) and a ceiling.
#[derive(Debug, Clone, Copy)]
pub struct Flat {
    /// The check's name.
    pub name: &'static str,
    /// Unit for printing: `MiB` or a count.
    pub bytes: bool,
    /// Growth allowed per minute.
    pub per_minute: f64,
    /// Growth allowed over the whole fitted window.
    pub allowance: f64,
    /// Never above this.
    pub ceiling: u64,
}

const MIB: f64 = 1024.0 * 1024.0;

/// The flatness bounds, one per metric.
pub const FLAT: [Flat; 5] = [
    Flat {
        name: "rss",
        bytes: true,
        per_minute: 0.5 * MIB,
        allowance: 8.0 * MIB,
        ceiling: 512 << 20,
    },
    Flat {
        name: "fds",
        bytes: false,
        per_minute: 0.5,
        allowance: 8.0,
        ceiling: 512,
    },
    Flat {
        name: "tokio tasks",
        bytes: false,
        per_minute: 1.0,
        allowance: 16.0,
        ceiling: 2000,
    },
    Flat {
        name: "wal",
        bytes: true,
        per_minute: 0.5 * MIB,
        allowance: 8.0 * MIB,
        ceiling: 64 << 20,
    },
    Flat {
        name: "data dir",
        bytes: true,
        per_minute: 0.5 * MIB,
        allowance: 8.0 * MIB,
        ceiling: 256 << 20,
    },
];

/// Reads one metric of a sample.
type Metric = fn(&Row) -> Option<u64>;

fn flat_metric(name: &str) -> Metric {
    match name {
        "rss" => |r| r.rss,
        "fds" => |r| r.fds,
        "tokio tasks" => |r| r.tasks,
        "wal" => |r| r.wal,
        _ => |r| r.data_dir,
    }
}

/// What the sampler needs to know of the controller's state.
#[derive(Debug, Default, Clone)]
struct Status {
    pid: Option<u32>,
    ready_at: Option<Instant>,
    restarts: u32,
    fault: String,
}

/// The running soak: the lab, the shared judge, and what the controller
/// records. The fault classes act on it.
pub struct Soak {
    /// The demo catalog, the sidecar and the fault proxy.
    pub lab: Lab,
    /// What the readers, the sampler and the controller share.
    pub shared: Arc<Shared>,
    status: Arc<Mutex<Status>>,
    http: reqwest::Client,
    /// `integrity_check` after each stop: (when, what it said).
    integrity: Vec<(Duration, String)>,
    /// What went wrong in the harness's own actions.
    harness: Vec<String>,
    /// Deleted entities so far (churn).
    deletions: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Soak {
    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.lab.sidecar.admin)
    }

    async fn admin_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<(), HarnessError> {
        let resp = self
            .http
            .request(method, self.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(Duration::from_secs(30))
            .json(&body)
            .send()
            .await
            .map_err(|e| HarnessError::Http(format!("{path}: {e}")))?;
        match resp.status().as_u16() {
            200 => Ok(()),
            code => Err(HarnessError::Http(format!("{path} answered {code}"))),
        }
    }

    /// An authorized `PUT` on the admin API; anything but 200 is an error.
    pub async fn admin_put(&self, path: &str, body: Value) -> Result<(), HarnessError> {
        self.admin_call(reqwest::Method::PUT, path, body).await
    }

    /// An authorized `POST` on the admin API; anything but 200 is an error.
    pub async fn admin_post(&self, path: &str, body: Value) -> Result<(), HarnessError> {
        self.admin_call(reqwest::Method::POST, path, body).await
    }

    /// Sets the stale policy to `refuse` (or back to `serve`), recording
    /// when the change was sent and when the admin API acknowledged it.
    pub async fn stale_policy(&self, refuse: bool) -> Result<(), HarnessError> {
        let policy = if refuse { "refuse" } else { "serve" };
        self.shared.with_windows(|w, now| {
            if refuse {
                w.refuse.push(load::PolicyWindow {
                    sent: now,
                    ..Default::default()
                });
            } else if let Some(p) = w.refuse.last_mut() {
                p.back_sent = Some(now);
            }
        });
        let result = self
            .admin_put("/admin/stale", json!({"policy": policy, "reason": "soak"}))
            .await;
        // An unacknowledged change leaves the window open to the end: no
        // read after it is judged as if serving were allowed.
        if result.is_ok() {
            self.shared.with_windows(|w, now| {
                if let Some(p) = w.refuse.last_mut() {
                    if refuse {
                        p.acked = Some(now);
                    } else {
                        p.back_acked = Some(now);
                    }
                }
            });
        }
        result
    }

    /// One churn step with `extra` deletions on top of [`CHURN_STEP`].
    pub async fn churn_step(&mut self, extra: usize) -> Result<(), HarnessError> {
        let (c, a, d) = CHURN_STEP;
        let sent = self.shared.now();
        let deleted = self.lab.upstream.churn(c, a, d + extra).await?;
        self.deletions += deleted.len();
        self.shared.deleted(deleted, sent);
        Ok(())
    }

    /// Stops the sidecar (SIGTERM and a wait for it to exit, or SIGKILL),
    /// runs `integrity_check` on its mirror while it is down, starts it
    /// again on the same ports and data dir and waits until it is ready.
    /// Reads from the signal to ready are not judged (a restart window).
    pub async fn restart(&mut self, graceful: bool) -> Result<(), HarnessError> {
        let window = self.shared.restart_begins();
        let stopped = self.stop_sidecar(graceful).await;
        lock(&self.status).pid = None;
        let result = async {
            stopped?;
            self.lab.sidecar.start()?;
            lock(&self.status).pid = self.lab.sidecar.pid();
            self.wait_ready().await
        }
        .await;
        {
            let mut s = lock(&self.status);
            s.restarts += 1;
            s.ready_at = Some(Instant::now());
        }
        self.shared.restart_ends(window);
        result
    }

    async fn stop_sidecar(&mut self, graceful: bool) -> Result<(), HarnessError> {
        if graceful {
            if let Some(pid) = self.lab.sidecar.pid() {
                let sent = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
                if !sent.is_ok_and(|s| s.success()) {
                    self.harness
                        .push(format!("could not send SIGTERM to {pid}"));
                }
                let deadline = Instant::now() + TERM_GRACE;
                while !self.lab.sidecar.exited() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if !self.lab.sidecar.exited() {
                    self.harness.push(format!(
                        "the sidecar (PID {pid}) did not exit within {TERM_GRACE:?} of SIGTERM; killed"
                    ));
                }
            }
        }
        // Reaps a process that exited; SIGKILLs one that did not.
        self.lab.sidecar.kill();
        let db = self.lab.sidecar.db();
        let said = tokio::task::spawn_blocking(move || integrity_check(&db))
            .await
            .map_err(|e| HarnessError::Http(format!("integrity_check: {e}")))?
            .unwrap_or_else(|e| e);
        self.integrity.push((self.shared.now(), said));
        Ok(())
    }

    async fn wait_ready(&self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if self.lab.sidecar.readyz().await == 200 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(format!(
                    "the restarted sidecar was not ready within {READY_WITHIN:?} (log: {})",
                    self.lab.sidecar.log().display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One line of the summary.
#[derive(Debug, Clone)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// What was measured.
    pub measured: String,
    /// The bound.
    pub bound: String,
    /// PASS, FAIL or SKIP.
    pub verdict: Verdict,
    /// Examples and derivations.
    pub notes: Vec<String>,
}

impl Check {
    fn new(name: &str, pass: bool, measured: String, bound: String) -> Check {
        Check {
            name: name.to_string(),
            measured,
            bound,
            verdict: if pass { Verdict::Pass } else { Verdict::Fail },
            notes: Vec::new(),
        }
    }
}

/// What a soak found.
#[derive(Debug)]
pub struct Report {
    /// One line per check.
    pub checks: Vec<Check>,
    /// Facts of the run (sizes, counts, the output files).
    pub facts: Vec<String>,
    /// The weakening it ran under, if any.
    pub weakening: Option<SoakWeakening>,
}

impl Report {
    /// Whether every check passed (SKIPs aside).
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.verdict != Verdict::Fail)
    }

    /// Under a weakening: whether every check it names failed.
    pub fn weakening_shown(&self) -> Option<bool> {
        let w = self.weakening?;
        Some(w.breaks.iter().all(|b| {
            self.checks
                .iter()
                .any(|c| c.name == *b && c.verdict == Verdict::Fail)
        }))
    }
}

/// Renders the summary table and its notes.
pub fn render(report: &Report) -> String {
    let header = ["check", "measured", "bound", "verdict"];
    let rows: Vec<Vec<String>> = report
        .checks
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.measured.clone(),
                c.bound.clone(),
                c.verdict.as_str().to_string(),
            ]
        })
        .collect();
    let notes: Vec<(&str, Verdict, &[String])> = report
        .checks
        .iter()
        .map(|c| (c.name.as_str(), c.verdict, c.notes.as_slice()))
        .collect();
    let mut out = render_grid(&header, &rows, &notes);
    for f in &report.facts {
        out.push_str(&format!("{f}\n"));
    }
    if let Some(w) = report.weakening {
        out.push_str(&format!(
            "weakening {}: {} (must FAIL: {}): {}\n",
            w.name,
            w.about,
            w.breaks.join(", "),
            if report.weakening_shown() == Some(true) {
                "it did"
            } else {
                "it DID NOT"
            }
        ));
    }
    out
}

/// The warm-up before which samples are not fitted.
pub fn default_warmup(duration: Duration) -> Duration {
    (duration / 4).clamp(Duration::from_secs(20), Duration::from_secs(300))
}

/// The sample interval.
pub fn default_interval(duration: Duration) -> Duration {
    (duration / 300).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// The slot each fault class gets: the run shared among the classes,
/// within [`MIN_SLOT`]..[`MAX_SLOT`].
pub fn slot(duration: Duration, classes: usize) -> Duration {
    (duration / classes.max(1) as u32).clamp(MIN_SLOT, MAX_SLOT)
}

/// Runs the soak and returns its report; writes `soak.csv` and
/// `summary.txt` into `opts.out`.
pub async fn run(opts: &SoakOptions) -> Result<Report, String> {
    let weakening = match &opts.weaken {
        None => None,
        Some(w) => Some(*WEAKENINGS.iter().find(|k| k.name == w).ok_or_else(|| {
            format!(
                "unknown weakening '{w}'; known: {}",
                WEAKENINGS
                    .iter()
                    .map(|k| k.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?),
    };
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| format!("cannot create {}: {e}", opts.out.display()))?;
    let timings = Timings::BASE;
    let mut options = LabOptions::new(opts.entities, opts.seed, timings);
    options.fault_proxy = true;
    options.mirror = Some(PathBuf::from("data/catalog-cache.db"));
    options.extra_env = vec![
        (
            "CATALOG_CACHE_READ_THROUGH_MAX_ENTRIES".to_string(),
            READ_THROUGH_MAX_ENTRIES.to_string(),
        ),
        (
            "CATALOG_CACHE_HOT_CACHE_MAX_BYTES".to_string(),
            HOT_CACHE_MAX_BYTES.to_string(),
        ),
    ];
    if let Some(w) = weakening {
        options
            .extra_env
            .extend(w.env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    }
    eprintln!("catalog-chaos: soak: starting the demo catalog and the sidecar ...");
    let lab = Lab::start_opts(&opts.sidecar, options)
        .await
        .map_err(|e| e.to_string())?;
    let origin = Instant::now();
    let shared = Arc::new(Shared::new(origin, timings, lab.targets.clone()));
    let status = Arc::new(Mutex::new(Status {
        pid: lab.sidecar.pid(),
        ready_at: Some(origin),
        restarts: 0,
        fault: BASELINE.into(),
    }));
    let entities = lab.entities;
    let mut soak = Soak {
        lab,
        shared: shared.clone(),
        status: status.clone(),
        http: http_client(),
        integrity: Vec::new(),
        harness: Vec::new(),
        deletions: 0,
    };
    let db = soak.lab.sidecar.db();
    let warmup = opts.warmup.unwrap_or_else(|| default_warmup(opts.duration));
    // Every restarted process warms up afresh (its hot cache, its
    // connections, the allocator), but from a mirror on disk: no first full
    // sync, and a hot cache that fills within REWARM. A longer re-warm would
    // leave too little of each process's life to fit (restarts come a few
    // minutes apart).
    let rewarm = warmup.min(REWARM);
    let interval = opts
        .interval
        .unwrap_or_else(|| default_interval(opts.duration));

    let csv_path = opts.out.join("soak.csv");
    let mut csv = std::fs::File::create(&csv_path)
        .map_err(|e| format!("cannot write {}: {e}", csv_path.display()))?;
    writeln!(csv, "{}", resources::csv_header()).map_err(|e| e.to_string())?;
    let sampler = tokio::spawn(sample_loop(
        shared.clone(),
        status.clone(),
        soak.lab.sidecar.admin.clone(),
        db.clone(),
        interval,
        csv,
    ));
    let load = Load::start(
        shared.clone(),
        soak.lab.sidecar.catalog_url(),
        opts.clients,
        opts.seed,
        load::probes(READ_THROUGH_MAX_ENTRIES),
        PAGE_PAUSE,
    );

    // The controller: churn between fault steps, the rotation in slots.
    let classes = faults::rotation(&timings);
    let slot = slot(opts.duration, classes.len());
    let hold = slot.mul_f64(HOLD_SHARE);
    let deadline = origin + opts.duration;
    let mut ran: Vec<(&'static str, u32)> = classes.iter().map(|c| (c.name(), 0)).collect();
    let mut next_churn = Instant::now();
    let mut churn_failed = 0usize;
    let mut i = 0usize;
    eprintln!(
        "catalog-chaos: soak: {} for {:?}, {} classes in slots of {:.1}s (hold {:.1}s)",
        soak.lab.sidecar.catalog_url(),
        opts.duration,
        classes.len(),
        slot.as_secs_f64(),
        hold.as_secs_f64()
    );
    while Instant::now() + MIN_SLOT.mul_f64(HOLD_SHARE) < deadline {
        let class = &classes[i % classes.len()];
        i += 1;
        lock(&status).fault = class.name().to_string();
        let started = Instant::now();
        if let Err(e) = class.start(&mut soak).await {
            soak.harness.push(format!(
                "{} start at {:.1}s: {e}",
                class.name(),
                shared.now().as_secs_f64()
            ));
        }
        ran[(i - 1) % classes.len()].1 += 1;
        let until = (started + hold).min(deadline);
        churn_until(&mut soak, until, &mut next_churn, &mut churn_failed).await;
        if let Err(e) = class.stop(&mut soak).await {
            soak.harness.push(format!(
                "{} stop at {:.1}s: {e}",
                class.name(),
                shared.now().as_secs_f64()
            ));
        }
        lock(&status).fault = BASELINE.into();
        let until = (started + slot).min(deadline);
        churn_until(&mut soak, until, &mut next_churn, &mut churn_failed).await;
    }
    let until = deadline;
    churn_until(&mut soak, until, &mut next_churn, &mut churn_failed).await;
    load.stop().await;
    shared.stop();
    let rows = sampler.await.unwrap_or_default();
    // The last stop: SIGTERM, and the mirror checked once more.
    if let Err(e) = soak.stop_sidecar(true).await {
        soak.harness.push(format!("final stop: {e}"));
    }

    let findings = std::mem::take(&mut *lock(&shared.findings));
    let mut checks = Vec::new();
    read_checks(&mut checks, &findings, &timings);
    restart_checks(&mut checks, &soak.integrity);
    flat_checks(&mut checks, &rows, warmup, rewarm, interval);
    table_checks(&mut checks, &rows);
    let total_classes = ran.len();
    let missed: Vec<&str> = ran
        .iter()
        .filter(|(_, n)| *n == 0)
        .map(|(c, _)| *c)
        .collect();
    let mut coverage = Check::new(
        "fault classes",
        missed.is_empty(),
        format!("{} of {total_classes} ran", total_classes - missed.len()),
        "every class at least once".into(),
    );
    if !missed.is_empty() {
        if opts.duration < MIN_SLOT * total_classes as u32 {
            coverage.verdict = Verdict::Skip;
            coverage.notes.push(format!(
                "the run is shorter than {total_classes} slots of {MIN_SLOT:?}"
            ));
        }
        coverage
            .notes
            .push(format!("did not run: {}", missed.join(", ")));
    }
    coverage.notes.push(
        ran.iter()
            .map(|(c, n)| format!("{c}×{n}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    checks.push(coverage);
    let mut harness = Check::new(
        "harness actions",
        soak.harness.is_empty(),
        format!("{} failed", soak.harness.len()),
        "0".into(),
    );
    harness.notes.extend(soak.harness.iter().take(10).cloned());
    checks.push(harness);

    let t = &findings.total;
    let mut facts = vec![
        format!(
            "soak: {:.0}s, {entities} entities, {} readers + 1 pager, sample every {:.0}s, warm-up {:.0}s (of the run, and {:.0}s of each restarted process), fault slots {:.1}s (hold {:.1}s), churn {:?} (changed, added, deleted) every {:?}, {} deletions, {churn_failed} churn steps refused (the catalog was down)",
            opts.duration.as_secs_f64(),
            opts.clients,
            interval.as_secs_f64(),
            warmup.as_secs_f64(),
            rewarm.as_secs_f64(),
            slot.as_secs_f64(),
            hold.as_secs_f64(),
            CHURN_STEP,
            CHURN_EVERY,
            soak.deletions
        ),
        format!(
            "reads: {} ok, {} failed, {} not judged ({} in restarts, {} in stale-policy windows), {} fresh, {} stale, {} revalidated, {} answered 503, {} absent for deleted entities; by kind ok/failed: {}",
            t.ok.iter().sum::<u64>(),
            t.failed.iter().sum::<u64>(),
            t.excluded,
            findings.in_restart,
            findings.in_policy,
            t.fresh,
            t.stale,
            t.revalidated,
            t.refused,
            findings.deleted_absent,
            KINDS
                .iter()
                .enumerate()
                .map(|(i, k)| format!("{} {}/{}", k.as_str(), t.ok[i], t.failed[i]))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!(
            "sidecar settings: sync_interval {:?}, fresh_for {:?}, revalidate_budget {:?}, upstream.timeout {:?}, read_through.max_entries {READ_THROUGH_MAX_ENTRIES}, hot_cache.max_bytes {} (largest sampled {}){}",
            timings.sync_interval,
            timings.fresh_for,
            timings.budget,
            timings.upstream_timeout,
            size_text(HOT_CACHE_MAX_BYTES),
            size_text(rows.iter().filter_map(|r| r.hot_cache).max().unwrap_or(0)),
            weakening.map_or(String::new(), |w| format!(", weakened: {}", w.name))
        ),
        format!("csv: {}", csv_path.display()),
    ];
    let report_failed = checks.iter().any(|c| c.verdict == Verdict::Fail);
    if report_failed {
        if let Some(dir) = soak.lab.keep() {
            facts.push(format!("kept the data dir and logs: {}", dir.display()));
        }
    }
    let report = Report {
        checks,
        facts,
        weakening,
    };
    let summary = opts.out.join("summary.txt");
    let _ = std::fs::write(&summary, render(&report));
    Ok(report)
}

async fn churn_until(soak: &mut Soak, until: Instant, next: &mut Instant, failed: &mut usize) {
    loop {
        let now = Instant::now();
        if now >= until {
            return;
        }
        if now >= *next {
            *next = now + CHURN_EVERY;
            if soak.churn_step(0).await.is_err() {
                *failed += 1;
            }
            continue;
        }
        tokio::time::sleep((*next).min(until) - now).await;
    }
}

async fn sample_loop(
    shared: Arc<Shared>,
    status: Arc<Mutex<Status>>,
    admin: String,
    db: PathBuf,
    interval: Duration,
    mut csv: std::fs::File,
) -> Vec<Row> {
    let http = http_client();
    let data_dir = db.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut rows = Vec::new();
    let mut next = Instant::now() + interval;
    loop {
        tokio::time::sleep_until(next).await;
        next += interval;
        let s = lock(&status).clone();
        let mut row = Row {
            at: shared.now(),
            fault: s.fault.clone(),
            restarts: s.restarts,
            reads: shared.take_interval(),
            ..Row::default()
        };
        if let Some(pid) = s.pid {
            row.process_age = s.ready_at.map(|r| r.elapsed());
            // File reads off the runtime's workers, which the readers and
            // the fault proxy share.
            let (dir, path) = (data_dir.clone(), db.clone());
            if let Ok((rss, fds, wal, bytes, tables)) = tokio::task::spawn_blocking(move || {
                (
                    rss_bytes(pid),
                    resources::open_fds(pid),
                    resources::wal_bytes(&path),
                    resources::dir_bytes(&dir),
                    resources::table_rows(&path),
                )
            })
            .await
            {
                row.rss = rss;
                row.fds = fds;
                row.wal = Some(wal);
                row.data_dir = bytes;
                if let Some((g, r, a)) = tables {
                    row.generations = Some(g);
                    row.read_through = Some(r);
                    row.audit = Some(a);
                }
            }
            if let Ok(resp) = http
                .get(format!("http://{admin}/metrics"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if let Ok(text) = resp.text().await {
                    row.tasks = resources::gauge(&text, "catalog_cache_tokio_alive_tasks");
                    row.hot_cache = resources::gauge(&text, "catalog_cache_hot_cache_bytes");
                }
            }
            // A restart may have begun while this sample was taken.
            if lock(&status).pid != Some(pid) {
                row.process_age = None;
            }
        }
        let _ = writeln!(csv, "{}", row.csv());
        rows.push(row);
        if shared_stopped(&shared) {
            let _ = csv.flush();
            return rows;
        }
    }
}

fn shared_stopped(shared: &Shared) -> bool {
    // The readers stop first; the sampler takes the interval they ended in.
    shared.is_stopped()
}

fn examples(c: &mut Check, list: &[String]) {
    c.notes.extend(list.iter().cloned());
}

fn read_checks(checks: &mut Vec<Check>, f: &load::Findings, t: &Timings) {
    let failed = f.count("failed");
    let judged: u64 = f.total.ok.iter().sum::<u64>() + f.total.failed.iter().sum::<u64>();
    let mut c = Check::new(
        "mirrored reads",
        failed == 0 && judged > 0,
        format!("{failed} failed of {judged} judged"),
        "0 failed while stale serving is allowed".into(),
    );
    c.notes.push(format!(
        "not judged: {} reads overlapping a restart (signal to ready), {} overlapping a stale-policy window (refuse sent to serve acknowledged); read-through reads are judged only when answered",
        f.in_restart, f.in_policy
    ));
    examples(&mut c, &f.failed);
    checks.push(c);

    let under = f.count("served_under_refuse");
    let mut c = Check::new(
        "stale policy refuse",
        under == 0,
        format!(
            "{under} stale 200s of {} reads inside refuse",
            f.refuse_judged
        ),
        "0 stale-marked 200s from refuse acknowledged to serve sent".into(),
    );
    examples(&mut c, &f.served_under_refuse);
    checks.push(c);

    let bound = t.read_bound();
    let slow = f.count("slow");
    let mut c = Check::new(
        "read latency",
        slow == 0,
        format!("{slow} slower; worst {}ms", f.worst.as_millis()),
        format!("{}ms ({})", bound.limit.as_millis(), bound.why),
    );
    c.notes.push(format!(
        "every mirrored read that got an answer, policy windows included; reads overlapping a restart are left out (the sidecar binds its listeners before it loads the mirror, so they wait in the accept queue while it starts): their worst was {}ms",
        f.worst_in_restart.as_millis()
    ));
    examples(&mut c, &f.slow);
    checks.push(c);

    let marking = f.count("marking");
    let mut c = Check::new(
        "fresh marking",
        marking == 0,
        format!("{marking} wrong"),
        format!(
            "no answer marked fresh with Age > fresh_for ({}s); X-Catalog-Stale agrees with Cache-Status",
            t.fresh_for.as_secs()
        ),
    );
    examples(&mut c, &f.marking);
    checks.push(c);
}

fn restart_checks(checks: &mut Vec<Check>, integrity: &[(Duration, String)]) {
    let bad: Vec<String> = integrity
        .iter()
        .filter(|(_, s)| s != "ok")
        .map(|(at, s)| format!("at {:.1}s: {s}", at.as_secs_f64()))
        .collect();
    let mut c = Check::new(
        "integrity_check",
        bad.is_empty() && !integrity.is_empty(),
        format!("{} of {} ok", integrity.len() - bad.len(), integrity.len()),
        "ok after every stop (each restart and the end)".into(),
    );
    c.notes.extend(bad);
    checks.push(c);
}

/// Samples per floor window: the slope is fitted on the lowest sample of
/// each run of this many (see `resources::floors`).
pub const FLOOR_SAMPLES: u32 = 10;

/// The fault column of the samples taken between faults (and before the
/// first): the state the resource slopes are fitted in.
pub const BASELINE: &str = "none";

fn flat_checks(
    checks: &mut Vec<Check>,
    rows: &[Row],
    warmup: Duration,
    rewarm: Duration,
    interval: Duration,
) {
    let window_min = rows
        .last()
        .map_or(0.0, |r| r.at.saturating_sub(warmup).as_secs_f64() / 60.0);
    let floor_window = interval * FLOOR_SAMPLES;
    // Resources are compared in one state: the quiet seconds between two
    // faults, with the upstream healthy. A fault sets its own level (a
    // refused upstream drops the pooled connections and their tasks, a
    // slow one holds more), so windows floored during different faults
    // differ by what the fault did, not by growth; a leak raises the
    // baseline as it raises everything.
    let baseline: Vec<Row> = rows
        .iter()
        .filter(|r| r.fault == BASELINE)
        .cloned()
        .collect();
    for f in FLAT {
        let metric = flat_metric(f.name);
        let samples = segments(&baseline, metric, warmup, rewarm);
        let sampled: usize = samples.iter().map(Vec::len).sum();
        let segs = floors(&samples, floor_window.as_secs_f64() / 60.0);
        let max = rows.iter().filter_map(metric).max().unwrap_or(0);
        let first = segs
            .first()
            .and_then(|s| s.first())
            .map(|p| p.1)
            .unwrap_or(0.0);
        let last = segs
            .last()
            .and_then(|s| s.last())
            .map(|p| p.1)
            .unwrap_or(0.0);
        let bound = if window_min > 0.0 {
            f.per_minute.max(f.allowance / window_min)
        } else {
            f.per_minute
        };
        let show = |v: f64| {
            if f.bytes {
                format!("{:+.3} MiB", v / MIB)
            } else {
                format!("{v:+.2}")
            }
        };
        let level = |v: u64| {
            if f.bytes {
                size_text(v)
            } else {
                v.to_string()
            }
        };
        let c = match pooled_slope(&segs) {
            Some(s) => {
                let mut c = Check::new(
                    &format!("flat {}", f.name),
                    s.per_minute <= bound && max <= f.ceiling,
                    format!("{}/min, max {}", show(s.per_minute), level(max)),
                    format!("{}/min, max {}", show(bound), level(f.ceiling)),
                );
                c.notes.push(format!(
                    "least-squares slope over the floors of {} baseline samples (taken between faults; the lowest of each {}s, {} floors) from {} process(es), {:.1} min after the warm-up; floor {} → {}; the bound is {}/min or {} over the {:.1}-minute window, whichever is larger",
                    sampled,
                    floor_window.as_secs(),
                    s.points,
                    s.segments,
                    s.minutes,
                    level(first as u64),
                    level(last as u64),
                    show(f.per_minute),
                    show(f.allowance),
                    window_min
                ));
                let fitted = Duration::from_secs_f64(s.minutes * 60.0);
                if fitted < MIN_FIT && max <= f.ceiling {
                    c.verdict = Verdict::Skip;
                    c.notes.push(format!(
                        "slope not judged: {:.1} min fitted, under the {:.0} min a slope needs to tell a trend from the warm-up; the ceiling holds",
                        s.minutes,
                        MIN_FIT.as_secs_f64() / 60.0
                    ));
                }
                c
            }
            None => {
                let mut c = Check::new(
                    &format!("flat {}", f.name),
                    max <= f.ceiling,
                    format!("no slope, max {}", level(max)),
                    format!("max {}", level(f.ceiling)),
                );
                c.verdict = if max <= f.ceiling {
                    Verdict::Skip
                } else {
                    Verdict::Fail
                };
                c.notes
                    .push("too few samples after the warm-up to fit a slope".into());
                c
            }
        };
        checks.push(c);
    }
}

fn table_checks(checks: &mut Vec<Check>, rows: &[Row]) {
    let tables: [(&str, Metric, u64, &str); 3] = [
        (
            "generations rows",
            |r| r.generations,
            GENERATIONS_KEPT,
            "the sidecar's mirror::GENERATIONS_KEPT",
        ),
        (
            "read_through rows",
            |r| r.read_through,
            READ_THROUGH_MAX_ENTRIES,
            "read_through.max_entries as the soak sets it",
        ),
        (
            "audit rows",
            |r| r.audit,
            AUDIT_ENTRIES_KEPT,
            "the sidecar's mirror::AUDIT_ENTRIES_KEPT",
        ),
    ];
    for (name, metric, bound, why) in tables {
        let sampled: Vec<u64> = rows.iter().filter_map(metric).collect();
        let max = sampled.iter().copied().max();
        let mut c = Check::new(
            name,
            max.is_some_and(|m| m <= bound),
            max.map_or("not sampled".into(), |m| format!("max {m}")),
            format!("≤ {bound} ({why})"),
        );
        if let Some(m) = max {
            if m < bound {
                c.notes.push(format!(
                    "the bound was not reached in this run (at most {m} of {bound})"
                ));
            } else {
                c.notes
                    .push(format!("reached the bound {bound} and held it"));
            }
        }
        checks.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_bounds_are_the_sidecar_s_own() {
        assert_eq!(GENERATIONS_KEPT, catalog_cache::mirror::GENERATIONS_KEPT);
        assert_eq!(
            AUDIT_ENTRIES_KEPT,
            catalog_cache::mirror::AUDIT_ENTRIES_KEPT
        );
    }

    #[test]
    fn every_class_fits_a_two_minute_run_and_slots_stay_in_range() {
        let n = faults::rotation(&Timings::BASE).len();
        assert!(
            MIN_SLOT * n as u32 <= Duration::from_secs(120),
            "{n} classes"
        );
        assert_eq!(slot(Duration::from_secs(10), n), MIN_SLOT);
        assert_eq!(slot(Duration::from_secs(7200), n), MAX_SLOT);
        assert_eq!(
            default_warmup(Duration::from_secs(1800)),
            Duration::from_secs(300)
        );
        assert_eq!(
            default_warmup(Duration::from_secs(40)),
            Duration::from_secs(20)
        );
    }

    /// 30 minutes sampled every 6 s, one process, in 40 s fault slots
    /// whose last 12 s are the baseline; `fds(minute, in_fault)` is the
    /// open descriptors then.
    fn fds_rows(fds: impl Fn(f64, bool) -> u64) -> Vec<Row> {
        (1..=300u64)
            .map(|i| {
                let at = Duration::from_secs(i * 6);
                let in_fault = (i * 6) % 40 < 28;
                Row {
                    at,
                    fault: if in_fault { "refuse" } else { BASELINE }.into(),
                    process_age: Some(at),
                    fds: Some(fds(at.as_secs_f64() / 60.0, in_fault)),
                    ..Row::default()
                }
            })
            .collect()
    }

    fn fds_verdict(rows: &[Row]) -> Verdict {
        let mut checks = Vec::new();
        let minute = Duration::from_secs(60);
        flat_checks(
            &mut checks,
            rows,
            5 * minute,
            2 * minute,
            Duration::from_secs(6),
        );
        checks
            .into_iter()
            .find(|c| c.name == "flat fds")
            .map(|c| c.verdict)
            .unwrap()
    }

    #[test]
    fn resources_are_judged_between_faults_where_a_leak_still_shows() {
        // A fault that drops five pooled connections, in a rotation whose
        // windows catch it unevenly, is not growth ...
        let flat = fds_rows(|_, in_fault| if in_fault { 24 } else { 29 });
        assert_eq!(fds_verdict(&flat), Verdict::Pass);
        // ... a descriptor leaked a minute is, in every state.
        let leak = fds_rows(|min, in_fault| (min as u64) + if in_fault { 24 } else { 29 });
        assert_eq!(fds_verdict(&leak), Verdict::Fail);
    }

    #[test]
    fn a_failed_check_fails_the_report_and_shows_the_weakening() {
        let mut checks = Vec::new();
        let f = load::Findings::default();
        read_checks(&mut checks, &f, &Timings::BASE);
        let report = Report {
            checks,
            facts: Vec::new(),
            weakening: Some(WEAKENINGS[1]),
        };
        // No read judged at all is a FAIL, not a vacuous PASS.
        assert!(!report.passed());
        assert_eq!(report.weakening_shown(), Some(true));
        assert!(render(&report).contains("| mirrored reads"));
    }
}
