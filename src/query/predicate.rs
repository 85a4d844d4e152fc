//! Filter predicates (`$all`, `$any`, `$not`, field expressions with
//! `$exists`, `$in`, `$hasPrefix`, `$contains`), the query language of
//! `POST /entities/by-query`, `POST /entity-facets` and the `query` body of
//! `by-refs`. Called by `query`; parsing refuses what Backstage refuses, and
//! evaluation runs over the index's search rows like Backstage's SQL does,
//! except `$contains`, which Backstage evaluates on the entity JSON.

use roaring::RoaringBitmap;
use serde_json::{Map, Value};

use super::error::QueryError;
use crate::index::{js_number, js_string, DocSet, Index};

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

    /// The documents of `index` that match.
    pub fn eval(&self, index: &Index) -> RoaringBitmap {
        match self {
            Predicate::All(ps) => {
                let mut out = index.all().clone();
                for p in ps {
                    if out.is_empty() {
                        break;
                    }
                    out &= p.eval(index);
                }
                out
            }
            Predicate::Any(ps) => {
                let mut out = RoaringBitmap::new();
                for p in ps {
                    out |= p.eval(index);
                }
                out
            }
            Predicate::Not(p) => index.all() - &p.eval(index),
            Predicate::Fields(fields) => {
                let mut out = index.all().clone();
                for (key, cond) in fields {
                    if out.is_empty() {
                        break;
                    }
                    out &= eval_field(index, key, cond);
                }
                out
            }
            // Refused at parse time outside `$contains`.
            Predicate::Value(_) => RoaringBitmap::new(),
        }
    }
}

fn eval_field(index: &Index, key: &str, cond: &ValuePredicate) -> RoaringBitmap {
    if let ValuePredicate::Contains(inner) = cond {
        return eval_contains(index, key, inner);
    }
    let postings = index.key(&key.to_lowercase());
    let lookup = |v: &str| -> Option<&DocSet> {
        postings.and_then(|p| p.values.get(v.to_lowercase().as_str()))
    };
    match cond {
        ValuePredicate::Eq(p) => lookup(&p.as_js_string())
            .map(DocSet::to_bitmap)
            .unwrap_or_default(),
        ValuePredicate::Exists(true) => postings.map(|p| p.present.clone()).unwrap_or_default(),
        ValuePredicate::Exists(false) => match postings {
            Some(p) => index.all() - &p.present,
            None => index.all().clone(),
        },
        ValuePredicate::In(list) => {
            let mut out = RoaringBitmap::new();
            for p in list {
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
                for (v, docs) in &p.values {
                    if v.starts_with(&prefix) {
                        docs.or_into(&mut out);
                    }
                }
            }
            out
        }
        ValuePredicate::Contains(_) => unreachable!("handled above"),
    }
}

/// `$contains` looks at the entity JSON (Backstage's search rows cannot say
/// which values sit in the same array element), so it scans the bodies.
fn eval_contains(index: &Index, key: &str, inner: &Predicate) -> RoaringBitmap {
    let mut out = RoaringBitmap::new();
    for doc in index.all().iter() {
        let Ok(value) = serde_json::from_slice::<Value>(&index.entity(doc).body) else {
            continue;
        };
        if let Some(Value::Array(items)) = json_at_path(&value, key) {
            if items.iter().any(|item| matches_json(inner, item)) {
                out.push(doc);
            }
        }
    }
    out
}

/// Backstage's `getJsonValueAtPath`: dotted path, keys may contain dots,
/// does not descend into arrays.
pub(crate) fn json_at_path<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return None;
    }
    let obj = value.as_object()?;
    for (k, v) in obj {
        if k == path {
            return Some(v);
        }
        if let Some(rest) = path
            .strip_prefix(k.as_str())
            .and_then(|r| r.strip_prefix('.'))
        {
            if let Some(found) = json_at_path(v, rest) {
                return Some(found);
            }
        }
    }
    None
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

    #[test]
    fn path_lookup_tolerates_dotted_keys() {
        let v = json!({"metadata": {"annotations": {"backstage.io/owner": "x"}}});
        assert_eq!(
            json_at_path(&v, "metadata.annotations.backstage.io/owner"),
            Some(&json!("x"))
        );
        assert_eq!(json_at_path(&v, "metadata.nope"), None);
    }
}
