//! Can this host start a pod VM at all? The runtime reports the answer as its
//! `RuntimeReady` condition, so a node missing QEMU or the guest image says so before
//! the first pod fails.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::config::Binaries;

/// The kernel's vhost-vsock device; without it the user-space vsock helper serves
/// the agent channel.
pub const VHOST_VSOCK_DEV: &str = "/dev/vhost-vsock";

/// What a pod VM needs from the host: the programs and the guest files.
#[derive(Debug, Clone)]
pub struct HostNeeds<'a> {
    pub binaries: &'a Binaries,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// Where the kernel vhost-vsock device would be ([`VHOST_VSOCK_DEV`]); without
    /// it the user-space vsock helper is needed.
    pub vhost_vsock_dev: &'a Path,
}

impl<'a> HostNeeds<'a> {
    /// The needs of a VM with these programs and guest files on this host.
    pub fn new(binaries: &'a Binaries, kernel: &'a Path, initrd: &'a Path) -> Self {
        HostNeeds {
            binaries,
            kernel,
            initrd,
            vhost_vsock_dev: Path::new(VHOST_VSOCK_DEV),
        }
    }
}

/// Every reason a VM could not start here, one sentence each, naming the fix; empty
/// when nothing is missing. Cheap: only looks at files.
pub fn host_problems(needs: &HostNeeds<'_>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut program = |p: &Path, what: &str| {
        if find_program(p).is_none() {
            problems.push(format!(
                "{what} {} not found or not executable (scripts/install-deps.sh installs it)",
                p.display()
            ));
        }
    };
    program(&needs.binaries.qemu, "QEMU");
    program(&needs.binaries.virtiofsd, "virtiofsd");
    if !needs.vhost_vsock_dev.exists() {
        program(&needs.binaries.vhost_device_vsock, "vsock helper");
    }
    for (file, what) in [
        (needs.kernel, "guest kernel"),
        (needs.initrd, "guest initrd"),
    ] {
        match std::fs::File::open(file).and_then(|f| f.metadata()) {
            Ok(m) if m.is_file() && m.len() > 0 => {}
            Ok(_) => problems.push(format!(
                "{what} {} is not a non-empty file (scripts/build-guest.sh builds it)",
                file.display()
            )),
            Err(e) => problems.push(format!(
                "{what} {}: {e} (scripts/build-guest.sh builds it)",
                file.display()
            )),
        }
    }
    problems
}

/// The executable a program name resolves to: a path with a `/` as it is, a bare name
/// through `$PATH` (as `Command` looks it up).
pub fn find_program(program: &Path) -> Option<PathBuf> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 || program.is_absolute() {
        return executable(program).then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_in_path_and_by_path() {
        assert!(find_program(Path::new("sh")).is_some());
        assert!(find_program(Path::new("/bin/sh")).is_some());
        assert!(find_program(Path::new("no-such-program-vessel")).is_none());
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(find_program(&plain).is_none(), "not executable");
    }

    #[test]
    fn names_each_missing_piece() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"x").unwrap();
        let empty = dir.path().join("initrd.img");
        std::fs::write(&empty, b"").unwrap();
        let binaries = Binaries {
            qemu: "/bin/sh".into(),
            virtiofsd: "no-such-virtiofsd".into(),
            vhost_device_vsock: "no-such-vsock-helper".into(),
        };
        let no_dev = dir.path().join("no-vhost-vsock");
        let mut needs = HostNeeds {
            binaries: &binaries,
            kernel: &kernel,
            initrd: &empty,
            vhost_vsock_dev: &no_dev,
        };
        let p = host_problems(&needs);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("virtiofsd no-such-virtiofsd"), "{p:?}");
        assert!(p[1].contains("no-such-vsock-helper"), "{p:?}");
        assert!(
            p[2].contains("guest initrd") && p[2].contains("non-empty"),
            "{p:?}"
        );

        // With a kernel vsock device the helper is not needed.
        let missing = dir.path().join("missing");
        needs.vhost_vsock_dev = &kernel;
        needs.initrd = &missing;
        let p = host_problems(&needs);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[1].contains("guest initrd") && p[1].contains("missing"),
            "{p:?}"
        );
    }
}
