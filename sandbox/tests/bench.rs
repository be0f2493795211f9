//! Boot time and memory of a pod VM. Prints a table; asserts nothing about timing.
//! Run: cargo test -p vessel-sandbox --test bench -- --ignored --nocapture

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use vessel_sandbox::helpers::{start_virtiofsd, start_vsock_helper};
use vessel_sandbox::hypervisor::{LaunchSpec, VsockDevice};
use vessel_sandbox::layout::RunDir;
use vessel_sandbox::process::{spawn_detached, SpawnSpec};
use vessel_sandbox::qemu::qemu_args;
use vessel_sandbox::{accel, PodVm};

const BOOTS: usize = 10;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The agent's initrd plus an appended cpio with /floor/init, a script that powers
/// the guest down at once (busybox `reboot -f`: the VM has no ACPI to power off
/// through; `-no-reboot` makes the reset end QEMU).
fn floor_initrd(initrd: &Path, work: &Path) -> std::path::PathBuf {
    let root = work.join("floor-root");
    std::fs::create_dir_all(root.join("floor")).unwrap();
    std::fs::copy("/bin/busybox", root.join("floor/busybox")).unwrap();
    std::fs::write(
        root.join("floor/init"),
        "#!/floor/busybox sh\n/floor/busybox reboot -f\n",
    )
    .unwrap();
    let status = Command::new("sh")
        .arg("-c")
        .arg("chmod 755 floor/init && printf 'floor\\nfloor/busybox\\nfloor/init\\n' | cpio -o -H newc --quiet > ../floor.cpio")
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(status.success());
    let mut bytes = std::fs::read(initrd).unwrap();
    // newc members are 4-byte aligned; pad the first archive to be safe.
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    bytes.extend(std::fs::read(work.join("floor.cpio")).unwrap());
    let out = work.join("floor-initrd.img");
    std::fs::write(&out, bytes).unwrap();
    out
}

/// QEMU start → QEMU exit with the same device model, for an init that powers off.
async fn raw_floor(ws: &Workspace, guest: &(std::path::PathBuf, std::path::PathBuf)) -> Duration {
    let initrd = floor_initrd(&guest.1, ws.tmp.path());
    let mut cfg = ws.config("floor", &(guest.0.clone(), initrd));
    cfg.extra_cmdline = vec!["rdinit=/floor/init".into()];
    let dir = RunDir::new(ws.run_dir()).unwrap();
    std::fs::create_dir_all(dir.root()).unwrap();
    let resolved = accel::resolve(cfg.accel, &cfg.accel_cache_dir).unwrap();
    let fs = start_virtiofsd(&cfg.binaries, &dir, &cfg.share_dir, Duration::from_secs(10))
        .await
        .unwrap();
    let vsock = start_vsock_helper(&cfg.binaries, &dir, Duration::from_secs(10))
        .await
        .unwrap();
    let spec = LaunchSpec {
        config: &cfg,
        accel: resolved,
        dir: &dir,
        vsock: VsockDevice::VhostUser {
            socket: dir.vsock_socket(),
        },
        fs_socket: &dir.fs_socket(),
        tsc_khz: vessel_sandbox::tsc::host_tsc_khz(),
        confine: None,
    };
    let t = Instant::now();
    let qemu = spawn_detached(&SpawnSpec {
        program: &cfg.binaries.qemu,
        args: qemu_args(&spec, false),
        log: &dir.qemu_log(),
        netns: None,
        keep_fds: vec![],
    })
    .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(60), qemu.exited()).await;
    let elapsed = t.elapsed();
    qemu.kill().await;
    vsock.terminate(Duration::from_secs(1)).await;
    fs.terminate(Duration::from_secs(1)).await;
    let console = std::fs::read_to_string(dir.console_log()).unwrap_or_default();
    std::fs::remove_dir_all(dir.root()).unwrap();
    assert!(
        done.is_ok(),
        "floor guest did not power off; console:\n{console}"
    );
    elapsed
}

fn smaps_rollup(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
async fn boot_and_memory_table() {
    let guest = require_guest!();
    let ws = Workspace::new();

    let mut floors = Vec::new();
    for _ in 0..BOOTS {
        floors.push(raw_floor(&ws, &guest).await);
    }

    let mut ready = Vec::new();
    let mut totals = Vec::new();
    let mut memory = Vec::new();
    for i in 0..BOOTS {
        let vm = VmGuard::new(
            PodVm::start(ws.config(&format!("bench{i}"), &guest))
                .await
                .unwrap(),
        );
        let t = vm.boot_timing().unwrap();
        ready.push(t.vmm_to_agent);
        totals.push(t.total);
        if i == 0 {
            // Idle VM: let the guest settle (and free-page reporting run) first.
            tokio::time::sleep(Duration::from_secs(5)).await;
            memory = vm
                .pids()
                .into_iter()
                .map(|p| (comm(p), smaps_rollup(p)))
                .collect();
        }
        vm.stop().await.unwrap();
    }

    let accel = accel::resolve(ws.config("x", &guest).accel, ws.tmp.path()).unwrap();
    println!("\npod VM boot ({BOOTS} boots each, accel {accel:?}, 1 vCPU, 512 MiB)");
    println!("| measure | p50 | min | max |");
    println!("|---|---|---|---|");
    for (name, v) in [
        (
            "raw floor: QEMU start → exit (init powers off)",
            &mut floors,
        ),
        ("QEMU start → agent Health answered", &mut ready),
        (
            "PodVm::start total (probe, helpers, QEMU, agent)",
            &mut totals,
        ),
    ] {
        let (min, max) = (*v.iter().min().unwrap(), *v.iter().max().unwrap());
        println!("| {name} | {:?} | {min:?} | {max:?} |", percentile(v, 0.5));
    }
    println!("\nidle VM memory (smaps_rollup)");
    println!("| process | RSS KiB | PSS KiB |");
    println!("|---|---|---|");
    let (mut rss, mut pss) = (0, 0);
    for (name, (r, p)) in &memory {
        println!("| {name} | {r} | {p} |");
        rss += r;
        pss += p;
    }
    println!("| total | {rss} | {pss} |");
}
