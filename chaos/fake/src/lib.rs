//! catalog-fake: a Backstage-compatible demo catalog with fault injection,
//! the upstream of the sidecar's tests, `catalog-cache demo` (the only part
//! of the chaos tooling the sidecar's own build links) and the chaos runs of
//! `catalog-chaos`.
//!
//! Data flow: `generate` makes deterministic entities → `store` keeps them
//! as immutable indexed snapshots → `catalog` answers Backstage's read
//! semantics over a snapshot (using `filter` and `search`, a plain scan over
//! `serde_json::Value`, independent of the sidecar) → `fake` serves it over
//! HTTP under `/api/catalog`, shaped by `faults`, with `control` as the
//! separate operator listener. `routes` judges which requests are catalog
//! routes, so that anything else reaching the port is recorded.
//!
//! Invariant: this crate serves and shapes a catalog, nothing more. No
//! process control, no HTTP client, no shell-outs: those belong to the
//! runner, `catalog-chaos`.

mod catalog;
mod control;
pub mod fake;
pub mod faults;
pub mod filter;
pub mod generate;
pub mod routes;
pub mod search;
mod store;

pub use fake::{FakeCatalog, FakeCatalogHandle, FakeOptions, StartError, Stats};
pub use faults::{FaultSwitch, Faults, SlowBody};
pub use generate::generate;
