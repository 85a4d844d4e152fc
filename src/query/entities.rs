//! `GET /entities`: every matching entity, ordered by `order` (nulls last)
//! or by entity ref, cut by `offset`/`limit` or Backstage's base64 `after`
//! token, with a `Link` header to the next page. Called by the dispatcher.
//! Offsets count positions in the generation the page is cut from; keyset
//! walks are by-query's (`page`). Several order fields sort by refinement:
//! each column only reorders the runs the previous ones left tied, so one
//! column is held at a time and the walk ends once no tie is left.

use std::collections::HashSet;

use bytes::Bytes;
use serde_json::Value;

use super::budget::Budget;
use super::cursor::{Direction, OrderField};
use super::error::QueryError;
use super::fields::{parse_fields, write_items};
use super::filter::parse_filter_params;
use super::params::{form_encode, too_short, Params};
use super::rendering::Rendering;
use super::response::{Answer, Body};
use crate::index::{Index, NULL_RANK};

pub(super) fn get_entities(
    index: &Index,
    params: &Params,
    raw_qs: &str,
    budget: &Budget,
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
        Some(f) => f.eval(index, budget)?,
        None => index.all().clone(),
    };
    let mut docs: Vec<u32> = matched.iter().collect();
    if order.is_empty() {
        budget.sort_by(&mut docs, |&a, &b| {
            index.ref_rank(a).cmp(&index.ref_rank(b))
        })?;
    } else {
        order_docs(index, &mut docs, &order, budget)?;
    }
    let start = (offset.unwrap_or(0) as usize).min(docs.len());
    let mut page = &docs[start..];
    let Some(limit) = limit else {
        // Unpaged: possibly the whole catalog, rendered a chunk at a time.
        let items = page
            .iter()
            .map(|&d| Some(index.entity(d).clone()))
            .collect();
        return Ok(Answer {
            body: Body::Stream(Rendering::new(
                Bytes::new(),
                items,
                fields,
                Bytes::new(),
                *budget,
            )),
            link: None,
        });
    };
    let limit = limit as usize;
    let mut link = None;
    // A zero limit (only an `after` token can carry one; the parameter is
    // refused) cuts an empty page whose next page would be itself: no link.
    if page.len() > limit {
        page = &page[..limit];
        if limit > 0 {
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
    write_items(index, page, fields.as_deref(), &mut out, budget)?;
    Ok(Answer {
        body: Body::Full(Bytes::from(out)),
        link,
    })
}

/// Orders `docs` (ascending document ids) by the order fields, nulls last,
/// then by document id. Each field's column reorders only the runs of
/// documents the fields before it left tied; a field no entity has, or one
/// already used, breaks no tie and builds nothing.
fn order_docs(
    index: &Index,
    docs: &mut [u32],
    order: &[OrderField],
    budget: &Budget,
) -> Result<(), QueryError> {
    let mut ties: Vec<(usize, usize)> = if docs.len() > 1 {
        vec![(0, docs.len())]
    } else {
        Vec::new()
    };
    let mut used = HashSet::new();
    let mut keyed: Vec<u64> = Vec::new();
    for o in order {
        if ties.is_empty() {
            break;
        }
        budget.check()?;
        if !used.insert(o.field.as_str()) {
            continue;
        }
        let Some(column) = index.sort_column(&o.field, budget)? else {
            continue;
        };
        let mut still_tied = Vec::new();
        let mut since_check = 0;
        for &(start, end) in &ties {
            since_check += end - start;
            if since_check >= 4096 {
                budget.check()?;
                since_check = 0;
            }
            let run = &mut docs[start..end];
            keyed.clear();
            keyed.extend(
                run.iter()
                    .map(|&d| (order_key(column.ranks[d as usize], o.order) << 32) | u64::from(d)),
            );
            budget.sort_by(&mut keyed, u64::cmp)?;
            let mut tie_start = 0;
            for i in 0..keyed.len() {
                run[i] = keyed[i] as u32;
                if i + 1 == keyed.len() || keyed[i + 1] >> 32 != keyed[tie_start] >> 32 {
                    if i > tie_start {
                        still_tied.push((start + tie_start, start + i + 1));
                    }
                    tie_start = i + 1;
                }
            }
        }
        ties = still_tied;
    }
    Ok(())
}

/// A rank as a key whose ascending order is the field's order, nulls last.
fn order_key(rank: u32, dir: Direction) -> u64 {
    match (rank, dir) {
        (NULL_RANK, _) => u64::from(u32::MAX),
        (r, Direction::Asc) => u64::from(r),
        (r, Direction::Desc) => u64::from(u32::MAX - 1 - r),
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
