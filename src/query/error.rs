//! `QueryError`, the one error of the query module: every variant but
//! `Budget` is a client error, answered as Backstage's 400 `InputError`.
//! Returned by every parser and handler under `query` (filter, predicate,
//! cursor, parameters, bodies) and by an exceeded `Budget`; re-exported as
//! `query::QueryError`. Imports nothing from the query modules, so each of
//! them (and the index) can depend on it without a cycle.

/// Why a query cannot be answered. Every variant but `Budget` is a client
/// error (400 `InputError`); the message is Backstage's wording where it has
/// one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A bad `filter` parameter.
    #[error("{0}")]
    Filter(String),
    /// A bad predicate (`query`).
    #[error("{0}")]
    Predicate(String),
    /// An unreadable `cursor`.
    #[error("Malformed cursor: {0}")]
    Cursor(String),
    /// A bad parameter (limit, offset, order, fields, facet, after).
    #[error("{0}")]
    Param(String),
    /// A bad request body.
    #[error("{0}")]
    Body(String),
    /// Input larger than the stated bounds.
    #[error("{0}")]
    TooLarge(String),
    /// Evaluation ran past its `Budget` (`proxy.query_budget`); nothing
    /// partial was answered.
    #[error(
        "Query evaluation stopped after {} (proxy.query_budget); narrow the filter or ask for fewer entities per page",
        humantime::format_duration(*limit)
    )]
    Budget {
        /// The budget that ran out.
        limit: std::time::Duration,
    },
}
