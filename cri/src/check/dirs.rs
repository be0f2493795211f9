//! vesseld's state and run dirs: the modes `hostdirs` gives them.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

use super::Verdict;
use crate::config::Config;
use crate::hostdirs::{PODS_MODE, ROOT_MODE, RUN_ROOT_MODE, STATE_DB_MODE};

/// root, run_root, run_root/vm, run_root/pods and the state database.
pub fn state_dirs(config: &Config) -> Vec<Verdict> {
    [
        ("root", config.root.clone(), ROOT_MODE, true),
        ("run_root", config.run_root.clone(), RUN_ROOT_MODE, true),
        (
            "run_root/vm",
            config.run_root.join("vm"),
            RUN_ROOT_MODE,
            true,
        ),
        (
            "run_root/pods",
            config.run_root.join("pods"),
            PODS_MODE,
            true,
        ),
        ("state db", config.state_db(), STATE_DB_MODE, false),
    ]
    .into_iter()
    .map(|(item, path, mode, dir)| entry(item, &path, mode, dir))
    .collect()
}

/// One dir (or file, `dir` false) that should have `mode` and belong to root.
pub fn entry(item: &str, path: &Path, mode: u32, dir: bool) -> Verdict {
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Verdict::ok(
                item,
                format!(
                    "{} not created yet (vesseld makes it with mode {mode:04o})",
                    path.display()
                ),
            )
        }
        Err(e) => return Verdict::fail(item, format!("{}: {e}", path.display())),
    };
    let kind_ok = if dir { m.is_dir() } else { m.is_file() };
    if !kind_ok {
        return Verdict::fail(
            item,
            format!(
                "{} is not a {}: move it away",
                path.display(),
                if dir { "directory" } else { "regular file" }
            ),
        );
    }
    let have = m.permissions().mode() & 0o7777;
    if m.uid() != 0 {
        return Verdict::warn(
            item,
            format!(
                "{} belongs to uid {}, not root: chown root: it",
                path.display(),
                m.uid()
            ),
        );
    }
    if have != mode {
        return Verdict::warn(
            item,
            format!(
                "{} has mode {have:04o}, expected {mode:04o} (vesseld sets it at start; \
                 or chmod {mode:o} it)",
                path.display()
            ),
        );
    }
    Verdict::ok(item, format!("{} mode {mode:04o}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    #[test]
    fn modes_are_compared_with_hostdirs() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            root: dir.path().join("lib"),
            run_root: dir.path().join("run"),
            ..Config::default()
        };
        let v = state_dirs(&config);
        assert!(v.iter().all(|v| v.level == Level::Ok), "{v:?}");
        assert!(v[0].message.contains("not created yet"), "{v:?}");

        crate::hostdirs::prepare(&config).unwrap();
        let v = state_dirs(&config);
        let root = nix::unistd::Uid::effective().is_root();
        // Owner checks expect root: without it half of this test would check nothing.
        assert!(
            root || std::env::var_os("VESSEL_SKIP_VM").is_some(),
            "needs root; set VESSEL_SKIP_VM=1 to run it without the owner checks"
        );
        if root {
            assert!(v.iter().all(|v| v.level == Level::Ok), "{v:?}");
        }
        std::fs::set_permissions(&config.root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let v = entry("root", &config.root, ROOT_MODE, true);
        assert_eq!(v.level, Level::Warn);
        if root {
            assert!(v.message.contains("mode 0755, expected 0700"), "{v:?}");
        }
        let v = entry("state db", &config.root, STATE_DB_MODE, false);
        assert_eq!(v.level, Level::Fail, "{v:?}");
    }
}
