//! The accelerator and the programs a pod VM runs.

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vessel_sandbox::accel::{judge_kvm, KvmVerdict};
use vessel_sandbox::preflight::find_program;
use vessel_sandbox::Binaries;

use super::{Level, Verdict};
use crate::config::{Accel, Config};

/// KVM (probed now, as `accel = "auto"` does) against what each handler asks for.
pub fn accel(config: &Config) -> Vec<Verdict> {
    let verdict = if Path::new("/dev/kvm").exists() {
        judge_kvm()
    } else {
        KvmVerdict {
            kvm_usable: false,
            probe: None,
            reason: "/dev/kvm does not exist".into(),
        }
    };
    accel_verdicts(&verdict, config)
}

/// The verdicts for a probe result and the handlers' `accel` settings.
pub fn accel_verdicts(kvm: &KvmVerdict, config: &Config) -> Vec<Verdict> {
    let figures = kvm
        .probe
        .as_ref()
        .map(|p| format!(" (probe: exit {} ns, loop {} us)", p.exit_ns, p.loop_us))
        .unwrap_or_default();
    let mut out = vec![if kvm.kvm_usable {
        Verdict::ok("kvm", format!("usable{figures}: pod VMs run under KVM"))
    } else {
        // A "too slow" reason already quotes the figures.
        let figures = if kvm.reason.contains(" ns") {
            ""
        } else {
            figures.as_str()
        };
        Verdict::warn(
            "kvm",
            format!(
                "not used: {}{figures}; pod VMs run under TCG (software emulation, \
                 several times slower). Enable virtualization (nested KVM on a cloud VM) \
                 and load kvm_intel/kvm_amd for KVM",
                kvm.reason
            ),
        )
    }];
    for (name, h) in &config.runtimes {
        if h.accel == Accel::Kvm && !kvm.kvm_usable {
            out.push(Verdict::fail(
                format!("accel ({name})"),
                "handler asks for accel = \"kvm\" but KVM is not usable here: its pods \
                 cannot start; use \"auto\" or \"tcg\"",
            ));
        }
    }
    out
}

/// QEMU, virtiofsd and vhost-device-vsock (needed only without `vhost_vsock_dev`):
/// found, and what `--version` says.
pub fn programs(vhost_vsock_dev: &Path) -> Vec<Verdict> {
    let b = Binaries::default();
    let mut out = vec![program("qemu", &b.qemu), program("virtiofsd", &b.virtiofsd)];
    let helper = program("vhost-device-vsock", &b.vhost_device_vsock);
    if helper.level != Level::Ok && vhost_vsock_dev.exists() {
        out.push(Verdict::ok(
            "vhost-device-vsock",
            format!(
                "not installed; not needed: {} exists",
                vhost_vsock_dev.display()
            ),
        ));
    } else {
        out.push(helper);
    }
    out
}

/// `mkfs.ext4`, which formats pods' scratch disks: needed when a handler has
/// `writable_layer_mib` > 0.
pub fn mkfs(config: &Config) -> Verdict {
    let users: Vec<&str> = config
        .runtimes
        .iter()
        .filter(|(_, h)| h.writable_layer_mib > 0)
        .map(|(n, _)| n.as_str())
        .collect();
    match (crate::scratch::mkfs_ext4(), users.is_empty()) {
        (Some(p), _) => Verdict::ok("mkfs.ext4", format!("{} (scratch disks)", p.display())),
        (None, true) => Verdict::ok(
            "mkfs.ext4",
            "not installed; not needed: every handler has writable_layer_mib = 0",
        ),
        (None, false) => Verdict::fail(
            "mkfs.ext4",
            format!(
                "not found: pods of handler(s) {} cannot start (they get a scratch disk \
                 for writable layers); install e2fsprogs (scripts/install-deps.sh)",
                users.join(", ")
            ),
        ),
    }
}

/// One program: its path and version, or what installs it.
pub fn program(item: &str, program: &Path) -> Verdict {
    let Some(path) = find_program(program) else {
        return Verdict::fail(
            item,
            format!(
                "{} not found in PATH or not executable: run scripts/install-deps.sh",
                program.display()
            ),
        );
    };
    match version(&path) {
        Ok(v) => Verdict::ok(item, format!("{v} ({})", path.display())),
        Err(e) => Verdict::fail(
            item,
            format!(
                "{} --version failed: {e}; reinstall it (scripts/install-deps.sh)",
                path.display()
            ),
        ),
    }
}

/// The first line of `<path> --version`, within 5 s.
fn version(path: &Path) -> Result<String, String> {
    let mut child = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("no answer within 5 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = stdout.take(64 * 1024).read_to_string(&mut out);
    }
    if !status.success() {
        return Err(format!("exited with {status}"));
    }
    out.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| "printed nothing".into())
}

/// The kernel's vhost-vsock device, else the user-space helper.
pub fn vhost_vsock(dev: &Path, helper: &Path) -> Verdict {
    let item = "vhost-vsock";
    if dev.exists() {
        return match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
            Ok(_) => Verdict::ok(item, format!("{} usable: kernel vsock", dev.display())),
            Err(e) => Verdict::warn(
                item,
                format!(
                    "{} exists but cannot be opened ({e}); run vesseld as root",
                    dev.display()
                ),
            ),
        };
    }
    if find_program(helper).is_some() {
        Verdict::ok(
            item,
            format!(
                "{} absent: {} serves the agent channel (modprobe vhost_vsock for the \
                 kernel one)",
                dev.display(),
                helper.display()
            ),
        )
    } else {
        Verdict::fail(
            item,
            format!(
                "{} absent and {} not found: no agent channel; modprobe vhost_vsock or \
                 run scripts/install-deps.sh",
                dev.display(),
                helper.display()
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vessel_sandbox::accel::KvmProbe;

    #[test]
    fn kvm_verdicts_carry_the_probe_figures() {
        let mut config = Config::default();
        let fast = KvmVerdict {
            kvm_usable: true,
            probe: Some(KvmProbe {
                exit_ns: 1200,
                loop_us: 150,
            }),
            reason: "KVM probe passed".into(),
        };
        let v = accel_verdicts(&fast, &config);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].level, Level::Ok);
        assert!(v[0].message.contains("exit 1200 ns, loop 150 us"), "{v:?}");

        config.runtimes.get_mut("default").unwrap().accel = Accel::Kvm;
        let slow = KvmVerdict {
            kvm_usable: false,
            probe: None,
            reason: "/dev/kvm does not exist".into(),
        };
        let v = accel_verdicts(&slow, &config);
        assert_eq!(v[0].level, Level::Warn);
        assert!(v[0].message.contains("TCG"), "{v:?}");
        assert_eq!(v[1].level, Level::Fail);
        assert_eq!(v[1].item, "accel (default)");
    }

    #[test]
    fn programs_report_versions_or_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-qemu");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'QEMU emulator version 9.9.9'\necho more\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let v = program("qemu", &fake);
        assert_eq!(v.level, Level::Ok, "{v:?}");
        assert!(
            v.message.starts_with("QEMU emulator version 9.9.9 ("),
            "{v:?}"
        );

        let v = program("qemu", Path::new("no-such-qemu-vessel"));
        assert_eq!(v.level, Level::Fail);
        assert!(v.message.contains("install-deps.sh"), "{v:?}");

        std::fs::write(&fake, "#!/bin/sh\nexit 3\n").unwrap();
        let v = program("qemu", &fake);
        assert_eq!(v.level, Level::Fail);
        assert!(v.message.contains("exit status: 3"), "{v:?}");
    }

    #[test]
    fn vsock_falls_back_to_the_helper() {
        let missing = Path::new("/nonexistent/vhost-vsock");
        assert_eq!(vhost_vsock(missing, Path::new("sh")).level, Level::Ok);
        let v = vhost_vsock(missing, Path::new("no-such-helper-vessel"));
        assert_eq!(v.level, Level::Fail);
        assert!(v.message.contains("modprobe vhost_vsock"), "{v:?}");
    }
}
