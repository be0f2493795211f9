//! vesseld as a process: start-up, config handling, single instance, socket
//! handling, and the RuntimeService calls of the foundation.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::Output;

use k8s_cri::v1 as cri;
use vessel_tests::daemon::TestDaemon;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn version_status_and_runtime_config() {
    // A guest that exists, so RuntimeReady depends only on the host's programs.
    let guest = tempfile::tempdir().unwrap();
    for f in ["vmlinux", "initrd.img"] {
        std::fs::write(guest.path().join(f), b"not a real guest").unwrap();
    }
    let d = TestDaemon::start_with(&format!(
        "[guest]\nkernel = {:?}\ninitrd = {:?}\n",
        guest.path().join("vmlinux").display().to_string(),
        guest.path().join("initrd.img").display().to_string(),
    ))
    .unwrap();
    let meta = std::fs::metadata(d.socket()).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let mut c = d.client().await.unwrap();
    let v = c
        .runtime
        .version(cri::VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "vessel");
    assert_eq!(v.runtime_api_version, "v1");
    assert_eq!(v.version, "0.1.0");
    assert_eq!(v.runtime_version, env!("CARGO_PKG_VERSION"));

    let s = c
        .runtime
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    let conds = s.status.unwrap().conditions;
    let cond = |t: &str| conds.iter().find(|c| c.r#type == t).unwrap().clone();
    let ready = cond("RuntimeReady");
    assert!(ready.status, "{ready:?}");
    let net = cond("NetworkReady");
    assert!(!net.status);
    assert_eq!(net.reason, "NetworkPluginNotReady");
    // The harness gives every daemon an empty CNI conf dir of its own.
    assert!(
        net.message.contains("no CNI network config"),
        "{}",
        net.message
    );
    let config: serde_json::Value = serde_json::from_str(&s.info["config"]).unwrap();
    assert_eq!(config["root"], d.root().display().to_string());
    assert!(s.runtime_handlers.iter().any(|h| h.name == "default"));
    // The CRI's name for the default handler, with the features critest checks.
    let default = s.runtime_handlers.iter().find(|h| h.name.is_empty());
    let features = default
        .and_then(|h| h.features)
        .expect("default handler \"\"");
    assert!(features.recursive_read_only_mounts);
    // Every handler offers pod user namespaces.
    assert!(s
        .runtime_handlers
        .iter()
        .all(|h| h.features.is_some_and(|f| f.user_namespaces)));
    assert!(s.features.expect("features").supplemental_groups_policy);

    let rc = c
        .runtime
        .runtime_config(cri::RuntimeConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rc.linux.unwrap().cgroup_driver,
        cri::CgroupDriver::Cgroupfs as i32
    );

    let e = c
        .runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("RunPodSandbox"), "{}", e.message());
    // A failed call is logged at warn with its message.
    let log = d.log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("RuntimeService/RunPodSandbox")
            && l.contains("config is missing")),
        "{log}"
    );
    let e = c
        .runtime
        .container_stats(cri::ContainerStatsRequest {
            container_id: "nosuch".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("nosuch"), "{}", e.message());

    // Calls are logged at debug with method and latency.
    let log = d.log();
    assert!(
        log.contains("RuntimeService/Version") && log.contains("latency_ms"),
        "{log}"
    );
}

#[test]
fn unknown_key_fails_naming_file_and_key() {
    let d = TestDaemon::prepare("[guest]\nkernal = \"/x\"\n").unwrap();
    let o = d.command().output().unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains(&d.config_path().display().to_string()), "{e}");
    assert!(
        e.contains("guest.kernal") && e.contains("unknown field"),
        "{e}"
    );
    assert!(!d.socket().exists());

    // The same in a drop-in names the drop-in.
    let d = TestDaemon::prepare("").unwrap();
    let dropin = d.dropin_dir().join("50-bad.toml");
    std::fs::write(&dropin, "[runtimes.fast]\nvcpu = 2\n").unwrap();
    let e = stderr(&d.command().output().unwrap());
    assert!(e.contains(&dropin.display().to_string()), "{e}");
    assert!(e.contains("runtimes.fast.vcpu"), "{e}");
}

#[test]
fn bad_values_fail_start_up() {
    for (extra, key) in [
        ("[runtimes.default]\nvcpus = 0\n", "runtimes.default.vcpus"),
        (
            "[runtimes.default]\naccel = \"xen\"\n",
            "runtimes.default.accel",
        ),
        ("log_format = \"yaml\"\n", "log_format"),
        (
            "[network]\ncni_conf_dir = \"relative\"\n",
            "network.cni_conf_dir",
        ),
        (
            "[runtimes.default]\nmemory_mib = \"lots\"\n",
            "runtimes.default.memory_mib",
        ),
    ] {
        let d = TestDaemon::prepare(extra).unwrap();
        let o = d.command().output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{extra}");
        let e = stderr(&o);
        assert!(e.contains(key), "{extra}: {e}");
        assert!(e.contains("vessel.toml"), "{extra}: {e}");
    }
    // An explicit --config that does not exist is an error, not defaults.
    let d = TestDaemon::prepare("").unwrap();
    let o = std::process::Command::new(vessel_tests::daemon::vesseld_bin())
        .arg("--config")
        .arg(d.dir().join("nope.toml"))
        .arg("config")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nope.toml"), "{}", stderr(&o));
}

#[test]
fn dropins_apply_in_lexical_order_and_flags_win() {
    let d = TestDaemon::prepare("[runtimes.big]\nvcpus = 2\nmemory_mib = 1024\n").unwrap();
    let dir = d.dropin_dir();
    std::fs::write(dir.join("20-b.toml"), "[runtimes.big]\nvcpus = 8\n").unwrap();
    std::fs::write(
        dir.join("10-a.toml"),
        "[runtimes.big]\nvcpus = 4\naccel = \"tcg\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("99-not-toml.txt"), "garbage = ").unwrap();

    let o = d
        .command()
        .args(["--log-format", "json", "config"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    let v: toml::Table = text.parse().unwrap();
    let big = &v["runtimes"]["big"];
    assert_eq!(big["vcpus"].as_integer(), Some(8));
    assert_eq!(big["memory_mib"].as_integer(), Some(1024));
    assert_eq!(big["accel"].as_str(), Some("tcg"));
    assert_eq!(v["runtimes"]["default"]["vcpus"].as_integer(), Some(1));
    assert_eq!(v["log_format"].as_str(), Some("json"));
    assert_eq!(
        v["image"]["certs_dir"].as_str(),
        Some(d.certs_dir().display().to_string().as_str())
    );
    assert_eq!(v["image"]["max_concurrent_downloads"].as_integer(), Some(3));
    assert_eq!(
        v["guest"]["kernel"].as_str(),
        Some("/usr/share/vessel/vmlinux")
    );
    assert_eq!(
        v["listen"].as_str(),
        Some(d.socket().display().to_string().as_str())
    );

    // The printed config is itself a valid config that prints the same.
    let printed = d.dir().join("printed.toml");
    std::fs::write(&printed, &text).unwrap();
    let o = std::process::Command::new(vessel_tests::daemon::vesseld_bin())
        .arg("--config")
        .arg(&printed)
        .arg("config")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8(o.stdout).unwrap(), text);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_when_configured() {
    let d = TestDaemon::start_with("log_format = \"json\"\n").unwrap();
    let mut c = d.client().await.unwrap();
    c.runtime
        .version(cri::VersionRequest::default())
        .await
        .unwrap();
    let log = d.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["method"] == "RuntimeService/Version" && l["latency_ms"].is_number()));
}

#[tokio::test(flavor = "multi_thread")]
async fn second_instance_is_refused_and_live_socket_untouched() {
    let d = TestDaemon::start().unwrap();
    let ino = std::fs::metadata(d.socket()).unwrap().ino();

    let o = d.command().output().unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("another vesseld is running"), "{e}");
    assert!(e.contains(&d.pid().unwrap().to_string()), "{e}");

    // Same socket, different run_root (so no shared lock): the live socket is kept.
    let other_run = d.dir().join("other-run");
    let o = d
        .command()
        .arg("--run-root")
        .arg(&other_run)
        .arg("--root")
        .arg(d.dir().join("other-root"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is live"), "{}", stderr(&o));

    assert_eq!(std::fs::metadata(d.socket()).unwrap().ino(), ino);
    let mut c = d.client().await.unwrap();
    c.runtime
        .version(cri::VersionRequest::default())
        .await
        .expect("first instance still serves");
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_socket_is_replaced_and_sigterm_cleans_up() {
    let mut d = TestDaemon::start().unwrap();
    d.kill9();
    // SIGKILL leaves the socket file behind with nobody listening.
    assert!(d.socket().exists());
    d.restart().unwrap();
    let mut c = d.client().await.unwrap();
    c.runtime
        .version(cri::VersionRequest::default())
        .await
        .unwrap();
    assert!(d.log().contains("replacing stale socket"));

    // A graceful stop removes the socket and exits 0.
    assert!(d.stop(), "log:\n{}", d.log());
    assert!(!d.socket().exists());
}

/// RuntimeReady is false, naming the missing piece, when the default handler's guest
/// is not there; another handler's broken guest does not make the runtime unready.
#[tokio::test(flavor = "multi_thread")]
async fn runtime_not_ready_without_a_guest_image() {
    let d = TestDaemon::start_with(
        "[guest]\nkernel = \"/nonexistent/vessel/vmlinux\"\ninitrd = \"/nonexistent/vessel/initrd.img\"\n",
    )
    .unwrap();
    let mut c = d.client().await.unwrap();
    let ready = c.condition("RuntimeReady").await.unwrap();
    assert!(!ready.status);
    assert_eq!(ready.reason, "PodVmUnavailable");
    assert!(
        ready
            .message
            .contains("guest kernel /nonexistent/vessel/vmlinux")
            && ready
                .message
                .contains("guest initrd /nonexistent/vessel/initrd.img")
            && ready.message.contains("build-guest.sh"),
        "{}",
        ready.message
    );
    assert!(
        d.log().contains("pod VMs cannot start"),
        "start-up warns: {}",
        d.log()
    );
}

/// Waits up to 10 s for `needle` in the daemon's log.
fn wait_for_log(d: &TestDaemon, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = d.log();
        if log.contains(needle) {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {needle:?} in the log:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// SIGHUP re-reads the config and drop-ins: log_level applies at once, other changes
/// are named as needing a restart, and a broken file keeps the running config.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_the_log_level_and_names_what_needs_a_restart() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let d = TestDaemon::start().unwrap();
    let pid = Pid::from_raw(d.pid().unwrap() as i32);
    let mut c = d.client().await.unwrap();
    let version = cri::VersionRequest::default();
    c.runtime.version(version.clone()).await.unwrap();
    let calls = |log: &str| log.matches("RuntimeService/Version").count();
    // The harness's log_level is debug: every call is logged.
    assert_eq!(calls(&d.log()), 1, "{}", d.log());

    std::fs::write(
        d.dropin_dir().join("50-reload.toml"),
        "log_level = \"warn\"\n[image]\nmax_concurrent_downloads = 7\n",
    )
    .unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    let log = wait_for_log(&d, "needs a restart");
    assert!(
        log.lines()
            .any(|l| l.contains("configuration change applied") && l.contains("log_level")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("needs a restart") && l.contains("image.max_concurrent_downloads")),
        "{log}"
    );
    // At warn, calls are no longer logged.
    c.runtime.version(version.clone()).await.unwrap();
    assert_eq!(calls(&d.log()), 1, "{}", d.log());

    // A broken drop-in: not reloaded, the daemon keeps serving with its config.
    std::fs::write(d.dropin_dir().join("60-bad.toml"), "log_level = \n").unwrap();
    kill(pid, Signal::SIGHUP).unwrap();
    let log = wait_for_log(&d, "configuration not reloaded");
    assert!(log.contains("60-bad.toml"), "{log}");
    c.runtime.version(version).await.unwrap();
}

/// `log_file`: vesseld writes its log there (created with its dir), not to stderr.
#[tokio::test(flavor = "multi_thread")]
async fn log_file_takes_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("log/vesseld.log");
    let d = TestDaemon::start_with(&format!(
        "log_file = {:?}\nlog_max_size_mib = 1\nlog_max_files = 2\n",
        file.display().to_string()
    ))
    .unwrap();
    let mut c = d.client().await.unwrap();
    c.runtime
        .version(cri::VersionRequest::default())
        .await
        .unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("vesseld serving CRI v1"), "{text}");
    assert!(!d.log().contains("vesseld serving"), "stderr: {}", d.log());
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
}

/// Under systemd's Type=notify: READY=1 once the socket serves, STOPPING=1 on SIGTERM.
#[test]
fn notifies_systemd_when_ready_and_when_stopping() {
    use std::os::unix::net::UnixDatagram;
    let d = TestDaemon::prepare("").unwrap();
    let notify = d.dir().join("notify.sock");
    let sd = UnixDatagram::bind(&notify).unwrap();
    sd.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut child = d
        .command()
        .env("NOTIFY_SOCKET", &notify)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(d.dir().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sd.recv(&mut buf).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(d.dir().join("stderr")).unwrap_or_default();
        panic!("no READY=1 within 30 s ({e}); log:\n{log}")
    });
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means serving: the socket accepts at once.
    std::os::unix::net::UnixStream::connect(d.socket()).expect("socket serves when READY=1");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = sd.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(child.wait().unwrap().success());
}
