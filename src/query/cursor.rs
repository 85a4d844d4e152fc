//! The `by-query` cursor: base64 of a JSON state shaped like Backstage's
//! (`orderFields`, `isPrevious`, `filter` or `query`, `fullTextFilter`,
//! `orderFieldValues`, `firstSortFieldValues`, `totalItems`). Issued and read
//! by `query`; self-contained, so any sidecar (or generation) can continue a
//! walk. `query` is present only for predicate queries: the official client
//! routes a cursor to `POST` exactly when it finds that key. No generation
//! number is carried: a position is a keyset value, meaningful on any
//! generation, so a cursor issued before a sync keeps working after it.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine as _};
use serde_json::{json, Map, Value};

use super::error::QueryError;
use super::filter::EntityFilter;
use super::predicate::Predicate;

/// Longest cursor accepted, in characters.
pub const MAX_CURSOR_LEN: usize = 64 * 1024;

const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_decode_padding_mode(DecodePaddingMode::Indifferent)
    .with_decode_allow_trailing_bits(true);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// Sort direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Ascending.
    Asc,
    /// Descending.
    Desc,
}

impl Direction {
    /// Parses `asc` / `desc` exactly.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "asc" => Some(Direction::Asc),
            "desc" => Some(Direction::Desc),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Direction::Asc => "asc",
            Direction::Desc => "desc",
        }
    }
}

/// One `orderFields` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderField {
    /// Search key to order by, as given.
    pub field: String,
    /// Direction.
    pub order: Direction,
}

/// `fullTextFilter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullTextFilter {
    /// The term (trimmed when applied).
    pub term: String,
    /// Keys searched; `None` means the sort field, else `metadata.uid`.
    pub fields: Option<Vec<String>>,
}

/// A predicate together with the JSON it was parsed from (re-emitted as is).
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPredicate {
    /// The JSON the client sent.
    pub json: Value,
    /// Its parsed form.
    pub predicate: Predicate,
}

/// The state of a `by-query` walk.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    /// Order fields; only the first one orders (as in Backstage).
    pub order_fields: Vec<OrderField>,
    /// Whether this cursor walks backwards (a `prevCursor`).
    pub is_previous: bool,
    /// Legacy filter, for GET-born walks.
    pub filter: Option<EntityFilter>,
    /// Predicate, for POST-born walks.
    pub query: Option<QueryPredicate>,
    /// Full-text filter.
    pub full_text: Option<FullTextFilter>,
    /// Keyset position: `[sort value, uid]`, or `[uid]` without a sort field.
    pub order_field_values: Option<Vec<Option<String>>>,
    /// Keyset of the walk's first item (tells when `prevCursor` stops).
    pub first_sort_field_values: Option<Vec<Option<String>>>,
    /// `totalItems` of the first page.
    pub total_items: Option<u64>,
}

impl Cursor {
    /// A fresh walk (no position yet).
    pub fn initial(
        order_fields: Vec<OrderField>,
        filter: Option<EntityFilter>,
        query: Option<QueryPredicate>,
        full_text: Option<FullTextFilter>,
    ) -> Self {
        Cursor {
            order_fields,
            is_previous: false,
            filter,
            query,
            full_text,
            order_field_values: None,
            first_sort_field_values: None,
            total_items: None,
        }
    }

    /// Base64 of the JSON state, keys in Backstage's order.
    pub fn encode(&self) -> String {
        let mut m = Map::new();
        m.insert(
            "orderFields".into(),
            Value::Array(
                self.order_fields
                    .iter()
                    .map(|o| json!({"field": o.field, "order": o.order.as_str()}))
                    .collect(),
            ),
        );
        m.insert("isPrevious".into(), Value::Bool(self.is_previous));
        if let Some(f) = &self.filter {
            m.insert("filter".into(), f.to_json());
        }
        if let Some(q) = &self.query {
            m.insert("query".into(), q.json.clone());
        }
        if let Some(ft) = &self.full_text {
            let mut f = Map::new();
            f.insert("term".into(), Value::String(ft.term.clone()));
            if let Some(fields) = &ft.fields {
                f.insert("fields".into(), json!(fields));
            }
            m.insert("fullTextFilter".into(), Value::Object(f));
        }
        m.insert("skipTotalItems".into(), Value::Bool(false));
        let values = |v: &Option<Vec<Option<String>>>| json!(v.clone().unwrap_or_default());
        m.insert("orderFieldValues".into(), values(&self.order_field_values));
        if self.first_sort_field_values.is_some() {
            m.insert(
                "firstSortFieldValues".into(),
                values(&self.first_sort_field_values),
            );
        }
        if let Some(t) = self.total_items {
            m.insert("totalItems".into(), json!(t));
        }
        base64::engine::general_purpose::STANDARD.encode(Value::Object(m).to_string())
    }

    /// Reads a cursor. Anything unreadable is `Malformed cursor: …`.
    pub fn decode(encoded: &str) -> Result<Self, QueryError> {
        let bad = |m: &str| QueryError::Cursor(m.to_string());
        if encoded.len() > MAX_CURSOR_LEN {
            return Err(bad(&format!("longer than {MAX_CURSOR_LEN} characters")));
        }
        let trimmed = encoded.trim();
        let bytes = STANDARD_LENIENT
            .decode(trimmed)
            .or_else(|_| URL_SAFE_LENIENT.decode(trimmed))
            .map_err(|e| bad(&format!("not base64: {e}")))?;
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| bad("not a JSON object"))?;

        let order_fields = match obj.get("orderFields") {
            Some(Value::Array(items)) => items
                .iter()
                .map(|o| {
                    let field = o.get("field").and_then(Value::as_str);
                    let order = o
                        .get("order")
                        .and_then(Value::as_str)
                        .and_then(Direction::parse);
                    match (field, order) {
                        (Some(field), Some(order)) => Ok(OrderField {
                            field: field.to_string(),
                            order,
                        }),
                        _ => Err(bad("orderFields entries need a field and asc or desc")),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(bad("orderFields must be an array")),
        };
        let is_previous = obj
            .get("isPrevious")
            .and_then(Value::as_bool)
            .ok_or_else(|| bad("isPrevious must be a boolean"))?;
        let filter = match obj.get("filter") {
            None | Some(Value::Null) => None,
            Some(f) => Some(EntityFilter::from_json(f).map_err(|e| bad(&e))?),
        };
        let query = match obj.get("query") {
            None | Some(Value::Null) => None,
            Some(q) => Some(QueryPredicate {
                predicate: Predicate::parse(q).map_err(|e| bad(&e.to_string()))?,
                json: q.clone(),
            }),
        };
        let full_text = match obj.get("fullTextFilter") {
            None | Some(Value::Null) => None,
            Some(ft) => {
                let term = ft
                    .get("term")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("fullTextFilter.term must be a string"))?;
                let fields = match ft.get("fields") {
                    None | Some(Value::Null) => None,
                    Some(f) => Some(
                        string_array(f)
                            .ok_or_else(|| bad("fullTextFilter.fields must be strings"))?,
                    ),
                };
                Some(FullTextFilter {
                    term: term.to_string(),
                    fields,
                })
            }
        };
        let order_field_values = Some(
            obj.get("orderFieldValues")
                .and_then(nullable_string_array)
                .ok_or_else(|| bad("orderFieldValues must be an array of strings or nulls"))?,
        );
        let first_sort_field_values =
            match obj.get("firstSortFieldValues") {
                None => None,
                Some(v) => Some(nullable_string_array(v).ok_or_else(|| {
                    bad("firstSortFieldValues must be an array of strings or nulls")
                })?),
            };
        let total_items = match obj.get("totalItems") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| bad("totalItems must be a whole number"))?,
            ),
        };
        Ok(Cursor {
            order_fields,
            is_previous,
            filter,
            query,
            full_text,
            order_field_values,
            first_sort_field_values,
            total_items,
        })
    }
}

fn string_array(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|s| s.as_str().map(str::to_string))
        .collect()
}

fn nullable_string_array(v: &Value) -> Option<Vec<Option<String>>> {
    v.as_array()?
        .iter()
        .map(|s| match s {
            Value::Null => Some(None),
            Value::String(s) => Some(Some(s.clone())),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let mut c = Cursor::initial(
            vec![OrderField {
                field: "metadata.name".into(),
                order: Direction::Desc,
            }],
            Some(EntityFilter::Key {
                key: "kind".into(),
                values: Some(vec!["API".into()]),
            }),
            None,
            Some(FullTextFilter {
                term: "x".into(),
                fields: None,
            }),
        );
        c.order_field_values = Some(vec![Some("b".into()), Some("u".into())]);
        c.first_sort_field_values = Some(vec![None, Some("a".into())]);
        c.total_items = Some(7);
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn garbage_is_a_malformed_cursor() {
        for bad in ["%%%", "bm90IGpzb24=", "WzFd", "e30="] {
            let e = Cursor::decode(bad).unwrap_err();
            assert!(e.to_string().starts_with("Malformed cursor: "), "{e}");
        }
    }
}
