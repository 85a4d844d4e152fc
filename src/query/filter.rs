//! Backstage's legacy `filter=` syntax and the `EntityFilter` tree it parses
//! into. Called by `query` for GET requests and for cursors, which carry the
//! filter in Backstage's own JSON shape (`anyOf`/`allOf`/`not`/`{key,values}`).
//! Evaluation is over the search rows of an `Index`: keys and values compare
//! lower-cased, a key without values tests that the key has any row.

use roaring::RoaringBitmap;
use serde_json::{json, Value};

use super::budget::Budget;
use super::error::QueryError;
use crate::index::Index;

/// A filter over search rows, in Backstage's `EntityFilter` shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntityFilter {
    /// Any of the inner filters matches.
    AnyOf(Vec<EntityFilter>),
    /// All of the inner filters match.
    AllOf(Vec<EntityFilter>),
    /// The inner filter does not match.
    Not(Box<EntityFilter>),
    /// The key has one of `values` (lower-cased compare), or any row at all
    /// when `values` is `None`.
    Key {
        /// Dotted search key, as written.
        key: String,
        /// Accepted values, as written.
        values: Option<Vec<String>>,
    },
}

/// Deepest nesting accepted in a filter read back from a cursor.
const MAX_DEPTH: usize = 64;

/// Parses repeated `filter` parameters: the parameters are OR-ed, the
/// comma-separated statements inside one are AND-ed. `None` means "no
/// filter" (nothing given, or only empty strings).
pub fn parse_filter_params(filters: &[String]) -> Result<Option<EntityFilter>, QueryError> {
    let mut any = Vec::new();
    for f in filters {
        if let Some(all) = parse_filter_string(f)? {
            any.push(EntityFilter::AllOf(all));
        }
    }
    Ok(if any.is_empty() {
        None
    } else {
        Some(EntityFilter::AnyOf(any))
    })
}

/// One `a=b,c=d,e` filter string. Statements on the same key merge their
/// values (so `kind=a,kind=b` means either), like Backstage's parser.
fn parse_filter_string(filter: &str) -> Result<Option<Vec<EntityFilter>>, QueryError> {
    let mut by_key: Vec<(String, bool, Vec<String>)> = Vec::new();
    for statement in filter.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, value) = match statement.find('=') {
            Some(i) => (statement[..i].trim(), Some(statement[i + 1..].trim())),
            None => (statement, None),
        };
        if key.is_empty() {
            return Err(QueryError::Filter(format!(
                "Invalid filter, '{statement}' is not a valid statement (expected a string on the form a=b or a= or a)"
            )));
        }
        let slot = match by_key.iter_mut().position(|(k, _, _)| k == key) {
            Some(i) => &mut by_key[i],
            None => {
                by_key.push((key.to_string(), false, Vec::new()));
                by_key.last_mut().expect("just pushed")
            }
        };
        match value {
            None => slot.1 = true,
            Some(v) => slot.2.push(v.to_string()),
        }
    }
    if by_key.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        by_key
            .into_iter()
            .map(|(key, _, values)| EntityFilter::Key {
                key,
                values: if values.is_empty() {
                    None
                } else {
                    Some(values)
                },
            })
            .collect(),
    ))
}

impl EntityFilter {
    /// Backstage's JSON shape of the filter (as carried in cursors).
    pub fn to_json(&self) -> Value {
        match self {
            EntityFilter::AnyOf(f) => {
                json!({ "anyOf": f.iter().map(Self::to_json).collect::<Vec<_>>() })
            }
            EntityFilter::AllOf(f) => {
                json!({ "allOf": f.iter().map(Self::to_json).collect::<Vec<_>>() })
            }
            EntityFilter::Not(f) => json!({ "not": f.to_json() }),
            EntityFilter::Key { key, values: None } => json!({ "key": key }),
            EntityFilter::Key {
                key,
                values: Some(v),
            } => json!({ "key": key, "values": v }),
        }
    }

    /// Reads the JSON shape back (from a cursor). The message says what is
    /// wrong; the caller wraps it as a malformed cursor.
    pub fn from_json(value: &Value) -> Result<Self, String> {
        Self::from_json_at(value, 0)
    }

    fn from_json_at(value: &Value, depth: usize) -> Result<Self, String> {
        if depth > MAX_DEPTH {
            return Err(format!("filter nested deeper than {MAX_DEPTH} levels"));
        }
        let obj = value.as_object().ok_or("filter must be an object")?;
        let list = |v: &Value| -> Result<Vec<EntityFilter>, String> {
            v.as_array()
                .ok_or_else(|| "filter list must be an array".to_string())?
                .iter()
                .map(|f| Self::from_json_at(f, depth + 1))
                .collect()
        };
        if let Some(key) = obj.get("key") {
            let key = key
                .as_str()
                .ok_or("filter key must be a string")?
                .to_string();
            let values = match obj.get("values") {
                None | Some(Value::Null) => None,
                Some(Value::Array(vs)) => Some(
                    vs.iter()
                        .map(|v| {
                            v.as_str()
                                .map(str::to_string)
                                .ok_or("filter values must be strings")
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                Some(_) => return Err("filter values must be an array".into()),
            };
            return Ok(EntityFilter::Key { key, values });
        }
        if let Some(v) = obj.get("not") {
            return Ok(EntityFilter::Not(Box::new(Self::from_json_at(
                v,
                depth + 1,
            )?)));
        }
        if let Some(v) = obj.get("anyOf") {
            return Ok(EntityFilter::AnyOf(list(v)?));
        }
        if let Some(v) = obj.get("allOf") {
            return Ok(EntityFilter::AllOf(list(v)?));
        }
        Err("filter must have key, not, anyOf or allOf".into())
    }

    /// The documents of `index` that match, or `QueryError::Budget` once
    /// the budget is spent (checked at every node and every few hundred
    /// values).
    pub fn eval(&self, index: &Index, budget: &Budget) -> Result<RoaringBitmap, QueryError> {
        budget.check()?;
        Ok(match self {
            EntityFilter::AnyOf(fs) => {
                let mut out = RoaringBitmap::new();
                for f in fs {
                    out |= f.eval(index, budget)?;
                }
                out
            }
            EntityFilter::AllOf(fs) => {
                let mut out = index.all().clone();
                for f in fs {
                    if out.is_empty() {
                        break;
                    }
                    out &= f.eval(index, budget)?;
                }
                out
            }
            EntityFilter::Not(f) => index.all() - &f.eval(index, budget)?,
            EntityFilter::Key { key, values } => {
                let Some(postings) = index.key(&key.to_lowercase()) else {
                    return Ok(RoaringBitmap::new());
                };
                match values {
                    None => postings.present.clone(),
                    Some(values) => {
                        let mut out = RoaringBitmap::new();
                        for (i, v) in values.iter().enumerate() {
                            if i % 256 == 0 {
                                budget.check()?;
                            }
                            if let Some(docs) = postings.values.get(v.to_lowercase().as_str()) {
                                docs.or_into(&mut out);
                            }
                        }
                        out
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(fs: &[&str]) -> Option<EntityFilter> {
        parse_filter_params(&fs.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn statements_and_params_nest_as_backstage_does() {
        let f = parse(&["kind=component, spec.type=service", "kind=API"]).unwrap();
        assert_eq!(
            f,
            EntityFilter::AnyOf(vec![
                EntityFilter::AllOf(vec![
                    EntityFilter::Key {
                        key: "kind".into(),
                        values: Some(vec!["component".into()])
                    },
                    EntityFilter::Key {
                        key: "spec.type".into(),
                        values: Some(vec!["service".into()])
                    },
                ]),
                EntityFilter::AllOf(vec![EntityFilter::Key {
                    key: "kind".into(),
                    values: Some(vec!["API".into()])
                }]),
            ])
        );
        assert_eq!(EntityFilter::from_json(&f.to_json()).unwrap(), f);
    }

    #[test]
    fn same_key_merges_values_and_bare_key_tests_existence() {
        let f = parse(&["kind=a,kind=b,spec.owner,x="]).unwrap();
        let EntityFilter::AnyOf(any) = f else {
            panic!()
        };
        let EntityFilter::AllOf(all) = &any[0] else {
            panic!()
        };
        assert_eq!(
            all[0],
            EntityFilter::Key {
                key: "kind".into(),
                values: Some(vec!["a".into(), "b".into()])
            }
        );
        assert_eq!(
            all[1],
            EntityFilter::Key {
                key: "spec.owner".into(),
                values: None
            }
        );
        assert_eq!(
            all[2],
            EntityFilter::Key {
                key: "x".into(),
                values: Some(vec!["".into()])
            }
        );
    }

    #[test]
    fn empty_filters_mean_no_filter_and_bad_statements_are_refused() {
        assert_eq!(parse(&["", " , "]), None);
        let err = parse_filter_params(&["=foo".to_string()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid filter, '=foo' is not a valid statement (expected a string on the form a=b or a= or a)"
        );
    }
}
