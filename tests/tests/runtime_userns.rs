//! Pod user namespaces end to end: a POD-mode pod's containers run in one user
//! namespace with the pod's maps (read back from /proc/self/{uid,gid}_map in a
//! container's log), a NODE-mode pod's see the VM's ids, and every request vessel
//! cannot honour is refused with InvalidArgument before anything is started.

mod runtime_common;

use std::time::Duration;

use k8s_cri::v1 as cri;
use runtime_common::*;
use tonic::Code;
use vessel_tests::cri::CriClient;

fn map(container_id: u32, host_id: u32, length: u32) -> cri::IdMapping {
    cri::IdMapping {
        host_id,
        container_id,
        length,
    }
}

fn userns(
    mode: cri::NamespaceMode,
    uids: Vec<cri::IdMapping>,
    gids: Vec<cri::IdMapping>,
) -> cri::UserNamespace {
    cri::UserNamespace {
        mode: mode as i32,
        uids,
        gids,
    }
}

fn namespaces(u: &cri::UserNamespace) -> cri::NamespaceOption {
    cri::NamespaceOption {
        userns_options: Some(u.clone()),
        ..Default::default()
    }
}

fn pod_with(
    name: &str,
    log_dir: &std::path::Path,
    u: &cri::UserNamespace,
) -> cri::PodSandboxConfig {
    let mut cfg = pod_config(name, log_dir);
    cfg.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(namespaces(u)),
            ..Default::default()
        }),
        ..Default::default()
    });
    cfg
}

/// A container config carrying the pod's user namespace options, as the kubelet sends.
fn container_with(
    name: &str,
    image: &str,
    cmd: &[&str],
    u: Option<&cri::UserNamespace>,
) -> cri::ContainerConfig {
    let mut cfg = container_config(name, image, cmd);
    if let Some(u) = u {
        cfg.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(namespaces(u)),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    cfg
}

/// The id-map lines a container logged, each as its three numbers.
fn logged_maps(log: &std::path::Path) -> Vec<Vec<u64>> {
    read_log(log)
        .into_iter()
        .map(|(_, _, m)| {
            m.split_whitespace()
                .map(|n| n.parse().expect("a number"))
                .collect()
        })
        .collect()
}

async fn exec_out(c: &mut CriClient, id: &str, cmd: &[&str]) -> String {
    let r = exec(c, id, cmd, 30).await.expect("ExecSync");
    assert_eq!(
        r.exit_code,
        0,
        "{cmd:?}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    String::from_utf8_lossy(&r.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_user_namespaces() {
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    use cri::NamespaceMode::{Container, Node, Pod, Target};

    // What cannot be honoured is refused before any VM starts.
    let ok = || vec![map(0, 1000, 100000)];
    let refused = [
        (
            "two uid ranges",
            userns(Pod, vec![map(0, 1000, 10), map(10, 5000, 10)], ok()),
        ),
        (
            "two gid ranges",
            userns(Pod, ok(), vec![map(0, 1000, 10), map(10, 5000, 10)]),
        ),
        (
            "root unmapped",
            userns(Pod, vec![map(1, 1000, 100000)], ok()),
        ),
        ("mode CONTAINER", userns(Container, ok(), ok())),
        ("mode TARGET", userns(Target, ok(), ok())),
        ("no mappings", userns(Pod, vec![], vec![])),
        ("no gids", userns(Pod, ok(), vec![])),
        ("empty range", userns(Pod, vec![map(0, 1000, 0)], ok())),
        (
            "overflow",
            userns(Pod, vec![map(0, u32::MAX - 5, 100)], ok()),
        ),
        ("NODE with mappings", userns(Node, ok(), ok())),
    ];
    let logs = d.dir().join("logs");
    for (what, u) in &refused {
        let e = run_pod(&mut c, &pod_with("bad", &logs, u), "")
            .await
            .expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains("user namespace"), "{what}: {e:?}");
    }
    let mut host_pid = pod_with("bad", &logs, &userns(Pod, ok(), ok()));
    if let Some(ns) = host_pid
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.pid = Node as i32;
    }
    let e = run_pod(&mut c, &host_pid, "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(pods(&mut c).await.is_empty(), "a refused pod was kept");
    assert_no_leaks(&d);

    // POD: one namespace for the pod, with its maps (gids differ from uids so a
    // mix-up shows).
    let pod_ns = userns(Pod, vec![map(0, 1000, 100000)], vec![map(0, 2000, 65536)]);
    let pod_logs = logs.join("userns-pod");
    let pod_cfg = pod_with("userns-pod", &pod_logs, &pod_ns);
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");
    let cat = container_with(
        "maps",
        &image,
        &["cat", "/proc/self/uid_map", "/proc/self/gid_map"],
        Some(&pod_ns),
    );
    let maps = match create(&mut c, &pod, &pod_cfg, cat).await {
        Ok(id) => id,
        // The container's setup errors go to its stdio: show them.
        Err(e) => panic!(
            "CreateContainer: {e:?}\n{:?}",
            read_log(&pod_logs.join("maps/0.log"))
        ),
    };
    start(&mut c, &maps).await;
    let st = wait_exited(&mut c, &maps, Duration::from_secs(60)).await;
    assert_eq!(st.exit_code, 0, "{st:?}");
    assert_eq!(
        logged_maps(&pod_logs.join("maps/0.log")),
        vec![vec![0, 1000, 100000], vec![0, 2000, 65536]]
    );
    // Each main process logs its user namespace; execs must be in the same one.
    let sleeper = |name: &str| {
        container_with(
            name,
            &image,
            &["sh", "-c", "readlink /proc/self/ns/user; exec sleep 3600"],
            Some(&pod_ns),
        )
    };
    let a = run_container(&mut c, &pod, &pod_cfg, sleeper("a")).await;
    let b = run_container(&mut c, &pod, &pod_cfg, sleeper("b")).await;
    let logged_ns = |name: &str| {
        let log = pod_logs.join(format!("{name}/0.log"));
        async move {
            for _ in 0..150 {
                if let Some((_, _, m)) = read_log(&log).into_iter().next() {
                    return m;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            panic!("{} logged nothing", log.display());
        }
    };
    let ns_a = logged_ns("a").await;
    assert!(ns_a.starts_with("user:["), "{ns_a}");
    assert_eq!(ns_a, logged_ns("b").await, "one user namespace per pod");
    assert_eq!(
        exec_out(&mut c, &b, &["readlink", "/proc/self/ns/user"]).await,
        ns_a,
        "an exec joins the pod's user namespace"
    );
    let exec_maps = exec_out(
        &mut c,
        &a,
        &["cat", "/proc/self/uid_map", "/proc/self/gid_map"],
    )
    .await;
    let exec_maps: Vec<Vec<u64>> = exec_maps
        .lines()
        .map(|l| l.split_whitespace().map(|n| n.parse().unwrap()).collect())
        .collect();
    assert_eq!(exec_maps, vec![vec![0, 1000, 100000], vec![0, 2000, 65536]]);
    // An exec takes on the container's identity inside the namespace: user,
    // groups, capabilities, no_new_privs and seccomp filter, as its main process.
    const STATUS: &str = "^(Uid|Gid|Groups|CapEff|CapPrm|CapBnd|Seccomp|NoNewPrivs):";
    let mut confined = container_with(
        "confined",
        &image,
        &[
            "sh",
            "-c",
            &format!("grep -E '{STATUS}' /proc/self/status; exec sleep 3600"),
        ],
        Some(&pod_ns),
    );
    if let Some(sc) = confined
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        sc.run_as_user = Some(cri::Int64Value { value: 1000 });
        sc.no_new_privs = true;
        sc.seccomp = Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        });
    }
    let confined = run_container(&mut c, &pod, &pod_cfg, confined).await;
    let norm = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    let main_status: Vec<String> = {
        let log = pod_logs.join("confined/0.log");
        let mut lines = Vec::new();
        for _ in 0..150 {
            lines = read_log(&log)
                .into_iter()
                .map(|(_, _, m)| norm(&m))
                .collect();
            if lines.len() >= 8 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        lines
    };
    assert!(
        main_status.contains(&"Uid: 1000 1000 1000 1000".to_string()),
        "{main_status:?}"
    );
    assert!(
        main_status.contains(&"Seccomp: 2".to_string()),
        "{main_status:?}"
    );
    let exec_status: Vec<String> = exec_out(
        &mut c,
        &confined,
        &["grep", "-E", STATUS, "/proc/self/status"],
    )
    .await
    .lines()
    .map(norm)
    .collect();
    assert_eq!(exec_status, main_status);
    // Root inside; the pod's PID and IPC namespaces are shared and usable.
    assert_eq!(exec_out(&mut c, &a, &["id", "-u"]).await, "0");
    let ipc_a = exec_out(&mut c, &a, &["readlink", "/proc/self/ns/ipc"]).await;
    assert_eq!(
        ipc_a,
        exec_out(&mut c, &b, &["readlink", "/proc/self/ns/ipc"]).await
    );
    let ps = exec_out(&mut c, &a, &["ps", "-o", "args"]).await;
    assert_eq!(ps.matches("sleep 3600").count(), 3, "{ps}");
    // /sys is the VM's, read-only.
    assert!(!exec_out(&mut c, &a, &["ls", "/sys/class/net"])
        .await
        .is_empty());
    let sys = exec_out(&mut c, &a, &["grep", " /sys sysfs ", "/proc/self/mounts"]).await;
    assert!(sys.contains(" ro,"), "{sys}");
    // Image files owned by the VM's root are unmapped in the namespace: nobody
    // (no id-mapped rootfs on this kernel, see docs/design.md).
    assert_eq!(
        exec_out(&mut c, &a, &["stat", "-c", "%u:%g", "/bin/busybox"]).await,
        "65534:65534"
    );
    // A container must carry its pod's options.
    for (what, u) in [
        ("none", None),
        ("NODE", Some(userns(Node, vec![], vec![]))),
        (
            "other maps",
            Some(userns(
                Pod,
                vec![map(0, 5000, 100000)],
                vec![map(0, 2000, 65536)],
            )),
        ),
    ] {
        let cfg = container_with("mismatch", &image, &["true"], u.as_ref());
        let e = create(&mut c, &pod, &pod_cfg, cfg).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
    }
    remove_pod(&mut c, &pod).await;

    // NODE: the VM's own ids, no new namespace.
    let node_ns = userns(Node, vec![], vec![]);
    let node_logs = logs.join("userns-node");
    let node_cfg = pod_with("userns-node", &node_logs, &node_ns);
    let node = run_pod(&mut c, &node_cfg, "").await.expect("RunPodSandbox");
    let cat = container_with(
        "maps",
        &image,
        &["cat", "/proc/self/uid_map"],
        Some(&node_ns),
    );
    let maps = run_container(&mut c, &node, &node_cfg, cat).await;
    let st = wait_exited(&mut c, &maps, Duration::from_secs(60)).await;
    assert_eq!(st.exit_code, 0, "{st:?}");
    assert_eq!(
        logged_maps(&node_logs.join("maps/0.log")),
        vec![vec![0, 0, 4294967295]]
    );
    remove_pod(&mut c, &node).await;
    assert!(pods(&mut c).await.is_empty());
    assert_no_leaks(&d);
}
