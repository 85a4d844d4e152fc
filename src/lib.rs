//! catalog-cache: a sidecar that keeps a durable mirror of a Backstage
//! catalog and answers the catalog API from it, through upstream outages.
//!
//! Data flow:
//!
//! ```text
//!             upstream Backstage catalog
//!                ▲               ▲
//!   sync pages   │               │  revalidations, query forwards,
//!  (sync loop)   │               │  read-through, pass-through
//!                │   upstream ── breaker      (one place asks the upstream)
//!                │               ▲
//!   sync ──▶ mirror (SQLite) ──▶ index ──▶ read ◀── proxy ◀── clients (:7070)
//!               │  flags, audit    ▲        ▲ │
//!               ▼                  │        │ └─▶ hot cache (moka)
//!             admin ◀── operators (:7071)   flags (stale policy)
//! ```
//!
//! - [`config`]: defaults, TOML, `CATALOG_CACHE_*` overrides, validation.
//! - [`upstream`]: the HTTP(S) client; every upstream call goes through it and the [`breaker`].
//! - [`retry`]: the one place the `backoff` crate is used.
//! - [`mirror`]: the SQLite file: generations, flags, audit, read-through store, snapshots.
//! - [`index`] and [`query`] (with [`query::filter`], [`query::predicate`], [`query::cursor`]): the
//!   in-memory index of one generation and Backstage's query semantics over it.
//! - [`cache`]: the hot cache of upstream answers (revalidated entities, 404s, read-through).
//! - [`sync`]: the sync loop and the mass-deletion guard.
//! - [`read`]: the read path — the one place that decides fresh, revalidate, stale or 503.
//! - [`flags`]: the operator's persisted, audited breaker mode and stale policy.
//! - [`proxy`] and [`admin`]: the two listeners; [`health`]: readiness; [`metrics`]: metric names.
//! - [`sidecar`]: shared state and lifecycle; [`cli`], [`demo`]: the commands.

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
