//! The sync loop: pages through the upstream catalog and applies the whole
//! result as one new mirror generation.
//!
//! A sync that fails on any page, or receives malformed data, applies
//! nothing. Unchanged entities (same `metadata.etag`) are not rewritten and
//! keep their hot-cache entries. A sync that would remove more than
//! `mirror.max_delete_ratio` of the mirror (or empty it) is held until an
//! operator accepts it. Syncs run every `mirror.sync_interval` ± jitter;
//! failed ones back off exponentially, and while the breaker is open the
//! next attempt is timed to be its half-open probe, so recovery needs no
//! client traffic. One sync runs at a time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::entity::Entity;
use crate::index::Index;
use crate::metrics as m;
use crate::mirror::{rfc3339, ApplyStats, AuditRecord};
use crate::retry::{self, RetryPolicy};
use crate::sidecar::{Sidecar, View};
use crate::upstream::{encode_component, Expect, Operation, UpstreamRequest};

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

impl Sidecar {
    /// Reads the whole catalog from the upstream, page by page.
    async fn fetch_catalog(&self) -> Result<Vec<Entity>, String> {
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max_interval: Duration::from_secs(1),
            max_elapsed: Some(self.config.upstream.timeout.get() * 2),
            ..RetryPolicy::default()
        };
        let page_size = self.config.mirror.page_size;
        let mut entities: Vec<Entity> = Vec::new();
        let mut cursor: Option<String> = None;
        let mut expected: Option<usize> = None;
        for page_number in 1..=MAX_PAGES {
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
                .map_err(|e| format!("page {page_number}: {e}"))?;
            if !response.status.is_success() {
                return Err(format!(
                    "page {page_number}: the upstream answered {}",
                    response.status
                ));
            }
            let page: Page<'_> = serde_json::from_slice(&response.body)
                .map_err(|e| format!("page {page_number} is not a by-query page: {e}"))?;
            // Backstage repeats page 1's totalItems on every page. A page that
            // disagrees, or a walk that ends short of it, means the catalog
            // changed under the walk or a page was cut short: applying it
            // could drop entities that exist, so the sync fails instead.
            match (expected, page.total_items) {
                (None, Some(total)) => expected = Some(total),
                (Some(first), Some(total)) if total != first => {
                    return Err(format!(
                        "page {page_number}: the upstream now counts {total} entities, page 1 counted {first}; the catalog changed during the sync"
                    ))
                }
                _ => {}
            }
            for raw in page.items {
                let entity = Entity::from_json(Bytes::copy_from_slice(raw.get().as_bytes()))
                    .map_err(|e| format!("page {page_number}: {e}"))?;
                entities.push(entity);
            }
            match page.page_info.next_cursor {
                Some(next) if Some(&next) == cursor.as_ref() => {
                    return Err(format!(
                        "page {page_number}: the upstream repeated its cursor"
                    ))
                }
                Some(next) => cursor = Some(next),
                None => {
                    return match expected {
                        Some(total) if total != entities.len() => Err(format!(
                            "paging ended after {} entities, but the upstream counted {total}; the catalog changed during the sync or a page was cut short",
                            entities.len()
                        )),
                        _ => Ok(entities),
                    }
                }
            }
        }
        Err(format!("gave up after {MAX_PAGES} pages"))
    }

    /// Runs one sync now (waiting for one in progress to end first).
    pub async fn sync_once(&self, accept_deletions: bool) -> SyncReport {
        let _one_at_a_time = self.sync.lock.lock().await;
        let started = Instant::now();
        let fetched = self.fetch_catalog().await;
        let report = match fetched {
            Ok(entities) => {
                self.apply_catalog(entities, accept_deletions, started)
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
        error: Option<String>,
    ) -> SyncReport {
        SyncReport {
            result,
            at: rfc3339(SystemTime::now()),
            duration_seconds: started.elapsed().as_secs_f64(),
            added: stats.added,
            changed: stats.changed,
            removed: stats.removed,
            unchanged: stats.unchanged,
            generation: self.view().map(|v| v.meta.id),
            error,
        }
    }

    fn remember_report(&self, report: &SyncReport) {
        *self.sync.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
        if let Ok(text) = serde_json::to_string(report) {
            if let Err(e) = self.mirror.set_note("last_sync", Some(&text)) {
                tracing::warn!(error = %e, "cannot persist the sync report");
            }
        }
    }

    async fn apply_catalog(
        &self,
        entities: Vec<Entity>,
        accept_deletions: bool,
        started: Instant,
    ) -> SyncReport {
        let current = self.view();
        let previous = current.as_ref().map(|v| v.etags()).unwrap_or_default();
        // Reuse the previous generation's entity for an unchanged etag, so
        // unchanged entities keep one copy in memory.
        let mut next: Vec<Arc<Entity>> = Vec::with_capacity(entities.len());
        let mut seen = std::collections::HashSet::with_capacity(entities.len());
        let mut stats = ApplyStats::default();
        for entity in entities {
            if !seen.insert(entity.uid.clone()) {
                continue;
            }
            let old = current.as_ref().and_then(|v| v.index.by_uid(&entity.uid));
            match old {
                Some(old) if old.etag == entity.etag => {
                    stats.unchanged += 1;
                    next.push(old.clone());
                }
                Some(_) => {
                    stats.changed += 1;
                    next.push(Arc::new(entity));
                }
                None => {
                    stats.added += 1;
                    next.push(Arc::new(entity));
                }
            }
        }
        stats.removed = previous
            .len()
            .saturating_sub(stats.unchanged + stats.changed);
        let held = self.deletion_guard(previous.len(), stats.removed, next.is_empty());
        if let Some(held) = held.filter(|_| !accept_deletions) {
            let message = format!(
                "the upstream's catalog would remove {} of {} entities ({:.0}%), more than mirror.max_delete_ratio allows; run `catalog-cache sync --accept-deletions` to apply it",
                held.would_remove,
                held.of,
                held.ratio * 100.0
            );
            self.hold(held);
            return self.report(SyncResult::Held, started, stats, Some(message));
        }
        let now = self.now_wall();
        if stats.added == 0 && stats.changed == 0 && stats.removed == 0 {
            if let Some(view) = &current {
                let mirror = self.mirror.clone();
                let keep: HashSet<Arc<str>> =
                    view.index.entities().map(|e| e.uid.clone()).collect();
                let confirmed =
                    tokio::task::spawn_blocking(move || mirror.confirm(now, &keep)).await;
                match confirmed {
                    Ok(Ok(Some(meta))) => {
                        self.install(View {
                            index: view.index.clone(),
                            meta,
                            confirmed: view.confirmed.clone(),
                        });
                        self.clear_held(accept_deletions);
                        return self.report(SyncResult::Unchanged, started, stats, None);
                    }
                    Ok(Err(e)) => {
                        return self.report(SyncResult::Failed, started, stats, Some(e.to_string()))
                    }
                    _ => {}
                }
            }
        }
        let mirror = self.mirror.clone();
        let generation_entities = next.clone();
        let fetched_in = started.elapsed();
        let applied = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let result = mirror.apply(&generation_entities, &previous, now, "sync")?;
            let applied_in = t.elapsed();
            let index = Index::build(result.0.id, generation_entities);
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
            Ok::<_, crate::mirror::MirrorError>((result, index))
        })
        .await;
        let ((meta, written), index) = match applied {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                return self.report(SyncResult::Failed, started, stats, Some(e.to_string()))
            }
            Err(e) => return self.report(SyncResult::Failed, started, stats, Some(e.to_string())),
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
        self.install(View {
            index: Arc::new(index),
            meta,
            confirmed: Arc::new(HashMap::new()),
        });
        if accept_deletions && stats.removed > 0 {
            let to = format!("{} removed", stats.removed);
            if let Err(e) = self.mirror.audit(&AuditRecord {
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
        (ratio > self.config.mirror.max_delete_ratio || empty).then(|| HeldDeletions {
            would_remove: removed,
            of: before,
            ratio,
            since: rfc3339(SystemTime::now()),
        })
    }

    fn hold(&self, held: HeldDeletions) {
        let mut slot = self.sync.held.lock().unwrap_or_else(|p| p.into_inner());
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
        let mut slot = self.sync.held.lock().unwrap_or_else(|p| p.into_inner());
        if slot.take().is_some() {
            tracing::info!("held deletions cleared");
            let _ = self.mirror.set_note("held_deletions", None);
        }
        metrics::gauge!(m::SYNC_HELD_DELETIONS).set(0.0);
    }

    /// The held deletions, if any.
    pub fn held_deletions(&self) -> Option<HeldDeletions> {
        self.sync
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The last sync's report.
    pub fn last_sync(&self) -> Option<SyncReport> {
        self.sync
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Asks the sync loop for a sync as soon as it can (debounced).
    pub fn sync_soon(&self) {
        self.sync.trigger.notify_one();
    }

    /// The loop: sync, then wait for the interval (± jitter), a trigger,
    /// or — after a failure — the backoff delay or the breaker's probe time.
    pub async fn sync_loop(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut failures = retry::next_delays(&RetryPolicy {
            initial: Duration::from_secs(1),
            max_interval: self.config.mirror.sync_interval.get(),
            max_elapsed: None,
            ..RetryPolicy::default()
        });
        loop {
            let report = self.sync_once(false).await;
            let wait = match report.result {
                SyncResult::Failed => {
                    let backoff = failures
                        .next()
                        .unwrap_or(self.config.mirror.sync_interval.get());
                    match self.breaker.next_probe_at() {
                        Some(at) => at
                            .saturating_duration_since(tokio::time::Instant::now())
                            .max(Duration::from_millis(50))
                            .min(backoff.max(Duration::from_millis(50))),
                        None => backoff,
                    }
                }
                _ => {
                    failures = retry::next_delays(&RetryPolicy {
                        initial: Duration::from_secs(1),
                        max_interval: self.config.mirror.sync_interval.get(),
                        max_elapsed: None,
                        ..RetryPolicy::default()
                    });
                    self.jittered_interval()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.sync.trigger.notified() => {
                    // Debounce bursts of triggers (many stale reads at once).
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }

    fn jittered_interval(&self) -> Duration {
        let interval = self.config.mirror.sync_interval.get().as_secs_f64();
        let jitter = self.config.mirror.sync_jitter;
        let factor = if jitter > 0.0 {
            rand::rng().random_range(1.0 - jitter..=1.0 + jitter)
        } else {
            1.0
        };
        Duration::from_secs_f64(interval * factor)
    }
}
