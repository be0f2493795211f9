//! SIGHUP: re-read the config file and its drop-ins (with the same flags on top),
//! apply what can change while running, and name what needs a restart.
//!
//! Applied live: `log_level`. Registry `hosts.toml` files need no signal (they are
//! read at every pull). Everything else (socket, dirs, guest, handlers, network, image
//! limits, log file) is fixed at start: a change is logged as needing a restart and
//! the running daemon keeps its start-up values, which is also what `crictl info`
//! keeps showing.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::config::{self, Config, ConfigSource, Overrides};
use crate::logging::LogControl;

/// Keys applied without a restart.
const LIVE_KEYS: &[&str] = &["log_level"];

/// What SIGHUP needs to re-read the config.
pub struct Reloader {
    pub source: ConfigSource,
    pub overrides: Overrides,
    pub log: LogControl,
}

/// The dotted keys whose values differ between `old` and `new`.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let flat = |c: &Config| {
        let mut out = BTreeMap::new();
        flatten(
            &serde_json::to_value(c).unwrap_or(Value::Null),
            "",
            &mut out,
        );
        out
    };
    let (a, b) = (flat(old), flat(new));
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn flatten(v: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(v, &key, out);
            }
        }
        _ => {
            out.insert(prefix.to_owned(), v.clone());
        }
    }
}

/// The outcome of one reload, for the log.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub applied: Vec<String>,
    pub needs_restart: Vec<String>,
}

impl Outcome {
    fn log(&self) {
        if self.applied.is_empty() && self.needs_restart.is_empty() {
            tracing::info!("configuration unchanged");
        }
        for key in &self.applied {
            tracing::warn!(key, "configuration change applied");
        }
        for key in &self.needs_restart {
            tracing::warn!(
                key,
                "configuration change needs a restart of vesseld; running with the old value"
            );
        }
    }
}

impl Reloader {
    /// Re-reads the config and applies it over `current` (the last config read);
    /// returns the new config to diff the next reload against.
    pub fn reload(&self, current: &Config) -> anyhow::Result<(Config, Outcome)> {
        let new = config::load(&self.source, &self.overrides)?;
        let mut outcome = Outcome::default();
        for key in changed_keys(current, &new) {
            if LIVE_KEYS.contains(&key.as_str()) {
                outcome.applied.push(key);
            } else {
                outcome.needs_restart.push(key);
            }
        }
        // Reported before the new level applies, so that a quieter level does not
        // hide its own report.
        outcome.log();
        if outcome.applied.iter().any(|k| k == "log_level")
            && !self.log.set_level(&new.log_level)?
        {
            tracing::warn!("RUST_LOG is set: log_level from the config is not applied");
        }
        Ok((new, outcome))
    }

    /// Installs the SIGHUP handler now (SIGHUP's default action ends the process, so
    /// this happens before vesseld reports ready) and returns the task that reloads
    /// on every SIGHUP until the process ends.
    pub fn start(self, current: Config) -> impl std::future::Future<Output = ()> {
        use tokio::signal::unix::{signal, SignalKind};
        let hup = signal(SignalKind::hangup());
        async move {
            match hup {
                Ok(hup) => self.run(hup, current).await,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot install the SIGHUP handler; config reload is off")
                }
            }
        }
    }

    async fn run(self, mut hup: tokio::signal::unix::Signal, mut current: Config) {
        let this = std::sync::Arc::new(self);
        while hup.recv().await.is_some() {
            tracing::info!(config = %this.source.file.display(), "SIGHUP: reloading the configuration");
            let (r, cur) = (this.clone(), current.clone());
            // Reading files is blocking work: off the async workers.
            match tokio::task::spawn_blocking(move || r.reload(&cur)).await {
                Ok(Ok((new, _))) => current = new,
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "configuration not reloaded; keeping the running one")
                }
                Err(e) => tracing::error!(error = %e, "configuration reload task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_changed_keys() {
        let old = Config::default();
        let mut new = old.clone();
        assert!(changed_keys(&old, &new).is_empty());
        new.log_level = "debug".into();
        new.image.max_concurrent_downloads = 9;
        new.runtimes.insert("big".into(), Default::default());
        new.log_file = Some("/var/log/x.log".into());
        let keys = changed_keys(&old, &new);
        assert!(keys.contains(&"log_level".to_owned()), "{keys:?}");
        assert!(keys.contains(&"log_file".to_owned()), "{keys:?}");
        assert!(
            keys.contains(&"image.max_concurrent_downloads".to_owned()),
            "{keys:?}"
        );
        assert!(
            keys.iter().any(|k| k.starts_with("runtimes.big")),
            "{keys:?}"
        );
        assert!(!keys.iter().any(|k| k.starts_with("network")), "{keys:?}");
    }
}
