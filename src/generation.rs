//! The mirror generation readers are served from, and the holder they load
//! it from.
//!
//! A [`Generation`] is one applied sync (or import) as held in memory: its
//! query index (which holds the entities), its metadata, and when entities
//! revalidated since were confirmed. [`Generations`] swaps generations
//! atomically: a reader sees the old one or the new one, never a mix. The
//! sync loop and snapshot import install; the read path, readiness, the
//! admin API and the sync loop itself read.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;

use crate::clock::Clock;
use crate::entity::Entity;
use crate::index::Index;
use crate::metrics as m;
use crate::mirror::GenerationMeta;
use crate::provenance::Confirmation;

/// One loaded generation.
pub struct Generation {
    /// The query index (it holds the entities).
    pub index: Arc<Index>,
    /// Generation metadata (id, when the upstream confirmed it, size).
    pub meta: GenerationMeta,
    /// Entities revalidated after the generation was applied, and when.
    pub confirmed: Arc<HashMap<Arc<str>, SystemTime>>,
}

impl Generation {
    /// A generation with no revalidations yet.
    pub fn new(index: Index, meta: GenerationMeta) -> Self {
        Self {
            index: Arc::new(index),
            meta,
            confirmed: Arc::new(HashMap::new()),
        }
    }

    /// The entity with this lower-cased `kind:namespace/name`, and how it
    /// was last confirmed.
    pub fn by_ref(&self, canonical_ref: &str) -> Option<(&Arc<Entity>, Confirmation)> {
        self.index
            .by_ref(canonical_ref)
            .map(|e| (e, self.confirmation_of(e)))
    }

    /// The entity with this `metadata.uid` (any case), and how it was last
    /// confirmed.
    pub fn by_uid(&self, uid: &str) -> Option<(&Arc<Entity>, Confirmation)> {
        self.index.by_uid(uid).map(|e| (e, self.confirmation_of(e)))
    }

    /// How `entity` was last confirmed: by the generation's sync, or by a
    /// later revalidation (stored with its origin-confirmed time).
    fn confirmation_of(&self, entity: &Entity) -> Confirmation {
        let generation = self.meta.confirmation();
        match self.confirmed.get(&entity.uid) {
            Some(at) if *at > generation.origin_at => Confirmation {
                origin_at: *at,
                checked_at: generation.checked_at.max(*at),
                upstream_stale: false,
                via: generation.via,
                written_since: false,
            },
            _ => generation,
        }
    }

    /// uid → etag of every entity: what the next generation is compared with.
    pub fn etags(&self) -> HashMap<Arc<str>, Arc<str>> {
        crate::mirror::etags(self.index.entities())
    }
}

/// The current generation, swapped atomically.
pub struct Generations {
    current: ArcSwapOption<Generation>,
    clock: Clock,
}

impl Generations {
    /// Holds `initial` (the generation loaded from disk, if any).
    pub fn new(initial: Option<Generation>, clock: Clock) -> Self {
        let generations = Self {
            current: ArcSwapOption::from(initial.map(Arc::new)),
            clock,
        };
        generations.publish_gauges();
        generations
    }

    /// The current generation, if one is loaded.
    pub fn current(&self) -> Option<Arc<Generation>> {
        self.current.load_full()
    }

    /// Makes `generation` the current one.
    pub fn install(&self, generation: Generation) {
        self.current.store(Some(Arc::new(generation)));
        self.publish_gauges();
    }

    /// How long ago the origin catalog last confirmed the current generation.
    pub fn age(&self) -> Option<Duration> {
        self.current().map(|g| self.clock.since(g.meta.synced_at))
    }

    /// Sets the generation's gauges (entities, id, data age).
    pub fn publish_gauges(&self) {
        if let Some(g) = self.current() {
            metrics::gauge!(m::MIRROR_ENTITIES).set(g.index.len() as f64);
            metrics::gauge!(m::MIRROR_GENERATION).set(g.meta.id as f64);
            metrics::gauge!(m::MIRROR_DATA_AGE_SECONDS)
                .set(self.clock.since(g.meta.synced_at).as_secs_f64());
        }
    }
}
