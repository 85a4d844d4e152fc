//! By-query pages (`GET|POST /entities/by-query`): the request (query
//! string, JSON body or cursor) read into a `PageRequest`, the matched set,
//! and the keyset walk that cuts one page and issues the next/prev cursors.
//! Called by the dispatcher. Positions are `[sort value, uid]` keysets, so a
//! walk continues on a newer generation; backward pages are the exact
//! reverse of forward ones.

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use roaring::RoaringBitmap;
use serde_json::Value;

use super::body::{body_integer, body_query, body_strings, parse_json_body};
use super::budget::Budget;
use super::cursor::{Cursor, Direction, FullTextFilter, OrderField};
use super::error::QueryError;
use super::fields::{parse_fields, write_items};
use super::filter::parse_filter_params;
use super::limits::DEFAULT_LIMIT;
use super::params::{non_negative, too_short, Params};
use super::response::{Answer, Body};
use crate::index::{Index, SortColumn, NULL_RANK};

/// What a `by-query` request asks besides its cursor state.
struct PageRequest {
    cursor: Cursor,
    /// True when the cursor came from the client (not a first page).
    from_cursor: bool,
    limit: usize,
    offset: usize,
    fields: Option<Vec<String>>,
}

pub(super) fn get_by_query(
    index: &Index,
    params: &Params,
    budget: &Budget,
) -> Result<Answer, QueryError> {
    let fields = parse_fields(&params.all("fields"))?;
    let limit = non_negative(params.integer("limit")?, "request/query/limit")?;
    let offset = non_negative(params.integer("offset")?, "request/query/offset")?;
    let cursor = params.one("cursor")?;
    if cursor.as_deref() == Some("") {
        return Err(too_short("cursor"));
    }
    let req = if let Some(raw) = cursor {
        PageRequest {
            cursor: Cursor::decode(&raw)?,
            from_cursor: true,
            limit: limit.unwrap_or(DEFAULT_LIMIT),
            offset: 0,
            fields,
        }
    } else {
        let filter = parse_filter_params(&params.all("filter"))?;
        let order_fields = params
            .all("orderField")
            .iter()
            .map(|s| parse_order_field(s))
            .collect::<Result<Vec<_>, _>>()?;
        let term = params.one("fullTextFilterTerm")?.unwrap_or_default();
        let ft_fields = params
            .one("fullTextFilterFields")?
            .filter(|f| !f.is_empty())
            .map(|f| f.split(',').map(str::to_string).collect());
        PageRequest {
            cursor: Cursor::initial(
                order_fields,
                filter,
                None,
                Some(FullTextFilter {
                    term,
                    fields: ft_fields,
                }),
            ),
            from_cursor: false,
            limit: limit.unwrap_or(DEFAULT_LIMIT),
            offset: offset.unwrap_or(0),
            fields,
        }
    };
    run_page(index, req, budget)
}

/// `field[,asc|desc]`; the direction defaults to ascending.
fn parse_order_field(s: &str) -> Result<OrderField, QueryError> {
    let mut parts = s.split(',');
    let field = parts.next().unwrap_or_default().to_string();
    let order = match parts.next() {
        None => Direction::Asc,
        Some(d) => Direction::parse(d).ok_or_else(|| {
            QueryError::Param("Invalid order field order, must be asc or desc".into())
        })?,
    };
    Ok(OrderField { field, order })
}

pub(super) fn post_by_query(
    index: &Index,
    params: &Params,
    body: &[u8],
    budget: &Budget,
) -> Result<Answer, QueryError> {
    let body = parse_json_body(body)?;
    let fields = match body_strings(&body, "fields")? {
        Some(f) => parse_fields(&f)?,
        None => parse_fields(&params.all("fields"))?,
    };
    let limit = body_integer(&body, "limit")?.unwrap_or(DEFAULT_LIMIT);
    let offset = body_integer(&body, "offset")?.unwrap_or(0);
    let req = match body.get("cursor") {
        Some(Value::String(c)) if c.is_empty() => {
            return Err(QueryError::Body("Cursor cannot be empty".into()))
        }
        Some(Value::String(c)) => PageRequest {
            cursor: Cursor::decode(c)?,
            from_cursor: true,
            limit,
            offset: 0,
            fields,
        },
        Some(Value::Null) | None => {
            let query = body_query(&body)?;
            let mut order_fields = Vec::new();
            match body.get("orderBy") {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => {
                    for item in items {
                        let field = item.get("field").and_then(Value::as_str);
                        let order = match item.get("order") {
                            None | Some(Value::Null) => Some(Direction::Asc),
                            Some(v) => v.as_str().and_then(Direction::parse),
                        };
                        match (field, order) {
                            (Some(field), Some(order)) => order_fields.push(OrderField {
                                field: field.to_string(),
                                order,
                            }),
                            (None, _) => return Err(QueryError::Body(
                                "request/body/orderBy entries must have required property 'field'"
                                    .into(),
                            )),
                            (_, None) => {
                                return Err(QueryError::Param(
                                    "Invalid order field order, must be asc or desc".into(),
                                ))
                            }
                        }
                    }
                }
                Some(_) => {
                    return Err(QueryError::Body(
                        "request/body/orderBy must be array".into(),
                    ))
                }
            }
            if let Some(list) = body_strings(&body, "orderField")? {
                for s in list {
                    order_fields.push(parse_order_field(&s)?);
                }
            }
            let full_text = match body.get("fullTextFilter") {
                None | Some(Value::Null) => None,
                Some(Value::Object(ft)) => Some(FullTextFilter {
                    term: match ft.get("term") {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(_) => {
                            return Err(QueryError::Body(
                                "request/body/fullTextFilter/term must be string".into(),
                            ))
                        }
                    },
                    fields: body_strings(ft, "fields")?,
                }),
                Some(_) => {
                    return Err(QueryError::Body(
                        "request/body/fullTextFilter must be object".into(),
                    ))
                }
            };
            PageRequest {
                cursor: Cursor::initial(order_fields, None, query, full_text),
                from_cursor: false,
                limit,
                offset,
                fields,
            }
        }
        Some(_) => {
            return Err(QueryError::Body(
                "request/body/cursor must be string".into(),
            ))
        }
    };
    run_page(index, req, budget)
}

/// The matched set of a cursor state: filter ∩ query ∩ full text.
fn matched_docs(
    index: &Index,
    cursor: &Cursor,
    budget: &Budget,
) -> Result<RoaringBitmap, QueryError> {
    let mut matched = match &cursor.filter {
        Some(f) => f.eval(index, budget)?,
        None => index.all().clone(),
    };
    if let Some(q) = &cursor.query {
        matched = q.predicate.eval_in(index, &matched, budget)?;
    }
    if let Some(ft) = &cursor.full_text {
        let term = ft.term.trim().to_lowercase();
        if !term.is_empty() {
            let default_field = cursor
                .order_fields
                .first()
                .map(|o| o.field.clone())
                .filter(|f| !f.is_empty())
                .unwrap_or_else(|| "metadata.uid".into());
            let fields: Vec<String> = ft.fields.clone().unwrap_or_else(|| vec![default_field]);
            let mut hits = RoaringBitmap::new();
            for field in fields {
                budget.check()?;
                if let Some(p) = index.key(&field.to_lowercase()) {
                    for (i, (value, docs)) in p.values.iter().enumerate() {
                        if i % 1024 == 0 {
                            budget.check()?;
                        }
                        if value.contains(term.as_str()) {
                            docs.or_into(&mut hits);
                        }
                    }
                }
            }
            matched &= hits;
        }
    }
    Ok(matched)
}

/// The order of a walk: the first order field (nulls last), then uid.
struct WalkOrder {
    /// Whether an order field is given (else: uid order).
    by_field: bool,
    /// Its column; `None` when no entity has the field (all null).
    column: Option<Arc<SortColumn>>,
    dir: Direction,
}

impl WalkOrder {
    fn new(index: &Index, cursor: &Cursor, budget: &Budget) -> Result<Self, QueryError> {
        Ok(match cursor.order_fields.first() {
            Some(o) => WalkOrder {
                by_field: true,
                column: index.sort_column(&o.field, budget)?,
                dir: o.order,
            },
            None => WalkOrder {
                by_field: false,
                column: None,
                dir: Direction::Asc,
            },
        })
    }

    /// A document's sort value (`None`: null).
    fn value(&self, doc: u32) -> Option<&str> {
        self.column.as_ref().and_then(|c| c.value(doc))
    }

    /// A key whose ascending order is the walk's forward order.
    fn key(&self, doc: u32) -> u64 {
        if !self.by_field {
            return doc as u64;
        }
        let rank = self
            .column
            .as_ref()
            .map_or(NULL_RANK, |c| c.ranks[doc as usize]);
        let (null, rank) = if rank == NULL_RANK {
            (1u64, 0)
        } else {
            (0, rank as u64)
        };
        match self.dir {
            Direction::Asc => (null << 63) | (rank << 32) | doc as u64,
            Direction::Desc => {
                (null << 63)
                    | ((0x7FFF_FFFF - rank.min(0x7FFF_FFFF)) << 32)
                    | (u32::MAX - doc) as u64
            }
        }
    }

    /// Keyset values of a document, as cursors carry them.
    fn values_of(&self, index: &Index, doc: u32) -> Vec<Option<String>> {
        let uid = Some(index.entity(doc).uid.to_string());
        if self.by_field {
            vec![self.value(doc).map(str::to_string), uid]
        } else {
            vec![uid]
        }
    }

    /// Where a document sits relative to a keyset position, in forward order.
    fn cmp_to(&self, index: &Index, doc: u32, position: &[Option<String>]) -> Ordering {
        let uid = &*index.entity(doc).uid;
        let pos_uid = position.last().cloned().flatten().unwrap_or_default();
        let uid_cmp = || match self.dir {
            Direction::Asc => uid.cmp(pos_uid.as_str()),
            Direction::Desc => pos_uid.as_str().cmp(uid),
        };
        if !self.by_field || position.len() != 2 {
            return uid_cmp();
        }
        let value_cmp = match (self.value(doc), position[0].as_deref()) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(a), Some(b)) => match self.dir {
                Direction::Asc => a.cmp(b),
                Direction::Desc => b.cmp(a),
            },
        };
        value_cmp.then_with(uid_cmp)
    }
}

fn run_page(index: &Index, req: PageRequest, budget: &Budget) -> Result<Answer, QueryError> {
    let PageRequest {
        mut cursor,
        from_cursor,
        limit,
        offset,
        fields,
    } = req;
    let matched = matched_docs(index, &cursor, budget)?;
    let total = cursor.total_items.unwrap_or(matched.len());
    let backwards = cursor.is_previous;
    let order = WalkOrder::new(index, &cursor, budget)?;
    let position = cursor.order_field_values.clone().filter(|v| !v.is_empty());

    let mut rows: Vec<u32> = Vec::new();
    let mut has_more = false;
    if limit > 0 {
        let mut keyed: Vec<(u64, u32)> = Vec::with_capacity(matched.len() as usize);
        for (i, doc) in matched.iter().enumerate() {
            if i % 4096 == 0 {
                budget.check()?;
            }
            let beyond = match &position {
                None => true,
                Some(p) => {
                    let c = order.cmp_to(index, doc, p);
                    if backwards {
                        c == Ordering::Less
                    } else {
                        c == Ordering::Greater
                    }
                }
            };
            if beyond {
                keyed.push((order.key(doc), doc));
            }
        }
        budget.check()?;
        if backwards {
            let take = limit.min(keyed.len());
            let cut = keyed.len() - take;
            if cut > 0 {
                keyed.select_nth_unstable(cut);
            }
            let mut tail = keyed.split_off(cut);
            tail.sort_unstable();
            rows = tail.into_iter().map(|(_, d)| d).collect();
            has_more = true;
        } else {
            let skip = if from_cursor { 0 } else { offset };
            let want = skip
                .saturating_add(limit)
                .saturating_add(1)
                .min(keyed.len());
            if want < keyed.len() {
                keyed.select_nth_unstable(want);
                keyed.truncate(want);
            }
            keyed.sort_unstable();
            let mut page: Vec<u32> = keyed.into_iter().skip(skip).map(|(_, d)| d).collect();
            if page.len() > limit {
                page.truncate(limit);
                has_more = true;
            }
            rows = page;
        }
    }

    let is_initial = cursor.first_sort_field_values.is_none();
    let first_values = rows.first().map(|&d| order.values_of(index, d));
    let last_values = rows.last().map(|&d| order.values_of(index, d));
    let first_sort_field_values = cursor
        .first_sort_field_values
        .clone()
        .or_else(|| first_values.clone());
    cursor.total_items = Some(total);

    let next = match (has_more, &last_values) {
        (true, Some(last)) => {
            let mut c = cursor.clone();
            c.order_field_values = Some(last.clone());
            c.first_sort_field_values = first_sort_field_values.clone();
            c.is_previous = false;
            Some(c.encode())
        }
        _ => None,
    };
    let prev = match &first_values {
        Some(first) if !is_initial && cursor.first_sort_field_values.as_ref() != Some(first) => {
            let mut c = cursor.clone();
            c.order_field_values = Some(first.clone());
            c.is_previous = true;
            Some(c.encode())
        }
        _ => None,
    };

    let mut out = Vec::with_capacity(rows.len() * 1024 + 128);
    out.extend_from_slice(b"{\"items\":");
    write_items(index, &rows, fields.as_deref(), &mut out, budget)?;
    let _ = write!(
        VecWriter(&mut out),
        ",\"totalItems\":{total},\"pageInfo\":{{"
    );
    if let Some(n) = &next {
        let _ = write!(
            VecWriter(&mut out),
            "\"nextCursor\":{}",
            Value::String(n.clone())
        );
    }
    if let Some(p) = &prev {
        if next.is_some() {
            out.push(b',');
        }
        let _ = write!(
            VecWriter(&mut out),
            "\"prevCursor\":{}",
            Value::String(p.clone())
        );
    }
    out.extend_from_slice(b"}}");
    Ok(Answer {
        body: Body::Full(Bytes::from(out)),
        link: None,
    })
}

struct VecWriter<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}
