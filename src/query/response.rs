//! `Answer`, the response a query handler computes: the JSON body (whole, or
//! a `Rendering` to be produced a chunk at a time) and, for `GET /entities`,
//! the `Link` header. Built by `entities`, `page` and `facets`, handed back
//! by the dispatcher to the read path; re-exported as `query::Answer`.
//! Imports only leaves and `rendering`, so the handlers need not import
//! `mod.rs`.

use bytes::Bytes;

use super::error::QueryError;
use super::rendering::Rendering;

/// A computed answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// JSON body.
    pub body: Body,
    /// `Link` header value (only `GET /entities` with more pages).
    pub link: Option<String>,
}

/// An answer's JSON body.
#[derive(Debug, Clone)]
pub enum Body {
    /// Rendered already.
    Full(Bytes),
    /// A large list, rendered a chunk at a time by whoever sends it.
    Stream(Rendering),
}

impl Body {
    /// The whole body: a stream is rendered to its end (a spent budget is
    /// the error, with nothing partial).
    pub fn into_bytes(self) -> Result<Bytes, QueryError> {
        match self {
            Body::Full(bytes) => Ok(bytes),
            Body::Stream(rendering) => rendering.into_bytes(),
        }
    }
}
