//! The durable mirror: one SQLite file (WAL) holding the last applied
//! generation of the catalog, the operator's persisted flags and their audit
//! trail, and the read-through store for answers the mirror cannot compute.
//!
//! Invariants: a generation is applied in one transaction, so a reader (or a
//! process killed with SIGKILL) sees the old generation or the new one, never
//! a mix; an unchanged entity (same `metadata.etag`) is never rewritten; a
//! corrupt file is moved aside, never deleted. Called by `sync` (apply),
//! `read` (revalidated entities, read-through), `flags` and `snapshot`.
//! Which rows a generation writes is decided once, by [`Diff`]; `apply`
//! writes exactly that. Wall-clock times are handed in by the caller (the
//! sidecar's clock), never read here.
//!
//! `open` runs `PRAGMA quick_check` over the whole file before serving: on a
//! 190 MB, 100,000-entity mirror it takes about 0.1 s warm (0.3 s on a busy
//! host) against 0.4 s to load the entities, so it stays on the start path;
//! checking in the background would serve, and sync into, a corrupt file
//! until the next start.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::clock::Clock;
use crate::entity::Entity;
use crate::provenance::Confirmation;

const SCHEMA_VERSION: i64 = 1;

/// Rows of the `generations` table kept: the newest this many applied
/// generations (their sizes and sources, for `status` and the history
/// page); each apply prunes the older ones in its own transaction, so the
/// table never holds more.
pub const GENERATIONS_KEPT: u64 = 100;

/// Entries of the operator audit trail (`audit`) kept: the newest this many;
/// each new entry prunes the older ones in the same statement sequence, so
/// the trail never holds more.
pub const AUDIT_ENTRIES_KEPT: u64 = 10_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entities (
    uid          TEXT PRIMARY KEY,
    entity_ref   TEXT NOT NULL,
    etag         TEXT NOT NULL,
    body         BLOB NOT NULL,
    confirmed_ms INTEGER
);
CREATE INDEX IF NOT EXISTS entities_by_ref ON entities (entity_ref);
CREATE TABLE IF NOT EXISTS generations (
    id         INTEGER PRIMARY KEY,
    synced_ms  INTEGER NOT NULL,
    entities   INTEGER NOT NULL,
    added      INTEGER NOT NULL,
    changed    INTEGER NOT NULL,
    removed    INTEGER NOT NULL,
    source     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS flags (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    reason     TEXT,
    actor      TEXT NOT NULL,
    set_ms     INTEGER NOT NULL,
    expires_ms INTEGER
);
CREATE TABLE IF NOT EXISTS audit (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms      INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    subject    TEXT NOT NULL,
    from_value TEXT,
    to_value   TEXT NOT NULL,
    reason     TEXT
);
CREATE TABLE IF NOT EXISTS changes (
    generation INTEGER NOT NULL,
    uid        TEXT NOT NULL,
    PRIMARY KEY (generation, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS change_generations (
    generation INTEGER PRIMARY KEY,
    applied_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS read_through (
    key          TEXT PRIMARY KEY,
    status       INTEGER NOT NULL,
    content_type TEXT,
    body         BLOB NOT NULL,
    stored_ms    INTEGER NOT NULL
);
";

/// What went wrong with the mirror database.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// SQLite refused an operation.
    #[error("mirror database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file could not be created, moved or read.
    #[error("mirror file error: {0}")]
    Io(#[from] std::io::Error),
    /// A stored entity no longer parses (the file was edited by hand?).
    #[error("stored entity {uid} is unreadable: {reason}")]
    BadRow {
        /// The row's uid.
        uid: String,
        /// Why it does not parse.
        reason: String,
    },
    /// There is no mirror at the path (and the command would not make one).
    #[error("no mirror at {path}: run this where the sidecar runs, or point at its mirror with --config FILE (mirror.path) or CATALOG_CACHE_MIRROR_PATH")]
    Missing {
        /// The path looked at.
        path: PathBuf,
    },
    /// The file is a SQLite database of some other program or version.
    #[error("{path} is not a catalog-cache mirror (schema {found:?})")]
    Foreign {
        /// The file.
        path: PathBuf,
        /// The schema version found, if any.
        found: Option<i64>,
    },
}

/// Metadata of the generation currently stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationMeta {
    /// Increases by one with every applied sync (or import).
    pub id: u64,
    /// When the origin catalog last confirmed this generation (wall clock,
    /// persisted): the sync's time for a Backstage upstream, earlier by the
    /// upstream's `Age` behind a tier.
    pub synced_at: SystemTime,
    /// When this sidecar last heard from its upstream about it.
    pub checked_at: SystemTime,
    /// The upstream said its data was stale when it was last asked.
    pub upstream_stale: bool,
    /// The upstream's `Cache-Status` members, when it is a cache.
    pub via: Option<Arc<str>>,
    /// Entities in it.
    pub entities: usize,
}

impl GenerationMeta {
    /// How the generation was last confirmed.
    pub fn confirmation(&self) -> Confirmation {
        Confirmation {
            origin_at: self.synced_at,
            checked_at: self.checked_at,
            upstream_stale: self.upstream_stale,
            via: self.via.clone(),
            written_since: false,
        }
    }

    fn with(self, confirmed: Confirmation) -> Self {
        Self {
            // As stored: a restart must see the same age.
            synced_at: from_ms(to_ms(confirmed.origin_at)),
            checked_at: from_ms(to_ms(confirmed.checked_at)),
            upstream_stale: confirmed.upstream_stale,
            via: confirmed.via,
            ..self
        }
    }
}

/// What applying a generation changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    /// Entities new in this generation.
    pub added: usize,
    /// Entities whose etag changed.
    pub changed: usize,
    /// Entities no longer present.
    pub removed: usize,
    /// Entities left untouched.
    pub unchanged: usize,
    /// Entity rows SQLite actually wrote (0 for an unchanged catalog).
    pub rows_written: usize,
}

/// What a new generation changes against the previous one: the entities
/// to write (new or with a new etag), the uids to delete, and the counts.
/// Computed once, by [`Diff::between`], and written as it is by
/// [`Mirror::apply`].
#[derive(Debug, Clone, Default)]
pub struct Diff {
    /// Entities new in this generation or changed (a new etag).
    pub upserts: Vec<Arc<Entity>>,
    /// uids of entities no longer present.
    pub removed: Vec<Arc<str>>,
    /// Every uid of the new generation.
    pub members: HashSet<Arc<str>>,
    /// The counts (`rows_written` is filled in by `apply`).
    pub stats: ApplyStats,
}

impl Diff {
    /// Compares `next` (the complete new generation, uids unique) with
    /// `previous` (uid → etag of the generation it replaces).
    pub fn between(previous: &HashMap<Arc<str>, Arc<str>>, next: &[Arc<Entity>]) -> Diff {
        let mut diff = Diff {
            members: HashSet::with_capacity(next.len()),
            ..Diff::default()
        };
        for entity in next {
            diff.members.insert(entity.uid.clone());
            match previous.get(&entity.uid) {
                Some(etag) if *etag == entity.etag => diff.stats.unchanged += 1,
                Some(_) => {
                    diff.stats.changed += 1;
                    diff.upserts.push(entity.clone());
                }
                None => {
                    diff.stats.added += 1;
                    diff.upserts.push(entity.clone());
                }
            }
        }
        diff.removed = previous
            .keys()
            .filter(|uid| !diff.members.contains(*uid))
            .cloned()
            .collect();
        diff.stats.removed = diff.removed.len();
        diff
    }

    /// Entities in the new generation.
    pub fn entities(&self) -> usize {
        self.stats.added + self.stats.changed + self.stats.unchanged
    }

    /// Whether the new generation is the previous one unchanged.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removed.is_empty()
    }
}

/// A stored, loaded generation: its metadata and entities.
#[derive(Debug)]
pub struct Loaded {
    /// The generation's metadata; `None` for an empty, never-synced mirror.
    pub meta: Option<GenerationMeta>,
    /// Its entities.
    pub entities: Vec<Arc<Entity>>,
    /// Per-entity confirmation times newer than the generation (revalidations).
    pub confirmed: HashMap<Arc<str>, SystemTime>,
}

/// One persisted operator flag (breaker mode, stale policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFlag {
    /// The value, e.g. `open`.
    pub value: String,
    /// Why it was set.
    pub reason: Option<String>,
    /// Who set it.
    pub actor: String,
    /// When.
    pub set_at: SystemTime,
    /// When it returns to the configured value by itself.
    pub expires_at: Option<SystemTime>,
}

/// One audit trail entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    /// When (RFC 3339).
    pub at: String,
    /// Who: `cli`, `config`, `admin-token`, `breaker`.
    pub actor: String,
    /// What: `breaker_mode`, `breaker_state`, `stale_policy`, `deletions`.
    pub subject: String,
    /// Previous value.
    pub from: Option<String>,
    /// New value.
    pub to: String,
    /// Why.
    pub reason: Option<String>,
}

/// What the read-through store may hold (`[read_through]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Answers older than this are dropped.
    pub max_age: Duration,
    /// Most answers.
    pub max_entries: u64,
    /// Most body bytes.
    pub max_bytes: u64,
}

/// A stored read-through answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    /// HTTP status the upstream gave.
    pub status: u16,
    /// Its content type.
    pub content_type: Option<String>,
    /// Its body.
    pub body: Bytes,
    /// When it was fetched.
    pub stored_at: SystemTime,
}

/// The mirror database. Cheap to share behind an `Arc`; every method is
/// blocking and short, callers on the async runtime use `spawn_blocking`
/// for the long ones (`load`, `apply`, `snapshot`).
pub struct Mirror {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// How long the changes log keeps a generation's changes (seconds).
    changes_kept: std::sync::atomic::AtomicU64,
}

/// Default of how long the changes log keeps a generation's changes.
pub const DEFAULT_CHANGES_KEPT: Duration = Duration::from_secs(3600);

/// Where the changes log stands: which entities changed after a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeLog {
    /// Changes from here on are in this mirror's identity; a new epoch
    /// (a new file, an imported snapshot) restarts every downstream.
    pub epoch: String,
    /// Every change after this generation is recorded.
    pub complete_after: u64,
}

/// Why a changes-log read cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum ChangesError {
    /// The generation asked about is outside what the log holds (older
    /// than its retention, newer than the mirror, or of another epoch).
    #[error("changes since generation {since} of epoch {epoch} are not held (this mirror is epoch {current_epoch}, complete after generation {complete_after}, at generation {at})")]
    Gone {
        /// The generation asked about.
        since: u64,
        /// The epoch asked about.
        epoch: String,
        /// This mirror's epoch.
        current_epoch: String,
        /// The log is complete after this generation.
        complete_after: u64,
        /// The generation asked up to.
        at: u64,
    },
    /// The database failed.
    #[error(transparent)]
    Mirror(#[from] MirrorError),
}

/// What `open` found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenOutcome {
    /// A healthy existing file (or none yet: a new one was created).
    Healthy,
    /// The file was corrupt and was moved to the path given; a new one was created.
    MovedAside(PathBuf),
}

impl Mirror {
    /// Opens (or creates) the mirror at `path`. A file that fails SQLite's
    /// integrity check, or is not a database, is renamed to
    /// `<path>.corrupt-<unix seconds by clock>` with its WAL, and a fresh
    /// mirror is created in its place.
    pub fn open(path: &Path, clock: &Clock) -> Result<(Self, OpenOutcome), MirrorError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
                set_mode(dir, 0o700)?;
            }
        }
        private_files(path)?;
        match Self::open_checked(path) {
            Ok(mirror) => Ok((mirror, OpenOutcome::Healthy)),
            Err(err @ MirrorError::Foreign { .. }) => Err(err),
            Err(MirrorError::Sqlite(_)) | Err(MirrorError::BadRow { .. }) => {
                let aside = move_aside(path, clock.now())?;
                private_files(path)?;
                let mirror = Self::open_checked(path)?;
                Ok((mirror, OpenOutcome::MovedAside(aside)))
            }
            Err(err) => Err(err),
        }
    }

    /// Opens an existing mirror, for commands that read one: a missing file
    /// is an error, never a new, empty mirror.
    pub fn open_existing(path: &Path, clock: &Clock) -> Result<(Self, OpenOutcome), MirrorError> {
        if !path.is_file() {
            return Err(MirrorError::Missing {
                path: path.to_path_buf(),
            });
        }
        Self::open(path, clock)
    }

    fn open_checked(path: &Path) -> Result<Self, MirrorError> {
        let writer = connect(path)?;
        let ok: String = writer.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if ok != "ok" {
            return Err(MirrorError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(ok),
            )));
        }
        writer.execute_batch(SCHEMA)?;
        let version: Option<String> = writer
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match version.map(|v| v.parse::<i64>().ok()) {
            None => {
                writer.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                    [SCHEMA_VERSION.to_string()],
                )?;
            }
            Some(Some(SCHEMA_VERSION)) => {}
            Some(found) => {
                return Err(MirrorError::Foreign {
                    path: path.to_path_buf(),
                    found,
                })
            }
        }
        let has_epoch: Option<String> = writer
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })
            .optional()?;
        if has_epoch.is_none() {
            new_epoch(&writer)?;
        }
        let reader = connect(path)?;
        Ok(Self {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            changes_kept: std::sync::atomic::AtomicU64::new(DEFAULT_CHANGES_KEPT.as_secs()),
        })
    }

    /// Sets how long the changes log keeps a generation's changes
    /// (`mirror.changes_kept`).
    pub fn keep_changes_for(&self, kept: Duration) {
        self.changes_kept
            .store(kept.as_secs().max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// The changes log's epoch and how far back it is complete.
    pub fn change_log(&self) -> Result<ChangeLog, MirrorError> {
        let conn = self.reader();
        read_change_log(&conn)
    }

    /// Starts a new epoch: downstream tiers asking for changes of the old
    /// one are told to walk the whole catalog again (after a snapshot
    /// import, whose generation has no history they could follow).
    pub fn start_new_epoch(&self) -> Result<ChangeLog, MirrorError> {
        let conn = self.writer();
        new_epoch(&conn)?;
        read_change_log(&conn)
    }

    /// The uids that changed (added, changed or removed) after generation
    /// `since`, up to and including generation `at` (the generation being
    /// served), in uid order, after `after`, at most `limit` of them.
    pub fn changed_since(
        &self,
        epoch: &str,
        since: u64,
        at: u64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, ChangesError> {
        let conn = self.reader();
        let log = read_change_log(&conn)?;
        if epoch != log.epoch || since < log.complete_after || since > at {
            return Err(ChangesError::Gone {
                since,
                epoch: epoch.to_string(),
                current_epoch: log.epoch,
                complete_after: log.complete_after,
                at,
            });
        }
        let mut stmt = conn.prepare_cached(
            "SELECT DISTINCT uid FROM changes WHERE generation > ?1 AND generation <= ?2 AND uid > ?3
             ORDER BY uid LIMIT ?4",
        ).map_err(MirrorError::from)?;
        let uids = stmt
            .query_map(
                params![since as i64, at as i64, after.unwrap_or(""), limit as i64],
                |r| r.get::<_, String>(0),
            )
            .map_err(MirrorError::from)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(MirrorError::from)?;
        Ok(uids)
    }

    fn writer(&self) -> MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stored generation's metadata, if any generation was ever applied.
    pub fn meta(&self) -> Result<Option<GenerationMeta>, MirrorError> {
        read_meta(&self.reader())
    }

    /// Reads the whole stored generation, in one read transaction.
    pub fn load(&self) -> Result<Loaded, MirrorError> {
        let mut conn = self.reader();
        let tx = conn.transaction()?;
        let meta = read_meta(&tx)?;
        let mut entities = Vec::new();
        let mut confirmed = HashMap::new();
        {
            let mut stmt = tx.prepare("SELECT uid, body, confirmed_ms FROM entities")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let uid: String = row.get(0)?;
                let body: Vec<u8> = row.get(1)?;
                let confirmed_ms: Option<i64> = row.get(2)?;
                let entity =
                    Entity::from_json(Bytes::from(body)).map_err(|e| MirrorError::BadRow {
                        uid: uid.clone(),
                        reason: e.to_string(),
                    })?;
                if let Some(ms) = confirmed_ms {
                    confirmed.insert(entity.uid.clone(), from_ms(ms));
                }
                entities.push(Arc::new(entity));
            }
        }
        tx.commit()?;
        Ok(Loaded {
            meta,
            entities,
            confirmed,
        })
    }

    /// Applies the next generation, in one transaction: writes the
    /// diff's upserts, deletes its removals (and rows stored outside any
    /// generation that the new one does not hold), and records the
    /// generation. An unchanged entity's row is never touched.
    pub fn apply(
        &self,
        diff: &Diff,
        confirmed: impl Into<Confirmation>,
        source: &str,
    ) -> Result<(GenerationMeta, ApplyStats), MirrorError> {
        let confirmed = confirmed.into();
        let mut conn = self.writer();
        let tx = conn.transaction()?;
        let mut stats = diff.stats;
        stats.rows_written = 0;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO entities (uid, entity_ref, etag, body, confirmed_ms) VALUES (?1, ?2, ?3, ?4, NULL)
                 ON CONFLICT (uid) DO UPDATE SET entity_ref = excluded.entity_ref, etag = excluded.etag,
                 body = excluded.body, confirmed_ms = NULL",
            )?;
            for entity in &diff.upserts {
                stats.rows_written += insert.execute(params![
                    &*entity.uid,
                    &*entity.entity_ref,
                    &*entity.etag,
                    &entity.body()[..]
                ])?;
            }
            let mut delete = tx.prepare_cached("DELETE FROM entities WHERE uid = ?1")?;
            for uid in &diff.removed {
                stats.rows_written += delete.execute([&**uid])?;
            }
            // Rows the previous generation did not hold (revalidated entities
            // that were never part of a generation) are in neither list; drop
            // those the new generation does not hold either.
            let stray: Vec<String> = {
                let mut stmt = tx.prepare("SELECT uid FROM entities")?;
                let uids = stmt.query_map([], |r| r.get::<_, String>(0))?;
                uids.filter_map(Result::ok)
                    .filter(|u| !diff.members.contains(u.as_str()))
                    .collect()
            };
            for uid in stray {
                stats.rows_written += delete.execute([&uid])?;
            }
        }
        let previous = read_meta(&tx)?;
        let next = previous.as_ref().map_or(1, |m| m.id + 1);
        let count = diff.entities();
        record_changes(
            &tx,
            next,
            previous.is_none(),
            diff,
            confirmed.checked_at,
            Duration::from_secs(self.changes_kept.load(std::sync::atomic::Ordering::Relaxed)),
        )?;
        write_meta(&tx, next, &confirmed, count)?;
        tx.execute(
            "INSERT INTO generations (id, synced_ms, entities, added, changed, removed, source)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                next as i64,
                to_ms(confirmed.origin_at),
                count as i64,
                stats.added as i64,
                stats.changed as i64,
                stats.removed as i64,
                source
            ],
        )?;
        tx.execute(
            "DELETE FROM generations WHERE id <= ?1",
            [next as i64 - GENERATIONS_KEPT as i64],
        )?;
        tx.commit()?;
        let meta = GenerationMeta {
            id: next,
            synced_at: UNIX_EPOCH,
            checked_at: UNIX_EPOCH,
            upstream_stale: false,
            via: None,
            entities: count,
        };
        Ok((meta.with(confirmed), stats))
    }

    /// Marks the current generation as confirmed again by the upstream at
    /// `at` (an unchanged sync). Its rows are not rewritten; rows stored
    /// outside a generation (`store_entity`) whose uid is not in `keep`, the
    /// generation the upstream just confirmed, are dropped, so an entity the
    /// upstream deleted cannot come back at the next start.
    pub fn confirm(
        &self,
        confirmed: impl Into<Confirmation>,
        keep: &HashSet<Arc<str>>,
    ) -> Result<Option<GenerationMeta>, MirrorError> {
        let confirmed = confirmed.into();
        let mut conn = self.writer();
        let tx = conn.transaction()?;
        let Some(meta) = read_meta(&tx)? else {
            return Ok(None);
        };
        let stray: Vec<String> = {
            let mut stmt = tx.prepare("SELECT uid FROM entities")?;
            let uids = stmt.query_map([], |r| r.get::<_, String>(0))?;
            uids.filter_map(Result::ok)
                .filter(|u| !keep.contains(u.as_str()))
                .collect()
        };
        {
            let mut delete = tx.prepare_cached("DELETE FROM entities WHERE uid = ?1")?;
            for uid in &stray {
                delete.execute([uid])?;
            }
        }
        write_meta(&tx, meta.id, &confirmed, meta.entities)?;
        tx.commit()?;
        Ok(Some(meta.with(confirmed)))
    }

    /// Stores one entity the upstream just returned outside a sync (a
    /// revalidation), with the time it was confirmed.
    pub fn store_entity(
        &self,
        entity: &Entity,
        confirmed_at: SystemTime,
    ) -> Result<(), MirrorError> {
        self.writer().execute(
            "INSERT INTO entities (uid, entity_ref, etag, body, confirmed_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (uid) DO UPDATE SET entity_ref = excluded.entity_ref, etag = excluded.etag,
             body = excluded.body, confirmed_ms = excluded.confirmed_ms",
            params![
                &*entity.uid,
                &*entity.entity_ref,
                &*entity.etag,
                &entity.body()[..],
                to_ms(confirmed_at)
            ],
        )?;
        Ok(())
    }

    /// Stores a read-through answer under `key`, then drops what `limits`
    /// no longer allow: answers older than `max_age`, then the oldest beyond
    /// `max_entries` or `max_bytes`. An answer larger than `max_bytes` on its
    /// own is not stored.
    pub fn store_answer(
        &self,
        key: &str,
        answer: &StoredAnswer,
        limits: &StoreLimits,
    ) -> Result<(), MirrorError> {
        if answer.body.len() as u64 > limits.max_bytes {
            return Ok(());
        }
        let mut conn = self.writer();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO read_through (key, status, content_type, body, stored_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (key) DO UPDATE SET status = excluded.status, content_type = excluded.content_type,
             body = excluded.body, stored_ms = excluded.stored_ms",
            params![
                key,
                answer.status,
                answer.content_type,
                &answer.body[..],
                to_ms(answer.stored_at)
            ],
        )?;
        let oldest = answer
            .stored_at
            .checked_sub(limits.max_age)
            .unwrap_or(UNIX_EPOCH);
        tx.execute(
            "DELETE FROM read_through WHERE stored_ms < ?1",
            [to_ms(oldest)],
        )?;
        tx.execute(
            "DELETE FROM read_through WHERE key IN
             (SELECT key FROM read_through ORDER BY stored_ms DESC, key LIMIT -1 OFFSET ?1)",
            [i64::try_from(limits.max_entries).unwrap_or(i64::MAX)],
        )?;
        let total: i64 = tx.query_row(
            "SELECT COALESCE(SUM(LENGTH(body)), 0) FROM read_through",
            [],
            |r| r.get(0),
        )?;
        let mut excess = total.saturating_sub(i64::try_from(limits.max_bytes).unwrap_or(i64::MAX));
        if excess > 0 {
            let oldest_first: Vec<(String, i64)> = {
                let mut stmt = tx.prepare(
                    "SELECT key, LENGTH(body) FROM read_through ORDER BY stored_ms ASC, key",
                )?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut delete = tx.prepare("DELETE FROM read_through WHERE key = ?1")?;
            for (old, bytes) in oldest_first {
                if excess <= 0 {
                    break;
                }
                delete.execute([&old])?;
                excess -= bytes;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Stored read-through answers: how many, and their body bytes.
    pub fn answers_stored(&self) -> Result<(u64, u64), MirrorError> {
        Ok(self.reader().query_row(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM read_through",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
        )?)
    }

    /// A stored read-through answer.
    pub fn answer(&self, key: &str) -> Result<Option<StoredAnswer>, MirrorError> {
        Ok(self
            .reader()
            .query_row(
                "SELECT status, content_type, body, stored_ms FROM read_through WHERE key = ?1",
                [key],
                |r| {
                    Ok(StoredAnswer {
                        status: r.get(0)?,
                        content_type: r.get(1)?,
                        body: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                        stored_at: from_ms(r.get(3)?),
                    })
                },
            )
            .optional()?)
    }

    /// A persisted operator flag.
    pub fn flag(&self, name: &str) -> Result<Option<StoredFlag>, MirrorError> {
        Ok(self
            .reader()
            .query_row(
                "SELECT value, reason, actor, set_ms, expires_ms FROM flags WHERE name = ?1",
                [name],
                |r| {
                    Ok(StoredFlag {
                        value: r.get(0)?,
                        reason: r.get(1)?,
                        actor: r.get(2)?,
                        set_at: from_ms(r.get(3)?),
                        expires_at: r.get::<_, Option<i64>>(4)?.map(from_ms),
                    })
                },
            )
            .optional()?)
    }

    /// Persists (or, with `None`, clears) a flag and writes its audit entry,
    /// in one transaction: a flag never changes without its trail.
    pub fn set_flag(
        &self,
        name: &str,
        flag: Option<&StoredFlag>,
        audit: &AuditRecord<'_>,
    ) -> Result<(), MirrorError> {
        let mut conn = self.writer();
        let tx = conn.transaction()?;
        match flag {
            Some(f) => tx.execute(
                "INSERT INTO flags (name, value, reason, actor, set_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value, reason = excluded.reason,
                 actor = excluded.actor, set_ms = excluded.set_ms, expires_ms = excluded.expires_ms",
                params![
                    name,
                    f.value,
                    f.reason,
                    f.actor,
                    to_ms(f.set_at),
                    f.expires_at.map(to_ms)
                ],
            )?,
            None => tx.execute("DELETE FROM flags WHERE name = ?1", [name])?,
        };
        insert_audit(&tx, audit)?;
        tx.commit()?;
        Ok(())
    }

    /// Appends an audit entry on its own (breaker state changes, deletions).
    pub fn audit(&self, record: &AuditRecord<'_>) -> Result<(), MirrorError> {
        insert_audit(&self.writer(), record)
    }

    /// The newest `limit` audit entries, newest first.
    pub fn recent_audit(&self, limit: usize) -> Result<Vec<AuditEntry>, MirrorError> {
        let conn = self.reader();
        let mut stmt = conn.prepare(
            "SELECT at_ms, actor, subject, from_value, to_value, reason FROM audit ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(AuditEntry {
                at: rfc3339(from_ms(r.get(0)?)),
                actor: r.get(1)?,
                subject: r.get(2)?,
                from: r.get(3)?,
                to: r.get(4)?,
                reason: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A small persisted value (last sync report, held deletions).
    pub fn note(&self, key: &str) -> Result<Option<String>, MirrorError> {
        Ok(self
            .reader()
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [format!("note:{key}")],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Sets (or with `None` clears) a small persisted value.
    pub fn set_note(&self, key: &str, value: Option<&str>) -> Result<(), MirrorError> {
        let conn = self.writer();
        let key = format!("note:{key}");
        match value {
            Some(v) => conn.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, v],
            )?,
            None => conn.execute("DELETE FROM meta WHERE key = ?1", [key])?,
        };
        Ok(())
    }

    /// Writes a consistent copy of the whole mirror to `dest` (a new file).
    /// The copy is created with mode 0600, whatever the umask.
    pub fn export(&self, dest: &Path) -> Result<(), MirrorError> {
        if dest.exists() {
            return Err(MirrorError::Io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} already exists; not overwriting it", dest.display()),
            )));
        }
        // VACUUM INTO writes into an empty file: create it private first.
        create_private(dest)?;
        self.reader()
            .execute("VACUUM INTO ?1", [dest.to_string_lossy().as_ref()])?;
        Ok(())
    }
}

/// An audit record to write.
#[derive(Debug, Clone)]
pub struct AuditRecord<'a> {
    /// When (the sidecar's clock).
    pub at: SystemTime,
    /// Who.
    pub actor: &'a str,
    /// What.
    pub subject: &'a str,
    /// Previous value.
    pub from: Option<&'a str>,
    /// New value.
    pub to: &'a str,
    /// Why.
    pub reason: Option<&'a str>,
}

fn insert_audit(conn: &Connection, r: &AuditRecord<'_>) -> Result<(), MirrorError> {
    conn.execute(
        "INSERT INTO audit (at_ms, actor, subject, from_value, to_value, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![to_ms(r.at), r.actor, r.subject, r.from, r.to, r.reason],
    )?;
    conn.execute(
        "DELETE FROM audit WHERE id <= (SELECT MAX(id) FROM audit) - ?1",
        [AUDIT_ENTRIES_KEPT as i64],
    )?;
    Ok(())
}

/// Reads the entities of a snapshot file (made by `export`) without
/// modifying it, checking it first.
pub fn read_snapshot(path: &Path) -> Result<Loaded, MirrorError> {
    if !path.is_file() {
        return Err(MirrorError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is not a file", path.display()),
        )));
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if ok != "ok" {
        return Err(MirrorError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(ok),
        )));
    }
    let version: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
            r.get(0)
        })
        .optional()
        .unwrap_or(None);
    if version.as_deref() != Some(&SCHEMA_VERSION.to_string()) {
        return Err(MirrorError::Foreign {
            path: path.to_path_buf(),
            found: version.and_then(|v| v.parse().ok()),
        });
    }
    let snapshot = Mirror {
        writer: Mutex::new(Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?),
        reader: Mutex::new(conn),
        changes_kept: std::sync::atomic::AtomicU64::new(DEFAULT_CHANGES_KEPT.as_secs()),
    };
    snapshot.load()
}

/// Creates `path` empty with mode 0600 (whatever the umask), failing if it
/// exists.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The mirror file and its WAL and shared-memory files are readable by the
/// sidecar's user only: created 0600 whatever the umask (SQLite gives the
/// WAL and shared-memory files the database file's mode), and tightened to
/// 0600 if an earlier version left them looser. They hold the catalog as
/// the sidecar's upstream identity sees it.
fn private_files(path: &Path) -> Result<(), MirrorError> {
    use std::os::unix::fs::PermissionsExt;
    if !path.exists() {
        match create_private(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
    }
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        if let Ok(meta) = std::fs::metadata(&file) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::info!(path = %file.display(), "making the mirror file readable by the sidecar's user only (0600)");
                set_mode(&file, 0o600)?;
            }
        }
    }
    Ok(())
}

fn connect(path: &Path) -> Result<Connection, MirrorError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL is durable across process crashes in WAL mode (only a power
    // loss may drop the last transactions), which is what a mirror needs.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

fn new_epoch(conn: &Connection) -> Result<(), MirrorError> {
    let epoch = format!("{:016x}", rand::random::<u64>());
    let at = read_meta(conn)?.map_or(0, |m| m.id);
    let mut stmt = conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?;
    stmt.execute(params!["epoch", epoch])?;
    stmt.execute(params!["changes_from", at.to_string()])?;
    conn.execute("DELETE FROM changes", [])?;
    conn.execute("DELETE FROM change_generations", [])?;
    Ok(())
}

fn read_change_log(conn: &Connection) -> Result<ChangeLog, MirrorError> {
    let get = |key: &str| -> Result<Option<String>, MirrorError> {
        Ok(conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    };
    Ok(ChangeLog {
        epoch: get("epoch")?.unwrap_or_default(),
        complete_after: get("changes_from")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    })
}

/// Records which uids generation `generation` changed, and drops what is
/// older than `kept`. The first generation of a mirror records nothing
/// (everything is new: a downstream walks it whole) and starts the log.
fn record_changes(
    conn: &Connection,
    generation: u64,
    first: bool,
    diff: &Diff,
    applied_at: SystemTime,
    kept: Duration,
) -> Result<(), MirrorError> {
    let set_from = |g: u64| {
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('changes_from', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [g.to_string()],
        )
    };
    if first {
        set_from(generation)?;
        return Ok(());
    }
    {
        let mut insert =
            conn.prepare_cached("INSERT OR IGNORE INTO changes (generation, uid) VALUES (?1, ?2)")?;
        for entity in &diff.upserts {
            insert.execute(params![generation as i64, &*entity.uid])?;
        }
        for uid in &diff.removed {
            insert.execute(params![generation as i64, &**uid])?;
        }
    }
    conn.execute(
        "INSERT OR REPLACE INTO change_generations (generation, applied_ms) VALUES (?1, ?2)",
        params![generation as i64, to_ms(applied_at)],
    )?;
    let cutoff = to_ms(applied_at.checked_sub(kept).unwrap_or(UNIX_EPOCH));
    let dropped: Option<i64> = conn.query_row(
        "SELECT MAX(generation) FROM change_generations WHERE applied_ms < ?1",
        [cutoff],
        |r| r.get(0),
    )?;
    if let Some(upto) = dropped {
        conn.execute("DELETE FROM changes WHERE generation <= ?1", [upto])?;
        conn.execute(
            "DELETE FROM change_generations WHERE generation <= ?1",
            [upto],
        )?;
        let from: i64 = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'changes_from'",
                [],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if upto > from {
            set_from(upto as u64)?;
        }
    }
    Ok(())
}

fn read_meta(conn: &Connection) -> Result<Option<GenerationMeta>, MirrorError> {
    let get = |key: &str| -> Result<Option<i64>, MirrorError> {
        let v: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?;
        Ok(v.and_then(|v| v.parse().ok()))
    };
    let (Some(id), Some(synced), Some(count)) =
        (get("generation")?, get("synced_ms")?, get("entities")?)
    else {
        return Ok(None);
    };
    // Mirrors written before tiers were known hold only `synced_ms`.
    let checked = get("checked_ms")?.unwrap_or(synced);
    let via: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'upstream_cache_status'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(Some(GenerationMeta {
        id: id as u64,
        synced_at: from_ms(synced),
        checked_at: from_ms(checked),
        upstream_stale: get("upstream_stale")? == Some(1),
        via: via.filter(|v| !v.is_empty()).map(Arc::from),
        entities: count as usize,
    }))
}

fn write_meta(
    conn: &Connection,
    id: u64,
    confirmed: &Confirmation,
    count: usize,
) -> Result<(), MirrorError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?;
    stmt.execute(params!["generation", id.to_string()])?;
    stmt.execute(params!["synced_ms", to_ms(confirmed.origin_at).to_string()])?;
    stmt.execute(params![
        "checked_ms",
        to_ms(confirmed.checked_at).to_string()
    ])?;
    stmt.execute(params![
        "upstream_stale",
        if confirmed.upstream_stale { "1" } else { "0" }
    ])?;
    stmt.execute(params![
        "upstream_cache_status",
        confirmed.via.as_deref().unwrap_or("")
    ])?;
    stmt.execute(params!["entities", count.to_string()])?;
    Ok(())
}

fn move_aside(path: &Path, now: SystemTime) -> Result<PathBuf, MirrorError> {
    let stamp = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    std::fs::rename(path, &aside)?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            std::fs::rename(&side, format!("{}{suffix}", aside.display()))?;
        }
    }
    Ok(aside)
}

/// uid → etag of `entities`, the `previous` that [`Mirror::apply`] compares with.
pub fn etags<'a>(
    entities: impl IntoIterator<Item = &'a Arc<Entity>>,
) -> HashMap<Arc<str>, Arc<str>> {
    entities
        .into_iter()
        .map(|e| (e.uid.clone(), e.etag.clone()))
        .collect()
}

/// Milliseconds since the Unix epoch, as stored.
pub fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The inverse of [`to_ms`].
pub fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// RFC 3339 UTC rendering of a wall-clock time, e.g. `2026-12-01T06:00:00Z`.
/// Times outside what RFC 3339 can write (before 1970, after 9999) are
/// written as the nearest that it can, never a panic.
pub fn rfc3339(t: SystemTime) -> String {
    // The last second of year 9999.
    let latest = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    humantime::format_rfc3339_seconds(t.clamp(UNIX_EPOCH, latest)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity(uid: &str, name: &str, etag: &str) -> Arc<Entity> {
        let body = format!(
            r#"{{"apiVersion":"backstage.io/v1alpha1","kind":"Component","metadata":{{"name":"{name}","namespace":"default","uid":"{uid}","etag":"{etag}"}},"spec":{{}}}}"#
        );
        Arc::new(Entity::from_json(Bytes::from(body)).unwrap())
    }

    fn etags(entities: &[Arc<Entity>]) -> HashMap<Arc<str>, Arc<str>> {
        entities
            .iter()
            .map(|e| (e.uid.clone(), e.etag.clone()))
            .collect()
    }

    #[test]
    fn times_beyond_what_rfc3339_can_write_are_clamped_not_a_panic() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let far = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(rfc3339(far), "9999-12-31T23:59:59Z");
        let before = UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(from_ms(i64::MAX)), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn unchanged_entities_are_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let (mirror, outcome) = Mirror::open(&dir.path().join("m.db"), &Clock::system()).unwrap();
        assert_eq!(outcome, OpenOutcome::Healthy);
        let first = vec![
            entity("u1", "a", "e1"),
            entity("u2", "b", "e1"),
            entity("u3", "c", "e1"),
        ];
        let (meta, stats) = mirror
            .apply(
                &Diff::between(&HashMap::new(), &first),
                SystemTime::now(),
                "sync",
            )
            .unwrap();
        assert_eq!(
            (meta.id, meta.entities, stats.added, stats.rows_written),
            (1, 3, 3, 3)
        );

        let (meta, stats) = mirror
            .apply(
                &Diff::between(&etags(&first), &first),
                SystemTime::now(),
                "sync",
            )
            .unwrap();
        assert_eq!(meta.id, 2);
        assert_eq!(stats.unchanged, 3);
        assert_eq!(
            stats.rows_written, 0,
            "an unchanged catalog rewrites no entity row"
        );

        let second = vec![
            entity("u1", "a", "e2"),
            entity("u2", "b", "e1"),
            entity("u4", "d", "e1"),
        ];
        let (meta, stats) = mirror
            .apply(
                &Diff::between(&etags(&first), &second),
                SystemTime::now(),
                "sync",
            )
            .unwrap();
        assert_eq!(
            (
                stats.added,
                stats.changed,
                stats.removed,
                stats.unchanged,
                stats.rows_written
            ),
            (1, 1, 1, 1, 3)
        );
        let loaded = mirror.load().unwrap();
        assert_eq!(loaded.meta, Some(meta));
        let mut uids: Vec<_> = loaded.entities.iter().map(|e| e.uid.to_string()).collect();
        uids.sort();
        assert_eq!(uids, ["u1", "u2", "u4"]);
    }

    #[test]
    fn corrupt_file_is_moved_aside_not_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        std::fs::write(&path, b"definitely not sqlite ".repeat(300)).unwrap();
        let (mirror, outcome) = Mirror::open(&path, &Clock::system()).unwrap();
        let OpenOutcome::MovedAside(aside) = outcome else {
            panic!("corrupt file was not detected");
        };
        assert_eq!(
            std::fs::read(aside).unwrap(),
            b"definitely not sqlite ".repeat(300)
        );
        assert_eq!(mirror.meta().unwrap(), None);
    }

    #[test]
    fn flags_and_audit_persist_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            let (mirror, _) = Mirror::open(&path, &Clock::system()).unwrap();
            let flag = StoredFlag {
                value: "open".into(),
                reason: Some("maintenance".into()),
                actor: "cli".into(),
                set_at: SystemTime::now(),
                expires_at: None,
            };
            let record = AuditRecord {
                at: SystemTime::now(),
                actor: "cli",
                subject: "breaker_mode",
                from: Some("auto"),
                to: "open",
                reason: Some("maintenance"),
            };
            mirror
                .set_flag("breaker_mode", Some(&flag), &record)
                .unwrap();
        }
        let (mirror, _) = Mirror::open(&path, &Clock::system()).unwrap();
        assert_eq!(mirror.flag("breaker_mode").unwrap().unwrap().value, "open");
        let audit = mirror.recent_audit(5).unwrap();
        assert_eq!(audit.len(), 1);
        assert_eq!(
            (audit[0].to.as_str(), audit[0].reason.as_deref()),
            ("open", Some("maintenance"))
        );
    }

    #[test]
    fn snapshot_round_trips_with_its_age() {
        let dir = tempfile::tempdir().unwrap();
        let (mirror, _) = Mirror::open(&dir.path().join("m.db"), &Clock::system()).unwrap();
        let synced = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let entities = vec![entity("u1", "a", "e1"), entity("u2", "b", "e1")];
        mirror
            .apply(&Diff::between(&HashMap::new(), &entities), synced, "sync")
            .unwrap();
        let file = dir.path().join("snap.db");
        mirror.export(&file).unwrap();
        assert!(mirror.export(&file).is_err(), "export never overwrites");
        let snapshot = read_snapshot(&file).unwrap();
        assert_eq!(snapshot.entities.len(), 2);
        assert_eq!(snapshot.meta.unwrap().synced_at, synced);
        std::fs::write(dir.path().join("junk.db"), b"junk").unwrap();
        assert!(read_snapshot(&dir.path().join("junk.db")).is_err());
    }

    fn rows(mirror: &Mirror, table: &str) -> u64 {
        mirror
            .reader()
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap() as u64
    }

    #[test]
    fn the_generations_table_keeps_at_most_generations_kept_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (mirror, _) = Mirror::open(&dir.path().join("m.db"), &Clock::system()).unwrap();
        let mut previous = HashMap::new();
        for n in 0..GENERATIONS_KEPT + 5 {
            let now = vec![entity("u1", "a", &format!("e{n}"))];
            let (meta, _) = mirror
                .apply(&Diff::between(&previous, &now), SystemTime::now(), "sync")
                .unwrap();
            assert_eq!(meta.id, n + 1);
            previous = etags(&now);
            assert!(rows(&mirror, "generations") <= GENERATIONS_KEPT);
        }
        assert_eq!(rows(&mirror, "generations"), GENERATIONS_KEPT);
        let oldest: i64 = mirror
            .reader()
            .query_row("SELECT MIN(id) FROM generations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            oldest as u64, 6,
            "the newest GENERATIONS_KEPT are the ones kept"
        );
    }

    #[test]
    fn the_audit_trail_keeps_at_most_audit_entries_kept_rows() {
        let dir = tempfile::tempdir().unwrap();
        let (mirror, _) = Mirror::open(&dir.path().join("m.db"), &Clock::system()).unwrap();
        // Fill in one transaction (ten thousand single commits take seconds),
        // then let the ordinary path add the entries that must prune.
        {
            let mut conn = mirror.writer();
            let tx = conn.transaction().unwrap();
            for _ in 0..AUDIT_ENTRIES_KEPT {
                tx.execute(
                    "INSERT INTO audit (at_ms, actor, subject, to_value) VALUES (0, 't', 's', 'v')",
                    [],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        assert_eq!(rows(&mirror, "audit"), AUDIT_ENTRIES_KEPT);
        for n in 0..3 {
            let to = format!("v{n}");
            mirror
                .audit(&AuditRecord {
                    at: SystemTime::now(),
                    actor: "test",
                    subject: "breaker_mode",
                    from: None,
                    to: &to,
                    reason: None,
                })
                .unwrap();
            assert_eq!(rows(&mirror, "audit"), AUDIT_ENTRIES_KEPT);
        }
        assert_eq!(mirror.recent_audit(1).unwrap()[0].to, "v2");
    }
}
