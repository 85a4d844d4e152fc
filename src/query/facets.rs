//! Facet counts (`GET|POST /entity-facets`): for each facet asked, the
//! values of that search key among the matched entities and how many carry
//! each, sorted by value. Called by the dispatcher. The matched set is the
//! `filter` parameters intersected with the body's `query`; with neither, it
//! is every entity.

use bytes::Bytes;
use roaring::RoaringBitmap;
use serde_json::{Map, Value};

use super::body::{body_query, body_strings, parse_json_body};
use super::budget::Budget;
use super::error::QueryError;
use super::filter::parse_filter_params;
use super::params::Params;
use super::response::{Answer, Body};
use crate::index::Index;

pub(super) fn get_facets(
    index: &Index,
    params: &Params,
    budget: &Budget,
) -> Result<Answer, QueryError> {
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
    let matched = filter.map(|f| f.eval(index, budget)).transpose()?;
    render_facets(index, &facets, matched.as_ref(), budget)
}

pub(super) fn post_facets(
    index: &Index,
    params: &Params,
    body: &[u8],
    budget: &Budget,
) -> Result<Answer, QueryError> {
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
    let mut matched = parse_filter_params(&params.all("filter"))?
        .map(|f| f.eval(index, budget))
        .transpose()?;
    if let Some(q) = body_query(&body)? {
        let within = matched.take().unwrap_or_else(|| index.all().clone());
        matched = Some(q.predicate.eval_in(index, &within, budget)?);
    }
    render_facets(index, &facets, matched.as_ref(), budget)
}

fn render_facets(
    index: &Index,
    facets: &[String],
    matched: Option<&RoaringBitmap>,
    budget: &Budget,
) -> Result<Answer, QueryError> {
    let mut out = Map::new();
    for facet in facets {
        budget.check()?;
        let counts = index.facet_counts(&facet.to_lowercase(), matched, budget)?;
        let mut sorted: Vec<(&str, u64)> = counts.iter().map(|(v, n)| (v.as_str(), *n)).collect();
        budget.sort_by(&mut sorted, |a, b| a.0.cmp(b.0))?;
        let list = sorted
            .into_iter()
            .map(|(value, count)| {
                let mut m = Map::new();
                m.insert("value".into(), Value::String(value.to_string()));
                m.insert("count".into(), Value::from(count));
                Value::Object(m)
            })
            .collect();
        out.insert(facet.clone(), Value::Array(list));
    }
    let mut root = Map::new();
    root.insert("facets".into(), Value::Object(out));
    Ok(Answer {
        body: Body::Full(Bytes::from(Value::Object(root).to_string())),
        link: None,
    })
}
