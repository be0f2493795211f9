//! QEMU command line of a pod VM (pure; unit-tested).

use std::ffi::OsString;
use std::os::fd::AsRawFd;

use crate::accel::ResolvedAccel;
use crate::hypervisor::{LaunchSpec, VsockDevice};

/// QEMU's own seccomp filter: no obsolete calls, no set*id, no fork/exec, no
/// scheduler/NUMA changes (a compromised device model can do none of these).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The fd set QEMU's console log arrives in (`-add-fd`).
const CONSOLE_FDSET: u32 = 1;
/// The fd set the scratch disk arrives in.
const SCRATCH_FDSET: u32 = 2;

/// TCG's translated-code cache, MiB. QEMU's default lets it grow to 1 GiB, and an
/// idle pod kept 44 MiB of it resident; at 32 MiB a boot costs the same QEMU CPU time
/// (at 16 MiB, 13% more: code is flushed and translated again). See
/// docs/benchmarks.md, "Issue 17".
const TCG_CODE_CACHE_MIB: u32 = 32;

/// Kernel arguments every pod VM gets. `reboot=t`: the guest ends the VM by
/// rebooting (no ACPI), and the kernel's default order first pokes the absent
/// keyboard controller, whose busy-waits cost seconds under TCG; a triple fault
/// resets at once.
const BASE_CMDLINE: &str = "quiet cryptomgr.notests panic=-1 reboot=t console=ttyS0";

/// Kernel arguments under TCG, whose CPU has no TSC deadline timer: the local APIC
/// timer's rate (QEMU's runs at 1 GHz; vessel's guest kernel takes it from
/// `vessel.lapic_khz`, guest/patches/) instead of a ~100 ms calibration against the
/// PIT, and no check that the PIT's interrupt arrives (QEMU's does; ~45 ms).
const TCG_TIMER_CMDLINE: &str = "vessel.lapic_khz=1000000 no_timer_check";

/// The kernel command line: TSC and timer hints under TCG, the base arguments, then
/// extras.
pub fn kernel_cmdline(accel: ResolvedAccel, tsc_khz: Option<u64>, extra: &[String]) -> String {
    let mut parts = Vec::new();
    if accel == ResolvedAccel::Tcg {
        if let Some(khz) = tsc_khz {
            parts.push(format!("tsc_early_khz={khz} tsc=reliable"));
        }
        parts.push(TCG_TIMER_CMDLINE.to_string());
    }
    parts.push(BASE_CMDLINE.to_string());
    parts.extend(extra.iter().cloned());
    parts.join(" ")
}

fn path_arg(prefix: &str, path: &std::path::Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path);
    s
}

/// The argv (without the program) for `spec`.
pub fn qemu_args(spec: &LaunchSpec<'_>, vhost_net: bool) -> Vec<OsString> {
    let cfg = spec.config;
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    push(&["-name", &format!("vessel-{},debug-threads=on", cfg.id)]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-sandbox",
        SANDBOX,
    ]);
    // No ACPI: QEMU names the virtio-mmio devices on the kernel command line
    // (microvm's auto-kernel-cmdline: `virtio_mmio.device=`) and the CPUs in an MP
    // table, so the guest kernel parses no AML at boot. The guest stops by rebooting
    // (a triple fault without ACPI), which `-no-reboot` turns into QEMU's exit.
    push(&["-machine", "microvm,acpi=off,memory-backend=mem"]);
    match spec.accel {
        ResolvedAccel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        ResolvedAccel::Tcg => push(&["-accel", &format!("tcg,tb-size={TCG_CODE_CACHE_MIB}")]),
    }
    push(&["-smp", &cfg.vcpus.to_string()]);
    push(&["-m", &format!("{}M", cfg.memory_mib)]);
    // Shared memfd RAM: vhost-user backends map guest memory.
    push(&[
        "-object",
        &format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            cfg.memory_mib
        ),
    ]);
    a.push("-kernel".into());
    a.push(cfg.kernel.clone().into());
    a.push("-initrd".into());
    a.push(cfg.initrd.clone().into());
    a.push("-append".into());
    a.push(kernel_cmdline(spec.accel, spec.tsc_khz, &cfg.extra_cmdline).into());

    let confine = spec.confine;
    let fd_of = |f: &Option<std::os::fd::OwnedFd>| f.as_ref().map(|f| f.as_raw_fd());
    match confine.and_then(|c| fd_of(&c.console)) {
        // vesseld opened the log in the root-owned run dir; QEMU only writes to it.
        Some(fd) => {
            a.push("-add-fd".into());
            // The opaque tag names the file (query-fdsets) and keeps the run dir in
            // QEMU's command line, where tools look for a pod's processes.
            let mut add = OsString::from(format!("fd={fd},set={CONSOLE_FDSET},opaque="));
            add.push(spec.dir.console_log());
            a.push(add);
            a.push("-chardev".into());
            a.push(format!("file,id=console,path=/dev/fdset/{CONSOLE_FDSET}").into());
        }
        None => {
            a.push("-chardev".into());
            a.push(path_arg("file,id=console,path=", &spec.dir.console_log()));
        }
    }
    a.push("-serial".into());
    a.push("chardev:console".into());
    // Confined, QEMU runs in the jail dir and names its sockets relative to it.
    let sock = |p: &std::path::Path| -> std::path::PathBuf {
        if confine.is_some() {
            crate::helpers::file_name(p)
        } else {
            p.to_path_buf()
        }
    };
    a.push("-qmp".into());
    let mut qmp = path_arg("unix:", &sock(&spec.dir.qmp()));
    qmp.push(",server=on,wait=off");
    a.push(qmp);

    a.push("-device".into());
    a.push("virtio-balloon-device,free-page-reporting=on".into());

    a.push("-chardev".into());
    a.push(path_arg("socket,id=fs,path=", &sock(spec.fs_socket)));
    a.push("-device".into());
    a.push(
        format!(
            "vhost-user-fs-device,chardev=fs,tag={}",
            vessel_proto::SHARE_TAG
        )
        .into(),
    );

    match &spec.vsock {
        VsockDevice::Kernel { cid } => {
            let mut dev = format!("vhost-vsock-device,guest-cid={cid}");
            if let Some(fd) = confine.and_then(|c| fd_of(&c.vhost_vsock)) {
                dev.push_str(&format!(",vhostfd={fd}"));
            }
            a.push("-device".into());
            a.push(dev.into());
        }
        VsockDevice::VhostUser { socket } => {
            a.push("-chardev".into());
            a.push(path_arg("socket,id=vsock,path=", &sock(socket)));
            a.push("-device".into());
            a.push("vhost-user-vsock-device,chardev=vsock".into());
        }
    }

    if let Some(disk) = &cfg.scratch_disk {
        // Always by descriptor: vesseld opened the file in a dir only it can enter.
        for fd in [&disk.file, &disk.file_ro] {
            a.push("-add-fd".into());
            let mut add =
                OsString::from(format!("fd={},set={SCRATCH_FDSET},opaque=", fd.as_raw_fd()));
            add.push(&disk.path);
            a.push(add);
        }
        // Host page cache with thread-pool I/O: a sparse file on any host fs.
        // discard=unmap: the guest's deletes punch holes, so the node gets the
        // space back. No zero detection: it would cost a scan of every write.
        a.push("-drive".into());
        a.push(
            format!(
                "file=/dev/fdset/{SCRATCH_FDSET},if=none,id=scratch,format=raw,\
                 cache=writeback,aio=threads,discard=unmap,werror=report,rerror=report"
            )
            .into(),
        );
        a.push("-device".into());
        a.push(
            format!(
                "virtio-blk-device,drive=scratch,serial={}",
                vessel_proto::SCRATCH_DISK_SERIAL
            )
            .into(),
        );
    }

    if let Some(net) = &cfg.net {
        let mut netdev = format!("tap,id=net0,fd={}", net.tap.as_raw_fd());
        match (vhost_net, confine.and_then(|c| fd_of(&c.vhost_net))) {
            (true, Some(fd)) => netdev.push_str(&format!(",vhost=on,vhostfd={fd}")),
            (true, None) => netdev.push_str(",vhost=on"),
            (false, _) => netdev.push_str(",vhost=off"),
        }
        a.push("-netdev".into());
        a.push(netdev.into());
        a.push("-device".into());
        a.push(format!("virtio-net-device,netdev=net0,mac={}", net.mac).into());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NetConfig, VmConfig};
    use crate::layout::RunDir;
    use std::os::fd::OwnedFd;
    use std::path::Path;
    use std::sync::Arc;

    fn strings(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_str().unwrap().to_string()).collect()
    }

    fn value_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    fn config() -> VmConfig {
        let mut c = VmConfig::new(
            "pod1",
            "/run/v/pod1",
            "/run/v/pod1/share",
            "/g/vmlinux",
            "/g/initrd.img",
        );
        c.vcpus = 2;
        c.memory_mib = 256;
        c.extra_cmdline = vec!["foo=bar".into()];
        c
    }

    #[test]
    fn tcg_with_hybrid_vsock() {
        let cfg = config();
        let dir = RunDir::new("/run/v/pod1").unwrap();
        let spec = LaunchSpec {
            config: &cfg,
            accel: ResolvedAccel::Tcg,
            dir: &dir,
            vsock: VsockDevice::VhostUser {
                socket: dir.vsock_socket(),
            },
            fs_socket: &dir.fs_socket(),
            tsc_khz: Some(2_596_156),
            confine: None,
        };
        let a = strings(&qemu_args(&spec, false));
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert!(a.contains(&flag.to_string()), "{flag} missing");
        }
        assert_eq!(
            value_of(&a, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
        assert!(value_of(&a, "-add-fd").is_empty());
        assert_eq!(value_of(&a, "-display"), ["none"]);
        assert_eq!(
            value_of(&a, "-machine"),
            ["microvm,acpi=off,memory-backend=mem"]
        );
        assert_eq!(value_of(&a, "-accel"), ["tcg,tb-size=32"]);
        assert!(value_of(&a, "-cpu").is_empty());
        assert_eq!(value_of(&a, "-smp"), ["2"]);
        assert_eq!(value_of(&a, "-m"), ["256M"]);
        assert_eq!(
            value_of(&a, "-object"),
            ["memory-backend-memfd,id=mem,size=256M,share=on"]
        );
        assert_eq!(value_of(&a, "-kernel"), ["/g/vmlinux"]);
        assert_eq!(value_of(&a, "-initrd"), ["/g/initrd.img"]);
        assert_eq!(
            value_of(&a, "-append"),
            ["tsc_early_khz=2596156 tsc=reliable vessel.lapic_khz=1000000 no_timer_check quiet cryptomgr.notests panic=-1 reboot=t console=ttyS0 foo=bar"]
        );
        assert_eq!(
            value_of(&a, "-qmp"),
            ["unix:/run/v/pod1/j/qmp.sock,server=on,wait=off"]
        );
        assert_eq!(value_of(&a, "-serial"), ["chardev:console"]);
        assert_eq!(
            value_of(&a, "-chardev"),
            [
                "file,id=console,path=/run/v/pod1/console.log",
                "socket,id=fs,path=/run/v/pod1/j/fs.sock",
                "socket,id=vsock,path=/run/v/pod1/j/vsock.sock",
            ]
        );
        assert_eq!(
            value_of(&a, "-device"),
            [
                "virtio-balloon-device,free-page-reporting=on",
                "vhost-user-fs-device,chardev=fs,tag=vessel",
                "vhost-user-vsock-device,chardev=vsock",
            ]
        );
        assert!(value_of(&a, "-netdev").is_empty());
        assert!(
            a[0..2]
                == [
                    "-name".to_string(),
                    "vessel-pod1,debug-threads=on".to_string()
                ]
        );
    }

    #[test]
    fn kvm_with_kernel_vsock_and_tap() {
        let mut cfg = config();
        let tap: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let fd = tap.as_raw_fd();
        cfg.net = Some(NetConfig {
            tap: Arc::new(tap),
            mac: "02:00:00:00:00:01".into(),
        });
        let dir = RunDir::new("/run/v/pod1").unwrap();
        let spec = LaunchSpec {
            config: &cfg,
            accel: ResolvedAccel::Kvm,
            dir: &dir,
            vsock: VsockDevice::Kernel { cid: 42 },
            fs_socket: Path::new("/run/v/pod1/fs.sock"),
            tsc_khz: Some(2_596_156),
            confine: None,
        };
        let a = strings(&qemu_args(&spec, true));
        assert_eq!(value_of(&a, "-accel"), ["kvm"]);
        assert_eq!(value_of(&a, "-cpu"), ["host"]);
        // No TSC hints under KVM: the guest calibrates from the real TSC.
        assert_eq!(
            value_of(&a, "-append"),
            ["quiet cryptomgr.notests panic=-1 reboot=t console=ttyS0 foo=bar"]
        );
        let devices = value_of(&a, "-device");
        assert!(devices.contains(&"vhost-vsock-device,guest-cid=42"));
        assert!(devices.contains(&"virtio-net-device,netdev=net0,mac=02:00:00:00:00:01"));
        assert!(!devices.iter().any(|d| d.starts_with("vhost-user-vsock")));
        assert_eq!(
            value_of(&a, "-netdev"),
            [format!("tap,id=net0,fd={fd},vhost=on")]
        );
    }

    #[test]
    fn tcg_without_vhost_net() {
        let mut cfg = config();
        let tap: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let fd = tap.as_raw_fd();
        cfg.net = Some(NetConfig {
            tap: Arc::new(tap),
            mac: "02:00:00:00:00:02".into(),
        });
        let dir = RunDir::new("/r").unwrap();
        let spec = LaunchSpec {
            config: &cfg,
            accel: ResolvedAccel::Tcg,
            dir: &dir,
            vsock: VsockDevice::VhostUser {
                socket: dir.vsock_socket(),
            },
            fs_socket: &dir.fs_socket(),
            tsc_khz: None,
            confine: None,
        };
        let a = strings(&qemu_args(&spec, false));
        assert_eq!(
            value_of(&a, "-netdev"),
            [format!("tap,id=net0,fd={fd},vhost=off")]
        );
        assert_eq!(
            value_of(&a, "-append"),
            ["vessel.lapic_khz=1000000 no_timer_check quiet cryptomgr.notests panic=-1 reboot=t console=ttyS0 foo=bar"]
        );
    }

    /// Confined: the console and vhost devices arrive as descriptors.
    #[test]
    fn confined_gets_descriptors() {
        use crate::hypervisor::VmmConfinement;
        let mut cfg = config();
        let fd = |p: &str| -> OwnedFd { std::fs::File::open(p).unwrap().into() };
        cfg.net = Some(NetConfig {
            tap: Arc::new(fd("/dev/null")),
            mac: "02:00:00:00:00:03".into(),
        });
        let confine = VmmConfinement {
            console: Some(fd("/dev/null")),
            vhost_vsock: Some(fd("/dev/null")),
            vhost_net: Some(fd("/dev/null")),
            ..Default::default()
        };
        let raw = |f: &Option<OwnedFd>| f.as_ref().unwrap().as_raw_fd();
        let dir = RunDir::new("/run/v/pod1").unwrap();
        let spec = LaunchSpec {
            config: &cfg,
            accel: ResolvedAccel::Kvm,
            dir: &dir,
            vsock: VsockDevice::Kernel { cid: 7 },
            fs_socket: &dir.fs_socket(),
            tsc_khz: None,
            confine: Some(&confine),
        };
        let a = strings(&qemu_args(&spec, true));
        assert_eq!(
            value_of(&a, "-add-fd"),
            [format!(
                "fd={},set=1,opaque=/run/v/pod1/console.log",
                raw(&confine.console)
            )]
        );
        assert_eq!(
            value_of(&a, "-chardev"),
            [
                "file,id=console,path=/dev/fdset/1",
                "socket,id=fs,path=fs.sock"
            ]
        );
        assert_eq!(value_of(&a, "-qmp"), ["unix:qmp.sock,server=on,wait=off"]);
        assert!(value_of(&a, "-device").contains(
            &format!(
                "vhost-vsock-device,guest-cid=7,vhostfd={}",
                raw(&confine.vhost_vsock)
            )
            .as_str()
        ));
        assert_eq!(
            value_of(&a, "-netdev"),
            [format!(
                "tap,id=net0,fd={},vhost=on,vhostfd={}",
                cfg.net.as_ref().unwrap().tap.as_raw_fd(),
                raw(&confine.vhost_net)
            )]
        );
        assert!(!value_of(&a, "-sandbox").is_empty());
    }

    /// The scratch disk arrives as a descriptor, with discard, as a virtio-blk
    /// device the guest finds by its serial.
    #[test]
    fn scratch_disk_by_descriptor() {
        use crate::config::DiskConfig;
        let mut cfg = config();
        let file: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let file_ro: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let (fd, fd_ro) = (file.as_raw_fd(), file_ro.as_raw_fd());
        cfg.scratch_disk = Some(DiskConfig {
            file: Arc::new(file),
            file_ro: Arc::new(file_ro),
            path: "/var/lib/vessel/scratch/pod1.img".into(),
        });
        let dir = RunDir::new("/run/v/pod1").unwrap();
        let spec = LaunchSpec {
            config: &cfg,
            accel: ResolvedAccel::Tcg,
            dir: &dir,
            vsock: VsockDevice::Kernel { cid: 7 },
            fs_socket: &dir.fs_socket(),
            tsc_khz: None,
            confine: None,
        };
        let a = strings(&qemu_args(&spec, false));
        assert_eq!(
            value_of(&a, "-add-fd"),
            [
                format!("fd={fd},set=2,opaque=/var/lib/vessel/scratch/pod1.img"),
                format!("fd={fd_ro},set=2,opaque=/var/lib/vessel/scratch/pod1.img"),
            ]
        );
        assert_eq!(
            value_of(&a, "-drive"),
            ["file=/dev/fdset/2,if=none,id=scratch,format=raw,cache=writeback,aio=threads,discard=unmap,\
             werror=report,rerror=report"]
        );
        assert!(value_of(&a, "-device")
            .contains(&"virtio-blk-device,drive=scratch,serial=vessel-scratch"));
        // No disk, no drive.
        let plain = config();
        let spec = LaunchSpec {
            config: &plain,
            ..spec
        };
        assert!(value_of(&strings(&qemu_args(&spec, false)), "-drive").is_empty());
    }

    #[test]
    fn run_dir_too_long_for_sockets() {
        assert!(RunDir::new(format!("/{}", "x".repeat(100))).is_err());
    }
}
