//! Metric names and the Prometheus recorder.
//!
//! Every metric the sidecar emits is named here and nowhere else, so that the
//! dashboards and alert rules in `config/` have one list to follow. Names are
//! in base units with `_total` on counters, as Prometheus expects.

/// Proxy requests by `route` and `outcome` (`hit`, `stale`, `miss`, `bypass`, `error`).
pub const REQUESTS_TOTAL: &str = "catalog_cache_requests_total";
/// Proxy request latency by `route`, seconds.
pub const REQUEST_DURATION_SECONDS: &str = "catalog_cache_request_duration_seconds";
/// Calls to the upstream by `operation` and `result` (`ok`, `not_found`, `error`, `timeout`, `rejected`).
pub const UPSTREAM_REQUESTS_TOTAL: &str = "catalog_cache_upstream_requests_total";
/// Upstream call latency by `operation`, seconds.
pub const UPSTREAM_REQUEST_DURATION_SECONDS: &str =
    "catalog_cache_upstream_request_duration_seconds";
/// 1 for the breaker's current `state` (`closed`, `open`, `half_open`), 0 for the others.
pub const BREAKER_STATE: &str = "catalog_cache_breaker_state";
/// 1 for the operator's current breaker `mode` (`auto`, `open`, `closed`), 0 for the others.
pub const BREAKER_MODE: &str = "catalog_cache_breaker_mode";
/// Breaker transitions by `from` and `to` state.
pub const BREAKER_TRANSITIONS_TOTAL: &str = "catalog_cache_breaker_transitions_total";
/// 1 for the current stale `policy` (`serve`, `refuse`), 0 for the other.
pub const STALE_POLICY: &str = "catalog_cache_stale_policy";
/// Entities in the current mirror generation.
pub const MIRROR_ENTITIES: &str = "catalog_cache_mirror_entities";
/// Seconds since the upstream last confirmed the current generation.
pub const MIRROR_DATA_AGE_SECONDS: &str = "catalog_cache_mirror_data_age_seconds";
/// The current mirror generation number.
pub const MIRROR_GENERATION: &str = "catalog_cache_mirror_generation";
/// Syncs by `result` (`applied`, `unchanged`, `failed`, `held`).
pub const SYNCS_TOTAL: &str = "catalog_cache_syncs_total";
/// Duration of a sync attempt, seconds.
pub const SYNC_DURATION_SECONDS: &str = "catalog_cache_sync_duration_seconds";
/// Entities a held sync would delete (0 when no deletion is held).
pub const SYNC_HELD_DELETIONS: &str = "catalog_cache_sync_held_deletions";
/// Entries in the hot cache.
pub const HOT_CACHE_ENTRIES: &str = "catalog_cache_hot_cache_entries";
/// Always 1, labelled with the `version` of the running binary.
pub const BUILD_INFO: &str = "catalog_cache_build_info";
