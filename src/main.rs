//! The `catalog-cache` binary: parse arguments, run the command, map the
//! result to an exit code. Everything else lives in the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = catalog_cache::cli::Cli::parse();
    catalog_cache::cli::exit_code(catalog_cache::cli::run(cli).await)
}
