//! The sync loop ([`Syncer`]): reads what changed at the upstream catalog
//! and applies the whole result as one new mirror generation.
//!
//! How a cycle reads the upstream depends on what it is:
//!
//! - **A Backstage catalog** ([`walk`]): an *id-walk* pages through
//!   `by-query` asking only for each entity's kind, namespace, name, uid and
//!   etag (`mirror.id_page_size` a page), then fetches what is new or
//!   changed with `by-refs` (at most 1,000 a request). Absence from the
//!   complete walk makes an entity a deletion candidate. Each page's
//!   `ETag` is kept, and the next id-walk asks for every page with
//!   `If-None-Match`: an unchanged catalog costs one 304 a page. Every
//!   `mirror.full_sync_every` cycles, on the first sync, and after anything
//!   inconsistent (a `null` from by-refs for a listed entity, a count that
//!   changes, a page that fails), a *full walk* reads whole entities
//!   (`mirror.page_size` a page).
//! - **Another catalog-cache** ([`tier`]): it asks for the tier's
//!   generation with `If-None-Match` (a 304 confirms the mirror as it is),
//!   else reads the tier's changes feed since the generation it follows;
//!   a 410 (outside the feed's window, a new epoch) makes it walk as above.
//!   Its periodic check (every `mirror.full_sync_every` cycles) is an
//!   id-walk of the tier rather than a full walk.
//!   Which one the upstream is, is found by probing and re-checked on full
//!   cycles.
//!
//! A sync that fails on any page, or receives malformed data, applies
//! nothing ([`SyncError`] says why). The first sync after a start with a
//! loaded mirror runs at a random phase of the interval; failures back off
//! with full jitter, and an upstream's `Retry-After` (429, 503) is waited.
//! Unchanged entities (same `metadata.etag`) are not rewritten and keep their hot-cache entries. A
//! sync that would remove more than `mirror.max_delete_ratio` of the mirror
//! (or empty it) is held until an operator accepts it. Syncs run every
//! `mirror.sync_interval` ± jitter; failed ones back off exponentially, and
//! while the breaker is open the next attempt is timed to be its half-open
//! probe, so recovery needs no client traffic. One sync runs at a time.
//! What the rest of the sidecar may know of and ask of the loop is
//! [`SyncStatus`]: the last report, held deletions, "sync soon".

pub mod tier;
pub mod walk;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use crate::upstream::{Upstream, UpstreamError};

pub use tier::TIER_POSITION_NOTE;
use tier::{Follow, Position, Probe};
use walk::{IdWalk, PageTag, Reader};

/// Longest an upstream's `Retry-After` holds the next sync back.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

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
    /// How the upstream was read (absent for a failed sync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<SyncMethod>,
    /// How long the upstream asked this sidecar to wait (`Retry-After`).
    #[serde(skip)]
    pub retry_after: Option<Duration>,
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
    /// The upstream's answers contradict each other (an id-walk lists an
    /// entity by-refs then cannot find, a changes feed that moves): the
    /// sync fails and the next one walks whole entities.
    #[error("the upstream's answers are inconsistent: {0}")]
    Inconsistent(String),
    /// The mirror could not store the generation.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// The blocking task that applies a generation failed.
    #[error("applying the generation failed: {0}")]
    Internal(String),
}

impl SyncError {
    /// Whether the upstream contradicted itself (walked whole at once).
    pub fn is_inconsistency(&self) -> bool {
        matches!(
            self,
            Self::Inconsistent(_)
                | Self::CountChanged { .. }
                | Self::ShortWalk { .. }
                | Self::RepeatedCursor { .. }
                | Self::NotAPage { .. }
                | Self::BadEntity { .. }
        )
    }

    /// Whether the next cycle must read whole entities: after any failure
    /// to read the upstream (not after a rejection by this sidecar's own
    /// breaker, which sent nothing, or a mirror failure).
    pub fn calls_for_full_walk(&self) -> bool {
        !matches!(
            self,
            Self::Page {
                source: UpstreamError::Rejected(_) | UpstreamError::Saturated(_),
                ..
            } | Self::Mirror(_)
                | Self::Internal(_)
        )
    }

    /// How long the upstream asked to be left alone (`Retry-After` on a
    /// 429 or 503), at most [`MAX_RETRY_AFTER`].
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Page {
                source: source @ UpstreamError::Status { .. },
                ..
            } => source.retry_after().map(|d| d.min(MAX_RETRY_AFTER)),
            _ => None,
        }
    }
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
    /// `mirror.id_page_size`.
    pub id_page_size: u32,
    /// `mirror.full_sync_every`.
    pub full_sync_every: u32,
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
            id_page_size: config.mirror.id_page_size,
            full_sync_every: config.mirror.full_sync_every,
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
    /// Cycles since the last full walk; the next is full at
    /// `mirror.full_sync_every`.
    since_full: AtomicU32,
    /// The next cycle must read whole entities (after a failure).
    force_full: std::sync::atomic::AtomicBool,
    /// What the upstream is, as far as known.
    upstream_kind: Mutex<UpstreamKind>,
    /// The page tags of the last id-walk and the generation they describe
    /// (see [`walk::PageTag`]); used only while that generation is current.
    page_tags: Mutex<Option<(u64, Vec<PageTag>)>>,
}

/// What the upstream is, as the probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    /// Not probed yet.
    Unknown,
    /// A Backstage catalog (no tier extension).
    Backstage,
    /// Another catalog-cache.
    Tier,
}

impl UpstreamKind {
    /// As `/status` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Backstage => "backstage",
            Self::Tier => "catalog-cache",
        }
    }
}

/// How one cycle read the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMethod {
    /// Whole entities, page by page.
    FullWalk,
    /// Ids and etags, then by-refs for what changed.
    IdWalk,
    /// An upstream tier's changes feed.
    Changes,
    /// A 304 from an upstream tier, or for every page of an id-walk:
    /// nothing moved.
    NotModified,
}

/// What a cycle read: the next generation's entities, or the upstream's
/// word that the mirror is as it is.
enum Fetched {
    Catalog {
        entities: Vec<Arc<Entity>>,
        confirmed: Confirmation,
        method: SyncMethod,
        /// The upstream tier's position the entities reflect.
        position: Option<Position>,
        /// An id-walk's page tags, for the next one.
        tags: Option<Vec<PageTag>>,
    },
    NotModified(Confirmation),
}

/// What an id-walk cycle read.
enum IdWalked {
    /// The next generation's entities, and the walk's page tags.
    Catalog(Vec<Arc<Entity>>, Confirmation, Option<Vec<PageTag>>),
    /// Every page was a 304.
    NotModified(Confirmation),
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
            since_full: AtomicU32::new(0),
            force_full: std::sync::atomic::AtomicBool::new(false),
            upstream_kind: Mutex::new(UpstreamKind::Unknown),
            page_tags: Mutex::new(None),
        }
    }

    /// What the loop reports and accepts.
    pub fn status(&self) -> &Arc<SyncStatus> {
        &self.status
    }

    /// Runs one sync now (waiting for one in progress to end first).
    pub async fn sync_once(&self, accept_deletions: bool) -> SyncReport {
        let _one_at_a_time = self.one_at_a_time.lock().await;
        let started = Instant::now();
        let fetched = self.fetch().await;
        let mut report = match fetched {
            Ok(Fetched::Catalog {
                entities,
                confirmed,
                method,
                position,
                tags,
            }) => {
                let mut report = self
                    .apply_catalog(entities, confirmed, accept_deletions, started)
                    .await;
                report.method = Some(method);
                if matches!(report.result, SyncResult::Applied | SyncResult::Unchanged) {
                    self.remember_position(position.as_ref());
                    self.remember_tags(tags);
                } else {
                    self.remember_tags(None);
                }
                report
            }
            Ok(Fetched::NotModified(confirmed)) => {
                let mut report = self.confirm_unchanged(confirmed, started).await;
                report.method = Some(SyncMethod::NotModified);
                // The tags (if any) still describe the mirror, whatever
                // generation number confirming it gave.
                let tags = lock(&self.page_tags).take().map(|(_, t)| t);
                if report.result == SyncResult::Unchanged {
                    self.remember_tags(tags);
                }
                report
            }
            Err(error) => {
                if error.calls_for_full_walk() {
                    // The next cycle reads whole entities.
                    self.force_full.store(true, Ordering::Relaxed);
                }
                let retry_after = error.retry_after();
                let mut report = self.report(
                    SyncResult::Failed,
                    started,
                    ApplyStats::default(),
                    Some(error),
                );
                report.retry_after = retry_after;
                report
            }
        };
        if report.result == SyncResult::Failed {
            report.method = None;
        }
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

    /// What the upstream is, as far as known.
    pub fn upstream_kind(&self) -> UpstreamKind {
        *lock(&self.upstream_kind)
    }

    fn set_upstream_kind(&self, kind: UpstreamKind) {
        let mut slot = lock(&self.upstream_kind);
        if *slot != kind {
            tracing::info!(upstream = kind.as_str(), "upstream identified");
        }
        *slot = kind;
        metrics::gauge!(m::UPSTREAM_TIER).set(if kind == UpstreamKind::Tier { 1.0 } else { 0.0 });
    }

    fn reader(&self) -> Reader<'_> {
        Reader {
            upstream: &self.upstream,
            clock: &self.clock,
            policy: RetryPolicy {
                initial: Duration::from_millis(100),
                max_interval: Duration::from_secs(1),
                max_elapsed: Some(self.settings.upstream_timeout * 2),
                ..RetryPolicy::default()
            },
        }
    }

    fn position(&self) -> Option<Position> {
        self.mirror
            .note(TIER_POSITION_NOTE)
            .ok()
            .flatten()
            .and_then(|text| serde_json::from_str(&text).ok())
    }

    fn remember_position(&self, position: Option<&Position>) {
        let text = position.and_then(|p| serde_json::to_string(p).ok());
        if let Err(e) = self.mirror.set_note(TIER_POSITION_NOTE, text.as_deref()) {
            tracing::warn!(error = %e, "cannot persist the upstream tier's position");
        }
    }

    /// Keeps an id-walk's page tags for the generation now current (or
    /// forgets them).
    fn remember_tags(&self, tags: Option<Vec<PageTag>>) {
        let current = self.generations.current().map(|g| g.meta.id);
        *lock(&self.page_tags) = tags.zip(current).map(|(t, id)| (id, t));
    }

    /// The page tags, if they describe the current generation.
    fn tags_for(&self, current: Option<&Generation>) -> Option<Vec<PageTag>> {
        let id = current?.meta.id;
        lock(&self.page_tags)
            .as_ref()
            .filter(|(for_id, _)| *for_id == id)
            .map(|(_, t)| t.clone())
    }

    /// Reads what this cycle needs from the upstream (see the module docs).
    async fn fetch(&self) -> Result<Fetched, SyncError> {
        let reader = self.reader();
        let current = self.generations.current();
        let cycle = self.since_full.load(Ordering::Relaxed);
        let forced = self.force_full.swap(false, Ordering::Relaxed) || current.is_none();
        let periodic = cycle + 1 >= self.settings.full_sync_every;
        let full_due = forced || periodic;
        let mut position = None;
        // A known Backstage is probed again only on full cycles, so that an
        // upstream replaced by a tier (or the other way round) is noticed.
        if self.upstream_kind() != UpstreamKind::Backstage || full_due {
            let known = current.as_ref().and(self.position());
            match tier::probe(&reader, known.as_ref()).await? {
                Probe::Backstage => self.set_upstream_kind(UpstreamKind::Backstage),
                Probe::Unchanged(confirmed) => {
                    self.set_upstream_kind(UpstreamKind::Tier);
                    self.since_full.fetch_add(1, Ordering::Relaxed);
                    return Ok(Fetched::NotModified(confirmed));
                }
                Probe::Tier(info, confirmed) => {
                    self.set_upstream_kind(UpstreamKind::Tier);
                    if let (Some(current), Some(from)) = (&current, &known) {
                        if from.epoch == info.epoch && !full_due {
                            match tier::follow(&reader, from, &info, current.index.entities())
                                .await?
                            {
                                Follow::Next(entities, mut changes_confirmed) => {
                                    changes_confirmed.merge(confirmed);
                                    self.since_full.fetch_add(1, Ordering::Relaxed);
                                    return Ok(Fetched::Catalog {
                                        entities,
                                        confirmed: changes_confirmed,
                                        method: SyncMethod::Changes,
                                        position: Some(Position::from(&info)),
                                        tags: None,
                                    });
                                }
                                Follow::Gone => tracing::info!(
                                    epoch = %from.epoch,
                                    since = from.generation,
                                    "the upstream tier's changes feed no longer covers this mirror; walking it"
                                ),
                            }
                        }
                    }
                    position = Some(Position::from(&info));
                }
            }
        }
        // Against a tier, the periodic check is an id-walk: it finds any
        // drift from the tier as surely as a full walk, at a tenth of the
        // bytes; a full walk is kept for what forced one.
        let tier_check = periodic && !forced && self.upstream_kind() == UpstreamKind::Tier;
        if !full_due || tier_check {
            let walked = self.id_walk(&reader, current.as_deref()).await;
            if walked.is_ok() {
                if tier_check {
                    self.since_full.store(0, Ordering::Relaxed);
                } else {
                    self.since_full.fetch_add(1, Ordering::Relaxed);
                }
            }
            match walked {
                Ok(IdWalked::Catalog(entities, confirmed, tags)) => {
                    return Ok(Fetched::Catalog {
                        entities,
                        confirmed,
                        method: SyncMethod::IdWalk,
                        position,
                        tags,
                    });
                }
                Ok(IdWalked::NotModified(confirmed)) => return Ok(Fetched::NotModified(confirmed)),
                // An upstream that contradicts itself is walked whole at
                // once; one that fails is walked whole next cycle.
                Err(e) if e.is_inconsistency() => {
                    tracing::info!(error = %e, "the id-walk was inconsistent; walking whole entities");
                }
                Err(e) => return Err(e),
            }
        }
        let (entities, confirmed) = reader.full_walk(self.settings.page_size).await?;
        self.since_full.store(0, Ordering::Relaxed);
        Ok(Fetched::Catalog {
            entities,
            confirmed,
            method: SyncMethod::FullWalk,
            position,
            tags: None,
        })
    }

    /// An id-walk (conditional, with the tags of the last one while they
    /// describe `current`), then by-refs for what is new or changed.
    async fn id_walk(
        &self,
        reader: &Reader<'_>,
        current: Option<&Generation>,
    ) -> Result<IdWalked, SyncError> {
        let tags = self.tags_for(current);
        let (listed, mut confirmed, tags) = match reader
            .id_walk(self.settings.id_page_size, tags.as_deref())
            .await?
        {
            IdWalk::NotModified(confirmed) => return Ok(IdWalked::NotModified(confirmed)),
            IdWalk::Listed(listed, confirmed, tags) => (listed, confirmed, tags),
        };
        let mut entities = Vec::with_capacity(listed.len());
        let mut wanted = Vec::new();
        for item in &listed {
            match current.and_then(|g| g.index.by_uid(&item.uid)) {
                Some(old) if old.etag == item.etag => entities.push(old.clone()),
                _ => wanted.push(item),
            }
        }
        if !wanted.is_empty() {
            let (fetched, fetched_confirmed) = reader.by_refs(&wanted).await?;
            entities.extend(fetched);
            if let Some(c) = fetched_confirmed {
                confirmed.merge(c);
            }
        }
        Ok(IdWalked::Catalog(entities, confirmed, tags))
    }

    /// The upstream tier confirmed the mirror as it is (a 304).
    async fn confirm_unchanged(&self, confirmed: Confirmation, started: Instant) -> SyncReport {
        let Some(current) = self.generations.current() else {
            return self.report(
                SyncResult::Failed,
                started,
                ApplyStats::default(),
                Some(SyncError::Inconsistent(
                    "the upstream tier answered 304 to a mirror with no generation".into(),
                )),
            );
        };
        let keep: HashSet<Arc<str>> = current.index.entities().map(|e| e.uid.clone()).collect();
        let stats = ApplyStats {
            unchanged: keep.len(),
            ..ApplyStats::default()
        };
        match self.confirm(&current, confirmed, keep).await {
            Ok(()) => {
                self.clear_held(false);
                self.report(SyncResult::Unchanged, started, stats, None)
            }
            Err(e) => self.report(SyncResult::Failed, started, stats, Some(e)),
        }
    }

    /// Marks `current` as confirmed again and installs it so.
    async fn confirm(
        &self,
        current: &Generation,
        confirmed: Confirmation,
        keep: HashSet<Arc<str>>,
    ) -> Result<(), SyncError> {
        let mirror = self.mirror.clone();
        let done = tokio::task::spawn_blocking(move || mirror.confirm(confirmed, &keep))
            .await
            .map_err(|e| SyncError::Internal(e.to_string()))?;
        if let Some(meta) = done? {
            metrics::gauge!(m::UPSTREAM_STALE).set(if meta.upstream_stale { 1.0 } else { 0.0 });
            self.generations.install(Generation {
                index: current.index.clone(),
                meta,
                confirmed: current.confirmed.clone(),
            });
        }
        Ok(())
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
            method: None,
            retry_after: None,
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
        entities: Vec<Arc<Entity>>,
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
                _ => next.push(entity),
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
                let keep = diff.members.clone();
                return match self.confirm(current, confirmed, keep).await {
                    Ok(()) => {
                        self.clear_held(accept_deletions);
                        self.report(SyncResult::Unchanged, started, stats, None)
                    }
                    Err(e) => self.report(SyncResult::Failed, started, stats, Some(e)),
                };
            }
        }
        let mirror = self.mirror.clone();
        let fetched_in = started.elapsed();
        let limits = self.settings.index_limits;
        let applied = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let result = mirror.apply(&diff, confirmed, "sync")?;
            // The diff holds the upstream's copies of changed entities:
            // freed before the index packs its own.
            drop(diff);
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
                index_bytes = index.approximate_memory_bytes(),
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
        metrics::gauge!(m::UPSTREAM_STALE).set(if meta.upstream_stale { 1.0 } else { 0.0 });
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
    /// or — after a failure — the backoff delay (full jitter), the
    /// upstream's `Retry-After`, or the breaker's probe time.
    ///
    /// With a mirror already loaded, the first sync waits a random share of
    /// the interval, so a fleet restarted together does not sync in step.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let backoff = || {
            retry::next_delays_full_jitter(&RetryPolicy {
                initial: Duration::from_secs(1),
                max_interval: self.settings.interval,
                max_elapsed: None,
                ..RetryPolicy::default()
            })
        };
        let mut failures = backoff();
        let mut transitions = self.breaker.subscribe();
        if self.generations.current().is_some() {
            let phase = self.first_phase();
            tracing::debug!(
                phase_seconds = phase.as_secs_f64(),
                "first sync at a random phase of the interval"
            );
            tokio::select! {
                _ = tokio::time::sleep(phase) => {}
                _ = self.status.trigger.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
        loop {
            let report = self.sync_once(false).await;
            let wait = match report.result {
                SyncResult::Failed => {
                    // Full jitter can draw a near-zero delay; a floor keeps
                    // a failing upstream from being hammered.
                    let delay = failures
                        .next()
                        .unwrap_or(self.settings.interval)
                        .max(Duration::from_millis(100));
                    match (report.retry_after, self.breaker.next_probe_at()) {
                        (Some(asked), _) => asked.max(delay),
                        (None, Some(at)) => at
                            .saturating_duration_since(tokio::time::Instant::now())
                            .max(Duration::from_millis(50))
                            .min(delay.max(Duration::from_millis(50))),
                        (None, None) => delay,
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

    /// When the first sync after a start runs: a uniformly random point of
    /// the interval, but no later than one interval after the mirror was
    /// last checked (a sidecar keeps roughly the phase it had; one whose
    /// mirror is older syncs at once).
    fn first_phase(&self) -> Duration {
        let random = self
            .settings
            .interval
            .mul_f64(rand::rng().random_range(0.0..1.0));
        let since_checked = self
            .generations
            .current()
            .map_or(self.settings.interval, |g| {
                self.clock.since(g.meta.checked_at)
            });
        random.min(self.settings.interval.saturating_sub(since_checked))
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn status(code: u16, retry_after: Option<u64>) -> SyncError {
        SyncError::Page {
            page: 1,
            source: UpstreamError::Status {
                status: StatusCode::from_u16(code).unwrap(),
                retry_after: retry_after.map(Duration::from_secs),
            },
        }
    }

    #[test]
    fn an_upstream_s_retry_after_is_waited_and_capped() {
        assert_eq!(
            status(429, Some(30)).retry_after(),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            status(503, Some(86_400)).retry_after(),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(status(503, None).retry_after(), None);
        // Asked to wait, the call is not retried within the cycle.
        let SyncError::Page { source, .. } = status(429, Some(5)) else {
            unreachable!()
        };
        assert!(!source.retryable());
        let SyncError::Page { source, .. } = status(503, None) else {
            unreachable!()
        };
        assert!(source.retryable());
    }

    #[test]
    fn what_makes_the_next_cycle_a_full_walk() {
        assert!(status(500, None).calls_for_full_walk());
        assert!(SyncError::Inconsistent("x".into()).calls_for_full_walk());
        assert!(SyncError::Inconsistent("x".into()).is_inconsistency());
        assert!(!status(500, None).is_inconsistency());
        let saturated = SyncError::Page {
            page: 1,
            source: UpstreamError::Saturated(3),
        };
        assert!(!saturated.calls_for_full_walk(), "nothing was sent");
    }
}
