//! Filter predicates (`$all`, `$any`, `$not`, field expressions with
//! `$exists`, `$in`, `$hasPrefix`, `$contains`), the query language of
//! `POST /entities/by-query`, `POST /entity-facets` and the `query` body of
//! `by-refs`. Called by `query`; parsing refuses what Backstage refuses, and
//! evaluation runs over the index's search rows like Backstage's SQL does,
//! except `$contains`, which Backstage evaluates on the entity JSON.
//!
//! Evaluation is scoped (`eval_in`): each node only looks at the documents
//! its parents left (a conjunction's earlier terms, an `$any`'s unmatched
//! rest), and checks the `Budget` at every node and every 256 documents or
//! values, so no predicate runs past its budget by more than a few
//! milliseconds.
//!
//! `$contains` costs one body read per *candidate*, not per document: the
//! search rows first give a necessary condition (`element_candidates`) — a
//! primitive `v` in the array at `p` needs the row `p = v`; an element
//! `{f: v, …}` needs `p.f = v` for each equality or `$in` (any row at `p.f`
//! for `$hasPrefix`); under `relations`, `{type, targetRef}` needs
//! `relations.<type> = targetRef` — and only the candidates' bodies are
//! read, walking the raw text to the array (`json_path`) and parsing its
//! elements one at a time. A value the rows cannot look up (not ASCII, too
//! long, on a path Backstage does not index, or under `$not`/`$exists`)
//! narrows nothing, and the answer is still exactly what reading every body
//! would give: rows lower-case values while `$contains` compares them
//! upper-cased, and the only values that differ between the two (holding
//! `ß ı ſ` or a ligature) are never ASCII, so the candidates of an ASCII
//! `v` include every document with a non-ASCII value under the key.

use roaring::RoaringBitmap;
use serde_json::{Map, Value};

use super::budget::Budget;
use super::error::QueryError;
use super::json_path::{json_at_path, raw_at_path, raw_items};
use crate::index::{
    js_number, js_string, relation_key, row_key_indexed, DocSet, Index, MAX_VALUE_LENGTH,
};

/// Deepest nesting of predicates accepted (a bound on work and stack).
pub const MAX_DEPTH: usize = 32;

/// A JSON scalar a predicate compares with.
#[derive(Debug, Clone, PartialEq)]
pub enum Primitive {
    /// A string.
    Str(String),
    /// A number, kept as JSON.
    Num(serde_json::Number),
    /// A boolean.
    Bool(bool),
}

impl Primitive {
    fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::String(s) => Some(Primitive::Str(s.clone())),
            Value::Number(n) => Some(Primitive::Num(n.clone())),
            Value::Bool(b) => Some(Primitive::Bool(*b)),
            _ => None,
        }
    }

    /// `String(x)` as JavaScript writes it: what the search table compares.
    fn as_js_string(&self) -> String {
        match self {
            Primitive::Str(s) => s.clone(),
            Primitive::Num(n) => js_number(n),
            Primitive::Bool(b) => b.to_string(),
        }
    }
}

/// A parsed predicate.
#[derive(Debug, Clone, PartialEq)]
pub enum Predicate {
    /// Every inner predicate holds (empty: always).
    All(Vec<Predicate>),
    /// Some inner predicate holds (empty: never).
    Any(Vec<Predicate>),
    /// The inner predicate does not hold.
    Not(Box<Predicate>),
    /// Every `(field, condition)` holds (empty: always).
    Fields(Vec<(String, ValuePredicate)>),
    /// A bare value; only meaningful inside `$contains`, where it is
    /// compared with an array element.
    Value(Primitive),
}

/// The condition on one field of a field expression.
#[derive(Debug, Clone, PartialEq)]
pub enum ValuePredicate {
    /// Equal, case-insensitively.
    Eq(Primitive),
    /// The field has (or lacks) any search row.
    Exists(bool),
    /// Equal to one of these.
    In(Vec<Primitive>),
    /// Starts with, case-insensitively.
    HasPrefix(String),
    /// The field is an array with an element the predicate accepts.
    Contains(Box<Predicate>),
}

fn invalid(msg: impl std::fmt::Display) -> QueryError {
    QueryError::Predicate(format!("Invalid query: {msg}"))
}

impl Predicate {
    /// Parses the `query` member of a request body.
    pub fn parse(value: &Value) -> Result<Predicate, QueryError> {
        if !value.is_object() {
            if value.is_array() || Primitive::from_json(value).is_some() {
                return Err(QueryError::Predicate("Query must be an object".into()));
            }
            return Err(invalid("expected an object"));
        }
        let p = parse_predicate(value, 0)?;
        check_no_bare_values(&p)?;
        Ok(p)
    }

    /// The documents of `index` that match, or `QueryError::Budget` once
    /// the budget is spent (checked at every node and every few hundred
    /// documents or values).
    pub fn eval(&self, index: &Index, budget: &Budget) -> Result<RoaringBitmap, QueryError> {
        self.eval_in(index, index.all(), budget)
    }

    /// The documents of `scope` that match (`scope ∩ eval`): evaluation
    /// never looks at a document outside `scope`, so a `$contains` inside a
    /// conjunction reads only the bodies the other conditions left.
    pub fn eval_in(
        &self,
        index: &Index,
        scope: &RoaringBitmap,
        budget: &Budget,
    ) -> Result<RoaringBitmap, QueryError> {
        budget.check()?;
        match self {
            Predicate::All(ps) => {
                let mut out = scope.clone();
                for p in ps {
                    if out.is_empty() {
                        break;
                    }
                    out = p.eval_in(index, &out, budget)?;
                }
                Ok(out)
            }
            Predicate::Any(ps) => {
                let mut out = RoaringBitmap::new();
                // Each branch only looks at what no earlier branch matched.
                let mut rest = scope.clone();
                for p in ps {
                    if rest.is_empty() {
                        break;
                    }
                    let matched = p.eval_in(index, &rest, budget)?;
                    rest -= &matched;
                    out |= matched;
                }
                Ok(out)
            }
            Predicate::Not(p) => Ok(scope - &p.eval_in(index, scope, budget)?),
            Predicate::Fields(fields) => {
                let mut out = scope.clone();
                for (key, cond) in fields {
                    if out.is_empty() {
                        break;
                    }
                    out = eval_field(index, key, cond, &out, budget)?;
                }
                Ok(out)
            }
            // Refused at parse time outside `$contains`.
            Predicate::Value(_) => Ok(RoaringBitmap::new()),
        }
    }
}

/// The documents of `scope` whose field `key` meets `cond`.
fn eval_field(
    index: &Index,
    key: &str,
    cond: &ValuePredicate,
    scope: &RoaringBitmap,
    budget: &Budget,
) -> Result<RoaringBitmap, QueryError> {
    if let ValuePredicate::Contains(inner) = cond {
        return eval_contains(index, key, inner, scope, budget);
    }
    let postings = index.key(&key.to_lowercase());
    let lookup = |v: &str| -> Option<&DocSet> {
        postings.and_then(|p| p.values.get(v.to_lowercase().as_str()))
    };
    let docs = match cond {
        ValuePredicate::Eq(p) => lookup(&p.as_js_string())
            .map(DocSet::to_bitmap)
            .unwrap_or_default(),
        ValuePredicate::Exists(true) => postings.map(|p| p.present.clone()).unwrap_or_default(),
        ValuePredicate::Exists(false) => {
            return Ok(match postings {
                Some(p) => scope - &p.present,
                None => scope.clone(),
            })
        }
        ValuePredicate::In(list) => {
            let mut out = RoaringBitmap::new();
            for (i, p) in list.iter().enumerate() {
                if i % CHECK_EVERY == 0 {
                    budget.check()?;
                }
                if let Some(docs) = lookup(&p.as_js_string()) {
                    docs.or_into(&mut out);
                }
            }
            out
        }
        ValuePredicate::HasPrefix(prefix) => {
            let prefix = prefix.to_lowercase();
            let mut out = RoaringBitmap::new();
            if let Some(p) = postings {
                // Values are in byte order: the prefixed ones are one run.
                for (i, (_, docs)) in p.values.with_prefix(&prefix).enumerate() {
                    if i % CHECK_EVERY == 0 {
                        budget.check()?;
                    }
                    docs.or_into(&mut out);
                }
            }
            out
        }
        ValuePredicate::Contains(_) => unreachable!("handled above"),
    };
    Ok(docs & scope)
}

/// Documents (or values) a loop handles between budget checks.
const CHECK_EVERY: usize = 256;

/// `$contains`: Backstage evaluates it on the entity JSON (search rows
/// cannot say which values sit in the same array element), so bodies are
/// read — but only those of the candidates, the documents whose search rows
/// make a match possible (`element_candidates`), and of each only the
/// objects on the way to the array, then its elements one at a time.
fn eval_contains(
    index: &Index,
    key: &str,
    inner: &Predicate,
    scope: &RoaringBitmap,
    budget: &Budget,
) -> Result<RoaringBitmap, QueryError> {
    // A body that did not parse when the index was built matches nothing,
    // as it did when every body was parsed here.
    let Some(parsed) = index.parsed_docs() else {
        return Ok(RoaringBitmap::new());
    };
    let mut candidates = scope & parsed;
    if let Some(possible) = element_candidates(index, key, inner, budget)? {
        candidates &= possible;
    }
    let mut out = RoaringBitmap::new();
    for (i, doc) in candidates.iter().enumerate() {
        if i % CHECK_EVERY == 0 {
            budget.check()?;
        }
        let body = index.entity(doc).body();
        let Some(items) = raw_at_path(&body, key).and_then(raw_items) else {
            continue;
        };
        let matched = items.into_iter().any(|item| {
            serde_json::from_str::<Value>(item.get()).is_ok_and(|item| matches_json(inner, &item))
        });
        if matched {
            out.push(doc);
        }
    }
    Ok(out)
}

/// A superset of the documents where the array at the raw dotted `path`
/// has an element `inner` accepts, from search rows alone; `None` when rows
/// cannot narrow it. Rows are a necessary condition because an array is
/// flattened into rows at its own path: a primitive element `v` is the row
/// `path = v` (null when too long), an object element's member `f` is a row
/// under `path.f`, and a `relations` element is the row
/// `relations.<type> = targetRef`. So:
///
/// - a primitive `v` needs a row `path = v` (any row at `path` when `v`
///   cannot be looked up, see `maybe_equal`);
/// - a field expression needs, for each equality or `$in`, a row
///   `path.f = v` (or any row at `path.f`); for a `$hasPrefix`, any row at
///   `path.f`; for a nested `$contains`, what its own element needs;
///   `$exists` nothing (an empty array or object has no row);
/// - under `relations`, `{type, targetRef}` needs a row
///   `relations.<type> = targetRef` (any row under `relations.<type>`
///   without a `targetRef`), or any under a relation key that is not ASCII;
/// - `$all` needs what each part needs, `$any` what some part needs,
///   `$not` nothing.
///
/// Paths Backstage does not index (`status`, `metadata.name`, …, over-long
/// keys) have no rows and tell nothing.
fn element_candidates(
    index: &Index,
    path: &str,
    inner: &Predicate,
    budget: &Budget,
) -> Result<Option<RoaringBitmap>, QueryError> {
    budget.check()?;
    Ok(match inner {
        Predicate::Value(prim) => {
            if !row_key_indexed(path) {
                return Ok(None);
            }
            let key = path.to_lowercase();
            Some(maybe_equal(
                index,
                &key,
                std::slice::from_ref(prim),
                budget,
            )?)
        }
        Predicate::Fields(fields) if path == "relations" => {
            relation_candidates(index, fields, budget)?
        }
        Predicate::Fields(fields) => {
            let mut out: Option<RoaringBitmap> = None;
            for (field, cond) in fields {
                let sub = format!("{path}.{field}");
                if !row_key_indexed(&sub) {
                    continue;
                }
                let key = sub.to_lowercase();
                let docs = match cond {
                    ValuePredicate::Eq(prim) => Some(maybe_equal(
                        index,
                        &key,
                        std::slice::from_ref(prim),
                        budget,
                    )?),
                    ValuePredicate::In(list) => Some(maybe_equal(index, &key, list, budget)?),
                    ValuePredicate::HasPrefix(_) => Some(index.present(&key)),
                    ValuePredicate::Contains(inner) => {
                        element_candidates(index, &sub, inner, budget)?
                    }
                    ValuePredicate::Exists(_) => None,
                };
                if let Some(docs) = docs {
                    out = Some(match out {
                        Some(o) => o & docs,
                        None => docs,
                    });
                }
            }
            out
        }
        Predicate::All(ps) => {
            let mut out: Option<RoaringBitmap> = None;
            for p in ps {
                if let Some(docs) = element_candidates(index, path, p, budget)? {
                    out = Some(match out {
                        Some(o) => o & docs,
                        None => docs,
                    });
                }
            }
            out
        }
        Predicate::Any(ps) => {
            let mut out = RoaringBitmap::new();
            for p in ps {
                match element_candidates(index, path, p, budget)? {
                    Some(docs) => out |= docs,
                    None => return Ok(None),
                }
            }
            Some(out)
        }
        Predicate::Not(_) => None,
    })
}

/// Documents that may hold, under a lower-cased key, a primitive equal to
/// one of `values` as `$contains` compares them (upper-cased for strings,
/// as JavaScript prints them for numbers and booleans).
///
/// For an ASCII value `v` these are the documents with the row `lower(v)`
/// plus those with any non-ASCII value of the key: a value that upper-cases
/// to ASCII but does not lower-case to `lower(v)` must hold one of
/// `ß ı ſ ﬀ ﬁ ﬂ ﬃ ﬄ ﬅ ﬆ`, which lower-case to themselves (and are one
/// UTF-16 unit each, so such a value is never too long for a row either).
/// A value that is not ASCII, or too long to have a row, cannot be looked
/// up: then any document with a row at the key (a compared value is a
/// primitive, and a primitive always has a row, null when too long).
fn maybe_equal(
    index: &Index,
    key: &str,
    values: &[Primitive],
    budget: &Budget,
) -> Result<RoaringBitmap, QueryError> {
    let Some(postings) = index.key(key) else {
        return Ok(RoaringBitmap::new());
    };
    let mut out = RoaringBitmap::new();
    for (i, v) in values.iter().enumerate() {
        if i % CHECK_EVERY == 0 {
            budget.check()?;
        }
        let text = v.as_js_string();
        if !text.is_ascii() || text.len() > MAX_VALUE_LENGTH {
            return Ok(postings.present.clone());
        }
        if let Some(docs) = postings.values.get(text.to_ascii_lowercase().as_str()) {
            docs.or_into(&mut out);
        }
    }
    if !values.is_empty() {
        out |= postings.non_ascii_docs(budget)?;
    }
    Ok(out)
}

/// Type/target pairs looked up one by one; past this many, the types alone
/// narrow (looking up every pair would cost their product).
const MAX_RELATION_PAIRS: usize = 4096;

/// `relations` elements: the rows `relations.<type> = targetRef`, written
/// for every element whose `type` is a primitive. Needs the `type` pinned
/// (equality or `$in`); a type that is not ASCII, or too long for a key,
/// tells nothing.
fn relation_candidates(
    index: &Index,
    fields: &[(String, ValuePredicate)],
    budget: &Budget,
) -> Result<Option<RoaringBitmap>, QueryError> {
    let pinned = |name: &str| {
        fields
            .iter()
            .find(|(f, _)| f == name)
            .and_then(|(_, cond)| match cond {
                ValuePredicate::Eq(prim) => Some(std::slice::from_ref(prim)),
                ValuePredicate::In(list) => Some(list.as_slice()),
                _ => None,
            })
    };
    let Some(types) = pinned("type") else {
        return Ok(None);
    };
    let targets = pinned("targetRef")
        .filter(|targets| types.len().saturating_mul(targets.len()) <= MAX_RELATION_PAIRS);
    let mut out = RoaringBitmap::new();
    for (i, ty) in types.iter().enumerate() {
        if i % CHECK_EVERY == 0 {
            budget.check()?;
        }
        let text = ty.as_js_string();
        let Some(key) = relation_key(&text).filter(|_| text.is_ascii()) else {
            return Ok(None);
        };
        out |= match targets {
            Some(targets) => maybe_equal(index, &key, targets, budget)?,
            None => index.present(&key),
        };
    }
    // A type spelled with `ß`, `ſ`, `ı` or a ligature upper-cases like an
    // ASCII one but has a key of its own.
    for key in index.relation_keys().iter().filter(|k| !k.is_ascii()) {
        out |= index.present(key);
    }
    Ok(Some(out))
}

/// Backstage's in-memory `evaluateFilterPredicate` (used for `$contains`).
pub(crate) fn matches_json(p: &Predicate, value: &Value) -> bool {
    match p {
        Predicate::Value(prim) => values_equal(value, prim),
        Predicate::All(ps) => ps.iter().all(|p| matches_json(p, value)),
        Predicate::Any(ps) => ps.iter().any(|p| matches_json(p, value)),
        Predicate::Not(p) => !matches_json(p, value),
        Predicate::Fields(fields) => fields.iter().all(|(k, cond)| {
            let v = json_at_path(value, k);
            match cond {
                ValuePredicate::Eq(prim) => v.is_some_and(|v| values_equal(v, prim)),
                ValuePredicate::Exists(e) => v.is_some() == *e,
                ValuePredicate::In(list) => {
                    v.is_some_and(|v| list.iter().any(|prim| values_equal(v, prim)))
                }
                ValuePredicate::HasPrefix(prefix) => matches!(v, Some(Value::String(s))
                    if s.to_uppercase().starts_with(&prefix.to_uppercase())),
                ValuePredicate::Contains(inner) => matches!(v, Some(Value::Array(items))
                    if items.iter().any(|i| matches_json(inner, i))),
            }
        }),
    }
}

fn values_equal(value: &Value, prim: &Primitive) -> bool {
    match (value, prim) {
        (Value::String(a), Primitive::Str(b)) => a.to_uppercase() == b.to_uppercase(),
        (Value::Bool(a), Primitive::Bool(b)) => a == b,
        (Value::Number(_), _) | (_, Primitive::Num(_)) => {
            js_string(value).is_some_and(|s| s == prim.as_js_string())
        }
        _ => false,
    }
}

fn parse_predicate(value: &Value, depth: usize) -> Result<Predicate, QueryError> {
    if depth > MAX_DEPTH {
        return Err(invalid(format!(
            "predicate nested deeper than {MAX_DEPTH} levels"
        )));
    }
    if let Some(p) = Primitive::from_json(value) {
        return Ok(Predicate::Value(p));
    }
    let obj = match value {
        Value::Object(obj) => obj,
        other => return Err(invalid(format!("expected a predicate, got {other}"))),
    };
    for op in ["$all", "$any", "$not"] {
        if let Some(inner) = obj.get(op) {
            if obj.len() != 1 {
                return Err(QueryError::Predicate(format!(
                    "Operator {op} must be the only key in the predicate, wrap in $all to combine with other conditions"
                )));
            }
            return match op {
                "$not" => Ok(Predicate::Not(Box::new(parse_predicate(inner, depth + 1)?))),
                _ => {
                    let list = inner
                        .as_array()
                        .ok_or_else(|| invalid(format!("{op} must be an array")))?
                        .iter()
                        .map(|p| parse_predicate(p, depth + 1))
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(if op == "$all" {
                        Predicate::All(list)
                    } else {
                        Predicate::Any(list)
                    })
                }
            };
        }
    }
    let mut fields = Vec::with_capacity(obj.len());
    for (key, v) in obj {
        if key.starts_with('$') {
            return Err(invalid(format!("unknown operator '{key}'")));
        }
        fields.push((key.clone(), parse_value(key, v, depth + 1)?));
    }
    Ok(Predicate::Fields(fields))
}

fn parse_value(key: &str, value: &Value, depth: usize) -> Result<ValuePredicate, QueryError> {
    if let Some(p) = Primitive::from_json(value) {
        return Ok(ValuePredicate::Eq(p));
    }
    let bad = || {
        QueryError::Predicate(format!(
            "Invalid filter predicate value for field \"{key}\": expected a primitive value, $exists, $in, $hasPrefix or $contains operator, but got {value}"
        ))
    };
    let obj: &Map<String, Value> = value.as_object().ok_or_else(bad)?;
    if obj.len() != 1 {
        return Err(bad());
    }
    let (op, arg) = obj.iter().next().ok_or_else(bad)?;
    match op.as_str() {
        "$exists" => arg.as_bool().map(ValuePredicate::Exists).ok_or_else(bad),
        "$in" => arg
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|v| Primitive::from_json(v).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()
            .map(ValuePredicate::In),
        "$hasPrefix" => arg
            .as_str()
            .map(|s| ValuePredicate::HasPrefix(s.to_string()))
            .ok_or_else(bad),
        "$contains" => Ok(ValuePredicate::Contains(Box::new(parse_predicate(
            arg,
            depth + 1,
        )?))),
        _ => Err(bad()),
    }
}

/// A bare value is only an element test inside `$contains`; elsewhere
/// Backstage refuses it with this message.
fn check_no_bare_values(p: &Predicate) -> Result<(), QueryError> {
    match p {
        Predicate::Value(prim) => {
            let shown = match prim {
                Primitive::Str(s) => Value::String(s.clone()).to_string(),
                other => other.as_js_string(),
            };
            Err(QueryError::Predicate(format!(
                "Invalid filter predicate: top-level primitive values are not supported. Wrap the value in a field expression, e.g. {{ \"kind\": {shown} }}"
            )))
        }
        Predicate::All(ps) | Predicate::Any(ps) => ps.iter().try_for_each(check_no_bare_values),
        Predicate::Not(p) => check_no_bare_values(p),
        Predicate::Fields(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn structure_errors_use_backstage_wording() {
        let e = Predicate::parse(&json!("x")).unwrap_err();
        assert_eq!(e.to_string(), "Query must be an object");
        let e = Predicate::parse(&json!({"$all": ["x"]})).unwrap_err();
        assert!(e.to_string().starts_with(
            "Invalid filter predicate: top-level primitive values are not supported."
        ));
        let e = Predicate::parse(&json!({"$all": [], "kind": "x"})).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("Operator $all must be the only key"));
        let e = Predicate::parse(&json!({"kind": {"$regex": "x"}})).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("Invalid filter predicate value for field \"kind\""));
        let e = Predicate::parse(&json!({"$or": []})).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("Invalid query: unknown operator '$or'"));
        let e = Predicate::parse(&json!({"kind": null})).unwrap_err();
        assert!(e.to_string().contains("kind"));
        let mut deep = json!({"kind": "x"});
        for _ in 0..40 {
            deep = json!({ "$not": deep });
        }
        assert!(Predicate::parse(&deep).is_err());
    }

    #[test]
    fn contains_evaluates_on_json_like_backstage() {
        let p = Predicate::parse(&json!({"relations": {"$contains": {"type": "OWNEDBY", "targetRef": "group:default/a"}}})).unwrap();
        let Predicate::Fields(f) = &p else { panic!() };
        let ValuePredicate::Contains(inner) = &f[0].1 else {
            panic!()
        };
        let yes = json!({"type": "ownedBy", "targetRef": "group:default/a"});
        let no = json!({"type": "ownedBy", "targetRef": "group:default/b"});
        assert!(matches_json(inner, &yes));
        assert!(!matches_json(inner, &no));
        let tags = Predicate::parse(&json!({"metadata.tags": {"$contains": "Java"}})).unwrap();
        let Predicate::Fields(f) = &tags else {
            panic!()
        };
        let ValuePredicate::Contains(inner) = &f[0].1 else {
            panic!()
        };
        assert!(matches_json(inner, &json!("java")));
    }

    // ---------------------------------------------- `$contains` vs a scan

    use crate::entity::Entity;
    use crate::index::IndexLimits;
    use proptest::prelude::*;
    use std::sync::Arc;

    /// Strings that compare equal upper-cased but not lower-cased (and the
    /// like), long values, numbers, booleans, nulls, nested containers.
    fn arb_scalar() -> impl Strategy<Value = Value> {
        prop::sample::select(vec![
            json!("java"),
            json!("JAVA"),
            json!("Java"),
            json!("ß"),
            json!("ss"),
            json!("SS"),
            json!("ſ"),
            json!("s"),
            json!("ı"),
            json!("i"),
            json!("I"),
            json!("ﬁ"),
            json!("FI"),
            json!("x".repeat(201)),
            json!("X".repeat(201)),
            json!(5),
            json!("5"),
            json!(5.0),
            json!(true),
            json!("true"),
            json!(null),
            json!(["java"]),
            json!({"a": "java"}),
            json!("dependſOn"),
            json!("dependsOn"),
            json!("group:default/ſ"),
            json!("group:default/s"),
        ])
    }

    fn arb_element() -> impl Strategy<Value = Value> {
        prop_oneof![
            arb_scalar(),
            (arb_scalar(), arb_scalar(), arb_scalar())
                .prop_map(|(a, c, d)| json!({"a": a, "b": {"c": c}, "a.b": d})),
            (arb_scalar(), arb_scalar()).prop_map(|(t, r)| json!({"type": t, "targetRef": r})),
            Just(json!({})),
            Just(json!([])),
        ]
    }

    fn arb_entity(i: usize) -> impl Strategy<Value = Value> {
        (
            prop::collection::vec(arb_scalar(), 0..4),
            prop::collection::vec(arb_element(), 0..4),
            prop::collection::vec(arb_element(), 0..4),
            prop::collection::vec(arb_scalar(), 0..3),
            any::<bool>(),
        )
            .prop_map(move |(tags, list, relations, other, dotted)| {
                let mut e = json!({"kind": "Component",
                    "metadata": {"name": format!("n{i}"), "uid": format!("u{i:03}"), "etag": "e", "tags": tags},
                    "spec": {"list": list}, "relations": relations, "status": {"items": other}});
                if dotted {
                    e["a.b"] = json!(["java", {"c": "ß"}]);
                    e["a"] = json!({"b": other});
                }
                e
            })
    }

    fn arb_prim() -> impl Strategy<Value = Value> {
        prop::sample::select(vec![
            json!("java"),
            json!("JAVA"),
            json!("ss"),
            json!("SS"),
            json!("s"),
            json!("I"),
            json!("fi"),
            json!("x".repeat(201)),
            json!(5),
            json!("5"),
            json!(true),
            json!("true"),
            json!("dependsOn"),
            json!("DEPENDSON"),
            json!("group:default/s"),
            json!("ß"),
        ])
    }

    fn arb_inner() -> impl Strategy<Value = Value> {
        let field = prop::sample::select(vec!["a", "b.c", "a.b", "type", "targetRef", "Type", "b"]);
        let cond = prop_oneof![
            arb_prim(),
            prop::collection::vec(arb_prim(), 0..3).prop_map(|v| json!({"$in": v})),
            prop::sample::select(vec!["j", "S", "x", ""]).prop_map(|p| json!({"$hasPrefix": p})),
            any::<bool>().prop_map(|b| json!({"$exists": b})),
            arb_prim().prop_map(|v| json!({"$contains": v})),
        ];
        let leaf = prop_oneof![
            arb_prim(),
            prop::collection::vec((field, cond), 1..3).prop_map(|fs| {
                Value::Object(fs.into_iter().map(|(f, c)| (f.to_string(), c)).collect())
            }),
        ];
        leaf.prop_recursive(2, 6, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(|v| json!({"$all": v})),
                prop::collection::vec(inner.clone(), 0..3).prop_map(|v| json!({"$any": v})),
                inner.prop_map(|v| json!({"$not": v})),
            ]
        })
    }

    fn index_of(es: &[Value]) -> Index {
        let entities: Vec<Arc<Entity>> = es
            .iter()
            .map(|e| Arc::new(Entity::from_json(bytes::Bytes::from(e.to_string())).unwrap()))
            .collect();
        Index::build(1, entities, &IndexLimits::default())
    }

    /// A `{path: {"$contains": …}}` query, parsed, and the documents that
    /// match when every body is parsed and walked as a value.
    fn by_scan(index: &Index, query: &Value) -> (Predicate, RoaringBitmap) {
        let p = Predicate::parse(query).unwrap();
        let Predicate::Fields(f) = &p else { panic!() };
        let (path, ValuePredicate::Contains(element)) = &f[0] else {
            panic!()
        };
        let want = index
            .entities()
            .enumerate()
            .filter(|(_, e)| {
                let v: Value = serde_json::from_slice(&e.body()).unwrap();
                matches!(json_at_path(&v, path), Some(Value::Array(items)) if items.iter().any(|i| matches_json(element, i)))
            })
            .map(|(d, _)| d as u32)
            .collect();
        (p, want)
    }

    #[test]
    fn contains_finds_what_rows_spell_otherwise() {
        let es: Vec<Value> = [
            json!({"metadata": {"tags": ["ß"]}}),
            json!({"metadata": {"tags": ["ſ", "ı"]}}),
            json!({"metadata": {"tags": ["x".repeat(201)]}}),
            json!({"metadata": {"tags": [5, true, null]}}),
            json!({"relations": [{"type": "dependſOn", "targetRef": "group:default/ſ"}]}),
            json!({"relations": [{"type": "dependsOn"}, {"type": 7, "targetRef": 8}]}),
            json!({"a.b": ["java"], "a": {"b": ["go"]}}),
            json!({"status": {"items": ["java"]}, "spec": {"list": [{"a": "ß", "b": {"c": ["ſ"]}}]}}),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e["kind"] = json!("Component");
            e["metadata"]["name"] = json!(format!("n{i}"));
            e["metadata"]["uid"] = json!(format!("u{i}"));
            e["metadata"]["etag"] = json!("e");
            e
        })
        .collect();
        let index = index_of(&es);
        for (query, expected) in [
            (json!({"metadata.tags": {"$contains": "SS"}}), vec![0]),
            (json!({"metadata.tags": {"$contains": "s"}}), vec![1]),
            (json!({"metadata.tags": {"$contains": "I"}}), vec![1]),
            (
                json!({"metadata.tags": {"$contains": "X".repeat(201)}}),
                vec![2],
            ),
            (json!({"metadata.tags": {"$contains": "5"}}), vec![3]),
            (json!({"metadata.tags": {"$contains": true}}), vec![3]),
            (json!({"metadata.tags": {"$contains": "true"}}), vec![]),
            (
                json!({"relations": {"$contains": {"type": "DEPENDSON", "targetRef": "group:default/s"}}}),
                vec![4],
            ),
            (
                json!({"relations": {"$contains": {"type": "dependsOn"}}}),
                vec![4, 5],
            ),
            (
                json!({"relations": {"$contains": {"type": 7, "targetRef": "8"}}}),
                vec![5],
            ),
            (
                json!({"relations": {"$contains": {"targetRef": "group:default/S"}}}),
                vec![4],
            ),
            (json!({"a.b": {"$contains": "JAVA"}}), vec![6]),
            // The first key that spells the path wins: `a.b` itself.
            (json!({"a.b": {"$contains": "go"}}), vec![]),
            (json!({"status.items": {"$contains": "java"}}), vec![7]),
            (
                json!({"spec.list": {"$contains": {"a": "ss", "b.c": {"$contains": "S"}}}}),
                vec![7],
            ),
            (
                json!({"spec.list": {"$contains": {"$not": {"a": "x"}}}}),
                vec![7],
            ),
            // More type/target pairs than are looked up one by one.
            (
                json!({"relations": {"$contains": {
                    "type": {"$in": (0..99).map(|i| format!("t{i}")).chain(["dependsOn".into()]).collect::<Vec<_>>()},
                    "targetRef": {"$in": (0..99).map(|i| format!("r{i}")).chain(["group:default/S".into()]).collect::<Vec<_>>()}
                }}}),
                vec![4],
            ),
        ] {
            let (p, want) = by_scan(&index, &query);
            let got = p.eval(&index, &Budget::unlimited()).unwrap();
            assert_eq!(got, want, "{query}");
            assert_eq!(got.iter().collect::<Vec<_>>(), expected, "{query}");
        }
    }

    fn arb_catalog() -> impl Strategy<Value = Vec<Value>> {
        (0usize..12).prop_flat_map(|n| (0..n).map(arb_entity).collect::<Vec<_>>())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, .. ProptestConfig::default() })]

        /// Narrowing by rows and walking raw text find exactly what parsing
        /// every body and walking the values finds.
        #[test]
        fn contains_agrees_with_parsing_every_body(
            es in arb_catalog(),
            path in prop::sample::select(vec!["metadata.tags", "spec.list", "relations", "status.items", "a.b", "a", "spec", "Relations"]),
            inner in arb_inner(),
            scope_bits in any::<u16>(),
        ) {
            let index = index_of(&es);
            let query = json!({ path: {"$contains": inner} });
            let (p, want) = by_scan(&index, &query);
            let budget = Budget::unlimited();
            prop_assert_eq!(p.eval(&index, &budget).unwrap(), want.clone(), "{}", query);
            let scope: RoaringBitmap = (0..index.len() as u32).filter(|d| scope_bits & (1 << d) != 0).collect();
            prop_assert_eq!(p.eval_in(&index, &scope, &budget).unwrap(), want & scope);
        }
    }
}
