//! The read path: the one place that decides where an answer comes from and
//! whether it is stale.
//!
//! Fresh local data (younger than `freshness.fresh_for`) is served at once.
//! Older or absent data is asked of the upstream — concurrent reads of one
//! key share one upstream call, and no read waits longer than
//! `freshness.revalidate_budget`; the call itself carries on in the
//! background so that its answer is stored and the breaker hears its outcome.
//! When the upstream cannot answer, the local copy is served marked stale if
//! the stale policy allows it and it is younger than `max_stale`, else 503.
//! The HTTP layer (`proxy`) only turns a [`Reply`] into headers and bytes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

use crate::cache::{HotEntry, HotKey};
use crate::config::StalePolicy;
use crate::entity::{Entity, EntityRef};
use crate::mirror::StoredAnswer;
use crate::query::{self, QueryKind, QueryRequest};
use crate::sidecar::Sidecar;
use crate::upstream::{
    by_name_path, encode_component, Expect, Operation, UpstreamError, UpstreamRequest,
    UpstreamResponse,
};

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
    /// The `Cache-Status` header value.
    pub fn header(self) -> String {
        match self {
            Self::Hit => "catalog-cache; hit".into(),
            Self::StaleHit { ttl } => format!("catalog-cache; hit; ttl={ttl}"),
            Self::Stored => "catalog-cache; fwd=miss; stored".into(),
            Self::Miss { status } => format!("catalog-cache; fwd=miss; fwd-status={status}"),
            Self::Revalidated { status } => {
                format!("catalog-cache; fwd=stale; fwd-status={status}")
            }
            Self::Bypass => "catalog-cache; fwd=bypass".into(),
            Self::Unavailable => "catalog-cache; fwd=uri-miss; detail=upstream-unavailable".into(),
        }
    }

    /// The `outcome` label of the requests metric.
    pub fn outcome(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::StaleHit { .. } => "stale",
            Self::Stored | Self::Miss { .. } | Self::Revalidated { .. } => "miss",
            Self::Bypass => "bypass",
            Self::Unavailable => "error",
        }
    }
}

/// A complete answer of the read path.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers to send besides the staleness ones (content type, Link, Retry-After).
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// How it was obtained.
    pub cache: CacheStatus,
    /// Seconds since the upstream last confirmed the data.
    pub age: Duration,
    /// Whether the data is stale (the `X-Catalog-Stale` header).
    pub stale: bool,
}

/// The error kinds the sidecar itself answers with, in Backstage's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400 `InputError`.
    Input,
    /// 401 `AuthenticationError`.
    Authentication,
    /// 404 `NotFoundError`.
    NotFound,
    /// 413 `PayloadTooLargeError`.
    TooLarge,
    /// 503 `ServiceUnavailableError`.
    Unavailable,
    /// 500 `Error`.
    Internal,
}

impl ErrorKind {
    fn status_and_name(self) -> (StatusCode, &'static str) {
        match self {
            Self::Input => (StatusCode::BAD_REQUEST, "InputError"),
            Self::Authentication => (StatusCode::UNAUTHORIZED, "AuthenticationError"),
            Self::NotFound => (StatusCode::NOT_FOUND, "NotFoundError"),
            Self::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLargeError"),
            Self::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableError"),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "Error"),
        }
    }
}

/// Backstage's error body: `{"error":{name,message},"request":{method,url},"response":{statusCode}}`.
pub fn error_body(
    kind: ErrorKind,
    message: &str,
    method: &Method,
    url: &str,
) -> (StatusCode, Bytes) {
    let (status, name) = kind.status_and_name();
    let body = serde_json::json!({
        "error": {"name": name, "message": message},
        "request": {"method": method.as_str(), "url": url},
        "response": {"statusCode": status.as_u16()},
    });
    (status, Bytes::from(body.to_string()))
}

fn json_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    h
}

/// What a read knows locally before asking the upstream.
enum Local {
    /// Data and when the upstream last confirmed it.
    Found {
        reply: Reply,
        confirmed_at: SystemTime,
    },
    /// The mirror holds a complete generation (confirmed at the given time)
    /// that does not contain the thing asked for.
    AbsentFromMirror { confirmed_at: SystemTime },
    /// Nothing is known (no generation yet, or data the mirror cannot compute).
    Unknown,
}

type FetchResult = Result<Arc<UpstreamResponse>, Arc<UpstreamError>>;
type SharedFetch = Shared<BoxFuture<'static, FetchResult>>;

/// Calls in flight, by key: concurrent reads of one key share one call.
#[derive(Default)]
pub struct InFlight {
    calls: std::sync::Mutex<HashMap<String, SharedFetch>>,
}

/// What to do with an upstream answer once it arrives (even if no reader
/// is still waiting for it).
type OnFetched = Box<dyn FnOnce(&Sidecar, &UpstreamResponse) + Send>;

/// A request the proxy hands to the read path.
pub struct Incoming<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path below the catalog mount, e.g. `/entities/by-query`.
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

impl Sidecar {
    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    fn age_of(&self, confirmed_at: SystemTime) -> Duration {
        self.now().duration_since(confirmed_at).unwrap_or_default()
    }

    fn is_fresh(&self, confirmed_at: SystemTime) -> bool {
        self.age_of(confirmed_at) < self.config.freshness.fresh_for.get()
    }

    /// One entity, by name or uid.
    pub async fn read_entity(&self, lookup: Lookup, req: &Incoming<'_>) -> Reply {
        let found = self.find_entity(&lookup);
        // The common case first, with no allocation beyond the reply: a
        // fresh local copy and no remembered 404 to weigh against it.
        if self.hot.is_empty() {
            if let Some((entity, confirmed_at)) = &found {
                if self.is_fresh(*confirmed_at) {
                    return self.entity_reply(&entity.body, *confirmed_at);
                }
                // The outage case, just as lean: the breaker refuses, so the
                // local copy is all there is to decide on.
                if let Some(refused) = self.upstream.refused_now(Operation::Revalidate) {
                    let local = Local::Found {
                        reply: self.entity_reply(&entity.body, *confirmed_at),
                        confirmed_at: *confirmed_at,
                    };
                    return self.decide_without_upstream(local, &refused, req, None);
                }
            }
        }
        let upstream_path = match &lookup {
            Lookup::ByName(r) => by_name_path(&r.kind, &r.namespace, &r.name),
            Lookup::ByUid(uid) => format!("/entities/by-uid/{}", encode_component(uid)),
        };
        let negative_key = upstream_path.to_lowercase();
        // A remembered 404 stands in for the entity unless the mirror
        // confirmed the entity after the 404 was seen (a sync brought it in).
        if let Some(HotEntry::Missing { body, at }) =
            self.hot.get(&HotKey::Path(negative_key.as_str().into()))
        {
            let held = self.upstream_suspect();
            if found
                .as_ref()
                .is_none_or(|(_, confirmed_at)| *confirmed_at <= at && !held)
            {
                return Reply {
                    status: StatusCode::NOT_FOUND,
                    headers: json_headers(),
                    body,
                    cache: CacheStatus::Hit,
                    age: self.age_of(at),
                    stale: false,
                };
            }
        }
        if let Some((entity, confirmed_at)) = &found {
            if self.is_fresh(*confirmed_at) {
                return self.entity_reply(&entity.body, *confirmed_at);
            }
        }
        let local = match found {
            Some((entity, confirmed_at)) => Local::Found {
                reply: self.entity_reply(&entity.body, confirmed_at),
                confirmed_at,
            },
            None => match self.view() {
                Some(view) => Local::AbsentFromMirror {
                    confirmed_at: view.meta.synced_at,
                },
                None => Local::Unknown,
            },
        };
        let not_found_message = match &lookup {
            Lookup::ByName(r) => format!(
                "No entity named '{}' found, with kind '{}' in namespace '{}'",
                r.name,
                r.kind.to_lowercase(),
                r.namespace
            ),
            Lookup::ByUid(uid) => format!("No entity with uid {uid}"),
        };
        let on_fetched: OnFetched = Box::new(
            move |sidecar: &Sidecar, response: &UpstreamResponse| {
                if response.status == StatusCode::OK {
                    match Entity::from_json(response.body.clone()) {
                        Ok(entity) => sidecar.store_revalidated(Arc::new(entity)),
                        Err(e) => {
                            tracing::warn!(error = %e, "upstream returned an entity the mirror cannot hold")
                        }
                    }
                } else if response.status == StatusCode::NOT_FOUND {
                    sidecar
                        .hot
                        .put_missing(&negative_key, response.body.clone(), sidecar.now());
                }
            },
        );
        let request = UpstreamRequest::get(upstream_path.clone());
        self.revalidate(
            upstream_path,
            local,
            request,
            Operation::Revalidate,
            on_fetched,
            req,
            Some(not_found_message),
        )
        .await
    }

    /// The newest local copy of an entity and when it was confirmed: a
    /// revalidated copy in the hot cache when it is newer than the
    /// generation, else the generation's.
    fn find_entity(&self, lookup: &Lookup) -> Option<(Arc<Entity>, SystemTime)> {
        let view = self.view();
        let hot = !self.hot.is_empty();
        let (hot_key, from_view) = match lookup {
            Lookup::ByName(r) => {
                let canonical = r.canonical();
                let found = view
                    .as_ref()
                    .and_then(|v| v.index.by_ref(&canonical).cloned());
                (hot.then(|| HotKey::Ref(canonical.into())), found)
            }
            Lookup::ByUid(uid) => {
                let found = view.as_ref().and_then(|v| v.index.by_uid(uid).cloned());
                (hot.then(|| HotKey::Uid(uid.as_str().into())), found)
            }
        };
        let from_view = from_view.zip(view.as_ref()).map(|(entity, v)| {
            let confirmed = v
                .confirmed
                .get(&entity.uid)
                .copied()
                .map_or(v.meta.synced_at, |c| c.max(v.meta.synced_at));
            (entity, confirmed)
        });
        let from_hot = match hot_key.and_then(|k| self.hot.get(&k)) {
            Some(HotEntry::Entity {
                entity,
                confirmed_at,
            }) => Some((entity, confirmed_at)),
            _ => None,
        };
        match (from_hot, from_view) {
            (Some(h), Some(v)) => Some(if h.1 > v.1 { h } else { v }),
            (h, v) => h.or(v),
        }
    }

    /// Keeps an entity the upstream just returned: in the hot cache at once,
    /// in the mirror file in the background.
    fn store_revalidated(&self, entity: Arc<Entity>) {
        let at = self.now();
        self.hot.put_entity(entity.clone(), at);
        let mirror = self.mirror.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = mirror.store_entity(&entity, at) {
                tracing::warn!(error = %e, uid = %entity.uid, "cannot store a revalidated entity");
            }
        });
    }

    fn entity_reply(&self, body: &Bytes, confirmed_at: SystemTime) -> Reply {
        Reply {
            status: StatusCode::OK,
            headers: json_headers(),
            body: body.clone(),
            cache: CacheStatus::Hit,
            age: self.age_of(confirmed_at),
            stale: false,
        }
    }

    /// `POST /entities/by-refs`.
    pub async fn read_by_refs(&self, req: &Incoming<'_>) -> Reply {
        let parsed = match query::parse_by_refs(req.query, &req.body) {
            Ok(p) => p,
            Err(e) => return self.error_reply(ErrorKind::Input, &e.to_string(), req),
        };
        let view = self.view();
        let mut found = Vec::with_capacity(parsed.entity_refs.len());
        let mut oldest: Option<SystemTime> = None;
        let mut unknown = false;
        for text in &parsed.entity_refs {
            // Backstage compares the ref as written with the lower-cased
            // stored ref, so only an already lower-case ref can match.
            let entity = EntityRef::parse(text).ok().and_then(|r| {
                let as_written = format!("{}:{}/{}", r.kind, r.namespace, r.name);
                (as_written == r.canonical())
                    .then(|| self.find_entity(&Lookup::ByName(r)))
                    .flatten()
            });
            match entity {
                Some((e, confirmed)) => {
                    oldest = Some(oldest.map_or(confirmed, |o| o.min(confirmed)));
                    found.push(Some(e));
                }
                None => {
                    // An upper-case ref never matches (above): its null is
                    // the answer, not something to ask the upstream about.
                    let can_match = EntityRef::parse(text)
                        .map(|r| format!("{}:{}/{}", r.kind, r.namespace, r.name) == r.canonical())
                        .unwrap_or(true);
                    let negative = EntityRef::parse(text)
                        .map(|r| by_name_path(&r.kind, &r.namespace, &r.name).to_lowercase())
                        .ok()
                        .is_some_and(|k| {
                            matches!(
                                self.hot.get(&HotKey::Path(k.into())),
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
        let body = match query::render_by_refs(&parsed, &found) {
            Ok(b) => b,
            Err(e) => return self.error_reply(ErrorKind::Input, &e.to_string(), req),
        };
        let Some(view) = view else {
            return self
                .forward_without_mirror(req, Operation::Revalidate)
                .await;
        };
        let confirmed_at = oldest.unwrap_or(view.meta.synced_at);
        let local_reply = Reply {
            status: StatusCode::OK,
            headers: json_headers(),
            body,
            cache: CacheStatus::Hit,
            age: self.age_of(confirmed_at),
            stale: false,
        };
        if self.is_fresh(confirmed_at) && !unknown {
            return local_reply;
        }
        let on_fetched: OnFetched = Box::new(|sidecar: &Sidecar, response: &UpstreamResponse| {
            if response.status != StatusCode::OK {
                return;
            }
            #[derive(serde::Deserialize)]
            struct Items<'a> {
                #[serde(borrow)]
                items: Vec<Option<&'a serde_json::value::RawValue>>,
            }
            if let Ok(items) = serde_json::from_slice::<Items<'_>>(&response.body) {
                for raw in items.items.into_iter().flatten() {
                    if let Ok(entity) =
                        Entity::from_json(Bytes::copy_from_slice(raw.get().as_bytes()))
                    {
                        sidecar.store_revalidated(Arc::new(entity));
                    }
                }
            }
        });
        self.revalidate(
            req.key(),
            Local::Found {
                reply: local_reply,
                confirmed_at,
            },
            self.forward_request(req),
            Operation::Revalidate,
            on_fetched,
            req,
            None,
        )
        .await
    }

    /// A query answered from the mirror index (`GET /entities`, by-query, facets).
    pub async fn read_query(&self, kind: QueryKind, req: &Incoming<'_>) -> Reply {
        let Some(view) = self.view() else {
            return self.forward_without_mirror(req, Operation::Query).await;
        };
        let request = QueryRequest {
            kind,
            query_string: req.query,
            body: &req.body,
        };
        // Right after a restart or sync the query index may still be
        // building; waiting for it must not stall an async worker.
        let answered = if view.index.is_query_ready() {
            query::answer(&view.index, &request)
        } else {
            let index = view.index.clone();
            let (query_string, body) = (req.query.to_string(), req.body.clone());
            let waited = tokio::task::spawn_blocking(move || {
                query::answer(
                    &index,
                    &QueryRequest {
                        kind,
                        query_string: &query_string,
                        body: &body,
                    },
                )
            })
            .await;
            match waited {
                Ok(answered) => answered,
                Err(e) => {
                    tracing::error!(error = %e, "query failed while the index was building");
                    return self.error_reply(
                        ErrorKind::Internal,
                        "the query index is unavailable",
                        req,
                    );
                }
            }
        };
        let answer = match answered {
            Ok(a) => a,
            Err(e) => return self.error_reply(ErrorKind::Input, &e.to_string(), req),
        };
        let mut headers = json_headers();
        if let Some(link) = answer.link.and_then(|l| HeaderValue::from_str(&l).ok()) {
            headers.insert(http::header::LINK, link);
        }
        let confirmed_at = view.meta.synced_at;
        let reply = Reply {
            status: StatusCode::OK,
            headers,
            body: answer.body,
            cache: CacheStatus::Hit,
            age: self.age_of(confirmed_at),
            stale: false,
        };
        if self.is_fresh(confirmed_at) {
            return reply;
        }
        self.sync_soon();
        self.revalidate(
            req.key(),
            Local::Found {
                reply,
                confirmed_at,
            },
            self.forward_request(req),
            Operation::Query,
            Box::new(|_, _| {}),
            req,
            None,
        )
        .await
    }

    /// Before any generation is loaded there is nothing local: ask the upstream.
    async fn forward_without_mirror(&self, req: &Incoming<'_>, op: Operation) -> Reply {
        self.revalidate(
            req.key(),
            Local::Unknown,
            self.forward_request(req),
            op,
            Box::new(|_, _| {}),
            req,
            None,
        )
        .await
    }

    /// A read the mirror cannot compute (`/ancestry`, `/locations…`):
    /// fetched through the breaker, stored, served stale from the store
    /// during an outage.
    pub async fn read_through(&self, req: &Incoming<'_>) -> Reply {
        let key = req.path_and_query();
        let stored = match self.hot.get(&HotKey::Path(key.as_str().into())) {
            Some(HotEntry::Answer(a)) => Some(a),
            _ => {
                let mirror = self.mirror.clone();
                let k = key.clone();
                tokio::task::spawn_blocking(move || mirror.answer(&k))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten()
                    .map(Arc::new)
            }
        };
        let local = match stored {
            Some(answer) => {
                let mut headers = HeaderMap::new();
                if let Some(ct) = answer
                    .content_type
                    .as_deref()
                    .and_then(|c| HeaderValue::from_str(c).ok())
                {
                    headers.insert(http::header::CONTENT_TYPE, ct);
                }
                Local::Found {
                    reply: Reply {
                        status: StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK),
                        headers,
                        body: answer.body.clone(),
                        cache: CacheStatus::Hit,
                        age: self.age_of(answer.stored_at),
                        stale: false,
                    },
                    confirmed_at: answer.stored_at,
                }
            }
            None => Local::Unknown,
        };
        if let Local::Found {
            reply,
            confirmed_at,
        } = &local
        {
            if self.is_fresh(*confirmed_at) {
                return reply.clone();
            }
        }
        let store_key = key.clone();
        let on_fetched: OnFetched =
            Box::new(move |sidecar: &Sidecar, response: &UpstreamResponse| {
                if !response.status.is_success() {
                    return;
                }
                let answer = Arc::new(StoredAnswer {
                    status: response.status.as_u16(),
                    content_type: response
                        .headers
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string),
                    body: response.body.clone(),
                    stored_at: sidecar.now(),
                });
                sidecar.hot.put_answer(&store_key, answer.clone());
                let mirror = sidecar.mirror.clone();
                let k = store_key.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = mirror.store_answer(&k, &answer) {
                        tracing::warn!(error = %e, key = %k, "cannot store a read-through answer");
                    }
                });
            });
        self.revalidate(
            key,
            local,
            self.forward_request(req),
            Operation::ReadThrough,
            on_fetched,
            req,
            None,
        )
        .await
    }

    /// Writes and everything the sidecar does not interpret: passed through,
    /// never cached, never queued; with the breaker open, a fast 503.
    pub async fn pass_through(&self, req: &Incoming<'_>) -> Reply {
        let mut request = self.forward_request(req);
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
                Reply {
                    status: response.status,
                    headers: passed_headers(&response.headers),
                    body: response.body,
                    cache: CacheStatus::Bypass,
                    age: Duration::ZERO,
                    stale: false,
                }
            }
            Err(e) => self.unavailable(&e, req, "the write was not sent"),
        }
    }

    /// After a successful write, the entities it affected are re-read.
    fn after_write(&self, req: &Incoming<'_>) {
        if req.method == Method::DELETE {
            if let Some(uid) = req.path.strip_prefix("/entities/by-uid/") {
                if let Some(view) = self.view() {
                    if let Some(e) = view.index.by_uid(uid) {
                        self.hot.invalidate_entity(&e.uid, &e.entity_ref);
                    }
                }
            }
        }
        if req.method != Method::GET {
            self.sync_soon();
        }
    }

    fn forward_request(&self, req: &Incoming<'_>) -> UpstreamRequest {
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
        UpstreamRequest {
            method: req.method.clone(),
            path_and_query: req.path_and_query(),
            headers,
            body: req.body.clone(),
            own_identity: true,
        }
    }

    /// Asks the upstream (sharing the call with concurrent reads of `key`),
    /// waits at most the revalidate budget, and decides.
    #[allow(clippy::too_many_arguments)]
    async fn revalidate(
        &self,
        key: String,
        local: Local,
        request: UpstreamRequest,
        op: Operation,
        on_fetched: OnFetched,
        req: &Incoming<'_>,
        not_found_message: Option<String>,
    ) -> Reply {
        if let Some(refused) = self.upstream.refused_now(op) {
            return self.decide_without_upstream(local, &refused, req, not_found_message);
        }
        let fetch = self.fetch_shared(key, request, op, on_fetched);
        let budget = self.config.freshness.revalidate_budget.get();
        let outcome = match tokio::time::timeout(budget, fetch).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err((*e).clone()),
            Err(_) => Err(UpstreamError::Timeout(budget)),
        };
        let outcome = match outcome {
            Ok(response) if self.contradicts_held_mirror(&local, &response) => {
                Err(UpstreamError::Untrusted(
                    "it reports missing entities the mirror holds while a mass deletion is held"
                        .into(),
                ))
            }
            other => other,
        };
        match outcome {
            Ok(response) => {
                let had_local = matches!(local, Local::Found { .. });
                let status = response.status.as_u16();
                let cache = match (had_local, response.status) {
                    (true, _) => CacheStatus::Revalidated { status },
                    (false, StatusCode::OK) => CacheStatus::Stored,
                    (false, _) => CacheStatus::Miss { status },
                };
                Reply {
                    status: response.status,
                    headers: passed_headers(&response.headers),
                    body: response.body.clone(),
                    cache,
                    age: Duration::ZERO,
                    stale: false,
                }
            }
            Err(error) => self.decide_without_upstream(local, &error, req, not_found_message),
        }
    }

    /// Whether the upstream's word that entities are gone is in doubt: the
    /// deletion guard holds a sync, or the last sync failed (a catalog that
    /// empties mid-walk fails the walk before a full walk can be held).
    fn upstream_suspect(&self) -> bool {
        self.held_deletions().is_some()
            || self
                .last_sync()
                .is_some_and(|r| r.result == crate::sync::SyncResult::Failed)
    }

    /// While the upstream is suspect (see `upstream_suspect`), it is doubted when it says
    /// entities are lost: an answer that says a mirrored entity is gone (a 404,
    /// or a by-refs `null` the mirror can fill) is not taken over the mirror.
    fn contradicts_held_mirror(&self, local: &Local, response: &UpstreamResponse) -> bool {
        let Local::Found { reply, .. } = local else {
            return false;
        };
        if !self.upstream_suspect() {
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
        matches!((nulls(&response.body), nulls(&reply.body)), (Some(up), Some(here)) if up > here)
    }

    /// The staleness decision: the upstream could not answer.
    fn decide_without_upstream(
        &self,
        local: Local,
        error: &UpstreamError,
        req: &Incoming<'_>,
        not_found_message: Option<String>,
    ) -> Reply {
        let stale = self.flags.stale();
        let fresh_for = self.config.freshness.fresh_for.get();
        let (reply, confirmed_at) = match local {
            Local::Found {
                reply,
                confirmed_at,
            } => (reply, confirmed_at),
            Local::AbsentFromMirror { confirmed_at } => match not_found_message {
                Some(message) => (
                    self.error_reply(ErrorKind::NotFound, &message, req),
                    confirmed_at,
                ),
                None => {
                    return self.unavailable(error, req, "the mirror cannot answer this request")
                }
            },
            Local::Unknown => {
                return self.unavailable(error, req, "the mirror holds no copy of this")
            }
        };
        let age = self.age_of(confirmed_at);
        if stale.policy == StalePolicy::Refuse {
            return self.unavailable(
                error,
                req,
                "the stale-data policy is 'refuse', so mirror data the upstream cannot confirm is not served",
            );
        }
        if age > stale.max_stale {
            return self.unavailable(
                error,
                req,
                &format!(
                    "the mirror's copy is {} old, older than max_stale ({})",
                    humantime::format_duration(Duration::from_secs(age.as_secs())),
                    humantime::format_duration(stale.max_stale)
                ),
            );
        }
        let ttl = fresh_for.as_secs() as i64 - age.as_secs() as i64;
        Reply {
            cache: CacheStatus::StaleHit { ttl: ttl.min(-1) },
            age,
            stale: true,
            ..reply
        }
    }

    /// The sidecar's own 503, saying why and when to retry.
    fn unavailable(&self, error: &UpstreamError, req: &Incoming<'_>, detail: &str) -> Reply {
        let message = format!("The catalog is unavailable: {error}; {detail}");
        let (status, body) = error_body(
            ErrorKind::Unavailable,
            &message,
            req.method,
            &req.path_and_query(),
        );
        let mut headers = json_headers();
        let retry_after = error
            .retry_after()
            .unwrap_or(self.config.breaker.open_for.get())
            .as_secs_f64()
            .ceil()
            .max(1.0) as u64;
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
        Reply {
            status,
            headers,
            body,
            cache: CacheStatus::Unavailable,
            age: Duration::ZERO,
            stale: false,
        }
    }

    /// An error answered by the sidecar itself, in Backstage's shape.
    pub fn error_reply(&self, kind: ErrorKind, message: &str, req: &Incoming<'_>) -> Reply {
        let (status, body) = error_body(kind, message, req.method, &req.path_and_query());
        Reply {
            status,
            headers: json_headers(),
            body,
            cache: CacheStatus::Hit,
            age: Duration::ZERO,
            stale: false,
        }
    }

    fn fetch_shared(
        &self,
        key: String,
        request: UpstreamRequest,
        op: Operation,
        on_fetched: OnFetched,
    ) -> SharedFetch {
        let mut calls = self
            .inflight
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = calls.get(&key) {
            return existing.clone();
        }
        let Some(me) = self.self_ref.upgrade() else {
            let err: FetchResult = Err(Arc::new(UpstreamError::Connect(
                "the sidecar is shutting down".into(),
            )));
            return futures::future::ready(err).boxed().shared();
        };
        let task_key = key.clone();
        let handle = tokio::spawn(async move {
            let result = me.upstream.call(op, &request, Expect::Json, None).await;
            if let Ok(response) = &result {
                on_fetched(&me, response);
            }
            me.inflight
                .calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&task_key);
            result.map(Arc::new).map_err(Arc::new)
        });
        let shared = async move {
            handle.await.unwrap_or_else(|e| {
                Err(Arc::new(UpstreamError::Connect(format!(
                    "upstream task failed: {e}"
                ))))
            })
        }
        .boxed()
        .shared();
        calls.insert(key, shared.clone());
        shared
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
