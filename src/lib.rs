//! catalog-cache: a sidecar that keeps a durable mirror of a Backstage
//! catalog and answers the catalog API from it, through upstream outages.
// (architecture map is written once the modules land)

pub mod cursor;
pub mod entity;
pub mod filter;
pub mod index;
pub mod metrics;
pub mod predicate;
pub mod query;
