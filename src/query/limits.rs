//! The query module's input bounds and default page size. Used by the
//! dispatcher (`answer`), the query-string codec (`params`), by-query paging
//! (`page`) and by-refs; re-exported as `query::MAX_BODY` etc. A leaf: it
//! imports nothing, so the modules that enforce a bound need not import
//! `mod.rs`, which imports them.

/// Longest raw query string accepted.
pub const MAX_QUERY_STRING: usize = 64 * 1024;
/// Longest request body accepted (the proxy's own limit is 1 MiB).
pub const MAX_BODY: usize = 1024 * 1024;
/// `by-query` page size when none is given (Backstage's default).
pub const DEFAULT_LIMIT: usize = 200;
