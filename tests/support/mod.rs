//! The test harness: a demo catalog and a sidecar in front of it, both
//! in-process on 127.0.0.1 port 0, with a clock the test can move forward.
//!
//! `TestSidecar::builder()` picks short but realistic timings; a test
//! changes only what it is about. `start()` waits for the first sync so
//! every test begins from a loaded generation (unless told otherwise).
//! Waits are on events (`eventually`), bounded, never fixed sleeps.
//! [`process`] runs the real binary instead, for what process death shows.
//! Every integration test binary (`tests/*.rs`) uses this one harness.

#![allow(dead_code)]

pub mod process;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use catalog_cache::clock::Clock;
use catalog_cache::config::{ByteSize, Config, Dur, StalePolicy};
use catalog_cache::sidecar::Sidecar;
use catalog_fake::{FakeCatalog, FakeCatalogHandle, FakeOptions, Faults};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The admin token every test sidecar uses.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Longest any `eventually` waits by default.
pub const WAIT: Duration = Duration::from_secs(10);

/// A change to the sidecar's config a test makes.
pub type Configure = Arc<dyn Fn(&mut Config) + Send + Sync>;

/// How a test sidecar is set up.
#[derive(Clone)]
pub struct Builder {
    /// Entities the demo catalog generates.
    pub entities: usize,
    /// The demo catalog's generator seed.
    pub seed: u64,
    /// Entities per sync page.
    pub page_size: u32,
    /// `freshness.fresh_for`.
    pub fresh_for: Duration,
    /// `freshness.revalidate_budget`.
    pub budget: Duration,
    /// `freshness.negative_ttl`.
    pub negative_ttl: Duration,
    /// `stale.max_stale`.
    pub max_stale: Duration,
    /// `mirror.sync_interval` (long by default: tests call `sync_once`).
    pub sync_interval: Duration,
    /// `mirror.max_delete_ratio`.
    pub max_delete_ratio: f64,
    /// `upstream.timeout`.
    pub upstream_timeout: Duration,
    /// `breaker.consecutive_failures`.
    pub consecutive_failures: u32,
    /// `breaker.open_for`.
    pub open_for: Duration,
    /// `breaker.max_open`.
    pub max_open: Duration,
    /// `stale.policy`.
    pub stale_policy: StalePolicy,
    /// `proxy.max_request_body`, bytes.
    pub max_request_body: u64,
    /// Accepted client tokens (written to `proxy.client_tokens_file`).
    pub client_tokens: Option<Vec<String>>,
    /// Wait for the first sync before returning.
    pub wait_for_sync: bool,
    /// Faults set on the demo catalog before the sidecar opens.
    pub faults_at_start: Option<Faults>,
    /// A bearer token the demo catalog requires (written to `upstream.token_file`).
    pub upstream_token: Option<String>,
    /// Any other setting, applied last.
    pub configure: Option<Configure>,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            entities: 120,
            seed: 7,
            page_size: 50,
            fresh_for: Duration::from_secs(90),
            // Generous, so that a healthy upstream on a loaded machine
            // always answers within it; the latency tests set 200 ms.
            budget: Duration::from_secs(1),
            negative_ttl: Duration::from_secs(10),
            max_stale: Duration::from_secs(24 * 3600),
            sync_interval: Duration::from_secs(3600),
            max_delete_ratio: 0.2,
            upstream_timeout: Duration::from_secs(2),
            consecutive_failures: 5,
            open_for: Duration::from_secs(5),
            max_open: Duration::from_secs(60),
            stale_policy: StalePolicy::Serve,
            max_request_body: 1024 * 1024,
            client_tokens: None,
            wait_for_sync: true,
            faults_at_start: None,
            upstream_token: None,
            configure: None,
        }
    }
}

impl Builder {
    /// Sets a field with a closure (`.with(|b| b.entities = 10)`).
    pub fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }

    /// Starts a demo catalog and a sidecar in front of it, in a new data dir.
    pub async fn start(self) -> TestSidecar {
        let dir = Arc::new(tempfile::tempdir().expect("a temp dir"));
        self.start_in(dir).await
    }

    /// Starts a demo catalog and a sidecar in front of it, on an existing
    /// data dir (which may hold a mirror already).
    pub async fn start_in(self, dir: Arc<tempfile::TempDir>) -> TestSidecar {
        let fake = FakeCatalog::start(FakeOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            control: None,
            entities: self.entities,
            seed: self.seed,
            token: self.upstream_token.clone(),
        })
        .await
        .expect("the demo catalog starts");
        if let Some(faults) = &self.faults_at_start {
            fake.set_faults(faults.clone());
            if faults.refuse {
                let addr = fake.addr();
                eventually("the upstream to refuse connections", WAIT, || async move {
                    tokio::net::TcpStream::connect(addr).await.is_err()
                })
                .await;
            }
        }
        let config = self.config(&fake.base_url(), dir.path());
        let clock = Clock::system();
        let mut ts = TestSidecar::launch(Arc::new(fake), dir, config, clock, self.clone()).await;
        if self.wait_for_sync {
            ts.wait_for_first_sync().await;
        }
        ts.builder = self;
        ts
    }

    /// The sidecar's configuration for an upstream at `upstream` and a data
    /// dir at `dir`.
    pub fn config(&self, upstream: &str, dir: &Path) -> Config {
        let mut c = Config::default();
        c.upstream.url = upstream.to_string();
        c.upstream.timeout = Dur(self.upstream_timeout);
        c.upstream.connect_timeout = Dur(Duration::from_millis(200));
        c.listen.proxy = SocketAddr::from(([127, 0, 0, 1], 0));
        c.listen.admin = SocketAddr::from(([127, 0, 0, 1], 0));
        c.mirror.path = dir.join("catalog-cache.db");
        c.mirror.sync_interval = Dur(self.sync_interval);
        c.mirror.sync_jitter = 0.0;
        c.mirror.page_size = self.page_size;
        // Id-walks page as small as full walks, so that every sync reads
        // several pages whichever way it walks.
        c.mirror.id_page_size = self.page_size;
        c.mirror.max_delete_ratio = self.max_delete_ratio;
        c.freshness.fresh_for = Dur(self.fresh_for);
        c.freshness.revalidate_budget = Dur(self.budget);
        c.freshness.negative_ttl = Dur(self.negative_ttl);
        c.stale.max_stale = Dur(self.max_stale);
        c.stale.policy = self.stale_policy;
        c.breaker.consecutive_failures = self.consecutive_failures;
        c.breaker.open_for = self.open_for;
        c.breaker.max_open = self.max_open;
        c.admin.token_file = dir.join("admin.token");
        c.admin.token = Some(ADMIN_TOKEN.to_string());
        c.proxy.max_request_body = ByteSize(self.max_request_body);
        if let Some(token) = &self.upstream_token {
            let file = dir.join("upstream.token");
            std::fs::write(&file, format!("{token}\n")).expect("write the upstream token file");
            c.upstream.token_file = file;
        }
        if let Some(tokens) = &self.client_tokens {
            let file = dir.join("client-tokens");
            std::fs::write(&file, tokens.join("\n")).expect("write the client tokens file");
            c.proxy.client_tokens_file = file;
        }
        if let Some(configure) = &self.configure {
            configure(&mut c);
        }
        c
    }

    /// Changes any setting of the sidecar's config (applied last).
    pub fn configure(mut self, f: impl Fn(&mut Config) + Send + Sync + 'static) -> Self {
        self.configure = Some(Arc::new(f));
        self
    }
}

/// A running sidecar in front of a running demo catalog.
pub struct TestSidecar {
    /// The demo catalog (the upstream).
    pub fake: Arc<FakeCatalogHandle>,
    /// The sidecar's shared state.
    pub sidecar: Arc<Sidecar>,
    /// The sidecar's clock.
    pub clock: Clock,
    /// Proxy listener.
    pub proxy: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// The admin token.
    pub token: String,
    /// The data dir (kept alive across restarts).
    pub dir: Arc<tempfile::TempDir>,
    /// The configuration the sidecar runs with.
    pub config: Config,
    /// An HTTP client that never uses a proxy from the environment.
    pub http: reqwest::Client,
    builder: Builder,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A captured HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body bytes.
    pub body: bytes::Bytes,
}

impl Answer {
    /// The body as JSON (panics with the body when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header as text ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    /// `Cache-Status`.
    pub fn cache_status(&self) -> String {
        self.header("cache-status")
    }

    /// `Age` in seconds.
    pub fn age(&self) -> u64 {
        self.header("age").parse().unwrap_or_else(|_| {
            panic!(
                "Age header missing or not a number: {:?}",
                self.header("age")
            )
        })
    }

    /// `X-Catalog-Stale`.
    pub fn stale(&self) -> String {
        self.header("x-catalog-stale")
    }
}

/// A client that talks to 127.0.0.1 directly, whatever the environment says.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("an HTTP client")
}

async fn capture(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await.expect("a complete body");
    Answer {
        status,
        headers,
        body,
    }
}

impl TestSidecar {
    /// The default set-up.
    pub fn builder() -> Builder {
        Builder::default()
    }

    async fn launch(
        fake: Arc<FakeCatalogHandle>,
        dir: Arc<tempfile::TempDir>,
        config: Config,
        clock: Clock,
        builder: Builder,
    ) -> TestSidecar {
        let sidecar =
            Arc::new(Sidecar::open(config.clone(), clock.clone()).expect("the sidecar opens"));
        let proxy_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind admin");
        let proxy = proxy_listener.local_addr().expect("proxy addr");
        let admin = admin_listener.local_addr().expect("admin addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let runner = sidecar.clone();
        let task = tokio::spawn(async move {
            runner
                .run(proxy_listener, admin_listener, async move {
                    let _ = stopped.await;
                })
                .await
                .expect("the sidecar runs");
        });
        TestSidecar {
            fake,
            sidecar,
            clock,
            proxy,
            admin,
            token: ADMIN_TOKEN.to_string(),
            dir,
            config,
            http: http_client(),
            builder,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Waits until the first sync has loaded a generation.
    pub async fn wait_for_first_sync(&self) {
        let sidecar = self.sidecar.clone();
        eventually("the first sync", WAIT, || {
            let s = sidecar.clone();
            async move { s.generations.current().is_some() }
        })
        .await;
    }

    /// Stops the sidecar (listeners drained, tasks ended); the demo catalog
    /// and the data dir stay.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), task).await;
        }
    }

    /// Stops this sidecar and starts a new one on the same data dir and
    /// demo catalog (a restart). The new one gets a fresh system clock.
    pub async fn restart(mut self) -> TestSidecar {
        self.stop().await;
        let fake = self.fake.clone();
        let dir = self.dir.clone();
        let builder = self.builder.clone();
        let config = self.config.clone();
        drop(self);
        TestSidecar::launch(fake, dir, config, Clock::system(), builder).await
    }

    /// Starts a second sidecar with `config` and `clock` in front of the
    /// same demo catalog, without waiting for a sync.
    pub async fn sibling(
        &self,
        dir: Arc<tempfile::TempDir>,
        config: Config,
        clock: Clock,
    ) -> TestSidecar {
        TestSidecar::launch(self.fake.clone(), dir, config, clock, self.builder.clone()).await
    }

    /// The builder this sidecar was started from.
    pub fn builder_used(&self) -> &Builder {
        &self.builder
    }

    /// The mirror database file.
    pub fn db_path(&self) -> PathBuf {
        self.config.mirror.path.clone()
    }

    /// A proxy URL for a path below `/api/catalog`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/api/catalog{path}", self.proxy)
    }

    /// The same path straight at the demo catalog.
    pub fn upstream_url(&self, path: &str) -> String {
        format!("{}{path}", self.fake.base_url())
    }

    /// An admin URL.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// `GET` through the sidecar.
    pub async fn get(&self, path: &str) -> Answer {
        capture(
            self.http
                .get(self.url(path))
                .send()
                .await
                .expect("the proxy answers"),
        )
        .await
    }

    /// `GET` straight from the demo catalog.
    pub async fn get_upstream(&self, path: &str) -> Answer {
        capture(
            self.http
                .get(self.upstream_url(path))
                .send()
                .await
                .expect("the upstream answers"),
        )
        .await
    }

    /// `POST` JSON through the sidecar.
    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        capture(
            self.http
                .post(self.url(path))
                .json(body)
                .send()
                .await
                .expect("the proxy answers"),
        )
        .await
    }

    /// `POST` JSON straight to the demo catalog.
    pub async fn post_upstream(&self, path: &str, body: &Value) -> Answer {
        capture(
            self.http
                .post(self.upstream_url(path))
                .json(body)
                .send()
                .await
                .expect("the upstream answers"),
        )
        .await
    }

    /// `GET` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Answer {
        capture(
            self.http
                .get(self.admin_url(path))
                .send()
                .await
                .expect("the admin listener answers"),
        )
        .await
    }

    /// A mutation on the admin listener, with the given bearer token (or none).
    pub async fn admin_send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut request = self.http.request(method, self.admin_url(path));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        if let Some(b) = body {
            request = request.json(&b);
        }
        capture(request.send().await.expect("the admin listener answers")).await
    }

    /// `PUT /admin/breaker` with the admin token; asserts 200.
    pub async fn set_breaker(&self, body: Value) -> Value {
        let a = self
            .admin_send(
                reqwest::Method::PUT,
                "/admin/breaker",
                Some(ADMIN_TOKEN),
                Some(body),
            )
            .await;
        assert_eq!(
            a.status,
            200,
            "PUT /admin/breaker: {}",
            String::from_utf8_lossy(&a.body)
        );
        a.json()
    }

    /// `PUT /admin/stale` with the admin token; asserts 200.
    pub async fn set_stale(&self, body: Value) -> Value {
        let a = self
            .admin_send(
                reqwest::Method::PUT,
                "/admin/stale",
                Some(ADMIN_TOKEN),
                Some(body),
            )
            .await;
        assert_eq!(
            a.status,
            200,
            "PUT /admin/stale: {}",
            String::from_utf8_lossy(&a.body)
        );
        a.json()
    }

    /// `GET /status` as JSON.
    pub async fn status(&self) -> Value {
        let a = self.admin_get("/status").await;
        assert_eq!(a.status, 200);
        a.json()
    }

    /// Sets the demo catalog's faults and waits until they hold. The demo
    /// catalog closes and reopens its listener asynchronously, so `refuse`
    /// (and clearing it) is confirmed by connecting; the other faults are
    /// read on every request and hold at once.
    pub async fn faults(&self, faults: Faults) {
        let refuse = faults.refuse;
        self.fake.set_faults(faults);
        let addr = self.fake.addr();
        let what = if refuse {
            "the upstream to refuse connections"
        } else {
            "the upstream to accept connections"
        };
        eventually(what, WAIT, || async move {
            tokio::net::TcpStream::connect(addr).await.is_err() == refuse
        })
        .await;
        if refuse {
            // The listener is closed and its open connections were told to
            // drop in the same step; let those tasks run so no pooled
            // keep-alive connection still reaches the old server.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Moves the sidecar's clock past `freshness.fresh_for` (plus `extra`).
    pub fn age_past_fresh(&self, extra: Duration) {
        self.clock
            .advance(self.config.freshness.fresh_for.get() + extra);
    }

    /// The current generation id.
    pub fn generation(&self) -> Option<u64> {
        self.sidecar.generations.current().map(|v| v.meta.id)
    }

    /// The demo catalog's entities (as stored upstream).
    pub fn upstream_entities(&self) -> Vec<Value> {
        self.fake.entities()
    }

    /// Waits until the breaker's state (as `/status` shows it) is `state`.
    pub async fn wait_breaker(&self, state: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let status = self.status().await;
            if status["breaker"]["state"] == state {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("breaker never became {state}; status: {status:#}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for TestSidecar {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `kind:namespace/name` of an upstream entity (as written, original case).
pub fn entity_ref(e: &Value) -> (String, String, String) {
    (
        e["kind"].as_str().expect("kind").to_string(),
        e["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
        e["metadata"]["name"].as_str().expect("name").to_string(),
    )
}

/// The by-name path of an upstream entity.
pub fn by_name_path(e: &Value) -> String {
    let (k, ns, n) = entity_ref(e);
    format!("/entities/by-name/{k}/{ns}/{n}")
}

/// The canonical (lower-case) ref of an upstream entity.
pub fn canonical_ref(e: &Value) -> String {
    let (k, ns, n) = entity_ref(e);
    format!("{k}:{ns}/{n}").to_lowercase()
}

/// `metadata.uid` of an upstream entity.
pub fn uid(e: &Value) -> String {
    e["metadata"]["uid"].as_str().expect("uid").to_string()
}

/// `metadata.etag` of an upstream entity.
pub fn etag(e: &Value) -> String {
    e["metadata"]["etag"].as_str().expect("etag").to_string()
}

/// Polls `check` every 20 ms until it holds; panics after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal Backstage entity for `add_entities`.
pub fn new_component(name: &str) -> Value {
    serde_json::json!({
        "apiVersion": "backstage.io/v1alpha1",
        "kind": "Component",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "service", "lifecycle": "production", "owner": "group:default/team-0001"}
    })
}

/// One value of a Prometheus text exposition (0 when the series is absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .unwrap_or(0.0)
}
