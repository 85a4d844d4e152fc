//! `Answer`, the response a query handler computes: the JSON body and, for
//! `GET /entities`, the `Link` header. Built by `entities`, `page` and
//! `facets`, handed back by the dispatcher to the read path; re-exported as
//! `query::Answer`. A leaf, so the handlers need not import `mod.rs`.

use bytes::Bytes;

/// A computed answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// JSON body.
    pub body: Bytes,
    /// `Link` header value (only `GET /entities` with more pages).
    pub link: Option<String>,
}
