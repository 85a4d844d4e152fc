//! Backstage's `getJsonValueAtPath` (dotted path, keys may contain dots, no
//! descent into arrays), over a parsed `Value` and over raw JSON text. The
//! raw walk (used by `$contains` in `predicate`) parses only the objects on
//! the way, leaving every other member as unparsed text, and resolves
//! duplicate keys as a parsed `Value` does (first position, last value). A
//! leaf: imports nothing from the query module.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

/// Backstage's `getJsonValueAtPath` over a parsed value.
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

/// `json_at_path` over JSON text: the same member, still unparsed. `None`
/// for text that is not an object (or not JSON) and for a missing path.
pub(crate) fn raw_at_path<'a>(text: &'a [u8], path: &str) -> Option<&'a RawValue> {
    if path.is_empty() {
        return None;
    }
    let members: Members<'a> = serde_json::from_slice(text).ok()?;
    for (k, v) in as_parsed(&members.0) {
        if k == path {
            return Some(v);
        }
        if let Some(rest) = path.strip_prefix(k).and_then(|r| r.strip_prefix('.')) {
            if let Some(found) = raw_at_path(v.get().as_bytes(), rest) {
                return Some(found);
            }
        }
    }
    None
}

/// The elements of a JSON array, unparsed; `None` for anything else.
pub(crate) fn raw_items(raw: &RawValue) -> Option<Vec<&RawValue>> {
    serde_json::from_str(raw.get()).ok()
}

/// An object's members in document order, values unparsed.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// Members as a parsed `Map` holds them: a repeated key keeps its first
/// position and its last value.
fn as_parsed<'k, 'v>(members: &'k [(Cow<'_, str>, &'v RawValue)]) -> Vec<(&'k str, &'v RawValue)> {
    let mut out: Vec<(&'k str, &'v RawValue)> = Vec::with_capacity(members.len());
    if members.len() <= 16 {
        for (k, v) in members {
            match out.iter_mut().find(|(seen, _)| *seen == &**k) {
                Some(slot) => slot.1 = *v,
                None => out.push((&**k, *v)),
            }
        }
    } else {
        let mut at: HashMap<&str, usize> = HashMap::with_capacity(members.len());
        for (k, v) in members {
            match at.get(&**k) {
                Some(&i) => out[i].1 = *v,
                None => {
                    at.insert(&**k, out.len());
                    out.push((&**k, *v));
                }
            }
        }
    }
    out
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    out.push((k.0, v));
                }
                Ok(Members(out))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// A member name, borrowed from the text unless it has escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn path_lookup_tolerates_dotted_keys() {
        let v = json!({"metadata": {"annotations": {"backstage.io/owner": "x"}}});
        assert_eq!(
            json_at_path(&v, "metadata.annotations.backstage.io/owner"),
            Some(&json!("x"))
        );
        assert_eq!(json_at_path(&v, "metadata.nope"), None);
    }

    #[test]
    fn the_raw_walk_finds_what_the_parsed_walk_finds() {
        let texts = [
            r#"{"metadata": {"annotations": {"backstage.io/owner": "x"}}, "spec": {"a": [1, {"b": 2}]}}"#,
            // Keys that are prefixes of one another, with and without dots.
            r#"{"a": {"b": 1}, "a.b": {"c": 2}, "a.b.c": 3}"#,
            r#"{"a.b": {"c": 2}, "a": {"b": {"c": 4}}}"#,
            // Escaped keys, repeated keys (first position, last value).
            r#"{"k\u0065y": {"x": 1}, "dup": 1, "other": 2, "dup": {"z": [3]}}"#,
            r#"{"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6, "g": 7, "h": 8, "i": 9, "j": 10, "k": 11, "l": 12, "m": 13, "n": 14, "o": 15, "p": 16, "q": 17, "a": {"x": "last"}}"#,
            r#"[1, 2]"#,
            r#""text""#,
        ];
        let paths = [
            "metadata.annotations.backstage.io/owner",
            "metadata.annotations",
            "spec.a",
            "spec.a.0",
            "a.b.c",
            "a.b",
            "a",
            "a.x",
            "key.x",
            "dup",
            "dup.z",
            "nope",
            "",
            "q",
        ];
        for text in texts {
            let parsed: Value = serde_json::from_str(text).unwrap();
            for path in paths {
                let want = json_at_path(&parsed, path);
                let got = raw_at_path(text.as_bytes(), path)
                    .map(|r| serde_json::from_str::<Value>(r.get()).unwrap());
                assert_eq!(got.as_ref(), want, "{text} at {path:?}");
            }
        }
        let raw = raw_at_path(br#"{"a": [1, "x", {"b": null}]}"#, "a").unwrap();
        let items: Vec<&str> = raw_items(raw).unwrap().iter().map(|r| r.get()).collect();
        assert_eq!(items, ["1", "\"x\"", "{\"b\": null}"]);
        assert!(raw_items(raw_at_path(br#"{"a": {"b": 1}}"#, "a").unwrap()).is_none());
    }
}
