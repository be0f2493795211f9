//! The guest kernel and initrd of every runtime handler, and whether they are the
//! files `scripts/build-guest.sh` recorded in the `guest.json` beside them.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::Verdict;
use crate::config::Config;

/// (kernel, initrd) → the handlers that use them.
fn guest_sets(config: &Config) -> BTreeMap<(PathBuf, PathBuf), Vec<String>> {
    let mut sets: BTreeMap<(PathBuf, PathBuf), Vec<String>> = BTreeMap::new();
    for (name, h) in &config.runtimes {
        let kernel = h
            .kernel
            .clone()
            .unwrap_or_else(|| config.guest.kernel.clone());
        let initrd = h
            .initrd
            .clone()
            .unwrap_or_else(|| config.guest.initrd.clone());
        sets.entry((kernel, initrd)).or_default().push(name.clone());
    }
    sets
}

/// Every handler's guest files (handlers sharing files are checked once).
pub fn guests(config: &Config) -> Vec<Verdict> {
    let mut out = Vec::new();
    for ((kernel, initrd), handlers) in guest_sets(config) {
        out.extend(guest(&handlers.join(", "), &kernel, &initrd));
    }
    out
}

/// One kernel + initrd pair, used by `handlers`.
pub fn guest(handlers: &str, kernel: &Path, initrd: &Path) -> Vec<Verdict> {
    let mut out = Vec::new();
    let mut present = true;
    for (what, file) in [("guest kernel", kernel), ("guest initrd", initrd)] {
        let item = format!("{what} ({handlers})");
        match std::fs::metadata(file) {
            Ok(m) if m.is_file() && m.len() > 0 => out.push(Verdict::ok(
                item,
                format!("{} ({} MiB)", file.display(), m.len().div_ceil(1 << 20)),
            )),
            Ok(_) => {
                present = false;
                out.push(Verdict::fail(
                    item,
                    format!(
                        "{} is not a non-empty file: run scripts/build-guest.sh",
                        file.display()
                    ),
                ))
            }
            Err(e) => {
                present = false;
                out.push(Verdict::fail(
                    item,
                    format!("{}: {e}: run scripts/build-guest.sh", file.display()),
                ))
            }
        }
    }
    if present {
        out.push(manifest(handlers, kernel, initrd));
    }
    out
}

/// The `guest.json` next to the kernel: which kernel and agent the files carry, and
/// whether the files are still the ones it describes.
pub fn manifest(handlers: &str, kernel: &Path, initrd: &Path) -> Verdict {
    let item = format!("guest image ({handlers})");
    let dir = kernel.parent().unwrap_or(Path::new("/"));
    let path = dir.join("guest.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            return Verdict::warn(
                item,
                format!(
                    "{}: {e}: cannot tell which agent the initrd carries; rebuild it with \
                     scripts/build-guest.sh",
                    path.display()
                ),
            )
        }
    };
    let json: serde_json::Value = match serde_json::from_str(&text) {
        Ok(j) => j,
        Err(e) => return Verdict::fail(item, format!("{}: not JSON: {e}", path.display())),
    };
    let field = |k: &str| json[k].as_str().unwrap_or("?").to_owned();
    for (file, key) in [(kernel, "vmlinux_sha256"), (initrd, "initrd_sha256")] {
        let Some(want) = json[key].as_str() else {
            continue;
        };
        match sha256_file(file) {
            Ok(have) if have == want => {}
            Ok(_) => {
                return Verdict::fail(
                    item,
                    format!(
                        "{} is not the file {} describes ({key} differs): the kernel and \
                         initrd come from different builds; run scripts/build-guest.sh",
                        file.display(),
                        path.display()
                    ),
                )
            }
            Err(e) => return Verdict::fail(item, format!("read {}: {e}", file.display())),
        }
    }
    let agent = field("agent_sha256");
    let agent = agent.get(..12).unwrap_or(&agent);
    let agent_version = match json["agent_version"].as_str() {
        Some(v) if v == env!("CARGO_PKG_VERSION") => format!("agent {v}"),
        Some(v) => {
            return Verdict::warn(
                item,
                format!(
                    "agent {v} but vesseld {}: rebuild the guest (scripts/build-guest.sh)",
                    env!("CARGO_PKG_VERSION")
                ),
            )
        }
        None => "agent version not recorded".to_owned(),
    };
    Verdict::ok(
        item,
        format!(
            "kernel {}, {agent_version} (sha256 {agent}…), files match {}",
            field("kernel_version"),
            path.display()
        ),
    )
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    fn write_guest(dir: &Path, agent_version: Option<&str>) -> (PathBuf, PathBuf) {
        let (k, i) = (dir.join("vmlinux"), dir.join("initrd.img"));
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&i, b"initrd").unwrap();
        let mut json = serde_json::json!({
            "kernel_version": "6.1.0-test",
            "agent_sha256": "3514dcca01bbe6679464506b2de4d5cb",
            "vmlinux_sha256": sha256_file(&k).unwrap(),
            "initrd_sha256": sha256_file(&i).unwrap(),
        });
        if let Some(v) = agent_version {
            json["agent_version"] = v.into();
        }
        std::fs::write(dir.join("guest.json"), json.to_string()).unwrap();
        (k, i)
    }

    #[test]
    fn a_matching_guest_is_ok() {
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = write_guest(dir.path(), None);
        let v = guest("default", &k, &i);
        assert!(v.iter().all(|v| v.level == Level::Ok), "{v:?}");
        assert!(v[2].message.contains("kernel 6.1.0-test"), "{v:?}");
        assert!(v[2].message.contains("3514dcca01bb"), "{v:?}");
    }

    #[test]
    fn a_replaced_initrd_or_an_old_agent_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = write_guest(dir.path(), Some("0.0.1"));
        let v = manifest("default", &k, &i);
        assert_eq!(v.level, Level::Warn, "{v:?}");
        assert!(v.message.contains("agent 0.0.1"), "{v:?}");
        std::fs::write(&i, b"another initrd").unwrap();
        let v = manifest("default", &k, &i);
        assert_eq!(v.level, Level::Fail, "{v:?}");
        assert!(v.message.contains("initrd_sha256"), "{v:?}");
    }

    #[test]
    fn missing_files_name_the_handlers_and_the_fix() {
        let mut config = Config::default();
        config.guest.kernel = "/nonexistent/vmlinux".into();
        config.runtimes.insert("big".into(), Default::default());
        let v = guests(&config);
        assert_eq!(v.len(), 2, "shared files are checked once: {v:?}");
        assert_eq!(v[0].item, "guest kernel (big, default)");
        assert_eq!(v[0].level, Level::Fail);
        assert!(v[0].message.contains("build-guest.sh"), "{v:?}");
    }
}
