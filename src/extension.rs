//! The tier extension: a small, versioned API on the proxy listener,
//! outside Backstage's routes, that lets a downstream catalog-cache follow
//! this one cheaply.
//!
//! - `GET /api/catalog/.catalog-cache/v1/generation` — the generation being
//!   served (`epoch`, `generation`, entity count), with a strong `ETag`
//!   (`"<epoch>-<generation>"`); `If-None-Match` with it answers 304.
//! - `GET /api/catalog/.catalog-cache/v1/changes?epoch=E&since=G[&after=U][&limit=N]`
//!   — every entity added, changed or removed after generation `G` up to
//!   the one being served: the entity as it is now, or `null` for a
//!   tombstone, in uid order, `limit` (default 1,000, at most 10,000) a page
//!   with `nextCursor`. A `G` the changes log no longer covers
//!   (`mirror.changes_kept`), one ahead of this mirror, or another epoch
//!   (a new mirror file, an imported snapshot) answers 410: the downstream
//!   walks the whole catalog instead.
//!
//! Both carry the same `Age`, `X-Catalog-Stale` and `Cache-Status` as every
//! other answer, so staleness survives the hop. A downstream finds the
//! extension by asking for the generation: Backstage answers 404. The wire
//! types here are shared by the server ([`Extension`]) and the sync loop.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::generation::Generations;
use crate::mirror::{rfc3339, ChangesError, Mirror};
use crate::read::{Answer, CacheStatus, ReadError};

/// The extension's path below the catalog mount.
pub const PREFIX: &str = "/.catalog-cache/v1";
/// The generation endpoint, below the catalog mount.
pub const GENERATION_PATH: &str = "/.catalog-cache/v1/generation";
/// The changes feed, below the catalog mount.
pub const CHANGES_PATH: &str = "/.catalog-cache/v1/changes";
/// Changes a page holds unless asked for fewer.
pub const DEFAULT_CHANGES_LIMIT: usize = 1000;
/// Most changes one page holds.
pub const MAX_CHANGES_LIMIT: usize = 10_000;

/// `GET …/generation`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GenerationInfo {
    /// The changes log's identity: generations of one epoch follow each other.
    pub epoch: String,
    /// The generation being served.
    pub generation: u64,
    /// Entities in it.
    pub entities: usize,
    /// The changes feed can answer `since` any generation from here on.
    pub changes_complete_after: u64,
    /// When the origin catalog last confirmed it (RFC 3339).
    pub synced_at: String,
}

impl GenerationInfo {
    /// The strong entity tag of this generation.
    pub fn etag(&self) -> String {
        etag(&self.epoch, self.generation)
    }
}

fn etag(epoch: &str, generation: u64) -> String {
    format!("\"{epoch}-{generation}\"")
}

/// One change: the entity as it is now, or `None` when it was removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    /// The entity's `metadata.uid`.
    pub uid: String,
    /// The entity, or `null` for a tombstone.
    pub entity: Option<Box<serde_json::value::RawValue>>,
}

/// `GET …/changes`' answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangesPage {
    /// The epoch the changes belong to.
    pub epoch: String,
    /// Changes after this generation…
    pub since: u64,
    /// …up to and including this one.
    pub generation: u64,
    /// The changes, in uid order.
    pub items: Vec<Change>,
    /// Where the next page starts (`after=`), when there is one.
    pub next_cursor: Option<String>,
}

/// Serves the extension from the current generation and the mirror's
/// changes log.
pub struct Extension {
    generations: Arc<Generations>,
    mirror: Arc<Mirror>,
    clock: Clock,
    fresh_for: Duration,
}

impl Extension {
    /// The extension over these parts (`fresh_for`: `freshness.fresh_for`,
    /// past which its answers are marked stale like any other).
    pub fn new(
        generations: Arc<Generations>,
        mirror: Arc<Mirror>,
        clock: Clock,
        fresh_for: Duration,
    ) -> Self {
        Self {
            generations,
            mirror,
            clock,
            fresh_for,
        }
    }

    /// `GET …/generation`.
    pub async fn generation(&self, request_headers: &HeaderMap) -> Result<Answer, ReadError> {
        let generation = self.current()?;
        let mirror = self.mirror.clone();
        let log = tokio::task::spawn_blocking(move || mirror.change_log())
            .await
            .map_err(|e| ReadError::Internal(e.to_string()))?
            .map_err(|e| ReadError::Internal(e.to_string()))?;
        let info = GenerationInfo {
            epoch: log.epoch,
            generation: generation.meta.id,
            entities: generation.index.len(),
            changes_complete_after: log.complete_after,
            synced_at: rfc3339(generation.meta.synced_at),
        };
        let tag = info.etag();
        let mut headers = json_headers();
        if let Ok(v) = HeaderValue::from_str(&tag) {
            headers.insert(http::header::ETAG, v);
        }
        let matched = request_headers
            .get_all(http::header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|candidate| candidate.trim() == tag || candidate.trim() == "*");
        let (status, body) = if matched {
            headers.remove(http::header::CONTENT_TYPE);
            (StatusCode::NOT_MODIFIED, Bytes::new())
        } else {
            let body = serde_json::to_vec(&info).map_err(|e| ReadError::Internal(e.to_string()))?;
            (StatusCode::OK, Bytes::from(body))
        };
        Ok(self.answer(&generation.meta, status, headers, body))
    }

    /// `GET …/changes?epoch=E&since=G[&after=U][&limit=N]`.
    pub async fn changes(&self, query: &str) -> Result<Answer, ReadError> {
        let params = ChangesParams::parse(query).map_err(ReadError::Input)?;
        let generation = self.current()?;
        let at = generation.meta.id;
        let mirror = self.mirror.clone();
        let (epoch, since, after, limit) = (
            params.epoch.clone(),
            params.since,
            params.after.clone(),
            params.limit,
        );
        // One more than asked for tells whether another page follows.
        let changed = tokio::task::spawn_blocking(move || {
            mirror.changed_since(&epoch, since, at, after.as_deref(), limit + 1)
        })
        .await
        .map_err(|e| ReadError::Internal(e.to_string()))?;
        let mut uids = match changed {
            Ok(uids) => uids,
            Err(e @ ChangesError::Gone { .. }) => return Err(ReadError::Gone(e.to_string())),
            Err(ChangesError::Mirror(e)) => return Err(ReadError::Internal(e.to_string())),
        };
        let next_cursor = if uids.len() > limit {
            uids.truncate(limit);
            uids.last().cloned()
        } else {
            None
        };
        let mut items = Vec::with_capacity(uids.len());
        for uid in uids {
            let entity = match generation.index.by_uid(&uid) {
                Some(e) => Some(
                    serde_json::value::RawValue::from_string(
                        String::from_utf8_lossy(&e.body()).into_owned(),
                    )
                    .map_err(|e| ReadError::Internal(e.to_string()))?,
                ),
                None => None,
            };
            items.push(Change { uid, entity });
        }
        let page = ChangesPage {
            epoch: params.epoch,
            since: params.since,
            generation: at,
            items,
            next_cursor,
        };
        let body = serde_json::to_vec(&page).map_err(|e| ReadError::Internal(e.to_string()))?;
        Ok(self.answer(
            &generation.meta,
            StatusCode::OK,
            json_headers(),
            Bytes::from(body),
        ))
    }

    fn current(&self) -> Result<Arc<crate::generation::Generation>, ReadError> {
        self.generations
            .current()
            .ok_or_else(|| ReadError::Unavailable {
                message:
                    "this catalog-cache has no mirror generation yet; retry after its first sync"
                        .into(),
                retry_after: Duration::from_secs(5),
            })
    }

    /// An answer about the generation, marked as its data is: stale when
    /// the origin confirmed it `fresh_for` ago or more, or this sidecar's
    /// own upstream called it stale.
    fn answer(
        &self,
        meta: &crate::mirror::GenerationMeta,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    ) -> Answer {
        let confirmed = meta.confirmation();
        let age = self.clock.since(confirmed.origin_at);
        let stale = confirmed.upstream_stale || age >= self.fresh_for;
        let cache = if stale {
            CacheStatus::StaleHit {
                ttl: (self.fresh_for.as_secs() as i64 - age.as_secs() as i64).min(-1),
            }
        } else {
            CacheStatus::Hit
        };
        Answer {
            status,
            headers,
            body: body.into(),
            cache,
            age,
            stale,
            via: confirmed.via,
        }
    }
}

fn json_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h
}

/// The changes feed's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChangesParams {
    epoch: String,
    since: u64,
    after: Option<String>,
    limit: usize,
}

impl ChangesParams {
    fn parse(query: &str) -> Result<Self, String> {
        let mut epoch = None;
        let mut since = None;
        let mut after = None;
        let mut limit = DEFAULT_CHANGES_LIMIT;
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "epoch" => epoch = Some(value.into_owned()),
                "since" => {
                    since = Some(value.parse::<u64>().map_err(|_| {
                        format!("since must be a generation number, not '{value}'")
                    })?)
                }
                "after" => after = Some(value.into_owned()).filter(|a| !a.is_empty()),
                "limit" => {
                    limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|l| (1..=MAX_CHANGES_LIMIT).contains(l))
                        .ok_or_else(|| {
                            format!("limit must be a whole number from 1 to {MAX_CHANGES_LIMIT}, not '{value}'")
                        })?
                }
                other => return Err(format!("unknown parameter '{other}' (epoch, since, after, limit)")),
            }
        }
        Ok(Self {
            epoch: epoch.ok_or("epoch is required")?,
            since: since.ok_or("since is required")?,
            after,
            limit,
        })
    }
}

/// The time a `GenerationInfo`'s `synced_at` names, when it parses.
pub fn synced_at(info: &GenerationInfo) -> Option<SystemTime> {
    humantime::parse_rfc3339(&info.synced_at).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_parameters_are_checked_and_named() {
        assert_eq!(
            ChangesParams::parse("epoch=ab&since=7&after=u1&limit=50"),
            Ok(ChangesParams {
                epoch: "ab".into(),
                since: 7,
                after: Some("u1".into()),
                limit: 50
            })
        );
        assert_eq!(
            ChangesParams::parse("epoch=ab&since=0").map(|p| p.limit),
            Ok(DEFAULT_CHANGES_LIMIT)
        );
        for (query, says) in [
            ("since=1", "epoch is required"),
            ("epoch=a", "since is required"),
            ("epoch=a&since=x", "since must be"),
            ("epoch=a&since=1&limit=0", "limit must be"),
            ("epoch=a&since=1&limit=10001", "limit must be"),
            ("epoch=a&since=1&cursor=2", "unknown parameter"),
        ] {
            let e = ChangesParams::parse(query).unwrap_err();
            assert!(e.contains(says), "{query}: {e}");
        }
    }

    #[test]
    fn the_etag_names_epoch_and_generation() {
        let info = GenerationInfo {
            epoch: "00ff".into(),
            generation: 12,
            entities: 3,
            changes_complete_after: 1,
            synced_at: "2026-12-04T00:00:00Z".into(),
        };
        assert_eq!(info.etag(), "\"00ff-12\"");
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["changesCompleteAfter"], 1);
    }
}
