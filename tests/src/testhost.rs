//! A "test host": a named network namespace standing in for a node, so that CNI
//! bridges, pod subnets and iptables rules never touch the machine's own network.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

/// A named netns (`ip netns add`), loopback up; deleted on drop.
pub struct TestHost {
    name: String,
}

impl TestHost {
    /// Creates `<prefix>-<random hex>`.
    pub fn new(prefix: &str) -> anyhow::Result<TestHost> {
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        ip(&["netns", "add", &name])?;
        let host = TestHost { name };
        ip(&["-n", &host.name, "link", "set", "lo", "up"])?;
        Ok(host)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file (what `TestDaemon::set_netns` takes).
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs a command in the namespace: (success, stdout + stderr).
    pub fn exec(&self, cmd: &[&str]) -> (bool, String) {
        match Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
        {
            Ok(out) => (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ),
            Err(e) => (false, format!("ip netns exec: {e}")),
        }
    }

    /// Names of the links in the namespace.
    pub fn links(&self) -> Vec<String> {
        let (_, out) = self.exec(&["ip", "-o", "link", "show"]);
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .collect()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let st = Command::new("ip")
        .args(args)
        .status()
        .context("cannot run ip")?;
    if !st.success() {
        bail!("ip {args:?}: {st}");
    }
    Ok(())
}
