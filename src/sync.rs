//! The sync loop ([`Syncer`]): pages through the upstream catalog and
//! applies the whole result as one new mirror generation.
//!
//! A sync that fails on any page, or receives malformed data, applies
//! nothing ([`SyncError`] says why). Unchanged entities (same
//! `metadata.etag`) are not rewritten and keep their hot-cache entries. A
//! sync that would remove more than `mirror.max_delete_ratio` of the mirror
//! (or empty it) is held until an operator accepts it. Syncs run every
//! `mirror.sync_interval` ± jitter; failed ones back off exponentially, and
//! while the breaker is open the next attempt is timed to be its half-open
//! probe, so recovery needs no client traffic. One sync runs at a time.
//! What the rest of the sidecar may know of and ask of the loop is
//! [`SyncStatus`]: the last report, held deletions, "sync soon".

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::breaker::{Breaker, BreakerState};
use crate::cache::HotCache;
use crate::clock::Clock;
use crate::config::Config;
use crate::entity::{Entity, EntityError};
use crate::generation::{Generation, Generations};
use crate::history::History;
use crate::index::{Index, IndexLimits};
use crate::metrics as m;
use crate::mirror::{rfc3339, ApplyStats, AuditRecord, Diff, Mirror, MirrorError};
use crate::provenance::Confirmation;
use crate::retry::{self, RetryPolicy};
use crate::route::encode_component;
use crate::upstream::{Expect, Operation, Upstream, UpstreamError, UpstreamRequest};

/// Most pages one sync reads before it gives up (a cursor loop guard).
const MAX_PAGES: usize = 100_000;

/// The result of one sync, as `status` and `catalog-cache sync` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SyncReport {
    /// `applied`, `unchanged`, `failed` or `held`.
    pub result: SyncResult,
    /// When it finished (RFC 3339).
    pub at: String,
    /// How long it took.
    pub duration_seconds: f64,
    /// Entities added.
    pub added: usize,
    /// Entities changed.
    pub changed: usize,
    /// Entities removed.
    pub removed: usize,
    /// Entities unchanged.
    pub unchanged: usize,
    /// The generation in force afterwards.
    pub generation: Option<u64>,
    /// What went wrong, for `failed` and `held`.
    pub error: Option<String>,
}

/// The outcome of a sync.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SyncResult {
    /// A new generation was applied.
    Applied,
    /// The upstream confirmed the mirror as it is.
    Unchanged,
    /// A page failed or was malformed; nothing was applied.
    Failed,
    /// Too many deletions; nothing was applied until an operator accepts.
    Held,
}

impl SyncResult {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Failed => "failed",
            Self::Held => "held",
        }
    }
}

/// A sync that was not applied because it would delete too much.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeldDeletions {
    /// Entities it would remove.
    pub would_remove: usize,
    /// Entities in the mirror.
    pub of: usize,
    /// The share.
    pub ratio: f64,
    /// Since when (RFC 3339).
    pub since: String,
}

#[derive(Deserialize)]
struct Page<'a> {
    #[serde(borrow)]
    items: Vec<&'a serde_json::value::RawValue>,
    #[serde(rename = "pageInfo", default)]
    page_info: PageInfo,
    #[serde(rename = "totalItems")]
    total_items: Option<usize>,
}

#[derive(Deserialize, Default)]
struct PageInfo {
    #[serde(rename = "nextCursor")]
    next_cursor: Option<String>,
}

/// Why a sync applied nothing.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The upstream gave no usable answer for a page.
    #[error("page {page}: {source}")]
    Page {
        /// 1-based page number.
        page: usize,
        /// What went wrong.
        source: UpstreamError,
    },
    /// The upstream answered a page with a non-success status.
    #[error("page {page}: the upstream answered {status}")]
    Status {
        /// 1-based page number.
        page: usize,
        /// The status.
        status: http::StatusCode,
    },
    /// A page is not the shape of a by-query page.
    #[error("page {page} is not a by-query page: {reason}")]
    NotAPage {
        /// 1-based page number.
        page: usize,
        /// The parser's message.
        reason: String,
    },
    /// A page holds something that is not an entity the mirror can hold.
    #[error("page {page}: {source}")]
    BadEntity {
        /// 1-based page number.
        page: usize,
        /// What is wrong with it.
        source: EntityError,
    },
    /// A page's `totalItems` disagrees with page 1's.
    #[error("page {page}: the upstream now counts {total} entities, page 1 counted {first}; the catalog changed during the sync")]
    CountChanged {
        /// 1-based page number.
        page: usize,
        /// This page's count.
        total: usize,
        /// Page 1's count.
        first: usize,
    },
    /// The walk ended with fewer entities than page 1 announced.
    #[error("paging ended after {got} entities, but the upstream counted {total}; the catalog changed during the sync or a page was cut short")]
    ShortWalk {
        /// Entities received.
        got: usize,
        /// Entities announced.
        total: usize,
    },
    /// The upstream sent the cursor it was given back.
    #[error("page {page}: the upstream repeated its cursor")]
    RepeatedCursor {
        /// 1-based page number.
        page: usize,
    },
    /// The walk did not end (a cursor loop guard).
    #[error("gave up after {0} pages")]
    TooManyPages(usize),
    /// The mirror could not store the generation.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// The blocking task that applies a generation failed.
    #[error("applying the generation failed: {0}")]
    Internal(String),
}

/// What the rest of the sidecar may know of and ask of the sync loop: the
/// last report, the deletions being held, and a request to sync soon.
/// Shared by the loop, the read path and the admin API.
#[derive(Default)]
pub struct SyncStatus {
    last: Mutex<Option<SyncReport>>,
    held: Mutex<Option<HeldDeletions>>,
    trigger: Notify,
}

impl SyncStatus {
    /// The state a previous run left in the mirror (last report, held
    /// deletions), so that `status` tells the truth right after a restart.
    pub fn restore(mirror: &Mirror) -> Self {
        let status = Self::default();
        if let Ok(Some(text)) = mirror.note("last_sync") {
            *lock(&status.last) = serde_json::from_str(&text).ok();
        }
        if let Ok(Some(text)) = mirror.note("held_deletions") {
            *lock(&status.held) = serde_json::from_str(&text).ok();
        }
        status
    }

    /// The held deletions, if any.
    pub fn held_deletions(&self) -> Option<HeldDeletions> {
        lock(&self.held).clone()
    }

    /// The last sync's report.
    pub fn last_sync(&self) -> Option<SyncReport> {
        lock(&self.last).clone()
    }

    /// Whether the upstream's word that entities are gone is in doubt: the
    /// deletion guard holds a sync, or the last sync failed (a catalog that
    /// empties mid-walk fails the walk before a full walk can be held).
    pub fn upstream_suspect(&self) -> bool {
        lock(&self.held).is_some()
            || lock(&self.last)
                .as_ref()
                .is_some_and(|r| r.result == SyncResult::Failed)
    }

    /// Asks the sync loop for a sync as soon as it can (debounced).
    pub fn sync_soon(&self) {
        self.trigger.notify_one();
    }

    /// Sets the held-deletions gauge.
    pub fn publish_gauges(&self) {
        metrics::gauge!(m::SYNC_HELD_DELETIONS)
            .set(self.held_deletions().map_or(0.0, |h| h.would_remove as f64));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The sync loop's settings (from `[mirror]` and `[upstream]`).
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// `mirror.page_size`.
    pub page_size: u32,
    /// `mirror.max_delete_ratio`.
    pub max_delete_ratio: f64,
    /// `mirror.sync_interval`.
    pub interval: Duration,
    /// `mirror.sync_jitter`.
    pub jitter: f64,
    /// `upstream.timeout`: a page's retries stop after twice this.
    pub upstream_timeout: Duration,
    /// The bounds of each generation's query index.
    pub index_limits: IndexLimits,
}

impl SyncSettings {
    /// The settings of `config`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            page_size: config.mirror.page_size,
            max_delete_ratio: config.mirror.max_delete_ratio,
            interval: config.mirror.sync_interval.get(),
            jitter: config.mirror.sync_jitter,
            upstream_timeout: config.upstream.timeout.get(),
            index_limits: config.index_limits(),
        }
    }
}

/// The sync loop and what it needs.
pub struct Syncer {
    settings: SyncSettings,
    upstream: Arc<Upstream>,
    breaker: Breaker,
    mirror: Arc<Mirror>,
    generations: Arc<Generations>,
    hot: HotCache,
    clock: Clock,
    status: Arc<SyncStatus>,
    /// Where each sync's result goes for the status page.
    history: Arc<History>,
    /// One sync at a time.
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Syncer {
    /// A sync loop over these parts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: SyncSettings,
        upstream: Arc<Upstream>,
        breaker: Breaker,
        mirror: Arc<Mirror>,
        generations: Arc<Generations>,
        hot: HotCache,
        clock: Clock,
        status: Arc<SyncStatus>,
        history: Arc<History>,
    ) -> Self {
        Self {
            settings,
            upstream,
            breaker,
            mirror,
            generations,
            hot,
            clock,
            status,
            history,
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// What the loop reports and accepts.
    pub fn status(&self) -> &Arc<SyncStatus> {
        &self.status
    }

    /// Reads the whole catalog from the upstream, page by page, and how the
    /// origin confirmed it (as old as the oldest page says).
    async fn fetch_catalog(&self) -> Result<(Vec<Entity>, Confirmation), SyncError> {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max_interval: Duration::from_secs(1),
            max_elapsed: Some(self.settings.upstream_timeout * 2),
            ..RetryPolicy::default()
        };
        let page_size = self.settings.page_size;
        let mut entities: Vec<Entity> = Vec::new();
        let mut cursor: Option<String> = None;
        let mut expected: Option<usize> = None;
        let mut confirmed: Option<Confirmation> = None;
        for page in 1..=MAX_PAGES {
            let path = match &cursor {
                None => format!("/entities/by-query?limit={page_size}"),
                Some(c) => format!(
                    "/entities/by-query?limit={page_size}&cursor={}",
                    encode_component(c)
                ),
            };
            let response = self
                .upstream
                .call(
                    Operation::SyncPage,
                    &UpstreamRequest::get(path),
                    Expect::Json,
                    Some(&policy),
                )
                .await
                .map_err(|source| SyncError::Page { page, source })?;
            if !response.status.is_success() {
                return Err(SyncError::Status {
                    page,
                    status: response.status,
                });
            }
            let this = Confirmation::received(&response.provenance, self.clock.now());
            match &mut confirmed {
                Some(c) => c.merge(this),
                None => confirmed = Some(this),
            }
            let parsed: Page<'_> =
                serde_json::from_slice(&response.body).map_err(|e| SyncError::NotAPage {
                    page,
                    reason: e.to_string(),
                })?;
            // Backstage repeats page 1's totalItems on every page. A page that
            // disagrees, or a walk that ends short of it, means the catalog
            // changed under the walk or a page was cut short: applying it
            // could drop entities that exist, so the sync fails instead.
            match (expected, parsed.total_items) {
                (None, Some(total)) => expected = Some(total),
                (Some(first), Some(total)) if total != first => {
                    return Err(SyncError::CountChanged { page, total, first })
                }
                _ => {}
            }
            for raw in parsed.items {
                let entity = Entity::from_json(Bytes::copy_from_slice(raw.get().as_bytes()))
                    .map_err(|source| SyncError::BadEntity { page, source })?;
                entities.push(entity);
            }
            match parsed.page_info.next_cursor {
                Some(next) if Some(&next) == cursor.as_ref() => {
                    return Err(SyncError::RepeatedCursor { page })
                }
                Some(next) => cursor = Some(next),
                None => {
                    return match expected {
                        Some(total) if total != entities.len() => Err(SyncError::ShortWalk {
                            got: entities.len(),
                            total,
                        }),
                        _ => Ok((
                            entities,
                            confirmed.unwrap_or_else(|| self.clock.now().into()),
                        )),
                    }
                }
            }
        }
        Err(SyncError::TooManyPages(MAX_PAGES))
    }

    /// Runs one sync now (waiting for one in progress to end first).
    pub async fn sync_once(&self, accept_deletions: bool) -> SyncReport {
        let _one_at_a_time = self.one_at_a_time.lock().await;
        let started = Instant::now();
        let fetched = self.fetch_catalog().await;
        let report = match fetched {
            Ok((entities, confirmed)) => {
                self.apply_catalog(entities, confirmed, accept_deletions, started)
                    .await
            }
            Err(error) => self.report(
                SyncResult::Failed,
                started,
                ApplyStats::default(),
                Some(error),
            ),
        };
        metrics::counter!(m::SYNCS_TOTAL, "result" => report.result.as_str()).increment(1);
        metrics::histogram!(m::SYNC_DURATION_SECONDS).record(report.duration_seconds);
        self.history.sync_done(
            self.clock.now(),
            report.result.as_str(),
            Duration::from_secs_f64(report.duration_seconds),
        );
        match report.result {
            SyncResult::Failed => tracing::warn!(
                error = report.error.as_deref().unwrap_or(""),
                duration_seconds = report.duration_seconds,
                "sync failed; the mirror keeps its generation"
            ),
            SyncResult::Held => {}
            _ => tracing::info!(
                result = report.result.as_str(),
                generation = report.generation,
                added = report.added,
                changed = report.changed,
                removed = report.removed,
                unchanged = report.unchanged,
                duration_seconds = report.duration_seconds,
                "sync done"
            ),
        }
        self.remember_report(&report);
        report
    }

    fn report(
        &self,
        result: SyncResult,
        started: Instant,
        stats: ApplyStats,
        error: Option<SyncError>,
    ) -> SyncReport {
        SyncReport {
            result,
            at: rfc3339(self.clock.now()),
            duration_seconds: started.elapsed().as_secs_f64(),
            added: stats.added,
            changed: stats.changed,
            removed: stats.removed,
            unchanged: stats.unchanged,
            generation: self.generations.current().map(|g| g.meta.id),
            error: error.map(|e| e.to_string()),
        }
    }

    fn remember_report(&self, report: &SyncReport) {
        *lock(&self.status.last) = Some(report.clone());
        if let Ok(text) = serde_json::to_string(report) {
            if let Err(e) = self.mirror.set_note("last_sync", Some(&text)) {
                tracing::warn!(error = %e, "cannot persist the sync report");
            }
        }
    }

    async fn apply_catalog(
        &self,
        entities: Vec<Entity>,
        confirmed: Confirmation,
        accept_deletions: bool,
        started: Instant,
    ) -> SyncReport {
        let current = self.generations.current();
        let previous = current.as_ref().map(|g| g.etags()).unwrap_or_default();
        // Reuse the previous generation's entity for an unchanged etag, so
        // unchanged entities keep one copy in memory.
        let mut next: Vec<Arc<Entity>> = Vec::with_capacity(entities.len());
        let mut seen = HashSet::with_capacity(entities.len());
        for entity in entities {
            if !seen.insert(entity.uid.clone()) {
                continue;
            }
            match current.as_ref().and_then(|g| g.index.by_uid(&entity.uid)) {
                Some(old) if old.etag == entity.etag => next.push(old.clone()),
                _ => next.push(Arc::new(entity)),
            }
        }
        drop(seen);
        let diff = Diff::between(&previous, &next);
        let stats = diff.stats;
        let held = self.deletion_guard(previous.len(), stats.removed, next.is_empty());
        if let Some(held) = held.filter(|_| !accept_deletions) {
            let message = format!(
                "the upstream's catalog would remove {} of {} entities ({:.0}%), more than mirror.max_delete_ratio allows; run `catalog-cache sync --accept-deletions` to apply it",
                held.would_remove,
                held.of,
                held.ratio * 100.0
            );
            self.hold(held);
            let mut report = self.report(SyncResult::Held, started, stats, None);
            report.error = Some(message);
            return report;
        }
        let now = self.clock.now();
        if diff.is_empty() {
            if let Some(current) = &current {
                let mirror = self.mirror.clone();
                let keep = diff.members.clone();
                let confirmation = confirmed.clone();
                let confirmed =
                    tokio::task::spawn_blocking(move || mirror.confirm(confirmation, &keep)).await;
                match confirmed {
                    Ok(Ok(Some(meta))) => {
                        self.generations.install(Generation {
                            index: current.index.clone(),
                            meta,
                            confirmed: current.confirmed.clone(),
                        });
                        self.clear_held(accept_deletions);
                        return self.report(SyncResult::Unchanged, started, stats, None);
                    }
                    Ok(Err(e)) => {
                        return self.report(SyncResult::Failed, started, stats, Some(e.into()))
                    }
                    _ => {}
                }
            }
        }
        let mirror = self.mirror.clone();
        let fetched_in = started.elapsed();
        let limits = self.settings.index_limits;
        let applied = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let result = mirror.apply(&diff, confirmed, "sync")?;
            let applied_in = t.elapsed();
            let index = Index::build(result.0.id, next, &limits);
            // Install the new generation only once it can answer queries:
            // until then the previous one keeps answering them at full speed
            // (a restart, with no previous generation, installs at once).
            index.wait_query_ready();
            tracing::debug!(
                fetch_seconds = fetched_in.as_secs_f64(),
                apply_seconds = applied_in.as_secs_f64(),
                index_seconds = (t.elapsed() - applied_in).as_secs_f64(),
                "sync phases"
            );
            Ok::<_, MirrorError>((result, index))
        })
        .await;
        let ((meta, written), index) = match applied {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return self.report(SyncResult::Failed, started, stats, Some(e.into())),
            Err(e) => {
                return self.report(
                    SyncResult::Failed,
                    started,
                    stats,
                    Some(SyncError::Internal(e.to_string())),
                )
            }
        };
        // Invalidate hot entries of changed or removed entities; keep the rest.
        if let Some(old) = &current {
            for e in old.index.entities() {
                match index.by_uid(&e.uid) {
                    Some(new) if new.etag == e.etag => {}
                    _ => self.hot.invalidate_entity(&e.uid, &e.entity_ref),
                }
            }
        }
        self.generations.install(Generation::new(index, meta));
        if accept_deletions && stats.removed > 0 {
            let to = format!("{} removed", stats.removed);
            if let Err(e) = self.mirror.audit(&AuditRecord {
                at: now,
                actor: "cli",
                subject: "deletions",
                from: None,
                to: &to,
                reason: Some("held deletions accepted"),
            }) {
                tracing::warn!(error = %e, "cannot audit accepted deletions");
            }
        }
        self.clear_held(true);
        let stats = ApplyStats {
            rows_written: written.rows_written,
            ..stats
        };
        self.report(SyncResult::Applied, started, stats, None)
    }

    fn deletion_guard(&self, before: usize, removed: usize, empty: bool) -> Option<HeldDeletions> {
        if before == 0 || removed == 0 {
            return None;
        }
        let ratio = removed as f64 / before as f64;
        // An upstream that suddenly serves an empty catalog never empties
        // the mirror, even with the guard set to 1.
        (ratio > self.settings.max_delete_ratio || empty).then(|| HeldDeletions {
            would_remove: removed,
            of: before,
            ratio,
            since: rfc3339(self.clock.now()),
        })
    }

    fn hold(&self, held: HeldDeletions) {
        let mut slot = lock(&self.status.held);
        let since = slot
            .as_ref()
            .map(|h| h.since.clone())
            .unwrap_or(held.since.clone());
        let held = HeldDeletions { since, ..held };
        tracing::warn!(
            would_remove = held.would_remove,
            of = held.of,
            ratio = held.ratio,
            since = %held.since,
            "sync held: it would delete more than mirror.max_delete_ratio; accept with `catalog-cache sync --accept-deletions`"
        );
        metrics::gauge!(m::SYNC_HELD_DELETIONS).set(held.would_remove as f64);
        if let Ok(text) = serde_json::to_string(&held) {
            let _ = self.mirror.set_note("held_deletions", Some(&text));
        }
        *slot = Some(held);
    }

    fn clear_held(&self, upstream_recovered: bool) {
        if !upstream_recovered {
            return;
        }
        let mut slot = lock(&self.status.held);
        if slot.take().is_some() {
            tracing::info!("held deletions cleared");
            let _ = self.mirror.set_note("held_deletions", None);
        }
        metrics::gauge!(m::SYNC_HELD_DELETIONS).set(0.0);
    }

    /// The loop: sync, then wait for the interval (± jitter), a trigger,
    /// or — after a failure — the backoff delay or the breaker's probe time.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let backoff = || {
            retry::next_delays(&RetryPolicy {
                initial: Duration::from_secs(1),
                max_interval: self.settings.interval,
                max_elapsed: None,
                ..RetryPolicy::default()
            })
        };
        let mut failures = backoff();
        let mut transitions = self.breaker.subscribe();
        loop {
            let report = self.sync_once(false).await;
            let wait = match report.result {
                SyncResult::Failed => {
                    let delay = failures.next().unwrap_or(self.settings.interval);
                    match self.breaker.next_probe_at() {
                        Some(at) => at
                            .saturating_duration_since(tokio::time::Instant::now())
                            .max(Duration::from_millis(50))
                            .min(delay.max(Duration::from_millis(50))),
                        None => delay,
                    }
                }
                _ => {
                    failures = backoff();
                    self.jittered_interval()
                }
            };
            let mut wake = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    _ = self.status.trigger.notified() => {
                        // Debounce bursts of triggers (many stale reads at once).
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                    // Reads can open the breaker between syncs; only this
                    // loop probes, so it wakes when the open period ends
                    // rather than at its next interval.
                    transition = transitions.recv() => {
                        if let Ok(t) = transition {
                            if t.to == BreakerState::Open {
                                if let Some(at) = self.breaker.next_probe_at() {
                                    wake = wake.min(at);
                                }
                            }
                        }
                    }
                    _ = shutdown.changed() => return,
                }
                if *shutdown.borrow() {
                    return;
                }
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }

    fn jittered_interval(&self) -> Duration {
        let interval = self.settings.interval.as_secs_f64();
        let jitter = self.settings.jitter;
        let factor = if jitter > 0.0 {
            rand::rng().random_range(1.0 - jitter..=1.0 + jitter)
        } else {
            1.0
        };
        Duration::from_secs_f64(interval * factor)
    }
}
