//! `catalog-cache demo`: the demo catalog (5,000 generated entities, from
//! the `catalog-fake` library) on 127.0.0.1:7007 with its fault control on
//! 127.0.0.1:7017, and the sidecar in front of it on 7070/7071, in one
//! process. Prints what to try, then runs until Ctrl-C.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use catalog_fake::{FakeCatalog, FakeOptions};

use crate::clock::Clock;
use crate::config::{Config, Dur, DEFAULT_UPSTREAM_URL};
use crate::sidecar::{bind, shutdown_signal, Sidecar, StartError};

/// Where the demo catalog listens.
pub const DEMO_UPSTREAM: &str = "127.0.0.1:7007";
/// Where the demo catalog's fault control listens.
pub const DEMO_CONTROL: &str = "127.0.0.1:7017";

/// How long the demo waits for the first sync before printing instructions.
pub const DEMO_FIRST_SYNC_WAIT: Duration = Duration::from_secs(30);

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The demo catalog could not start (its ports are taken?).
    #[error("cannot start the demo catalog: {0}")]
    Catalog(String),
    /// The sidecar could not start.
    #[error(transparent)]
    Sidecar(#[from] StartError),
    /// A task of the demo failed.
    #[error("the demo stopped: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs the demo until Ctrl-C.
pub async fn run(entities: usize, data_dir: &Path) -> Result<(), DemoError> {
    let listen: SocketAddr = DEMO_UPSTREAM.parse().expect("a constant address");
    let control: SocketAddr = DEMO_CONTROL.parse().expect("a constant address");
    let catalog = FakeCatalog::start(FakeOptions {
        listen,
        control: Some(control),
        entities,
        seed: 1,
        token: None,
    })
    .await
    .map_err(|e| DemoError::Catalog(e.to_string()))?;
    let mut config = Config::default();
    config.upstream.url = DEFAULT_UPSTREAM_URL.into();
    config.mirror.path = data_dir.join("catalog-cache.db");
    config.admin.token_file = data_dir.join("admin.token");
    // Short intervals so that an outage shows within seconds.
    config.mirror.sync_interval = Dur(Duration::from_secs(10));
    config.freshness.fresh_for = Dur(Duration::from_secs(15));
    let (proxy, admin) = bind(&config).await?;
    let sidecar = {
        let config = config.clone();
        std::sync::Arc::new(
            tokio::task::spawn_blocking(move || Sidecar::open(config, Clock::system())).await??,
        )
    };
    let runner = tokio::spawn(sidecar.clone().run(proxy, admin, shutdown_signal()));
    let deadline = tokio::time::Instant::now() + DEMO_FIRST_SYNC_WAIT;
    while sidecar.generations.current().is_none() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token_file = config.admin.token_file.display().to_string();
    let view = sidecar.generations.current();
    let example = view
        .as_ref()
        .and_then(|v| {
            v.index
                .entities()
                .map(|e| e.entity_ref.clone())
                .filter(|r| r.starts_with("component:default/"))
                .min()
        })
        .map(|r| r.replacen(':', "/", 1))
        .unwrap_or_else(|| "component/default/unknown".into());
    println!(
        "\ncatalog-cache demo\n\
         \n  demo catalog (upstream):  {base}  ({entities} entities; faults on http://{DEMO_CONTROL})\
         \n  catalog API (sidecar):    http://{proxy}/api/catalog\
         \n  admin / status page:      http://{admin}/\
         \n  mirror:                   generation {generation}, {count} entities, in {db}\n\
         \nTry:\
         \n  curl -si http://{proxy}/api/catalog/entities/by-name/{example} | head -12\
         \n  curl -s 'http://{proxy}/api/catalog/entities/by-query?filter=kind=api&limit=2' | head -c 600; echo\
         \n  curl -s 'http://{proxy}/api/catalog/entity-facets?facet=kind'; echo\
         \n  curl -s http://{admin}/readyz; echo\
         \n\nTake the upstream down and watch reads stay up, marked stale (X-Catalog-Stale: true):\
         \n  curl -X PUT http://{DEMO_CONTROL}/faults -H 'content-type: application/json' -d '{{\"refuse\":true}}'\
         \n  sleep 20; curl -si http://{proxy}/api/catalog/entities/by-name/{example} | grep -iE '^(HTTP|cache-status|age|x-catalog-stale)'\
         \n  catalog-cache status --admin http://{admin}\
         \n  curl -X DELETE http://{DEMO_CONTROL}/faults      # bring it back\
         \n\nOperator flags (admin token in {token_file}):\
         \n  CATALOG_CACHE_ADMIN_TOKEN=$(cat {token_file}) catalog-cache breaker open --reason demo --for 1m --admin http://{admin}\
         \n  CATALOG_CACHE_ADMIN_TOKEN=$(cat {token_file}) catalog-cache stale refuse --admin http://{admin}\
         \n\nCtrl-C stops both.\n",
        base = catalog.base_url(),
        proxy = config.listen.proxy,
        admin = config.listen.admin,
        generation = view.as_ref().map_or(0, |v| v.meta.id),
        count = view.as_ref().map_or(0, |v| v.index.len()),
        db = config.mirror.path.display(),
        example = example,
    );
    let result = runner.await?;
    catalog.shutdown().await;
    Ok(result?)
}
