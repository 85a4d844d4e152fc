//! The running sidecar: its shared state and its lifecycle.
//!
//! `Sidecar::open` loads the on-disk mirror (so reads are served before any
//! sync), `run` binds the proxy and admin listeners, starts the sync loop and
//! the housekeeping tasks, and drains in-flight requests on shutdown within a
//! bounded grace period. The read path, the sync loop and the admin API all
//! share one `Arc<Sidecar>`; the current generation is swapped atomically, so
//! a reader sees the old generation or the new one, never a mix.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::breaker::{Breaker, BreakerConfig};
use crate::cache::HotCache;
use crate::config::Config;
use crate::flags::Flags;
use crate::index::Index;
use crate::metrics as m;
use crate::mirror::{GenerationMeta, Mirror, MirrorError, OpenOutcome};
use crate::read::InFlight;
use crate::sync::{HeldDeletions, SyncReport};
use crate::upstream::Upstream;

/// How long in-flight requests may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Wall-clock time as the sidecar sees it. Tests hand in one they can move
/// forward, so that data can age without sleeping.
#[derive(Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// Now.
    pub fn now(&self) -> SystemTime {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        let now = SystemTime::now();
        if offset >= 0 {
            now + Duration::from_millis(offset as u64)
        } else {
            now - Duration::from_millis(offset.unsigned_abs())
        }
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }
}

/// One loaded generation: its index and metadata.
pub struct View {
    /// The query index (it holds the entities).
    pub index: Arc<Index>,
    /// Generation metadata.
    pub meta: GenerationMeta,
    /// Entities revalidated after the generation was applied, and when.
    pub confirmed: Arc<HashMap<Arc<str>, SystemTime>>,
}

impl View {
    /// uid → etag of every entity: what the next generation is compared with.
    pub fn etags(&self) -> HashMap<Arc<str>, Arc<str>> {
        crate::mirror::etags(self.index.entities())
    }
}

/// The sync loop's shared state.
#[derive(Default)]
pub struct SyncControl {
    /// Wakes the loop for an early sync.
    pub trigger: Notify,
    /// One sync at a time.
    pub lock: tokio::sync::Mutex<()>,
    /// The last report.
    pub last: Mutex<Option<SyncReport>>,
    /// Deletions being held.
    pub held: Mutex<Option<HeldDeletions>>,
}

/// The sidecar's shared state.
pub struct Sidecar {
    /// The effective configuration.
    pub config: Config,
    /// The durable mirror.
    pub mirror: Arc<Mirror>,
    /// The upstream client (it holds the breaker).
    pub upstream: Arc<Upstream>,
    /// The breaker, shared by every upstream call.
    pub breaker: Breaker,
    /// The operator's flags.
    pub flags: Flags,
    /// The hot cache.
    pub hot: HotCache,
    /// The sync loop's state.
    pub sync: SyncControl,
    /// Wall clock.
    pub clock: Clock,
    /// The admin token.
    pub admin_token: String,
    /// Accepted client tokens, when the proxy requires them.
    pub client_tokens: Option<HashSet<String>>,
    pub(crate) inflight: InFlight,
    pub(crate) self_ref: Weak<Sidecar>,
    view: ArcSwapOption<View>,
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The mirror could not be opened.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// A token file could not be read or written.
    #[error("{0}")]
    Token(String),
}

impl Sidecar {
    /// Opens the mirror and loads its generation; no network is touched.
    pub fn open(config: Config, clock: Clock) -> Result<Arc<Self>, StartError> {
        let (mirror, outcome) = Mirror::open(&config.mirror.path)?;
        if let OpenOutcome::MovedAside(aside) = &outcome {
            tracing::error!(
                path = %config.mirror.path.display(),
                moved_to = %aside.display(),
                "the mirror database was corrupt: moved it aside and starting empty; the next sync refills it"
            );
        }
        let mirror = Arc::new(mirror);
        let started = std::time::Instant::now();
        let loaded = mirror.load()?;
        let loaded_in = started.elapsed();
        let view = loaded.meta.map(|meta| View {
            index: Arc::new(Index::build(meta.id, loaded.entities)),
            meta,
            confirmed: Arc::new(loaded.confirmed),
        });
        if let Some(v) = &view {
            tracing::info!(
                generation = v.meta.id,
                entities = v.index.len(),
                load_seconds = loaded_in.as_secs_f64(),
                index_seconds = (started.elapsed() - loaded_in).as_secs_f64(),
                "mirror loaded from disk"
            );
        }
        let flags = Flags::load(&config, &mirror)?;
        let b = &config.breaker;
        let breaker = Breaker::new(BreakerConfig {
            consecutive_failures: b.consecutive_failures,
            failure_rate: b.failure_rate,
            min_calls: b.min_calls,
            window: b.window.get(),
            open_for: b.open_for.get(),
            max_open: b.max_open.get(),
            half_open_probes: b.half_open_probes,
            jitter: crate::breaker::DEFAULT_JITTER,
        });
        breaker.set_mode(flags.mode().mode);
        let upstream = Arc::new(Upstream::new(&config.upstream, Arc::new(breaker.clone())));
        let hot = HotCache::new(
            config.hot_cache.max_entries,
            config.freshness.negative_ttl.get(),
        );
        let admin_token = admin_token(&config)?;
        let client_tokens = client_tokens(&config)?;
        let sync = SyncControl::default();
        if let Ok(Some(text)) = mirror.note("last_sync") {
            *sync.last.lock().unwrap_or_else(|p| p.into_inner()) = serde_json::from_str(&text).ok();
        }
        if let Ok(Some(text)) = mirror.note("held_deletions") {
            *sync.held.lock().unwrap_or_else(|p| p.into_inner()) = serde_json::from_str(&text).ok();
        }
        let sidecar = Arc::new_cyclic(|weak| Self {
            config,
            mirror,
            upstream,
            breaker,
            flags,
            hot,
            sync,
            clock,
            admin_token,
            client_tokens,
            inflight: InFlight::default(),
            self_ref: weak.clone(),
            view: ArcSwapOption::from(view.map(Arc::new)),
        });
        sidecar.publish_gauges();
        Ok(sidecar)
    }

    /// The current generation, if one is loaded.
    pub fn view(&self) -> Option<Arc<View>> {
        self.view.load_full()
    }

    /// Makes `view` the current generation.
    pub(crate) fn install(&self, view: View) {
        self.view.store(Some(Arc::new(view)));
        self.publish_gauges();
    }

    /// Wall-clock now, through the sidecar's clock.
    pub fn now_wall(&self) -> SystemTime {
        self.clock.now()
    }

    /// Seconds since the upstream last confirmed the current generation.
    pub fn data_age(&self) -> Option<Duration> {
        self.view().map(|v| {
            self.now_wall()
                .duration_since(v.meta.synced_at)
                .unwrap_or_default()
        })
    }

    /// Updates the gauges that describe state rather than events.
    pub fn publish_gauges(&self) {
        if let Some(view) = self.view() {
            metrics::gauge!(m::MIRROR_ENTITIES).set(view.index.len() as f64);
            metrics::gauge!(m::MIRROR_GENERATION).set(view.meta.id as f64);
        }
        if let Some(age) = self.data_age() {
            metrics::gauge!(m::MIRROR_DATA_AGE_SECONDS).set(age.as_secs_f64());
        }
        self.breaker.publish_gauges();
        metrics::gauge!(m::HOT_CACHE_ENTRIES).set(self.hot.entry_count() as f64);
        let policy = self.flags.stale().policy;
        for p in [
            crate::config::StalePolicy::Serve,
            crate::config::StalePolicy::Refuse,
        ] {
            metrics::gauge!(m::STALE_POLICY, "policy" => p.as_str()).set(if p == policy {
                1.0
            } else {
                0.0
            });
        }
        metrics::gauge!(m::SYNC_HELD_DELETIONS)
            .set(self.held_deletions().map_or(0.0, |h| h.would_remove as f64));
    }

    /// Seeds an empty mirror from a peer sidecar's snapshot (`mirror.seed_from`).
    pub async fn seed_from_peer(&self) -> Result<Option<GenerationMeta>, String> {
        let peer = self
            .config
            .mirror
            .seed_from
            .trim_end_matches('/')
            .to_string();
        if peer.is_empty() || self.view().is_some() {
            return Ok(None);
        }
        let url = format!("{peer}/admin/snapshot");
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let fetch = async {
            let response = client.get(uri).await.map_err(|e| format!("{url}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("{url} answered {}", response.status()));
            }
            use http_body_util::BodyExt;
            response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| format!("{url}: {e}"))
        };
        let bytes = tokio::time::timeout(Duration::from_secs(60), fetch)
            .await
            .map_err(|_| format!("{url} did not answer within 60s"))??;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let file = dir.path().join("seed.db");
        std::fs::write(&file, &bytes).map_err(|e| e.to_string())?;
        let meta = self
            .import_snapshot(&file, "seed")
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(peer = %peer, generation = meta.id, entities = meta.entities, "mirror seeded from a peer");
        Ok(Some(meta))
    }

    /// Applies a snapshot file as the next generation, keeping its age.
    pub async fn import_snapshot(
        &self,
        file: &Path,
        source: &'static str,
    ) -> Result<GenerationMeta, MirrorError> {
        let file = file.to_path_buf();
        let mirror = self.mirror.clone();
        let previous = self.view().map(|v| v.etags()).unwrap_or_default();
        let (meta, index) = tokio::task::spawn_blocking(move || {
            let (meta, _) = import_into(&mirror, &file, &previous, source)?;
            let loaded = mirror.load()?;
            Ok::<_, MirrorError>((meta, Index::build(meta.id, loaded.entities)))
        })
        .await
        .map_err(|e| MirrorError::Io(std::io::Error::other(e.to_string())))??;
        self.install(View {
            index: Arc::new(index),
            meta,
            confirmed: Arc::new(HashMap::new()),
        });
        Ok(meta)
    }

    /// Runs the sidecar on already-bound listeners until `shutdown` fires,
    /// then drains in-flight requests for at most [`SHUTDOWN_GRACE`].
    pub async fn run(
        self: Arc<Self>,
        proxy: TcpListener,
        admin: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        if let Err(e) = self.seed_from_peer().await {
            tracing::warn!(error = %e, "cannot seed the mirror from the peer; syncing from the upstream instead");
        }
        let sync_task = tokio::spawn(self.clone().sync_loop(stop_rx.clone()));
        let housekeeping = tokio::spawn(self.clone().housekeeping(stop_rx.clone()));
        let proxy_app = crate::proxy::router(self.clone());
        let admin_app = crate::admin::router(self.clone());
        tracing::info!(
            proxy = %proxy.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            upstream = %self.upstream.base_url(),
            generation = self.view().map(|v| v.meta.id),
            entities = self.view().map(|v| v.index.len()),
            "catalog-cache serving"
        );
        let mut proxy_stop = stop_rx.clone();
        let mut admin_stop = stop_rx.clone();
        let proxy_server = axum::serve(proxy, proxy_app).with_graceful_shutdown(async move {
            let _ = proxy_stop.wait_for(|s| *s).await;
        });
        let admin_server = axum::serve(admin, admin_app).with_graceful_shutdown(async move {
            let _ = admin_stop.wait_for(|s| *s).await;
        });
        let proxy_task = tokio::spawn(async move { proxy_server.await });
        let admin_task = tokio::spawn(async move { admin_server.await });
        shutdown.await;
        tracing::info!(
            grace_seconds = SHUTDOWN_GRACE.as_secs(),
            "shutting down: draining in-flight requests"
        );
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            let _ = proxy_task.await;
            let _ = admin_task.await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!("grace period over with requests still in flight; closing them");
        }
        sync_task.abort();
        housekeeping.abort();
        Ok(())
    }

    /// Every second: expire time-limited overrides, follow the breaker's
    /// transitions into the audit trail and logs, refresh gauges.
    async fn housekeeping(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut transitions = self.breaker.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    match self.flags.expire(&self.mirror) {
                        Ok(Some(mode)) => self.breaker.set_mode(mode),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot expire the breaker override"),
                    }
                    self.publish_gauges();
                }
                t = transitions.recv() => match t {
                    Ok(t) => {
                        tracing::warn!(from = t.from.as_str(), to = t.to.as_str(), reason = %t.reason, "breaker state changed");
                        let mirror = self.mirror.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            mirror.audit(&crate::mirror::AuditRecord {
                                actor: "breaker",
                                subject: "breaker_state",
                                from: Some(t.from.as_str()),
                                to: t.to.as_str(),
                                reason: Some(&t.reason),
                            })
                        }).await;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "breaker transitions came faster than they could be audited");
                    }
                    Err(_) => return,
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Applies a snapshot file onto `mirror` as its next generation (offline
/// `snapshot import` and seeding share this).
pub fn import_into(
    mirror: &Mirror,
    file: &Path,
    previous: &HashMap<Arc<str>, Arc<str>>,
    source: &str,
) -> Result<(GenerationMeta, crate::mirror::ApplyStats), MirrorError> {
    let snapshot = crate::mirror::read_snapshot(file)?;
    let synced_at = snapshot.meta.map_or(SystemTime::now(), |m| m.synced_at);
    mirror.apply(&snapshot.entities, previous, synced_at, source)
}

/// Binds both listeners.
pub async fn bind(config: &Config) -> Result<(TcpListener, TcpListener), StartError> {
    let proxy = TcpListener::bind(config.listen.proxy)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen.proxy,
            source,
        })?;
    let admin = TcpListener::bind(config.listen.admin)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen.admin,
            source,
        })?;
    Ok((proxy, admin))
}

/// The admin token: `CATALOG_CACHE_ADMIN_TOKEN`, else the token file,
/// generated with mode 0600 when absent.
fn admin_token(config: &Config) -> Result<String, StartError> {
    if let Some(token) = config.admin.token.as_ref().filter(|t| !t.is_empty()) {
        return Ok(token.clone());
    }
    let path = &config.admin.token_file;
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(StartError::Token(format!(
                "cannot read admin.token_file {}: {e}",
                path.display()
            )))
        }
    }
    let token: String = {
        use rand::Rng;
        let mut rng = rand::rng();
        (0..32)
            .map(|_| format!("{:02x}", rng.random::<u8>()))
            .collect()
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| StartError::Token(format!("cannot create {}: {e}", dir.display())))?;
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            StartError::Token(format!(
                "cannot create admin.token_file {}: {e}",
                path.display()
            ))
        })?;
    file.write_all(format!("{token}\n").as_bytes())
        .map_err(|e| StartError::Token(format!("cannot write {}: {e}", path.display())))?;
    tracing::info!(path = %path.display(), "generated an admin token");
    Ok(token)
}

fn client_tokens(config: &Config) -> Result<Option<HashSet<String>>, StartError> {
    let path = &config.proxy.client_tokens_file;
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        StartError::Token(format!(
            "cannot read proxy.client_tokens_file {}: {e}",
            path.display()
        ))
    })?;
    let tokens: HashSet<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if tokens.is_empty() {
        return Err(StartError::Token(format!(
            "proxy.client_tokens_file {} lists no token; every client would be refused",
            path.display()
        )));
    }
    Ok(Some(tokens))
}
