//! ADD results kept on disk, one JSON per container id + ifname, so DEL works after a
//! restart with the same config, arguments and `prevResult` as the ADD.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::NetworkConfigList;
use super::exec::Attachment;
use crate::error::{Error, Result};

const KIND: &str = "vessel-cni-cache-v1";

/// What one successful ADD left behind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub kind: String,
    pub attachment: Attachment,
    pub network: NetworkConfigList,
    /// The chain's final result, exactly as the last plugin printed it.
    pub result: Value,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct ResultCache {
    dir: PathBuf,
}

impl ResultCache {
    pub fn new(cache_dir: &Path) -> ResultCache {
        ResultCache {
            dir: cache_dir.join("results"),
        }
    }

    /// `<cache_dir>/results/<container_id>-<ifname>.json`.
    pub fn path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir.join(format!("{container_id}-{ifname}.json"))
    }

    /// Writes atomically (temp file, fsync, rename): a crash leaves the old entry or
    /// the new one, never half of one.
    pub fn store(
        &self,
        network: &NetworkConfigList,
        att: &Attachment,
        result: &Value,
    ) -> Result<()> {
        let path = self.path(&att.container_id, &att.ifname);
        let err = |e: &dyn std::fmt::Display| Error::Cache {
            path: path.clone(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| err(&e))?;
        let entry = CacheEntry {
            kind: KIND.into(),
            attachment: att.clone(),
            network: network.clone(),
            result: result.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&entry).map_err(|e| err(&e))?;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| err(&e))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                err(&e)
            })
    }

    /// The entry, or `None` when there is none.
    pub fn load(&self, container_id: &str, ifname: &str) -> Result<Option<CacheEntry>> {
        let path = self.path(container_id, ifname);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Cache {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        let entry: CacheEntry = serde_json::from_slice(&bytes).map_err(|e| Error::Cache {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if entry.kind != KIND {
            return Err(Error::Cache {
                path,
                reason: format!("unknown kind {:?}", entry.kind),
            });
        }
        Ok(Some(entry))
    }

    /// Deletes the entry; a missing one is fine.
    pub fn remove(&self, container_id: &str, ifname: &str) -> Result<()> {
        let path = self.path(container_id, ifname);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Cache {
                path,
                reason: e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn store_load_remove_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let cache = ResultCache::new(d.path());
        let net = NetworkConfigList::from_conflist(
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        let att = Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            ..Default::default()
        };
        let result = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]});
        assert!(cache.load("c1", "eth0").unwrap().is_none());
        cache.store(&net, &att, &result).unwrap();
        assert!(d.path().join("results/c1-eth0.json").is_file());
        let e = cache.load("c1", "eth0").unwrap().unwrap();
        assert_eq!((e.network, e.attachment, e.result), (net, att, result));
        cache.remove("c1", "eth0").unwrap();
        cache.remove("c1", "eth0").unwrap();
        assert!(cache.load("c1", "eth0").unwrap().is_none());
    }

    #[test]
    fn corrupt_entries_are_errors() {
        let d = tempfile::tempdir().unwrap();
        let cache = ResultCache::new(d.path());
        std::fs::create_dir_all(d.path().join("results")).unwrap();
        std::fs::write(cache.path("c", "eth0"), "{").unwrap();
        assert!(matches!(cache.load("c", "eth0"), Err(Error::Cache { .. })));
    }
}
