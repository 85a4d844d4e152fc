//! The filter/fields half of `POST /entities/by-refs`: `parse_by_refs`
//! reads the body (`entityRefs`, `fields`, `query`) and the query string
//! (`filter`, `fields`); `render_by_refs` writes what the read path found, in
//! request order, `null` where an entity is missing or rejected. Called by
//! the read path, which looks the refs up itself; rendering never waits.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::body::body_strings;
use super::error::QueryError;
use super::fields::{parse_fields, write_entity};
use super::filter::{parse_filter_params, EntityFilter};
use super::limits::MAX_BODY;
use super::params::Params;
use super::predicate::Predicate;
use crate::entity::Entity;
use crate::index::Index;

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
