//! Field projection (`fields`): parsing the list, rendering entities with or
//! without it (`write_entity`, `write_items`), and `project`, Backstage's
//! lodash-style path resolution. Called by `GET /entities`, by-query pages
//! and `Rendering` (by-refs, unpaged lists). Without `fields` an entity's
//! body is spliced in unchanged; with them, a body that does not parse
//! renders as `{}`. Resolving a field is linear in its length: the walk
//! keeps its place, and stops once the key it glues is longer than any key
//! it could still match.

use serde_json::{Map, Value};

use super::budget::Budget;
use super::error::QueryError;
use crate::index::Index;

/// Entities rendered between budget checks (every one when many fields
/// make each projection long).
const RENDER_CHECK_EVERY: usize = 64;

/// Whether to check the budget before rendering the `i`-th entity.
pub(super) fn render_check_due(i: usize, fields: Option<&[String]>) -> bool {
    i % RENDER_CHECK_EVERY == 0 || fields.is_some_and(|f| f.len() > RENDER_CHECK_EVERY)
}

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

/// `[entity,…]` of the documents, in order.
pub(super) fn write_items(
    index: &Index,
    docs: &[u32],
    fields: Option<&[String]>,
    out: &mut Vec<u8>,
    budget: &Budget,
) -> Result<(), QueryError> {
    out.push(b'[');
    for (i, &doc) in docs.iter().enumerate() {
        if render_check_due(i, fields) {
            budget.check()?;
        }
        if i > 0 {
            out.push(b',');
        }
        write_entity(&index.entity(doc).body(), fields, out);
    }
    out.push(b']');
    Ok(())
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
        let (path, value) = resolve(entity, field);
        if path.is_empty() {
            continue;
        }
        set_path(&mut output, &path, value.clone());
    }
    output
}

/// Glued keys up to this length are looked up without asking how long the
/// keys they could match are.
const SHORT_KEY: usize = 64;

/// Longest decimal array index (`usize::MAX` has 20 digits).
const LONGEST_INDEX: usize = 20;

/// Resolves one field: the keys matched and the value they lead to. Walks
/// from where the last match left it (not from the root), and stops once
/// the glued key is longer than any key of the object it is looked up in,
/// since gluing only makes it longer: linear in the field's length.
fn resolve<'a>(entity: &'a Value, field: &str) -> (Vec<String>, &'a Value) {
    let mut path = Vec::new();
    let mut node = entity;
    let mut current = String::new();
    let mut longest: Option<usize> = None;
    for part in field.split('.') {
        current.push_str(part);
        if current.len() > SHORT_KEY
            && current.len() > *longest.get_or_insert_with(|| longest_key(node))
        {
            break;
        }
        if let Some(next) = child(node, &current) {
            path.push(std::mem::take(&mut current));
            node = next;
            longest = None;
        }
    }
    (path, node)
}

/// The longest key `child` could find in `v`, in bytes.
fn longest_key(v: &Value) -> usize {
    match v {
        Value::Object(m) => m.keys().map(String::len).max().unwrap_or(0),
        Value::Array(_) => LONGEST_INDEX,
        _ => 0,
    }
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

fn set_path(out: &mut Value, path: &[String], value: Value) {
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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// The walk as it was: every part re-walked from the root, unmatched
    /// parts glued on without bound (quadratic, but the reference meaning).
    fn project_from_the_root(entity: &Value, fields: &[String]) -> Value {
        fn get_path<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
            path.iter().try_fold(v, |v, k| child(v, k))
        }
        let mut output = Value::Object(Map::new());
        for field in fields {
            let mut path: Vec<String> = Vec::new();
            let mut current = String::new();
            for part in field.split('.') {
                current.push_str(part);
                if get_path(entity, &path)
                    .and_then(|v| child(v, &current))
                    .is_some()
                {
                    path.push(std::mem::take(&mut current));
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

    fn sample() -> Value {
        json!({
            "kind": "Component",
            "metadata": {"name": "a", "annotations": {"backstage.io/owner": "x", "backstage.io": {"owner": "y"}},
                         "tags": ["t0", "t1"], "": {"e": 1}, "0": "zero"},
            "spec": {"list": [{"a": 1}, {"b": [2, 3]}], "n": null, "deep": {"er": {"est": true}}},
            "a": {"b": 1}, "ab": 2, "a.b": 3
        })
    }

    #[test]
    fn projection_keeps_lodash_paths() {
        let e = sample();
        let fields: Vec<String> = [
            "metadata.annotations.backstage.io/owner",
            "metadata.annotations.backstage.io.owner",
            "spec.list.1.b.0",
            "spec.list.01",
            "metadata.tags.1",
            "metadata..e",
            "a.b",
            "spec.nope.deep",
            "kind.x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let got = project(&e, &fields);
        assert_eq!(got, project_from_the_root(&e, &fields));
        assert_eq!(got["metadata"]["annotations"]["backstage.io/owner"], "x");
        assert_eq!(got["spec"]["list"][1]["b"][0], 2);
    }

    #[test]
    fn a_long_path_stops_once_no_key_is_that_long() {
        let e = sample();
        let long = vec!["a"; 200_000].join(".");
        let started = std::time::Instant::now();
        let got = project(
            &e,
            &[
                long.clone(),
                format!("spec.{long}"),
                format!("metadata.tags.{long}"),
            ],
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // `a` matches, then `a` is not a key of `{"b": 1}`: the rest is glued.
        assert_eq!(got["a"], json!({"b": 1}));
        assert_eq!(got["spec"], e["spec"]);
        assert_eq!(got["metadata"]["tags"], e["metadata"]["tags"]);
        // Empty parts glue nothing and are as cheap.
        let dots = ".".repeat(200_000);
        let got = project(&e, &[format!("metadata{dots}")]);
        assert_eq!(
            got,
            project_from_the_root(&e, &[format!("metadata{}", ".".repeat(50))])
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

        #[test]
        fn projection_agrees_with_the_walk_from_the_root(
            fields in prop::collection::vec(
                prop::collection::vec(
                    prop::sample::select(vec!["a", "b", "ab", "metadata", "annotations", "backstage", "io",
                        "io/owner", "owner", "spec", "list", "0", "1", "01", "", "tags", "deep", "er", "est",
                        "n", "kind", "x"]),
                    1..8,
                ).prop_map(|parts| parts.join(".")),
                1..5,
            ),
        ) {
            let e = sample();
            prop_assert_eq!(
                serde_json::to_string(&project(&e, &fields)).unwrap(),
                serde_json::to_string(&project_from_the_root(&e, &fields)).unwrap()
            );
        }
    }
}
