//! vesseld: the CRI v1 gRPC server of vessel.

mod calllog;
mod check;
mod clock;
mod config;
mod crilog;
mod durable;
mod engine;
mod events;
mod hostcheck;
mod hostdirs;
mod hostname;
mod images;
mod instance;
mod logfile;
mod logging;
mod logpump;
mod metrics;
mod oci;
mod oomscore;
mod outcursor;
mod passwd;
mod podfiles;
mod podnet;
mod reload;
mod runtime;
mod scratch;
mod sdnotify;
mod server;
mod stats;
mod status;
mod store;
mod streaming;
mod userns;
mod validate;
mod views;
mod vmsize;
mod volumes;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{ConfigSource, Overrides, DEFAULT_CONFIG_FILE};

#[derive(Parser, Debug)]
#[command(
    name = "vesseld",
    version,
    about = "vessel: a CRI runtime that runs each pod in a VM"
)]
struct Cli {
    /// Config file; its drop-ins are read from <its dir>/vessel.d/*.toml.
    /// [default: /etc/vessel/vessel.toml, which may be absent]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// CRI socket path (overrides `listen`).
    #[arg(long, global = true, value_name = "PATH")]
    listen: Option<PathBuf>,
    /// Persistent state dir (overrides `root`).
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Volatile state dir (overrides `run_root`).
    #[arg(long, global = true, value_name = "DIR")]
    run_root: Option<PathBuf>,
    /// Log filter, e.g. `debug` or `info,vesseld=debug` (overrides `log_level`).
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log format (overrides `log_format`).
    #[arg(long, global = true)]
    log_format: Option<LogFormatArg>,
    /// Log to this file, rotated by size (overrides `log_file`; default: stderr).
    #[arg(long, global = true, value_name = "FILE")]
    log_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the effective configuration (files, drop-ins and flags merged) as TOML.
    Config,
    /// Diagnose this host: one line per item (ok, warn, fail) with what to do.
    /// Exits 1 when any item fails.
    Check,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let source = match &cli.config {
        Some(file) => ConfigSource {
            file: file.clone(),
            required: true,
        },
        None => ConfigSource {
            file: DEFAULT_CONFIG_FILE.into(),
            required: false,
        },
    };
    let overrides = Overrides {
        listen: cli.listen.clone(),
        root: cli.root.clone(),
        run_root: cli.run_root.clone(),
        log_level: cli.log_level.clone(),
        log_format: cli.log_format.map(|f| match f {
            LogFormatArg::Text => "text".to_owned(),
            LogFormatArg::Json => "json".to_owned(),
        }),
        log_file: cli.log_file.clone(),
    };
    let config = match config::load(&source, &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vesseld: invalid configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Config) => {
            print!("{}", config.to_toml());
            return std::process::ExitCode::SUCCESS;
        }
        Some(Command::Check) => return check::run(&config),
        None => {}
    }
    let log = match logging::init(&config) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("vesseld: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Every agent round trip, by RPC, in /metrics (vessel-bench counts them per
    // CRI call).
    vessel_sandbox::agent::set_call_observer(|rpc, latency, ok| {
        metrics::get().agent_call(rpc, latency, ok)
    });
    let reloader = reload::Reloader {
        source,
        overrides,
        log,
    };
    let code = match server::run(config, reloader) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("vesseld failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    logging::flush();
    code
}
