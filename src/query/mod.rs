//! Answers catalog queries from an `Index` with Backstage's semantics:
//! `GET /entities`, `GET|POST /entities/by-query`, `GET|POST /entity-facets`,
//! and the filter/fields half of `POST /entities/by-refs`. Called by the read
//! path with the raw query string and body; returns JSON bytes (entity bodies
//! spliced in unchanged unless `fields` projects them) or a `QueryError`,
//! which is always Backstage's 400 `InputError`. Never panics on input.
//!
//! Paging is keyset-based (`[sort value, uid]`), so a walk that continues on a
//! newer generation neither skips nor repeats an entity present in both —
//! except an entity whose own sort value changed between the pages, which may
//! be seen twice or not at all (Backstage behaves the same way).
//!
//! Deliberate differences from Backstage's SQL, each where its behaviour is
//! accidental: an empty `$any` matches nothing (knex drops the empty group and
//! matches everything; `@backstage/filter-predicates` says nothing); keys next
//! to `$all`/`$any`/`$not` are refused rather than silently dropped; walks
//! past entities without a sort value continue (SQL `NULL` comparisons end
//! them early) and backward pages are the exact reverse of forward ones; an
//! entity ordered by an array field sorts by its smallest value and appears
//! once; full-text terms are literal substrings (no `%`/`_` wildcards);
//! strings order by bytes of the lower-cased value (Backstage: the database
//! collation). Bounds: query string 64 KiB, body 1 MiB, cursor 64 KiB,
//! predicates nested at most 32 deep.
//!
//! Every evaluation runs within a `Budget` (a deadline): filters,
//! predicates, `$contains` scans, sorting, facets, full text and rendering
//! check it cooperatively, and an exceeded budget is `QueryError::Budget`,
//! never a partial answer. Memory per query is bounded too: sort columns
//! live in the index's byte-bounded cache (none for a field no entity has),
//! several order fields hold one column at a time, and the large answers
//! (unpaged `GET /entities`, by-refs) are a `Rendering` produced 64 KiB at
//! a time.
//!
//! Layout, one noun a file, no import cycle: this file is the dispatcher
//! (`answer`) and the request types; `error`, `budget`, `limits` and
//! `json_path` are leaves every other file may use (`error` and `budget`
//! the index too); `params` is the query-string codec, `body` the JSON
//! bodies; `filter`, `predicate` and `cursor` (public, for the fuzz targets)
//! are the query languages and the cursor; `fields` is projection,
//! `rendering` the chunked rendering of entity lists, `response` the answer;
//! the handlers are `entities` (`GET /entities`), `page` (by-query),
//! `facets` and `by_refs`. Only this file imports the handlers, and no file
//! but its tests imports this one.

mod body;
pub(crate) mod budget;
mod by_refs;
pub mod cursor;
mod entities;
pub(crate) mod error;
mod facets;
mod fields;
pub mod filter;
mod json_path;
mod limits;
mod page;
mod params;
pub mod predicate;
mod rendering;
mod response;

pub use budget::Budget;
pub use by_refs::{parse_by_refs, render_by_refs, ByRefsRequest};
pub use error::QueryError;
pub use limits::{DEFAULT_LIMIT, MAX_BODY, MAX_QUERY_STRING};
pub use rendering::Rendering;
pub use response::{Answer, Body};

use crate::index::Index;
use params::Params;

/// Which catalog query is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    /// `GET /entities`.
    GetEntities,
    /// `GET /entities/by-query`.
    GetByQuery,
    /// `POST /entities/by-query`.
    PostByQuery,
    /// `GET /entity-facets`.
    GetFacets,
    /// `POST /entity-facets`.
    PostFacets,
}

/// A query as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct QueryRequest<'a> {
    /// Which endpoint.
    pub kind: QueryKind,
    /// Raw, undecoded query string, without `?`.
    pub query_string: &'a str,
    /// Request body (empty for GET).
    pub body: &'a [u8],
}

/// Answers one query against one generation, within `budget` (an exceeded
/// budget is `QueryError::Budget`, never a partial answer; a `Body::Stream`
/// keeps checking it while it renders). Blocks while the generation's query
/// index is still being built (`Index::is_query_ready`): call it from a
/// blocking context then, never straight on an async worker.
pub fn answer(
    index: &Index,
    req: &QueryRequest<'_>,
    budget: &Budget,
) -> Result<Answer, QueryError> {
    let params = Params::parse(req.query_string)?;
    if req.body.len() > MAX_BODY {
        return Err(QueryError::TooLarge(format!(
            "Request body too large, at most {MAX_BODY} bytes"
        )));
    }
    match req.kind {
        QueryKind::GetEntities => entities::get_entities(index, &params, req.query_string, budget),
        QueryKind::GetByQuery => page::get_by_query(index, &params, budget),
        QueryKind::PostByQuery => page::post_by_query(index, &params, req.body, budget),
        QueryKind::GetFacets => facets::get_facets(index, &params, budget),
        QueryKind::PostFacets => facets::post_facets(index, &params, req.body, budget),
    }
}

#[cfg(test)]
mod tests;
