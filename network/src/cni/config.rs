//! Network configuration lists (`*.conflist`) and single-plugin configs
//! (`*.conf`, `*.json`), loaded from a CNI config directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{io, Error, Result};

/// CNI versions whose config and result formats this runtime speaks.
const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

pub(crate) fn version_supported(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

/// `CHECK` exists from 0.4.0 on.
pub(crate) fn version_has_check(v: &str) -> bool {
    v != "0.3.0" && v != "0.3.1"
}

/// One network: a name, a version and a chain of plugins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfigList {
    pub cni_version: String,
    pub name: String,
    #[serde(default)]
    pub disable_check: bool,
    /// Each plugin's config object as written (unknown keys are the plugin's business).
    pub plugins: Vec<Map<String, Value>>,
}

impl NetworkConfigList {
    /// Parses a `.conflist` document.
    pub fn from_conflist(bytes: &[u8]) -> Result<NetworkConfigList, String> {
        let list: NetworkConfigList = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        list.validate()?;
        Ok(list)
    }

    /// Parses a single-plugin `.conf`/`.json` document into a one-plugin list.
    pub fn from_single(bytes: &[u8]) -> Result<NetworkConfigList, String> {
        let plugin: Map<String, Value> =
            serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let string = |k: &str| plugin.get(k).and_then(Value::as_str).map(str::to_string);
        let list = NetworkConfigList {
            cni_version: string("cniVersion").ok_or("missing cniVersion")?,
            name: string("name").ok_or("missing name")?,
            disable_check: false,
            plugins: vec![plugin],
        };
        list.validate()?;
        Ok(list)
    }

    /// Reads one file; the extension picks the format.
    pub fn from_file(path: &Path) -> Result<NetworkConfigList> {
        let bytes = std::fs::read(path).map_err(io("read", path))?;
        let parsed = if path.extension().is_some_and(|e| e == "conflist") {
            Self::from_conflist(&bytes)
        } else {
            Self::from_single(&bytes)
        };
        parsed.map_err(|reason| Error::InvalidConfig {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Loads from `dir`: the network called `name`, or else the lexically first file
    /// (`*.conflist`, `*.conf`, `*.json`) that is a valid config. Invalid files are
    /// skipped with a warning, as libcni does.
    pub fn load(dir: &Path, name: Option<&str>) -> Result<NetworkConfigList> {
        for path in config_files(dir)? {
            match Self::from_file(&path) {
                Ok(list) if name.is_none_or(|n| n == list.name) => return Ok(list),
                Ok(_) => {}
                Err(e) => tracing::warn!("skipping CNI config: {e}"),
            }
        }
        Err(match name {
            Some(n) => Error::NetworkNotFound {
                name: n.to_string(),
                dir: dir.to_path_buf(),
            },
            None => Error::NoNetworkConfig(dir.to_path_buf()),
        })
    }

    fn validate(&self) -> Result<(), String> {
        if !version_supported(&self.cni_version) {
            return Err(format!("unsupported cniVersion {:?}", self.cni_version));
        }
        if self.name.is_empty() {
            return Err("empty network name".into());
        }
        if self.plugins.is_empty() {
            return Err("no plugins".into());
        }
        for p in &self.plugins {
            match p.get("type").and_then(Value::as_str) {
                Some(t) if !t.is_empty() && !t.contains('/') => {}
                _ => return Err("a plugin has no valid \"type\"".into()),
            }
        }
        Ok(())
    }
}

/// The plugin's `type`, i.e. its binary name (validated on load).
pub(crate) fn plugin_type(plugin: &Map<String, Value>) -> &str {
    plugin
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Whether the plugin declares `capabilities.<cap> = true`.
pub(crate) fn has_capability(plugin: &Map<String, Value>, cap: &str) -> bool {
    plugin
        .get("capabilities")
        .and_then(|c| c.get(cap))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Config files in `dir`, sorted by file name.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NoNetworkConfig(dir.to_path_buf()))
        }
        Err(e) => return Err(io("read dir", dir)(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(io("read dir", dir))?.path();
        let ext = path.extension().and_then(|e| e.to_str());
        if matches!(ext, Some("conflist" | "conf" | "json")) && path.is_file() {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"cniVersion":"1.0.0","name":"net-b","plugins":[
        {"type":"bridge","bridge":"cni0","ipam":{"type":"host-local"}},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    fn write(dir: &Path, name: &str, body: &str) {
        std::fs::write(dir.join(name), body).unwrap();
    }

    #[test]
    fn picks_the_lexically_first_valid_file() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "20-b.conflist", LIST);
        write(
            d.path(),
            "10-a.conf",
            r#"{"cniVersion":"0.4.0","name":"net-a","type":"ptp"}"#,
        );
        write(d.path(), "05-broken.conflist", "{not json");
        write(d.path(), "00-ignored.txt", LIST);
        let l = NetworkConfigList::load(d.path(), None).unwrap();
        assert_eq!(l.name, "net-a");
        assert_eq!(l.cni_version, "0.4.0");
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(plugin_type(&l.plugins[0]), "ptp");
    }

    #[test]
    fn finds_a_named_network() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "20-b.conflist", LIST);
        write(
            d.path(),
            "10-a.json",
            r#"{"cniVersion":"1.0.0","name":"net-a","type":"ptp"}"#,
        );
        let l = NetworkConfigList::load(d.path(), Some("net-b")).unwrap();
        assert_eq!(l.plugins.len(), 2);
        assert!(has_capability(&l.plugins[1], "portMappings"));
        assert!(!has_capability(&l.plugins[0], "portMappings"));
        assert!(matches!(
            NetworkConfigList::load(d.path(), Some("nope")),
            Err(Error::NetworkNotFound { .. })
        ));
    }

    #[test]
    fn empty_or_missing_dir_has_no_config() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            NetworkConfigList::load(d.path(), None),
            Err(Error::NoNetworkConfig(_))
        ));
        let missing = d.path().join("missing");
        assert!(matches!(
            NetworkConfigList::load(&missing, None),
            Err(Error::NoNetworkConfig(_))
        ));
    }

    #[test]
    fn validation() {
        for bad in [
            r#"{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"x"}]}"#,
            r#"{"cniVersion":"1.0.0","name":"","plugins":[{"type":"x"}]}"#,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../x"}]}"#,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"bridge":"x"}]}"#,
        ] {
            assert!(
                NetworkConfigList::from_conflist(bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
        assert!(NetworkConfigList::from_single(br#"{"name":"n","type":"x"}"#).is_err());
        let l = NetworkConfigList::from_conflist(
            br#"{"cniVersion":"0.3.1","name":"n","disableCheck":true,"plugins":[{"type":"x"}]}"#,
        )
        .unwrap();
        assert!(l.disable_check);
        assert!(!version_has_check(&l.cni_version));
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The default config shipped in docs/ must stay loadable.
    #[test]
    fn documented_default_conflist_loads() {
        let l = NetworkConfigList::from_conflist(include_bytes!(
            "../../../docs/examples/10-vessel.conflist"
        ))
        .unwrap();
        let types: Vec<&str> = l.plugins.iter().map(plugin_type).collect();
        assert_eq!(types, ["bridge", "portmap", "loopback"]);
        assert!(has_capability(&l.plugins[1], "portMappings"));
    }
}
