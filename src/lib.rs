//! catalog-cache: a sidecar that keeps a durable mirror of a Backstage
//! catalog and answers the catalog API from it, through upstream outages.
// (architecture map is written once the modules land)

pub mod admin;
pub mod breaker;
pub mod cache;
pub mod cli;
pub mod config;
pub mod demo;
pub mod entity;
pub mod flags;
pub mod health;
pub mod index;
pub mod metrics;
pub mod mirror;
pub mod proxy;
pub mod query;
pub mod read;
pub mod retry;
pub mod sidecar;
pub mod sync;
pub mod upstream;
