//! How a sync reads a Backstage-shaped catalog: page walks of `by-query`
//! (whole entities, or only what identifies and versions each one) and
//! `by-refs` for the entities an id-walk found new or changed. Every
//! request is counted by kind, with the bytes it cost on the wire.
//!
//! Backstage's cursor carries the filter and the order but not `fields`
//! (SPEC Appendix A), so an id-walk sends `fields` again on every page.
//!
//! With `fields`, Backstage answers a page with Express's `res.json`, which
//! sets a weak `ETag` and answers `If-None-Match` with 304 (whole entities
//! are streamed, with neither). An id-walk keeps each page's tag and next
//! cursor ([`PageTag`]); the next one asks for every page conditionally, so
//! an unchanged catalog costs one 304 a page. At the first page that did
//! change, it walks again from the start without conditions (a 304 page
//! brought no items).

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use super::SyncError;
use crate::clock::Clock;
use crate::entity::Entity;
use crate::metrics as m;
use crate::provenance::Confirmation;
use crate::retry::RetryPolicy;
use crate::route::encode_component;
use crate::upstream::{Expect, Operation, Upstream, UpstreamRequest, UpstreamResponse};

/// Most pages one walk reads before it gives up (a cursor loop guard).
const MAX_PAGES: usize = 100_000;

/// Most refs one `by-refs` request asks for.
pub const BY_REFS_CHUNK: usize = 1000;

/// What an id-walk asks of each entity.
pub const ID_FIELDS: &str = "kind,metadata.namespace,metadata.name,metadata.uid,metadata.etag";

/// The kinds of sync traffic, as the metrics label them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// A page of whole entities.
    FullPage,
    /// A page of ids and etags.
    IdWalk,
    /// A `by-refs` chunk.
    ByRefs,
    /// A page of a tier's changes feed.
    Changes,
    /// A tier's generation (the probe).
    Generation,
    /// A 304: the upstream confirmed what this sidecar holds.
    NotModified,
}

impl Traffic {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FullPage => "full_page",
            Self::IdWalk => "id_walk",
            Self::ByRefs => "by_refs",
            Self::Changes => "changes",
            Self::Generation => "generation",
            Self::NotModified => "not_modified",
        }
    }

    /// Counts one answer of this kind (a 304 counts as `not_modified`).
    pub fn count(self, response: &UpstreamResponse) {
        let kind = if response.status == http::StatusCode::NOT_MODIFIED {
            Self::NotModified
        } else {
            self
        };
        metrics::counter!(m::SYNC_REQUESTS_TOTAL, "kind" => kind.as_str()).increment(1);
        metrics::counter!(m::SYNC_BYTES_TOTAL, "kind" => kind.as_str())
            .increment(response.wire_bytes);
    }
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

/// One entity as an id-walk lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// `metadata.uid`.
    pub uid: Arc<str>,
    /// `metadata.etag`.
    pub etag: Arc<str>,
    /// `kind:namespace/name`, lower-cased as `by-refs` wants it.
    pub entity_ref: String,
}

#[derive(Deserialize)]
struct IdItem {
    kind: Option<String>,
    #[serde(default)]
    metadata: IdMetadata,
}

#[derive(Deserialize, Default)]
struct IdMetadata {
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
    etag: Option<String>,
}

impl IdItem {
    fn listed(self) -> Option<Listed> {
        let m = self.metadata;
        let (kind, name, uid, etag) = (self.kind?, m.name?, m.uid?, m.etag?);
        if kind.is_empty() || name.is_empty() || uid.is_empty() || etag.is_empty() {
            return None;
        }
        let namespace = m.namespace.unwrap_or_else(|| "default".into());
        Some(Listed {
            uid: uid.into(),
            etag: etag.into(),
            // Backstage's by-refs matches refs case-sensitively against
            // the lower-cased ref (SPEC Appendix A).
            entity_ref: format!("{kind}:{namespace}/{name}").to_lowercase(),
        })
    }
}

/// One page of an id-walk as the upstream last answered it: its `ETag`
/// and the cursor past it, enough to ask for it again with
/// `If-None-Match` and to go on past a 304.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageTag {
    etag: http::HeaderValue,
    next_cursor: Option<String>,
}

/// What a walk found.
pub struct Walked {
    /// How the origin confirmed it (as old as its oldest page).
    pub confirmed: Confirmation,
    /// Every page's tag, when every page carried one.
    pub tags: Option<Vec<PageTag>>,
    /// Every page answered 304: nothing changed since the tags were taken.
    pub not_modified: bool,
}

/// What an id-walk found.
pub enum IdWalk {
    /// The listing, with the page tags for the next walk.
    Listed(Vec<Listed>, Confirmation, Option<Vec<PageTag>>),
    /// Every page answered 304 to the tags it was given.
    NotModified(Confirmation),
}

/// Reads the upstream for one sync: the upstream, the clock that stamps
/// confirmations, and the retry policy of each request.
pub struct Reader<'a> {
    /// The upstream client.
    pub upstream: &'a Upstream,
    /// Stamps what the upstream confirmed.
    pub clock: &'a Clock,
    /// Retries of one request, inside its breaker permit.
    pub policy: RetryPolicy,
}

impl Reader<'_> {
    /// One call of the sync loop, counted as `traffic`; a non-success,
    /// non-304 status is an error naming `what`.
    pub async fn call(
        &self,
        traffic: Traffic,
        request: &UpstreamRequest,
        page: usize,
    ) -> Result<UpstreamResponse, SyncError> {
        let response = self
            .upstream
            .call(
                Operation::SyncPage,
                request,
                Expect::Json,
                Some(&self.policy),
            )
            .await
            .map_err(|source| SyncError::Page { page, source })?;
        traffic.count(&response);
        Ok(response)
    }

    /// The confirmation an answer carries, received now.
    pub fn confirmation(&self, response: &UpstreamResponse) -> Confirmation {
        Confirmation::received(&response.provenance, self.clock.now())
    }

    /// Walks `by-query` page by page (`limit`, and `fields` resent on every
    /// page when given), handing each page's items to `on_page`. Checks
    /// Backstage's `totalItems` across pages and at the end, and a cursor
    /// that repeats. With `tags` (see the module docs), asks for each page
    /// with `If-None-Match` until one has changed.
    async fn walk(
        &self,
        traffic: Traffic,
        limit: u32,
        fields: Option<&str>,
        tags: Option<&[PageTag]>,
        mut on_page: impl FnMut(usize, &[&serde_json::value::RawValue]) -> Result<(), SyncError>,
    ) -> Result<Walked, SyncError> {
        let fields = fields.map(|f| format!("&fields={}", encode_component(f)));
        let mut conditional = tags.is_some();
        'walk: loop {
            let mut cursor: Option<String> = None;
            let mut expected: Option<usize> = None;
            let mut seen = 0usize;
            let mut confirmed: Option<Confirmation> = None;
            let mut new_tags: Option<Vec<PageTag>> = Some(Vec::new());
            let mut skipped = 0usize;
            for page in 1..=MAX_PAGES {
                let mut path = format!(
                    "/entities/by-query?limit={limit}{}",
                    fields.as_deref().unwrap_or("")
                );
                if let Some(c) = &cursor {
                    path.push_str("&cursor=");
                    path.push_str(&encode_component(c));
                }
                let mut request = UpstreamRequest::get(path);
                let known = tags.filter(|_| conditional).and_then(|t| t.get(page - 1));
                if let Some(k) = known {
                    request
                        .headers
                        .insert(http::header::IF_NONE_MATCH, k.etag.clone());
                }
                let response = self.call(traffic, &request, page).await?;
                let this = self.confirmation(&response);
                if response.status == http::StatusCode::NOT_MODIFIED {
                    // Only a page asked for conditionally can be a 304.
                    let Some(k) = known else {
                        return Err(SyncError::Status {
                            page,
                            status: response.status,
                        });
                    };
                    match &mut confirmed {
                        Some(c) => c.merge(this),
                        None => confirmed = Some(this),
                    }
                    skipped += 1;
                    if let Some(t) = &mut new_tags {
                        t.push(k.clone());
                    }
                    match &k.next_cursor {
                        Some(next) => cursor = Some(next.clone()),
                        // Every page so far was a 304, this last one too.
                        None => {
                            return Ok(Walked {
                                confirmed: confirmed.unwrap_or_else(|| self.clock.now().into()),
                                tags: new_tags,
                                not_modified: true,
                            })
                        }
                    }
                    continue;
                }
                if !response.status.is_success() {
                    return Err(SyncError::Status {
                        page,
                        status: response.status,
                    });
                }
                if conditional {
                    // This page changed: no more conditions. Pages skipped
                    // as 304 brought no items, so walk again from the start.
                    conditional = false;
                    if skipped > 0 {
                        continue 'walk;
                    }
                }
                match &mut confirmed {
                    Some(c) => c.merge(this),
                    None => confirmed = Some(this),
                }
                let parsed: Page<'_> =
                    serde_json::from_slice(&response.body).map_err(|e| SyncError::NotAPage {
                        page,
                        reason: e.to_string(),
                    })?;
                // Backstage repeats page 1's totalItems on every page. A page
                // that disagrees, or a walk that ends short of it, means the
                // catalog changed under the walk or a page was cut short:
                // applying it could drop entities that exist, so the sync
                // fails instead.
                match (expected, parsed.total_items) {
                    (None, Some(total)) => expected = Some(total),
                    (Some(first), Some(total)) if total != first => {
                        return Err(SyncError::CountChanged { page, total, first })
                    }
                    _ => {}
                }
                seen += parsed.items.len();
                on_page(page, &parsed.items)?;
                let etag = response.headers.get(http::header::ETAG).cloned();
                new_tags = match (new_tags, etag) {
                    (Some(mut t), Some(etag)) => {
                        t.push(PageTag {
                            etag,
                            next_cursor: parsed.page_info.next_cursor.clone(),
                        });
                        Some(t)
                    }
                    _ => None,
                };
                match parsed.page_info.next_cursor {
                    Some(next) if Some(&next) == cursor.as_ref() => {
                        return Err(SyncError::RepeatedCursor { page })
                    }
                    Some(next) => cursor = Some(next),
                    None => {
                        return match expected {
                            Some(total) if total != seen => {
                                Err(SyncError::ShortWalk { got: seen, total })
                            }
                            _ => Ok(Walked {
                                confirmed: confirmed.unwrap_or_else(|| self.clock.now().into()),
                                tags: new_tags,
                                not_modified: false,
                            }),
                        }
                    }
                }
            }
            return Err(SyncError::TooManyPages(MAX_PAGES));
        }
    }

    /// A full walk: every entity, whole.
    pub async fn full_walk(
        &self,
        page_size: u32,
    ) -> Result<(Vec<Arc<Entity>>, Confirmation), SyncError> {
        let mut entities = Vec::new();
        let walked = self
            .walk(Traffic::FullPage, page_size, None, None, |page, items| {
                for raw in items {
                    let entity = Entity::from_json(Bytes::copy_from_slice(raw.get().as_bytes()))
                        .map_err(|source| SyncError::BadEntity { page, source })?;
                    entities.push(Arc::new(entity));
                }
                Ok(())
            })
            .await?;
        Ok((entities, walked.confirmed))
    }

    /// An id-walk: what identifies and versions every entity, in the
    /// upstream's order. An item without a kind, name, uid or etag makes
    /// the walk inconsistent. With the tags of the last id-walk, asks for
    /// each page conditionally (see the module docs).
    pub async fn id_walk(
        &self,
        page_size: u32,
        tags: Option<&[PageTag]>,
    ) -> Result<IdWalk, SyncError> {
        let mut listed = Vec::new();
        let walked = self
            .walk(Traffic::IdWalk, page_size, Some(ID_FIELDS), tags, |page, items| {
                for raw in items {
                    let item = serde_json::from_str::<IdItem>(raw.get())
                        .ok()
                        .and_then(IdItem::listed)
                        .ok_or_else(|| {
                            SyncError::Inconsistent(format!(
                                "page {page} of the id-walk lists an entity without kind, name, uid or etag: {}",
                                truncate(raw.get(), 200)
                            ))
                        })?;
                    listed.push(item);
                }
                Ok(())
            })
            .await?;
        Ok(if walked.not_modified {
            IdWalk::NotModified(walked.confirmed)
        } else {
            IdWalk::Listed(listed, walked.confirmed, walked.tags)
        })
    }

    /// Fetches `wanted` with `by-refs`, [`BY_REFS_CHUNK`] at a time. Each
    /// answer must be the entity listed: a `null` (gone since it was
    /// listed) or another uid makes the sync inconsistent.
    pub async fn by_refs(
        &self,
        wanted: &[&Listed],
    ) -> Result<(Vec<Arc<Entity>>, Option<Confirmation>), SyncError> {
        #[derive(Deserialize)]
        struct Answer<'a> {
            #[serde(borrow)]
            items: Vec<Option<&'a serde_json::value::RawValue>>,
        }
        let mut fetched = Vec::with_capacity(wanted.len());
        let mut confirmed: Option<Confirmation> = None;
        for (chunk_no, chunk) in wanted.chunks(BY_REFS_CHUNK).enumerate() {
            let page = chunk_no + 1;
            let refs: Vec<&str> = chunk.iter().map(|l| l.entity_ref.as_str()).collect();
            let body = serde_json::to_vec(&serde_json::json!({ "entityRefs": refs }))
                .map_err(|e| SyncError::Internal(e.to_string()))?;
            let mut request = UpstreamRequest::get("/entities/by-refs");
            request.method = http::Method::POST;
            request.body = Bytes::from(body);
            request.headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            let response = self.call(Traffic::ByRefs, &request, page).await?;
            if !response.status.is_success() {
                return Err(SyncError::Status {
                    page,
                    status: response.status,
                });
            }
            let this = self.confirmation(&response);
            match &mut confirmed {
                Some(c) => c.merge(this),
                None => confirmed = Some(this),
            }
            let answer: Answer<'_> =
                serde_json::from_slice(&response.body).map_err(|e| SyncError::NotAPage {
                    page,
                    reason: format!("not a by-refs answer: {e}"),
                })?;
            if answer.items.len() != chunk.len() {
                return Err(SyncError::Inconsistent(format!(
                    "by-refs answered {} items for {} refs",
                    answer.items.len(),
                    chunk.len()
                )));
            }
            for (listed, item) in chunk.iter().zip(answer.items) {
                let raw = item.ok_or_else(|| {
                    SyncError::Inconsistent(format!(
                        "by-refs answered null for {}, listed by the id-walk",
                        listed.entity_ref
                    ))
                })?;
                let entity = Entity::from_json(Bytes::copy_from_slice(raw.get().as_bytes()))
                    .map_err(|source| SyncError::BadEntity { page, source })?;
                if entity.uid != listed.uid {
                    return Err(SyncError::Inconsistent(format!(
                        "by-refs answered uid {} for {}, listed with uid {}",
                        entity.uid, listed.entity_ref, listed.uid
                    )));
                }
                fetched.push(Arc::new(entity));
            }
        }
        Ok((fetched, confirmed))
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_item_needs_kind_name_uid_and_etag() {
        let item: IdItem = serde_json::from_str(
            r#"{"kind":"Component","metadata":{"name":"a","uid":"u","etag":"e"}}"#,
        )
        .unwrap();
        assert_eq!(
            item.listed(),
            Some(Listed {
                uid: "u".into(),
                etag: "e".into(),
                entity_ref: "component:default/a".into()
            })
        );
        for bad in [
            r#"{"kind":"Component","metadata":{"name":"a","uid":"u"}}"#,
            r#"{"metadata":{"name":"a","uid":"u","etag":"e"}}"#,
            r#"{"kind":"Component","metadata":{"name":"","uid":"u","etag":"e"}}"#,
            r#"{"kind":"Component"}"#,
        ] {
            let item: IdItem = serde_json::from_str(bad).unwrap();
            assert_eq!(item.listed(), None, "{bad}");
        }
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("äöü", 2), "äö");
        assert_eq!(truncate("ab", 5), "ab");
    }
}
