//! Confinement of a real pod VM's host processes: per-VM uid, seccomp, the pod
//! cgroup, the size-capped run dir, and that nothing of it outlives the VM. Needs
//! the guest from scripts/build-guest.sh (and root, as every VM test).

mod common;

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;
use oci_spec::runtime::{LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType};
use vessel_sandbox::cgroup::PodCgroup;
use vessel_sandbox::{PodVm, VmConfig};

/// Fields of /proc/<pid>/status.
fn status(pid: i32) -> HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// True when every line of /proc/<pid>/cgroup for the pod's hierarchies names it.
fn in_cgroup(pid: i32, cg: &PodCgroup) -> bool {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let want = format!("/{}", cg.rel);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            let ctrls = l.split(':').nth(1).unwrap_or("");
            if cg.unified {
                l.starts_with("0::")
            } else {
                ctrls.split(',').any(|c| c == "memory" || c == "pids")
            }
        })
        .collect();
    !lines.is_empty() && lines.iter().all(|l| l.ends_with(&want))
}

fn mounted_at(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(d.as_str()))
        .map(str::to_string)
        .collect()
}

/// Everything left after a VM: processes, run dir, cgroup dirs, mounts.
fn assert_all_gone(run_dir: &Path, pids: &[i32], cg: &PodCgroup) {
    assert_nothing_left(run_dir, pids);
    for d in &cg.dirs {
        assert!(!d.exists(), "cgroup {} left behind", d.display());
    }
    assert_eq!(mounted_at(run_dir), Vec::<String>::new(), "mount left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_processes_are_confined_and_cleaned_up() {
    let guest = require_guest!();
    let ws = Workspace::new();
    let vm = start_vm(&ws, "confined", &guest).await;
    let uid = vm.jail_uid().expect("a jail uid");
    assert!(uid >= 200_000, "uid {uid}");
    let cg = vm.cgroup().expect("a pod cgroup");
    assert_eq!(cg.rel, "vessel/vessel-confined");
    let pids = vm.pids();
    let (qemu, virtiofsd, vsock) = (pids[0], pids[1], pids[2]);

    // QEMU and vhost-device-vsock: the VM's uid and gid, no groups, no caps, NNP, seccomp.
    for (pid, name) in [(qemu, "qemu"), (vsock, "vhost-device-vsock")] {
        let st = status(pid);
        eprintln!(
            "{name} {pid}: Uid {} Gid {} Groups {:?} CapEff {} Seccomp {}",
            st["Uid"], st["Gid"], st["Groups"], st["CapEff"], st["Seccomp"]
        );
        let want = format!("{uid}\t{uid}\t{uid}\t{uid}");
        assert_eq!(st["Uid"], want, "{name} Uid");
        assert_eq!(st["Gid"], want, "{name} Gid");
        assert_eq!(st["Groups"], "", "{name} Groups");
        assert_eq!(st["CapEff"], "0000000000000000", "{name} CapEff");
        assert_eq!(st["NoNewPrivs"], "1", "{name} NoNewPrivs");
        assert_eq!(st["Seccomp"], "2", "{name} Seccomp");
    }

    // Both see the host's world-writable dirs (but those above the run dir, here
    // /tmp) as empty read-only tmpfs mounts.
    for pid in [qemu, vsock] {
        let mi = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let var_tmp = mi
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/var/tmp"))
            .unwrap_or_else(|| panic!("{pid}: no /var/tmp mount"));
        assert!(
            var_tmp.contains(" ro,") && var_tmp.contains(" - tmpfs "),
            "{var_tmp}"
        );
    }

    // Every process of the pod (virtiofsd's sandbox child included) is in the cgroup.
    let members = cg.pids();
    eprintln!(
        "cgroup {} holds {:?}",
        cg.rel,
        members.iter().map(|&p| (p, comm(p))).collect::<Vec<_>>()
    );
    for &pid in &pids {
        assert!(
            members.contains(&pid),
            "{pid} ({}) not in the cgroup",
            comm(pid)
        );
    }
    let fs_procs: Vec<i32> = members
        .iter()
        .copied()
        .filter(|&p| comm(p).starts_with("virtiofsd") || p == virtiofsd)
        .collect();
    assert!(
        fs_procs.len() >= 2,
        "virtiofsd and its sandbox child: {fs_procs:?}"
    );
    for &pid in members.iter() {
        assert!(
            in_cgroup(pid, &cg),
            "/proc/{pid}/cgroup does not name the pod cgroup"
        );
    }
    // virtiofsd stays root; the serving process (its sandbox child) has its seccomp
    // filter and lacks the dropped capabilities.
    let serving: Vec<i32> = fs_procs
        .iter()
        .copied()
        .filter(|&p| status(p)["Seccomp"] == "2")
        .collect();
    assert!(!serving.is_empty(), "no virtiofsd process with seccomp");
    for &p in &serving {
        let st = status(p);
        let cap_eff = u64::from_str_radix(&st["CapEff"], 16).unwrap();
        eprintln!("virtiofsd {p}: Uid {} CapEff {cap_eff:x}", st["Uid"]);
        const CAP_MKNOD: u32 = 27;
        const CAP_SETFCAP: u32 = 31;
        assert_eq!(cap_eff & (1 << CAP_MKNOD), 0, "virtiofsd keeps CAP_MKNOD");
        assert_eq!(
            cap_eff & (1 << CAP_SETFCAP),
            0,
            "virtiofsd keeps CAP_SETFCAP"
        );
    }

    // The run dir: its own size-capped tmpfs, root's; the jail dir: the uid's, 0700.
    let run = ws.run_dir();
    let mounts = mounted_at(&run);
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    assert!(mounts[0].contains(" - tmpfs "), "{}", mounts[0]);
    for opt in ["nosuid", "nodev", "noexec"] {
        assert!(mounts[0].contains(opt), "{opt}: {}", mounts[0]);
    }
    let fs = rustix::fs::statfs(&run).unwrap();
    let bytes = fs.f_blocks * fs.f_bsize as u64;
    assert_eq!(bytes, 8 << 20, "tmpfs size");
    let root = std::fs::metadata(&run).unwrap();
    assert_eq!((root.uid(), root.permissions().mode() & 0o777), (0, 0o711));
    let j = std::fs::symlink_metadata(run.join("j")).unwrap();
    assert_eq!(
        (j.uid(), j.gid(), j.permissions().mode() & 0o777),
        (uid, uid, 0o700)
    );
    let listing: Vec<_> = std::fs::read_dir(run.join("j"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    // (vhost-device-vsock removes vsock.sock once QEMU is connected.)
    for sock in ["qmp.sock", "fs.sock", "vsock.hybrid"] {
        let m = std::fs::symlink_metadata(run.join("j").join(sock))
            .unwrap_or_else(|e| panic!("j/{sock}: {e}; j holds {listing:?}"));
        assert_eq!(m.uid(), uid, "{sock} owner");
    }
    for file in ["state.json", "console.log", "qemu.log", "virtiofsd.log"] {
        let m = std::fs::symlink_metadata(run.join(file)).unwrap();
        assert_eq!(m.uid(), 0, "{file} owner");
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["jail_uid"], uid);
    // QMP (through the checked connect) still works.
    assert!(vm.guest_running().await.unwrap());

    let mut all = pids.clone();
    all.extend(members);
    vm.stop().await.unwrap();
    assert_all_gone(&run, &all, &cg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_get_different_uids() {
    let guest = require_guest!();
    init_tracing();
    let ws = Workspace::new();
    let cfg_a = ws.config("uid-a", &guest);
    let mut cfg_b = ws.config("uid-b", &guest);
    // Siblings, as under <run_root>/vm/.
    cfg_b.run_dir = ws.tmp.path().join("vm2");
    let (a, b) = tokio::join!(PodVm::start(cfg_a), PodVm::start(cfg_b));
    let (a, b) = (VmGuard::new(a.unwrap()), VmGuard::new(b.unwrap()));
    let (ua, ub) = (a.jail_uid().unwrap(), b.jail_uid().unwrap());
    eprintln!("uids {ua} {ub}");
    assert_ne!(ua, ub);
    assert_ne!(status(a.vmm_pid())["Uid"], status(b.vmm_pid())["Uid"]);
    // Neither can enter the other's jail dir.
    for (vm, dir) in [(&a, ws.run_dir()), (&b, ws.tmp.path().join("vm2"))] {
        let m = std::fs::metadata(dir.join("j")).unwrap();
        assert_eq!(m.uid(), vm.jail_uid().unwrap());
        assert_eq!(m.permissions().mode() & 0o077, 0);
    }
    a.agent().health().await.unwrap();
    b.agent().health().await.unwrap();
    let (ca, cb) = (a.cgroup().unwrap(), b.cgroup().unwrap());
    assert_ne!(ca.rel, cb.rel);
    let (pa, pb) = (a.pids(), b.pids());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_all_gone(&ws.run_dir(), &pa, &ca);
    assert_all_gone(&ws.tmp.path().join("vm2"), &pb, &cb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_parent_is_used_and_reconnect_cleans_up() {
    let guest = require_guest!();
    init_tracing();
    let ws = Workspace::new();
    let mut cfg: VmConfig = ws.config("reparent", &guest);
    cfg.cgroup_parent = Some("vesseltest-burstable-pod42.slice".into());
    let VmGuard {
        vm,
        procs: _kill_on_failure,
    } = VmGuard::new(PodVm::start(cfg).await.expect("VM starts"));
    let cg = vm.cgroup().unwrap();
    assert_eq!(
        cg.rel,
        "vesseltest.slice/vesseltest-burstable.slice/vesseltest-burstable-pod42.slice/vessel-reparent"
    );
    let pids = vm.pids();
    for &p in &pids {
        assert!(in_cgroup(p, &cg), "{p} not in {}", cg.rel);
    }
    let uid = vm.jail_uid();
    // A vesseld restart: the handle is forgotten, the VM found again from its run dir.
    drop(vm);
    let again = VmGuard::new(PodVm::reconnect(ws.run_dir()).await.expect("reconnect"));
    assert_eq!(again.jail_uid(), uid);
    assert_eq!(again.cgroup().as_ref(), Some(&cg));
    again.agent().health().await.unwrap();
    assert!(again.guest_running().await.unwrap());
    again.stop().await.unwrap();
    assert_all_gone(&ws.run_dir(), &pids, &cg);
    for d in &cg.dirs {
        // The parents made for the test go too (the kubelet removes real ones).
        let mut p = d.parent();
        while let Some(dir) = p {
            if !dir.to_string_lossy().contains("vesseltest") {
                break;
            }
            let _ = std::fs::remove_dir(dir);
            p = dir.parent();
        }
    }

    // destroy() after a restart cleans up as well.
    let vm = VmGuard::new(
        PodVm::start(ws.config("destroyed", &guest))
            .await
            .expect("VM starts"),
    );
    let (pids, cg) = (vm.pids(), vm.cgroup().unwrap());
    drop(vm);
    PodVm::destroy(ws.run_dir()).await.unwrap();
    assert_all_gone(&ws.run_dir(), &pids, &cg);
}

/// A guest that floods its console fills the run dir's tmpfs and no more; QEMU
/// drops what does not fit and the VM goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_console_keeps_the_vm_running() {
    let guest = require_guest!();
    let ws = Workspace::new();
    let rootfs = busybox_rootfs(&ws.share_dir(), "flood");
    let vm = start_vm(&ws, "flood", &guest).await;
    let run = ws.run_dir();
    let boot_console = std::fs::read(run.join("console.log")).unwrap();
    assert!(!boot_console.is_empty());
    // Leave the console next to no room (as a long flood would).
    let mut filler = std::fs::File::create(run.join("filler")).unwrap();
    let chunk = vec![0u8; 64 << 10];
    loop {
        use std::io::Write;
        if filler.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut spec = spec(&[
        "sh",
        "-c",
        "head -c 300000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo flooded",
    ]);
    let linux = spec.linux_mut().as_mut().unwrap();
    linux.set_devices(Some(vec![LinuxDeviceBuilder::default()
        .path("/dev/ttyS0")
        .typ(LinuxDeviceType::C)
        .major(4)
        .minor(64)
        .file_mode(0o666u32)
        .build()
        .unwrap()]));
    let mut res = linux.resources().clone().unwrap_or_default();
    let mut devs = res.devices().clone().unwrap_or_default();
    devs.push(
        LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(4)
            .minor(64)
            .access("rwm")
            .build()
            .unwrap(),
    );
    res.set_devices(Some(devs));
    linux.set_resources(Some(res));
    vm.agent()
        .create_container(create_request("flood", &spec, &rootfs))
        .await
        .expect("CreateContainer");
    vm.agent()
        .start_container(cref("flood"))
        .await
        .expect("StartContainer");
    let status = tokio::time::timeout(
        Duration::from_secs(240),
        vm.agent().wait_process("flood", ""),
    )
    .await
    .expect("the flood ends")
    .expect("WaitProcess");
    assert_eq!(status.exit_code, 0);
    assert!(vm.is_running(), "QEMU survives a console it cannot write");
    vm.agent().health().await.expect("agent still answers");
    assert!(vm.guest_running().await.unwrap());
    let console = std::fs::read(run.join("console.log")).unwrap();
    assert!(
        console.starts_with(&boot_console),
        "the first bytes are kept"
    );
    let fs = rustix::fs::statfs(&run).unwrap();
    assert_eq!(fs.f_bavail, 0, "the tmpfs is full");
    eprintln!(
        "console {} bytes (boot part {}), tmpfs full",
        console.len(),
        boot_console.len()
    );
    let pids = vm.pids();
    let cg = vm.cgroup().unwrap();
    vm.stop().await.unwrap();
    assert_all_gone(&run, &pids, &cg);
}

/// Rss (KiB) of a process's mappings, split: guest RAM (memfd), anonymous, files.
fn rss_split(pid: i32) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut memfd, mut anon, mut file) = (0, 0, 0);
    let mut kind = 0;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            let path = line.split_whitespace().nth(5).unwrap_or("");
            kind = if path.starts_with("/memfd:") {
                0
            } else if path.starts_with('/') {
                2
            } else {
                1
            };
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
            match kind {
                0 => memfd += kib,
                1 => anon += kib,
                _ => file += kib,
            }
        }
    }
    (memfd, anon, file)
}

fn pss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The host-side cost of one idle pod VM, as charged to its cgroup (for the
/// RuntimeClass `overhead.podFixed`). Run with --ignored --nocapture.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: run explicitly with --ignored --nocapture"]
async fn idle_pod_overhead() {
    let guest = require_guest!();
    let ws = Workspace::new();
    let mut cfg = ws.config("overhead", &guest);
    cfg.memory_mib = 256;
    let vm = VmGuard::new(PodVm::start(cfg).await.expect("VM starts"));
    // Idle: let the guest settle and free-page reporting return what it freed.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cg = vm.cgroup().unwrap();
    let usage = cg.memory_bytes().unwrap() >> 10;
    let mut guest_ram = 0;
    println!("| process | pid | RSS guest RAM KiB | RSS anon KiB | RSS file KiB | PSS KiB |");
    println!("|---|---|---|---|---|---|");
    for pid in cg.pids() {
        let (m, a, f) = rss_split(pid);
        guest_ram += m;
        println!(
            "| {} | {pid} | {m} | {a} | {f} | {} |",
            comm(pid),
            pss_kib(pid)
        );
    }
    let stat = cg
        .dirs
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join("memory.stat")).ok())
        .unwrap_or_default();
    let keep = [
        "rss ",
        "cache ",
        "shmem ",
        "mapped_file ",
        "anon ",
        "file ",
        "kernel ",
        "sock ",
        "slab ",
        "pagetables ",
        "percpu ",
        "kernel_stack ",
    ];
    for l in stat
        .lines()
        .filter(|l| keep.iter().any(|k| l.starts_with(k)))
    {
        println!("memory.stat {l}");
    }
    // Guest RAM is shared memory (memfd), charged once however many map it.
    let shmem = stat
        .lines()
        .find_map(|l| l.strip_prefix("shmem "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        >> 10;
    println!(
        "pod cgroup {}: usage {usage} KiB, guest RAM (shmem) {shmem} KiB (memfd RSS summed \
         over mappers {guest_ram} KiB), host-side overhead {} KiB",
        cg.rel,
        usage.saturating_sub(shmem)
    );
    // CPU of the idle pod over 10 s.
    let cpu_ns = || -> u64 {
        cg.dirs
            .iter()
            .find_map(|d| {
                if cg.unified {
                    std::fs::read_to_string(d.join("cpu.stat"))
                        .ok()
                        .and_then(|t| {
                            t.lines()
                                .find_map(|l| l.strip_prefix("usage_usec "))
                                .and_then(|v| v.parse::<u64>().ok())
                                .map(|us| us * 1000)
                        })
                } else {
                    std::fs::read_to_string(d.join("cpuacct.usage"))
                        .ok()
                        .and_then(|v| v.trim().parse().ok())
                }
            })
            .unwrap_or(0)
    };
    let c0 = cpu_ns();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let millicores = (cpu_ns() - c0) / 10_000_000;
    println!("idle CPU: {millicores}m");
    let pids = vm.pids();
    vm.stop().await.unwrap();
    assert_all_gone(&ws.run_dir(), &pids, &cg);
}
