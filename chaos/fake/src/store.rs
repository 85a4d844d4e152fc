//! The demo catalog's entities: an immutable, indexed snapshot swapped whole
//! on every change.
//!
//! Readers clone an `Arc<Snapshot>` and never see a half-applied mutation.
//! A snapshot keeps entities in ascending uid order (Backstage's default
//! order) with each entity's JSON pre-serialized, so that paging the
//! unfiltered catalog is a binary search and a copy.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use serde_json::{json, Value};

use crate::generate::{compute_etag, entity_ref, fnv1a};

/// One stored entity.
#[derive(Debug)]
pub(crate) struct Item {
    pub(crate) value: Value,
    pub(crate) json: Bytes,
    pub(crate) uid: String,
    pub(crate) entity_ref: String,
}

impl Item {
    fn new(value: Value) -> Item {
        let uid = value["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let entity_ref = entity_ref(&value).unwrap_or_default();
        // `Display` is compiled (optimized) inside serde_json; `to_vec` would be
        // monomorphized here, which is slow in debug builds of the tests.
        let json = Bytes::from(value.to_string());
        Item {
            value,
            json,
            uid,
            entity_ref,
        }
    }
}

/// An immutable view of the catalog.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// Ascending by uid.
    pub(crate) items: Vec<Arc<Item>>,
    by_uid: HashMap<String, usize>,
    by_ref: HashMap<String, usize>,
}

impl Snapshot {
    fn build(mut items: Vec<Arc<Item>>) -> Snapshot {
        items.sort_by(|a, b| a.uid.cmp(&b.uid));
        let by_uid = items
            .iter()
            .enumerate()
            .map(|(i, it)| (it.uid.clone(), i))
            .collect();
        let by_ref = items
            .iter()
            .enumerate()
            .map(|(i, it)| (it.entity_ref.clone(), i))
            .collect();
        Snapshot {
            items,
            by_uid,
            by_ref,
        }
    }

    /// The entity with exactly this uid.
    pub(crate) fn by_uid(&self, uid: &str) -> Option<&Arc<Item>> {
        self.by_uid.get(uid).map(|&i| &self.items[i])
    }

    /// The entity with exactly this (lower-cased) ref.
    pub(crate) fn by_ref(&self, entity_ref: &str) -> Option<&Arc<Item>> {
        self.by_ref.get(entity_ref).map(|&i| &self.items[i])
    }
}

/// Fills in what a stored entity must have: a namespace, a uid and an etag.
fn complete(mut value: Value, salt: u64) -> Value {
    if !value["metadata"].is_object() {
        value["metadata"] = json!({});
    }
    if value["metadata"]["namespace"].as_str().is_none() {
        value["metadata"]["namespace"] = json!("default");
    }
    if value["metadata"]["uid"].as_str().is_none() {
        let r = entity_ref(&value).unwrap_or_default();
        let h = fnv1a(r.as_bytes(), 0x11);
        let l = fnv1a(r.as_bytes(), 0x22);
        value["metadata"]["uid"] = json!(format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (h >> 32) as u32,
            (h >> 16) as u16,
            h & 0xfff,
            l >> 52,
            l & 0xffff_ffff_ffff
        ));
    }
    if value["metadata"]["etag"].as_str().is_none() {
        value["metadata"]["etag"] = json!(compute_etag(&value, salt));
    }
    value
}

/// What one churn step did.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Churned {
    /// Uids given a new etag.
    pub(crate) changed: Vec<String>,
    /// Uids added.
    pub(crate) added: Vec<String>,
    /// Uids deleted.
    pub(crate) deleted: Vec<String>,
}

/// The mutable holder of the current snapshot.
#[derive(Debug)]
pub(crate) struct Store {
    current: RwLock<Arc<Snapshot>>,
    empty: Arc<Snapshot>,
    /// Bumped on every edit so that each new etag differs from all before.
    revision: AtomicU64,
}

impl Store {
    pub(crate) fn new(entities: Vec<Value>) -> Store {
        let store = Store {
            current: RwLock::new(Arc::new(Snapshot::default())),
            empty: Arc::new(Snapshot::default()),
            revision: AtomicU64::new(1),
        };
        store.replace_all(entities);
        store
    }

    /// The current snapshot, or an empty one (the `empty_catalog` fault).
    pub(crate) fn snapshot(&self, empty: bool) -> Arc<Snapshot> {
        if empty {
            return self.empty.clone();
        }
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn swap(&self, items: Vec<Arc<Item>>) {
        let next = Arc::new(Snapshot::build(items));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
    }

    fn next_salt(&self) -> u64 {
        self.revision.fetch_add(1, Ordering::Relaxed) ^ 0xE7A6_0000
    }

    pub(crate) fn replace_all(&self, entities: Vec<Value>) {
        let salt = self.next_salt();
        let items = entities
            .into_iter()
            .map(|e| Arc::new(Item::new(complete(e, salt))))
            .collect();
        self.swap(items);
    }

    pub(crate) fn add(&self, entities: Vec<Value>) {
        let salt = self.next_salt();
        let current = self.snapshot(false);
        let added: Vec<Arc<Item>> = entities
            .into_iter()
            .map(|e| Arc::new(Item::new(complete(e, salt))))
            .collect();
        // Same ref replaces, as a re-ingested entity would.
        let refs: HashSet<&str> = added.iter().map(|i| i.entity_ref.as_str()).collect();
        let mut items: Vec<Arc<Item>> = current
            .items
            .iter()
            .filter(|it| !refs.contains(it.entity_ref.as_str()))
            .cloned()
            .collect();
        items.extend(added.iter().cloned());
        self.swap(items);
    }

    /// Applies `f` to the entity with this uid or (case-insensitive) ref and
    /// gives it a new etag. Returns the new etag, or `None` if absent.
    pub(crate) fn update(&self, ref_or_uid: &str, f: impl FnOnce(&mut Value)) -> Option<String> {
        let current = self.snapshot(false);
        let idx = current
            .by_uid
            .get(ref_or_uid)
            .or_else(|| current.by_ref.get(&ref_or_uid.to_lowercase()))
            .copied()?;
        let mut value = current.items[idx].value.clone();
        f(&mut value);
        let etag = compute_etag(&value, self.next_salt());
        value["metadata"]["etag"] = json!(etag);
        let mut items = current.items.clone();
        items[idx] = Arc::new(Item::new(value));
        self.swap(items);
        Some(etag)
    }

    /// One churn step, in a single swap: gives `change` random entities a
    /// new etag (a small description edit), deletes `delete` others and adds
    /// `add` new ones (copies of random entities under new names). Returns
    /// the uids changed, deleted and added.
    pub(crate) fn churn(
        &self,
        change: usize,
        add: usize,
        delete: usize,
        mut pick: impl FnMut(usize) -> usize,
    ) -> Churned {
        let current = self.snapshot(false);
        let mut items = current.items.clone();
        let mut churned = Churned::default();
        if items.is_empty() {
            return churned;
        }
        let salt = self.next_salt();
        for _ in 0..delete.min(items.len().saturating_sub(1)) {
            let gone = items.swap_remove(pick(items.len()));
            churned.deleted.push(gone.uid.clone());
        }
        let mut touched = HashSet::new();
        for _ in 0..change.min(items.len()) {
            let idx = pick(items.len());
            if !touched.insert(idx) {
                continue;
            }
            let mut value = items[idx].value.clone();
            value["metadata"]["description"] =
                json!(format!("Changed by churn (revision {salt:x})."));
            value["metadata"]["etag"] = json!(compute_etag(&value, salt));
            churned.changed.push(items[idx].uid.clone());
            items[idx] = Arc::new(Item::new(value));
        }
        let refs: HashSet<String> = items.iter().map(|i| i.entity_ref.clone()).collect();
        for i in 0..add {
            let mut value = items[pick(items.len())].value.clone();
            let name = format!("churn-{salt:x}-{i}");
            value["metadata"]["name"] = json!(name);
            if let Some(meta) = value["metadata"].as_object_mut() {
                meta.remove("uid");
                meta.remove("etag");
            }
            value.as_object_mut().map(|o| o.remove("relations"));
            let item = Arc::new(Item::new(complete(value, salt)));
            if refs.contains(&item.entity_ref) {
                continue;
            }
            churned.added.push(item.uid.clone());
            items.push(item);
        }
        self.swap(items);
        churned
    }

    pub(crate) fn remove(&self, pred: impl Fn(&Value) -> bool) -> usize {
        let current = self.snapshot(false);
        let items: Vec<Arc<Item>> = current
            .items
            .iter()
            .filter(|it| !pred(&it.value))
            .cloned()
            .collect();
        let removed = current.items.len() - items.len();
        if removed > 0 {
            self.swap(items);
        }
        removed
    }

    pub(crate) fn entities(&self) -> Vec<Value> {
        self.snapshot(false)
            .items
            .iter()
            .map(|it| it.value.clone())
            .collect()
    }
}
