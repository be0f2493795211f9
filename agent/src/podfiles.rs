//! The guest's writable copy of the pod files.
//!
//! The host exports `hosts`, `resolv.conf` and `hostname` read-only in `pod/` of the
//! share; containers bind-mount them writable from [`GUEST_POD_FILES_DIR`], so what a
//! container writes there lands in guest memory (bounded by the VM's size), never in
//! a host file. One copy per pod VM, shared by its containers (as the host file
//! was), made before the first container is created. The copies live on a tmpfs of
//! their own, capped at [`POD_FILES_TMPFS_SIZE`]: a container filling `/etc/hosts`
//! gets ENOSPC there instead of filling the guest's `/run`, where the agent keeps
//! its own state.

use std::path::Path;
use std::sync::Mutex;

use nix::mount::{mount, MsFlags};

use vessel_proto::{GUEST_POD_FILES_DIR, GUEST_SHARE_DIR};

/// The pod files the host provides.
const POD_FILES: [&str; 3] = ["hosts", "resolv.conf", "hostname"];

/// Room for the pod files and what containers append to them.
const POD_FILES_TMPFS_SIZE: &str = "1m";

static COPIED: Mutex<bool> = Mutex::new(false);

/// Copies the pod files once; later calls are no-ops. A file the host did not
/// provide becomes an empty one, so the bind mount still has a source.
pub fn ensure() -> std::io::Result<()> {
    let mut copied = COPIED.lock().unwrap_or_else(|p| p.into_inner());
    if *copied {
        return Ok(());
    }
    let dir = Path::new(GUEST_POD_FILES_DIR);
    std::fs::create_dir_all(dir)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let opts = format!("size={POD_FILES_TMPFS_SIZE},mode=0755");
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        flags,
        Some(opts.as_str()),
    )?;
    copy_all(&Path::new(GUEST_SHARE_DIR).join("pod"), dir)?;
    *copied = true;
    Ok(())
}

fn copy_all(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for name in POD_FILES {
        let contents = match std::fs::read(from.join(name)) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        std::fs::write(to.join(name), contents)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_present_files_and_fills_missing_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let from = tmp.path().join("share/pod");
        std::fs::create_dir_all(&from).unwrap();
        std::fs::write(from.join("hosts"), "127.0.0.1 localhost\n").unwrap();
        let to = tmp.path().join("pod");
        copy_all(&from, &to).unwrap();
        assert_eq!(
            std::fs::read_to_string(to.join("hosts")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        assert_eq!(std::fs::read(to.join("hostname")).unwrap(), b"");
        // The copy is independent of the source.
        std::fs::write(to.join("hosts"), "changed").unwrap();
        assert_eq!(
            std::fs::read_to_string(from.join("hosts")).unwrap(),
            "127.0.0.1 localhost\n"
        );
    }
}
