//! Boots the real guest (vmlinux + initrd with this agent as /init) under QEMU TCG,
//! with vhost-device-vsock and virtiofsd, and drives the agent API end to end.
//!
//! Needs root, qemu-system-x86_64, vhost-device-vsock, virtiofsd, busybox-static and a
//! built guest (`scripts/build-guest.sh`) in $VESSEL_GUEST_DIR (or /usr/share/vessel).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tonic::transport::{Channel, Endpoint};
use vessel_proto::agent::agent_client::AgentClient;
use vessel_proto::agent::*;

/// Kills and reaps the helper processes, even when the test panics.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn guest_dir() -> PathBuf {
    std::env::var_os("VESSEL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/share/vessel".into())
}

fn tsc_khz() -> u64 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse()
                .ok()
        })
        .expect("cpu MHz in /proc/cpuinfo");
    (mhz * 1000.0) as u64
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Busybox rootfs for the test containers.
fn make_rootfs(root: &Path) {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static at /bin/busybox");
    for app in [
        "sh", "echo", "cat", "sleep", "tty", "id", "nc", "ip", "hostname", "ls", "true", "head",
        "dd",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(app)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
}

async fn connect(uds: &Path, deadline: Instant) -> AgentClient<Channel> {
    let uds = uds.to_path_buf();
    loop {
        let uds2 = uds.clone();
        let ch = Endpoint::from_static("http://agent")
            .connect_with_connector(tower::service_fn(move |_| {
                let uds = uds2.clone();
                async move {
                    let mut s = tokio::net::UnixStream::connect(&uds).await?;
                    s.write_all(b"CONNECT 1024\n").await?;
                    let mut r = BufReader::new(s);
                    let mut line = String::new();
                    r.read_line(&mut line).await?;
                    if !line.starts_with("OK ") {
                        return Err(std::io::Error::other(format!("hybrid vsock: {line:?}")));
                    }
                    Ok::<_, std::io::Error>(TokioIo::new(r.into_inner()))
                }
            }))
            .await;
        if let Ok(ch) = ch {
            let mut c = AgentClient::new(ch);
            if c.health(HealthRequest {}).await.is_ok() {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "agent did not answer in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spec(args: &[&str], terminal: bool) -> Vec<u8> {
    let mut s = oci_spec::runtime::Spec::default();
    let mut p = s.process().clone().unwrap();
    p.set_args(Some(args.iter().map(|a| a.to_string()).collect()));
    p.set_terminal(Some(terminal));
    s.set_process(Some(p));
    serde_json::to_vec(&s).unwrap()
}

fn process(args: &[&str], terminal: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "args": args, "cwd": "/", "terminal": terminal,
        "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
    }))
    .unwrap()
}

async fn read_all(
    c: &mut AgentClient<Channel>,
    id: &str,
    exec: &str,
    stream: OutputStream,
) -> String {
    let mut s = c
        .read_output(ReadOutputRequest {
            container_id: id.into(),
            exec_id: exec.into(),
            stream: stream as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.message().await.unwrap() {
        out.extend(chunk.data);
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn wait(c: &mut AgentClient<Channel>, id: &str, exec: &str) -> WaitProcessResponse {
    tokio::time::timeout(
        Duration::from_secs(60),
        c.wait_process(ProcessRef {
            container_id: id.into(),
            exec_id: exec.into(),
        }),
    )
    .await
    .expect("wait timed out")
    .unwrap()
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_and_runs_containers() {
    let guest = guest_dir();
    assert!(
        guest.join("vmlinux").exists(),
        "no guest in {} (run scripts/build-guest.sh)",
        guest.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let share = tmp.path().join("share");
    make_rootfs(&share.join("rootfs"));
    let (vsock_sock, hybrid, fs_sock) = (
        tmp.path().join("vsock.sock"),
        tmp.path().join("hybrid.sock"),
        tmp.path().join("fs.sock"),
    );

    let mut procs = Procs(Vec::new());
    procs.0.push(
        Command::new("vhost-device-vsock")
            .arg("--vm")
            .arg(format!(
                "guest-cid=3,socket={},uds-path={}",
                vsock_sock.display(),
                hybrid.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vhost-device-vsock"),
    );
    procs.0.push(
        Command::new("virtiofsd")
            .arg(format!("--socket-path={}", fs_sock.display()))
            .arg(format!("--shared-dir={}", share.display()))
            .args(["--cache=auto", "--sandbox=none"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("virtiofsd"),
    );
    wait_for(&vsock_sock);
    wait_for(&fs_sock);

    let console = tmp.path().join("console.log");
    let started = Instant::now();
    procs.0.push(
        Command::new("qemu-system-x86_64")
            .args(["-M", "microvm,acpi=off", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "512M"])
            .args(["-nodefaults", "-no-user-config", "-no-reboot", "-display", "none"])
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem"])
            .arg("-kernel")
            .arg(guest.join("vmlinux"))
            .arg("-initrd")
            .arg(guest.join("initrd.img"))
            .arg("-append")
            .arg(format!(
                "tsc_early_khz={} tsc=reliable quiet cryptomgr.notests panic=-1 reboot=t console=ttyS0 vessel.seed=00112233445566778899aabbccddeeff",
                tsc_khz()
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-chardev")
            .arg(format!("socket,id=vs,path={}", vsock_sock.display()))
            .args(["-device", "vhost-user-vsock-device,chardev=vs"])
            .arg("-chardev")
            .arg(format!("socket,id=fs,path={}", fs_sock.display()))
            .args(["-device", "vhost-user-fs-device,chardev=fs,tag=vessel"])
            .args(["-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56"])
            .args(["-device", "virtio-balloon-device,free-page-reporting=on"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu"),
    );
    let console_text = || std::fs::read_to_string(&console).unwrap_or_default();

    let mut c = connect(&hybrid, Instant::now() + Duration::from_secs(60)).await;
    eprintln!("QEMU start -> Health answered: {:?}", started.elapsed());
    let h = c.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    assert!(h.boot_time_ms > 0);

    let g = c.guest_stats(Empty {}).await.unwrap().into_inner();
    assert!(
        g.memory_total_bytes > 256 << 20 && g.memory_total_bytes <= 512 << 20,
        "{g:?}"
    );
    assert!(g.memory_available_bytes > 0 && g.uptime_ms > 0);

    // Network: the NIC by MAC, address, default route, hostname, files.
    c.configure_network(ConfigureNetworkRequest {
        interfaces: vec![Interface {
            name: "eth0".into(),
            mac: "52:54:00:12:34:56".into(),
            mtu: 1400,
            addresses: vec![IpAddress {
                address: "10.0.2.15".into(),
                prefix_len: 24,
            }],
            ..Default::default()
        }],
        routes: vec![Route {
            destination: "".into(),
            gateway: "10.0.2.2".into(),
            device: "eth0".into(),
            metric: 0,
        }],
        hostname: "pod-a".into(),
        dns: Some(DnsConfig {
            servers: vec!["10.0.2.3".into()],
            searches: vec!["svc.local".into()],
            options: vec![],
        }),
        hosts: vec![],
    })
    .await
    .unwrap_or_else(|e| panic!("configure_network: {e}\n{}", console_text()));
    let bad_mac = c
        .configure_network(ConfigureNetworkRequest {
            interfaces: vec![Interface {
                name: "eth9".into(),
                mac: "02:00:00:00:00:09".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await;
    assert_eq!(bad_mac.unwrap_err().code(), tonic::Code::NotFound);

    // c1: overlay rootfs over the virtiofs share; pipes, stdin, exit code.
    c.create_container(CreateContainerRequest {
        container_id: "c1".into(),
        oci_spec_json: spec(
            &[
                "sh",
                "-c",
                "echo hello; echo oops >&2; read x; echo got $x; exit 3",
            ],
            false,
        ),
        rootfs: Some(Rootfs {
            path: "/run/vessel/rootfs/c1".into(),
            overlay_lower: vec!["/run/vessel/share/rootfs".into()],
            overlay_upper: "/tmp/c1/upper".into(),
            overlay_work: "/tmp/c1/work".into(),
        }),
        stdin: true,
        stdin_once: true,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create c1: {e}\n{}", console_text()));
    let l = c.list_containers(Empty {}).await.unwrap().into_inner();
    assert_eq!(l.containers.len(), 1);
    assert_eq!(l.containers[0].state, container_info::State::Created as i32);
    c.start_container(ContainerRef {
        container_id: "c1".into(),
    })
    .await
    .unwrap();
    let stdin = tokio_stream::iter(vec![
        StdinChunk {
            container_id: "c1".into(),
            exec_id: "".into(),
            data: b"wor".to_vec(),
        },
        StdinChunk {
            container_id: "".into(),
            exec_id: "".into(),
            data: b"ld\n".to_vec(),
        },
    ]);
    c.write_stdin(stdin).await.unwrap();
    let out = read_all(&mut c, "c1", "", OutputStream::Stdout).await;
    let err = read_all(&mut c, "c1", "", OutputStream::Stderr).await;
    assert_eq!(out, "hello\ngot world\n");
    assert_eq!(err, "oops\n");
    let w = wait(&mut c, "c1", "").await;
    assert_eq!(w.exit_code, 3);
    assert!(!w.oom_killed);
    assert!(w.started_at_unix_ns > 0 && w.exited_at_unix_ns >= w.started_at_unix_ns);
    // Asking again answers at once.
    assert_eq!(wait(&mut c, "c1", "").await.exit_code, 3);

    // c2: long-running, plain-dir rootfs; execs (pipe and TTY), stats, resources.
    c.create_container(CreateContainerRequest {
        container_id: "c2".into(),
        oci_spec_json: spec(
            &["sh", "-c", "echo pong | nc -l -p 8080; sleep 1000"],
            false,
        ),
        rootfs: Some(Rootfs {
            path: "/run/vessel/share/rootfs".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create c2: {e}\n{}", console_text()));
    c.start_container(ContainerRef {
        container_id: "c2".into(),
    })
    .await
    .unwrap();

    c.exec_process(ExecProcessRequest {
        container_id: "c2".into(),
        exec_id: "e1".into(),
        oci_process_json: process(
            &["sh", "-c", "hostname; ip -o -4 addr show eth0; exit 5"],
            false,
        ),
        stdin: false,
    })
    .await
    .unwrap_or_else(|e| panic!("exec e1: {e}\n{}", console_text()));
    let out = read_all(&mut c, "c2", "e1", OutputStream::Stdout).await;
    assert_eq!(wait(&mut c, "c2", "e1").await.exit_code, 5);
    assert!(out.contains("10.0.2.15/24"), "{out}");

    c.exec_process(ExecProcessRequest {
        container_id: "c2".into(),
        exec_id: "t1".into(),
        oci_process_json: process(&["sh", "-c", "tty; read l; echo in:$l"], true),
        stdin: true,
    })
    .await
    .unwrap_or_else(|e| panic!("exec t1: {e}\n{}", console_text()));
    c.resize_tty(ResizeTtyRequest {
        container_id: "c2".into(),
        exec_id: "t1".into(),
        width: 100,
        height: 40,
    })
    .await
    .unwrap();
    c.write_stdin(tokio_stream::iter(vec![StdinChunk {
        container_id: "c2".into(),
        exec_id: "t1".into(),
        data: b"abc\n".to_vec(),
    }]))
    .await
    .unwrap();
    let out = read_all(&mut c, "c2", "t1", OutputStream::Stdout).await;
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("in:abc"), "{out:?}");
    assert_eq!(wait(&mut c, "c2", "t1").await.exit_code, 0);

    // Port-forward to the container's listener on the guest loopback.
    let mut got = Vec::new();
    for _ in 0..100 {
        let req = tokio_stream::iter(vec![PortForwardData {
            port: 8080,
            data: vec![],
        }]);
        if let Ok(resp) = c.port_forward(req).await {
            let mut s = resp.into_inner();
            while let Ok(Some(m)) = s.message().await {
                got.extend(m.data);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(String::from_utf8_lossy(&got), "pong\n");

    c.update_container_resources(UpdateResourcesRequest {
        container_id: "c2".into(),
        oci_linux_resources_json: br#"{"memory":{"limit":67108864},"pids":{"limit":50}}"#.to_vec(),
    })
    .await
    .unwrap();
    let s = c
        .container_stats(ContainerRef {
            container_id: "c2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.memory_limit_bytes, 64 << 20);
    assert!(s.pids_current >= 1 && s.memory_usage_bytes > 0, "{s:?}");

    c.signal_process(SignalProcessRequest {
        container_id: "c2".into(),
        exec_id: "".into(),
        signal: 9,
        all: false,
    })
    .await
    .unwrap();
    assert_eq!(wait(&mut c, "c2", "").await.exit_code, 137);

    seccomp_and_output_offsets(&mut c, &console_text).await;

    for id in ["c1", "c2", "c3", "c4", "c5", "c6", "c1"] {
        c.remove_container(ContainerRef {
            container_id: id.into(),
        })
        .await
        .unwrap();
    }
    assert!(c
        .list_containers(Empty {})
        .await
        .unwrap()
        .into_inner()
        .containers
        .is_empty());
    let e = c
        .wait_process(ProcessRef {
            container_id: "c1".into(),
            exec_id: "".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // Shutdown powers the VM off: QEMU exits by itself.
    c.shutdown(Empty {}).await.unwrap();
    let qemu = procs.0.last_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = qemu.try_wait().unwrap() {
            eprintln!("qemu exited: {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "VM did not power off\n{}",
            console_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// c6: the container's seccomp profile (mkdir denied) binds PID 1 and an exec'd
/// process alike; output stays readable from an old offset until acknowledged.
async fn seccomp_and_output_offsets(c: &mut AgentClient<Channel>, console: &dyn Fn() -> String) {
    let mut spec: serde_json::Value = serde_json::from_slice(&spec(
        &["sh", "-c", "echo one; echo two; sleep 1000"],
        false,
    ))
    .unwrap();
    spec["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    c.create_container(CreateContainerRequest {
        container_id: "c6".into(),
        oci_spec_json: serde_json::to_vec(&spec).unwrap(),
        rootfs: Some(Rootfs {
            path: "/run/vessel/share/rootfs".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create c6: {e}\n{}", console()));
    c.start_container(ContainerRef {
        container_id: "c6".into(),
    })
    .await
    .unwrap();

    // Output: read without acking, read again from an offset, then ack.
    let open = |offset: u64| ReadOutputRequest {
        container_id: "c6".into(),
        exec_id: "".into(),
        stream: OutputStream::Stdout as i32,
        offset,
        explicit_ack: true,
    };
    let mut s = c.read_output(open(0)).await.unwrap().into_inner();
    let mut out = Vec::new();
    while out.len() < 8 {
        let chunk = s.message().await.unwrap().expect("c6 output");
        assert_eq!(chunk.offset, out.len() as u64);
        out.extend(chunk.data);
    }
    assert_eq!(out, b"one\ntwo\n");
    drop(s);
    let mut s = c.read_output(open(4)).await.unwrap().into_inner();
    let chunk = s.message().await.unwrap().expect("c6 output again");
    assert_eq!((chunk.offset, chunk.data.as_slice()), (4, &b"two\n"[..]));
    drop(s);
    c.ack_output(AckOutputRequest {
        container_id: "c6".into(),
        exec_id: "".into(),
        stream: OutputStream::Stdout as i32,
        offset: 8,
    })
    .await
    .unwrap();

    // An exec without noNewPrivileges and without CAP_SYS_ADMIN, as vesseld sends.
    let caps = serde_json::json!(["CAP_KILL", "CAP_AUDIT_WRITE"]);
    let exec = serde_json::json!({
        "args": ["sh", "-c",
            "grep -E '^(Seccomp|CapEff):' /proc/self/status; grep Seccomp: /proc/1/status; mkdir /tmp/denied || echo denied"],
        "cwd": "/", "terminal": false, "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0},
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps}
    });
    c.exec_process(ExecProcessRequest {
        container_id: "c6".into(),
        exec_id: "s1".into(),
        oci_process_json: serde_json::to_vec(&exec).unwrap(),
        stdin: false,
    })
    .await
    .unwrap_or_else(|e| panic!("exec s1: {e}\n{}", console()));
    let out = read_all(c, "c6", "s1", OutputStream::Stdout).await;
    let err = read_all(c, "c6", "s1", OutputStream::Stderr).await;
    assert_eq!(wait(c, "c6", "s1").await.exit_code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            // CAP_KILL | CAP_AUDIT_WRITE: the filter's CAP_SYS_ADMIN did not survive.
            "CapEff:\t0000000020000020",
            "Seccomp:\t2",
            "Seccomp:\t2",
            "denied"
        ],
        "{out}{err}"
    );
    assert!(err.contains("Operation not permitted"), "{err}");
}
