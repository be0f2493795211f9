//! Users, seccomp, stop signals, restarts and ExecSync results end to end, all in
//! one pod VM: ImageStatus's user fields (what the kubelet's runAsNonRoot check
//! reads), run_as_user/run_as_group/supplemental groups and run_as_username against
//! the image's /etc/passwd, a Localhost seccomp profile, the image's StopSignal,
//! a container restarted with a new attempt, and ExecSync exit codes and timeout.
//! Supplemental groups policy: Merge adds the image's /etc/group memberships of the
//! user, Strict only the groups the security context names.

mod runtime_common;

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use tonic::Code;
use vessel_tests::cri::CriClient;
use vessel_tests::testimages;

async fn image_user(c: &mut CriClient, image: &str) -> (Option<i64>, String) {
    let (img, _) = c.image_status(image, false).await.expect("ImageStatus");
    let img = img.expect("image present");
    (img.uid.map(|v| v.value), img.username)
}

/// Waits until the container's log holds a line `msg` and returns every message.
async fn wait_log(log: &std::path::Path, msg: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines: Vec<String> = read_log(log).into_iter().map(|(_, _, m)| m).collect();
        if lines.iter().any(|l| l == msg) {
            return lines;
        }
        assert!(Instant::now() < deadline, "no {msg:?} in {lines:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn with_sc(
    mut cfg: cri::ContainerConfig,
    sc: cri::LinuxContainerSecurityContext,
) -> cri::ContainerConfig {
    cfg.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(sc),
        ..Default::default()
    });
    cfg
}

#[tokio::test(flavor = "multi_thread")]
async fn users_seccomp_stop_signal_restart_and_exec() {
    let Some((reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());

    // ImageStatus reports the image USER as the kubelet expects (containerd's
    // rule): a numeric user as uid, a name as username, nothing for no USER.
    let named = testimages::push_with_user(&reg, "runtime/named:1", "vessel:vessel")
        .await
        .unwrap()
        .reference;
    let numeric = testimages::push_with_user(&reg, "runtime/numeric:1", "1000:1000")
        .await
        .unwrap()
        .reference;
    let stopsig = testimages::push_with_stop_signal(&reg, "runtime/stopsig:1", "SIGUSR1")
        .await
        .unwrap()
        .reference;
    for img in [&named, &numeric, &stopsig] {
        c.pull(img).await.expect("pull");
    }
    assert_eq!(image_user(&mut c, &image).await, (None, String::new()));
    assert_eq!(image_user(&mut c, &named).await, (None, "vessel".into()));
    assert_eq!(
        image_user(&mut c, &numeric).await,
        (Some(1000), String::new())
    );

    let logs = d.dir().join("logs/sec2");
    let pod_cfg = pod_config("sec2", &logs);
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");

    // run_as_user + run_as_group + supplemental groups.
    let ids = with_sc(
        container_config("ids", &image, &["sh", "-c", "id -u; id -g; id -G"]),
        cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 1234 }),
            run_as_group: Some(cri::Int64Value { value: 2345 }),
            supplemental_groups: vec![3456, 1000],
            ..Default::default()
        },
    );
    // run_as_username resolved in the image's /etc/passwd and /etc/group.
    let by_name = with_sc(
        container_config("byname", &image, &["sh", "-c", "id"]),
        cri::LinuxContainerSecurityContext {
            run_as_username: "vessel".into(),
            ..Default::default()
        },
    );
    // The image's USER (a name) when the security context sets none.
    let image_named = container_config("imageuser", &named, &["sh", "-c", "id -un"]);
    // A Localhost seccomp profile that denies mkdir with EPERM and allows the rest
    // (without no_new_privs: the filter must be loaded before capabilities drop).
    let profile = d.dir().join("deny-mkdir.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
    )
    .unwrap();
    let seccomp = with_sc(
        container_config(
            "seccomp",
            &image,
            &[
                "sh",
                "-c",
                "mkdir /tmp/d; echo mkdir=$?; touch /tmp/f && echo touch=0",
            ],
        ),
        cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Localhost as i32,
                localhost_ref: profile.display().to_string(),
            }),
            ..Default::default()
        },
    );
    let mut started = Vec::new();
    for cfg in [ids, by_name, image_named, seccomp] {
        let name = cfg.metadata.as_ref().unwrap().name.clone();
        let id = create(&mut c, &pod, &pod_cfg, cfg)
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e:?}"));
        start(&mut c, &id).await;
        started.push((name, id));
    }
    for (name, id) in &started {
        let s = wait_exited(&mut c, id, Duration::from_secs(60)).await;
        assert_eq!(s.exit_code, 0, "{name}: {s:?}");
    }
    let out = |name: &str| -> Vec<String> {
        read_log(&logs.join(format!("{name}/0.log")))
            .into_iter()
            .map(|(_, _, m)| m)
            .collect()
    };
    let ids = out("ids");
    assert_eq!(ids[..2], ["1234", "2345"], "{ids:?}");
    let groups: Vec<&str> = ids[2].split(' ').collect();
    assert!(
        groups.contains(&"2345") && groups.contains(&"3456") && groups.contains(&"1000"),
        "{ids:?}"
    );
    let by_name = out("byname");
    assert!(
        by_name[0].starts_with("uid=1000(vessel) gid=1000(vessel)"),
        "{by_name:?}"
    );
    assert_eq!(out("imageuser"), ["vessel"]);
    let seccomp = out("seccomp");
    assert!(
        seccomp
            .iter()
            .any(|l| l.contains("Operation not permitted")),
        "{seccomp:?}"
    );
    assert!(seccomp.contains(&"mkdir=1".to_string()), "{seccomp:?}");
    assert!(seccomp.contains(&"touch=0".to_string()), "{seccomp:?}");

    // The image's StopSignal (SIGUSR1) is what StopContainer sends: the trap exits
    // 42 at once; SIGTERM would be ignored by PID 1 and end in SIGKILL (137).
    let stop = create(
        &mut c,
        &pod,
        &pod_cfg,
        container_config(
            "stopsig",
            &stopsig,
            &[
                "sh",
                "-c",
                "trap 'exit 42' USR1; echo ready; while :; do sleep 0.1; done",
            ],
        ),
    )
    .await
    .expect("CreateContainer stopsig");
    start(&mut c, &stop).await;
    wait_log(&logs.join("stopsig/0.log"), "ready").await;
    let t = Instant::now();
    c.runtime
        .stop_container(cri::StopContainerRequest {
            container_id: stop.clone(),
            timeout: 20,
        })
        .await
        .expect("StopContainer");
    let s = status(&mut c, &stop).await;
    assert_eq!(s.exit_code, 42, "{s:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    // A restart as the kubelet does it: the exited attempt 0 stays, attempt 1 of
    // the same name is created next to it; attempt 0 again is refused, naming it.
    let mut first = container_config("restart", &image, &["sh", "-c", "echo first; exit 1"]);
    let r0 = create(&mut c, &pod, &pod_cfg, first.clone()).await.unwrap();
    start(&mut c, &r0).await;
    assert_eq!(
        wait_exited(&mut c, &r0, Duration::from_secs(60))
            .await
            .exit_code,
        1
    );
    let e = create(&mut c, &pod, &pod_cfg, first.clone())
        .await
        .unwrap_err();
    assert!(
        e.message().contains(&r0),
        "duplicate names the holder: {e:?}"
    );
    first.metadata.as_mut().unwrap().attempt = 1;
    first.command = vec!["sh".into(), "-c".into(), "echo second".into()];
    first.log_path = "restart/1.log".into();
    let r1 = create(&mut c, &pod, &pod_cfg, first)
        .await
        .expect("attempt 1");
    assert_ne!(r0, r1);
    start(&mut c, &r1).await;
    let s = wait_exited(&mut c, &r1, Duration::from_secs(60)).await;
    assert_eq!((s.exit_code, s.metadata.unwrap().attempt), (0, 1));
    assert_eq!(
        wait_log(&logs.join("restart/1.log"), "second").await,
        ["second"]
    );
    assert_eq!(status(&mut c, &r0).await.exit_code, 1);

    // ExecSync: exit codes come back as results, not errors; a timeout kills the
    // command and answers DeadlineExceeded, which the kubelet turns into its
    // probe timeout (containerd does the same).
    let long = create(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("long", &image, &["sh", "-c", LONG_RUNNER]),
    )
    .await
    .unwrap();
    start(&mut c, &long).await;
    for (cmd, code) in [
        ("exit 0", 0),
        ("exit 5", 5),
        ("false", 1),
        ("kill -9 $$", 137),
    ] {
        let r = exec(&mut c, &long, &["sh", "-c", cmd], 30)
            .await
            .unwrap_or_else(|e| panic!("{cmd}: {e:?}"));
        assert_eq!(r.exit_code, code, "{cmd}: {r:?}");
    }
    let t = Instant::now();
    let e = exec(&mut c, &long, &["sleep", "30"], 2).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(
        t.elapsed() >= Duration::from_secs(2) && t.elapsed() < Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = exec(&mut c, &long, &["ps", "-o", "args"], 30)
            .await
            .unwrap();
        let ps = String::from_utf8_lossy(&r.stdout).into_owned();
        if !ps.contains("sleep 30") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the timed-out exec still runs:\n{ps}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("RemovePodSandbox");
    assert_no_leaks(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn supplemental_groups_policy_merge_and_strict() {
    let Some((reg, d, mut c, _)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    // Busybox whose /etc/group makes user vessel (1000) a member of group 4000.
    let mut b = testimages::TarBuilder::new();
    b.dir("etc/", 0o755)
        .unwrap()
        .file(
            "etc/group",
            b"root:x:0:\nvessel:x:1000:\nimagegrp:x:4000:vessel\nnogroup:x:65534:\n",
            0o644,
        )
        .unwrap();
    let groups_layer =
        testimages::Layer::new(b.finish().unwrap(), testimages::LayerCompression::Gzip).unwrap();
    let base = testimages::busybox_layer(testimages::LayerCompression::Gzip).unwrap();
    let image = testimages::push_layers(&reg, "runtime/groups:1", vec![base, groups_layer])
        .await
        .unwrap()
        .reference;
    c.pull(&image).await.expect("pull");

    let logs = d.dir().join("logs/groups");
    let pod_cfg = pod_config("groups", &logs);
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");
    let policy = |name: &str, p: cri::SupplementalGroupsPolicy| {
        with_sc(
            container_config(name, &image, &["id", "-G"]),
            cri::LinuxContainerSecurityContext {
                run_as_username: "vessel".into(),
                supplemental_groups: vec![5000],
                supplemental_groups_policy: p as i32,
                ..Default::default()
            },
        )
    };
    let mut groups = Vec::new();
    for (name, p) in [
        ("merge", cri::SupplementalGroupsPolicy::Merge),
        ("strict", cri::SupplementalGroupsPolicy::Strict),
    ] {
        let id = run_container(&mut c, &pod, &pod_cfg, policy(name, p)).await;
        let s = wait_exited(&mut c, &id, Duration::from_secs(60)).await;
        assert_eq!(s.exit_code, 0, "{name}: {s:?}");
        let out: Vec<String> = read_log(&logs.join(format!("{name}/0.log")))
            .into_iter()
            .map(|(_, _, m)| m)
            .collect();
        let mut ids: Vec<u32> = out
            .concat()
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        ids.sort_unstable();
        groups.push(ids);
    }
    // The primary group, the image's membership (Merge only), the named group.
    assert_eq!(groups[0], [1000, 4000, 5000], "merge");
    assert_eq!(groups[1], [1000, 5000], "strict");
    remove_pod(&mut c, &pod).await;
    assert_no_leaks(&d);
}
