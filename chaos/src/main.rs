//! `catalog-chaos`: the demo catalog (`fake-catalog`) and, later, the chaos
//! scenarios. Parses arguments, starts logging, runs the subcommand.

use std::net::SocketAddr;
use std::process::ExitCode;

use catalog_chaos::fake::{until_signal, DEFAULT_CONTROL, DEFAULT_ENTITIES, DEFAULT_LISTEN};
use catalog_chaos::{FakeCatalog, FakeOptions};
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
