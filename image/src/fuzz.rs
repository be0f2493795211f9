//! Fuzzing (with the workspace's `vessel-fuzz` engine) of the parsers that see
//! registry and layer bytes: image references, manifests/indexes, image configs,
//! `hosts.toml`, and layer tars (through the header guard). Every input must give a
//! result, never a panic (nor, for tars, a record past the guard's cap).
//!
//! Each target runs `VESSEL_FUZZ_SECS` seconds (default 1, so `cargo test` stays
//! quick); `VESSEL_FUZZ_SEED` fixes the seed to replay a failure:
//!
//! ```sh
//! VESSEL_FUZZ_SECS=300 cargo test -p vessel-image --lib fuzz -- --nocapture --test-threads=1
//! ```

use std::io::Write as _;

use vessel_fuzz::fuzz;

#[test]
fn fuzz_image_references() {
    let seeds: Vec<Vec<u8>> = [
        "busybox",
        "library/busybox:1.36",
        "docker.io/library/busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "127.0.0.1:5000/a/b/c:tag",
        "[::1]:5000/x:y",
        "quay.io/org/app:v1.2.3-rc.1",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("references", &seeds, |data| {
        let s = String::from_utf8_lossy(data);
        if let Ok(r) = crate::ImageRef::parse(&s) {
            // What parses prints as something that parses to the same.
            let again = crate::ImageRef::parse(&r.to_string()).expect("round trip");
            assert_eq!(again.to_string(), r.to_string());
        }
        let _ = crate::normalize_reference(&s);
    });
}

#[test]
fn fuzz_manifests_and_configs() {
    let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let seeds: Vec<Vec<u8>> = vec![
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":123}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":456}}]}}"#,
            d('a'),
            d('b')
        )
        .into_bytes(),
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":7,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            d('c')
        )
        .into_bytes(),
        format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"User":"1000:1000","Env":["A=b"]}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            d('d')
        )
        .into_bytes(),
    ];
    fuzz("manifests", &seeds, |data| {
        let _ = crate::pull::fuzz_parse(data);
    });
}

#[test]
fn fuzz_hosts_toml() {
    let seeds: Vec<Vec<u8>> = vec![
        br#"server = "https://registry-1.docker.io"
[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]
  send_credentials = true
[host."https://mirror.example:8443/v2"]
  skip_verify = true
  ca = ["ca1.pem", "/abs/ca2.pem"]
"#
        .to_vec(),
        b"server = \"http://reg.local:5000\"\nskip_verify = true\ncapabilities = [\"pull\"]\n"
            .to_vec(),
    ];
    let file = std::path::Path::new("/etc/vessel/certs.d/x/hosts.toml");
    fuzz("hosts.toml", &seeds, |data| {
        let text = String::from_utf8_lossy(data);
        if let Ok(hosts) = crate::hosts::parse_hosts_toml(&text, file, "docker.io") {
            assert!(!hosts.is_empty(), "the server is always last");
            assert!(hosts.iter().all(|h| !h.host.is_empty()));
        }
    });
}

fn tar_seeds() -> Vec<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, path, data).unwrap();
    };
    add("etc/", tar::EntryType::Directory, b"");
    add(
        "etc/passwd",
        tar::EntryType::Regular,
        b"root:x:0:0::/root:/bin/sh\n",
    );
    add(
        &format!("{}/long", "d".repeat(120)),
        tar::EntryType::Regular,
        b"x",
    );
    add("etc/.wh.gone", tar::EntryType::Regular, b"");
    let mut plain = b.into_inner().unwrap();
    // A PAX header before one more file.
    let mut pax = tar::Header::new_ustar();
    let rec = b"30 mtime=1600000000.123456789\n";
    pax.set_entry_type(tar::EntryType::XHeader);
    pax.set_size(rec.len() as u64);
    pax.set_path("PaxHeader").unwrap();
    pax.set_cksum();
    let end = plain.len() - 1024;
    let mut tail = plain.split_off(end);
    plain.extend_from_slice(pax.as_bytes());
    plain.extend_from_slice(rec);
    plain.resize(plain.len().div_ceil(512) * 512, 0);
    let mut f = tar::Header::new_ustar();
    f.set_path("paxed").unwrap();
    f.set_size(3);
    f.set_mode(0o600);
    f.set_cksum();
    plain.extend_from_slice(f.as_bytes());
    plain.extend_from_slice(&[b'p'; 512][..]);
    plain.append(&mut tail);
    vec![plain]
}

#[test]
fn fuzz_layer_tars() {
    use crate::unpack::{unpack_layer, Compression, UnpackError};
    let seeds = tar_seeds();
    let tmp = tempfile::tempdir().unwrap();
    let mut i = 0u64;
    fuzz("layer tars", &seeds, |data| {
        i += 1;
        let dest = tmp.path().join(i.to_string());
        std::fs::create_dir(&dest).unwrap();
        if let Err(UnpackError::TooLarge(e)) = unpack_layer(data, Compression::None, &dest) {
            assert!(e.size > e.limit, "{e}");
        }
        let _ = std::fs::remove_dir_all(&dest);
    });
    // The same through gzip.
    let gz: Vec<Vec<u8>> = seeds
        .iter()
        .map(|s| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(s).unwrap();
            e.finish().unwrap()
        })
        .collect();
    fuzz("gzip layer tars", &gz, |data| {
        i += 1;
        let dest = tmp.path().join(i.to_string());
        std::fs::create_dir(&dest).unwrap();
        let _ = unpack_layer(data, Compression::Gzip, &dest);
        let _ = std::fs::remove_dir_all(&dest);
    });
}
