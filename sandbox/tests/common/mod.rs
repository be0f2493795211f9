//! Shared fixtures of the VM integration tests: the built guest, a VM per test that is
//! killed even when the test fails, busybox root filesystems, OCI specs, leak checks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};
use vessel_proto::agent as pb;
use vessel_sandbox::process::{start_time, Proc, ProcId};
use vessel_sandbox::{Accel, PodVm, VmConfig};

/// The guest (vmlinux + initrd.img): $VESSEL_GUEST_DIR or <workspace>/build/guest.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("VESSEL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest"))
}

/// The guest files, or None (with a message) when they have not been built.
pub fn guest() -> Option<(PathBuf, PathBuf)> {
    let dir = guest_dir();
    let (k, i) = (dir.join("vmlinux"), dir.join("initrd.img"));
    if k.is_file() && i.is_file() {
        Some((k, i))
    } else {
        // A missing guest fails the test unless skipping was asked for: a broken
        // guest build must not turn the VM tests green.
        assert!(
            std::env::var_os("VESSEL_SKIP_VM").is_some(),
            "no guest in {}: build it with scripts/build-guest.sh (as scripts/test.sh does), \
             or set VESSEL_SKIP_VM=1 to skip the tests that boot VMs",
            dir.display()
        );
        eprintln!("SKIPPED (VESSEL_SKIP_VM): no guest in {}", dir.display());
        None
    }
}

/// Returns early from a test when the guest is missing.
#[macro_export]
macro_rules! require_guest {
    () => {
        match common::guest() {
            Some(g) => g,
            None => return,
        }
    };
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::INFO)
        .try_init();
}

/// A per-test temp dir with a run dir and a share dir in it.
pub struct Workspace {
    pub tmp: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        // Short base path: unix socket paths must fit in 108 bytes.
        let tmp = tempfile::Builder::new()
            .prefix("vsbx")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::create_dir(tmp.path().join("share")).unwrap();
        Self { tmp }
    }
    pub fn run_dir(&self) -> PathBuf {
        self.tmp.path().join("vm")
    }
    pub fn share_dir(&self) -> PathBuf {
        self.tmp.path().join("share")
    }
    pub fn config(&self, id: &str, (kernel, initrd): &(PathBuf, PathBuf)) -> VmConfig {
        let mut c = VmConfig::new(id, self.run_dir(), self.share_dir(), kernel, initrd);
        c.accel = Accel::Auto;
        c.accel_cache_dir = self.tmp.path().to_path_buf();
        c.memory_mib = 512;
        c.timeouts.boot = Duration::from_secs(90);
        c
    }
}

impl Drop for Workspace {
    /// A test that failed before `stop` leaves its VM's run dir tmpfs mounted:
    /// detach every mount below the workspace so the temp dir can go.
    fn drop(&mut self) {
        let base = self.tmp.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for m in mounts.lines().filter_map(|l| l.split(' ').nth(4)) {
            if m.starts_with(&base) {
                let _ = rustix::mount::unmount(m, rustix::mount::UnmountFlags::DETACH);
            }
        }
    }
}

/// A VM handle whose processes are killed if the test ends (or panics) first.
pub struct VmGuard {
    pub vm: PodVm,
    pub procs: ProcGuard,
}

impl VmGuard {
    pub fn new(vm: PodVm) -> Self {
        let procs = vm
            .pids()
            .into_iter()
            .filter_map(|pid| {
                Some(ProcId {
                    pid,
                    start_time: start_time(pid)?,
                })
            })
            .collect();
        Self {
            vm,
            procs: ProcGuard(procs),
        }
    }
}

impl std::ops::Deref for VmGuard {
    type Target = PodVm;
    fn deref(&self) -> &PodVm {
        &self.vm
    }
}

/// SIGKILLs the process groups of recorded processes on drop.
pub struct ProcGuard(pub Vec<ProcId>);

impl Drop for ProcGuard {
    fn drop(&mut self) {
        for id in &self.0 {
            if start_time(id.pid) == Some(id.start_time) {
                if let Some(pid) = rustix::process::Pid::from_raw(id.pid) {
                    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
}

pub async fn start_vm(ws: &Workspace, id: &str, guest: &(PathBuf, PathBuf)) -> VmGuard {
    init_tracing();
    let vm = PodVm::start(ws.config(id, guest)).await.expect("VM starts");
    VmGuard::new(vm)
}

/// Pids of processes whose command line mentions `needle` (e.g. a run dir).
pub fn processes_mentioning(needle: &Path) -> Vec<(i32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Asserts that no process of the VM lives (not even as a zombie) and its run dir is gone.
pub fn assert_nothing_left(run_dir: &Path, pids: &[i32]) {
    for &pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still exists: {:?}",
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
        );
    }
    assert_eq!(
        processes_mentioning(run_dir),
        vec![],
        "processes still use {}",
        run_dir.display()
    );
    assert!(!run_dir.exists(), "{} still exists", run_dir.display());
}

/// Waits (polling) for a process to disappear.
pub async fn wait_gone(pid: i32, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

pub fn proc_of(pid: i32) -> Option<Proc> {
    Proc::find(ProcId {
        pid,
        start_time: start_time(pid)?,
    })
}

/// A busybox root filesystem at <share>/<name>/rootfs; returns its guest path.
pub fn busybox_rootfs(share: &Path, name: &str) -> String {
    let root = share.join(name).join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    format!("{}/{name}/rootfs", vessel_proto::GUEST_SHARE_DIR)
}

/// An OCI spec running `args` in the VM's network namespace (as pods do).
pub fn spec(args: &[&str]) -> Spec {
    let mut spec = Spec::default();
    let mut process = Process::default();
    process.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    process.set_terminal(Some(false));
    spec.set_process(Some(process));
    spec.set_hostname(Some("pod".into()));
    let linux = spec.linux_mut().as_mut().unwrap();
    let ns = linux.namespaces().clone().unwrap_or_default();
    linux.set_namespaces(Some(
        ns.into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect(),
    ));
    spec
}

pub fn create_request(id: &str, spec: &Spec, rootfs: &str) -> pb::CreateContainerRequest {
    pb::CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: serde_json::to_vec(spec).unwrap(),
        rootfs: Some(pb::Rootfs {
            path: rootfs.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Reads a whole output stream of a process.
pub async fn read_all(vm: &PodVm, container: &str, exec: &str, stream: pb::OutputStream) -> String {
    let req = pb::ReadOutputRequest {
        container_id: container.into(),
        exec_id: exec.into(),
        stream: stream as i32,
        ..Default::default()
    };
    let mut s = vm.agent().read_output(req).await.expect("ReadOutput opens");
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await.expect("output stream") {
        out.extend_from_slice(&chunk.data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn cref(id: &str) -> pb::ContainerRef {
    pb::ContainerRef {
        container_id: id.into(),
    }
}
