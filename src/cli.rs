//! The command line: argument definitions and the operator commands.
//!
//! `serve` and `demo` run the sidecar; `status`, `breaker`, `stale`, `sync`
//! and `check` talk to a running sidecar's admin API with the admin token;
//! `snapshot` and `config check` work on files. Exit codes: 0 success, 1 the
//! thing asked is false or failed, 2 usage or config error. Errors print one
//! line to stderr.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::clock::Clock;
use crate::config::{Config, LogFormat, ENV_ADMIN_URL, ENV_CONFIG};
use crate::sidecar::{shutdown_signal, Sidecar};

/// How long the CLI waits for the admin API.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// A sidecar that keeps serving the Backstage catalog API through upstream outages.
#[derive(Debug, Parser)]
#[command(name = "catalog-cache", version, about)]
pub struct Cli {
    /// Log format: text or json (also CATALOG_CACHE_LOG_FORMAT / [log] format).
    #[arg(long, global = true, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the CLI finds a running sidecar.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Config file (its listen.admin and admin.token_file are used).
    #[arg(long, env = ENV_CONFIG)]
    pub config: Option<PathBuf>,
    /// Admin URL of the sidecar, e.g. http://127.0.0.1:7071.
    #[arg(long, env = ENV_ADMIN_URL)]
    pub admin: Option<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar.
    Serve {
        /// Config file (default config/catalog-cache.toml when present).
        #[arg(long, env = ENV_CONFIG)]
        config: Option<PathBuf>,
        /// Upstream catalog base URL (overrides upstream.url).
        #[arg(long)]
        upstream: Option<String>,
        /// Catalog API listener (overrides listen.proxy).
        #[arg(long)]
        listen_proxy: Option<std::net::SocketAddr>,
        /// Admin listener (overrides listen.admin).
        #[arg(long)]
        listen_admin: Option<std::net::SocketAddr>,
        /// Mirror database (overrides mirror.path).
        #[arg(long)]
        mirror: Option<PathBuf>,
    },
    /// Run the sidecar in front of a built-in demo catalog and print what to try.
    Demo {
        /// Entities in the demo catalog.
        #[arg(long, default_value_t = 5000)]
        entities: usize,
        /// Data directory of the demo sidecar.
        #[arg(long, default_value = "data/demo")]
        data_dir: PathBuf,
    },
    /// Show breaker, stale policy, mirror age and size, last sync, last error.
    Status {
        /// Which sidecar.
        #[command(flatten)]
        target: Target,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show or set the breaker mode.
    Breaker {
        /// auto, open or closed; omit to show.
        #[arg(value_parser = ["auto", "open", "closed"])]
        mode: Option<String>,
        /// Why (kept in the audit trail).
        #[arg(long)]
        reason: Option<String>,
        /// Return to auto after this long, e.g. 30m.
        #[arg(long = "for")]
        for_: Option<String>,
        /// Which sidecar.
        #[command(flatten)]
        target: Target,
    },
    /// Show or set the stale-data policy.
    Stale {
        /// serve or refuse; omit to show.
        #[arg(value_parser = ["serve", "refuse"])]
        policy: Option<String>,
        /// Oldest data ever served, e.g. 24h.
        #[arg(long)]
        max_stale: Option<String>,
        /// Why (kept in the audit trail).
        #[arg(long)]
        reason: Option<String>,
        /// Which sidecar.
        #[command(flatten)]
        target: Target,
    },
    /// Run a sync now and print its result.
    Sync {
        /// Apply a sync even if it removes more than mirror.max_delete_ratio.
        #[arg(long)]
        accept_deletions: bool,
        /// Which sidecar.
        #[command(flatten)]
        target: Target,
    },
    /// Exit 0 when the sidecar is ready, 1 when not (for exec probes).
    Check {
        /// Which sidecar.
        #[command(flatten)]
        target: Target,
    },
    /// Export or import a mirror snapshot (a SQLite file).
    Snapshot {
        /// export or import.
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// Validate configuration.
    Config {
        /// check.
        #[command(subcommand)]
        action: ConfigAction,
    },
}

/// `snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotAction {
    /// Write a consistent copy of the mirror to FILE.
    Export {
        /// Destination (must not exist).
        file: PathBuf,
        /// Config file (for mirror.path).
        #[arg(long, env = ENV_CONFIG)]
        config: Option<PathBuf>,
    },
    /// Load FILE into the mirror as its next generation (keeps the snapshot's age).
    Import {
        /// A file made by `snapshot export` or `GET /admin/snapshot`.
        file: PathBuf,
        /// Config file (for mirror.path).
        #[arg(long, env = ENV_CONFIG)]
        config: Option<PathBuf>,
    },
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Validate and print the effective config.
    Check {
        /// Config file.
        #[arg(long, env = ENV_CONFIG)]
        config: Option<PathBuf>,
    },
}

/// A CLI failure: its exit code and one line for stderr.
#[derive(Debug)]
pub struct Failure {
    /// 1 (the thing asked failed) or 2 (usage or config).
    pub code: u8,
    /// What to print.
    pub message: String,
}

impl Failure {
    fn config(message: impl std::fmt::Display) -> Self {
        Self {
            code: 2,
            message: message.to_string(),
        }
    }

    fn failed(message: impl std::fmt::Display) -> Self {
        Self {
            code: 1,
            message: message.to_string(),
        }
    }
}

fn env_vars() -> Vec<(String, String)> {
    std::env::vars().collect()
}

/// Loads and validates the configuration.
pub fn load_config(path: Option<&Path>) -> Result<Config, Failure> {
    Config::load(path, env_vars()).map_err(Failure::config)
}

/// Starts logging per config and the `--log-format` flag.
pub fn init_logging(config: &Config, flag: Option<&str>) {
    let format = match flag {
        Some("json") => LogFormat::Json,
        Some(_) => LogFormat::Text,
        None => config.log.format,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve {
            config,
            upstream,
            listen_proxy,
            listen_admin,
            mirror,
        } => {
            let mut config = load_config(config.as_deref())?;
            if let Some(u) = upstream {
                config.upstream.url = u;
            }
            if let Some(a) = listen_proxy {
                config.listen.proxy = a;
            }
            if let Some(a) = listen_admin {
                config.listen.admin = a;
            }
            if let Some(p) = mirror {
                config.mirror.path = p;
            }
            config.validate().map_err(Failure::config)?;
            init_logging(&config, cli.log_format.as_deref());
            serve(config).await
        }
        Command::Demo { entities, data_dir } => {
            let config = load_config(None)?;
            init_logging(&config, cli.log_format.as_deref());
            crate::demo::run(entities, &data_dir)
                .await
                .map_err(Failure::failed)
        }
        Command::Status { target, json } => status(&target, json).await,
        Command::Breaker {
            mode,
            reason,
            for_,
            target,
        } => match mode {
            None => show(&target, "/admin/breaker").await,
            Some(mode) => {
                let body = serde_json::json!({"mode": mode, "reason": reason, "for": for_});
                let answer = admin_call(&target, Method::PUT, "/admin/breaker", Some(body)).await?;
                println!(
                    "breaker mode {} (state {}){}",
                    answer["mode"].as_str().unwrap_or("?"),
                    answer["state"].as_str().unwrap_or("?"),
                    answer["mode_expires_at"]
                        .as_str()
                        .map(|t| format!(", back to auto at {t}"))
                        .unwrap_or_default()
                );
                Ok(())
            }
        },
        Command::Stale {
            policy,
            max_stale,
            reason,
            target,
        } => match policy {
            None => show(&target, "/admin/stale").await,
            Some(policy) => {
                let body =
                    serde_json::json!({"policy": policy, "max_stale": max_stale, "reason": reason});
                let answer = admin_call(&target, Method::PUT, "/admin/stale", Some(body)).await?;
                println!(
                    "stale policy {} (max_stale {}s)",
                    answer["policy"].as_str().unwrap_or("?"),
                    answer["max_stale_seconds"]
                );
                Ok(())
            }
        },
        Command::Sync {
            accept_deletions,
            target,
        } => {
            let body = serde_json::json!({"accept_deletions": accept_deletions});
            let report = admin_call(&target, Method::POST, "/admin/sync", Some(body)).await?;
            let result = report["result"].as_str().unwrap_or("?").to_string();
            println!(
                "sync {result}: generation {}, +{} ~{} -{} ={} in {:.3}s{}",
                report["generation"],
                report["added"],
                report["changed"],
                report["removed"],
                report["unchanged"],
                report["duration_seconds"].as_f64().unwrap_or(0.0),
                report["error"]
                    .as_str()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
            match result.as_str() {
                "applied" | "unchanged" => Ok(()),
                _ => Err(Failure::failed(format!("sync {result}"))),
            }
        }
        Command::Check { target } => {
            let (status, body) = admin_request(&target, Method::GET, "/readyz", None).await?;
            let reason = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["reason"].as_str().map(str::to_string))
                .unwrap_or_default();
            if status == StatusCode::OK {
                println!("ready: {reason}");
                Ok(())
            } else {
                Err(Failure::failed(format!("not ready: {reason}")))
            }
        }
        Command::Snapshot { action } => snapshot(action).await,
        Command::Config {
            action: ConfigAction::Check { config },
        } => {
            let config = load_config(config.as_deref())?;
            print!("{}", config.to_toml());
            Ok(())
        }
    }
}

async fn serve(config: Config) -> Result<(), Failure> {
    let (proxy, admin) = crate::sidecar::bind(&config)
        .await
        .map_err(Failure::failed)?;
    let sidecar = tokio::task::spawn_blocking(move || Sidecar::open(config, Clock::system()))
        .await
        .map_err(Failure::failed)?
        .map_err(Failure::failed)?;
    std::sync::Arc::new(sidecar)
        .run(proxy, admin, shutdown_signal())
        .await
        .map_err(Failure::failed)
}

async fn snapshot(action: SnapshotAction) -> Result<(), Failure> {
    match action {
        SnapshotAction::Export { file, config } => {
            let config = load_config(config.as_deref())?;
            tokio::task::spawn_blocking(move || {
                let (mirror, _) =
                    crate::mirror::Mirror::open_existing(&config.mirror.path, &Clock::system())
                        .map_err(Failure::failed)?;
                let meta = mirror.meta().map_err(Failure::failed)?;
                mirror.export(&file).map_err(Failure::failed)?;
                match meta {
                    Some(m) => println!(
                        "exported generation {} ({} entities, synced {}) to {}",
                        m.id,
                        m.entities,
                        crate::mirror::rfc3339(m.synced_at),
                        file.display()
                    ),
                    None => println!("exported an empty mirror to {}", file.display()),
                }
                Ok(())
            })
            .await
            .map_err(Failure::failed)?
        }
        SnapshotAction::Import { file, config } => {
            let config = load_config(config.as_deref())?;
            tokio::task::spawn_blocking(move || {
                let clock = Clock::system();
                let (mirror, _) = crate::mirror::Mirror::open(&config.mirror.path, &clock)
                    .map_err(Failure::failed)?;
                let loaded = mirror.load().map_err(Failure::failed)?;
                let previous = crate::mirror::etags(&loaded.entities);
                let (meta, stats) = crate::snapshot::import_into(
                    &mirror,
                    &file,
                    &previous,
                    "snapshot",
                    clock.now(),
                )
                .map_err(Failure::failed)?;
                println!(
                    "imported {} as generation {} ({} entities: +{} ~{} -{}); a running sidecar loads it at its next restart",
                    file.display(),
                    meta.id,
                    meta.entities,
                    stats.added,
                    stats.changed,
                    stats.removed
                );
                Ok(())
            })
            .await
            .map_err(Failure::failed)?
        }
    }
}

async fn status(target: &Target, json: bool) -> Result<(), Failure> {
    let status = admin_call(target, Method::GET, "/status", None).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
        return Ok(());
    }
    let b = &status["breaker"];
    let s = &status["stale"];
    let m = &status["mirror"];
    let l = &status["last_sync"];
    println!(
        "ready:      {} ({})",
        status["ready"],
        status["ready_reason"].as_str().unwrap_or("")
    );
    println!(
        "breaker:    state {}, mode {}{}",
        b["state"].as_str().unwrap_or("?"),
        b["mode"].as_str().unwrap_or("?"),
        b["reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    println!(
        "stale:      policy {}, max_stale {}s",
        s["policy"].as_str().unwrap_or("?"),
        s["max_stale_seconds"]
    );
    if m.is_null() {
        println!("mirror:     empty (no generation yet)");
    } else {
        println!(
            "mirror:     generation {}, {} entities, {:.0}s old (synced {})",
            m["generation"],
            m["entities"],
            m["data_age_seconds"].as_f64().unwrap_or(0.0),
            m["synced_at"].as_str().unwrap_or("?")
        );
    }
    if !l.is_null() {
        println!(
            "last sync:  {} at {} in {:.3}s{}",
            l["result"].as_str().unwrap_or("?"),
            l["at"].as_str().unwrap_or("?"),
            l["duration_seconds"].as_f64().unwrap_or(0.0),
            l["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    if let Some(h) = status["held_deletions"].as_object() {
        println!(
            "HELD:       a sync would remove {} of {} entities (since {}); accept with `catalog-cache sync --accept-deletions`",
            h["would_remove"], h["of"], h["since"].as_str().unwrap_or("?")
        );
    }
    if let Some(e) = status["upstream"]["last_error"].as_object() {
        println!(
            "upstream:   last error at {}: {}",
            e["at"].as_str().unwrap_or("?"),
            e["message"].as_str().unwrap_or("?")
        );
    }
    if let Some(audit) = status["audit"].as_array().filter(|a| !a.is_empty()) {
        println!("audit (newest first):");
        for a in audit.iter().take(10) {
            println!(
                "  {}  {:<13} {:<13} {} -> {}{}",
                a["at"].as_str().unwrap_or(""),
                a["actor"].as_str().unwrap_or(""),
                a["subject"].as_str().unwrap_or(""),
                a["from"].as_str().unwrap_or("-"),
                a["to"].as_str().unwrap_or(""),
                a["reason"]
                    .as_str()
                    .map(|r| format!("  ({r})"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

async fn show(target: &Target, path: &str) -> Result<(), Failure> {
    let answer = admin_call(target, Method::GET, path, None).await?;
    println!(
        "{}",
        serde_json::to_string_pretty(&answer).unwrap_or_default()
    );
    Ok(())
}

/// The admin URL and token the CLI uses for `target`.
fn resolve(target: &Target) -> Result<(String, Option<String>), Failure> {
    let config = load_config(target.config.as_deref())?;
    let url = target
        .admin
        .clone()
        .unwrap_or_else(|| format!("http://{}", config.listen.admin));
    let token = config.admin.token.clone().or_else(|| {
        std::fs::read_to_string(&config.admin.token_file)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    });
    Ok((url.trim_end_matches('/').to_string(), token))
}

async fn admin_request(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(StatusCode, Bytes), Failure> {
    let (base, token) = resolve(target)?;
    let url = format!("{base}{path}");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut request = http::Request::builder()
        .method(method.clone())
        .uri(&url)
        .header(crate::admin::ACTOR_HEADER, "cli")
        .header(http::header::CONTENT_TYPE, "application/json");
    if method != Method::GET {
        let Some(token) = token else {
            return Err(Failure::config(
                "no admin token: set CATALOG_CACHE_ADMIN_TOKEN or admin.token_file (the sidecar writes it at first start)",
            ));
        };
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let request = request
        .body(Full::new(body))
        .map_err(|e| Failure::config(format!("{url}: {e}")))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| Failure::failed(format!("cannot reach the sidecar at {base}: {e}")))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| Failure::failed(format!("{url}: {e}")))?
            .to_bytes();
        Ok::<_, Failure>((status, bytes))
    };
    tokio::time::timeout(CLI_TIMEOUT, exchange)
        .await
        .map_err(|_| Failure::failed(format!("{url} did not answer within {:?}", CLI_TIMEOUT)))?
}

async fn admin_call(
    target: &Target,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, Failure> {
    let (status, bytes) = admin_request(target, method, path, body).await?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        Failure::failed(format!(
            "the sidecar answered {status} with a body that is not JSON: {e}"
        ))
    })?;
    if !status.is_success() {
        let message = value["error"]["message"]
            .as_str()
            .unwrap_or("no message")
            .to_string();
        let code = if status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED {
            2
        } else {
            1
        };
        return Err(Failure {
            code,
            message: format!("{status}: {message}"),
        });
    }
    Ok(value)
}

/// Maps a command's result to the process exit code, printing the error line.
pub fn exit_code(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("catalog-cache: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
