//! `vesseld check`: diagnoses the host, one line per item (ok, warn, fail) saying
//! what was found and what to do. Exit status 1 when any item fails; warnings alone
//! exit 0.
//!
//! Each check is a small function returning [`Verdict`]s from inputs it is given
//! (paths, file text), so it can be tested against a made-up host; [`all`] feeds them
//! this host's values from the config.

mod cgroups;
mod dirs;
mod disk;
mod guest;
mod network;
mod programs;
mod registry;

use std::fmt;

use crate::config::Config;

/// How an item stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub level: Level,
    /// What was checked, e.g. "kvm" or "guest kernel (default)".
    pub item: String,
    /// What was found and, unless ok, what to do.
    pub message: String,
}

impl Verdict {
    pub fn new(level: Level, item: impl Into<String>, message: impl Into<String>) -> Self {
        Verdict {
            level,
            item: item.into(),
            message: message.into(),
        }
    }
    pub fn ok(item: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(Level::Ok, item, message)
    }
    pub fn warn(item: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(Level::Warn, item, message)
    }
    pub fn fail(item: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(Level::Fail, item, message)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = format!("[{}]", self.level);
        write!(f, "{level:<6} {}: {}", self.item, self.message)
    }
}

/// Every check, against this host and `config`.
pub fn all(config: &Config) -> Vec<Verdict> {
    let mut v = Vec::new();
    v.extend(programs::accel(config));
    let vsock_dev = std::path::Path::new(vessel_sandbox::preflight::VHOST_VSOCK_DEV);
    v.extend(programs::programs(vsock_dev));
    v.push(programs::mkfs(config));
    v.push(programs::vhost_vsock(
        vsock_dev,
        &vessel_sandbox::Binaries::default().vhost_device_vsock,
    ));
    v.extend(guest::guests(config));
    v.push(cgroups::host());
    v.extend(network::cni(
        &config.network.cni_conf_dir,
        &config.network.cni_bin_dirs,
    ));
    v.push(network::ip_forward(std::path::Path::new(
        network::IP_FORWARD,
    )));
    v.extend(dirs::state_dirs(config));
    v.push(disk::free_space(&config.root));
    v.extend(registry::hosts_files(&config.image.certs_dir));
    v
}

/// Runs every check, prints the report, and returns the exit status.
pub fn run(config: &Config) -> std::process::ExitCode {
    let verdicts = all(config);
    for v in &verdicts {
        println!("{v}");
    }
    let count = |l: Level| verdicts.iter().filter(|v| v.level == l).count();
    let fails = count(Level::Fail);
    println!(
        "vesseld check: {} ok, {} warn, {fails} fail",
        count(Level::Ok),
        count(Level::Warn)
    );
    if fails > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_aligned_and_name_the_item() {
        assert_eq!(
            Verdict::ok("kvm", "usable").to_string(),
            "[ok]   kvm: usable"
        );
        assert_eq!(
            Verdict::fail("qemu", "missing").to_string(),
            "[fail] qemu: missing"
        );
        assert!(Level::Fail > Level::Warn && Level::Warn > Level::Ok);
    }
}
