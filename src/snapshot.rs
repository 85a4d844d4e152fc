//! Snapshots: a consistent SQLite copy of the mirror, loaded into another
//! mirror as its next generation — offline (`catalog-cache snapshot
//! import`), into a running sidecar, or fetched from a peer sidecar's admin
//! listener when this one starts empty (`mirror.seed_from`, with the peer's
//! admin token, over http or https). A snapshot keeps its age: data the
//! upstream confirmed a day ago is a day old here too; a time in the future
//! (a wrong clock, a forged file) is taken as now, never as fresh forever.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::clock::Clock;
use crate::generation::{Generation, Generations};
use crate::index::{Index, IndexLimits};
use crate::mirror::{read_snapshot, ApplyStats, Diff, GenerationMeta, Mirror, MirrorError};

/// How long fetching a peer's snapshot may take.
pub const SEED_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest snapshot taken from a peer (a 100,000-entity mirror is about
/// 200 MB).
pub const SEED_MAX_BYTES: u64 = 2 << 30;

/// Where to seed from, and how to prove who is asking.
#[derive(Debug, Clone, Default)]
pub struct SeedSource {
    /// The peer's admin URL (`mirror.seed_from`); empty: no seeding.
    pub peer: String,
    /// The peer's admin token (`mirror.seed_token_file`, else this
    /// sidecar's own).
    pub token: Option<String>,
    /// Extra CA certificates to trust for an https peer (`upstream.ca_file`).
    pub ca_file: std::path::PathBuf,
    /// The bounds of the seeded generation's query index.
    pub index_limits: IndexLimits,
}

/// Why an empty mirror could not be seeded from a peer.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// `mirror.seed_from` is not a URL.
    #[error("{url}: {reason}")]
    BadUrl {
        /// The URL tried.
        url: String,
        /// Why it is not one.
        reason: String,
    },
    /// The peer could not be reached, or its answer was cut short.
    #[error("{url}: {reason}")]
    Fetch {
        /// The URL tried.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The peer answered with an error status.
    #[error("{url} answered {status}")]
    Status {
        /// The URL tried.
        url: String,
        /// Its status.
        status: http::StatusCode,
    },
    /// The peer did not answer in time.
    #[error(
        "{url} did not answer within {}",
        humantime::format_duration(SEED_TIMEOUT)
    )]
    TimedOut {
        /// The URL tried.
        url: String,
    },
    /// The snapshot could not be written to a temporary file.
    #[error("cannot keep the peer's snapshot: {0}")]
    Io(#[from] std::io::Error),
    /// The peer sent more than [`SEED_MAX_BYTES`].
    #[error("{url} sent more than {SEED_MAX_BYTES} bytes; not a snapshot this sidecar takes")]
    TooLarge {
        /// The URL tried.
        url: String,
    },
    /// The snapshot could not be loaded.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
}

/// Applies a snapshot file onto `mirror` as its next generation, keeping
/// the snapshot's age (`now` when it has none). `previous` is uid → etag of
/// the generation it replaces. Blocking.
pub fn import_into(
    mirror: &Mirror,
    file: &Path,
    previous: &HashMap<Arc<str>, Arc<str>>,
    source: &str,
    now: SystemTime,
) -> Result<(GenerationMeta, ApplyStats), MirrorError> {
    let snapshot = read_snapshot(file)?;
    let mut synced_at = snapshot.meta.map_or(now, |m| m.synced_at);
    if synced_at > now {
        tracing::warn!(
            file = %file.display(),
            synced_at = %crate::mirror::rfc3339(synced_at),
            "the snapshot says it was confirmed in the future; taking it as confirmed now"
        );
        synced_at = now;
    }
    let diff = Diff::between(previous, &snapshot.entities);
    let applied = mirror.apply(&diff, synced_at, source)?;
    // The imported generation has no history a downstream tier could
    // follow, and what this mirror followed of its own upstream no longer
    // describes it: both start over.
    mirror.start_new_epoch()?;
    mirror.set_note(crate::sync::TIER_POSITION_NOTE, None)?;
    Ok(applied)
}

/// Applies a snapshot file as a running sidecar's next generation and
/// installs it.
pub async fn import(
    mirror: &Arc<Mirror>,
    generations: &Generations,
    file: &Path,
    source: &'static str,
    clock: &Clock,
    limits: &IndexLimits,
) -> Result<GenerationMeta, MirrorError> {
    let limits = *limits;
    let file = file.to_path_buf();
    let mirror = mirror.clone();
    let previous = generations.current().map(|g| g.etags()).unwrap_or_default();
    let now = clock.now();
    let (meta, index) = tokio::task::spawn_blocking(move || {
        let (meta, _) = import_into(&mirror, &file, &previous, source, now)?;
        let loaded = mirror.load()?;
        let index = Index::build(meta.id, loaded.entities, &limits);
        Ok::<_, MirrorError>((meta, index))
    })
    .await
    .map_err(|e| MirrorError::Io(std::io::Error::other(e.to_string())))??;
    generations.install(Generation::new(index, meta.clone()));
    Ok(meta)
}

/// Seeds an empty mirror from a peer sidecar's snapshot (`mirror.seed_from`,
/// the peer's admin URL). Does nothing (`Ok(None)`) when no peer is
/// configured or a generation is already loaded. The snapshot is streamed
/// to a private temporary file, at most [`SEED_MAX_BYTES`].
pub async fn seed_from_peer(
    source: &SeedSource,
    mirror: &Arc<Mirror>,
    generations: &Generations,
    clock: &Clock,
) -> Result<Option<GenerationMeta>, SeedError> {
    let peer = source.peer.trim_end_matches('/');
    if peer.is_empty() || generations.current().is_some() {
        return Ok(None);
    }
    let url = format!("{peer}/admin/snapshot");
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| SeedError::BadUrl {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(crate::tls::client_config(&source.ca_file))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Empty<bytes::Bytes>>(https);
    let mut request = http::Request::get(uri);
    if let Some(token) = &source.token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(http_body_util::Empty::new())
        .map_err(|e| SeedError::BadUrl {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("seed.db");
    let fetch = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| SeedError::Fetch {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        if !response.status().is_success() {
            return Err(SeedError::Status {
                url: url.clone(),
                status: response.status(),
            });
        }
        let mut out = tokio::fs::File::from_std(crate::mirror::create_private(&file)?);
        let mut body = response.into_body();
        let mut written = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| SeedError::Fetch {
                url: url.clone(),
                reason: e.to_string(),
            })?;
            if let Some(data) = frame.data_ref() {
                written += data.len() as u64;
                if written > SEED_MAX_BYTES {
                    return Err(SeedError::TooLarge { url: url.clone() });
                }
                tokio::io::AsyncWriteExt::write_all(&mut out, data).await?;
            }
        }
        tokio::io::AsyncWriteExt::flush(&mut out).await?;
        Ok(())
    };
    tokio::time::timeout(SEED_TIMEOUT, fetch)
        .await
        .map_err(|_| SeedError::TimedOut { url: url.clone() })??;
    let meta = import(
        mirror,
        generations,
        &file,
        "seed",
        clock,
        &source.index_limits,
    )
    .await?;
    tracing::info!(peer = %peer, generation = meta.id, entities = meta.entities, "mirror seeded from a peer");
    Ok(Some(meta))
}
