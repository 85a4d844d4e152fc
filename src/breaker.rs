//! The circuit breaker in front of the one upstream catalog.
//!
//! One [`Breaker`] per upstream, shared by the read path, pass-through and the
//! sync loop; each logical upstream call takes a [`Permit`] and reports one
//! outcome (retries live inside one permit). The state machine only moves on
//! outcomes in [`BreakerMode::Auto`]; the operator modes override admission but
//! keep the machine's state. Time is `tokio::time::Instant`, so tests run in
//! paused time; the lock is a std `Mutex` never held across an `.await`.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::clock::Clock;
use crate::metrics as names;

/// Consecutive failures that open the breaker.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Failure rate over the window that opens the breaker.
pub const DEFAULT_FAILURE_RATE: f64 = 0.5;
/// Calls the window must hold before the failure rate counts.
pub const DEFAULT_MIN_CALLS: u32 = 10;
/// Length of the rolling window for the failure rate.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
/// How long the first opening lasts.
pub const DEFAULT_OPEN_FOR: Duration = Duration::from_secs(5);
/// The longest an opening lasts, however often it re-opens (before jitter).
pub const DEFAULT_MAX_OPEN: Duration = Duration::from_secs(60);
/// Probes that must succeed, and may run at once, while half-open.
pub const DEFAULT_HALF_OPEN_PROBES: u32 = 1;
/// Relative jitter on each open period (0.1 = ±10 %).
pub const DEFAULT_JITTER: f64 = 0.1;
/// `retry_after` told to callers while an operator forces the breaker open:
/// the override has no end the breaker knows of, so callers poll gently.
pub const FORCED_OPEN_RETRY_AFTER: Duration = Duration::from_secs(5);
/// `retry_after` told to callers turned away while the probes are in flight:
/// the probe's answer is usually close.
pub const HALF_OPEN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Buckets in the rolling window: enough to roll smoothly, small enough that
/// recording an outcome costs nothing.
const WINDOW_BUCKETS: usize = 10;
/// Transitions kept for slow subscribers before they start to lag.
const TRANSITION_CHANNEL_CAPACITY: usize = 64;

/// Where the state machine stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go to the upstream; outcomes are counted.
    Closed,
    /// Calls are refused until the open period ends.
    Open,
    /// A few probe calls decide whether to close or open again.
    HalfOpen,
}

/// What the operator has decided (`breaker.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerMode {
    /// The state machine decides.
    #[default]
    Auto,
    /// Never call the upstream; serve from the mirror.
    Open,
    /// Always call the upstream, whatever the outcomes.
    Closed,
}

/// A breaker state or mode name that is not one of the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown breaker {what} `{value}`: expected {expected}")]
pub struct ParseBreakerError {
    what: &'static str,
    value: String,
    expected: &'static str,
}

impl BreakerState {
    /// The name used in config, status, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// Every state, for metric gauges that set one to 1 and the others to 0.
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];
}

impl BreakerMode {
    /// The name used in config, CLI, status, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerMode::Auto => "auto",
            BreakerMode::Open => "open",
            BreakerMode::Closed => "closed",
        }
    }

    /// Every mode, for metric gauges that set one to 1 and the others to 0.
    pub const ALL: [BreakerMode; 3] = [BreakerMode::Auto, BreakerMode::Open, BreakerMode::Closed];
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for BreakerMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BreakerState {
    type Err = ParseBreakerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BreakerState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| ParseBreakerError {
                what: "state",
                value: s.to_owned(),
                expected: "closed, open or half_open",
            })
    }
}

impl FromStr for BreakerMode {
    type Err = ParseBreakerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BreakerMode::ALL
            .into_iter()
            .find(|mode| mode.as_str() == s)
            .ok_or_else(|| ParseBreakerError {
                what: "mode",
                value: s.to_owned(),
                expected: "auto, open or closed",
            })
    }
}

/// The `[breaker]` section of the config file: the operator's configured
/// mode and the state machine's thresholds. `Config` embeds it as it is, so
/// the file, the defaults and the breaker share one type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// The configured mode (`auto`, `open`, `closed`); a run-time override
    /// stored by `flags` wins over it.
    pub mode: BreakerMode,
    /// Consecutive failures that open the breaker (at least 1).
    pub consecutive_failures: u32,
    /// Failure rate over `window` that opens the breaker, in `(0, 1]`.
    pub failure_rate: f64,
    /// Calls the window must hold before `failure_rate` applies (at least 1).
    pub min_calls: u32,
    /// Length of the rolling window (at least 10ms).
    #[serde(with = "crate::units::duration")]
    pub window: Duration,
    /// Length of the first open period (non-zero).
    #[serde(with = "crate::units::duration")]
    pub open_for: Duration,
    /// Cap on the doubling open period (at least `open_for`).
    #[serde(with = "crate::units::duration")]
    pub max_open: Duration,
    /// Probes needed to close, and allowed at once, while half-open (at least 1).
    pub half_open_probes: u32,
    /// Relative jitter on each open period, in `[0, 1)`.
    pub jitter: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            mode: BreakerMode::Auto,
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            failure_rate: DEFAULT_FAILURE_RATE,
            min_calls: DEFAULT_MIN_CALLS,
            window: DEFAULT_WINDOW,
            open_for: DEFAULT_OPEN_FOR,
            max_open: DEFAULT_MAX_OPEN,
            half_open_probes: DEFAULT_HALF_OPEN_PROBES,
            jitter: DEFAULT_JITTER,
        }
    }
}

/// A breaker setting outside what the breaker can work with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BreakerConfigError {
    /// `consecutive_failures` is 0.
    #[error("breaker.consecutive_failures is 0: it must be at least 1")]
    ConsecutiveFailures,
    /// `failure_rate` is not in `(0, 1]`.
    #[error("breaker.failure_rate is {0}: it must be greater than 0 and at most 1")]
    FailureRate(f64),
    /// `min_calls` is 0.
    #[error("breaker.min_calls is 0: it must be at least 1")]
    MinCalls,
    /// `window` is too short to be split into buckets.
    #[error("breaker.window is {}: it must be at least 10ms", humantime::format_duration(*.0))]
    Window(Duration),
    /// `open_for` is zero.
    #[error("breaker.open_for is 0s: it must be longer than zero")]
    OpenFor,
    /// `max_open` is shorter than `open_for`.
    #[error(
        "breaker.max_open is {}: it must be at least breaker.open_for ({})",
        humantime::format_duration(*max_open),
        humantime::format_duration(*open_for)
    )]
    MaxOpen {
        /// The configured cap.
        max_open: Duration,
        /// The configured first period.
        open_for: Duration,
    },
    /// `half_open_probes` is 0.
    #[error("breaker.half_open_probes is 0: it must be at least 1")]
    HalfOpenProbes,
    /// `jitter` is not in `[0, 1)`.
    #[error("breaker.jitter is {0}: it must be at least 0 and less than 1")]
    Jitter(f64),
}

impl BreakerConfigError {
    /// The setting's dotted key, e.g. `breaker.window`.
    pub fn key(&self) -> &'static str {
        match self {
            Self::ConsecutiveFailures => "breaker.consecutive_failures",
            Self::FailureRate(_) => "breaker.failure_rate",
            Self::MinCalls => "breaker.min_calls",
            Self::Window(_) => "breaker.window",
            Self::OpenFor => "breaker.open_for",
            Self::MaxOpen { .. } => "breaker.max_open",
            Self::HalfOpenProbes => "breaker.half_open_probes",
            Self::Jitter(_) => "breaker.jitter",
        }
    }
}

impl BreakerConfig {
    /// Checks every setting; `Config::validate` calls this to refuse a bad
    /// file at start. [`Breaker::new`] does not need it: it clamps instead.
    pub fn validate(&self) -> Result<(), BreakerConfigError> {
        if self.consecutive_failures == 0 {
            return Err(BreakerConfigError::ConsecutiveFailures);
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err(BreakerConfigError::FailureRate(self.failure_rate));
        }
        if self.min_calls == 0 {
            return Err(BreakerConfigError::MinCalls);
        }
        if self.window < Duration::from_millis(10) {
            return Err(BreakerConfigError::Window(self.window));
        }
        if self.open_for.is_zero() {
            return Err(BreakerConfigError::OpenFor);
        }
        if self.max_open < self.open_for {
            return Err(BreakerConfigError::MaxOpen {
                max_open: self.max_open,
                open_for: self.open_for,
            });
        }
        if self.half_open_probes == 0 {
            return Err(BreakerConfigError::HalfOpenProbes);
        }
        if !(self.jitter >= 0.0 && self.jitter < 1.0) {
            return Err(BreakerConfigError::Jitter(self.jitter));
        }
        Ok(())
    }

    /// The nearest settings the state machine can run with, so that a config
    /// that skipped validation degrades instead of panicking.
    fn clamped(mut self) -> Self {
        self.consecutive_failures = self.consecutive_failures.max(1);
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            self.failure_rate = DEFAULT_FAILURE_RATE;
        }
        self.window = self.window.max(Duration::from_millis(10));
        self.open_for = self.open_for.max(Duration::from_millis(1));
        self.max_open = self.max_open.max(self.open_for);
        self.half_open_probes = self.half_open_probes.max(1);
        if !(self.jitter >= 0.0 && self.jitter < 1.0) {
            self.jitter = 0.0;
        }
        self
    }
}

/// Who asks to call the upstream. Only the sync loop may probe a
/// recovering upstream: a client's request never decides whether the
/// breaker closes again, so clients cannot move it either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The sync loop: its next attempt after an open period is the probe.
    Sync,
    /// A read or write on behalf of a client: admitted only while closed
    /// (or forced closed).
    Client,
}

/// A call the breaker turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// When the caller may try again (the `Retry-After` of a 503).
    pub retry_after: Duration,
    /// The state machine's state when the call was refused.
    pub state: BreakerState,
    /// The operator mode when the call was refused.
    pub mode: BreakerMode,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.retry_after.as_secs_f64().ceil().max(1.0);
        match (self.mode, self.state) {
            (BreakerMode::Open, _) => {
                f.write_str("the upstream circuit breaker is open (forced by operator)")
            }
            (_, BreakerState::HalfOpen) => write!(
                f,
                "the upstream circuit breaker is half-open and its probe is in flight; retry in {secs}s"
            ),
            _ => write!(
                f,
                "the upstream circuit breaker is open after repeated upstream failures; retry in {secs}s"
            ),
        }
    }
}

impl std::error::Error for Rejected {}

/// A change of the state machine's state, as broadcast to subscribers.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The state left.
    pub from: BreakerState,
    /// The state entered.
    pub to: BreakerState,
    /// Wall-clock time of the change, for status and logs.
    pub at: SystemTime,
    /// Why, e.g. "5 consecutive failures", "failure rate 0.60 over 30s", "probe succeeded".
    pub reason: String,
    /// The length of the open period when `to` is `Open`.
    pub open_for: Option<Duration>,
}

/// A snapshot of the breaker for `/status` and the status page.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerStatus {
    /// The state machine's state (see `mode` for the operator's override).
    pub state: BreakerState,
    /// The operator mode.
    pub mode: BreakerMode,
    /// When the current state began (monotonic).
    pub since: Instant,
    /// When the current state began (wall clock).
    pub since_wall: SystemTime,
    /// Why the current state began; `None` until the first transition.
    pub reason: Option<String>,
    /// Failures in a row, including while forced closed.
    pub consecutive_failures: u32,
    /// When an open breaker admits its next probe.
    pub open_until: Option<Instant>,
    /// Outcomes recorded in the rolling window.
    pub window_calls: u32,
    /// Failures among `window_calls`.
    pub window_failures: u32,
    /// Half-open probes now in flight.
    pub probes_in_flight: u32,
}

/// The rolling window: a ring of buckets, each `window / WINDOW_BUCKETS`
/// wide, labelled with the absolute bucket number so that stale buckets are
/// recognised (and emptied) without a timer.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    index: u64,
    calls: u32,
    failures: u32,
}

#[derive(Debug)]
struct Window {
    origin: Instant,
    width: Duration,
    buckets: [Bucket; WINDOW_BUCKETS],
}

impl Window {
    fn new(origin: Instant, window: Duration) -> Self {
        Window {
            origin,
            width: (window / WINDOW_BUCKETS as u32).max(Duration::from_millis(1)),
            buckets: [Bucket::default(); WINDOW_BUCKETS],
        }
    }

    fn index_at(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        (elapsed / self.width.as_nanos()) as u64
    }

    fn record(&mut self, now: Instant, failed: bool) {
        let index = self.index_at(now);
        let bucket = &mut self.buckets[(index % WINDOW_BUCKETS as u64) as usize];
        if bucket.index != index {
            *bucket = Bucket {
                index,
                ..Bucket::default()
            };
        }
        bucket.calls = bucket.calls.saturating_add(1);
        if failed {
            bucket.failures = bucket.failures.saturating_add(1);
        }
    }

    /// `(calls, failures)` over the buckets still inside the window.
    fn totals(&self, now: Instant) -> (u32, u32) {
        let current = self.index_at(now);
        self.buckets
            .iter()
            .filter(|b| (b.calls > 0) && current - b.index.min(current) < WINDOW_BUCKETS as u64)
            .fold((0u32, 0u32), |(calls, failures), b| {
                (
                    calls.saturating_add(b.calls),
                    failures.saturating_add(b.failures),
                )
            })
    }

    fn clear(&mut self) {
        self.buckets = [Bucket::default(); WINDOW_BUCKETS];
    }
}

#[derive(Debug)]
struct Inner {
    config: BreakerConfig,
    mode: BreakerMode,
    state: BreakerState,
    since: Instant,
    since_wall: SystemTime,
    reason: Option<String>,
    /// Bumped on every transition: outcomes of permits taken in an earlier
    /// state only feed the window, never the state machine.
    epoch: u64,
    consecutive_failures: u32,
    window: Window,
    /// Openings since the last successful close; doubles the open period.
    reopens: u32,
    open_until: Option<Instant>,
    probes_in_flight: u32,
    probes_succeeded: u32,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    transitions: broadcast::Sender<Transition>,
    /// Wall-clock time of transitions (for status and the audit trail).
    clock: Clock,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The critical sections cannot leave `Inner` half-updated in a way
        // that matters, so a panic elsewhere must not take the breaker down.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The circuit breaker for one upstream. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PermitKind {
    /// Admitted by a closed breaker in `Auto` mode.
    Closed,
    /// A half-open probe: holds one probe slot.
    Probe,
    /// Admitted because the operator forced the breaker closed.
    Forced,
}

/// The right to make one logical upstream call. Report its outcome with
/// [`Permit::success`] or [`Permit::failure`]; dropping it without either
/// means the call was cancelled: it frees a probe slot and counts as nothing.
#[derive(Debug)]
#[must_use = "report the call's outcome with success() or failure()"]
pub struct Permit {
    shared: Arc<Shared>,
    kind: PermitKind,
    epoch: u64,
    reported: bool,
}

impl Permit {
    /// The upstream answered: any answer that is not a failure, a 404 or
    /// other 4xx included (those are the caller's problem, not the upstream's).
    pub fn success(mut self) {
        self.reported = true;
        record(&self.shared, self.kind, self.epoch, Some(false));
    }

    /// The upstream failed (connect error, timeout, 5xx, malformed body).
    pub fn failure(mut self) {
        self.reported = true;
        record(&self.shared, self.kind, self.epoch, Some(true));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported {
            record(&self.shared, self.kind, self.epoch, None);
        }
    }
}

/// Applies one permit's outcome (`None` = cancelled, `Some(true)` = failed).
fn record(shared: &Shared, kind: PermitKind, epoch: u64, failed: Option<bool>) {
    let mut inner = shared.lock();
    let now = Instant::now();
    let current = epoch == inner.epoch;
    if kind == PermitKind::Probe && current {
        inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
    }
    let Some(failed) = failed else { return };
    inner.window.record(now, failed);
    if !current {
        return;
    }
    if failed {
        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
    } else {
        inner.consecutive_failures = 0;
    }
    if inner.mode != BreakerMode::Auto || kind == PermitKind::Forced {
        return;
    }
    match (inner.state, failed) {
        (BreakerState::Closed, true) => {
            if let Some(reason) = opening_reason(&inner, now) {
                open(shared, &mut inner, now, reason);
            }
        }
        (BreakerState::HalfOpen, false) => {
            inner.probes_succeeded += 1;
            let needed = inner.config.half_open_probes;
            if inner.probes_succeeded >= needed {
                let reason = if needed == 1 {
                    "probe succeeded".to_owned()
                } else {
                    format!("{needed} probes succeeded")
                };
                inner.reopens = 0;
                inner.consecutive_failures = 0;
                // Failures from before the outage must not re-open a
                // freshly closed breaker through the rate rule.
                inner.window.clear();
                transition(shared, &mut inner, now, BreakerState::Closed, reason, None);
            }
        }
        (BreakerState::HalfOpen, true) => open(shared, &mut inner, now, "probe failed".to_owned()),
        _ => {}
    }
}

/// Why a closed breaker should open now, if it should.
fn opening_reason(inner: &Inner, now: Instant) -> Option<String> {
    let config = &inner.config;
    if inner.consecutive_failures >= config.consecutive_failures {
        return Some(format!(
            "{} consecutive failures",
            inner.consecutive_failures
        ));
    }
    let (calls, failures) = inner.window.totals(now);
    if calls >= config.min_calls.max(1) {
        let rate = f64::from(failures) / f64::from(calls);
        if rate >= config.failure_rate {
            return Some(format!(
                "failure rate {rate:.2} over {} ({failures} of {calls} calls)",
                humantime::format_duration(config.window)
            ));
        }
    }
    None
}

/// The open period for the `reopens`-th opening in a row, before jitter.
fn base_open_period(config: &BreakerConfig, reopens: u32) -> Duration {
    let factor = 2u32.saturating_pow(reopens.min(31));
    config
        .open_for
        .checked_mul(factor)
        .unwrap_or(config.max_open)
        .min(config.max_open)
}

/// Spreads `base` by `±jitter`; `unit` in `[0, 1)` picks the point (0 is the
/// shortest, 1 the longest), so the bounds are testable without randomness.
fn jittered(base: Duration, jitter: f64, unit: f64) -> Duration {
    if jitter <= 0.0 {
        return base;
    }
    base.mul_f64((1.0 + jitter * (2.0 * unit - 1.0)).max(0.0))
}

fn open(shared: &Shared, inner: &mut Inner, now: Instant, reason: String) {
    let base = base_open_period(&inner.config, inner.reopens);
    let period = jittered(base, inner.config.jitter, rand::random::<f64>());
    inner.reopens = inner.reopens.saturating_add(1);
    inner.open_until = Some(now + period);
    transition(shared, inner, now, BreakerState::Open, reason, Some(period));
}

fn transition(
    shared: &Shared,
    inner: &mut Inner,
    now: Instant,
    to: BreakerState,
    reason: String,
    open_for: Option<Duration>,
) {
    let from = inner.state;
    let at = shared.clock.now();
    inner.state = to;
    inner.since = now;
    inner.since_wall = at;
    inner.reason = Some(reason.clone());
    inner.epoch += 1;
    inner.probes_in_flight = 0;
    inner.probes_succeeded = 0;
    if to != BreakerState::Open {
        inner.open_until = None;
    }
    metrics::counter!(names::BREAKER_TRANSITIONS_TOTAL, "from" => from.as_str(), "to" => to.as_str())
        .increment(1);
    set_state_gauge(to);
    // No subscriber is fine: status reads the breaker directly.
    let _ = shared.transitions.send(Transition {
        from,
        to,
        at,
        reason,
        open_for,
    });
}

fn set_state_gauge(current: BreakerState) {
    for state in BreakerState::ALL {
        let value = if state == current { 1.0 } else { 0.0 };
        metrics::gauge!(names::BREAKER_STATE, "state" => state.as_str()).set(value);
    }
}

fn set_mode_gauge(current: BreakerMode) {
    for mode in BreakerMode::ALL {
        let value = if mode == current { 1.0 } else { 0.0 };
        metrics::gauge!(names::BREAKER_MODE, "mode" => mode.as_str()).set(value);
    }
}

/// The breaker's answer to a call, before any side effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Refused; the caller may try again after this long.
    Reject(Duration),
    /// Admitted as this kind of call.
    Admit(PermitKind),
    /// The open period is over: turn half-open and admit this call as the
    /// first probe.
    HalfOpenAndProbe,
}

/// The admission rules, in one place for `try_acquire` and `would_reject`.
fn admission(inner: &Inner, now: Instant, caller: Caller) -> Admission {
    match (inner.mode, inner.state) {
        (BreakerMode::Open, _) => Admission::Reject(FORCED_OPEN_RETRY_AFTER),
        (BreakerMode::Closed, _) => Admission::Admit(PermitKind::Forced),
        (BreakerMode::Auto, BreakerState::Open) => {
            let until = inner.open_until.unwrap_or(now);
            if now < until {
                Admission::Reject(until - now)
            } else if caller == Caller::Sync {
                Admission::HalfOpenAndProbe
            } else {
                // The sync loop's probe is due now.
                Admission::Reject(HALF_OPEN_RETRY_AFTER)
            }
        }
        (BreakerMode::Auto, BreakerState::HalfOpen) => {
            if caller == Caller::Client
                || inner.probes_in_flight + inner.probes_succeeded >= inner.config.half_open_probes
            {
                Admission::Reject(HALF_OPEN_RETRY_AFTER)
            } else {
                Admission::Admit(PermitKind::Probe)
            }
        }
        (BreakerMode::Auto, BreakerState::Closed) => Admission::Admit(PermitKind::Closed),
    }
}

fn rejected(inner: &Inner, retry_after: Duration) -> Rejected {
    Rejected {
        retry_after,
        state: inner.state,
        mode: inner.mode,
    }
}

impl Breaker {
    /// Sets the state and mode gauges to the current values (for a recorder
    /// installed after the breaker was made, and for every scrape).
    pub fn publish_gauges(&self) {
        set_state_gauge(self.state());
        set_mode_gauge(self.mode());
    }

    /// A closed breaker in the configured mode. Out-of-range settings are
    /// clamped (see [`BreakerConfig::validate`] to refuse them instead).
    pub fn new(config: BreakerConfig, clock: Clock) -> Self {
        let config = config.clamped();
        let now = Instant::now();
        let (transitions, _) = broadcast::channel(TRANSITION_CHANNEL_CAPACITY);
        let mode = config.mode;
        set_state_gauge(BreakerState::Closed);
        set_mode_gauge(mode);
        Breaker {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    window: Window::new(now, config.window),
                    config,
                    mode,
                    state: BreakerState::Closed,
                    since: now,
                    since_wall: clock.now(),
                    reason: None,
                    epoch: 0,
                    consecutive_failures: 0,
                    reopens: 0,
                    open_until: None,
                    probes_in_flight: 0,
                    probes_succeeded: 0,
                }),
                transitions,
                clock,
            }),
        }
    }

    /// What [`Breaker::try_acquire`] would answer, without taking a permit or
    /// moving the state machine: `Some` when a call would be rejected now.
    /// Lets a read that is bound to be refused skip the work of preparing
    /// an upstream call (the path every read takes while the breaker is open).
    pub fn would_reject(&self, caller: Caller) -> Option<Rejected> {
        let inner = self.shared.lock();
        match admission(&inner, Instant::now(), caller) {
            Admission::Reject(retry_after) => Some(rejected(&inner, retry_after)),
            _ => None,
        }
    }

    /// Asks to make one upstream call. An open breaker whose open period has
    /// ended turns half-open here and admits the sync loop's call as a
    /// probe; a client's call waits for the probe's verdict.
    pub fn try_acquire(&self, caller: Caller) -> Result<Permit, Rejected> {
        let mut inner = self.shared.lock();
        let now = Instant::now();
        let kind = match admission(&inner, now, caller) {
            Admission::Reject(retry_after) => return Err(rejected(&inner, retry_after)),
            Admission::Admit(kind) => kind,
            Admission::HalfOpenAndProbe => {
                let since = inner.since;
                let until = inner.open_until.unwrap_or(now);
                let reason = format!(
                    "open period of {} elapsed",
                    humantime::format_duration(until.saturating_duration_since(since))
                );
                transition(
                    &self.shared,
                    &mut inner,
                    now,
                    BreakerState::HalfOpen,
                    reason,
                    None,
                );
                PermitKind::Probe
            }
        };
        if kind == PermitKind::Probe {
            inner.probes_in_flight += 1;
        }
        Ok(Permit {
            shared: Arc::clone(&self.shared),
            kind,
            epoch: inner.epoch,
            reported: false,
        })
    }

    /// Sets the operator mode. The state machine keeps its state, so going
    /// back to `Auto` resumes where it stood. `flags` is the one caller at
    /// run time: it persists and audits the mode in the same step.
    pub fn set_mode(&self, mode: BreakerMode) {
        let mut inner = self.shared.lock();
        inner.mode = mode;
        set_mode_gauge(mode);
    }

    /// The operator mode.
    pub fn mode(&self) -> BreakerMode {
        self.shared.lock().mode
    }

    /// The state machine's state (an `Open` mode does not change it).
    pub fn state(&self) -> BreakerState {
        self.shared.lock().state
    }

    /// A snapshot for status pages.
    pub fn status(&self) -> BreakerStatus {
        let inner = self.shared.lock();
        let (window_calls, window_failures) = inner.window.totals(Instant::now());
        BreakerStatus {
            state: inner.state,
            mode: inner.mode,
            since: inner.since,
            since_wall: inner.since_wall,
            reason: inner.reason.clone(),
            consecutive_failures: inner.consecutive_failures,
            open_until: inner.open_until,
            window_calls,
            window_failures,
            probes_in_flight: inner.probes_in_flight,
        }
    }

    /// When the breaker will next admit a probe, for the sync loop to sleep
    /// until (recovery needs no client traffic): the end of the open period,
    /// or the start of half-open when a probe slot is free now. `None` when
    /// closed, when every probe slot is taken, or when the operator overrides.
    pub fn next_probe_at(&self) -> Option<Instant> {
        let inner = self.shared.lock();
        if inner.mode != BreakerMode::Auto {
            return None;
        }
        match inner.state {
            BreakerState::Open => inner.open_until,
            BreakerState::HalfOpen
                if inner.probes_in_flight + inner.probes_succeeded
                    < inner.config.half_open_probes =>
            {
                Some(inner.since)
            }
            _ => None,
        }
    }

    /// Every state transition from now on, with its reason.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.shared.transitions.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            jitter: 0.0,
            ..BreakerConfig::default()
        }
    }

    fn fail(breaker: &Breaker, n: u32) {
        for _ in 0..n {
            breaker
                .try_acquire(Caller::Sync)
                .expect("admitted")
                .failure();
        }
    }

    fn succeed(breaker: &Breaker, n: u32) {
        for _ in 0..n {
            breaker
                .try_acquire(Caller::Sync)
                .expect("admitted")
                .success();
        }
    }

    /// Opens the breaker by consecutive failures and waits out the open period.
    async fn open_then_wait(breaker: &Breaker) {
        fail(breaker, DEFAULT_CONSECUTIVE_FAILURES);
        assert_eq!(breaker.state(), BreakerState::Open);
        let until = breaker
            .next_probe_at()
            .expect("open breaker has a probe time");
        tokio::time::sleep_until(until).await;
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_sync_loop_probes_a_recovering_upstream() {
        let breaker = Breaker::new(config(), Clock::system());
        open_then_wait(&breaker).await;
        // The open period is over: a client is still turned away, and is
        // not the probe, so its outcome cannot close (or re-open) anything.
        let turned_away = breaker
            .try_acquire(Caller::Client)
            .expect_err("clients never probe");
        assert_eq!(turned_away.retry_after, HALF_OPEN_RETRY_AFTER);
        assert!(breaker.would_reject(Caller::Client).is_some());
        assert!(breaker.would_reject(Caller::Sync).is_none());
        assert_eq!(breaker.state(), BreakerState::Open);
        let probe = breaker
            .try_acquire(Caller::Sync)
            .expect("the sync loop probes");
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.try_acquire(Caller::Client).is_err());
        probe.success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker
            .try_acquire(Caller::Client)
            .expect("closed: clients are admitted")
            .success();
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures() {
        let breaker = Breaker::new(config(), Clock::system());
        fail(&breaker, 4);
        succeed(&breaker, 1); // a success resets the run
        fail(&breaker, 4);
        assert_eq!(breaker.state(), BreakerState::Closed);
        fail(&breaker, 1);
        assert_eq!(breaker.state(), BreakerState::Open);
        let rejected = breaker.try_acquire(Caller::Sync).expect_err("open rejects");
        assert_eq!(rejected.state, BreakerState::Open);
        assert_eq!(rejected.mode, BreakerMode::Auto);
        assert_eq!(rejected.retry_after, DEFAULT_OPEN_FOR);
        assert!(rejected.to_string().contains("retry in 5s"), "{rejected}");
        let status = breaker.status();
        assert_eq!(status.consecutive_failures, 5);
        assert_eq!(status.reason.as_deref(), Some("5 consecutive failures"));
        assert_eq!(status.open_until, Some(Instant::now() + DEFAULT_OPEN_FOR));
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_failure_rate_with_enough_calls() {
        let breaker = Breaker::new(config(), Clock::system());
        // Alternate so that no run of failures reaches the threshold.
        for _ in 0..4 {
            fail(&breaker, 1);
            succeed(&breaker, 1);
        }
        fail(&breaker, 1);
        // 5 failures of 9 calls: above the rate but below min_calls.
        assert_eq!(breaker.state(), BreakerState::Closed);
        succeed(&breaker, 1);
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "successes never open"
        );
        fail(&breaker, 1);
        // 6 of 11 calls = 0.55 ≥ 0.5 with ≥ 10 calls.
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(
            breaker.status().reason.as_deref(),
            Some("failure rate 0.55 over 30s (6 of 11 calls)")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_below_threshold_stays_closed() {
        let breaker = Breaker::new(config(), Clock::system());
        for _ in 0..20 {
            succeed(&breaker, 2);
            fail(&breaker, 1);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.status().window_calls, 60);
    }

    #[tokio::test(start_paused = true)]
    async fn window_rolls_forward_and_forgets_old_failures() {
        let breaker = Breaker::new(config(), Clock::system());
        fail(&breaker, 4);
        succeed(&breaker, 1);
        fail(&breaker, 4);
        succeed(&breaker, 1);
        assert_eq!(breaker.status().window_failures, 8);
        tokio::time::advance(DEFAULT_WINDOW + Duration::from_secs(3)).await;
        let status = breaker.status();
        assert_eq!((status.window_calls, status.window_failures), (0, 0));
        // Had the old failures been kept, this would be 9 of 11 and open.
        succeed(&breaker, 1);
        fail(&breaker, 1);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.status().window_calls, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn window_keeps_recent_buckets_while_rolling() {
        let breaker = Breaker::new(config(), Clock::system());
        fail(&breaker, 3);
        tokio::time::advance(Duration::from_secs(15)).await;
        fail(&breaker, 1);
        succeed(&breaker, 1);
        assert_eq!(breaker.status().window_failures, 4);
        tokio::time::advance(Duration::from_secs(20)).await;
        // The first three are now older than the window; the 15s ones are not.
        let status = breaker.status();
        assert_eq!((status.window_calls, status.window_failures), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn open_turns_half_open_after_open_for() {
        let breaker = Breaker::new(config(), Clock::system());
        fail(&breaker, 5);
        tokio::time::advance(DEFAULT_OPEN_FOR - Duration::from_millis(1)).await;
        let rejected = breaker.try_acquire(Caller::Sync).expect_err("still open");
        assert_eq!(rejected.retry_after, Duration::from_millis(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        let probe = breaker.try_acquire(Caller::Sync).expect("probe admitted");
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert_eq!(breaker.status().probes_in_flight, 1);
        drop(probe);
    }

    #[tokio::test(start_paused = true)]
    async fn probe_success_closes_and_resets_the_period() {
        let breaker = Breaker::new(config(), Clock::system());
        open_then_wait(&breaker).await;
        breaker.try_acquire(Caller::Sync).expect("probe").success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        let status = breaker.status();
        assert_eq!(status.consecutive_failures, 0);
        assert_eq!(status.window_calls, 0, "window cleared on close");
        assert_eq!(status.open_until, None);
        // The next opening starts again at open_for, not doubled.
        fail(&breaker, 5);
        assert_eq!(
            breaker.try_acquire(Caller::Sync).unwrap_err().retry_after,
            DEFAULT_OPEN_FOR
        );
    }

    #[tokio::test(start_paused = true)]
    async fn probe_failure_reopens_with_doubled_period_up_to_max_open() {
        let breaker = Breaker::new(config(), Clock::system());
        fail(&breaker, 5);
        let mut expected = DEFAULT_OPEN_FOR;
        for _ in 0..6 {
            let until = breaker.next_probe_at().expect("open");
            assert_eq!(until - Instant::now(), expected);
            tokio::time::sleep_until(until).await;
            breaker.try_acquire(Caller::Sync).expect("probe").failure();
            assert_eq!(breaker.state(), BreakerState::Open);
            assert_eq!(breaker.status().reason.as_deref(), Some("probe failed"));
            expected = (expected * 2).min(DEFAULT_MAX_OPEN);
        }
        // 5, 10, 20, 40, then capped at 60.
        assert_eq!(expected, DEFAULT_MAX_OPEN);
        let until = breaker.next_probe_at().expect("open");
        assert_eq!(until - Instant::now(), DEFAULT_MAX_OPEN);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_limits_concurrent_probes() {
        let breaker = Breaker::new(config(), Clock::system());
        open_then_wait(&breaker).await;
        let probe = breaker.try_acquire(Caller::Sync).expect("first probe");
        let rejected = breaker
            .try_acquire(Caller::Sync)
            .expect_err("second probe refused");
        assert_eq!(rejected.state, BreakerState::HalfOpen);
        assert_eq!(rejected.retry_after, HALF_OPEN_RETRY_AFTER);
        assert!(rejected.to_string().contains("half-open"), "{rejected}");
        assert_eq!(breaker.next_probe_at(), None, "no free slot");
        probe.success();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn several_probes_must_all_succeed() {
        let breaker = Breaker::new(
            BreakerConfig {
                half_open_probes: 2,
                ..config()
            },
            Clock::system(),
        );
        open_then_wait(&breaker).await;
        let first = breaker.try_acquire(Caller::Sync).expect("first probe");
        let second = breaker.try_acquire(Caller::Sync).expect("second probe");
        assert!(
            breaker.try_acquire(Caller::Sync).is_err(),
            "third probe refused"
        );
        first.success();
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(
            breaker.try_acquire(Caller::Sync).is_err(),
            "a success holds its slot"
        );
        second.success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(
            breaker.status().reason.as_deref(),
            Some("2 probes succeeded")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_probe_frees_its_slot() {
        let breaker = Breaker::new(config(), Clock::system());
        open_then_wait(&breaker).await;
        let probe = breaker.try_acquire(Caller::Sync).expect("probe");
        assert!(breaker.try_acquire(Caller::Sync).is_err());
        drop(probe);
        assert_eq!(
            breaker.state(),
            BreakerState::HalfOpen,
            "cancel is no outcome"
        );
        assert_eq!(breaker.next_probe_at(), Some(breaker.status().since));
        let probe = breaker.try_acquire(Caller::Sync).expect("slot freed");
        probe.failure();
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_from_an_earlier_state_do_not_move_the_machine() {
        let breaker = Breaker::new(config(), Clock::system());
        let late = breaker
            .try_acquire(Caller::Sync)
            .expect("admitted while closed");
        open_then_wait(&breaker).await;
        let probe = breaker.try_acquire(Caller::Sync).expect("probe");
        late.success(); // must not count as the probe's success
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        probe.success();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn forced_open_rejects_and_forced_closed_admits() {
        let breaker = Breaker::new(config(), Clock::system());
        breaker.set_mode(BreakerMode::Open);
        let rejected = breaker.try_acquire(Caller::Sync).expect_err("forced open");
        assert_eq!(rejected.mode, BreakerMode::Open);
        assert_eq!(rejected.state, BreakerState::Closed);
        assert_eq!(rejected.retry_after, FORCED_OPEN_RETRY_AFTER);
        assert_eq!(
            rejected.to_string(),
            "the upstream circuit breaker is open (forced by operator)"
        );
        assert_eq!(breaker.next_probe_at(), None);

        breaker.set_mode(BreakerMode::Closed);
        fail(&breaker, 50);
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "forced closed never opens"
        );
        let status = breaker.status();
        assert_eq!(status.consecutive_failures, 50, "still recorded");
        assert_eq!(status.window_failures, 50);
    }

    #[tokio::test(start_paused = true)]
    async fn forced_closed_admits_while_the_machine_is_open() {
        let breaker = Breaker::new(config(), Clock::system());
        fail(&breaker, 5);
        breaker.set_mode(BreakerMode::Closed);
        succeed(&breaker, 3);
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "forced calls are no probes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn back_to_auto_keeps_the_machine_state() {
        let breaker = Breaker::new(config(), Clock::system());
        fail(&breaker, 5);
        breaker.set_mode(BreakerMode::Open);
        tokio::time::advance(DEFAULT_OPEN_FOR).await;
        assert!(breaker.try_acquire(Caller::Sync).is_err());
        assert_eq!(breaker.state(), BreakerState::Open);
        breaker.set_mode(BreakerMode::Auto);
        assert_eq!(breaker.mode(), BreakerMode::Auto);
        assert_eq!(breaker.state(), BreakerState::Open);
        breaker
            .try_acquire(Caller::Sync)
            .expect("probe after open_for")
            .success();
        assert_eq!(breaker.state(), BreakerState::Closed);

        breaker.set_mode(BreakerMode::Closed);
        fail(&breaker, 4);
        breaker.set_mode(BreakerMode::Auto);
        fail(&breaker, 1);
        assert_eq!(breaker.state(), BreakerState::Open, "the run carried over");
    }

    #[tokio::test(start_paused = true)]
    async fn transitions_are_broadcast_with_reasons() {
        let breaker = Breaker::new(config(), Clock::system());
        let mut rx = breaker.subscribe();
        fail(&breaker, 5);
        tokio::time::advance(DEFAULT_OPEN_FOR).await;
        breaker.try_acquire(Caller::Sync).expect("probe").failure();
        tokio::time::advance(DEFAULT_OPEN_FOR * 2).await;
        breaker.try_acquire(Caller::Sync).expect("probe").success();

        let seen: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|t| (t.from, t.to, t.reason, t.open_for))
            .collect();
        use BreakerState::*;
        assert_eq!(
            seen,
            vec![
                (
                    Closed,
                    Open,
                    "5 consecutive failures".to_owned(),
                    Some(DEFAULT_OPEN_FOR)
                ),
                (Open, HalfOpen, "open period of 5s elapsed".to_owned(), None),
                (
                    HalfOpen,
                    Open,
                    "probe failed".to_owned(),
                    Some(DEFAULT_OPEN_FOR * 2)
                ),
                (
                    Open,
                    HalfOpen,
                    "open period of 10s elapsed".to_owned(),
                    None
                ),
                (HalfOpen, Closed, "probe succeeded".to_owned(), None),
            ]
        );
    }

    #[test]
    fn jitter_bounds() {
        let base = Duration::from_secs(10);
        assert_eq!(jittered(base, 0.0, 0.9), base);
        assert_eq!(jittered(base, 0.1, 0.0), Duration::from_secs(9));
        assert_eq!(jittered(base, 0.1, 0.5), base);
        assert!(jittered(base, 0.1, 0.999_999) < Duration::from_secs(11));
    }

    #[tokio::test(start_paused = true)]
    async fn jittered_open_periods_stay_within_bounds() {
        let breaker = Breaker::new(
            BreakerConfig {
                jitter: 0.2,
                ..BreakerConfig::default()
            },
            Clock::system(),
        );
        let mut periods = Vec::new();
        for _ in 0..50 {
            fail(&breaker, 5);
            let until = breaker.next_probe_at().expect("open");
            periods.push(until - Instant::now());
            tokio::time::sleep_until(until).await;
            breaker.try_acquire(Caller::Sync).expect("probe").success();
        }
        let (low, high) = (DEFAULT_OPEN_FOR.mul_f64(0.8), DEFAULT_OPEN_FOR.mul_f64(1.2));
        assert!(
            periods.iter().all(|p| (low..=high).contains(p)),
            "{periods:?} outside {low:?}..={high:?}"
        );
        assert!(periods.iter().any(|p| *p != periods[0]), "jitter varies");
    }

    #[test]
    fn names_round_trip() {
        for state in BreakerState::ALL {
            assert_eq!(state.as_str().parse::<BreakerState>(), Ok(state));
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
        for mode in BreakerMode::ALL {
            assert_eq!(mode.as_str().parse::<BreakerMode>(), Ok(mode));
            let json = serde_json::to_string(&mode).unwrap();
            assert_eq!(serde_json::from_str::<BreakerMode>(&json).unwrap(), mode);
        }
        let err = "halfopen".parse::<BreakerMode>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown breaker mode `halfopen`: expected auto, open or closed"
        );
    }

    #[test]
    fn validate_names_the_bad_setting() {
        assert_eq!(BreakerConfig::default().validate(), Ok(()));
        let bad = BreakerConfig {
            failure_rate: 1.5,
            ..BreakerConfig::default()
        };
        assert_eq!(bad.validate(), Err(BreakerConfigError::FailureRate(1.5)));
        let bad = BreakerConfig {
            max_open: Duration::from_secs(1),
            ..BreakerConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("breaker.max_open"));
    }

    #[tokio::test(start_paused = true)]
    async fn degenerate_config_is_clamped_not_panicking() {
        let breaker = Breaker::new(
            BreakerConfig {
                consecutive_failures: 0,
                failure_rate: f64::NAN,
                min_calls: 0,
                window: Duration::ZERO,
                open_for: Duration::ZERO,
                max_open: Duration::ZERO,
                half_open_probes: 0,
                jitter: 7.0,
                ..BreakerConfig::default()
            },
            Clock::system(),
        );
        fail(&breaker, 1);
        assert_eq!(breaker.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1)).await;
        breaker.try_acquire(Caller::Sync).expect("probe").success();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
