//! Host files vesseld creates are private, and CRI fields naming host paths stay
//! where they belong, end to end with one pod VM: modes of everything under root
//! and run_root after a pull and a pod, a layer's setuid file and device node out of
//! other users' reach, log_path escapes and unusable seccomp profiles refused.
//! Volumes hold no copy in the host's mount namespace: the host can unmount and
//! remove what is below a volume's source while the container is there.

mod runtime_common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use runtime_common::*;
use tonic::Code;
use vessel_tests::testimages::{self, Layer, LayerCompression, TarBuilder};

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Every path under `dir`, not following symlinks and not descending into mount
/// points (the pod share dir's bind mounts of layers and rootfs hold image content,
/// whose modes are the image's).
fn walk(dir: &Path, mounts: &[PathBuf], out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        out.push(p.clone());
        if let Ok(m) = std::fs::symlink_metadata(&p) {
            if m.is_dir() && !mounts.contains(&p) {
                walk(&p, mounts, out);
            }
        }
    }
}

/// `stat` as uid/gid 65534; Err(stderr) when refused.
fn stat_as_nobody(path: &Path) -> Result<(), String> {
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "stat",
            "--",
        ])
        .arg(path)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn host_files_are_private_and_cri_paths_are_checked() {
    let Some((reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());

    // An image with a setuid-root file and a device node.
    let mut b = TarBuilder::new();
    b.dir("bin/", 0o755).unwrap();
    b.file("bin/vessel-suid", b"#!/bin/sh\n", 0o4755).unwrap();
    let mut tar = b.finish().unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_path("vessel-devnode").unwrap();
    h.set_entry_type(tar::EntryType::Char);
    h.set_size(0);
    h.set_mode(0o666);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_cksum();
    let end = tar.len() - 1024;
    tar.splice(end..end, h.as_bytes().iter().copied());
    let layer = Layer::new(tar, LayerCompression::Gzip).unwrap();
    let suid = testimages::push_layers(&reg, "runtime/suid:1", vec![layer])
        .await
        .unwrap();
    c.pull(&suid.reference).await.unwrap();

    let logs = d.dir().join("logs/files");
    let pod_cfg = pod_config("files", &logs);
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");

    // log_path must stay under log_directory: refused, nothing created.
    let outside = d.dir().join("escaped.log");
    for bad in [
        "../escaped.log".to_string(),
        "c/../../escaped.log".to_string(),
        outside.display().to_string(),
    ] {
        let mut cfg = container_config("bad", &image, &["true"]);
        cfg.log_path = bad.clone();
        let e = create(&mut c, &pod, &pod_cfg, cfg).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {e:?}");
        assert!(e.message().contains("log_directory"), "{bad}: {e:?}");
    }
    // A seccomp profile that is a FIFO (would block a reader) or a device.
    let fifo = d.dir().join("profile.fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for (path, why) in [(fifo.as_path(), "FIFO"), (Path::new("/dev/zero"), "device")] {
        let mut cfg = container_config("badsec", &image, &["true"]);
        cfg.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                seccomp: Some(cri::SecurityProfile {
                    profile_type: cri::security_profile::ProfileType::Localhost as i32,
                    localhost_ref: path.display().to_string(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        let t = Instant::now();
        let e = create(&mut c, &pod, &pod_cfg, cfg).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(why), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    let listed = list_containers(&mut c).await;
    assert!(listed.is_empty(), "{listed:?}");
    assert!(!outside.exists());
    assert!(!logs.join("c").exists());

    // A good container: its log is 0640.
    let id = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("ok", &image, &["echo", "hi"]),
    )
    .await;
    let s = wait_exited(&mut c, &id, Duration::from_secs(60)).await;
    assert_eq!(s.exit_code, 0);
    assert_eq!(mode(&logs.join("ok/0.log")), 0o640);

    // Modes under root and run_root, with the pod running.
    let (root, run) = (d.root().to_owned(), d.run_root().to_owned());
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("state.redb")), 0o600);
    assert_eq!(mode(&root.join("content")), 0o700);
    assert_eq!(mode(&root.join("snapshots")), 0o700);
    assert_eq!(mode(&run), 0o711);
    assert_eq!(mode(&run.join("vm")), 0o711);
    assert_eq!(mode(&run.join("pods")), 0o700);
    assert_eq!(mode(&run.join("vesseld.lock")), 0o600);
    let mut paths = Vec::new();
    let mounts: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect();
    walk(&run, &mounts, &mut paths);
    for p in &paths {
        let m = std::fs::symlink_metadata(p).unwrap();
        if m.file_type().is_symlink() {
            continue;
        }
        let bits = m.permissions().mode() & 0o7777;
        assert_eq!(bits & 0o002, 0, "world-writable: {} {bits:o}", p.display());
        assert_eq!(bits & 0o6000, 0, "setuid/setgid: {} {bits:o}", p.display());
    }
    eprintln!("checked {} paths under run_root", paths.len());

    // Other users reach nothing under root, even with every dir above it opened up:
    // not the layer's setuid file, not its device node.
    let snaps: Vec<PathBuf> = std::fs::read_dir(root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let su = snaps
        .iter()
        .map(|s| s.join("bin/vessel-suid"))
        .find(|p| p.exists())
        .expect("bin/su unpacked");
    let dev = snaps
        .iter()
        .map(|s| s.join("vessel-devnode"))
        .find(|p| p.exists())
        .expect("dev-null unpacked");
    assert_eq!(mode(&su), 0o4755);
    assert!(std::fs::symlink_metadata(&dev)
        .unwrap()
        .file_type()
        .is_char_device());
    let mut p = d.dir().to_owned();
    while p != Path::new("/") {
        if mode(&p) & 0o111 != 0o111 {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode(&p) | 0o111))
                .unwrap();
        }
        p = p.parent().unwrap().to_owned();
    }
    stat_as_nobody(d.dir()).expect("setpriv works and the test dir is traversable");
    for path in [&root.join("state.redb"), &su, &dev] {
        let err = stat_as_nobody(path).expect_err("reachable by nobody");
        assert!(
            err.contains("Permission denied"),
            "{}: {err}",
            path.display()
        );
    }

    c.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    assert_no_leaks(&d);
}

/// Lines of the host's mountinfo that name `path`.
fn host_mounts_naming(path: &Path) -> Vec<String> {
    let p = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&p))
        .map(str::to_owned)
        .collect()
}

/// critest's read-only volume specs, and its rslave propagation spec: a hostPath
/// with a tmpfs below it, bound read-only and recursively read-only. After the
/// containers ran, the host unmounts the tmpfs and removes the dirs (EBUSY while a
/// copy of the volume lived in the host's namespace), then RemovePodSandbox
/// leaves nothing mounted.
#[tokio::test(flavor = "multi_thread")]
async fn volumes_do_not_pin_host_mounts() {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let Some((_reg, d, mut c, image)) = setup().await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let host = d.dir().join("hostpath");
    let sub = host.join("tmpfs");
    std::fs::create_dir_all(&sub).unwrap();
    mount(
        Some("none"),
        &sub,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    std::fs::write(sub.join("f"), "sub").unwrap();
    // A shared source for HOST_TO_CONTAINER, as critest makes it.
    let prop = d.dir().join("prop");
    std::fs::create_dir_all(prop.join("later")).unwrap();
    mount(
        Some(&prop),
        &prop,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .unwrap();
    mount(
        None::<&str>,
        &prop,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .unwrap();

    let logs = d.dir().join("logs/vols");
    let pod_cfg = pod_config("vols", &logs);
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");
    let volume = |readonly, recursive_read_only| {
        vec![cri::Mount {
            container_path: "/mnt".into(),
            host_path: host.display().to_string(),
            readonly,
            recursive_read_only,
            ..Default::default()
        }]
    };
    // Read-only: the volume's own files take no writes, the tmpfs below does.
    let mut ro = container_config(
        "ro",
        &image,
        &[
            "sh",
            "-c",
            "touch /mnt/tmpfs/ro && ! touch /mnt/top && cat /mnt/tmpfs/f",
        ],
    );
    ro.mounts = volume(true, false);
    // Recursive read-only: neither does.
    let mut rro = container_config(
        "rro",
        &image,
        &[
            "sh",
            "-c",
            "! touch /mnt/tmpfs/rro && ! touch /mnt/top && cat /mnt/tmpfs/f",
        ],
    );
    rro.mounts = volume(true, true);
    let mut follows = container_config("follows", &image, &["sleep", "300"]);
    follows.mounts = vec![cri::Mount {
        container_path: "/prop".into(),
        host_path: prop.display().to_string(),
        propagation: cri::MountPropagation::PropagationHostToContainer as i32,
        ..Default::default()
    }];
    let ro = run_container(&mut c, &pod, &pod_cfg, ro).await;
    let rro = run_container(&mut c, &pod, &pod_cfg, rro).await;
    let follows = run_container(&mut c, &pod, &pod_cfg, follows).await;
    for id in [&ro, &rro] {
        let s = wait_exited(&mut c, id, Duration::from_secs(60)).await;
        assert_eq!(s.exit_code, 0, "{id}: {s:?}");
    }
    assert!(sub.join("ro").exists());
    assert!(!sub.join("rro").exists() && !host.join("top").exists());
    // The host's namespace holds its own tmpfs and no copy of either volume.
    assert_eq!(
        host_mounts_naming(&host).len(),
        1,
        "{:?}",
        host_mounts_naming(&host)
    );

    // A mount made on the host after the start reaches the HOST_TO_CONTAINER volume.
    let later = prop.join("later");
    mount(
        Some("none"),
        &later,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    std::fs::write(later.join("flag"), "new").unwrap();
    let r = exec(&mut c, &follows, &["cat", "/prop/later/flag"], 10)
        .await
        .expect("ExecSync");
    assert_eq!(
        (r.exit_code, r.stdout.as_slice()),
        (0, &b"new"[..]),
        "{r:?}"
    );

    // With the containers still there: unmount (not lazily) and remove.
    umount2(&sub, MntFlags::empty()).expect("unmount the tmpfs below a volume");
    std::fs::remove_dir(&sub).expect("remove the tmpfs dir");
    std::fs::remove_dir_all(&host).expect("remove the hostPath");
    umount2(&later, MntFlags::MNT_DETACH).unwrap();
    umount2(&prop, MntFlags::MNT_DETACH).unwrap();
    std::fs::remove_dir_all(&prop).expect("remove the propagation source");

    for id in [&ro, &rro] {
        c.runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.to_string(),
            })
            .await
            .expect("RemoveContainer");
        assert!(!virtiofsd_mountinfo(&d).contains(&format!("/ctr/{id}/")));
    }
    assert!(virtiofsd_mountinfo(&d).contains(&format!(" /ctr/{follows}/0 ")));
    remove_pod(&mut c, &pod).await;
    assert_no_leaks(&d);
}
