//! The abuse suite of `catalog-chaos abuse`: hostile clients against the
//! real `catalog-cache` binary, one attack per row, each judged by the
//! same invariants plus its own.
//!
//! `run` picks the attacks (`--only`, `--weaken`), runs each in a fresh
//! [`Lab`] (the demo catalog and the sidecar as child processes, on free
//! loopback ports) and returns the table rows; `render` prints them. While
//! an attack runs, `exercise` keeps a [`Bystander`] reading on both
//! listeners, samples `/status` ([`Monitor`]) and the sidecar's RSS
//! ([`RssMonitor`]); afterwards it checks, for every attack: bystander p99
//! and failures, the same PID alive, peak RSS under the attack's stated
//! [`Ceiling`], `PRAGMA integrity_check`, the breaker `closed` in every
//! sample, and no request outside Backstage's catalog routes at the demo
//! catalog (its `unrouted` count). The attacks live in the files beside
//! this one, one group each; an attack returns what it sent, its own
//! failed checks and its ceiling ([`Attacked`]).
//!
//! Invariant: every bound is derived from the [`Limits`] the attack starts
//! the sidecar with (plus a stated margin), never from a weakening's
//! setting, so a weakening that breaks a limit turns the attack to FAIL.

mod admin;
mod bodies;
mod files;
mod paths;
mod queries;
mod read_through;
mod slow;

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use crate::scenario::{
    integrity_check, percentile, render_grid, rss_bytes, size_text, Bystander, Ceiling,
    HarnessError, Lab, LabOptions, Monitor, Probe, RssMonitor, RssSample, StatusSample, Timings,
    Tuning, Verdict,
};
pub use crate::scenarios::{RunOptions, Weakening};

/// The bystander's promise: the 99th percentile of its requests on each
/// listener, measured from the client over loopback.
pub const BYSTANDER_P99: Duration = Duration::from_millis(50);
/// What the RSS ceilings allow beyond what an attack's settings account
/// for: allocator arenas and fragmentation of a debug build, the
/// bystander's, monitor's and attack's own connections, and tokio's
/// blocking threads.
pub const RSS_MARGIN: u64 = 16 << 20;
/// How often `/status` is sampled for the breaker's state.
pub const STATUS_PERIOD: Duration = Duration::from_millis(100);
/// How long the bystander reads before an attack starts (the RSS before
/// is read at its end) and after it ends.
pub const SETTLE: Duration = Duration::from_millis(500);
/// What an answer bounded by a sidecar setting (e.g. `proxy.query_budget`)
/// may take beyond it when timed from the client: the HTTP exchange over
/// loopback and the scheduling of a debug build on two cores.
pub const ANSWER_MARGIN: Duration = Duration::from_secs(1);

/// How long a restarted sidecar may take to be ready with the whole
/// mirror (loaded from its file; `kill-sidecar` of the chaos run allows 10 s
/// for 5,000 entities in a debug build).
pub const READY_AFTER_RESTART: Duration = Duration::from_secs(10);

/// The sidecar's freshness and sync timings during an attack: the shipped
/// defaults (a sync a minute, data fresh for 90 s), so that the bystander's
/// reads are answered from the mirror and no sync runs while an attack does.
pub const ABUSE_TIMINGS: Timings = Timings {
    sync_interval: Duration::from_secs(60),
    fresh_for: Duration::from_secs(90),
    ..Timings::BASE
};

/// The sidecar limits an attack runs with; every bound it checks derives
/// from these. [`Limits::DEFAULT`] is the shipped configuration.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Limits {
    /// `proxy.query_budget`.
    pub query_budget: Duration,
    /// `proxy.max_request_body`.
    pub max_request_body: u64,
    /// `proxy.sort_columns_max_bytes`.
    pub sort_columns_max_bytes: u64,
    /// `listen.header_read_timeout`.
    pub header_read_timeout: Duration,
    /// `listen.body_read_timeout`.
    pub body_read_timeout: Duration,
    /// `listen.idle_timeout`.
    pub idle_timeout: Duration,
    /// `listen.proxy_max_connections`.
    pub proxy_max_connections: usize,
    /// `read_through.max_entries`.
    pub read_through_max_entries: u64,
    /// `read_through.max_bytes`.
    pub read_through_max_bytes: u64,
    /// `upstream.max_in_flight`.
    pub upstream_max_in_flight: usize,
    /// `hot_cache.max_bytes`.
    pub hot_cache_max_bytes: u64,
}

impl Limits {
    /// The shipped defaults (`config/catalog-cache.toml`).
    pub const DEFAULT: Limits = Limits {
        query_budget: Duration::from_secs(1),
        max_request_body: 1 << 20,
        sort_columns_max_bytes: 32 << 20,
        header_read_timeout: Duration::from_secs(10),
        body_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        proxy_max_connections: 1024,
        read_through_max_entries: 1000,
        read_through_max_bytes: 8 << 20,
        upstream_max_in_flight: 32,
        hot_cache_max_bytes: 64 << 20,
    };

    /// The `CATALOG_CACHE_*` variables that set these.
    pub fn env(&self) -> Vec<(String, String)> {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        [
            ("CATALOG_CACHE_PROXY_QUERY_BUDGET", ms(self.query_budget)),
            (
                "CATALOG_CACHE_PROXY_MAX_REQUEST_BODY",
                self.max_request_body.to_string(),
            ),
            (
                "CATALOG_CACHE_PROXY_SORT_COLUMNS_MAX_BYTES",
                self.sort_columns_max_bytes.to_string(),
            ),
            (
                "CATALOG_CACHE_LISTEN_HEADER_READ_TIMEOUT",
                ms(self.header_read_timeout),
            ),
            (
                "CATALOG_CACHE_LISTEN_BODY_READ_TIMEOUT",
                ms(self.body_read_timeout),
            ),
            ("CATALOG_CACHE_LISTEN_IDLE_TIMEOUT", ms(self.idle_timeout)),
            (
                "CATALOG_CACHE_LISTEN_PROXY_MAX_CONNECTIONS",
                self.proxy_max_connections.to_string(),
            ),
            (
                "CATALOG_CACHE_READ_THROUGH_MAX_ENTRIES",
                self.read_through_max_entries.to_string(),
            ),
            (
                "CATALOG_CACHE_READ_THROUGH_MAX_BYTES",
                self.read_through_max_bytes.to_string(),
            ),
            (
                "CATALOG_CACHE_UPSTREAM_MAX_IN_FLIGHT",
                self.upstream_max_in_flight.to_string(),
            ),
            (
                "CATALOG_CACHE_HOT_CACHE_MAX_BYTES",
                self.hot_cache_max_bytes.to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// One attack: its name, what it does and what it checks beyond the
/// invariants every attack shares.
#[derive(Debug, Clone, Copy)]
pub struct Attack {
    /// Its `--only` name.
    pub name: &'static str,
    /// What it does.
    pub about: &'static str,
    /// Its own checks.
    pub checks: &'static str,
}

/// Every attack, in run order.
pub const ATTACKS: &[Attack] = &[
    queries::CONTAINS,
    queries::DEEP_FIELDS,
    queries::ORDER_FLOOD,
    bodies::BY_REFS,
    admin::SNAPSHOT,
    paths::RAW_PATHS,
    paths::HTML_UPSTREAM,
    slow::SLOW_CLIENTS,
    read_through::READ_THROUGH,
    admin::BREAKER_FOREVER,
    files::FILE_MODES,
];

/// Every weakening of the suite.
pub const WEAKENINGS: &[Weakening] = &[
    Weakening {
        name: "no-budget",
        about: "proxy.query_budget = 1m: a hostile query runs for a minute",
        env: &[("CATALOG_CACHE_PROXY_QUERY_BUDGET", "1m")],
        breaks: &[queries::CONTAINS.name, queries::DEEP_FIELDS.name],
        action: None,
    },
    Weakening {
        name: "huge-sort-cache",
        about: "proxy.sort_columns_max_bytes = 4GiB: every field ordered by keeps its sort column",
        env: &[("CATALOG_CACHE_PROXY_SORT_COLUMNS_MAX_BYTES", "4GiB")],
        breaks: &[queries::ORDER_FLOOD.name],
        action: None,
    },
    Weakening {
        name: "no-timeouts",
        about: "listen.header_read_timeout = body_read_timeout = idle_timeout = 1h: slow clients keep their connections",
        env: &[
            ("CATALOG_CACHE_LISTEN_HEADER_READ_TIMEOUT", "1h"),
            ("CATALOG_CACHE_LISTEN_BODY_READ_TIMEOUT", "1h"),
            ("CATALOG_CACHE_LISTEN_IDLE_TIMEOUT", "1h"),
        ],
        breaks: &[slow::SLOW_CLIENTS.name],
        action: None,
    },
    Weakening {
        name: "huge-read-through",
        about: "read_through.max_entries = 1000000, max_bytes = 4GiB: every read-through answer is kept",
        env: &[
            ("CATALOG_CACHE_READ_THROUGH_MAX_ENTRIES", "1000000"),
            ("CATALOG_CACHE_READ_THROUGH_MAX_BYTES", "4GiB"),
        ],
        breaks: &[read_through::READ_THROUGH.name],
        action: None,
    },
];

/// Every attack name, in run order.
pub fn names() -> Vec<&'static str> {
    ATTACKS.iter().map(|a| a.name).collect()
}

/// Sizes of the attacks in one run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// CI sizes.
    pub quick: bool,
    /// Entities in the demo catalog.
    pub entities: usize,
    /// How long a repeated attack keeps sending.
    pub attack_for: Duration,
    /// Generator seed.
    pub seed: u64,
}

impl Sizes {
    /// The quick (CI) or full sizes.
    pub fn new(quick: bool, seed: u64) -> Sizes {
        let tuning = Tuning::new(quick, seed);
        Sizes {
            quick,
            entities: tuning.entities,
            attack_for: Duration::from_secs(if quick { 3 } else { 6 }),
            seed,
        }
    }
}

/// One row of the abuse table.
#[derive(Debug, Clone)]
pub struct AbuseOutcome {
    /// Attack name.
    pub name: String,
    /// Requests (or connections) the attack sent.
    pub requests: usize,
    /// Bystander p99 on the proxy listener (`None`: no read made).
    pub p99_proxy: Option<Duration>,
    /// Bystander p99 on the admin listener.
    pub p99_admin: Option<Duration>,
    /// Bystander requests made, both listeners.
    pub probes: usize,
    /// Bystander requests that failed, both listeners.
    pub probe_failures: usize,
    /// The highest RSS read during the attack.
    pub peak_rss: Option<u64>,
    /// The attack's ceiling.
    pub ceiling: Option<Ceiling>,
    /// `closed`, or the first other state seen and when.
    pub breaker: String,
    /// `ok` or what the check said.
    pub integrity: String,
    /// Requests the demo catalog saw outside its routes.
    pub unrouted: Option<u64>,
    /// The verdict.
    pub verdict: Verdict,
    /// Failure lines first (the first is the row's why), then notes.
    pub notes: Vec<String>,
    /// Wall time.
    pub took: Duration,
}

impl AbuseOutcome {
    fn new(name: &str) -> AbuseOutcome {
        AbuseOutcome {
            name: name.to_string(),
            requests: 0,
            p99_proxy: None,
            p99_admin: None,
            probes: 0,
            probe_failures: 0,
            peak_rss: None,
            ceiling: None,
            breaker: "-".into(),
            integrity: "-".into(),
            unrouted: None,
            verdict: Verdict::Pass,
            notes: Vec::new(),
            took: Duration::ZERO,
        }
    }

    /// A row for an attack whose harness broke (counted as FAIL).
    fn broken(name: &str, error: &HarnessError) -> AbuseOutcome {
        AbuseOutcome {
            verdict: Verdict::Fail,
            notes: vec![format!("harness: {error}")],
            ..AbuseOutcome::new(name)
        }
    }
}

/// Renders the abuse table and one line per failure and note.
pub fn render(rows: &[AbuseOutcome]) -> String {
    let ms = |d: Option<Duration>| {
        d.map_or("-".to_string(), |d| {
            format!("{:.1}", d.as_secs_f64() * 1000.0)
        })
    };
    let header = [
        "attack",
        "requests",
        "p99 proxy ms",
        "p99 admin ms",
        "bystander fails",
        "peak RSS / ceiling MiB",
        "breaker",
        "integrity",
        "unrouted",
        "took",
        "verdict",
    ];
    let mb = |b: u64| format!("{:.0}", b as f64 / (1024.0 * 1024.0));
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.requests.to_string(),
                ms(r.p99_proxy),
                ms(r.p99_admin),
                format!("{}/{}", r.probe_failures, r.probes),
                match (r.peak_rss, &r.ceiling) {
                    (Some(p), Some(c)) => format!("{} / {}", mb(p), mb(c.limit)),
                    (Some(p), None) => format!("{} / -", mb(p)),
                    _ => "-".into(),
                },
                r.breaker.clone(),
                r.integrity.clone(),
                r.unrouted.map_or("-".into(), |u| u.to_string()),
                format!("{:.0}s", r.took.as_secs_f64()),
                r.verdict.as_str().to_string(),
            ]
        })
        .collect();
    let notes: Vec<(&str, Verdict, &[String])> = rows
        .iter()
        .map(|r| (r.name.as_str(), r.verdict, r.notes.as_slice()))
        .collect();
    render_grid(&header, &cells, &notes)
}

/// Runs the chosen attacks and returns one row each.
pub async fn run(opts: &RunOptions) -> Result<Vec<AbuseOutcome>, String> {
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
    let all = names();
    for o in &opts.only {
        if !all.contains(&o.as_str()) {
            return Err(format!("unknown attack '{o}'; known: {}", all.join(", ")));
        }
    }
    let chosen: Vec<&Attack> = ATTACKS
        .iter()
        .filter(|a| opts.only.is_empty() || opts.only.iter().any(|o| o == a.name))
        .filter(|a| weakening.is_none_or(|w| w.breaks.contains(&a.name)))
        .collect();
    if chosen.is_empty() {
        return Err("no attack selected".into());
    }
    let extra: Vec<(String, String)> = weakening
        .map(|w| {
            w.env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let sizes = Sizes::new(opts.quick, opts.seed);
    let mut rows = Vec::new();
    for attack in chosen {
        eprintln!("catalog-chaos: attack {} ...", attack.name);
        let started = Instant::now();
        let mut row = exercise(attack, &opts.sidecar, &sizes, &extra)
            .await
            .unwrap_or_else(|e| AbuseOutcome::broken(attack.name, &e));
        row.took = started.elapsed();
        eprintln!(
            "catalog-chaos: attack {}: {:?} in {:.1}s",
            attack.name,
            row.verdict,
            row.took.as_secs_f64()
        );
        rows.push(row);
    }
    Ok(rows)
}

/// What an attack reports back to [`exercise`].
#[derive(Debug, Default)]
pub(crate) struct Attacked {
    /// Requests (or connections) sent.
    pub requests: usize,
    /// Its own checks that failed, one line each.
    pub failures: Vec<String>,
    /// Facts worth a line.
    pub notes: Vec<String>,
    /// The RSS ceiling it states (`None`: before + [`RSS_MARGIN`]).
    pub ceiling: Option<Ceiling>,
}

impl Attacked {
    fn fail(&mut self, line: String) {
        self.failures.push(line);
    }
}

/// What an attack has at hand while it runs.
pub(crate) struct Field<'a> {
    /// The lab: the demo catalog and the sidecar.
    pub lab: &'a mut Lab,
    /// The settings the sidecar was started with (before any weakening).
    pub limits: Limits,
    /// Run sizes.
    pub sizes: Sizes,
    /// The origin of every time reported.
    pub origin: Instant,
    /// The bystander (to pause its proxy loop).
    pub bystander: &'a Bystander,
    /// The RSS reader (told about restarts).
    pub rss: &'a RssMonitor,
    /// The sidecar's RSS just before the attack.
    pub rss_before: u64,
    /// Deliberate restarts: from the kill to the new process being ready;
    /// samples inside these windows are not held against the sidecar.
    pub restarts: Vec<(Duration, Duration)>,
}

impl Field<'_> {
    /// The proxy listener's address.
    pub fn proxy(&self) -> String {
        self.lab.sidecar.proxy.clone()
    }

    /// The admin listener's address.
    pub fn admin(&self) -> String {
        self.lab.sidecar.admin.clone()
    }

    /// `RSS before + extra + margin`, with the derivation.
    pub fn ceiling(&self, extra: u64, why: &str) -> Ceiling {
        Ceiling {
            limit: self.rss_before + extra + RSS_MARGIN,
            why: format!(
                "RSS before {} + {why} + margin {}",
                size_text(self.rss_before),
                size_text(RSS_MARGIN)
            ),
        }
    }

    /// Kills the sidecar (SIGKILL), starts it again with its data dir and
    /// settings, waits until it is ready (at most [`READY_AFTER_RESTART`])
    /// and follows the new PID. A sidecar that does not get ready is the
    /// attack's failure, returned as `Ok(Some(why))`; only a process that
    /// cannot be started is the harness's.
    pub async fn restart_sidecar(&mut self) -> Result<Option<String>, HarnessError> {
        let from = self.origin.elapsed();
        self.lab.sidecar.start()?;
        let ready = self
            .lab
            .sidecar
            .wait_ready(self.lab.entities, READY_AFTER_RESTART)
            .await;
        if let Some(pid) = self.lab.sidecar.pid() {
            self.rss.follow(pid);
        }
        // The next RSS sample of the new process is a period away.
        tokio::time::sleep(crate::scenario::RSS_PERIOD).await;
        self.restarts.push((from, self.origin.elapsed()));
        Ok(ready.err().map(|e| format!("after a restart: {e}")))
    }
}

/// Runs one attack in a fresh lab and checks every invariant.
async fn exercise(
    attack: &Attack,
    bin: &std::path::Path,
    sizes: &Sizes,
    extra: &[(String, String)],
) -> Result<AbuseOutcome, HarnessError> {
    let limits = limits_for(attack.name);
    let mut options = LabOptions::new(sizes.entities, sizes.seed, ABUSE_TIMINGS);
    options.extra_env = limits.env();
    options.extra_env.extend(extra.iter().cloned());
    if attack.name == files::FILE_MODES.name {
        options.mirror = Some(PathBuf::from(files::MIRROR_IN_NEW_DIR));
        options.umask = Some(files::UMASK);
    }
    let mut lab = Lab::start_opts(bin, options).await?;
    let mut prepared = Vec::new();
    if attack.name == queries::ORDER_FLOOD.name {
        prepared.push(queries::prepare_order(&mut lab).await?);
    }
    let pid = lab
        .sidecar
        .pid()
        .ok_or_else(|| HarnessError::Http("the sidecar is not running".into()))?;
    let origin = Instant::now();
    let rss = RssMonitor::start(pid, origin);
    let monitor = Monitor::start_every(lab.sidecar.admin.clone(), origin, STATUS_PERIOD);
    let bystander = Bystander::start(
        lab.sidecar.catalog_url(),
        lab.sidecar.admin.clone(),
        lab.targets.clone(),
        origin,
        sizes.seed,
    );
    tokio::time::sleep(SETTLE).await;
    let rss_before = rss_bytes(pid).unwrap_or(0);
    let attack_from = origin.elapsed();
    let mut field = Field {
        lab: &mut lab,
        limits,
        sizes: *sizes,
        origin,
        bystander: &bystander,
        rss: &rss,
        rss_before,
        restarts: Vec::new(),
    };
    let attacked = match attack.name {
        n if n == queries::CONTAINS.name => queries::contains(&mut field).await,
        n if n == queries::DEEP_FIELDS.name => queries::deep_fields(&mut field).await,
        n if n == queries::ORDER_FLOOD.name => queries::order_flood(&mut field).await,
        n if n == bodies::BY_REFS.name => bodies::by_refs(&mut field).await,
        n if n == admin::SNAPSHOT.name => admin::snapshot(&mut field).await,
        n if n == paths::RAW_PATHS.name => paths::raw_paths(&mut field).await,
        n if n == paths::HTML_UPSTREAM.name => paths::html_upstream(&mut field).await,
        n if n == slow::SLOW_CLIENTS.name => slow::slow_clients(&mut field).await,
        n if n == read_through::READ_THROUGH.name => read_through::read_through(&mut field).await,
        n if n == admin::BREAKER_FOREVER.name => admin::breaker_forever(&mut field).await,
        n if n == files::FILE_MODES.name => files::file_modes(&mut field).await,
        other => Err(HarnessError::Http(format!("no attack named {other}"))),
    };
    let restarts = std::mem::take(&mut field.restarts);
    let attacked = match attacked {
        Ok(a) => a,
        Err(e) => {
            let _ = bystander.stop().await;
            let _ = monitor.stop().await;
            let _ = rss.stop().await;
            let mut row = AbuseOutcome::broken(attack.name, &e);
            keep_on_failure(&mut row, &mut lab);
            return Ok(row);
        }
    };
    tokio::time::sleep(SETTLE).await;
    let (proxy, admin_probes) = bystander.stop().await;
    let (status, unanswered) = monitor.stop_with_errors().await;
    let rss_samples = rss.stop().await;
    let in_restart = |at: Duration| restarts.iter().any(|(f, t)| at >= *f && at <= *t);
    // A bystander request that overlapped a deliberate restart is not held
    // against the sidecar.
    let outside_restarts = |probes: Vec<Probe>| -> Vec<Probe> {
        probes
            .into_iter()
            .filter(|p| {
                !restarts
                    .iter()
                    .any(|(f, t)| p.at <= *t && p.at + p.latency >= *f)
            })
            .collect()
    };
    let (proxy, admin_probes) = (outside_restarts(proxy), outside_restarts(admin_probes));

    let mut row = AbuseOutcome::new(attack.name);
    let mut failures: Vec<String> = attacked.failures;
    let mut notes: Vec<String> = prepared;
    notes.extend(attacked.notes);
    row.requests = attacked.requests;

    // The bystander.
    let mut judge = |what: &str, probes: &[Probe]| -> Option<Duration> {
        if probes.is_empty() {
            failures.push(format!("bystander: no {what} request was made"));
            return None;
        }
        let latencies: Vec<Duration> = probes.iter().map(|p| p.latency).collect();
        let p99 = percentile(&latencies, 99.0);
        if p99 > BYSTANDER_P99 {
            let worst = latencies.iter().max().copied().unwrap_or_default();
            failures.push(format!(
                "bystander: {what} p99 {}ms over {}ms ({} requests, worst {}ms)",
                p99.as_millis(),
                BYSTANDER_P99.as_millis(),
                probes.len(),
                worst.as_millis()
            ));
        }
        let failed: Vec<&Probe> = probes.iter().filter(|p| p.failure.is_some()).collect();
        if let Some(first) = failed.first() {
            failures.push(format!(
                "bystander: {} of {} {what} requests failed; first at {:.1}s: {}",
                failed.len(),
                probes.len(),
                first.at.as_secs_f64(),
                first.failure.as_deref().unwrap_or("")
            ));
        }
        Some(p99)
    };
    row.p99_proxy = judge("proxy (by-name)", &proxy);
    row.p99_admin = judge("admin (/livez)", &admin_probes);
    row.probes = proxy.len() + admin_probes.len();
    row.probe_failures = proxy
        .iter()
        .chain(&admin_probes)
        .filter(|p| p.failure.is_some())
        .count();

    // The process: the same PID (or the one a deliberate restart made),
    // never gone.
    let expected = rss_samples.last().map(|s| s.pid).unwrap_or(pid);
    let gone: Vec<&RssSample> = rss_samples
        .iter()
        .filter(|s| s.bytes.is_none() && !in_restart(s.at))
        .collect();
    if lab.sidecar.exited() {
        failures.push(format!(
            "the sidecar exited (log: {})",
            lab.sidecar.log().display()
        ));
    } else if lab.sidecar.pid() != Some(expected) {
        failures.push(format!(
            "the sidecar's PID changed from {expected} to {:?}",
            lab.sidecar.pid()
        ));
    }
    if let Some(first) = gone.first() {
        failures.push(format!(
            "the sidecar (PID {}) was gone at {:.1}s",
            first.pid,
            first.at.as_secs_f64()
        ));
    }
    if !restarts.is_empty() {
        notes.push(format!(
            "restarted on purpose {} time(s); the PID is judged per run",
            restarts.len()
        ));
    }

    // Memory.
    let ceiling = attacked.ceiling.unwrap_or_else(|| Ceiling {
        limit: rss_before + RSS_MARGIN,
        why: format!(
            "RSS before {} + margin {} (the attack holds nothing by design)",
            size_text(rss_before),
            size_text(RSS_MARGIN)
        ),
    });
    let peak = rss_samples
        .iter()
        .filter(|s| s.at >= attack_from)
        .filter_map(|s| s.bytes.map(|b| (s.at, b)))
        .max_by_key(|(_, b)| *b);
    row.peak_rss = peak.map(|(_, b)| b);
    if let Some((at, bytes)) = peak {
        if bytes > ceiling.limit {
            failures.push(format!(
                "RSS {} at {:.1}s over the ceiling {}",
                size_text(bytes),
                at.as_secs_f64(),
                ceiling.describe()
            ));
        }
    } else {
        failures.push("no RSS reading during the attack".into());
    }
    notes.push(format!("RSS ceiling: {}", ceiling.describe()));
    row.ceiling = Some(ceiling);

    // The mirror file.
    let db = lab.sidecar.db();
    row.integrity = match tokio::task::spawn_blocking(move || integrity_check(&db)).await {
        Ok(Ok(s)) if s == "ok" => "ok".into(),
        Ok(Ok(s)) => {
            failures.push(format!("integrity_check said {s}"));
            "FAIL".into()
        }
        Ok(Err(e)) => {
            failures.push(e);
            "FAIL".into()
        }
        Err(e) => {
            failures.push(format!("integrity_check: {e}"));
            "FAIL".into()
        }
    };

    // The breaker.
    row.breaker = judge_breaker(&status, &unanswered, &in_restart, &mut failures);

    // The upstream saw only catalog routes.
    match lab.upstream.stats().await {
        Ok(stats) => {
            let unrouted = stats["unrouted"].as_u64().unwrap_or(0);
            row.unrouted = Some(unrouted);
            if unrouted > 0 {
                let paths: Vec<String> = stats["unrouted_paths"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .take(5)
                            .filter_map(|p| p.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                failures.push(format!(
                    "the demo catalog received {unrouted} request(s) outside its routes, e.g. {}",
                    paths.join(", ")
                ));
            }
        }
        Err(e) => failures.push(format!("cannot read the demo catalog's stats: {e}")),
    }

    if !failures.is_empty() {
        row.verdict = Verdict::Fail;
    }
    notes.push(format!(
        "replay: catalog-chaos abuse{} --only {} --seed {}",
        if sizes.quick { " --quick" } else { "" },
        attack.name,
        sizes.seed
    ));
    failures.extend(notes);
    row.notes = failures;
    if row.verdict == Verdict::Fail {
        keep_on_failure(&mut row, &mut lab);
    }
    Ok(row)
}

/// `closed` when every `/status` sample said so (and none went
/// unanswered outside a deliberate restart), else the first other state.
fn judge_breaker(
    status: &[StatusSample],
    unanswered: &[(Duration, String)],
    in_restart: &dyn Fn(Duration) -> bool,
    failures: &mut Vec<String>,
) -> String {
    let mut shown = "closed".to_string();
    if status.is_empty() {
        failures.push("/status never answered".into());
        shown = "?".into();
    }
    if let Some(s) = status.iter().find(|s| s.breaker != "closed") {
        let opened = status.iter().filter(|s| s.breaker != "closed").count();
        failures.push(format!(
            "the breaker was {} at {:.1}s ({} of {} samples not closed)",
            s.breaker,
            s.at.as_secs_f64(),
            opened,
            status.len()
        ));
        shown = format!("{}@{:.1}s", s.breaker, s.at.as_secs_f64());
    }
    let missed: Vec<&(Duration, String)> = unanswered
        .iter()
        .filter(|(at, _)| !in_restart(*at))
        .collect();
    if let Some((at, what)) = missed.first() {
        failures.push(format!(
            "/status gave no JSON {} time(s); first at {:.1}s: {what}",
            missed.len(),
            at.as_secs_f64()
        ));
        if shown == "closed" {
            shown = "?".into();
        }
    }
    shown
}

/// Keeps the lab's data dir (logs, mirror) of a failed attack.
fn keep_on_failure(row: &mut AbuseOutcome, lab: &mut Lab) {
    if let Some(dir) = lab.keep() {
        row.notes
            .push(format!("logs and database kept in {}", dir.display()));
    }
}

/// The limits each attack starts the sidecar with.
fn limits_for(name: &str) -> Limits {
    match name {
        n if n == slow::SLOW_CLIENTS.name => slow::limits(),
        n if n == read_through::READ_THROUGH.name => read_through::limits(),
        _ => Limits::DEFAULT,
    }
}

/// The answers of a batch of attack requests, tallied by status (0 for no
/// answer in time or a transport error).
#[derive(Debug, Default)]
pub(crate) struct Tally {
    /// Status → count.
    pub by_status: std::collections::BTreeMap<u16, usize>,
    /// The slowest answer.
    pub slowest: Duration,
    /// The first answer that broke the attack's rule, and why.
    pub first_bad: Option<String>,
    /// Answers that broke the attack's rule.
    pub bad: usize,
}

impl Tally {
    /// Records one answer; `bad` says why it broke the rule, if it did.
    pub fn add(&mut self, status: u16, took: Duration, bad: Option<String>) {
        *self.by_status.entry(status).or_default() += 1;
        self.slowest = self.slowest.max(took);
        if let Some(why) = bad {
            self.bad += 1;
            self.first_bad.get_or_insert(why);
        }
    }

    /// How many answers.
    pub fn count(&self) -> usize {
        self.by_status.values().sum()
    }

    /// `{200: 3, 400: 1}` in words.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .by_status
            .iter()
            .map(|(s, n)| {
                if *s == 0 {
                    format!("{n}× no answer")
                } else {
                    format!("{n}× {s}")
                }
            })
            .collect();
        format!(
            "{} (slowest {}ms)",
            parts.join(", "),
            self.slowest.as_millis()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_weakening_names_known_attacks_and_sets_known_variables() {
        let known = names();
        let env: Vec<String> = Limits::DEFAULT.env().into_iter().map(|(k, _)| k).collect();
        for w in WEAKENINGS {
            assert!(!w.breaks.is_empty(), "{}", w.name);
            for b in w.breaks {
                assert!(known.contains(b), "{}: {b}", w.name);
            }
            for (k, _) in w.env {
                assert!(env.iter().any(|e| e == k), "{}: {k}", w.name);
            }
        }
        let mut sorted = known.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), known.len(), "attack names are unique");
    }

    #[test]
    fn the_default_limits_are_the_shipped_configuration() {
        let shipped = include_str!("../../../config/catalog-cache.toml");
        for (needle, value) in [
            ("query_budget = ", "\"1s\""),
            ("max_request_body = ", "\"1MiB\""),
            ("sort_columns_max_bytes = ", "\"32MiB\""),
            ("header_read_timeout = ", "\"10s\""),
            ("body_read_timeout = ", "\"10s\""),
            ("idle_timeout = ", "\"1m\""),
            ("proxy_max_connections = ", "1024"),
            ("max_entries = ", "1000"),
            ("max_bytes = ", "\"8MiB\""),
            ("max_in_flight = ", "32"),
            ("max_bytes = ", "\"64MiB\""),
        ] {
            assert!(
                shipped.contains(&format!("{needle}{value}")),
                "config/catalog-cache.toml no longer says {needle}{value}"
            );
        }
    }

    #[test]
    fn the_table_has_a_row_per_attack_and_its_why() {
        let mut bad = AbuseOutcome::new("order-3500");
        bad.verdict = Verdict::Fail;
        bad.notes = vec!["RSS 300 MiB over the ceiling".into()];
        bad.peak_rss = Some(300 << 20);
        bad.ceiling = Some(Ceiling {
            limit: 100 << 20,
            why: "x".into(),
        });
        let text = render(&[bad, AbuseOutcome::new("file-modes")]);
        assert!(text.contains("| order-3500"), "{text}");
        assert!(text.contains("300 / 100"), "{text}");
        assert!(
            text.contains("order-3500 [FAIL]: RSS 300 MiB over the ceiling"),
            "{text}"
        );
        assert!(text.contains("| file-modes"), "{text}");
    }

    #[test]
    fn a_tally_counts_by_status_and_keeps_the_first_bad_answer() {
        let mut t = Tally::default();
        t.add(200, Duration::from_millis(5), None);
        t.add(0, Duration::from_millis(900), Some("no answer".into()));
        t.add(0, Duration::from_millis(100), Some("later".into()));
        assert_eq!(t.count(), 3);
        assert_eq!(t.bad, 2);
        assert_eq!(t.first_bad.as_deref(), Some("no answer"));
        assert_eq!(t.describe(), "2× no answer, 1× 200 (slowest 900ms)");
    }
}
