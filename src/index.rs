//! The in-memory index of one mirror generation: what every catalog query is
//! answered from. Built once per generation by the mirror (`Index::build`),
//! shared read-only as `Arc<Index>` by the read path and `query`.
//!
//! Two halves: the lookup maps (by uid, by ref) are ready when `build`
//! returns; the inverted query index is built in the background (on the
//! worker [`pool`](crate::pool)), so a restart or sync serves entity reads
//! at once. Query functions block until it is complete — never answering
//! from a partial one — and a build that panicked is redone by the next
//! query (which fails again if it does).
//!
//! Design: document ids are positions in the entity list sorted by uid, so
//! "order by uid" (Backstage's default) is id order. Each entity is flattened
//! exactly as Backstage's `buildEntitySearch` fills its `search` table; the
//! rows become an inverted index `key → lower-cased value → documents` (a
//! bare id for the common one-entity value, else a RoaringBitmap), a "key
//! present" bitmap, and, only for values some entity spells with other
//! casing, the spellings (for facets; a unique value's spelling is re-read
//! from its body). Each distinct key, and each distinct value of a key, is
//! stored once: keys in a sorted slice, a key's values end to end in one
//! sorted string (`Values`: binary search, and a prefix is one run), so the
//! thousands of keys and the mostly unique values of a catalog cost no hash
//! table slack and no allocation each. Bodies are packed with a dictionary
//! trained on the generation (`codec`), from 1.4 KB to about 200 bytes.
//! Sort columns (distinct values sorted once, one `u32` rank per
//! entity) are built the first time a field is ordered by and cached for the
//! generation in a cache bounded in bytes (`IndexLimits`); a field no entity
//! has gets no column at all (it orders as all-null). Measured on 50,000
//! generated 1.4 KB entities: 15.9 MiB per 10,000 entities in all (33.7 MiB
//! with bodies as sent and values in hash maps), of which 1.9 MiB are the
//! packed bodies (13.3 MiB as sent) and about 0.64 MiB each cached sort
//! column of a unique field (such as `metadata.name`);
//! `approximate_memory_bytes` counts bodies, hash-table capacity, strings,
//! bitmaps and cached columns.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use bytes::Bytes;
use rayon::prelude::*;
use roaring::RoaringBitmap;
use serde_json::Value;

use crate::codec::{BodyCodec, PACK_MIN_ENTITIES};
use crate::entity::Entity;
use crate::pool;
use crate::query::budget::Budget;
use crate::query::error::QueryError;

/// Default of `IndexLimits::sort_columns_max_bytes`: 32 MiB. Over 100,000
/// entities a column takes about 6.4 MiB for a field whose values are
/// unique (such as `metadata.name`) and 0.4 MiB for one with few (`kind`).
pub const DEFAULT_SORT_COLUMNS_MAX_BYTES: u64 = 32 * 1024 * 1024;

/// Bounds on what an index may hold beyond its entities and postings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexLimits {
    /// Bytes of sort columns cached per generation; the least useful are
    /// evicted beyond it (a column larger than all of it is built for its
    /// query and not kept).
    pub sort_columns_max_bytes: u64,
}

impl Default for IndexLimits {
    fn default() -> Self {
        IndexLimits {
            sort_columns_max_bytes: DEFAULT_SORT_COLUMNS_MAX_BYTES,
        }
    }
}

/// The index's hash maps: a seeded fast hash (SipHash was an eighth of the
/// build) that still keeps crafted keys from colliding predictably.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// An empty `Map` with room for `n` entries.
fn map_with_capacity<K, V>(n: usize) -> Map<K, V> {
    Map::with_capacity_and_hasher(n, foldhash::fast::RandomState::default())
}

/// Backstage skips search keys longer than this (UTF-16 code units).
const MAX_KEY_LENGTH: usize = 200;
/// Backstage stores values longer than this (UTF-16 code units) as null.
pub(crate) const MAX_VALUE_LENGTH: usize = 200;
/// Paths Backstage's generic traversal does not index (some are re-added).
const SPECIAL_KEYS: [&str; 7] = [
    "attachments",
    "relations",
    "status",
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "metadata.etag",
];
/// Rank of a document that has no (non-null) value for a sort field.
pub(crate) const NULL_RANK: u32 = u32::MAX;

/// One row of Backstage's `search` table for an entity (the tests' view).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SearchRow {
    /// Lower-cased dotted path.
    pub key: String,
    /// Lower-cased value; `None` for null, missing or over-long values.
    pub value: Option<String>,
    /// The value as the entity spells it (`None` exactly when `value` is).
    pub original: Option<String>,
}

/// A JSON scalar as JavaScript's `String(x)` renders it.
pub(crate) fn js_string(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(js_number(n)),
        _ => None,
    }
}

/// `String(n)` for a JSON number: integral floats lose their `.0`.
pub(crate) fn js_number(n: &serde_json::Number) -> String {
    if n.is_f64() {
        if let Some(f) = n.as_f64() {
            if f.fract() == 0.0 && f.abs() < 1e21 {
                return format!("{f:.0}");
            }
        }
    }
    n.to_string()
}

fn utf16_len(s: &str) -> usize {
    s.encode_utf16().count()
}

/// Whether a JSON value at this raw dotted path gets search rows under the
/// path's lower-cased key: no `.`-bounded prefix of it is one of the paths
/// Backstage's traversal skips, and the key is not too long to be stored.
/// (Rows are a necessary condition only for such paths.)
pub(crate) fn row_key_indexed(raw_path: &str) -> bool {
    let special_prefix = raw_path
        .match_indices('.')
        .map(|(i, _)| &raw_path[..i])
        .chain(std::iter::once(raw_path))
        .any(|prefix| SPECIAL_KEYS.contains(&prefix));
    let key = lower(raw_path);
    !special_prefix && (key.len() <= MAX_KEY_LENGTH || utf16_len(&key) <= MAX_KEY_LENGTH)
}

/// The key of a relation type's rows (`relations.<lower-cased type>`), or
/// `None` when it is too long to be stored (such relations have no row).
pub(crate) fn relation_key(type_text: &str) -> Option<String> {
    let key = format!("relations.{}", lower(type_text));
    (key.len() <= MAX_KEY_LENGTH || utf16_len(&key) <= MAX_KEY_LENGTH).then_some(key)
}

/// Lower-cases like `toLocaleLowerCase('en-US')`, without allocating for
/// strings that are already lower-case ASCII.
pub(crate) fn lower(s: &str) -> Cow<'_, str> {
    if s.is_ascii() && !s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(s.to_lowercase())
    }
}

/// Receives `(lower-cased key, Some((original, lower-cased value)) | None)`.
pub(crate) type RowSink<'a> = dyn FnMut(&str, Option<(&str, &str)>) + 'a;

/// Visits an entity's search rows with Backstage's rules: leaves by dotted
/// path, arrays flattened (plus `path.<string item>` = `true` keys),
/// `metadata.name/namespace/uid` always present, `default` namespace when
/// none, `relations.<type>` = `targetRef`, keys lower-cased, over-long keys
/// dropped, over-long values nulled. `f` gets the lower-cased key and, for a
/// non-null value, `(original, lower-cased)`. Rows are not deduplicated here:
/// the index dedupes `(key, value)` per entity as Backstage does.
pub(crate) fn for_each_row(entity: &Value, f: &mut RowSink<'_>) {
    let mut emit = |raw_key: &str, raw_value: Option<&str>| {
        let key = lower(raw_key);
        if key.len() > MAX_KEY_LENGTH && utf16_len(&key) > MAX_KEY_LENGTH {
            return;
        }
        match raw_value {
            Some(original) => {
                let low = lower(original);
                if low.len() <= MAX_VALUE_LENGTH || utf16_len(&low) <= MAX_VALUE_LENGTH {
                    f(&key, Some((original, &low)));
                } else {
                    f(&key, None);
                }
            }
            None => f(&key, None),
        }
    };
    let mut path = String::with_capacity(128);
    visit(&mut path, entity, &mut emit);

    let metadata = entity.get("metadata");
    let meta = |k: &str| metadata.and_then(|m| m.get(k)).and_then(js_string);
    emit("metadata.name", meta("name").as_deref());
    let namespace = meta("namespace");
    emit("metadata.namespace", namespace.as_deref());
    emit("metadata.uid", meta("uid").as_deref());
    if namespace.as_deref().is_none_or(str::is_empty) {
        emit("metadata.namespace", Some("default"));
    }
    if let Some(Value::Array(relations)) = entity.get("relations") {
        for relation in relations {
            let Some(kind) = relation.get("type").and_then(js_string) else {
                continue;
            };
            let target = relation.get("targetRef").and_then(js_string);
            emit(&format!("relations.{kind}"), target.as_deref());
        }
    }
}

#[cfg(test)]
/// The deduplicated rows of an entity, as Backstage's `search` table holds
/// them (first original spelling wins for a lower-cased value).
pub(crate) fn search_rows(entity: &Value) -> Vec<SearchRow> {
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for_each_row(entity, &mut |key, value| {
        if seen.insert((key.to_string(), value.map(|(_, l)| l.to_string()))) {
            rows.push(SearchRow {
                key: key.to_string(),
                value: value.map(|(_, l)| l.to_string()),
                original: value.map(|(o, _)| o.to_string()),
            });
        }
    });
    rows
}

fn visit(path: &mut String, current: &Value, emit: &mut dyn FnMut(&str, Option<&str>)) {
    if SPECIAL_KEYS.contains(&path.as_str()) {
        return;
    }
    match current {
        Value::Null => emit(path, None),
        Value::String(s) => emit(path, Some(s)),
        Value::Bool(_) | Value::Number(_) => emit(path, js_string(current).as_deref()),
        Value::Array(items) => {
            for item in items {
                visit(path, item, emit);
                if let Value::String(s) = item {
                    let len = path.len();
                    path.push('.');
                    path.push_str(s);
                    emit(path, Some("true"));
                    path.truncate(len);
                }
            }
        }
        Value::Object(map) => {
            for (key, value) in map {
                let len = path.len();
                if len > 0 {
                    path.push('.');
                }
                path.push_str(key);
                visit(path, value, emit);
                path.truncate(len);
            }
        }
    }
}

/// The documents of one `(key, value)`: most values belong to one entity,
/// which a bare id holds far more cheaply than a bitmap.
#[derive(Debug, Clone)]
pub(crate) enum DocSet {
    /// Exactly one document.
    One(u32),
    /// Exactly one document, which spells the value with other casing; the
    /// spelling is read back from its body when a facet needs it (keeps
    /// unique mixed-case values such as names from being stored twice).
    OneCased(u32),
    /// Two or more (boxed: keeps the common one-document case at 16 bytes).
    Many(Box<RoaringBitmap>),
}

impl DocSet {
    /// Adds a document not smaller than any held; false if already held.
    fn push(&mut self, doc: u32) -> bool {
        match self {
            DocSet::One(d) | DocSet::OneCased(d) if *d == doc => false,
            DocSet::One(d) | DocSet::OneCased(d) => {
                let mut b = RoaringBitmap::new();
                b.push(*d);
                b.push(doc);
                *self = DocSet::Many(Box::new(b));
                true
            }
            // `insert`, not `push`: roaring's `push` finds a dense
            // container's maximum by scanning it, on every call.
            DocSet::Many(b) => b.insert(doc),
        }
    }

    /// Unions into `out`.
    pub fn or_into(&self, out: &mut RoaringBitmap) {
        match self {
            DocSet::One(d) | DocSet::OneCased(d) => {
                out.insert(*d);
            }
            DocSet::Many(b) => *out |= &**b,
        }
    }

    /// As a bitmap.
    pub fn to_bitmap(&self) -> RoaringBitmap {
        let mut out = RoaringBitmap::new();
        self.or_into(&mut out);
        out
    }

    /// How many of the documents are in `m`.
    pub fn intersection_len(&self, m: &RoaringBitmap) -> u64 {
        match self {
            DocSet::One(d) | DocSet::OneCased(d) => u64::from(m.contains(*d)),
            DocSet::Many(b) => b.intersection_len(m),
        }
    }

    /// Number of documents.
    pub fn len(&self) -> u64 {
        match self {
            DocSet::One(_) | DocSet::OneCased(_) => 1,
            DocSet::Many(b) => b.len(),
        }
    }

    fn for_each(&self, mut f: impl FnMut(u32)) {
        match self {
            DocSet::One(d) | DocSet::OneCased(d) => f(*d),
            DocSet::Many(b) => b.iter().for_each(f),
        }
    }

    fn merge(&mut self, other: DocSet) {
        match other {
            DocSet::One(d) | DocSet::OneCased(d) => {
                self.push(d);
            }
            DocSet::Many(b) => {
                let mut mine = self.to_bitmap();
                mine |= *b;
                *self = DocSet::Many(Box::new(mine));
            }
        }
    }

    /// Heap bytes beyond the enum itself.
    fn heap_bytes(&self) -> usize {
        match self {
            DocSet::One(_) | DocSet::OneCased(_) => 0,
            // Container vector and store allocations, plus the payload.
            DocSet::Many(b) => std::mem::size_of::<RoaringBitmap>() + b.serialized_size() + 64,
        }
    }
}

/// The distinct lower-cased values of one key, in byte order, with their
/// documents: one string holding every value end to end, the end of each,
/// and the documents of each. About 20 bytes per value beyond its text,
/// against about 80 for a hash map of boxed strings (a catalog's values are
/// mostly unique: names, uids, descriptions, URLs).
#[derive(Debug, Default)]
pub(crate) struct Values {
    text: Box<str>,
    /// `ends[i]`: where value `i` ends in `text` (it starts where `i - 1`
    /// ends).
    ends: Box<[u32]>,
    docs: Box<[DocSet]>,
}

impl Values {
    /// Sorts and packs `(value, documents)` pairs with distinct values.
    fn from_pairs(mut pairs: Vec<(Box<str>, DocSet)>) -> Values {
        pairs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut text = String::with_capacity(pairs.iter().map(|(v, _)| v.len()).sum());
        let mut ends = Vec::with_capacity(pairs.len());
        let mut docs = Vec::with_capacity(pairs.len());
        for (value, d) in pairs {
            text.push_str(&value);
            ends.push(u32::try_from(text.len()).expect("a key's values exceed 4 GiB"));
            docs.push(d);
        }
        Values {
            text: text.into_boxed_str(),
            ends: ends.into_boxed_slice(),
            docs: docs.into_boxed_slice(),
        }
    }

    /// Number of distinct values.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether the key has no non-null value.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The `i`-th value in byte order.
    pub fn value(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }

    /// The documents of a lower-cased value.
    pub fn get(&self, value: &str) -> Option<&DocSet> {
        let i = self.position(value);
        (i < self.len() && self.value(i) == value).then(|| &self.docs[i])
    }

    /// The documents of a lower-cased value, to change.
    fn get_mut(&mut self, value: &str) -> Option<&mut DocSet> {
        let i = self.position(value);
        (i < self.len() && self.value(i) == value).then(|| &mut self.docs[i])
    }

    /// These values (of earlier documents) and `later`'s, in one sorted
    /// list; a value in both gets the documents of both.
    fn merge(self, later: Values) -> Values {
        let capacity = self.len() + later.len();
        let mut text = String::with_capacity(self.text.len() + later.text.len());
        let mut ends = Vec::with_capacity(capacity);
        let mut docs = Vec::with_capacity(capacity);
        let mut mine = self.into_entries().peekable();
        let mut theirs = later.into_entries().peekable();
        loop {
            let order = match (mine.peek(), theirs.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((a, _)), Some((b, _))) => a.as_str().cmp(b.as_str()),
            };
            let entry = match order {
                std::cmp::Ordering::Less => mine.next(),
                std::cmp::Ordering::Greater => theirs.next(),
                std::cmp::Ordering::Equal => match (mine.next(), theirs.next()) {
                    (Some((value, mut d)), Some((_, other))) => {
                        d.merge(other);
                        Some((value, d))
                    }
                    (one, other) => one.or(other),
                },
            };
            if let Some((value, d)) = entry {
                text.push_str(value.as_str());
                ends.push(u32::try_from(text.len()).expect("a key's values exceed 4 GiB"));
                docs.push(d);
            }
        }
        Values {
            text: text.into_boxed_str(),
            ends: ends.into_boxed_slice(),
            docs: docs.into_boxed_slice(),
        }
    }

    /// The values (as positions in a shared text) and their documents.
    fn into_entries(self) -> impl Iterator<Item = (ValueAt, DocSet)> {
        let text: Arc<str> = self.text.into();
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&e| e as usize));
        let ranges: Vec<(usize, usize)> =
            starts.zip(self.ends.iter().map(|&e| e as usize)).collect();
        ranges
            .into_iter()
            .zip(self.docs.into_vec())
            .map(move |((start, end), d)| {
                (
                    ValueAt {
                        text: text.clone(),
                        start,
                        end,
                    },
                    d,
                )
            })
    }

    /// The first position whose value is not below `value`.
    fn position(&self, value: &str) -> usize {
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let mid = low + (high - low) / 2;
            if self.value(mid) < value {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low
    }

    /// Every value and its documents, in byte order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &DocSet)> {
        (0..self.len()).map(|i| (self.value(i), &self.docs[i]))
    }

    /// The values starting with `prefix` and their documents (a contiguous
    /// run in byte order).
    pub fn with_prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a DocSet)> {
        (self.position(prefix)..self.len())
            .map(|i| (self.value(i), &self.docs[i]))
            .take_while(move |(v, _)| v.starts_with(prefix))
    }

    /// Heap bytes held.
    fn heap_bytes(&self) -> usize {
        self.text.len()
            + self.ends.len() * 4
            + self.docs.len() * std::mem::size_of::<DocSet>()
            + self.docs.iter().map(DocSet::heap_bytes).sum::<usize>()
            + 3 * ALLOC_OVERHEAD
    }
}

/// One value of a `Values` being merged: a range of its text.
struct ValueAt {
    text: Arc<str>,
    start: usize,
    end: usize,
}

impl ValueAt {
    fn as_str(&self) -> &str {
        &self.text[self.start..self.end]
    }
}

/// Everything the index knows about one search key.
#[derive(Debug, Default)]
pub(crate) struct KeyPostings {
    /// Documents with any row for the key, null rows included.
    pub present: RoaringBitmap,
    /// Documents by lower-cased non-null value.
    pub values: Values,
    /// For lower-cased values that some entity spells differently: the
    /// documents by original spelling (facets keep the entity's casing).
    /// Documents not listed spell the value exactly as lower-cased.
    cased: Map<Box<str>, Vec<(Box<str>, DocSet)>>,
    /// Whether some value is not ASCII: only then can a value compare equal,
    /// upper-cased, to an ASCII text it does not equal lower-cased (`ß`,
    /// `ſ`, `ı`, ligatures).
    non_ascii: bool,
}

/// A key's postings while a run of documents is indexed: values in a hash
/// map, packed into `Values` by `finish`.
#[derive(Debug, Default)]
struct KeyBuilder {
    present: RoaringBitmap,
    values: Map<Box<str>, DocSet>,
    cased: Map<Box<str>, Vec<(Box<str>, DocSet)>>,
}

impl KeyBuilder {
    fn add(&mut self, doc: u32, value: Option<(&str, &str)>) {
        self.present.insert(doc);
        let Some((original, low)) = value else {
            return;
        };
        let fresh = match self.values.get_mut(low) {
            Some(docs) => docs.push(doc),
            None => {
                self.values.insert(low.into(), DocSet::One(doc));
                true
            }
        };
        // Backstage keeps the first row of a (key, lower-cased value) pair.
        if fresh && original != low {
            let variants = self.cased.entry(low.into()).or_default();
            match variants.iter_mut().find(|(o, _)| &**o == original) {
                Some((_, docs)) => {
                    docs.push(doc);
                }
                None => variants.push((original.into(), DocSet::One(doc))),
            }
        }
    }

    /// The run's postings, values packed (spellings are folded only once
    /// every run is merged: a value unique in one run may not be in all).
    fn into_run(self) -> KeyPostings {
        let mut cased = self.cased;
        cased.shrink_to_fit();
        KeyPostings {
            present: self.present,
            values: Values::from_pairs(self.values.into_iter().collect()),
            cased,
            non_ascii: false,
        }
    }
}

impl KeyPostings {
    /// One key's postings from the postings of consecutive runs of
    /// documents (in document order).
    fn merge_runs(runs: Vec<KeyPostings>) -> KeyPostings {
        let mut runs = runs.into_iter();
        let mut merged = runs.next().unwrap_or_default();
        for run in runs {
            merged.present |= run.present;
            merged.values = std::mem::take(&mut merged.values).merge(run.values);
            for (v, variants) in run.cased {
                let mine = merged.cased.entry(v).or_default();
                for (o, docs) in variants {
                    match mine.iter_mut().find(|(m, _)| *m == o) {
                        Some((_, m)) => m.merge(docs),
                        None => mine.push((o, docs)),
                    }
                }
            }
        }
        merged.fold_single_spellings();
        merged.cased.shrink_to_fit();
        merged.non_ascii = !merged.values.text.is_ascii();
        merged
    }

    /// Turns single-document values with one other spelling into
    /// `OneCased`, dropping their stored spelling.
    fn fold_single_spellings(&mut self) {
        let values = &mut self.values;
        self.cased.retain(|low, variants| {
            let Some(docs) = values.get_mut(low) else {
                return true;
            };
            match (&*docs, variants.as_slice()) {
                (DocSet::One(d), [(_, DocSet::One(v))]) if d == v => {
                    *docs = DocSet::OneCased(*d);
                    false
                }
                _ => true,
            }
        });
    }

    /// Facet counts by original spelling, among `matched` (all if `None`).
    /// `spelling` recovers the original of a `OneCased` document.
    pub fn facet_counts(
        &self,
        matched: Option<&RoaringBitmap>,
        spelling: &dyn Fn(u32, &str) -> Option<String>,
        budget: &Budget,
    ) -> Result<Vec<(String, u64)>, QueryError> {
        let count = |d: &DocSet| match matched {
            Some(m) => d.intersection_len(m),
            None => d.len(),
        };
        let mut out = Vec::new();
        for (i, (low, docs)) in self.values.iter().enumerate() {
            // A unique mixed-case value re-reads its body: check often.
            if i % BUDGET_CHECK_EVERY == 0 {
                budget.check()?;
            }
            if let DocSet::OneCased(doc) = docs {
                if count(docs) > 0 {
                    let original = spelling(*doc, low).unwrap_or_else(|| low.to_string());
                    out.push((original, 1));
                }
                continue;
            }
            match self.cased.get(low) {
                None => out.push((low.to_string(), count(docs))),
                Some(variants) => {
                    let mut as_lower = docs.to_bitmap();
                    for (original, vdocs) in variants {
                        as_lower -= vdocs.to_bitmap();
                        out.push((original.to_string(), count(vdocs)));
                    }
                    let n = match matched {
                        Some(m) => as_lower.intersection_len(m),
                        None => as_lower.len(),
                    };
                    out.push((low.to_string(), n));
                }
            }
        }
        out.retain(|(_, n)| *n > 0);
        Ok(out)
    }

    fn heap_bytes(&self) -> usize {
        let values = self.values.heap_bytes();
        let cased: usize = map_table_bytes(&self.cased)
            + self
                .cased
                .iter()
                .map(|(v, vs)| {
                    v.len()
                        + ALLOC_OVERHEAD
                        + vs.capacity() * std::mem::size_of::<(Box<str>, DocSet)>()
                        + vs.iter()
                            .map(|(o, d)| o.len() + ALLOC_OVERHEAD + d.heap_bytes())
                            .sum::<usize>()
                })
                .sum::<usize>();
        self.present.serialized_size() + 64 + values + cased
    }

    /// Documents with a value that is not ASCII (found without a scan when
    /// every value is ASCII, the common case).
    pub(crate) fn non_ascii_docs(&self, budget: &Budget) -> Result<RoaringBitmap, QueryError> {
        let mut out = RoaringBitmap::new();
        if self.non_ascii {
            for (i, (value, docs)) in self.values.iter().enumerate() {
                if i % BUDGET_CHECK_EVERY == 0 {
                    budget.check()?;
                }
                if !value.is_ascii() {
                    docs.or_into(&mut out);
                }
            }
        }
        Ok(out)
    }
}

/// Bytes of a hash map's table: one slot per capacity plus a control byte.
fn map_table_bytes<K, V, S: BuildHasher>(m: &HashMap<K, V, S>) -> usize {
    m.capacity() * (std::mem::size_of::<(K, V)>() + 1)
}

/// Builds the inverted half of a generation (entities in document order), or
/// `None` if `abandoned` is set part-way. A panic in any worker propagates:
/// a partial index is never returned.
fn build_inverted(entities: &[Arc<Entity>], abandoned: &AtomicBool) -> Option<Inverted> {
    build_inverted_in_runs(entities, abandoned, RUN_DOCUMENTS)
}

/// One run's postings: every key its documents hold, with their postings.
type Run = Map<Box<str>, KeyPostings>;

/// `build_inverted`, indexing `run_documents` documents at a time.
fn build_inverted_in_runs(
    entities: &[Arc<Entity>],
    abandoned: &AtomicBool,
    run_documents: usize,
) -> Option<Inverted> {
    // Parsing and flattening dominate the build; runs of documents are
    // indexed on the shared worker pool (see `pool`) and merged in
    // document order. A panic in any run propagates here.
    let chunk = entities.len().div_ceil(pool::threads()).max(run_documents);
    let parts: Vec<Option<Vec<Run>>> = pool::run(|| {
        entities
            .par_chunks(chunk)
            .enumerate()
            .map(|(i, part)| index_part(part, i * chunk, run_documents, abandoned))
            .collect()
    });
    // Every run's postings of a key, in document order, merged key by key.
    let mut runs_by_key: Map<Box<str>, Vec<KeyPostings>> = Map::default();
    for part in parts {
        for run in part? {
            for (k, p) in run {
                runs_by_key.entry(k).or_default().push(p);
            }
        }
    }
    let mut finished: Vec<(Box<str>, KeyPostings)> = Vec::with_capacity(runs_by_key.len());
    for (k, runs) in runs_by_key {
        finished.push((k, KeyPostings::merge_runs(runs)));
    }
    let mut by_ref_order: Vec<u32> = (0..entities.len() as u32).collect();
    by_ref_order.sort_unstable_by(|&a, &b| {
        entities[a as usize]
            .entity_ref
            .cmp(&entities[b as usize].entity_ref)
            .then(a.cmp(&b))
    });
    let mut ref_ranks = vec![0u32; entities.len()];
    for (rank, doc) in by_ref_order.into_iter().enumerate() {
        ref_ranks[doc as usize] = rank as u32;
    }

    finished.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let keys = Keys(finished.into_boxed_slice());
    let relation_keys: Vec<Box<str>> = keys
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("relations."))
        .map(Box::from)
        .collect();
    let postings_bytes = keys.0.len() * std::mem::size_of::<(Box<str>, KeyPostings)>()
        + keys
            .iter()
            .map(|(k, p)| k.len() + ALLOC_OVERHEAD + p.heap_bytes())
            .sum::<usize>()
        + relation_keys
            .iter()
            .map(|k| k.len() + ALLOC_OVERHEAD + std::mem::size_of::<Box<str>>())
            .sum::<usize>();
    Some(Inverted {
        keys,
        ref_ranks,
        relation_keys,
        postings_bytes,
    })
}

/// How many documents a build indexes between checks for abandonment.
const ABANDON_CHECK_EVERY: usize = 256;

/// How many values (or documents) a query's loop handles between checks of
/// its budget.
const BUDGET_CHECK_EVERY: usize = 256;

/// Documents indexed into hash maps at a time: each run's maps are packed
/// (`Values`) before the next run starts, so the maps of at most one run per
/// thread exist at once. The build's peak was its hash maps, twice the
/// finished index; runs keep it near the finished size.
const RUN_DOCUMENTS: usize = 4096;

/// Indexes a part of the entities, whose document ids start at `base`, run
/// by run; `None` if `abandoned` is set part-way.
fn index_part(
    entities: &[Arc<Entity>],
    base: usize,
    run_documents: usize,
    abandoned: &AtomicBool,
) -> Option<Vec<Run>> {
    let mut runs = Vec::with_capacity(entities.len().div_ceil(run_documents));
    for (i, run) in entities.chunks(run_documents).enumerate() {
        let keys = index_run(run, (base + i * run_documents) as u32, abandoned)?;
        runs.push(
            keys.into_iter()
                .map(|(k, p)| (k, p.into_run()))
                .collect::<Map<_, _>>(),
        );
    }
    Some(runs)
}

/// Indexes a run of entities whose document ids start at `base`; `None` if
/// `abandoned` is set part-way.
fn index_run(
    entities: &[Arc<Entity>],
    base: u32,
    abandoned: &AtomicBool,
) -> Option<Map<Box<str>, KeyBuilder>> {
    let mut keys: Map<Box<str>, KeyBuilder> = Map::default();
    for (i, entity) in entities.iter().enumerate() {
        if i % ABANDON_CHECK_EVERY == 0 && abandoned.load(AtomicOrdering::Relaxed) {
            return None;
        }
        let doc = base + i as u32;
        let Ok(value) = serde_json::from_slice::<Value>(&entity.body()) else {
            continue;
        };
        for_each_row(&value, &mut |key, v| {
            let postings = match keys.get_mut(key) {
                Some(p) => p,
                None => keys.entry(key.into()).or_default(),
            };
            postings.add(doc, v);
        });
    }
    Some(keys)
}

/// The entities with their bodies packed by one codec, on the worker
/// pool, as the inverted build is; as they are when there are too few
/// to train on.
///
/// The codec is the one that already packs more than half of them (the
/// previous generation's, when a sync changed less than half the bodies):
/// the bodies it packs are kept as they are, the rest are packed with it.
/// Only when no codec packs most of them (the first generation after a
/// start, or a sync that replaced most of the catalog) is a new one
/// trained. So a generation holds exactly one codec, whatever the
/// generations before it held: training one per generation and keeping
/// unchanged bodies as they were packed left every past generation's codec
/// alive (about 0.5 MiB each) in the bodies it had packed, and memory grew
/// with every sync.
fn pack_bodies(entities: Vec<Arc<Entity>>) -> Vec<Arc<Entity>> {
    if entities.len() < PACK_MIN_ENTITIES {
        return entities;
    }
    let codec = match dominant_codec(&entities) {
        Some(codec) => codec,
        None => {
            let bodies: Vec<Bytes> = entities.iter().map(|e| e.body()).collect();
            let slices: Vec<&[u8]> = bodies.iter().map(|b| &b[..]).collect();
            match BodyCodec::train(&slices) {
                Some(codec) => codec,
                None => return entities,
            }
        }
    };
    let chunk = entities.len().div_ceil(pool::threads()).max(1024);
    let codec = &codec;
    pool::run(|| {
        entities
            .par_chunks(chunk)
            .flat_map_iter(|run| run.iter().map(|e| e.packed(codec)))
            .collect()
    })
}

/// The codec that packs more than half of `entities`, if one does.
fn dominant_codec(entities: &[Arc<Entity>]) -> Option<Arc<BodyCodec>> {
    // A handful of codecs at most: a list beats a map.
    let mut counts: Vec<(&Arc<BodyCodec>, usize)> = Vec::new();
    for codec in entities.iter().filter_map(|e| e.codec()) {
        match counts.iter_mut().find(|(c, _)| Arc::ptr_eq(c, codec)) {
            Some((_, n)) => *n += 1,
            None => counts.push((codec, 1)),
        }
    }
    counts
        .into_iter()
        .max_by_key(|&(_, n)| n)
        .filter(|&(_, n)| n * 2 > entities.len())
        .map(|(c, _)| c.clone())
}

/// The order of one field's values over all documents of a generation.
#[derive(Debug)]
pub(crate) struct SortColumn {
    /// Distinct lower-cased values, ascending (byte order).
    pub values: Vec<Box<str>>,
    /// Per document: index into `values` of its smallest value, or `NULL_RANK`.
    pub ranks: Vec<u32>,
}

impl SortColumn {
    /// Bytes held: ranks, values, and the allocator's share of each.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of::<SortColumn>()
            + self.ranks.capacity() * 4
            + self.values.capacity() * std::mem::size_of::<Box<str>>()
            + self
                .values
                .iter()
                .map(|v| v.len() + ALLOC_OVERHEAD)
                .sum::<usize>()
    }

    /// The sort value of a document (`None` sorts last).
    pub fn value(&self, doc: u32) -> Option<&str> {
        match self.ranks[doc as usize] {
            NULL_RANK => None,
            r => Some(&self.values[r as usize]),
        }
    }
}

/// The postings of every key, sorted by key: a catalog has thousands of keys
/// (every string item of an array is a key of its own, `path.<item>`), and a
/// sorted slice holds them without a hash table's empty slots.
struct Keys(Box<[(Box<str>, KeyPostings)]>);

impl Keys {
    /// The postings of a lower-cased key.
    fn get(&self, key: &str) -> Option<&KeyPostings> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &KeyPostings)> {
        self.0.iter().map(|(k, p)| (&**k, p))
    }
}

/// The query half of a generation: postings and the default order. Built
/// off the serving path (see `Index::build`).
struct Inverted {
    keys: Keys,
    /// Per document: its position in `entity_ref` order (the default order
    /// of `GET /entities`).
    ref_ranks: Vec<u32>,
    /// The keys of relation rows (`relations.<type>`), sorted.
    relation_keys: Vec<Box<str>>,
    postings_bytes: usize,
}

/// Where the inverted half of an index is built and awaited. `done` is set
/// at most once, by whichever build finishes; `state` and `changed` let
/// queries sleep until then and notice a build that died.
struct Slot {
    done: OnceLock<Inverted>,
    state: Mutex<BuildState>,
    changed: Condvar,
    /// Set when the index is dropped: a build nobody can use stops early.
    abandoned: AtomicBool,
    /// How the inverted half is computed (a seam for the tests' failures).
    builder: InvertedBuilder,
}

/// Computes the inverted half, or `None` when abandoned part-way.
type InvertedBuilder = fn(&[Arc<Entity>], &AtomicBool) -> Option<Inverted>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BuildState {
    /// A build is running (in the background or for a waiting query).
    Running,
    /// The last build panicked; the next query builds again.
    Failed,
}

/// Generations this small are indexed inline: a thread costs more than the
/// work, and a one-entity index (the by-refs filter) stays synchronous.
const INLINE_BUILD_MAX: usize = 512;

impl Slot {
    /// Runs a build and publishes its result. Whatever happens (an early
    /// return, a panic), waiters are woken and, without a result, see
    /// `Failed` rather than sleeping forever.
    fn run(&self, entities: &[Arc<Entity>]) {
        struct Publish<'a>(&'a Slot);
        impl Drop for Publish<'_> {
            fn drop(&mut self) {
                let slot = self.0;
                let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
                if slot.done.get().is_none() {
                    *state = BuildState::Failed;
                    if std::thread::panicking() {
                        tracing::error!(
                            "building the query index failed; the next query builds it again"
                        );
                    }
                }
                slot.changed.notify_all();
            }
        }
        let _publish = Publish(self);
        if let Some(inverted) = (self.builder)(entities, &self.abandoned) {
            let _ = self.done.set(inverted);
        }
    }
}

/// An immutable view of one mirror generation, indexed for queries.
///
/// The lookup half (`by_uid`, `by_ref`, `entities`, `len`, `generation`) is
/// ready when `build` returns; the inverted half is built on the worker
/// pool, and the crate's query functions block until it is ready (check
/// `is_query_ready` before calling them on an async worker).
pub struct Index {
    generation: u64,
    entities: Arc<[Arc<Entity>]>,
    by_uid: Map<Arc<str>, u32>,
    by_ref: Map<Arc<str>, u32>,
    all: RoaringBitmap,
    inverted: Arc<Slot>,
    /// Sort columns built so far, weighed by their bytes.
    sort_columns: moka::sync::Cache<Box<str>, Arc<SortColumn>>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("generation", &self.generation)
            .field("entities", &self.entities.len())
            .field("keys", &self.inverted.done.get().map(|i| i.keys.len()))
            .finish()
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        self.inverted.abandoned.store(true, AtomicOrdering::Relaxed);
    }
}

impl Index {
    /// Indexes a generation. Each body is parsed once; a body that is not a
    /// JSON object is kept (it can still be read by uid or ref) but matches
    /// no key. Duplicate uids keep the last entity.
    ///
    /// Returns once the lookup maps are built; the inverted query index is
    /// built on the worker pool (inline for small generations), so
    /// restart and sync are not held up by it.
    pub fn build(generation: u64, entities: Vec<Arc<Entity>>, limits: &IndexLimits) -> Index {
        Index::build_with(generation, entities, limits, build_inverted)
    }

    fn build_with(
        generation: u64,
        entities: Vec<Arc<Entity>>,
        limits: &IndexLimits,
        builder: InvertedBuilder,
    ) -> Index {
        let mut unique: Map<Arc<str>, Arc<Entity>> = map_with_capacity(entities.len());
        for entity in entities {
            unique.insert(entity.uid.clone(), entity);
        }
        let mut entities: Vec<Arc<Entity>> = unique.into_values().collect();
        entities.sort_unstable_by(|a, b| a.uid.cmp(&b.uid));
        let entities: Arc<[Arc<Entity>]> = pack_bodies(entities).into();

        let mut by_uid = map_with_capacity(entities.len());
        let mut by_ref = map_with_capacity(entities.len());
        for (doc, entity) in entities.iter().enumerate() {
            by_uid.insert(entity.uid.clone(), doc as u32);
            // A uid with capitals is also found by its lower-cased spelling
            // (see `by_uid`); uids are lower-case UUIDs almost always.
            if let Cow::Owned(lower) = lower(&entity.uid) {
                by_uid.entry(Arc::from(lower)).or_insert(doc as u32);
            }
            by_ref.insert(entity.entity_ref.clone(), doc as u32);
        }
        let mut all = RoaringBitmap::new();
        all.insert_range(0..entities.len() as u32);

        let slot = Arc::new(Slot {
            done: OnceLock::new(),
            state: Mutex::new(BuildState::Running),
            changed: Condvar::new(),
            abandoned: AtomicBool::new(false),
            builder,
        });
        if entities.len() <= INLINE_BUILD_MAX {
            slot.run(&entities);
        } else {
            let (background, list) = (slot.clone(), entities.clone());
            if !pool::spawn(move || background.run(&list)) {
                tracing::warn!("cannot start the query index build; the first query builds it");
                *slot.state.lock().unwrap_or_else(|p| p.into_inner()) = BuildState::Failed;
            }
        }
        Index {
            generation,
            entities,
            by_uid,
            by_ref,
            all,
            inverted: slot,
            sort_columns: moka::sync::Cache::builder()
                .max_capacity(limits.sort_columns_max_bytes)
                .weigher(|_, column: &Arc<SortColumn>| {
                    u32::try_from(column.heap_bytes()).unwrap_or(u32::MAX)
                })
                .build(),
        }
    }

    /// Whether queries can run without waiting for the inverted index.
    pub fn is_query_ready(&self) -> bool {
        self.inverted.done.get().is_some()
    }

    /// Waits until queries can run (blocking; for the sync loop's blocking
    /// task, which keeps the previous generation serving meanwhile).
    pub fn wait_query_ready(&self) {
        let _ = self.inverted();
    }

    /// The inverted half, waiting for its build (or, after a failed one,
    /// building it on this thread). Blocks: not for async workers.
    fn inverted(&self) -> &Inverted {
        let slot = &*self.inverted;
        if let Some(done) = slot.done.get() {
            return done;
        }
        let mut state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(done) = slot.done.get() {
                return done;
            }
            match *state {
                BuildState::Running => {
                    state = slot.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                BuildState::Failed => {
                    *state = BuildState::Running;
                    drop(state);
                    // Unwinds to the caller if it fails again; `run` has
                    // then marked it failed for the next query.
                    slot.run(&self.entities);
                    state = slot.state.lock().unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    /// The mirror generation this index was built from.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of entities.
    pub fn len(&self) -> usize {
        self.entities.len()
    }

    /// Whether the generation holds no entity.
    pub fn is_empty(&self) -> bool {
        self.entities.is_empty()
    }

    /// The entity with this `metadata.uid`, in any case: Backstage's
    /// `GET /entities/by-uid` is a `metadata.uid` filter, and filters compare
    /// lower-cased values.
    pub fn by_uid(&self, uid: &str) -> Option<&Arc<Entity>> {
        self.by_uid
            .get(uid)
            .or_else(|| self.by_uid.get(uid.to_lowercase().as_str()))
            .map(|&d| &self.entities[d as usize])
    }

    /// The entity with this lower-cased `kind:namespace/name` reference.
    pub fn by_ref(&self, canonical_lowercase_ref: &str) -> Option<&Arc<Entity>> {
        self.by_ref
            .get(canonical_lowercase_ref)
            .map(|&d| &self.entities[d as usize])
    }

    /// All entities, in uid order.
    pub fn entities(&self) -> impl Iterator<Item = &Arc<Entity>> {
        self.entities.iter()
    }

    /// Bytes held for this generation: bodies, identity strings, lookup maps,
    /// postings and the sort columns cached so far.
    pub fn approximate_memory_bytes(&self) -> usize {
        let entities: usize = self
            .entities
            .iter()
            .map(|e| {
                e.body_held_bytes()
                    + e.uid.len()
                    + e.entity_ref.len()
                    + e.etag.len()
                    + std::mem::size_of::<Entity>()
                    + 2 * std::mem::size_of::<usize>() // Arc counts
                    + std::mem::size_of::<Arc<Entity>>()
            })
            .sum();
        let lookups = map_table_bytes(&self.by_uid) + map_table_bytes(&self.by_ref);
        // The inverted half counts once built (a running build's memory is
        // transient and not yet this generation's).
        let inverted = self
            .inverted
            .done
            .get()
            .map_or(0, |i| i.postings_bytes + i.ref_ranks.len() * 4);
        // Settle pending insertions and evictions so the weight is current.
        self.sort_columns.run_pending_tasks();
        let columns = usize::try_from(self.sort_columns.weighted_size()).unwrap_or(usize::MAX);
        entities + lookups + inverted + columns + self.all.serialized_size()
    }

    /// The entity behind a document id.
    pub(crate) fn entity(&self, doc: u32) -> &Arc<Entity> {
        &self.entities[doc as usize]
    }

    /// Facet counts of a lower-cased key, by the entities' own spelling.
    pub(crate) fn facet_counts(
        &self,
        lowercase_key: &str,
        matched: Option<&RoaringBitmap>,
        budget: &Budget,
    ) -> Result<Vec<(String, u64)>, QueryError> {
        let Some(postings) = self.inverted().keys.get(lowercase_key) else {
            return Ok(Vec::new());
        };
        postings.facet_counts(
            matched,
            &|doc, low| self.spelling(doc, lowercase_key, low),
            budget,
        )
    }

    /// How a document spells a (lower-cased) value of a key: its first row.
    fn spelling(&self, doc: u32, key: &str, low: &str) -> Option<String> {
        let value = serde_json::from_slice::<Value>(&self.entity(doc).body()).ok()?;
        let mut found = None;
        for_each_row(&value, &mut |k, v| {
            if found.is_none() && k == key {
                if let Some((original, l)) = v {
                    if l == low {
                        found = Some(original.to_string());
                    }
                }
            }
        });
        found
    }

    /// A document's position in `entity_ref` order.
    pub(crate) fn ref_rank(&self, doc: u32) -> u32 {
        self.inverted().ref_ranks[doc as usize]
    }

    /// Every document.
    pub(crate) fn all(&self) -> &RoaringBitmap {
        &self.all
    }

    /// The postings of a lower-cased key.
    pub(crate) fn key(&self, lowercase_key: &str) -> Option<&KeyPostings> {
        self.inverted().keys.get(lowercase_key)
    }

    /// The document of `entity` when this generation holds it as it is (the
    /// same body: what a query sees of an entity is its body), else `None`
    /// (a newer copy revalidated since, or an entity the generation lacks).
    pub(crate) fn doc_of(&self, entity: &Entity) -> Option<u32> {
        let doc = *self.by_uid.get(&*entity.uid)?;
        let own = &self.entities[doc as usize];
        (own.uid == entity.uid && own.same_body(entity)).then_some(doc)
    }

    /// Documents whose body parsed when the index was built: every parsed
    /// body has a `metadata.uid` row (null or not); one that did not parse
    /// has no row and matches nothing.
    pub(crate) fn parsed_docs(&self) -> Option<&RoaringBitmap> {
        self.key("metadata.uid").map(|p| &p.present)
    }

    /// Documents with any row (null included) for a lower-cased key.
    pub(crate) fn present(&self, lowercase_key: &str) -> RoaringBitmap {
        self.key(lowercase_key)
            .map(|p| p.present.clone())
            .unwrap_or_default()
    }

    /// The keys of relation rows (`relations.<lower-cased type>`), sorted.
    pub(crate) fn relation_keys(&self) -> &[Box<str>] {
        &self.inverted().relation_keys
    }

    /// The sort column of a search key (used as given: Backstage joins the
    /// order field against the lower-cased keys without lower-casing it), or
    /// `None` when no entity has a value for it: every document then sorts
    /// as null, and no column is built or cached. Columns are cached for the
    /// generation within `IndexLimits::sort_columns_max_bytes`.
    pub(crate) fn sort_column(
        &self,
        key: &str,
        budget: &Budget,
    ) -> Result<Option<Arc<SortColumn>>, QueryError> {
        let Some(postings) = self.key(key).filter(|p| !p.values.is_empty()) else {
            return Ok(None);
        };
        if let Some(column) = self.sort_columns.get(key) {
            return Ok(Some(column));
        }
        // Built outside the cache's per-key lock: a query waiting on
        // another's build could neither watch its own budget nor tell the
        // other's budget error from its own. Two racing builds both finish;
        // the second insert replaces the first.
        let column = Arc::new(build_sort_column(postings, self.entities.len(), budget)?);
        self.sort_columns.insert(key.into(), column.clone());
        Ok(Some(column))
    }

    /// Settles the sort-column cache's pending evictions (for tests).
    #[cfg(test)]
    pub(crate) fn sort_cache_settled(&self) -> (u64, u64) {
        self.sort_columns.run_pending_tasks();
        (
            self.sort_columns.entry_count(),
            self.sort_columns.weighted_size(),
        )
    }
}

/// The column of one key: its distinct values sorted, and each document's
/// smallest value's rank (`NULL_RANK` for none).
fn build_sort_column(
    postings: &KeyPostings,
    documents: usize,
    budget: &Budget,
) -> Result<SortColumn, QueryError> {
    // `Values` are in byte order already.
    let values: Vec<(&str, &DocSet)> = postings.values.iter().collect();
    let mut ranks = vec![NULL_RANK; documents];
    for (rank, (_, docs)) in values.iter().enumerate() {
        if rank % BUDGET_CHECK_EVERY == 0 {
            budget.check()?;
        }
        docs.for_each(|doc| {
            let slot = &mut ranks[doc as usize];
            if *slot == NULL_RANK {
                *slot = rank as u32;
            }
        });
    }
    Ok(SortColumn {
        values: values.into_iter().map(|(v, _)| v.into()).collect(),
        ranks,
    })
}

/// What the allocator adds to each heap string (header and rounding).
const ALLOC_OVERHEAD: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(v: Value) -> Vec<(String, Option<String>)> {
        search_rows(&v)
            .into_iter()
            .map(|r| (r.key, r.value))
            .collect()
    }

    fn has(rows: &[(String, Option<String>)], k: &str, v: Option<&str>) -> bool {
        rows.iter().any(|(rk, rv)| rk == k && rv.as_deref() == v)
    }

    #[test]
    fn flattening_follows_backstage_search_rows() {
        let r = rows(json!({
            "kind": "Component",
            "metadata": {"name": "Foo", "uid": "U1", "tags": ["Java", "java", "Go"],
                         "annotations": {"backstage.io/Owner": "X"}, "etag": "e"},
            "spec": {"n": 1, "f": 1.5, "b": true, "z": null, "list": [{"a": "B"}], "empty": []},
            "relations": [{"type": "ownedBy", "targetRef": "group:default/Team"}],
            "status": {"x": 1}
        }));
        assert!(has(&r, "kind", Some("component")));
        assert!(has(&r, "metadata.name", Some("foo")));
        assert!(has(&r, "metadata.uid", Some("u1")));
        assert!(has(&r, "metadata.namespace", None));
        assert!(has(&r, "metadata.namespace", Some("default")));
        assert!(has(&r, "metadata.tags", Some("java")));
        assert!(has(&r, "metadata.tags.java", Some("true")));
        assert!(has(&r, "metadata.tags.go", Some("true")));
        assert!(has(
            &r,
            "metadata.annotations.backstage.io/owner",
            Some("x")
        ));
        assert!(has(&r, "spec.n", Some("1")));
        assert!(has(&r, "spec.f", Some("1.5")));
        assert!(has(&r, "spec.b", Some("true")));
        assert!(has(&r, "spec.z", None));
        assert!(has(&r, "spec.list.a", Some("b")));
        assert!(has(&r, "relations.ownedby", Some("group:default/team")));
        assert!(!r
            .iter()
            .any(|(k, _)| k.starts_with("status") || k == "metadata.etag"));
        assert!(!r.iter().any(|(k, _)| k == "spec.empty"));
        // Java and java collapse into one row.
        assert_eq!(r.iter().filter(|(k, _)| k == "metadata.tags").count(), 2);
    }

    #[test]
    fn long_values_become_null_and_long_keys_vanish() {
        let long = "x".repeat(201);
        let r = rows(
            json!({"metadata": {"name": "a", "uid": "u", "description": long.clone()},
                             "spec": {long.clone(): "v"}}),
        );
        assert!(has(&r, "metadata.description", None));
        assert!(!r.iter().any(|(k, _)| k.len() > 200));
        let r = rows(json!({"metadata": {"name": "a", "uid": "u", "d": "x".repeat(200)}}));
        assert!(r.iter().any(|(k, v)| k == "metadata.d" && v.is_some()));
    }

    #[test]
    fn by_uid_ignores_case_like_backstage_filters() {
        let entities: Vec<Arc<Entity>> = ["ab-12", "CD-34"]
            .iter()
            .map(|uid| {
                let body = json!({"kind": "Component", "metadata": {"name": uid, "uid": uid, "etag": "e"}});
                Arc::new(Entity::from_json(bytes::Bytes::from(body.to_string())).unwrap())
            })
            .collect();
        let index = Index::build(1, entities, &IndexLimits::default());
        for (asked, found) in [
            ("ab-12", "ab-12"),
            ("AB-12", "ab-12"),
            ("CD-34", "CD-34"),
            ("cd-34", "CD-34"),
            ("Cd-34", "CD-34"),
        ] {
            assert_eq!(index.by_uid(asked).map(|e| &*e.uid), Some(found), "{asked}");
        }
        assert!(index.by_uid("ef-56").is_none());
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn threaded_build_matches_a_scan_of_search_rows() {
        // Enough entities for several build threads; casing varies per entity.
        let tags = ["java", "Java", "JAVA", "go"];
        let entities: Vec<Arc<Entity>> = (0..5000)
            .map(|i| {
                let body = json!({"kind": if i % 3 == 0 { "API" } else { "Component" },
                    "metadata": {"name": format!("n{i}"), "uid": format!("u{i:05}"), "etag": "e",
                                 "tags": [tags[i % 4], tags[(i / 4) % 4]]}});
                Arc::new(Entity::from_json(bytes::Bytes::from(body.to_string())).unwrap())
            })
            .collect();
        let values: Vec<Value> = entities
            .iter()
            .map(|e| serde_json::from_slice(&e.body()).unwrap())
            .collect();
        let index = Index::build(3, entities, &IndexLimits::default());
        let p = index.key("metadata.tags").unwrap();
        let java = p.values.get("java").unwrap().to_bitmap();
        let want: Vec<u32> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| has(&rows((*v).clone()), "metadata.tags", Some("java")))
            .map(|(i, _)| i as u32)
            .collect();
        assert_eq!(java.iter().collect::<Vec<_>>(), want);
        // Facets: one count per entity and lower-cased value, under the
        // spelling the entity used first.
        let mut counts = std::collections::BTreeMap::new();
        for v in &values {
            for r in search_rows(v) {
                if r.key == "metadata.tags" {
                    *counts.entry(r.original.unwrap()).or_insert(0u64) += 1;
                }
            }
        }
        let mut got = index
            .facet_counts("metadata.tags", None, &Budget::unlimited())
            .unwrap();
        got.sort();
        assert_eq!(got, counts.into_iter().collect::<Vec<_>>());
        assert_eq!(index.key("kind").unwrap().present.len(), 5000);
    }

    fn components(n: usize) -> Vec<Arc<Entity>> {
        (0..n)
            .map(|i| {
                let body = json!({"kind": if i % 2 == 0 { "Component" } else { "API" },
                    "metadata": {"name": format!("n{i}"), "uid": format!("u{i:05}"), "etag": "e"}});
                Arc::new(Entity::from_json(bytes::Bytes::from(body.to_string())).unwrap())
            })
            .collect()
    }

    /// Everything a key's postings say, in a comparable form.
    fn describe(inverted: &Inverted) -> Vec<String> {
        let docs = |d: &DocSet| {
            let kind = match d {
                DocSet::One(_) => "one",
                DocSet::OneCased(_) => "one-cased",
                DocSet::Many(_) => "many",
            };
            format!("{kind}{:?}", d.to_bitmap().iter().collect::<Vec<_>>())
        };
        let mut out = Vec::new();
        for (key, p) in inverted.keys.iter() {
            out.push(format!(
                "{key} present={:?} non_ascii={}",
                p.present.iter().collect::<Vec<_>>(),
                p.non_ascii
            ));
            for (value, d) in p.values.iter() {
                out.push(format!("{key}={value}: {}", docs(d)));
            }
            let mut cased: Vec<String> = p
                .cased
                .iter()
                .flat_map(|(low, variants)| {
                    variants
                        .iter()
                        .map(move |(o, d)| format!("{key}={low} as {o}: {}", docs(d)))
                })
                .collect();
            cased.sort();
            out.extend(cased);
        }
        out
    }

    fn mixed(n: usize) -> Vec<Arc<Entity>> {
        (0..n)
            .map(|i| {
                let name = if i % 3 == 0 { format!("Svc-{}", i / 3) } else { format!("svc-{i}") };
                let body = json!({"kind": "Component",
                    "metadata": {"name": name, "uid": format!("u{i:05}"), "etag": "e",
                        "tags": [if i % 4 == 0 { "Java" } else { "java" }, format!("t{}", i % 5)],
                        "title": if i % 7 == 0 { "Straße".to_string() } else { format!("T{}", i % 11) }},
                    "spec": {"owner": format!("team-{}", i % 6), "lifecycle": if i % 2 == 0 { "Production" } else { "production" }}});
                Arc::new(Entity::from_json(bytes::Bytes::from(body.to_string())).unwrap())
            })
            .collect()
    }

    #[test]
    fn runs_merge_into_the_postings_of_one_run() {
        let entities = mixed(200);
        let never = AtomicBool::new(false);
        let whole = build_inverted_in_runs(&entities, &never, usize::MAX).unwrap();
        for run in [1, 7, 64] {
            let in_runs = build_inverted_in_runs(&entities, &never, run).unwrap();
            assert_eq!(describe(&whole), describe(&in_runs), "runs of {run}");
            assert_eq!(whole.ref_ranks, in_runs.ref_ranks);
            assert_eq!(whole.relation_keys, in_runs.relation_keys);
        }
    }

    #[test]
    fn sorted_values_find_exactly_and_by_prefix() {
        let values = Values::from_pairs(
            ["b", "ab", "a", "abc", "c", ""]
                .iter()
                .enumerate()
                .map(|(i, v)| (Box::from(*v), DocSet::One(i as u32)))
                .collect(),
        );
        let listed: Vec<&str> = values.iter().map(|(v, _)| v).collect();
        assert_eq!(listed, ["", "a", "ab", "abc", "b", "c"]);
        assert!(matches!(values.get("ab"), Some(DocSet::One(1))));
        assert!(matches!(values.get(""), Some(DocSet::One(5))));
        assert!(values.get("abd").is_none() && values.get("d").is_none());
        let prefixed: Vec<&str> = values.with_prefix("ab").map(|(v, _)| v).collect();
        assert_eq!(prefixed, ["ab", "abc"]);
        assert_eq!(values.with_prefix("").count(), 6);
        assert_eq!(values.with_prefix("x").count(), 0);
    }

    #[test]
    fn large_generations_pack_bodies_and_serve_them_unchanged() {
        let entities = mixed(crate::codec::PACK_MIN_ENTITIES + 10);
        let sent: Vec<bytes::Bytes> = entities.iter().map(|e| e.body()).collect();
        let index = Index::build(1, entities, &IndexLimits::default());
        let held: usize = index.entities().map(|e| e.body_held_bytes()).sum();
        let total: usize = sent.iter().map(|b| b.len()).sum();
        assert!(held * 2 < total, "{held} of {total}");
        let mut by_uid: Vec<&bytes::Bytes> = sent.iter().collect();
        by_uid.sort_by_key(|b| Entity::from_json((*b).clone()).unwrap().uid);
        for (e, b) in index.entities().zip(by_uid) {
            assert_eq!(e.body(), *b);
        }
        let copy = Entity::from_json(index.entity(5).body()).unwrap();
        assert_eq!(index.doc_of(&copy), Some(5));
    }

    /// Every codec the packed bodies of `index` hold, once each.
    fn codecs(index: &Index) -> Vec<Arc<crate::codec::BodyCodec>> {
        let mut out: Vec<Arc<crate::codec::BodyCodec>> = Vec::new();
        for c in index.entities().filter_map(|e| e.codec()) {
            if !out.iter().any(|o| Arc::ptr_eq(o, c)) {
                out.push(c.clone());
            }
        }
        out
    }

    fn edited(e: &Entity) -> Arc<Entity> {
        let mut v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        v["metadata"]["etag"] = json!("edited");
        v["metadata"]["description"] = json!("changed by a sync");
        Arc::new(Entity::from_json(bytes::Bytes::from(v.to_string())).unwrap())
    }

    #[test]
    fn a_generation_holds_one_codec_however_many_came_before() {
        let limits = IndexLimits::default();
        let first = Index::build(1, mixed(crate::codec::PACK_MIN_ENTITIES + 100), &limits);
        let kept = codecs(&first);
        assert_eq!(kept.len(), 1);
        // Ten syncs, each editing a different 20 entities: the unchanged
        // bodies are the previous generation's, the edited ones plain.
        let mut current = first;
        for round in 0..10 {
            let next: Vec<Arc<Entity>> = current
                .entities()
                .enumerate()
                .map(|(i, e)| {
                    if i / 20 == round {
                        edited(e)
                    } else {
                        e.clone()
                    }
                })
                .collect();
            let built = Index::build(round as u64 + 2, next, &limits);
            let held = codecs(&built);
            assert_eq!(held.len(), 1, "round {round}");
            assert!(Arc::ptr_eq(&held[0], &kept[0]), "round {round}: retrained");
            // Unchanged bodies are not copied.
            assert!(Arc::ptr_eq(
                current.entities().last().unwrap(),
                built.entities().last().unwrap()
            ));
            current = built;
        }
        for (i, e) in current.entities().enumerate() {
            let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
            assert_eq!(v["metadata"]["etag"] == "edited", i < 200, "entity {i}");
        }
    }

    #[test]
    fn a_generation_packed_by_no_one_codec_is_repacked_with_a_new_one() {
        let limits = IndexLimits::default();
        let n = crate::codec::PACK_MIN_ENTITIES + 100;
        let a = Index::build(1, mixed(n), &limits);
        let ca = codecs(&a);
        // Half packed by one codec, half by another: neither is kept.
        let other = Index::build(3, mixed(n).iter().map(|e| edited(e)).collect(), &limits);
        let half: Vec<Arc<Entity>> = a
            .entities()
            .take(n / 2)
            .chain(other.entities().skip(n / 2))
            .cloned()
            .collect();
        let sent: Vec<bytes::Bytes> = half.iter().map(|e| e.body()).collect();
        let mixed_gen = Index::build(4, half, &limits);
        let held = codecs(&mixed_gen);
        assert_eq!(held.len(), 1);
        assert!(!Arc::ptr_eq(&held[0], &ca[0]) && !Arc::ptr_eq(&held[0], &codecs(&other)[0]));
        for (e, body) in mixed_gen.entities().zip(&sent) {
            assert_eq!(e.body(), *body);
        }
    }

    static GATE: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

    fn gated_build(entities: &[Arc<Entity>], abandoned: &AtomicBool) -> Option<Inverted> {
        let (open, changed) = &GATE;
        let mut guard = open.lock().unwrap();
        while !*guard {
            guard = changed.wait(guard).unwrap();
        }
        drop(guard);
        build_inverted(entities, abandoned)
    }

    #[test]
    fn lookups_do_not_wait_for_the_query_index_and_queries_do() {
        let index = Arc::new(Index::build_with(
            7,
            components(2000),
            &IndexLimits::default(),
            gated_build,
        ));
        // The gate is shut: the inverted half cannot be built yet.
        assert!(!index.is_query_ready());
        assert_eq!(index.len(), 2000);
        assert_eq!(index.generation(), 7);
        assert_eq!(
            index.by_uid("u00042").map(|e| &*e.entity_ref),
            Some("component:default/n42")
        );
        assert!(index.by_ref("api:default/n43").is_some());
        assert_eq!(index.entities().count(), 2000);
        let before = index.approximate_memory_bytes();
        let querying = {
            let index = index.clone();
            std::thread::spawn(move || index.key("kind").unwrap().values.get("api").unwrap().len())
        };
        {
            let (open, changed) = &GATE;
            *open.lock().unwrap() = true;
            changed.notify_all();
        }
        assert_eq!(querying.join().unwrap(), 1000);
        assert!(index.is_query_ready());
        assert!(index.approximate_memory_bytes() > before);
    }

    static FLAKY_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn fails_once(entities: &[Arc<Entity>], abandoned: &AtomicBool) -> Option<Inverted> {
        if FLAKY_CALLS.fetch_add(1, AtomicOrdering::SeqCst) == 0 {
            panic!("injected index build failure");
        }
        build_inverted(entities, abandoned)
    }

    #[test]
    fn a_query_after_a_failed_background_build_builds_the_index_again() {
        let index = Index::build_with(1, components(1000), &IndexLimits::default(), fails_once);
        let kinds = index.key("kind").unwrap();
        assert_eq!(kinds.values.get("component").unwrap().len(), 500);
        assert_eq!(FLAKY_CALLS.load(AtomicOrdering::SeqCst), 2);
        assert!(index.is_query_ready());
    }

    fn always_fails(_: &[Arc<Entity>], _: &AtomicBool) -> Option<Inverted> {
        panic!("injected index build failure");
    }

    #[test]
    fn a_build_that_always_fails_makes_queries_fail_not_hang() {
        let index = Index::build_with(1, components(1000), &IndexLimits::default(), always_fails);
        for _ in 0..2 {
            let asked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                index.key("kind").is_some()
            }));
            assert!(asked.is_err());
        }
        assert!(!index.is_query_ready());
        assert!(index.by_uid("u00001").is_some());
    }

    #[test]
    fn dropping_an_index_stops_its_background_build() {
        let abandoned = AtomicBool::new(true);
        assert!(build_inverted(&components(600), &abandoned).is_none());
        let abandoned = AtomicBool::new(false);
        assert!(build_inverted(&components(600), &abandoned).is_some());
        // And an index dropped mid-build raises the flag its build polls.
        let index = Index::build_with(
            1,
            components(600),
            &IndexLimits::default(),
            gated_build_never,
        );
        let slot = index.inverted.clone();
        drop(index);
        assert!(slot.abandoned.load(AtomicOrdering::Relaxed));
    }

    fn gated_build_never(_: &[Arc<Entity>], abandoned: &AtomicBool) -> Option<Inverted> {
        while !abandoned.load(AtomicOrdering::Relaxed) {
            std::thread::yield_now();
        }
        None
    }

    fn with_fields(n: usize, fields: usize) -> Vec<Arc<Entity>> {
        (0..n)
            .map(|i| {
                let mut spec = serde_json::Map::new();
                for f in 0..fields {
                    spec.insert(format!("f{f}"), json!(format!("V{:05}", (i * (f + 1)) % n)));
                }
                spec.insert("z".into(), Value::Null);
                let body = json!({"kind": "Component",
                    "metadata": {"name": format!("n{i}"), "uid": format!("u{i:05}"), "etag": "e"},
                    "spec": spec});
                Arc::new(Entity::from_json(bytes::Bytes::from(body.to_string())).unwrap())
            })
            .collect()
    }

    #[test]
    fn the_sort_cache_keeps_its_columns_within_its_byte_bound() {
        let (n, fields) = (1000, 20);
        let budget = Budget::unlimited();
        let roomy = Index::build(1, with_fields(n, fields), &IndexLimits::default());
        let column_bytes = roomy
            .sort_column("spec.f0", &budget)
            .unwrap()
            .unwrap()
            .heap_bytes() as u64;
        assert!(column_bytes >= n as u64 * 4);
        let bound = 3 * column_bytes + column_bytes / 2;
        let index = Index::build(
            1,
            with_fields(n, fields),
            &IndexLimits {
                sort_columns_max_bytes: bound,
            },
        );
        index.wait_query_ready();
        let bodies_and_postings = index.approximate_memory_bytes();
        for round in 0..3 {
            for f in 0..fields {
                let column = index
                    .sort_column(&format!("spec.f{f}"), &budget)
                    .unwrap()
                    .unwrap();
                // Evicted or not, a column is right.
                for doc in [0u32, 1, 499, 999] {
                    let want = format!("v{:05}", (doc as usize * (f + 1)) % n);
                    assert_eq!(column.value(doc), Some(want.as_str()), "round {round} f{f}");
                }
            }
        }
        let (count, weight) = index.sort_cache_settled();
        assert!(weight <= bound, "{weight} > {bound}");
        // Columns differ in size (fields with fewer distinct values are
        // smaller), but not all twenty fit.
        assert!((1..fields as u64).contains(&count), "{count} columns kept");
        assert!(index.approximate_memory_bytes() <= bodies_and_postings + bound as usize);
        // A field no entity has, or only has as null, builds nothing.
        assert!(index.sort_column("spec.nope", &budget).unwrap().is_none());
        assert!(index.sort_column("spec.z", &budget).unwrap().is_none());
        // A column larger than the whole bound serves its query, unkept.
        let tiny = Index::build(
            1,
            with_fields(n, 2),
            &IndexLimits {
                sort_columns_max_bytes: 64,
            },
        );
        assert!(tiny.sort_column("spec.f1", &budget).unwrap().is_some());
        assert_eq!(tiny.sort_cache_settled(), (0, 0));
        // A spent budget stops a build, and nothing is cached.
        let spent = Budget::new(std::time::Duration::ZERO);
        assert!(matches!(
            tiny.sort_column("spec.f0", &spent),
            Err(QueryError::Budget { .. })
        ));
        assert_eq!(tiny.sort_cache_settled(), (0, 0));
    }

    #[test]
    fn a_document_is_the_generations_own_only_with_the_same_body() {
        let entities = with_fields(10, 1);
        let index = Index::build(1, entities.clone(), &IndexLimits::default());
        assert_eq!(index.doc_of(&entities[3]), Some(3));
        let copy = Entity::from_json(entities[3].body()).unwrap();
        assert_eq!(index.doc_of(&copy), Some(3));
        let mut changed: Value = serde_json::from_slice(&entities[3].body()).unwrap();
        changed["spec"]["f0"] = json!("other");
        let changed = Entity::from_json(bytes::Bytes::from(changed.to_string())).unwrap();
        assert_eq!(index.doc_of(&changed), None);
        let stranger = &with_fields(11, 1)[10];
        assert_eq!(index.doc_of(stranger), None);
    }

    #[test]
    fn integral_floats_print_like_javascript() {
        assert_eq!(js_string(&json!(2.0)).unwrap(), "2");
        assert_eq!(js_string(&json!(-3)).unwrap(), "-3");
        assert_eq!(js_string(&json!(0.25)).unwrap(), "0.25");
    }
}
