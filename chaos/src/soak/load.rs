//! The soak's client load and the judge of every read.
//!
//! Readers mix entity reads (by name, by uid, by refs), queries (filters,
//! ordering), full-text searches and read-through reads (`/ancestry`, the
//! one kind the mirror cannot answer itself); a pager walks the catalog by
//! cursor, a page every so often, so that its sessions span syncs. Each
//! read is judged the moment it ends against the [`Windows`] the
//! controller records (restarts, stale-policy flips), which the controller
//! opens inside the same lock before it acts: a read that ended before a
//! window was opened never overlaps it. Tallies go to the interval the
//! sampler is filling and to the run's totals.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::scenario::{encode_segment, http_client, Target, Timings, READER_PAUSE, READ_MARGIN};

/// What a read asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `GET /entities/by-name/...`.
    ByName,
    /// `GET /entities/by-uid/...`.
    ByUid,
    /// `POST /entities/by-refs` with three refs.
    ByRefs,
    /// `GET /entities/by-query` with a filter and an order.
    Query,
    /// `GET /entities/by-query` with `fullTextFilterTerm`.
    Search,
    /// One page of a cursor paging session.
    Page,
    /// `GET /entities/by-name/.../ancestry` (read-through; not a mirrored read).
    ReadThrough,
}

/// Every kind, in CSV column order.
pub const KINDS: [Kind; 7] = [
    Kind::ByName,
    Kind::ByUid,
    Kind::ByRefs,
    Kind::Query,
    Kind::Search,
    Kind::Page,
    Kind::ReadThrough,
];

impl Kind {
    /// Its CSV and table name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ByName => "by_name",
            Kind::ByUid => "by_uid",
            Kind::ByRefs => "by_refs",
            Kind::Query => "query",
            Kind::Search => "search",
            Kind::Page => "page",
            Kind::ReadThrough => "read_through",
        }
    }

    /// Whether the mirror answers it (so it must succeed while stale
    /// serving is allowed, within the revalidate budget).
    pub fn mirrored(self) -> bool {
        self != Kind::ReadThrough
    }

    fn index(self) -> usize {
        KINDS.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// One read as the client saw it.
#[derive(Debug, Clone)]
pub struct Read {
    /// What was asked.
    pub kind: Kind,
    /// Start, since the origin.
    pub at: Duration,
    /// How long it took.
    pub latency: Duration,
    /// HTTP status, 0 for a transport error.
    pub status: u16,
    /// `X-Catalog-Stale` as sent.
    pub stale: Option<bool>,
    /// Whether `X-Catalog-Stale` and `Cache-Status` agree (`ttl=-` exactly
    /// when stale).
    pub marked_ok: bool,
    /// `Age`, seconds.
    pub age: Option<u64>,
    /// `Cache-Status` says the answer was revalidated (`fwd=stale`).
    pub revalidated: bool,
    /// The answer holds what was asked.
    pub ok: bool,
    /// Uids asked for and answered absent (404, or `null` in by-refs).
    pub absent: Vec<String>,
    /// Why it is wrong beyond its status (e.g. a uid twice in one paging
    /// session).
    pub problem: Option<String>,
}

impl Read {
    /// When it ended, since the origin.
    pub fn end(&self) -> Duration {
        self.at + self.latency
    }
}

/// A stale-policy flip to `refuse` and back, as the admin API saw it.
#[derive(Debug, Clone, Default)]
pub struct PolicyWindow {
    /// `PUT /admin/stale {refuse}` sent.
    pub sent: Duration,
    /// ... acknowledged.
    pub acked: Option<Duration>,
    /// `PUT /admin/stale {serve}` sent.
    pub back_sent: Option<Duration>,
    /// ... acknowledged.
    pub back_acked: Option<Duration>,
}

/// The times reads are judged against; opened by the controller inside
/// the lock, before it acts.
#[derive(Debug, Default)]
pub struct Windows {
    /// Sidecar restarts: from the signal to ready again.
    pub restarts: Vec<(Duration, Option<Duration>)>,
    /// Stale policy `refuse` windows.
    pub refuse: Vec<PolicyWindow>,
    /// Uids the demo catalog deleted, and when the churn step was sent.
    pub deleted: HashMap<String, Duration>,
}

/// How a read was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    /// Answered as it should be.
    Ok,
    /// Answered absent for an entity the catalog had deleted by then.
    Deleted,
    /// Failed while stale serving was allowed.
    Failed,
    /// Overlapped a restart (the sidecar was not there to answer).
    Restart,
    /// Overlapped a stale-policy flip, or fell in a `refuse` window.
    Policy,
    /// Not a mirrored read and not answered (read-through under a fault).
    Unjudged,
}

/// Counts of one sample interval (or of the whole run).
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Good reads by kind.
    pub ok: [u64; KINDS.len()],
    /// Failed reads by kind.
    pub failed: [u64; KINDS.len()],
    /// Reads not judged for success (restart, policy window, unanswered read-through).
    pub excluded: u64,
    /// Answers marked fresh.
    pub fresh: u64,
    /// Answers marked stale.
    pub stale: u64,
    /// Answers revalidated with the upstream.
    pub revalidated: u64,
    /// 503s.
    pub refused: u64,
    /// Slowest mirrored read.
    pub worst: Duration,
}

/// The run's findings, with the first few examples of each.
#[derive(Debug, Default)]
pub struct Findings {
    /// Everything, added up.
    pub total: Tally,
    /// Reads of mirrored entities that failed while serving was allowed.
    pub failed: Vec<String>,
    /// Stale-marked 200s while the policy was `refuse`.
    pub served_under_refuse: Vec<String>,
    /// Reads judged strictly inside a `refuse` window.
    pub refuse_judged: u64,
    /// Mirrored reads slower than the read bound.
    pub slow: Vec<String>,
    /// Answers marked fresh older than `fresh_for`, or with headers that disagree.
    pub marking: Vec<String>,
    /// Counts of each problem (the example lists are capped).
    pub counts: HashMap<&'static str, u64>,
    /// Reads in flight at a restart, and at a policy flip.
    pub in_restart: u64,
    /// Reads overlapping a policy flip or inside a refuse window.
    pub in_policy: u64,
    /// Absent answers for entities deleted upstream (correct).
    pub deleted_absent: u64,
    /// The slowest answered mirrored read that overlapped a restart.
    pub worst_in_restart: Duration,
    /// The slowest answered mirrored read outside restarts.
    pub worst: Duration,
}

const EXAMPLES: usize = 8;

impl Findings {
    fn add(&mut self, what: &'static str, example: String) {
        let n = self.counts.entry(what).or_insert(0);
        *n += 1;
        let list = match what {
            "failed" => &mut self.failed,
            "served_under_refuse" => &mut self.served_under_refuse,
            "slow" => &mut self.slow,
            _ => &mut self.marking,
        };
        if list.len() < EXAMPLES {
            list.push(example);
        }
    }

    /// How many of `what` were found.
    pub fn count(&self, what: &str) -> u64 {
        self.counts.get(what).copied().unwrap_or(0)
    }
}

/// What the readers, the pager, the sampler and the controller share.
pub struct Shared {
    /// The soak's origin.
    pub origin: Instant,
    /// The settings the soak gave the sidecar (before any weakening).
    pub timings: Timings,
    /// Restart and policy windows, deletions.
    pub windows: Mutex<Windows>,
    /// The entities readers pick from (mirrored, not deleted).
    pub targets: Mutex<Arc<Vec<Target>>>,
    /// The interval the sampler is filling.
    pub interval: Mutex<Tally>,
    /// The run so far.
    pub findings: Mutex<Findings>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Shared state for a soak whose readers pick from `targets`.
    pub fn new(origin: Instant, timings: Timings, targets: Arc<Vec<Target>>) -> Shared {
        Shared {
            origin,
            timings,
            windows: Mutex::new(Windows::default()),
            targets: Mutex::new(targets),
            interval: Mutex::new(Tally::default()),
            findings: Mutex::new(Findings::default()),
            stop: AtomicBool::new(false),
        }
    }

    /// Now, since the origin.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Opens a restart window (now) and returns its index.
    pub fn restart_begins(&self) -> usize {
        let mut w = lock(&self.windows);
        w.restarts.push((self.now(), None));
        w.restarts.len() - 1
    }

    /// Closes restart window `i` (now).
    pub fn restart_ends(&self, i: usize) {
        let mut w = lock(&self.windows);
        let now = self.now();
        if let Some(r) = w.restarts.get_mut(i) {
            r.1 = Some(now);
        }
    }

    /// Runs `f` on the windows under the lock (the controller records a
    /// policy flip's times through it).
    pub fn with_windows<R>(&self, f: impl FnOnce(&mut Windows, Duration) -> R) -> R {
        let mut w = lock(&self.windows);
        let now = self.now();
        f(&mut w, now)
    }

    /// Records a churn step's deletions (sent at `sent`) and takes the
    /// deleted entities out of the readers' pool.
    pub fn deleted(&self, uids: Vec<String>, sent: Duration) {
        if uids.is_empty() {
            return;
        }
        let gone: HashSet<&str> = uids.iter().map(String::as_str).collect();
        {
            let mut t = lock(&self.targets);
            let kept: Vec<Target> = t
                .iter()
                .filter(|x| !gone.contains(x.uid.as_str()))
                .cloned()
                .collect();
            if !kept.is_empty() {
                *t = Arc::new(kept);
            }
        }
        let mut w = lock(&self.windows);
        for u in uids {
            w.deleted.entry(u).or_insert(sent);
        }
    }

    fn pool(&self) -> Arc<Vec<Target>> {
        lock(&self.targets).clone()
    }

    /// Tells every reader to stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether [`Shared::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Takes the interval's tally and starts a new one.
    pub fn take_interval(&self) -> Tally {
        std::mem::take(&mut *lock(&self.interval))
    }

    /// Judges `read` and adds it to the tallies.
    pub fn record(&self, read: Read) {
        let (judged, strict) = {
            let w = lock(&self.windows);
            (judge(&read, &w), in_strict_refuse(&read, &w) == Some(true))
        };
        let bound = self.timings.read_bound();
        let mut f = lock(&self.findings);
        let what = format!(
            "{} at {:.2}s took {}ms, status {}",
            read.kind.as_str(),
            read.at.as_secs_f64(),
            read.latency.as_millis(),
            read.status
        );
        match judged {
            Judged::Failed => f.add(
                "failed",
                match &read.problem {
                    Some(p) => format!("{what}: {p}"),
                    None => what.clone(),
                },
            ),
            Judged::Restart => f.in_restart += 1,
            Judged::Policy => {
                f.in_policy += 1;
                if strict {
                    f.refuse_judged += 1;
                    if read.status == 200 && read.stale == Some(true) {
                        f.add(
                            "served_under_refuse",
                            format!("{what}: a stale-marked 200 under policy refuse"),
                        );
                    }
                }
            }
            Judged::Deleted => f.deleted_absent += 1,
            Judged::Ok | Judged::Unjudged => {}
        }
        if read.kind.mirrored() && read.status != 0 {
            // The sidecar binds its listeners before it loads the mirror,
            // so a read sent while it starts waits in the accept queue: that
            // is start-up time, reported on its own, not a read's budget.
            if judged == Judged::Restart {
                f.worst_in_restart = f.worst_in_restart.max(read.latency);
            } else {
                f.worst = f.worst.max(read.latency);
                if read.latency > bound.limit {
                    f.add("slow", what.clone());
                }
            }
        }
        if read.status != 0 && !read.marked_ok {
            f.add(
                "marking",
                format!("{what}: X-Catalog-Stale and Cache-Status disagree"),
            );
        }
        let fresh_for = self.timings.fresh_for.as_secs();
        if read.status == 200
            && read.stale == Some(false)
            && read.age.is_some_and(|a| a > fresh_for)
        {
            f.add(
                "marking",
                format!(
                    "{what}: marked fresh with Age {}s over fresh_for {fresh_for}s",
                    read.age.unwrap_or(0)
                ),
            );
        }
        tally(&mut f.total, &read, judged);
        drop(f);
        tally(&mut lock(&self.interval), &read, judged);
    }
}

fn tally(t: &mut Tally, read: &Read, judged: Judged) {
    let i = read.kind.index();
    match judged {
        Judged::Ok | Judged::Deleted => t.ok[i] += 1,
        Judged::Failed => t.failed[i] += 1,
        Judged::Restart | Judged::Policy | Judged::Unjudged => t.excluded += 1,
    }
    match read.stale {
        Some(true) => t.stale += 1,
        Some(false) => t.fresh += 1,
        None => {}
    }
    if read.revalidated {
        t.revalidated += 1;
    }
    if read.status == 503 {
        t.refused += 1;
    }
    if read.kind.mirrored() && read.status != 0 {
        t.worst = t.worst.max(read.latency);
    }
}

/// Judges one read against the windows known when it ended.
pub fn judge(read: &Read, w: &Windows) -> Judged {
    let (at, end) = (read.at, read.end());
    let overlaps =
        |start: Duration, stop: Option<Duration>| start <= end && stop.is_none_or(|s| at < s);
    if w.restarts.iter().any(|(s, e)| overlaps(*s, *e)) {
        return Judged::Restart;
    }
    if w.refuse.iter().any(|p| overlaps(p.sent, p.back_acked)) {
        return Judged::Policy;
    }
    if read.ok && read.problem.is_none() {
        return Judged::Ok;
    }
    if !read.kind.mirrored() {
        return Judged::Unjudged;
    }
    let absent_deleted = read.problem.is_none()
        && (read.status == 200 || read.status == 404)
        && !read.absent.is_empty()
        && read
            .absent
            .iter()
            .all(|u| w.deleted.get(u).is_some_and(|sent| *sent <= end));
    if absent_deleted {
        Judged::Deleted
    } else {
        Judged::Failed
    }
}

/// Whether a read in a policy window fell strictly inside a `refuse`
/// (began after it was acknowledged, ended before `serve` was sent).
fn in_strict_refuse(read: &Read, w: &Windows) -> Option<bool> {
    let p = w
        .refuse
        .iter()
        .find(|p| p.sent <= read.end() && p.back_acked.is_none_or(|s| read.at < s))?;
    Some(p.acked.is_some_and(|a| read.at >= a) && p.back_sent.is_none_or(|b| read.end() < b))
}

/// The readers and the pager.
pub struct Load {
    handles: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// Distinct `probe` values of read-through reads (each read also picks a
/// random entity, so keys rarely repeat): twice what the soak lets the
/// store keep, so that even one entity's probes would overfill it and the
/// store must prune to its bound.
pub fn probes(max_entries: u64) -> u64 {
    max_entries * 2
}

impl Load {
    /// Starts `clients` readers and one pager against `catalog_url`.
    pub fn start(
        shared: Arc<Shared>,
        catalog_url: String,
        clients: usize,
        seed: u64,
        read_through_keys: u64,
        page_pause: Duration,
    ) -> Load {
        let mut handles = Vec::new();
        for n in 0..clients {
            let (shared, base, http) = (shared.clone(), catalog_url.clone(), http_client());
            handles.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(131).wrapping_add(n as u64));
                while !shared.stopped() {
                    let pool = shared.pool();
                    let read = read_one(
                        &http,
                        &base,
                        &pool,
                        &mut rng,
                        shared.origin,
                        read_through_keys,
                    )
                    .await;
                    shared.record(read);
                    tokio::time::sleep(READER_PAUSE).await;
                }
            }));
        }
        let (pager, base, http) = (shared.clone(), catalog_url, http_client());
        handles.push(tokio::spawn(async move {
            while !pager.stopped() {
                page_session(&http, &base, &pager, page_pause).await;
            }
        }));
        Load { handles, shared }
    }

    /// Stops every reader and waits for them.
    pub async fn stop(self) {
        self.shared.stop();
        for h in self.handles {
            let _ = h.await;
        }
    }
}

/// The headers and body of one answer.
struct Answer {
    status: u16,
    stale: Option<bool>,
    marked_ok: bool,
    age: Option<u64>,
    revalidated: bool,
    body: Value,
}

/// Sends `req`; the answer and how long it took, up to the body's last
/// byte (parsing it is the harness's time, not the sidecar's).
async fn exchange(req: reqwest::RequestBuilder) -> (Option<Answer>, Duration) {
    let started = Instant::now();
    let answer = answer_of(req, started).await;
    match answer {
        Some((a, took)) => (Some(a), took),
        None => (None, started.elapsed()),
    }
}

async fn answer_of(req: reqwest::RequestBuilder, started: Instant) -> Option<(Answer, Duration)> {
    let resp = req.send().await.ok()?;
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
    let cache_status = header("cache-status").unwrap_or_default();
    let ttl_negative = cache_status.contains("ttl=-");
    let age = header("age").and_then(|a| a.trim().parse::<u64>().ok());
    let bytes = resp.bytes().await.ok();
    let took = started.elapsed();
    let body = bytes
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .unwrap_or(Value::Null);
    Some((
        Answer {
            status,
            stale,
            // Only our own answers carry the header; a 503 of ours does too.
            marked_ok: stale == Some(ttl_negative),
            age,
            revalidated: cache_status.contains("fwd=stale"),
            body,
        },
        took,
    ))
}

fn uid_of(v: &Value) -> Option<&str> {
    v["metadata"]["uid"].as_str()
}

/// Names to search for: the generator's name parts.
const SEARCH_TERMS: [&str; 6] = ["service", "api", "team", "data", "web", "pay"];
/// Filters of the query reads (with an order each).
const QUERIES: [&str; 4] = [
    "filter=kind=component&orderField=metadata.name,asc&limit=20",
    "filter=kind=api,spec.lifecycle=production&orderField=metadata.name,desc&limit=20",
    "filter=kind=component&filter=kind=system&orderField=kind,asc&orderField=metadata.name,asc&limit=30",
    "filter=metadata.namespace=default&orderField=metadata.uid,asc&limit=10",
];

async fn read_one(
    http: &reqwest::Client,
    base: &str,
    targets: &[Target],
    rng: &mut StdRng,
    origin: Instant,
    read_through_keys: u64,
) -> Read {
    let pick = |rng: &mut StdRng| targets[rng.random_range(0..targets.len())].clone();
    let roll = rng.random_range(0..100);
    let name_path = |t: &Target| {
        format!(
            "{base}/entities/by-name/{}/{}/{}",
            encode_segment(&t.kind),
            encode_segment(&t.namespace),
            encode_segment(&t.name)
        )
    };
    let (kind, req, expect): (Kind, reqwest::RequestBuilder, Vec<String>) = if roll < 40 {
        let t = pick(rng);
        (Kind::ByName, http.get(name_path(&t)), vec![t.uid])
    } else if roll < 55 {
        let t = pick(rng);
        let url = format!("{base}/entities/by-uid/{}", encode_segment(&t.uid));
        (Kind::ByUid, http.get(url), vec![t.uid])
    } else if roll < 70 {
        let picked: Vec<Target> = (0..3).map(|_| pick(rng)).collect();
        let refs: Vec<String> = picked.iter().map(Target::lower_ref).collect();
        let req = http
            .post(format!("{base}/entities/by-refs"))
            .json(&json!({ "entityRefs": refs }));
        (
            Kind::ByRefs,
            req,
            picked.into_iter().map(|t| t.uid).collect(),
        )
    } else if roll < 82 {
        let q = QUERIES[rng.random_range(0..QUERIES.len())];
        (
            Kind::Query,
            http.get(format!("{base}/entities/by-query?{q}")),
            Vec::new(),
        )
    } else if roll < 94 {
        let term = SEARCH_TERMS[rng.random_range(0..SEARCH_TERMS.len())];
        let url = format!("{base}/entities/by-query?fullTextFilterTerm={term}&limit=25");
        (Kind::Search, http.get(url), Vec::new())
    } else {
        let t = pick(rng);
        let probe = rng.random_range(0..read_through_keys.max(1));
        let url = format!("{}/ancestry?probe={probe}", name_path(&t));
        (Kind::ReadThrough, http.get(url), Vec::new())
    };
    let at = origin.elapsed();
    let (answer, latency) = exchange(req).await;
    let mut read = Read {
        kind,
        at,
        latency,
        status: 0,
        stale: None,
        marked_ok: true,
        age: None,
        revalidated: false,
        ok: false,
        absent: Vec::new(),
        problem: None,
    };
    let Some(a) = answer else {
        return read;
    };
    read.status = a.status;
    read.stale = a.stale;
    read.marked_ok = a.marked_ok;
    read.age = a.age;
    read.revalidated = a.revalidated;
    match kind {
        Kind::ByName | Kind::ByUid => {
            read.ok = a.status == 200 && uid_of(&a.body) == Some(&expect[0]);
            if a.status == 404 {
                read.absent = expect;
            }
        }
        Kind::ByRefs => {
            let items = a.body["items"].as_array().cloned().unwrap_or_default();
            read.ok = a.status == 200
                && items.len() == expect.len()
                && items.iter().zip(&expect).all(|(i, u)| uid_of(i) == Some(u));
            if a.status == 200 && items.len() == expect.len() {
                for (i, u) in items.iter().zip(&expect) {
                    if i.is_null() {
                        read.absent.push(u.clone());
                    } else if uid_of(i) != Some(u) {
                        read.problem = Some(format!("by-refs answered another entity for {u}"));
                    }
                }
            }
        }
        Kind::Query | Kind::Search | Kind::Page => {
            read.ok = a.status == 200 && a.body["items"].is_array();
        }
        Kind::ReadThrough => read.ok = a.status == 200,
    }
    read
}

/// Pages through the whole catalog by cursor (`metadata.name` order, 100
/// a page), pausing between pages so that syncs happen under the session;
/// a uid answered twice in one session is a failure (keyset paging must
/// not repeat an entity, whatever changed meanwhile).
async fn page_session(http: &reqwest::Client, base: &str, shared: &Shared, pause: Duration) {
    let mut seen: HashSet<String> = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        if shared.stopped() {
            return;
        }
        let url = match &cursor {
            None => format!("{base}/entities/by-query?orderField=metadata.name,asc&limit=100&fields=metadata.uid,metadata.name,kind"),
            Some(c) => format!("{base}/entities/by-query?cursor={}&limit=100&fields=metadata.uid,metadata.name,kind", encode_segment(c)),
        };
        let at = shared.now();
        let (answer, latency) = exchange(http.get(url)).await;
        let mut read = Read {
            kind: Kind::Page,
            at,
            latency,
            status: 0,
            stale: None,
            marked_ok: true,
            age: None,
            revalidated: false,
            ok: false,
            absent: Vec::new(),
            problem: None,
        };
        let mut next = None;
        if let Some(a) = answer {
            read.status = a.status;
            read.stale = a.stale;
            read.marked_ok = a.marked_ok;
            read.age = a.age;
            read.revalidated = a.revalidated;
            read.ok = a.status == 200 && a.body["items"].is_array();
            if read.ok {
                for item in a.body["items"].as_array().into_iter().flatten() {
                    if let Some(uid) = uid_of(item) {
                        if !seen.insert(uid.to_string()) {
                            read.problem =
                                Some(format!("uid {uid} answered twice in one paging session"));
                        }
                    }
                }
                next = a.body["pageInfo"]["nextCursor"]
                    .as_str()
                    .map(str::to_string);
            }
        }
        let ok = read.ok;
        shared.record(read);
        tokio::time::sleep(pause).await;
        match next {
            // A failed page ends the session; the next starts over.
            Some(c) if ok => cursor = Some(c),
            _ => return,
        }
    }
}

/// The harness's stated margin on a read, re-exported for the summary.
pub const CLIENT_MARGIN: Duration = READ_MARGIN;

#[cfg(test)]
mod tests {
    use super::*;

    fn read(at_ms: u64, took_ms: u64, ok: bool) -> Read {
        Read {
            kind: Kind::ByName,
            at: Duration::from_millis(at_ms),
            latency: Duration::from_millis(took_ms),
            status: if ok { 200 } else { 503 },
            stale: Some(false),
            marked_ok: true,
            age: Some(0),
            revalidated: false,
            ok,
            absent: Vec::new(),
            problem: None,
        }
    }

    #[test]
    fn a_failed_read_outside_every_window_is_a_failure() {
        let w = Windows::default();
        assert_eq!(judge(&read(100, 5, false), &w), Judged::Failed);
        assert_eq!(judge(&read(100, 5, true), &w), Judged::Ok);
    }

    #[test]
    fn reads_overlapping_a_restart_or_a_policy_window_are_not_judged() {
        let mut w = Windows::default();
        w.restarts.push((
            Duration::from_millis(1000),
            Some(Duration::from_millis(2000)),
        ));
        // Ends just as the signal is sent: overlaps.
        assert_eq!(judge(&read(990, 10, false), &w), Judged::Restart);
        // Ended before it: judged.
        assert_eq!(judge(&read(980, 10, false), &w), Judged::Failed);
        // Began after ready: judged.
        assert_eq!(judge(&read(2000, 10, false), &w), Judged::Failed);
        w.refuse.push(PolicyWindow {
            sent: Duration::from_millis(3000),
            acked: Some(Duration::from_millis(3010)),
            back_sent: None,
            back_acked: None,
        });
        // An open window covers everything after it.
        assert_eq!(judge(&read(5000, 10, false), &w), Judged::Policy);
        let r = read(3005, 10, true);
        assert_eq!(
            in_strict_refuse(&r, &w),
            Some(false),
            "began before the ack"
        );
        let r = read(3010, 10, true);
        assert_eq!(in_strict_refuse(&r, &w), Some(true));
    }

    #[test]
    fn an_absent_answer_is_right_only_for_an_entity_deleted_before_it_ended() {
        let mut w = Windows::default();
        let mut r = read(100, 10, false);
        r.status = 404;
        r.absent = vec!["u1".into()];
        assert_eq!(judge(&r, &w), Judged::Failed);
        w.deleted.insert("u1".into(), Duration::from_millis(200));
        assert_eq!(judge(&r, &w), Judged::Failed, "deleted after the read");
        w.deleted.insert("u1".into(), Duration::from_millis(50));
        assert_eq!(judge(&r, &w), Judged::Deleted);
    }
}
