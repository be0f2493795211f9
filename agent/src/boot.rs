//! Early boot as PID 1: pseudo filesystems, cgroup v2, console, entropy, kernel
//! modules, the pod share, the scratch disk.

use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::log;

/// Where the kernel modules live in the initramfs (one kernel version dir).
const MODULES_ROOT: &str = "/lib/modules";
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn mnt(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    if let Err(e) = std::fs::create_dir_all(target) {
        log::warn(&format!("mkdir {target}: {e}"));
    }
    if let Err(e) = mount(Some(src), target, Some(fstype), flags, data) {
        if e != nix::errno::Errno::EBUSY {
            log::warn(&format!("mount {fstype} on {target}: {e}"));
        }
    }
}

/// Runs every boot step. Failures are logged, never fatal: a guest with a missing
/// piece still answers Health, which tells the host more than a dead VM would.
pub fn boot() {
    make_root_pivotable();
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    reopen_console();
    log::info("boot: /init started");
    mnt("proc", "/proc", "proc", nosuid, None);
    mnt("sysfs", "/sys", "sysfs", nosuid, None);
    mnt(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    );
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    mnt(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mnt("mqueue", "/dev/mqueue", "mqueue", nosuid, None);
    mnt(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mnt(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    mnt(
        "cgroup2",
        CGROUP_ROOT,
        "cgroup2",
        nosuid,
        Some("nsdelegate"),
    );
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/0", "/dev/stdin");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/1", "/dev/stdout");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/2", "/dev/stderr");

    seed_entropy();
    load_modules();
    enable_controllers();
    mount_share();
    crate::scratch::mount_scratch();
    let _ = nix::unistd::sethostname("localhost");
}

/// pivot_root(2) refuses the initramfs root (it has no parent mount), and container
/// setup uses pivot_root. Bind-mount / onto a subdir and move that over /: the new
/// root is an ordinary mount with a parent, and nothing needs copying.
fn make_root_pivotable() {
    const NEW: &str = "/.root";
    let step = || -> nix::Result<()> {
        let _ = std::fs::create_dir(NEW);
        mount(
            Some("/"),
            NEW,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )?;
        nix::unistd::chdir(NEW)?;
        mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
        nix::unistd::chroot(".")?;
        nix::unistd::chdir("/")
    };
    if let Err(e) = step() {
        log::warn(&format!("making / pivotable: {e}"));
    }
}

/// The kernel gives PID 1 /dev/console as stdio only if the initramfs has that node;
/// reopen it from devtmpfs so logging works either way.
fn reopen_console() {
    use std::os::fd::AsRawFd;
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard fds; `f` is a valid open file.
            unsafe { libc::dup2(f.as_raw_fd(), fd) };
        }
    }
}

/// Credits the host-supplied seed (`vessel.seed=<hex>` on the kernel command line) to
/// the kernel's entropy pool, so getrandom() does not block early under TCG where
/// jitter entropy is slow. Without a seed, mixes in the clock (uncredited: it is not
/// secret) and relies on the kernel's own sources.
fn seed_entropy() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let seed = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("vessel.seed="))
        .and_then(decode_hex);
    let (bytes, credit_bits) = match seed {
        Some(s) if !s.is_empty() => {
            let bits = s.len() * 8;
            (s, bits)
        }
        _ => (crate::clock::unix_ns().to_le_bytes().to_vec(), 0),
    };
    if let Err(e) = add_entropy(&bytes, credit_bits) {
        log::warn(&format!("seeding entropy: {e}"));
    }
}

pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn add_entropy(bytes: &[u8], credit_bits: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut req: Vec<u8> = Vec::with_capacity(8 + bytes.len());
    req.extend_from_slice(&(credit_bits as i32).to_ne_bytes());
    req.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    req.extend_from_slice(bytes);
    req.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203; // _IOW('R', 0x03, int[2])
                                                      // SAFETY: `req` is a properly laid out rand_pool_info that outlives the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, req.as_ptr()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn load_modules() {
    let Ok(entries) = std::fs::read_dir(MODULES_ROOT) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !dir.join("modules.dep").exists() {
            continue;
        }
        match crate::modules::load_all(&dir) {
            Ok(n) => log::info(&format!("loaded {n} modules from {}", dir.display())),
            Err(e) => log::warn(&format!("modules in {}: {e}", dir.display())),
        }
    }
}

/// Delegates the controllers containers need to child cgroups.
fn enable_controllers() {
    let root = Path::new(CGROUP_ROOT);
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<String> = available
        .split_whitespace()
        .filter(|c| ["cpu", "cpuset", "memory", "pids", "io", "hugetlb"].contains(c))
        .map(|c| format!("+{c}"))
        .collect();
    if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), wanted.join(" ")) {
        log::warn(&format!("cgroup subtree_control: {e}"));
    }
}

fn mount_share() {
    let target = vessel_proto::GUEST_SHARE_DIR;
    let _ = std::fs::create_dir_all(target);
    match mount(
        Some(vessel_proto::SHARE_TAG),
        target,
        Some("virtiofs"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) => log::info(&format!(
            "virtiofs {} mounted at {target}",
            vessel_proto::SHARE_TAG
        )),
        Err(e) => log::info(&format!("no virtiofs share ({e})")),
    }
}

/// Syncs and powers the VM off. Never returns.
pub fn power_off() -> ! {
    nix::unistd::sync();
    // A reboot, not a power-off: the pod VM has no ACPI to power off through, and
    // QEMU runs with `-no-reboot`, so a guest reset ends it.
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Not PID 1 (tests): just exit.
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_seed() {
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
