//! The demo catalog server: Backstage's catalog REST API under
//! `/api/catalog`, with faults, on a listener it can close and reopen.
//!
//! `FakeCatalog::start` binds the catalog listener (and optionally the
//! control listener, see `control`) and returns a handle for tests, the
//! `fake-catalog` binary and `catalog-cache demo`. Layers, outermost first:
//! stats (every request that reached the port is counted), faults, error
//! rendering (the one place a Backstage error body is written), auth, routes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::catalog::{self, Cursor, FullText, ListRequest, OrderField, QueryStart};
use crate::faults::{listener_phase, FaultSwitch, Faults};
use crate::filter::{Filter, InputError, Predicate, Selector};
use crate::search;
use crate::store::{Item, Store};

/// Where Backstage mounts the catalog plugin.
pub const MOUNT: &str = "/api/catalog";
/// Default catalog listener of the `fake-catalog` command.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7007";
/// Default control listener of the `fake-catalog` command.
pub const DEFAULT_CONTROL: &str = "127.0.0.1:7017";
/// Default number of generated entities.
pub const DEFAULT_ENTITIES: usize = 5000;
const JSON: &str = "application/json; charset=utf-8";

/// How to start a demo catalog.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// Catalog listener (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Control listener for faults and stats; `None` for none.
    pub control: Option<SocketAddr>,
    /// How many entities to generate.
    pub entities: usize,
    /// Generator and fault RNG seed.
    pub seed: u64,
    /// When set, catalog requests need `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            control: None,
            entities: DEFAULT_ENTITIES,
            seed: 1,
            token: None,
        }
    }
}

/// Why the demo catalog could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Request counts by route since start (or the last reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Every request that reached the catalog port.
    pub total: u64,
    /// `GET /entities/by-name/...` (not ancestry).
    pub by_name: u64,
    /// `GET|DELETE /entities/by-uid/...`.
    pub by_uid: u64,
    /// `POST /entities/by-refs`.
    pub by_refs: u64,
    /// `GET|POST /entities/by-query`.
    pub by_query: u64,
    /// `GET /entities`.
    pub entities: u64,
    /// `GET|POST /entity-facets`.
    pub facets: u64,
    /// `GET .../ancestry`.
    pub ancestry: u64,
    /// Anything else (locations, refresh, validate, unknown paths).
    pub other: u64,
    /// Requests that were not one of Backstage's catalog routes (judged on
    /// the method and the raw path, see [`crate::routes::is_catalog_route`]);
    /// the first [`crate::routes::UNROUTED_KEPT`] are kept word for word
    /// ([`FakeCatalogHandle::unrouted_paths`], `unrouted_paths` in the
    /// control API's `GET /stats`).
    pub unrouted: u64,
    /// The most requests the catalog port was answering at once (counted
    /// from arrival to the answer's head).
    pub peak_in_flight: u64,
}

/// Indexes 0..=8 count by route (0 is the total), 9 counts unrouted
/// requests, 10 is the peak of requests in flight.
#[derive(Debug, Default)]
struct StatCounters([AtomicU64; 11]);

const UNROUTED: usize = 9;
const PEAK: usize = 10;

#[derive(Clone, Copy)]
enum Route {
    ByName = 1,
    ByUid,
    ByRefs,
    ByQuery,
    Entities,
    Facets,
    Ancestry,
    Other,
}

impl Route {
    fn of(path: &str) -> Route {
        let p = path.strip_prefix(MOUNT).unwrap_or(path);
        let p = p.trim_end_matches('/');
        if p == "/entities" {
            Route::Entities
        } else if p == "/entities/by-query" {
            Route::ByQuery
        } else if p == "/entities/by-refs" {
            Route::ByRefs
        } else if p.starts_with("/entities/by-name/") && p.ends_with("/ancestry") {
            Route::Ancestry
        } else if p.starts_with("/entities/by-name/") {
            Route::ByName
        } else if p.starts_with("/entities/by-uid/") {
            Route::ByUid
        } else if p == "/entity-facets" {
            Route::Facets
        } else {
            Route::Other
        }
    }
}

impl StatCounters {
    fn count(&self, route: Route) {
        self.0[0].fetch_add(1, Ordering::Relaxed);
        self.0[route as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> Stats {
        let v = |i: usize| self.0[i].load(Ordering::Relaxed);
        Stats {
            total: v(0),
            by_name: v(1),
            by_uid: v(2),
            by_refs: v(3),
            by_query: v(4),
            entities: v(5),
            facets: v(6),
            ancestry: v(7),
            other: v(8),
            unrouted: v(UNROUTED),
            peak_in_flight: v(PEAK),
        }
    }

    fn reset(&self) {
        self.0.iter().for_each(|c| c.store(0, Ordering::Relaxed));
    }
}

/// State shared by the listeners, the handlers and the handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) faults: FaultSwitch,
    stats: StatCounters,
    token: Option<String>,
    pub(crate) rng: Mutex<StdRng>,
    locations: Mutex<Vec<Value>>,
    /// The first unrouted requests, as `METHOD /path` (see `Stats::unrouted`).
    unrouted: Mutex<Vec<String>>,
    /// Requests being answered now.
    in_flight: AtomicU64,
    /// The fault generation the accept loop has acted on (listener closed
    /// or reopened accordingly).
    applied: watch::Sender<u64>,
}

impl Shared {
    /// Sets the faults and waits until the catalog listener reflects them
    /// (closed for `refuse`, open again after clearing).
    pub(crate) async fn apply_faults(&self, faults: Faults) {
        self.faults.set(faults);
        let want = self.faults.generation();
        let mut rx = self.applied.subscribe();
        // An error means the server stopped; nothing is left to wait for.
        let _ = rx.wait_for(|g| *g >= want).await;
    }

    pub(crate) fn stats(&self) -> Stats {
        self.stats.get()
    }

    pub(crate) fn reset_stats(&self) {
        self.stats.reset();
        self.unrouted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        // The peak starts again from what is in flight now.
        self.stats.0[PEAK].store(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The unrouted requests kept, oldest first.
    pub(crate) fn unrouted_paths(&self) -> Vec<String> {
        self.unrouted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts a request that is not a catalog route and keeps the first few.
    fn record_unrouted(&self, method: &Method, path: &str) {
        self.stats.0[UNROUTED].fetch_add(1, Ordering::Relaxed);
        let mut kept = self.unrouted.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() < crate::routes::UNROUTED_KEPT {
            kept.push(format!("{method} {path}"));
        }
    }
}

/// One request being answered: counted in `Shared::in_flight` until dropped.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(app: &'a Shared) -> InFlight<'a> {
        let now = app.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        app.stats.0[PEAK].fetch_max(now, Ordering::Relaxed);
        InFlight(app)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

type App = Arc<Shared>;

/// Entry point of the demo catalog.
#[derive(Debug)]
pub struct FakeCatalog;

impl FakeCatalog {
    /// Generates the entities, binds the listeners and starts serving on the
    /// current tokio runtime.
    pub async fn start(opts: FakeOptions) -> Result<FakeCatalogHandle, StartError> {
        let entities = crate::generate::generate(opts.entities, opts.seed);
        let shared = Arc::new(Shared {
            store: Store::new(entities),
            faults: FaultSwitch::new(),
            stats: StatCounters::default(),
            token: opts.token.clone(),
            rng: Mutex::new(StdRng::seed_from_u64(opts.seed)),
            locations: Mutex::new(vec![json!({
                "id": "9d4a6c51-7b0e-4b8a-9a43-5c0c2b1e7f10",
                "type": "url",
                "target": "https://github.com/acme/software-catalog/blob/main/all.yaml"
            })]),
            unrouted: Mutex::new(Vec::new()),
            in_flight: AtomicU64::new(0),
            applied: watch::channel(0).0,
        });
        let listener = bind(opts.listen).map_err(|source| StartError::Bind {
            addr: opts.listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: opts.listen,
            source,
        })?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(accept_loop(
            shared.clone(),
            router(shared.clone()),
            listener,
            addr,
            shutdown_rx.clone(),
        ))];
        let mut control_addr = None;
        if let Some(control) = opts.control {
            let l = bind(control).map_err(|source| StartError::Bind {
                addr: control,
                source,
            })?;
            control_addr = Some(l.local_addr().map_err(|source| StartError::Bind {
                addr: control,
                source,
            })?);
            let app = crate::control::router(shared.clone());
            let mut rx = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move {
                let stop = async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                };
                if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stop).await {
                    tracing::warn!(error = %e, "control listener stopped");
                }
            }));
        }
        Ok(FakeCatalogHandle {
            addr,
            control_addr,
            shared,
            shutdown: shutdown_tx,
            tasks,
        })
    }
}

/// A running demo catalog. Dropping it stops the server.
#[derive(Debug)]
pub struct FakeCatalogHandle {
    addr: SocketAddr,
    control_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl FakeCatalogHandle {
    /// The catalog listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream URL to configure: `http://ADDR/api/catalog`.
    pub fn base_url(&self) -> String {
        format!("http://{}{MOUNT}", self.addr)
    }

    /// The control listener's address, if one was asked for.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control_addr
    }

    /// The fault switch (set, update, clear, get).
    pub fn faults(&self) -> &FaultSwitch {
        &self.shared.faults
    }

    /// Replaces the fault set (shorthand for `faults().set`). Listener
    /// changes (`refuse`, `flap`) take effect a moment later; use
    /// `apply_faults` to wait for them.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.faults.set(faults);
    }

    /// Replaces the fault set and waits until the catalog listener reflects
    /// it: after `apply_faults(refuse)` connects are refused, after
    /// `apply_faults(Faults::default())` the port accepts again.
    pub async fn apply_faults(&self, faults: Faults) {
        self.shared.apply_faults(faults).await;
    }

    /// Request counts so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Zeroes the request counts and forgets the unrouted requests kept.
    pub fn reset_stats(&self) {
        self.shared.reset_stats();
    }

    /// The first [`crate::routes::UNROUTED_KEPT`] requests that reached the
    /// catalog port and were not a Backstage catalog route, as
    /// `METHOD /path` with the path as received (`stats().unrouted` counts
    /// them all).
    pub fn unrouted_paths(&self) -> Vec<String> {
        self.shared.unrouted_paths()
    }

    /// Edits the entity with this uid or ref (any case) and gives it a new
    /// etag. Returns the new etag, `None` if there is no such entity.
    pub fn update_entity(&self, ref_or_uid: &str, f: impl FnOnce(&mut Value)) -> Option<String> {
        self.shared.store.update(ref_or_uid, f)
    }

    /// Gives the entity a new etag without other changes.
    pub fn touch(&self, ref_or_uid: &str) -> Option<String> {
        self.update_entity(ref_or_uid, |_| {})
    }

    /// Removes every entity for which `pred` holds; returns how many.
    pub fn remove_entities(&self, pred: impl Fn(&Value) -> bool) -> usize {
        self.shared.store.remove(pred)
    }

    /// Adds entities (missing namespace, uid and etag are filled in; an
    /// entity with an existing ref replaces it).
    pub fn add_entities(&self, entities: Vec<Value>) {
        self.shared.store.add(entities);
    }

    /// One step of churn: `change` random entities get a new etag,
    /// `delete` are removed and `add` new ones appear, in one atomic swap.
    /// Returns how many were changed, added and deleted.
    pub fn churn(&self, change: usize, add: usize, delete: usize) -> (usize, usize, usize) {
        use rand::Rng;
        let churned = self.shared.store.churn(change, add, delete, |n| {
            self.shared
                .rng
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .random_range(0..n)
        });
        (
            churned.changed.len(),
            churned.added.len(),
            churned.deleted.len(),
        )
    }

    /// Replaces the whole catalog.
    pub fn replace_all(&self, entities: Vec<Value>) {
        self.shared.store.replace_all(entities);
    }

    /// All entities as stored, in uid order (ignores `empty_catalog`).
    pub fn entities(&self) -> Vec<Value> {
        self.shared.store.entities()
    }

    /// Stops both listeners and waits for them to close.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for FakeCatalogHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Reopening the same port after `refuse` must not wait for TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_on(
    l: &Option<TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Serves the catalog port, closing the listener (and dropping open
/// connections) while `refuse` or a `flap` down phase holds.
async fn accept_loop(
    app: App,
    router: Router,
    listener: TcpListener,
    addr: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut listener = Some(listener);
    let mut changes = app.faults.subscribe();
    let (kill_tx, _) = watch::channel(0u64);
    loop {
        if *shutdown.borrow() {
            break;
        }
        // Read the generation before the state: the state is then at least
        // as new as the generation reported as applied below.
        let generation = *changes.borrow_and_update();
        let (up, next) = listener_phase(&app.faults.state(), Instant::now());
        if up && listener.is_none() {
            match bind(addr) {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "cannot reopen the catalog listener yet");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        if !up && listener.is_some() {
            listener = None;
            kill_tx.send_modify(|v| *v += 1);
        }
        app.applied.send_replace(generation);
        let wake = async move {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = changes.changed() => continue,
            _ = wake => continue,
            accepted = accept_on(&listener) => {
                let Ok((stream, _)) = accepted else { continue };
                let svc = hyper_util::service::TowerToHyperService::new(router.clone());
                let mut kill = kill_tx.subscribe();
                let mut stop = shutdown.clone();
                tokio::spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = kill.changed() => {}
                        _ = stop.changed() => {}
                    }
                });
            }
        }
    }
    kill_tx.send_modify(|v| *v += 1);
}

fn router(app: App) -> Router {
    let routes = Router::new()
        .route("/entities", get(list_entities))
        .route("/entities/by-query", get(query_get).post(query_post))
        .route("/entities/by-refs", post(by_refs))
        .route("/entities/by-name/{kind}/{namespace}/{name}", get(by_name))
        .route(
            "/entities/by-name/{kind}/{namespace}/{name}/ancestry",
            get(ancestry),
        )
        .route("/entities/by-uid/{uid}", get(by_uid).delete(delete_by_uid))
        .route("/entity-facets", get(facets_get).post(facets_post))
        .route("/refresh", post(refresh))
        .route("/locations", get(locations).post(add_location))
        .route("/locations/{id}", get(location).delete(delete_location))
        .route("/validate-entity", post(validate_entity))
        .route("/analyze-location", post(analyze_location))
        .fallback(not_found);
    Router::new()
        .nest(MOUNT, routes)
        .fallback(not_found)
        // Backstage's backend compresses answers over 1 KB for clients that
        // ask (the `compression` middleware): sync traffic is measured as a
        // real catalog would send it. Faults act on the bytes as sent.
        .layer(
            tower_http::compression::CompressionLayer::new()
                .gzip(true)
                .compress_when(tower_http::compression::predicate::SizeAbove::new(1024)),
        )
        .layer(middleware::from_fn_with_state(app.clone(), auth))
        .layer(middleware::from_fn(render_errors))
        .layer(middleware::from_fn_with_state(app.clone(), apply_faults))
        .layer(middleware::from_fn_with_state(app.clone(), count))
        .with_state(app)
}

/// A Backstage error: status, error name and message. Turned into
/// Backstage's error body by `render_errors`, which knows the request.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{name}: {message}")]
pub(crate) struct ApiError {
    status: StatusCode,
    name: &'static str,
    message: String,
}

impl ApiError {
    fn input(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            name: "InputError",
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            name: "NotFoundError",
            message: message.into(),
        }
    }

    fn unauthenticated(message: &str) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            name: "AuthenticationError",
            message: message.into(),
        }
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        ApiError::input(e.0)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = self.status.into_response();
        r.extensions_mut().insert(self);
        r
    }
}

/// The request URL relative to the plugin mount, as Backstage reports it.
fn relative_url(uri: &axum::http::Uri) -> String {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    pq.strip_prefix(MOUNT).unwrap_or(pq).to_string()
}

fn error_response(
    method: &Method,
    url: &str,
    status: StatusCode,
    name: &str,
    message: &str,
) -> Response {
    let body = json!({
        "error": {"name": name, "message": message},
        "request": {"method": method.as_str(), "url": url},
        "response": {"statusCode": status.as_u16()}
    });
    json_response(status, Bytes::from(body.to_string()))
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON));
    r
}

async fn count(State(app): State<App>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    app.stats.count(Route::of(path));
    if !crate::routes::is_catalog_route(req.method(), path) {
        app.record_unrouted(req.method(), path);
    }
    let _in_flight = InFlight::enter(&app);
    next.run(req).await
}

async fn render_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let url = relative_url(req.uri());
    let resp = next.run(req).await;
    match resp.extensions().get::<ApiError>() {
        Some(e) => error_response(&method, &url, e.status, e.name, &e.message),
        None => resp,
    }
}

async fn auth(State(app): State<App>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok());
        match header {
            None => return ApiError::unauthenticated("Missing credentials").into_response(),
            Some(h) if h.strip_prefix("Bearer ").map(str::trim) != Some(token.as_str()) => {
                return ApiError::unauthenticated("Illegal token").into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

async fn apply_faults(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let faults = app.faults.get();
    if faults.malformed || faults.truncated {
        // These faults break bodies, and a 304 has none: the conditional
        // shortcut is refused while they hold, so that every answer the
        // sidecar can ask for is broken (the chaos bounds rely on it).
        req.headers_mut().remove(header::IF_NONE_MATCH);
    }
    let method = req.method().clone();
    let url = relative_url(req.uri());
    let html = faults.wrong_content_type || faults.html_for(req.uri().path());
    if faults.black_hole {
        // Never answer while the fault holds; a cleared fault lets a client
        // that is still waiting get its answer.
        let mut changes = app.faults.subscribe();
        while app.faults.get().black_hole {
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
    if let Some(ms) = faults.latency {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(secs) = faults.too_many_requests {
        let mut r = error_response(
            &method,
            &url,
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequestsError",
            "Too many requests, please try again later",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return r;
    }
    if faults.error_rate > 0.0 {
        let (hit, unavailable) = {
            let mut rng = app.rng.lock().unwrap_or_else(|p| p.into_inner());
            (
                rng.random::<f64>() < faults.error_rate,
                rng.random::<bool>(),
            )
        };
        if hit {
            return if unavailable {
                error_response(
                    &method,
                    &url,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailableError",
                    "Service unavailable",
                )
            } else {
                error_response(
                    &method,
                    &url,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Error",
                    "Internal server error",
                )
            };
        }
    }
    let resp = next.run(req).await;
    if !(html || faults.malformed || faults.truncated || faults.slow_body.is_some()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let bytes = if html {
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        parts.status = StatusCode::OK;
        Bytes::from_static(
            b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><h1>Please sign in</h1><form method=\"post\"><input name=\"user\"></form></body></html>",
        )
    } else if faults.malformed {
        let mut v = bytes[..bytes.len() / 2].to_vec();
        v.extend_from_slice(b"\x00<<not json");
        Bytes::from(v)
    } else {
        bytes
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    if faults.truncated {
        let half = bytes.slice(..bytes.len() / 2);
        // Pause before failing so the headers and the first half are flushed
        // to the client: it sees a plausible response that then breaks off.
        let stream = futures::stream::unfold(Some(half), |state| async move {
            match state {
                Some(half) => Some((Ok::<Bytes, std::io::Error>(half), None)),
                None => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Some((
                        Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "truncated by fault",
                        )),
                        None,
                    ))
                }
            }
        });
        return Response::from_parts(parts, Body::from_stream(stream));
    }
    if let Some(slow) = faults.slow_body {
        let chunk = slow.bytes.max(1);
        let interval = Duration::from_millis(slow.interval_ms);
        if bytes.is_empty() {
            // A link that trickles bodies trickles headers too: a body-less
            // answer (a 304, a HEAD) is held for as long as its status line
            // and headers would take at the same rate, so it cannot slip
            // through the fault as a quick success.
            let head = 17
                + parts
                    .headers
                    .iter()
                    .map(|(k, v)| k.as_str().len() + v.len() + 4)
                    .sum::<usize>();
            tokio::time::sleep(interval * head.div_ceil(chunk) as u32).await;
            return Response::from_parts(parts, Body::empty());
        }
        let stream = futures::stream::unfold(0usize, move |pos| {
            let bytes = bytes.clone();
            async move {
                if pos >= bytes.len() {
                    return None;
                }
                if pos > 0 {
                    tokio::time::sleep(interval).await;
                }
                let end = (pos + chunk).min(bytes.len());
                Some((Ok::<Bytes, std::io::Error>(bytes.slice(pos..end)), end))
            }
        });
        return Response::from_parts(parts, Body::from_stream(stream));
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// Query-string pairs, decoded, in order.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(raw: Option<&str>) -> Params {
        Params(
            raw.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn first(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn int(&self, name: &str) -> Result<Option<usize>, ApiError> {
        match self.first(name) {
            None => Ok(None),
            Some(v) => match v.trim().parse::<i64>() {
                Ok(n) if n >= 0 => Ok(Some(n as usize)),
                Ok(_) => Err(ApiError::input(format!(
                    "request/query/{name} must be >= 0"
                ))),
                Err(_) => Err(ApiError::input(format!(
                    "request/query/{name} must be integer"
                ))),
            },
        }
    }

    /// `fields=a,b&fields=c` → `[a, b, c]`.
    fn fields(&self) -> Result<Vec<String>, ApiError> {
        checked_fields(split_list(&self.all("fields")))
    }

    /// Form-encodes the pairs as `URLSearchParams` would.
    fn encode(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// Backstage's `parseEntityTransformParams` refuses array-index syntax.
fn checked_fields(fields: Vec<String>) -> Result<Vec<String>, ApiError> {
    if fields.iter().any(|f| f.contains('[')) {
        return Err(ApiError::input(
            "invalid fields, array type fields are not supported",
        ));
    }
    Ok(fields)
}

fn split_list(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let decoded = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match decoded {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn items_json(items: &[Arc<Item>], fields: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.iter().map(|i| i.json.len() + 1).sum::<usize>() + 2);
    out.push(b'[');
    for (n, it) in items.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        push_entity(&mut out, it, fields);
    }
    out.push(b']');
    out
}

fn push_entity(out: &mut Vec<u8>, it: &Item, fields: &[String]) {
    if fields.is_empty() {
        out.extend_from_slice(&it.json);
    } else {
        out.extend_from_slice(search::project(&it.value, fields).to_string().as_bytes());
    }
}

fn fail_page_error(app: &App, page: usize) -> Result<(), ApiError> {
    if app
        .faults
        .get()
        .fail_page
        .is_some_and(|n| n as usize == page)
    {
        return Err(ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            name: "Error",
            message: format!("Page {page} failed (fail_page fault)"),
        });
    }
    Ok(())
}

fn snapshot(app: &App) -> Arc<crate::store::Snapshot> {
    app.store.snapshot(app.faults.get().empty_catalog)
}

fn parse_order(values: &[String]) -> Result<Vec<OrderField>, ApiError> {
    values
        .iter()
        .map(|item| match item.split_once(':') {
            Some((dir @ ("asc" | "desc"), field)) if !field.is_empty() => Ok(OrderField {
                field: field.to_string(),
                desc: dir == "desc",
            }),
            _ => Err(ApiError::input(format!(
                "Invalid order parameter \"{item}\", expected \"<asc or desc>:<field name>\""
            ))),
        })
        .collect()
}

async fn list_entities(
    State(app): State<App>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(raw.as_deref());
    let selector = Filter::parse(&params.all("filter"))?.map(Selector::Filter);
    let fields = params.fields()?;
    let order = parse_order(&params.all("order"))?;
    let mut offset = params.int("offset")?.unwrap_or(0);
    let mut limit = params.int("limit")?;
    // `parseEntityPaginationParams` refuses a zero limit on `GET /entities`
    // (by-query accepts it and answers only the count).
    if limit == Some(0) {
        return Err(ApiError::input("Invalid limit, must be greater than zero"));
    }
    if params.first("after") == Some("") {
        return Err(too_short("after"));
    }
    if let Some(after) = params.first("after") {
        let bad = || ApiError::input("Malformed after cursor, could not be parsed");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(after.trim())
            .map_err(|_| bad())?;
        let cursor: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
        if let Some(l) = cursor.get("limit") {
            limit =
                Some(l.as_u64().ok_or_else(|| {
                    ApiError::input("Malformed after cursor, limit was not an number")
                })? as usize);
        }
        if let Some(o) = cursor.get("offset") {
            offset = o
                .as_u64()
                .ok_or_else(|| ApiError::input("Malformed after cursor, offset was not a number"))?
                as usize;
        }
    }
    if let Some(l) = limit.filter(|l| *l > 0) {
        fail_page_error(&app, offset / l + 1)?;
    }
    let snap = snapshot(&app);
    let req = ListRequest {
        selector,
        order,
        offset,
        limit,
    };
    let (items, more) = catalog::list(&snap, &req);
    let mut resp = json_response(StatusCode::OK, Bytes::from(items_json(&items, &fields)));
    if let (true, Some(l)) = (more, limit) {
        let after = base64::engine::general_purpose::STANDARD
            .encode(json!({"limit": l, "offset": offset + l}).to_string());
        let mut next = Params(
            params
                .0
                .into_iter()
                .filter(|(k, _)| k != "offset")
                .collect(),
        );
        match next.0.iter().position(|(k, _)| k == "after") {
            Some(i) => {
                next.0[i].1 = after;
                let mut seen = false;
                next.0
                    .retain(|(k, _)| k != "after" || !std::mem::replace(&mut seen, true));
            }
            None => next.0.push(("after".into(), after)),
        }
        let link = format!("</entities?{}>; rel=\"next\"", next.encode());
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert(header::LINK, v);
        }
    }
    Ok(resp)
}

fn page_response(page: catalog::QueryPage, fields: &[String]) -> Bytes {
    let mut out =
        Vec::with_capacity(page.items.iter().map(|i| i.json.len() + 1).sum::<usize>() + 256);
    out.extend_from_slice(b"{\"items\":");
    out.extend_from_slice(&items_json(&page.items, fields));
    out.extend_from_slice(format!(",\"totalItems\":{},\"pageInfo\":", page.total_items).as_bytes());
    let mut info = serde_json::Map::new();
    if let Some(c) = page.next_cursor {
        info.insert("nextCursor".into(), json!(c));
    }
    if let Some(c) = page.prev_cursor {
        info.insert("prevCursor".into(), json!(c));
    }
    out.extend_from_slice(Value::Object(info).to_string().as_bytes());
    out.push(b'}');
    Bytes::from(out)
}

/// How Express's `res.json` answers, which Backstage uses for a page of
/// projected entities (`fields`; whole entities are streamed, with no
/// tag): a weak `ETag` over the body, and for a GET whose `If-None-Match`
/// names it, a 304 with no body.
fn express_json(body: Bytes, if_none_match: Option<&HeaderValue>) -> Response {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    body[..].hash(&mut hasher);
    let etag = format!("W/\"{:x}-{:016x}\"", body.len(), hasher.finish());
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let fresh = if_none_match
        .and_then(|v| v.to_str().ok())
        .is_some_and(|list| {
            list.split(',')
                .any(|t| t.trim() == "*" || opaque(t) == opaque(&etag))
        });
    let mut r = if fresh {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        json_response(StatusCode::OK, body)
    };
    if let Ok(v) = HeaderValue::from_str(&etag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// One page of by-query. With `fields`, answered as Express's `res.json`
/// ([`express_json`]; `if_none_match` only for a GET, as Express).
fn run_query(
    app: &App,
    start: QueryStart,
    limit: usize,
    fields: &[String],
    if_none_match: Option<&HeaderValue>,
) -> Result<Response, ApiError> {
    let snap = snapshot(app);
    let page = catalog::query(&snap, start, limit);
    if limit > 0 {
        fail_page_error(app, page.page_number)?;
    }
    let projected = !fields.is_empty();
    let body = page_response(page, fields);
    Ok(if projected {
        express_json(body, if_none_match)
    } else {
        json_response(StatusCode::OK, body)
    })
}

/// The OpenAPI validator's answer to an empty `after` or `cursor` (both
/// `minLength: 1` in Backstage's schema).
fn too_short(name: &str) -> ApiError {
    ApiError::input(format!(
        "request/query/{name} must NOT have fewer than 1 characters"
    ))
}

async fn query_get(
    State(app): State<App>,
    headers: axum::http::HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(raw.as_deref());
    let fields = params.fields()?;
    let limit = params.int("limit")?.unwrap_or(catalog::DEFAULT_QUERY_LIMIT);
    let start = match params.first("cursor") {
        Some("") => return Err(too_short("cursor")),
        Some(c) => QueryStart::Cursor(Box::new(Cursor::decode(c)?)),
        None => {
            let selector = Filter::parse(&params.all("filter"))?
                .map(Selector::Filter)
                .unwrap_or(Selector::All);
            let mut order = Vec::new();
            for item in params.all("orderField") {
                let (field, dir) = match item.split_once(',') {
                    Some((f, d)) => (f.trim(), Some(d.trim())),
                    None => (item.trim(), None),
                };
                let desc = match dir {
                    None | Some("asc") => false,
                    Some("desc") => true,
                    Some(_) => {
                        return Err(ApiError::input(
                            "Invalid order field order, must be asc or desc",
                        ))
                    }
                };
                order.push(OrderField {
                    field: field.to_string(),
                    desc,
                });
            }
            let full_text = FullText {
                term: params.first("fullTextFilterTerm").unwrap_or("").to_string(),
                fields: params
                    .first("fullTextFilterFields")
                    .map(|f| split_list(&[f.to_string()])),
            };
            QueryStart::Initial {
                selector,
                order,
                full_text,
                offset: params.int("offset")?.unwrap_or(0),
            }
        }
    };
    run_query(
        &app,
        start,
        limit,
        &fields,
        headers.get(header::IF_NONE_MATCH),
    )
}

fn body_json(body: &Bytes) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::input(format!("Malformed request body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::input("Expected body to be a JSON object"));
    }
    Ok(v)
}

fn string_list(v: Option<&Value>, what: &str) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::input(format!(
                        "Malformed request: {what} must be an array of strings"
                    ))
                })
            })
            .collect(),
        Some(_) => Err(ApiError::input(format!(
            "Malformed request: {what} must be an array of strings"
        ))),
    }
}

fn body_limit(body: &Value, default: usize) -> Result<usize, ApiError> {
    match body.get("limit") {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| ApiError::input("request/body/limit must be integer")),
    }
}

fn order_by(f: &Value) -> Result<OrderField, ApiError> {
    let field = f
        .get("field")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::input("Malformed request: orderBy.field must be a string"))?;
    let desc = match f.get("order").and_then(Value::as_str) {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(_) => {
            return Err(ApiError::input(
                "Invalid order field order, must be asc or desc",
            ))
        }
    };
    Ok(OrderField {
        field: field.to_string(),
        desc,
    })
}

async fn query_post(State(app): State<App>, body: Bytes) -> Result<Response, ApiError> {
    let body = body_json(&body)?;
    let fields = checked_fields(string_list(body.get("fields"), "fields")?)?;
    let limit = body_limit(&body, catalog::DEFAULT_QUERY_LIMIT)?;
    let start = match body.get("cursor").and_then(Value::as_str) {
        Some(c) => QueryStart::Cursor(Box::new(Cursor::decode(c)?)),
        None => {
            let selector = match body.get("query") {
                None | Some(Value::Null) => Selector::All,
                Some(q) => Selector::Predicate {
                    parsed: Predicate::parse(q)?,
                    raw: q.clone(),
                },
            };
            let order = match body.get("orderBy") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(list)) => list.iter().map(order_by).collect::<Result<_, _>>()?,
                Some(one) => vec![order_by(one)?],
            };
            let ft = body.get("fullTextFilter");
            let full_text = FullText {
                term: ft
                    .and_then(|f| f.get("term"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                fields: ft
                    .and_then(|f| f.get("fields"))
                    .map(|f| string_list(Some(f), "fullTextFilter.fields"))
                    .transpose()?,
            };
            let offset = match body.get("offset") {
                None | Some(Value::Null) => 0,
                Some(v) => v
                    .as_u64()
                    .ok_or_else(|| ApiError::input("request/body/offset must be integer"))?
                    as usize,
            };
            QueryStart::Initial {
                selector,
                order,
                full_text,
                offset,
            }
        }
    };
    run_query(&app, start, limit, &fields, None)
}

async fn by_refs(
    State(app): State<App>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = Params::parse(raw.as_deref());
    let body = body_json(&body)?;
    // The OpenAPI schema (`entityRefs` required, an array of strings) is
    // checked before the handler, in the validator's words.
    let refs = match body.get("entityRefs") {
        None => {
            return Err(ApiError::input(
                "request/body must have required property 'entityRefs'",
            ))
        }
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::input(format!("request/body/entityRefs/{i} must be string"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(ApiError::input("request/body/entityRefs must be array")),
    };
    let mut fields = checked_fields(string_list(body.get("fields"), "fields")?)?;
    if fields.is_empty() {
        fields = params.fields()?;
    }
    let filter = Filter::parse(&params.all("filter"))?;
    let predicate = match body.get("query") {
        None | Some(Value::Null) => None,
        Some(q) => Some(Predicate::parse(q)?),
    };
    let selector = match (filter, predicate) {
        (None, None) => Selector::All,
        (Some(f), None) => Selector::Filter(f),
        (None, Some(p)) => Selector::Predicate {
            parsed: p,
            raw: Value::Null,
        },
        (Some(f), Some(p)) => Selector::Both(f, p),
    };
    let snap = snapshot(&app);
    let found = catalog::by_refs(&snap, &refs, &selector);
    let mut out = b"{\"items\":[".to_vec();
    for (n, slot) in found.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        match slot {
            Some(it) => push_entity(&mut out, it, &fields),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.extend_from_slice(b"]}");
    Ok(json_response(StatusCode::OK, Bytes::from(out)))
}

fn find_by_name(app: &App, kind: &str, namespace: &str, name: &str) -> Result<Arc<Item>, ApiError> {
    let entity_ref = format!("{kind}:{namespace}/{name}").to_lowercase();
    snapshot(app).by_ref(&entity_ref).cloned().ok_or_else(|| {
        ApiError::not_found(format!(
            "No entity named '{name}' found, with kind '{kind}' in namespace '{namespace}'"
        ))
    })
}

async fn by_name(
    State(app): State<App>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let it = find_by_name(&app, &kind, &namespace, &name)?;
    Ok(json_response(StatusCode::OK, it.json.clone()))
}

async fn ancestry(
    State(app): State<App>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let entity_ref = format!("{kind}:{namespace}/{name}").to_lowercase();
    let it = snapshot(&app)
        .by_ref(&entity_ref)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("No such entity {entity_ref}")))?;
    let body = json!({
        "rootEntityRef": it.entity_ref,
        "items": [{"entity": it.value, "parentEntityRefs": []}]
    });
    Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())))
}

async fn by_uid(State(app): State<App>, Path(uid): Path<String>) -> Result<Response, ApiError> {
    let snap = snapshot(&app);
    // Backstage answers by-uid with a `metadata.uid` filter, and filters
    // compare lower-cased values: any spelling of the uid finds it.
    let lower = uid.to_lowercase();
    let it = snap
        .by_uid(&uid)
        .or_else(|| snap.items.iter().find(|it| it.uid.to_lowercase() == lower))
        .ok_or_else(|| ApiError::not_found(format!("No entity with uid {uid}")))?;
    Ok(json_response(StatusCode::OK, it.json.clone()))
}

async fn delete_by_uid(
    State(app): State<App>,
    Path(uid): Path<String>,
) -> Result<Response, ApiError> {
    if snapshot(&app).by_uid(&uid).is_none() {
        return Err(ApiError::not_found(format!("No entity with uid {uid}")));
    }
    app.store
        .remove(|e| e["metadata"]["uid"].as_str() == Some(uid.as_str()));
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn facets_get(State(app): State<App>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let params = Params::parse(raw.as_deref());
    let facets = params.all("facet");
    if facets.is_empty() {
        return Err(ApiError::input(
            "request/query must have required property 'facet'",
        ));
    }
    // `parseEntityFacetParams` drops empty facets and refuses none left.
    let facets: Vec<String> = facets.into_iter().filter(|f| !f.is_empty()).collect();
    if facets.is_empty() {
        return Err(ApiError::input("Missing facet parameter"));
    }
    let selector = Filter::parse(&params.all("filter"))?
        .map(Selector::Filter)
        .unwrap_or(Selector::All);
    let body = catalog::facets(&snapshot(&app), &selector, &facets);
    Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())))
}

async fn facets_post(State(app): State<App>, body: Bytes) -> Result<Response, ApiError> {
    let body = body_json(&body)?;
    // `facets` is a required body property: the OpenAPI validator words it.
    if body.get("facets").is_none_or(Value::is_null) {
        return Err(ApiError::input(
            "request/body must have required property 'facets'",
        ));
    }
    let facets: Vec<String> = string_list(body.get("facets"), "facets")?
        .into_iter()
        .filter(|f| !f.is_empty())
        .collect();
    if facets.is_empty() {
        return Err(ApiError::input("Missing facet parameter"));
    }
    let selector = match body.get("query") {
        None | Some(Value::Null) => Selector::All,
        Some(q) => Selector::Predicate {
            parsed: Predicate::parse(q)?,
            raw: q.clone(),
        },
    };
    let body = catalog::facets(&snapshot(&app), &selector, &facets);
    Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())))
}

async fn refresh(body: Bytes) -> Result<Response, ApiError> {
    let body = body_json(&body)?;
    if body.get("entityRef").and_then(Value::as_str).is_none() {
        return Err(ApiError::input("Malformed request: entityRef is required"));
    }
    Ok(StatusCode::OK.into_response())
}

async fn locations(State(app): State<App>) -> Response {
    let list: Vec<Value> = app
        .locations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|l| json!({ "data": l }))
        .collect();
    json_response(StatusCode::OK, Bytes::from(Value::Array(list).to_string()))
}

async fn location(State(app): State<App>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let locs = app
        .locations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let loc = locs
        .into_iter()
        .find(|l| l["id"].as_str() == Some(id.as_str()))
        .ok_or_else(|| ApiError::not_found(format!("Found no location with ID {id}")))?;
    Ok(json_response(StatusCode::OK, Bytes::from(loc.to_string())))
}

async fn add_location(
    State(app): State<App>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let params = Params::parse(raw.as_deref());
    let body = body_json(&body)?;
    let (Some(kind), Some(target)) = (
        body.get("type").and_then(Value::as_str),
        body.get("target").and_then(Value::as_str),
    ) else {
        return Err(ApiError::input(
            "Malformed request: type and target are required",
        ));
    };
    let id = {
        let mut rng = app.rng.lock().unwrap_or_else(|p| p.into_inner());
        let mut sm = crate::generate::SplitMix::new(rng.random());
        crate::generate::uuid(&mut sm)
    };
    let loc = json!({"id": id, "type": kind, "target": target});
    if params.first("dryRun") != Some("true") {
        app.locations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(loc.clone());
    }
    let body = json!({"location": loc, "entities": []});
    Ok(json_response(
        StatusCode::CREATED,
        Bytes::from(body.to_string()),
    ))
}

async fn delete_location(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let mut locs = app.locations.lock().unwrap_or_else(|p| p.into_inner());
    let before = locs.len();
    locs.retain(|l| l["id"].as_str() != Some(id.as_str()));
    if locs.len() == before {
        return Err(ApiError::not_found(format!(
            "Found no location with ID {id}"
        )));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn validate_entity(body: Bytes) -> Result<Response, ApiError> {
    let body = body_json(&body)?;
    let entity = body.get("entity").cloned().unwrap_or(Value::Null);
    let mut errors = Vec::new();
    for (path, ok) in [
        ("apiVersion", entity["apiVersion"].is_string()),
        ("kind", entity["kind"].is_string()),
        ("metadata.name", entity["metadata"]["name"].is_string()),
    ] {
        if !ok {
            errors.push(json!({"name": "InputError", "message": format!("Malformed envelope, {path} is missing")}));
        }
    }
    if errors.is_empty() {
        return Ok(StatusCode::OK.into_response());
    }
    Ok(json_response(
        StatusCode::BAD_REQUEST,
        Bytes::from(json!({ "errors": errors }).to_string()),
    ))
}

async fn analyze_location(body: Bytes) -> Result<Response, ApiError> {
    body_json(&body)?;
    let body = json!({"existingEntityFiles": [], "generateEntities": []});
    Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())))
}

async fn not_found() -> ApiError {
    ApiError::not_found("Not found")
}

/// Runs `fut` until SIGINT or SIGTERM (used by the binary).
pub async fn until_signal<F: Future>(fut: F) -> Option<F::Output> {
    let term = async {
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await
    };
    tokio::select! {
        out = fut => Some(out),
        _ = tokio::signal::ctrl_c() => None,
        _ = term => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_and_form_encoding() {
        assert_eq!(
            percent_decode("kind%3Dcomponent%2Cspec.type"),
            "kind=component,spec.type"
        );
        assert_eq!(percent_decode("a+b%"), "a b%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(form_encode("eyJ9=="), "eyJ9%3D%3D");
        assert_eq!(form_encode("kind=a b"), "kind%3Da+b");
    }

    #[test]
    fn routes_are_classified_for_stats() {
        assert!(matches!(
            Route::of("/api/catalog/entities"),
            Route::Entities
        ));
        assert!(matches!(
            Route::of("/api/catalog/entities/by-name/a/b/c"),
            Route::ByName
        ));
        assert!(matches!(
            Route::of("/api/catalog/entities/by-name/a/b/c/ancestry"),
            Route::Ancestry
        ));
        assert!(matches!(Route::of("/api/catalog/locations"), Route::Other));
    }
}
