//! `catalog-chaos fleet`: a fleet simulation on loopback with the real
//! binaries, and a model that extrapolates what it measured.
//!
//! One demo catalog (`catalog-chaos fake-catalog`) changes all the time
//! (`POST /churn` in small steps). Leaf sidecars run against it in three
//! configurations, one after the other, each with fresh data dirs:
//!
//! 1. **direct, id-walk**: every leaf on the demo catalog with the default
//!    `mirror.full_sync_every`; then a restart storm (every leaf SIGTERMed
//!    and started at once) and a catalog outage (`refuse`, longer than
//!    `freshness.fresh_for`);
//! 2. **direct, full walk**: the same with `mirror.full_sync_every = 1`;
//! 3. **tiered**: regional tiers on the demo catalog, every leaf behind one
//!    tier (`upstream.url` = the tier's proxy listener); then a catalog
//!    outage and a tier outage (SIGKILL one tier, restart it).
//!
//! Throughout, a checker reads known entities from random leaves and holds
//! two invariants: no answer marked `X-Catalog-Stale: false` has an `Age`
//! above `fresh_for`, and reads of entities the catalog still holds
//! succeed (stale answers allowed). Each configuration measures the demo
//! catalog's load over a window (its `/stats`, the sidecars'
//! `catalog_cache_sync_*` counters) and how long a marked change (`POST
//! /entities/{uid}/touch`) takes to reach every leaf; a sampler attributes
//! every sync's requests and bytes to its method, which gives the per-sync
//! unit costs that [`model`] extrapolates to a larger fleet.
//!
//! Bounds: everything listens on 127.0.0.1 on free ports; every process is
//! a [`Proc`] child, killed by its PID when the run ends (also on error or
//! Ctrl-C: dropping [`Fleet`] kills them all); the data dir is a temporary
//! directory removed at the end; every wait has a deadline.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::scenario::{
    base_env, encode_segment, free_port, percentile, render_grid, HarnessError, Proc, Target,
    Timings, Upstream,
};

/// The sync traffic kinds of `catalog_cache_sync_requests_total` and
/// `catalog_cache_sync_bytes_total`, in the order of [`Counters`]' arrays.
pub const KINDS: [&str; 6] = [
    "id_walk",
    "by_refs",
    "full_page",
    "changes",
    "generation",
    "not_modified",
];
const ID_WALK: usize = 0;
const BY_REFS: usize = 1;
const FULL_PAGE: usize = 2;
const CHANGES: usize = 3;
const GENERATION: usize = 4;
const NOT_MODIFIED: usize = 5;

/// The sidecar's `mirror.page_size` default (entities per full-walk page).
pub const PAGE_SIZE: u64 = 500;
/// The sidecar's `mirror.id_page_size` default (entities per id-walk page).
pub const ID_PAGE_SIZE: u64 = 5000;
/// The sidecar's `mirror.full_sync_every` default.
pub const FULL_SYNC_EVERY: u64 = 10;
/// Refs per by-refs request, and changes per page of a tier's feed, as the
/// sync loop asks for them.
pub const REFS_PER_REQUEST: u64 = 1000;
/// How churn splits between changed, added and deleted entities (the demo
/// catalog's `POST /churn {"share": …}` split).
pub const CHURN_SPLIT: (f64, f64, f64) = (0.8, 0.1, 0.1);

/// How a fleet run is sized and timed.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// CI sizes (see [`FleetOptions::new`]).
    pub quick: bool,
    /// The `catalog-cache` binary.
    pub sidecar: PathBuf,
    /// Entities in the demo catalog.
    pub entities: usize,
    /// Leaf sidecars.
    pub leaves: usize,
    /// Regional tiers (leaves are spread over them in turn).
    pub tiers: usize,
    /// Length of each measured window (one per configuration).
    pub duration: Duration,
    /// `mirror.sync_interval` of every sidecar.
    pub sync_interval: Duration,
    /// `mirror.sync_jitter` of every sidecar.
    pub sync_jitter: f64,
    /// `freshness.fresh_for` of every sidecar.
    pub fresh_for: Duration,
    /// Share of the catalog churned a minute (0.01: 1 %).
    pub churn_per_minute: f64,
    /// How often a churn step is applied.
    pub churn_step: Duration,
    /// How long the catalog outage and the tier outage are held.
    pub outage: Duration,
    /// Generator seed (catalog, readers, choices).
    pub seed: u64,
    /// The fleet the model extrapolates to.
    pub scale: Scale,
}

impl FleetOptions {
    /// The defaults: quick (about a minute, for CI) or full (a few minutes
    /// per configuration).
    pub fn new(quick: bool, sidecar: PathBuf) -> FleetOptions {
        if quick {
            FleetOptions {
                quick,
                sidecar,
                entities: 1000,
                leaves: 20,
                tiers: 2,
                duration: Duration::from_secs(8),
                sync_interval: Duration::from_secs(2),
                sync_jitter: 0.1,
                fresh_for: Duration::from_secs(5),
                // Faster than the full run's 1 %, so that a 1,000-entity
                // catalog changes between two 2 s syncs.
                churn_per_minute: 0.06,
                churn_step: Duration::from_secs(1),
                outage: Duration::from_secs(7),
                seed: 7,
                scale: Scale::default(),
            }
        } else {
            FleetOptions {
                quick,
                sidecar,
                entities: 5000,
                leaves: 20,
                tiers: 2,
                duration: Duration::from_secs(180),
                sync_interval: Duration::from_secs(10),
                sync_jitter: 0.1,
                fresh_for: Duration::from_secs(30),
                churn_per_minute: 0.01,
                churn_step: Duration::from_secs(10),
                outage: Duration::from_secs(45),
                seed: 7,
                scale: Scale::default(),
            }
        }
    }

    /// Refuses sizes the run cannot work with.
    pub fn validate(&self) -> Result<(), String> {
        if self.leaves == 0 || self.tiers == 0 {
            return Err("--leaves and --tiers must be at least 1".into());
        }
        if self.tiers > self.leaves {
            return Err("--tiers must not exceed --leaves".into());
        }
        if self.entities < 10 {
            return Err("--entities must be at least 10".into());
        }
        if !(0.0..=1.0).contains(&self.churn_per_minute) {
            return Err("--churn must be within 0..=1 (a share of the catalog a minute)".into());
        }
        if self.sync_interval < Duration::from_millis(500) || self.churn_step.is_zero() {
            return Err("--sync-interval must be at least 500ms and --churn-step above 0".into());
        }
        if self.outage <= self.fresh_for {
            return Err(format!(
                "--outage ({}) must be longer than --fresh-for ({}) so that data turns stale",
                secs(self.outage),
                secs(self.fresh_for)
            ));
        }
        Ok(())
    }

    /// The sidecars' timing settings.
    pub fn timings(&self) -> Timings {
        Timings {
            sync_interval: self.sync_interval,
            sync_jitter: self.sync_jitter,
            fresh_for: self.fresh_for,
            budget: Duration::from_millis(250),
            negative_ttl: Duration::from_secs(1),
            upstream_timeout: Duration::from_secs(2),
            consecutive_failures: 5,
            open_for: Duration::from_secs(1),
            max_open: (self.sync_interval / 2).max(Duration::from_secs(1)),
            breaker_jitter: 0.1,
        }
    }

    /// How long the fleet leaves the catalog unchanged after each window,
    /// so that unchanged cycles (and tiers' 304s) are measured too.
    pub fn quiet(&self) -> Duration {
        self.sync_interval.mul_f64(2.5)
    }
}

/// The fleet the model extrapolates to, and the sidecar settings it
/// assumes (the sidecar's defaults unless told).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scale {
    /// Leaf sidecars.
    pub sidecars: u64,
    /// Entities in the catalog.
    pub entities: u64,
    /// Regional tiers in the tiered topology.
    pub tiers: u64,
    /// `mirror.sync_interval`.
    pub interval: Duration,
    /// `mirror.full_sync_every`.
    pub full_sync_every: u64,
    /// `mirror.page_size`.
    pub page_size: u64,
    /// `mirror.id_page_size`.
    pub id_page_size: u64,
    /// Share of the catalog churned a minute under "churn".
    pub churn_per_minute: f64,
}

impl Default for Scale {
    fn default() -> Self {
        Scale {
            sidecars: 1000,
            entities: 100_000,
            tiers: 10,
            interval: Duration::from_secs(60),
            full_sync_every: FULL_SYNC_EVERY,
            page_size: PAGE_SIZE,
            id_page_size: ID_PAGE_SIZE,
            churn_per_minute: 0.01,
        }
    }
}

impl Scale {
    /// Entities changed, added or deleted between two syncs under churn.
    pub fn churn_per_cycle(&self) -> f64 {
        self.entities as f64 * self.churn_per_minute * self.interval.as_secs_f64() / 60.0
    }

    /// Sync cycles a minute.
    pub fn cycles_per_minute(&self) -> f64 {
        60.0 / self.interval.as_secs_f64()
    }
}

// ------------------------------------------------------------- processes

/// Which part of the fleet a sidecar is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A leaf: the sidecar an application reads through.
    Leaf,
    /// A regional tier: a sidecar leaves use as their upstream.
    Tier,
}

/// One `catalog-cache serve` process of the fleet, with its own data dir
/// and free loopback ports kept across restarts.
struct Node {
    name: String,
    role: Role,
    /// Whether its upstream is a tier (else the demo catalog).
    via_tier: bool,
    bin: PathBuf,
    dir: PathBuf,
    proxy: String,
    admin: String,
    upstream_url: String,
    env: Vec<(String, String)>,
    proc: Option<Proc>,
}

impl Node {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: String,
        role: Role,
        via_tier: bool,
        bin: &Path,
        dir: PathBuf,
        upstream_url: String,
        timings: &Timings,
        extra_env: &[(String, String)],
    ) -> Result<Node, HarnessError> {
        std::fs::create_dir_all(&dir).map_err(HarnessError::TempDir)?;
        let mut env = base_env(&dir, timings);
        env.push(("CATALOG_CACHE_LISTEN_NAME".into(), name.clone()));
        env.extend(extra_env.iter().cloned());
        Ok(Node {
            name,
            role,
            via_tier,
            bin: bin.to_path_buf(),
            dir,
            proxy: format!("127.0.0.1:{}", free_port()?),
            admin: format!("127.0.0.1:{}", free_port()?),
            upstream_url,
            env,
            proc: None,
        })
    }

    fn log(&self) -> PathBuf {
        self.dir.join("sidecar.log")
    }

    fn catalog_url(&self) -> String {
        format!("http://{}/api/catalog", self.proxy)
    }

    /// Starts (or restarts) the process on the same ports and data dir.
    fn start(&mut self) -> Result<(), HarnessError> {
        self.kill();
        let mut cmd = Command::new(&self.bin);
        cmd.current_dir(&self.dir)
            .args(["serve", "--upstream", &self.upstream_url])
            .args(["--listen-proxy", &self.proxy, "--listen-admin", &self.admin])
            .arg("--mirror")
            .arg(self.dir.join("catalog-cache.db"));
        // The sidecar refuses unknown CATALOG_CACHE_* variables, and the
        // fleet, not the caller's shell, decides its configuration.
        for (k, _) in std::env::vars() {
            if k.starts_with("CATALOG_CACHE_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        self.proc = Some(Proc::spawn(&self.name, cmd, &self.log())?);
        Ok(())
    }

    /// SIGKILL by PID, and reap.
    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM by PID (through `kill(1)`: this crate has no unsafe code);
    /// the process stays owned until [`Node::kill`] reaps it.
    fn terminate(&mut self) {
        if let Some(pid) = self.proc.as_ref().and_then(Proc::pid) {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }

    fn exited(&mut self) -> bool {
        self.proc.as_mut().is_none_or(Proc::exited)
    }

    fn admin_ref(&self) -> AdminRef {
        AdminRef {
            name: self.name.clone(),
            role: self.role,
            via_tier: self.via_tier,
            admin: self.admin.clone(),
        }
    }
}

/// What the samplers need of a node: where its admin listener is.
#[derive(Debug, Clone)]
struct AdminRef {
    name: String,
    role: Role,
    via_tier: bool,
    admin: String,
}

/// A spawned task that is aborted when dropped (also on Ctrl-C).
struct Task<T>(Option<JoinHandle<T>>);

impl<T> Task<T> {
    fn spawn(f: impl std::future::Future<Output = T> + Send + 'static) -> Task<T>
    where
        T: Send + 'static,
    {
        Task(Some(tokio::spawn(f)))
    }

    async fn join(mut self) -> Option<T> {
        match self.0.take() {
            Some(h) => h.await.ok(),
            None => None,
        }
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(1))
        .pool_max_idle_per_host(8)
        .build()
        .unwrap_or_default()
}

async fn get_json(http: &reqwest::Client, url: &str) -> Option<Value> {
    let resp = http.get(url).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

async fn get_text(http: &reqwest::Client, url: &str) -> Option<String> {
    let resp = http.get(url).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.text().await.ok()
}

// ------------------------------------------------------------- counters

/// A sidecar's sync counters, as `/metrics` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    /// `catalog_cache_sync_requests_total`, by [`KINDS`].
    pub requests: [u64; 6],
    /// `catalog_cache_sync_bytes_total`, by [`KINDS`].
    pub bytes: [u64; 6],
    /// `catalog_cache_syncs_total`, every result.
    pub syncs: u64,
}

impl Counters {
    /// Reads the counters from Prometheus text (absent ones are 0).
    pub fn parse(text: &str) -> Counters {
        let mut c = Counters::default();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let value = value.max(0.0) as u64;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let kind = KINDS
                .iter()
                .position(|k| labels.contains(&format!("kind=\"{k}\"")));
            match (name, kind) {
                ("catalog_cache_sync_requests_total", Some(i)) => c.requests[i] += value,
                ("catalog_cache_sync_bytes_total", Some(i)) => c.bytes[i] += value,
                ("catalog_cache_syncs_total", _) => c.syncs += value,
                _ => {}
            }
        }
        c
    }

    /// `self - earlier`, kind by kind (0 where a counter went back).
    pub fn minus(&self, earlier: &Counters) -> Counters {
        let mut d = Counters {
            syncs: self.syncs.saturating_sub(earlier.syncs),
            ..Counters::default()
        };
        for i in 0..KINDS.len() {
            d.requests[i] = self.requests[i].saturating_sub(earlier.requests[i]);
            d.bytes[i] = self.bytes[i].saturating_sub(earlier.bytes[i]);
        }
        d
    }

    /// Adds `other`.
    pub fn add(&mut self, other: &Counters) {
        self.syncs += other.syncs;
        for i in 0..KINDS.len() {
            self.requests[i] += other.requests[i];
            self.bytes[i] += other.bytes[i];
        }
    }

    /// Requests of every kind.
    pub fn total_requests(&self) -> u64 {
        self.requests.iter().sum()
    }

    /// Bytes of every kind.
    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }
}

async fn counters(http: &reqwest::Client, admin: &str) -> Option<Counters> {
    get_text(http, &format!("http://{admin}/metrics"))
        .await
        .map(|t| Counters::parse(&t))
}

// ------------------------------------------------------------- per-sync samples

/// One sync of one sidecar, with the traffic it made.
#[derive(Debug, Clone)]
pub struct SyncSample {
    /// The sidecar.
    pub node: String,
    /// Whether its upstream is a tier (else the demo catalog).
    pub via_tier: bool,
    /// Its role.
    pub role: Role,
    /// `full_walk`, `id_walk`, `changes`, `not_modified`.
    pub method: String,
    /// Entities in the mirror after it (added + changed + unchanged).
    pub entities: u64,
    /// Entities it fetched whole because they were new or changed.
    pub fetched: u64,
    /// Entities it removed.
    pub removed: u64,
    /// Its requests and bytes.
    pub traffic: Counters,
}

impl SyncSample {
    /// Entities that moved in this sync (added, changed or removed).
    pub fn moved(&self) -> u64 {
        self.fetched + self.removed
    }
}

/// Attributes each sync's traffic to it: scrapes every node's `/metrics`
/// often (well under the sync interval), and when `syncs_total` moved by
/// one, everything counted since the previous sync belongs to it (syncs
/// run one at a time); its method and counts come from `/status`.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: Task<Vec<SyncSample>>,
}

struct Track {
    at_last_sync: Counters,
    last: Counters,
    last_report_at: Option<String>,
}

impl Sampler {
    fn start(http: reqwest::Client, nodes: Vec<AdminRef>, period: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = Task::spawn(async move {
            let mut tracks: Vec<Track> = nodes
                .iter()
                .map(|_| Track {
                    at_last_sync: Counters::default(),
                    last: Counters::default(),
                    last_report_at: None,
                })
                .collect();
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let round = Instant::now();
                for (node, track) in nodes.iter().zip(tracks.iter_mut()) {
                    let Some(now) = counters(&http, &node.admin).await else {
                        continue;
                    };
                    if now.syncs < track.last.syncs {
                        // Restarted: its counters began again at zero.
                        track.at_last_sync = Counters::default();
                        track.last = Counters::default();
                    }
                    if now.syncs > track.last.syncs {
                        let report = last_report(&http, &node.admin, &track.last_report_at).await;
                        if now.syncs == track.last.syncs + 1 {
                            if let Some(r) = &report {
                                if let Some(s) = sample_of(node, r, now.minus(&track.at_last_sync))
                                {
                                    samples.push(s);
                                }
                            }
                        }
                        track.last_report_at = report.map(|r| r["at"].to_string());
                        track.at_last_sync = now;
                    }
                    track.last = now;
                }
                tokio::time::sleep(period.saturating_sub(round.elapsed())).await;
            }
            samples
        });
        Sampler { stop, task }
    }

    async fn stop(self) -> Vec<SyncSample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.join().await.unwrap_or_default()
    }
}

/// `/status`'s `last_sync`, retried briefly while it still shows the
/// previous report (the counter moves a moment before the report is kept).
async fn last_report(
    http: &reqwest::Client,
    admin: &str,
    previous: &Option<String>,
) -> Option<Value> {
    for _ in 0..5 {
        let status = get_json(http, &format!("http://{admin}/status")).await?;
        let report = status["last_sync"].clone();
        if report.is_object() && previous.as_deref() != Some(report["at"].to_string().as_str()) {
            return Some(report);
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    None
}

fn sample_of(node: &AdminRef, report: &Value, traffic: Counters) -> Option<SyncSample> {
    let result = report["result"].as_str()?;
    if result != "applied" && result != "unchanged" {
        return None;
    }
    let n = |k: &str| report[k].as_u64().unwrap_or(0);
    Some(SyncSample {
        node: node.name.clone(),
        via_tier: node.via_tier,
        role: node.role,
        method: report["method"].as_str()?.to_string(),
        entities: n("added") + n("changed") + n("unchanged"),
        fetched: n("added") + n("changed"),
        removed: n("removed"),
        traffic,
    })
}

// ------------------------------------------------------------- churn

/// What churn did over a stretch of time.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChurnCount {
    /// Entities given a new etag.
    pub changed: u64,
    /// Entities added.
    pub added: u64,
    /// Entities deleted.
    pub deleted: u64,
}

/// Applies churn to the demo catalog in steps (`POST /churn` with explicit
/// counts, fractions carried over to the next step) until stopped; keeps
/// the deleted uids so that reads of them are not counted as failures.
struct Churn {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    count: Arc<Mutex<ChurnCount>>,
    task: Task<()>,
}

impl Churn {
    fn start(
        http: reqwest::Client,
        control: String,
        per_step: f64,
        step: Duration,
        deleted: Arc<Mutex<HashSet<String>>>,
    ) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let count = Arc::new(Mutex::new(ChurnCount::default()));
        let (flag, pause, counted) = (stop.clone(), paused.clone(), count.clone());
        let task = Task::spawn(async move {
            let mut owed = [0.0f64; 3];
            let split = [CHURN_SPLIT.0, CHURN_SPLIT.1, CHURN_SPLIT.2];
            loop {
                tokio::time::sleep(step).await;
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                if pause.load(Ordering::Relaxed) {
                    continue;
                }
                let mut now = [0u64; 3];
                for i in 0..3 {
                    owed[i] += per_step * split[i];
                    now[i] = owed[i].floor() as u64;
                    owed[i] -= now[i] as f64;
                }
                if now == [0, 0, 0] {
                    continue;
                }
                let body = json!({"change": now[0], "add": now[1], "delete": now[2]});
                let Ok(resp) = http
                    .post(format!("http://{control}/churn"))
                    .json(&body)
                    .send()
                    .await
                else {
                    continue;
                };
                let Ok(v) = resp.json::<Value>().await else {
                    continue;
                };
                let uids = |k: &str| {
                    v[k].as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|u| u.as_str().map(str::to_string))
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default()
                };
                let gone = uids("deleted");
                {
                    let mut c = counted.lock().unwrap_or_else(|p| p.into_inner());
                    c.changed += uids("changed").len() as u64;
                    c.added += uids("added").len() as u64;
                    c.deleted += gone.len() as u64;
                }
                deleted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(gone);
            }
        });
        Churn {
            stop,
            paused,
            count,
            task,
        }
    }

    fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    fn count(&self) -> ChurnCount {
        *self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.join().await;
    }
}

// ------------------------------------------------------------- the checker

/// What the checker saw over a stretch of time.
#[derive(Debug, Clone, Default)]
pub struct ReadStats {
    /// Reads made.
    pub reads: u64,
    /// Reads answered 200 with the entity asked for.
    pub ok: u64,
    /// Answers marked `X-Catalog-Stale: true`.
    pub stale: u64,
    /// The largest `Age` of an answer marked fresh.
    pub max_fresh_age: u64,
    /// The largest `Age` of an answer marked stale.
    pub max_stale_age: u64,
    /// Reads that did not give the entity: (leaf, uid, what happened).
    pub failures: Vec<(String, String, String)>,
    /// Answers marked fresh with an `Age` above `fresh_for`.
    pub violations: Vec<String>,
}

impl ReadStats {
    /// Failures of entities the catalog still holds (a read of one that
    /// churn deleted may be a 404, which is right).
    pub fn real_failures(&self, deleted: &HashSet<String>) -> Vec<&(String, String, String)> {
        self.failures
            .iter()
            .filter(|(_, uid, _)| !deleted.contains(uid))
            .collect()
    }

    fn merge(&mut self, other: &ReadStats) {
        self.reads += other.reads;
        self.ok += other.ok;
        self.stale += other.stale;
        self.max_fresh_age = self.max_fresh_age.max(other.max_fresh_age);
        self.max_stale_age = self.max_stale_age.max(other.max_stale_age);
        self.failures.extend(other.failures.iter().cloned());
        self.violations.extend(other.violations.iter().cloned());
    }
}

/// Reads known entities by name from random leaves, without pause
/// between leaves beyond a few milliseconds, and checks every answer.
struct Checker {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    stats: Arc<Mutex<ReadStats>>,
    task: Task<()>,
}

impl Checker {
    /// Reads entities of `targets` that churn has not deleted (a deleted
    /// one is a 404 the leaf must ask its upstream about, which would add
    /// read traffic to the sync traffic measured at the demo catalog).
    fn start(
        http: reqwest::Client,
        leaves: Vec<(String, String)>,
        targets: Arc<Vec<Target>>,
        deleted: Arc<Mutex<HashSet<String>>>,
        fresh_for: Duration,
        seed: u64,
    ) -> Checker {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(ReadStats::default()));
        let (flag, pause, kept) = (stop.clone(), paused.clone(), stats.clone());
        let task = Task::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            while !flag.load(Ordering::Relaxed) {
                if pause.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let (leaf, base) = &leaves[rng.random_range(0..leaves.len())];
                let t = &targets[rng.random_range(0..targets.len())];
                if deleted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&t.uid)
                {
                    continue;
                }
                let read = read_known(&http, base, t).await;
                if pause.load(Ordering::Relaxed) {
                    // Paused while the read was under way: a leaf may have
                    // been stopped on purpose.
                    continue;
                }
                {
                    let mut s = kept.lock().unwrap_or_else(|p| p.into_inner());
                    s.reads += 1;
                    match read {
                        Ok((stale, age)) => {
                            s.ok += 1;
                            match stale {
                                Some(true) => {
                                    s.stale += 1;
                                    s.max_stale_age = s.max_stale_age.max(age.unwrap_or(0));
                                }
                                Some(false) => {
                                    let age = age.unwrap_or(0);
                                    s.max_fresh_age = s.max_fresh_age.max(age);
                                    if age > fresh_for.as_secs() {
                                        s.violations.push(format!(
                                            "{leaf}: {} answered X-Catalog-Stale: false with Age {age}s > fresh_for {}",
                                            t.lower_ref(),
                                            secs(fresh_for)
                                        ));
                                    }
                                }
                                None => s.failures.push((
                                    leaf.clone(),
                                    t.uid.clone(),
                                    "no X-Catalog-Stale header".into(),
                                )),
                            }
                        }
                        Err(what) => s.failures.push((leaf.clone(), t.uid.clone(), what)),
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Checker {
            stop,
            paused,
            stats,
            task,
        }
    }

    fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// The stats since the last take.
    fn take(&self) -> ReadStats {
        std::mem::take(&mut *self.stats.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn stop(self) -> ReadStats {
        self.stop.store(true, Ordering::Relaxed);
        let stats = self.stats.clone();
        self.task.join().await;
        let taken = std::mem::take(&mut *stats.lock().unwrap_or_else(|p| p.into_inner()));
        taken
    }
}

/// One by-name read: `Ok((X-Catalog-Stale, Age))` for the entity asked
/// for, else what went wrong.
async fn read_known(
    http: &reqwest::Client,
    base: &str,
    t: &Target,
) -> Result<(Option<bool>, Option<u64>), String> {
    let url = format!(
        "{base}/entities/by-name/{}/{}/{}",
        encode_segment(&t.kind),
        encode_segment(&t.namespace),
        encode_segment(&t.name)
    );
    let resp = http.get(url).send().await.map_err(|e| {
        if e.is_timeout() {
            "timed out".to_string()
        } else {
            "no answer".to_string()
        }
    })?;
    let status = resp.status().as_u16();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let stale = header("x-catalog-stale").map(|v| v == "true");
    let age = header("age").and_then(|a| a.trim().parse::<u64>().ok());
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if status != 200 {
        return Err(format!("status {status}"));
    }
    if body["metadata"]["uid"].as_str() != Some(t.uid.as_str()) {
        return Err("200 with another entity".into());
    }
    Ok((stale, age))
}

// ------------------------------------------------------------- results

/// One configuration's measured window.
#[derive(Debug, Clone)]
pub struct Window {
    /// `direct` or `tiered`.
    pub topology: &'static str,
    /// How the sidecars on the demo catalog sync.
    pub config: &'static str,
    /// Sidecars whose upstream is the demo catalog.
    pub on_catalog: usize,
    /// Length of the window.
    pub length: Duration,
    /// Requests the demo catalog received (its `/stats`).
    pub catalog_requests: u64,
    /// Sync traffic of the sidecars on the demo catalog.
    pub catalog_sync: Counters,
    /// Sync traffic of the leaves behind tiers (what the tiers served).
    pub tier_sync: Counters,
    /// Churn applied during the window.
    pub churn: ChurnCount,
    /// How long each marked change took to reach each leaf.
    pub per_leaf: Vec<Duration>,
    /// How long each marked change took to reach every leaf.
    pub all_leaves: Vec<Duration>,
    /// Leaf answers that never showed a marked change in time.
    pub missed: usize,
}

impl Window {
    fn per_minute(&self, v: u64) -> f64 {
        v as f64 * 60.0 / self.length.as_secs_f64().max(1e-9)
    }
}

/// A fault and what the leaves answered through it.
#[derive(Debug, Clone)]
pub struct FaultRow {
    /// What happened.
    pub event: String,
    /// `direct` or `tiered`.
    pub topology: &'static str,
    /// How long the fault was held.
    pub held: Duration,
    /// What the checker saw from the fault to the recovery.
    pub reads: ReadStats,
    /// The oldest data a leaf held during it (`/status` data age).
    pub max_data_age: f64,
    /// From the fault's end to every affected leaf holding data confirmed
    /// after it (`None`: not within the deadline).
    pub recovered_after: Option<Duration>,
}

/// The restart storm.
#[derive(Debug, Clone)]
pub struct Storm {
    /// Leaves restarted.
    pub leaves: usize,
    /// `mirror.sync_interval`.
    pub interval: Duration,
    /// From the SIGTERM to the last leaf answering again.
    pub down_for: Duration,
    /// When each leaf's next sync before the restart began, since the watch
    /// began: the phases the fleet had.
    pub before: Vec<Duration>,
    /// When each leaf's first sync after its start began, since the common
    /// start.
    pub first_syncs: Vec<Duration>,
    /// The first syncs of the leaves that were not overdue: up again less
    /// than an interval after their last sync, so their first sync is at a
    /// random point of the interval (an overdue leaf syncs at once, by
    /// design: its data is older than a sync interval).
    pub on_time: Vec<Duration>,
    /// Leaves with no sync within the deadline.
    pub missing: usize,
    /// The machine's 1-minute load average at the restart (`/proc/loadavg`),
    /// and its CPUs: a loaded machine starts processes and answers late.
    pub load: Option<(f64, usize)>,
}

/// The 1-minute load average and the number of CPUs, where Linux tells.
fn machine_load() -> Option<(f64, usize)> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let load = text.split_whitespace().next()?.parse().ok()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((load, cpus))
}

impl Storm {
    /// Leaves that were overdue when they were up again.
    pub fn overdue(&self) -> usize {
        self.first_syncs.len() - self.on_time.len()
    }

    /// The most first syncs after the restart within any stretch of a
    /// tenth of the interval.
    pub fn largest_burst(&self) -> usize {
        burst(&self.first_syncs, self.interval / 10)
    }

    /// The same of the leaves that were not overdue.
    pub fn largest_burst_on_time(&self) -> usize {
        burst(&self.on_time, self.interval / 10)
    }

    /// The same of the syncs before the restart.
    pub fn largest_burst_before(&self) -> usize {
        burst(&self.before, self.interval / 10)
    }

    /// First syncs after the restart per tenth of the interval (the last
    /// bin also holds later ones).
    pub fn histogram(&self) -> [usize; 10] {
        tenths(&self.first_syncs, self.interval)
    }

    /// The same of the syncs before the restart.
    pub fn histogram_before(&self) -> [usize; 10] {
        tenths(&self.before, self.interval)
    }

    /// `Some(true)` when the first syncs are spread rather than a wave: no
    /// tenth of the interval holds half the leaves that were not overdue
    /// (or more); `None` when fewer than 4 leaves were on time, which says
    /// the interval is too short for the time the restart took.
    pub fn spread(&self) -> Option<bool> {
        if self.missing > 0 {
            return Some(false);
        }
        if self.on_time.len() < 4 {
            return None;
        }
        Some(self.largest_burst_on_time() * 2 < self.on_time.len())
    }
}

/// The most of `times` within any stretch of `width`.
fn burst(times: &[Duration], width: Duration) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort_unstable();
    let mut best = 0;
    let mut start = 0;
    for (end, t) in sorted.iter().enumerate() {
        while *t - sorted[start] > width {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// How many of `times` fall in each tenth of `interval` (the last bin
/// also holds later ones).
fn tenths(times: &[Duration], interval: Duration) -> [usize; 10] {
    let mut bins = [0usize; 10];
    for d in times {
        let i = (d.as_secs_f64() / interval.as_secs_f64() * 10.0) as usize;
        bins[i.min(9)] += 1;
    }
    bins
}

/// Everything a fleet run measured.
#[derive(Debug, Clone)]
pub struct FleetReport {
    /// The options it ran with.
    pub options: FleetOptions,
    /// Entities in the catalog at the start.
    pub entities: usize,
    /// One per configuration.
    pub windows: Vec<Window>,
    /// Every attributed sync.
    pub samples: Vec<SyncSample>,
    /// The faults.
    pub faults: Vec<FaultRow>,
    /// The restart storm.
    pub storm: Option<Storm>,
    /// What the checker saw over the whole run.
    pub reads: ReadStats,
    /// Uids churn deleted.
    pub deleted: HashSet<String>,
    /// How long the run took.
    pub took: Duration,
}

impl FleetReport {
    /// Answers marked fresh that were older than `fresh_for`.
    pub fn violations(&self) -> &[String] {
        &self.reads.violations
    }

    /// Failed reads of entities the catalog still holds.
    pub fn failed_reads(&self) -> Vec<&(String, String, String)> {
        self.reads.real_failures(&self.deleted)
    }

    /// Whether both invariants held.
    pub fn passed(&self) -> bool {
        self.violations().is_empty() && self.failed_reads().is_empty()
    }
}

// ------------------------------------------------------------- the fleet

/// The processes of a run. Dropping it kills every one by its PID and
/// then removes the data dir (`_dir` is the last field: dropped last).
struct Fleet {
    http: reqwest::Client,
    opts: FleetOptions,
    timings: Timings,
    fake: Upstream,
    tiers: Vec<Node>,
    leaves: Vec<Node>,
    targets: Arc<Vec<Target>>,
    deleted: Arc<Mutex<HashSet<String>>>,
    rng: StdRng,
    origin: Instant,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for n in self.leaves.iter_mut().chain(self.tiers.iter_mut()) {
            n.kill();
        }
        self.fake.kill();
    }
}

/// Prints a progress line on stderr.
fn step(origin: Instant, what: &str) {
    eprintln!("[{:>6.1}s] {what}", origin.elapsed().as_secs_f64());
}

/// Runs the whole simulation and returns what it measured.
pub async fn run(opts: &FleetOptions) -> Result<FleetReport, HarnessError> {
    let origin = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("catalog-chaos-fleet-")
        .tempdir()
        .map_err(HarnessError::TempDir)?;
    let root = dir.path().to_path_buf();
    step(
        origin,
        &format!("demo catalog with {} entities", opts.entities),
    );
    let fake = Upstream::start(
        format!("127.0.0.1:{}", free_port()?),
        format!("127.0.0.1:{}", free_port()?),
        opts.entities,
        opts.seed,
        root.join("fake.log"),
        Vec::new(),
    )
    .await?;
    let targets = Arc::new(fake.targets().await?);
    let mut fleet = Fleet {
        http: http_client(),
        opts: opts.clone(),
        timings: opts.timings(),
        fake,
        tiers: Vec::new(),
        leaves: Vec::new(),
        targets,
        deleted: Arc::new(Mutex::new(HashSet::new())),
        rng: StdRng::seed_from_u64(opts.seed ^ 0xF1EE7),
        origin,
        root,
        _dir: dir,
    };
    let per_step =
        opts.churn_per_minute * opts.entities as f64 * opts.churn_step.as_secs_f64() / 60.0;
    let churn = Churn::start(
        fleet.http.clone(),
        fleet.fake.control.clone(),
        per_step,
        opts.churn_step,
        fleet.deleted.clone(),
    );
    churn.pause(true);
    let mut report = FleetReport {
        options: opts.clone(),
        entities: fleet.targets.len(),
        windows: Vec::new(),
        samples: Vec::new(),
        faults: Vec::new(),
        storm: None,
        reads: ReadStats::default(),
        deleted: HashSet::new(),
        took: Duration::ZERO,
    };

    // 1. direct, id-walk: window, restart storm, catalog outage.
    fleet.start_leaves("direct-id", None, &[]).await?;
    fleet.wait_ready(fleet.leaves.iter().collect()).await?;
    let sampler = fleet.sampler();
    let checker = fleet.checker(1);
    let w = fleet
        .window("direct", "id-walk, full walk every 10", &churn)
        .await?;
    report.windows.push(w);
    checker.take_into(&mut report.reads);
    report.storm = Some(fleet.storm(&checker).await?);
    checker.take_into(&mut report.reads);
    let f = fleet.catalog_outage("direct", &checker, &churn).await?;
    report.reads.merge(&f.reads);
    report.faults.push(f);
    report.reads.merge(&checker.stop().await);
    report.samples.extend(sampler.stop().await);
    fleet.stop_leaves();

    // 2. direct, full walk every cycle.
    fleet
        .start_leaves(
            "direct-full",
            None,
            &[("CATALOG_CACHE_MIRROR_FULL_SYNC_EVERY".into(), "1".into())],
        )
        .await?;
    fleet.wait_ready(fleet.leaves.iter().collect()).await?;
    let sampler = fleet.sampler();
    let checker = fleet.checker(2);
    let w = fleet
        .window("direct", "full walk every cycle", &churn)
        .await?;
    report.windows.push(w);
    report.reads.merge(&checker.stop().await);
    report.samples.extend(sampler.stop().await);
    fleet.stop_leaves();

    // 3. tiered: window, catalog outage, tier outage.
    fleet.start_tiers()?;
    fleet.wait_ready(fleet.tiers.iter().collect()).await?;
    let tier_urls: Vec<String> = fleet.tiers.iter().map(Node::catalog_url).collect();
    fleet.start_leaves("tiered", Some(&tier_urls), &[]).await?;
    fleet.wait_ready(fleet.leaves.iter().collect()).await?;
    let sampler = fleet.sampler();
    let checker = fleet.checker(3);
    let w = fleet
        .window("tiered", "tiers id-walk; leaves follow a tier", &churn)
        .await?;
    report.windows.push(w);
    checker.take_into(&mut report.reads);
    let f = fleet.catalog_outage("tiered", &checker, &churn).await?;
    report.reads.merge(&f.reads);
    report.faults.push(f);
    let f = fleet.tier_outage(&checker).await?;
    report.reads.merge(&f.reads);
    report.faults.push(f);
    report.reads.merge(&checker.stop().await);
    report.samples.extend(sampler.stop().await);
    churn.stop().await;
    fleet.stop_leaves();
    for t in &mut fleet.tiers {
        t.kill();
    }
    step(origin, "done; stopping every process");
    report.deleted = fleet
        .deleted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    report.took = origin.elapsed();
    Ok(report)
}

impl Checker {
    /// Adds what was seen since the last take to `into`.
    fn take_into(&self, into: &mut ReadStats) {
        into.merge(&self.take());
    }
}

impl Fleet {
    /// Starts the leaves one after the other over one sync interval, as a
    /// rollout would, so that their sync phases are spread from the start
    /// (a fleet started in one instant syncs in step until jitter spreads
    /// it, whatever the sidecar does).
    async fn start_leaves(
        &mut self,
        phase: &str,
        tiers: Option<&[String]>,
        extra: &[(String, String)],
    ) -> Result<(), HarnessError> {
        step(
            self.origin,
            &format!(
                "{phase}: starting {} leaves over {}",
                self.opts.leaves,
                secs(self.opts.sync_interval)
            ),
        );
        self.leaves.clear();
        let gap = self.opts.sync_interval / self.opts.leaves.max(1) as u32;
        for i in 0..self.opts.leaves {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            let (upstream, via_tier) = match tiers {
                Some(urls) => (urls[i % urls.len()].clone(), true),
                None => (self.fake.url(), false),
            };
            let mut node = Node::new(
                format!("leaf-{}", i + 1),
                Role::Leaf,
                via_tier,
                &self.opts.sidecar,
                self.root.join(phase).join(format!("leaf-{}", i + 1)),
                upstream,
                &self.timings,
                extra,
            )?;
            node.start()?;
            self.leaves.push(node);
        }
        Ok(())
    }

    fn start_tiers(&mut self) -> Result<(), HarnessError> {
        step(
            self.origin,
            &format!("tiered: starting {} tiers", self.opts.tiers),
        );
        for i in 0..self.opts.tiers {
            let mut node = Node::new(
                format!("tier-{}", i + 1),
                Role::Tier,
                false,
                &self.opts.sidecar,
                self.root.join("tiered").join(format!("tier-{}", i + 1)),
                self.fake.url(),
                &self.timings,
                &[],
            )?;
            node.start()?;
            self.tiers.push(node);
        }
        Ok(())
    }

    fn stop_leaves(&mut self) {
        for l in &mut self.leaves {
            l.kill();
        }
        self.leaves.clear();
    }

    /// Waits until every node answers `/readyz` 200.
    async fn wait_ready(&self, nodes: Vec<&Node>) -> Result<(), HarnessError> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut waiting: Vec<&Node> = nodes;
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for n in waiting {
                let ok = self
                    .http
                    .get(format!("http://{}/readyz", n.admin))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == 200);
                if !ok {
                    still.push(n);
                }
            }
            waiting = still;
            if let Some(n) = waiting.first() {
                if Instant::now() > deadline {
                    return Err(HarnessError::Timeout(format!(
                        "{} was not ready within 120s (log: {})",
                        n.name,
                        n.log().display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    fn sampler(&self) -> Sampler {
        let nodes = self
            .tiers
            .iter()
            .chain(self.leaves.iter())
            .map(Node::admin_ref)
            .collect();
        Sampler::start(
            self.http.clone(),
            nodes,
            (self.opts.sync_interval / 8).max(Duration::from_millis(200)),
        )
    }

    fn checker(&self, salt: u64) -> Checker {
        Checker::start(
            self.http.clone(),
            self.leaves
                .iter()
                .map(|l| (l.name.clone(), l.catalog_url()))
                .collect(),
            self.targets.clone(),
            self.deleted.clone(),
            self.opts.fresh_for,
            self.opts.seed.wrapping_mul(131).wrapping_add(salt),
        )
    }

    /// The sync counters of `nodes`, summed (every one must answer).
    async fn sum_counters(&self, nodes: &[&Node]) -> Result<Counters, HarnessError> {
        let mut sum = Counters::default();
        for n in nodes {
            let c = counters(&self.http, &n.admin).await.ok_or_else(|| {
                HarnessError::Http(format!("{}: /metrics did not answer", n.name))
            })?;
            sum.add(&c);
        }
        Ok(sum)
    }

    async fn catalog_requests(&self) -> Result<u64, HarnessError> {
        Ok(self.fake.stats().await?["total"].as_u64().unwrap_or(0))
    }

    /// One measured window with churn on, marked changes followed to
    /// every leaf, then a quiet stretch with churn off.
    async fn window(
        &mut self,
        topology: &'static str,
        config: &'static str,
        churn: &Churn,
    ) -> Result<Window, HarnessError> {
        let mut rng = StdRng::seed_from_u64(self.rng.random());
        step(
            self.origin,
            &format!(
                "{topology} / {config}: measuring {} with churn, then {} quiet",
                secs(self.opts.duration),
                secs(self.opts.quiet())
            ),
        );
        let on_catalog: Vec<&Node> = if topology == "tiered" {
            self.tiers.iter().collect()
        } else {
            self.leaves.iter().collect()
        };
        let behind: Vec<&Node> = if topology == "tiered" {
            self.leaves.iter().collect()
        } else {
            Vec::new()
        };
        churn.pause(false);
        let churn_before = churn.count();
        let catalog_before = self.catalog_requests().await?;
        let sync_before = self.sum_counters(&on_catalog).await?;
        let tier_before = self.sum_counters(&behind).await?;
        let started = Instant::now();
        let end = started + self.opts.duration;
        let (mut per_leaf, mut all_leaves, mut missed) = (Vec::new(), Vec::new(), 0);
        let leaves: Vec<(String, String)> = self
            .leaves
            .iter()
            .map(|l| (l.name.clone(), l.catalog_url()))
            .collect();
        let reach_within = self
            .opts
            .sync_interval
            .mul_f64(2.0 * (1.0 + self.opts.sync_jitter))
            * if topology == "tiered" { 2 } else { 1 }
            + Duration::from_secs(10);
        while Instant::now() + reach_within.min(self.opts.duration) / 2 < end {
            let target = self.pick_live_target(&mut rng);
            let Some(seen) = self.marked_change(&leaves, &target, reach_within).await? else {
                continue;
            };
            let reached: Vec<Duration> = seen.iter().flatten().copied().collect();
            missed += seen.len() - reached.len();
            if reached.len() == seen.len() {
                all_leaves.push(reached.iter().copied().max().unwrap_or_default());
            }
            per_leaf.extend(reached);
            let pause = rng.random_range(0.0..0.5) * self.opts.sync_interval.as_secs_f64();
            tokio::time::sleep(Duration::from_secs_f64(pause)).await;
        }
        tokio::time::sleep_until(end).await;
        let length = started.elapsed();
        let catalog_after = self.catalog_requests().await?;
        let sync_after = self.sum_counters(&on_catalog).await?;
        let tier_after = self.sum_counters(&behind).await?;
        let churn_after = churn.count();
        churn.pause(true);
        tokio::time::sleep(self.opts.quiet()).await;
        Ok(Window {
            topology,
            config,
            on_catalog: on_catalog.len(),
            length,
            catalog_requests: catalog_after.saturating_sub(catalog_before),
            catalog_sync: sync_after.minus(&sync_before),
            tier_sync: tier_after.minus(&tier_before),
            churn: ChurnCount {
                changed: churn_after.changed - churn_before.changed,
                added: churn_after.added - churn_before.added,
                deleted: churn_after.deleted - churn_before.deleted,
            },
            per_leaf,
            all_leaves,
            missed,
        })
    }

    fn pick_live_target(&self, rng: &mut StdRng) -> Target {
        let deleted = self.deleted.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let t = &self.targets[rng.random_range(0..self.targets.len())];
            if !deleted.contains(&t.uid) {
                return t.clone();
            }
        }
    }

    /// Touches `target` at the demo catalog (a new etag) and polls every
    /// leaf by name until it serves that etag: how long each took, `None`
    /// for a leaf that did not within `within`. `None` overall when the
    /// entity was gone (churn deleted it).
    async fn marked_change(
        &self,
        leaves: &[(String, String)],
        target: &Target,
        within: Duration,
    ) -> Result<Option<Vec<Option<Duration>>>, HarnessError> {
        let resp = self
            .http
            .post(format!(
                "http://{}/entities/{}/touch",
                self.fake.control,
                encode_segment(&target.uid)
            ))
            .send()
            .await
            .map_err(|e| HarnessError::Http(format!("touch: {e}")))?;
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|e| HarnessError::Http(format!("touch: {e}")))?;
        let Some(etag) = v["etag"].as_str().map(str::to_string) else {
            return Err(HarnessError::Http(format!("touch answered {v}")));
        };
        let touched = Instant::now();
        let poll = (self.opts.sync_interval / 40).max(Duration::from_millis(50));
        let mut tasks = Vec::new();
        for (_, base) in leaves {
            let url = format!(
                "{base}/entities/by-name/{}/{}/{}",
                encode_segment(&target.kind),
                encode_segment(&target.namespace),
                encode_segment(&target.name)
            );
            let (http, etag) = (self.http.clone(), etag.clone());
            tasks.push(Task::spawn(async move {
                while touched.elapsed() < within {
                    if let Some(v) = get_json(&http, &url).await {
                        if v["metadata"]["etag"].as_str() == Some(etag.as_str()) {
                            return Some(touched.elapsed());
                        }
                    }
                    tokio::time::sleep(poll).await;
                }
                None
            }));
        }
        let mut seen = Vec::with_capacity(tasks.len());
        for t in tasks {
            seen.push(t.join().await.flatten());
        }
        Ok(Some(seen))
    }

    /// SIGTERMs every leaf at once, starts them all again, and records
    /// when each one's first sync after the start completes.
    async fn storm(&mut self, checker: &Checker) -> Result<Storm, HarnessError> {
        step(
            self.origin,
            &format!(
                "restart storm: the leaves' sync phases over {}, then SIGTERM to all {}",
                secs(self.opts.sync_interval.mul_f64(1.0 + self.opts.sync_jitter)),
                self.leaves.len()
            ),
        );
        let admins: Vec<String> = self.leaves.iter().map(|l| l.admin.clone()).collect();
        let mut baseline = Vec::with_capacity(admins.len());
        for a in &admins {
            baseline.push(counters(&self.http, a).await.map_or(0, |c| c.syncs));
        }
        let watched = Instant::now();
        let before = self
            .next_syncs(
                &admins,
                &baseline,
                watched,
                self.opts.sync_interval.mul_f64(1.0 + self.opts.sync_jitter),
            )
            .await;
        checker.pause(true);
        let load = machine_load();
        let term = Instant::now();
        for l in &mut self.leaves {
            l.terminate();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.leaves.iter_mut().any(|l| !l.exited()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = Instant::now();
        for l in &mut self.leaves {
            l.start()?;
        }
        let within = self
            .opts
            .sync_interval
            .mul_f64(2.0 * (1.0 + self.opts.sync_jitter))
            + Duration::from_secs(15);
        let zero = vec![0; admins.len()];
        let after = self.next_syncs(&admins, &zero, started, within).await;
        self.wait_ready(self.leaves.iter().collect()).await?;
        checker.pause(false);
        let mut storm = Storm {
            leaves: self.leaves.len(),
            interval: self.opts.sync_interval,
            down_for: Duration::ZERO,
            before: before.iter().filter_map(|(_, s)| *s).collect(),
            first_syncs: Vec::new(),
            on_time: Vec::new(),
            missing: 0,
            load,
        };
        for ((_, last), (up, first)) in before.iter().zip(&after) {
            let Some(first) = first else {
                storm.missing += 1;
                continue;
            };
            storm.first_syncs.push(*first);
            let up = up.unwrap_or(*first);
            storm.down_for = storm.down_for.max(started + up - term);
            // Overdue: up again an interval or more after its last sync began.
            let overdue = match last {
                Some(last) => (started + up) - (watched + *last) >= self.opts.sync_interval,
                None => true,
            };
            if !overdue {
                storm.on_time.push(*first);
            }
        }
        Ok(storm)
    }

    /// For each node: when it first answered `/metrics`, and when its next
    /// sync began (its `syncs_total` passed its `baseline`; the sync's
    /// `duration_seconds` from `/status` taken off, so that a slow upstream
    /// does not move it), since `from`, polled every 50 ms for `within`
    /// (`None`: not in time).
    async fn next_syncs(
        &self,
        admins: &[String],
        baseline: &[u64],
        from: Instant,
        within: Duration,
    ) -> Vec<(Option<Duration>, Option<Duration>)> {
        let poll = Duration::from_millis(50);
        let mut tasks = Vec::new();
        for (admin, base) in admins.iter().zip(baseline) {
            let (http, admin, base) = (self.http.clone(), admin.clone(), *base);
            tasks.push(Task::spawn(async move {
                let mut up = None;
                while from.elapsed() < within {
                    if let Some(c) = counters(&http, &admin).await {
                        let at = from.elapsed();
                        up.get_or_insert(at);
                        if c.syncs > base {
                            let took = get_json(&http, &format!("http://{admin}/status"))
                                .await
                                .and_then(|s| s["last_sync"]["duration_seconds"].as_f64())
                                .unwrap_or(0.0);
                            let began = at.saturating_sub(Duration::from_secs_f64(took.max(0.0)));
                            return (up, Some(began));
                        }
                    }
                    tokio::time::sleep(poll).await;
                }
                (up, None)
            }));
        }
        let mut seen = Vec::new();
        for t in tasks {
            seen.push(t.join().await.unwrap_or((None, None)));
        }
        seen
    }

    /// The demo catalog refuses connections for `outage`; then every leaf
    /// must hold data confirmed after the outage ended.
    async fn catalog_outage(
        &mut self,
        topology: &'static str,
        checker: &Checker,
        churn: &Churn,
    ) -> Result<FaultRow, HarnessError> {
        step(
            self.origin,
            &format!(
                "{topology}: demo catalog refuses connections for {}",
                secs(self.opts.outage)
            ),
        );
        // The catalog keeps changing behind the outage.
        churn.pause(false);
        self.fake.set_faults(json!({"refuse": true})).await?;
        let watch = self.watch_ages(self.leaves.iter().collect());
        tokio::time::sleep(self.opts.outage).await;
        self.fake.clear_faults().await?;
        let ended = Instant::now();
        step(self.origin, &format!("{topology}: demo catalog back"));
        let recovered_after = self.recovery(self.leaves.iter().collect(), ended).await;
        churn.pause(true);
        let max_data_age = watch.stop().await;
        let reads = checker.take();
        Ok(FaultRow {
            event: "catalog outage (refuse)".into(),
            topology,
            held: self.opts.outage,
            reads,
            max_data_age,
            recovered_after,
        })
    }

    /// SIGKILLs the first tier, holds `outage`, starts it again on its data
    /// dir; then its leaves must hold data confirmed after the restart.
    async fn tier_outage(&mut self, checker: &Checker) -> Result<FaultRow, HarnessError> {
        let name = self.tiers[0].name.clone();
        step(
            self.origin,
            &format!("tiered: SIGKILL {name} for {}", secs(self.opts.outage)),
        );
        let tier_url = self.tiers[0].catalog_url();
        let behind: Vec<&Node> = self
            .leaves
            .iter()
            .filter(|l| l.upstream_url == tier_url)
            .collect();
        let watch = self.watch_ages(behind.clone());
        self.tiers[0].kill();
        tokio::time::sleep(self.opts.outage).await;
        self.tiers[0].start()?;
        let restarted = Instant::now();
        self.wait_ready(vec![&self.tiers[0]]).await?;
        step(self.origin, &format!("tiered: {name} restarted"));
        let behind: Vec<&Node> = self
            .leaves
            .iter()
            .filter(|l| l.upstream_url == tier_url)
            .collect();
        let recovered_after = self.recovery(behind, restarted).await;
        let max_data_age = watch.stop().await;
        let reads = checker.take();
        Ok(FaultRow {
            event: format!("{name} SIGKILL, restart"),
            topology: "tiered",
            held: self.opts.outage,
            reads,
            max_data_age,
            recovered_after,
        })
    }

    /// Samples the nodes' `/status` data age every second; the largest.
    fn watch_ages(&self, nodes: Vec<&Node>) -> AgeWatch {
        let admins: Vec<String> = nodes.iter().map(|n| n.admin.clone()).collect();
        let http = self.http.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = Task::spawn(async move {
            let mut max = 0.0f64;
            while !flag.load(Ordering::Relaxed) {
                for a in &admins {
                    if let Some(s) = get_json(&http, &format!("http://{a}/status")).await {
                        if let Some(age) = s["mirror"]["data_age_seconds"].as_f64() {
                            max = max.max(age);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            max
        });
        AgeWatch { stop, task }
    }

    /// Waits until every node's data was confirmed by the origin after
    /// `since` (its data age is less than the time since then); how long
    /// that took, `None` past the deadline.
    async fn recovery(&self, nodes: Vec<&Node>, since: Instant) -> Option<Duration> {
        let within = self.opts.sync_interval.mul_f64(3.0)
            + self.timings.max_open * 2
            + Duration::from_secs(30);
        let mut waiting: Vec<&Node> = nodes;
        loop {
            let mut still = Vec::new();
            for n in waiting {
                let fresh = get_json(&self.http, &format!("http://{}/status", n.admin))
                    .await
                    .and_then(|s| s["mirror"]["data_age_seconds"].as_f64())
                    .is_some_and(|age| age < since.elapsed().as_secs_f64());
                if !fresh {
                    still.push(n);
                }
            }
            waiting = still;
            if waiting.is_empty() {
                return Some(since.elapsed());
            }
            if since.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

struct AgeWatch {
    stop: Arc<AtomicBool>,
    task: Task<f64>,
}

impl AgeWatch {
    async fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.join().await.unwrap_or(0.0)
    }
}

// ------------------------------------------------------------- the model

/// Measured per-sync costs, per entity where they grow with the catalog.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UnitCosts {
    /// Bytes per entity of a full walk of the demo catalog.
    pub full_per_entity: f64,
    /// Bytes per entity of an id-walk of the demo catalog.
    pub id_per_entity: f64,
    /// Bytes per entity fetched with by-refs.
    pub ref_per_entity: f64,
    /// Bytes of the generation probe a full cycle sends the demo catalog
    /// (a 404 there).
    pub probe_bytes: f64,
    /// Bytes per entity of a leaf's full walk of a tier.
    pub tier_full_per_entity: f64,
    /// Bytes per change (entity or tombstone) of a tier's changes feed.
    pub change_per_entity: f64,
    /// Bytes of a tier's generation answer (200).
    pub generation_bytes: f64,
    /// Bytes of a tier's 304.
    pub not_modified_bytes: f64,
}

impl UnitCosts {
    /// The unit costs from attributed syncs; a cost with no sample stays 0
    /// (and the report says so).
    pub fn from_samples(samples: &[SyncSample]) -> UnitCosts {
        let ratio = |num: u64, den: u64| {
            if den == 0 {
                0.0
            } else {
                num as f64 / den as f64
            }
        };
        let sum = |pick: &dyn Fn(&SyncSample) -> bool, f: &dyn Fn(&SyncSample) -> u64| -> u64 {
            samples.iter().filter(|s| pick(s)).map(f).sum()
        };
        let origin_full = |s: &SyncSample| !s.via_tier && s.method == "full_walk";
        let origin_id = |s: &SyncSample| !s.via_tier && s.method == "id_walk";
        let origin_id_fetch = |s: &SyncSample| origin_id(s) && s.fetched > 0;
        let tier_full = |s: &SyncSample| s.via_tier && s.method == "full_walk";
        let tier_changes = |s: &SyncSample| s.via_tier && s.method == "changes";
        let tier_304 = |s: &SyncSample| s.via_tier && s.method == "not_modified";
        UnitCosts {
            full_per_entity: ratio(
                sum(&origin_full, &|s| s.traffic.bytes[FULL_PAGE]),
                sum(&origin_full, &|s| s.entities),
            ),
            id_per_entity: ratio(
                sum(&origin_id, &|s| s.traffic.bytes[ID_WALK]),
                sum(&origin_id, &|s| s.entities),
            ),
            ref_per_entity: ratio(
                sum(&origin_id_fetch, &|s| s.traffic.bytes[BY_REFS]),
                sum(&origin_id_fetch, &|s| s.fetched),
            ),
            probe_bytes: ratio(
                sum(&origin_full, &|s| s.traffic.bytes[GENERATION]),
                sum(&origin_full, &|s| s.traffic.requests[GENERATION]),
            ),
            tier_full_per_entity: ratio(
                sum(&tier_full, &|s| s.traffic.bytes[FULL_PAGE]),
                sum(&tier_full, &|s| s.entities),
            ),
            change_per_entity: ratio(
                sum(&tier_changes, &|s| s.traffic.bytes[CHANGES]),
                sum(&tier_changes, &|s| s.moved()),
            ),
            generation_bytes: ratio(
                sum(&tier_changes, &|s| s.traffic.bytes[GENERATION]),
                sum(&tier_changes, &|s| s.traffic.requests[GENERATION]),
            ),
            not_modified_bytes: ratio(
                sum(&tier_304, &|s| s.traffic.bytes[NOT_MODIFIED]),
                sum(&tier_304, &|s| s.traffic.requests[NOT_MODIFIED]),
            ),
        }
    }
}

/// Requests and bytes of one sync cycle of one sidecar.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cost {
    /// Requests.
    pub requests: f64,
    /// Bytes received.
    pub bytes: f64,
}

impl Cost {
    fn blend(a: Cost, b: Cost, share_of_b: f64) -> Cost {
        Cost {
            requests: a.requests * (1.0 - share_of_b) + b.requests * share_of_b,
            bytes: a.bytes * (1.0 - share_of_b) + b.bytes * share_of_b,
        }
    }

    fn times(self, k: f64) -> Cost {
        Cost {
            requests: self.requests * k,
            bytes: self.bytes * k,
        }
    }
}

fn pages(n: f64, per_page: u64) -> f64 {
    (n / per_page.max(1) as f64).ceil()
}

/// One sync cycle of a sidecar whose upstream is the Backstage catalog,
/// `moved` entities having changed since its last sync.
pub fn origin_cycle(u: &UnitCosts, s: &Scale, full_sync_every: u64, moved: f64) -> Cost {
    let n = s.entities as f64;
    let fetched = moved * (CHURN_SPLIT.0 + CHURN_SPLIT.1);
    // A full cycle also probes the upstream for the tier extension (404).
    let full = Cost {
        requests: pages(n, s.page_size) + 1.0,
        bytes: n * u.full_per_entity + u.probe_bytes,
    };
    if full_sync_every <= 1 {
        return full;
    }
    let id = Cost {
        requests: pages(n, s.id_page_size) + pages(fetched, REFS_PER_REQUEST),
        bytes: n * u.id_per_entity + fetched * u.ref_per_entity,
    };
    Cost::blend(id, full, 1.0 / full_sync_every as f64)
}

/// One sync cycle of a leaf whose upstream is a tier, `moved` entities
/// having changed since its last sync: a 304 when nothing moved, else the
/// generation and the changes feed, and on every `full_sync_every`-th
/// cycle a full walk of the tier instead of the feed.
pub fn tier_leaf_cycle(u: &UnitCosts, s: &Scale, moved: f64) -> Cost {
    if moved <= 0.0 {
        return Cost {
            requests: 1.0,
            bytes: u.not_modified_bytes,
        };
    }
    let n = s.entities as f64;
    let follow = Cost {
        requests: 1.0 + pages(moved, REFS_PER_REQUEST),
        bytes: u.generation_bytes + moved * u.change_per_entity,
    };
    let full = Cost {
        requests: 1.0 + pages(n, s.page_size),
        bytes: u.generation_bytes + n * u.tier_full_per_entity,
    };
    Cost::blend(follow, full, 1.0 / s.full_sync_every.max(1) as f64)
}

/// One row of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRow {
    /// `direct` or `tiered`.
    pub topology: &'static str,
    /// How the sidecars on the catalog sync.
    pub method: &'static str,
    /// `unchanged` or the churn rate.
    pub catalog: String,
    /// At the Backstage catalog, a minute.
    pub origin: Cost,
    /// At each tier (what its leaves ask of it), a minute; zero when direct.
    pub per_tier: Cost,
}

/// Extrapolates the unit costs to `s`: direct with full walks, direct with
/// id-walks, and tiered, each with an unchanged catalog and with churn.
pub fn model(u: &UnitCosts, s: &Scale) -> Vec<ModelRow> {
    let per_min = s.cycles_per_minute();
    let leaves = s.sidecars as f64;
    let tiers = s.tiers.max(1) as f64;
    let mut rows = Vec::new();
    for (catalog, moved) in [
        ("unchanged".to_string(), 0.0),
        (
            format!("{}% churn/min", s.churn_per_minute * 100.0),
            s.churn_per_cycle(),
        ),
    ] {
        rows.push(ModelRow {
            topology: "direct",
            method: "full walk every cycle",
            catalog: catalog.clone(),
            origin: origin_cycle(u, s, 1, moved).times(leaves * per_min),
            per_tier: Cost::default(),
        });
        rows.push(ModelRow {
            topology: "direct",
            method: "id-walk (full every 10)",
            catalog: catalog.clone(),
            origin: origin_cycle(u, s, s.full_sync_every, moved).times(leaves * per_min),
            per_tier: Cost::default(),
        });
        rows.push(ModelRow {
            topology: "tiered",
            method: "tiers id-walk, leaves follow",
            catalog,
            origin: origin_cycle(u, s, s.full_sync_every, moved).times(tiers * per_min),
            per_tier: tier_leaf_cycle(u, s, moved).times(leaves / tiers * per_min),
        });
    }
    rows
}

// ------------------------------------------------------------- rendering

/// `1.5 KiB`, `12.0 MiB`, `3.2 GiB`.
pub fn bytes_text(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

/// `12,345` (thousands separated), `0.3` below 10.
pub fn count_text(v: f64) -> String {
    if v < 10.0 {
        return format!("{v:.1}");
    }
    let digits = format!("{:.0}", v);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn dur_text(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// The per-sync cost rows: (upstream, method, catalog, syncs, moved per
/// sync, requests per sync, bytes per sync, bytes per entity moved or
/// listed).
fn cost_rows(samples: &[SyncSample]) -> Vec<Vec<String>> {
    let groups: [(&str, bool, &str, bool); 7] = [
        ("demo catalog", false, "full_walk", true),
        ("demo catalog", false, "id_walk", false),
        ("demo catalog", false, "id_walk", true),
        ("tier", true, "not_modified", false),
        ("tier", true, "changes", true),
        ("tier", true, "full_walk", true),
        ("tier", true, "id_walk", true),
    ];
    let mut rows = Vec::new();
    for (upstream, via_tier, method, moved) in groups {
        let picked: Vec<&SyncSample> = samples
            .iter()
            .filter(|s| s.via_tier == via_tier && s.method == method)
            .filter(|s| {
                method == "full_walk" || method == "not_modified" || (s.moved() > 0) == moved
            })
            .collect();
        if picked.is_empty() {
            continue;
        }
        let k = picked.len() as f64;
        let total =
            |f: &dyn Fn(&SyncSample) -> u64| picked.iter().map(|s| f(s)).sum::<u64>() as f64;
        let requests = total(&|s| s.traffic.total_requests()) / k;
        let bytes = total(&|s| s.traffic.total_bytes()) / k;
        let moved_avg = total(&|s| s.moved()) / k;
        let listed = total(&|s| s.entities) / k;
        let catalog = if method == "full_walk" {
            "any".to_string()
        } else if moved {
            "changed".to_string()
        } else {
            "unchanged".to_string()
        };
        let per_entity = match method {
            "full_walk" | "id_walk" if listed > 0.0 => {
                format!("{:.0} B/entity listed", bytes / listed)
            }
            "changes" if moved_avg > 0.0 => format!("{:.0} B/entity moved", bytes / moved_avg),
            _ => "-".into(),
        };
        rows.push(vec![
            upstream.to_string(),
            method.replace('_', "-"),
            catalog,
            format!("{}", picked.len()),
            format!("{moved_avg:.1}"),
            format!("{requests:.1}"),
            bytes_text(bytes),
            per_entity,
        ]);
    }
    rows
}

/// The whole report as text: the run's own figures, then the MODEL.
pub fn render(r: &FleetReport) -> String {
    let o = &r.options;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "catalog-chaos fleet{}: {} entities, {} tiers, {} leaves; sync_interval {} (±{:.0}%), fresh_for {}, churn {}%/min in steps of {}; windows of {} (+{} quiet); outages {}",
        if o.quick { " --quick" } else { "" },
        r.entities,
        o.tiers,
        o.leaves,
        secs(o.sync_interval),
        o.sync_jitter * 100.0,
        secs(o.fresh_for),
        o.churn_per_minute * 100.0,
        secs(o.churn_step),
        secs(o.duration),
        secs(o.quiet()),
        secs(o.outage),
    );
    let _ = writeln!(out, "\nMEASURED: load on the demo catalog and propagation of a change (per minute over each window)");
    let header = [
        "topology",
        "sync",
        "on catalog",
        "catalog req/min",
        "sync req/min",
        "sync bytes/min",
        "tiers serve req/min",
        "tiers serve bytes/min",
        "churned",
        "change→leaf p50",
        "p99",
        "→every leaf p50",
        "max",
    ];
    let rows: Vec<Vec<String>> = r
        .windows
        .iter()
        .map(|w| {
            let tiered = w.topology == "tiered";
            vec![
                w.topology.to_string(),
                w.config.to_string(),
                format!("{}", w.on_catalog),
                count_text(w.per_minute(w.catalog_requests)),
                count_text(w.per_minute(w.catalog_sync.total_requests())),
                bytes_text(w.per_minute(w.catalog_sync.total_bytes())),
                if tiered {
                    count_text(w.per_minute(w.tier_sync.total_requests()))
                } else {
                    "-".into()
                },
                if tiered {
                    bytes_text(w.per_minute(w.tier_sync.total_bytes()))
                } else {
                    "-".into()
                },
                format!("{}", w.churn.changed + w.churn.added + w.churn.deleted),
                dur_text(percentile(&w.per_leaf, 50.0)),
                dur_text(percentile(&w.per_leaf, 99.0)),
                dur_text(percentile(&w.all_leaves, 50.0)),
                dur_text(w.all_leaves.iter().copied().max().unwrap_or_default()),
            ]
        })
        .collect();
    out.push_str(&render_grid(&header, &rows, &[]));
    for w in &r.windows {
        let _ = writeln!(
            out,
            "  {} / {}: {} marked changes followed to every leaf ({} leaf answers), {} leaf answers missed",
            w.topology,
            w.config,
            w.all_leaves.len(),
            w.per_leaf.len(),
            w.missed
        );
    }

    let _ = writeln!(
        out,
        "\nMEASURED: cost of one sync of one sidecar (every sync attributed from its counters)"
    );
    let header = [
        "upstream",
        "method",
        "catalog",
        "syncs",
        "entities moved/sync",
        "requests/sync",
        "bytes/sync",
        "unit",
    ];
    out.push_str(&render_grid(&header, &cost_rows(&r.samples), &[]));

    let _ = writeln!(
        out,
        "\nMEASURED: faults (a checker reads known entities from random leaves throughout)"
    );
    let header = [
        "event",
        "topology",
        "held",
        "reads",
        "failed",
        "stale answers",
        "max Age fresh",
        "max Age stale",
        "max leaf data age",
        "recovered after",
        "verdict",
    ];
    let mut rows = Vec::new();
    let fresh = o.fresh_for.as_secs();
    for f in &r.faults {
        let failed = f.reads.real_failures(&r.deleted).len();
        let ok = failed == 0 && f.reads.violations.is_empty();
        rows.push(vec![
            f.event.clone(),
            f.topology.to_string(),
            secs(f.held),
            format!("{}", f.reads.reads),
            format!("{failed}"),
            format!("{}", f.reads.stale),
            format!("{}s", f.reads.max_fresh_age),
            format!("{}s", f.reads.max_stale_age),
            format!("{:.0}s", f.max_data_age),
            f.recovered_after
                .map(dur_text)
                .unwrap_or_else(|| "not in time".into()),
            if ok { "PASS" } else { "FAIL" }.into(),
        ]);
    }
    let failed = r.failed_reads().len();
    rows.push(vec![
        "whole run".into(),
        "all".into(),
        secs(r.took),
        format!("{}", r.reads.reads),
        format!("{failed}"),
        format!("{}", r.reads.stale),
        format!("{}s", r.reads.max_fresh_age),
        format!("{}s", r.reads.max_stale_age),
        "-".into(),
        "-".into(),
        if r.passed() { "PASS" } else { "FAIL" }.into(),
    ]);
    out.push_str(&render_grid(&header, &rows, &[]));
    let _ = writeln!(
        out,
        "  invariant 1, no answer marked X-Catalog-Stale: false with Age > fresh_for ({fresh}s): {} ({} violation(s))",
        if r.violations().is_empty() { "held" } else { "BROKEN" },
        r.violations().len()
    );
    for v in r.violations().iter().take(5) {
        let _ = writeln!(out, "    {v}");
    }
    let _ = writeln!(
        out,
        "  invariant 2, reads of entities the catalog holds succeed (stale allowed): {} ({failed} failed of {} reads; {} reads of entities churn deleted not counted)",
        if failed == 0 { "held" } else { "BROKEN" },
        r.reads.reads,
        r.reads.failures.len() - failed
    );
    for (leaf, uid, what) in r.failed_reads().iter().take(5) {
        let _ = writeln!(out, "    {leaf}: uid {uid}: {what}");
    }

    if let Some(s) = &r.storm {
        let mut sorted = s.first_syncs.clone();
        sorted.sort_unstable();
        let tenth = dur_text(s.interval / 10);
        let _ = writeln!(
            out,
            "\nMEASURED: restart storm (SIGTERM to all {} direct leaves, started again at once; down {} at most{})",
            s.leaves,
            dur_text(s.down_for),
            s.load
                .map(|(l, n)| format!("; machine load average {l:.1} on {n} CPUs"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "  before: each leaf's next sync began, per tenth of the {} interval: {:?} (at most {} within any {tenth})",
            secs(s.interval),
            s.histogram_before(),
            s.largest_burst_before(),
        );
        let _ = writeln!(
            out,
            "  after: first syncs began at min {} p50 {} max {} after the start, per tenth of the interval: {:?} (at most {} within any {tenth})",
            dur_text(sorted.first().copied().unwrap_or_default()),
            dur_text(percentile(&sorted, 50.0)),
            dur_text(sorted.last().copied().unwrap_or_default()),
            s.histogram(),
            s.largest_burst(),
        );
        let _ = writeln!(
            out,
            "  {} leaves were overdue when up again (last sync an interval or more before: they sync at once, by design); the other {}: at most {} within any {tenth}: {}",
            s.overdue(),
            s.on_time.len(),
            s.largest_burst_on_time(),
            match s.spread() {
                Some(true) => "spread, not a wave".to_string(),
                Some(false) => format!("a WAVE ({} leaves did not sync in time)", s.missing),
                None => "too few on time to tell (the interval is short for the restart's downtime)".to_string(),
            },
        );
    }

    let u = UnitCosts::from_samples(&r.samples);
    let here = Scale {
        sidecars: o.leaves as u64,
        entities: r.entities as u64,
        tiers: o.tiers as u64,
        interval: o.sync_interval,
        churn_per_minute: o.churn_per_minute,
        ..o.scale
    };
    let _ = writeln!(
        out,
        "\nMEASURED unit costs: full walk {:.0} B/entity, id-walk {:.1} B/entity, by-refs {:.0} B/entity fetched, probe {:.0} B; from a tier: full walk {:.0} B/entity, changes {:.0} B/change, generation {:.0} B, 304 {:.0} B",
        u.full_per_entity,
        u.id_per_entity,
        u.ref_per_entity,
        u.probe_bytes,
        u.tier_full_per_entity,
        u.change_per_entity,
        u.generation_bytes,
        u.not_modified_bytes
    );
    let _ = writeln!(out, "  the model at this run's own scale (churn on, per minute at the demo catalog): direct full walk {} req {}, direct id-walk {} req {}, tiered {} req {}",
        count_text(origin_cycle(&u, &here, 1, here.churn_per_cycle()).times(here.sidecars as f64 * here.cycles_per_minute()).requests),
        bytes_text(origin_cycle(&u, &here, 1, here.churn_per_cycle()).times(here.sidecars as f64 * here.cycles_per_minute()).bytes),
        count_text(origin_cycle(&u, &here, here.full_sync_every, here.churn_per_cycle()).times(here.sidecars as f64 * here.cycles_per_minute()).requests),
        bytes_text(origin_cycle(&u, &here, here.full_sync_every, here.churn_per_cycle()).times(here.sidecars as f64 * here.cycles_per_minute()).bytes),
        count_text(origin_cycle(&u, &here, here.full_sync_every, here.churn_per_cycle()).times(here.tiers as f64 * here.cycles_per_minute()).requests),
        bytes_text(origin_cycle(&u, &here, here.full_sync_every, here.churn_per_cycle()).times(here.tiers as f64 * here.cycles_per_minute()).bytes),
    );
    out.push_str(&render_model(&u, &o.scale));
    let _ = writeln!(out, "\ntotal {:.0}s", r.took.as_secs_f64());
    out
}

/// The MODEL table and its assumptions.
pub fn render_model(u: &UnitCosts, s: &Scale) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nMODEL (extrapolated from the unit costs above, not measured): {} sidecars × {} entities, {} regional tiers, sync_interval {}, full walk every {} cycles, pages of {} (ids {}), churn {}%/min ({} entities a cycle)",
        count_text(s.sidecars as f64),
        count_text(s.entities as f64),
        s.tiers,
        secs(s.interval),
        s.full_sync_every,
        s.page_size,
        s.id_page_size,
        s.churn_per_minute * 100.0,
        count_text(s.churn_per_cycle()),
    );
    let header = [
        "topology",
        "sync",
        "catalog",
        "Backstage req/min",
        "Backstage bytes/min",
        "each tier serves req/min",
        "each tier serves bytes/min",
    ];
    let rows: Vec<Vec<String>> = model(u, s)
        .iter()
        .map(|m| {
            let tiered = m.topology == "tiered";
            vec![
                m.topology.to_string(),
                m.method.to_string(),
                m.catalog.clone(),
                count_text(m.origin.requests),
                bytes_text(m.origin.bytes),
                if tiered {
                    count_text(m.per_tier.requests)
                } else {
                    "-".into()
                },
                if tiered {
                    bytes_text(m.per_tier.bytes)
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    out.push_str(&render_grid(&header, &rows, &[]));
    let _ = writeln!(
        out,
        "  bytes are as received (the demo catalog does not compress; a tier compresses its answers); every sidecar's syncs are assumed spread over the interval; propagation through a tier adds up to one sync interval"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sync of `method` over `(entities, fetched, removed)` that
    /// received `(bytes, requests)` of `kind`.
    fn sample(
        via_tier: bool,
        method: &str,
        (entities, fetched, removed): (u64, u64, u64),
        kind: usize,
        (bytes, requests): (u64, u64),
    ) -> SyncSample {
        let mut traffic = Counters::default();
        traffic.bytes[kind] = bytes;
        traffic.requests[kind] = requests;
        traffic.syncs = 1;
        SyncSample {
            node: "leaf-1".into(),
            via_tier,
            role: Role::Leaf,
            method: method.into(),
            entities,
            fetched,
            removed,
            traffic,
        }
    }

    #[test]
    fn counters_parse_prometheus_text() {
        let text = "# HELP catalog_cache_sync_bytes_total Bytes.\n\
            # TYPE catalog_cache_sync_bytes_total counter\n\
            catalog_cache_sync_bytes_total{kind=\"id_walk\"} 1500\n\
            catalog_cache_sync_bytes_total{kind=\"by_refs\"} 700\n\
            catalog_cache_sync_requests_total{kind=\"id_walk\"} 3\n\
            catalog_cache_sync_requests_total{kind=\"not_modified\"} 2\n\
            catalog_cache_syncs_total{result=\"applied\"} 4\n\
            catalog_cache_syncs_total{result=\"unchanged\"} 1\n\
            catalog_cache_requests_total{route=\"by_name\",outcome=\"hit\"} 99\n";
        let c = Counters::parse(text);
        assert_eq!(c.bytes[ID_WALK], 1500);
        assert_eq!(c.bytes[BY_REFS], 700);
        assert_eq!(c.requests[ID_WALK], 3);
        assert_eq!(c.requests[NOT_MODIFIED], 2);
        assert_eq!(c.syncs, 5);
        assert_eq!(c.total_bytes(), 2200);
        let later = Counters { syncs: 6, ..c };
        assert_eq!(later.minus(&c).syncs, 1);
        assert_eq!(c.minus(&later).syncs, 0, "a counter that went back gives 0");
    }

    #[test]
    fn unit_costs_come_from_the_attributed_syncs() {
        let samples = vec![
            sample(false, "full_walk", (1000, 0, 0), FULL_PAGE, (1_400_000, 2)),
            sample(false, "id_walk", (1000, 0, 0), ID_WALK, (150_000, 1)),
            {
                let mut s = sample(false, "id_walk", (1000, 10, 0), ID_WALK, (150_000, 1));
                s.traffic.bytes[BY_REFS] = 14_000;
                s.traffic.requests[BY_REFS] = 1;
                s
            },
            {
                let mut s = sample(true, "changes", (1000, 8, 2), CHANGES, (12_000, 1));
                s.traffic.bytes[GENERATION] = 200;
                s.traffic.requests[GENERATION] = 1;
                s
            },
            sample(true, "not_modified", (1000, 0, 0), NOT_MODIFIED, (0, 1)),
            sample(true, "full_walk", (1000, 0, 0), FULL_PAGE, (300_000, 2)),
        ];
        let u = UnitCosts::from_samples(&samples);
        assert_eq!(u.full_per_entity, 1400.0);
        assert_eq!(u.id_per_entity, 150.0);
        assert_eq!(u.ref_per_entity, 1400.0);
        assert_eq!(u.change_per_entity, 1200.0);
        assert_eq!(u.generation_bytes, 200.0);
        assert_eq!(u.not_modified_bytes, 0.0);
        assert_eq!(u.tier_full_per_entity, 300.0);
        assert_eq!(UnitCosts::from_samples(&[]), UnitCosts::default());
    }

    fn units() -> UnitCosts {
        UnitCosts {
            full_per_entity: 1400.0,
            id_per_entity: 150.0,
            ref_per_entity: 1400.0,
            probe_bytes: 100.0,
            tier_full_per_entity: 300.0,
            change_per_entity: 1300.0,
            generation_bytes: 200.0,
            not_modified_bytes: 0.0,
        }
    }

    #[test]
    fn a_cycle_costs_what_its_method_reads() {
        let u = units();
        let s = Scale::default();
        assert_eq!(s.churn_per_cycle(), 1000.0);
        // Full walk: 200 pages of 500 and the probe.
        let full = origin_cycle(&u, &s, 1, 1000.0);
        assert_eq!(full.requests, 201.0);
        assert_eq!(full.bytes, 100_000.0 * 1400.0 + 100.0);
        // Id-walk, unchanged: 20 pages of 5,000 ids; one cycle in ten is full.
        let id = origin_cycle(&u, &s, 10, 0.0);
        assert!((id.requests - (0.9 * 20.0 + 0.1 * 201.0)).abs() < 1e-9);
        assert!((id.bytes - (0.9 * 15_000_000.0 + 0.1 * (140_000_000.0 + 100.0))).abs() < 1e-3);
        // With churn, 900 of the 1,000 moved entities are fetched by-refs
        // (deletions are not), in one request.
        let churned = origin_cycle(&u, &s, 10, 1000.0);
        assert!((churned.requests - id.requests - 0.9).abs() < 1e-9);
        assert!((churned.bytes - id.bytes - 0.9 * 900.0 * 1400.0).abs() < 1e-3);
        // Behind a tier: a 304 when nothing moved.
        assert_eq!(
            tier_leaf_cycle(&u, &s, 0.0),
            Cost {
                requests: 1.0,
                bytes: 0.0
            }
        );
        let follow = tier_leaf_cycle(&u, &s, 1000.0);
        let expected_bytes = 0.9 * (200.0 + 1000.0 * 1300.0) + 0.1 * (200.0 + 100_000.0 * 300.0);
        assert!((follow.bytes - expected_bytes).abs() < 1e-3);
        assert!((follow.requests - (0.9 * 2.0 + 0.1 * 201.0)).abs() < 1e-9);
    }

    #[test]
    fn the_model_scales_by_sidecars_tiers_and_cycles() {
        let u = units();
        let s = Scale {
            interval: Duration::from_secs(30),
            ..Scale::default()
        };
        let rows = model(&u, &s);
        assert_eq!(rows.len(), 6);
        let per_cycle = origin_cycle(&u, &s, 10, 0.0);
        let direct = &rows[1];
        assert_eq!(direct.topology, "direct");
        assert!((direct.origin.bytes - per_cycle.bytes * 1000.0 * 2.0).abs() < 1.0);
        let tiered = &rows[2];
        assert_eq!(tiered.topology, "tiered");
        assert!((tiered.origin.bytes - per_cycle.bytes * 10.0 * 2.0).abs() < 1.0);
        assert_eq!(tiered.per_tier.requests, 100.0 * 2.0);
        // Tiering divides what the catalog serves by leaves per tier.
        assert!((direct.origin.bytes / tiered.origin.bytes - 100.0).abs() < 1e-6);
        assert!(rows[3].catalog.contains("churn"));
        assert!(rows[3].origin.bytes > rows[0].origin.bytes - 1.0);
    }

    #[test]
    fn the_storm_tells_a_spread_from_a_wave() {
        let interval = Duration::from_secs(10);
        let spread_out: Vec<Duration> = (0..20)
            .map(|i| Duration::from_millis(250 + i * 490))
            .collect();
        let spread = Storm {
            leaves: 20,
            interval,
            down_for: Duration::from_secs(1),
            before: spread_out.clone(),
            first_syncs: spread_out.clone(),
            on_time: spread_out[2..].to_vec(),
            missing: 0,
            load: None,
        };
        assert_eq!(spread.overdue(), 2);
        assert!(spread.largest_burst() <= 3);
        assert_eq!(spread.spread(), Some(true));
        assert_eq!(spread.histogram().iter().sum::<usize>(), 20);
        let bunched: Vec<Duration> = (0..20)
            .map(|i| Duration::from_millis(300 + i * 10))
            .collect();
        let wave = Storm {
            first_syncs: bunched.clone(),
            on_time: bunched,
            ..spread.clone()
        };
        assert_eq!(wave.largest_burst(), 20);
        assert_eq!(wave.spread(), Some(false));
        assert_eq!(wave.histogram()[0], 20);
        assert_eq!(wave.largest_burst_before(), spread.largest_burst_before());
        let all_overdue = Storm {
            on_time: Vec::new(),
            ..spread.clone()
        };
        assert_eq!(all_overdue.spread(), None);
        let missing = Storm {
            missing: 1,
            ..spread
        };
        assert_eq!(missing.spread(), Some(false));
    }

    #[test]
    fn texts() {
        assert_eq!(bytes_text(512.0), "512 B");
        assert_eq!(bytes_text(1536.0), "1.5 KiB");
        assert_eq!(bytes_text(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(count_text(1234567.0), "1,234,567");
        assert_eq!(count_text(0.3), "0.3");
        assert_eq!(count_text(100.0), "100");
    }

    #[test]
    fn options_are_checked() {
        let mut o = FleetOptions::new(true, PathBuf::from("catalog-cache"));
        assert!(o.validate().is_ok());
        o.outage = o.fresh_for;
        assert!(o.validate().is_err());
        let mut o = FleetOptions::new(false, PathBuf::from("catalog-cache"));
        assert!(o.validate().is_ok());
        o.tiers = o.leaves + 1;
        assert!(o.validate().is_err());
    }
}
