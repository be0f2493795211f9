//! Boot reliability under CPU load: many pod VMs, several at once, with busy-loop
//! threads competing for the host CPUs (as on a 2-core CI runner). Counts failed
//! starts and prints QEMU start → agent ready percentiles.
//! Run: cargo test -p vessel-sandbox --test boot_stress -- --ignored --nocapture
//! Knobs: VESSEL_STRESS_BOOTS (default 8), VESSEL_STRESS_PARALLEL (3),
//! VESSEL_STRESS_BURNERS (2 busy threads), VESSEL_STRESS_BOOT_TIMEOUT_S (60).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vessel_sandbox::PodVm;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Busy-loop threads, stopped on drop (also when the test panics).
struct Burners {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Burners {
    fn start(n: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One boot: start, Health, stop. Ok(QEMU start → agent ready) or the error text.
async fn one_boot(
    guest: (std::path::PathBuf, std::path::PathBuf),
    n: u64,
) -> Result<Duration, String> {
    let ws = Workspace::new();
    let mut cfg = ws.config(&format!("stress-{n}"), &guest);
    cfg.timeouts.boot = Duration::from_secs(knob("VESSEL_STRESS_BOOT_TIMEOUT_S", 60));
    let vm = VmGuard::new(PodVm::start(cfg).await.map_err(|e| e.to_string())?);
    let t = vm.boot_timing().expect("timing after start").vmm_to_agent;
    // Guest-side milestones, to tell guest boot time from host-side waiting.
    let console = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
    let milestones: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("serving on vsock") || l.contains("announced readiness"))
        .collect();
    eprintln!("boot {n}: QEMU start → ready {t:?}; guest: {milestones:?}");
    let health = vm
        .agent()
        .health()
        .await
        .map_err(|e| format!("Health after start: {e}"));
    let pids = vm.pids();
    vm.stop().await.map_err(|e| e.to_string())?;
    assert_nothing_left(&ws.run_dir(), &pids);
    health?;
    Ok(t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: boots many VMs under CPU load"]
async fn boots_reliably_under_load() {
    let guest = require_guest!();
    init_tracing();
    let boots = knob("VESSEL_STRESS_BOOTS", 8);
    let parallel = knob("VESSEL_STRESS_PARALLEL", 3).max(1);
    let _burn = Burners::start(knob("VESSEL_STRESS_BURNERS", 2));
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel as usize));
    let tasks: Vec<_> = (0..boots)
        .map(|n| {
            let (guest, sem) = (guest.clone(), sem.clone());
            tokio::spawn(async move {
                let _permit = sem.acquire_owned().await.unwrap();
                one_boot(guest, n).await
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut failures = Vec::new();
    for (n, t) in tasks.into_iter().enumerate() {
        match t.await.expect("boot task") {
            Ok(d) => times.push(d),
            Err(e) => failures.push(format!("boot {n}: {e}")),
        }
    }
    times.sort();
    let pct = |p: f64| times.get(((times.len().max(1) - 1) as f64 * p).round() as usize);
    eprintln!(
        "boot stress: {boots} boots, {parallel} at once: {} failed; QEMU start → agent ready p50 {:?}, p90 {:?}, max {:?}",
        failures.len(),
        pct(0.5),
        pct(0.9),
        times.last()
    );
    for f in &failures {
        eprintln!("{f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {boots} boots failed",
        failures.len()
    );
}

/// The root cause, shown on the helper itself: a hybrid CONNECT whose host socket is
/// closed before the guest answers makes vhost-device-vsock 0.3 panic in its worker
/// thread (writing "OK <port>" hits EPIPE and is unwrapped); the process lives on but
/// never serves another connection. `vsock::connect` avoids this; raw sockets do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "diagnostic: deliberately wedges vhost-device-vsock"]
async fn raw_abandoned_connect_wedges_vhost_device_vsock() {
    use tokio::io::AsyncWriteExt;
    let guest = require_guest!();
    let ws = Workspace::new();
    let vm = start_vm(&ws, "wedge", &guest).await;
    let hybrid = ws.run_dir().join("j/vsock.hybrid");
    // Closed at different points between CONNECT and the guest's answer.
    for i in 0..60u64 {
        let mut s = tokio::net::UnixStream::connect(&hybrid).await.unwrap();
        s.write_all(b"CONNECT 1024\n").await.unwrap();
        std::thread::sleep(Duration::from_micros(50 * i));
        drop(s);
    }
    let cpu = |pid: i32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
    };
    let helper = vm.pids()[2];
    let c0 = cpu(helper);
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!(
        "vhost-device-vsock CPU ticks in 2 s after: {}",
        cpu(helper) - c0
    );
    let log = std::fs::read_to_string(ws.run_dir().join("vhost-device-vsock.log")).unwrap();
    eprintln!("vhost-device-vsock log:\n{log}");
    let fresh =
        vessel_sandbox::AgentClient::new(vm.agent().addr().clone(), Duration::from_secs(10));
    let health = fresh.health().await;
    eprintln!("Health after raw abandoned CONNECTs: {health:?}");
    let pids = vm.pids();
    vm.stop().await.unwrap();
    assert_nothing_left(&ws.run_dir(), &pids);
    assert!(log.contains("panicked") && health.is_err());
}
