//! The read path ([`ReadPath`]): the one place that decides where an answer
//! comes from and whether it is stale.
//!
//! Fresh local data (younger than `freshness.fresh_for`) is served at once.
//! Older or absent data is asked of the upstream — concurrent reads of one
//! key share one upstream call, and no read waits longer than
//! `freshness.revalidate_budget`; the call itself carries on in the
//! background so that its answer is stored and the breaker hears its outcome.
//! When the upstream cannot answer, the local copy is served marked stale if
//! the stale policy allows it and it is younger than `max_stale`, else 503.
//! That decision is [`decide`], a pure function of the local copy's age, the
//! breaker's admission, the stale policy and the clock. Methods return
//! `Result<Answer, ReadError>`; the proxy turns either into HTTP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{BoxStream, StreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::api_error::ErrorKind;
use crate::cache::{HotCache, HotEntry, HotKey};
use crate::clock::Clock;
use crate::config::{Config, StalePolicy};
use crate::entity::{Entity, EntityRef};
use crate::flags::Flags;
use crate::generation::Generations;
use crate::mirror::{Mirror, StoreLimits, StoredAnswer};
use crate::provenance::Confirmation;
use crate::query::{self, Budget, QueryKind, QueryRequest};
use crate::route::{by_name_path, Route};
use crate::sync::SyncStatus;
use crate::upstream::{
    Expect, Operation, Upstream, UpstreamError, UpstreamRequest, UpstreamResponse,
};
use crate::writes::WriteMarks;

/// Why an upstream's word that a mirrored entity is gone is not taken.
const DOUBTED: &str = "it reports missing entities the mirror holds while a mass deletion is held";

/// How an answer was obtained, as `Cache-Status` (RFC 9211) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Fresh local data: `catalog-cache; hit`.
    Hit,
    /// Local data the upstream could not confirm: `catalog-cache; hit; ttl=-N`.
    StaleHit {
        /// Remaining freshness in seconds (negative).
        ttl: i64,
    },
    /// Not held locally, fetched and stored: `catalog-cache; fwd=miss; stored`.
    Stored,
    /// Not held locally, fetched, not stored (a 404): `catalog-cache; fwd=miss; fwd-status=404`.
    Miss {
        /// The upstream's status.
        status: u16,
    },
    /// Held locally but too old, confirmed with the upstream:
    /// `catalog-cache; fwd=stale; fwd-status=200`.
    Revalidated {
        /// The upstream's status.
        status: u16,
    },
    /// Passed through: `catalog-cache; fwd=bypass`.
    Bypass,
    /// The sidecar could not answer at all (503 of its own).
    Unavailable,
}

impl CacheStatus {
    /// This cache's `Cache-Status` member, under its name (`listen.name`).
    pub fn member(self, name: &str) -> String {
        match self {
            Self::Hit => format!("{name}; hit"),
            Self::StaleHit { ttl } => format!("{name}; hit; ttl={ttl}"),
            Self::Stored => format!("{name}; fwd=miss; stored"),
            Self::Miss { status } => format!("{name}; fwd=miss; fwd-status={status}"),
            Self::Revalidated { status } => format!("{name}; fwd=stale; fwd-status={status}"),
            Self::Bypass => format!("{name}; fwd=bypass"),
            Self::Unavailable => format!("{name}; fwd=uri-miss; detail=upstream-unavailable"),
        }
    }

    /// The `outcome` label of the requests metric.
    pub fn outcome(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::StaleHit { .. } => "stale",
            Self::Stored | Self::Miss { .. } | Self::Revalidated { .. } => "miss",
            Self::Bypass => "bypass",
            Self::Unavailable => "refused",
        }
    }
}

/// Chunks of a large body, rendered as the client reads them.
pub type ChunkStream = BoxStream<'static, Result<Bytes, query::QueryError>>;

/// An answer's body: bytes, or a large rendering (an unpaged `GET
/// /entities`, a big by-refs) streamed a chunk at a time, so that it is
/// never held whole in memory.
pub enum Payload {
    /// The whole body.
    Bytes(Bytes),
    /// Rendered as it is sent; an error mid-way aborts the response.
    Stream {
        /// The chunks.
        chunks: ChunkStream,
        /// How many of the listed items are `null` (by-refs).
        nulls: usize,
    },
}

impl Payload {
    /// The body, when it is held whole.
    pub fn bytes(&self) -> Option<&Bytes> {
        match self {
            Payload::Bytes(b) => Some(b),
            Payload::Stream { .. } => None,
        }
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Self {
        Payload::Bytes(bytes)
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Payload::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Payload::Stream { nulls, .. } => write!(f, "Stream {{ nulls: {nulls} }}"),
        }
    }
}

/// A complete answer of the read path (any status the upstream or the
/// mirror gave; the sidecar's own errors are [`ReadError`]s).
#[derive(Debug)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Headers to send besides the staleness ones (content type, Link, …).
    pub headers: HeaderMap,
    /// Body.
    pub body: Payload,
    /// How it was obtained.
    pub cache: CacheStatus,
    /// How long ago the origin catalog last confirmed the data.
    pub age: Duration,
    /// Whether the data is stale (the `X-Catalog-Stale` header).
    pub stale: bool,
    /// The upstream's `Cache-Status` members, when the upstream is a cache.
    pub via: Option<Arc<str>>,
}

/// A read the sidecar answers with an error of its own.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadError {
    /// The request is malformed (400): the client's fault, retrying the
    /// same request cannot help.
    Input(String),
    /// The entity is not in the mirror, which stands in for an upstream
    /// that cannot answer (404, marked stale: the mirror is the last known
    /// truth).
    NotFound {
        /// Backstage's wording.
        message: String,
        /// How long ago the upstream last confirmed the mirror.
        age: Duration,
        /// Remaining freshness in seconds (negative).
        ttl: i64,
    },
    /// Neither the upstream nor the mirror may answer (503): retrying after
    /// `retry_after` may help.
    Unavailable {
        /// What the upstream did and why the mirror may not answer.
        message: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// What was asked for is no longer held (410; the tier extension's
    /// changes feed): the caller starts over.
    Gone(String),
    /// Something broke inside the sidecar (500).
    Internal(String),
}

impl ReadError {
    /// Which of Backstage's errors this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Input(_) => ErrorKind::Input,
            Self::NotFound { .. } => ErrorKind::NotFound,
            Self::Unavailable { .. } => ErrorKind::Unavailable,
            Self::Gone(_) => ErrorKind::Gone,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The message for the error body.
    pub fn message(&self) -> &str {
        match self {
            Self::Input(m) | Self::Gone(m) | Self::Internal(m) => m,
            Self::NotFound { message, .. } | Self::Unavailable { message, .. } => message,
        }
    }

    /// `Retry-After`, for a 503.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Unavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// How the answer was obtained, for the staleness headers:
    /// `(Cache-Status, Age, X-Catalog-Stale)`.
    pub fn served(&self) -> (CacheStatus, Duration, bool) {
        match self {
            Self::NotFound { age, ttl, .. } => (CacheStatus::StaleHit { ttl: *ttl }, *age, true),
            Self::Unavailable { .. } => (CacheStatus::Unavailable, Duration::ZERO, false),
            Self::Input(_) | Self::Gone(_) | Self::Internal(_) => {
                (CacheStatus::Hit, Duration::ZERO, false)
            }
        }
    }
}

// ------------------------------------------------------------- the decision

/// What the read path knows locally, as the decision sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    /// A copy, and how it was last confirmed.
    Found {
        /// When the origin confirmed it, when the upstream was last asked,
        /// and whether the upstream said it was stale.
        confirmed: Confirmation,
    },
    /// A complete mirror generation, confirmed so, that does not hold the
    /// entity asked for.
    AbsentFromMirror {
        /// How the generation was last confirmed.
        confirmed: Confirmation,
    },
    /// Nothing: no generation yet, or data the mirror cannot compute.
    Unknown,
}

impl Local {
    /// A copy the origin confirmed directly at `at` (a Backstage upstream).
    pub fn found(at: SystemTime) -> Self {
        Self::Found {
            confirmed: at.into(),
        }
    }

    /// A generation without the entity, confirmed directly at `at`.
    pub fn absent(at: SystemTime) -> Self {
        Self::AbsentFromMirror {
            confirmed: at.into(),
        }
    }
}

/// Whether the upstream can be asked now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamState {
    /// The breaker would admit a call.
    Admits,
    /// The breaker refuses calls, or the upstream failed or ran past the
    /// revalidate budget.
    Unavailable,
}

/// The rules a decision applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// `freshness.fresh_for`.
    pub fresh_for: Duration,
    /// The stale policy in force.
    pub policy: StalePolicy,
    /// The oldest data ever served.
    pub max_stale: Duration,
}

/// What a read does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Serve the local copy as fresh.
    Fresh,
    /// Ask the upstream, waiting at most the revalidate budget.
    Ask,
    /// Serve the local copy, marked stale.
    Stale {
        /// How long ago the upstream last confirmed it.
        age: Duration,
        /// Remaining freshness in seconds (negative).
        ttl: i64,
    },
    /// Answer Backstage's 404 from the mirror, marked stale.
    StaleNotFound {
        /// How long ago the upstream last confirmed the mirror.
        age: Duration,
        /// Remaining freshness in seconds (negative).
        ttl: i64,
    },
    /// Answer 503.
    Refuse(Refusal),
}

/// Why a read is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Nothing is held locally.
    NoCopy,
    /// The stale policy is `refuse`.
    Policy,
    /// The local copy is older than `max_stale`.
    TooOld {
        /// Its age.
        age: Duration,
        /// The limit.
        max_stale: Duration,
    },
}

impl Refusal {
    /// The second half of the 503's message.
    fn detail(self) -> String {
        match self {
            Self::NoCopy => "the mirror holds no copy of this".into(),
            Self::Policy => "the stale-data policy is 'refuse', so mirror data the upstream cannot confirm is not served".into(),
            Self::TooOld { age, max_stale } => format!(
                "the mirror's copy is {} old, older than max_stale ({})",
                humantime::format_duration(Duration::from_secs(age.as_secs())),
                humantime::format_duration(max_stale)
            ),
        }
    }
}

/// Where a read's answer comes from: local data the origin confirmed less
/// than `fresh_for` ago, and that the upstream did not call stale, is
/// served; older or absent data is asked of the upstream while the breaker
/// admits calls — unless the upstream is a tier that called this very copy
/// stale less than `fresh_for` ago (asking again would hear the same);
/// otherwise the local copy (or the mirror's "not found") is served stale
/// when the policy allows and it is younger than `max_stale`, else refused.
/// Ages are always the origin's: a tier's `Age` is part of them.
pub fn decide(local: &Local, upstream: UpstreamState, rules: &Rules, now: SystemTime) -> Decision {
    let age_of = |at: SystemTime| now.duration_since(at).unwrap_or_default();
    let confirmed = match local {
        Local::Found { confirmed }
            if confirmed.trusted() && age_of(confirmed.origin_at) < rules.fresh_for =>
        {
            return Decision::Fresh
        }
        Local::Found { confirmed }
            if confirmed.upstream_stale
                && !confirmed.written_since
                && age_of(confirmed.checked_at) < rules.fresh_for =>
        {
            confirmed
        }
        _ if upstream == UpstreamState::Admits => return Decision::Ask,
        Local::Found { confirmed } | Local::AbsentFromMirror { confirmed } => confirmed,
        Local::Unknown => return Decision::Refuse(Refusal::NoCopy),
    };
    let age = age_of(confirmed.origin_at);
    if rules.policy == StalePolicy::Refuse {
        return Decision::Refuse(Refusal::Policy);
    }
    if age > rules.max_stale {
        return Decision::Refuse(Refusal::TooOld {
            age,
            max_stale: rules.max_stale,
        });
    }
    let ttl = (rules.fresh_for.as_secs() as i64 - age.as_secs() as i64).min(-1);
    match local {
        Local::AbsentFromMirror { .. } => Decision::StaleNotFound { age, ttl },
        _ => Decision::Stale { age, ttl },
    }
}

// ------------------------------------------------------------- the read path

/// What a read holds locally before asking the upstream: the local answer
/// (or the mirror's "not found") to fall back on.
enum Held {
    /// A local answer and how it was last confirmed.
    Copy {
        answer: Answer,
        confirmed: Confirmation,
    },
    /// The mirror's complete generation (confirmed so) does not hold the
    /// entity; Backstage's wording for its 404.
    Absent {
        confirmed: Confirmation,
        message: String,
    },
    /// Nothing.
    Nothing,
}

impl Held {
    fn local(&self) -> Local {
        match self {
            Held::Copy { confirmed, .. } => Local::Found {
                confirmed: confirmed.clone(),
            },
            Held::Absent { confirmed, .. } => Local::AbsentFromMirror {
                confirmed: confirmed.clone(),
            },
            Held::Nothing => Local::Unknown,
        }
    }
}

/// Keeps what the upstream answered: in the hot cache at once, in the
/// mirror file in the background.
#[derive(Clone)]
struct Keeper {
    hot: HotCache,
    mirror: Arc<Mirror>,
    clock: Clock,
    limits: StoreLimits,
}

impl Keeper {
    /// How an answer received now was confirmed.
    fn confirmation(&self, response: &UpstreamResponse) -> Confirmation {
        Confirmation::received(&response.provenance, self.clock.now())
    }

    /// An entity the upstream just returned, confirmed so.
    fn entity(&self, entity: Arc<Entity>, confirmed: Confirmation) {
        let at = confirmed.origin_at;
        self.hot.put_entity(entity.clone(), confirmed);
        let mirror = self.mirror.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = mirror.store_entity(&entity, at) {
                tracing::warn!(error = %e, uid = %entity.uid, "cannot store a revalidated entity");
            }
        });
    }

    /// An upstream 404 for `key`, remembered for `negative_ttl`.
    fn missing(&self, key: &str, body: Bytes) {
        self.hot.put_missing(key, body, self.clock.now());
    }

    /// A read-through answer for `key`.
    fn answer(&self, key: &str, response: &UpstreamResponse) {
        let answer = Arc::new(StoredAnswer {
            status: response.status.as_u16(),
            content_type: response
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: response.body.clone(),
            // The origin's time, so that a tier's age counts here too.
            stored_at: self.confirmation(response).origin_at,
        });
        self.hot.put_answer(key, answer.clone());
        let mirror = self.mirror.clone();
        let key = key.to_string();
        let limits = self.limits;
        tokio::task::spawn_blocking(move || {
            if let Err(e) = mirror.store_answer(&key, &answer, &limits) {
                tracing::warn!(error = %e, key = %key, "cannot store a read-through answer");
            }
        });
    }
}

/// Why a shared upstream call produced no response.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    /// The upstream's fault (or the breaker's refusal).
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The task making the call died: the sidecar's fault.
    #[error("the upstream call's task failed: {0}")]
    Task(String),
}

type FetchResult = Result<Arc<UpstreamResponse>, Arc<FetchError>>;
type SharedFetch = Shared<BoxFuture<'static, FetchResult>>;

/// What to do with an upstream answer once it arrives (even if no reader
/// is still waiting for it).
type OnFetched = Box<dyn FnOnce(&Keeper, &UpstreamResponse) + Send>;

/// One upstream call a read may make.
struct Fetch {
    /// What concurrent identical calls share one call by.
    key: String,
    request: UpstreamRequest,
    op: Operation,
    on_fetched: OnFetched,
}

/// Calls in flight, by key: concurrent reads of one key share one call.
#[derive(Default)]
struct InFlight {
    calls: Mutex<HashMap<String, SharedFetch>>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SharedFetch>> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A request the proxy hands to the read path.
pub struct Incoming<'a> {
    /// Method.
    pub method: &'a Method,
    /// The catalog route it asks for: the only thing the upstream is ever
    /// asked (its path is rebuilt from the parsed parameters).
    pub route: &'a Route,
    /// Path below the catalog mount as sent, e.g. `/entities/by-query`.
    pub path: &'a str,
    /// Raw query string (without `?`), empty when none.
    pub query: &'a str,
    /// Caller's headers (for pass-through).
    pub headers: &'a HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Incoming<'_> {
    /// What concurrent identical requests share one upstream call by.
    fn key(&self) -> String {
        format!(
            "{} {}\n{}",
            self.method,
            self.path_and_query(),
            String::from_utf8_lossy(&self.body)
        )
    }

    /// Path and query as the upstream and error bodies see them.
    pub fn path_and_query(&self) -> String {
        if self.query.is_empty() {
            self.path.to_string()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
}

/// Which entity a read asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// `GET /entities/by-name/{kind}/{namespace}/{name}` (case-insensitive).
    ByName(EntityRef),
    /// `GET /entities/by-uid/{uid}`.
    ByUid(String),
}

/// The read path's settings (from `[freshness]` and `[breaker]`).
#[derive(Debug, Clone, Copy)]
pub struct ReadSettings {
    /// `freshness.fresh_for`.
    pub fresh_for: Duration,
    /// `freshness.revalidate_budget`.
    pub revalidate_budget: Duration,
    /// `breaker.open_for`: the `Retry-After` of a 503 when the upstream
    /// named none.
    pub retry_after: Duration,
    /// `proxy.query_budget`: the longest one query is evaluated.
    pub query_budget: Duration,
    /// Queries evaluated at once (`proxy.query_concurrency`, resolved).
    pub query_threads: usize,
    /// What the read-through store may hold (`[read_through]`).
    pub read_through: StoreLimits,
}

impl ReadSettings {
    /// The settings of `config`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            fresh_for: config.freshness.fresh_for.get(),
            revalidate_budget: config.freshness.revalidate_budget.get(),
            retry_after: config.breaker.open_for,
            query_budget: config.proxy.query_budget.get(),
            query_threads: config.proxy.query_threads(),
            read_through: StoreLimits {
                max_age: config.read_through.max_age.get(),
                max_entries: config.read_through.max_entries,
                max_bytes: config.read_through.max_bytes.0,
            },
        }
    }
}

/// The read path and what it needs: the current generation, the hot cache,
/// the upstream, the operator's flags, the sync loop's status, the mirror
/// (to keep revalidated answers) and the clock.
pub struct ReadPath {
    settings: ReadSettings,
    generations: Arc<Generations>,
    hot: HotCache,
    upstream: Arc<Upstream>,
    flags: Arc<Flags>,
    sync: Arc<SyncStatus>,
    keeper: Keeper,
    clock: Clock,
    inflight: Arc<InFlight>,
    /// Query evaluation slots: queries run on blocking threads, at most
    /// this many at once, never on the async workers.
    queries: Arc<tokio::sync::Semaphore>,
    /// What writes passed through since the data was confirmed.
    writes: Arc<WriteMarks>,
}

/// The entity a lookup names, from the hot cache or the generation
/// (whichever was confirmed later), with the marks of writes since.
fn find_in(
    generations: &Generations,
    hot_cache: &HotCache,
    writes: &WriteMarks,
    lookup: &Lookup,
) -> Option<(Arc<Entity>, Confirmation)> {
    let generation = generations.current();
    let hot = !hot_cache.is_empty();
    let (hot_key, from_generation) = match lookup {
        Lookup::ByName(r) => {
            let canonical = r.canonical();
            let found = generation
                .as_ref()
                .and_then(|g| g.by_ref(&canonical).map(|(e, at)| (e.clone(), at)));
            (hot.then(|| HotKey::Ref(canonical.into())), found)
        }
        Lookup::ByUid(uid) => {
            let found = generation
                .as_ref()
                .and_then(|g| g.by_uid(uid).map(|(e, at)| (e.clone(), at)));
            (hot.then(|| HotKey::Uid(uid.as_str().into())), found)
        }
    };
    let from_hot = match hot_key.and_then(|k| hot_cache.get(&k)) {
        Some(HotEntry::Entity { entity, confirmed }) => Some((entity, confirmed)),
        _ => None,
    };
    let mut found = match (from_hot, from_generation) {
        (Some(h), Some(g)) => Some(if h.1.checked_at > g.1.checked_at {
            h
        } else {
            g
        }),
        (h, g) => h.or(g),
    };
    if writes.any() {
        if let Some(g) = &generation {
            writes.forget_before(g.meta.synced_at);
        }
        if let Some((entity, confirmed)) = &mut found {
            confirmed.written_since =
                writes.entity_written_since(&entity.uid, &entity.entity_ref, confirmed.origin_at);
        }
    }
    found
}

fn json_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h
}

impl ReadPath {
    /// A read path over these parts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: ReadSettings,
        generations: Arc<Generations>,
        hot: HotCache,
        upstream: Arc<Upstream>,
        flags: Arc<Flags>,
        sync: Arc<SyncStatus>,
        mirror: Arc<Mirror>,
        clock: Clock,
    ) -> Self {
        Self {
            settings,
            generations,
            keeper: Keeper {
                hot: hot.clone(),
                mirror,
                clock: clock.clone(),
                limits: settings.read_through,
            },
            hot,
            upstream,
            flags,
            sync,
            clock,
            inflight: Arc::default(),
            queries: Arc::new(tokio::sync::Semaphore::new(settings.query_threads.max(1))),
            writes: Arc::new(WriteMarks::default()),
        }
    }

    /// How a generation was confirmed, with the writes since counted.
    fn generation_confirmation(&self, meta: &crate::mirror::GenerationMeta) -> Confirmation {
        let mut confirmed = meta.confirmation();
        if self.writes.any() {
            self.writes.forget_before(meta.synced_at);
            confirmed.written_since = self.writes.any_since(meta.synced_at);
        }
        confirmed
    }

    fn age_of(&self, confirmed_at: SystemTime) -> Duration {
        self.clock.since(confirmed_at)
    }

    /// Fresh: the origin confirmed it less than `fresh_for` ago and the
    /// upstream did not call it stale.
    fn is_fresh(&self, confirmed: &Confirmation) -> bool {
        confirmed.trusted() && self.age_of(confirmed.origin_at) < self.settings.fresh_for
    }

    /// Whether the upstream is a tier that called this data stale less than
    /// `fresh_for` ago: asking it again (or syncing) would hear the same.
    fn tier_said_stale(&self, confirmed: &Confirmation) -> bool {
        confirmed.upstream_stale
            && !confirmed.written_since
            && self.age_of(confirmed.checked_at) < self.settings.fresh_for
    }

    fn rules(&self) -> Rules {
        let (policy, max_stale) = self.flags.stale_rule();
        Rules {
            fresh_for: self.settings.fresh_for,
            policy,
            max_stale,
        }
    }

    /// One entity, by name or uid.
    pub async fn read_entity(&self, lookup: Lookup) -> Result<Answer, ReadError> {
        let found = self.find_entity(&lookup);
        // The common case first, with no allocation beyond the answer: a
        // fresh local copy and no remembered 404 to weigh against it.
        if self.hot.is_empty() {
            if let Some((entity, confirmed)) = &found {
                if self.is_fresh(confirmed) {
                    return Ok(self.entity_answer(entity.body(), confirmed));
                }
                // The outage case, just as lean: the breaker refuses, so the
                // local copy is all there is to decide on.
                if let Some(refused) = self.upstream.refused_now(Operation::Revalidate) {
                    let held = Held::Copy {
                        answer: self.entity_answer(entity.body(), confirmed),
                        confirmed: confirmed.clone(),
                    };
                    return self.without_upstream(held, &refused);
                }
            }
        }
        let upstream_path = match &lookup {
            Lookup::ByName(r) => by_name_path(&r.kind, &r.namespace, &r.name),
            Lookup::ByUid(uid) => Route::ByUid(uid.clone()).upstream_path(),
        };
        let negative_key = upstream_path.to_lowercase();
        // A remembered 404 stands in for the entity unless the mirror
        // confirmed the entity after the 404 was seen (a sync brought it in).
        if let Some(HotEntry::Missing { body, at }) =
            self.hot.get(&HotKey::Path(negative_key.as_str().into()))
        {
            let suspect = self.sync.upstream_suspect();
            if found
                .as_ref()
                .is_none_or(|(_, confirmed)| confirmed.origin_at <= at && !suspect)
            {
                return Ok(Answer {
                    status: StatusCode::NOT_FOUND,
                    headers: json_headers(),
                    body: body.into(),
                    cache: CacheStatus::Hit,
                    age: self.age_of(at),
                    stale: false,
                    via: None,
                });
            }
            // A 404 the mirror doubts (a mass deletion is held): asking again
            // within negative_ttl would only be doubted again, so every read
            // of a mirrored entity would become an upstream call while the
            // upstream is in trouble. The held copy answers meanwhile.
            if let Some((entity, confirmed)) = &found {
                if suspect && confirmed.origin_at <= at && !self.is_fresh(confirmed) {
                    let held = Held::Copy {
                        answer: self.entity_answer(entity.body(), confirmed),
                        confirmed: confirmed.clone(),
                    };
                    return self.without_upstream(held, &UpstreamError::Untrusted(DOUBTED.into()));
                }
            }
        }
        if let Some((entity, confirmed)) = &found {
            if self.is_fresh(confirmed) {
                return Ok(self.entity_answer(entity.body(), confirmed));
            }
        }
        let held = match found {
            Some((entity, confirmed)) => Held::Copy {
                answer: self.entity_answer(entity.body(), &confirmed),
                confirmed,
            },
            None => match self.generations.current() {
                Some(generation) => Held::Absent {
                    confirmed: self.generation_confirmation(&generation.meta),
                    message: match &lookup {
                        Lookup::ByName(r) => format!(
                            "No entity named '{}' found, with kind '{}' in namespace '{}'",
                            r.name,
                            r.kind.to_lowercase(),
                            r.namespace
                        ),
                        Lookup::ByUid(uid) => format!("No entity with uid {uid}"),
                    },
                },
                None => Held::Nothing,
            },
        };
        let on_fetched: OnFetched = Box::new(
            move |keeper: &Keeper, response: &UpstreamResponse| {
                if response.status == StatusCode::OK {
                    match Entity::from_json(response.body.clone()) {
                        Ok(entity) => {
                            keeper.entity(Arc::new(entity), keeper.confirmation(response))
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "upstream returned an entity the mirror cannot hold")
                        }
                    }
                } else if response.status == StatusCode::NOT_FOUND {
                    keeper.missing(&negative_key, response.body.clone());
                }
            },
        );
        let fetch = Fetch {
            key: upstream_path.clone(),
            request: UpstreamRequest::get(upstream_path),
            op: Operation::Revalidate,
            on_fetched,
        };
        self.resolve(held, fetch).await
    }

    /// The newest local copy of an entity and how it was confirmed: a
    /// revalidated copy in the hot cache when the origin confirmed it later
    /// than the generation, else the generation's.
    fn find_entity(&self, lookup: &Lookup) -> Option<(Arc<Entity>, Confirmation)> {
        find_in(&self.generations, &self.hot, &self.writes, lookup)
    }

    fn entity_answer(&self, body: Bytes, confirmed: &Confirmation) -> Answer {
        Answer {
            status: StatusCode::OK,
            headers: json_headers(),
            body: body.into(),
            cache: CacheStatus::Hit,
            age: self.age_of(confirmed.origin_at),
            stale: false,
            via: confirmed.via.clone(),
        }
    }

    /// `POST /entities/by-refs`.
    pub async fn read_by_refs(&self, req: &Incoming<'_>) -> Result<Answer, ReadError> {
        // Parsing up to proxy.max_request_body of JSON, looking up every ref
        // (tens of thousands of them) and the filter below all run on the
        // query pool within the budget, never on this worker.
        let (query_string, body) = (req.query.to_string(), req.body.clone());
        let (generations, hot, writes) = (
            self.generations.clone(),
            self.hot.clone(),
            self.writes.clone(),
        );
        let ((parsed, found, oldest, unknown), spent) = self
            .evaluate(Duration::ZERO, move |budget| {
                let parsed = query::parse_by_refs(&query_string, &body, budget)?;
                let mut found = Vec::with_capacity(parsed.entity_refs.len());
                let mut oldest: Option<Confirmation> = None;
                let mut unknown = false;
                for (n, text) in parsed.entity_refs.iter().enumerate() {
                    if n % 1024 == 0 {
                        budget.check()?;
                    }
                    // Backstage compares the ref as written with the lower-cased
                    // stored ref, so only an already lower-case ref can match.
                    let written = EntityRef::parse(text).ok();
                    let canonical = written.as_ref().map(|r| {
                        let as_written = format!("{}:{}/{}", r.kind, r.namespace, r.name);
                        let canonical = r.canonical();
                        (as_written == canonical, r)
                    });
                    let entity = match &canonical {
                        Some((true, r)) => {
                            find_in(&generations, &hot, &writes, &Lookup::ByName((*r).clone()))
                        }
                        _ => None,
                    };
                    match entity {
                        Some((e, confirmed)) => {
                            match &mut oldest {
                                Some(o) => o.merge(confirmed),
                                None => oldest = Some(confirmed),
                            }
                            found.push(Some(e));
                        }
                        None => {
                            // An upper-case ref never matches (above): its null is
                            // the answer, not something to ask the upstream about.
                            let can_match = canonical.as_ref().is_none_or(|(lower, _)| *lower);
                            let negative = canonical.as_ref().is_some_and(|(_, r)| {
                                let key =
                                    by_name_path(&r.kind, &r.namespace, &r.name).to_lowercase();
                                matches!(
                                    hot.get(&HotKey::Path(key.into())),
                                    Some(HotEntry::Missing { .. })
                                )
                            });
                            if can_match && !negative {
                                unknown = true;
                            }
                            found.push(None);
                        }
                    }
                }
                Ok((parsed, found, oldest, unknown))
            })
            .await?;
        let parsed = Arc::new(parsed);
        let generation = self.generations.current();
        let index = generation.as_ref().map(|g| g.index.clone());
        let (rendered, spent) = self
            .evaluate(spent, move |budget| {
                let rendering = query::render_by_refs(&parsed, index.as_deref(), found, budget)?;
                start_rendering(rendering)
            })
            .await?;
        let body = self.payload(rendered, spent);
        let Some(generation) = generation else {
            return self
                .forward_without_mirror(req, Operation::Revalidate)
                .await;
        };
        let confirmed = oldest.unwrap_or_else(|| self.generation_confirmation(&generation.meta));
        let local = Answer {
            status: StatusCode::OK,
            headers: json_headers(),
            body,
            cache: CacheStatus::Hit,
            age: self.age_of(confirmed.origin_at),
            stale: false,
            via: confirmed.via.clone(),
        };
        if self.is_fresh(&confirmed) && !unknown {
            return Ok(local);
        }
        let on_fetched: OnFetched = Box::new(|keeper: &Keeper, response: &UpstreamResponse| {
            if response.status != StatusCode::OK {
                return;
            }
            #[derive(serde::Deserialize)]
            struct Items<'a> {
                #[serde(borrow)]
                items: Vec<Option<&'a serde_json::value::RawValue>>,
            }
            if let Ok(items) = serde_json::from_slice::<Items<'_>>(&response.body) {
                let confirmed = keeper.confirmation(response);
                for raw in items.items.into_iter().flatten() {
                    if let Ok(entity) =
                        Entity::from_json(Bytes::copy_from_slice(raw.get().as_bytes()))
                    {
                        keeper.entity(Arc::new(entity), confirmed.clone());
                    }
                }
            }
        });
        let held = Held::Copy {
            answer: local,
            confirmed,
        };
        let fetch = Fetch {
            key: req.key(),
            request: forward_request(req),
            op: Operation::Revalidate,
            on_fetched,
        };
        self.resolve(held, fetch).await
    }

    /// A query answered from the mirror index (`GET /entities`, by-query, facets).
    pub async fn read_query(
        &self,
        kind: QueryKind,
        req: &Incoming<'_>,
    ) -> Result<Answer, ReadError> {
        let Some(generation) = self.generations.current() else {
            return self.forward_without_mirror(req, Operation::Query).await;
        };
        let index = generation.index.clone();
        let (query_string, body) = (req.query.to_string(), req.body.clone());
        let ((rendered, link), spent) = self
            .evaluate_when_ready(index.clone(), move |budget| {
                let request = QueryRequest {
                    kind,
                    query_string: &query_string,
                    body: &body,
                };
                let answer = query::answer(&index, &request, budget)?;
                let rendered = match answer.body {
                    query::Body::Full(bytes) => Rendered::Whole(bytes),
                    query::Body::Stream(rendering) => start_rendering(rendering)?,
                };
                Ok((rendered, answer.link))
            })
            .await?;
        let body = self.payload(rendered, spent);
        let mut headers = json_headers();
        if let Some(link) = link.and_then(|l| HeaderValue::from_str(&l).ok()) {
            headers.insert(http::header::LINK, link);
        }
        let confirmed = self.generation_confirmation(&generation.meta);
        let local = Answer {
            status: StatusCode::OK,
            headers,
            body,
            cache: CacheStatus::Hit,
            age: self.age_of(confirmed.origin_at),
            stale: false,
            via: confirmed.via.clone(),
        };
        if self.is_fresh(&confirmed) {
            return Ok(local);
        }
        // A tier that just said its data is stale would say so again.
        if !self.tier_said_stale(&confirmed) {
            self.sync.sync_soon();
        }
        let fetch = Fetch {
            key: req.key(),
            request: forward_request(req),
            op: Operation::Query,
            on_fetched: Box::new(|_, _| {}),
        };
        self.resolve(
            Held::Copy {
                answer: local,
                confirmed,
            },
            fetch,
        )
        .await
    }

    /// Runs `work` on a blocking thread of the query pool, within what is
    /// left of the query budget after `spent`: waiting for a thread counts
    /// against it, and work still running when it runs out stops itself.
    /// Returns the result and the budget spent so far.
    async fn evaluate<T: Send + 'static>(
        &self,
        spent: Duration,
        work: impl FnOnce(&Budget) -> Result<T, query::QueryError> + Send + 'static,
    ) -> Result<(T, Duration), ReadError> {
        self.evaluate_when_ready(None, work)
            .await
            .map(|(t, s)| (t, s + spent))
    }

    /// [`Self::evaluate`], after the query index (if given) is built: the
    /// budget starts once it can answer.
    async fn evaluate_when_ready<T: Send + 'static>(
        &self,
        index: impl Into<Option<Arc<crate::index::Index>>>,
        work: impl FnOnce(&Budget) -> Result<T, query::QueryError> + Send + 'static,
    ) -> Result<(T, Duration), ReadError> {
        let limit = self.settings.query_budget;
        let started = std::time::Instant::now();
        let slot = match tokio::time::timeout(limit, self.queries.clone().acquire_owned()).await {
            Ok(Ok(slot)) => slot,
            _ => {
                return Err(ReadError::Unavailable {
                    message: format!(
                        "Every query thread stayed busy for proxy.query_budget ({}) (proxy.query_concurrency: {}); retry shortly",
                        humantime::format_duration(limit),
                        self.settings.query_threads
                    ),
                    retry_after: Duration::from_secs(1),
                })
            }
        };
        let waited = started.elapsed();
        let index = index.into();
        let evaluated = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            if let Some(index) = index {
                index.wait_query_ready();
            }
            let budget = Budget::with_remaining(limit, limit.saturating_sub(waited));
            let began = std::time::Instant::now();
            let result = work(&budget);
            (result, waited + began.elapsed())
        })
        .await;
        match evaluated {
            Ok((Ok(value), spent)) => Ok((value, spent)),
            Ok((Err(e), _)) => Err(query_error(e)),
            Err(e) => {
                tracing::error!(error = %e, "query evaluation failed");
                Err(ReadError::Internal(
                    "the query could not be evaluated".into(),
                ))
            }
        }
    }

    /// The body of a rendered answer: whole when it fitted one chunk, else
    /// streamed, each further chunk rendered on the query pool within what
    /// is left of the budget (time the client takes to read is not
    /// counted). Nothing but the rendering's entity list is held meanwhile.
    fn payload(&self, rendered: Rendered, spent: Duration) -> Payload {
        let (first, rendering) = match rendered {
            Rendered::Whole(bytes) => return Payload::Bytes(bytes),
            Rendered::Started(first, rendering) => (first, rendering),
        };
        let nulls = rendering.nulls();
        let limit = self.settings.query_budget;
        let queries = self.queries.clone();
        let rest = futures::stream::unfold(Some((rendering, spent)), move |state| {
            let queries = queries.clone();
            async move {
                let (mut rendering, spent) = state?;
                let Some(remaining) = limit.checked_sub(spent).filter(|r| !r.is_zero()) else {
                    return Some((Err(query::QueryError::Budget { limit }), None));
                };
                let slot = queries.acquire_owned().await.ok()?;
                let rendered = tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    let began = std::time::Instant::now();
                    rendering.set_budget(Budget::with_remaining(limit, remaining));
                    let chunk = rendering.next_chunk();
                    (rendering, chunk, began.elapsed())
                })
                .await;
                match rendered {
                    Ok((rendering, Some(Ok(chunk)), took)) => {
                        Some((Ok(chunk), Some((rendering, spent + took))))
                    }
                    Ok((_, Some(Err(e)), _)) => Some((Err(e), None)),
                    Ok((_, None, _)) => None,
                    Err(e) => {
                        tracing::error!(error = %e, "rendering a streamed answer failed");
                        None
                    }
                }
            }
        });
        let chunks = futures::stream::once(futures::future::ready(Ok(first)))
            .chain(rest)
            .boxed();
        Payload::Stream { chunks, nulls }
    }

    /// Before any generation is loaded there is nothing local: ask the upstream.
    async fn forward_without_mirror(
        &self,
        req: &Incoming<'_>,
        op: Operation,
    ) -> Result<Answer, ReadError> {
        let fetch = Fetch {
            key: req.key(),
            request: forward_request(req),
            op,
            on_fetched: Box::new(|_, _| {}),
        };
        self.resolve(Held::Nothing, fetch).await
    }

    /// A read the mirror cannot compute (`/ancestry`, `/locations…`):
    /// fetched through the breaker, stored, served stale from the store
    /// during an outage.
    pub async fn read_through(&self, req: &Incoming<'_>) -> Result<Answer, ReadError> {
        let key = req.path_and_query();
        let stored = match self.hot.get(&HotKey::Path(key.as_str().into())) {
            Some(HotEntry::Answer(a)) => Some(a),
            _ => {
                let mirror = self.keeper.mirror.clone();
                let k = key.clone();
                tokio::task::spawn_blocking(move || mirror.answer(&k))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten()
                    .map(Arc::new)
            }
        };
        // An answer older than read_through.max_age is gone, as in the store.
        let stored =
            stored.filter(|a| self.age_of(a.stored_at) <= self.settings.read_through.max_age);
        let held = match stored {
            Some(answer) => {
                let mut headers = HeaderMap::new();
                if let Some(ct) = answer
                    .content_type
                    .as_deref()
                    .and_then(|c| HeaderValue::from_str(c).ok())
                {
                    headers.insert(http::header::CONTENT_TYPE, ct);
                }
                Held::Copy {
                    answer: Answer {
                        status: StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK),
                        headers,
                        body: answer.body.clone().into(),
                        cache: CacheStatus::Hit,
                        age: self.age_of(answer.stored_at),
                        stale: false,
                        via: None,
                    },
                    confirmed: answer.stored_at.into(),
                }
            }
            None => Held::Nothing,
        };
        if let Held::Copy { confirmed, .. } = &held {
            if self.is_fresh(confirmed) {
                if let Held::Copy { answer, .. } = held {
                    return Ok(answer);
                }
            }
        }
        let store_key = key.clone();
        let on_fetched: OnFetched =
            Box::new(move |keeper: &Keeper, response: &UpstreamResponse| {
                if response.status.is_success() {
                    keeper.answer(&store_key, response);
                }
            });
        let fetch = Fetch {
            key,
            request: forward_request(req),
            op: Operation::ReadThrough,
            on_fetched,
        };
        self.resolve(held, fetch).await
    }

    /// Writes and everything the sidecar does not interpret: passed through,
    /// never cached, never queued; with the breaker open, a fast 503.
    pub async fn pass_through(&self, req: &Incoming<'_>) -> Result<Answer, ReadError> {
        let mut request = forward_request(req);
        request.own_identity = false;
        match self
            .upstream
            .call(Operation::PassThrough, &request, Expect::Any, None)
            .await
        {
            Ok(response) => {
                if response.status.is_success() {
                    self.after_write(req);
                }
                Ok(Answer {
                    status: response.status,
                    headers: passed_headers(&response.headers),
                    body: response.body.into(),
                    cache: CacheStatus::Bypass,
                    age: Duration::ZERO,
                    stale: false,
                    via: response.provenance.cache_status,
                })
            }
            Err(e) => Err(self.unavailable(&e, "the write was not sent")),
        }
    }

    /// After a successful write, what it names is no longer fresh here
    /// (the next read of it asks the upstream), and the next sync comes
    /// soon (debounced) so that the mirror and the query index catch up.
    /// A location added or deleted may touch any entity: the whole catalog
    /// is marked. Dry runs (`analyze-location`, `validate-entity`) change
    /// nothing.
    fn after_write(&self, req: &Incoming<'_>) {
        let now = self.clock.now();
        match req.route {
            Route::DeleteByUid(uid) => {
                self.writes.entity(uid, now);
                if let Some(generation) = self.generations.current() {
                    if let Some(e) = generation.index.by_uid(uid) {
                        self.writes.entity(&e.entity_ref, now);
                        self.hot.invalidate_entity(&e.uid, &e.entity_ref);
                    }
                }
            }
            Route::Refresh => {
                #[derive(serde::Deserialize)]
                struct Refresh {
                    #[serde(rename = "entityRef")]
                    entity_ref: String,
                }
                match serde_json::from_slice::<Refresh>(&req.body)
                    .ok()
                    .and_then(|r| EntityRef::parse(&r.entity_ref).ok())
                {
                    Some(r) => self.writes.entity(&r.canonical(), now),
                    None => self.writes.all(now),
                }
            }
            Route::CreateLocation | Route::DeleteLocation(_) => self.writes.all(now),
            _ => return,
        }
        self.sync.sync_soon();
    }

    /// Asks the upstream (sharing the call with concurrent reads of the
    /// same key), waits at most the revalidate budget, and decides.
    async fn resolve(&self, held: Held, fetch: Fetch) -> Result<Answer, ReadError> {
        if let Some(refused) = self.upstream.refused_now(fetch.op) {
            return self.without_upstream(held, &refused);
        }
        if let Held::Copy { confirmed, .. } = &held {
            if self.tier_said_stale(confirmed) {
                let error = UpstreamError::TierStale(self.age_of(confirmed.origin_at));
                return self.without_upstream(held, &error);
            }
        }
        let budget = self.settings.revalidate_budget;
        let outcome = match tokio::time::timeout(budget, self.fetch_shared(fetch)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => match &*e {
                FetchError::Upstream(e) => Err(e.clone()),
                FetchError::Task(what) => return Err(ReadError::Internal(what.clone())),
            },
            Err(_) => Err(UpstreamError::Timeout(budget)),
        };
        let outcome = match outcome {
            Ok(response) if self.contradicts_held_mirror(&held, &response) => {
                Err(UpstreamError::Untrusted(DOUBTED.into()))
            }
            other => other,
        };
        match outcome {
            Ok(response) => {
                let had_local = matches!(held, Held::Copy { .. });
                // The upstream says a mirrored entity is gone: a sync soon
                // either takes the deletion into the mirror or, if the
                // catalog emptied, holds it and makes the upstream suspect
                // (after which such answers are doubted).
                if had_local && response.status == StatusCode::NOT_FOUND {
                    self.sync.sync_soon();
                }
                let status = response.status.as_u16();
                let cache = match (had_local, response.status) {
                    (true, _) => CacheStatus::Revalidated { status },
                    (false, StatusCode::OK) => CacheStatus::Stored,
                    (false, _) => CacheStatus::Miss { status },
                };
                // An upstream tier's answer is judged like a local copy the
                // origin confirmed as long ago as the tier says.
                let now = self.clock.now();
                let confirmed = Confirmation::received(&response.provenance, now);
                let (age, stale) = match decide(
                    &Local::Found {
                        confirmed: confirmed.clone(),
                    },
                    UpstreamState::Unavailable,
                    &self.rules(),
                    now,
                ) {
                    Decision::Refuse(refusal) => {
                        let error = UpstreamError::TierStale(self.age_of(confirmed.origin_at));
                        return Err(self.unavailable(&error, &refusal.detail()));
                    }
                    Decision::Stale { age, .. } => (age, true),
                    _ => (self.age_of(confirmed.origin_at), false),
                };
                Ok(Answer {
                    status: response.status,
                    headers: passed_headers(&response.headers),
                    body: response.body.clone().into(),
                    cache,
                    age,
                    stale,
                    via: confirmed.via,
                })
            }
            Err(error) => self.without_upstream(held, &error),
        }
    }

    /// While the upstream is suspect (see [`SyncStatus::upstream_suspect`]),
    /// it is doubted when it says entities are lost: an answer that says a
    /// mirrored entity is gone (a 404, or a by-refs `null` the mirror can
    /// fill) is not taken over the mirror.
    fn contradicts_held_mirror(&self, held: &Held, response: &UpstreamResponse) -> bool {
        let Held::Copy { answer, .. } = held else {
            return false;
        };
        if !self.sync.upstream_suspect() {
            return false;
        }
        if response.status == StatusCode::NOT_FOUND {
            return true;
        }
        #[derive(serde::Deserialize)]
        struct Items {
            items: Vec<Option<serde::de::IgnoredAny>>,
        }
        let nulls = |body: &[u8]| {
            serde_json::from_slice::<Items>(body)
                .ok()
                .map(|i| i.items.iter().filter(|x| x.is_none()).count())
        };
        let here = match &answer.body {
            Payload::Bytes(body) => nulls(body),
            Payload::Stream { nulls, .. } => Some(*nulls),
        };
        matches!((nulls(&response.body), here), (Some(up), Some(here)) if up > here)
    }

    /// The upstream could not answer: the decision on what is held.
    fn without_upstream(&self, held: Held, error: &UpstreamError) -> Result<Answer, ReadError> {
        match decide(
            &held.local(),
            UpstreamState::Unavailable,
            &self.rules(),
            self.clock.now(),
        ) {
            Decision::Stale { age, ttl } => match held {
                Held::Copy { answer, .. } => Ok(Answer {
                    cache: CacheStatus::StaleHit { ttl },
                    age,
                    stale: true,
                    ..answer
                }),
                _ => Err(ReadError::Internal(
                    "a stale decision without a local copy".into(),
                )),
            },
            Decision::StaleNotFound { age, ttl } => match held {
                Held::Absent { message, .. } => Err(ReadError::NotFound { message, age, ttl }),
                _ => Err(ReadError::Internal(
                    "a not-found decision without a generation".into(),
                )),
            },
            Decision::Refuse(refusal) => Err(self.unavailable(error, &refusal.detail())),
            // Not reached while the upstream is unavailable; serve what is
            // held as it is rather than fail.
            Decision::Fresh | Decision::Ask => match held {
                Held::Copy { answer, .. } => Ok(answer),
                _ => Err(self.unavailable(error, &Refusal::NoCopy.detail())),
            },
        }
    }

    /// The sidecar's own 503, saying why and when to retry.
    fn unavailable(&self, error: &UpstreamError, detail: &str) -> ReadError {
        ReadError::Unavailable {
            message: format!("The catalog is unavailable: {error}; {detail}"),
            retry_after: error.retry_after().unwrap_or(self.settings.retry_after),
        }
    }

    fn fetch_shared(&self, fetch: Fetch) -> SharedFetch {
        let mut calls = self.inflight.lock();
        if let Some(existing) = calls.get(&fetch.key) {
            return existing.clone();
        }
        let Fetch {
            key,
            request,
            op,
            on_fetched,
        } = fetch;
        let (upstream, keeper, inflight) = (
            self.upstream.clone(),
            self.keeper.clone(),
            self.inflight.clone(),
        );
        let task_key = key.clone();
        let handle = tokio::spawn(async move {
            let result = upstream.call(op, &request, Expect::Json, None).await;
            if let Ok(response) = &result {
                on_fetched(&keeper, response);
            }
            inflight.lock().remove(&task_key);
            result
                .map(Arc::new)
                .map_err(|e| Arc::new(FetchError::Upstream(e)))
        });
        let shared = async move {
            handle
                .await
                .unwrap_or_else(|e| Err(Arc::new(FetchError::Task(e.to_string()))))
        }
        .boxed()
        .shared();
        calls.insert(key, shared.clone());
        shared
    }
}

/// A rendering started on the query pool: whole if it fitted one chunk.
enum Rendered {
    Whole(Bytes),
    Started(Bytes, query::Rendering),
}

/// Renders the first chunk; a small answer is then complete.
fn start_rendering(mut rendering: query::Rendering) -> Result<Rendered, query::QueryError> {
    let first = rendering.next_chunk().transpose()?.unwrap_or_default();
    Ok(if rendering.is_finished() {
        Rendered::Whole(first)
    } else {
        Rendered::Started(first, rendering)
    })
}

/// A query the sidecar cannot answer: the client's mistake (400), or a
/// budget spent (503: the request is well-formed, the sidecar declines to
/// spend more on it now).
fn query_error(e: query::QueryError) -> ReadError {
    match e {
        query::QueryError::Budget { .. } => ReadError::Unavailable {
            message: e.to_string(),
            retry_after: Duration::from_secs(1),
        },
        e => ReadError::Input(e.to_string()),
    }
}

/// The request passed on to the upstream for a client's request: its
/// route (the path rebuilt from the parsed parameters), query and body, and
/// the headers the upstream needs.
fn forward_request(req: &Incoming<'_>) -> UpstreamRequest {
    let mut headers = HeaderMap::new();
    for name in [
        http::header::CONTENT_TYPE,
        http::header::AUTHORIZATION,
        http::header::ACCEPT,
    ] {
        if let Some(v) = req.headers.get(&name) {
            headers.insert(name, v.clone());
        }
    }
    let path = req.route.upstream_path();
    UpstreamRequest {
        method: req.route.method(),
        path_and_query: if req.query.is_empty() {
            path
        } else {
            format!("{path}?{}", req.query)
        },
        headers,
        body: req.body.clone(),
        own_identity: true,
    }
}

/// Headers of an upstream answer that are passed on to the caller.
fn passed_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for name in [
        http::header::CONTENT_TYPE,
        http::header::LINK,
        http::header::LOCATION,
        http::header::RETRY_AFTER,
        http::header::WWW_AUTHENTICATE,
    ] {
        for v in upstream.get_all(&name) {
            headers.append(name.clone(), v.clone());
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRESH_FOR: Duration = Duration::from_secs(90);

    fn rules(policy: StalePolicy) -> Rules {
        Rules {
            fresh_for: FRESH_FOR,
            policy,
            max_stale: Duration::from_secs(24 * 3600),
        }
    }

    fn at(now: SystemTime, ago: u64) -> SystemTime {
        now - Duration::from_secs(ago)
    }

    #[test]
    fn fresh_data_is_served_whatever_the_upstream_and_the_policy() {
        let now = SystemTime::now();
        let local = Local::found(at(now, 89));
        for upstream in [UpstreamState::Admits, UpstreamState::Unavailable] {
            for policy in [StalePolicy::Serve, StalePolicy::Refuse] {
                assert_eq!(
                    decide(&local, upstream, &rules(policy), now),
                    Decision::Fresh
                );
            }
        }
    }

    #[test]
    fn old_or_absent_data_asks_an_upstream_the_breaker_admits() {
        let now = SystemTime::now();
        for local in [
            Local::found(at(now, 90)),
            Local::absent(at(now, 5)),
            Local::Unknown,
        ] {
            assert_eq!(
                decide(
                    &local,
                    UpstreamState::Admits,
                    &rules(StalePolicy::Refuse),
                    now
                ),
                Decision::Ask,
                "{local:?}"
            );
        }
    }

    #[test]
    fn without_the_upstream_old_data_is_served_stale_with_its_age_and_negative_ttl() {
        let now = SystemTime::now();
        let local = Local::found(at(now, 300));
        assert_eq!(
            decide(
                &local,
                UpstreamState::Unavailable,
                &rules(StalePolicy::Serve),
                now
            ),
            Decision::Stale {
                age: Duration::from_secs(300),
                ttl: -210
            }
        );
        // Just past fresh_for the ttl is still negative.
        let local = Local::found(at(now, 90));
        assert_eq!(
            decide(
                &local,
                UpstreamState::Unavailable,
                &rules(StalePolicy::Serve),
                now
            ),
            Decision::Stale {
                age: Duration::from_secs(90),
                ttl: -1
            }
        );
        // The mirror's "not found" stands in for the upstream the same way.
        let absent = Local::absent(at(now, 120));
        assert_eq!(
            decide(
                &absent,
                UpstreamState::Unavailable,
                &rules(StalePolicy::Serve),
                now
            ),
            Decision::StaleNotFound {
                age: Duration::from_secs(120),
                ttl: -30
            }
        );
    }

    #[test]
    fn the_refuse_policy_max_stale_and_an_empty_mirror_refuse() {
        let now = SystemTime::now();
        let old = Local::found(at(now, 300));
        assert_eq!(
            decide(
                &old,
                UpstreamState::Unavailable,
                &rules(StalePolicy::Refuse),
                now
            ),
            Decision::Refuse(Refusal::Policy)
        );
        let ancient = Local::found(at(now, 25 * 3600));
        assert_eq!(
            decide(
                &ancient,
                UpstreamState::Unavailable,
                &rules(StalePolicy::Serve),
                now
            ),
            Decision::Refuse(Refusal::TooOld {
                age: Duration::from_secs(25 * 3600),
                max_stale: Duration::from_secs(24 * 3600)
            })
        );
        assert_eq!(
            decide(
                &Local::Unknown,
                UpstreamState::Unavailable,
                &rules(StalePolicy::Serve),
                now
            ),
            Decision::Refuse(Refusal::NoCopy)
        );
    }

    fn tiered(now: SystemTime, origin_ago: u64, checked_ago: u64, stale: bool) -> Local {
        Local::Found {
            confirmed: Confirmation {
                origin_at: at(now, origin_ago),
                checked_at: at(now, checked_ago),
                upstream_stale: stale,
                via: Some("tier-a; hit; ttl=-7".into()),
                written_since: false,
            },
        }
    }

    #[test]
    fn a_tier_s_staleness_and_age_are_the_origin_s() {
        let now = SystemTime::now();
        let serve = rules(StalePolicy::Serve);
        // The tier said stale moments ago: stale here too, however young,
        // and the tier is not asked again (it would say the same).
        assert_eq!(
            decide(&tiered(now, 9, 1, true), UpstreamState::Admits, &serve, now),
            Decision::Stale {
                age: Duration::from_secs(9),
                ttl: -1
            }
        );
        assert_eq!(
            decide(
                &tiered(now, 9, 1, true),
                UpstreamState::Admits,
                &rules(StalePolicy::Refuse),
                now
            ),
            Decision::Refuse(Refusal::Policy)
        );
        // It said so long ago: ask again.
        assert_eq!(
            decide(
                &tiered(now, 200, 95, true),
                UpstreamState::Admits,
                &serve,
                now
            ),
            Decision::Ask
        );
        // A fresh tier's data is as old as the tier says: 80 s behind a
        // tier is fresh, 95 s is not, even though it was heard from now.
        assert_eq!(
            decide(
                &tiered(now, 80, 0, false),
                UpstreamState::Admits,
                &serve,
                now
            ),
            Decision::Fresh
        );
        assert_eq!(
            decide(
                &tiered(now, 95, 0, false),
                UpstreamState::Unavailable,
                &serve,
                now
            ),
            Decision::Stale {
                age: Duration::from_secs(95),
                ttl: -5
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_operator_override_expires_by_moving_the_clock() {
        use crate::breaker::{Breaker, BreakerConfig, BreakerMode};
        use crate::config::Config;

        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::system();
        let (mirror, _) = Mirror::open(&dir.path().join("m.db"), &clock).unwrap();
        let breaker = Breaker::new(BreakerConfig::default(), clock.clone());
        let flags = Flags::load(
            &Config::default(),
            Arc::new(mirror),
            breaker.clone(),
            clock.clone(),
        )
        .unwrap();
        let upstream_state = |b: &Breaker| match b.would_reject(crate::breaker::Caller::Client) {
            Some(_) => UpstreamState::Unavailable,
            None => UpstreamState::Admits,
        };
        let (policy, max_stale) = flags.stale_rule();
        let rules = Rules {
            fresh_for: FRESH_FOR,
            policy,
            max_stale,
        };
        let confirmed_at = clock.now();
        let local = Local::found(confirmed_at);

        flags
            .set_mode(
                BreakerMode::Open,
                Some("maintenance"),
                Some(Duration::from_secs(600)),
                "cli",
            )
            .unwrap();
        clock.advance(Duration::from_secs(300));
        assert_eq!(flags.expire().unwrap(), None, "not yet expired");
        let decision = decide(&local, upstream_state(&breaker), &rules, clock.now());
        assert!(
            matches!(decision, Decision::Stale { ttl: -210, age } if age >= Duration::from_secs(300)),
            "forced open: old data is served stale, the upstream is not asked ({decision:?})"
        );

        clock.advance(Duration::from_secs(301));
        assert_eq!(flags.expire().unwrap(), Some(BreakerMode::Auto));
        assert_eq!(breaker.mode(), BreakerMode::Auto);
        assert_eq!(flags.mode().mode, BreakerMode::Auto);
        assert_eq!(
            decide(&local, upstream_state(&breaker), &rules, clock.now()),
            Decision::Ask,
            "back to auto: the upstream is asked again"
        );
    }
}
