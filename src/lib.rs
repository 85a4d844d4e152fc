//! catalog-cache: a sidecar that keeps a durable mirror of a Backstage
//! catalog and answers the catalog API from it, through upstream outages.
//!
//! Data flow:
//!
//! ```text
//!             upstream Backstage catalog
//!                ▲               ▲
//!   sync pages   │               │  revalidations, query forwards,
//!  (Syncer)      │               │  read-through, pass-through
//!                │   upstream ── breaker      (one place asks the upstream)
//!                │               ▲
//!   sync ──▶ mirror (SQLite) ──▶ generation ──▶ read ◀── proxy ◀── clients (:7070)
//!               │  flags, audit   (index)       ▲  │
//!               ▼                               │  └─▶ hot cache (moka)
//!             admin ◀── operators (:7071)     flags (stale policy)
//! ```
//!
//! Where each decision is made:
//!
//! - [`config`] (with [`units`]): defaults, TOML, `CATALOG_CACHE_*` overrides, validation.
//! - [`clock`]: every wall-clock read; tests move it.
//! - [`upstream`]: the HTTP(S) client ([`tls`] for its trust); every upstream call goes
//!   through it and the [`breaker`] (admission and the state machine), retrying through [`retry`]
//!   (the one place the `backoff` crate is used).
//! - [`mirror`]: the SQLite file: generations, flags, audit, read-through store; [`snapshot`]:
//!   export, import, seeding from a peer.
//! - [`generation`]: the generation readers are served from, swapped atomically; [`index`]: its
//!   in-memory query index, holding the bodies packed by [`codec`], built on the [`pool`] of
//!   long-lived worker threads; [`query`]: Backstage's query
//!   semantics over it (with [`query::filter`], [`query::predicate`], [`query::cursor`]).
//! - [`sync`]: the sync loop, what a sync applies, and the mass-deletion guard.
//! - [`read`]: the read path — `decide` is where fresh, ask, stale or refuse is decided;
//!   [`cache`]: the hot cache of upstream answers.
//! - [`flags`]: the operator's persisted, audited breaker mode and stale policy.
//! - [`proxy`] and [`admin`]: the two listeners; [`route`]: Backstage's catalog routes, the only
//!   paths served and sent upstream; [`server`]: connections, timeouts and in-flight limits;
//!   [`api_error`]: the one place an error becomes an HTTP response; [`health`]: readiness;
//!   [`history`]: the last hour, second by second, for the status page; [`metrics`]: metric names.
//! - [`sidecar`]: the composition root (opens, wires, runs); [`cli`], [`demo`]: the commands.

pub mod admin;
pub mod api_error;
pub mod breaker;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod codec;
pub mod config;
pub mod demo;
pub mod entity;
pub mod extension;
pub mod flags;
pub mod generation;
pub mod health;
pub mod history;
pub mod index;
pub mod metrics;
pub mod mirror;
pub mod pool;
pub mod provenance;
pub mod proxy;
pub mod query;
pub mod read;
pub mod retry;
pub mod route;
pub mod server;
pub mod sidecar;
pub mod snapshot;
pub mod sync;
pub mod tls;
pub mod units;
pub mod upstream;
pub mod writes;
