//! ImageService through vesseld's socket against a real registry on 127.0.0.1.

use std::path::Path;

use k8s_cri::v1 as cri;
use tonic::Code;
use vessel_tests::cri::CriClient;
use vessel_tests::daemon::TestDaemon;
use vessel_tests::registry::TestRegistry;
use vessel_tests::testimages::{self, HostileKind};

/// A registry and a vesseld that reaches it over plain HTTP under its own name.
async fn setup() -> (TestRegistry, TestDaemon, CriClient) {
    let reg = TestRegistry::start().unwrap();
    let d = TestDaemon::start().unwrap();
    d.write_hosts_toml(&reg.addr(), &reg.url()).unwrap();
    let c = d.client().await.unwrap();
    (reg, d, c)
}

fn dir_entries(p: &Path) -> Vec<String> {
    match std::fs::read_dir(p) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_list_status_remove_by_id_tag_and_digest() {
    let (reg, mut d, mut c) = setup().await;
    let img = testimages::push_busybox(&reg, "tools/busybox:1")
        .await
        .unwrap();
    let again = testimages::push_busybox(&reg, "tools/busybox:2")
        .await
        .unwrap();
    assert_eq!(img.manifest_digest, again.manifest_digest);

    let id = c.pull(&img.reference).await.unwrap();
    assert_eq!(id, img.config_digest);
    let repo_digest = img.digest_reference();

    let images = c.list_images(None).await.unwrap();
    assert_eq!(images.len(), 1, "{images:?}");
    let i = &images[0];
    assert_eq!(i.id, id);
    assert_eq!(i.repo_tags, vec![img.reference.clone()]);
    assert_eq!(i.repo_digests, vec![repo_digest.clone()]);
    assert!(
        i.size > 100_000,
        "busybox layer is ~1 MiB compressed: {}",
        i.size
    );
    assert!(i.uid.is_none() && i.username.is_empty());

    // Every way of naming the image finds it, in ListImages filters and ImageStatus.
    let short_id = id.trim_start_matches("sha256:")[..12].to_owned();
    for name in [&id, &short_id, &img.reference, &repo_digest] {
        let found = c.list_images(Some(name)).await.unwrap();
        assert_eq!(found.len(), 1, "filter {name}");
        let (status, _) = c.image_status(name, false).await.unwrap();
        assert_eq!(status.unwrap().id, id, "status {name}");
    }
    assert!(c
        .list_images(Some(&format!("{}/nothing:here", reg.addr())))
        .await
        .unwrap()
        .is_empty());

    // Verbose status carries the image config as JSON.
    let (_, info) = c.image_status(&img.reference, true).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&info["info"]).unwrap();
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["imageSpec"]["config"]["Cmd"][0], "sh");
    assert_eq!(v["imageSpec"]["architecture"], "amd64");

    // A second tag of the same image joins the same id.
    assert_eq!(c.pull(&again.reference).await.unwrap(), id);
    let (s, _) = c.image_status(&id, false).await.unwrap();
    let mut tags = s.unwrap().repo_tags;
    tags.sort();
    assert_eq!(tags, vec![img.reference.clone(), again.reference.clone()]);

    // State survives a restart.
    d.restart().unwrap();
    let mut c = d.client().await.unwrap();
    assert_eq!(c.list_images(None).await.unwrap().len(), 1);

    // Removing one of two tags only drops that tag.
    c.remove_image(&img.reference).await.unwrap();
    let (s, _) = c.image_status(&id, false).await.unwrap();
    assert_eq!(s.unwrap().repo_tags, vec![again.reference.clone()]);
    let (gone, info) = c.image_status(&img.reference, true).await.unwrap();
    assert!(gone.is_none() && info.is_empty());

    // Removing by digest removes the image, and its snapshots with it.
    assert!(!dir_entries(&d.root().join("snapshots")).is_empty());
    c.remove_image(&repo_digest).await.unwrap();
    assert!(c.list_images(None).await.unwrap().is_empty());
    assert!(dir_entries(&d.root().join("snapshots")).is_empty());
    // RemoveImage is idempotent.
    c.remove_image(&repo_digest).await.unwrap();
    c.remove_image(&id).await.unwrap();

    // Pull again, remove by id.
    assert_eq!(c.pull(&again.reference).await.unwrap(), id);
    c.remove_image(&id).await.unwrap();
    assert!(c.list_images(None).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn short_name_pull_through_hosts_toml_mirror() {
    let reg = TestRegistry::start().unwrap();
    let d = TestDaemon::start().unwrap();
    let img = testimages::push_busybox(&reg, "library/busybox:latest")
        .await
        .unwrap();
    // docker.io is served by the local mirror; the upstream is a closed local port so
    // nothing leaves the machine even if the mirror failed.
    let dir = d.certs_dir().join("docker.io");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"http://127.0.0.1:1\"\n\n[host.\"{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
            reg.url()
        ),
    )
    .unwrap();
    let mut c = d.client().await.unwrap();
    let id = c.pull("busybox").await.unwrap();
    assert_eq!(id, img.config_digest);
    let (s, _) = c.image_status("busybox", false).await.unwrap();
    let s = s.unwrap();
    assert_eq!(s.repo_tags, vec!["docker.io/library/busybox:latest"]);
    assert_eq!(
        s.repo_digests,
        vec![format!("docker.io/library/busybox@{}", img.manifest_digest)]
    );
    for name in [
        "busybox:latest",
        "library/busybox",
        "docker.io/library/busybox:latest",
    ] {
        assert_eq!(c.list_images(Some(name)).await.unwrap().len(), 1, "{name}");
    }
}

/// An HTTPS registry whose certificate comes from a private CA: refused while the CA
/// is unknown; trusted through a `*.crt` in the registry's certs dir (no hosts.toml),
/// through hosts.toml's `ca`, or not checked with `skip_verify`. hosts.toml changes
/// apply to the next pull without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn https_registry_with_a_private_ca() {
    let plain = TestRegistry::start().unwrap();
    let img = testimages::push_busybox(&plain, "tls/busybox:1")
        .await
        .unwrap();
    let tls = TestRegistry::start_tls_view_of(&plain).unwrap();
    let ca = tls.ca_cert().unwrap();
    let d = TestDaemon::start().unwrap();
    let mut c = d.client().await.unwrap();
    let reference = format!("{}/tls/busybox:1", tls.addr());
    let dir = d.certs_dir().join(tls.addr());
    std::fs::create_dir_all(&dir).unwrap();
    let hosts = |extra: &str| {
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = {url:?}\n\n[host.{url:?}]\ncapabilities = [\"pull\", \"resolve\"]\n{extra}\n",
                url = tls.url()
            ),
        )
        .unwrap()
    };

    let e = c.pull(&reference).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "unknown CA: {e:?}");
    assert!(
        e.message().contains("certificate"),
        "names the cause: {e:?}"
    );
    assert!(c.list_images(None).await.unwrap().is_empty());

    std::fs::copy(&ca, dir.join("lab-ca.crt")).unwrap();
    assert_eq!(c.pull(&reference).await.unwrap(), img.config_digest);
    c.remove_image(&reference).await.unwrap();
    std::fs::remove_file(dir.join("lab-ca.crt")).unwrap();

    std::fs::copy(&ca, dir.join("private-ca.pem")).unwrap();
    hosts("ca = \"private-ca.pem\"");
    assert_eq!(c.pull(&reference).await.unwrap(), img.config_digest);
    c.remove_image(&reference).await.unwrap();

    std::fs::remove_file(dir.join("private-ca.pem")).unwrap();
    hosts("");
    let e = c.pull(&reference).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "CA gone again: {e:?}");
    hosts("skip_verify = true");
    assert_eq!(c.pull(&reference).await.unwrap(), img.config_digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn multiarch_zstd_and_user() {
    let (reg, _d, mut c) = setup().await;

    let multi = testimages::push_multiarch(&reg, "multi:1").await.unwrap();
    let id = c.pull(&multi.reference).await.unwrap();
    assert_eq!(id, multi.config_digest, "the linux/amd64 image is chosen");
    let (s, info) = c.image_status(&id, true).await.unwrap();
    assert_eq!(
        s.unwrap().repo_digests,
        vec![multi.digest_reference()],
        "the repo digest is the index's"
    );
    let v: serde_json::Value = serde_json::from_str(&info["info"]).unwrap();
    assert_eq!(v["imageSpec"]["architecture"], "amd64");

    let zstd = testimages::push_zstd(&reg, "zstd:1").await.unwrap();
    let id = c.pull(&zstd.reference).await.unwrap();
    assert_eq!(id, zstd.config_digest);
    assert!(c.image_status(&id, false).await.unwrap().0.unwrap().size > 0);

    for (tag, user, uid, username) in [
        ("numeric", "1000", Some(1000), ""),
        ("named", "vessel", None, "vessel"),
        ("pair", "1000:1000", Some(1000), ""),
        ("namedgroup", "vessel:users", None, "vessel"),
    ] {
        let img = testimages::push_with_user(&reg, &format!("user:{tag}"), user)
            .await
            .unwrap();
        c.pull(&img.reference).await.unwrap();
        let (s, _) = c.image_status(&img.reference, false).await.unwrap();
        let s = s.unwrap();
        assert_eq!(s.uid.map(|u| u.value), uid, "{user}");
        assert_eq!(s.username, username, "{user}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_layers_fail_and_leave_nothing() {
    let (reg, d, mut c) = setup().await;
    for kind in HostileKind::ALL {
        let img = testimages::push_hostile(&reg, &format!("hostile:{kind:?}").to_lowercase(), kind)
            .await
            .unwrap();
        let e = c.pull(&img.reference).await.unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "{kind:?}: {e:?}");
        assert!(e.message().contains("unsafe"), "{kind:?}: {}", e.message());
        if let Some(marker) = kind.host_marker() {
            assert!(!Path::new(marker).exists(), "{kind:?} wrote {marker}");
        }
        assert!(c.list_images(None).await.unwrap().is_empty(), "{kind:?}");
        assert!(
            dir_entries(&d.root().join("snapshots")).is_empty(),
            "{kind:?}: {:?}",
            dir_entries(&d.root().join("snapshots"))
        );
        let (s, _) = c.image_status(&img.reference, false).await.unwrap();
        assert!(s.is_none());
    }
    // The host's /etc/passwd is untouched by the hard-link attempt.
    assert!(std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .contains("root:"));
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_map_to_grpc_codes() {
    let (reg, _d, mut c) = setup().await;
    for bad in [
        "UPPER/Case",
        "busybox:tag with spaces",
        "a@sha256:short",
        "",
    ] {
        let e = c.pull(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
    }
    let e = c
        .pull(&format!("{}/missing:latest", reg.addr()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Unknown images: empty ImageStatus, successful RemoveImage.
    let (s, info) = c.image_status("nothing:here", true).await.unwrap();
    assert!(s.is_none() && info.is_empty());
    c.remove_image("nothing:here").await.unwrap();
    c.remove_image("sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_credentials_from_auth_config() {
    let reg = TestRegistry::start_with_htpasswd("alice", "s3cret").unwrap();
    let d = TestDaemon::start().unwrap();
    // Credentials cross plain HTTP only where hosts.toml allows it.
    let dir = d.certs_dir().join(reg.addr());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!("server = \"{}\"\nsend_credentials = true\n", reg.url()),
    )
    .unwrap();
    let img = testimages::push_busybox(&reg, "private/busybox:1")
        .await
        .unwrap();
    let mut c = d.client().await.unwrap();

    let e = c.pull(&img.reference).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let wrong = cri::AuthConfig {
        username: "alice".into(),
        password: "wrong".into(),
        ..Default::default()
    };
    let e = c
        .pull_with_auth(&img.reference, Some(wrong))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    let good = cri::AuthConfig {
        username: "alice".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    let id = c.pull_with_auth(&img.reference, Some(good)).await.unwrap();
    assert_eq!(id, img.config_digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pulls_of_one_image_share_the_work() {
    let (reg, _d, c) = setup().await;
    let img = testimages::push_random(&reg, "rand:1", 3, 2 << 20)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = c.clone();
        let r = img.reference.clone();
        tasks.push(tokio::spawn(async move { c.pull(&r).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), img.config_digest);
    }
    let mut c = c.clone();
    assert_eq!(c.list_images(None).await.unwrap().len(), 1);

    // Each blob (config + 3 layers) came over the wire once.
    let s = c
        .runtime
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    let stats: serde_json::Value = serde_json::from_str(&s.info["imageStats"]).unwrap();
    assert_eq!(stats["blobsDownloaded"], 4, "{stats}");
    assert_eq!(stats["layersUnpacked"], 3, "{stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn image_fs_info_reports_usage() {
    let (reg, d, mut c) = setup().await;
    let img = testimages::push_busybox(&reg, "fs:1").await.unwrap();
    c.pull(&img.reference).await.unwrap();
    let r = c
        .image
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.image_filesystems.len(), 1);
    let fs = &r.image_filesystems[0];
    assert!(fs.timestamp > 0);
    let mountpoint = &fs.fs_id.as_ref().unwrap().mountpoint;
    assert!(
        d.root().starts_with(mountpoint),
        "{mountpoint} should be the mount holding {}",
        d.root().display()
    );
    let used = fs.used_bytes.as_ref().unwrap().value;
    let inodes = fs.inodes_used.as_ref().unwrap().value;
    // busybox: a ~2 MiB binary plus a few hundred applet links.
    assert!(used > 1 << 20, "{used}");
    assert!(inodes > 10, "{inodes}");
}
