//! Exec'd processes of a container in the pod's user namespace.
//!
//! libcontainer's exec (tenant) path joins the container's namespaces but not its
//! user namespace, so an exec'd process would run as the VM's real root, outside
//! the namespace. The helper therefore has libcontainer start the process as root
//! with every capability, and this module, run last before execve, joins the user
//! namespace (by an fd the helper opened), then takes on the process's own user,
//! groups, capabilities and no_new_privs, as libcontainer would have.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sched::CloneFlags;
use nix::unistd::{Gid, Uid};
use oci_spec::runtime::{LinuxCapabilities, Process, User};

/// What the exec'd process takes on once inside the namespace.
#[derive(Clone)]
pub struct Entry {
    /// The namespace fd, open in the helper (and so in every process it forks
    /// until execve: libcontainer marks inherited fds close-on-exec, not closed).
    fd: RawFd,
    user: User,
    capabilities: Option<LinuxCapabilities>,
    no_new_privileges: bool,
}

/// Opens the user namespace at `ns_path` and rewrites the exec process file at
/// `process` to start as root with all capabilities (so the process may join
/// the namespace). Returns the fd (keep it open until the exec is built), the
/// rewritten file, and what to restore inside.
pub fn prepare(
    ns_path: &Path,
    process: &Path,
) -> anyhow::Result<(OwnedFd, std::path::PathBuf, Entry)> {
    let fd: OwnedFd = std::fs::File::open(ns_path)?.into();
    let mut p: Process = serde_json::from_slice(&std::fs::read(process)?)?;
    let entry = Entry {
        fd: fd.as_raw_fd(),
        user: p.user().clone(),
        capabilities: p.capabilities().clone(),
        no_new_privileges: p.no_new_privileges() == Some(true),
    };
    let mut root = User::default();
    root.set_uid(0);
    root.set_gid(0);
    p.set_user(root);
    // No capabilities section: libcontainer drops none.
    p.set_capabilities(None);
    p.set_no_new_privileges(None);
    let out = process.with_extension("userns.json");
    std::fs::write(&out, serde_json::to_vec(&p)?)?;
    Ok((fd, out, entry))
}

impl Entry {
    /// Joins the namespace and becomes the process's user, keeping (for now) the
    /// full capability set the namespace grants.
    pub fn enter(&self) -> Result<(), String> {
        // SAFETY: the fd was opened by the helper and stays open until execve.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        nix::sched::setns(fd, CloneFlags::CLONE_NEWUSER)
            .map_err(|e| format!("join the pod's user namespace: {e}"))?;
        let groups: Vec<Gid> = self
            .user
            .additional_gids()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(Gid::from_raw)
            .collect();
        nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups {groups:?}: {e}"))?;
        let gid = Gid::from_raw(self.user.gid());
        nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setresgid {gid}: {e}"))?;
        // Keep the permitted set across the uid change; `drop_capabilities` sets
        // every set explicitly afterwards.
        nix::sys::prctl::set_keepcaps(true).map_err(|e| format!("keepcaps: {e}"))?;
        let uid = Uid::from_raw(self.user.uid());
        nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setresuid {uid}: {e}"))?;
        Ok(())
    }

    /// Drops to the process's capabilities and sets no_new_privs if asked.
    pub fn drop_capabilities(&self) -> Result<(), String> {
        if let Some(caps) = &self.capabilities {
            let syscall = libcontainer::syscall::syscall::create_syscall();
            libcontainer::capabilities::drop_privileges(caps, syscall.as_ref())
                .map_err(|e| format!("capabilities: {e}"))?;
        }
        if self.no_new_privileges {
            nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_starts_as_root_and_keeps_what_to_restore() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.json");
        std::fs::write(
            &file,
            br#"{"args":["id"],"cwd":"/","noNewPrivileges":true,
                 "user":{"uid":1000,"gid":1001,"additionalGids":[5]},
                 "capabilities":{"bounding":["CAP_CHOWN"],"effective":["CAP_CHOWN"]}}"#,
        )
        .unwrap();
        let (_fd, out, entry) = prepare(Path::new("/proc/self/ns/user"), &file).unwrap();
        let p: Process = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (0, 0));
        assert!(p.capabilities().is_none());
        assert_ne!(p.no_new_privileges(), Some(true));
        assert_eq!(p.args().as_ref().unwrap(), &["id".to_string()]);
        assert_eq!((entry.user.uid(), entry.user.gid()), (1000, 1001));
        assert_eq!(entry.user.additional_gids().as_ref().unwrap(), &[5]);
        assert!(entry.no_new_privileges);
        assert!(entry.capabilities.is_some());
    }
}
