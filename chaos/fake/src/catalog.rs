//! Backstage's read semantics over one snapshot: listing with offset paging,
//! by-query with keyset cursors, facets, by-refs.
//!
//! Called by the HTTP handlers in `fake`; pure functions of (snapshot,
//! request), so the same request on the same snapshot gives the same answer.
//! Sorting puts entities lacking the sort field last and breaks ties by uid;
//! a cursor is base64 JSON in Backstage's shape and carries neither `fields`
//! nor `limit`.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::filter::{Filter, InputError, Predicate, Selector};
use crate::search;
use crate::store::{Item, Snapshot};

/// The field by-query sorts on when none is asked for.
pub(crate) const DEFAULT_ORDER_FIELD: &str = "metadata.uid";
/// by-query's page size when no `limit` is given.
pub(crate) const DEFAULT_QUERY_LIMIT: usize = 200;

/// One sort key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OrderField {
    pub(crate) field: String,
    pub(crate) desc: bool,
}

impl OrderField {
    fn to_json(&self) -> Value {
        json!({"field": self.field, "order": if self.desc { "desc" } else { "asc" }})
    }
}

/// A full-text filter: case-insensitive substring over some fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct FullText {
    pub(crate) term: String,
    pub(crate) fields: Option<Vec<String>>,
}

impl FullText {
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("term".into(), json!(self.term));
        if let Some(f) = &self.fields {
            m.insert("fields".into(), json!(f));
        }
        Value::Object(m)
    }
}

/// A sorted, selected row: its sort key and the entity.
struct Row<'a> {
    key: Option<Cow<'a, str>>,
    item: &'a Arc<Item>,
}

fn cmp_key(a: (Option<&str>, &str), b: (Option<&str>, &str), desc: bool) -> Ordering {
    let dir = |o: Ordering| if desc { o.reverse() } else { o };
    match (a.0, b.0) {
        (None, None) => dir(a.1.cmp(b.1)),
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(x), Some(y)) => dir(x.cmp(y).then_with(|| a.1.cmp(b.1))),
    }
}

/// The selected, sorted rows of a query. The unfiltered catalog in default
/// order is the snapshot itself, so paging it builds no per-entity rows.
enum Rows<'a> {
    Snapshot(&'a [Arc<Item>]),
    Sorted(Vec<Row<'a>>),
}

impl<'a> Rows<'a> {
    fn len(&self) -> usize {
        match self {
            Rows::Snapshot(items) => items.len(),
            Rows::Sorted(rows) => rows.len(),
        }
    }

    fn key(&self, i: usize) -> (Option<&str>, &str) {
        match self {
            Rows::Snapshot(items) => (Some(items[i].uid.as_str()), items[i].uid.as_str()),
            Rows::Sorted(rows) => (rows[i].key.as_deref(), rows[i].item.uid.as_str()),
        }
    }

    fn item(&self, i: usize) -> &'a Arc<Item> {
        match self {
            Rows::Snapshot(items) => &items[i],
            Rows::Sorted(rows) => rows[i].item,
        }
    }

    /// First index for which `pred` is false (rows are sorted so that
    /// `pred` holds for a prefix).
    fn partition_point(&self, pred: impl Fn((Option<&str>, &str)) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(self.key(mid)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// Selects and sorts by one field (Backstage keyset-pages on the first
/// order field only, ties broken by uid).
fn sorted_rows<'a>(
    snapshot: &'a Snapshot,
    selector: &Selector,
    order: &OrderField,
    full_text: Option<&FullText>,
) -> Rows<'a> {
    let by_uid = order.field.eq_ignore_ascii_case(DEFAULT_ORDER_FIELD);
    let term = full_text
        .map(|ft| ft.term.trim().to_lowercase())
        .filter(|t| !t.is_empty());
    if by_uid && !order.desc && term.is_none() && selector.is_all() {
        return Rows::Snapshot(&snapshot.items);
    }
    let text_fields: Vec<String> = full_text
        .and_then(|ft| ft.fields.clone())
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| vec![order.field.clone()]);
    let mut rows: Vec<Row<'a>> = snapshot
        .items
        .iter()
        .filter(|it| selector.is_all() || selector.matches(&it.value))
        .filter(|it| match &term {
            None => true,
            Some(t) => text_fields.iter().any(|f| {
                search::values(&it.value, f)
                    .iter()
                    .any(|v| v.lower.as_ref().is_some_and(|l| l.contains(t.as_str())))
            }),
        })
        .map(|it| Row {
            key: if by_uid {
                Some(Cow::Borrowed(it.uid.as_str()))
            } else {
                search::sort_value(&it.value, &order.field).map(Cow::Owned)
            },
            item: it,
        })
        .collect();
    // The snapshot is already in ascending uid order.
    if !by_uid || order.desc {
        rows.sort_by(|a, b| {
            cmp_key(
                (a.key.as_deref(), &a.item.uid),
                (b.key.as_deref(), &b.item.uid),
                order.desc,
            )
        });
    }
    Rows::Sorted(rows)
}

/// Decoded state of a by-query cursor.
#[derive(Debug, Clone)]
pub(crate) struct Cursor {
    order: OrderField,
    order_fields_json: Value,
    selector: Selector,
    full_text: FullText,
    is_previous: bool,
    values: (Option<String>, String),
    first_values: Option<Value>,
    total_items: usize,
}

fn malformed(detail: impl std::fmt::Display) -> InputError {
    InputError(format!("Malformed cursor: {detail}"))
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(text.trim()).ok())
}

fn sort_values(v: &Value) -> Result<(Option<String>, String), InputError> {
    // Backstage's own cursors for the default order carry just `[uid]`
    // (`sortFieldsFromRow` without a sort field); the uid is the sort key.
    if let Some([Value::String(uid)]) = v.as_array().map(Vec::as_slice) {
        return Ok((Some(uid.clone()), uid.clone()));
    }
    let arr = v
        .as_array()
        .filter(|a| a.len() == 2)
        .ok_or_else(|| malformed("orderFieldValues must be [value, uid] or [uid]"))?;
    let key = match &arr[0] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        _ => return Err(malformed("orderFieldValues must be [value, uid]")),
    };
    let uid = arr[1]
        .as_str()
        .ok_or_else(|| malformed("orderFieldValues must be [value, uid]"))?;
    Ok((key, uid.to_string()))
}

impl Cursor {
    /// Decodes a cursor from its base64 text.
    pub(crate) fn decode(text: &str) -> Result<Cursor, InputError> {
        let bytes = decode_base64(text).ok_or_else(|| malformed("not base64"))?;
        let v: Value = serde_json::from_slice(&bytes).map_err(malformed)?;
        let obj = v
            .as_object()
            .ok_or_else(|| malformed("not a JSON object"))?;
        let order_fields_json = obj.get("orderFields").cloned().unwrap_or(json!([]));
        let order = match order_fields_json.as_array().and_then(|a| a.first()) {
            None => OrderField {
                field: DEFAULT_ORDER_FIELD.into(),
                desc: false,
            },
            Some(f) => OrderField {
                field: f
                    .get("field")
                    .and_then(Value::as_str)
                    .ok_or_else(|| malformed("orderFields[0].field missing"))?
                    .to_string(),
                desc: f.get("order").and_then(Value::as_str) == Some("desc"),
            },
        };
        let selector = match (obj.get("query"), obj.get("filter")) {
            (Some(q), _) if !q.is_null() => Selector::Predicate {
                parsed: Predicate::parse(q)?,
                raw: q.clone(),
            },
            (_, Some(f)) if !f.is_null() => Selector::Filter(Filter::from_json(f)?),
            _ => Selector::All,
        };
        let full_text = match obj.get("fullTextFilter") {
            Some(ft) if ft.is_object() => FullText {
                term: ft
                    .get("term")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                fields: ft.get("fields").and_then(Value::as_array).map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                }),
            },
            _ => FullText::default(),
        };
        let values = sort_values(
            obj.get("orderFieldValues")
                .ok_or_else(|| malformed("orderFieldValues missing"))?,
        )?;
        let total_items = obj
            .get("totalItems")
            .and_then(Value::as_u64)
            .ok_or_else(|| malformed("totalItems missing"))? as usize;
        Ok(Cursor {
            order,
            order_fields_json,
            selector,
            full_text,
            is_previous: obj
                .get("isPrevious")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            values,
            first_values: obj.get("firstSortFieldValues").cloned(),
            total_items,
        })
    }
}

/// A by-query request after parsing, before paging.
#[derive(Debug, Clone)]
pub(crate) enum QueryStart {
    /// First page.
    Initial {
        selector: Selector,
        /// All order fields (kept in the cursor); only the first sorts.
        order: Vec<OrderField>,
        full_text: FullText,
        offset: usize,
    },
    /// A later (or earlier) page.
    Cursor(Box<Cursor>),
}

/// One by-query page.
pub(crate) struct QueryPage {
    pub(crate) items: Vec<Arc<Item>>,
    pub(crate) total_items: usize,
    pub(crate) next_cursor: Option<String>,
    pub(crate) prev_cursor: Option<String>,
    /// 1-based page number by position, for the `fail_page` fault.
    pub(crate) page_number: usize,
}

fn encode(v: &Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(v.to_string())
}

/// Answers a by-query request.
pub(crate) fn query(snapshot: &Snapshot, start: QueryStart, limit: usize) -> QueryPage {
    let (selector, order, order_fields_json, full_text, total, first_values) = match &start {
        QueryStart::Initial {
            selector,
            order,
            full_text,
            ..
        } => {
            let default = [OrderField {
                field: DEFAULT_ORDER_FIELD.into(),
                desc: false,
            }];
            let order = if order.is_empty() {
                &default[..]
            } else {
                &order[..]
            };
            let order_fields_json =
                json!(order.iter().map(OrderField::to_json).collect::<Vec<_>>());
            let order = order[0].clone();
            (
                selector.clone(),
                order,
                order_fields_json,
                full_text.clone(),
                None,
                None,
            )
        }
        QueryStart::Cursor(c) => (
            c.selector.clone(),
            c.order.clone(),
            c.order_fields_json.clone(),
            c.full_text.clone(),
            Some(c.total_items),
            c.first_values.clone(),
        ),
    };
    let rows = sorted_rows(snapshot, &selector, &order, Some(&full_text));
    let total_items = total.unwrap_or(rows.len());
    if limit == 0 {
        return QueryPage {
            items: Vec::new(),
            total_items,
            next_cursor: None,
            prev_cursor: None,
            page_number: 1,
        };
    }
    let position = |k: (Option<&str>, &str), c: &(Option<String>, String)| {
        cmp_key(k, (c.0.as_deref(), &c.1), order.desc)
    };
    let (begin, end) = match &start {
        QueryStart::Initial { offset, .. } => {
            let b = (*offset).min(rows.len());
            (b, (b + limit).min(rows.len()))
        }
        QueryStart::Cursor(c) if c.is_previous => {
            let e = rows.partition_point(|k| position(k, &c.values) == Ordering::Less);
            (e.saturating_sub(limit), e)
        }
        QueryStart::Cursor(c) => {
            let b = rows.partition_point(|k| position(k, &c.values) != Ordering::Greater);
            (b, (b + limit).min(rows.len()))
        }
    };
    let values_of = |i: usize| {
        let (key, uid) = rows.key(i);
        json!([key, uid])
    };
    let first_values = first_values
        .or_else(|| (begin < end).then(|| values_of(begin)))
        .unwrap_or(Value::Null);
    let mut base = Map::new();
    base.insert("orderFields".into(), order_fields_json);
    match &selector {
        Selector::Predicate { raw, .. } => {
            base.insert("query".into(), raw.clone());
        }
        Selector::Filter(f) => {
            base.insert("filter".into(), f.to_json());
        }
        Selector::Both(f, _) => {
            base.insert("filter".into(), f.to_json());
        }
        Selector::All => {}
    }
    base.insert("fullTextFilter".into(), full_text.to_json());
    base.insert("firstSortFieldValues".into(), first_values);
    base.insert("totalItems".into(), json!(total_items));
    let cursor = |previous: bool, i: usize| {
        let mut m = base.clone();
        m.insert("isPrevious".into(), json!(previous));
        m.insert("orderFieldValues".into(), values_of(i));
        encode(&Value::Object(m))
    };
    QueryPage {
        items: (begin..end).map(|i| rows.item(i).clone()).collect(),
        total_items,
        next_cursor: (end < rows.len() && begin < end).then(|| cursor(false, end - 1)),
        // Like Backstage, an initial request (even with an offset) has no
        // previous page.
        prev_cursor: (matches!(start, QueryStart::Cursor(_)) && begin > 0 && begin < end)
            .then(|| cursor(true, begin)),
        page_number: begin / limit + 1,
    }
}

/// `GET /entities` paging.
#[derive(Debug, Clone, Default)]
pub(crate) struct ListRequest {
    pub(crate) selector: Option<Selector>,
    pub(crate) order: Vec<OrderField>,
    pub(crate) offset: usize,
    pub(crate) limit: Option<usize>,
}

/// Answers `GET /entities`: the page and whether more remain.
pub(crate) fn list(snapshot: &Snapshot, req: &ListRequest) -> (Vec<Arc<Item>>, bool) {
    let selector = req.selector.clone().unwrap_or(Selector::All);
    let mut items: Vec<(Vec<Option<String>>, &Arc<Item>)> = snapshot
        .items
        .iter()
        .filter(|it| selector.is_all() || selector.matches(&it.value))
        .map(|it| {
            let keys = req
                .order
                .iter()
                .map(|o| search::sort_value(&it.value, &o.field))
                .collect();
            (keys, it)
        })
        .collect();
    if req.order.is_empty() {
        // Backstage's `entities()` sorts by the lower-cased entity ref when no
        // `order` is given (`orderBy('final_entities.entity_ref', 'asc')`).
        items.sort_by(|a, b| a.1.entity_ref.cmp(&b.1.entity_ref));
    } else {
        items.sort_by(|a, b| {
            for (i, o) in req.order.iter().enumerate() {
                let c = cmp_key((a.0[i].as_deref(), ""), (b.0[i].as_deref(), ""), o.desc);
                if c != Ordering::Equal {
                    return c;
                }
            }
            a.1.uid.cmp(&b.1.uid)
        });
    }
    let start = req.offset.min(items.len());
    let end = match req.limit {
        Some(l) => (start + l).min(items.len()),
        None => items.len(),
    };
    let more = end < items.len();
    (
        items[start..end]
            .iter()
            .map(|(_, it)| (*it).clone())
            .collect(),
        more,
    )
}

/// Answers the facets request: for each facet, `[{value, count}]` with the
/// entity's own casing, counted once per entity, sorted by value.
pub(crate) fn facets(snapshot: &Snapshot, selector: &Selector, facets: &[String]) -> Value {
    let mut out = Map::new();
    for facet in facets {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for it in &snapshot.items {
            if !selector.matches(&it.value) {
                continue;
            }
            let mut seen: Vec<String> = search::values(&it.value, facet)
                .into_iter()
                .filter_map(|v| v.original)
                .collect();
            seen.sort();
            seen.dedup();
            for v in seen {
                *counts.entry(v).or_default() += 1;
            }
        }
        let list: Vec<Value> = counts
            .into_iter()
            .map(|(value, count)| json!({"value": value, "count": count}))
            .collect();
        out.insert(facet.clone(), Value::Array(list));
    }
    json!({ "facets": Value::Object(out) })
}

/// Answers by-refs: one slot per requested ref, matched exactly against the
/// lower-cased stored ref.
pub(crate) fn by_refs(
    snapshot: &Snapshot,
    refs: &[String],
    selector: &Selector,
) -> Vec<Option<Arc<Item>>> {
    refs.iter()
        .map(|r| {
            snapshot
                .by_ref(r)
                .filter(|it| selector.matches(&it.value))
                .cloned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn store() -> Store {
        let es = (0..25)
            .map(|i| {
                let mut e = json!({
                    "apiVersion": "backstage.io/v1alpha1",
                    "kind": if i % 2 == 0 { "Component" } else { "API" },
                    "metadata": {"name": format!("E-{i:02}"), "uid": format!("uid-{:02}", (i * 7) % 25)},
                    "spec": {}
                });
                if i % 5 != 0 {
                    e["spec"]["type"] = json!(format!("t{}", i % 3));
                }
                e
            })
            .collect();
        Store::new(es)
    }

    fn walk(snapshot: &Snapshot, start: QueryStart, limit: usize) -> (Vec<String>, usize) {
        let mut seen = Vec::new();
        let mut page = query(snapshot, start, limit);
        let total = page.total_items;
        loop {
            assert_eq!(page.total_items, total);
            seen.extend(page.items.iter().map(|i| i.uid.clone()));
            match page.next_cursor.take() {
                Some(c) => {
                    page = query(
                        snapshot,
                        QueryStart::Cursor(Box::new(Cursor::decode(&c).unwrap())),
                        limit,
                    )
                }
                None => break,
            }
        }
        (seen, total)
    }

    #[test]
    fn cursor_paging_visits_everything_once_in_order() {
        let s = store().snapshot(false);
        let start = QueryStart::Initial {
            selector: Selector::All,
            order: vec![OrderField {
                field: "spec.type".into(),
                desc: true,
            }],
            full_text: FullText::default(),
            offset: 0,
        };
        let (seen, total) = walk(&s, start, 4);
        assert_eq!(total, 25);
        let mut uniq = seen.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 25);
        // Entities without spec.type come last even when descending.
        let last: Vec<&str> = seen[20..].iter().map(String::as_str).collect();
        for uid in last {
            let it = s.by_uid(uid).unwrap();
            assert!(it.value["spec"]["type"].is_null(), "{uid}");
        }
    }

    #[test]
    fn prev_cursor_returns_the_previous_page() {
        let s = store().snapshot(false);
        let start = QueryStart::Initial {
            selector: Selector::All,
            order: Vec::new(),
            full_text: FullText::default(),
            offset: 0,
        };
        let p1 = query(&s, start, 5);
        assert!(p1.prev_cursor.is_none());
        let c = Cursor::decode(p1.next_cursor.as_ref().unwrap()).unwrap();
        let p2 = query(&s, QueryStart::Cursor(Box::new(c)), 5);
        let back = Cursor::decode(p2.prev_cursor.as_ref().unwrap()).unwrap();
        let p1b = query(&s, QueryStart::Cursor(Box::new(back)), 5);
        let ids = |p: &QueryPage| p.items.iter().map(|i| i.uid.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&p1), ids(&p1b));
        assert_eq!(p2.page_number, 2);
    }

    #[test]
    #[ignore]
    fn measure_query_100k() {
        let t = std::time::Instant::now();
        let es = crate::generate::generate(100_000, 1);
        println!("generate in {:?}", t.elapsed());
        let t = std::time::Instant::now();
        let store = Store::new(es);
        println!("store in {:?}", t.elapsed());
        let s = store.snapshot(false);
        let t = std::time::Instant::now();
        let mut start = QueryStart::Initial {
            selector: Selector::All,
            order: Vec::new(),
            full_text: FullText::default(),
            offset: 0,
        };
        let mut n = 0;
        loop {
            let page = query(&s, start, 500);
            n += page.items.len();
            match page.next_cursor {
                Some(c) => start = QueryStart::Cursor(Box::new(Cursor::decode(&c).unwrap())),
                None => break,
            }
        }
        println!("{n} in {:?}", t.elapsed());
    }

    #[test]
    fn bad_cursors_are_input_errors() {
        assert!(Cursor::decode("%%%")
            .unwrap_err()
            .0
            .starts_with("Malformed cursor: "));
        let not_json = base64::engine::general_purpose::STANDARD.encode("nope");
        assert!(Cursor::decode(&not_json).is_err());
    }
}
