//! catalog-chaos: a Backstage-compatible demo catalog with fault injection,
//! shared by the sidecar's tests, `catalog-cache demo` and the chaos runs.
//!
//! Data flow: `generate` makes deterministic entities → `store` keeps them
//! as immutable indexed snapshots → `catalog` answers Backstage's read
//! semantics over a snapshot (using `filter` and `search`, a plain scan over
//! `serde_json::Value`, independent of the sidecar) → `fake` serves it over
//! HTTP under `/api/catalog`, shaped by `faults`, with `control` as the
//! separate operator listener. `scenario` (the harness: child processes,
//! readers, status sampling) and `scenarios` (the faults and their
//! invariants) make `catalog-chaos run`.

mod catalog;
mod control;
pub mod fake;
pub mod faults;
pub mod filter;
pub mod generate;
pub mod scenario;
pub mod scenarios;
pub mod search;
mod store;

pub use fake::{FakeCatalog, FakeCatalogHandle, FakeOptions, StartError, Stats};
pub use faults::{FaultSwitch, Faults, SlowBody};
pub use generate::generate;
