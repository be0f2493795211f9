//! Modes of vesseld's own host directories and files.
//!
//! `root` holds unpacked layers (setuid binaries, device nodes), container rootfs
//! upper dirs and the state database: no other host user may enter it. `run_root`
//! and `run_root/vm` are traversable (0711) so that a per-pod unprivileged VMM can
//! reach its own `vm/<id>/` dir, but not listable; `run_root/pods` (share dirs with
//! mounted container rootfs) is private. Existing dirs are tightened at every start.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context as _;

use crate::config::Config;

/// Mode of `root`.
pub const ROOT_MODE: u32 = 0o700;
/// Mode of `run_root` and `run_root/vm`.
pub const RUN_ROOT_MODE: u32 = 0o711;
/// Mode of `run_root/pods`.
pub const PODS_MODE: u32 = 0o700;
/// Mode of `state.redb`.
pub const STATE_DB_MODE: u32 = 0o600;

/// Creates `dir` (parents too) with `mode`, and sets `mode` if it existed.
fn dir_with_mode(dir: &Path, mode: u32) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {:o} {}", mode, dir.display()))
}

/// Creates (or tightens) root, run_root and the state database file.
pub fn prepare(config: &Config) -> anyhow::Result<()> {
    dir_with_mode(&config.root, ROOT_MODE)?;
    dir_with_mode(&config.run_root, RUN_ROOT_MODE)?;
    dir_with_mode(&config.run_root.join("vm"), RUN_ROOT_MODE)?;
    dir_with_mode(&config.run_root.join("pods"), PODS_MODE)?;
    // redb creates its file with the umask's mode; make it first (an empty file is a
    // new database to redb).
    let db = config.state_db();
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(STATE_DB_MODE)
        .open(&db)
        .with_context(|| format!("cannot create {}", db.display()))?;
    std::fs::set_permissions(&db, Permissions::from_mode(STATE_DB_MODE))
        .with_context(|| format!("cannot chmod {}", db.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_and_tightens() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            root: dir.path().join("lib/vessel"),
            run_root: dir.path().join("run/vessel"),
            ..Config::default()
        };
        prepare(&config).unwrap();
        let check = |config: &Config| {
            assert_eq!(mode(&config.root), 0o700);
            assert_eq!(mode(&config.run_root), 0o711);
            assert_eq!(mode(&config.run_root.join("vm")), 0o711);
            assert_eq!(mode(&config.run_root.join("pods")), 0o700);
            assert_eq!(mode(&config.state_db()), 0o600);
        };
        check(&config);
        // A database redb can open.
        redb::Database::create(config.state_db()).unwrap();
        // Loosened by hand (or made by an older vesseld): tightened again.
        for p in [&config.root, &config.run_root, &config.state_db()] {
            std::fs::set_permissions(p, Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::set_permissions(config.run_root.join("pods"), Permissions::from_mode(0o777))
            .unwrap();
        prepare(&config).unwrap();
        check(&config);
        redb::Database::create(config.state_db()).unwrap();
    }

    #[test]
    fn container_logs_are_not_world_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctr/0.log");
        let _log = crate::crilog::CriLog::open(&path, None).unwrap();
        assert_eq!(mode(&path), 0o640);
    }
}
