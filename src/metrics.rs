//! Metric names and the Prometheus recorder.
//!
//! Every metric the sidecar emits is named here and nowhere else, so that the
//! dashboards and alert rules in `config/` have one list to follow. Names are
//! in base units with `_total` on counters, as Prometheus expects.

/// Proxy requests by `route` and `outcome` (`hit`, `stale`, `miss`, `bypass`, `refused` (the sidecar's own 503), `error` (its own 4xx and 5xx)).
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
/// Counter: upstream requests the sync loop made, by kind (`id_walk`,
/// `by_refs`, `full_page`, `changes`, `generation`, `not_modified`).
pub const SYNC_REQUESTS_TOTAL: &str = "catalog_cache_sync_requests_total";
/// Counter: bytes the sync loop received from the upstream (as on the
/// wire, compressed if it was), by kind.
pub const SYNC_BYTES_TOTAL: &str = "catalog_cache_sync_bytes_total";
/// Gauge: 1 when the upstream is another catalog-cache tier.
pub const UPSTREAM_TIER: &str = "catalog_cache_upstream_tier";
/// Gauge: 1 when the upstream tier said its data was stale when last asked.
pub const UPSTREAM_STALE: &str = "catalog_cache_upstream_stale";
/// Entries in the hot cache.
pub const HOT_CACHE_ENTRIES: &str = "catalog_cache_hot_cache_entries";
/// Bytes held by the hot cache, as weighed against `hot_cache.max_bytes`.
pub const HOT_CACHE_BYTES: &str = "catalog_cache_hot_cache_bytes";
/// Gauge: tasks alive in the sidecar's tokio runtime (refreshed on every
/// scrape and every second); flat under steady load, so a climb is a task
/// leak.
pub const TOKIO_ALIVE_TASKS: &str = "catalog_cache_tokio_alive_tasks";
/// Always 1, labelled with the `version` of the running binary.
pub const BUILD_INFO: &str = "catalog_cache_build_info";

/// Latency buckets for proxy requests, seconds: local hits are sub-millisecond,
/// the revalidate budget is 250 ms, the upstream timeout 2 s.
pub const REQUEST_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Latency buckets for upstream calls, seconds.
pub const UPSTREAM_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
];
/// Duration buckets for syncs, seconds.
pub const SYNC_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns the
/// handle `/metrics` renders from.
pub fn install() -> metrics_exporter_prometheus::PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(REQUEST_DURATION_SECONDS.into()),
                    REQUEST_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(UPSTREAM_REQUEST_DURATION_SECONDS.into()),
                        UPSTREAM_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(SYNC_DURATION_SECONDS.into()),
                        SYNC_BUCKETS,
                    )
                })
                .expect("bucket lists are non-empty constants");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (several sidecars in
            // one test process); this handle then renders nothing, which
            // only tests can observe.
            let _ = metrics::set_global_recorder(recorder);
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// Describes every metric (HELP lines), once the recorder is installed.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        REQUESTS_TOTAL,
        "Proxy requests by route and outcome (hit, stale, miss, bypass, refused, error)."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Proxy request latency by route."
    );
    describe_counter!(
        UPSTREAM_REQUESTS_TOTAL,
        "Upstream calls by operation and result."
    );
    describe_histogram!(
        UPSTREAM_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Upstream call latency by operation."
    );
    describe_gauge!(BREAKER_STATE, "1 for the breaker's current state.");
    describe_gauge!(BREAKER_MODE, "1 for the operator's current breaker mode.");
    describe_counter!(BREAKER_TRANSITIONS_TOTAL, "Breaker state transitions.");
    describe_gauge!(STALE_POLICY, "1 for the stale-data policy in force.");
    describe_gauge!(
        TOKIO_ALIVE_TASKS,
        "Tasks alive in the sidecar's tokio runtime."
    );
    describe_gauge!(
        MIRROR_ENTITIES,
        "Entities in the current mirror generation."
    );
    describe_gauge!(
        MIRROR_DATA_AGE_SECONDS,
        Unit::Seconds,
        "Seconds since the upstream last confirmed the mirror."
    );
    describe_gauge!(MIRROR_GENERATION, "Current mirror generation number.");
    describe_counter!(
        SYNCS_TOTAL,
        "Syncs by result (applied, unchanged, failed, held)."
    );
    describe_histogram!(SYNC_DURATION_SECONDS, Unit::Seconds, "Sync duration.");
    describe_gauge!(SYNC_HELD_DELETIONS, "Entities a held sync would delete.");
    describe_counter!(
        SYNC_REQUESTS_TOTAL,
        "Upstream requests of the sync loop by kind (id_walk, by_refs, full_page, changes, generation, not_modified)."
    );
    describe_counter!(
        SYNC_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes the sync loop received from the upstream, as on the wire, by kind."
    );
    describe_gauge!(
        UPSTREAM_TIER,
        "1 when the upstream is another catalog-cache tier, 0 for a Backstage catalog."
    );
    describe_gauge!(
        UPSTREAM_STALE,
        "1 when the upstream tier said its data was stale when last asked."
    );
    describe_gauge!(HOT_CACHE_ENTRIES, "Entries in the hot cache.");
    describe_gauge!(
        HOT_CACHE_BYTES,
        Unit::Bytes,
        "Bytes held by the hot cache, bounded by hot_cache.max_bytes."
    );
    describe_gauge!(BUILD_INFO, "Build information; always 1.");
}

/// Per-thread handles of the request metrics, by (route, outcome).
type RequestHandles =
    std::collections::HashMap<(&'static str, &'static str), (metrics::Counter, metrics::Histogram)>;

thread_local! {
    static REQUEST_HANDLES: std::cell::RefCell<RequestHandles> = std::cell::RefCell::new(RequestHandles::new());
}

/// Counts one proxy request and its latency. The handles are looked up in
/// the recorder once per thread and label set, not on every request: this
/// runs on every local hit.
pub fn record_request(route: &'static str, outcome: &'static str, seconds: f64) {
    REQUEST_HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        let (counter, histogram) = handles.entry((route, outcome)).or_insert_with(|| {
            (
                metrics::counter!(REQUESTS_TOTAL, "route" => route, "outcome" => outcome),
                metrics::histogram!(REQUEST_DURATION_SECONDS, "route" => route),
            )
        });
        counter.increment(1);
        histogram.record(seconds);
    });
}
