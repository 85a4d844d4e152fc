//! catalog-cache: a sidecar that keeps a durable mirror of a Backstage
//! catalog and answers the catalog API from it, through upstream outages.
// (architecture map is written once the modules land)

pub mod breaker;
pub mod cache;
pub mod config;
pub mod entity;
pub mod flags;
pub mod metrics;
pub mod mirror;
pub mod retry;
pub mod upstream;
