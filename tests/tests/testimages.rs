//! The test harness itself: a real registry, every test image pushed and read back.

use serde_json::Value;
use vessel_tests::registry::TestRegistry;
use vessel_tests::testimages::{self, sha256_digest, HostileKind, PushedImage};

/// Reads the manifest the tag points to and checks it matches what was pushed.
async fn check_single(reg: &TestRegistry, name: &str, img: &PushedImage, layer_mt: &str) -> Value {
    let tag = img.reference.rsplit(':').next().unwrap();
    let (mt, body) = testimages::get_manifest(reg, name, tag).await.unwrap();
    assert_eq!(mt, "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(sha256_digest(&body), img.manifest_digest);
    let m: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(m["config"]["digest"], img.config_digest.as_str());
    let layers: Vec<&str> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert_eq!(l["mediaType"], layer_mt);
            l["digest"].as_str().unwrap()
        })
        .collect();
    assert_eq!(layers, img.layer_digests);
    let config = testimages::get_blob(reg, name, &img.config_digest)
        .await
        .unwrap();
    assert_eq!(sha256_digest(&config), img.config_digest);
    let config: Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"].as_array().unwrap().len(),
        img.layer_digests.len()
    );
    for d in &img.layer_digests {
        let blob = testimages::get_blob(reg, name, d).await.unwrap();
        assert_eq!(&sha256_digest(&blob), d);
    }
    config
}

const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[tokio::test]
async fn pushes_every_test_image() {
    let reg = TestRegistry::start().unwrap();
    let addr = reg.addr();

    let bb = testimages::push_busybox(&addr, "busybox:latest")
        .await
        .unwrap();
    assert_eq!(bb.reference, format!("{addr}/busybox:latest"));
    assert_eq!(
        bb.digest_reference(),
        format!("{addr}/busybox@{}", bb.manifest_digest)
    );
    let config = check_single(&reg, "busybox", &bb, GZ).await;
    assert_eq!(config["architecture"], "amd64");
    assert!(config["config"].get("User").is_none());
    // Reproducible: a second push gives the same digest.
    let again = testimages::push_busybox(&addr, "busybox:again")
        .await
        .unwrap();
    assert_eq!(again.manifest_digest, bb.manifest_digest);

    let wh = testimages::push_layered_whiteouts(&addr, "whiteouts")
        .await
        .unwrap();
    assert_eq!(wh.layer_digests.len(), 3);
    check_single(&reg, "whiteouts", &wh, GZ).await;

    let zst = testimages::push_zstd(&addr, "zstd:1").await.unwrap();
    check_single(
        &reg,
        "zstd",
        &zst,
        "application/vnd.oci.image.layer.v1.tar+zstd",
    )
    .await;

    let user = testimages::push_with_user(&addr, "user:1", "1000:1000")
        .await
        .unwrap();
    let config = check_single(&reg, "user", &user, GZ).await;
    assert_eq!(config["config"]["User"], "1000:1000");

    for (i, kind) in HostileKind::ALL.into_iter().enumerate() {
        let img = testimages::push_hostile(&addr, &format!("hostile:{i}"), kind)
            .await
            .unwrap();
        check_single(&reg, "hostile", &img, GZ).await;
    }

    let rnd = testimages::push_random(&addr, "random:1", 2, 1 << 20)
        .await
        .unwrap();
    check_single(&reg, "random", &rnd, GZ).await;
    for d in &rnd.layer_digests {
        let blob = testimages::get_blob(&reg, "random", d).await.unwrap();
        assert!(blob.len() > 1 << 20, "random data should not compress");
    }
}

#[tokio::test]
async fn pushes_multiarch_index() {
    let reg = TestRegistry::start().unwrap();
    let img = testimages::push_multiarch(&reg, "multi:latest")
        .await
        .unwrap();
    let (mt, body) = testimages::get_manifest(&reg, "multi", "latest")
        .await
        .unwrap();
    assert_eq!(mt, "application/vnd.oci.image.index.v1+json");
    assert_eq!(sha256_digest(&body), img.manifest_digest);
    let index: Value = serde_json::from_slice(&body).unwrap();
    let platforms: Vec<(String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let p = &m["platform"];
            (
                format!(
                    "{}/{}",
                    p["os"].as_str().unwrap(),
                    p["architecture"].as_str().unwrap()
                ),
                m["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(platforms, img.platform_manifests);
    assert_eq!(platforms[0].0, "linux/amd64");
    assert_eq!(platforms[1].0, "linux/arm64");
    // Each platform's manifest is fetchable by digest, with its own config.
    let mut configs = Vec::new();
    for (_, digest) in &platforms {
        let (_, body) = testimages::get_manifest(&reg, "multi", digest)
            .await
            .unwrap();
        assert_eq!(&sha256_digest(&body), digest);
        let m: Value = serde_json::from_slice(&body).unwrap();
        configs.push(m["config"]["digest"].as_str().unwrap().to_owned());
    }
    assert_eq!(configs[0], img.config_digest);
    assert_ne!(configs[0], configs[1]);
}

#[tokio::test]
async fn htpasswd_registry_needs_credentials() {
    let reg = TestRegistry::start_with_htpasswd("vessel", "hunter2").unwrap();
    // Without credentials: refused.
    let err = testimages::push_busybox(&reg.addr(), "private:1")
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("401"), "{err:#}");
    // With them (carried by &TestRegistry): accepted and readable.
    let img = testimages::push_busybox(&reg, "private:1").await.unwrap();
    check_single(&reg, "private", &img, GZ).await;
    let wrong = testimages::Target {
        addr: reg.addr(),
        auth: Some(("vessel".into(), "wrong".into())),
    };
    assert!(testimages::get_manifest(wrong, "private", "1")
        .await
        .is_err());
}
