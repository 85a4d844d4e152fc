//! The chaos scenarios of `catalog-chaos run`: one fault each, driven
//! against the real `catalog-cache` binary while clients read, each with
//! the invariants it checks stated in its plan.
//!
//! `run` picks the scenarios (`--only`, `--weaken`), runs them one after
//! another with fresh processes and data dirs, and returns the table rows.
//! A weakening starts the sidecar with a deliberately bad configuration;
//! the scenarios it names must then FAIL, which proves they can.

mod netns;

use std::path::PathBuf;

use crate::faultproxy::NetFaults;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::scenario::{
    integrity_check, Bound, Failing, HarnessError, Lab, Load, Monitor, Outcome, Sample,
    StatusSample, Timings, Tuning, Verdict,
};

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// CI sizes and timings.
    pub quick: bool,
    /// The `catalog-cache` binary.
    pub sidecar: PathBuf,
    /// Only these scenarios (empty: all).
    pub only: Vec<String>,
    /// A weakening to apply (runs only the scenarios it targets).
    pub weaken: Option<String>,
    /// Generator seed.
    pub seed: u64,
    /// Make every network fault with the fault proxy, even where the
    /// kernel could (`--net-mechanism fault-proxy`).
    pub proxy_only: bool,
}

/// A deliberately weakened sidecar configuration and the scenarios it
/// must turn to FAIL.
#[derive(Debug, Clone, Copy)]
pub struct Weakening {
    /// Its `--weaken` name.
    pub name: &'static str,
    /// What it does.
    pub about: &'static str,
    /// `CATALOG_CACHE_*` overrides.
    pub env: &'static [(&'static str, &'static str)],
    /// Scenarios whose verdict it must turn to FAIL.
    pub breaks: &'static [&'static str],
    /// An operator action taken while the fault holds, when a setting alone
    /// cannot weaken the sidecar.
    pub action: Option<WeakAction>,
}

/// An operator mistake a weakening makes during the fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeakAction {
    /// `POST /admin/sync {"accept_deletions": true}`.
    AcceptDeletions,
}

/// Every weakening.
pub const WEAKENINGS: &[Weakening] = &[
    Weakening {
        name: "stale-refuse",
        about: "stale.policy = refuse: mirrored data the upstream cannot confirm is answered 503",
        env: &[("CATALOG_CACHE_STALE_POLICY", "refuse")],
        breaks: &[
            "refuse", "kill-upstream", "black-hole", "latency-2s", "slow-body", "errors-50pct", "flap-1s",
            "rate-limited", "malformed", "truncated", "wrong-content-type", "breaker-forced-open", "kill-sidecar",
            "net-partition", "net-half-open", "net-reset-mid-body", "net-delay",
        ],
        action: None,
    },
    Weakening {
        name: "long-budget",
        about: "freshness.revalidate_budget = 30s: reads wait on the upstream up to its 2s timeout",
        env: &[("CATALOG_CACHE_FRESHNESS_REVALIDATE_BUDGET", "30s")],
        breaks: &["black-hole", "latency-2s", "slow-body", "net-latency", "net-delay", "net-loss"],
        action: None,
    },
    Weakening {
        name: "accept-deletions",
        about: "the operator accepts the held deletions (POST /admin/sync {\"accept_deletions\":true}) while the upstream is empty; no setting can do it, since even max_delete_ratio = 1 keeps an empty catalog out",
        env: &[("CATALOG_CACHE_MIRROR_MAX_DELETE_RATIO", "1")],
        breaks: &["empty-catalog"],
        action: Some(WeakAction::AcceptDeletions),
    },
    Weakening {
        name: "one-page",
        about: "mirror.page_size = mirror.id_page_size = 10000: the whole catalog is one page, so the failing third page is never asked for and the sync applies",
        env: &[
            ("CATALOG_CACHE_MIRROR_PAGE_SIZE", "10000"),
            ("CATALOG_CACHE_MIRROR_ID_PAGE_SIZE", "10000"),
        ],
        breaks: &["fail-page"],
        action: None,
    },
    Weakening {
        name: "deaf-breaker",
        about: "breaker.consecutive_failures = min_calls = 100000: the breaker never opens",
        env: &[
            ("CATALOG_CACHE_BREAKER_CONSECUTIVE_FAILURES", "100000"),
            ("CATALOG_CACHE_BREAKER_MIN_CALLS", "100000"),
        ],
        breaks: &[
            "refuse", "kill-upstream", "black-hole", "rate-limited", "malformed", "net-partition", "net-half-open",
            "net-reset-mid-body", "net-delay",
        ],
        action: None,
    },
    Weakening {
        name: "no-upstream-timeout",
        about: "upstream.timeout = upstream.connect_timeout = 1h: a call to a peer that accepted and went silent never ends, so it never counts as a failure and the sync it holds never finishes (a kernel partition still fails calls by itself: the neighbour lookup gives up with EHOSTUNREACH)",
        env: &[
            ("CATALOG_CACHE_UPSTREAM_TIMEOUT", "1h"),
            ("CATALOG_CACHE_UPSTREAM_CONNECT_TIMEOUT", "1h"),
        ],
        breaks: &["net-half-open"],
        action: None,
    },
    Weakening {
        name: "short-timeout",
        about: "upstream.timeout = 250ms: over the 2 MiB/s link a sync page (0.77 MB) takes longer even alone, so no sync gets through",
        env: &[("CATALOG_CACHE_UPSTREAM_TIMEOUT", "250ms")],
        breaks: &["net-bandwidth"],
        action: None,
    },
    Weakening {
        name: "short-max-stale",
        about: "freshness.fresh_for = stale.max_stale = 2s: nothing older than 2s is ever served",
        env: &[("CATALOG_CACHE_STALE_MAX_STALE", "2s")],
        breaks: &["stale-policy-flip"],
        action: None,
    },
];

/// What a fault scenario does to the upstream.
#[derive(Debug, Clone)]
enum Inject {
    /// `PUT /faults` with this body; cleared with `DELETE /faults`.
    Faults(Value),
    /// SIGKILL the demo catalog; restarted on the same ports to recover.
    KillUpstream,
    /// Run these commands (kernel network tools); undo with the others.
    Commands {
        apply: Vec<Vec<String>>,
        undo: Vec<Vec<String>>,
        /// The kernel mechanism they use, for the table.
        mechanism: &'static str,
    },
    /// Set these faults on the lab's fault proxy; cleared to none.
    Proxy(NetFaults),
}

impl Inject {
    /// What makes the fault, for the table's mechanism column.
    fn mechanism(&self) -> &'static str {
        match self {
            Inject::Faults(_) => "demo catalog",
            Inject::KillUpstream => "kill -9",
            Inject::Commands { mechanism, .. } => mechanism,
            Inject::Proxy(_) => "fault-proxy",
        }
    }
}

/// Runs each command; the first failure is the error.
fn run_commands(commands: &[Vec<String>]) -> Result<(), HarnessError> {
    for c in commands {
        let out = std::process::Command::new(&c[0])
            .args(&c[1..])
            .output()
            .map_err(|source| HarnessError::Spawn {
                what: c.join(" "),
                source,
            })?;
        if !out.status.success() {
            return Err(HarnessError::Http(format!(
                "`{}` failed: {}",
                c.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// A fault scenario's plan and the invariants it checks.
#[derive(Debug, Clone)]
struct Plan {
    name: &'static str,
    inject: Inject,
    /// How long the fault holds at least (a fault the breaker must open
    /// under holds until its open bound has passed).
    hold: Duration,
    /// How the upstream fails under the fault; `Some` means the breaker
    /// must open, within [`Timings::open_bound`].
    fails: Option<Failing>,
    /// Reads are checked against [`Timings::read_bound`].
    latency: bool,
    /// An upstream 404 (by-refs: null) for a mirrored entity is a correct
    /// answer here.
    allow_404: bool,
    /// The generation must not change while the fault holds.
    generation_unchanged: bool,
    /// `held_deletions` must be reported while the fault holds.
    expect_held: bool,
    /// Entities to edit upstream once the fault is set, so that a sync that
    /// went through would make a new generation.
    mutate: usize,
    /// The breaker must stay closed while the fault holds (no call can
    /// fail under it).
    stays_closed: bool,
    /// A sync must apply a new generation while the fault holds (the edits
    /// of `mutate` come through it).
    sync_during: bool,
    /// Facts of the plan (how its fault was sized), printed as notes.
    about: Vec<String>,
    /// `CATALOG_CACHE_*` settings of its own, on top of [`Timings`] (a
    /// weakening's still come after them).
    env: Vec<(String, String)>,
    /// The sidecar settings this scenario runs with.
    timings: Timings,
}

impl Plan {
    fn new(name: &'static str, inject: Inject) -> Plan {
        Plan {
            name,
            inject,
            hold: Duration::from_secs(5),
            fails: None,
            latency: true,
            allow_404: false,
            generation_unchanged: false,
            expect_held: false,
            mutate: 0,
            stays_closed: false,
            sync_during: false,
            about: Vec::new(),
            env: Vec::new(),
            timings: Timings::BASE,
        }
    }

    /// How long the fault is held in a lab whose first sync took `sync_took`.
    fn hold_for(&self, clients: usize, sync_took: Duration) -> Duration {
        match self.fails {
            Some(failing) => self.hold.max(
                self.timings.open_bound(failing, clients, sync_took).limit
                    + Duration::from_millis(500),
            ),
            None => self.hold,
        }
    }
}

fn plans() -> Vec<Plan> {
    let base = Timings::BASE;
    let f = |v: Value| Inject::Faults(v);
    let fast = |name, inject| Plan {
        fails: Some(Failing::AtOnce),
        ..Plan::new(name, inject)
    };
    let slow = |name, inject| Plan {
        fails: Some(Failing::AtTimeout),
        ..Plan::new(name, inject)
    };
    vec![
        fast("refuse", f(json!({"refuse": true}))),
        fast("kill-upstream", Inject::KillUpstream),
        slow("black-hole", f(json!({"black_hole": true}))),
        // Answers come 2s after the request reached the demo catalog, so
        // always after the sidecar's 2s timeout, which started earlier.
        slow(
            "latency-2s",
            f(json!({"latency": base.upstream_timeout.as_millis() as u64})),
        ),
        slow("slow-body", f(base.slow_body_fault())),
        Plan::new("errors-50pct", f(json!({"error_rate": 0.5}))),
        // With data fresh for 1s (the flap period) reads revalidate in both
        // phases: stale answers in the down phase, fresh ones in the up phase.
        Plan {
            timings: Timings {
                fresh_for: Duration::from_secs(1),
                ..base
            },
            ..Plan::new("flap-1s", f(json!({"flap": 1000})))
        },
        fast("rate-limited", f(json!({"too_many_requests": 2}))),
        Plan {
            generation_unchanged: true,
            mutate: 100,
            ..fast("malformed", f(json!({"malformed": true})))
        },
        Plan {
            generation_unchanged: true,
            mutate: 100,
            ..fast("truncated", f(json!({"truncated": true})))
        },
        Plan {
            generation_unchanged: true,
            mutate: 100,
            ..fast("wrong-content-type", f(json!({"wrong_content_type": true})))
        },
        Plan {
            allow_404: false,
            generation_unchanged: true,
            expect_held: true,
            ..Plan::new("empty-catalog", f(json!({"empty_catalog": true})))
        },
        Plan {
            generation_unchanged: true,
            mutate: 100,
            hold: Duration::from_secs(4),
            ..Plan::new("fail-page", f(json!({"fail_page": 3})))
        },
    ]
}

/// How long a call the sidecar admitted just before an operator forced
/// the breaker open may still take to reach the demo catalog, which counts
/// requests as they arrive: the sidecar sends an admitted call at once,
/// over loopback.
const IN_FLIGHT_ALLOWANCE: Duration = Duration::from_millis(300);

/// Every scenario name, in run order.
pub fn names() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = plans().iter().map(|p| p.name).collect();
    v.extend(["breaker-forced-open", "stale-policy-flip", "kill-sidecar"]);
    v.extend(netns::NAMES);
    v
}

/// Scenarios the quick run leaves out unless named with `--only`: the
/// network faults that the quick ones already cover in kind (see
/// `netns::FULL_ONLY`).
pub fn full_only() -> &'static [&'static str] {
    &netns::FULL_ONLY
}

/// Runs the chosen scenarios and returns one row each.
pub async fn run(opts: &RunOptions) -> Result<Vec<Outcome>, String> {
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
            return Err(format!("unknown scenario '{o}'; known: {}", all.join(", ")));
        }
    }
    let chosen: Vec<&str> = all
        .iter()
        .copied()
        .filter(|n| opts.only.is_empty() || opts.only.iter().any(|o| o == n))
        .filter(|n| !(opts.quick && opts.only.is_empty() && full_only().contains(n)))
        .filter(|n| weakening.is_none_or(|w| w.breaks.contains(n)))
        .collect();
    if chosen.is_empty() {
        return Err("no scenario selected".into());
    }
    let extra: Vec<(String, String)> = weakening
        .map(|w| {
            w.env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let tuning = Tuning::new(opts.quick, opts.seed);
    let mut rows = Vec::new();
    for name in chosen {
        eprintln!("catalog-chaos: scenario {name} ...");
        let started = Instant::now();
        let result = match name {
            "breaker-forced-open" => breaker_forced_open(opts, &tuning, &extra).await,
            "stale-policy-flip" => stale_policy_flip(opts, &tuning, &extra).await,
            "kill-sidecar" => kill_sidecar(opts, &tuning, &extra).await,
            n if netns::NAMES.contains(&n) => netns::run(n, opts, &tuning, &extra).await,
            n => {
                let plan = plans()
                    .into_iter()
                    .find(|p| p.name == n)
                    .ok_or("no such plan")?;
                fault_scenario(
                    &plan,
                    opts,
                    &tuning,
                    &extra,
                    weakening.and_then(|w| w.action),
                )
                .await
            }
        };
        let mut row = result.unwrap_or_else(|e| Outcome::broken(name, &e, started.elapsed()));
        row.took = started.elapsed();
        eprintln!(
            "catalog-chaos: scenario {name}: {:?} in {:.1}s",
            row.verdict,
            row.took.as_secs_f64()
        );
        rows.push(row);
    }
    Ok(rows)
}

/// Read and status facts every scenario reports the same way.
struct Checked {
    outcome: Outcome,
    /// Failure lines come first among the notes, in the order found: the
    /// first is the table's one-line why.
    failures: usize,
    /// What the scenario used and measured, for replaying it.
    record: Record,
}

/// What one scenario used and when things happened: printed under the
/// table, and written as `scenario.json` next to the kept logs of a FAIL.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Record {
    scenario: String,
    seed: u64,
    quick: bool,
    timings: Option<Timings>,
    /// Events, in seconds since the scenario's origin.
    events: Vec<(String, f64)>,
    /// Bounds and their derivations.
    bounds: Vec<(String, Bound)>,
}

impl Checked {
    fn new(name: &str, samples: &[Sample], tuning: &Tuning, timings: &Timings) -> Checked {
        Checked {
            outcome: Outcome {
                name: name.to_string(),
                mechanism: "-".to_string(),
                reads: samples.len(),
                failed: 0,
                stale: samples.iter().filter(|s| s.stale == Some(true)).count(),
                worst: samples.iter().map(|s| s.latency).max().unwrap_or_default(),
                opened_after: None,
                recovered_after: None,
                verdict: Verdict::Pass,
                notes: Vec::new(),
                took: Duration::ZERO,
            },
            failures: 0,
            record: Record {
                scenario: name.to_string(),
                seed: tuning.seed,
                quick: tuning.quick,
                timings: Some(*timings),
                ..Record::default()
            },
        }
    }

    fn fail(&mut self, note: String) {
        self.outcome.verdict = Verdict::Fail;
        self.outcome.notes.insert(self.failures, note);
        self.failures += 1;
    }

    fn note(&mut self, note: String) {
        self.outcome.notes.push(note);
    }

    /// Remembers when something happened (seconds since the origin).
    fn event(&mut self, what: &str, at: Duration) {
        self.record
            .events
            .push((what.to_string(), at.as_secs_f64()));
    }

    /// Remembers a bound the scenario checked.
    fn bound(&mut self, what: &str, bound: &Bound) {
        self.record.bounds.push((what.to_string(), bound.clone()));
    }

    /// Adds the replay line and the bounds line to the notes.
    fn finish_record(&mut self) {
        let r = &self.record;
        let events: Vec<String> = r
            .events
            .iter()
            .map(|(what, at)| format!("{what} {at:.2}s"))
            .collect();
        let replay = format!(
            "replay: catalog-chaos run{} --only {} --seed {}; {}",
            if r.quick { " --quick" } else { "" },
            r.scenario,
            r.seed,
            events.join(", ")
        );
        let bounds: Vec<String> = r
            .bounds
            .iter()
            .map(|(what, b)| format!("{what} ≤ {}", b.describe()))
            .collect();
        self.note(replay);
        if !bounds.is_empty() {
            self.note(format!("bounds: {}", bounds.join("; ")));
        }
    }

    /// Invariant: every read of a mirrored entity answered 200 with the
    /// right entities (optionally an upstream 404; or a 404 from a read
    /// that began before `gone_until`, the moment the sidecar had reason to
    /// doubt the upstream's word).
    fn reads_succeed(
        &mut self,
        samples: &[&Sample],
        allow_404: bool,
        gone_until: Option<Duration>,
    ) {
        let excused = |s: &Sample| s.absent && gone_until.is_some_and(|t| s.at < t);
        let bad: Vec<&&Sample> = samples
            .iter()
            .filter(|s| !(s.ok() || (allow_404 && s.absent) || excused(s)))
            .collect();
        let n = samples.iter().filter(|s| !s.ok() && excused(s)).count();
        if n > 0 {
            self.note(format!(
                "{n} reads that began before the sidecar saw the empty catalog took the upstream's 404 (or by-refs null) on revalidation, as for any deleted entity"
            ));
        }
        self.outcome.failed += bad.len();
        if let Some(first) = bad.first() {
            let mut by_status = std::collections::BTreeMap::new();
            for s in &bad {
                *by_status.entry(s.status).or_insert(0usize) += 1;
            }
            self.fail(format!(
                "{} reads of mirrored entities failed (by status, 0 = transport error: {by_status:?}); first at {:.1}s ({:?})",
                bad.len(),
                first.at.as_secs_f64(),
                first.op
            ));
        }
    }

    /// Invariant: `X-Catalog-Stale` is present and agrees with `Cache-Status`,
    /// and a 200 older than `fresh_for` (by its `Age`, with a second to
    /// spare for rounding) is marked stale.
    fn marking(&mut self, samples: &[Sample], fresh_for: Duration) {
        let bad = samples
            .iter()
            .filter(|s| s.status != 0 && !s.marked_ok)
            .count();
        if bad > 0 {
            self.fail(format!(
                "{bad} answers where X-Catalog-Stale and Cache-Status disagree (stale must carry ttl=-, fresh must not)"
            ));
        }
        let old_unmarked = samples
            .iter()
            .filter(|s| s.status == 200 && s.stale == Some(false))
            .filter(|s| s.age.is_some_and(|a| a > fresh_for.as_secs()))
            .count();
        if old_unmarked > 0 {
            self.fail(format!(
                "{old_unmarked} answers with Age over fresh_for ({}s) were not marked stale",
                fresh_for.as_secs()
            ));
        }
    }

    /// Invariant: no read slower than the revalidate budget (plus the
    /// client's measurement margin).
    fn latency(&mut self, samples: &[Sample], timings: &Timings) {
        let bound = timings.read_bound();
        self.bound("read", &bound);
        let slow: Vec<&Sample> = samples.iter().filter(|s| s.latency > bound.limit).collect();
        if let Some(worst) = slow.iter().max_by_key(|s| s.latency) {
            self.fail(format!(
                "{} reads slower than {}ms ({}); worst {}ms at {:.1}s",
                slow.len(),
                bound.limit.as_millis(),
                bound.why,
                worst.latency.as_millis(),
                worst.at.as_secs_f64()
            ));
        }
    }

    /// Invariant: the breaker left `closed` within `bound` of `from`.
    fn opened_within(&mut self, status: &[StatusSample], from: Duration, bound: &Bound) {
        self.bound("open", bound);
        self.outcome.opened_after = opened_at(status, from);
        match self.outcome.opened_after {
            Some(t) if t <= bound.limit => {}
            Some(t) => self.fail(format!(
                "the breaker opened {:.1}s after the fault, later than the {:.1}s bound ({})",
                t.as_secs_f64(),
                bound.limit.as_secs_f64(),
                bound.why
            )),
            None => self.fail(format!(
                "the breaker never opened (bound {:.1}s: {})",
                bound.limit.as_secs_f64(),
                bound.why
            )),
        }
    }

    /// Invariant: within `bound` of `from` the breaker is closed and a good
    /// sync newer than `from` is reported.
    fn recovered_within(&mut self, status: &[StatusSample], from: Duration, bound: &Bound) {
        self.bound("recover", bound);
        self.outcome.recovered_after = recovered_at(status, from);
        match self.outcome.recovered_after {
            Some(t) if t <= bound.limit => {}
            Some(t) => self.fail(format!(
                "recovered {:.1}s after the fault ended, later than the {:.1}s bound ({})",
                t.as_secs_f64(),
                bound.limit.as_secs_f64(),
                bound.why
            )),
            None => self.fail(format!(
                "no recovery (breaker closed and a good sync) within {:.1}s of the fault's end ({})",
                bound.limit.as_secs_f64(),
                bound.why
            )),
        }
    }

    /// Invariant: the entity count is always the one full catalog.
    fn no_partial_generation(&mut self, status: &[StatusSample], entities: usize) {
        let odd: Vec<&StatusSample> = status
            .iter()
            .filter(|s| s.entities.is_some_and(|n| n != entities as u64))
            .collect();
        if let Some(first) = odd.first() {
            self.fail(format!(
                "the mirror showed {:?} entities at {:.1}s instead of {entities} ({} samples off)",
                first.entities,
                first.at.as_secs_f64(),
                odd.len()
            ));
        }
    }
}

/// The first status sample at or after `from` where the breaker is not closed.
fn opened_at(status: &[StatusSample], from: Duration) -> Option<Duration> {
    status
        .iter()
        .find(|s| s.at >= from && s.breaker != "closed")
        .map(|s| s.at - from)
}

/// From `from`, the first sample with the breaker closed and a good sync
/// newer than the one known at `from`.
fn recovered_at(status: &[StatusSample], from: Duration) -> Option<Duration> {
    let before = status
        .iter()
        .rev()
        .find(|s| s.at <= from)
        .and_then(|s| s.last_sync.clone());
    status
        .iter()
        .filter(|s| s.at >= from)
        .find(|s| {
            s.breaker == "closed"
                && s.last_sync.as_ref().is_some_and(|l| {
                    Some(l) != before.as_ref() && (l.1 == "applied" || l.1 == "unchanged")
                })
        })
        .map(|s| s.at - from)
}

/// Waits (with load running) until recovery is visible in `/status`.
async fn wait_recovered(lab: &Lab, origin: Instant, from: Duration, within: Duration) {
    let deadline = origin + from + within + Duration::from_millis(500);
    // The sync known when the fault ended is not a recovery.
    let mut samples = Vec::new();
    if let Ok(v) = lab.sidecar.status().await {
        samples.push(crate::scenario::status_sample(from, &v));
    }
    while Instant::now() < deadline {
        if let Ok(v) = lab.sidecar.status().await {
            samples.push(crate::scenario::status_sample(origin.elapsed(), &v));
            if recovered_at(&samples, from).is_some() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fault_scenario(
    plan: &Plan,
    opts: &RunOptions,
    tuning: &Tuning,
    extra: &[(String, String)],
    action: Option<WeakAction>,
) -> Result<Outcome, HarnessError> {
    // The weakening comes after the scenario's settings, so that it wins.
    let mut lab = Lab::start(
        &opts.sidecar,
        tuning.entities,
        tuning.seed,
        &plan.timings,
        extra,
    )
    .await?;
    drive(plan, &mut lab, tuning, action).await
}

/// Runs a fault plan against a started lab and checks its invariants.
async fn drive(
    plan: &Plan,
    lab: &mut Lab,
    tuning: &Tuning,
    action: Option<WeakAction>,
) -> Result<Outcome, HarnessError> {
    let timings = lab.timings;
    let hold = plan.hold_for(tuning.clients, lab.sync_took);
    let recover_bound = timings.recover_bound(lab.sync_took);
    let origin = Instant::now();
    let monitor = Monitor::start(lab.sidecar.admin.clone(), origin);
    let load = Load::start(
        lab.sidecar.catalog_url(),
        lab.targets.clone(),
        tuning.clients,
        origin,
        tuning.seed,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fault_at = origin.elapsed();
    let requests_before = match &plan.inject {
        Inject::Faults(_) => lab.upstream.requests().await.ok(),
        _ => None,
    };
    match &plan.inject {
        Inject::Faults(v) => lab.upstream.set_faults(v.clone()).await?,
        Inject::KillUpstream => lab.upstream.kill(),
        Inject::Commands { apply, .. } => run_commands(apply)?,
        Inject::Proxy(f) => proxy_of(lab)?.set(f.clone()),
    }
    let proxy_before = lab.net.as_ref().map(|p| p.stats());
    if plan.mutate > 0 {
        // Let a sync that began before the fault finish first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The demo catalog's control API is reached directly (a fault
        // proxy is not on its path), or over the shaped link (a qdisc
        // slows it, no plan edits through a partition); a killed one has
        // none.
        if !matches!(plan.inject, Inject::KillUpstream) {
            lab.upstream.mutate(plan.mutate).await?;
        }
    }
    let generation_at_fault = lab
        .sidecar
        .status()
        .await
        .ok()
        .and_then(|v| v["mirror"]["generation"].as_u64());
    if action == Some(WeakAction::AcceptDeletions) {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        lab.sidecar
            .admin(
                reqwest::Method::POST,
                "/admin/sync",
                json!({"accept_deletions": true}),
            )
            .await?;
    }
    tokio::time::sleep_until(origin + fault_at + hold).await;
    let clearing_at = origin.elapsed();
    let requests_during = match requests_before {
        Some(before) => lab
            .upstream
            .requests()
            .await
            .ok()
            .map(|after| after.saturating_sub(before)),
        None => None,
    };
    let proxy_during = lab.net.as_ref().map(|p| p.stats());
    match &plan.inject {
        Inject::Faults(_) => lab.upstream.clear_faults().await?,
        Inject::KillUpstream => lab.upstream.restart().await?,
        Inject::Commands { undo, .. } => run_commands(undo)?,
        Inject::Proxy(_) => proxy_of(lab)?.clear(),
    }
    // The fault is over once the control API (or the restarted demo
    // catalog) says so.
    let clear_at = origin.elapsed();
    wait_recovered(lab, origin, clear_at, recover_bound.limit).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = load.stop().await;
    let status = monitor.stop().await;

    let mut c = Checked::new(plan.name, &samples, tuning, &timings);
    c.outcome.mechanism = plan.inject.mechanism().to_string();
    c.event("fault", fault_at);
    c.event("clearing", clearing_at);
    c.event("cleared", clear_at);
    for line in &plan.about {
        c.note(line.clone());
    }
    let all: Vec<&Sample> = samples.iter().collect();
    // An emptied catalog: until a sync sees it and holds the deletions, a
    // revalidation's 404 is the upstream's word for a deleted entity, which
    // the sidecar cannot yet tell from an outage of data. From the first
    // status sample that reports the hold (sampled every 50 ms), none.
    let gone_until = if plan.expect_held {
        let noticed = status
            .iter()
            .find(|s| s.at >= fault_at && s.held)
            .map(|s| s.at);
        if let Some(at) = noticed {
            let bound = timings.notice_bound(lab.sync_took);
            c.event("noticed", at);
            c.bound("notice", &bound);
            if at - fault_at > bound.limit {
                c.fail(format!(
                    "the empty catalog was held only {:.1}s after the fault, later than the {:.1}s bound",
                    (at - fault_at).as_secs_f64(),
                    bound.limit.as_secs_f64()
                ));
            }
        }
        noticed
    } else {
        None
    };
    c.reads_succeed(&all, plan.allow_404, gone_until);
    c.marking(&samples, timings.fresh_for);
    if plan.latency {
        c.latency(&samples, &timings);
    }
    c.no_partial_generation(&status, lab.entities);
    match plan.fails {
        Some(failing) => {
            let bound = timings.open_bound(failing, tuning.clients, lab.sync_took);
            c.opened_within(&status, fault_at, &bound);
        }
        None => c.outcome.opened_after = opened_at(&status, fault_at),
    }
    c.recovered_within(&status, clear_at, &recover_bound);
    let during: Vec<&StatusSample> = status
        .iter()
        .filter(|s| s.at >= fault_at && s.at <= clear_at)
        .collect();
    if plan.generation_unchanged {
        let changed = during
            .iter()
            .find(|s| s.generation.is_some() && s.generation != generation_at_fault);
        if let Some(s) = changed {
            c.fail(format!(
                "the generation changed from {generation_at_fault:?} to {:?} at {:.1}s while the fault held",
                s.generation,
                s.at.as_secs_f64()
            ));
        }
        if plan.mutate > 0 {
            let after = status.last().and_then(|s| s.generation);
            if after == generation_at_fault {
                c.note(format!("generation still {after:?} after recovery (the edited entities were not synced yet)"));
            }
        }
    }
    if let Some(n) = requests_during {
        c.note(format!(
            "the upstream saw {n} requests in the {:.1}s the fault held",
            plan.hold.as_secs_f64()
        ));
    }
    if plan.stays_closed {
        if let Some(s) = during.iter().find(|s| s.breaker != "closed") {
            c.fail(format!(
                "the breaker was {} at {:.1}s while the fault held, though no call could fail under it",
                s.breaker,
                s.at.as_secs_f64()
            ));
        }
    }
    if plan.sync_during {
        let newer = during
            .iter()
            .find(|s| s.generation.is_some() && s.generation > generation_at_fault);
        match newer {
            Some(s) => c.note(format!(
                "generation {:?} applied at {:.1}s while the fault held (it was {generation_at_fault:?})",
                s.generation,
                s.at.as_secs_f64()
            )),
            None => c.fail(format!(
                "no sync applied a new generation while the fault held ({:.1}s; generation stayed {generation_at_fault:?})",
                (clear_at - fault_at).as_secs_f64()
            )),
        }
    }
    if let (Some(before), Some(during)) = (proxy_before, proxy_during) {
        c.note(format!(
            "fault proxy while the fault held: {} connections, {} reset mid-body, {} silenced, {} segments stalled, {} chunks held, {} B up, {} B down",
            during.connections - before.connections,
            during.resets - before.resets,
            during.silenced - before.silenced,
            during.stalls - before.stalls,
            during.held - before.held,
            during.bytes_up - before.bytes_up,
            during.bytes_down - before.bytes_down
        ));
    }
    if plan.expect_held && !during.iter().any(|s| s.held) {
        c.fail(
            "held_deletions was never reported while the upstream served an empty catalog".into(),
        );
    }
    if plan.allow_404 {
        let n = samples.iter().filter(|s| s.absent).count();
        if n > 0 {
            c.note(format!(
                "{n} reads answered 404 (or by-refs null): the empty upstream's answer on revalidation, passed through"
            ));
        }
    }
    keep_on_failure(&mut c, lab, &status);
    Ok(c.outcome)
}

/// Has the running sidecar process finish a sync (`POST /admin/sync`), or
/// waits until its `catalog_cache_syncs_total`, summed over results, is 1
/// or more.
async fn wait_first_sync(lab: &Lab, within: Duration) -> Result<(), HarnessError> {
    let deadline = Instant::now() + within;
    // A sidecar restarted with a loaded mirror runs its first sync at a
    // random phase of its interval (so a fleet does not sync in step): ask
    // for one instead of waiting for it. It answers once a sync finished.
    if tokio::time::timeout(within, admin_sync(lab))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        return Ok(());
    }
    let http = reqwest::Client::new();
    loop {
        let text = match http
            .get(format!("http://{}/metrics", lab.sidecar.admin))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let syncs: f64 = text
            .lines()
            .filter(|l| l.starts_with("catalog_cache_syncs_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if syncs >= 1.0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Timeout(format!(
                "the restarted sidecar finished no sync within {within:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `POST /admin/sync`, waited for: the report's `result` and
/// `duration_seconds`.
async fn admin_sync(lab: &Lab) -> Result<(String, f64), HarnessError> {
    let report: Value = reqwest::Client::new()
        .post(format!("http://{}/admin/sync", lab.sidecar.admin))
        .bearer_auth(crate::scenario::ADMIN_TOKEN)
        .json(&json!({}))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .map_err(|e| HarnessError::Http(format!("/admin/sync: {e}")))?
        .json()
        .await
        .map_err(|e| HarnessError::Http(format!("/admin/sync: {e}")))?;
    Ok((
        report["result"].as_str().unwrap_or("?").to_string(),
        report["duration_seconds"].as_f64().unwrap_or(0.0),
    ))
}

/// The lab's fault proxy, which a proxy fault needs.
fn proxy_of(lab: &Lab) -> Result<&crate::faultproxy::FaultProxy, HarnessError> {
    lab.net
        .as_ref()
        .ok_or_else(|| HarnessError::Http("a fault-proxy fault in a lab without the proxy".into()))
}

/// Ends a scenario's checks: the replay and bounds lines go under the
/// table; on FAIL the data dir (logs, database) is kept, with the status
/// samples and `scenario.json` (seed, timings, events, bounds) beside them,
/// so the failure can be read and replayed afterwards.
fn keep_on_failure(c: &mut Checked, lab: &mut Lab, status: &[StatusSample]) {
    c.finish_record();
    if c.outcome.verdict != Verdict::Fail {
        return;
    }
    if let Some(dir) = lab.keep() {
        let text: String = status.iter().map(|s| format!("{s:?}\n")).collect();
        let _ = std::fs::write(dir.join("status-samples.txt"), text);
        if let Ok(json) = serde_json::to_string_pretty(&c.record) {
            let _ = std::fs::write(dir.join("scenario.json"), json);
        }
        c.note(format!(
            "logs, database, status samples and scenario.json kept in {}",
            dir.display()
        ));
    }
}

/// Operator flips the breaker open during load: zero upstream calls while
/// open, reads keep succeeding (stale-marked once `fresh_for` passes), and
/// back to `auto` it closes again.
async fn breaker_forced_open(
    opts: &RunOptions,
    tuning: &Tuning,
    extra: &[(String, String)],
) -> Result<Outcome, HarnessError> {
    let timings = Timings::BASE;
    let mut lab = Lab::start(&opts.sidecar, tuning.entities, tuning.seed, &timings, extra).await?;
    let recover_bound = timings.recover_bound(lab.sync_took);
    let origin = Instant::now();
    let monitor = Monitor::start(lab.sidecar.admin.clone(), origin);
    let load = Load::start(
        lab.sidecar.catalog_url(),
        lab.targets.clone(),
        tuning.clients,
        origin,
        tuning.seed,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let asked_at = origin.elapsed();
    let code = lab
        .sidecar
        .admin(
            reqwest::Method::PUT,
            "/admin/breaker",
            json!({"mode": "open", "reason": "chaos: forced open"}),
        )
        .await?;
    let acked_at = origin.elapsed();
    // A call admitted just before the flip may still reach the demo
    // catalog (which counts requests as they arrive).
    tokio::time::sleep(IN_FLIGHT_ALLOWANCE).await;
    let calls_before = lab.upstream.requests().await?;
    let open_from = origin.elapsed();
    tokio::time::sleep(timings.fresh_for + Duration::from_millis(1500)).await;
    let calls_after = lab.upstream.requests().await?;
    let open_until = origin.elapsed();
    let code_back = lab
        .sidecar
        .admin(
            reqwest::Method::PUT,
            "/admin/breaker",
            json!({"mode": "auto", "reason": "chaos: back"}),
        )
        .await?;
    let back_at = origin.elapsed();
    wait_recovered(&lab, origin, back_at, recover_bound.limit).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = load.stop().await;
    let status = monitor.stop().await;

    let mut c = Checked::new("breaker-forced-open", &samples, tuning, &timings);
    c.outcome.mechanism = "admin API".into();
    c.event("open asked", asked_at);
    c.event("open acknowledged", acked_at);
    c.event("auto asked", open_until);
    c.event("auto acknowledged", back_at);
    if code != 200 || code_back != 200 {
        c.fail(format!("PUT /admin/breaker answered {code} / {code_back}"));
    }
    let all: Vec<&Sample> = samples.iter().collect();
    c.reads_succeed(&all, false, None);
    c.marking(&samples, timings.fresh_for);
    c.latency(&samples, &timings);
    c.no_partial_generation(&status, lab.entities);
    c.outcome.opened_after = status
        .iter()
        .find(|s| s.at >= asked_at && s.mode == "open")
        .map(|s| s.at - asked_at);
    if calls_after != calls_before {
        c.fail(format!(
            "{} upstream requests while the breaker was forced open ({:.1}s..{:.1}s)",
            calls_after - calls_before,
            open_from.as_secs_f64(),
            open_until.as_secs_f64()
        ));
    }
    if !samples
        .iter()
        .any(|s| s.at > open_from + timings.fresh_for && s.at < open_until && s.stale == Some(true))
    {
        c.fail("no stale-marked read while forced open past fresh_for".into());
    }
    // The operator's change is visible to every status read that began
    // after the admin API answered, until the change back was sent.
    let shown: Vec<&StatusSample> = status
        .iter()
        .filter(|s| s.at >= acked_at && s.at < open_until)
        .collect();
    if shown.is_empty() {
        c.fail("no status sample while the breaker was forced open".into());
    } else if let Some(s) = shown.iter().find(|s| s.mode != "open") {
        c.fail(format!(
            "status read at {:.2}s, after the PUT was answered at {:.2}s, showed breaker mode {}",
            s.at.as_secs_f64(),
            acked_at.as_secs_f64(),
            s.mode
        ));
    }
    c.recovered_within(&status, back_at, &recover_bound);
    keep_on_failure(&mut c, &mut lab, &status);
    Ok(c.outcome)
}

/// Operator switches the stale policy to `refuse` during an outage and
/// back: stale reads turn 503 at once, then 200 stale-marked at once.
///
/// "At once" is judged per read against when the admin API acknowledged
/// the change: a read that began after the acknowledgement must see the
/// new policy, and a read that ended before the change was sent must see
/// the old one. A read in flight while the change was being made may see
/// either, and is counted but not judged.
async fn stale_policy_flip(
    opts: &RunOptions,
    tuning: &Tuning,
    extra: &[(String, String)],
) -> Result<Outcome, HarnessError> {
    let timings = Timings::BASE;
    let mut lab = Lab::start(&opts.sidecar, tuning.entities, tuning.seed, &timings, extra).await?;
    let recover_bound = timings.recover_bound(lab.sync_took);
    let origin = Instant::now();
    let monitor = Monitor::start(lab.sidecar.admin.clone(), origin);
    let load = Load::start(
        lab.sidecar.catalog_url(),
        lab.targets.clone(),
        tuning.clients,
        origin,
        tuning.seed,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    lab.upstream.set_faults(json!({"refuse": true})).await?;
    let fault_at = origin.elapsed();
    // Data turns stale `fresh_for` after the last good sync.
    tokio::time::sleep(timings.fresh_for + Duration::from_millis(1500)).await;
    let refuse_sent = origin.elapsed();
    let code_refuse = lab
        .sidecar
        .admin(
            reqwest::Method::PUT,
            "/admin/stale",
            json!({"policy": "refuse", "reason": "chaos"}),
        )
        .await?;
    let refuse_acked = origin.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let serve_sent = origin.elapsed();
    let code_serve = lab
        .sidecar
        .admin(
            reqwest::Method::PUT,
            "/admin/stale",
            json!({"policy": "serve", "reason": "chaos"}),
        )
        .await?;
    let serve_acked = origin.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let clear_sent = origin.elapsed();
    lab.upstream.clear_faults().await?;
    let clear_at = origin.elapsed();
    wait_recovered(&lab, origin, clear_at, recover_bound.limit).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = load.stop().await;
    let status = monitor.stop().await;

    let mut c = Checked::new("stale-policy-flip", &samples, tuning, &timings);
    c.outcome.mechanism = "demo catalog + admin API".into();
    c.event("fault", fault_at);
    c.event("refuse sent", refuse_sent);
    c.event("refuse acknowledged", refuse_acked);
    c.event("serve sent", serve_sent);
    c.event("serve acknowledged", serve_acked);
    c.event("cleared", clear_at);
    if code_refuse != 200 || code_serve != 200 {
        c.fail(format!(
            "PUT /admin/stale answered {code_refuse} / {code_serve}"
        ));
    }
    let serving: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.end() < refuse_sent || s.at >= serve_acked)
        .collect();
    c.reads_succeed(&serving, false, None);
    let refused: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= refuse_acked && s.end() < serve_sent)
        .collect();
    let served_anyway: Vec<&&Sample> = refused.iter().filter(|s| s.status != 503).collect();
    if refused.is_empty() {
        c.fail("no read completed while the policy was refuse".into());
    } else if let Some(first) = served_anyway.first() {
        c.outcome.failed += served_anyway.len();
        c.fail(format!(
            "{} of {} reads that began after the refuse policy was acknowledged were not 503 (first began at {:.2}s, answered {})",
            served_anyway.len(),
            refused.len(),
            first.at.as_secs_f64(),
            first.status
        ));
    } else {
        c.note(format!("{} reads refused (503) as asked", refused.len()));
    }
    let in_flight = samples
        .iter()
        .filter(|s| {
            (s.at < refuse_acked && s.end() >= refuse_sent)
                || (s.at < serve_acked && s.end() >= serve_sent)
        })
        .count();
    c.note(format!(
        "{in_flight} reads were in flight while a policy change was being made (either answer is right for them)"
    ));
    let unmarked = samples
        .iter()
        .filter(|s| s.at >= serve_acked && s.end() < clear_sent)
        .filter(|s| s.stale != Some(true))
        .count();
    if unmarked > 0 {
        c.fail(format!("{unmarked} reads after switching back to serve (upstream still down) were not stale-marked"));
    }
    c.marking(&samples, timings.fresh_for);
    c.latency(&samples, &timings);
    c.no_partial_generation(&status, lab.entities);
    c.outcome.opened_after = opened_at(&status, fault_at);
    c.recovered_within(&status, clear_at, &recover_bound);
    keep_on_failure(&mut c, &mut lab, &status);
    Ok(c.outcome)
}

/// SIGKILL the sidecar during syncs, repeatedly: after every kill the
/// mirror passes `integrity_check` and holds exactly one complete
/// generation (the catalog before the round's edits or after them, whole),
/// and it reopens with the full catalog; restarted while the upstream is
/// down it is ready from disk at once.
///
/// The sidecar's own sync interval is an hour here, so every sync is one
/// this scenario asks for (or the one each start begins with) and the
/// catalog never changes under a sync: a generation is then one catalog
/// state, and anything else in the file is a partial one.
async fn kill_sidecar(
    opts: &RunOptions,
    tuning: &Tuning,
    extra: &[(String, String)],
) -> Result<Outcome, HarnessError> {
    let timings = Timings {
        sync_interval: Duration::from_secs(3600),
        ..Timings::BASE
    };
    // The sidecar is ready from its mirror file, before any sync: the bound
    // covers starting the process and loading the mirror (5,000 entities in
    // the debug build CI uses, 20,000 in a release build for the full run),
    // which takes a small fraction of it.
    let ready_bound = Duration::from_secs(if tuning.quick { 10 } else { 5 });
    let mut lab = Lab::start(
        &opts.sidecar,
        tuning.kill_entities,
        tuning.seed,
        &timings,
        extra,
    )
    .await?;
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(tuning.seed);
    let mut worst_ready = Duration::ZERO;
    // Kills before the sync's commit keep the old generation, kills after
    // it find the new one: both must happen for the scenario to mean much.
    let (mut kept_old, mut found_new) = (0usize, 0usize);
    let (mut shortest, mut longest) = (u64::MAX, 0u64);
    let mut delays = Vec::new();
    // The catalog as the mirror holds it after the first sync.
    let mut current = lab.upstream.fingerprint().await?;
    let mut rounds = 0usize;
    for round in 1..=tuning.kills {
        // Waits for the sync a (re)started sidecar begins with (counted in
        // its metrics: a sync asked for first would let that one start
        // later, under the edits), then syncs once more: when it answers no
        // sync runs, none will, and the mirror holds the catalog as it is
        // now. Its duration sizes the kill window.
        if let Err(e) = wait_first_sync(&lab, Duration::from_secs(60)).await {
            problems.push(format!("round {round}: {e}"));
            break;
        }
        let settle = admin_sync(&lab).await?;
        if settle.0 != "applied" && settle.0 != "unchanged" {
            problems.push(format!(
                "round {round}: the sync before the edits said {}",
                settle.0
            ));
            break;
        }
        let sync_ms = (settle.1 * 1000.0).max(50.0) as u64;
        shortest = shortest.min(sync_ms);
        longest = longest.max(sync_ms);
        lab.upstream.edit_at_once(200).await?;
        let admin = lab.sidecar.admin.clone();
        // The sync this request starts is what the kill interrupts.
        let sync = tokio::spawn(async move {
            let _ = reqwest::Client::new()
                .post(format!("http://{admin}/admin/sync"))
                .bearer_auth(crate::scenario::ADMIN_TOKEN)
                .json(&json!({}))
                .timeout(Duration::from_secs(60))
                .send()
                .await;
        });
        let delay = rand::Rng::random_range(&mut rng, 0..=sync_ms * 6 / 5 + 30);
        delays.push(delay);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        lab.sidecar.kill();
        sync.abort();
        rounds = round;
        let db = lab.sidecar.db();
        let expected = lab.entities;
        // The catalog after the edits is read while the file is checked:
        // nothing changes it until the next round.
        let (checked, edited) = tokio::join!(
            tokio::task::spawn_blocking(move || {
                let integrity = integrity_check(&db)?;
                let generation = crate::scenario::mirror_generation(&db)?;
                Ok::<_, String>((integrity, generation))
            }),
            lab.upstream.fingerprint()
        );
        let edited = edited?;
        let checked = checked.map_err(|e| e.to_string()).and_then(|r| r);
        match checked {
            Ok((integrity, _)) if integrity != "ok" => problems.push(format!(
                "kill {round} (at {delay}ms): integrity_check said {integrity}"
            )),
            Ok((_, g)) => {
                if let Some(why) = g.incomplete(expected) {
                    problems.push(format!("kill {round} (at {delay}ms): {why}"));
                } else if g.fingerprint == current {
                    kept_old += 1;
                } else if g.fingerprint == edited {
                    found_new += 1;
                } else {
                    problems.push(format!(
                        "kill {round} (at {delay}ms): generation {} holds {} entities that are neither the catalog before the round's 200 edits nor after them (a partial generation)",
                        g.generation, g.rows
                    ));
                }
            }
            Err(e) => problems.push(format!("kill {round} (at {delay}ms): {e}")),
        }
        current = edited;
        lab.sidecar.start()?;
        match lab
            .sidecar
            .wait_ready(lab.entities, Duration::from_secs(60))
            .await
        {
            Ok(t) => worst_ready = worst_ready.max(t),
            Err(e) => {
                problems.push(format!("kill {round}: {e}"));
                break;
            }
        }
    }
    let mean = delays.iter().sum::<u64>() / (delays.len().max(1) as u64);
    notes.push(format!(
        "{rounds} kills during syncs of {} entities (a sync took {shortest}..{longest}ms; killed {}..{}ms after it was asked for, mean {mean}ms): integrity_check ok and exactly one complete generation after each; {kept_old} kept the generation before the edits, {found_new} held the new one; slowest restart to ready {}ms",
        lab.entities,
        delays.iter().min().copied().unwrap_or(0),
        delays.iter().max().copied().unwrap_or(0),
        worst_ready.as_millis()
    ));
    if kept_old == 0 || found_new == 0 {
        notes.push(
            "the kills did not fall on both sides of a commit this time (a different --seed spreads them)"
                .into(),
        );
    }
    // Cold start during an outage.
    lab.upstream.set_faults(json!({"refuse": true})).await?;
    lab.sidecar.kill();
    lab.sidecar.start()?;
    let restarted = Instant::now();
    let origin = restarted;
    let mut ready_after = None;
    while restarted.elapsed() < ready_bound + Duration::from_secs(5) {
        if lab.sidecar.readyz().await == 200 {
            ready_after = Some(restarted.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let load = Load::start(
        lab.sidecar.catalog_url(),
        lab.targets.clone(),
        tuning.clients,
        origin,
        tuning.seed,
    );
    tokio::time::sleep(timings.fresh_for + Duration::from_secs(1)).await;
    let samples = load.stop().await;
    let count = lab
        .sidecar
        .status()
        .await
        .ok()
        .and_then(|v| v["mirror"]["entities"].as_u64());
    let mut c = Checked::new("kill-sidecar", &samples, tuning, &timings);
    c.outcome.mechanism = "kill -9".into();
    c.outcome.notes = notes;
    c.event("restarted in the outage", Duration::ZERO);
    for p in problems {
        c.fail(p);
    }
    match ready_after {
        Some(t) if t <= ready_bound => c.note(format!(
            "restarted with the upstream down: /readyz 200 after {}ms",
            t.as_millis()
        )),
        Some(t) => c.fail(format!(
            "restarted with the upstream down: ready after {}ms, bound {}ms",
            t.as_millis(),
            ready_bound.as_millis()
        )),
        None => c.fail("restarted with the upstream down: never ready".into()),
    }
    c.outcome.recovered_after = ready_after;
    if count != Some(lab.entities as u64) {
        c.fail(format!(
            "after the outage restart the mirror holds {count:?} entities, not {}",
            lab.entities
        ));
    }
    let all: Vec<&Sample> = samples.iter().collect();
    c.reads_succeed(&all, false, None);
    c.marking(&samples, timings.fresh_for);
    c.latency(&samples, &timings);
    keep_on_failure(&mut c, &mut lab, &[]);
    Ok(c.outcome)
}
