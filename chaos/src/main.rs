//! `catalog-chaos`: the demo catalog (`fake-catalog`, served by the
//! `catalog-fake` library), the chaos scenarios (`run`), the abuse suite
//! (`abuse`), the network fault proxy (`fault-proxy`), the fleet
//! simulation (`fleet`) and the long run (`soak`). Parses arguments, starts logging, runs the
//! subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use catalog_chaos::{abuse, faultproxy, fleet, scenario, scenarios, soak};
use catalog_fake::fake::{until_signal, DEFAULT_CONTROL, DEFAULT_ENTITIES, DEFAULT_LISTEN};
use catalog_fake::{FakeCatalog, FakeOptions};
use clap::{Parser, Subcommand};

/// A Backstage-compatible demo catalog with fault injection.
#[derive(Debug, Parser)]
#[command(name = "catalog-chaos", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve generated entities with Backstage's catalog API, plus a control API for faults.
    FakeCatalog {
        /// Catalog listener.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Control listener (faults, stats, mutations).
        #[arg(long, default_value = DEFAULT_CONTROL)]
        control: SocketAddr,
        /// Number of generated entities.
        #[arg(long, default_value_t = DEFAULT_ENTITIES)]
        entities: usize,
        /// Generator seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Require `Authorization: Bearer <TOKEN>` on catalog requests.
        #[arg(long, env = "CATALOG_CHAOS_TOKEN")]
        token: Option<String>,
    },
    /// Drive the real catalog-cache binary through one fault per scenario
    /// while clients read; print a table; exit 0 only if every verdict passes.
    Run {
        /// CI sizes: smaller catalogs, fewer readers and kills, and the
        /// quick subset of the network scenarios (see README).
        #[arg(long, conflicts_with = "full")]
        quick: bool,
        /// The full sizes and every scenario (the default; says so).
        #[arg(long)]
        full: bool,
        /// How network faults are made: `auto` (the kernel where it can,
        /// else the fault proxy) or `fault-proxy` (always the proxy).
        #[arg(long, default_value = "auto", value_parser = ["auto", "fault-proxy"])]
        net_mechanism: String,
        /// The catalog-cache binary (else CATALOG_CACHE_BIN, else next to this one).
        #[arg(long)]
        sidecar: Option<PathBuf>,
        /// Only these scenarios (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Run the scenarios a weakening targets against that weakened
        /// configuration; they must FAIL.
        #[arg(long)]
        weaken: Option<String>,
        /// List the scenarios and weakenings and exit.
        #[arg(long)]
        list: bool,
        /// Generator seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// A TCP proxy that injects network faults between a client and a
    /// server (both on this machine), for trying a fault by hand.
    FaultProxy {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:7027")]
        listen: SocketAddr,
        /// Where it forwards each connection (e.g. the demo catalog).
        #[arg(long, default_value = DEFAULT_LISTEN)]
        upstream: SocketAddr,
        /// The faults, as JSON, e.g. '{"latency":{"ms":300,"jitter_ms":200}}'
        /// (fields: latency, bandwidth, reset_mid_body, half_open, loss,
        /// partition; see chaos/README.md).
        #[arg(long, default_value = "{}")]
        faults: String,
        /// Seed of the per-connection random choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Attack the real catalog-cache binary with hostile clients while a
    /// bystander reads; print a table; exit 0 only if every attack passes.
    Abuse {
        /// CI sizes: a smaller catalog, shorter attacks (see README).
        #[arg(long)]
        quick: bool,
        /// The catalog-cache binary (else CATALOG_CACHE_BIN, else next to this one).
        #[arg(long)]
        sidecar: Option<PathBuf>,
        /// Only these attacks (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Run the attacks a weakening targets against that weakened
        /// configuration; they must FAIL.
        #[arg(long)]
        weaken: Option<String>,
        /// List the attacks and weakenings and exit.
        #[arg(long)]
        list: bool,
        /// Generator seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Run a fleet of real catalog-cache processes on loopback (a demo
    /// catalog with churn, regional tiers, leaf sidecars), direct against
    /// tiered and full walk against id-walk, through a catalog outage, a
    /// tier outage and a restart storm; print what was measured and a
    /// MODEL of a larger fleet; exit 1 if a leaf answered fresh data older
    /// than fresh_for or failed a read of an entity the catalog holds.
    Fleet(FleetArgs),
    /// Run the real catalog-cache binary for a long time under mixed load,
    /// a churning catalog, every fault class in rotation, operator toggles
    /// and restarts (SIGTERM, SIGKILL); write a CSV time series and print a
    /// summary; exit 1 if a check failed (see README "Soak").
    Soak(SoakArgs),
}

/// `catalog-chaos soak`'s options.
#[derive(Debug, clap::Args)]
struct SoakArgs {
    /// How long the load and the faults run (`2m`, `30m`, `2h`).
    #[arg(long, value_parser = humantime::parse_duration, required_unless_present = "list")]
    duration: Option<Duration>,
    /// The catalog-cache binary (else CATALOG_CACHE_BIN, else next to this one).
    #[arg(long)]
    sidecar: Option<PathBuf>,
    /// Where the CSV (`soak.csv`) and the summary (`summary.txt`) go
    /// [default: target/soak-<unix seconds>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Entities in the demo catalog.
    #[arg(long, default_value_t = 2000)]
    entities: usize,
    /// Concurrent readers (plus one pager).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Samples before this are not fitted [default: a quarter of the run, 20s to 5m].
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// One CSV row per this [default: duration / 300, 1s to 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    interval: Option<Duration>,
    /// Run with a weakened sidecar; the checks it names must FAIL.
    #[arg(long)]
    weaken: Option<String>,
    /// List the weakenings and exit.
    #[arg(long)]
    list: bool,
    /// Generator seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// `catalog-chaos fleet`'s options. Unset sizes and timings take the
/// defaults of the full run (shown) or, with `--quick`, smaller ones.
#[derive(Debug, clap::Args)]
struct FleetArgs {
    /// CI sizes, about a minute and a half in all: 1,000 entities, windows
    /// of 8s, sync_interval 2s, fresh_for 5s, churn 6%/min in 1s steps,
    /// outages of 7s (20 leaves and 2 tiers as in the full run).
    #[arg(long)]
    quick: bool,
    /// The catalog-cache binary (else CATALOG_CACHE_BIN, else next to this one).
    #[arg(long)]
    sidecar: Option<PathBuf>,
    /// Entities in the demo catalog [default: 5000].
    #[arg(long)]
    entities: Option<usize>,
    /// Leaf sidecars [default: 20].
    #[arg(long)]
    leaves: Option<usize>,
    /// Regional tiers; leaves are spread over them in turn [default: 2].
    #[arg(long)]
    tiers: Option<usize>,
    /// Length of each measured window, one per configuration (direct
    /// id-walk, direct full walk, tiered) [default: 3m].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// mirror.sync_interval of every sidecar [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    sync_interval: Option<Duration>,
    /// mirror.sync_jitter of every sidecar [default: 0.1].
    #[arg(long)]
    sync_jitter: Option<f64>,
    /// freshness.fresh_for of every sidecar [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    fresh_for: Option<Duration>,
    /// Share of the catalog changed a minute (80% new etags, 10% added,
    /// 10% deleted) [default: 0.01].
    #[arg(long)]
    churn: Option<f64>,
    /// How often a churn step is applied [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    churn_step: Option<Duration>,
    /// How long the catalog outage and the tier outage last; longer than
    /// fresh_for [default: 45s].
    #[arg(long, value_parser = humantime::parse_duration)]
    outage: Option<Duration>,
    /// Generator seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// MODEL: leaf sidecars.
    #[arg(long, default_value_t = 1000)]
    model_sidecars: u64,
    /// MODEL: entities in the catalog.
    #[arg(long, default_value_t = 100_000)]
    model_entities: u64,
    /// MODEL: regional tiers.
    #[arg(long, default_value_t = 10)]
    model_tiers: u64,
    /// MODEL: mirror.sync_interval.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    model_interval: Duration,
}

impl FleetArgs {
    fn options(self, sidecar: PathBuf) -> fleet::FleetOptions {
        let mut o = fleet::FleetOptions::new(self.quick, sidecar);
        o.entities = self.entities.unwrap_or(o.entities);
        o.leaves = self.leaves.unwrap_or(o.leaves);
        o.tiers = self.tiers.unwrap_or(o.tiers);
        o.duration = self.duration.unwrap_or(o.duration);
        o.sync_interval = self.sync_interval.unwrap_or(o.sync_interval);
        o.sync_jitter = self.sync_jitter.unwrap_or(o.sync_jitter);
        o.fresh_for = self.fresh_for.unwrap_or(o.fresh_for);
        o.churn_per_minute = self.churn.unwrap_or(o.churn_per_minute);
        o.churn_step = self.churn_step.unwrap_or(o.churn_step);
        o.outage = self.outage.unwrap_or(o.outage);
        o.seed = self.seed;
        o.scale.sidecars = self.model_sidecars;
        o.scale.entities = self.model_entities;
        o.scale.tiers = self.model_tiers;
        o.scale.interval = self.model_interval;
        o
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Soak(args) => {
            if args.list {
                for w in soak::WEAKENINGS {
                    println!(
                        "--weaken {}: {} (must FAIL: {})",
                        w.name,
                        w.about,
                        w.breaks.join(", ")
                    );
                }
                return ExitCode::SUCCESS;
            }
            let sidecar = match scenario::find_sidecar(args.sidecar.as_deref()) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("catalog-chaos: {e}");
                    return ExitCode::from(2);
                }
            };
            let out = args.out.unwrap_or_else(|| {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                PathBuf::from("target").join(format!("soak-{stamp}"))
            });
            let opts = soak::SoakOptions {
                duration: args.duration.unwrap_or_default(),
                sidecar,
                out,
                entities: args.entities,
                clients: args.clients.max(1),
                warmup: args.warmup,
                interval: args.interval,
                weaken: args.weaken,
                seed: args.seed,
            };
            // Ctrl-C or SIGTERM ends the run; dropping the lab kills its
            // children by their PIDs.
            let report = until_signal(soak::run(&opts))
                .await
                .unwrap_or_else(|| Err("interrupted".to_string()));
            match report {
                Ok(report) => {
                    print!("{}", soak::render(&report));
                    if report.passed() {
                        ExitCode::SUCCESS
                    } else {
                        println!("a soak check failed");
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("catalog-chaos: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Fleet(args) => {
            let sidecar = match scenario::find_sidecar(args.sidecar.as_deref()) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("catalog-chaos: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = args.options(sidecar);
            if let Err(e) = opts.validate() {
                eprintln!("catalog-chaos: {e}");
                return ExitCode::from(2);
            }
            // Ctrl-C or SIGTERM ends the run; dropping the fleet kills every
            // child by its PID and removes the data dir.
            let Some(report) = until_signal(fleet::run(&opts)).await else {
                eprintln!("catalog-chaos: interrupted");
                return ExitCode::from(2);
            };
            match report {
                Ok(report) => {
                    print!("{}", fleet::render(&report));
                    if report.passed() {
                        ExitCode::SUCCESS
                    } else {
                        println!("an invariant broke");
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("catalog-chaos: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run {
            quick,
            full: _,
            net_mechanism,
            sidecar,
            only,
            weaken,
            list,
            seed,
        } => {
            if list {
                println!("scenarios: {}", scenarios::names().join(", "));
                println!(
                    "full run only (left out by --quick unless named with --only): {}",
                    scenarios::full_only().join(", ")
                );
                for w in scenarios::WEAKENINGS {
                    println!(
                        "--weaken {}: {} (must FAIL: {})",
                        w.name,
                        w.about,
                        w.breaks.join(", ")
                    );
                }
                return ExitCode::SUCCESS;
            }
            let sidecar = match scenario::find_sidecar(sidecar.as_deref()) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("catalog-chaos: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = scenarios::RunOptions {
                quick,
                sidecar,
                only,
                weaken,
                seed,
                proxy_only: net_mechanism == "fault-proxy",
            };
            let started = std::time::Instant::now();
            // Ctrl-C or SIGTERM ends the run; dropping the lab kills its
            // children by their PIDs.
            let rows = until_signal(scenarios::run(&opts))
                .await
                .unwrap_or_else(|| Err("interrupted".to_string()));
            match rows {
                Ok(rows) => {
                    print!("{}", scenario::render_table(&rows));
                    println!("total {:.0}s", started.elapsed().as_secs_f64());
                    let failed = rows
                        .iter()
                        .filter(|r| r.verdict == scenario::Verdict::Fail)
                        .count();
                    if failed == 0 {
                        ExitCode::SUCCESS
                    } else {
                        println!("{failed} scenario(s) failed");
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("catalog-chaos: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Abuse {
            quick,
            sidecar,
            only,
            weaken,
            list,
            seed,
        } => {
            if list {
                for a in abuse::ATTACKS {
                    println!("{}: {}\n    checks: {}", a.name, a.about, a.checks);
                }
                for w in abuse::WEAKENINGS {
                    println!(
                        "--weaken {}: {} (must FAIL: {})",
                        w.name,
                        w.about,
                        w.breaks.join(", ")
                    );
                }
                return ExitCode::SUCCESS;
            }
            let sidecar = match scenario::find_sidecar(sidecar.as_deref()) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("catalog-chaos: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = scenarios::RunOptions {
                quick,
                sidecar,
                only,
                weaken,
                seed,
                proxy_only: false,
            };
            let started = std::time::Instant::now();
            // Ctrl-C or SIGTERM ends the run; dropping the lab kills its
            // children by their PIDs.
            let rows = until_signal(abuse::run(&opts))
                .await
                .unwrap_or_else(|| Err("interrupted".to_string()));
            match rows {
                Ok(rows) => {
                    print!("{}", abuse::render(&rows));
                    println!("total {:.0}s", started.elapsed().as_secs_f64());
                    let failed = rows
                        .iter()
                        .filter(|r| r.verdict == scenario::Verdict::Fail)
                        .count();
                    if failed == 0 {
                        ExitCode::SUCCESS
                    } else {
                        println!("{failed} attack(s) failed");
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("catalog-chaos: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::FaultProxy {
            listen,
            upstream,
            faults,
            seed,
        } => {
            let faults: faultproxy::NetFaults = match serde_json::from_str(&faults) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("catalog-chaos: --faults: {e}");
                    return ExitCode::from(2);
                }
            };
            let proxy = match faultproxy::FaultProxy::start(listen, upstream, seed).await {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("catalog-chaos: cannot listen on {listen}: {e}");
                    return ExitCode::from(1);
                }
            };
            proxy.set(faults.clone());
            println!(
                "fault proxy: {} -> {upstream}, faults {}; Ctrl-C to stop",
                proxy.addr(),
                serde_json::to_string(&faults).unwrap_or_default()
            );
            until_signal(std::future::pending::<()>()).await;
            println!(
                "{}",
                serde_json::to_string(&proxy.stats()).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Command::FakeCatalog {
            listen,
            control,
            entities,
            seed,
            token,
        } => {
            let opts = FakeOptions {
                listen,
                control: Some(control),
                entities,
                seed,
                token,
            };
            let handle = match FakeCatalog::start(opts).await {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("catalog-chaos: {e}");
                    return ExitCode::from(1);
                }
            };
            println!("catalog:  {}", handle.base_url());
            if let Some(c) = handle.control_addr() {
                println!("control:  http://{c}  (PUT /faults, GET /stats)");
            }
            println!("entities: {entities} (seed {seed}); Ctrl-C to stop");
            until_signal(std::future::pending::<()>()).await;
            handle.shutdown().await;
            ExitCode::SUCCESS
        }
    }
}
