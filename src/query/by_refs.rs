//! The filter/fields half of `POST /entities/by-refs`: `parse_by_refs`
//! reads the body (`entityRefs`, `fields`, `query`) and the query string
//! (`filter`, `fields`); `render_by_refs` renders what the read path found,
//! in request order, `null` where an entity is missing or rejected. Called
//! by the read path, which looks the refs up itself; the filter and query
//! are evaluated once against the generation's index, and nothing waits
//! for an index still being built.

use std::sync::Arc;

use bytes::Bytes;
use roaring::RoaringBitmap;
use serde_json::Value;

use super::body::body_strings;
use super::budget::Budget;
use super::error::QueryError;
use super::fields::parse_fields;
use super::filter::{parse_filter_params, EntityFilter};
use super::limits::MAX_BODY;
use super::params::Params;
use super::predicate::Predicate;
use super::rendering::Rendering;
use crate::entity::Entity;
use crate::index::{Index, IndexLimits};

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
pub fn parse_by_refs(
    query_string: &str,
    body: &[u8],
    budget: &Budget,
) -> Result<ByRefsRequest, QueryError> {
    budget.check()?;
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

/// Renders `{"items":[entity|null,…]}` in request order, as a `Rendering`;
/// an entity the request's filter or query rejects becomes `null`.
///
/// `index` is the current generation's. The filter and query are evaluated
/// once against it, within the documents found (so a `$contains` reads only
/// their bodies), and each found entity that is the generation's own copy
/// is tested by its document id. An entity the generation does not hold as
/// it is (a newer copy revalidated since) is checked against an index of its
/// own. Never waits: while the generation's query index is still being
/// built, every entity is checked on its own.
pub fn render_by_refs(
    req: &ByRefsRequest,
    index: Option<&Index>,
    found: Vec<Option<Arc<Entity>>>,
    budget: &Budget,
) -> Result<Rendering, QueryError> {
    let items = if req.filter.is_none() && req.query.is_none() {
        found
    } else {
        let ready = index.filter(|ix| ix.is_query_ready());
        let docs: Vec<Option<u32>> = found.iter().map(|e| ready?.doc_of(e.as_ref()?)).collect();
        let in_generation: RoaringBitmap = docs.iter().flatten().copied().collect();
        let accepted_docs = match ready {
            Some(ix) if !in_generation.is_empty() => accepted(req, ix, &in_generation, budget)?,
            _ => RoaringBitmap::new(),
        };
        let mut items = Vec::with_capacity(found.len());
        for (i, (entity, doc)) in found.into_iter().zip(docs).enumerate() {
            if i % 64 == 0 {
                budget.check()?;
            }
            let keep = match (&entity, doc) {
                (Some(_), Some(doc)) => accepted_docs.contains(doc),
                (Some(e), None) => accepted_alone(req, e, budget)?,
                (None, _) => false,
            };
            items.push(entity.filter(|_| keep));
        }
        items
    };
    Ok(Rendering::new(
        Bytes::from_static(b"{\"items\":"),
        items,
        req.fields.clone(),
        Bytes::from_static(b"}"),
        *budget,
    ))
}

/// The documents of `within` the request's filter and query accept.
fn accepted(
    req: &ByRefsRequest,
    index: &Index,
    within: &RoaringBitmap,
    budget: &Budget,
) -> Result<RoaringBitmap, QueryError> {
    let mut docs = match &req.filter {
        Some(f) => f.eval(index, budget)? & within,
        None => within.clone(),
    };
    if let Some(q) = &req.query {
        docs = q.eval_in(index, &docs, budget)?;
    }
    Ok(docs)
}

/// Whether the request's filter and query accept an entity the generation
/// does not hold: it is indexed on its own (inline, it is one entity).
fn accepted_alone(
    req: &ByRefsRequest,
    entity: &Arc<Entity>,
    budget: &Budget,
) -> Result<bool, QueryError> {
    let one = Index::build(0, vec![Arc::clone(entity)], &IndexLimits::default());
    Ok(accepted(req, &one, one.all(), budget)?.contains(0))
}
