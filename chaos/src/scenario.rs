//! The chaos harness: real processes, real HTTP, measured reads.
//!
//! `scenarios` drives one fault per scenario through the pieces here: `Proc`
//! (a child process killed by PID when dropped, also on panic), `Lab` (a
//! fresh data dir, the demo catalog and the real `catalog-cache` binary on
//! free loopback ports), `Load` (concurrent readers recording every answer),
//! `Monitor` (the sidecar's `/status` sampled over time) and `Outcome` (one
//! table row, with the mechanism that made its fault). A `Lab` may put the
//! fault proxy (`crate::faultproxy`) between the sidecar and the demo
//! catalog; `mirror_generation` reads what a mirror file holds after a
//! kill. The abuse suite (`abuse`) adds its own pieces here too:
//! `LabOptions` (mirror path, umask), `Bystander` (a well-behaved client on
//! both listeners), `RssMonitor` and `Ceiling` (the sidecar's memory against
//! a derived bound), `raw_request` (bytes no client library normalises) and
//! `render_grid` (the table both print). Every wait here has a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::faultproxy::FaultProxy;

/// The admin token every scenario's sidecar is started with.
pub const ADMIN_TOKEN: &str = "chaos-admin-token";
/// Env var naming the `catalog-cache` binary when `--sidecar` is not given.
pub const ENV_SIDECAR_BIN: &str = "CATALOG_CACHE_BIN";
/// What the harness allows on top of the sidecar's own promise when it
/// times one read from the client side: the HTTP exchange over loopback and
/// the scheduling of the reader task. The promise itself (the revalidate
/// budget) is not widened.
pub const READ_MARGIN: Duration = Duration::from_millis(150);
/// What the harness allows for its own scheduling when it times breaker and
/// recovery events on a loaded 2-core machine: the monitor samples `/status`
/// every 50 ms, the readers and the demo catalog share the cores with the
/// sidecar (a debug build in CI), and a `cargo build` may run beside it.
pub const SCHEDULING_MARGIN: Duration = Duration::from_millis(1500);
/// The pause each reader takes between two reads.
pub const READER_PAUSE: Duration = Duration::from_millis(4);
/// How often the monitor samples `/status`.
pub const MONITOR_PERIOD: Duration = Duration::from_millis(50);

/// Why a run could not be carried out (as opposed to a scenario failing).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The `catalog-cache` binary was not found.
    #[error("cannot find the catalog-cache binary (tried {0}); build it with `cargo build --bin catalog-cache` or pass --sidecar PATH")]
    NoSidecar(String),
    /// A child process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which process.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Something did not happen in time.
    #[error("{0}")]
    Timeout(String),
    /// An HTTP exchange with the demo catalog or the sidecar failed.
    #[error("{0}")]
    Http(String),
    /// A temporary directory could not be made.
    #[error("cannot create a data directory: {0}")]
    TempDir(std::io::Error),
}

/// Finds the sidecar binary: `--sidecar`, then `CATALOG_CACHE_BIN`, then
/// `catalog-cache` next to this executable (or one directory up, for test
/// binaries in `deps/`).
pub fn find_sidecar(explicit: Option<&Path>) -> Result<PathBuf, HarnessError> {
    // Absolute, because each sidecar runs in its own data directory and a
    // relative path would be resolved from there.
    let given = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(ENV_SIDECAR_BIN).map(PathBuf::from));
    if let Some(p) = given {
        // A path that does not resolve is kept as given: starting it fails
        // later with the OS's own message.
        return Ok(std::fs::canonicalize(&p).unwrap_or(p));
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let candidate = d.join("catalog-cache");
            if candidate.is_file() {
                return Ok(candidate);
            }
            tried.push(candidate.display().to_string());
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    Err(HarnessError::NoSidecar(tried.join(", ")))
}

/// A child process that is SIGKILLed (by its PID) and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    /// Starts `cmd`; stdout and stderr go to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc, HarnessError> {
        let spawn_err = |source| HarnessError::Spawn {
            what: name.to_string(),
            source,
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(spawn_err)?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
        })
    }

    /// The PID, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it has exited by itself.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// SIGKILL and reap (idempotent).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `Child::kill` is SIGKILL on Unix: no chance to clean up, which
            // is the point of the kill scenarios.
            let _ = c.kill();
            let _ = c.wait();
            tracing::debug!(name = %self.name, pid = c.id(), "killed");
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16, HarnessError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| HarnessError::Http(format!("cannot find a free port: {e}")))
}

/// The harness's HTTP client: 5 s per exchange, 1 s to connect, keep-alive.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(1))
        .pool_max_idle_per_host(32)
        .build()
        .unwrap_or_default()
}

/// The sidecar settings a scenario runs with. Every timing bound a
/// scenario checks is derived from these (see [`Timings::open_bound`] and
/// friends), never written as a constant of its own; a weakening's bad
/// setting is applied on top and does not move the bounds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Timings {
    /// `mirror.sync_interval`.
    pub sync_interval: Duration,
    /// `mirror.sync_jitter`.
    pub sync_jitter: f64,
    /// `freshness.fresh_for`.
    pub fresh_for: Duration,
    /// `freshness.revalidate_budget`: the sidecar's promise for one read.
    pub budget: Duration,
    /// `freshness.negative_ttl`.
    pub negative_ttl: Duration,
    /// `upstream.timeout`.
    pub upstream_timeout: Duration,
    /// `breaker.consecutive_failures`.
    pub consecutive_failures: u32,
    /// `breaker.open_for`.
    pub open_for: Duration,
    /// `breaker.max_open`.
    pub max_open: Duration,
    /// The breaker's jitter on each open period (the sidecar's built-in ±10 %).
    pub breaker_jitter: f64,
}

impl Timings {
    /// The common settings: short, so that a fault's consequences show
    /// within seconds.
    pub const BASE: Timings = Timings {
        sync_interval: Duration::from_secs(1),
        sync_jitter: 0.1,
        fresh_for: Duration::from_secs(2),
        budget: Duration::from_millis(250),
        negative_ttl: Duration::from_secs(1),
        upstream_timeout: Duration::from_secs(2),
        consecutive_failures: 5,
        open_for: Duration::from_millis(500),
        max_open: Duration::from_secs(2),
        breaker_jitter: 0.1,
    };

    /// The `CATALOG_CACHE_*` variables that set these.
    pub fn env(&self) -> Vec<(String, String)> {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        [
            ("CATALOG_CACHE_MIRROR_SYNC_INTERVAL", ms(self.sync_interval)),
            (
                "CATALOG_CACHE_MIRROR_SYNC_JITTER",
                self.sync_jitter.to_string(),
            ),
            ("CATALOG_CACHE_FRESHNESS_FRESH_FOR", ms(self.fresh_for)),
            ("CATALOG_CACHE_FRESHNESS_REVALIDATE_BUDGET", ms(self.budget)),
            (
                "CATALOG_CACHE_FRESHNESS_NEGATIVE_TTL",
                ms(self.negative_ttl),
            ),
            ("CATALOG_CACHE_UPSTREAM_TIMEOUT", ms(self.upstream_timeout)),
            (
                "CATALOG_CACHE_BREAKER_CONSECUTIVE_FAILURES",
                self.consecutive_failures.to_string(),
            ),
            ("CATALOG_CACHE_BREAKER_OPEN_FOR", ms(self.open_for)),
            ("CATALOG_CACHE_BREAKER_MAX_OPEN", ms(self.max_open)),
            // Id-walks page like full walks (500 a page), so that every
            // sync reads several pages whichever way it walks.
            ("CATALOG_CACHE_MIRROR_ID_PAGE_SIZE", "500".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Longest acceptable read: the revalidate budget (the sidecar's
    /// promise) plus [`READ_MARGIN`] for measuring it from the client.
    pub fn read_bound(&self) -> Bound {
        Bound {
            limit: self.budget + READ_MARGIN,
            why: format!(
                "revalidate budget {} + client margin {}",
                ms(self.budget),
                ms(READ_MARGIN)
            ),
        }
    }

    /// Longest time from a fault to the breaker leaving `closed`.
    ///
    /// The mirror's data was last confirmed at the fault at the latest (a
    /// sync in flight then may still apply, which takes `sync_took`), so it
    /// turns stale `fresh_for` later. From then on every read revalidates;
    /// each revalidation fails at once or after `upstream.timeout`
    /// (`failing`), and `clients` readers start one each per budget plus
    /// pause, so `consecutive_failures` of them are under way within
    /// `ceil(consecutive_failures / clients)` such rounds. Every answer
    /// must fail for this to hold: the fault scenarios choose their faults
    /// so (see `slow_body_fault`).
    pub fn open_bound(&self, failing: Failing, clients: usize, sync_took: Duration) -> Bound {
        let fail = match failing {
            Failing::AtOnce => Duration::ZERO,
            Failing::AtTimeout => self.upstream_timeout,
        };
        let rounds = self.consecutive_failures.div_ceil(clients.max(1) as u32);
        let calls = (self.budget + READER_PAUSE) * rounds;
        Bound {
            limit: self.fresh_for + sync_took + fail + calls + SCHEDULING_MARGIN,
            why: format!(
                "fresh_for {} + last sync {} + {} + {rounds} read round(s) {} + margin {}",
                ms(self.fresh_for),
                ms(sync_took),
                match failing {
                    Failing::AtOnce => "failures at once".to_string(),
                    Failing::AtTimeout => format!("upstream.timeout {}", ms(fail)),
                },
                ms(calls),
                ms(SCHEDULING_MARGIN)
            ),
        }
    }

    /// Longest time from the fault's end (or an operator's all-clear) to
    /// the breaker `closed` with a successful sync newer than the fault.
    ///
    /// The breaker may have opened just before for its longest period
    /// (`max_open` plus jitter), and a call in flight when the fault ended
    /// may run to `upstream.timeout`; whichever is longer, the sync loop's
    /// next attempt (its failure backoff is capped at `sync_interval`, plus
    /// jitter) is the half-open probe, and that sync takes `sync_took`.
    pub fn recover_bound(&self, sync_took: Duration) -> Bound {
        let open = self.max_open.mul_f64(1.0 + self.breaker_jitter);
        let wait = open.max(self.upstream_timeout);
        let next = self.sync_interval.mul_f64(1.0 + self.sync_jitter);
        Bound {
            limit: wait + next + sync_took + SCHEDULING_MARGIN,
            why: format!(
                "max(max_open {} + jitter, upstream.timeout {}) + sync_interval {} + jitter + sync {} + margin {}",
                ms(self.max_open),
                ms(self.upstream_timeout),
                ms(self.sync_interval),
                ms(sync_took),
                ms(SCHEDULING_MARGIN)
            ),
        }
    }

    /// How soon after an upstream empties its catalog the sidecar can know:
    /// a sync that began before the fault finishes with the old catalog
    /// (`sync_took`), the next one starts within `sync_interval` plus
    /// jitter (sooner when a read's 404 asks for it) and takes `sync_took`
    /// to see the empty catalog and hold it.
    pub fn notice_bound(&self, sync_took: Duration) -> Bound {
        let next = self.sync_interval.mul_f64(1.0 + self.sync_jitter);
        Bound {
            limit: sync_took + next + sync_took + SCHEDULING_MARGIN,
            why: format!(
                "sync {} + sync_interval {} + jitter + sync {} + margin {}",
                ms(sync_took),
                ms(self.sync_interval),
                ms(sync_took),
                ms(SCHEDULING_MARGIN)
            ),
        }
    }

    /// A slow-body fault under which every answer the sidecar can ask for,
    /// down to a 227-byte 404, takes longer than `upstream.timeout`: 16
    /// bytes per chunk, chunks spaced so that 200 bytes already take 1.5
    /// times the timeout. (Faster trickles let small entities through
    /// within the timeout, and those successes keep resetting the
    /// breaker's consecutive-failure count.)
    pub fn slow_body_fault(&self) -> serde_json::Value {
        let chunks_in_200_bytes = 200 / 16;
        let interval = self.upstream_timeout.mul_f64(1.5) / chunks_in_200_bytes;
        json!({"slow_body": {"bytes": 16, "interval_ms": interval.as_millis() as u64}})
    }
}

/// How the upstream fails under a fault, which decides how soon the
/// breaker can open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failing {
    /// Every call fails as soon as it is made (refused, 429, bad answers).
    AtOnce,
    /// Every call fails when `upstream.timeout` runs out.
    AtTimeout,
}

/// A timing bound and how it was derived from the scenario's settings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Bound {
    /// The bound.
    pub limit: Duration,
    /// Its derivation, in words.
    pub why: String,
}

impl Bound {
    /// `4.4s (fresh_for 2s + ...)`.
    pub fn describe(&self) -> String {
        format!("{:.1}s ({})", self.limit.as_secs_f64(), self.why)
    }
}

fn ms(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Sizes of one run.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Quick (CI) mode.
    pub quick: bool,
    /// Entities in the demo catalog for fault scenarios.
    pub entities: usize,
    /// Entities for the kill-during-sync scenario.
    pub kill_entities: usize,
    /// Sidecar kills in the kill-during-sync scenario.
    pub kills: usize,
    /// Concurrent readers.
    pub clients: usize,
    /// Generator seed (the demo catalog, the readers, the kill moments).
    pub seed: u64,
}

impl Tuning {
    /// The quick (CI) or full sizes.
    pub fn new(quick: bool, seed: u64) -> Tuning {
        if quick {
            Tuning {
                quick,
                entities: 2000,
                kill_entities: 5000,
                kills: 10,
                clients: 4,
                seed,
            }
        } else {
            Tuning {
                quick,
                entities: 5000,
                kill_entities: 20_000,
                kills: 100,
                clients: 8,
                seed,
            }
        }
    }
}

/// The sidecar's environment for a scenario: its [`Timings`] and the
/// admin token.
pub fn base_env(dir: &Path, timings: &Timings) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("CATALOG_CACHE_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        (
            "CATALOG_CACHE_ADMIN_TOKEN_FILE",
            dir.join("admin.token").display().to_string(),
        ),
        ("CATALOG_CACHE_LOG_LEVEL", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    env.extend(timings.env());
    env
}

/// The demo catalog as a child process.
pub struct Upstream {
    /// The process (`None` while killed).
    pub proc: Option<Proc>,
    /// Catalog listener.
    pub listen: String,
    /// Control listener.
    pub control: String,
    entities: usize,
    seed: u64,
    log: PathBuf,
    /// Prefix command (e.g. `ip netns exec NS`), empty for none.
    wrapper: Vec<String>,
    http: reqwest::Client,
}

impl Upstream {
    /// Starts a demo catalog on the given listeners and waits until its
    /// control API answers.
    pub async fn start(
        listen: String,
        control: String,
        entities: usize,
        seed: u64,
        log: PathBuf,
        wrapper: Vec<String>,
    ) -> Result<Upstream, HarnessError> {
        let mut up = Upstream {
            proc: None,
            listen,
            control,
            entities,
            seed,
            log,
            wrapper,
            http: http_client(),
        };
        up.restart().await?;
        Ok(up)
    }

    /// The upstream URL the sidecar is given.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.listen, catalog_fake::fake::MOUNT)
    }

    /// SIGKILLs the process: an outage.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the process again on the same ports (same seed, same entities).
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill();
        let exe = std::env::current_exe().map_err(|source| HarnessError::Spawn {
            what: "catalog-chaos fake-catalog".into(),
            source,
        })?;
        let mut args: Vec<String> = self.wrapper.clone();
        args.push(exe.display().to_string());
        args.extend([
            "fake-catalog".into(),
            "--listen".into(),
            self.listen.clone(),
            "--control".into(),
            self.control.clone(),
            "--entities".into(),
            self.entities.to_string(),
            "--seed".into(),
            self.seed.to_string(),
        ]);
        let mut cmd = Command::new(&args[0]);
        cmd.args(&args[1..]).env("RUST_LOG", "warn");
        self.proc = Some(Proc::spawn("fake-catalog", cmd, &self.log)?);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .http
                .get(self.control_url("/faults"))
                .send()
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline || self.proc.as_mut().is_some_and(Proc::exited) {
                return Err(HarnessError::Timeout(format!(
                    "the demo catalog did not start on {} (log: {})",
                    self.control,
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn control_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.control)
    }

    async fn control(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, HarnessError> {
        // The demo catalog's own edits can take seconds on a large catalog.
        let mut req = self
            .http
            .request(method, self.control_url(path))
            .timeout(Duration::from_secs(60));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| HarnessError::Http(format!("control {path}: {e}")))?;
        if !resp.status().is_success() {
            return Err(HarnessError::Http(format!(
                "control {path}: {}",
                resp.status()
            )));
        }
        Ok(resp.json().await.unwrap_or(Value::Null))
    }

    /// `PUT /faults` (replaces the fault set).
    pub async fn set_faults(&self, faults: Value) -> Result<(), HarnessError> {
        self.control(reqwest::Method::PUT, "/faults", Some(faults))
            .await
            .map(drop)
    }

    /// `DELETE /faults`.
    pub async fn clear_faults(&self) -> Result<(), HarnessError> {
        self.control(reqwest::Method::DELETE, "/faults", None)
            .await
            .map(drop)
    }

    /// `GET /stats`: the request counts by route, `unrouted` with
    /// `unrouted_paths`, and `peak_in_flight`.
    pub async fn stats(&self) -> Result<Value, HarnessError> {
        self.control(reqwest::Method::GET, "/stats", None).await
    }

    /// `POST /stats/reset`.
    pub async fn reset_stats(&self) -> Result<(), HarnessError> {
        self.control(reqwest::Method::POST, "/stats/reset", None)
            .await
            .map(drop)
    }

    /// Requests that reached the catalog port so far.
    pub async fn requests(&self) -> Result<u64, HarnessError> {
        let v = self.control(reqwest::Method::GET, "/stats", None).await?;
        Ok(v["total"].as_u64().unwrap_or(0))
    }

    /// Adds entities (`POST /entities` on the control API; an existing
    /// ref is replaced).
    pub async fn add_entities(&self, entities: Vec<Value>) -> Result<(), HarnessError> {
        self.control(
            reqwest::Method::POST,
            "/entities",
            Some(Value::Array(entities)),
        )
        .await
        .map(drop)
    }

    /// Edits `count` random entities (new etags).
    pub async fn mutate(&self, count: usize) -> Result<(), HarnessError> {
        self.control(
            reqwest::Method::POST,
            "/mutate",
            Some(json!({ "count": count })),
        )
        .await
        .map(drop)
    }

    /// The fingerprint ([`fingerprint`]) of every entity's uid and etag,
    /// read directly from the demo catalog: one value per catalog state.
    pub async fn fingerprint(&self) -> Result<u64, HarnessError> {
        let url = format!(
            "{}/entities/by-query?fields=metadata.uid,metadata.etag&limit={}",
            self.url(),
            self.entities + 1
        );
        let v: Value = self
            .http
            .get(url)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| HarnessError::Http(format!("etag list: {e}")))?
            .json()
            .await
            .map_err(|e| HarnessError::Http(format!("etag list: {e}")))?;
        let pairs: Vec<(String, String)> = v["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|e| {
                        Some((
                            e["metadata"]["uid"].as_str()?.to_string(),
                            e["metadata"]["etag"].as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(fingerprint(pairs))
    }

    /// Edits `count` random entities in one step (`POST /churn`): a single
    /// new catalog state, however many entities, and quick on a large
    /// catalog where `mutate` edits one entity at a time.
    pub async fn edit_at_once(&self, count: usize) -> Result<(), HarnessError> {
        self.control(
            reqwest::Method::POST,
            "/churn",
            Some(json!({ "change": count })),
        )
        .await
        .map(drop)
    }

    /// One churn step (`POST /churn`): `change` entities get new etags,
    /// `add` are added and `delete` deleted, as one new catalog state.
    /// Returns the uids deleted.
    pub async fn churn(
        &self,
        change: usize,
        add: usize,
        delete: usize,
    ) -> Result<Vec<String>, HarnessError> {
        let v = self
            .control(
                reqwest::Method::POST,
                "/churn",
                Some(json!({ "change": change, "add": add, "delete": delete })),
            )
            .await?;
        Ok(v["deleted"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|u| u.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Every entity's identity, read directly from the demo catalog.
    pub async fn targets(&self) -> Result<Vec<Target>, HarnessError> {
        let url = format!(
            "{}/entities/by-query?fields=kind,metadata.name,metadata.namespace,metadata.uid&limit={}",
            self.url(),
            self.entities + 1
        );
        let v: Value = self
            .http
            .get(url)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| HarnessError::Http(format!("entity list: {e}")))?
            .json()
            .await
            .map_err(|e| HarnessError::Http(format!("entity list: {e}")))?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        let targets: Vec<Target> = items
            .iter()
            .filter_map(|e| {
                Some(Target {
                    kind: e["kind"].as_str()?.to_string(),
                    namespace: e["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or("default")
                        .to_string(),
                    name: e["metadata"]["name"].as_str()?.to_string(),
                    uid: e["metadata"]["uid"].as_str()?.to_string(),
                })
            })
            .collect();
        if targets.is_empty() {
            return Err(HarnessError::Http(
                "the demo catalog listed no entities".into(),
            ));
        }
        Ok(targets)
    }
}

/// The real sidecar binary as a child process.
pub struct SidecarProc {
    /// The process (`None` while killed).
    pub proc: Option<Proc>,
    bin: PathBuf,
    /// Its data dir.
    pub dir: PathBuf,
    /// Proxy listener.
    pub proxy: String,
    /// Admin listener.
    pub admin: String,
    upstream_url: String,
    env: Vec<(String, String)>,
    http: reqwest::Client,
    /// The mirror file (`mirror.path`).
    mirror: PathBuf,
    /// The umask the process starts with (through `sh -c 'umask …; exec'`),
    /// `None` to inherit this process's.
    umask: Option<u32>,
}

impl SidecarProc {
    /// The mirror file.
    pub fn db(&self) -> PathBuf {
        self.mirror.clone()
    }

    /// The PID, while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// Whether the process has exited by itself (or was never started).
    pub fn exited(&mut self) -> bool {
        self.proc.as_mut().is_none_or(Proc::exited)
    }

    /// Sets (or replaces) one environment variable for the next start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Its log file.
    pub fn log(&self) -> PathBuf {
        self.dir.join("sidecar.log")
    }

    /// Proxy base URL, `http://ADDR/api/catalog`.
    pub fn catalog_url(&self) -> String {
        format!("http://{}/api/catalog", self.proxy)
    }

    /// Starts (or restarts) the process on the same ports and data dir.
    pub fn start(&mut self) -> Result<(), HarnessError> {
        self.kill();
        let mut cmd = match self.umask {
            // `exec` keeps the PID: the process watched is the sidecar.
            Some(mask) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("umask {mask:03o} && exec \"$0\" \"$@\""))
                    .arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.current_dir(&self.dir)
            .args(["serve", "--upstream", &self.upstream_url])
            .args(["--listen-proxy", &self.proxy, "--listen-admin", &self.admin])
            .arg("--mirror")
            .arg(self.db());
        // The sidecar refuses unknown CATALOG_CACHE_* variables, and the
        // scenario, not the caller's shell, decides its configuration.
        for (k, _) in std::env::vars() {
            if k.starts_with("CATALOG_CACHE_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.proc = Some(Proc::spawn("catalog-cache", cmd, &self.log())?);
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// `GET /status`.
    pub async fn status(&self) -> Result<Value, HarnessError> {
        self.http
            .get(self.admin_url("/status"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_err(|e| HarnessError::Http(format!("status: {e}")))?
            .json()
            .await
            .map_err(|e| HarnessError::Http(format!("status: {e}")))
    }

    /// `GET /readyz` status code (0 when it does not answer).
    pub async fn readyz(&self) -> u16 {
        match self
            .http
            .get(self.admin_url("/readyz"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// An authorized admin mutation; returns the status code.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<u16, HarnessError> {
        let r = self
            .http
            .request(method, self.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .timeout(Duration::from_secs(30))
            .json(&body)
            .send()
            .await
            .map_err(|e| HarnessError::Http(format!("{path}: {e}")))?;
        Ok(r.status().as_u16())
    }

    /// Waits until `/readyz` answers 200 and the mirror holds `entities`.
    pub async fn wait_ready(
        &self,
        entities: usize,
        within: Duration,
    ) -> Result<Duration, HarnessError> {
        let started = Instant::now();
        let deadline = started + within;
        loop {
            if self.readyz().await == 200 {
                if let Ok(s) = self.status().await {
                    if s["mirror"]["entities"].as_u64() == Some(entities as u64) {
                        return Ok(started.elapsed());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(format!(
                    "the sidecar was not ready with {entities} entities within {within:?} (log: {})",
                    self.log().display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One scenario's processes and data dir. Dropping it kills both
/// processes and removes the dir (kept when `keep` is set, for a FAIL).
pub struct Lab {
    /// The demo catalog.
    pub upstream: Upstream,
    /// The sidecar.
    pub sidecar: SidecarProc,
    /// Every entity's identity.
    pub targets: Arc<Vec<Target>>,
    /// Entities in the catalog.
    pub entities: usize,
    /// The settings the sidecar runs with (before any weakening).
    pub timings: Timings,
    /// How long the first sync took (the `sync` term of the bounds), at
    /// least [`MIN_SYNC_ALLOWANCE`].
    pub sync_took: Duration,
    /// The fault proxy between the sidecar and the demo catalog, when
    /// [`LabOptions::fault_proxy`] asked for one.
    pub net: Option<FaultProxy>,
    dir: Option<tempfile::TempDir>,
}

/// The least a sync is assumed to take in a bound, however fast the first
/// one was (later syncs run beside the readers).
pub const MIN_SYNC_ALLOWANCE: Duration = Duration::from_millis(200);

/// How a [`Lab`] is started: [`Lab::start`]'s arguments, and what only
/// some runs change (where the demo catalog runs, where the mirror lives,
/// the sidecar's umask).
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Entities in the demo catalog.
    pub entities: usize,
    /// Generator seed.
    pub seed: u64,
    /// The sidecar's settings.
    pub timings: Timings,
    /// `CATALOG_CACHE_*` variables on top of [`base_env`] (later ones win).
    pub extra_env: Vec<(String, String)>,
    /// The demo catalog's listen and control addresses and a wrapper
    /// command, instead of free loopback ports.
    pub upstream_at: Option<(String, String, Vec<String>)>,
    /// The mirror file relative to the lab's data dir (default
    /// `catalog-cache.db`); a path in a subdirectory that does not exist
    /// yet makes the sidecar create that directory.
    pub mirror: Option<PathBuf>,
    /// The sidecar's umask (e.g. `0o022`); `None` inherits this process's.
    pub umask: Option<u32>,
    /// Put a [`FaultProxy`] (seeded with `seed`) between the sidecar and
    /// the demo catalog: the sidecar's upstream URL names the proxy.
    pub fault_proxy: bool,
}

impl LabOptions {
    /// A lab of `entities` with `timings`, nothing else changed.
    pub fn new(entities: usize, seed: u64, timings: Timings) -> LabOptions {
        LabOptions {
            entities,
            seed,
            timings,
            extra_env: Vec::new(),
            upstream_at: None,
            mirror: None,
            umask: None,
            fault_proxy: false,
        }
    }
}

impl Lab {
    /// Starts a demo catalog with `entities` and a sidecar in front of it
    /// with `timings` and then `extra_env` (a weakening) on top of
    /// [`base_env`], and waits for the first sync.
    pub async fn start(
        bin: &Path,
        entities: usize,
        seed: u64,
        timings: &Timings,
        extra_env: &[(String, String)],
    ) -> Result<Lab, HarnessError> {
        Self::start_with(bin, entities, seed, timings, extra_env, None).await
    }

    /// Like `start`, with the demo catalog at `upstream_at` (listen, control
    /// and a wrapper command) instead of free loopback ports.
    pub async fn start_with(
        bin: &Path,
        entities: usize,
        seed: u64,
        timings: &Timings,
        extra_env: &[(String, String)],
        upstream_at: Option<(String, String, Vec<String>)>,
    ) -> Result<Lab, HarnessError> {
        let mut options = LabOptions::new(entities, seed, *timings);
        options.extra_env = extra_env.to_vec();
        options.upstream_at = upstream_at;
        Self::start_opts(bin, options).await
    }

    /// Starts a lab as `options` say, and waits for the first sync.
    pub async fn start_opts(bin: &Path, options: LabOptions) -> Result<Lab, HarnessError> {
        let LabOptions {
            entities,
            seed,
            timings,
            extra_env,
            upstream_at,
            mirror,
            umask,
            fault_proxy,
        } = options;
        let timings = &timings;
        let dir = tempfile::Builder::new()
            .prefix("catalog-chaos-")
            .tempdir()
            .map_err(HarnessError::TempDir)?;
        let path = dir.path().to_path_buf();
        let (listen, control, wrapper) = match upstream_at {
            Some(at) => at,
            None => (
                format!("127.0.0.1:{}", free_port()?),
                format!("127.0.0.1:{}", free_port()?),
                Vec::new(),
            ),
        };
        let upstream = Upstream::start(
            listen,
            control,
            entities,
            seed,
            path.join("fake.log"),
            wrapper,
        )
        .await?;
        // The proxy connects upstream per connection, so it may start
        // before the demo catalog is up; the sidecar is given its address.
        let net =
            if fault_proxy {
                let to: std::net::SocketAddr = upstream.listen.parse().map_err(|e| {
                    HarnessError::Http(format!("demo catalog address {}: {e}", upstream.listen))
                })?;
                let any: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
                Some(FaultProxy::start(any, to, seed).await.map_err(|e| {
                    HarnessError::Http(format!("cannot start the fault proxy: {e}"))
                })?)
            } else {
                None
            };
        let upstream_url = match &net {
            Some(p) => format!("http://{}{}", p.addr(), catalog_fake::fake::MOUNT),
            None => upstream.url(),
        };
        let mut env = base_env(&path, timings);
        env.extend(extra_env.iter().cloned());
        let mut sidecar = SidecarProc {
            proc: None,
            bin: bin.to_path_buf(),
            mirror: path.join(mirror.unwrap_or_else(|| PathBuf::from("catalog-cache.db"))),
            umask,
            dir: path,
            proxy: format!("127.0.0.1:{}", free_port()?),
            admin: format!("127.0.0.1:{}", free_port()?),
            upstream_url,
            env,
            http: http_client(),
        };
        sidecar.start()?;
        let targets = Arc::new(upstream.targets().await?);
        sidecar
            .wait_ready(targets.len(), Duration::from_secs(90))
            .await?;
        let first_sync = sidecar.status().await?["last_sync"]["duration_seconds"]
            .as_f64()
            .unwrap_or(0.0);
        Ok(Lab {
            entities: targets.len(),
            upstream,
            sidecar,
            targets,
            timings: *timings,
            sync_took: Duration::from_secs_f64(first_sync).max(MIN_SYNC_ALLOWANCE),
            net,
            dir: Some(dir),
        })
    }

    /// Keeps the data dir (logs, database) after the run; returns its path.
    pub fn keep(&mut self) -> Option<PathBuf> {
        self.dir.take().map(|d| d.keep())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.sidecar.kill();
        self.upstream.kill();
    }
}

/// One entity the readers may ask for.
#[derive(Debug, Clone)]
pub struct Target {
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: String,
}

impl Target {
    /// `kind:namespace/name`, lower-cased, as by-refs matches it.
    pub fn lower_ref(&self) -> String {
        format!("{}:{}/{}", self.kind, self.namespace, self.name).to_lowercase()
    }
}

/// Which kind of entity read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOp {
    /// `GET /entities/by-name/...`.
    ByName,
    /// `GET /entities/by-uid/...`.
    ByUid,
    /// `POST /entities/by-refs` with three refs.
    ByRefs,
}

/// One read as a client saw it.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Start, since the scenario's origin.
    pub at: Duration,
    /// How long it took.
    pub latency: Duration,
    /// What was asked.
    pub op: ReadOp,
    /// HTTP status, 0 for a transport error.
    pub status: u16,
    /// `X-Catalog-Stale` as sent (`None` when missing).
    pub stale: Option<bool>,
    /// Whether `X-Catalog-Stale` and `Cache-Status` agree (`ttl=-` exactly
    /// when stale).
    pub marked_ok: bool,
    /// Whether the body held the entities asked for.
    pub body_ok: bool,
    /// A well-formed answer saying the entity does not exist (404, or
    /// by-refs with `null` items).
    pub absent: bool,
    /// The `Age` header, in seconds.
    pub age: Option<u64>,
}

impl Sample {
    /// A good answer: 200 with the right entities.
    pub fn ok(&self) -> bool {
        self.status == 200 && self.body_ok
    }

    /// When it finished, since the scenario's origin.
    pub fn end(&self) -> Duration {
        self.at + self.latency
    }
}

/// Concurrent readers of random mirrored entities.
pub struct Load {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<Vec<Sample>>>,
}

impl Load {
    /// Starts `clients` readers against `catalog_url` (the sidecar's proxy).
    pub fn start(
        catalog_url: String,
        targets: Arc<Vec<Target>>,
        clients: usize,
        origin: Instant,
        seed: u64,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let http = http_client();
        let handles = (0..clients)
            .map(|n| {
                let (stop, http, targets, base) = (
                    stop.clone(),
                    http.clone(),
                    targets.clone(),
                    catalog_url.clone(),
                );
                tokio::spawn(async move {
                    let mut rng =
                        StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(n as u64));
                    let mut samples = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        samples.push(read_once(&http, &base, &targets, &mut rng, origin).await);
                        tokio::time::sleep(READER_PAUSE).await;
                    }
                    samples
                })
            })
            .collect();
        Load { stop, handles }
    }

    /// Stops the readers and returns every sample, in start order.
    pub async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for h in self.handles {
            if let Ok(s) = h.await {
                all.extend(s);
            }
        }
        all.sort_by_key(|s| s.at);
        all
    }
}

/// Percent-encodes one path segment (RFC 3986 unreserved characters stay).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn uid_of(v: &Value) -> Option<&str> {
    v["metadata"]["uid"].as_str()
}

async fn read_once(
    http: &reqwest::Client,
    base: &str,
    targets: &[Target],
    rng: &mut StdRng,
    origin: Instant,
) -> Sample {
    let pick = |rng: &mut StdRng| &targets[rng.random_range(0..targets.len())];
    let roll = rng.random_range(0..10);
    let (op, request, expect): (ReadOp, reqwest::RequestBuilder, Vec<String>) = if roll < 6 {
        let t = pick(rng);
        let url = format!(
            "{base}/entities/by-name/{}/{}/{}",
            encode_segment(&t.kind),
            encode_segment(&t.namespace),
            encode_segment(&t.name)
        );
        (ReadOp::ByName, http.get(url), vec![t.uid.clone()])
    } else if roll < 8 {
        let t = pick(rng);
        let url = format!("{base}/entities/by-uid/{}", encode_segment(&t.uid));
        (ReadOp::ByUid, http.get(url), vec![t.uid.clone()])
    } else {
        let picked: Vec<&Target> = (0..3).map(|_| pick(rng)).collect();
        let refs: Vec<String> = picked.iter().map(|t| t.lower_ref()).collect();
        let req = http
            .post(format!("{base}/entities/by-refs"))
            .json(&json!({ "entityRefs": refs }));
        (
            ReadOp::ByRefs,
            req,
            picked.iter().map(|t| t.uid.clone()).collect(),
        )
    };
    let at = origin.elapsed();
    let started = Instant::now();
    let result = request.send().await;
    let (status, stale, marked_ok, body_ok, absent, age) = match result {
        Err(_) => (0, None, true, false, false, None),
        Ok(resp) => {
            let status = resp.status().as_u16();
            let header = |n: &str| {
                resp.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let stale = header("x-catalog-stale").and_then(|v| match v.as_str() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            });
            let ttl_negative = header("cache-status").is_some_and(|c| c.contains("ttl=-"));
            let age = header("age").and_then(|a| a.trim().parse::<u64>().ok());
            let marked_ok = stale == Some(ttl_negative);
            let body = resp
                .bytes()
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .unwrap_or(Value::Null);
            let items = body["items"].as_array();
            let body_ok = status == 200
                && match op {
                    ReadOp::ByRefs => items.is_some_and(|items| {
                        items.len() == expect.len()
                            && items.iter().zip(&expect).all(|(i, u)| uid_of(i) == Some(u))
                    }),
                    _ => uid_of(&body) == Some(&expect[0]),
                };
            let absent = match op {
                ReadOp::ByRefs => {
                    status == 200
                        && items.is_some_and(|items| {
                            items.len() == expect.len()
                                && items
                                    .iter()
                                    .zip(&expect)
                                    .all(|(i, u)| i.is_null() || uid_of(i) == Some(u))
                        })
                        && !body_ok
                }
                _ => status == 404,
            };
            (status, stale, marked_ok, body_ok, absent, age)
        }
    };
    Sample {
        at,
        latency: started.elapsed(),
        op,
        status,
        stale,
        marked_ok,
        body_ok,
        absent,
        age,
    }
}

/// One `/status` observation.
#[derive(Debug, Clone)]
pub struct StatusSample {
    /// When, since the scenario's origin.
    pub at: Duration,
    /// `breaker.state`.
    pub breaker: String,
    /// `breaker.mode`.
    pub mode: String,
    /// `mirror.entities`.
    pub entities: Option<u64>,
    /// `mirror.generation`.
    pub generation: Option<u64>,
    /// Whether deletions are held.
    pub held: bool,
    /// `last_sync.at` and `last_sync.result`.
    pub last_sync: Option<(String, String)>,
}

/// When `/status` gave no JSON answer, and what it gave instead.
pub type Unanswered = (Duration, String);

/// Samples the sidecar's `/status` every 50 ms (or a period of its own)
/// until stopped; also keeps every sample that got no JSON answer.
pub struct Monitor {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Vec<StatusSample>, Vec<Unanswered>)>,
}

impl Monitor {
    /// Starts sampling every [`MONITOR_PERIOD`].
    pub fn start(admin: String, origin: Instant) -> Monitor {
        Monitor::start_every(admin, origin, MONITOR_PERIOD)
    }

    /// Starts sampling every `period`.
    pub fn start_every(admin: String, origin: Instant, period: Duration) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let http = http_client();
        let handle = tokio::spawn(async move {
            let mut out = Vec::new();
            let mut unanswered = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let at = origin.elapsed();
                let got = http
                    .get(format!("http://{admin}/status"))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await;
                match got {
                    Ok(resp) => {
                        let code = resp.status().as_u16();
                        match resp.json::<Value>().await {
                            Ok(v) if code == 200 => out.push(status_sample(at, &v)),
                            Ok(v) => unanswered.push((
                                at,
                                format!(
                                    "{code} {}",
                                    v["error"]["message"].as_str().unwrap_or("(no message)")
                                ),
                            )),
                            Err(e) => unanswered
                                .push((at, format!("{code}, not JSON: {}", client_error(e)))),
                        }
                    }
                    Err(e) => unanswered.push((at, format!("no answer: {}", client_error(e)))),
                }
                tokio::time::sleep(period).await;
            }
            (out, unanswered)
        });
        Monitor { stop, handle }
    }

    /// Stops and returns the samples.
    pub async fn stop(self) -> Vec<StatusSample> {
        self.stop_with_errors().await.0
    }

    /// Stops and returns the samples and the times `/status` gave no
    /// JSON answer (with what it gave instead).
    pub async fn stop_with_errors(self) -> (Vec<StatusSample>, Vec<Unanswered>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.unwrap_or_default()
    }
}

/// Reads the fields the scenarios check from a `/status` body.
pub fn status_sample(at: Duration, v: &Value) -> StatusSample {
    StatusSample {
        at,
        breaker: v["breaker"]["state"].as_str().unwrap_or("?").to_string(),
        mode: v["breaker"]["mode"].as_str().unwrap_or("?").to_string(),
        entities: v["mirror"]["entities"].as_u64(),
        generation: v["mirror"]["generation"].as_u64(),
        held: !v["held_deletions"].is_null(),
        last_sync: v["last_sync"]["at"].as_str().map(|at| {
            (
                at.to_string(),
                v["last_sync"]["result"].as_str().unwrap_or("?").to_string(),
            )
        }),
    }
}

/// PASS, FAIL or SKIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every invariant held.
    Pass,
    /// An invariant broke.
    Fail,
    /// The machine cannot run it (said why).
    Skip,
}

impl Verdict {
    /// `PASS`, `FAIL` or `SKIP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Skip => "SKIP",
        }
    }
}

/// One row of the final table.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Scenario name.
    pub name: String,
    /// What made the fault: `demo catalog` (its control API), `kill -9`,
    /// `admin API`, `kernel link-down`, `kernel tbf`, `netem` or
    /// `fault-proxy`; `-` when nothing ran.
    pub mechanism: String,
    /// Reads made.
    pub reads: usize,
    /// Reads that broke the scenario's read invariant.
    pub failed: usize,
    /// Answers marked stale.
    pub stale: usize,
    /// Slowest read.
    pub worst: Duration,
    /// From the fault to the breaker leaving `closed`.
    pub opened_after: Option<Duration>,
    /// From the end of the fault to the breaker closed and a good sync.
    pub recovered_after: Option<Duration>,
    /// The verdict.
    pub verdict: Verdict,
    /// Why it failed or was skipped, and other facts worth a line.
    pub notes: Vec<String>,
    /// Wall time of the scenario.
    pub took: Duration,
}

impl Outcome {
    /// A row for a scenario that could not run on this machine.
    pub fn skipped(name: &str, why: String) -> Outcome {
        Outcome {
            name: name.to_string(),
            mechanism: "-".to_string(),
            reads: 0,
            failed: 0,
            stale: 0,
            worst: Duration::ZERO,
            opened_after: None,
            recovered_after: None,
            verdict: Verdict::Skip,
            notes: vec![why],
            took: Duration::ZERO,
        }
    }

    /// A row for a scenario whose harness broke (counted as FAIL).
    pub fn broken(name: &str, error: &HarnessError, took: Duration) -> Outcome {
        Outcome {
            verdict: Verdict::Fail,
            notes: vec![format!("harness: {error}")],
            took,
            ..Outcome::skipped(name, String::new())
        }
    }
}

/// Renders the table and the notes under it.
pub fn render_table(rows: &[Outcome]) -> String {
    let ms =
        |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1}s", d.as_secs_f64()));
    let header = [
        "scenario",
        "mechanism",
        "reads",
        "failed",
        "stale",
        "worst ms",
        "opened after",
        "recovered after",
        "took",
        "verdict",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.mechanism.clone(),
                r.reads.to_string(),
                r.failed.to_string(),
                r.stale.to_string(),
                if r.reads == 0 {
                    "-".into()
                } else {
                    r.worst.as_millis().to_string()
                },
                ms(r.opened_after),
                ms(r.recovered_after),
                format!("{:.0}s", r.took.as_secs_f64()),
                r.verdict.as_str().to_string(),
            ]
        })
        .collect();
    let notes: Vec<(&str, Verdict, &[String])> = rows
        .iter()
        .map(|r| (r.name.as_str(), r.verdict, r.notes.as_slice()))
        .collect();
    render_grid(&header, &cells, &notes)
}

/// Renders a table (first column left-aligned, the others right-aligned)
/// and under it one line per note, `  NAME [VERDICT]: note`, row by row.
/// `catalog-chaos run` and `catalog-chaos abuse` print their results with it.
pub fn render_grid(
    header: &[&str],
    rows: &[Vec<String>],
    notes: &[(&str, Verdict, &[String])],
) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |row: &[String]| {
        let mut s = String::from("|");
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            let pad = w.saturating_sub(c.chars().count());
            if i == 0 {
                s.push_str(&format!(" {c}{} |", " ".repeat(pad)));
            } else {
                s.push_str(&format!(" {}{c} |", " ".repeat(pad)));
            }
        }
        s.push('\n');
        s
    };
    let head: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut out = line(&head);
    out.push('|');
    for w in &widths {
        out.push_str(&format!("{}|", "-".repeat(w + 2)));
    }
    out.push('\n');
    for row in rows {
        out.push_str(&line(row));
    }
    for (name, verdict, lines) in notes {
        for n in lines.iter() {
            out.push_str(&format!("  {name} [{}]: {n}\n", verdict.as_str()));
        }
    }
    out
}

/// How often [`RssMonitor`] reads the sidecar's resident set size.
pub const RSS_PERIOD: Duration = Duration::from_millis(100);

/// The resident set size of a process (`VmRSS` in `/proc/PID/status`), in
/// bytes; `None` when there is no such process (any more).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// One RSS reading.
#[derive(Debug, Clone, Copy)]
pub struct RssSample {
    /// When, since the origin.
    pub at: Duration,
    /// The PID read.
    pub pid: u32,
    /// Its RSS in bytes; `None`: the process was gone.
    pub bytes: Option<u64>,
}

/// Reads a process's RSS every [`RSS_PERIOD`] until stopped. The PID it
/// follows can be changed (after a deliberate restart) with
/// [`RssMonitor::follow`].
pub struct RssMonitor {
    stop: Arc<AtomicBool>,
    pid: Arc<std::sync::atomic::AtomicU32>,
    handle: JoinHandle<Vec<RssSample>>,
}

impl RssMonitor {
    /// Starts reading `pid`.
    pub fn start(pid: u32, origin: Instant) -> RssMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let followed = Arc::new(std::sync::atomic::AtomicU32::new(pid));
        let (flag, current) = (stop.clone(), followed.clone());
        let handle = tokio::spawn(async move {
            let mut out = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let pid = current.load(Ordering::Relaxed);
                out.push(RssSample {
                    at: origin.elapsed(),
                    pid,
                    bytes: rss_bytes(pid),
                });
                tokio::time::sleep(RSS_PERIOD).await;
            }
            out
        });
        RssMonitor {
            stop,
            pid: followed,
            handle,
        }
    }

    /// Reads `pid` from now on.
    pub fn follow(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    /// Stops and returns the readings.
    pub async fn stop(self) -> Vec<RssSample> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.unwrap_or_default()
    }
}

/// A memory ceiling and how it was derived from the settings in force.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ceiling {
    /// The ceiling, in bytes.
    pub limit: u64,
    /// Its derivation, in words.
    pub why: String,
}

impl Ceiling {
    /// `212 MiB (RSS before 98 MiB + ...)`.
    pub fn describe(&self) -> String {
        format!("{} ({})", size_text(self.limit), self.why)
    }
}

/// `12.5 MiB`, or `42.0 KiB` below a MiB.
pub fn size_text(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }
}

/// The `p`-th percentile (0..=100, nearest rank) of `values`; zero for none.
pub fn percentile(values: &[Duration], p: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The pause each bystander loop takes between two requests: with answers
/// of a millisecond or two, a few requests per 10 ms on each listener.
pub const BYSTANDER_PAUSE: Duration = Duration::from_millis(3);

/// One bystander request.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Start, since the origin.
    pub at: Duration,
    /// How long it took.
    pub latency: Duration,
    /// Why it failed (status, transport error, wrong entity); `None` when
    /// it was answered as it should be.
    pub failure: Option<String>,
}

/// A well-behaved client that goes on reading while an attack runs: one
/// loop of `GET /entities/by-name/...` of random mirrored entities on the
/// proxy listener (200 with that entity's uid, or it failed), one of
/// `GET /livez` on the admin listener (200 `ok`), each pausing
/// [`BYSTANDER_PAUSE`] between requests, each on its own keep-alive client.
///
/// Both loops run on a thread and a runtime of their own, so that what the
/// harness does meanwhile (an attack that parses ten 37 MB answers, say)
/// cannot delay a probe and be blamed on the sidecar.
pub struct Bystander {
    stop: Arc<AtomicBool>,
    proxy_paused: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<Probe>, Vec<Probe>)>,
}

impl Bystander {
    /// Starts both loops.
    pub fn start(
        catalog_url: String,
        admin: String,
        targets: Arc<Vec<Target>>,
        origin: Instant,
        seed: u64,
    ) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let proxy_paused = Arc::new(AtomicBool::new(false));
        let (flag, paused) = (stop.clone(), proxy_paused.clone());
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                // No runtime, no probes: the judge reports "no request was made".
                Err(_) => return (Vec::new(), Vec::new()),
            };
            runtime.block_on(async move {
                tokio::join!(
                    proxy_loop(catalog_url, targets, origin, seed, flag.clone(), paused),
                    admin_loop(admin, origin, flag)
                )
            })
        });
        Bystander {
            stop,
            proxy_paused,
            thread,
        }
    }

    /// Pauses (or resumes) the proxy loop, for a phase in which the proxy
    /// listener is meant to be unreachable; the admin loop goes on.
    pub fn pause_proxy(&self, paused: bool) {
        self.proxy_paused.store(paused, Ordering::Relaxed);
    }

    /// Stops both loops and returns their probes: (proxy, admin).
    pub async fn stop(self) -> (Vec<Probe>, Vec<Probe>) {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join().unwrap_or_default())
            .await
            .unwrap_or_default()
    }
}

/// The bystander's proxy loop: by-name reads of random mirrored entities.
async fn proxy_loop(
    catalog_url: String,
    targets: Arc<Vec<Target>>,
    origin: Instant,
    seed: u64,
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
) -> Vec<Probe> {
    let http = http_client();
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(7919));
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if paused.load(Ordering::Relaxed) {
            tokio::time::sleep(BYSTANDER_PAUSE).await;
            continue;
        }
        let t = &targets[rng.random_range(0..targets.len())];
        let url = format!(
            "{catalog_url}/entities/by-name/{}/{}/{}",
            encode_segment(&t.kind),
            encode_segment(&t.namespace),
            encode_segment(&t.name)
        );
        let at = origin.elapsed();
        let started = Instant::now();
        let failure = match http.get(url).send().await {
            Err(e) => Some(format!("by-name: no answer: {}", client_error(e))),
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = resp.bytes().await.unwrap_or_default();
                let uid = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| uid_of(&v).map(str::to_string));
                if status != 200 {
                    Some(format!("by-name answered {status}"))
                } else if uid.as_deref() != Some(t.uid.as_str()) {
                    Some(format!("by-name answered 200 without entity {}", t.uid))
                } else {
                    None
                }
            }
        };
        out.push(Probe {
            at,
            latency: started.elapsed(),
            failure,
        });
        tokio::time::sleep(BYSTANDER_PAUSE).await;
    }
    out
}

/// The bystander's admin loop: `GET /livez`.
async fn admin_loop(admin: String, origin: Instant, stop: Arc<AtomicBool>) -> Vec<Probe> {
    let http = http_client();
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let at = origin.elapsed();
        let started = Instant::now();
        let failure = match http.get(format!("http://{admin}/livez")).send().await {
            Err(e) => Some(format!("/livez: no answer: {}", client_error(e))),
            Ok(resp) if resp.status() != 200 => {
                Some(format!("/livez answered {}", resp.status().as_u16()))
            }
            Ok(resp) => match resp.text().await {
                Ok(t) if t.trim() == "ok" => None,
                Ok(t) => Some(format!("/livez answered 200 {t:?}")),
                Err(e) => Some(format!("/livez: body cut short: {}", client_error(e))),
            },
        };
        out.push(Probe {
            at,
            latency: started.elapsed(),
            failure,
        });
        tokio::time::sleep(BYSTANDER_PAUSE).await;
    }
    out
}

/// A client error in words, with its causes and without the URL (an
/// attack's URL can be 64 KiB long).
pub fn client_error(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// An HTTP answer read off a raw socket.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    /// The status code.
    pub status: u16,
    /// The status line and headers, as sent.
    pub head: String,
    /// The body (what arrived of it).
    pub body: Vec<u8>,
}

/// Sends `request` (raw bytes, so that nothing normalises the path) to
/// `addr` on a new connection and reads the answer until the connection
/// closes or `Content-Length` bytes of body arrived, within `within`.
pub async fn raw_request(
    addr: &str,
    request: &[u8],
    within: Duration,
) -> Result<RawAnswer, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .write_all(request)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some(answer) = parse_raw(&buf, false) {
                return Ok(answer);
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        parse_raw(&buf, true).ok_or_else(|| {
            format!(
                "no HTTP answer ({} bytes: {:?})",
                buf.len(),
                String::from_utf8_lossy(&buf[..buf.len().min(80)])
            )
        })
    };
    tokio::time::timeout(within, exchange)
        .await
        .map_err(|_| format!("no complete answer within {within:?}"))?
}

/// An answer once its head and `Content-Length` bytes of body are in
/// `buf` (or, at the connection's end, whatever body arrived).
fn parse_raw(buf: &[u8], closed: bool) -> Option<RawAnswer> {
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = &buf[split + 4..];
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    match length {
        Some(n) if body.len() >= n => Some(RawAnswer {
            status,
            head,
            body: body[..n].to_vec(),
        }),
        _ if closed => Some(RawAnswer {
            status,
            head,
            body: body.to_vec(),
        }),
        _ => None,
    }
}

/// Runs `PRAGMA integrity_check` on a mirror file; `Ok("ok")` when intact.
pub fn integrity_check(db: &Path) -> Result<String, String> {
    let conn =
        rusqlite::Connection::open(db).map_err(|e| format!("cannot open {}: {e}", db.display()))?;
    let rows: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut s| s.query_map([], |r| r.get::<_, String>(0))?.collect())
        .map_err(|e| format!("integrity_check on {}: {e}", db.display()))?;
    Ok(rows.join("; "))
}

/// One value for a set of `(uid, etag)` pairs, whatever their order: two
/// catalog states share it only if they hold the same entities at the same
/// versions.
pub fn fingerprint(mut pairs: Vec<(String, String)>) -> u64 {
    use std::hash::{Hash, Hasher};
    pairs.sort_unstable();
    let mut h = std::hash::DefaultHasher::new();
    pairs.hash(&mut h);
    h.finish()
}

/// What a mirror file holds, read with SQLite after a kill: the generation
/// in force (`meta`), the newest one recorded (`generations`) and the
/// entity rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorGeneration {
    /// `meta.generation`.
    pub generation: u64,
    /// `meta.entities`: the entities that generation holds.
    pub entities: u64,
    /// The newest `generations.id`.
    pub newest_recorded: Option<u64>,
    /// `generations.entities` of the generation in force.
    pub recorded_entities: Option<u64>,
    /// Rows in `entities`.
    pub rows: u64,
    /// [`fingerprint`] of the rows' uids and etags.
    pub fingerprint: u64,
}

impl MirrorGeneration {
    /// Why this is not exactly one complete generation of a catalog of
    /// `expected` entities; `None` when it is.
    pub fn incomplete(&self, expected: usize) -> Option<String> {
        let g = self.generation;
        if self.newest_recorded != Some(g) {
            return Some(format!(
                "meta says generation {g}, the newest recorded is {:?}",
                self.newest_recorded
            ));
        }
        if self.recorded_entities != Some(self.entities) {
            return Some(format!(
                "generation {g}: meta says {} entities, its record {:?}",
                self.entities, self.recorded_entities
            ));
        }
        if self.rows != self.entities || self.rows != expected as u64 {
            return Some(format!(
                "generation {g} should hold {} entities (the catalog has {expected}), the file has {} rows",
                self.entities, self.rows
            ));
        }
        None
    }
}

/// Reads the generation a mirror file holds (see [`MirrorGeneration`]).
pub fn mirror_generation(db: &Path) -> Result<MirrorGeneration, String> {
    let conn =
        rusqlite::Connection::open(db).map_err(|e| format!("cannot open {}: {e}", db.display()))?;
    let err = |e: rusqlite::Error| format!("reading the generation of {}: {e}", db.display());
    let meta = |key: &str| -> Result<u64, String> {
        let v: String = conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .map_err(err)?;
        v.parse()
            .map_err(|e| format!("meta {key} = {v:?} in {}: {e}", db.display()))
    };
    let generation = meta("generation")?;
    let entities = meta("entities")?;
    let newest_recorded: Option<i64> = conn
        .query_row("SELECT MAX(id) FROM generations", [], |r| r.get(0))
        .map_err(err)?;
    let recorded_entities: Option<i64> = conn
        .query_row(
            "SELECT entities FROM generations WHERE id = ?1",
            [generation as i64],
            |r| r.get(0),
        )
        .ok();
    let pairs: Vec<(String, String)> = conn
        .prepare("SELECT uid, etag FROM entities")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()
        })
        .map_err(err)?;
    Ok(MirrorGeneration {
        generation,
        entities,
        newest_recorded: newest_recorded.map(|n| n as u64),
        recorded_entities: recorded_entities.map(|n| n as u64),
        rows: pairs.len() as u64,
        fingerprint: fingerprint(pairs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_ignores_order_and_sees_one_changed_etag() {
        let a = vec![
            ("u1".to_string(), "e1".to_string()),
            ("u2".into(), "e2".into()),
        ];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(fingerprint(a.clone()), fingerprint(b));
        let mut c = a.clone();
        c[1].1 = "e3".into();
        assert_ne!(fingerprint(a), fingerprint(c));
    }

    #[test]
    fn a_generation_is_complete_only_when_meta_record_and_rows_agree() {
        let g = MirrorGeneration {
            generation: 3,
            entities: 10,
            newest_recorded: Some(3),
            recorded_entities: Some(10),
            rows: 10,
            fingerprint: 0,
        };
        assert_eq!(g.incomplete(10), None);
        assert!(g.incomplete(11).is_some());
        let newer = MirrorGeneration {
            newest_recorded: Some(4),
            ..g.clone()
        };
        assert!(newer.incomplete(10).is_some());
        let short = MirrorGeneration { rows: 9, ..g };
        assert!(short.incomplete(10).is_some());
    }

    #[test]
    fn table_lists_every_row_and_its_notes() {
        let mut fail = Outcome::skipped("black-hole", String::new());
        fail.notes = vec!["3 reads slower than 400ms".into()];
        fail.verdict = Verdict::Fail;
        fail.reads = 10;
        let text = render_table(&[fail, Outcome::skipped("netns-loss", "no netem".into())]);
        assert!(text.contains("| black-hole"), "{text}");
        assert!(text.contains("FAIL"), "{text}");
        assert!(text.contains("netns-loss [SKIP]: no netem"), "{text}");
    }

    #[test]
    fn a_killed_proc_is_reaped_and_kill_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut p = Proc::spawn("sleep", cmd, &dir.path().join("log")).unwrap();
        let pid = p.pid().unwrap();
        assert!(!p.exited());
        p.kill();
        p.kill();
        assert!(p.pid().is_none());
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
                // A recycled PID is possible in theory; the reaped child is gone.
                std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .unwrap_or_default()
                    .is_empty()
            }
        );
    }

    #[test]
    fn integrity_check_says_ok_for_a_fresh_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(a); INSERT INTO t VALUES (1);")
            .unwrap();
        drop(conn);
        assert_eq!(integrity_check(&db).unwrap(), "ok");
        std::fs::write(&db, b"this is not a database, just forty-odd bytes of text").unwrap();
        assert!(integrity_check(&db).is_err());
    }
}
