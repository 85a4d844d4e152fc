//! The sidecar end to end: a demo catalog and a sidecar, both in-process on
//! loopback, driven over real HTTP.
//!
//! `spine` proves the read path, the sync loop and the proxy surface while
//! the upstream is healthy (and the headers that say how each answer was
//! made); `resilience` proves what happens when it is not: faults, the
//! breaker, the stale-data flag, overrides, audit, readiness and metrics.

mod support;

#[path = "sidecar/spine.rs"]
mod spine;

#[path = "sidecar/resilience.rs"]
mod resilience;

#[path = "sidecar/packaging.rs"]
mod packaging;

#[path = "sidecar/https.rs"]
mod https;
