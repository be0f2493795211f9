//! Real pod VMs under TCG (or KVM where fast): boot, stop, crash, failed starts,
//! reconnect. Needs the guest from scripts/build-guest.sh.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vessel_sandbox::{Binaries, Error, PodVm, VmExit};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_answers_health_and_stops_clean() {
    let guest = require_guest!();
    let ws = Workspace::new();
    let vm = start_vm(&ws, "boot", &guest).await;
    let health = vm.agent().health().await.expect("Health");
    assert!(!health.version.is_empty());
    eprintln!(
        "accel {:?}, boot {:?}",
        vm.accel(),
        vm.boot_timing().unwrap()
    );
    assert!(vm.is_running());
    assert!(vm.guest_running().await.unwrap());
    let pids = vm.pids();
    assert_eq!(pids.len(), 3, "qemu, virtiofsd, vhost-device-vsock");
    let mut exit = vm.exit_watch();
    assert_eq!(*exit.borrow(), None);
    vm.stop().await.unwrap();
    assert_eq!(
        *exit.wait_for(Option::is_some).await.unwrap(),
        Some(VmExit::Requested)
    );
    assert_nothing_left(&ws.run_dir(), &pids);
    // Stop is idempotent.
    vm.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_qemu_is_detected_and_cleaned_up() {
    let guest = require_guest!();
    let ws = Workspace::new();
    let vm = start_vm(&ws, "crash", &guest).await;
    let pids = vm.pids();
    let mut exit = vm.exit_watch();
    let qemu = proc_of(vm.vmm_pid()).unwrap();
    let t = Instant::now();
    qemu.signal(rustix::process::Signal::KILL);
    let how = tokio::time::timeout(Duration::from_secs(1), exit.wait_for(Option::is_some))
        .await
        .expect("exit noticed within 1 s")
        .unwrap()
        .unwrap();
    eprintln!("QEMU exit noticed after {:?}", t.elapsed());
    assert_eq!(how, VmExit::Unexpected);
    assert!(!vm.is_running());
    // Helpers are stopped without anyone calling stop().
    for &pid in &pids {
        assert!(
            wait_gone(pid, Duration::from_secs(5)).await,
            "pid {pid} outlived the crash"
        );
    }
    vm.stop().await.unwrap();
    assert_nothing_left(&ws.run_dir(), &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_from_run_dir() {
    let guest = require_guest!();
    let ws = Workspace::new();
    let VmGuard {
        vm,
        procs: _kill_on_failure,
    } = start_vm(&ws, "reconnect", &guest).await;
    let pids = vm.pids();
    // Forget the handle, as a vesseld restart would; the VM keeps running.
    drop(vm);
    assert!(pids
        .iter()
        .all(|p| std::path::Path::new(&format!("/proc/{p}")).exists()));
    let again = VmGuard::new(PodVm::reconnect(ws.run_dir()).await.expect("reconnect"));
    assert_eq!(again.pids(), pids);
    again.agent().health().await.unwrap();
    // Crash detection works on the reconnected handle too.
    let mut exit = again.exit_watch();
    again.stop().await.unwrap();
    assert_eq!(
        *exit.wait_for(Option::is_some).await.unwrap(),
        Some(VmExit::Requested)
    );
    assert_nothing_left(&ws.run_dir(), &pids);
    // Nothing to reconnect to any more.
    assert!(PodVm::reconnect(ws.run_dir()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_starts_leave_nothing() {
    let guest = require_guest!();
    init_tracing();
    let ws = Workspace::new();

    // Missing kernel: refused before anything is created.
    let mut cfg = ws.config("bad-path", &guest);
    cfg.kernel = ws.tmp.path().join("no-such-vmlinux");
    let err = PodVm::start(cfg).await.unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
    assert_nothing_left(&ws.run_dir(), &[]);

    // A kernel file QEMU cannot load: fails after both helpers started.
    let junk = ws.tmp.path().join("junk-vmlinux");
    std::fs::write(&junk, vec![0x5au8; 4096]).unwrap();
    let mut cfg = ws.config("bad-kernel", &guest);
    cfg.kernel = junk;
    let err = PodVm::start(cfg).await.unwrap_err();
    eprintln!("bad kernel: {err}");
    assert!(matches!(err, Error::HelperDied { .. }), "{err}");
    assert_nothing_left(&ws.run_dir(), &[]);

    // The second helper cannot be started: the first one is stopped again.
    let mut cfg = ws.config("bad-helper", &guest);
    cfg.binaries = Binaries {
        vhost_device_vsock: ws.tmp.path().join("missing-bin"),
        ..Binaries::default()
    };
    let err = PodVm::start(cfg).await.unwrap_err();
    assert!(matches!(err, Error::Spawn { .. }), "{err}");
    assert_nothing_left(&ws.run_dir(), &[]);

    // The guest never answers (its init is not the agent): boot timeout unwinds.
    let mut cfg = ws.config("no-agent", &guest);
    cfg.extra_cmdline = vec!["rdinit=/no-such-init".into()];
    cfg.timeouts.boot = Duration::from_secs(20);
    let err = PodVm::start(cfg).await.unwrap_err();
    eprintln!("no agent: {err}");
    assert!(
        matches!(err, Error::HelperDied { .. } | Error::AgentNotReady { .. }),
        "{err}"
    );
    assert_nothing_left(&ws.run_dir(), &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_without_agent_falls_back_to_qmp_quit() {
    let guest = require_guest!();
    init_tracing();
    let ws = Workspace::new();
    let mut cfg = ws.config("quit", &guest);
    cfg.timeouts.shutdown = Duration::from_secs(2);
    let vm = VmGuard::new(PodVm::start(cfg).await.expect("VM starts"));
    let pids = vm.pids();
    // Cut the agent channel: the graceful Shutdown cannot arrive.
    let vsock_helper = proc_of(pids[2]).unwrap();
    vsock_helper.kill().await;
    assert!(vm.is_running());
    let t = Instant::now();
    vm.stop().await.unwrap();
    eprintln!("stop without agent took {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(vm.wait_exit().await, VmExit::Requested);
    assert_nothing_left(&ws.run_dir(), &pids);
}

/// Connects abandoned mid-handshake (a caller's timeout) must not wedge the agent
/// channel: vhost-device-vsock 0.3 dies when the guest's answer finds the host side
/// of a CONNECT closed, so the client keeps the socket until the answer arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_connects_leave_the_agent_reachable() {
    let guest = require_guest!();
    let ws = Workspace::new();
    let vm = start_vm(&ws, "abandon", &guest).await;
    let addr = vm.agent().addr().clone();
    // Gives up at different points between CONNECT and the guest's answer (the raw
    // equivalent kills the helper: see boot_stress.rs).
    for i in 0..60u64 {
        let r = tokio::time::timeout(
            Duration::from_micros(50 * i),
            vessel_sandbox::vsock::connect(&addr),
        )
        .await;
        drop(r);
    }
    // Let the abandoned handshakes complete in the background.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..3 {
        let fresh = vessel_sandbox::AgentClient::new(addr.clone(), Duration::from_secs(10));
        fresh
            .health()
            .await
            .expect("agent reachable on a fresh connection");
    }
    let log = std::fs::read_to_string(ws.run_dir().join("vhost-device-vsock.log")).unwrap();
    assert!(!log.contains("panicked"), "vhost-device-vsock: {log}");
    let pids = vm.pids();
    vm.stop().await.unwrap();
    assert_nothing_left(&ws.run_dir(), &pids);
}

/// A guest that hangs while QEMU lives (vCPUs stopped through QMP) answers no Health:
/// after the `unresponsive` window the VM is killed and its exit is unexpected, while
/// a guest that answers is left alone for several windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_guest_is_killed_after_the_unresponsive_window() {
    let guest = require_guest!();
    init_tracing();
    let ws = Workspace::new();
    let mut cfg = ws.config("hung", &guest);
    cfg.timeouts.health_interval = Duration::from_millis(200);
    cfg.timeouts.unresponsive = Duration::from_millis(1500);
    let vm = VmGuard::new(PodVm::start(cfg).await.expect("VM starts"));
    let pids = vm.pids();
    let mut exit = vm.exit_watch();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(*exit.borrow(), None, "a VM whose agent answers lives on");

    let qmp = vessel_sandbox::layout::RunDir::new(vm.run_dir())
        .unwrap()
        .qmp();
    vessel_sandbox::qemu::qmp::execute(&qmp, "stop", None)
        .await
        .expect("QMP stop");
    let t = Instant::now();
    assert!(vm.is_running(), "QEMU lives");
    assert!(!vm.guest_running().await.unwrap(), "the guest is stopped");
    let how = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(Option::is_some))
        .await
        .expect("the hung VM is given up")
        .unwrap()
        .unwrap();
    eprintln!("hung guest given up after {:?}", t.elapsed());
    assert_eq!(how, VmExit::Unexpected);
    assert!(
        t.elapsed() >= Duration::from_millis(1200),
        "not before the window: {:?}",
        t.elapsed()
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "within the window and a check: {:?}",
        t.elapsed()
    );
    assert!(!vm.is_running());
    vm.stop().await.unwrap();
    assert_nothing_left(&ws.run_dir(), &pids);
}
