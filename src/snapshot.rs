//! Snapshots: a consistent SQLite copy of the mirror, loaded into another
//! mirror as its next generation — offline (`catalog-cache snapshot
//! import`), into a running sidecar, or fetched from a peer sidecar's admin
//! listener when this one starts empty (`mirror.seed_from`). A snapshot
//! keeps its age: data the upstream confirmed a day ago is a day old here
//! too.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::BodyExt;

use crate::clock::Clock;
use crate::generation::{Generation, Generations};
use crate::index::{Index, IndexLimits};
use crate::mirror::{read_snapshot, ApplyStats, Diff, GenerationMeta, Mirror, MirrorError};

/// How long fetching a peer's snapshot may take.
pub const SEED_TIMEOUT: Duration = Duration::from_secs(60);

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
    let synced_at = snapshot.meta.map_or(now, |m| m.synced_at);
    let diff = Diff::between(previous, &snapshot.entities);
    mirror.apply(&diff, synced_at, source)
}

/// Applies a snapshot file as a running sidecar's next generation and
/// installs it.
pub async fn import(
    mirror: &Arc<Mirror>,
    generations: &Generations,
    file: &Path,
    source: &'static str,
    clock: &Clock,
) -> Result<GenerationMeta, MirrorError> {
    let file = file.to_path_buf();
    let mirror = mirror.clone();
    let previous = generations.current().map(|g| g.etags()).unwrap_or_default();
    let now = clock.now();
    let (meta, index) = tokio::task::spawn_blocking(move || {
        let (meta, _) = import_into(&mirror, &file, &previous, source, now)?;
        let loaded = mirror.load()?;
        Ok::<_, MirrorError>((
            meta,
            Index::build(meta.id, loaded.entities, &IndexLimits::default()),
        ))
    })
    .await
    .map_err(|e| MirrorError::Io(std::io::Error::other(e.to_string())))??;
    generations.install(Generation::new(index, meta));
    Ok(meta)
}

/// Seeds an empty mirror from a peer sidecar's snapshot (`mirror.seed_from`,
/// the peer's admin URL). Does nothing (`Ok(None)`) when no peer is
/// configured or a generation is already loaded.
pub async fn seed_from_peer(
    peer: &str,
    mirror: &Arc<Mirror>,
    generations: &Generations,
    clock: &Clock,
) -> Result<Option<GenerationMeta>, SeedError> {
    let peer = peer.trim_end_matches('/');
    if peer.is_empty() || generations.current().is_some() {
        return Ok(None);
    }
    let url = format!("{peer}/admin/snapshot");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| SeedError::BadUrl {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let fetch = async {
        let response = client.get(uri).await.map_err(|e| SeedError::Fetch {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        if !response.status().is_success() {
            return Err(SeedError::Status {
                url: url.clone(),
                status: response.status(),
            });
        }
        response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| SeedError::Fetch {
                url: url.clone(),
                reason: e.to_string(),
            })
    };
    let bytes = tokio::time::timeout(SEED_TIMEOUT, fetch)
        .await
        .map_err(|_| SeedError::TimedOut { url: url.clone() })??;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("seed.db");
    std::fs::write(&file, &bytes)?;
    let meta = import(mirror, generations, &file, "seed", clock).await?;
    tracing::info!(peer = %peer, generation = meta.id, entities = meta.entities, "mirror seeded from a peer");
    Ok(Some(meta))
}
