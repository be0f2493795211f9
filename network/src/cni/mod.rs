//! CNI 1.0 runtime side: run a network's plugin chain for ADD, CHECK and DEL.

mod cache;
pub(crate) mod config;
mod exec;
#[cfg(test)]
mod fuzz;
mod result;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

pub use cache::{CacheEntry, ResultCache};
pub use config::NetworkConfigList;
pub use exec::{find_plugin, plugin_env, plugin_stdin, Attachment, Command, PortMapping};
pub use result::{CniDns, CniInterface, CniIp, CniResult, CniRoute, PluginError};

use crate::error::{Error, Result};

/// Runs plugin chains and keeps their results.
#[derive(Debug, Clone)]
pub struct Cni {
    bin_dirs: Vec<PathBuf>,
    cache: ResultCache,
    timeout: Duration,
    /// One chain (ADD, CHECK or DEL) at a time, shared by clones. The reference
    /// plugins are not safe to run concurrently in one namespace: portmap 1.1.1 checks
    /// for its top-level iptables chains and then creates them, so two first ADDs race
    /// and one fails with "CHAIN_USER_ADD failed (File exists)". A chain takes tens of
    /// milliseconds against seconds of VM boot, so serializing costs little.
    chains: Arc<tokio::sync::Mutex<()>>,
}

impl Cni {
    /// Plugins are looked up in `bin_dirs` (in order); results go under `cache_dir`.
    pub fn new(bin_dirs: Vec<PathBuf>, cache_dir: &Path) -> Cni {
        Cni {
            bin_dirs,
            cache: ResultCache::new(cache_dir),
            timeout: Duration::from_secs(60),
            chains: Arc::default(),
        }
    }

    /// Limit for one plugin call.
    pub fn with_timeout(mut self, timeout: Duration) -> Cni {
        self.timeout = timeout;
        self
    }

    pub fn cache(&self) -> &ResultCache {
        &self.cache
    }

    /// ADD: every plugin in order, each getting the previous one's result. The final
    /// result is cached. If a plugin fails, the chain is DELeted (best effort) so no
    /// half-attached state stays, and the plugin's error is returned.
    pub async fn add(
        &self,
        net: &NetworkConfigList,
        att: &Attachment,
        netns: &Path,
    ) -> Result<CniResult> {
        let _chain = self.chains.lock().await;
        let mut prev: Option<Value> = None;
        for plugin in &net.plugins {
            let step = self
                .call(Command::Add, net, plugin, prev.as_ref(), att, Some(netns))
                .await;
            match step {
                Ok(Some(out)) => prev = Some(out),
                Ok(None) => {}
                Err(e) => {
                    if let Err(del) = self.run_del(net, att, Some(netns), prev.as_ref()).await {
                        tracing::warn!(container = %att.container_id, "CNI DEL after failed ADD: {del}");
                    }
                    return Err(e);
                }
            }
        }
        let result = prev.ok_or_else(|| Error::InvalidResult {
            plugin: net.name.clone(),
            reason: "the chain printed no result".into(),
        })?;
        let parsed = CniResult::parse(&result).and_then(|r| {
            self.cache
                .store(net, att, &result)
                .map(|()| r)
                .map_err(|e| e.to_string())
        });
        match parsed {
            Ok(r) => Ok(r),
            Err(reason) => {
                let _ = self.run_del(net, att, Some(netns), Some(&result)).await;
                Err(Error::InvalidResult {
                    plugin: net.name.clone(),
                    reason,
                })
            }
        }
    }

    /// DEL: the cached attachment's chain in reverse with the cached result as
    /// `prevResult`, then the cache entry goes. Without an entry, `fallback` (the current
    /// config) is used with no `prevResult`; with neither there is nothing to undo.
    /// Idempotent. `netns` may be gone already: plugins then only release their state.
    pub async fn del(
        &self,
        fallback: Option<&NetworkConfigList>,
        att: &Attachment,
        netns: Option<&Path>,
    ) -> Result<()> {
        let _chain = self.chains.lock().await;
        let netns = netns.filter(|p| p.exists());
        match self.cache.load(&att.container_id, &att.ifname)? {
            Some(entry) => {
                self.run_del(
                    &entry.network,
                    &entry.attachment,
                    netns,
                    Some(&entry.result),
                )
                .await?
            }
            None => match fallback {
                Some(net) => self.run_del(net, att, netns, None).await?,
                None => return Ok(()),
            },
        }
        self.cache.remove(&att.container_id, &att.ifname)
    }

    /// CHECK with the cached result; a no-op for versions before 0.4.0 or when the
    /// network sets `disableCheck`.
    pub async fn check(&self, att: &Attachment, netns: &Path) -> Result<()> {
        let entry = self
            .cache
            .load(&att.container_id, &att.ifname)?
            .ok_or_else(|| Error::Cache {
                path: self.cache.path(&att.container_id, &att.ifname),
                reason: "no cached result to CHECK against".into(),
            })?;
        let net = &entry.network;
        if net.disable_check || !config::version_has_check(&net.cni_version) {
            return Ok(());
        }
        let _chain = self.chains.lock().await;
        for plugin in &net.plugins {
            self.call(
                Command::Check,
                net,
                plugin,
                Some(&entry.result),
                &entry.attachment,
                Some(netns),
            )
            .await?;
        }
        Ok(())
    }

    async fn run_del(
        &self,
        net: &NetworkConfigList,
        att: &Attachment,
        netns: Option<&Path>,
        prev: Option<&Value>,
    ) -> Result<()> {
        // Every plugin gets its DEL even if one fails: each releases its own state.
        let mut first_err = None;
        for plugin in net.plugins.iter().rev() {
            if let Err(e) = self.call(Command::Del, net, plugin, prev, att, netns).await {
                tracing::warn!(container = %att.container_id, "CNI DEL: {e}");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// One plugin call; `Some(result)` when the plugin printed one.
    async fn call(
        &self,
        cmd: Command,
        net: &NetworkConfigList,
        plugin: &serde_json::Map<String, Value>,
        prev: Option<&Value>,
        att: &Attachment,
        netns: Option<&Path>,
    ) -> Result<Option<Value>> {
        let ty = config::plugin_type(plugin);
        let binary = find_plugin(ty, &self.bin_dirs)?;
        let env = plugin_env(cmd, att, netns, &self.bin_dirs);
        let stdin = plugin_stdin(&net.name, &net.cni_version, plugin, prev, att);
        let out = exec::run_plugin(&binary, cmd, &env, &stdin, self.timeout).await?;
        if cmd != Command::Add || out.trim_ascii().is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&out)
            .map(Some)
            .map_err(|e| Error::InvalidResult {
                plugin: ty.to_string(),
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    /// Fake plugins that log `COMMAND name stdin` and print a result on ADD; `fail`
    /// prints a CNI error on ADD.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let log = dir.path().join("log");
            for (name, ip) in [("a", "1"), ("b", "2"), ("fail", "")] {
                let add = if name == "fail" {
                    r#"echo '{"cniVersion":"1.0.0","code":100,"msg":"fail says no"}'; exit 1"#
                        .to_string()
                } else {
                    format!(
                        r#"printf '{{"cniVersion":"1.0.0","ips":[{{"address":"10.0.0.{ip}/24"}}]}}'"#
                    )
                };
                let script = format!(
                    "#!/bin/sh\nin=$(cat)\necho \"$CNI_COMMAND {name} $in\" >> {log}\n\
                     if [ \"$CNI_COMMAND\" = ADD ]; then {add}; fi\n",
                    log = log.display()
                );
                let path = dir.path().join(name);
                std::fs::write(&path, script).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            Fixture { dir }
        }

        fn cni(&self) -> Cni {
            Cni::new(
                vec![self.dir.path().to_path_buf()],
                &self.dir.path().join("cache"),
            )
        }

        /// (command, plugin, stdin) per call, in order.
        fn calls(&self) -> Vec<(String, String, Value)> {
            std::fs::read_to_string(self.dir.path().join("log"))
                .unwrap_or_default()
                .lines()
                .map(|l| {
                    let mut parts = l.splitn(3, ' ');
                    let cmd = parts.next().unwrap().to_string();
                    let name = parts.next().unwrap().to_string();
                    (
                        cmd,
                        name,
                        serde_json::from_str(parts.next().unwrap()).unwrap(),
                    )
                })
                .collect()
        }
    }

    fn net(types: &[&str]) -> NetworkConfigList {
        let plugins: Vec<Value> = types.iter().map(|t| json!({"type": t})).collect();
        NetworkConfigList::from_conflist(
            json!({"cniVersion": "1.0.0", "name": "chain", "plugins": plugins})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
    }

    fn att() -> Attachment {
        Attachment {
            container_id: "pod1".into(),
            ifname: "eth0".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn add_chains_prev_results_and_del_runs_in_reverse_from_the_cache() {
        let fx = Fixture::new();
        let cni = fx.cni();
        let ns = fx.dir.path().join("netns");
        std::fs::write(&ns, "").unwrap();
        let result = cni.add(&net(&["a", "b"]), &att(), &ns).await.unwrap();
        assert_eq!(result.ips[0].address.to_string(), "10.0.0.2/24");
        assert!(cni.cache().load("pod1", "eth0").unwrap().is_some());

        cni.check(&att(), &ns).await.unwrap();
        // DEL works from the cache alone (no config given, as after a restart).
        cni.del(None, &att(), Some(&ns)).await.unwrap();
        let calls = fx.calls();
        let order: Vec<(&str, &str)> = calls
            .iter()
            .map(|(c, n, _)| (c.as_str(), n.as_str()))
            .collect();
        let expect = [
            ("ADD", "a"),
            ("ADD", "b"),
            ("CHECK", "a"),
            ("CHECK", "b"),
            ("DEL", "b"),
            ("DEL", "a"),
        ];
        assert_eq!(order, expect);
        assert!(calls[0].2.get("prevResult").is_none());
        assert_eq!(calls[1].2["prevResult"]["ips"][0]["address"], "10.0.0.1/24");
        // CHECK and DEL get the cached final result.
        for del in &calls[2..] {
            assert_eq!(del.2["prevResult"]["ips"][0]["address"], "10.0.0.2/24");
            assert_eq!(del.2["name"], "chain");
        }
        assert!(cni.cache().load("pod1", "eth0").unwrap().is_none());

        // Idempotent: no cache and no config means nothing to do.
        cni.del(None, &att(), Some(&ns)).await.unwrap();
        assert_eq!(fx.calls().len(), 6);
    }

    #[tokio::test]
    async fn failed_add_is_undone_and_reports_the_plugin_error() {
        let fx = Fixture::new();
        let cni = fx.cni();
        let ns = fx.dir.path().join("netns");
        let err = cni
            .add(&net(&["a", "fail", "b"]), &att(), &ns)
            .await
            .unwrap_err();
        match &err {
            Error::Plugin {
                plugin,
                command,
                error,
            } => {
                assert_eq!(
                    (plugin.as_str(), *command, error.code),
                    ("fail", "ADD", 100)
                );
                assert_eq!(error.msg, "fail says no");
            }
            other => panic!("unexpected {other}"),
        }
        let order: Vec<(String, String)> = fx.calls().into_iter().map(|(c, n, _)| (c, n)).collect();
        let expect = [
            ("ADD", "a"),
            ("ADD", "fail"),
            ("DEL", "b"),
            ("DEL", "fail"),
            ("DEL", "a"),
        ];
        assert_eq!(order, expect.map(|(c, n)| (c.to_string(), n.to_string())));
        assert!(cni.cache().load("pod1", "eth0").unwrap().is_none());
    }
}
