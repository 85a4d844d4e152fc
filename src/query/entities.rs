//! `GET /entities`: every matching entity, ordered by `order` (nulls last)
//! or by entity ref, cut by `offset`/`limit` or Backstage's base64 `after`
//! token, with a `Link` header to the next page. Called by the dispatcher.
//! Offsets count positions in the generation the page is cut from; keyset
//! walks are by-query's (`page`).

use std::cmp::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::cursor::{Direction, OrderField};
use super::error::QueryError;
use super::fields::{parse_fields, write_items};
use super::filter::parse_filter_params;
use super::params::{form_encode, too_short, Params};
use super::response::Answer;
use crate::index::{Index, SortColumn, NULL_RANK};

pub(super) fn get_entities(
    index: &Index,
    params: &Params,
    raw_qs: &str,
) -> Result<Answer, QueryError> {
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
