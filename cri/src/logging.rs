//! Logging setup: human-readable text by default, one JSON object per line with
//! `log_format = "json"`; to stderr, or to `log_file` (size-capped, rotated by
//! [`crate::logfile`]). The filter can be replaced at run time (SIGHUP).

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::{Config, LogFormat};
use crate::logfile::{Background, RotatingFile};

/// The log writer thread, for [`flush`] at exit.
static WRITER: OnceLock<Background> = OnceLock::new();

/// Writes out the log lines still queued (at most a few seconds); call before exit.
pub fn flush() {
    if let Some(w) = WRITER.get() {
        w.flush_blocking(Duration::from_secs(3));
    }
}

/// `out` behind the log writer thread, remembered for [`flush`].
fn background<W: std::io::Write + Send + 'static>(out: W) -> anyhow::Result<Background> {
    let w = Background::start(out)
        .map_err(|e| anyhow::anyhow!("cannot start the log writer thread: {e}"))?;
    let _ = WRITER.set(w.clone());
    Ok(w)
}

/// Changes the log filter of the running process.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set: it keeps winning over `log_level`.
    env_override: bool,
}

impl LogControl {
    /// Applies `log_level` (already validated by the config loader). Returns false
    /// when `RUST_LOG` pins the filter, so the level was left alone.
    pub fn set_level(&self, log_level: &str) -> anyhow::Result<bool> {
        if self.env_override {
            return Ok(false);
        }
        let filter = EnvFilter::builder().parse(log_level)?;
        self.handle
            .reload(filter)
            .map_err(|e| anyhow::anyhow!("cannot change the log filter: {e}"))?;
        Ok(true)
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `log_level`
/// (handy for one-off debugging without editing the config).
pub fn init(config: &Config) -> anyhow::Result<LogControl> {
    let (filter, env_override) = match std::env::var("RUST_LOG") {
        Ok(s) if !s.is_empty() => (EnvFilter::builder().parse(s)?, true),
        _ => (EnvFilter::builder().parse(&config.log_level)?, false),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match &config.log_file {
        Some(path) => {
            let file = RotatingFile::open(
                path,
                config.log_max_size_mib.saturating_mul(1024 * 1024),
                config.log_max_files,
            )
            .map_err(|e| anyhow::anyhow!("cannot open log file {}: {e}", path.display()))?;
            let w = background(file)?;
            let layer = fmt::layer().with_writer(move || w.clone()).with_ansi(false);
            match config.log_format {
                LogFormat::Text => registry.with(layer).try_init(),
                LogFormat::Json => registry.with(layer.json().flatten_event(true)).try_init(),
            }
        }
        None => {
            // Colour codes only help a terminal; redirected output stays plain.
            let w = background(std::io::stderr())?;
            let layer = fmt::layer()
                .with_writer(move || w.clone())
                .with_ansi(std::io::stderr().is_terminal());
            match config.log_format {
                LogFormat::Text => registry.with(layer).try_init(),
                LogFormat::Json => registry.with(layer.json().flatten_event(true)).try_init(),
            }
        }
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    Ok(LogControl {
        handle,
        env_override,
    })
}
