//! What a Backstage catalog "sees" of an entity when it filters, sorts and
//! counts facets: the search values of a dotted key.
//!
//! Backstage flattens each entity into rows of (lower-cased key, lower-cased
//! value). This module computes the same rows for one key on demand with a
//! plain walk over the `serde_json::Value`, so that it shares no code with the
//! sidecar: keys match case-insensitively, may contain dots
//! (`metadata.annotations.backstage.io/managed-by-location`), descend through
//! arrays, arrays of strings also answer `key.<item>` with `true`, and
//! relations answer as `relations.<type>` with their target refs.

use serde_json::{Map, Value};

/// Longest value Backstage indexes; longer values exist but match nothing.
const MAX_VALUE_LENGTH: usize = 200;

/// One search row of an entity for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchValue {
    /// The lower-cased value used to match and sort; `None` for `null` and
    /// values too long to index (the key still exists).
    pub lower: Option<String>,
    /// The value as the entity spells it, used for facets.
    pub original: Option<String>,
}

impl SearchValue {
    fn of(text: String) -> Self {
        let lower = (text.chars().count() <= MAX_VALUE_LENGTH).then(|| text.to_lowercase());
        SearchValue {
            lower,
            original: Some(text),
        }
    }

    fn null() -> Self {
        SearchValue {
            lower: None,
            original: None,
        }
    }
}

/// The search values of `entity` under `key` (any case). Empty when the key
/// does not exist on the entity.
pub fn values(entity: &Value, key: &str) -> Vec<SearchValue> {
    let key = key.to_lowercase();
    let mut out = Vec::new();
    if let Some(relation_type) = key.strip_prefix("relations.") {
        for r in entity
            .get("relations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let same_type = r
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.to_lowercase() == relation_type);
            if let (true, Some(target)) = (same_type, r.get("targetRef").and_then(Value::as_str)) {
                out.push(SearchValue::of(target.to_string()));
            }
        }
        return out;
    }
    if let Value::Object(map) = entity {
        walk_object(map, &key, true, &mut out);
    }
    out
}

/// The value `key` sorts by (lower-cased): for an array, its smallest value,
/// so the entity is listed once. (Backstage's join lists such an entity once
/// per value; the sidecar chose one place on purpose, and the two agree.)
/// Unlike filters and facets, Backstage joins the sort field against the
/// lower-cased search keys as given (`parseEntityOrderParams` and
/// `parseEntityOrderFieldParams` keep its case), so a field spelled with
/// capitals finds no value and sorts as missing.
pub fn sort_value(entity: &Value, key: &str) -> Option<String> {
    if key != key.to_lowercase() {
        return None;
    }
    values(entity, key)
        .into_iter()
        .filter_map(|v| v.lower)
        .min()
}

fn walk_object(map: &Map<String, Value>, rest: &str, top: bool, out: &mut Vec<SearchValue>) {
    for (k, v) in map {
        // Relations are indexed only as `relations.<type>`.
        if top && k == "relations" {
            continue;
        }
        let kl = k.to_lowercase();
        if rest == kl {
            collect_leaf(v, out);
        } else if let Some(tail) = rest
            .strip_prefix(kl.as_str())
            .and_then(|t| t.strip_prefix('.'))
        {
            descend(v, tail, out);
        }
    }
}

fn descend(v: &Value, rest: &str, out: &mut Vec<SearchValue>) {
    match v {
        Value::Object(m) => walk_object(m, rest, false, out),
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Object(m) => walk_object(m, rest, false, out),
                    Value::String(s) if s.to_lowercase() == rest => {
                        out.push(SearchValue::of("true".to_string()))
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn collect_leaf(v: &Value, out: &mut Vec<SearchValue>) {
    match v {
        Value::Null => out.push(SearchValue::null()),
        Value::String(s) => out.push(SearchValue::of(s.clone())),
        Value::Number(n) => out.push(SearchValue::of(n.to_string())),
        Value::Bool(b) => out.push(SearchValue::of(b.to_string())),
        Value::Array(items) => items.iter().for_each(|i| collect_leaf(i, out)),
        Value::Object(_) => {}
    }
}

/// Keeps only the named subtrees of `entity` (`fields=metadata.name,kind`),
/// the way Backstage's `parseEntityTransformParams` does: a field part that
/// does not exist is glued (without a dot, as `getPathArray` does) to the
/// next one, and the value at the longest existing prefix is kept, so
/// `spec.lifecycle` on an entity without a lifecycle keeps its whole `spec`.
/// Matching is exact-case.
pub fn project(entity: &Value, fields: &[String]) -> Value {
    if fields.is_empty() {
        return entity.clone();
    }
    let mut output = Value::Object(Map::new());
    for field in fields {
        let mut path: Vec<String> = Vec::new();
        let mut node = entity;
        let mut pending = String::new();
        for part in field.split('.') {
            pending.push_str(part);
            if let Some(next) = member(node, &pending) {
                node = next;
                path.push(std::mem::take(&mut pending));
            }
        }
        // lodash's `get(entity, [])` is undefined: nothing to keep.
        if !path.is_empty() {
            set_path(&mut output, &path, node.clone());
        }
    }
    output
}

/// A child the way lodash's `has`/`get` find one: an object key, or an
/// array index written in decimal.
fn member<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Object(m) => m.get(key),
        Value::Array(a) => key
            .parse::<usize>()
            .ok()
            .filter(|_| key == "0" || !key.starts_with('0'))
            .and_then(|i| a.get(i)),
        _ => None,
    }
}

fn set_path(target: &mut Value, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        *target = value;
        return;
    };
    let mut node = target;
    for p in parents {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        node = node
            .as_object_mut()
            .expect("just made an object")
            .entry(p.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !node.is_object() {
        *node = Value::Object(Map::new());
    }
    if let Some(m) = node.as_object_mut() {
        m.insert(last.clone(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "kind": "Component",
            "metadata": {
                "name": "Checkout-Service",
                "tags": ["Java", "grpc"],
                "annotations": {"backstage.io/managed-by-location": "url:x"},
                "links": [{"url": "https://a"}, {"url": "https://b"}],
                "empty": null
            },
            "spec": {"dependsOn": ["resource:default/db"]},
            "relations": [{"type": "ownedBy", "targetRef": "group:default/team-a"}]
        })
    }

    fn lowers(e: &Value, key: &str) -> Vec<Option<String>> {
        values(e, key).into_iter().map(|v| v.lower).collect()
    }

    #[test]
    fn keys_are_case_insensitive_and_values_lowered() {
        let e = sample();
        assert_eq!(
            lowers(&e, "METADATA.Name"),
            vec![Some("checkout-service".into())]
        );
        assert_eq!(
            values(&e, "metadata.name")[0].original.as_deref(),
            Some("Checkout-Service")
        );
    }

    #[test]
    fn arrays_dotted_keys_relations_and_nulls() {
        let e = sample();
        assert_eq!(
            lowers(&e, "metadata.tags"),
            vec![Some("java".into()), Some("grpc".into())]
        );
        assert_eq!(lowers(&e, "metadata.tags.java"), vec![Some("true".into())]);
        assert_eq!(lowers(&e, "metadata.links.url").len(), 2);
        assert_eq!(
            lowers(&e, "metadata.annotations.backstage.io/managed-by-location"),
            vec![Some("url:x".into())]
        );
        assert_eq!(
            lowers(&e, "relations.ownedby"),
            vec![Some("group:default/team-a".into())]
        );
        assert!(values(&e, "relations.type").is_empty());
        assert_eq!(lowers(&e, "metadata.empty"), vec![None]);
        assert!(values(&e, "metadata.missing").is_empty());
        assert!(values(&e, "metadata").is_empty());
    }

    #[test]
    fn sort_value_is_the_smallest_and_needs_a_lower_case_field() {
        let e = sample();
        assert_eq!(sort_value(&e, "metadata.tags"), Some("grpc".into()));
        assert_eq!(
            sort_value(&e, "metadata.name"),
            Some("checkout-service".into())
        );
        assert_eq!(sort_value(&e, "Metadata.Name"), None);
    }

    #[test]
    fn project_follows_backstage_get_path_array() {
        let e = sample();
        let fields = vec![
            "kind".to_string(),
            "metadata.name".to_string(),
            "metadata.annotations.backstage.io/managed-by-location".to_string(),
            "spec.nope".to_string(),
        ];
        assert_eq!(
            project(&e, &fields),
            json!({
                "kind": "Component",
                "metadata": {
                    "name": "Checkout-Service",
                    "annotations": {"backstage.io/managed-by-location": "url:x"}
                },
                // Backstage's `getPathArray` keeps the longest existing
                // prefix of a field that does not exist.
                "spec": e["spec"].clone()
            })
        );
        // Parts are glued without a dot, so a dotted annotation key is never
        // found on its own and the whole annotations object is kept.
        let mut two = e.clone();
        two["metadata"]["annotations"]["other.io/x"] = json!("y");
        assert_eq!(
            project(&two, &["metadata.annotations.other.io/x".to_string()]),
            json!({"metadata": {"annotations": two["metadata"]["annotations"].clone()}})
        );
        assert_eq!(project(&e, &["nope.kind".to_string()]), json!({}));
    }
}
