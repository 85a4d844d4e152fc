//! The composition root: opens the mirror, builds each part with what it
//! needs, binds the two listeners, runs the sync loop and housekeeping, and
//! drains in-flight requests on shutdown within a bounded grace period.
//! Nothing in the library imports this module; `cli` and `demo` run it.
//!
//! `Sidecar::open` loads the on-disk mirror (so reads are served before any
//! sync) and touches no network; `run` serves until its shutdown future
//! resolves.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::AdminState;
use crate::breaker::Breaker;
use crate::cache::HotCache;
use crate::clock::Clock;
use crate::config::Config;
use crate::flags::Flags;
use crate::generation::{Generation, Generations};
use crate::history::History;
use crate::index::Index;
use crate::mirror::{AuditRecord, Mirror, MirrorError, OpenOutcome};
use crate::proxy::ProxyState;
use crate::read::{ReadPath, ReadSettings};
use crate::server::ListenerLimits;
use crate::snapshot::SeedSource;
use crate::sync::{SyncSettings, SyncStatus, Syncer};
use crate::upstream::Upstream;

/// How long in-flight requests may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The sidecar's parts, wired together.
pub struct Sidecar {
    /// The effective configuration.
    pub config: Config,
    /// The wall clock every part shares.
    pub clock: Clock,
    /// The durable mirror.
    pub mirror: Arc<Mirror>,
    /// The current generation.
    pub generations: Arc<Generations>,
    /// The breaker in front of the upstream.
    pub breaker: Breaker,
    /// The operator's flags.
    pub flags: Arc<Flags>,
    /// The sync loop.
    pub syncer: Arc<Syncer>,
    /// The read path.
    pub read: Arc<ReadPath>,
    /// What the admin listener serves.
    pub admin: AdminState,
    /// What the proxy listener serves.
    pub proxy: ProxyState,
    /// Where an empty mirror is seeded from.
    pub seed: SeedSource,
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
    /// Opens the mirror, loads its generation and wires the parts; no
    /// network is touched. Blocking (it reads the whole mirror).
    pub fn open(config: Config, clock: Clock) -> Result<Self, StartError> {
        let (mirror, outcome) = Mirror::open(&config.mirror.path, &clock)?;
        if let OpenOutcome::MovedAside(aside) = &outcome {
            tracing::error!(
                path = %config.mirror.path.display(),
                moved_to = %aside.display(),
                "the mirror database was corrupt: moved it aside and starting empty; the next sync refills it"
            );
        }
        mirror.keep_changes_for(config.mirror.changes_kept.get());
        let mirror = Arc::new(mirror);
        let started = std::time::Instant::now();
        let loaded = mirror.load()?;
        let loaded_in = started.elapsed();
        let initial = loaded.meta.map(|meta| Generation {
            index: Arc::new(Index::build(
                meta.id,
                loaded.entities,
                &config.index_limits(),
            )),
            meta,
            confirmed: Arc::new(loaded.confirmed),
        });
        if let Some(g) = &initial {
            tracing::info!(
                generation = g.meta.id,
                entities = g.index.len(),
                load_seconds = loaded_in.as_secs_f64(),
                index_seconds = (started.elapsed() - loaded_in).as_secs_f64(),
                "mirror loaded from disk"
            );
        }
        let prometheus = crate::metrics::install();
        crate::metrics::describe();
        let generations = Arc::new(Generations::new(initial, clock.clone()));
        let breaker = Breaker::new(config.breaker.clone(), clock.clone());
        let flags = Arc::new(Flags::load(
            &config,
            mirror.clone(),
            breaker.clone(),
            clock.clone(),
        )?);
        let upstream = Arc::new(Upstream::new(
            &config.upstream,
            breaker.clone(),
            clock.clone(),
        ));
        let hot = HotCache::new(
            config.hot_cache.max_bytes.0,
            config.freshness.negative_ttl.get(),
            config.read_through.max_age.get(),
        );
        let sync_status = Arc::new(SyncStatus::restore(&mirror));
        let history = Arc::new(History::default());
        let syncer = Arc::new(Syncer::new(
            SyncSettings::from_config(&config),
            upstream.clone(),
            breaker.clone(),
            mirror.clone(),
            generations.clone(),
            hot.clone(),
            clock.clone(),
            sync_status.clone(),
            history.clone(),
        ));
        let read = Arc::new(ReadPath::new(
            ReadSettings::from_config(&config),
            generations.clone(),
            hot.clone(),
            upstream.clone(),
            flags.clone(),
            sync_status,
            mirror.clone(),
            clock.clone(),
        ));
        let token = admin_token(&config)?;
        let seed = SeedSource {
            index_limits: config.index_limits(),
            peer: config.mirror.seed_from.clone(),
            token: seed_token(&config)?.or_else(|| Some(token.clone())),
            ca_file: config.upstream.ca_file.clone(),
        };
        let admin = AdminState {
            generations: generations.clone(),
            flags: flags.clone(),
            breaker: breaker.clone(),
            syncer: syncer.clone(),
            mirror: mirror.clone(),
            upstream,
            hot,
            token: token.into(),
            fresh_for: config.freshness.fresh_for.get(),
            prometheus,
            clock: clock.clone(),
            exports: Arc::new(tokio::sync::Semaphore::new(1)),
            history: history.clone(),
        };
        let proxy = ProxyState {
            read: read.clone(),
            client_tokens: client_tokens(&config)?.map(Arc::new),
            max_request_body: usize::try_from(config.proxy.max_request_body.0)
                .unwrap_or(usize::MAX),
            history,
            names: crate::proxy::CacheNames::new(&config.listen.name),
            extension: Arc::new(crate::extension::Extension::new(
                generations.clone(),
                mirror.clone(),
                clock.clone(),
                config.freshness.fresh_for.get(),
            )),
        };
        admin.publish_gauges();
        Ok(Self {
            config,
            clock,
            mirror,
            generations,
            breaker,
            flags,
            syncer,
            read,
            admin,
            proxy,
            seed,
        })
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
        if let Err(e) = crate::snapshot::seed_from_peer(
            &self.seed,
            &self.mirror,
            &self.generations,
            &self.clock,
        )
        .await
        {
            tracing::warn!(error = %e, "cannot seed the mirror from the peer; syncing from the upstream instead");
        }
        let sync_task = tokio::spawn(self.syncer.clone().run(stop_rx.clone()));
        let housekeeping = tokio::spawn(housekeeping(
            self.admin.clone(),
            self.mirror.clone(),
            self.clock.clone(),
            stop_rx.clone(),
        ));
        let generation = self.generations.current();
        tracing::info!(
            proxy = %proxy.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            upstream = %self.admin.upstream.base_url(),
            generation = generation.as_ref().map(|g| g.meta.id),
            entities = generation.as_ref().map(|g| g.index.len()),
            "catalog-cache serving"
        );
        let listen = &self.config.listen;
        let limits =
            |name, max_connections, max_connections_key, max_in_flight, max_in_flight_key| {
                ListenerLimits {
                    name,
                    max_connections,
                    max_connections_key,
                    max_in_flight,
                    max_in_flight_key,
                    header_read_timeout: listen.header_read_timeout.get(),
                    body_read_timeout: listen.body_read_timeout.get(),
                    idle_timeout: listen.idle_timeout.get(),
                    request_timeout: listen.request_timeout.get(),
                }
            };
        let proxy_task = tokio::spawn(crate::server::serve(
            proxy,
            crate::proxy::router(self.proxy.clone()),
            limits(
                "proxy",
                listen.proxy_max_connections,
                "listen.proxy_max_connections",
                listen.proxy_max_in_flight,
                "listen.proxy_max_in_flight",
            ),
            stop_rx.clone(),
            SHUTDOWN_GRACE,
        ));
        let admin_task = tokio::spawn(crate::server::serve(
            admin,
            crate::admin::router(self.admin.clone()),
            limits(
                "admin",
                listen.admin_max_connections,
                "listen.admin_max_connections",
                listen.admin_max_in_flight,
                "listen.admin_max_in_flight",
            ),
            stop_rx.clone(),
            SHUTDOWN_GRACE,
        ));
        shutdown.await;
        tracing::info!(
            grace_seconds = SHUTDOWN_GRACE.as_secs(),
            "shutting down: draining in-flight requests"
        );
        let _ = stop_tx.send(true);
        // Each server drains within the grace period itself; this is a
        // backstop in case one does not.
        let _ = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), async {
            let _ = proxy_task.await;
            let _ = admin_task.await;
        })
        .await;
        sync_task.abort();
        housekeeping.abort();
        Ok(())
    }
}

/// Every second: expire time-limited overrides, follow the breaker's
/// transitions into the audit trail and logs, refresh gauges, and run the
/// metrics recorder's upkeep.
async fn housekeeping(
    admin: AdminState,
    mirror: Arc<Mirror>,
    clock: Clock,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut transitions = admin.breaker.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let flags = admin.flags.clone();
                match tokio::task::spawn_blocking(move || flags.expire()).await {
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot expire the breaker override"),
                    Err(e) => tracing::warn!(error = %e, "cannot expire the breaker override"),
                    Ok(Ok(_)) => {}
                }
                admin.publish_gauges();
                admin.history.tick(clock.now(), admin.generations.age(), admin.breaker.state());
                // Drain the samples histograms buffer between renders: they
                // are otherwise kept until `/metrics` is scraped, so an
                // unscraped sidecar's memory grew with every request.
                admin.prometheus.run_upkeep();
            }
            t = transitions.recv() => match t {
                Ok(t) => {
                    tracing::warn!(from = t.from.as_str(), to = t.to.as_str(), reason = %t.reason, "breaker state changed");
                    let mirror = mirror.clone();
                    let at = clock.now();
                    let _ = tokio::task::spawn_blocking(move || {
                        mirror.audit(&AuditRecord {
                            at,
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

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
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

/// The peer's admin token for seeding, from `mirror.seed_token_file`.
fn seed_token(config: &Config) -> Result<Option<String>, StartError> {
    let path = &config.mirror.seed_token_file;
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        StartError::Token(format!(
            "cannot read mirror.seed_token_file {}: {e}",
            path.display()
        ))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(StartError::Token(format!(
            "mirror.seed_token_file {} is empty",
            path.display()
        )));
    }
    Ok(Some(token.to_string()))
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
