//! Logging setup: human-readable text by default, one JSON object per line with
//! `log_format = "json"`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `log_level`
/// (handy for one-off debugging without editing the config).
pub fn init(config: &Config) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.is_empty() => EnvFilter::builder().parse(s)?,
        _ => EnvFilter::builder().parse(&config.log_level)?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only help a terminal; log files stay plain.
        .with_ansi(std::io::stderr().is_terminal());
    let result = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}
