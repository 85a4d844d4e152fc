//! Field projection (`fields`): parsing the list, rendering entities with or
//! without it (`write_entity`, `write_items`), and `project`, Backstage's
//! lodash-style path resolution. Called by `GET /entities`, by-query pages
//! and by-refs. Without `fields` an entity's body is spliced in unchanged;
//! with them, a body that does not parse renders as `{}`.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::error::QueryError;
use crate::index::Index;

/// `fields` values: comma-separated, trimmed, `[` refused.
pub(super) fn parse_fields(raw: &[String]) -> Result<Option<Vec<String>>, QueryError> {
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

pub(super) fn write_items(
    index: &Index,
    docs: &[u32],
    fields: Option<&[String]>,
    out: &mut Vec<u8>,
) {
    out.push(b'[');
    for (i, &doc) in docs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_entity(&index.entity(doc).body, fields, out);
    }
    out.push(b']');
}

pub(super) fn write_entity(body: &[u8], fields: Option<&[String]>, out: &mut Vec<u8>) {
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
