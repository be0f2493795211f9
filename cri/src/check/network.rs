//! CNI: the config vessel would use, every plugin it names, and IP forwarding.

use std::path::{Path, PathBuf};

use vessel_network::cni::find_plugin;
use vessel_network::NetworkConfigList;

use super::Verdict;

pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// CNI config files in `dir` (what `NetworkConfigList::load` considers).
fn conf_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension()
                        .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The network config of `conf_dir` and the plugins it names, found in `bin_dirs`.
pub fn cni(conf_dir: &Path, bin_dirs: &[PathBuf]) -> Vec<Verdict> {
    let item = "cni config";
    if conf_files(conf_dir).is_empty() {
        return vec![Verdict::warn(
            item,
            format!(
                "no *.conflist/*.conf in {}: pods run without a network (scripts/setup.sh \
                 installs docs/examples/10-vessel.conflist)",
                conf_dir.display()
            ),
        )];
    }
    // Invalid files are skipped when a pod starts (as libcni does): say so.
    let mut out: Vec<Verdict> = conf_files(conf_dir)
        .iter()
        .filter_map(|f| NetworkConfigList::from_file(f).err())
        .map(|e| Verdict::warn(item, format!("{e}: skipped")))
        .collect();
    let net = match NetworkConfigList::load(conf_dir, None) {
        Ok(net) => net,
        Err(e) => {
            out.push(Verdict::fail(item, format!("{}: {e}", conf_dir.display())));
            return out;
        }
    };
    let types: Vec<String> = net
        .plugins
        .iter()
        .map(|p| {
            p.get("type")
                .and_then(|t| t.as_str())
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    out.push(Verdict::ok(
        item,
        format!(
            "network {:?} in {} (CNI {}): plugins {}",
            net.name,
            conf_dir.display(),
            net.cni_version,
            types.join(", ")
        ),
    ));
    let dirs = bin_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    for t in &types {
        let item = format!("cni plugin {t}");
        out.push(match find_plugin(t, bin_dirs) {
            Ok(path) => Verdict::ok(item, path.display().to_string()),
            Err(_) => Verdict::fail(
                item,
                format!(
                    "network {:?} needs plugin {t:?}, not found in {dirs}: install it \
                     (Debian: containernetworking-plugins) or fix network.cni_bin_dirs",
                    net.name
                ),
            ),
        });
    }
    out
}

/// `net.ipv4.ip_forward`: pods reach beyond the host only with it on.
pub fn ip_forward(path: &Path) -> Verdict {
    let item = "ip forwarding";
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == "1" => Verdict::ok(item, "net.ipv4.ip_forward = 1"),
        Ok(v) => Verdict::warn(
            item,
            format!(
                "net.ipv4.ip_forward = {}: pod traffic is not routed off the host; \
                 sysctl -w net.ipv4.ip_forward=1 (and persist it in /etc/sysctl.d)",
                v.trim()
            ),
        ),
        Err(e) => Verdict::warn(item, format!("cannot read {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn names_each_plugin_and_the_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let (conf, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        let v = cni(&conf, std::slice::from_ref(&bin));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].level, Level::Warn, "{v:?}");

        std::fs::write(
            conf.join("10-test.conflist"),
            r#"{"cniVersion":"1.0.0","name":"testnet","plugins":[{"type":"bridge"},{"type":"no-such-plugin"}]}"#,
        )
        .unwrap();
        let plugin = bin.join("bridge");
        std::fs::write(&plugin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let v = cni(&conf, std::slice::from_ref(&bin));
        assert_eq!(v.len(), 3, "{v:?}");
        assert_eq!(v[0].level, Level::Ok);
        assert!(v[0].message.contains("\"testnet\""), "{v:?}");
        assert_eq!(
            (v[1].item.as_str(), v[1].level),
            ("cni plugin bridge", Level::Ok)
        );
        assert_eq!(v[2].item, "cni plugin no-such-plugin");
        assert_eq!(v[2].level, Level::Fail);

        std::fs::write(conf.join("10-test.conflist"), "{ not json").unwrap();
        let v = cni(&conf, &[bin]);
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0].level, Level::Warn, "{v:?}");
        assert!(v[0].message.contains("skipped"), "{v:?}");
        assert_eq!(v[1].level, Level::Fail, "{v:?}");
    }

    #[test]
    fn ip_forwarding_off_warns() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ip_forward");
        std::fs::write(&p, "0\n").unwrap();
        assert_eq!(ip_forward(&p).level, Level::Warn);
        std::fs::write(&p, "1\n").unwrap();
        assert_eq!(ip_forward(&p).level, Level::Ok);
    }
}
