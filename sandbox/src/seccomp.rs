//! The seccomp filter vesseld installs on vhost-device-vsock (which has none of its
//! own). A denylist, not an allowlist: the helper's syscall set follows its
//! vhost-user-backend, vm-memory and glibc versions, and an allowlist that misses
//! one call kills the agent channel of every pod at some later upgrade. What is
//! denied is the kernel attack surface and the privilege tools a vsock relay never
//! needs; each fails with EPERM.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::error::{Error, Result};

/// Syscalls the helper may not make.
const DENIED: &[libc::c_long] = &[
    // Mounts and namespaces.
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    // Other processes' memory.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kcmp,
    libc::SYS_pidfd_getfd,
    // The kernel itself.
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_lookup_dcookie,
    libc::SYS_syslog,
    libc::SYS_uselib,
    libc::SYS_personality,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    // Host-wide state.
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_vhangup,
    libc::SYS_mknod,
    libc::SYS_mknodat,
    // Identity: it already runs as the VM's uid and must stay there.
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setgroups,
    libc::SYS_capset,
];

/// The compiled filter for vhost-device-vsock: allow by default, EPERM for
/// [`DENIED`]. Built before the fork; the child only installs it.
pub fn vsock_helper_filter() -> Result<BpfProgram> {
    let rules = DENIED
        .iter()
        .map(|&nr| (nr, Vec::new()))
        .collect::<BTreeMap<_, _>>();
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| Error::InvalidConfig(format!("seccomp: {e}")))?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| Error::InvalidConfig(format!("seccomp filter: {e}")))?;
    BpfProgram::try_from(filter).map_err(|e| Error::InvalidConfig(format!("seccomp filter: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_compiles() {
        let prog = vsock_helper_filter().unwrap();
        assert!(prog.len() > DENIED.len());
    }

    /// Installed in a forked child: denied calls fail with EPERM, others work.
    #[test]
    fn denied_calls_fail_with_eperm() {
        let prog = vsock_helper_filter().unwrap();
        // SAFETY: the child only makes raw syscalls and exits with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = (|| {
                if seccompiler::apply_filter(&prog).is_err() {
                    return 1;
                }
                // SAFETY: plain syscalls with valid arguments.
                unsafe {
                    if libc::unshare(libc::CLONE_NEWUTS) == 0 {
                        return 2;
                    }
                    if *libc::__errno_location() != libc::EPERM {
                        return 3;
                    }
                    if libc::getpid() <= 0 {
                        return 4;
                    }
                }
                0
            })();
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }
}
