//! Read your own writes: marks left by successful writes that passed
//! through the sidecar, so that what they changed is never served as fresh
//! from a copy the origin confirmed before the write.
//!
//! A write names entities (an entity delete its uid, a refresh its ref) or,
//! when the sidecar cannot tell which entities it touches (a location
//! added or deleted), the whole catalog. A copy is *written since* when a
//! mark on it is newer than the time the origin confirmed the copy: the
//! next read of it asks the upstream, and queries are not answered fresh
//! from a generation older than the newest mark. Marks fall away once a
//! generation the origin confirmed after them is loaded. The set is
//! bounded ([`MAX_MARKS`]): beyond it, one catalog-wide mark stands for all.
//! Reads pay one relaxed atomic load while no mark is held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Most entity marks held; more become one catalog-wide mark.
pub const MAX_MARKS: usize = 10_000;

/// The marks of recent writes.
#[derive(Default)]
pub struct WriteMarks {
    any: AtomicBool,
    inner: Mutex<Marks>,
}

#[derive(Default)]
struct Marks {
    /// By uid and by lower-cased ref.
    entities: HashMap<Arc<str>, SystemTime>,
    /// A write that may have touched any entity.
    all: Option<SystemTime>,
    /// The newest mark of any kind.
    newest: Option<SystemTime>,
}

impl WriteMarks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks an entity (by uid or lower-cased ref) as written at `at`.
    pub fn entity(&self, key: &str, at: SystemTime) {
        let mut marks = self.lock();
        if marks.entities.len() >= MAX_MARKS {
            marks.entities.clear();
            marks.all = Some(at);
        } else {
            marks.entities.insert(key.into(), at);
        }
        marks.newest = marks.newest.max(Some(at));
        self.any.store(true, Ordering::Release);
    }

    /// Marks the whole catalog as written at `at`.
    pub fn all(&self, at: SystemTime) {
        let mut marks = self.lock();
        marks.entities.clear();
        marks.all = Some(at);
        marks.newest = marks.newest.max(Some(at));
        self.any.store(true, Ordering::Release);
    }

    /// Whether any mark is held (the one check a read makes otherwise).
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Whether a write touched the entity with this uid or ref after the
    /// origin confirmed the copy at `origin_at`.
    pub fn entity_written_since(&self, uid: &str, entity_ref: &str, origin_at: SystemTime) -> bool {
        if !self.any() {
            return false;
        }
        let marks = self.lock();
        let newer = |t: Option<&SystemTime>| t.is_some_and(|t| *t > origin_at);
        newer(marks.all.as_ref())
            || newer(marks.entities.get(uid))
            || newer(marks.entities.get(entity_ref))
    }

    /// Whether any write came after the origin confirmed a generation at
    /// `origin_at` (a query's answer may differ).
    pub fn any_since(&self, origin_at: SystemTime) -> bool {
        self.any() && self.lock().newest.is_some_and(|t| t > origin_at)
    }

    /// Drops the marks a generation the origin confirmed at `origin_at`
    /// already reflects.
    pub fn forget_before(&self, origin_at: SystemTime) {
        if !self.any() {
            return;
        }
        let mut marks = self.lock();
        marks.entities.retain(|_, t| *t > origin_at);
        if marks.all.is_some_and(|t| t <= origin_at) {
            marks.all = None;
        }
        if marks.newest.is_some_and(|t| t <= origin_at) {
            marks.newest = None;
        }
        if marks.entities.is_empty() && marks.all.is_none() {
            self.any.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_mark_outlives_older_copies_and_falls_to_a_newer_generation() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let marks = WriteMarks::default();
        assert!(!marks.any());
        marks.entity("u1", t0);
        assert!(marks.entity_written_since(
            "u1",
            "component:default/a",
            t0 - Duration::from_secs(1)
        ));
        assert!(!marks.entity_written_since("u1", "component:default/a", t0));
        assert!(!marks.entity_written_since(
            "u2",
            "component:default/b",
            t0 - Duration::from_secs(1)
        ));
        assert!(marks.any_since(t0 - Duration::from_secs(1)));
        marks.forget_before(t0 - Duration::from_secs(1));
        assert!(marks.any(), "an older generation keeps the mark");
        marks.forget_before(t0);
        assert!(!marks.any());
    }

    #[test]
    fn a_catalog_wide_mark_covers_every_entity_and_the_set_is_bounded() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let marks = WriteMarks::default();
        marks.all(t0);
        assert!(marks.entity_written_since("any", "kind:ns/any", t0 - Duration::from_secs(5)));
        marks.forget_before(t0);
        assert!(!marks.any());
        for n in 0..=MAX_MARKS {
            marks.entity(&format!("u{n}"), t0);
        }
        assert!(marks.lock().entities.len() <= MAX_MARKS);
        assert!(marks.entity_written_since("never-named", "x:y/z", t0 - Duration::from_secs(1)));
    }
}
