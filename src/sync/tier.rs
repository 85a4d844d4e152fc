//! Following an upstream that is another catalog-cache (a tier): finding
//! out whether it is one, asking whether its generation moved (a 304 when
//! it did not), and reading its changes feed since the generation this
//! mirror last followed. See [`crate::extension`] for the server side.
//!
//! Where this mirror stands in the upstream's history (its epoch and
//! generation) is a note in the mirror, written only after the generation
//! that reflects it is stored: a crash in between re-reads the same changes,
//! which is harmless, and never skips any.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

use super::walk::{Reader, Traffic};
use super::SyncError;
use crate::entity::Entity;
use crate::extension::{ChangesPage, GenerationInfo, CHANGES_PATH, GENERATION_PATH};
use crate::provenance::Confirmation;
use crate::route::encode_component;
use crate::upstream::UpstreamRequest;

/// The mirror note that holds [`Position`].
pub const TIER_POSITION_NOTE: &str = "tier_position";

/// Changes asked for per page of the feed.
const CHANGES_PAGE: usize = 1000;

/// Most pages of changes one sync reads (a cursor loop guard).
const MAX_CHANGES_PAGES: usize = 10_000;

/// Where this mirror stands in an upstream tier's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The upstream's epoch.
    pub epoch: String,
    /// The upstream's generation this mirror reflects.
    pub generation: u64,
}

impl Position {
    /// The upstream's `ETag` for this position.
    pub fn etag(&self) -> String {
        GenerationInfo {
            epoch: self.epoch.clone(),
            generation: self.generation,
            entities: 0,
            changes_complete_after: 0,
            synced_at: String::new(),
        }
        .etag()
    }
}

impl From<&GenerationInfo> for Position {
    fn from(info: &GenerationInfo) -> Self {
        Self {
            epoch: info.epoch.clone(),
            generation: info.generation,
        }
    }
}

/// What the probe found.
pub enum Probe {
    /// Not a tier (the extension answered 404 or another client error): a
    /// Backstage catalog, walked as one.
    Backstage,
    /// A tier, at the position this mirror already reflects.
    Unchanged(Confirmation),
    /// A tier, at this generation.
    Tier(GenerationInfo, Confirmation),
}

/// Asks the upstream for its generation, with `If-None-Match` when this
/// mirror knows where it stands.
pub async fn probe(reader: &Reader<'_>, known: Option<&Position>) -> Result<Probe, SyncError> {
    let mut request = UpstreamRequest::get(GENERATION_PATH);
    if let Some(tag) = known.and_then(|p| HeaderValue::from_str(&p.etag()).ok()) {
        request.headers.insert(http::header::IF_NONE_MATCH, tag);
    }
    let response = reader.call(Traffic::Generation, &request, 1).await?;
    let confirmed = reader.confirmation(&response);
    match response.status {
        StatusCode::NOT_MODIFIED if known.is_some() => Ok(Probe::Unchanged(confirmed)),
        s if s.is_success() => {
            let info: GenerationInfo =
                serde_json::from_slice(&response.body).map_err(|e| SyncError::NotAPage {
                    page: 1,
                    reason: format!("not a tier generation: {e}"),
                })?;
            Ok(Probe::Tier(info, confirmed))
        }
        s if s.is_client_error() => Ok(Probe::Backstage),
        status => Err(SyncError::Status { page: 1, status }),
    }
}

/// Why following the changes feed did not give a next generation.
pub enum Follow {
    /// The entities of the next generation, and how they were confirmed.
    Next(Vec<Arc<Entity>>, Confirmation),
    /// The feed no longer covers this mirror's position (410): walk.
    Gone,
}

/// Reads the upstream's changes since `from` up to `to` and applies them
/// to `current` (the entities this mirror holds). The pages must all be of
/// generation `to`; a feed that moves under the read is inconsistent.
pub async fn follow(
    reader: &Reader<'_>,
    from: &Position,
    to: &GenerationInfo,
    current: impl Iterator<Item = &Arc<Entity>>,
) -> Result<Follow, SyncError> {
    let mut next: HashMap<Arc<str>, Arc<Entity>> =
        current.map(|e| (e.uid.clone(), e.clone())).collect();
    let mut after: Option<String> = None;
    let mut confirmed: Option<Confirmation> = None;
    for page in 1..=MAX_CHANGES_PAGES {
        let mut path = format!(
            "{CHANGES_PATH}?epoch={}&since={}&limit={CHANGES_PAGE}",
            encode_component(&from.epoch),
            from.generation
        );
        if let Some(a) = &after {
            path.push_str("&after=");
            path.push_str(&encode_component(a));
        }
        let response = reader
            .call(Traffic::Changes, &UpstreamRequest::get(path), page)
            .await?;
        if response.status == StatusCode::GONE {
            return Ok(Follow::Gone);
        }
        if !response.status.is_success() {
            return Err(SyncError::Status {
                page,
                status: response.status,
            });
        }
        let this = reader.confirmation(&response);
        match &mut confirmed {
            Some(c) => c.merge(this),
            None => confirmed = Some(this),
        }
        let changes: ChangesPage =
            serde_json::from_slice(&response.body).map_err(|e| SyncError::NotAPage {
                page,
                reason: format!("not a page of changes: {e}"),
            })?;
        if changes.epoch != to.epoch || changes.generation != to.generation {
            return Err(SyncError::Inconsistent(format!(
                "the upstream tier moved to generation {} of epoch {} while its changes were read (expected {} of {})",
                changes.generation, changes.epoch, to.generation, to.epoch
            )));
        }
        for change in changes.items {
            match change.entity {
                Some(raw) => {
                    let entity = Entity::from_json(Bytes::copy_from_slice(raw.get().as_bytes()))
                        .map_err(|source| SyncError::BadEntity { page, source })?;
                    if *entity.uid != *change.uid {
                        return Err(SyncError::Inconsistent(format!(
                            "a change for uid {} carries the entity of uid {}",
                            change.uid, entity.uid
                        )));
                    }
                    next.insert(entity.uid.clone(), Arc::new(entity));
                }
                None => {
                    next.remove(change.uid.as_str());
                }
            }
        }
        match changes.next_cursor {
            Some(cursor) if Some(&cursor) == after.as_ref() => {
                return Err(SyncError::RepeatedCursor { page })
            }
            Some(cursor) => after = Some(cursor),
            None => {
                let confirmed = confirmed.unwrap_or_else(|| reader.clock.now().into());
                return Ok(Follow::Next(next.into_values().collect(), confirmed));
            }
        }
    }
    Err(SyncError::TooManyPages(MAX_CHANGES_PAGES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_names_the_tiers_etag() {
        let p = Position {
            epoch: "00ab".into(),
            generation: 7,
        };
        assert_eq!(p.etag(), "\"00ab-7\"");
    }
}
