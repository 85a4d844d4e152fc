//! Configuration: the one place that knows the file format, the defaults,
//! the environment overlay and what a valid value is.
//!
//! Precedence: built-in defaults < TOML file < `CATALOG_CACHE_<SECTION>_<KEY>`
//! environment variables < CLI flags (applied by `main`). Run-time operator
//! overrides (breaker mode, stale policy) live in the mirror database and win
//! over all of these; see `state`. An invalid value is refused with its key,
//! the value and what is allowed, never with a panic.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::breaker::BreakerConfig;
pub use crate::units::{ByteSize, Dur};

/// The file read when `--config` is not given (absent: defaults apply).
pub const DEFAULT_CONFIG_PATH: &str = "config/catalog-cache.toml";
/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "CATALOG_CACHE_";
/// Environment variable naming the config file.
pub const ENV_CONFIG: &str = "CATALOG_CACHE_CONFIG";
/// Environment variable with the admin URL the CLI talks to.
pub const ENV_ADMIN_URL: &str = "CATALOG_CACHE_ADMIN_URL";

/// Default upstream: the demo catalog's address.
pub const DEFAULT_UPSTREAM_URL: &str = "http://127.0.0.1:7007/api/catalog";
/// Default limit for one upstream request.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Default TCP connect limit for the upstream.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Default cache name in `Cache-Status` (`listen.name`).
pub const DEFAULT_CACHE_NAME: &str = "catalog-cache";
/// Default catalog API listener.
pub const DEFAULT_LISTEN_PROXY: &str = "127.0.0.1:7070";
/// Default admin listener (health, metrics, status, operator API).
pub const DEFAULT_LISTEN_ADMIN: &str = "127.0.0.1:7071";
/// Default mirror database.
pub const DEFAULT_MIRROR_PATH: &str = "data/catalog-cache.db";
/// Default time between full syncs.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(60);
/// Default relative jitter on the sync interval.
pub const DEFAULT_SYNC_JITTER: f64 = 0.1;
/// Default entities per sync page.
pub const DEFAULT_PAGE_SIZE: u32 = 500;
/// Default entities per page of an id-walk (only kind, namespace, name,
/// uid and etag of each: about 150 bytes an entity).
pub const DEFAULT_ID_PAGE_SIZE: u32 = 5000;
/// Default: every this many sync cycles, one walks whole entities rather
/// than ids.
pub const DEFAULT_FULL_SYNC_EVERY: u32 = 10;
/// Default of how long the changes log keeps a generation's changes.
pub const DEFAULT_CHANGES_KEPT: Duration = crate::mirror::DEFAULT_CHANGES_KEPT;
/// Default mass-deletion guard: the largest share of entities a sync may remove.
pub const DEFAULT_MAX_DELETE_RATIO: f64 = 0.2;
/// Default freshness horizon: younger data is served locally as fresh.
pub const DEFAULT_FRESH_FOR: Duration = Duration::from_secs(90);
/// Default longest wait of a read on the upstream.
pub const DEFAULT_REVALIDATE_BUDGET: Duration = Duration::from_millis(250);
/// Default lifetime of a cached upstream 404.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// Default age beyond which data is never served.
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(24 * 3600);
/// Default hot-cache capacity, in bytes of the answers it holds.
pub const DEFAULT_HOT_CACHE_MAX_BYTES: u64 = 64 << 20;
/// Default admin token file.
pub const DEFAULT_ADMIN_TOKEN_FILE: &str = "data/admin.token";
/// Default largest request body the proxy accepts.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 1024 * 1024;
/// Default longest evaluation of one query.
pub const DEFAULT_QUERY_BUDGET: Duration = Duration::from_secs(1);
/// Default byte bound of the cached sort columns of one generation.
pub use crate::index::DEFAULT_SORT_COLUMNS_MAX_BYTES;
/// Default client-triggered upstream calls at once.
pub const DEFAULT_UPSTREAM_MAX_IN_FLIGHT: usize = 32;
/// Default time allowed for a request header (and to wait for one on an idle connection).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest pause between two chunks of a request body.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest time a connection may move no byte either way.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default longest time from a request's header to its answer's header.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default open connections on the proxy listener.
pub const DEFAULT_PROXY_MAX_CONNECTIONS: usize = 1024;
/// Default requests in flight on the proxy listener.
pub const DEFAULT_PROXY_MAX_IN_FLIGHT: usize = 512;
/// Default open connections on the admin listener.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// Default requests in flight on the admin listener.
pub const DEFAULT_ADMIN_MAX_IN_FLIGHT: usize = 32;
/// Default age beyond which a stored read-through answer is dropped.
pub const DEFAULT_READ_THROUGH_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Default number of stored read-through answers.
pub const DEFAULT_READ_THROUGH_MAX_ENTRIES: u64 = 1000;
/// Default bytes of stored read-through answers.
pub const DEFAULT_READ_THROUGH_MAX_BYTES: u64 = 8 << 20;

const SECTIONS: &[&str] = &[
    "upstream",
    "listen",
    "mirror",
    "freshness",
    "stale",
    "breaker",
    "hot_cache",
    "read_through",
    "admin",
    "proxy",
    "log",
];

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[upstream]`: the Backstage catalog behind the sidecar.
    pub upstream: UpstreamConfig,
    /// `[listen]`: the two listeners.
    pub listen: ListenConfig,
    /// `[mirror]`: the SQLite mirror and its sync loop.
    pub mirror: MirrorConfig,
    /// `[freshness]`: when local data is fresh, and how long a read may wait.
    pub freshness: FreshnessConfig,
    /// `[stale]`: the stale-data flag.
    pub stale: StaleConfig,
    /// `[breaker]`: the upstream circuit breaker (the breaker's own
    /// settings type, embedded as it is).
    pub breaker: BreakerConfig,
    /// `[hot_cache]`: the in-memory cache of upstream answers.
    pub hot_cache: HotCacheConfig,
    /// `[read_through]`: answers the mirror cannot compute, kept for outages.
    pub read_through: ReadThroughConfig,
    /// `[admin]`: the operator API's credentials.
    pub admin: AdminConfig,
    /// `[proxy]`: the catalog API listener's limits and client auth.
    pub proxy: ProxyConfig,
    /// `[log]`: log format and level.
    pub log: LogConfig,
}

/// `[upstream]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Backstage catalog base URL, e.g. `https://backstage.example.com/api/catalog`.
    pub url: String,
    /// File holding the bearer token for the upstream; empty for none.
    pub token_file: PathBuf,
    /// Limit for one upstream request (one sync page, one revalidation).
    pub timeout: Dur,
    /// TCP connect limit.
    pub connect_timeout: Dur,
    /// PEM file of extra CA certificates trusted for an HTTPS upstream, in
    /// addition to the system (or bundled web PKI) roots; empty for none.
    /// Also trusted for a peer's snapshot (`mirror.seed_from`).
    pub ca_file: PathBuf,
    /// Upstream calls that reads may have in flight at once
    /// (revalidations, read-through, forwarded queries, pass-through); a
    /// read beyond it is answered from the mirror, or 503. The sync loop's
    /// calls are not counted.
    pub max_in_flight: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_UPSTREAM_URL.into(),
            token_file: PathBuf::new(),
            timeout: Dur(DEFAULT_UPSTREAM_TIMEOUT),
            connect_timeout: Dur(DEFAULT_UPSTREAM_CONNECT_TIMEOUT),
            ca_file: PathBuf::new(),
            max_in_flight: DEFAULT_UPSTREAM_MAX_IN_FLIGHT,
        }
    }
}

/// `[listen]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// This sidecar's name in `Cache-Status` (RFC 9211), so that tiers of
    /// catalog-cache can be told apart: a token such as `catalog-cache` or
    /// `region-eu`.
    pub name: String,
    /// Catalog API listener.
    pub proxy: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// From a connection being ready for a request (new, or idle after an
    /// answer) to that request's header being complete.
    pub header_read_timeout: Dur,
    /// Longest pause between two chunks of a request body.
    pub body_read_timeout: Dur,
    /// Longest time a connection may move no byte in either direction.
    pub idle_timeout: Dur,
    /// Longest time from a request's header to its answer's header.
    pub request_timeout: Dur,
    /// Open connections on the proxy listener; more wait to be accepted.
    pub proxy_max_connections: usize,
    /// Requests in flight on the proxy listener; more are answered 503.
    pub proxy_max_in_flight: usize,
    /// Open connections on the admin listener (its own, so that probes
    /// answer while the proxy listener is flooded).
    pub admin_max_connections: usize,
    /// Requests in flight on the admin listener.
    pub admin_max_in_flight: usize,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            name: DEFAULT_CACHE_NAME.into(),
            proxy: DEFAULT_LISTEN_PROXY.parse().expect("constant address"),
            admin: DEFAULT_LISTEN_ADMIN.parse().expect("constant address"),
            header_read_timeout: Dur(DEFAULT_HEADER_READ_TIMEOUT),
            body_read_timeout: Dur(DEFAULT_BODY_READ_TIMEOUT),
            idle_timeout: Dur(DEFAULT_IDLE_TIMEOUT),
            request_timeout: Dur(DEFAULT_REQUEST_TIMEOUT),
            proxy_max_connections: DEFAULT_PROXY_MAX_CONNECTIONS,
            proxy_max_in_flight: DEFAULT_PROXY_MAX_IN_FLIGHT,
            admin_max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            admin_max_in_flight: DEFAULT_ADMIN_MAX_IN_FLIGHT,
        }
    }
}

/// Whether `name` is an RFC 8941 token short enough for a `Cache-Status`
/// member name.
fn is_cache_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '*');
    first_ok
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~:/".contains(c))
}

/// `[mirror]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorConfig {
    /// SQLite database file (WAL mode).
    pub path: PathBuf,
    /// Time between full syncs.
    pub sync_interval: Dur,
    /// Relative jitter on the interval, 0 to <1.
    pub sync_jitter: f64,
    /// Entities per sync page.
    pub page_size: u32,
    /// A sync removing more than this share of entities is held.
    pub max_delete_ratio: f64,
    /// Entities per page of an id-walk (ids and etags only).
    pub id_page_size: u32,
    /// Every this many cycles, a sync walks whole entities (a full walk)
    /// rather than ids plus by-refs for what changed; 1: always.
    pub full_sync_every: u32,
    /// How long the changes log (the tier extension's changes feed) keeps
    /// a generation's changes.
    pub changes_kept: Dur,
    /// A peer sidecar's admin URL to seed an empty mirror from; empty for none.
    pub seed_from: String,
    /// File holding the peer's admin token for `seed_from`; empty: this
    /// sidecar's own admin token (peers of one deployment share it).
    pub seed_token_file: PathBuf,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self {
            path: DEFAULT_MIRROR_PATH.into(),
            sync_interval: Dur(DEFAULT_SYNC_INTERVAL),
            sync_jitter: DEFAULT_SYNC_JITTER,
            page_size: DEFAULT_PAGE_SIZE,
            max_delete_ratio: DEFAULT_MAX_DELETE_RATIO,
            id_page_size: DEFAULT_ID_PAGE_SIZE,
            full_sync_every: DEFAULT_FULL_SYNC_EVERY,
            changes_kept: Dur(DEFAULT_CHANGES_KEPT),
            seed_from: String::new(),
            seed_token_file: PathBuf::new(),
        }
    }
}

/// `[freshness]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FreshnessConfig {
    /// Younger than this: served locally as fresh.
    pub fresh_for: Dur,
    /// Longest a read waits on the upstream.
    pub revalidate_budget: Dur,
    /// Lifetime of a cached upstream 404.
    pub negative_ttl: Dur,
}

impl Default for FreshnessConfig {
    fn default() -> Self {
        Self {
            fresh_for: Dur(DEFAULT_FRESH_FOR),
            revalidate_budget: Dur(DEFAULT_REVALIDATE_BUDGET),
            negative_ttl: Dur(DEFAULT_NEGATIVE_TTL),
        }
    }
}

/// The stale-data flag: may data the upstream could not confirm be served?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StalePolicy {
    /// Serve mirror data up to `stale.max_stale` old, marked stale.
    #[default]
    Serve,
    /// Answer 503 instead of stale data.
    Refuse,
}

impl StalePolicy {
    /// The policy's name as written in config and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serve => "serve",
            Self::Refuse => "refuse",
        }
    }
}

impl FromStr for StalePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "serve" => Ok(Self::Serve),
            "refuse" => Ok(Self::Refuse),
            other => Err(format!("'{other}' is not a stale policy (serve | refuse)")),
        }
    }
}

impl fmt::Display for StalePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[stale]`: the stale-data flag and how old served data may be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaleConfig {
    /// `serve` or `refuse`.
    pub policy: StalePolicy,
    /// Older than this is never served, whatever the policy (formerly
    /// `freshness.max_stale`, which is still read).
    pub max_stale: Dur,
}

impl Default for StaleConfig {
    fn default() -> Self {
        Self {
            policy: StalePolicy::Serve,
            max_stale: Dur(DEFAULT_MAX_STALE),
        }
    }
}

/// `[hot_cache]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HotCacheConfig {
    /// Bytes of answers held (bodies and keys), e.g. `64MiB`.
    pub max_bytes: ByteSize,
}

impl Default for HotCacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: ByteSize(DEFAULT_HOT_CACHE_MAX_BYTES),
        }
    }
}

/// `[read_through]`: stored answers for reads the mirror cannot compute
/// (`/ancestry`, `/locations…`), kept to serve during outages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReadThroughConfig {
    /// Stored answers older than this are dropped.
    pub max_age: Dur,
    /// Most stored answers; the oldest go first.
    pub max_entries: u64,
    /// Most bytes of stored answers; the oldest go first.
    pub max_bytes: ByteSize,
}

impl Default for ReadThroughConfig {
    fn default() -> Self {
        Self {
            max_age: Dur(DEFAULT_READ_THROUGH_MAX_AGE),
            max_entries: DEFAULT_READ_THROUGH_MAX_ENTRIES,
            max_bytes: ByteSize(DEFAULT_READ_THROUGH_MAX_BYTES),
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin bearer token file; generated (0600) at first start when absent.
    pub token_file: PathBuf,
    /// The admin token itself (normally from `CATALOG_CACHE_ADMIN_TOKEN`);
    /// wins over the file. Never printed.
    #[serde(skip_serializing)]
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token_file: DEFAULT_ADMIN_TOKEN_FILE.into(),
            token: None,
        }
    }
}

/// `[proxy]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// File of accepted client bearer tokens, one per line; empty: no client auth.
    pub client_tokens_file: PathBuf,
    /// Largest request body accepted, e.g. `1MiB`.
    pub max_request_body: ByteSize,
    /// Longest evaluation of one query (filter, predicate, order, facets,
    /// `fields`); a query that runs longer is stopped and answered 400.
    pub query_budget: Dur,
    /// Queries evaluated at once, on their own threads (never on the
    /// threads that answer entity reads and probes); 0: one less than the
    /// CPUs, at least 1. A query waits for a thread within its budget.
    pub query_concurrency: usize,
    /// Bytes of sort columns kept per generation (built when a field is
    /// first ordered by); the least recently used go first.
    pub sort_columns_max_bytes: ByteSize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            client_tokens_file: PathBuf::new(),
            max_request_body: ByteSize(DEFAULT_MAX_REQUEST_BODY),
            query_budget: Dur(DEFAULT_QUERY_BUDGET),
            query_concurrency: 0,
            sort_columns_max_bytes: ByteSize(DEFAULT_SORT_COLUMNS_MAX_BYTES),
        }
    }
}

impl ProxyConfig {
    /// Queries evaluated at once (`query_concurrency`, 0 resolved).
    pub fn query_threads(&self) -> usize {
        match self.query_concurrency {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get().saturating_sub(1))
                .max(1),
            n => n,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `catalog_cache=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The file is not TOML.
    #[error("config file {path} is not valid TOML: {reason}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// A key has a value of the wrong shape, or the key does not exist.
    #[error("invalid config: {key}: {reason}")]
    Shape {
        /// Dotted key, e.g. `breaker.window`.
        key: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// A value has the right shape but is out of range.
    #[error("invalid config: {key} = {value}: {allowed}")]
    Invalid {
        /// Dotted key.
        key: String,
        /// The value given.
        value: String,
        /// What is allowed.
        allowed: String,
    },
    /// A `[breaker]` setting the breaker cannot work with.
    #[error("invalid config: {reason}")]
    Breaker {
        /// Dotted key, e.g. `breaker.window`.
        key: String,
        /// The key, the value and what is allowed.
        reason: String,
    },
    /// An environment variable with our prefix names no setting.
    #[error("unknown environment variable {name}: no such setting (settings are CATALOG_CACHE_<SECTION>_<KEY>, sections: {sections})")]
    UnknownEnv {
        /// The variable's name.
        name: String,
        /// The valid sections.
        sections: String,
    },
}

impl Config {
    /// Loads the configuration: defaults, then `path` (or the default file if
    /// it exists), then the `CATALOG_CACHE_*` variables in `env`, then validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (file, text) = match path {
            Some(p) => (p.to_path_buf(), Some(read(p)?)),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_PATH);
                let text = if p.exists() { Some(read(&p)?) } else { None };
                (p, text)
            }
        };
        let mut table = match text {
            Some(text) => {
                toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::Syntax {
                    path: file.clone(),
                    reason: e.message().to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        rename_old_keys(&mut table)?;
        overlay_env(&mut table, env)?;
        Self::from_table(table)
    }

    /// Parses a TOML document (no environment overlay), then validates.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let table = toml::from_str::<toml::Table>(text).map_err(|e| ConfigError::Syntax {
            path: PathBuf::from("<inline>"),
            reason: e.message().to_string(),
        })?;
        Self::from_table(table)
    }

    fn from_table(mut table: toml::Table) -> Result<Self, ConfigError> {
        rename_old_keys(&mut table)?;
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                ConfigError::Shape {
                    key: e.path().to_string(),
                    reason: e.inner().to_string(),
                }
            })?;
        config.validate()?;
        Ok(config)
    }

    /// The bounds of each generation's query index (`[proxy]`).
    pub fn index_limits(&self) -> crate::index::IndexLimits {
        crate::index::IndexLimits {
            sort_columns_max_bytes: self.proxy.sort_columns_max_bytes.0,
        }
    }

    /// Checks ranges and cross-field rules that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, value: &dyn fmt::Display, allowed: &str| ConfigError::Invalid {
            key: key.into(),
            value: value.to_string(),
            allowed: allowed.into(),
        };
        let url = &self.upstream.url;
        match url.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some()
                    && uri.query().is_none() => {}
            _ => {
                return Err(invalid(
                    "upstream.url",
                    url,
                    "an absolute http:// or https:// URL without a query, e.g. https://backstage.example.com/api/catalog",
                ))
            }
        }
        if !self.upstream.ca_file.as_os_str().is_empty() {
            if let Err(e) = crate::tls::load_ca_file(&self.upstream.ca_file) {
                return Err(invalid(
                    "upstream.ca_file",
                    &self.upstream.ca_file.display(),
                    &format!("a readable PEM file of CA certificates ({e})"),
                ));
            }
        }
        if !is_cache_name(&self.listen.name) {
            return Err(invalid(
                "listen.name",
                &self.listen.name,
                "a token of at most 64 characters: a letter or '*', then letters, digits and !#$%&'*+-.^_`|~:/ (e.g. catalog-cache, region-eu)",
            ));
        }
        let positive = [
            ("upstream.timeout", self.upstream.timeout),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("mirror.sync_interval", self.mirror.sync_interval),
            (
                "freshness.revalidate_budget",
                self.freshness.revalidate_budget,
            ),
            ("stale.max_stale", self.stale.max_stale),
            (
                "listen.header_read_timeout",
                self.listen.header_read_timeout,
            ),
            ("listen.body_read_timeout", self.listen.body_read_timeout),
            ("listen.idle_timeout", self.listen.idle_timeout),
            ("listen.request_timeout", self.listen.request_timeout),
            ("read_through.max_age", self.read_through.max_age),
        ];
        for (key, value) in positive {
            if value.0.is_zero() {
                return Err(invalid(key, &value, "a duration greater than zero"));
            }
        }
        if !(0.0..1.0).contains(&self.mirror.sync_jitter) {
            return Err(invalid(
                "mirror.sync_jitter",
                &self.mirror.sync_jitter,
                "a fraction from 0 up to (not including) 1",
            ));
        }
        if !(1..=10_000).contains(&self.mirror.page_size) {
            return Err(invalid(
                "mirror.page_size",
                &self.mirror.page_size,
                "a whole number from 1 to 10000",
            ));
        }
        if !(1..=10_000).contains(&self.mirror.id_page_size) {
            return Err(invalid(
                "mirror.id_page_size",
                &self.mirror.id_page_size,
                "a whole number from 1 to 10000",
            ));
        }
        if !(1..=10_000).contains(&self.mirror.full_sync_every) {
            return Err(invalid(
                "mirror.full_sync_every",
                &self.mirror.full_sync_every,
                "a whole number of sync cycles from 1 (always a full walk) to 10000",
            ));
        }
        if self.mirror.changes_kept.0 < Duration::from_secs(1) {
            return Err(invalid(
                "mirror.changes_kept",
                &self.mirror.changes_kept,
                "a duration of at least 1s",
            ));
        }
        if !(self.mirror.max_delete_ratio > 0.0 && self.mirror.max_delete_ratio <= 1.0) {
            return Err(invalid(
                "mirror.max_delete_ratio",
                &self.mirror.max_delete_ratio,
                "a fraction greater than 0 and at most 1 (1 disables the guard)",
            ));
        }
        if !self.mirror.seed_from.is_empty() {
            match self.mirror.seed_from.parse::<http::Uri>() {
                Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) => {}
                _ => {
                    return Err(invalid(
                        "mirror.seed_from",
                        &self.mirror.seed_from,
                        "empty, or a peer sidecar's admin URL like http://peer:7071",
                    ))
                }
            }
        }
        if self.freshness.fresh_for > self.stale.max_stale {
            return Err(invalid(
                "freshness.fresh_for",
                &self.freshness.fresh_for,
                &format!("at most stale.max_stale ({})", self.stale.max_stale),
            ));
        }
        self.breaker.validate().map_err(|e| ConfigError::Breaker {
            key: e.key().to_string(),
            reason: e.to_string(),
        })?;
        for (key, value, least) in [
            ("hot_cache.max_bytes", self.hot_cache.max_bytes, 1 << 20),
            (
                "read_through.max_bytes",
                self.read_through.max_bytes,
                1 << 16,
            ),
            (
                "proxy.sort_columns_max_bytes",
                self.proxy.sort_columns_max_bytes,
                1 << 20,
            ),
        ] {
            if value.0 < least {
                return Err(invalid(
                    key,
                    &value,
                    &format!("a size of at least {}", ByteSize(least)),
                ));
            }
        }
        for (key, value, allowed) in [
            (
                "upstream.max_in_flight",
                self.upstream.max_in_flight,
                1..=4096,
            ),
            (
                "listen.proxy_max_connections",
                self.listen.proxy_max_connections,
                1..=65_536,
            ),
            (
                "listen.proxy_max_in_flight",
                self.listen.proxy_max_in_flight,
                1..=65_536,
            ),
            (
                "listen.admin_max_connections",
                self.listen.admin_max_connections,
                1..=4096,
            ),
            (
                "listen.admin_max_in_flight",
                self.listen.admin_max_in_flight,
                1..=4096,
            ),
            (
                "proxy.query_concurrency",
                self.proxy.query_concurrency,
                0..=256,
            ),
            (
                "read_through.max_entries",
                self.read_through.max_entries as usize,
                1..=1_000_000,
            ),
        ] {
            if !allowed.contains(&value) {
                return Err(invalid(
                    key,
                    &value,
                    &format!(
                        "a whole number from {} to {}",
                        allowed.start(),
                        allowed.end()
                    ),
                ));
            }
        }
        if self.proxy.query_budget.0 < Duration::from_millis(10)
            || self.proxy.query_budget.0 > Duration::from_secs(60)
        {
            return Err(invalid(
                "proxy.query_budget",
                &self.proxy.query_budget,
                "a duration from 10ms to 1m",
            ));
        }
        if !self.mirror.seed_token_file.as_os_str().is_empty() && self.mirror.seed_from.is_empty() {
            return Err(invalid(
                "mirror.seed_token_file",
                &self.mirror.seed_token_file.display(),
                "empty unless mirror.seed_from names a peer",
            ));
        }
        if self.proxy.max_request_body.0 == 0 {
            return Err(invalid(
                "proxy.max_request_body",
                &self.proxy.max_request_body,
                "a size greater than zero, e.g. 1MiB",
            ));
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(invalid(
                "log.level",
                &self.log.level,
                "a log filter such as info, debug or catalog_cache=debug,warn",
            ));
        }
        if self.listen.proxy == self.listen.admin {
            return Err(invalid(
                "listen.admin",
                &self.listen.admin,
                "an address different from listen.proxy",
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML (secrets left out).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Directory holding the mirror and, by default, the admin token.
    pub fn data_dir(&self) -> PathBuf {
        self.mirror
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }
}

/// Keys that moved, as `(old section, old key, new section, new key)`. The
/// old spelling is still read, from the file and from the environment.
const RENAMED: &[(&str, &str, &str, &str)] = &[("freshness", "max_stale", "stale", "max_stale")];

/// Moves keys written under their old names to their new ones. A file that
/// sets both, differently, is refused: it is not clear which one is meant.
fn rename_old_keys(table: &mut toml::Table) -> Result<(), ConfigError> {
    for (old_section, old_key, new_section, new_key) in RENAMED {
        let Some(value) = table
            .get_mut(*old_section)
            .and_then(toml::Value::as_table_mut)
            .and_then(|t| t.remove(*old_key))
        else {
            continue;
        };
        let section = table
            .entry(new_section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section) = section.as_table_mut() else {
            return Err(ConfigError::Shape {
                key: new_section.to_string(),
                reason: "must be a table".into(),
            });
        };
        match section.get(*new_key) {
            Some(current) if *current != value => {
                return Err(ConfigError::Invalid {
                    key: format!("{old_section}.{old_key}"),
                    value: value.to_string(),
                    allowed: format!(
                        "left out: it is the old name of {new_section}.{new_key}, which is set to {current}"
                    ),
                })
            }
            _ => {
                section.insert(new_key.to_string(), value);
            }
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Applies `CATALOG_CACHE_<SECTION>_<KEY>=value` pairs onto the parsed file.
/// Values are read as TOML scalars when they are one (`5`, `0.5`, `true`),
/// else as strings (`90s`, `http://…`), so one rule serves every key.
fn overlay_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if name == ENV_CONFIG || name == ENV_ADMIN_URL {
            continue;
        }
        let lower = rest.to_ascii_lowercase();
        let Some((section, key)) = SECTIONS.iter().find_map(|s| {
            lower
                .strip_prefix(s)
                .and_then(|k| k.strip_prefix('_'))
                .filter(|k| !k.is_empty())
                .map(|k| (*s, k))
        }) else {
            return Err(ConfigError::UnknownEnv {
                name,
                sections: SECTIONS.join(", "),
            });
        };
        // An old name in the environment sets the new key (and wins over
        // the file, as every variable does).
        let (section, key) = RENAMED
            .iter()
            .find(|(s, k, _, _)| *s == section && *k == key)
            .map_or((section, key), |(_, _, s, k)| (*s, *k));
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .filter(|v| !v.is_table() && !v.is_array())
            .unwrap_or(toml::Value::String(value));
        let entry = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section_table) = entry.as_table_mut() else {
            return Err(ConfigError::Shape {
                key: section.into(),
                reason: "must be a table".into(),
            });
        };
        section_table.insert(key.to_string(), parsed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_file_documents_exactly_the_defaults() {
        let text = include_str!("../config/catalog-cache.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn env_overrides_file_with_typed_values() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[breaker]\nconsecutive_failures = 3\n").unwrap();
        let config = Config::load(
            Some(&file),
            env(&[
                (
                    "CATALOG_CACHE_UPSTREAM_URL",
                    "https://backstage.example.com/api/catalog",
                ),
                ("CATALOG_CACHE_BREAKER_FAILURE_RATE", "0.25"),
                ("CATALOG_CACHE_HOT_CACHE_MAX_BYTES", "8MiB"),
                ("CATALOG_CACHE_FRESHNESS_FRESH_FOR", "30s"),
                ("CATALOG_CACHE_STALE_POLICY", "refuse"),
                ("CATALOG_CACHE_ADMIN_TOKEN", "s3cret"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.breaker.consecutive_failures, 3);
        assert_eq!(config.breaker.failure_rate, 0.25);
        assert_eq!(config.hot_cache.max_bytes, ByteSize(8 << 20));
        assert_eq!(config.freshness.fresh_for, Dur(Duration::from_secs(30)));
        assert_eq!(config.stale.policy, StalePolicy::Refuse);
        assert_eq!(config.admin.token.as_deref(), Some("s3cret"));
        assert_eq!(
            config.upstream.url,
            "https://backstage.example.com/api/catalog"
        );
        assert!(!config.to_toml().contains("s3cret"));
    }

    #[test]
    fn bad_values_name_the_key_the_value_and_what_is_allowed() {
        let err = Config::from_toml("[freshness]\nfresh_for = \"soon\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("freshness.fresh_for"), "{text}");
        assert!(text.contains("soon") && text.contains("250ms"), "{text}");

        let err = Config::from_toml("[mirror]\nmax_delete_ratio = 1.5\n").unwrap_err();
        assert_eq!(
            err,
            ConfigError::Invalid {
                key: "mirror.max_delete_ratio".into(),
                value: "1.5".into(),
                allowed: "a fraction greater than 0 and at most 1 (1 disables the guard)".into(),
            }
        );

        let err = Config::from_toml("[mirror]\npage_sise = 5\n").unwrap_err();
        assert!(err.to_string().contains("page_sise"), "{err}");

        let err = Config::from_toml("[upstream]\nurl = \"ftp://x\"\n").unwrap_err();
        assert!(err.to_string().contains("upstream.url"), "{err}");

        let err = Config::from_toml("[listen]\nproxy = \"nowhere\"\n").unwrap_err();
        assert!(err.to_string().contains("listen.proxy"), "{err}");

        let err = Config::from_toml("[breaker]\nopen_for = \"2m\"\n").unwrap_err();
        assert!(err.to_string().contains("breaker.max_open"), "{err}");

        let err = Config::from_toml("[stale]\npolicy = \"maybe\"\n").unwrap_err();
        assert!(err.to_string().contains("stale.policy"), "{err}");

        let err = Config::load(None, env(&[("CATALOG_CACHE_UPSTREEM_URL", "x")])).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownEnv { .. }), "{err}");
    }

    #[test]
    fn a_ca_file_that_is_not_pem_certificates_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let check = |path: &Path| {
            let text = format!("[upstream]\nca_file = {:?}\n", path.display().to_string());
            Config::from_toml(&text).unwrap_err().to_string()
        };
        let missing = check(&dir.path().join("absent.pem"));
        assert!(missing.contains("upstream.ca_file"), "{missing}");
        assert!(missing.contains("cannot read"), "{missing}");

        let text_file = dir.path().join("notes.txt");
        std::fs::write(&text_file, "just some words\n").unwrap();
        let empty = check(&text_file);
        assert!(empty.contains("upstream.ca_file"), "{empty}");
        assert!(empty.contains("no PEM CERTIFICATE"), "{empty}");

        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let bad = check(&broken);
        assert!(bad.contains("upstream.ca_file"), "{bad}");
        assert!(bad.contains("not a PEM file"), "{bad}");

        let garbage_der = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage_der,
            "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let not_ca = check(&garbage_der);
        assert!(not_ca.contains("cannot be trusted as a CA"), "{not_ca}");
    }

    #[test]
    fn the_old_max_stale_key_still_loads_into_the_stale_section() {
        let old = Config::from_toml("[freshness]\nmax_stale = \"12h\"\n").unwrap();
        assert_eq!(old.stale.max_stale, Dur(Duration::from_secs(12 * 3600)));
        let via_env =
            Config::load(None, env(&[("CATALOG_CACHE_FRESHNESS_MAX_STALE", "2h")])).unwrap();
        assert_eq!(via_env.stale.max_stale, Dur(Duration::from_secs(2 * 3600)));
        let both_agree =
            Config::from_toml("[freshness]\nmax_stale = \"6h\"\n[stale]\nmax_stale = \"6h\"\n")
                .unwrap();
        assert_eq!(
            both_agree.stale.max_stale,
            Dur(Duration::from_secs(6 * 3600))
        );
        let err =
            Config::from_toml("[freshness]\nmax_stale = \"6h\"\n[stale]\nmax_stale = \"1h\"\n")
                .unwrap_err();
        assert!(err.to_string().contains("freshness.max_stale"), "{err}");
        assert!(err.to_string().contains("stale.max_stale"), "{err}");
        // The effective config is written with the new key only.
        let written = old.to_toml();
        assert_eq!(written.matches("max_stale").count(), 1, "{written}");
        assert_eq!(Config::from_toml(&written).unwrap(), old);
        // The old name in the environment wins over the file's new one.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[stale]\nmax_stale = \"1day\"\n").unwrap();
        let over = Config::load(
            Some(&file),
            env(&[("CATALOG_CACHE_FRESHNESS_MAX_STALE", "3h")]),
        )
        .unwrap();
        assert_eq!(over.stale.max_stale, Dur(Duration::from_secs(3 * 3600)));
    }

    #[test]
    fn breaker_settings_are_the_breakers_own_and_validated_once() {
        let err = Config::from_toml("[breaker]\nmin_calls = 0\n").unwrap_err();
        assert!(err.to_string().contains("breaker.min_calls"), "{err}");
        let err = Config::from_toml("[breaker]\nwindow = \"5ms\"\n").unwrap_err();
        assert!(err.to_string().contains("breaker.window"), "{err}");
        let c = Config::from_toml("[breaker]\nmode = \"open\"\nopen_for = \"2s\"\n").unwrap();
        assert_eq!(c.breaker.mode, crate::breaker::BreakerMode::Open);
        assert_eq!(c.breaker.open_for, Duration::from_secs(2));
    }

    #[test]
    fn sizes_and_durations_round_trip() {
        assert_eq!("1MiB".parse::<ByteSize>().unwrap(), ByteSize(1 << 20));
        assert_eq!("512KiB".parse::<ByteSize>().unwrap().to_string(), "512KiB");
        assert!("1 parsec".parse::<ByteSize>().is_err());
        assert_eq!("250ms".parse::<Dur>().unwrap().to_string(), "250ms");
        let text = Config::default().to_toml();
        assert_eq!(Config::from_toml(&text).unwrap(), Config::default());
    }
}
