//! The query-string codec: `Params` (decoded `key=value` pairs, in order),
//! canonical integers, `application/x-www-form-urlencoded` decoding and
//! encoding, and the validator's wording for empty or negative parameters.
//! Called by the dispatcher and every handler. A query string longer than
//! `MAX_QUERY_STRING` is refused; decoding itself never fails (a bad escape
//! stays literal, invalid UTF-8 is replaced).

use std::fmt::Write as _;

use super::error::QueryError;
use super::limits::MAX_QUERY_STRING;

/// Decoded query-string pairs, in order.
pub(super) struct Params(pub(super) Vec<(String, String)>);

impl Params {
    pub(super) fn parse(qs: &str) -> Result<Self, QueryError> {
        if qs.len() > MAX_QUERY_STRING {
            return Err(QueryError::TooLarge(format!(
                "Query string too long, at most {MAX_QUERY_STRING} bytes"
            )));
        }
        Ok(Params(
            qs.split('&')
                .filter(|p| !p.is_empty())
                .map(|pair| match pair.split_once('=') {
                    Some((k, v)) => (form_decode(k), form_decode(v)),
                    None => (form_decode(pair), String::new()),
                })
                .collect(),
        ))
    }

    pub(super) fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A parameter that must appear at most once.
    pub(super) fn one(&self, name: &str) -> Result<Option<String>, QueryError> {
        let mut all = self.all(name);
        match all.len() {
            0 => Ok(None),
            1 => Ok(all.pop()),
            _ => Err(QueryError::Param(format!("Invalid {name}, not a string"))),
        }
    }

    /// An integer parameter (`request/query/<name> must be integer`).
    pub(super) fn integer(&self, name: &str) -> Result<Option<i64>, QueryError> {
        let Some(raw) = self.one(name)? else {
            return Ok(None);
        };
        parse_integer(&raw)
            .map(Some)
            .ok_or_else(|| QueryError::Param(format!("request/query/{name} must be integer")))
    }
}

fn parse_integer(raw: &str) -> Option<i64> {
    let n: i64 = raw.parse().ok()?;
    // Backstage requires the canonical spelling (`String(parseInt(x)) === x`).
    (n.to_string() == raw).then_some(n)
}

fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// `application/x-www-form-urlencoded` as `URLSearchParams` writes it.
pub(super) fn form_encode(s: &str, out: &mut String) {
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
}

/// The OpenAPI validator's answer to an empty `after` or `cursor` (both
/// `minLength: 1` in Backstage's schema).
pub(super) fn too_short(name: &str) -> QueryError {
    QueryError::Param(format!(
        "request/query/{name} must NOT have fewer than 1 characters"
    ))
}

pub(super) fn non_negative(v: Option<i64>, what: &str) -> Result<Option<usize>, QueryError> {
    match v {
        Some(n) if n < 0 => Err(QueryError::Param(format!("{what} must be >= 0"))),
        Some(n) => Ok(Some(n as usize)),
        None => Ok(None),
    }
}
