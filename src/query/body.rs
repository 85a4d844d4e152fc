//! JSON request bodies of the POST queries: the body as an object (blank
//! means `{}`), and its typed members: non-negative integers, string arrays,
//! and a `query` predicate kept with its JSON for cursors. Called by by-query
//! pages, facets and by-refs. A body of the wrong shape is a
//! `QueryError::Body` in the validator's wording (`request/body/<name> must
//! be ...`); a bad `query` is the predicate parser's own error.

use serde_json::{Map, Value};

use super::cursor::QueryPredicate;
use super::error::QueryError;
use super::predicate::Predicate;

pub(super) fn parse_json_body(body: &[u8]) -> Result<Map<String, Value>, QueryError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(QueryError::Body("Expected body to be a JSON object".into())),
        Err(e) => Err(QueryError::Body(format!("Malformed request body: {e}"))),
    }
}

pub(super) fn body_integer(
    body: &Map<String, Value>,
    name: &str,
) -> Result<Option<usize>, QueryError> {
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

pub(super) fn body_strings(
    body: &Map<String, Value>,
    name: &str,
) -> Result<Option<Vec<String>>, QueryError> {
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

pub(super) fn body_query(body: &Map<String, Value>) -> Result<Option<QueryPredicate>, QueryError> {
    match body.get("query") {
        None => Ok(None),
        Some(q) => Ok(Some(QueryPredicate {
            predicate: Predicate::parse(q)?,
            json: q.clone(),
        })),
    }
}
