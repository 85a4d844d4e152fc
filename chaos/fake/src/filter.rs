//! Backstage's two ways of selecting entities, evaluated by a plain scan.
//!
//! `Filter` is the query-string form (`filter=kind=component,spec.type=service`
//! — several params OR, comma-separated conditions AND, a repeated key inside
//! one param ORs its values, a bare key tests existence). `Predicate` is the
//! JSON form of `POST /entities/by-query` (`$all`, `$any`, `$not`, `$exists`,
//! `$in`, `$hasPrefix`, `$contains`). Both match case-insensitively against
//! the search values of `search::values`; invalid input is an `InputError`.

use serde_json::{json, Value};

use crate::search;

/// Bad client input, with Backstage's wording; served as a 400 `InputError`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// One condition: the key exists (no values) or has one of the values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The key as the client wrote it; matched case-insensitively.
    pub key: String,
    /// Accepted values; empty means "the key exists".
    pub values: Vec<String>,
}

/// A query-string filter: any of the alternatives, each all of its conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The alternatives (one per `filter` parameter).
    pub any_of: Vec<Vec<Condition>>,
}

impl Filter {
    /// Parses the `filter` parameters; `None` when there are none.
    pub fn parse(params: &[String]) -> Result<Option<Filter>, InputError> {
        if params.is_empty() {
            return Ok(None);
        }
        let mut any_of = Vec::new();
        for param in params {
            let mut all_of: Vec<Condition> = Vec::new();
            for statement in param.split(',') {
                let statement = statement.trim();
                if statement.is_empty() {
                    continue;
                }
                let (key, value) = match statement.split_once('=') {
                    Some((k, v)) => (k.trim(), Some(v.trim())),
                    None => (statement, None),
                };
                if key.is_empty() {
                    return Err(InputError(format!(
                        "Invalid filter, '{statement}' is not a valid statement (expected a string on the form a=b or a= or a)"
                    )));
                }
                let idx = match all_of.iter().position(|c| c.key == key) {
                    Some(i) => i,
                    None => {
                        all_of.push(Condition {
                            key: key.to_string(),
                            values: Vec::new(),
                        });
                        all_of.len() - 1
                    }
                };
                if let Some(v) = value {
                    all_of[idx].values.push(v.to_string());
                }
            }
            if !all_of.is_empty() {
                any_of.push(all_of);
            }
        }
        Ok((!any_of.is_empty()).then_some(Filter { any_of }))
    }

    /// Whether `entity` passes the filter.
    pub fn matches(&self, entity: &Value) -> bool {
        self.any_of.iter().any(|all| {
            all.iter().all(|c| {
                let found = search::values(entity, &c.key);
                if c.values.is_empty() {
                    return !found.is_empty();
                }
                let wanted: Vec<String> = c.values.iter().map(|v| v.to_lowercase()).collect();
                found
                    .iter()
                    .any(|f| f.lower.as_ref().is_some_and(|l| wanted.contains(l)))
            })
        })
    }

    /// The filter as Backstage writes it into a cursor
    /// (`{"anyOf":[{"allOf":[{"key":…,"values":[…]}]}]}`).
    pub fn to_json(&self) -> Value {
        json!({
            "anyOf": self.any_of.iter().map(|all| json!({
                "allOf": all.iter().map(|c| json!({"key": c.key, "values": c.values})).collect::<Vec<_>>()
            })).collect::<Vec<_>>()
        })
    }

    /// Reads back what `to_json` wrote (from a cursor).
    pub fn from_json(v: &Value) -> Result<Filter, InputError> {
        let bad = || InputError("Malformed cursor: invalid filter".to_string());
        let any = v.get("anyOf").and_then(Value::as_array).ok_or_else(bad)?;
        let mut any_of = Vec::new();
        for alt in any {
            let all = alt.get("allOf").and_then(Value::as_array).ok_or_else(bad)?;
            let mut conds = Vec::new();
            for c in all {
                let key = c.get("key").and_then(Value::as_str).ok_or_else(bad)?;
                let values = c
                    .get("values")
                    .and_then(Value::as_array)
                    .ok_or_else(bad)?
                    .iter()
                    .map(|x| x.as_str().map(str::to_string).ok_or_else(bad))
                    .collect::<Result<Vec<_>, _>>()?;
                conds.push(Condition {
                    key: key.to_string(),
                    values,
                });
            }
            any_of.push(conds);
        }
        Ok(Filter { any_of })
    }
}

/// A field test inside a predicate; values are already lower-cased.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldOp {
    /// A primitive value (or `$contains` of one): some value equals it.
    Eq(String),
    /// `$exists`: the key is (or is not) present.
    Exists(bool),
    /// `$in`: some value equals one of these.
    In(Vec<String>),
    /// `$hasPrefix`: some value starts with it.
    HasPrefix(String),
}

/// A parsed predicate query (`POST /entities/by-query` `query`).
#[derive(Debug, Clone, PartialEq)]
pub enum Predicate {
    /// `{"$not": p}`.
    Not(Box<Predicate>),
    /// `{"$all": [...]}`; empty matches everything (Backstage's knex drops
    /// the empty `andWhere` group).
    All(Vec<Predicate>),
    /// `{"$any": [...]}`; empty matches nothing.
    Any(Vec<Predicate>),
    /// `{"kind": "component", "spec.type": {"$in": [...]}}`: all must hold.
    Fields(Vec<(String, FieldOp)>),
}

fn primitive_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Predicate {
    /// Parses and validates a predicate, rejecting what Backstage rejects.
    pub fn parse(v: &Value) -> Result<Predicate, InputError> {
        let Some(obj) = v.as_object() else {
            return Err(InputError(format!(
                "Invalid filter predicate: top-level primitive values are not supported. Wrap the value in a field expression, e.g. {{ \"kind\": {v} }}"
            )));
        };
        // Backstage silently drops keys next to a logical operator; the
        // sidecar refuses them on purpose (a dropped condition widens the
        // answer), and the two must agree.
        for op in ["$all", "$any", "$not"] {
            if obj.contains_key(op) && obj.len() != 1 {
                return Err(InputError(format!(
                    "Operator {op} must be the only key in the predicate, wrap in $all to combine with other conditions"
                )));
            }
        }
        if let Some(inner) = obj.get("$not") {
            return Ok(Predicate::Not(Box::new(Predicate::parse(inner)?)));
        }
        for (op, make) in [
            ("$all", Predicate::All as fn(Vec<Predicate>) -> Predicate),
            ("$any", Predicate::Any),
        ] {
            if let Some(list) = obj.get(op) {
                let items = list.as_array().ok_or_else(|| {
                    InputError(format!("Invalid filter predicate: {op} must be an array"))
                })?;
                return Ok(make(
                    items
                        .iter()
                        .map(Predicate::parse)
                        .collect::<Result<_, _>>()?,
                ));
            }
        }
        let mut fields = Vec::new();
        for (k, value) in obj {
            let key = k.to_lowercase();
            let (key, op) = parse_field(key, value)?;
            fields.push((key, op));
        }
        Ok(Predicate::Fields(fields))
    }

    /// Whether `entity` satisfies the predicate.
    pub fn matches(&self, entity: &Value) -> bool {
        match self {
            Predicate::Not(p) => !p.matches(entity),
            Predicate::All(ps) => ps.iter().all(|p| p.matches(entity)),
            Predicate::Any(ps) => ps.iter().any(|p| p.matches(entity)),
            Predicate::Fields(fields) => fields.iter().all(|(key, op)| {
                let found = search::values(entity, key);
                let lowers = || found.iter().filter_map(|f| f.lower.as_deref());
                match op {
                    FieldOp::Eq(v) => lowers().any(|l| l == v),
                    FieldOp::Exists(want) => found.is_empty() != *want,
                    FieldOp::In(vs) => lowers().any(|l| vs.iter().any(|v| v == l)),
                    FieldOp::HasPrefix(p) => lowers().any(|l| l.starts_with(p.as_str())),
                }
            }),
        }
    }
}

fn unsupported(key: &str, value: &Value) -> InputError {
    InputError(format!(
        "Invalid filter predicate value for field \"{key}\": expected a primitive value, $exists, $in, $hasPrefix or $contains operator, but got {value}"
    ))
}

fn parse_field(key: String, value: &Value) -> Result<(String, FieldOp), InputError> {
    if let Some(text) = primitive_text(value) {
        return Ok((key, FieldOp::Eq(text.to_lowercase())));
    }
    let Some(obj) = value.as_object() else {
        return Err(unsupported(&key, value));
    };
    if let Some(e) = obj.get("$exists") {
        let want = e.as_bool().ok_or_else(|| unsupported(&key, value))?;
        return Ok((key, FieldOp::Exists(want)));
    }
    if let Some(list) = obj.get("$in") {
        let items = list.as_array().ok_or_else(|| unsupported(&key, value))?;
        let vs = items
            .iter()
            .map(|i| primitive_text(i).map(|t| t.to_lowercase()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| unsupported(&key, value))?;
        return Ok((key, FieldOp::In(vs)));
    }
    if let Some(p) = obj.get("$hasPrefix") {
        let p = p.as_str().ok_or_else(|| unsupported(&key, value))?;
        return Ok((key, FieldOp::HasPrefix(p.to_lowercase())));
    }
    if let Some(target) = obj.get("$contains") {
        // The search index has one row per array item, so containment of a
        // primitive is plain equality.
        if let Some(text) = primitive_text(target) {
            return Ok((key, FieldOp::Eq(text.to_lowercase())));
        }
        if key == "relations" {
            return parse_relation_contains(target);
        }
    }
    Err(unsupported(&key, value))
}

fn parse_relation_contains(target: &Value) -> Result<(String, FieldOp), InputError> {
    let bad = || {
        InputError(format!(
            "The $contains operator for \"relations\" requires a \"type\" and optionally a \"targetRef\" property, but got {target}"
        ))
    };
    let obj = target.as_object().ok_or_else(bad)?;
    if obj.keys().any(|k| k != "type" && k != "targetRef") {
        return Err(bad());
    }
    let relation_type = obj.get("type").and_then(primitive_text).ok_or_else(bad)?;
    let key = format!("relations.{}", relation_type.to_lowercase());
    match obj.get("targetRef") {
        None => Ok((key, FieldOp::Exists(true))),
        Some(Value::String(r)) => Ok((key, FieldOp::Eq(r.to_lowercase()))),
        Some(other) => {
            let list = other.get("$in").and_then(Value::as_array).ok_or_else(|| {
                InputError(format!(
                    "Unsupported \"targetRef\" in $contains for \"relations\": {other}"
                ))
            })?;
            let vs = list
                .iter()
                .filter_map(primitive_text)
                .map(|t| t.to_lowercase())
                .collect();
            Ok((key, FieldOp::In(vs)))
        }
    }
}

/// Either way of selecting entities, as carried by a request or a cursor.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    /// Everything.
    All,
    /// Query-string filter.
    Filter(Filter),
    /// Predicate query; `raw` is echoed into cursors under `query`.
    Predicate {
        /// The parsed predicate.
        parsed: Predicate,
        /// The JSON the client sent.
        raw: Value,
    },
    /// Both a filter and a predicate (by-refs with `?filter=` and `query`).
    Both(Filter, Predicate),
}

impl Selector {
    /// Whether `entity` is selected.
    pub fn matches(&self, entity: &Value) -> bool {
        match self {
            Selector::All => true,
            Selector::Filter(f) => f.matches(entity),
            Selector::Predicate { parsed, .. } => parsed.matches(entity),
            Selector::Both(f, p) => f.matches(entity) && p.matches(entity),
        }
    }

    /// Whether everything is selected (the fast path).
    pub fn is_all(&self) -> bool {
        matches!(self, Selector::All)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e() -> Value {
        json!({
            "kind": "Component",
            "metadata": {"name": "Checkout", "namespace": "default", "tags": ["java", "grpc"]},
            "spec": {"type": "service", "lifecycle": "production"},
            "relations": [{"type": "ownedBy", "targetRef": "group:default/team-0001"}]
        })
    }

    fn f(params: &[&str]) -> Filter {
        Filter::parse(&params.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
            .unwrap()
    }

    fn p(v: Value) -> Predicate {
        Predicate::parse(&v).unwrap()
    }

    #[test]
    fn filter_or_and_existence_and_case() {
        assert!(f(&["KIND=component,spec.type=SERVICE"]).matches(&e()));
        assert!(!f(&["kind=component,spec.type=website"]).matches(&e()));
        assert!(f(&["kind=api", "spec.type=service"]).matches(&e()));
        assert!(f(&["kind=api,kind=component"]).matches(&e()));
        assert!(f(&["spec.lifecycle"]).matches(&e()));
        assert!(!f(&["spec.owner"]).matches(&e()));
        assert!(f(&["metadata.tags=JAVA"]).matches(&e()));
        assert!(f(&["metadata.tags.grpc"]).matches(&e()));
        assert!(f(&["relations.ownedby=group:default/TEAM-0001"]).matches(&e()));
        assert!(!f(&["metadata.name="]).matches(&e()));
    }

    #[test]
    fn filter_rejects_empty_key_with_backstage_message() {
        let err = Filter::parse(&["=foo".to_string()]).unwrap_err();
        assert_eq!(
            err.0,
            "Invalid filter, '=foo' is not a valid statement (expected a string on the form a=b or a= or a)"
        );
    }

    #[test]
    fn filter_round_trips_through_json() {
        let filter = f(&["kind=component,spec.type", "kind=api"]);
        assert_eq!(Filter::from_json(&filter.to_json()).unwrap(), filter);
    }

    #[test]
    fn predicates() {
        assert!(p(json!({"kind": "COMPONENT"})).matches(&e()));
        assert!(p(
            json!({"$all": [{"kind": "component"}, {"spec.type": {"$in": ["website", "Service"]}}]})
        )
        .matches(&e()));
        assert!(p(json!({"$all": []})).matches(&e()));
        assert!(!p(json!({"$any": []})).matches(&e()));
        assert!(
            p(json!({"$any": [{"kind": "api"}, {"metadata.name": {"$hasPrefix": "check"}}]}))
                .matches(&e())
        );
        assert!(p(json!({"$not": {"spec.lifecycle": "experimental"}})).matches(&e()));
        assert!(p(json!({"spec.owner": {"$exists": false}})).matches(&e()));
        assert!(!p(json!({"spec.type": {"$exists": false}})).matches(&e()));
        assert!(p(json!({"metadata.tags": {"$contains": "java"}})).matches(&e()));
        assert!(p(json!({"relations": {"$contains": {"type": "ownedBy", "targetRef": "group:default/team-0001"}}})).matches(&e()));
        assert!(p(json!({"relations": {"$contains": {"type": "ownedBy"}}})).matches(&e()));
        assert!(!p(json!({"relations": {"$contains": {"type": "memberOf"}}})).matches(&e()));
        assert!(p(json!({})).matches(&e()));
    }

    #[test]
    fn predicates_reject_bad_shapes() {
        assert!(Predicate::parse(&json!("component")).is_err());
        assert!(Predicate::parse(&json!({"kind": {"$regex": "x"}})).is_err());
        assert!(Predicate::parse(&json!({"kind": ["a"]})).is_err());
        assert!(
            Predicate::parse(&json!({"relations": {"$contains": {"targetRef": "x"}}})).is_err()
        );
    }
}
