//! One catalog entity as the mirror holds it, and Backstage entity references.
//!
//! The body is kept as the exact JSON bytes the upstream sent, so that a
//! read served from the mirror is the upstream's answer, not a re-encoding.
//! Everything else here (uid, reference, etag) is derived from that body once,
//! when the entity enters the sidecar (sync, revalidation, snapshot import).
//! A generation's index packs the bodies it holds (`codec`); `body()` gives
//! the exact bytes back either way.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use crate::codec::{Body, BodyCodec};

/// An entity of one mirror generation: the upstream's JSON plus the keys the
/// sidecar looks it up by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    /// `metadata.uid`, the upstream's stable identity.
    pub uid: Arc<str>,
    /// `kind:namespace/name`, lower-cased (Backstage compares refs this way).
    pub entity_ref: Arc<str>,
    /// `metadata.etag`: changes whenever the upstream changes the entity.
    pub etag: Arc<str>,
    /// The entity exactly as the upstream serialised it (see `body`).
    body: Body,
}

/// Why a JSON document is not an entity the mirror can hold.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntityError {
    /// The bytes are not a JSON object.
    #[error("entity is not valid JSON: {0}")]
    Json(String),
    /// A field every catalog entity has is missing or empty.
    #[error("entity has no {0}")]
    Missing(&'static str),
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    metadata: Option<MetadataEnvelope<'a>>,
}

#[derive(Deserialize)]
struct MetadataEnvelope<'a> {
    #[serde(borrow)]
    name: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    namespace: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    uid: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    etag: Option<std::borrow::Cow<'a, str>>,
}

impl Entity {
    /// Reads the identity of an entity from its JSON, keeping the bytes as
    /// they are. Entities without a uid or etag are refused: the mirror could
    /// neither key nor change-detect them.
    pub fn from_json(body: Bytes) -> Result<Self, EntityError> {
        let envelope: Envelope<'_> =
            serde_json::from_slice(&body).map_err(|e| EntityError::Json(e.to_string()))?;
        let kind = non_empty(envelope.kind, "kind")?;
        let metadata = envelope.metadata.ok_or(EntityError::Missing("metadata"))?;
        let name = non_empty(metadata.name, "metadata.name")?;
        let namespace = metadata
            .namespace
            .filter(|n| !n.is_empty())
            .unwrap_or(std::borrow::Cow::Borrowed("default"));
        let uid = non_empty(metadata.uid, "metadata.uid")?;
        let etag = non_empty(metadata.etag, "metadata.etag")?;
        let entity_ref = EntityRef {
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
        .canonical();
        Ok(Self {
            uid: uid.as_ref().into(),
            entity_ref: entity_ref.into(),
            etag: etag.as_ref().into(),
            body: Body::Plain(body.clone()),
        })
    }

    /// The entity exactly as the upstream serialised it (unpacked into a new
    /// buffer when its generation packed it).
    pub fn body(&self) -> Bytes {
        self.body.bytes()
    }

    /// Length of the body, in bytes.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// Bytes of memory the body takes (less than `body_len` when packed).
    pub fn body_held_bytes(&self) -> usize {
        self.body.held_bytes()
    }

    /// The codec that packs the body, if it is packed.
    pub fn codec(&self) -> Option<&Arc<BodyCodec>> {
        match &self.body {
            Body::Plain(_) => None,
            Body::Packed { codec, .. } => Some(codec),
        }
    }

    /// Whether `other` has the same body (compared as bytes, however each is
    /// held).
    pub fn same_body(&self, other: &Entity) -> bool {
        self.body == other.body
    }

    /// This entity with its body packed by `codec` (or as it is, when
    /// packing does not make it smaller): the same allocation when `codec`
    /// already packs it; a body packed by another codec is unpacked and
    /// packed again, so that the result holds `codec` alone.
    pub fn packed(self: &Arc<Self>, codec: &Arc<BodyCodec>) -> Arc<Entity> {
        let body = match &self.body {
            Body::Packed { codec: own, .. } if Arc::ptr_eq(own, codec) => return self.clone(),
            Body::Plain(plain) => Body::pack(plain, codec),
            other @ Body::Packed { .. } => Body::pack(&other.bytes(), codec),
        };
        Arc::new(Entity {
            uid: self.uid.clone(),
            entity_ref: self.entity_ref.clone(),
            etag: self.etag.clone(),
            body,
        })
    }
}

fn non_empty<'a>(
    value: Option<std::borrow::Cow<'a, str>>,
    field: &'static str,
) -> Result<std::borrow::Cow<'a, str>, EntityError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or(EntityError::Missing(field))
}

/// A parsed entity reference, `[kind:][namespace/]name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityRef {
    /// Entity kind, as written.
    pub kind: String,
    /// Namespace, as written (`default` when omitted).
    pub namespace: String,
    /// Name, as written.
    pub name: String,
}

/// A string that is not a full entity reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Invalid entity ref '{0}'")]
pub struct InvalidRef(pub String);

impl EntityRef {
    /// Parses `kind:namespace/name` or `kind:name` (namespace `default`).
    /// The kind is required: the read path never guesses it.
    pub fn parse(text: &str) -> Result<Self, InvalidRef> {
        let invalid = || InvalidRef(text.to_string());
        let (kind, rest) = text.split_once(':').ok_or_else(invalid)?;
        let (namespace, name) = match rest.split_once('/') {
            Some((ns, name)) => (ns, name),
            None => ("default", rest),
        };
        if kind.is_empty() || namespace.is_empty() || name.is_empty() || name.contains('/') {
            return Err(invalid());
        }
        Ok(Self {
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }

    /// The lower-cased `kind:namespace/name` that the mirror keys by.
    pub fn canonical(&self) -> String {
        format!("{}:{}/{}", self.kind, self.namespace, self.name).to_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_identity_comes_from_the_body() {
        let body = Bytes::from_static(
            br#"{"apiVersion":"backstage.io/v1alpha1","kind":"Component","metadata":{"name":"Checkout-Service","uid":"u1","etag":"e1"},"spec":{}}"#,
        );
        let entity = Entity::from_json(body.clone()).unwrap();
        assert_eq!(&*entity.uid, "u1");
        assert_eq!(&*entity.entity_ref, "component:default/checkout-service");
        assert_eq!(&*entity.etag, "e1");
        assert_eq!(entity.body(), body);
    }

    #[test]
    fn entity_without_uid_is_refused() {
        let body =
            Bytes::from_static(br#"{"kind":"Component","metadata":{"name":"a","etag":"e"}}"#);
        assert_eq!(
            Entity::from_json(body),
            Err(EntityError::Missing("metadata.uid"))
        );
        assert!(matches!(
            Entity::from_json(Bytes::from_static(b"[1")),
            Err(EntityError::Json(_))
        ));
    }

    #[test]
    fn refs_parse_and_canonicalise() {
        let r = EntityRef::parse("Group:default/TEAM-0001").unwrap();
        assert_eq!(r.canonical(), "group:default/team-0001");
        assert_eq!(
            EntityRef::parse("component:foo").unwrap().namespace,
            "default"
        );
        assert!(EntityRef::parse("nokind").is_err());
        assert!(EntityRef::parse("a:b/c/d").is_err());
        assert!(EntityRef::parse(":x").is_err());
    }
}
