//! The real `catalog-cache` binary as a child process of a test: started
//! on free loopback ports with a data dir of the test's, SIGKILLed (by its
//! PID) when dropped, probed over real HTTP.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use catalog_fake::{FakeCatalog, FakeCatalogHandle, FakeOptions};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_catalog-cache");

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A sidecar process; killed (SIGKILL) when dropped.
pub struct Process {
    /// The child.
    pub child: Child,
    /// Proxy listener, `127.0.0.1:PORT`.
    pub proxy: String,
    /// Admin listener, `127.0.0.1:PORT`.
    pub admin: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `catalog-cache serve` in `data` against `upstream`, with a clean
/// environment, short syncs and `extra` settings on top.
pub fn start(data: &Path, upstream: &str, extra: &[(&str, &str)]) -> Process {
    let proxy = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .env_clear()
        .env("CATALOG_CACHE_UPSTREAM_URL", upstream)
        .env("CATALOG_CACHE_LISTEN_PROXY", &proxy)
        .env("CATALOG_CACHE_LISTEN_ADMIN", &admin)
        .env("CATALOG_CACHE_MIRROR_PATH", data.join("catalog-cache.db"))
        .env("CATALOG_CACHE_ADMIN_TOKEN_FILE", data.join("admin.token"))
        .env("CATALOG_CACHE_MIRROR_SYNC_INTERVAL", "300ms")
        .env("CATALOG_CACHE_MIRROR_SYNC_JITTER", "0")
        .env("CATALOG_CACHE_LOG_LEVEL", "warn")
        .current_dir(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Process {
        child: cmd.spawn().expect("the catalog-cache binary starts"),
        proxy,
        admin,
    }
}

/// A demo catalog with `entities`, in-process, on a free loopback port.
pub async fn fake(entities: usize) -> FakeCatalogHandle {
    FakeCatalog::start(FakeOptions {
        entities,
        ..FakeOptions::default()
    })
    .await
    .unwrap()
}

/// `GET url`: status, body and headers, or `None` when nothing answers.
pub async fn get(url: &str) -> Option<(u16, String, reqwest::header::HeaderMap)> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = client.get(url).send().await.ok()?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    Some((status, r.text().await.ok()?, headers))
}

/// Waits until `/readyz` on `admin` answers 200; how long that took.
pub async fn wait_ready(admin: &str, within: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < within {
        if let Some((200, _, _)) = get(&format!("http://{admin}/readyz")).await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("sidecar at {admin} not ready within {within:?}");
}
