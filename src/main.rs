//! The `catalog-cache` binary: parse arguments, run the command, map the
//! result to an exit code. Everything else lives in the library.

use clap::Parser;

/// mimalloc rather than glibc's malloc: a sync frees the previous bodies and
/// its transient parse trees amid long-lived index allocations, and glibc
/// keeps those holes resident; mimalloc returns emptied pages to the system
/// (measured in benches/README.md, "Memory").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = catalog_cache::cli::Cli::parse();
    catalog_cache::cli::exit_code(catalog_cache::cli::run(cli).await)
}
