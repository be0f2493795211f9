//! Containers in a real pod VM, driven through the agent client: the Done-when of the
//! pod-VM issue. Needs the guest from scripts/build-guest.sh.

mod common;

use std::time::Duration;

use common::*;
use oci_spec::runtime::{LinuxMemory, LinuxResources, Process};
use vessel_proto::agent as pb;

fn exec_process(args: &[&str], terminal: bool) -> Vec<u8> {
    let mut p = Process::default();
    p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    p.set_terminal(Some(terminal));
    if terminal {
        let size = oci_spec::runtime::BoxBuilder::default()
            .height(24u64)
            .width(80u64)
            .build()
            .unwrap();
        p.set_console_size(Some(size));
    }
    serde_json::to_vec(&p).unwrap()
}

/// A main process that runs until SIGTERM (PID 1 of a PID namespace only gets
/// signals it has a handler for, hence the trap).
const LONG_RUNNER: &str = "trap 'exit 143' TERM; while :; do sleep 0.1; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_output_and_exit_code() {
    let guest = require_guest!();
    let ws = Workspace::new();
    let rootfs = busybox_rootfs(&ws.share_dir(), "c1");
    let vm = start_vm(&ws, "exitcode", &guest).await;
    let spec = spec(&["sh", "-c", "echo hello; exit 3"]);
    vm.agent()
        .create_container(create_request("c1", &spec, &rootfs))
        .await
        .expect("CreateContainer");
    vm.agent()
        .start_container(cref("c1"))
        .await
        .expect("StartContainer");
    let out = read_all(&vm, "c1", "", pb::OutputStream::Stdout).await;
    assert_eq!(out, "hello\n");
    let status = vm
        .agent()
        .wait_process("c1", "")
        .await
        .expect("WaitProcess");
    assert_eq!(status.exit_code, 3);
    assert!(!status.oom_killed);
    assert!(status.exited_at_unix_ns >= status.started_at_unix_ns && status.started_at_unix_ns > 0);
    // Answered again for an exited process.
    assert_eq!(
        vm.agent().wait_process("c1", "").await.unwrap().exit_code,
        3
    );
    vm.agent()
        .remove_container(cref("c1"))
        .await
        .expect("RemoveContainer");
    let pids = vm.pids();
    vm.stop().await.unwrap();
    assert_nothing_left(&ws.run_dir(), &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_in_long_running_container_then_sigterm() {
    let guest = require_guest!();
    let ws = Workspace::new();
    let rootfs = busybox_rootfs(&ws.share_dir(), "long");
    let vm = start_vm(&ws, "exec", &guest).await;
    let a = vm.agent();
    a.create_container(create_request(
        "long",
        &spec(&["sh", "-c", LONG_RUNNER]),
        &rootfs,
    ))
    .await
    .unwrap();
    a.start_container(cref("long")).await.unwrap();

    a.exec_process(pb::ExecProcessRequest {
        container_id: "long".into(),
        exec_id: "ls".into(),
        oci_process_json: exec_process(&["ls", "/"], false),
        stdin: false,
    })
    .await
    .expect("ExecProcess");
    let listing = read_all(&vm, "long", "ls", pb::OutputStream::Stdout).await;
    let entries: Vec<&str> = listing.split_whitespace().collect();
    for want in ["bin", "dev", "etc", "proc", "tmp"] {
        assert!(
            entries.contains(&want),
            "{want} missing from ls /: {listing:?}"
        );
    }
    assert_eq!(a.wait_process("long", "ls").await.unwrap().exit_code, 0);

    let list = a.list_containers(pb::Empty {}).await.unwrap();
    let info = list
        .containers
        .iter()
        .find(|c| c.container_id == "long")
        .expect("listed");
    assert_eq!(info.state, pb::container_info::State::Running as i32);

    a.signal_process(pb::SignalProcessRequest {
        container_id: "long".into(),
        exec_id: String::new(),
        signal: 15,
        all: false,
    })
    .await
    .expect("SignalProcess");
    let status = tokio::time::timeout(Duration::from_secs(20), a.wait_process("long", ""))
        .await
        .expect("stopped by SIGTERM")
        .unwrap();
    assert_eq!(status.exit_code, 143);
    let pids = vm.pids();
    vm.stop().await.unwrap();
    assert_nothing_left(&ws.run_dir(), &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_share_pid_namespace_when_asked() {
    let guest = require_guest!();
    let ws = Workspace::new();
    let rootfs_a = busybox_rootfs(&ws.share_dir(), "pa");
    let rootfs_b = busybox_rootfs(&ws.share_dir(), "pb");
    let rootfs_c = busybox_rootfs(&ws.share_dir(), "pc");
    let vm = start_vm(&ws, "pidns", &guest).await;
    let a = vm.agent();
    let marker = format!("{LONG_RUNNER} # marker-a");
    a.create_container(create_request(
        "pa",
        &spec(&["sh", "-c", &marker]),
        &rootfs_a,
    ))
    .await
    .unwrap();
    a.start_container(cref("pa")).await.unwrap();

    let show_init = [
        "sh",
        "-c",
        "cat /proc/1/cmdline | tr '\\0' ' '; echo; echo self=$$",
    ];
    let mut shared = create_request("pb", &spec(&show_init), &rootfs_b);
    shared.share_pid_ns_with = "pa".into();
    a.create_container(shared)
        .await
        .expect("CreateContainer sharing the PID ns");
    a.start_container(cref("pb")).await.unwrap();
    let out = read_all(&vm, "pb", "", pb::OutputStream::Stdout).await;
    assert!(
        out.contains("marker-a"),
        "PID 1 seen by pb is not pa's process: {out:?}"
    );
    assert!(
        !out.contains("self=1\n"),
        "pb is PID 1 of its own namespace: {out:?}"
    );
    assert_eq!(a.wait_process("pb", "").await.unwrap().exit_code, 0);

    // Without the option, a container gets its own PID namespace.
    a.create_container(create_request("pc", &spec(&show_init), &rootfs_c))
        .await
        .unwrap();
    a.start_container(cref("pc")).await.unwrap();
    let out = read_all(&vm, "pc", "", pb::OutputStream::Stdout).await;
    assert!(
        !out.contains("marker-a") && out.contains("self=1\n"),
        "{out:?}"
    );
    let pids = vm.pids();
    vm.stop().await.unwrap();
    assert_nothing_left(&ws.run_dir(), &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_is_enforced() {
    let guest = require_guest!();
    let ws = Workspace::new();
    let rootfs = busybox_rootfs(&ws.share_dir(), "mem");
    let vm = start_vm(&ws, "oom", &guest).await;
    // The shell doubles a string until the 32 MiB limit stops it.
    let mut spec = spec(&["sh", "-c", "a=xxxxxxxx; while :; do a=$a$a; done"]);
    let limit = 32 * 1024 * 1024;
    let mut memory = LinuxMemory::default();
    memory.set_limit(Some(limit));
    memory.set_swap(Some(limit));
    let mut resources = LinuxResources::default();
    resources.set_memory(Some(memory));
    spec.linux_mut()
        .as_mut()
        .unwrap()
        .set_resources(Some(resources));
    vm.agent()
        .create_container(create_request("mem", &spec, &rootfs))
        .await
        .unwrap();
    vm.agent().start_container(cref("mem")).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), vm.agent().wait_process("mem", ""))
        .await
        .expect("the hog is stopped")
        .unwrap();
    assert!(status.oom_killed, "not reported as OOM-killed: {status:?}");
    assert_eq!(status.exit_code, 137, "{status:?}");
    let pids = vm.pids();
    vm.stop().await.unwrap();
    assert_nothing_left(&ws.run_dir(), &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_exec() {
    let guest = require_guest!();
    let ws = Workspace::new();
    let rootfs = busybox_rootfs(&ws.share_dir(), "tty");
    let vm = start_vm(&ws, "tty", &guest).await;
    let a = vm.agent();
    a.create_container(create_request(
        "tty",
        &spec(&["sh", "-c", LONG_RUNNER]),
        &rootfs,
    ))
    .await
    .unwrap();
    a.start_container(cref("tty")).await.unwrap();
    a.exec_process(pb::ExecProcessRequest {
        container_id: "tty".into(),
        exec_id: "t1".into(),
        oci_process_json: exec_process(
            &["sh", "-c", "tty; stty size; [ -t 0 ] && echo stdin-is-tty"],
            true,
        ),
        stdin: false,
    })
    .await
    .expect("ExecProcess with a terminal");
    let out = read_all(&vm, "tty", "t1", pb::OutputStream::Stdout).await;
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("24 80"), "console size not applied: {out:?}");
    assert!(out.contains("stdin-is-tty"), "{out:?}");
    // A terminal turns "\n" into "\r\n".
    assert!(out.contains("\r\n"), "{out:?}");
    assert_eq!(a.wait_process("tty", "t1").await.unwrap().exit_code, 0);
    let pids = vm.pids();
    vm.stop().await.unwrap();
    assert_nothing_left(&ws.run_dir(), &pids);
}
