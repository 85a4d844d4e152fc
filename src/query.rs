//! Answers catalog queries from an `Index` with Backstage's semantics:
//! `GET /entities`, `GET|POST /entities/by-query`, `GET|POST /entity-facets`,
//! and the filter/fields half of `POST /entities/by-refs`. Called by the read
//! path with the raw query string and body; returns JSON bytes (entity bodies
//! spliced in unchanged unless `fields` projects them) or a `QueryError`,
//! which is always Backstage's 400 `InputError`. Never panics on input.
//!
//! Paging is keyset-based (`[sort value, uid]`), so a walk that continues on a
//! newer generation neither skips nor repeats an entity present in both —
//! except an entity whose own sort value changed between the pages, which may
//! be seen twice or not at all (Backstage behaves the same way).
//!
//! Deliberate differences from Backstage's SQL, each where its behaviour is
//! accidental: an empty `$any` matches nothing (knex drops the empty group and
//! matches everything; `@backstage/filter-predicates` says nothing); keys next
//! to `$all`/`$any`/`$not` are refused rather than silently dropped; walks
//! past entities without a sort value continue (SQL `NULL` comparisons end
//! them early) and backward pages are the exact reverse of forward ones; an
//! entity ordered by an array field sorts by its smallest value and appears
//! once; full-text terms are literal substrings (no `%`/`_` wildcards);
//! strings order by bytes of the lower-cased value (Backstage: the database
//! collation). Bounds: query string 64 KiB, body 1 MiB, cursor 64 KiB,
//! predicates nested at most 32 deep.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use roaring::RoaringBitmap;
use serde_json::{Map, Value};

use crate::cursor::{Cursor, Direction, FullTextFilter, OrderField, QueryPredicate};
use crate::entity::Entity;
use crate::filter::{parse_filter_params, EntityFilter};
use crate::index::{Index, SortColumn, NULL_RANK};
use crate::predicate::Predicate;

/// Longest raw query string accepted.
pub const MAX_QUERY_STRING: usize = 64 * 1024;
/// Longest request body accepted (the proxy's own limit is 1 MiB).
pub const MAX_BODY: usize = 1024 * 1024;
/// `by-query` page size when none is given (Backstage's default).
pub const DEFAULT_LIMIT: usize = 200;

/// Which catalog query is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    /// `GET /entities`.
    GetEntities,
    /// `GET /entities/by-query`.
    GetByQuery,
    /// `POST /entities/by-query`.
    PostByQuery,
    /// `GET /entity-facets`.
    GetFacets,
    /// `POST /entity-facets`.
    PostFacets,
}

/// A query as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct QueryRequest<'a> {
    /// Which endpoint.
    pub kind: QueryKind,
    /// Raw, undecoded query string, without `?`.
    pub query_string: &'a str,
    /// Request body (empty for GET).
    pub body: &'a [u8],
}

/// A computed answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// JSON body.
    pub body: Bytes,
    /// `Link` header value (only `GET /entities` with more pages).
    pub link: Option<String>,
}

/// Why a query cannot be answered. Every variant is a client error (400
/// `InputError`); the message is Backstage's wording where it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A bad `filter` parameter.
    #[error("{0}")]
    Filter(String),
    /// A bad predicate (`query`).
    #[error("{0}")]
    Predicate(String),
    /// An unreadable `cursor`.
    #[error("Malformed cursor: {0}")]
    Cursor(String),
    /// A bad parameter (limit, offset, order, fields, facet, after).
    #[error("{0}")]
    Param(String),
    /// A bad request body.
    #[error("{0}")]
    Body(String),
    /// Input larger than the stated bounds.
    #[error("{0}")]
    TooLarge(String),
}

impl QueryError {
    /// Backstage's error name for every query error.
    pub fn name(&self) -> &'static str {
        "InputError"
    }
}

/// Answers one query against one generation. Blocks while the generation's
/// query index is still being built (`Index::is_query_ready`): call it from
/// a blocking context then, never straight on an async worker.
pub fn answer(index: &Index, req: &QueryRequest<'_>) -> Result<Answer, QueryError> {
    let params = Params::parse(req.query_string)?;
    if req.body.len() > MAX_BODY {
        return Err(QueryError::TooLarge(format!(
            "Request body too large, at most {MAX_BODY} bytes"
        )));
    }
    match req.kind {
        QueryKind::GetEntities => get_entities(index, &params, req.query_string),
        QueryKind::GetByQuery => get_by_query(index, &params),
        QueryKind::PostByQuery => post_by_query(index, &params, req.body),
        QueryKind::GetFacets => get_facets(index, &params),
        QueryKind::PostFacets => post_facets(index, &params, req.body),
    }
}

// ---------------------------------------------------------------- params

/// Decoded query-string pairs, in order.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(qs: &str) -> Result<Self, QueryError> {
        if qs.len() > MAX_QUERY_STRING {
            return Err(QueryError::TooLarge(format!(
                "Query string too long, at most {MAX_QUERY_STRING} bytes"
            )));
        }
        Ok(Params(
            qs.split('&')
                .filter(|p| !p.is_empty())
                .map(|pair| match pair.split_once('=') {
                    Some((k, v)) => (form_decode(k), form_decode(v)),
                    None => (form_decode(pair), String::new()),
                })
                .collect(),
        ))
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A parameter that must appear at most once.
    fn one(&self, name: &str) -> Result<Option<String>, QueryError> {
        let mut all = self.all(name);
        match all.len() {
            0 => Ok(None),
            1 => Ok(all.pop()),
            _ => Err(QueryError::Param(format!("Invalid {name}, not a string"))),
        }
    }

    /// An integer parameter (`request/query/<name> must be integer`).
    fn integer(&self, name: &str) -> Result<Option<i64>, QueryError> {
        let Some(raw) = self.one(name)? else {
            return Ok(None);
        };
        parse_integer(&raw)
            .map(Some)
            .ok_or_else(|| QueryError::Param(format!("request/query/{name} must be integer")))
    }
}

fn parse_integer(raw: &str) -> Option<i64> {
    let n: i64 = raw.parse().ok()?;
    // Backstage requires the canonical spelling (`String(parseInt(x)) === x`).
    (n.to_string() == raw).then_some(n)
}

fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// `application/x-www-form-urlencoded` as `URLSearchParams` writes it.
fn form_encode(s: &str, out: &mut String) {
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
}

/// `fields` values: comma-separated, trimmed, `[` refused.
fn parse_fields(raw: &[String]) -> Result<Option<Vec<String>>, QueryError> {
    let fields: Vec<String> = raw
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if fields.is_empty() {
        return Ok(None);
    }
    if fields.iter().any(|f| f.contains('[')) {
        return Err(QueryError::Param(
            "invalid fields, array type fields are not supported".into(),
        ));
    }
    Ok(Some(fields))
}

// ---------------------------------------------------------------- GET /entities

fn get_entities(index: &Index, params: &Params, raw_qs: &str) -> Result<Answer, QueryError> {
    // Backstage's OpenAPI validator checks `limit` and `offset` (integers,
    // `minimum: 0`) before the handler sees the request;
    // `parseEntityPaginationParams` then refuses a zero limit.
    let mut offset = params.integer("offset")?;
    let mut limit = params.integer("limit")?;
    for (name, value) in [("offset", offset), ("limit", limit)] {
        if value.is_some_and(|v| v < 0) {
            return Err(QueryError::Param(format!(
                "request/query/{name} must be >= 0"
            )));
        }
    }
    let after = params.one("after")?;
    if after.as_deref() == Some("") {
        return Err(too_short("after"));
    }
    let filter = parse_filter_params(&params.all("filter"))?;
    let fields = parse_fields(&params.all("fields"))?;
    let order = params
        .all("order")
        .into_iter()
        .map(|item| {
            let parsed = item
                .split_once(':')
                .and_then(|(d, f)| Some((Direction::parse(d)?, f)))
                .filter(|(_, f)| !f.is_empty());
            match parsed {
                Some((order, field)) => Ok(OrderField {
                    field: field.to_string(),
                    order,
                }),
                None => Err(QueryError::Param(format!(
                    "Invalid order parameter \"{item}\", expected \"<asc or desc>:<field name>\""
                ))),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if limit == Some(0) {
        return Err(QueryError::Param(
            "Invalid limit, must be greater than zero".into(),
        ));
    }
    if let Some(after) = after {
        let (l, o) = parse_after(&after)?;
        limit = l.or(limit);
        offset = o.or(offset);
    }

    let matched = match &filter {
        Some(f) => f.eval(index),
        None => index.all().clone(),
    };
    let mut docs: Vec<u32> = matched.iter().collect();
    if order.is_empty() {
        docs.sort_unstable_by_key(|&d| index.ref_rank(d));
    } else {
        let cols: Vec<(Arc<SortColumn>, Direction)> = order
            .iter()
            .map(|o| (index.sort_column(&o.field), o.order))
            .collect();
        docs.sort_by(|&a, &b| {
            for (col, dir) in &cols {
                let c = nulls_last(col.ranks[a as usize], col.ranks[b as usize], *dir);
                if c != Ordering::Equal {
                    return c;
                }
            }
            a.cmp(&b)
        });
    }
    let start = (offset.unwrap_or(0) as usize).min(docs.len());
    let mut page = &docs[start..];
    let mut link = None;
    if let Some(limit) = limit {
        let limit = limit as usize;
        if page.len() > limit {
            page = &page[..limit];
            let after = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!(
                    "{{\"limit\":{limit},\"offset\":{}}}",
                    offset.unwrap_or(0) as usize + limit
                ),
            );
            link = Some(next_link(raw_qs, &after));
        }
    }
    let mut out = Vec::with_capacity(page.len() * 1024 + 2);
    write_items(index, page, fields.as_deref(), &mut out);
    Ok(Answer {
        body: Bytes::from(out),
        link,
    })
}

fn nulls_last(a: u32, b: u32, dir: Direction) -> Ordering {
    match (a == NULL_RANK, b == NULL_RANK) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => match dir {
            Direction::Asc => a.cmp(&b),
            Direction::Desc => b.cmp(&a),
        },
    }
}

fn parse_after(after: &str) -> Result<(Option<i64>, Option<i64>), QueryError> {
    let unparsable = || QueryError::Param("Malformed after cursor, could not be parsed".into());
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, after.trim())
        .map_err(|_| unparsable())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| unparsable())?;
    let field = |name: &str, msg: &str| -> Result<Option<i64>, QueryError> {
        match v.get(name) {
            None => Ok(None),
            Some(n) => n
                .as_i64()
                .filter(|n| *n >= 0)
                .map(Some)
                .ok_or_else(|| QueryError::Param(msg.into())),
        }
    };
    Ok((
        field("limit", "Malformed after cursor, limit was not an number")?,
        field("offset", "Malformed after cursor, offset was not a number")?,
    ))
}

/// Backstage's `Link`: the request URL without `offset`, with `after` set.
fn next_link(raw_qs: &str, after: &str) -> String {
    let mut pairs: Vec<(String, String)> = Params::parse(raw_qs)
        .map(|p| p.0)
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != "offset")
        .collect();
    match pairs.iter().position(|(k, _)| k == "after") {
        Some(i) => {
            pairs[i].1 = after.to_string();
            let mut seen = false;
            pairs.retain(|(k, _)| {
                if k != "after" {
                    return true;
                }
                let keep = !seen;
                seen = true;
                keep
            });
        }
        None => pairs.push(("after".into(), after.to_string())),
    }
    let mut qs = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            qs.push('&');
        }
        form_encode(k, &mut qs);
        qs.push('=');
        form_encode(v, &mut qs);
    }
    format!("</entities?{qs}>; rel=\"next\"")
}

// ---------------------------------------------------------------- by-query

/// What a `by-query` request asks besides its cursor state.
struct PageRequest {
    cursor: Cursor,
    /// True when the cursor came from the client (not a first page).
    from_cursor: bool,
    limit: usize,
    offset: usize,
    fields: Option<Vec<String>>,
}

/// The OpenAPI validator's answer to an empty `after` or `cursor` (both
/// `minLength: 1` in Backstage's schema).
fn too_short(name: &str) -> QueryError {
    QueryError::Param(format!(
        "request/query/{name} must NOT have fewer than 1 characters"
    ))
}

fn get_by_query(index: &Index, params: &Params) -> Result<Answer, QueryError> {
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
    run_page(index, req)
}

fn non_negative(v: Option<i64>, what: &str) -> Result<Option<usize>, QueryError> {
    match v {
        Some(n) if n < 0 => Err(QueryError::Param(format!("{what} must be >= 0"))),
        Some(n) => Ok(Some(n as usize)),
        None => Ok(None),
    }
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

fn parse_json_body(body: &[u8]) -> Result<Map<String, Value>, QueryError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(QueryError::Body("Expected body to be a JSON object".into())),
        Err(e) => Err(QueryError::Body(format!("Malformed request body: {e}"))),
    }
}

fn body_integer(body: &Map<String, Value>, name: &str) -> Result<Option<usize>, QueryError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if n >= 0 => Ok(Some(n as usize)),
            Some(_) => Err(QueryError::Body(format!(
                "request/body/{name} must be >= 0"
            ))),
            None => Err(QueryError::Body(format!(
                "request/body/{name} must be integer"
            ))),
        },
    }
}

fn body_strings(body: &Map<String, Value>, name: &str) -> Result<Option<Vec<String>>, QueryError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_string).ok_or_else(|| {
                    QueryError::Body(format!("request/body/{name} must be an array of strings"))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(QueryError::Body(format!(
            "request/body/{name} must be array"
        ))),
    }
}

fn body_query(body: &Map<String, Value>) -> Result<Option<QueryPredicate>, QueryError> {
    match body.get("query") {
        None => Ok(None),
        Some(q) => Ok(Some(QueryPredicate {
            predicate: Predicate::parse(q)?,
            json: q.clone(),
        })),
    }
}

fn post_by_query(index: &Index, params: &Params, body: &[u8]) -> Result<Answer, QueryError> {
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
    run_page(index, req)
}

/// The matched set of a cursor state: filter ∩ query ∩ full text.
fn matched_docs(index: &Index, cursor: &Cursor) -> RoaringBitmap {
    let mut matched = match &cursor.filter {
        Some(f) => f.eval(index),
        None => index.all().clone(),
    };
    if let Some(q) = &cursor.query {
        matched &= q.predicate.eval(index);
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
                if let Some(p) = index.key(&field.to_lowercase()) {
                    for (value, docs) in &p.values {
                        if value.contains(term.as_str()) {
                            docs.or_into(&mut hits);
                        }
                    }
                }
            }
            matched &= hits;
        }
    }
    matched
}

/// The order of a walk: the first order field (nulls last), then uid.
struct WalkOrder {
    column: Option<Arc<SortColumn>>,
    dir: Direction,
}

impl WalkOrder {
    fn new(index: &Index, cursor: &Cursor) -> Self {
        match cursor.order_fields.first() {
            Some(o) => WalkOrder {
                column: Some(index.sort_column(&o.field)),
                dir: o.order,
            },
            None => WalkOrder {
                column: None,
                dir: Direction::Asc,
            },
        }
    }

    /// A key whose ascending order is the walk's forward order.
    fn key(&self, doc: u32) -> u64 {
        let Some(col) = &self.column else {
            return doc as u64;
        };
        let rank = col.ranks[doc as usize];
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
        match &self.column {
            Some(col) => vec![col.value(doc).map(str::to_string), uid],
            None => vec![uid],
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
        let (Some(col), 2) = (&self.column, position.len()) else {
            return uid_cmp();
        };
        let value_cmp = match (col.value(doc), position[0].as_deref()) {
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

fn run_page(index: &Index, req: PageRequest) -> Result<Answer, QueryError> {
    let PageRequest {
        mut cursor,
        from_cursor,
        limit,
        offset,
        fields,
    } = req;
    let matched = matched_docs(index, &cursor);
    let total = cursor.total_items.unwrap_or(matched.len());
    let backwards = cursor.is_previous;
    let order = WalkOrder::new(index, &cursor);
    let position = cursor.order_field_values.clone().filter(|v| !v.is_empty());

    let mut rows: Vec<u32> = Vec::new();
    let mut has_more = false;
    if limit > 0 {
        let mut keyed: Vec<(u64, u32)> = matched
            .iter()
            .filter(|&doc| match &position {
                None => true,
                Some(p) => {
                    let c = order.cmp_to(index, doc, p);
                    if backwards {
                        c == Ordering::Less
                    } else {
                        c == Ordering::Greater
                    }
                }
            })
            .map(|doc| (order.key(doc), doc))
            .collect();
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
    write_items(index, &rows, fields.as_deref(), &mut out);
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
        body: Bytes::from(out),
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

// ---------------------------------------------------------------- facets

fn get_facets(index: &Index, params: &Params) -> Result<Answer, QueryError> {
    let raw = params.all("facet");
    if raw.is_empty() {
        // The OpenAPI schema marks `facet` required; its validator answers
        // before the handler (which words an empty one "Missing facet").
        return Err(QueryError::Param(
            "request/query must have required property 'facet'".into(),
        ));
    }
    let facets: Vec<String> = raw.into_iter().filter(|f| !f.is_empty()).collect();
    if facets.is_empty() {
        return Err(QueryError::Param("Missing facet parameter".into()));
    }
    let filter = parse_filter_params(&params.all("filter"))?;
    let matched = filter.map(|f| f.eval(index));
    Ok(render_facets(index, &facets, matched.as_ref()))
}

fn post_facets(index: &Index, params: &Params, body: &[u8]) -> Result<Answer, QueryError> {
    let body = parse_json_body(body)?;
    let facets: Vec<String> = body_strings(&body, "facets")?
        .ok_or_else(|| {
            QueryError::Body("request/body must have required property 'facets'".into())
        })?
        .into_iter()
        .filter(|f| !f.is_empty())
        .collect();
    if facets.is_empty() {
        return Err(QueryError::Param("Missing facet parameter".into()));
    }
    let mut matched = parse_filter_params(&params.all("filter"))?.map(|f| f.eval(index));
    if let Some(q) = body_query(&body)? {
        let docs = q.predicate.eval(index);
        matched = Some(match matched {
            Some(m) => m & docs,
            None => docs,
        });
    }
    Ok(render_facets(index, &facets, matched.as_ref()))
}

fn render_facets(index: &Index, facets: &[String], matched: Option<&RoaringBitmap>) -> Answer {
    let mut out = Map::new();
    for facet in facets {
        let mut counts = index.facet_counts(&facet.to_lowercase(), matched);
        counts.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let list = counts
            .into_iter()
            .map(|(value, count)| {
                let mut m = Map::new();
                m.insert("value".into(), Value::String(value));
                m.insert("count".into(), Value::from(count));
                Value::Object(m)
            })
            .collect();
        out.insert(facet.clone(), Value::Array(list));
    }
    let mut root = Map::new();
    root.insert("facets".into(), Value::Object(out));
    Answer {
        body: Bytes::from(Value::Object(root).to_string()),
        link: None,
    }
}

// ---------------------------------------------------------------- by-refs

/// A parsed `POST /entities/by-refs` request.
#[derive(Debug, Clone)]
pub struct ByRefsRequest {
    /// The refs asked for, in request order, as sent.
    pub entity_refs: Vec<String>,
    fields: Option<Vec<String>>,
    filter: Option<EntityFilter>,
    query: Option<Predicate>,
}

/// Parses the by-refs body (`entityRefs`, `fields`, `query`) and query string
/// (`filter`, `fields`).
pub fn parse_by_refs(query_string: &str, body: &[u8]) -> Result<ByRefsRequest, QueryError> {
    let params = Params::parse(query_string)?;
    if body.len() > MAX_BODY {
        return Err(QueryError::TooLarge(format!(
            "Request body too large, at most {MAX_BODY} bytes"
        )));
    }
    let malformed = |m: &str| {
        QueryError::Body(format!(
            "Malformed request body (did you remember to specify an application/json content type?), {m}"
        ))
    };
    let body: Value = serde_json::from_slice(body).map_err(|e| malformed(&e.to_string()))?;
    let obj = body
        .as_object()
        .ok_or_else(|| malformed("Expected object"))?;
    // The OpenAPI schema (`entityRefs` required, an array of strings) is
    // checked before Backstage's handler, in the validator's words.
    let entity_refs = match obj.get("entityRefs") {
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.as_str().map(str::to_string).ok_or_else(|| {
                    QueryError::Body(format!("request/body/entityRefs/{i} must be string"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => {
            return Err(QueryError::Body(
                "request/body must have required property 'entityRefs'".into(),
            ))
        }
        Some(_) => {
            return Err(QueryError::Body(
                "request/body/entityRefs must be array".into(),
            ))
        }
    };
    let mut raw_fields = params.all("fields");
    if let Some(f) = body_strings(obj, "fields").map_err(|e| malformed(&e.to_string()))? {
        raw_fields.extend(f);
    }
    let query = match obj.get("query") {
        None | Some(Value::Null) => None,
        Some(q) => Some(Predicate::parse(q)?),
    };
    Ok(ByRefsRequest {
        entity_refs,
        fields: parse_fields(&raw_fields)?,
        filter: parse_filter_params(&params.all("filter"))?,
        query,
    })
}

/// Renders `{"items":[entity|null,…]}` in request order; an entity the
/// request's filter or query rejects becomes `null`. Never waits: each
/// filtered entity is checked against an index of its own, built inline.
pub fn render_by_refs(
    req: &ByRefsRequest,
    found: &[Option<Arc<Entity>>],
) -> Result<Bytes, QueryError> {
    let mut out = Vec::with_capacity(found.len() * 1024 + 16);
    out.extend_from_slice(b"{\"items\":[");
    for (i, entity) in found.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let accepted = entity.as_ref().filter(|e| {
            if req.filter.is_none() && req.query.is_none() {
                return true;
            }
            let one = Index::build(0, vec![Arc::clone(e)]);
            req.filter.as_ref().is_none_or(|f| f.eval(&one).contains(0))
                && req.query.as_ref().is_none_or(|q| q.eval(&one).contains(0))
        });
        match accepted {
            Some(e) => write_entity(&e.body, req.fields.as_deref(), &mut out),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.extend_from_slice(b"]}");
    Ok(Bytes::from(out))
}

// ---------------------------------------------------------------- rendering

fn write_items(index: &Index, docs: &[u32], fields: Option<&[String]>, out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, &doc) in docs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_entity(&index.entity(doc).body, fields, out);
    }
    out.push(b']');
}

fn write_entity(body: &[u8], fields: Option<&[String]>, out: &mut Vec<u8>) {
    match fields {
        None => out.extend_from_slice(body),
        Some(fields) => match serde_json::from_slice::<Value>(body) {
            Ok(v) => {
                let projected = project(&v, fields);
                // Serialising a Value cannot fail.
                let _ = serde_json::to_writer(&mut *out, &projected);
            }
            Err(_) => out.extend_from_slice(b"{}"),
        },
    }
}

/// Keeps the named subtrees, with Backstage's (lodash) path resolution: a
/// field's dotted parts are matched greedily, and parts that match no key are
/// glued on (without the dot) to the next part.
pub(crate) fn project(entity: &Value, fields: &[String]) -> Value {
    let mut output = Value::Object(Map::new());
    for field in fields {
        let mut path: Vec<Cow<'_, str>> = Vec::new();
        let mut current = String::new();
        for part in field.split('.') {
            current.push_str(part);
            if lookup(entity, &path, &current).is_some() {
                path.push(Cow::Owned(std::mem::take(&mut current)));
            }
        }
        if path.is_empty() {
            continue;
        }
        let Some(value) = get_path(entity, &path) else {
            continue;
        };
        set_path(&mut output, &path, value.clone());
    }
    output
}

fn child<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => m.get(key),
        Value::Array(a) => array_index(key).and_then(|i| a.get(i)),
        _ => None,
    }
}

fn array_index(key: &str) -> Option<usize> {
    if key.is_empty() || (key.len() > 1 && key.starts_with('0')) {
        return None;
    }
    key.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| key.parse().ok())
        .flatten()
}

fn get_path<'a>(v: &'a Value, path: &[Cow<'_, str>]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| child(v, k))
}

fn lookup<'a>(v: &'a Value, path: &[Cow<'_, str>], last: &str) -> Option<&'a Value> {
    get_path(v, path).and_then(|v| child(v, last))
}

fn set_path(out: &mut Value, path: &[Cow<'_, str>], value: Value) {
    let mut slot = out;
    for (i, key) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        let fresh = || match path.get(i + 1).and_then(|k| array_index(k)) {
            Some(_) => Value::Array(Vec::new()),
            None => Value::Object(Map::new()),
        };
        let next: &mut Value = match slot {
            Value::Object(m) => {
                if last {
                    m.insert(key.to_string(), value);
                    return;
                }
                let entry = m.entry(key.to_string()).or_insert_with(fresh);
                if !entry.is_object() && !entry.is_array() {
                    *entry = fresh();
                }
                entry
            }
            Value::Array(a) => {
                let Some(idx) = array_index(key).filter(|i| *i < 100_000) else {
                    return;
                };
                if a.len() <= idx {
                    a.resize(idx + 1, Value::Null);
                }
                if last {
                    a[idx] = value;
                    return;
                }
                if !a[idx].is_object() && !a[idx].is_array() {
                    a[idx] = fresh();
                }
                &mut a[idx]
            }
            _ => return,
        };
        slot = next;
    }
}

#[cfg(test)]
mod tests;
