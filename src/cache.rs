//! The hot cache: a bounded in-memory (moka) cache of what the upstream told
//! the sidecar since the last sync — entities fetched or revalidated by
//! reads, upstream 404s (for `freshness.negative_ttl`, so miss storms stay
//! local) and read-through answers the mirror cannot compute.
//!
//! It sits in front of the current mirror generation for entity reads; the
//! sync loop invalidates the entries of entities a new generation changed or
//! removed and keeps the rest. It is bounded in bytes (`hot_cache.max_bytes`):
//! each entry weighs its body, its key and a fixed overhead, and moka evicts
//! the least valuable when the total would exceed the bound.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use moka::sync::Cache;
use moka::Expiry;

use crate::entity::Entity;
use crate::mirror::StoredAnswer;
use crate::provenance::Confirmation;

/// What a hot-cache entry is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HotKey {
    /// An entity by `metadata.uid`.
    Uid(Arc<str>),
    /// An entity by lower-cased `kind:namespace/name`.
    Ref(Arc<str>),
    /// A read-through answer or negative result, by upstream path and query.
    Path(Arc<str>),
}

/// A hot-cache entry.
#[derive(Debug, Clone)]
pub enum HotEntry {
    /// An entity the upstream returned, and how it was confirmed.
    Entity {
        /// The entity.
        entity: Arc<Entity>,
        /// When the origin confirmed it, and what the upstream said of it.
        confirmed: Confirmation,
    },
    /// The upstream said 404 (kept for `negative_ttl`).
    Missing {
        /// The upstream's 404 body.
        body: Bytes,
        /// When.
        at: SystemTime,
    },
    /// A read-through answer.
    Answer(Arc<StoredAnswer>),
}

struct Lifetimes {
    negative_ttl: Duration,
    answer_ttl: Duration,
}

impl Expiry<HotKey, HotEntry> for Lifetimes {
    fn expire_after_create(
        &self,
        _key: &HotKey,
        value: &HotEntry,
        _now: Instant,
    ) -> Option<Duration> {
        match value {
            HotEntry::Missing { .. } => Some(self.negative_ttl),
            HotEntry::Answer(_) => Some(self.answer_ttl),
            HotEntry::Entity { .. } => None,
        }
    }

    fn expire_after_update(
        &self,
        key: &HotKey,
        value: &HotEntry,
        now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, now)
    }
}

/// What an entry costs beyond its body and key: moka's own bookkeeping, the
/// entry's `Arc`s and the map slot (measured order of magnitude).
pub const ENTRY_OVERHEAD: u32 = 160;

impl HotKey {
    fn bytes(&self) -> usize {
        match self {
            HotKey::Uid(k) | HotKey::Ref(k) | HotKey::Path(k) => k.len(),
        }
    }
}

impl HotEntry {
    fn bytes(&self) -> usize {
        match self {
            // Stored under two keys, the body is shared: each key weighs it,
            // so the bound errs on the safe side.
            HotEntry::Entity { entity, .. } => {
                entity.body_held_bytes()
                    + entity.uid.len()
                    + entity.entity_ref.len()
                    + entity.etag.len()
            }
            HotEntry::Missing { body, .. } => body.len(),
            HotEntry::Answer(a) => a.body.len() + a.content_type.as_ref().map_or(0, String::len),
        }
    }
}

fn weigh(key: &HotKey, entry: &HotEntry) -> u32 {
    u32::try_from(key.bytes() + entry.bytes())
        .unwrap_or(u32::MAX)
        .saturating_add(ENTRY_OVERHEAD)
}

/// The hot cache.
#[derive(Clone)]
pub struct HotCache {
    inner: Cache<HotKey, HotEntry>,
    /// Inserts minus removals. It can run ahead of the true count (moka
    /// reports a removal a little after it happens) but never behind it, so
    /// zero means the cache is certainly empty and a read can skip it — the
    /// steady state while the mirror is fresh.
    live: Arc<AtomicI64>,
}

impl HotCache {
    /// A cache holding at most `max_bytes` of answers, forgetting 404s
    /// after `negative_ttl` and read-through answers after `answer_ttl`.
    pub fn new(max_bytes: u64, negative_ttl: Duration, answer_ttl: Duration) -> Self {
        let live = Arc::new(AtomicI64::new(0));
        let removed = live.clone();
        Self {
            inner: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(weigh)
                .expire_after(Lifetimes {
                    negative_ttl,
                    answer_ttl,
                })
                .eviction_listener(move |_key, _value, _cause| {
                    removed.fetch_sub(1, Ordering::Relaxed);
                })
                .build(),
            live,
        }
    }

    /// Whether the cache certainly holds nothing.
    pub fn is_empty(&self) -> bool {
        self.live.load(Ordering::Relaxed) <= 0
    }

    /// The entry for `key`.
    pub fn get(&self, key: &HotKey) -> Option<HotEntry> {
        if self.is_empty() {
            return None;
        }
        self.inner.get(key)
    }

    fn insert(&self, key: HotKey, entry: HotEntry) {
        self.live.fetch_add(1, Ordering::Relaxed);
        self.inner.insert(key, entry);
    }

    /// Stores an entity under both its uid and its reference.
    pub fn put_entity(&self, entity: Arc<Entity>, confirmed: impl Into<Confirmation>) {
        let entry = HotEntry::Entity {
            entity: entity.clone(),
            confirmed: confirmed.into(),
        };
        self.insert(HotKey::Uid(entity.uid.clone()), entry.clone());
        self.insert(HotKey::Ref(entity.entity_ref.clone()), entry);
    }

    /// Remembers an upstream 404 for `path`, seen `at` (the sidecar's clock,
    /// so that it compares with the mirror's confirmation times).
    pub fn put_missing(&self, path: &str, body: Bytes, at: SystemTime) {
        self.insert(HotKey::Path(path.into()), HotEntry::Missing { body, at });
    }

    /// Stores a read-through answer for `path`.
    pub fn put_answer(&self, path: &str, answer: Arc<StoredAnswer>) {
        self.insert(HotKey::Path(path.into()), HotEntry::Answer(answer));
    }

    /// Forgets an entity under both its keys.
    pub fn invalidate_entity(&self, uid: &Arc<str>, entity_ref: &Arc<str>) {
        self.inner.invalidate(&HotKey::Uid(uid.clone()));
        self.inner.invalidate(&HotKey::Ref(entity_ref.clone()));
    }

    /// Entries currently held (approximate, as moka counts).
    pub fn entry_count(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.entry_count()
    }

    /// Bytes currently held, as weighed (approximate, as moka counts).
    pub fn weighted_bytes(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.weighted_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity(n: usize, body_bytes: usize) -> Arc<Entity> {
        let body = format!(
            r#"{{"kind":"Component","metadata":{{"name":"n{n}","uid":"u{n}","etag":"e","description":"{}"}}}}"#,
            "x".repeat(body_bytes)
        );
        Arc::new(Entity::from_json(Bytes::from(body)).unwrap())
    }

    #[test]
    fn the_cache_is_bounded_in_bytes_not_entries() {
        let cache = HotCache::new(1 << 20, Duration::from_secs(10), Duration::from_secs(60));
        let now = SystemTime::now();
        // 400 entities of ~10 KB under two keys each: ~8 MB offered to a 1 MiB cache.
        for n in 0..400 {
            cache.put_entity(entity(n, 10_000), now);
        }
        let held = cache.weighted_bytes();
        assert!(held <= 1 << 20, "{held} bytes held, bound 1 MiB");
        assert!(held > 0);
        assert!(cache.entry_count() < 200, "{} entries", cache.entry_count());
        // Small entries: many fit.
        let small = HotCache::new(1 << 20, Duration::from_secs(10), Duration::from_secs(60));
        for n in 0..400 {
            small.put_entity(entity(n, 10), now);
        }
        assert!(small.entry_count() > 700, "{} entries", small.entry_count());
    }
}
